"""`qspp serve` started as root with a user switch (issue 10, findings 1-3):
the embedded home delivers as the session user, -u alone takes that user's
group (test_serve.py), and a home the session user can write is refused before root writes
anything there."""

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from .conftest import SRC
from .serve_harness import ServeServer
from .test_serve import GO, OK, QUIT, received

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
NOBODY = 65534
# The embedded home's queue program runs this interpreter as the session user:
# it must be one nobody can run (the test venv's may live under root's 0700 ~).
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def pubdir():
    """A directory under /tmp every user can traverse (pytest's tmp_path is 0700)."""
    base = tempfile.mkdtemp(prefix="qspp-serve-user-", dir="/tmp")
    os.chmod(base, 0o755)
    yield Path(base)
    shutil.rmtree(base)


def _env(tmp_path, **kw):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC),
           "HOME": str(tmp_path)}
    env.update(kw)
    return env


def test_user_nobody_delivers_into_the_embedded_home(home, tmp_path, pubdir):
    xdg = pubdir / "xdg"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no %s" % SYSTEM_PYTHON)
    s = ServeServer(home, tmp_path / "s", "--user", "nobody", python=SYSTEM_PYTHON,
                    env=_env(tmp_path, XDG_DATA_HOME=str(xdg)), qmailhome=False)
    try:
        s.start(timeout=20)
        qhome = xdg / "qspp"
        s.wait_line(rb"serve: embedded home %s \(created\); mail is delivered to"
                    rb" %s/Maildir/new by user nobody \(uid 65534, gid 65534\)$"
                    % (re.escape(os.fsencode(qhome)), re.escape(os.fsencode(qhome))))
        me = (qhome / "control" / "me").read_bytes().rstrip(b"\n")
        c = s.connect(greet=b"220 " + me + b" ESMTP\r\n", timeout=20)
        for cmd, want in ((b"MAIL FROM:<a@b>", OK), (b"RCPT TO:<you@localhost>", OK),
                          (b"DATA", GO)):
            assert c.cmd(cmd) == want
        c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        assert re.fullmatch(rb"250 ok \d+ qp \d+\r\n", c.reply(timeout=20))
        assert c.cmd(b"QUIT") == b"221 " + me + b"\r\n"
        (msg,) = list((qhome / "Maildir" / "new").iterdir())
        assert msg.stat().st_uid == NOBODY
        assert msg.read_bytes().startswith(b"Return-Path: <a@b>\nX-Envelope-To: <you@localhost>\n"
                                           + received()[:15])
        st = (qhome / "bin").stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    finally:
        s.stop()


def test_an_embedded_home_the_user_cannot_reach_is_refused(home, tmp_path):
    # tmp_path is 0700, as root's own ~ is
    xdg = tmp_path / "xdg"
    s = ServeServer(home, tmp_path / "s", "--user", "nobody",
                    env=_env(tmp_path, XDG_DATA_HOME=str(xdg)), qmailhome=False)
    import subprocess
    proc = subprocess.run(s.command(), env=s.env, capture_output=True, timeout=20)
    assert proc.returncode == 111
    lines = proc.stderr.splitlines()
    m = len(lines) == 1 and re.fullmatch(
        rb"qspp: pid \d+: serve: cannot set up the embedded home: user nobody \(uid 65534\)"
        rb" cannot reach %s: (/\S*) \(mode 0700\); give --qmailhome or XDG_DATA_HOME a"
        rb" place it can reach" % re.escape(os.fsencode(xdg / "qspp")), lines[0])
    assert m, lines
    assert tmp_path.is_relative_to(os.fsdecode(m.group(1)))   # the first closed door
    assert not xdg.exists()                                    # nothing was created


def test_a_home_the_session_user_owns_is_refused_before_root_writes(home, tmp_path, pubdir):
    qhome = pubdir / "xdg" / "qspp"
    (qhome / "bin").mkdir(parents=True)
    os.chmod(qhome.parent, 0o755)
    victim = pubdir / "victim"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o600)
    os.symlink(victim, qhome / "bin" / "qmail-queue.new")
    for p in (qhome, qhome / "bin"):
        os.chown(p, NOBODY, NOBODY)            # the admin's `chown -R nobody`
    os.lchown(qhome / "bin" / "qmail-queue.new", NOBODY, NOBODY)
    s = ServeServer(home, tmp_path / "s", "--user", "nobody", python=SYSTEM_PYTHON,
                    env=_env(tmp_path, XDG_DATA_HOME=str(pubdir / "xdg")), qmailhome=False)
    import subprocess
    proc = subprocess.run(s.command(), env=s.env, capture_output=True, timeout=20)
    assert proc.returncode == 111
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    (line,) = proc.stderr.splitlines()
    assert line.endswith(b"serve: cannot set up the embedded home: %s belongs to uid 65534,"
                         b" not to root; refusing to use it as root" % os.fsencode(qhome))
