"""SMTP smuggling and line-ending vectors, end to end (qmail-smtpd.md §6.2, issue 6).

Only `\\r\\n.\\r\\n` (or `.\\r\\n` right after 354) ends a message; a `\\n` that does
not follow `\\r` anywhere in DATA is `451 See http://pobox.com/~djb/docs/smtplf.html.`
and exit 1.  Each row of VECTORS is sent right after `354 go ahead` (often with a
second transaction hidden behind a would-be terminator) and states the exact
replies up to EOF, the exit status, and every message the queue program got.

The proof that nothing was smuggled: the recorder saw exactly the listed runs
(a run aborted by the bare LF has an empty envelope), no envelope names the
hidden sender, and the number of non-empty envelopes equals the number of
`250 ok T qp P` replies.

The same table runs against every server in SERVERS: tcpserver, and `qspp serve`.
"""

import time

import pytest

from .conftest import QP_RE, TcpServer, wait_for


OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
BYE = b"221 mx.example.org\r\n"
LF451 = b"451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
RECEIVED = b"Received: from client.example.com (192.0.2.7)\n  by 198.51.100.1 with SMTP; <D>\n"
E1 = b"Fa@b\0Tx@example.org\0\0"
E_EVIL = b"Fevil@x\0Ty@example.org\0\0"
QUEUED = object()  # stands for `250 ok T qp P`, checked with the recorder's pid
OPEN = b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
HIDDEN = b"MAIL FROM:<evil@x>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nevil\r\n.\r\n"
LONG = b"x" * 1_000_000


def V(name, data, replies, status, messages, aborted=0):
    """A row: DATA bytes, the replies to EOF, exit status, the queued (body, E)
    pairs in order, and how many runs got no envelope."""
    return pytest.param(data, replies, status, messages, aborted, id=name)


VECTORS = [
    # -- bare LF in any position: refused, connection closed, nothing queued
    V("bare LF mid line", b"a\nb\r\n.\r\n" + HIDDEN, [LF451], 1, [], 1),
    V("LF dot LF", b"a\n.\n" + HIDDEN, [LF451], 1, [], 1),
    V("CRLF dot LF", b"a\r\n.\n" + HIDDEN, [LF451], 1, [], 1),
    V("LF dot CRLF", b"a\n.\r\n" + HIDDEN, [LF451], 1, [], 1),
    V("CR dot LF", b"a\r.\n" + HIDDEN, [LF451], 1, [], 1),
    V("LF dot LF right after 354", b"\n.\n" + HIDDEN, [LF451], 1, [], 1),
    V("bare LF after a megabyte line", LONG + b"\n.\n" + HIDDEN, [LF451], 1, [], 1),
    V("bare LF in the hidden message", b"a\r\n.\r\nMAIL FROM:<evil@x>\r\n"
      b"RCPT TO:<y@example.org>\r\nDATA\r\nevil\n.\n",
      [QUEUED, OK, OK, GO, LF451], 1, [(b"a\n", E1)], 1),
    # -- bare CR: kept as data; the would-be terminators are message lines
    V("CRLF dot CR then commands", b"a\r\n.\r" + HIDDEN + b"QUIT\r\n",
      [QUEUED, BYE], 0,
      [(b"a\n.\rMAIL FROM:<evil@x>\nRCPT TO:<y@example.org>\nDATA\nevil\n", E1)]),
    V("CRLF dot CR CR LF", b"a\r\n.\r\r\n" + HIDDEN + b"QUIT\r\n",
      [QUEUED, BYE], 0,
      [(b"a\n.\r\nMAIL FROM:<evil@x>\nRCPT TO:<y@example.org>\nDATA\nevil\n", E1)]),
    V("CR dot CR", b"a\r.\r" + HIDDEN + b"QUIT\r\n", [QUEUED, BYE], 0,
      [(b"a\r.\rMAIL FROM:<evil@x>\nRCPT TO:<y@example.org>\nDATA\nevil\n", E1)]),
    V("bare CR mid line", b"a\rb\r\n.\r\nQUIT\r\n", [QUEUED, BYE], 0, [(b"a\rb\n", E1)]),
    V("CR CR LF line ends", b"a\r\r\n.\r\r\n.\r\nQUIT\r\n", [QUEUED, BYE], 0,
      [(b"a\r\n.\r\n", E1)]),
    V("dot space CRLF", b"a\r\n. \r\n" + HIDDEN + b"QUIT\r\n", [QUEUED, BYE], 0,
      [(b"a\n \nMAIL FROM:<evil@x>\nRCPT TO:<y@example.org>\nDATA\nevil\n", E1)]),
    V("stuffed dot dot", b"a\r\n..\r\n" + HIDDEN + b"QUIT\r\n", [QUEUED, BYE], 0,
      [(b"a\n.\nMAIL FROM:<evil@x>\nRCPT TO:<y@example.org>\nDATA\nevil\n", E1)]),
    # -- NUL and 8-bit bytes pass through; a NUL before the dot is not a dot line
    V("NUL bytes", b"a\0b\r\n\0.\r\n" + HIDDEN + b"QUIT\r\n", [QUEUED, BYE], 0,
      [(b"a\0b\n\0.\nMAIL FROM:<evil@x>\nRCPT TO:<y@example.org>\nDATA\nevil\n", E1)]),
    V("8-bit bytes", b"\x80\xff\r\n.\xe9\r\n\xc3\xa9.\r\n.\r\nQUIT\r\n", [QUEUED, BYE], 0,
      [(b"\x80\xff\n\xe9\n\xc3\xa9.\n", E1)]),
    # -- very long lines: no limit in DATA, no terminator found inside one
    V("megabyte line", LONG + b"\r\n.\r\nQUIT\r\n", [QUEUED, BYE], 0, [(LONG + b"\n", E1)]),
    V("megabyte line with dots", b"." + LONG + b".\r\n.\r\nQUIT\r\n", [QUEUED, BYE], 0,
      [(LONG + b".\n", E1)]),
    # -- the real end, then pipelined commands: they are commands, in order
    V("pipelined after the dot", b"a\r\n.\r\nNOOP\r\n" + HIDDEN + b"QUIT\r\n",
      [QUEUED, OK, OK, OK, GO, QUEUED, BYE], 0, [(b"a\n", E1), (b"evil\n", E_EVIL)]),
    V("empty message then pipelined", b".\r\nRSET\r\nQUIT\r\n",
      [QUEUED, b"250 flushed\r\n", BYE], 0, [(b"", E1)]),
]


