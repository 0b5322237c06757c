"""scripts/qspp-swap on a fake qmail tree in tmp_path (never /var/qmail):
install puts a wrapper running qspp in place of bin/qmail-smtpd and keeps the
original as qmail-smtpd.orig; rollback brings it back byte for byte."""

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SWAP = REPO / "scripts" / "qspp-swap"
# the interpreter behind the test venv; where it cannot import qspp on its
# own (CI), install must fall back to the checkout's src
PYTHON = os.path.realpath(sys.executable)
IMPORTS_QSPP = subprocess.run([PYTHON, "-c", "import qspp.smtpd"], cwd="/",
                              env={"PATH": "/usr/bin:/bin"}, capture_output=True).returncode == 0
ORIGINAL = b"\x7fELF qmail-smtpd stand-in \x00\x01\x02\xff\n"
GREETING = b"220 test.example ESMTP\r\n"


@pytest.fixture
def qmail(tmp_path):
    q = tmp_path / "var qmail"  # a space: every path in the wrapper is quoted
    (q / "bin").mkdir(parents=True)
    (q / "control").mkdir()
    (q / "control" / "me").write_bytes(b"test.example\n")
    (q / "control" / "rcpthosts").write_bytes(b"example.com\n")
    (q / "control" / "smtpplugins").write_bytes(b"")
    smtpd = q / "bin" / "qmail-smtpd"
    smtpd.write_bytes(ORIGINAL)
    smtpd.chmod(0o711)
    os.utime(smtpd, (1000000000, 1000000000))
    return q


def swap(*args, env=None):
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if env:
        e.update(env)
    return subprocess.run([str(SWAP)] + [str(a) for a in args], env=e, capture_output=True,
                          timeout=60)


def files(q):
    return sorted(p.name for p in (q / "bin").iterdir())


def test_install_run_rollback(qmail):
    smtpd = qmail / "bin" / "qmail-smtpd"
    orig = qmail / "bin" / "qmail-smtpd.orig"
    before = os.stat(smtpd)
    p = swap("status", "--qmail", qmail)
    assert (p.returncode, p.stdout) == (1, b"not installed: %s is qmail's own\n" % bytes(smtpd))

    p = swap("install", "--qmail", qmail, "--python", PYTHON)
    assert p.returncode == 0, p.stderr
    assert p.stderr == b""
    assert p.stdout.startswith(b"installed: %s runs qspp with %s; the original is %s\n"
                               % (bytes(smtpd), PYTHON.encode(), bytes(orig)))
    assert files(qmail) == ["qmail-smtpd", "qmail-smtpd.orig"]
    # the original keeps its bytes, inode, mode and time under the new name
    st = os.stat(orig)
    assert orig.read_bytes() == ORIGINAL
    assert (st.st_ino, st.st_mode, st.st_mtime, st.st_uid, st.st_gid) == (
        before.st_ino, before.st_mode, before.st_mtime, before.st_uid, before.st_gid)
    # the wrapper: same owner, 0711 plus the read bits sh needs
    w = os.stat(smtpd)
    assert stat.S_IMODE(w.st_mode) == 0o755
    assert (w.st_uid, w.st_gid) == (before.st_uid, before.st_gid)
    text = smtpd.read_bytes()
    assert text.startswith(b"#!/bin/sh\n# qspp-swap wrapper: ")
    assert b"\nQMAILHOME='%s'\n" % bytes(qmail) in text
    assert (b"\nPYTHONPATH='%s'\n" % bytes(REPO / "src") in text) is not IMPORTS_QSPP
    assert text.endswith(b"\nexec '%s' -m qspp.smtpd \"$@\"\n" % PYTHON.encode())

    # a session through the wrapper, on pipes, with no PYTHONPATH or QMAILHOME given
    r = subprocess.run([str(smtpd)], input=b"HELO x\r\nQUIT\r\n", capture_output=True,
                       env={"PATH": "/usr/bin:/bin"}, cwd="/", timeout=30)
    assert r.stdout == GREETING + b"250 test.example\r\n221 test.example\r\n"
    assert r.returncode == 0

    p = swap("status", "--qmail", qmail)
    assert p.returncode == 0
    assert p.stdout == (b"installed: %s runs qspp; the original is %s\ninterpreter: '%s'\n"
                        % (bytes(smtpd), bytes(orig), PYTHON.encode()))

    p = swap("rollback", "--qmail", qmail)
    assert (p.returncode, p.stderr) == (0, b"")
    assert p.stdout == b"rolled back: %s is qmail's own again\n" % bytes(smtpd)
    assert files(qmail) == ["qmail-smtpd"]
    st = os.stat(smtpd)
    assert smtpd.read_bytes() == ORIGINAL
    assert (st.st_ino, st.st_mode, st.st_mtime, st.st_uid, st.st_gid) == (
        before.st_ino, before.st_mode, before.st_mtime, before.st_uid, before.st_gid)
    p = swap("rollback", "--qmail", qmail)
    assert p.returncode == 1
    assert p.stderr == b"qspp-swap: %s is not the qspp wrapper: nothing to roll back\n" % bytes(smtpd)
    assert smtpd.read_bytes() == ORIGINAL


