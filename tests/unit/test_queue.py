"""The qmail-queue client: spawn, pipes, envelope, and the §2.6 result table."""

import errno
import os
import sys
import time

import pytest

from qspp import queue as qmod
from qspp import replies
from qspp.queue import Queue, QueueStartError, queue_program, reply_for_status

ENVELOPE = b"Fa@b.c\0Tx@example.org\0Ty@sub.example.net\0\0"

# The §2.6 table, written out independently of queue.py.
_SPEC_ROWS = [
    ((11, 115), b"554 envelope address too long for qq (#5.1.3)"),
    ((31,), b"554 mail server permanently rejected message (#5.3.0)"),
    (tuple(range(12, 31)) + tuple(range(32, 41)), b"554 qq permanent problem (#5.3.0)"),
    ((51,), b"451 qq out of memory (#4.3.0)"),
    ((52,), b"451 qq timeout (#4.3.0)"),
    ((53,), b"451 qq write error or disk full (#4.3.0)"),
    ((54,), b"451 qq read error (#4.3.0)"),
    ((55,), b"451 qq unable to read configuration (#4.3.0)"),
    ((56,), b"451 qq trouble making network connection (#4.3.0)"),
    ((61,), b"451 qq trouble in home directory (#4.3.0)"),
    (tuple(range(62, 67)), b"451 qq trouble creating files in queue (#4.3.0)"),
    ((71,), b"451 mail server temporarily rejected message (#4.3.0)"),
    ((72,), b"451 connection to mail server timed out (#4.4.1)"),
    ((73,), b"451 connection to mail server rejected (#4.4.1)"),
    ((74,), b"451 communication with mail server failed (#4.4.2)"),
    ((81, 91), b"451 qq internal bug (#4.3.0)"),
    ((120,), b"451 unable to exec qq (#4.3.0)"),
]
_OTHER = (list(range(1, 11)) + list(range(41, 51)) + list(range(57, 61))
          + list(range(67, 71)) + list(range(75, 81)) + list(range(82, 91))
          + list(range(92, 115)) + list(range(116, 120)) + list(range(121, 256)))


def spec_reply(code):
    for codes, text in _SPEC_ROWS:
        if code in codes:
            return text
    assert code in _OTHER
    return b"451 qq temporary problem (#4.3.0)"


@pytest.mark.parametrize("write_failed", [False, True])
def test_every_exit_code(write_failed):
    for code in range(256):
        got = reply_for_status(code << 8, write_failed, 4242, 1795558454.7)
        if code == 0:
            want = (b"451 qq read error (#4.3.0)" if write_failed
                    else b"250 ok 1795558454 qp 4242")
        else:
            want = spec_reply(code)
        assert got == want, code


def test_other_codes_cover_the_rest():
    listed = set(_OTHER) | {0}
    for codes, _ in _SPEC_ROWS:
        listed |= set(codes)
    assert listed == set(range(256))


@pytest.mark.parametrize("sig", [1, 6, 9, 11, 13, 15, 31, 64])
def test_signals_are_crashes(sig):
    assert reply_for_status(sig, False, 1, 0) == b"451 qq crashed (#4.3.0)"
    assert reply_for_status(sig | 0x80, True, 1, 0) == b"451 qq crashed (#4.3.0)"  # core


def test_wait_failed():
    assert reply_for_status(None, False, 1, 0) == b"451 qq waitpid surprise (#4.3.0)"


def test_queue_program():
    assert queue_program({}) == b"bin/qmail-queue"
    assert queue_program({b"QMAILQUEUE": b""}) == b"bin/qmail-queue"
    assert queue_program({b"QMAILQUEUE": b"/x/y"}) == b"/x/y"


# Real children -------------------------------------------------------------

def script(path, body):
    path.write_bytes(b"#!/bin/sh\n" + body + b"\n")
    path.chmod(0o755)
    return os.fsencode(path)


@pytest.fixture
def recorder(tmp_path):
    """A queue saving fd 0 as M and fd 1 as E, then exiting with `code`."""
    def make(code=0, extra=b""):
        return script(tmp_path / "rec", b"cat > M || exit 99\ncat <&1 > E || exit 98\n"
                      + extra + b"\nexit %d" % code)
    return make


