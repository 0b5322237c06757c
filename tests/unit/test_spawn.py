"""qspp.spawn: a child with netqmail's signal state, errors as os.posix_spawn's."""

import errno
import os
import signal
import sys

import pytest

from qspp import spawn

PIPE_BIT = 1 << (signal.SIGPIPE - 1)
INTERNAL = (1 << 31) | (1 << 32)  # glibc's signals 32 and 33


def masks(keep_sigpipe=True, pgroup=False):
    r, w = os.pipe()
    try:
        pid = spawn.spawn(b"/bin/grep", [b"grep", b"-E", b"^Sig(Ign|Blk):", b"/proc/self/status"],
                          {b"PATH": b"/usr/bin:/bin"}, ((spawn.DUP2, w, 1),),
                          pgroup=pgroup, keep_sigpipe=keep_sigpipe)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return {line.split(b":")[0]: int(line.split()[1], 16) for line in out.splitlines()}


NO_VFORK = "vfork through _posixsubprocess is for CPython 3.11 to 3.13 on Linux"


def require_vfork():
    """use_vfork(), or the test is skipped where it cannot be used."""
    if not spawn.use_vfork():
        pytest.skip(NO_VFORK)


@pytest.fixture
def provable():
    """The signal state use_vfork() accepts, whatever this test run inherited
    (a shell's background job ignores SIGINT and SIGQUIT); put back after."""
    ignored = {s: signal.getsignal(s) for s in signal.valid_signals()
               if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ)
               and signal.getsignal(s) == signal.SIG_IGN}
    for s in ignored:
        signal.signal(s, signal.SIG_DFL)
    mask = signal.pthread_sigmask(signal.SIG_SETMASK, ())
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    spawn.stop_vfork()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for s, h in ignored.items():
        signal.signal(s, h)


