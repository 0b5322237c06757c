"""Slow and hostile clients (issue 6; qmail-smtpd.md §7, §2.7).

timeoutsmtpd bounds each read and each write, not the session: a client that
dribbles one byte at a time stays as long as each byte comes in time; a line
never finished ends in `451 timeout (#4.4.2)`; a client that floods commands and
never reads makes qspp block on its write, and the write timeout ends it without
qspp's memory growing.  Meanwhile other connections keep their normal speed.
"""

import socket
import threading
import time

import pytest

from .conftest import wait_for

OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
BYE = b"221 mx.example.org\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
E1 = b"Fa@b\0Tx@example.org\0\0"


def vmhwm_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for ln in f:
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1])
    raise AssertionError("no VmHWM for %d" % pid)


@pytest.fixture
def short_timeout(home):
    home.control("timeoutsmtpd", "2\n")
    return 2


def test_one_byte_at_a_time_stays_alive(smtpd, short_timeout):
    """Each byte within the 2 s timeout: the session lives on (~5 s in all)."""
    c = smtpd.connect()
    line = b"NOOP\r\n"
    t = time.monotonic()
    for i, b in enumerate(line):
        c.send(bytes((b,)))
        if i < len(line) - 1:
            time.sleep(1.0)
    assert c.reply() == OK
    assert time.monotonic() - t > short_timeout  # longer than one timeout in all
    assert c.cmd(b"QUIT") == BYE
    assert c.status() == 0


def test_one_byte_at_a_time_in_data(home, smtpd, short_timeout):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(b"250 ok", b"250 ok", b"354 go ahead")
    for b in b"hi\r\n.\r\n":
        c.send(bytes((b,)))
        time.sleep(0.6)
    run = c.queued(c.reply())
    assert run.E == E1


@pytest.mark.parametrize("partial", [b"", b"NOOP", b"MAIL FROM:<a@b>\r\nRCPT TO:<x@"])
def test_line_never_finished(smtpd, home, partial):
    home.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    c.send(partial)
    t = time.monotonic()
    rest = c.rest(timeout=5)
    assert rest.endswith(TIMEOUT)
    assert rest == (OK if partial.startswith(b"MAIL") else b"") + TIMEOUT
    assert 0.8 < time.monotonic() - t < 3
    assert c.status() == 1
    assert c.stderr() == b""


def test_message_never_finished(smtpd, home):
    """A timeout inside DATA: 451, exit 1, and the queue gets no envelope."""
    home.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(b"250 ok", b"250 ok", b"354 go ahead")
    c.send(b"Subject: x\r\n\r\nno end in sight")
    assert c.rest(timeout=5) == TIMEOUT
    assert c.status() == 1
    (run,) = home.new_runs()
    assert run.E == b""


class Flood(threading.Thread):
    """Writes DATA to SOCK and never reads; stops at the first error."""

    def __init__(self, sock, data):
        super().__init__(daemon=True)
        self.sock, self.data, self.sent, self.error = sock, data, 0, None

    def run(self):
        view = memoryview(self.data)
        try:
            while view:
                n = self.sock.send(view[:65536])
                self.sent += n
                view = view[n:]
        except OSError as e:
            self.error = e


def test_flood_without_reading(home, smtpd, short_timeout):
    """200,000 pipelined NOOPs, replies never read.  qspp stops reading while
    its replies cannot be written, its memory stays flat, the write timeout ends
    it silently; another connection meanwhile completes a transaction at once."""
    c = smtpd.connect()
    pid = c.pid()
    # a small receive window, so qspp's replies back up quickly
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flood = Flood(c.sock, b"NOOP\r\n" * 200000)
    flood.start()
    peak = 0
    t = time.monotonic()
    other_done = None
    while True:
        try:
            peak = max(peak, vmhwm_kb(pid))
        except (OSError, AssertionError):
            break  # qspp is gone
        if other_done is None and time.monotonic() - t > 0.5:
            other = smtpd.connect()
            t1 = time.monotonic()
            other.txn()
            assert other.cmd(b"QUIT") == BYE
            other_done = time.monotonic() - t1
        if time.monotonic() - t > 30:
            raise AssertionError("qspp still running after 30 s of flood")
        time.sleep(0.05)
    ended = time.monotonic() - t
    flood.join(timeout=10)
    assert other_done is not None and other_done < 3
    assert peak < 64 * 1024
    # blocked on its replies, it gave up one timeout later (not after all of them)
    assert ended < 2 * short_timeout + 4
    assert c.status() == 1            # write timeout: exit 1, silently (§7)
    assert c.stderr() == b""


def test_flood_then_read(home, smtpd):
    """The same flood read in full: every NOOP gets its reply, in order."""
    c = smtpd.connect(timeout=20)
    n = 20000
    flood = Flood(c.sock, b"NOOP\r\n" * n + b"QUIT\r\n")
    flood.start()
    got = c.rest(timeout=20)
    flood.join(timeout=10)
    assert got == OK * n + BYE
    assert c.status() == 0


def test_many_idle_connections_do_not_slow_a_busy_one(smtpd, short_timeout):
    """Ten connections that send nothing: a transaction on an eleventh is as quick
    as ever, and each idle one gets its 451 after the timeout."""
    idle = [smtpd.connect() for _ in range(10)]
    c = smtpd.connect()
    t = time.monotonic()
    c.txn()
    assert time.monotonic() - t < 2
    for i in idle:
        assert i.rest(timeout=6) == TIMEOUT
    wait_for(lambda: all(i.status() == 1 for i in idle), 5, "idle sessions ended")
