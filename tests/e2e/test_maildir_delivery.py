"""qspp's own Maildir delivery (qspp.maildirqueue) behind the real tcpserver
(issue 10, findings 5 and 7).

A bare CR in an address is accepted as netqmail accepts it, and a real
qmail-queue gets it byte for byte; the Maildir writer refuses it rather than let
it end a header line.  A failed fsync of new/ is a temporary failure.
"""

import os
import shlex

import pytest

from .conftest import PYTHON, REPO

EVIL = b"x\rX-Spam-Status: No\r@evil.example"

# the queue with os.fsync failing (EIO) on directories only, as a disk would
EIO_QUEUE = """import errno, os, stat
real = os.fsync
def fsync(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return real(fd)
os.fsync = fsync
from qspp import maildirqueue
maildirqueue.main()
"""


@pytest.fixture
def maildir_queue(home):
    """QMAILQUEUE = python -m qspp.maildirqueue into home.base/Maildir."""
    md = home.base / "Maildir"

    def install(script=None):
        run = ("-c " + shlex.quote(script)) if script else "-m qspp.maildirqueue"
        home.write("bin/mdq", "#!/bin/sh\nQSPP_MAILDIR=%s PYTHONPATH=%s exec %s %s\n" % (
            shlex.quote(str(md)), shlex.quote(str(REPO / "src")), shlex.quote(PYTHON), run),
            mode=0o755)
        home.setenv(QMAILQUEUE=str(home.root / "bin" / "mdq"))
        return md
    return install


def files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def send(c, sender):
    assert c.cmd(b"MAIL FROM:<" + sender + b">") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    return c.cmd(b"Subject: hi\r\n\r\nbody\r\n.")


def test_cr_address_reaches_a_real_queue_byte_exact(home, smtpd):
    c = smtpd.connect()
    run = c.queued(send(c, EVIL))
    assert run.E == b"F" + EVIL + b"\0Tx@example.org\0\0"


def test_cr_address_refused_by_the_maildir(home, smtpd, maildir_queue):
    md = maildir_queue()
    c = smtpd.connect()
    assert send(c, EVIL) == b"554 mail server permanently rejected message (#5.3.0)\r\n"
    assert files(md / "new") == [] and files(md / "tmp") == []
    # the connection goes on: an ordinary message is delivered
    assert send(c, b"a@b.example").startswith(b"250 ok ")
    [name] = files(md / "new")
    assert (md / "new" / name).read_bytes().startswith(
        b"Return-Path: <a@b.example>\nX-Envelope-To: <x@example.org>\nReceived: ")


def test_failed_fsync_of_new_is_451(home, smtpd, maildir_queue):
    md = maildir_queue(EIO_QUEUE)
    c = smtpd.connect()
    assert send(c, b"a@b.example") == b"451 qq write error or disk full (#4.3.0)\r\n"
    assert files(md / "new") == [] and files(md / "tmp") == []
