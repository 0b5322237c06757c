"""qmail-smtpd.md §9.1 rows 1-26 (startup, commands, addresses) and bad input, end to end
under tcpserver. Expected bytes are written out from the spec, never taken from qspp."""

import time

import pytest

GREETING = b"220 mx.example.org ESMTP\r\n"
CTL421 = b"421 unable to read controls (#4.3.0)\r\n"
UN502 = b"502 unimplemented (#5.5.1)"
MF503 = b"503 MAIL first (#5.5.1)"
RF503 = b"503 RCPT first (#5.5.1)"
SYN555 = b"555 syntax error (#5.5.4)"
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
BMF553 = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
OOM421 = b"421 out of memory (#4.3.0)\r\n"
TIMEOUT451 = b"451 timeout (#4.4.2)\r\n"
OK = b"250 ok"


def stderr_is_one_line(client):
    lines = client.stderr_lines()
    pid = client.pid()
    assert len(lines) == 1, lines
    assert lines[0].startswith(b"qspp: pid %d: " % pid), lines


# ---------------------------------------------------------------- row 1

@pytest.mark.parametrize("setup", ["no me, no smtpgreeting", "me a directory",
                                   "me a directory, smtpgreeting present"])
def test_row01_unreadable_controls(home, smtpd, setup):
    home.control("me", None)
    if setup != "no me, no smtpgreeting":
        home.mkdir("control/me")
    if setup.endswith("present"):
        home.control("smtpgreeting", "g.example\n")
    c = smtpd.connect(greet=None)
    assert c.rest() == CTL421
    assert c.status() == 1
    stderr_is_one_line(c)


def test_qmailhome_missing_is_ctl421(home, smtpd):
    home.setenv(QMAILHOME=str(home.base / "no-such-dir"))
    c = smtpd.connect(greet=None)
    assert c.rest() == CTL421
    assert c.status() == 1


def test_unreadable_rcpthosts_is_ctl421(home, smtpd):
    home.mkdir("control/rcpthosts")
    c = smtpd.connect(greet=None)
    assert c.rest() == CTL421
    assert c.status() == 1


# ---------------------------------------------------------------- row 2

@pytest.mark.parametrize("files, greeting, helo", [
    ({"me": "a.b\r\n"}, b"220 a.b\r ESMTP\r\n", b"250 a.b\r\r\n"),
    ({"smtpgreeting": "g.example hi  \n"}, b"220 g.example hi ESMTP\r\n", b"250 g.example hi\r\n"),
    ({"smtpgreeting": ""}, b"220  ESMTP\r\n", b"250 \r\n"),
    ({"smtpgreeting": "g.example\t \nsecond line\n"}, b"220 g.example ESMTP\r\n",
     b"250 g.example\r\n"),
    ({"me": None, "smtpgreeting": "only.greeting\n"}, b"220 only.greeting ESMTP\r\n",
     b"250 only.greeting\r\n"),
])
def test_row02_greeting(home, smtpd, files, greeting, helo):
    for name, data in files.items():
        home.control(name, data)
    c = smtpd.connect(greet=None)
    assert c.reply() == greeting
    assert c.cmd(b"HELO a") == helo
    assert c.cmd(b"QUIT") == b"221" + helo[3:]
    assert c.rest() == b""
    c.assert_clean_exit(0)


# ---------------------------------------------------------------- rows 3-10

def test_row03_ehlo(smtpd):
    c = smtpd.connect()
    assert c.cmd(b"EHLO x") == b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def test_row04_quit_ends_the_connection(smtpd):
    c = smtpd.connect()
    c.send(b"HELO x\r\nQUIT\r\nNOOP\r\n")
    assert c.rest() == b"250 mx.example.org\r\n221 mx.example.org\r\n"
    c.assert_clean_exit(0)


def test_row04_quit_line_by_line(smtpd):
    c = smtpd.connect()
    assert c.cmd(b"HELO x") == b"250 mx.example.org\r\n"
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    assert c.rest() == b""
    c.assert_clean_exit(0)


