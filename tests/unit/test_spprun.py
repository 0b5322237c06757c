"""spp.md §4.2-4.5: running one entry, with real processes."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from qspp import spprun
from qspp.spprun import RunResult, run_entry

ENV = {b"PATH": os.environb.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin")}


def run(entry, timeout=60, env=None, **kw):
    lines = []
    res = run_entry(entry, ENV if env is None else env, timeout, on_line=lines.append, **kw)
    return res, lines


def script(dirpath, name, body, shebang=None):
    p = dirpath / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text((shebang or "#!%s -S\n" % sys.executable) + body)
    p.chmod(0o755)
    return os.fsencode(p)


def group_members(pgid):
    """Live (non-zombie) processes whose process group is pgid."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(int(name))
    return out


def assert_group_gone(pgid, limit=2.0):
    end = time.monotonic() + limit
    while group_members(pgid):
        if time.monotonic() > end:
            pytest.fail("process group %d still has %r" % (pgid, group_members(pgid)))
        time.sleep(0.01)


def assert_reaped(pid):
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# --- output parsing (§4.3) ----------------------------------------------------

def test_lines_then_terminator():
    res, lines = run(b":echo Sa=1; echo P250-x; echo 'HX: y'; echo E550 no; echo Sb=2")
    assert lines == [b"Sa=1", b"P250-x", b"HX: y"]
    assert res.terminator == b"E550 no"
    assert res.failure is None and res.exit_status == 0 and res.signal is None
    assert res.killed is False
    assert isinstance(res.pid, int)
    assert_reaped(res.pid)


@pytest.mark.parametrize("letter", list("ANOERD"))
def test_each_terminator_letter_ends_parsing(letter):
    res, lines = run(b":echo LMx; echo '" + letter.encode() + b"rest'; echo Sz=1")
    assert lines == [b"LMx"]
    assert res.terminator == letter.encode() + b"rest"


def test_ignored_lines_are_delivered_empty_ones_are_not():
    # §7.5 #36 second variant
    res, lines = run(b':printf "X\\n\\n e\\nn\\nN\\nE550 x\\n"')
    assert lines == [b"X", b" e", b"n"]
    assert res.terminator == b"N"


def test_one_trailing_cr_stripped():
    res, _ = run(b':printf "E550 crlf\\r\\n"')
    assert res.terminator == b"E550 crlf"
    res, _ = run(b':printf "E550 x\\r\\r\\n"')
    assert res.terminator == b"E550 x\r"
    res, lines = run(b':printf "Sa=1\\r\\nHa\\rb\\r\\n\\r\\nN\\n"')
    assert lines == [b"Sa=1", b"Ha\rb"]


def test_last_line_without_lf_is_whole():
    # §7.1 #9
    res, _ = run(b':printf "E554 no greeting"')
    assert res.terminator == b"E554 no greeting"
    res, _ = run(b":printf N")
    assert res.terminator == b"N"
    res, lines = run(b":printf 'Sx=1\\nSy=2\\r'")
    assert lines == [b"Sx=1", b"Sy=2"] and res.terminator is None


def test_nul_cuts_line():
    res, lines = run(b":printf 'Sa=b\\000c\\n\\000E550\\nE5\\000x\\n'")
    assert lines == [b"Sa=b"]
    assert res.terminator == b"E5"


def test_lines_after_terminator_are_read_not_delivered():
    res, lines = run(b":printf 'N\\nSa=b\\nE550\\n'; seq 1 20000")
    assert res.terminator == b"N" and lines == []
    assert res.failure is None and res.exit_status == 0
    assert res.bytes_read > 100000


def test_no_terminator():
    res, lines = run(b":echo Sa=1")
    assert res.terminator is None and lines == [b"Sa=1"] and res.failure is None


def test_lines_delivered_as_they_arrive():
    seen = []
    t0 = time.monotonic()
    res = run_entry(b":echo P250-early; sleep 0.4; echo N", ENV, 60,
                    on_line=lambda l: seen.append((l, time.monotonic())))
    t1 = time.monotonic()
    assert [l for l, _ in seen] == [b"P250-early"]
    assert seen[0][1] - t0 < 0.3 and t1 - seen[0][1] >= 0.3
    assert res.terminator == b"N"


def test_line_split_across_writes(tmp_path):
    p = script(tmp_path, "split", (
        "import sys, time\n"
        "o = sys.stdout.buffer\n"
        "o.write(b'Sab'); o.flush(); time.sleep(0.05)\n"
        "o.write(b'c=1\\r'); o.flush(); time.sleep(0.05)\n"
        "o.write(b'\\nHd\\nE5'); o.flush(); time.sleep(0.05)\n"
        "o.write(b'50 x\\n'); o.flush()\n"))
    res, lines = run(p)
    assert lines == [b"Sabc=1", b"Hd"]
    assert res.terminator == b"E550 x"