# The servers the table runs against: qspp under tcpserver, and `qspp serve`.
SERVERS = ["tcpserver", "serve"]
# serve sets TCPREMOTEIP and TCPLOCALIP itself and no TCPREMOTEHOST (no --resolve)
RECEIVED_SERVE = b"Received: from unknown (127.0.0.1)\n  by 127.0.0.1 with SMTP; <D>\n"


@pytest.fixture(params=SERVERS)
def server(request, home, tmp_path):
    if request.param == "tcpserver":
        s = TcpServer(home, tmp_path)
        s.received = RECEIVED
        yield s
        s.stop()
    elif request.param == "serve":
        from .serve_harness import ServeServer
        s = ServeServer(home, tmp_path / "serve").start()
        s.received = RECEIVED_SERVE
        s.exit_statuses = False   # no per-connection exit status to read
        yield s
        try:
            wait_for(lambda: not s.zombies(), 3, "serve to reap its sessions")
        finally:
            s.stop()
    else:  # pragma: no cover
        raise AssertionError(request.param)


def assert_exit(c, status):
    if getattr(c.server, "exit_statuses", True):
        assert c.status() == status


def check_vector(home, c, prefix, data, replies, status, messages, aborted):
    """Send one row's bytes on client `c` (after MAIL, RCPT, DATA) and check it all:
    the exact replies, the exit status, every queue run and envelope (each
    message starting with the Received line `prefix`), and that nothing else ran."""
    c.send(OPEN)
    c.expect(OK, OK, GO)
    c.send(data)
    acked = []
    for want in replies:
        got = c.reply()
        if want is QUEUED:
            assert QP_RE.fullmatch(got), got
            acked.append(c.queued(got))
        else:
            assert got == want
    assert c.rest() == b""
    assert_exit(c, status)

    lost = home.new_runs(aborted) if aborted else []
    assert [r.E for r in lost] == [b""] * aborted
    runs = acked + lost
    assert len(home.started()) == len(messages) + aborted
    assert len(acked) == len(messages)
    for run, (body, envelope) in zip(acked, messages):
        assert run.message == prefix + body
        assert run.E == envelope
    for run in runs:
        assert run.E in (b"", E1, E_EVIL)
    # the hidden sender queued only where the row says it is a real second message
    assert E_EVIL not in [r.E for r in runs] or (b"evil\n", E_EVIL) in messages
    # every queue file with an envelope was acknowledged, and nothing else ran
    assert sum(1 for p in home.queue.glob("*.E") if p.read_bytes()) == len(acked)
    home.assert_no_new_runs()


@pytest.mark.parametrize("data, replies, status, messages, aborted", VECTORS)
def test_vector(home, server, data, replies, status, messages, aborted):
    c = server.connect(timeout=20)
    check_vector(home, c, server.received, data, replies, status, messages, aborted)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_terminator_split_across_packets(home, server, cut):
    """The end found however the bytes arrive: `\\r\\n.\\r\\n` in CUT-byte writes."""
    c = server.connect()
    c.send(OPEN)
    c.expect(OK, OK, GO)
    data = b"a\r\n.\r\n" + b"NOOP\r\n"
    for i in range(0, len(data), cut):
        c.send(data[i:i + cut])
        time.sleep(0.01)
    run = c.queued(c.reply())
    assert run.message == server.received + b"a\n"
    assert c.reply() == OK
    assert c.cmd(b"QUIT") == BYE
    assert_exit(c, 0)