def test_row05_unknown_verbs(smtpd):
    c = smtpd.connect()
    lines = [b"FOO", b"", b" MAIL FROM:<a@b>", b"MAIL\tFROM:<a@b>", b"DATAX", b"STARTTLS",
             b"AUTH LOGIN", b"EXPN x", b"BDAT 1 LAST"]
    for ln in lines:
        assert c.cmd(ln) == UN502 + b"\r\n", ln
    # the leading-space MAIL did not open a transaction
    assert c.cmd(b"RCPT TO:<x@example.org>") == MF503 + b"\r\n"


def test_row06_simple_verbs(smtpd):
    c = smtpd.connect()
    c.send(b"noop x\r\n")
    c.expect(OK)
    c.send(b"vrfy\r\n")
    c.expect(b"252 send some mail, i'll try my best")
    c.send(b"rset\r\n")
    c.expect(b"250 flushed")
    c.send(b"HeLp\r\n")
    c.expect(b"214 netqmail home page: http://qmail.org/netqmail")
    c.send(b"NOOP\0junk\r\n")
    c.expect(OK)
    c.send(b"QuIt extra\r\n")
    c.expect(b"221 mx.example.org")
    c.assert_clean_exit(0)


def test_row07_bare_lf_commands(home, smtpd):
    c = smtpd.connect()
    c.send(b"HELO x\n")
    c.expect(b"250 mx.example.org")
    c.send(b"MAIL FROM:<a@b>\n")
    c.expect(OK)
    c.send(b"RCPT TO:<x@example.org>\n")
    c.expect(OK)
    c.send(b"DATA\n")
    c.expect(b"354 go ahead")
    c.send(b"hi\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    assert run.message == (b"Received: from client.example.com (HELO x) (192.0.2.7)\n"
                           b"  by 198.51.100.1 with SMTP; <D>\nhi\n")


def test_row08_sequence_errors(smtpd):
    c = smtpd.connect()
    c.send(b"RCPT TO:<x@example.org>\r\nDATA\r\nMAIL FROM:<a@b>\r\nDATA\r\n")
    c.expect(MF503, MF503, OK, RF503)


@pytest.mark.parametrize("closer, reply", [(b"RSET", b"250 flushed"),
                                           (b"HELO z", b"250 mx.example.org"),
                                           (b"EHLO z", b"250-mx.example.org\r\n250-PIPELINING"
                                                       b"\r\n250 8BITMIME\r\n")])
def test_row09_transaction_closed(smtpd, closer, reply):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\n" + closer + b"\r\nDATA\r\n")
    c.expect(OK, OK, reply, MF503)


def test_row10_new_mail_empties_recipients(home, smtpd):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nMAIL FROM:<c@d>\r\nDATA\r\n")
    c.expect(OK, OK, OK, RF503)
    run = c.txn(mail=b"MAIL FROM:<e@f>", rcpts=[b"RCPT TO:<y@example.org>"])
    assert run.E == b"Fe@f\0Ty@example.org\0\0"


def test_row11_failed_mail_keeps_transaction(smtpd):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\n")
    c.expect(OK, OK)
    assert c.cmd(b"MAIL FROM:<" + b"a" * 900 + b">") == SYN555 + b"\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    c.send(b".\r\n")
    run = c.queued(c.reply())
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    assert run.message == (b"Received: from client.example.com (192.0.2.7)\n"
                           b"  by 198.51.100.1 with SMTP; <D>\n")


# ---------------------------------------------------------------- row 12: timeouts

def test_row12_timeout_in_commands(home, smtpd):
    home.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    c.send(b"NOOP\r\n")
    c.expect(OK)
    t = time.monotonic()
    assert c.rest(timeout=5) == TIMEOUT451
    assert 0.8 <= time.monotonic() - t <= 3.5
    c.assert_clean_exit(1)


def test_row12_timeout_in_data(home, smtpd):
    home.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nSubject: x\r\n\r\npart")
    c.expect(OK, OK, b"354 go ahead")
    t = time.monotonic()
    assert c.rest(timeout=5) == TIMEOUT451
    assert 0.8 <= time.monotonic() - t <= 3.5
    assert c.status() == 1
    (run,) = home.new_runs()
    assert run.E == b""  # nothing queued