def test_python_plugin_that_writes_after_terminator(tmp_path):
    # §7.5 #40: output after N is drained; no EPIPE, no failure
    p = script(tmp_path, "plugins/py", (
        "import sys, time\n"
        "print('N', flush=True)\n"
        "time.sleep(0.5)\n"
        "print('E550 late', flush=True)\n"))
    res, lines = run(p)
    assert res.terminator == b"N" and lines == []
    assert res.failure is None and res.exit_status == 0
    assert res.elapsed_ms >= 450


def test_no_callback_is_fine():
    res = run_entry(b":echo Sa=1; echo O", ENV, 60)
    assert res.terminator == b"O"


# --- failures (§4.5) ------------------------------------------------------------

def test_exit_120_is_cant_execute():
    res, _ = run(b":exit 120")
    assert res.failure == b"can't execute" and res.exit_status == 120


@pytest.mark.parametrize("code", [1, 2, 119, 121, 126, 127, 255])
def test_other_exit_statuses_ignored(code):
    res, _ = run(b":exit %d" % code)
    assert res.failure is None and res.exit_status == code


def test_terminator_then_exit_1_stands():
    # §7.5 #37
    res, _ = run(b":echo E550 via exit1; exit 1")
    assert res.terminator == b"E550 via exit1" and res.failure is None


def test_missing_command_in_shell_is_quiet():
    res, lines = run(b":nosuchcmd 2>/dev/null")
    assert res.failure is None and res.exit_status == 127 and res.terminator is None


def test_segv_is_child_crashed():
    # §7.5 #38
    res, _ = run(b":kill -SEGV $$")
    assert res.failure == b"child crashed"
    assert res.signal == signal.SIGSEGV and res.exit_status is None and not res.killed


def test_terminator_kept_and_crash_recorded():
    # §7.5 #39: the engine keeps the E verdict and only logs the crash (Δ7)
    res, _ = run(b":echo E550 bye; kill -KILL $$")
    assert res.terminator == b"E550 bye"
    assert res.failure == b"child crashed" and res.signal == signal.SIGKILL
    assert res.killed is False


def test_nonexistent_file_cant_execute(tmp_path):
    res, _ = run(os.fsencode(tmp_path / "nope"))
    assert res.failure == b"can't execute" and res.errno == errno.ENOENT
    assert res.pid is None


def test_not_executable_cant_execute(tmp_path):
    p = tmp_path / "plain"
    p.write_bytes(b"#!/bin/sh\necho N\n")
    p.chmod(0o644)
    res, _ = run(os.fsencode(p))
    assert res.failure == b"can't execute" and res.errno == errno.EACCES


def test_directory_cant_execute(tmp_path):
    res, _ = run(os.fsencode(tmp_path))
    assert res.failure == b"can't execute" and res.errno == errno.EACCES


def test_bad_format_cant_execute(tmp_path):
    # no #! and not a binary: glibc's posix_spawn reports ENOEXEC, no sh fallback
    p = tmp_path / "garbage"
    p.write_bytes(b"echo N\n")
    p.chmod(0o755)
    res, _ = run(os.fsencode(p))
    assert res.failure == b"can't execute" and res.errno == errno.ENOEXEC


def test_entry_with_space_is_one_path(tmp_path, monkeypatch):
    # §7.1 #6: `plugins/x arg` names the file "plugins/x arg"
    monkeypatch.chdir(tmp_path)
    script(tmp_path, "plugins/x", "print('N')\n")
    res, _ = run(b"plugins/x arg")
    assert res.failure == b"can't execute" and res.errno == errno.ENOENT
    script(tmp_path, "plugins/x arg", "print('E550 spaced')\n")
    res, _ = run(b"plugins/x arg")
    assert res.failure is None and res.terminator == b"E550 spaced"


def test_relative_entry_resolves_from_cwd_not_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script(tmp_path, "plugins/ok", "print('Sok=1')\nprint('N')\n")
    res, lines = run(b"plugins/ok")
    assert lines == [b"Sok=1"] and res.terminator == b"N"
    # a bare name is not searched on PATH
    res, _ = run(b"true", env={b"PATH": b"/bin:/usr/bin"})
    assert res.failure == b"can't execute" and res.errno == errno.ENOENT


def test_missing_shell_interpreter(tmp_path):
    p = script(tmp_path, "noint", "echo N\n", shebang="#!/nonexistent/sh\n")
    res, _ = run(p)
    assert res.failure == b"can't execute" and res.errno == errno.ENOENT


