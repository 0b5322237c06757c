"""qmail-smtpd.md §9.2 rows 27-43 (DATA and the queue), end to end under tcpserver."""

import os

import pytest

OK = b"250 ok"
GO = b"354 go ahead"
LF451 = b"451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
HOP554 = b"554 too many hops, this message is looping (#5.4.6)\r\n"
SIZE552 = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
RECEIVED_F = b"Received: from client.example.com (192.0.2.7)\n  by 198.51.100.1 with SMTP; <D>\n"
E_TXN = b"Fa@b\0Tx@example.org\0\0"


def open_data(c):
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(OK, OK, GO)


def message(c, data: bytes) -> bytes:
    """MAIL, RCPT, DATA, then DATA bytes; return the reply after the message."""
    open_data(c)
    c.send(data)
    return c.reply()


# ---------------------------------------------------------------- rows 27-30: Received

def test_row27_received_and_message(home, smtpd):
    c = smtpd.connect()
    c.send(b"HELO Client.Example.COM\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(b"250 mx.example.org", OK, OK, GO)
    c.send(b"Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.message == RECEIVED_F + b"Subject: hi\n\nbody\n.dot\n"
    assert run.E == b"Fa@b.c\0Tx@example.org\0\0"
    # the queue runs in the home directory with qspp's environment (§2.4)
    assert run.cwd == os.path.realpath(home.root).encode()
    assert run.env[b"TCPREMOTEIP"] == b"192.0.2.7"
    assert run.env[b"QMAILHOME"] == str(home.root).encode()
    assert b"RELAYCLIENT" not in run.env


def test_row28_received_filtering(home, smtpd):
    home.setenv(TCPREMOTEINFO="ident user", TCPLOCALHOST="local.host")
    c = smtpd.connect()
    c.send(b"HELO [1.2.3.4] x_y\r\n")
    c.expect(b"250 mx.example.org")
    run = c.txn()
    assert run.message == (b"Received: from client.example.com (HELO ?1.2.3.4??x?y)"
                           b" (ident?user@192.0.2.7)\n  by local.host with SMTP; <D>\nhi\n")


def test_received_allowed_characters(home, smtpd):
    home.setenv(TCPREMOTEHOST="a-Z.0%+/=:@b", TCPREMOTEINFO="u!", TCPLOCALHOST="l\x7f\udcff")
    c = smtpd.connect()
    c.send(b"HELO h\x00\r\n")  # NUL cuts the line: HELO name "h"
    c.expect(b"250 mx.example.org")
    run = c.txn()
    assert run.M.startswith(b"Received: from a-Z.0%+/=:@b (HELO h) (u?@192.0.2.7)\n"
                            b"  by l?? with SMTP; ")


@pytest.mark.parametrize("helo, received", [
    (b"HELO", b"Received: from unknown (HELO ) (unknown)\n  by unknown with SMTP; <D>\n"),
    (None, b"Received: from unknown (unknown)\n  by unknown with SMTP; <D>\n"),
    (b"HELO unknown", b"Received: from unknown (unknown)\n  by unknown with SMTP; <D>\n"),
])
def test_row29_no_tcp_variables(home, smtpd, helo, received):
    home.setenv(TCPREMOTEIP=None, TCPLOCALIP=None, TCPREMOTEHOST=None)
    c = smtpd.connect()
    if helo is not None:
        assert c.cmd(helo) == b"250 mx.example.org\r\n"
    run = c.txn()
    assert run.message == received + b"hi\n"


def test_empty_tcpremotehost_is_set(home, smtpd):
    home.setenv(TCPREMOTEHOST="")
    c = smtpd.connect()
    c.send(b"HELO x\r\n")
    c.expect(b"250 mx.example.org")
    run = c.txn()
    assert run.message.startswith(b"Received: from  (HELO x) (192.0.2.7)\n")


def test_tcplocalhost_wins_over_tcplocalip(home, smtpd):
    home.setenv(TCPLOCALHOST="")
    c = smtpd.connect()
    run = c.txn()
    assert run.message == b"Received: from client.example.com (192.0.2.7)\n  by  with SMTP; <D>\nhi\n"


def test_row30_empty_message(smtpd):
    c = smtpd.connect()
    run = c.queued(message(c, b".\r\n"))
    assert run.message == RECEIVED_F
    assert run.E == E_TXN


# ---------------------------------------------------------------- row 31: bare LF

@pytest.mark.parametrize("data", [b"a\nb\r\n.\r\n", b"a\r\n.\n", b"a\n.\r\n", b"\n.\r\n",
                                  b"Subject: x\r\n\r\nbody\nmore\r\n.\r\n"])
def test_row31_bare_lf_in_data(home, smtpd, data):
    c = smtpd.connect()
    open_data(c)
    c.send(data)
    assert c.rest() == LF451
    assert c.status() == 1
    (run,) = home.new_runs()
    assert run.E == b""


def test_bare_lf_is_not_smuggling(home, smtpd):
    """`\\n.\\r\\n` neither ends the message nor starts a second one (§6.2)."""
    c = smtpd.connect()
    open_data(c)
    c.send(b"a\r\n\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nx\r\n.\r\n")
    assert c.rest() == LF451
    assert c.status() == 1
    (run,) = home.new_runs()
    assert run.E == b""


# ---------------------------------------------------------------- rows 32-33: conversion

@pytest.mark.parametrize("data, body", [
    (b"a\rb\r\n.\r\n", b"a\rb\n"),
    (b"a\r\r\nb\r\n.\r\n", b"a\r\nb\n"),
    (b"a\r\n.\rx\r\n.\r\n", b"a\n.\rx\n"),
    (b"a\r\r\r\n.\r\r\n.\r\n", b"a\r\r\n.\r\n"),
    (b"..\r\n...x\r\n.x\r\n. \r\n.\r\n", b".\n..x\nx\n \n"),
    (b"\x00\xff\x80\r\n.\r\n", b"\x00\xff\x80\n"),
    (b"no final newline\r\n\r\n.\r\n", b"no final newline\n\n"),
    (b"x.\r\n.\r\n", b"x.\n"),
])
def test_rows32_33_message_conversion(smtpd, data, body):
    c = smtpd.connect()
    run = c.queued(message(c, data))
    assert run.message == RECEIVED_F + body
    assert run.E == E_TXN


def test_message_in_tiny_pieces(smtpd):
    """Segmentation never matters: the same message one byte per write."""
    import time
    c = smtpd.connect()
    open_data(c)
    for b in b"a\r\n..b\r\r\nc\r\n.\r\n":
        c.send(bytes([b]))
        time.sleep(0.002)
    run = c.queued(c.reply())
    assert run.message == RECEIVED_F + b"a\n.b\r\nc\n"


def test_large_message_is_streamed_intact(smtpd, background_send):
    line = bytes(range(32, 127)) + b"\r\n"
    body = line * 40000  # about 3.9 MB
    c = smtpd.connect(timeout=30)
    open_data(c)
    background_send(c, body + b".\r\n")
    run = c.queued(c.reply(timeout=60))
    assert run.message == RECEIVED_F + body.replace(b"\r\n", b"\n")


# ---------------------------------------------------------------- row 34: EOF in DATA

def test_row34_disconnect_mid_data(home, smtpd):
    c = smtpd.connect()
    open_data(c)
    c.send(b"a\r\nb")
    c.shutdown_write()
    assert c.rest() == b""
    c.assert_clean_exit(1)
    (run,) = home.new_runs()
    assert run.E == b""


def test_disconnect_right_after_dot_line_start(home, smtpd):
    c = smtpd.connect()
    open_data(c)
    c.send(b"a\r\n.")
    c.shutdown_write()
    assert c.rest() == b""
    assert c.status() == 1
    (run,) = home.new_runs()
    assert run.E == b""


# ---------------------------------------------------------------- rows 35-37: hops

def test_row35_99_received_lines_pass(smtpd):
    c = smtpd.connect()
    run = c.queued(message(c, b"Received: x\r\n" * 99 + b"\r\n.\r\n"))
    assert run.message == RECEIVED_F + b"Received: x\n" * 99 + b"\n"


@pytest.mark.parametrize("headers", [
    b"Received: x\r\n" * 100,
    b"Received: x\r\n" * 50 + b"Delivered-To: y\r\n" * 50,
    b"ReCeIvEd\r\n" * 100,
    b"Receivedx\r\n" * 100,
    b"DELIVERED\r\n" * 100,
    b"Subject: s\r\n" + b"received: x\r\n" * 100 + b"\r\nbody\r\n",
])
def test_row36_too_many_hops(home, smtpd, headers):
    c = smtpd.connect()
    assert message(c, headers + b".\r\n") == HOP554
    (run,) = home.new_runs()
    assert run.E == b""
    assert c.cmd(b"NOOP") == OK + b"\r\n"
    # a new transaction is needed, and works
    assert c.cmd(b"DATA") == b"503 MAIL first (#5.5.1)\r\n"
    run = c.txn()
    assert run.E == E_TXN


@pytest.mark.parametrize("data", [
    b"Subject: x\r\n\r\n" + b"Received: x\r\n" * 100,
    b"..Received: x\r\n" * 100,
    b" Received: x\r\n" * 100,
    b"Receive: x\r\n" * 100,
    b"Delivere: x\r\n" * 100,
])
def test_row37_lines_that_do_not_count(smtpd, data):
    c = smtpd.connect()
    run = c.queued(message(c, data + b".\r\n"))
    assert run.E == E_TXN


# ---------------------------------------------------------------- rows 38-39: databytes

def test_row38_databytes_env(home, smtpd):
    home.setenv(DATABYTES="10")
    c = smtpd.connect()
    run = c.queued(message(c, b"123456789\r\n.\r\n"))
    assert run.message == RECEIVED_F + b"123456789\n"
    assert message(c, b"1234567890\r\n.\r\n") == SIZE552
    (aborted,) = home.new_runs()
    assert aborted.E == b""
    assert message(c, b"Received: x\r\n" * 100 + b".\r\n") == HOP554
    home.new_runs()
    # dots removed and CRLF counted as one byte
    run = c.queued(message(c, b"..\r\n.1234567\r\n.\r\n"))
    assert run.message == RECEIVED_F + b".\n1234567\n"


def test_row39_empty_databytes_env_means_unlimited(home, smtpd):
    home.control("databytes", "5\n")
    home.setenv(DATABYTES="")
    c = smtpd.connect()
    run = c.queued(message(c, b"123456789\r\n.\r\n"))
    assert run.message == RECEIVED_F + b"123456789\n"


def test_control_databytes(home, smtpd):
    home.control("databytes", "5abc\n")
    c = smtpd.connect()
    run = c.queued(message(c, b"1234\r\n.\r\n"))
    assert run.message == RECEIVED_F + b"1234\n"
    assert message(c, b"12345\r\n.\r\n") == SIZE552
    (aborted,) = home.new_runs()
    assert aborted.E == b""


def test_databytes_message_read_to_end(home, smtpd, background_send):
    """An oversized message is still read to its end; the connection goes on."""
    home.setenv(DATABYTES="1000")
    c = smtpd.connect(timeout=20)
    open_data(c)
    background_send(c, b"x" * 998 + b"\r\n" + b"y\r\n" * 200000 + b".\r\nNOOP\r\n")
    assert c.reply(timeout=30) == SIZE552
    assert c.reply() == OK + b"\r\n"


# ---------------------------------------------------------------- rows 40-43: queue outcomes

QQ = {
    11: b"554 envelope address too long for qq (#5.1.3)",
    115: b"554 envelope address too long for qq (#5.1.3)",
    31: b"554 mail server permanently rejected message (#5.3.0)",
    12: b"554 qq permanent problem (#5.3.0)",
    25: b"554 qq permanent problem (#5.3.0)",
    40: b"554 qq permanent problem (#5.3.0)",
    51: b"451 qq out of memory (#4.3.0)",
    52: b"451 qq timeout (#4.3.0)",
    53: b"451 qq write error or disk full (#4.3.0)",
    54: b"451 qq read error (#4.3.0)",
    55: b"451 qq unable to read configuration (#4.3.0)",
    56: b"451 qq trouble making network connection (#4.3.0)",
    61: b"451 qq trouble in home directory (#4.3.0)",
    62: b"451 qq trouble creating files in queue (#4.3.0)",
    66: b"451 qq trouble creating files in queue (#4.3.0)",
    71: b"451 mail server temporarily rejected message (#4.3.0)",
    72: b"451 connection to mail server timed out (#4.4.1)",
    73: b"451 connection to mail server rejected (#4.4.1)",
    74: b"451 communication with mail server failed (#4.4.2)",
    81: b"451 qq internal bug (#4.3.0)",
    91: b"451 qq internal bug (#4.3.0)",
    120: b"451 unable to exec qq (#4.3.0)",
    1: b"451 qq temporary problem (#4.3.0)",
    41: b"451 qq temporary problem (#4.3.0)",
    82: b"451 qq temporary problem (#4.3.0)",
    99: b"451 qq temporary problem (#4.3.0)",
    255: b"451 qq temporary problem (#4.3.0)",
}


@pytest.mark.parametrize("code", sorted(QQ))
def test_row40_queue_exit_codes(home, smtpd, code):
    home.setenv(CODE=str(code))
    c = smtpd.connect()
    assert message(c, b"hi\r\n.\r\n") == QQ[code] + b"\r\n"
    (run,) = home.new_runs()
    assert run.E == E_TXN  # the envelope was complete; the queue refused it
    assert c.cmd(b"NOOP") == OK + b"\r\n"


@pytest.mark.parametrize("queue", ["/nonexistent", "not-executable", "a-directory"])
def test_row41_queue_cannot_be_executed(home, smtpd, queue):
    if queue == "not-executable":
        home.write("bin/plain", "#!/bin/sh\nexit 0\n", mode=0o644)
        queue = str(home.root / "bin/plain")
    elif queue == "a-directory":
        home.mkdir("bin/dir")
        queue = str(home.root / "bin/dir")
    home.setenv(QMAILQUEUE=queue)
    c = smtpd.connect()
    open_data(c)  # 354 before anything is known about the program
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert c.reply() == b"451 unable to exec qq (#4.3.0)\r\n"
    assert c.cmd(b"NOOP") == OK + b"\r\n"
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    assert c.status() == 0


def test_row41_hops_win_over_exec_failure(home, smtpd):
    home.setenv(QMAILQUEUE="/nonexistent")
    c = smtpd.connect()
    assert message(c, b"Received: x\r\n" * 100 + b".\r\n") == HOP554


def test_row42_queue_crashes(home, smtpd):
    home.setenv(QMODE="segv")
    c = smtpd.connect()
    assert message(c, b"hi\r\n.\r\n") == b"451 qq crashed (#4.3.0)\r\n"
    (run,) = home.new_runs()
    assert run.E == E_TXN


def test_row42_queue_exits_0_unread(home, smtpd, background_send):
    home.setenv(QMODE="unread")
    c = smtpd.connect(timeout=20)
    open_data(c)
    background_send(c, b"x" * 78 + b"\r\n" * 1 + (b"y" * 98 + b"\r\n") * 3000 + b".\r\n")
    assert c.reply(timeout=20) == b"451 qq read error (#4.3.0)\r\n"
    assert c.cmd(b"NOOP") == OK + b"\r\n"


@pytest.mark.parametrize("qmailqueue", [None, "", "bin/qmail-queue"])
def test_row43_default_queue_program(home, smtpd, qmailqueue):
    home.install_recorder("bin/qmail-queue")
    home.setenv(QMAILQUEUE=qmailqueue)
    c = smtpd.connect()
    run = c.queued(message(c, b"hi\r\n.\r\n"))
    assert run.E == E_TXN
    assert run.message == RECEIVED_F + b"hi\n"


def test_queue_not_started_before_data(home, smtpd):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nRSET\r\nQUIT\r\n")
    c.expect(OK, OK, b"250 flushed", b"221 mx.example.org")
    c.assert_clean_exit(0)
    home.assert_no_new_runs()


def test_many_messages_one_connection(home, smtpd):
    c = smtpd.connect()
    pids = set()
    for i in range(20):
        run = c.txn(mail=b"MAIL FROM:<s%d@b>" % i, body=b"n%d\r\n" % i)
        assert run.E == b"Fs%d@b\0Tx@example.org\0\0" % i
        assert run.message == RECEIVED_F + b"n%d\n" % i
        pids.add(run.pid)
    assert len(pids) == 20
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    c.assert_clean_exit(0)