def test_timeout_zero_means_one_second(home, smtpd):
    home.control("timeoutsmtpd", "0\n")
    c = smtpd.connect()
    t = time.monotonic()
    assert c.rest(timeout=5) == TIMEOUT451
    assert 0.8 <= time.monotonic() - t <= 3.5
    assert c.status() == 1


def test_timeout_is_per_read(home, smtpd):
    """One byte every 0.4 s keeps a 1-second connection alive (§7)."""
    home.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    for b in b"NOOP x\r":
        c.send(bytes([b]))
        time.sleep(0.4)
    c.send(b"\n")
    c.expect(OK)


# ---------------------------------------------------------------- row 13: pipelining

def _two_messages(c, pipelined):
    lines = [b"HELO h", b"MAIL FROM:<a@b>", b"RCPT TO:<x@example.org>", b"DATA", b"m1", b".",
             b"MAIL FROM:<c@d>", b"RCPT TO:<y@example.org>", b"RCPT TO:<z@a.example.net>",
             b"DATA", b"Subject: 2", b"", b"m2", b".", b"QUIT"]
    if pipelined:
        c.send(b"".join(ln + b"\r\n" for ln in lines))
        return c.rest()
    out = b""
    for ln in lines:
        c.send(ln + b"\r\n")
        if ln not in (b"m1", b"m2", b"Subject: 2", b""):
            out += c.reply()
    assert c.rest() == b""
    return out


def test_row13_pipelined_dialogue_same_bytes(home, smtpd):
    import re
    results = []
    for pipelined in (False, True):
        c = smtpd.connect()
        out = _two_messages(c, pipelined)
        pids = [int(p) for p in re.findall(rb"250 ok \d+ qp (\d+)\r\n", out)]
        assert len(pids) == 2, out
        runs = [home.run(p) for p in pids]
        norm = re.sub(rb"250 ok \d+ qp \d+\r\n", b"250 ok QP\r\n", out)
        assert norm == (b"250 mx.example.org\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n250 ok QP\r\n"
                        b"250 ok\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n250 ok QP\r\n"
                        b"221 mx.example.org\r\n")
        c.assert_clean_exit(0)
        results.append((norm, [(r.E, r.message) for r in runs]))
    assert results[0] == results[1]
    (_, runs) = results[1]
    assert runs[0] == (b"Fa@b\0Tx@example.org\0\0",
                       b"Received: from client.example.com (HELO h) (192.0.2.7)\n"
                       b"  by 198.51.100.1 with SMTP; <D>\nm1\n")
    assert runs[1] == (b"Fc@d\0Ty@example.org\0Tz@a.example.net\0\0",
                       b"Received: from client.example.com (HELO h) (192.0.2.7)\n"
                       b"  by 198.51.100.1 with SMTP; <D>\nSubject: 2\n\nm2\n")


# ---------------------------------------------------------------- rows 14-17: addrparse

def _sender(c, mail):
    run = c.txn(mail=mail)
    assert run.E.endswith(b"\0Tx@example.org\0\0"), run.E
    return run.E[:-len(b"\0Tx@example.org\0\0")]


def test_row14_source_route(smtpd):
    c = smtpd.connect()
    assert _sender(c, b"MAIL FROM:<@a,@b:user@host>") == b"Fuser@host"
    assert _sender(c, b"MAIL FROM:<@a.b>") == b"F"  # no ':' drops everything


@pytest.mark.parametrize("mail, sender", [
    (b"MAIL FROM: user@host SIZE=10", b"user@host"),
    (b"MAIL FROM x@y", b""),
    (b"MAIL", b""),
    (b"MAIL TO:<r@x>", b"r@x"),
    (b"MAIL <x@y>", b"x@y"),
    (b"MAIL FROM:<>", b""),
    (b"MAIL FROM:a@b", b"a@b"),
    (b"mail from:<a@b> BODY=8BITMIME", b"a@b"),
    (b"MAIL FROM:<a@b", b"a@b"),
])
def test_row15_sender_forms(smtpd, mail, sender):
    c = smtpd.connect()
    assert _sender(c, mail) == b"F" + sender