# --- timeout (§4.4) ---------------------------------------------------------------

def test_timeout_kills_and_takes_about_the_limit():
    # §7.5 #41
    t0 = time.monotonic()
    res, _ = run(b":sleep 5", timeout=1)
    took = time.monotonic() - t0
    assert res.failure == b"timeout" and res.killed and res.signal == signal.SIGKILL
    assert 0.9 <= took < 1.8 and 900 <= res.elapsed_ms < 1800
    assert_reaped(res.pid)
    assert_group_gone(res.pid)


def test_background_child_in_group_is_killed_at_timeout():
    # §7.5 #42 first variant: N was read; the drain timed out
    res, _ = run(b":(sleep 30) & echo N", timeout=2)
    assert res.terminator == b"N" and res.failure == b"timeout" and res.killed
    assert 1900 <= res.elapsed_ms < 2900
    assert_group_gone(res.pid)


def test_background_child_that_exits_is_waited_for():
    # §7.5 #42 second variant (default timeout)
    res, _ = run(b":(sleep 1) & echo N")
    assert res.terminator == b"N" and res.failure is None
    assert 900 <= res.elapsed_ms < 1800


def test_process_that_left_the_group_is_not_waited_for(tmp_path):
    pidfile = tmp_path / "pid"
    res, _ = run(b":setsid sh -c 'echo $$ > " + os.fsencode(pidfile)
                 + b"; exec sleep 30' & echo N", timeout=1)
    try:
        assert res.terminator == b"N" and res.failure == b"timeout"
        assert res.elapsed_ms < 1800
        assert_group_gone(res.pid)
    finally:
        end = time.monotonic() + 2
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > end:
                break
            time.sleep(0.01)
        if pidfile.exists() and pidfile.read_text().strip():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_timeout_applies_after_eof_until_reaped():
    res, _ = run(b":exec >&-; sleep 5", timeout=1)
    assert res.failure == b"timeout" and res.killed
    assert 900 <= res.elapsed_ms < 1800
    assert_group_gone(res.pid)


@pytest.mark.parametrize("pidfd", [True, False])
def test_closed_stdout_then_normal_exit(monkeypatch, pidfd):
    if not pidfd:
        monkeypatch.setattr(spprun, "_pidfd_open", None)
    res, lines = run(b":echo Sa=1; exec >&-; sleep 0.3; exit 3", timeout=5)
    assert lines == [b"Sa=1"] and res.failure is None and res.exit_status == 3
    assert 250 <= res.elapsed_ms < 1500


def test_timeout_zero_means_no_limit():
    res, _ = run(b":sleep 0.3; echo N", timeout=0)
    assert res.terminator == b"N" and res.failure is None


# --- caps (§4.3, Δ11) ----------------------------------------------------------------

def test_long_line_is_output_too_long():
    # §7.5 #43 first variant
    res, lines = run(b":echo Sa=1; printf '%070000d\\n' 0")
    assert res.failure == b"output too long" and res.killed
    assert lines == [b"Sa=1"]
    assert_group_gone(res.pid)


@pytest.mark.parametrize("cmd,ok", [
    (b"printf 'S%065535d\\n' 0; echo N", True),        # exactly 65536 bytes
    (b"printf 'S%065535d\\r\\n' 0; echo N", True),     # one CR not counted
    (b"printf 'S%065535d\\r' 0", True),                # unterminated last line, CR not counted
    (b"printf 'S%065535d' 0", True),                    # unterminated, exactly at the cap
    (b"printf 'S%065536d\\n' 0; echo N", False),       # 65537
    (b"printf 'S%065536d' 0", False),                   # 65537, no LF
    (b"printf 'S%065535d\\r\\r\\n' 0; echo N", False),  # one CR stripped, the other counts
    (b"printf 'S%065535dx\\r' 0", False),              # 65537 + CR at EOF
])
def test_line_cap_boundaries(cmd, ok):
    res, lines = run(b":" + cmd)
    if ok:
        assert res.failure is None
        assert len(lines[0]) == 65536 and lines[0][:1] == b"S"
    else:
        assert res.failure == b"output too long" and lines == []


def test_yes_x_is_output_too_long_and_killed():
    n = [0]

    def count(line):
        n[0] += 1
    t0 = time.monotonic()
    res = run_entry(b":yes X", ENV, 60, on_line=count)
    assert res.failure == b"output too long" and res.killed
    assert res.terminator is None
    assert n[0] == 1048576 // 2
    assert res.bytes_read > 1048576
    assert time.monotonic() - t0 < 10
    assert_reaped(res.pid)
    assert_group_gone(res.pid)


