"""checkpassword.check: outcomes of §8.4, including the faults that need injection."""

import errno
import os

import pytest

from qspp import checkpassword, replies


@pytest.fixture
def prog(tmp_path):
    def make(body):
        p = tmp_path / "checkpw"
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(0o755)
        return [os.fsencode(p)]
    return make


def test_accepts_on_exit_0_and_reads_fd3(prog, tmp_path):
    out = tmp_path / "fd3"
    argv = prog('cat <&3 >"%s"\nexit 0\n' % out)
    assert checkpassword.check(argv, b"user\0secret\0\0", {}) is None
    assert out.read_bytes() == b"user\0secret\0\0"


def test_other_exit_is_535(prog):
    assert checkpassword.check(prog("exit 1\n"), b"x\0y\0\0", {}) == replies.AUTH_FAILED


def test_signal_is_454_child(prog):
    assert checkpassword.check(prog("kill -KILL $$\n"), b"x\0y\0\0", {}) == replies.AUTH_CHILD_CRASHED


def test_exec_failure_is_535(tmp_path):
    assert checkpassword.check([os.fsencode(tmp_path / "none")], b"x", {}) == replies.AUTH_FAILED


def test_no_pipe_is_454(monkeypatch, prog):
    def fail():
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(checkpassword.os, "pipe", fail)
    assert checkpassword.check(prog("exit 0\n"), b"x", {}) == replies.AUTH_NO_PIPE


def test_no_process_is_454(monkeypatch, prog):
    def fail(*a, **kw):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
    monkeypatch.setattr(checkpassword, "_spawn", fail)
    before = set(os.listdir("/proc/self/fd"))
    assert checkpassword.check(prog("exit 0\n"), b"x", {}) == replies.AUTH_CHILD_NOSTART
    assert set(os.listdir("/proc/self/fd")) == before  # both pipe ends closed


def test_write_failure_is_454_and_child_reaped(monkeypatch, prog):
    real_write = os.write

    def fail(fd, data):
        raise OSError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(checkpassword.os, "write", fail)
    assert checkpassword.check(prog("exit 0\n"), b"x", {}) == replies.AUTH_WRITE_PIPE
    monkeypatch.setattr(checkpassword.os, "write", real_write)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_fd3_is_the_pipe_even_when_pipe_returns_3(prog, tmp_path):
    # In a process whose fd 3 is free (as under tcpserver), pipe() hands out 3 for
    # the read end, and dup2(3, 3) would leave it close-on-exec: the child would
    # find no fd 3.
    import subprocess
    import sys
    out = tmp_path / "fd3"
    argv = prog('cat <&3 >"%s"\n' % out)
    code = ("import os; from qspp import checkpassword as c; r, w = os.pipe(); "
            "os.close(r); os.close(w); assert r == 3, r; "
            "print(c.check([%r], b'u\\0p\\0\\0', {}))" % argv[0])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, close_fds=True)
    assert p.stdout == b"None\n", p.stderr
    assert out.read_bytes() == b"u\0p\0\0"


def test_checkprogram_signal_state(prog, tmp_path):
    """Every signal at its default, SIGPIPE included (§2.4), mask empty: not
    glibc's internal 32 and 33, which its posix_spawn leaves ignored."""
    out = tmp_path / "sig"
    argv = prog("cat <&3 >/dev/null\nexec grep -E '^Sig(Ign|Blk):' /proc/self/status >'%s'\n"
                % out)
    assert checkpassword.check(argv, b"u\0p\0\0", {}) is None
    assert out.read_bytes() == b"SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"


def test_checkprogram_found_on_path(tmp_path, monkeypatch):
    """A checkprogram named without `/` is looked up on PATH (qspp's own PATH, as
    execvp in the auth patch)."""
    (tmp_path / "mycheck").write_text("#!/bin/sh\ncat <&3 >/dev/null\nexit 0\n")
    (tmp_path / "mycheck").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + ":/usr/bin:/bin")
    assert checkpassword.check([b"mycheck"], b"u\0p\0\0", {}) is None
    assert checkpassword.check([b"nonesuch-checkpw"], b"u\0p\0\0", {}) == replies.AUTH_FAILED