@pytest.mark.parametrize("mail, sender", [
    (b'MAIL FROM:<"quoted local"@host>', b"quoted local@host"),
    (b"MAIL FROM:<a\\>b@c>", b"a>b@c"),
    (b'MAIL FROM:<a"b>c"d@e>', b"ab>cd@e"),
    (b"MAIL FROM:<abc", b"abc"),
    (b"MAIL FROM:<a\0@b>", b"a"),
])
def test_row16_quoting(smtpd, mail, sender):
    c = smtpd.connect()
    assert _sender(c, mail) == b"F" + sender


def test_row17_address_length_limit(smtpd):
    c = smtpd.connect()
    a893 = b"a" * 893 + b"@b.org"
    assert len(a893) == 899
    assert _sender(c, b"MAIL FROM:<" + a893 + b">") == b"F" + a893
    assert c.cmd(b"MAIL FROM:<" + b"a" * 894 + b"@b.org>") == SYN555 + b"\r\n"
    # the same limit for RCPT, and the rewrite does not count
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    ok = b"r" * 887 + b"@example.org"
    assert len(ok) == 899
    assert c.cmd(b"RCPT TO:<" + ok + b">") == OK + b"\r\n"
    assert c.cmd(b"RCPT TO:<" + ok[:-1] + b"gg>") == SYN555 + b"\r\n"


# ---------------------------------------------------------------- rows 18-19: badmailfrom

def test_row18_badmailfrom(home, smtpd):
    home.control("badmailfrom", "bad@Evil.com\n")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<BAD@evil.COM>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(OK, BMF553, RF503)
    assert c.cmd(b"RCPT TO:<" + b"a" * 888 + b"@example.org>") == SYN555 + b"\r\n"
    # the next MAIL recomputes the flag
    run = c.txn(mail=b"MAIL FROM:<good@evil.com>")
    assert run.E == b"Fgood@evil.com\0Tx@example.org\0\0"


def test_row19_badmailfrom_domains_and_whitespace(home, smtpd):
    home.control("badmailfrom", "# comment\n@spam.example\n  x@y\n\n")
    c = smtpd.connect()
    for sender, rcpt_reply in [(b"u@sub.spam.example", OK), (b"u@SPAM.example", BMF553),
                               (b"x@y", OK), (b"a@b@spam.example", BMF553)]:
        c.send(b"MAIL FROM:<" + sender + b">\r\nRCPT TO:<x@example.org>\r\n")
        c.expect(OK, rcpt_reply)


def test_badmailfrom_null_sender_never_matches(home, smtpd):
    home.control("badmailfrom", "@\n\n")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<x@example.org>\r\n")
    c.expect(OK, OK)


# ---------------------------------------------------------------- rows 20-23: rcpthosts

def test_row20_rcpthosts(smtpd):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    cases = [(b"x@sub.example.org", RH553), (b"x@EXAMPLE.ORG", OK), (b"x@example.net", RH553),
             (b"x@a.b.example.net", OK), (b"x@", RH553), (b"noat", OK),
             (b"x@y@example.org", OK), (b"x@example.org.", RH553),
             (b"x@[192.0.2.99]", RH553), (b"", OK)]
    for addr, want in cases:
        assert c.cmd(b"RCPT TO:<" + addr + b">") == want + b"\r\n", addr
    c.send(b"DATA\r\n")
    c.expect(b"354 go ahead")
    c.send(b".\r\n")
    run = c.queued(c.reply())
    assert run.E == (b"Fa@b\0Tx@EXAMPLE.ORG\0Tx@a.b.example.net\0Tnoat\0Tx@y@example.org\0T\0\0")


@pytest.mark.parametrize("rcpthosts, anywhere", [(None, OK), ("", RH553),
                                                 ("# only a comment\n\n", RH553),
                                                 ("  anywhere\n", RH553),
                                                 ("ANYWHERE \t\n", OK)])
def test_row21_rcpthosts_absent_or_empty(home, smtpd, rcpthosts, anywhere):
    home.control("rcpthosts", rcpthosts)
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@anywhere>\r\nRCPT TO:<noat>\r\n")
    c.expect(OK, anywhere, OK)