@pytest.fixture
def base_env():
    return {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin")}


def run_queue(program, env, chunks, envelope):
    q = Queue.start(program, env)
    for c in chunks:
        q.write(c)
    before = int(time.time())
    reply = q.finish(envelope)
    return q, reply, before


def test_success_records_exact_bytes(tmp_path, monkeypatch, recorder, base_env):
    monkeypatch.chdir(tmp_path)
    q, reply, before = run_queue(recorder(), base_env, [b"Received: x\n", b"hi\n"], ENVELOPE)
    assert (tmp_path / "M").read_bytes() == b"Received: x\nhi\n"
    assert (tmp_path / "E").read_bytes() == ENVELOPE
    head, t, qp, pid = reply.rsplit(b" ", 3)
    assert head == b"250 ok" and qp == b"qp" and int(pid) == q.pid
    assert before <= int(t) <= time.time()
    assert reply == replies.queued(int(t), q.pid)
    assert os.WIFEXITED(q.status) and os.WEXITSTATUS(q.status) == 0


def test_null_sender_envelope(tmp_path, monkeypatch, recorder, base_env):
    monkeypatch.chdir(tmp_path)
    _, reply, _ = run_queue(recorder(), base_env, [], b"F\0Tx@example.org\0\0")
    assert reply.startswith(b"250 ok ")
    assert (tmp_path / "M").read_bytes() == b""
    assert (tmp_path / "E").read_bytes() == b"F\0Tx@example.org\0\0"


def test_abort_writes_no_envelope_byte(tmp_path, monkeypatch, recorder, base_env):
    monkeypatch.chdir(tmp_path)
    _, reply, _ = run_queue(recorder(), base_env, [b"partial\n"], None)
    assert (tmp_path / "M").read_bytes() == b"partial\n"
    assert (tmp_path / "E").read_bytes() == b""
    # The recorder exits 0; after an abort that is a read error, as in netqmail.
    assert reply == b"451 qq read error (#4.3.0)"


@pytest.mark.parametrize("code", [11, 31, 25, 51, 54, 71, 74, 81, 91, 99, 82, 120, 255])
def test_exit_codes_real(tmp_path, monkeypatch, recorder, base_env, code):
    monkeypatch.chdir(tmp_path)
    _, reply, _ = run_queue(recorder(code), base_env, [b"hi\n"], ENVELOPE)
    assert reply == spec_reply(code)
    assert (tmp_path / "E").read_bytes() == ENVELOPE


def test_environment_cwd_and_argv(tmp_path, monkeypatch, base_env):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QSPP_TEST_LEAK", "1")
    prog = script(tmp_path / "q", b'printf "%s|%s|%s|%s" "$0" "$FOO" "${QSPP_TEST_LEAK-unset}"'
                  b' "$(pwd)" > out\ncat >/dev/null\ncat <&1 >/dev/null')
    env = dict(base_env)
    env[b"FOO"] = b"b\xffar"
    _, reply, _ = run_queue(prog, env, [], ENVELOPE)
    assert reply.startswith(b"250 ok ")
    assert (tmp_path / "out").read_bytes() == (
        prog + b"|b\xffar|unset|" + os.fsencode(os.path.realpath(tmp_path)))


def test_relative_default_program_resolves_from_cwd(tmp_path, monkeypatch, base_env):
    # Row 43 / D3: an empty QMAILQUEUE means bin/qmail-queue under the home.
    (tmp_path / "bin").mkdir()
    script(tmp_path / "bin" / "qmail-queue", b"cat > M; cat <&1 > E")
    monkeypatch.chdir(tmp_path)
    prog = queue_program({b"QMAILQUEUE": b""})
    _, reply, _ = run_queue(prog, base_env, [b"x\n"], ENVELOPE)
    assert reply.startswith(b"250 ok ")
    assert (tmp_path / "E").read_bytes() == ENVELOPE


def test_only_the_two_pipes_reach_the_child(tmp_path, monkeypatch, base_env):
    monkeypatch.chdir(tmp_path)
    # Python, not sh: a shell moves fds around for its own redirections.
    prog = tmp_path / "q"
    prog.write_bytes(b"#!" + os.fsencode(sys.executable) + b"""
import os
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass  # the listing's own fd
with open("fds", "w") as f:
    f.writelines("%s %s\\n" % kv for kv in fds.items())
while os.read(0, 65536):
    pass
while os.read(1, 65536):
    pass
""")
    prog.chmod(0o755)
    prog = os.fsencode(prog)
    q = Queue.start(prog, base_env)
    ours = {os.fstat(q._fdm).st_ino, os.fstat(q._fde).st_ino}
    reply = q.finish(ENVELOPE)
    assert reply.startswith(b"250 ok ")
    fds = dict(line.split(" ", 1) for line in (tmp_path / "fds").read_text().splitlines())
    pipes = {fd: target for fd, target in fds.items()
             if target.startswith("pipe:[") and int(target[6:-1]) in ours}
    assert sorted(pipes) == ["0", "1"]
    assert pipes["0"] != pipes["1"]


def fd_count():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["missing", "directory", "noexec", "badformat"])
def test_exec_failure_acts_as_exit_120(tmp_path, base_env, kind):
    if kind == "missing":
        prog = os.fsencode(tmp_path / "nonexistent")
    elif kind == "directory":
        prog = os.fsencode(tmp_path)
    else:
        p = tmp_path / "q"
        p.write_bytes(b"\x7fELF garbage" if kind == "badformat" else b"#!/bin/sh\nexit 0\n")
        p.chmod(0o755 if kind == "badformat" else 0o644)
        prog = os.fsencode(p)
    n = fd_count()
    q = Queue.start(prog, base_env)
    assert q.pid is None and isinstance(q.exec_error, OSError)
    assert fd_count() == n
    q.write(b"x" * 300000)  # accepted and discarded
    assert not q.write_failed
    assert q.finish(ENVELOPE) == b"451 unable to exec qq (#4.3.0)"
    assert fd_count() == n


