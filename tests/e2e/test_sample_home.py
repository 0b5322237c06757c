"""The embedded default: samples/qmail under the real tcpserver, mail sent with swaks
lands in the Maildir through bin/qmail-queue and qspp's Maildir queue (issue 2)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from .conftest import REAL_PYTHON, REPO, SRC, TCPSERVER

SWAKS = shutil.which("swaks")


@pytest.fixture
def sample_server(tmp_path):
    if TCPSERVER is None or SWAKS is None:
        if os.environ.get("CI"):
            pytest.fail("tcpserver and swaks are needed")
        pytest.skip("tcpserver and swaks are needed")
    home = tmp_path / "qmail"
    shutil.copytree(REPO / "samples" / "qmail", home,
                    ignore=shutil.ignore_patterns("Maildir"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC),
           "QMAILHOME": str(home)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([TCPSERVER, "-R", "-H", "-l", "localhost", "127.0.0.1", str(port),
                             REAL_PYTHON, "-m", "qspp.smtpd"], env=env, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield home, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def swaks(port, to):
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(port), "--to", to,
                           "--from", "me@example.net", "--helo", "client.example",
                           "--data", "Subject: sample\n\nhello maildir"],
                          capture_output=True, timeout=30)


def test_swaks_mail_lands_in_the_sample_maildir(sample_server):
    home, port = sample_server
    p = swaks(port, "you@localhost")
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(rb"<-  250 ok \d+ qp \d+\r?\n", p.stdout)
    (name,) = os.listdir(home / "Maildir" / "new")
    got = (home / "Maildir" / "new" / name).read_bytes()
    head, _, rest = got.partition(b"Received: ")
    assert head == b"Return-Path: <me@example.net>\nX-Envelope-To: <you@localhost>\n"
    assert re.match(rb"from unknown \(HELO client.example\) \(127.0.0.1\)\n"
                    rb"  by localhost with SMTP; \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\n",
                    rest)
    assert b"Subject: sample\n\nhello maildir\n" in rest
    assert os.listdir(home / "Maildir" / "tmp") == []


def test_sample_home_refuses_relaying(sample_server):
    home, port = sample_server
    p = swaks(port, "someone@far.example")
    assert b"<** 553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)" in p.stdout
    assert not (home / "Maildir" / "new").exists() or os.listdir(home / "Maildir" / "new") == []