def test_row22_morercpthosts_cdb(home, smtpd):
    home.cdb("control/morercpthosts.cdb", {"more.example": "", ".wild.example": ""})
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    for addr, want in [(b"x@MORE.example", OK), (b"x@a.more.example", RH553),
                       (b"x@a.wild.example", OK), (b"x@wild.example", RH553),
                       (b"x@example.org", OK), (b"x@far.example", RH553)]:
        assert c.cmd(b"RCPT TO:<" + addr + b">") == want + b"\r\n", addr


def test_row23_morercpthosts_directory(home, smtpd):
    home.mkdir("control/morercpthosts.cdb")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<x@far.example>\r\n")
    c.expect(OK, OK)
    assert c.rest() == CTL421
    assert c.status() == 1
    stderr_is_one_line(c)


def test_morercpthosts_not_opened_without_rcpthosts(home, smtpd):
    home.control("rcpthosts", None)
    home.mkdir("control/morercpthosts.cdb")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@far.example>\r\nQUIT\r\n")
    c.expect(OK, OK, b"221 mx.example.org")
    c.assert_clean_exit(0)


# ---------------------------------------------------------------- rows 24-26: relay, literals

def test_row24_relayclient_suffix(home, smtpd):
    home.setenv(RELAYCLIENT="@relay.suffix")
    c = smtpd.connect()
    run = c.txn(rcpts=[b"RCPT TO:<x@any.com>", b"RCPT TO:<noat>"], body=b"")
    assert run.E == b"Fa@b\0Tx@any.com@relay.suffix\0Tnoat@relay.suffix\0\0"


def test_row25_relayclient_empty(home, smtpd):
    home.setenv(RELAYCLIENT="")
    c = smtpd.connect()
    run = c.txn(rcpts=[b"RCPT TO:<x@any.com>", b"RCPT TO:<x@example.org>",
                       b"RCPT TO:<x@any.com>"])
    assert run.E == b"Fa@b\0Tx@any.com\0Tx@example.org\0Tx@any.com\0\0"  # duplicates kept


def test_row26_address_literals(home, smtpd):
    home.control("rcpthosts", "example.org\n.example.net\nmx.example.org\n")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    assert c.cmd(b"RCPT TO:<x@[192.0.2.99]>") == RH553 + b"\r\n"
    run = c.txn(mail=b"MAIL FROM:<x@[127.0.0.1]>",
                rcpts=[b"RCPT TO:<x@[127.0.0.1]>", b"RCPT TO:<y@[0.0.0.0]>",
                       b"RCPT TO:<z@[127.0.0.257]>"])
    assert run.E == b"Fx@mx.example.org\0Tx@mx.example.org\0Ty@mx.example.org\0Tz@mx.example.org\0\0"


def test_localiphost_control(home, smtpd):
    home.control("localiphost", "lo.example\n")
    home.control("rcpthosts", "lo.example\n")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    assert c.cmd(b"RCPT TO:<x@[127.0.0.1]x>") == RH553 + b"\r\n"
    assert c.cmd(b"RCPT TO:<x@[127.0.0.1]>") == OK + b"\r\n"
    assert c.cmd(b"RCPT TO:<x@[127.0.0.1]") == OK + b"\r\n"  # a missing '>' is fine


# ---------------------------------------------------------------- bad input

def test_bare_cr_in_helo_argument(smtpd):
    c = smtpd.connect()
    assert c.cmd(b"HELO x\r") == b"250 mx.example.org\r\n"
    run = c.txn()
    assert run.message.startswith(b"Received: from client.example.com (HELO x?) (192.0.2.7)\n")


def test_helo_argument_spaces(smtpd):
    c = smtpd.connect()
    assert c.cmd(b"HELO   y  ") == b"250 mx.example.org\r\n"
    run = c.txn()
    # leading spaces gone, trailing ones kept (and filtered to '?')
    assert run.message.startswith(b"Received: from client.example.com (HELO y??) (192.0.2.7)\n")


def test_empty_ehlo_argument(smtpd):
    c = smtpd.connect()
    assert c.cmd(b"EHLO") == b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    run = c.txn()
    assert run.message.startswith(b"Received: from client.example.com (HELO ) (192.0.2.7)\n")