def test_nonexistent_queue_program_example_41(tmp_path, base_env):
    q = Queue.start(b"/nonexistent", base_env)
    q.write(b"Received: ...\n")
    q.write(b"hi\n")
    assert q.finish(ENVELOPE) == b"451 unable to exec qq (#4.3.0)"


def test_exit_0_without_reading_300k_is_read_error(tmp_path, monkeypatch, base_env):
    monkeypatch.chdir(tmp_path)
    prog = script(tmp_path / "q", b"exit 0")
    q = Queue.start(prog, base_env)
    for _ in range(30):
        q.write(b"x" * 9999 + b"\n")
    assert q.write_failed
    assert q.finish(ENVELOPE) == b"451 qq read error (#4.3.0)"


def test_failed_envelope_write_is_read_error(tmp_path, monkeypatch, base_env):
    monkeypatch.chdir(tmp_path)
    # fd 1 is closed before the message is read, so the envelope write must fail.
    prog = script(tmp_path / "q", b"exec 1>&-\ncat > M\nexit 0")
    q = Queue.start(prog, base_env)
    q.write(b"y" * 300000)
    assert not q.write_failed
    assert q.finish(ENVELOPE) == b"451 qq read error (#4.3.0)"
    assert q.write_failed
    assert len((tmp_path / "M").read_bytes()) == 300000


def test_writes_after_failure_are_dropped(tmp_path, monkeypatch, base_env):
    monkeypatch.chdir(tmp_path)
    prog = script(tmp_path / "q", b"exit 0")
    q = Queue.start(prog, base_env)
    q.write(b"z" * 300000)
    assert q.write_failed
    q.write(b"more")  # no exception, nothing sent
    assert q.finish(ENVELOPE) == b"451 qq read error (#4.3.0)"


def test_self_sigsegv_is_crash(tmp_path, monkeypatch, base_env):
    monkeypatch.chdir(tmp_path)
    prog = script(tmp_path / "q", b"cat >/dev/null\nkill -SEGV $$\nexit 0")
    q, reply, _ = run_queue(prog, base_env, [b"a" * 300000], ENVELOPE)
    assert reply == b"451 qq crashed (#4.3.0)"
    assert os.WIFSIGNALED(q.status) and os.WTERMSIG(q.status) == 11


def test_crash_while_writing(tmp_path, monkeypatch, base_env):
    monkeypatch.chdir(tmp_path)
    prog = script(tmp_path / "q", b"kill -SEGV $$")
    _, reply, _ = run_queue(prog, base_env, [b"a" * 300000], ENVELOPE)
    assert reply == b"451 qq crashed (#4.3.0)"


def test_waitpid_surprise(tmp_path, monkeypatch, recorder, base_env):
    monkeypatch.chdir(tmp_path)
    q = Queue.start(recorder(), base_env)
    q.write(b"x\n")
    for name in ("_fdm", "_fde"):
        os.close(getattr(q, name))
        setattr(q, name, -1)
    os.waitpid(q.pid, 0)  # someone else reaps the child first
    assert q.finish(ENVELOPE) == b"451 qq waitpid surprise (#4.3.0)"


def test_pipe_failure_raises_and_leaks_nothing(monkeypatch, base_env):
    real_pipe = os.pipe
    calls = []

    def pipe():
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_pipe()

    n = fd_count()
    monkeypatch.setattr(qmod.posix, "pipe", pipe)
    with pytest.raises(QueueStartError) as ei:
        Queue.start(b"/bin/true", base_env)
    assert ei.value.args[0].errno == errno.EMFILE
    assert fd_count() == n


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.ENOMEM])
def test_spawn_resource_failure_raises(monkeypatch, base_env, err):
    def spawn(*a, **k):
        raise OSError(err, os.strerror(err))

    n = fd_count()
    monkeypatch.setattr(qmod, "_spawn_std", spawn)
    with pytest.raises(QueueStartError):
        Queue.start(b"/bin/true", base_env)
    assert fd_count() == n


def test_bad_environment_entry_raises(base_env):
    n = fd_count()
    with pytest.raises(QueueStartError):
        Queue.start(b"/bin/true", {b"A=B": b"x"})
    assert fd_count() == n


def test_parent_keeps_no_read_ends(tmp_path, monkeypatch, recorder, base_env):
    monkeypatch.chdir(tmp_path)
    n = fd_count()
    q = Queue.start(recorder(), base_env)
    assert fd_count() == n + 2
    for fd in (q._fdm, q._fde):
        assert not os.get_inheritable(fd)
    q.finish(ENVELOPE)
    assert fd_count() == n