def test_double_install_refused(qmail):
    assert swap("install", "--qmail", qmail, "--python", PYTHON).returncode == 0
    smtpd = qmail / "bin" / "qmail-smtpd"
    wrapper = smtpd.read_bytes()
    p = swap("install", "--qmail", qmail, "--python", PYTHON)
    assert p.returncode == 1
    assert p.stdout == b""
    assert p.stderr == b"qspp-swap: %s is already the qspp wrapper\n" % bytes(smtpd)
    assert smtpd.read_bytes() == wrapper
    assert (qmail / "bin" / "qmail-smtpd.orig").read_bytes() == ORIGINAL
    assert files(qmail) == ["qmail-smtpd", "qmail-smtpd.orig"]


def test_existing_orig_never_overwritten(qmail):
    orig = qmail / "bin" / "qmail-smtpd.orig"
    orig.write_bytes(b"an older original\n")
    p = swap("install", "--qmail", qmail, "--python", PYTHON)
    assert p.returncode == 1
    assert p.stderr == (b"qspp-swap: %s exists and is never overwritten: move it away first\n"
                        % bytes(orig))
    assert orig.read_bytes() == b"an older original\n"
    assert (qmail / "bin" / "qmail-smtpd").read_bytes() == ORIGINAL
    assert files(qmail) == ["qmail-smtpd", "qmail-smtpd.orig"]
    p = swap("status", "--qmail", qmail)
    assert p.returncode == 2
    # and rollback will not put it over the real qmail-smtpd
    assert swap("rollback", "--qmail", qmail).returncode == 1
    assert (qmail / "bin" / "qmail-smtpd").read_bytes() == ORIGINAL


def test_install_refusals(qmail, tmp_path):
    smtpd = qmail / "bin" / "qmail-smtpd"
    p = swap("install", "--qmail", tmp_path / "nowhere", "--python", PYTHON)
    assert p.returncode == 1
    assert p.stderr == (b"qspp-swap: %s/bin/qmail-smtpd does not exist: is %s a qmail home?\n"
                        % (bytes(tmp_path / "nowhere"), bytes(tmp_path / "nowhere")))
    p = swap("install", "--qmail", qmail, "--python", "python3")
    assert p.returncode == 1
    assert p.stderr == (b"qspp-swap: --python needs an absolute path, as the wrapper runs"
                        b" without PATH\n")
    p = swap("install", "--qmail", qmail, "--python", "/bin/false")
    assert p.returncode == 1
    assert p.stderr == (b"qspp-swap: /bin/false cannot import qspp: install it for that"
                        b" interpreter (pip install qspp)\n")
    p = swap("install", "--qmail")
    assert p.returncode == 100
    p = swap("bogus")
    assert p.returncode == 100
    assert p.stderr.startswith(b"usage: qspp-swap install")
    assert files(qmail) == ["qmail-smtpd"]
    assert smtpd.read_bytes() == ORIGINAL


def test_rollback_refuses_without_orig(qmail):
    assert swap("install", "--qmail", qmail, "--python", PYTHON).returncode == 0
    orig = qmail / "bin" / "qmail-smtpd.orig"
    orig.rename(qmail / "elsewhere")
    p = swap("rollback", "--qmail", qmail)
    assert p.returncode == 1
    assert p.stderr == b"qspp-swap: %s is missing: cannot roll back\n" % bytes(orig)
    p = swap("status", "--qmail", qmail)
    assert p.returncode == 2
    assert p.stdout.startswith(b"broken: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files another owner")
def test_owner_and_group_kept(qmail):
    smtpd = qmail / "bin" / "qmail-smtpd"
    os.chown(smtpd, 1234, 5678)
    smtpd.chmod(0o710)
    assert swap("install", "--qmail", qmail, "--python", PYTHON).returncode == 0
    w = os.stat(smtpd)
    assert (w.st_uid, w.st_gid, stat.S_IMODE(w.st_mode)) == (1234, 5678, 0o750)
    assert swap("rollback", "--qmail", qmail).returncode == 0
    st = os.stat(smtpd)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o710)


def test_default_python_is_resolved(qmail, tmp_path):
    # a shim on PATH standing for pyenv's: the wrapper must name what it runs
    shim_dir = tmp_path / "shims"
    shim_dir.mkdir()
    shim = shim_dir / "python3"
    shim.write_text("#!/bin/sh\nexec %s \"$@\"\n" % PYTHON)
    shim.chmod(0o755)
    p = swap("install", "--qmail", qmail, env={"PATH": "%s:/usr/bin:/bin" % shim_dir})
    assert p.returncode == 0, p.stderr
    text = (qmail / "bin" / "qmail-smtpd").read_bytes()
    assert text.endswith(b"\nexec '%s' -m qspp.smtpd \"$@\"\n" % PYTHON.encode())


@pytest.mark.skipif(shutil.which("tcpserver") is None, reason="tcpserver is not installed")
def test_wrapper_under_tcpserver(qmail):
    assert swap("install", "--qmail", qmail, "--python", PYTHON).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["tcpserver", "-R", "-H", "-l", "0", "127.0.0.1", str(port),
         str(qmail / "bin" / "qmail-smtpd")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "tcpserver did not start"
                time.sleep(0.05)
        with c:
            f = c.makefile("rwb")
            assert f.readline() == GREETING
            f.write(b"QUIT\r\n")
            f.flush()
            assert f.readline() == b"221 test.example\r\n"
            assert f.read() == b""
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