def test_yes_n_terminator_then_cap_while_draining():
    # §7.5 #43 third variant
    res, lines = run(b":yes N")
    assert res.terminator == b"N" and lines == []
    assert res.failure == b"output too long" and res.killed
    assert_group_gone(res.pid)


def test_run_cap_boundary():
    # exactly 1 MiB of empty lines is fine; one byte more is not
    res, _ = run(b":head -c 1048576 /dev/zero | tr '\\000' '\\n'")
    assert res.failure is None and res.bytes_read == 1048576
    res, _ = run(b":head -c 1048577 /dev/zero | tr '\\000' '\\n'")
    assert res.failure == b"output too long"


def test_terminator_in_last_allowed_bytes_stands():
    # the terminator line ends at the last byte within the cap; the next is over
    res, _ = run(b":head -c 1048574 /dev/zero | tr '\\000' '\\n'; printf 'N\\nX'")
    assert res.terminator == b"N" and res.failure == b"output too long"


def test_many_small_lines_under_cap():
    res, lines = run(b":seq -f 'S%g=1' 1 50000; echo N")
    assert len(lines) == 50000 and lines[-1] == b"S50000=1" and res.terminator == b"N"
    assert res.failure is None


# --- process setup (§4.2) ----------------------------------------------------------

def test_stdin_is_dev_null_read_only():
    # §7.1 #8
    res, lines = run(b":test -c /dev/stdin && echo HX-In: null; readlink /proc/self/fd/0;"
                     b" grep ^flags: /proc/self/fdinfo/0")
    assert lines[0] == b"HX-In: null"
    assert lines[1] == b"/dev/null"
    assert int(lines[2].split()[1], 8) & os.O_ACCMODE == os.O_RDONLY


def test_stdin_fd_is_rewound_message(tmp_path):
    msg = b"Received: x\nSubject: spam\n\nbody\n"
    fd = os.open(tmp_path / "msg", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, msg)  # offset now at the end
        entry = b":grep -q '^Subject: spam' && echo E554 spam"
        res, _ = run(entry, stdin_fd=fd)
        assert res.terminator == b"E554 spam"
        res, _ = run(b":echo \"HX-Bytes: $(wc -c)\"", stdin_fd=fd)
        assert res.failure is None
        # second run sees the whole message again
        res, lines = run(b":echo \"Sn=$(wc -c)\"", stdin_fd=fd)
        assert lines == [b"Sn=%d" % len(msg)]
    finally:
        os.close(fd)


def test_cwd_is_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res, lines = run(b":pwd -P")
    assert lines == [os.fsencode(os.path.realpath(tmp_path))]


def test_environment_passed_exactly():
    env = {b"xa": b"1", b"xb": b"=x=y", b"xc": b"", b"x\xff": b"\xfe\x80 sp"}
    res, lines = run(b"/usr/bin/env", env=env)
    assert sorted(lines) == sorted(k + b"=" + v for k, v in env.items() if k + b"=" + v)
    assert res.failure is None


def test_own_process_group(tmp_path):
    p = script(tmp_path, "pg", "import os\nprint('x%d %d %d' % (os.getpid(), os.getpgrp(), os.getsid(0)))\n")
    res, lines = run(p)
    pid, pgid, sid = (int(x) for x in lines[0][1:].split())
    assert pid == res.pid and pgid == pid
    assert sid == os.getsid(0)  # a new group, not a new session


def test_signals_sigpipe_ignored_rest_default_mask_empty():
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        res, lines = run(b":exec grep -E '^Sig(Ign|Blk):' /proc/self/status")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGHUP, old_hup)
    masks = dict((l.split(b":")[0], int(l.split()[1], 16)) for l in lines)
    assert masks[b"SigBlk"] == 0
    # SIGPIPE alone, as under 0.42: not glibc's two internal signals (32, 33),
    # which its posix_spawn leaves ignored unless told otherwise (issue 10 #9)
    assert masks[b"SigIgn"] == 1 << (signal.SIGPIPE - 1)
    # Python ignores SIGXFSZ itself: it must not leak either
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN


def test_sigpipe_ignored_in_plugin_pipelines():
    # `yes` writing to a closed pipe gets EPIPE and exits 1 instead of dying
    # of SIGPIPE (141), as under 0.42
    res, lines = run(b":exec 3>&1; { yes 2>/dev/null; echo \"Sst=$?\" >&3; } | head -c 1 >/dev/null")
    assert lines == [b"Sst=1"] and res.failure is None


