"""Slot exhaustion against `qspp serve` (issue 10, finding 10): --per-ip and
--max-session-time, with real sockets from two loopback addresses."""

import socket
import time

import pytest

from .conftest import GREETING
from .test_serve import QUIT, TIMEOUT, serve  # noqa: F401 - the fixture

PER_IP_LINE = rb"serve: per-ip limit: closed 127\.0\.0\.2 port \d+ \(%d sessions from it\)$"


def _silent_clients(port, n, source="127.0.0.2"):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5,
                                     source_address=(source, 0))
        socks.append(s)
    return socks


def test_silent_clients_from_one_address_leave_slots_for_others(home, serve):
    s = serve("-c", "4")              # default --per-ip: -c minus 1 when below 20
    socks = _silent_clients(s.port, 20)
    try:
        time.sleep(0.5)                        # let serve take them all in
        t0 = time.monotonic()
        real = s.connect(greet=None)
        assert real.reply(timeout=5) == GREETING
        assert time.monotonic() - t0 < 1.0
        assert real.cmd(b"QUIT") == QUIT
        # three of the twenty have sessions; the rest were closed with nothing sent
        got = []
        for sock in socks:
            sock.settimeout(3)
            try:
                got.append(sock.recv(100))
            except socket.timeout:
                got.append(None)
        assert got.count(GREETING) == 3 and got.count(b"") == 17, got
        closed = [ln for ln in s.lines() if b"per-ip limit" in ln]
        assert len(closed) == 17
        s.wait_line(PER_IP_LINE % 3)
    finally:
        for sock in socks:
            sock.close()


def test_per_ip_zero_means_no_limit(home, serve):
    s = serve("-c", "4", "--per-ip", "0")
    socks = _silent_clients(s.port, 4)
    try:
        for sock in socks:
            sock.settimeout(5)
            assert sock.recv(100) == GREETING
        late = s.connect(greet=None)
        late.silent(0.5)                       # -c still bounds the sessions
    finally:
        for sock in socks:
            sock.close()
    assert late.reply(timeout=5) == GREETING
    assert not any(b"per-ip limit" in ln for ln in s.lines())


def test_a_byte_a_second_does_not_hold_a_slot_forever(home, serve):
    s = serve("-c", "1", "--max-session-time", "2")
    slow = s.connect()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 6 and not _readable(slow):
        try:
            slow.send(b"N")        # never a whole line; each byte restarts timeoutsmtpd
        except OSError:
            break
        time.sleep(0.3)
    assert slow.rest(timeout=5) == TIMEOUT
    assert 1.8 <= time.monotonic() - t0 < 4
    s.wait_line(rb"serve: session time limit \(2 s\) reached: 127\.0\.0\.1 port %d$"
                % slow.port)
    nxt = s.connect()
    assert nxt.cmd(b"QUIT") == QUIT


def _readable(client):
    import select
    return bool(select.select([client.sock], [], [], 0)[0])


def test_a_session_inside_the_time_limit_is_untouched(home, serve):
    s = serve("--max-session-time", "3")
    c = s.connect()
    run = c.txn()
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    time.sleep(1)
    assert c.cmd(b"QUIT") == QUIT


@pytest.mark.parametrize("args, message", [
    (["--per-ip", "-1"], b"argument --per-ip: must not be negative: -1"),
    (["--max-session-time", "x"],
     b"argument --max-session-time: not a number of seconds: x"),
])
def test_usage_errors(home, tmp_path, args, message):
    import subprocess
    from .serve_harness import ServeServer
    s = ServeServer(home, tmp_path / "s", *args)
    proc = subprocess.run(s.command(), env=home.full_env(), capture_output=True, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == b"qspp serve: error: " + message


@pytest.mark.parametrize("args, per_ip", [([], 20), (["-c", "8"], 7), (["-c", "1"], 1),
                                          (["-c", "8", "--per-ip", "2"], 2)])
def test_the_defaults_are_in_the_start_line(home, serve, args, per_ip):
    s = serve(*args)
    s.wait_line(rb"serve: listening on 127\.0\.0\.1 port \d+, concurrency \d+, per-ip %d,"
                rb" session time 1200s, home " % per_ip)


def test_a_client_that_never_reads_meets_the_write_timeout(home, serve):
    """serve's sessions wait on the socket's own timeouts (SO_SNDTIMEO, not
    poll()): replies that back up end the session one timeoutsmtpd later,
    silently, and free its slot."""
    import threading
    home.control("timeoutsmtpd", "1\n")
    s = serve("-c", "1")
    flooder = s.connect()
    flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # more replies than the kernel's buffers on both sides hold
    flood = b"NOOP\r\n" * 3000000

    def send():
        try:
            flooder.sock.sendall(flood)
        except OSError:
            pass  # the session ended under it
    sender = threading.Thread(target=send, daemon=True)
    t0 = time.monotonic()
    sender.start()
    nxt = s.connect(greet=None)
    assert nxt.reply(timeout=20) == GREETING  # -c 1: only once the flooder is gone
    assert time.monotonic() - t0 < 15
    assert nxt.cmd(b"QUIT") == QUIT
    sender.join(10)
    assert not sender.is_alive()
    # ended in a write: silently, where a read would have ended with a reply
    assert any(ln.endswith(b' end="write timeout"') for ln in s.lines()), s.lines()