@pytest.fixture(params=["libc", "fallback", "vfork"])
def mode(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(spawn, "_libc", False)
    elif request.param == "vfork":
        request.getfixturevalue("provable")
        require_vfork()
    elif not spawn._load():
        pytest.skip("no C library posix_spawn through _ctypes here")
    return request.param


def test_signal_state(mode):
    if mode == "vfork":
        # its promise holds for the state use_vfork() proved, which a serve
        # worker keeps: no signal ignored or blocked but SIGPIPE
        kept, none = masks(), masks(keep_sigpipe=False)
        assert kept == {b"SigBlk": 0, b"SigIgn": PIPE_BIT}
        assert none == {b"SigBlk": 0, b"SigIgn": 0}
        # CPython's own SIGXFSZ ignore is back in the parent after each
        assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
        return
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        kept = masks()
        none = masks(keep_sigpipe=False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGHUP, old)
    # os.posix_spawn cannot name glibc's own signals: the fallback leaves them
    slack = INTERNAL if mode == "fallback" else 0
    assert kept[b"SigBlk"] == none[b"SigBlk"] == 0
    assert kept[b"SigIgn"] & ~slack == PIPE_BIT
    assert none[b"SigIgn"] & ~slack == 0


def test_libc_path_resets_internal_signals():
    if not spawn._load():
        pytest.skip("no C library posix_spawn through _ctypes here")
    assert masks()[b"SigIgn"] == PIPE_BIT


def test_process_group(mode):
    pid = spawn.spawn(b"/bin/sleep", [b"sleep", b"5"], {}, pgroup=True)
    try:
        assert os.getpgid(pid) == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_open_action_and_exit_status(mode, tmp_path):
    p = tmp_path / "in"
    p.write_bytes(b"abc")
    pid = spawn.spawn(b"/bin/sh", [b"sh", b"-c", b'test "$(cat)" = abc'], {},
                      ((spawn.OPEN, 0, os.fsencode(p), os.O_RDONLY, 0),))
    assert os.waitpid(pid, 0)[1] == 0


def test_errors_as_posix_spawn(mode, tmp_path):
    with pytest.raises(OSError) as ei:
        spawn.spawn(os.fsencode(tmp_path / "none"), [b"none"], {})
    assert ei.value.errno == errno.ENOENT
    for env in ({b"A=B": b"1"}, {b"": b"1"}, {b"A": b"x\0y"}):
        with pytest.raises(ValueError):
            spawn.spawn(b"/bin/true", [b"true"], env)
    with pytest.raises(ValueError):
        spawn.spawn(b"/bin/true", [b"tr\0ue"], {})


def test_search_on_path(mode):
    pid = spawn.spawn(b"true", [b"true"], {}, search=True)
    assert os.waitpid(pid, 0)[1] == 0


def environ_of(env, actions=()):
    r, w = os.pipe()
    try:
        pid = spawn.spawn(b"/usr/bin/env", [b"env"], env, tuple(actions) + ((spawn.DUP2, w, 1),))
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    assert os.waitpid(pid, 0)[1] == 0
    return out.splitlines()


def test_reused_environment_follows_every_change(mode):
    # spawn reuses what it built for the last environment: a changed value, a
    # removed name and the same items in another order must each show
    env = {b"A": b"1", b"B": b"2"}
    assert environ_of(env) == [b"A=1", b"B=2"]
    assert environ_of(env) == [b"A=1", b"B=2"]
    env[b"A"] = b"3"
    assert environ_of(env) == [b"A=3", b"B=2"]
    del env[b"A"]
    assert environ_of(env) == [b"B=2"]
    env[b"A"] = b"3"
    assert environ_of(env) == [b"B=2", b"A=3"]
    with pytest.raises(ValueError):
        spawn.spawn(b"/bin/true", [b"true"], {b"B": b"2", b"A": b"x\0"})
    assert environ_of({b"B": b"2", b"A": b"3"}) == [b"B=2", b"A=3"]
    # equal as dicts, not as the child sees them
    assert environ_of({b"A": b"3", b"B": b"2"}) == [b"A=3", b"B=2"]


def test_values_rewritten_in_place_stay_exact(mode):
    # one or two values changed are rewritten in the kept array; a renamed
    # name, many changes or a NUL met halfway take the full path, and the
    # array half rewritten before the NUL is never used again
    env = {b"A": b"1", b"B": b"2", b"C": b"3", b"D": b"4", b"E": b"5", b"F": b"6"}
    assert environ_of(env) == [b"A=1", b"B=2", b"C=3", b"D=4", b"E=5", b"F=6"]
    env[b"C"] = b"30"
    assert environ_of(env) == [b"A=1", b"B=2", b"C=30", b"D=4", b"E=5", b"F=6"]
    env[b"A"], env[b"F"] = b"", b"60"
    assert environ_of(env) == [b"A=", b"B=2", b"C=30", b"D=4", b"E=5", b"F=60"]
    env = {k: v + b"!" for k, v in env.items()}
    assert environ_of(env) == [b"A=!", b"B=2!", b"C=30!", b"D=4!", b"E=5!", b"F=60!"]
    renamed = {(b"G" if k == b"B" else k): v for k, v in env.items()}
    assert environ_of(renamed) == [b"A=!", b"G=2!", b"C=30!", b"D=4!", b"E=5!", b"F=60!"]
    assert environ_of(env) == [b"A=!", b"B=2!", b"C=30!", b"D=4!", b"E=5!", b"F=60!"]
    bad = dict(env)
    bad[b"B"], bad[b"E"] = b"ok", b"x\0y"
    with pytest.raises(ValueError):
        spawn.spawn(b"/bin/true", [b"true"], bad)
    assert environ_of(env) == [b"A=!", b"B=2!", b"C=30!", b"D=4!", b"E=5!", b"F=60!"]
    env[b"B"] = b"after"
    assert environ_of(env) == [b"A=!", b"B=after", b"C=30!", b"D=4!", b"E=5!", b"F=60!"]


def test_spawn_std_dups_fds_0_and_1(mode, tmp_path, monkeypatch):
    """The plugins' and the queue's shape of spawn, by vfork where proved."""
    forked = []
    if spawn._forker is not None:
        real = spawn._forker.spawn
        monkeypatch.setattr(spawn._forker, "spawn", lambda *a: forked.append(a) or real(*a))
    p = tmp_path / "in"
    p.write_bytes(b"abc")
    fd = os.open(p, os.O_RDONLY)
    r, w = os.pipe()
    try:
        pid = spawn.spawn_std(b"/bin/sh", [b"sh", b"-c", b'echo "$(cat) $X"'], {b"X": b"x"}, fd, w,
                              pgroup=True)
    finally:
        os.close(w)
        os.close(fd)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"abc x\n"
    assert os.waitpid(pid, 0)[1] == 0
    assert len(forked) == (mode == "vfork")


def test_reused_file_actions_and_argv(mode, tmp_path):
    p = tmp_path / "in"
    p.write_bytes(b"abc")
    opened = (spawn.OPEN, 0, os.fsencode(p), os.O_RDONLY, 0)
    for _ in range(3):
        pid = spawn.spawn(b"/bin/sh", [b"sh", b"-c", b'test "$(cat)" = abc'], {}, (opened,))
        assert os.waitpid(pid, 0)[1] == 0
    pid = spawn.spawn(b"/bin/sh", [b"sh", b"-c", b'test "$(cat)" = ""'], {},
                      ((spawn.OPEN, 0, b"/dev/null", os.O_RDONLY, 0),))
    assert os.waitpid(pid, 0)[1] == 0


def test_use_vfork_only_for_a_proved_signal_state(provable):
    """A signal ignored (other than SIGPIPE, and CPython's SIGXFSZ) or blocked
    would reach a vfork child: use_vfork() then says no and posix_spawn stays."""
    require_vfork()
    spawn.stop_vfork()
    old = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        assert not spawn.use_vfork()
    finally:
        signal.signal(signal.SIGQUIT, old)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        assert not spawn.use_vfork()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    assert spawn._forker is None
    assert masks() == {b"SigBlk": 0, b"SigIgn": PIPE_BIT}
    assert spawn.use_vfork()


def test_vfork_exec_errors_are_reaped(mode, tmp_path):
    """A failed exec is the spawn's OSError, and the child that reported it
    is reaped: no zombie is left for a later wait to find."""
    script = tmp_path / "noexec"
    script.write_bytes(b"#!/bin/sh\n")
    script.chmod(0o644)
    for path, err in ((tmp_path / "none", errno.ENOENT), (script, errno.EACCES),
                      (tmp_path, errno.EACCES)):
        with pytest.raises(OSError) as ei:
            spawn.spawn(os.fsencode(path), [b"x"], {})
        assert (ei.value.errno, ei.value.filename) == (err, os.fsencode(path))
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_vfork_only_from_the_thread_that_proved_it(provable):
    """signal.signal, which the vfork path needs for SIGXFSZ, works in the
    main thread only: another thread's spawns keep posix_spawn, same state."""
    require_vfork()
    import threading
    got = []
    t = threading.Thread(target=lambda: got.append(masks()))
    t.start()
    t.join()
    assert got == [{b"SigBlk": 0, b"SigIgn": PIPE_BIT}]


def test_use_vfork_refuses_where_the_parent_does_not_wait(provable, monkeypatch):
    """An exec error is looked for as soon as the spawn returns, which holds
    only where vfork suspends the parent.  use_vfork() first runs an exec that
    must fail; where no error shows at once (vfork done as fork), it says no."""
    import _posixsubprocess
    real = _posixsubprocess.fork_exec

    def late(args, executables, *rest):
        # as if the probe's error were still to come: its exec "succeeds"
        return real([b"sh", b"-c", b"exit 255"], (b"/bin/sh",), *rest)
    monkeypatch.setattr(_posixsubprocess, "fork_exec", late)
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        pytest.skip(NO_VFORK)
    assert not spawn.use_vfork()
    assert spawn._forker is None
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # the probe was reaped


def test_use_vfork_refuses_when_the_probe_cannot_start(provable, monkeypatch):
    """A spawn that fails in the parent (out of processes) proves nothing."""
    import _posixsubprocess

    def refused(*args):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refused)
    assert not spawn.use_vfork()
    assert spawn._forker is None