def test_no_leaked_descriptors():
    inheritable = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                inheritable.add(fd)
        except OSError:
            pass
    extra = [os.open("/dev/null", os.O_RDONLY), *socket.socketpair(), *os.pipe()]
    try:
        res, lines = run(b":exec ls /proc/self/fd")
        fds = {int(l) for l in lines}
        assert {0, 1, 2} <= fds
        # only ls's own directory descriptor besides 0-2 and whatever the test
        # runner passed down as inheritable
        assert len(fds - {0, 1, 2} - inheritable) == 1
    finally:
        for x in extra:
            if isinstance(x, socket.socket):
                x.close()
            else:
                os.close(x)


def test_cloexec_inherited_fds():
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        spprun.cloexec_inherited_fds()
        assert not os.get_inheritable(r)
    finally:
        os.close(r)
        os.close(w)


# --- callback errors, injected failures ---------------------------------------------

def test_callback_exception_kills_and_reaps():
    class Boom(Exception):
        pass

    def on_line(line):
        raise Boom(line)
    t0 = time.monotonic()
    with pytest.raises(Boom):
        run_entry(b":echo Sa=1; sleep 5; echo N", ENV, 60, on_line=on_line)
    assert time.monotonic() - t0 < 2


def test_callback_exception_leaves_no_process(tmp_path):
    pidfile = tmp_path / "pid"

    def on_line(line):
        raise KeyError(line)
    with pytest.raises(KeyError):
        run_entry(b":echo $$ > " + os.fsencode(pidfile) + b"; echo Sa=1; sleep 5",
                  ENV, 60, on_line=on_line)
    pid = int(pidfile.read_text())
    assert_reaped(pid)
    assert_group_gone(pid)


def test_pipe_failure(monkeypatch):
    def fail(flags):
        raise OSError(errno.EMFILE, "too many")
    monkeypatch.setattr(spprun, "_pipe2", fail)
    res, _ = run(b":echo N")
    assert res.failure == b"can't pipe()" and res.errno == errno.EMFILE and res.pid is None


@pytest.mark.parametrize("err,what", [
    (errno.EAGAIN, b"vfork() failed"), (errno.ENOMEM, b"vfork() failed"),
    (errno.ENOENT, b"can't execute"), (errno.EACCES, b"can't execute"),
    (errno.ENOEXEC, b"can't execute"), (errno.E2BIG, b"can't execute"),
])
def test_spawn_errors(monkeypatch, err, what):
    before = set(os.listdir("/proc/self/fd"))

    def fail(*a, **kw):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(spprun, "_spawn", fail)
    monkeypatch.setattr(spprun, "_spawn_std", fail)
    res, _ = run(b":echo N")
    assert res.failure == what and res.errno == err and res.pid is None
    assert set(os.listdir("/proc/self/fd")) == before  # both pipe ends closed


def test_bad_environment_is_cant_execute():
    res, _ = run(b":echo N", env={b"A=B": b"1"})
    assert res.failure == b"can't execute"


def test_wait_failure(monkeypatch):
    real = os.waitpid
    pids = []

    def fail(pid, flags):
        pids.append(pid)
        raise ChildProcessError(errno.ECHILD, "no child")
    monkeypatch.setattr(spprun, "_waitpid", fail)
    res, _ = run(b":echo N", timeout=0)
    real(pids[0], 0)
    assert res.terminator == b"N"
    assert res.failure == b"wait_pid() failed" and res.errno == errno.ECHILD


def test_wait_failure_with_deadline(monkeypatch):
    real = os.waitpid
    pids = []

    def fail(pid, flags):
        pids.append(pid)
        raise ChildProcessError(errno.ECHILD, "no child")
    monkeypatch.setattr(spprun, "_waitpid", fail)
    res, _ = run(b":exit 0", timeout=5)
    real(pids[0], 0)
    assert res.failure == b"wait_pid() failed"


# --- shape -------------------------------------------------------------------------

def test_runresult_is_slotted():
    r = RunResult()
    assert not hasattr(r, "__dict__")
    assert (r.terminator, r.failure, r.exit_status, r.signal, r.killed, r.errno, r.pid,
            r.bytes_read, r.elapsed_ms) == (None, None, None, None, False, None, None, 0, 0)
    assert "RunResult(" in repr(r)


def test_imports_stay_lean():
    code = ("import sys; before = set(sys.modules); import qspp.spprun, qspp.sppconfig; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, check=True,
                         env={"PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "..", "src")}
                         ).stdout.decode().split()
    forbidden = {"subprocess", "signal", "re", "enum", "dataclasses", "typing", "logging",
                 "threading"}
    assert not forbidden & set(out), out