def test_cr_only_lines_are_unknown(smtpd):
    c = smtpd.connect()
    c.send(b"\r\n\r\r\n\n")
    c.expect(UN502, UN502, UN502)


def test_missing_mail_and_rcpt(smtpd):
    c = smtpd.connect()
    c.send(b"DATA\r\nRCPT TO:<x@example.org>\r\nMAIL FROM:<a@b>\r\nDATA\r\n"
           b"RCPT TO:<x@far.away>\r\nDATA\r\n")
    c.expect(MF503, MF503, OK, RF503, RH553, RF503)


def test_malformed_addresses(smtpd):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    # not refused for syntax: qmail checks only length and the domain
    for addr, want in [(b"RCPT TO:", OK), (b"RCPT", OK), (b"RCPT TO:<<<>>>", OK),
                       (b"RCPT TO:<x@exa mple.org>", RH553), (b"RCPT TO:<x@example.org", OK),
                       (b"RCPT TO:<\"x@far.away\"@example.org>", OK),
                       (b"RCPT TO:<x\\@far.away>", RH553)]:
        assert c.cmd(addr) == want + b"\r\n", addr


def test_900_byte_addresses(smtpd):
    c = smtpd.connect()
    assert c.cmd(b"MAIL FROM:<" + b"a" * 5000 + b">") == SYN555 + b"\r\n"
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    assert c.cmd(b"RCPT TO:<" + b"a" * 900 + b">") == SYN555 + b"\r\n"
    assert c.cmd(b"DATA") == RF503 + b"\r\n"


def test_eof_midline_drops_partial_command(smtpd):
    c = smtpd.connect()
    c.send(b"NOOP\r\nQUIT")
    c.expect(OK)
    c.shutdown_write()
    assert c.rest() == b""
    c.assert_clean_exit(1)


def test_eof_after_greeting_exits_1(smtpd):
    c = smtpd.connect()
    c.shutdown_write()
    assert c.rest() == b""
    c.assert_clean_exit(1)


def test_command_line_at_limit_is_fine(smtpd):
    c = smtpd.connect()
    line = b"NOOP " + b"x" * (65536 - 6) + b"\r"
    assert len(line) == 65536
    c.send(line + b"\n")
    c.expect(OK, timeout=10)
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    c.assert_clean_exit(0)


@pytest.mark.parametrize("tail", [b"\n", b"\r\n", b""], ids=["lf", "crlf", "no-lf"])
def test_command_line_over_limit_is_out_of_memory(smtpd, tail):
    c = smtpd.connect()
    if tail:
        line = b"NOOP " + b"x" * (65537 - 5 - len(tail) + 1) + tail
        assert len(line) - 1 == 65537
    else:
        line = b"NOOP " + b"x" * 100000  # no LF ever: must not wait for one
    c.send(line)
    assert c.rest(timeout=10) == OOM421
    assert c.status() == 1


def test_over_long_mail_line(smtpd):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<" + b"a" * 70000 + b">\r\n")
    assert c.rest(timeout=10) == OOM421
    assert c.status() == 1


def test_envelope_over_16_mib_is_out_of_memory(home, smtpd, background_send):
    """§2.7: envelope bytes incl. the RELAYCLIENT suffix; 1000 bytes per recipient."""
    suffix = "@" + "z" * 99
    home.setenv(RELAYCLIENT=suffix)
    addr = b"r" * 886 + b"@example.org"
    assert len(b"T" + addr + suffix.encode() + b"\0") == 1000
    # envelope with k recipients: 5 (Fa@b\0) + 1000 k + 1 (final \0)
    k_ok = (16 * 1024 * 1024 - 6) // 1000
    c = smtpd.connect(timeout=20)
    rcpt = b"RCPT TO:<" + addr + b">\r\n"
    background_send(c, b"MAIL FROM:<a@b>\r\n" + rcpt * (k_ok + 1) + b"NOOP\r\n")
    assert c.reply(timeout=20) == OK + b"\r\n"
    for i in range(k_ok):
        assert c.reply(timeout=20) == OK + b"\r\n", i
    assert c.rest(timeout=20) == OOM421
    assert c.status() == 1