def open_fds():
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_vfork_error_pipe_is_kept_and_drained(provable, tmp_path):
    """One error pipe serves every vfork spawn: spawns open nothing, and an
    exec error is read to its end, so the next spawn is not blamed for it."""
    require_vfork()
    before = open_fds()
    for _ in range(3):
        with pytest.raises(OSError) as ei:
            spawn.spawn(os.fsencode(tmp_path / "none"), [b"none"], {})
        assert ei.value.errno == errno.ENOENT
        pid = spawn.spawn(b"/bin/true", [b"true"], {})
        assert os.waitpid(pid, 0)[1] == 0
    assert open_fds() == before
    er, ew = spawn._forker.er, spawn._forker.ew
    spawn.stop_vfork()
    assert not is_open(er) and not is_open(ew)


def test_a_forked_child_does_not_share_the_error_pipe(provable):
    """A child of os.fork() would share the parent's pipe (and read the
    parent's children's errors): it spawns by posix_spawn until it proves
    its own state, with a pipe of its own."""
    require_vfork()
    er, ew = spawn._forker.er, spawn._forker.ew
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        ok = spawn._forker is None and not is_open(er) and not is_open(ew)
        ok = ok and spawn.use_vfork()
        os.write(w, b"ok" if ok else b"no")
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"ok"
    assert os.waitpid(pid, 0)[1] == 0
    assert (spawn._forker.er, spawn._forker.ew) == (er, ew)


def test_sigxfsz_already_default_is_left_alone(provable, monkeypatch):
    """Where SIGXFSZ is at its default when use_vfork() proves the state (a
    serve worker with no file size limit), spawns do not touch it."""
    old = signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        require_vfork()
        assert not spawn._forker.xfsz_ignored
        calls = []
        monkeypatch.setattr(spawn._signal, "signal", lambda *a: calls.append(a))
        assert masks() == {b"SigBlk": 0, b"SigIgn": PIPE_BIT}
        assert calls == []
    finally:
        signal.signal(signal.SIGXFSZ, old)
