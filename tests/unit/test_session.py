"""qspp.session.Session, the sans-IO SMTP state machine, driven with fakes.

No processes, sockets or sleeps: the queue, the plugin runner and the clock are
the doubles of fakes.py ([body] tests use spool.Spool's unlinked temp files).  Expected bytes come from qmail-smtpd.md (§4, §5, §6,
§9.1, §9.2) and spp.md (§3, §5, §7); "row N" means that row of the spec's
worked-example tables (§9 of qmail-smtpd.md, or spp.md §7 where it says so).
"""

import datetime
import os

import pytest

from qspp import control
from qspp.control import NoLocalIPs
from qspp.session import CLOSED, COMMAND, DATA

try:  # tests/unit is a plain directory today; keep working if it becomes a package
    from . import fakes
except ImportError:
    import fakes

CLOCK = fakes.CLOCK
QUEUED = fakes.QUEUED
Harness = fakes.Harness
echo = fakes.echo
settings = fakes.settings
spp_settings = fakes.spp_settings


def r(*lines):
    """Reply lines as sent: each followed by CRLF."""
    return b"".join(line + b"\r\n" for line in lines)


OK = r(b"250 ok")
GO = r(b"354 go ahead")
DONE = r(QUEUED)
FLUSHED = r(b"250 flushed")
UN502 = r(b"502 unimplemented (#5.5.1)")
MF503 = r(b"503 MAIL first (#5.5.1)")
RF503 = r(b"503 RCPT first (#5.5.1)")
SYN555 = r(b"555 syntax error (#5.5.4)")
RH553 = r(b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
BMF553 = r(b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
SIZE552 = r(b"552 sorry, that message size exceeds my databytes limit (#5.3.4)")
HOP554 = r(b"554 too many hops, this message is looping (#5.4.6)")
LF451 = r(b"451 See http://pobox.com/~djb/docs/smtplf.html.")
QQT451 = r(b"451 qqt failure (#4.3.0)")
CTL421 = r(b"421 unable to read controls (#4.3.0)")
MEM421 = r(b"421 out of memory (#4.3.0)")
IP421 = r(b"421 unable to figure out my IP addresses (#4.3.0)")
VRFY252 = r(b"252 send some mail, i'll try my best")
HELP214 = r(b"214 netqmail home page: http://qmail.org/netqmail")

F_HELO = r(b"250 mx.example.org")
F_EHLO = r(b"250-mx.example.org", b"250-PIPELINING", b"250 8BITMIME")


# §6.5 D, computed here from the clock (UTC), not with qspp's own date code.
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date(t):
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return ("%d %s %d %02d:%02d:%02d -0000" % (
        d.day, _MONTHS[d.month - 1], d.year, d.hour, d.minute, d.second)).encode()


DATE = _date(CLOCK)

RCVD_F = (b"Received: from client.example.com (192.0.2.7)\n"
          b"  by 198.51.100.1 with SMTP; " + DATE + b"\n")


def test_date_of_the_fixed_clock():
    # 1795558454 is 2026-11-24 22:14:14 UTC (§6.5: the date is UTC).
    assert DATE == b"24 Nov 2026 22:14:14 -0000"


def txn(h, sender=b"a@b", rcpt=b"x@example.org", body=b"hi\r\n.\r\n"):
    """MAIL, RCPT, DATA, message; returns all replies."""
    return (h.cmd(b"MAIL FROM:<" + sender + b">") + h.cmd(b"RCPT TO:<" + rcpt + b">")
            + h.cmd(b"DATA") + h.feed(body))


def message_after_354(h, body):
    """MAIL a@b, RCPT x@example.org, DATA, then `body`; returns replies after 354."""
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@example.org>", b"DATA") == OK + OK + GO
    return h.feed(body)


def envelope(sender, *rcpts):
    return b"F" + sender + b"\0" + b"".join(b"T" + x + b"\0" for x in rcpts) + b"\0"


# =============================================================================
# §3, §4.4, §4.5: greeting and the simple verbs
# =============================================================================

@pytest.mark.parametrize("g, greeting, helo", [
    (b"a.b\r", b"220 a.b\r ESMTP\r\n", b"250 a.b\r\r\n"),
    (b"g.example hi", b"220 g.example hi ESMTP\r\n", b"250 g.example hi\r\n"),
    (b"", b"220  ESMTP\r\n", b"250 \r\n"),
])
def test_row2_greeting_and_helo(g, greeting, helo):
    h = Harness(settings(greeting=g))
    assert h.greeting == greeting
    assert h.session.flush_soon
    assert h.cmd(b"HELO a") == helo
    assert h.cmd(b"QUIT") == b"221 " + g + b"\r\n"


def test_row3_ehlo():
    h = Harness()
    assert h.greeting == r(b"220 mx.example.org ESMTP")
    assert h.cmd(b"EHLO x") == F_EHLO


def test_row4_helo_quit():
    h = Harness()
    assert h.cmd(b"HELO x") == F_HELO
    assert h.state == COMMAND
    assert h.cmd(b"QUIT") == r(b"221 mx.example.org")
    assert h.state == CLOSED
    assert h.exit_status == 0
    assert h.session.flush_soon


def test_quit_ignores_argument_and_case():
    h = Harness()
    h.session.command(b"qUiT now")
    assert h.take() == r(b"221 mx.example.org")
    assert (h.state, h.exit_status) == (CLOSED, 0)


@pytest.mark.parametrize("line", [
    # row 5
    b"FOO", b"", b" MAIL FROM:<a@b>", b"MAIL\tFROM:<a@b>", b"DATAX", b"STARTTLS",
    b"AUTH LOGIN", b"EXPN x", b"BDAT 1 LAST",
    # AUTH and STARTTLS are not built: unknown verbs in every form (§4.4, D7)
    b"AUTH", b"AUTH PLAIN AHVzZXIAc2VjcmV0", b"auth login", b"starttls", b"STARTTLS x",
    # §4.1: only 0x20 separates, a leading space or tab makes the verb unknown
    b"\tNOOP", b"NOOP\tx", b"HELO\tx", b"   ", b"\r", b"\0NOOP", b"RCPTTO:<x@y>",
    b"QUITX", b"MAILFROM:<a@b>",
])
def test_row5_unknown_verbs(line):
    h = Harness()
    h.session.flush_soon = False
    assert h.cmd(line) == UN502
    assert h.state == COMMAND
    assert h.session.flush_soon  # §4.2 early flush after unknown verbs


def test_row5_nine_in_a_row():
    h = Harness()
    lines = [b"FOO", b"", b" MAIL FROM:<a@b>", b"MAIL\tFROM:<a@b>", b"DATAX",
             b"STARTTLS", b"AUTH LOGIN", b"EXPN x", b"BDAT 1 LAST"]
    assert h.feed(b"".join(line + b"\r\n" for line in lines)) == UN502 * 9
    # none of them opened a transaction
    assert h.cmd(b"RCPT TO:<x@example.org>") == MF503


def test_row6_noop_vrfy_rset_help_nul():
    h = Harness()
    assert h.cmds(b"noop x", b"vrfy", b"rset", b"HeLp", b"NOOP\0junk") == (
        OK + VRFY252 + FLUSHED + HELP214 + OK)


@pytest.mark.parametrize("line, reply", [
    (b"NOOP", OK), (b"NOOP   x y ", OK), (b"VRFY <x@y>", VRFY252), (b"HELP me", HELP214),
    (b"RSET x", FLUSHED), (b"rset", FLUSHED), (b"Vrfy", VRFY252), (b"help", HELP214),
])
def test_arguments_ignored(line, reply):
    h = Harness()
    assert h.cmd(line) == reply


@pytest.mark.parametrize("line", [b"HELO x", b"EHLO x", b"HELP", b"NOOP", b"VRFY x",
                                  b"DATA", b"QUIT", b"FOO", b"AUTH LOGIN", b"STARTTLS"])
def test_early_flush(line):
    # §4.2: replies to these are flushed at once (DATA here answers 503)
    h = Harness()
    h.session.flush_soon = False
    h.cmd(line)
    assert h.session.flush_soon


def test_row7_bare_lf_command_lines():
    h = Harness()
    assert h.feed(b"HELO x\nMAIL FROM:<a@b>\n") == F_HELO + OK
    assert h.feed(b"RCPT TO:<x@example.org>\r\nDATA\nhi\r\n.\r\n") == OK + GO + DONE


# =============================================================================
# §4.1 command parsing
# =============================================================================

def test_one_cr_is_stripped():
    h = Harness()
    assert h.cmd(b"NOOP\r") == OK
    # `HELO x\r\r\n`: the argument is `x\r`
    assert h.cmd(b"HELO x\r\r") == F_HELO
    assert h.env[b"SMTPHELOHOST"] == b"x\r"
    txn(h)
    assert h.queue.last.message.startswith(
        b"Received: from client.example.com (HELO x?) (192.0.2.7)\n")


def test_cr_inside_line_kept():
    h = Harness()
    assert h.cmd(b"HELO a\rb\r") == F_HELO
    assert h.env[b"SMTPHELOHOST"] == b"a\rb"


def test_nul_cuts_the_line():
    h = Harness()
    assert h.cmd(b"MAIL FROM:<a\0@b>") == OK
    assert h.cmd(b"RCPT TO:<x@example.org>\0junk") == OK
    assert h.cmd(b"HELO a\0b\r") == F_HELO
    assert h.env[b"SMTPHELOHOST"] == b"a"
    assert h.cmd(b"MAIL FROM:<c@d\0>") == OK
    assert h.cmd(b"RCPT TO:<x@example.org>") == OK
    assert h.cmd(b"DATA") == GO
    h.feed(b".\r\n")
    assert h.queue.last.envelope == envelope(b"c@d", b"x@example.org")


@pytest.mark.parametrize("verb", [b"helo", b"HELO", b"HeLo", b"hELO"])
def test_verb_case_insensitive_helo(verb):
    h = Harness()
    assert h.cmd(verb + b" x") == F_HELO


@pytest.mark.parametrize("mail, rcpt, data", [
    (b"mail", b"rcpt", b"data"),
    (b"Mail", b"RcPt", b"DaTa"),
    (b"MAIL", b"RCPT", b"DATA"),
])
def test_verb_case_insensitive_transaction(mail, rcpt, data):
    h = Harness()
    assert h.cmd(mail + b" FROM:<a@b>") == OK
    assert h.cmd(rcpt + b" TO:<x@example.org>") == OK
    assert h.cmd(data) == GO
    assert h.feed(b".\r\n") == DONE
    assert h.cmd(b"eHlO y") == F_EHLO


def test_argument_spaces():
    # leading run of spaces skipped, trailing spaces kept (§4.1)
    h = Harness()
    assert h.cmd(b"HELO    x  ") == F_HELO
    assert h.env[b"SMTPHELOHOST"] == b"x  "
    assert h.cmd(b"MAIL     FROM:<a@b>   ") == OK
    assert h.cmd(b"RCPT  TO:<x@example.org>  ") == OK
    assert h.cmd(b"DATA") == GO
    h.feed(b".\r\n")
    q = h.queue.last
    assert q.envelope == envelope(b"a@b", b"x@example.org")
    assert q.message.startswith(b"Received: from client.example.com (HELO x??) (192.0.2.7)\n")


def test_trailing_space_argument_reaches_addrparse():
    # `MAIL FROM: a@b ` : no `<`, terminator space, so the sender is a@b
    h = Harness()
    assert h.cmd(b"MAIL FROM: a@b ") == OK
    assert h.cmd(b"RCPT TO:x@example.org  ") == OK
    h.cmd(b"DATA")
    h.feed(b".\r\n")
    assert h.queue.last.envelope == envelope(b"a@b", b"x@example.org")


def test_bare_helo_gives_empty_name():
    h = Harness()
    assert h.cmd(b"HELO") == F_HELO
    assert h.env[b"SMTPHELOHOST"] == b""
    txn(h)
    assert h.queue.last.message.startswith(
        b"Received: from client.example.com (HELO ) (192.0.2.7)\n")


# =============================================================================
# §4.3, §4.4: transaction state (rows 8-11)
# =============================================================================

def test_row8_mail_first_rcpt_first():
    h = Harness()
    assert h.cmds(b"RCPT TO:<x@example.org>", b"DATA", b"MAIL FROM:<a@b>", b"DATA") == (
        MF503 + MF503 + OK + RF503)
    assert h.state == COMMAND


@pytest.mark.parametrize("closer, reply", [
    (b"RSET", FLUSHED), (b"HELO z", F_HELO), (b"EHLO z", F_EHLO),
])
def test_row9_rset_helo_close_transaction(closer, reply):
    h = Harness()
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@example.org>", closer, b"DATA") == (
        OK + OK + reply + MF503)
    assert h.cmd(b"RCPT TO:<x@example.org>") == MF503
    assert h.queue.attempts == 0


def test_row10_new_mail_empties_recipients():
    h = Harness()
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@example.org>", b"MAIL FROM:<c@d>",
                  b"DATA") == OK + OK + OK + RF503
    assert h.cmds(b"RCPT TO:<y@example.org>", b"DATA") == OK + GO
    h.feed(b".\r\n")
    assert h.queue.last.envelope == envelope(b"c@d", b"y@example.org")


def test_row11_failed_mail_keeps_transaction():
    h = Harness()
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@example.org>",
                  b"MAIL FROM:<" + b"a" * 900 + b">", b"DATA") == OK + OK + SYN555 + GO
    assert h.feed(b".\r\n") == DONE
    assert h.queue.last.envelope == b"Fa@b\0Tx@example.org\0\0"


def test_failed_mail_without_earlier_transaction():
    h = Harness()
    assert h.cmds(b"MAIL FROM:<" + b"a" * 900 + b">", b"RCPT TO:<x@example.org>") == (
        SYN555 + MF503)


def test_data_closes_transaction():
    h = Harness()
    assert txn(h) == OK + OK + GO + DONE
    assert h.cmds(b"RCPT TO:<x@example.org>", b"DATA") == MF503 + MF503


def test_duplicate_recipients_kept_in_order():
    h = Harness()
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<y@example.org>", b"RCPT TO:<x@example.org>",
                  b"RCPT TO:<y@example.org>", b"DATA") == OK * 4 + GO
    h.feed(b".\r\n")
    assert h.queue.last.envelope == envelope(b"a@b", b"y@example.org", b"x@example.org",
                                             b"y@example.org")


def test_size_parameter_ignored_without_auth():
    # §1.2, §8.6: SIZE is checked only in AUTH mode
    h = Harness(settings(databytes=10))
    assert h.cmd(b"MAIL FROM:<a@b> SIZE=100001") == OK
    assert h.cmd(b"RCPT TO:<x@example.org>") == OK


# =============================================================================
# §5: addresses (rows 14-22, 24-26)
# =============================================================================

def _sender(h, line):
    assert h.cmd(line) == OK
    assert h.cmd(b"RCPT TO:<x@example.org>") == OK
    assert h.cmd(b"DATA") == GO
    assert h.feed(b".\r\n") == DONE
    e = h.queue.last.envelope
    assert e.endswith(b"\0Tx@example.org\0\0")
    return e[:-len(b"Tx@example.org\0\0")]


@pytest.mark.parametrize("line, expected", [
    (b"MAIL FROM:<@a,@b:user@host>", b"Fuser@host\0"),                      # row 14
    (b"MAIL FROM: user@host SIZE=10", b"Fuser@host\0"),                     # row 15
    (b"MAIL FROM x@y", b"F\0"),
    (b"MAIL", b"F\0"),
    (b"MAIL TO:<r@x>", b"Fr@x\0"),
    (b"MAIL <x@y>", b"Fx@y\0"),
    (b"MAIL FROM:<>", b"F\0"),
    (b"MAIL FROM:a@b", b"Fa@b\0"),
    (b'MAIL FROM:<"quoted local"@host>', b"Fquoted local@host\0"),           # row 16
    (b"MAIL FROM:<a\\>b@c>", b"Fa>b@c\0"),
    (b'MAIL FROM:<a"b>c"d@e>', b"Fab>cd@e\0"),
    (b"MAIL FROM:<abc", b"Fabc\0"),
    (b"MAIL FROM:<a\0@b>", b"Fa\0"),
    (b"MAIL FROM:<" + b"a" * 893 + b"@b.org>", b"F" + b"a" * 893 + b"@b.org\0"),  # row 17
])
def test_rows14_17_senders(line, expected):
    assert _sender(Harness(), line) == expected


def test_row17_length_limit():
    h = Harness()
    assert h.cmd(b"MAIL FROM:<" + b"a" * 893 + b"@b.org>") == OK
    assert h.cmd(b"MAIL FROM:<" + b"a" * 894 + b"@b.org>") == SYN555
    assert h.cmd(b"RCPT TO:<" + b"a" * 887 + b"@example.org>") == OK      # 899 bytes
    assert h.cmd(b"RCPT TO:<" + b"a" * 888 + b"@example.org>") == SYN555  # 900 bytes


def test_row18_badmailfrom():
    h = Harness(settings(badmailfrom=control.Badmailfrom([b"bad@Evil.com"])))
    assert h.cmd(b"MAIL FROM:<BAD@evil.COM>") == OK
    assert h.cmd(b"RCPT TO:<x@example.org>") == BMF553
    assert h.cmd(b"DATA") == RF503
    assert h.cmd(b"RCPT TO:<" + b"a" * 900 + b">") == SYN555
    # the next MAIL recomputes the flag (§5.2)
    assert h.cmd(b"MAIL FROM:<good@evil.com>") == OK
    assert h.cmd(b"RCPT TO:<x@example.org>") == OK


@pytest.mark.parametrize("sender, reply", [
    (b"u@sub.spam.example", OK),
    (b"u@SPAM.example", BMF553),
    (b"x@y", OK),
    (b"", OK),          # the null sender never matches (§5.1)
    (b"v@x@spam.example", BMF553),  # the part from the last @
])
def test_row19_badmailfrom_domain(sender, reply):
    h = Harness(settings(badmailfrom=control.Badmailfrom([b"@spam.example", b"  x@y"])))
    assert h.cmd(b"MAIL FROM:<" + sender + b">") == OK
    assert h.cmd(b"RCPT TO:<x@example.org>") == reply


@pytest.mark.parametrize("rcpt, reply", [
    (b"x@sub.example.org", RH553),
    (b"x@EXAMPLE.ORG", OK),
    (b"x@example.net", RH553),
    (b"x@a.b.example.net", OK),
    (b"x@", RH553),
    (b"noat", OK),
    (b"x@y@example.org", OK),
    (b"x@example.org.", RH553),
    (b"", OK),
    (b"x@[192.0.2.99]", RH553),
])
def test_row20_rcpthosts(rcpt, reply):
    h = Harness()
    assert h.cmd(b"MAIL FROM:<a@b>") == OK
    assert h.cmd(b"RCPT TO:<" + rcpt + b">") == reply


@pytest.mark.parametrize("hosts, anywhere, noat", [
    (None, OK, OK),
    ([], RH553, OK),
])
def test_row21_no_or_empty_rcpthosts(hosts, anywhere, noat):
    h = Harness(settings(rcpthosts=control.Rcpthosts(hosts)))
    assert h.cmd(b"MAIL FROM:<a@b>") == OK
    assert h.cmd(b"RCPT TO:<x@anywhere>") == anywhere
    assert h.cmd(b"RCPT TO:<noat>") == noat


def test_row22_morercpthosts_cdb():
    cdb = fakes.FakeCdb({b"more.example"})
    h = Harness(settings(rcpthosts=control.Rcpthosts([b"example.org", b".example.net"], cdb)))
    assert h.cmd(b"MAIL FROM:<a@b>") == OK
    assert h.cmd(b"RCPT TO:<x@MORE.example>") == OK
    assert h.cmd(b"RCPT TO:<x@a.more.example>") == RH553
    # first found ends the search; candidates longest first, exact bytes
    assert cdb.lookups == [b"more.example",
                           b"a.more.example", b".more.example", b".example"]
    # a domain rcpthosts allows never touches the cdb
    del cdb.lookups[:]
    assert h.cmd(b"RCPT TO:<x@example.org>") == OK
    assert h.cmd(b"RCPT TO:<x@a.example.net>") == OK
    assert cdb.lookups == []


def test_cdb_read_error_is_fatal_at_this_rcpt():
    cdb = fakes.FakeCdb(set(), error=OSError(21, "Is a directory"))
    h = Harness(settings(rcpthosts=control.Rcpthosts([b"example.org"], cdb)))
    assert h.cmd(b"MAIL FROM:<a@b>") == OK
    assert h.cmd(b"RCPT TO:<x@example.org>") == OK
    assert h.cmd(b"RCPT TO:<x@far.example>") == CTL421
    assert (h.state, h.exit_status) == (CLOSED, 1)


def test_row24_relayclient_suffix():
    h = Harness(settings(relayclient=b"@relay.suffix"))
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@any.com>", b"RCPT TO:<noat>",
                  b"DATA") == OK + OK + OK + GO
    assert h.feed(b".\r\n") == DONE
    assert h.queue.last.envelope == b"Fa@b\0Tx@any.com@relay.suffix\0Tnoat@relay.suffix\0\0"


def test_row25_empty_relayclient():
    cdb = fakes.FakeCdb(set())
    h = Harness(settings(relayclient=b"",
                         rcpthosts=control.Rcpthosts([b"example.org"], cdb)))
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@any.com>", b"DATA") == OK + OK + GO
    h.feed(b".\r\n")
    assert h.queue.last.envelope == b"Fa@b\0Tx@any.com\0\0"
    assert cdb.lookups == []  # no lookup at all with the relay right (§5.3)


def test_row26_localiphost():
    seen = []

    def is_local_ip(ip):
        seen.append(ip)
        return ip in {b"127.0.0.1", b"0.0.0.0"}

    h = Harness(settings(rcpthosts=control.Rcpthosts([b"example.org", b"mx.example.org"]),
                         is_local_ip=is_local_ip))
    assert h.cmd(b"MAIL FROM:<x@[127.0.0.1]>") == OK
    assert h.cmd(b"RCPT TO:<x@[127.0.0.1]>") == OK
    assert h.cmd(b"RCPT TO:<x@[192.0.2.99]>") == RH553
    assert h.cmd(b"RCPT TO:<y@[0.0.0.0]>") == OK
    assert h.cmd(b"RCPT TO:<z@[127.0.0.257]>") == OK  # groups mod 256: 127.0.0.1
    assert h.cmd(b"DATA") == GO
    h.feed(b".\r\n")
    assert h.queue.last.envelope == (b"Fx@mx.example.org\0Tx@mx.example.org\0"
                                     b"Ty@mx.example.org\0Tz@mx.example.org\0\0")
    assert b"127.0.0.1" in seen and b"192.0.2.99" in seen


def test_no_localiphost_no_rewrite():
    h = Harness(settings(localiphost=None, rcpthosts=control.Rcpthosts(None),
                         is_local_ip=lambda ip: pytest.fail("looked up")))
    assert h.cmds(b"MAIL FROM:<x@[127.0.0.1]>", b"RCPT TO:<y@[127.0.0.1]>", b"DATA") == (
        OK + OK + GO)
    h.feed(b".\r\n")
    assert h.queue.last.envelope == b"Fx@[127.0.0.1]\0Ty@[127.0.0.1]\0\0"


def test_local_ip_listing_failure_is_fatal_at_first_literal():
    # §3 step 3 deferred (D5): its failure is the fatal 421 at the literal
    def broken(ip):
        raise NoLocalIPs("SIOCGIFCONF failed")

    h = Harness(settings(is_local_ip=broken))
    assert h.cmd(b"MAIL FROM:<a@b>") == OK
    assert h.cmd(b"RCPT TO:<x@[10.0.0.1]>") == IP421
    assert (h.state, h.exit_status) == (CLOSED, 1)


# =============================================================================
# §2.7, D4: envelope memory guard
# =============================================================================

MIB16 = 16 << 20


def _big_envelope(last_extra):
    """RELAYCLIENT suffix of ~1 MiB; 16 recipients whose envelope is exactly
    16 MiB + last_extra bytes.  Returns (harness, replies of the RCPTs)."""
    suffix = b"@" + b"s" * ((1 << 20) - 51)
    h = Harness(settings(relayclient=suffix))
    assert h.cmd(b"MAIL FROM:<a@b>") == OK
    used = len(b"Fa@b\0") + 1                  # final \0 included
    per = 1 + len(suffix) + 2                  # "T" + "x" + suffix + "\0"
    out = b""
    for _ in range(15):
        out += h.cmd(b"RCPT TO:<x>")
        used += per
    last = MIB16 - used - len(suffix) - 2 + last_extra
    assert 0 < last <= 899
    out += h.cmd(b"RCPT TO:<" + b"y" * last + b">")
    return h, out, suffix, last


def test_envelope_of_exactly_16_mib_is_accepted():
    h, out, suffix, last = _big_envelope(0)
    assert out == OK * 16
    assert h.cmd(b"DATA") == GO
    assert h.feed(b".\r\n") == DONE
    e = h.queue.last.envelope
    assert len(e) == MIB16
    assert e.startswith(b"Fa@b\0Tx" + suffix + b"\0Tx")
    assert e.endswith(b"\0T" + b"y" * last + suffix + b"\0\0")


def test_envelope_over_16_mib_is_fatal():
    h, out, _, _ = _big_envelope(1)
    assert out == OK * 15 + MEM421
    assert (h.state, h.exit_status) == (CLOSED, 1)
    assert h.session.flush_soon
    assert h.queue.attempts == 0


def test_envelope_guard_counts_per_transaction():
    suffix = b"@" + b"s" * ((1 << 20) - 1)
    h = Harness(settings(relayclient=suffix))
    for _ in range(3):
        assert h.cmd(b"MAIL FROM:<a@b>") == OK
        for _ in range(12):
            assert h.cmd(b"RCPT TO:<x>") == OK
    assert h.state == COMMAND


# =============================================================================
# §6: DATA and the queue (rows 27, 29-33, 35-39)
# =============================================================================

def test_row27_full_message():
    h = Harness()
    assert h.cmds(b"HELO Client.Example.COM", b"MAIL FROM:<a@b.c>",
                  b"RCPT TO:<x@example.org>", b"DATA") == F_HELO + OK + OK + GO
    assert h.state == DATA
    assert h.feed(b"Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n") == DONE
    assert h.state == COMMAND
    q = h.queue.last
    assert q.message == RCVD_F + b"Subject: hi\n\nbody\n.dot\n"
    assert q.envelope == b"Fa@b.c\0Tx@example.org\0\0"
    assert q.finish_calls == 1
    # the Received line is written right after the 354, before any message byte
    assert q.chunks[0].startswith(b"Received: ")


def test_row28_received_filtering():
    h = Harness(settings(remoteinfo=b"ident user", localhost=b"local.host"))
    h.cmd(b"HELO [1.2.3.4] x_y")
    txn(h)
    assert h.queue.last.message.startswith(
        b"Received: from client.example.com (HELO ?1.2.3.4??x?y) (ident?user@192.0.2.7)\n"
        b"  by local.host with SMTP; " + DATE + b"\n")


@pytest.mark.parametrize("helo, rcvd", [
    (b"HELO", b"Received: from unknown (HELO ) (unknown)\n"),
    (None, b"Received: from unknown (unknown)\n"),
    (b"HELO unknown", b"Received: from unknown (unknown)\n"),
])
def test_row29_no_tcp_variables(helo, rcvd):
    # Settings as startup.load builds them without TCP* variables
    h = Harness(settings(remotehost=None, remoteip=b"unknown", localhost=b"unknown"))
    if helo is not None:
        h.cmd(helo)
    assert txn(h) == OK + OK + GO + DONE
    assert h.queue.last.message == (rcvd + b"  by unknown with SMTP; " + DATE + b"\n"
                                    + b"hi\n")


def test_row30_empty_message():
    h = Harness()
    assert message_after_354(h, b".\r\n") == DONE
    q = h.queue.last
    assert q.message == RCVD_F
    assert q.envelope == b"Fa@b\0Tx@example.org\0\0"


@pytest.mark.parametrize("body", [b"a\nb\r\n.\r\n", b"a\r\n.\n", b"a\n.\r\n", b"\n.\r\n",
                                  b"a\r\nb\nc\r\n.\r\n"])
def test_row31_bare_lf(body):
    h = Harness()
    assert message_after_354(h, body) == LF451
    assert (h.state, h.exit_status) == (CLOSED, 1)
    assert h.session.flush_soon
    q = h.queue.last
    assert q.finish_calls == 1
    assert q.envelope is None
    assert b"\n.\r" not in q.message[len(RCVD_F):]


def test_row31_bare_lf_in_pieces():
    h = Harness()
    assert message_after_354(h, b"abc") == b""
    assert h.state == DATA
    assert h.feed(b"\nrest\r\n.\r\n") == LF451
    assert (h.state, h.exit_status) == (CLOSED, 1)
    assert h.queue.last.aborted


@pytest.mark.parametrize("body, stored", [
    (b"a\rb\r\n.\r\n", b"a\rb\n"),                              # row 32
    (b"a\r\r\nb\r\n.\r\n", b"a\r\nb\n"),
    (b"a\r\n.\rx\r\n.\r\n", b"a\n.\rx\n"),
    (b"..\r\n...x\r\n.x\r\n. \r\n.\r\n", b".\n..x\nx\n \n"),    # row 33
    (b"\x00\xff\x80\r\n.\r\n", b"\x00\xff\x80\n"),
    (b".\r\r\n.\r\n", b".\r\n"),                                # §6.2
    (b"x\r\n.\r\r\n.\r\n", b"x\n.\r\n"),
])
def test_rows32_33_conversion(body, stored):
    h = Harness()
    assert message_after_354(h, body) == DONE
    assert h.queue.last.message == RCVD_F + stored


def test_row35_99_hops_pass():
    h = Harness()
    assert message_after_354(h, b"Received: x\r\n" * 99 + b"\r\n.\r\n") == DONE
    assert h.queue.last.envelope == b"Fa@b\0Tx@example.org\0\0"


@pytest.mark.parametrize("header", [
    b"Received: x\r\n" * 100,
    b"Received:\r\n" * 50 + b"Delivered-To:\r\n" * 50,
    b"ReCeIvEd\r\n" * 100,
    b"Receivedx\r\n" * 100,
])
def test_row36_100_hops(header):
    h = Harness()
    assert message_after_354(h, header + b".\r\n") == HOP554
    assert h.queue.last.aborted
    assert h.state == COMMAND
    assert h.cmd(b"NOOP") == OK
    # a new MAIL is needed (§6.6)
    assert h.cmd(b"DATA") == MF503


@pytest.mark.parametrize("body", [
    b"Subject: x\r\n\r\n" + b"Received: x\r\n" * 100,
    b"..Received: x\r\n" * 100,
    b" Received: x\r\n" * 100,
])
def test_row37_not_hops(body):
    h = Harness()
    assert message_after_354(h, body + b".\r\n") == DONE


@pytest.mark.parametrize("body, reply", [
    (b"123456789\r\n.\r\n", DONE),
    (b"1234567890\r\n.\r\n", SIZE552),
    (b"Received: x\r\n" * 100 + b".\r\n", HOP554),
])
def test_row38_databytes(body, reply):
    h = Harness(settings(databytes=10))
    assert message_after_354(h, body) == reply
    q = h.queue.last
    if reply == DONE:
        assert q.message == RCVD_F + b"123456789\n"
        assert q.envelope is not None
    else:
        assert q.aborted
    assert h.state == COMMAND


def test_row39_databytes_zero_is_unlimited():
    h = Harness(settings(databytes=0))
    assert message_after_354(h, b"123456789\r\n" * 1000 + b".\r\n") == DONE


def test_queue_reply_is_passed_through():
    h = Harness(queue_reply=b"451 qq temporary problem (#4.3.0)")
    assert txn(h) == OK + OK + GO + r(b"451 qq temporary problem (#4.3.0)")
    assert h.state == COMMAND


def test_queue_start_failure():
    # §2.6, §6.1 step 3: 451 qqt failure, no 354, the transaction already closed
    h = Harness(queue_fail=True)
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@example.org>", b"DATA") == OK + OK + QQT451
    assert h.state == COMMAND
    assert h.queue.attempts == 1
    assert h.cmd(b"DATA") == MF503
    assert h.cmd(b"NOOP") == OK


def test_queue_gets_current_env():
    env = {b"PATH": b"/bin", b"QMAILQUEUE": b"bin/rec"}
    h = Harness(env=env)
    h.cmd(b"HELO x")
    txn(h)
    qenv = h.queue.last.env
    assert qenv[b"QMAILQUEUE"] == b"bin/rec"
    assert qenv[b"SMTPHELOHOST"] == b"x"


def test_null_sender_envelope():
    h = Harness()
    txn(h, sender=b"")
    assert h.queue.last.envelope == b"F\0Tx@example.org\0\0"


def test_abort_mid_message():
    # EOF or timeout in DATA (§6.2, §7): nothing is queued
    h = Harness()
    assert message_after_354(h, b"a\r\nb") == b""
    h.session.abort()
    assert h.queue.last.aborted
    assert h.queue.last.finish_calls == 1


def test_abort_outside_data_is_harmless():
    h = Harness()
    h.session.abort()
    assert h.queue.attempts == 0


# -- pipelining and chunking (§4.2, row 13) -------------------------------------

def test_leftover_after_message_not_consumed():
    h = Harness()
    message_after_354(h, b"")
    s = h.session
    buf = b"hi\r\n.\r\nNOOP\r\nQUIT\r\n"
    assert s.data(buf) == len(b"hi\r\n.\r\n")
    assert s.state == COMMAND
    assert h.take() == DONE


def test_leftover_after_empty_message():
    h = Harness()
    message_after_354(h, b"")
    assert h.session.data(b".\r\nMAIL FROM:<a@b>\r\n") == 3
    assert h.session.state == COMMAND


def test_leftover_after_message_split_end():
    h = Harness()
    message_after_354(h, b"")
    s = h.session
    assert s.data(b"hi\r") == 3
    assert s.data(b"\n.") == 2
    assert s.state == DATA
    assert s.data(b"\r\nRSET\r\n") == 2
    assert s.state == COMMAND
    assert h.take() == DONE
    assert h.queue.last.message == RCVD_F + b"hi\n"


def test_leftover_after_hop_abort_and_bare_lf():
    h = Harness()
    message_after_354(h, b"")
    body = b"Received: x\r\n" * 100 + b".\r\n"
    assert h.session.data(body + b"NOOP\r\n") == len(body)
    assert h.take() == HOP554


DIALOGUE = [
    b"HELO x\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"RCPT TO:<x@example.org>\r\n",
    b"DATA\r\n",
    b"Received: 1\r\nSubject: a\r\n\r\n..dot\r\n.\rx\r\na\rb\r\r\n\r\n.\r\n",
    b"MAIL FROM:<c@d>\r\n",
    b"RCPT TO:<y@example.org>\r\n",
    b"RCPT TO:<z@far.away>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
]
DIALOGUE_REPLIES = (F_HELO + OK + OK + GO + DONE + OK + OK + RH553 + GO + DONE + OK
                    + r(b"221 mx.example.org"))
DIALOGUE_QUEUED = [
    (RCVD_F.replace(b"com (", b"com (HELO x) (")
     + b"Received: 1\nSubject: a\n\n.dot\n.\rx\na\rb\r\n\n", b"Fa@b\0Tx@example.org\0\0"),
    (RCVD_F.replace(b"com (", b"com (HELO x) ("), b"Fc@d\0Ty@example.org\0\0"),
]


def _run_dialogue(pieces):
    h = Harness()
    out = b"".join(h.feed(p) for p in pieces)
    return out, [(q.message, q.envelope) for q in h.queue.queues], h


def test_row13_dialogue_line_by_line():
    out, queued, h = _run_dialogue(DIALOGUE)
    assert out == DIALOGUE_REPLIES
    assert queued == DIALOGUE_QUEUED
    assert (h.state, h.exit_status) == (CLOSED, 0)


def test_row13_dialogue_in_one_write():
    out, queued, h = _run_dialogue([b"".join(DIALOGUE)])
    assert out == DIALOGUE_REPLIES
    assert queued == DIALOGUE_QUEUED
    assert (h.state, h.exit_status) == (CLOSED, 0)


def test_row13_dialogue_in_chunks_of_every_size():
    whole = b"".join(DIALOGUE)
    for size in range(1, len(whole) + 1):
        pieces = [whole[i:i + size] for i in range(0, len(whole), size)]
        out, queued, h = _run_dialogue(pieces)
        assert out == DIALOGUE_REPLIES, size
        assert queued == DIALOGUE_QUEUED, size
        assert h.state == CLOSED, size


CHUNK_BODY = (b"Received: x\r\nDelivered-To: y\r\nSubject: s\r\n\r\n..a\r\n.\rb\r\n"
              b"c\rd\r\r\n...\r\n. x\r\n\r\n\x00\xff\r\nlong" + b"z" * 40 + b"\r\n"
              b"Received: body\r\nr\r\n.\r\n")
CHUNK_STORED = (b"Received: x\nDelivered-To: y\nSubject: s\n\n.a\n.\rb\nc\rd\r\n..\n x\n\n"
                b"\x00\xff\nlong" + b"z" * 40 + b"\nReceived: body\nr\n")


@pytest.mark.parametrize("body, databytes, reply, stored", [
    (CHUNK_BODY, 0, DONE, CHUNK_STORED),
    (CHUNK_BODY, len(CHUNK_STORED), DONE, CHUNK_STORED),
    (CHUNK_BODY, len(CHUNK_STORED) - 1, SIZE552, None),
    (b"Received: x\r\n" * 100 + b"\r\nbody\r\n.\r\n", 0, HOP554, None),
    (b"Received: x\r\n" * 99 + b"\r\n" + b"Received: x\r\n" * 5 + b".\r\n", 0, DONE,
     b"Received: x\n" * 99 + b"\n" + b"Received: x\n" * 5),
], ids=["mixed", "at-databytes", "over-databytes", "100-hops", "99-hops-then-body"])
def test_data_in_chunks_of_every_size(body, databytes, reply, stored):
    tail = b"NOOP\r\n"
    stream = body + tail
    sizes = range(1, len(stream) + 1)
    if len(stream) > 400:
        # the 1.4 KB hop messages: every small size, then a sample, to stay fast
        sizes = list(range(1, 80)) + list(range(80, len(stream) + 1, 17)) + [len(stream)]
    for size in sizes:
        h = Harness(settings(databytes=databytes))
        message_after_354(h, b"")
        s = h.session
        used = 0
        pos = 0
        while s.state == DATA:
            chunk = stream[pos:pos + size]
            assert chunk, size
            n = s.data(chunk)
            pos += len(chunk)
            used += n
            if s.state == DATA:
                assert n == len(chunk), size
        assert used == len(body), size
        assert h.take() == reply, size
        q = h.queue.last
        if stored is None:
            assert q.aborted, size
        else:
            assert q.message == RCVD_F + stored, size
            assert q.envelope == b"Fa@b\0Tx@example.org\0\0", size


def test_data_bare_lf_in_chunks_of_every_size():
    stream = b"ok\r\nline\r\nbad\nmore\r\n.\r\n"
    for size in range(1, len(stream) + 1):
        h = Harness()
        message_after_354(h, b"")
        s = h.session
        pos = 0
        while s.state == DATA:
            s.data(stream[pos:pos + size])
            pos += size
        assert h.take() == LF451, size
        assert (s.state, s.exit_status) == (CLOSED, 1), size
        assert h.queue.last.aborted, size


# =============================================================================
# spp hooks with plugins off (spp.md §3.1, §3.2)
# =============================================================================

def test_plugins_off_environment():
    h = Harness()
    h.cmd(b"HELO  h ")
    h.cmd(b"MAIL FROM:<a@b>")
    h.cmd(b"RCPT TO:<x@example.org>")
    h.cmd(b"RCPT TO:<y@far.example>")
    env = h.env
    assert env[b"SMTPHELOHOST"] == b"h "
    assert b"SMTPMAILFROM" not in env
    assert b"SMTPRCPTTO" not in env
    assert env[b"SMTPRCPTCOUNT"] == b"1"
    assert env[b"SMTPRCPTCOUNTALL"] == b"2"
    assert env[b"SMTPRCPTHOSTSOK"] == b"0"


def test_plugins_off_runner_never_called():
    h = Harness(sections=None)
    txn(h)
    assert h.runner.calls == []


# =============================================================================
# spp.md §7 examples through a fake runner
# =============================================================================

# fixture of spp.md §7
SPP_G = b"test.example"
SPP_GREETING = r(b"220 test.example ESMTP")
SPP_HELO = r(b"250 test.example")
SPP_BODY = b"Subject: t\r\n\r\nbody\r\n.\r\n"
SPP_DATA = b"Subject: t\n\nbody\n"
RCVD = (b"Received: from client.example (HELO h) (192.0.2.1)\n"
        b"  by 127.0.0.1 with SMTP; " + DATE + b"\n")
TXN_OK = OK + OK + GO + DONE


def spp(sections, programs, env=None, **kw):
    return Harness(spp_settings(**kw), env=env, sections=sections, programs=programs)


def spp_txn(h, sender=b"a@b.example", rcpt=b"x@example.com"):
    return (h.cmd(b"MAIL FROM:<" + sender + b">") + h.cmd(b"RCPT TO:<" + rcpt + b">")
            + h.cmd(b"DATA") + h.feed(SPP_BODY))


def failure(entry, what):
    return r(b"451 qmail-spp failure: " + entry + b": " + what + b" (#4.3.0)")


# -- 7.1 connection and helo ----------------------------------------------------------

def test_spp9_connection_refused_no_greeting():
    h = spp({"connection": [b":c"]}, {b":c": echo(b"E554 no greeting")})
    assert h.greeting == r(b"554 no greeting")
    assert h.state == COMMAND
    assert h.cmd(b"HELO h") == SPP_HELO
    assert h.cmd(b"QUIT") == r(b"221 test.example")
    assert (h.state, h.exit_status) == (CLOSED, 0)


def test_spp10_connection_p_lines_then_n():
    h = spp({"connection": [b":c"]}, {b":c": echo(b"P220-welcome\nN\n")})
    assert h.greeting == r(b"220-welcome") + SPP_GREETING


def test_spp10_connection_r_closes():
    h = spp({"connection": [b":c"]}, {b":c": echo(b"R421 go away\n")})
    assert h.greeting == r(b"421 go away")
    assert (h.state, h.exit_status) == (CLOSED, 0)
    assert h.queue.attempts == 0


def test_connection_d_closes_silently():
    h = spp({"connection": [b":c"]}, {b":c": echo(b"P220-bye\nD\n")})
    assert h.greeting == r(b"220-bye")
    assert (h.state, h.exit_status) == (CLOSED, 0)


def test_spp11_connection_failure():
    h = spp({"connection": [b":exit 120"]}, {b":exit 120": echo((b"", b"can't execute"))})
    assert h.greeting == failure(b":exit 120", b"can't execute")
    assert h.state == COMMAND
    assert h.cmd(b"HELO h") == SPP_HELO


def test_spp12_refused_helo_keeps_old_name():
    def helo(env):
        return b"E550 nope\n" if env[b"SMTPHELOHOST"] == b"bad" else b""

    h = spp({"helo": [b":h"], "mail": [b":m"]},
            {b":h": helo, b":m": lambda env: b"HX-Helo: " + env[b"SMTPHELOHOST"] + b"\n"})
    assert h.cmd(b"HELO good") == SPP_HELO
    assert h.cmd(b"HELO bad") == r(b"550 nope")
    assert h.env[b"SMTPHELOHOST"] == b"bad"
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.message == (RCVD.replace(b"(HELO h)", b"(HELO good)")
                                    + b"X-Helo: bad\n" + SPP_DATA)


def test_refused_helo_keeps_transaction():
    h = spp({"helo": [b":h"]}, {b":h": echo(b"E550 no helo")})
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>") == OK + OK
    assert h.cmd(b"EHLO x") == r(b"550 no helo")
    assert h.cmd(b"DATA") == GO
    assert h.feed(b".\r\n") == DONE
    assert h.queue.last.envelope == b"Fa@b.example\0Tx@example.com\0\0"
    assert h.queue.last.message.startswith(b"Received: from client.example (192.0.2.1)\n")


def test_helo_hook_sees_argument_before_reply():
    seen = []
    h = spp({"helo": [b":h"]}, {b":h": lambda env: seen.append(env[b"SMTPHELOHOST"]) or b""})
    assert h.cmd(b"EHLO   name  ") == r(b"250-test.example", b"250-PIPELINING",
                                           b"250 8BITMIME")
    assert seen == [b"name  "]


def test_helo_r_closes_with_exit_0():
    h = spp({"helo": [b":h"]}, {b":h": echo(b"R421 closing\n")})
    assert h.cmd(b"HELO h") == r(b"421 closing")
    assert (h.state, h.exit_status) == (CLOSED, 0)


# -- 7.2 environment and counters ---------------------------------------------------

def test_spp13_counters():
    def rcpt(env):
        return b"HX-R: %s %s %s %s\n" % (env[b"SMTPRCPTTO"], env[b"SMTPRCPTCOUNT"],
                                        env[b"SMTPRCPTCOUNTALL"], env[b"SMTPRCPTHOSTSOK"])

    def data(env):
        return b"HX-D: %s %s\n" % (env[b"SMTPRCPTCOUNT"], env[b"SMTPRCPTCOUNTALL"])

    h = spp({"rcpt": [b":r"], "data": [b":d"]}, {b":r": rcpt, b":d": data})
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"RCPT TO:<y@other.example>") == RH553
    assert h.cmd(b"RCPT TO:<z@example.com>") == OK
    assert h.cmd(b"DATA") == GO
    assert h.feed(SPP_BODY) == DONE
    q = h.queue.last
    assert q.message == (RCVD + b"X-R: x@example.com 0 1 1\nX-R: y@other.example 1 2 0\n"
                         b"X-R: z@example.com 1 3 1\nX-D: 2 3\n" + SPP_DATA)
    assert q.envelope == b"Fa@b.example\0Tx@example.com\0Tz@example.com\0\0"
    # the queue sees the accepted total too (Δ9); the reset after 354 leaves the
    # variables alone (§3.3)
    assert q.env[b"SMTPRCPTCOUNT"] == b"2"
    assert h.env[b"SMTPRCPTCOUNT"] == b"2"
    assert h.env[b"SMTPRCPTCOUNTALL"] == b"3"
    # counters start again after the 354
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<w@example.com>") == OK
    assert h.runner.envs[-1][b"SMTPRCPTCOUNT"] == b"0"
    assert h.runner.envs[-1][b"SMTPRCPTCOUNTALL"] == b"1"


def test_counters_not_counted_before_the_hook_and_reset():
    h = spp({"rcpt": [b":r"]}, {b":r": echo(b"")},
            badmailfrom=control.Badmailfrom([b"bad@spam.example"]))
    h.cmd(b"RCPT TO:<x@example.com>")                                # 503: not counted
    h.cmd(b"MAIL FROM:<a@b.example>")
    h.cmd(b"RCPT TO:<" + b"a" * 900 + b">")                          # 555: not counted
    h.cmd(b"RCPT TO:<x@example.com>")
    assert h.runner.envs[-1][b"SMTPRCPTCOUNTALL"] == b"1"
    h.cmd(b"RCPT TO:<x@example.com>")
    assert h.runner.envs[-1][b"SMTPRCPTCOUNT"] == b"1"
    assert h.runner.envs[-1][b"SMTPRCPTCOUNTALL"] == b"2"
    assert h.cmd(b"RSET") == FLUSHED
    h.cmd(b"MAIL FROM:<a@b.example>")
    h.cmd(b"RCPT TO:<x@example.com>")
    assert h.runner.envs[-1][b"SMTPRCPTCOUNT"] == b"0"
    assert h.runner.envs[-1][b"SMTPRCPTCOUNTALL"] == b"1"
    # a flagged sender's RCPT never reaches the hook
    h.cmd(b"MAIL FROM:<bad@spam.example>")
    n = len(h.runner.calls)
    assert h.cmd(b"RCPT TO:<x@example.com>") == BMF553
    assert len(h.runner.calls) == n


def test_spp14_null_sender_and_parsed_recipient():
    h = spp({"mail": [b":m"], "rcpt": [b":r"]},
            {b":m": lambda env: b"HX-F: [" + env.get(b"SMTPMAILFROM", b"unset") + b"]\n",
             b":r": lambda env: b"HX-T: " + env[b"SMTPRCPTTO"] + b"\n"})
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<>") == OK
    assert h.cmd(b'RCPT TO:<@r.example:"john doe"@example.com>') == OK
    assert h.cmd(b"DATA") == GO
    assert h.feed(SPP_BODY) == DONE
    q = h.queue.last
    assert q.message == RCVD + b"X-F: []\nX-T: john doe@example.com\n" + SPP_DATA
    assert q.envelope == b"F\0Tjohn doe@example.com\0\0"


def test_spp15_set_and_unset():
    def show(env):
        return b"HX-E: A=%s B=%s C=%s\n" % (env[b"A"], env.get(b"B", b"unset"), env[b"C"])

    h = spp({"helo": [b":s", b":e"], "mail": [b":a"]},
            {b":s": echo(b"SA=1\nSA=3\nSB=2\nUB\nSNOEQ\nS\nSC=x=y\nS=empty\n"),
             b":e": show,
             b":a": lambda env: b"HX-A: " + env[b"A"] + b"\n"})
    assert h.cmd(b"HELO h") == SPP_HELO
    assert spp_txn(h) == TXN_OK
    assert h.cmd(b"RSET") == FLUSHED
    assert spp_txn(h) == TXN_OK
    m1, m2 = h.queue.queues
    assert m1.message == RCVD + b"X-E: A=3 B=unset C=x=y\nX-A: 3\n" + SPP_DATA
    assert m2.message == RCVD + b"X-A: 3\n" + SPP_DATA
    for q in (m1, m2):
        assert q.env[b"A"] == b"3"
        assert q.env[b"C"] == b"x=y"
        assert b"B" not in q.env
        assert b"NOEQ" not in q.env
        assert b"" not in q.env
        assert not any(k.startswith(b"=") or b"=" in k for k in q.env)


def test_spp16_srelayclient_grants_no_relay():
    h = spp({"mail": [b":m"]}, {b":m": echo(b"SRELAYCLIENT=\n")})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<r@far.example>") == RH553
    assert h.env[b"RELAYCLIENT"] == b""


def test_urelayclient_keeps_relay_right():
    h = spp({"mail": [b":m"]}, {b":m": echo(b"URELAYCLIENT\n")},
            env={b"RELAYCLIENT": b"+s"}, relayclient=b"+s")
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<r@far.example>", b"DATA") == (
        OK + OK + GO)
    h.feed(b".\r\n")
    assert h.queue.last.envelope == b"Fa@b.example\0Tr@far.example+s\0\0"
    assert b"RELAYCLIENT" not in h.queue.last.env


def test_spp16_squeue_reaches_queue_env():
    h = spp({"mail": [b":m"]}, {b":m": echo(b"SQMAILQUEUE=bin/alt-queue\n")})
    assert spp_txn(h) == TXN_OK
    assert spp_txn(h) == TXN_OK
    assert [q.env[b"QMAILQUEUE"] for q in h.queue.queues] == [b"bin/alt-queue"] * 2


def test_unset_tcp_variable_keeps_received():
    # qspp reads TCP* once at startup; U only affects children (§3.2)
    h = spp({"helo": [b":h"]}, {b":h": echo(b"UTCPREMOTEHOST\n")},
            env={b"TCPREMOTEHOST": b"client.example"})
    h.cmd(b"HELO h")
    spp_txn(h)
    q = h.queue.last
    assert q.message.startswith(RCVD)
    assert b"TCPREMOTEHOST" not in q.env


# -- 7.3 MAIL and RCPT verdicts -----------------------------------------------------

def test_spp17_flagged_sender_rcpt_plugin_not_run():
    h = spp({"rcpt": [b":r"]}, {b":r": echo(b"E550 ran")})
    assert h.cmd(b"MAIL FROM:<bad@spam.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == BMF553
    assert h.runner.calls == []


def test_spp18_o_at_mail_clears_flag():
    def mail(env):
        return b"O\n" if env[b"SMTPMAILFROM"].startswith(b"ok-") else b""

    h = spp({"mail": [b":m"]}, {b":m": mail},
            badmailfrom=control.Badmailfrom([b"bad@spam.example", b"@spam.example"]))
    assert h.cmd(b"MAIL FROM:<bad@spam.example>") == OK
    assert h.cmd(b"MAIL FROM:<ok-1@spam.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"MAIL FROM:<p@spam.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == BMF553


@pytest.mark.parametrize("out, reply", [(b"O\n", OK), (b"N\n", RH553), (b"", RH553),
                                        (b"A\n", RH553)])
def test_spp19_o_at_rcpt_relays(out, reply):
    h = spp({"rcpt": [b":r"]}, {b":r": echo(out)})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<r@far.example>") == reply
    if reply == OK:
        assert h.cmd(b"DATA") == GO
        h.feed(b".\r\n")
        assert h.queue.last.envelope == b"Fa@b.example\0Tr@far.example\0\0"


def test_spp20_c_then_n_still_refused():
    h = spp({"rcpt": [b":r"]}, {b":r": echo(b"Cnew@example.com\nN\n")})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<redir@far.example>") == RH553
    assert h.env[b"SMTPRCPTTO"] == b"new@example.com"
    assert h.env[b"SMTPRCPTHOSTSOK"] == b"0"


def test_c_to_a_far_address_is_accepted():
    # the reverse of row 20: judged on the original, the rewrite is queued
    h = spp({"rcpt": [b":r"]}, {b":r": echo(b"Cnew@far.example\nN\n")})
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA") == (
        OK + OK + GO)
    h.feed(b".\r\n")
    assert h.queue.last.envelope == b"Fa@b.example\0Tnew@far.example\0\0"


@pytest.mark.parametrize("out, rcpt", [(b"C<br@example.com>\n", b"T<br@example.com>\0"),
                                       (b"C\n", b"T\0"),
                                       (b"Cfirst@x\nClast@y\n", b"Tlast@y\0")])
def test_spp21_c_verbatim(out, rcpt):
    h = spp({"rcpt": [b":r"]}, {b":r": echo(out)})
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<br@example.com>", b"DATA") == (
        OK + OK + GO)
    h.feed(b".\r\n")
    assert h.queue.last.envelope == b"Fa@b.example\0" + rcpt + b"\0"


@pytest.mark.parametrize("out, reply, sender", [
    (b"Cbad@spam.example\n", BMF553, None),
    (b"Cnew@b.example\n", OK, b"Fnew@b.example\0"),
])
def test_spp22_c_at_mail(out, reply, sender):
    h = spp({"mail": [b":m"]}, {b":m": echo(out)})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == reply
    if sender is not None:
        assert h.cmd(b"DATA") == GO
        h.feed(b".\r\n")
        assert h.queue.last.envelope == sender + b"Tx@example.com\0\0"


def test_spp23_c_with_relayclient_suffix():
    def rcpt(env):
        return b"HX-ok: " + env[b"SMTPRCPTHOSTSOK"] + b"\nCchanged@far.example\n"

    h = spp({"rcpt": [b":r"]}, {b":r": rcpt}, env={b"RELAYCLIENT": b"+sfx"},
            relayclient=b"+sfx")
    h.cmd(b"HELO h")
    assert spp_txn(h) == TXN_OK
    q = h.queue.last
    assert q.envelope == b"Fa@b.example\0Tchanged@far.example+sfx\0\0"
    assert q.message == RCVD + b"X-ok: 1\n" + SPP_DATA


def test_spp24_e_at_mail_keeps_previous_transaction():
    def mail(env):
        return b"E550 no\n" if env[b"SMTPMAILFROM"].startswith(b"rej@") else b""

    h = spp({"mail": [b":m"]}, {b":m": mail})
    assert h.cmd(b"MAIL FROM:<f@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"MAIL FROM:<rej@b.example>") == r(b"550 no")
    assert h.cmd(b"DATA") == GO
    assert h.feed(SPP_BODY) == DONE
    assert h.queue.last.envelope == b"Ff@b.example\0Tx@example.com\0\0"


def test_e_at_mail_keeps_badmailfrom_flag_of_previous():
    def mail(env):
        return b"E550 no\n" if env[b"SMTPMAILFROM"].startswith(b"rej@") else b""

    h = spp({"mail": [b":m"]}, {b":m": mail})
    assert h.cmd(b"MAIL FROM:<bad@spam.example>") == OK
    assert h.cmd(b"MAIL FROM:<rej@b.example>") == r(b"550 no")
    assert h.cmd(b"RCPT TO:<x@example.com>") == BMF553


def test_spp25_data_refused_twice():
    h = spp({"data": [b":d"]}, {b":d": echo(b"E451 greylisted\n")})
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>") == OK + OK
    assert h.cmd(b"DATA") == r(b"451 greylisted")
    assert h.cmd(b"DATA") == r(b"451 greylisted")
    assert h.runner.count(b":d") == 2
    assert h.queue.attempts == 0
    assert h.state == COMMAND


def test_spp26_r_at_rcpt():
    h = spp({"rcpt": [b":r"]}, {b":r": echo(b"R421 bye\n")})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"421 bye")
    assert (h.state, h.exit_status) == (CLOSED, 0)
    assert h.queue.attempts == 0


def test_spp26_p_then_d_at_mail():
    h = spp({"mail": [b":m"]}, {b":m": echo(b"P250-pending\nD\n")})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == r(b"250-pending")
    assert (h.state, h.exit_status) == (CLOSED, 0)
    assert h.queue.attempts == 0


def test_r_at_data_queues_nothing():
    h = spp({"data": [b":d"]}, {b":d": echo(b"R421 later\n")})
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>") == OK + OK
    assert h.cmd(b"DATA") == r(b"421 later")
    assert (h.state, h.exit_status) == (CLOSED, 0)
    assert h.queue.attempts == 0


def test_o_at_data_and_helo_as_n():
    h = spp({"helo": [b":o"], "data": [b":o"]}, {b":o": echo(b"O\n")})
    assert h.cmd(b"HELO h") == SPP_HELO
    assert spp_txn(h) == TXN_OK


# -- 7.4 headers and deferred errors -------------------------------------------------

def test_spp27_header_order():
    h = spp({"connection": [b":c"], "helo": [b":h"], "rcpt": [b":r"], "data": [b":d"]},
            {b":c": echo(b"HX-C: 1\n"), b":h": echo(b"HX-H: 1\n"),
             b":r": lambda env: b"HX-R: " + env[b"SMTPRCPTTO"] + b"\n",
             b":d": echo(b"HX-D: 1\n")})
    assert h.greeting == SPP_GREETING
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"RCPT TO:<y@far.example>") == RH553
    assert h.cmd(b"DATA") == GO
    assert h.feed(SPP_BODY) == DONE
    assert spp_txn(h, rcpt=b"z@example.com") == TXN_OK
    m1, m2 = h.queue.queues
    assert m1.message == (RCVD + b"X-C: 1\nX-H: 1\nX-R: x@example.com\nX-R: y@far.example\n"
                          b"X-D: 1\n" + SPP_DATA)
    assert m2.message == RCVD + b"X-R: z@example.com\nX-D: 1\n" + SPP_DATA


def test_spp28_bare_h():
    h = spp({"rcpt": [b":r"]}, {b":r": echo(b"HX-B: 1\nH\nHX-A: 2\n")})
    h.cmd(b"HELO h")
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.message == RCVD + b"X-B: 1\n\nX-A: 2\n" + SPP_DATA


def test_spp29_rset_clears_headers():
    h = spp({"helo": [b":h"]}, {b":h": echo(b"HX-H: 1\n")})
    h.cmd(b"HELO h")
    assert h.cmd(b"RSET") == FLUSHED
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.message == RCVD + SPP_DATA


def test_headers_from_refused_commands_kept():
    def rcpt(env):
        if env[b"SMTPRCPTTO"].startswith(b"no@"):
            return b"HX-No: 1\nE550 no\n"
        return b""

    h = spp({"rcpt": [b":r"]}, {b":r": rcpt})
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<no@example.com>") == r(b"550 no")
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"DATA") == GO
    assert h.feed(SPP_BODY) == DONE
    assert h.queue.last.message == RCVD + b"X-No: 1\n" + SPP_DATA
    assert h.queue.last.envelope == b"Fa@b.example\0Tx@example.com\0\0"


def test_headers_not_counted_as_hops_or_databytes():
    h = spp({"data": [b":d"]}, {b":d": echo(b"HReceived: x\n" * 150)}, databytes=10)
    h.cmd(b"HELO h")
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA") == (
        OK + OK + GO)
    assert h.feed(b"123456789\r\n.\r\n") == DONE
    assert h.queue.last.message == RCVD + b"Received: x\n" * 150 + b"123456789\n"


def test_spp30_lm_from_helo():
    h = spp({"helo": [b":h"], "mail": [b":m"]}, {b":h": echo(b"LM451 later\n"),
                                                 b":m": echo(b"")})
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<a@b.example>") == r(b"451 later")
    assert h.cmd(b"MAIL FROM:<a@b.example>") == r(b"451 later")
    assert h.runner.count(b":m") == 0
    assert h.cmd(b"RSET") == FLUSHED
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.runner.count(b":m") == 1


def test_spp31_lr_from_mail():
    h = spp({"mail": [b":m"]}, {b":m": echo(b"LR550 later\n")})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"550 later")
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"550 later")
    assert h.cmd(b"DATA") == RF503


def test_spp32_ld_multiline():
    h = spp({"mail": [b":m"]}, {b":m": echo(b"LD452-first\nLD452 second\n")})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"DATA") == r(b"452-first", b"452 second")
    assert h.cmd(b"DATA") == r(b"452-first", b"452 second")
    assert h.cmd(b"RSET") == FLUSHED
    assert h.cmd(b"DATA") == MF503


def test_spp33_lr_accumulates_until_shown():
    h = spp({"helo": [b":h"]},
            {b":h": lambda env: b"LR550 first " + env[b"SMTPHELOHOST"] + b"\n"})
    h.cmd(b"HELO one")
    h.cmd(b"HELO two")
    h.cmd(b"MAIL FROM:<a@b.example>")
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"550 first one", b"550 first two")


def test_spp33_lr_discarded_after_shown():
    h = spp({"helo": [b":h"]},
            {b":h": lambda env: b"LR550 first " + env[b"SMTPHELOHOST"] + b"\n"})
    h.cmd(b"HELO one")
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"550 first one")
    assert h.cmd(b"HELO two") == SPP_HELO
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"550 first one")


def test_spp34_bare_lm():
    h = spp({"helo": [b":h"]}, {b":h": echo(b"LM\n")})
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<a@b.example>") == b"\r\n"


def test_spp34_a_then_pending_lr_fires():
    h = spp({"helo": [b":h"], "rcpt": [b":r"]},
            {b":h": echo(b"LR550 deferred\nA\n"), b":r": echo(b"E550 not run")})
    assert h.cmd(b"HELO h") == SPP_HELO
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"550 deferred")
    assert h.runner.calls == [b":h"]


def test_spp35_a_turns_plugins_off():
    h = spp({"helo": [b":h"], "mail": [b":e"], "rcpt": [b":e"], "data": [b":e"]},
            {b":h": echo(b"HX-h: 1\nA\n"), b":e": echo(b"E550 no\n")})
    assert h.cmd(b"HELO h") == SPP_HELO
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<y@far.example>") == RH553
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"DATA") == GO
    assert h.feed(SPP_BODY) == DONE
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"HELO h") == SPP_HELO
    assert h.runner.calls == [b":h"]
    assert h.queue.last.message == RCVD + b"X-h: 1\n" + SPP_DATA


def test_a_with_failure_after_still_turns_off():
    h = spp({"helo": [b":h"], "mail": [b":e"]},
            {b":h": echo((b"A\n", b"timeout")), b":e": echo(b"E550 no\n")})
    assert h.cmd(b"HELO h") == SPP_HELO
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.runner.calls == [b":h"]


def test_deferred_errors_cleared_after_354():
    h = spp({"data": [b":d"]}, {b":d": echo(b"LM451 m\nLR451 r\nLD451 d\nN\n")})
    assert spp_txn(h) == TXN_OK
    # the 354's spp reset wiped what [data] queued
    assert h.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK


def test_deferred_errors_from_connection_cleared_by_rset():
    h = spp({"connection": [b":c"]}, {b":c": echo(b"LR553 go away\nLD554 no data\n")})
    h.cmd(b"MAIL FROM:<a@b.example>")
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"553 go away")
    assert h.cmd(b"RSET") == FLUSHED
    h.cmd(b"MAIL FROM:<a@b.example>")
    assert h.cmd(b"RCPT TO:<x@example.com>") == OK
    assert h.cmd(b"DATA") == GO


def test_ld_kept_when_data_refused():
    def data(env):
        return b"LD451 second try\nE451 first try\n"

    h = spp({"data": [b":d"]}, {b":d": data})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>")
    assert h.cmd(b"DATA") == r(b"451 first try")
    assert h.cmd(b"DATA") == r(b"451 second try")
    assert h.runner.count(b":d") == 1


def test_pending_queue_check_with_plugins_off_by_a():
    h = spp({"connection": [b":c"]}, {b":c": echo(b"LD452 full\nA\n")})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>")
    assert h.cmd(b"DATA") == r(b"452 full")
    assert h.queue.attempts == 0


def test_qqt_failure_keeps_spp_state():
    # spp.md §5.3: `451 qqt failure` keeps headers and queues
    h = spp({"helo": [b":h"]}, {b":h": echo(b"HX-H: 1\n")})
    h.queue.fail = True
    h.cmd(b"HELO h")
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA") == (
        OK + OK + QQT451)
    h.queue.fail = False
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.message == RCVD + b"X-H: 1\n" + SPP_DATA


# -- 7.5 output parsing and failures ------------------------------------------------

def test_spp36_ignored_lines():
    h = spp({"helo": [b":h"]}, {b":h": echo(b"X\n\n e\nn\nN\nE550 x\n")})
    assert h.cmd(b"HELO h") == SPP_HELO


def test_spp37_e_then_exit_1():
    h = spp({"helo": [b":h"]}, {b":h": echo(b"E550 via exit1\n")})
    assert h.cmd(b"HELO h") == r(b"550 via exit1")


def test_spp38_crash_without_terminator():
    entry = b":kill -SEGV $$"
    h = spp({"helo": [entry, b":echo E550 second"]},
            {entry: echo((b"", b"child crashed")), b":echo E550 second": echo(b"E550 second")})
    assert h.cmd(b"HELO h") == failure(entry, b"child crashed")
    assert h.runner.calls == [entry]


def test_spp39_failure_after_e_keeps_e_text():
    entry = b":echo E550 bye; kill -KILL $$"
    h = spp({"helo": [entry]}, {entry: echo((b"E550 bye\n", b"child crashed"))})
    assert h.cmd(b"HELO h") == r(b"550 bye")


def test_spp41_timeout_failure():
    h = spp({"helo": [b":sleep 5"]}, {b":sleep 5": echo((b"", b"timeout"))})
    assert h.cmd(b"HELO h") == failure(b":sleep 5", b"timeout")
    assert h.cmd(b"NOOP") == OK


def test_spp42_n_then_timeout():
    entry = b":(sleep 30) & echo N"
    h = spp({"helo": [entry]}, {entry: echo((b"N\n", b"timeout"))})
    assert h.cmd(b"HELO h") == SPP_HELO


@pytest.mark.parametrize("entry, out, reply", [
    (b":printf '%070000d\\n' 0", b"", None),
    (b":yes X", b"X\nX\nX\n", None),
    (b":yes N", b"N\n", SPP_HELO),
])
def test_spp43_output_too_long(entry, out, reply):
    h = spp({"helo": [entry]}, {entry: echo((out, b"output too long"))})
    expected = failure(entry, b"output too long") if reply is None else reply
    assert h.cmd(b"HELO h") == expected


def test_r_then_failure_still_closes():
    h = spp({"helo": [b":h"]}, {b":h": echo((b"R421 bye\n", b"child crashed"))})
    assert h.cmd(b"HELO h") == r(b"421 bye")
    assert (h.state, h.exit_status) == (CLOSED, 0)


def test_o_then_failure_still_overrides():
    h = spp({"rcpt": [b":r"]}, {b":r": echo((b"O\n", b"timeout"))})
    h.cmd(b"MAIL FROM:<a@b.example>")
    assert h.cmd(b"RCPT TO:<r@far.example>") == OK


def test_p_lines_precede_final_line():
    h = spp({"mail": [b":p"], "rcpt": [b":e"], "data": [b":f"]},
            {b":p": echo(b"P250-one\nP250-two\n"),
             b":e": echo(b"P550-why\nE550 no\n"),
             b":f": echo((b"P451-x\n", b"can't execute"))})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == r(b"250-one", b"250-two", b"250 ok")
    assert h.cmd(b"RCPT TO:<x@example.com>") == r(b"550-why", b"550 no")
    # P lines also precede qmail's own refusal
    h2 = spp({"rcpt": [b":p"]}, {b":p": echo(b"P553-note\n")})
    h2.cmd(b"MAIL FROM:<a@b.example>")
    assert h2.cmd(b"RCPT TO:<y@far.example>") == r(b"553-note") + RH553
    # and a failure line
    h3 = spp({"rcpt": [b":f"]}, {b":f": echo((b"P451-x\n", b"can't execute"))})
    h3.cmd(b"MAIL FROM:<a@b.example>")
    assert h3.cmd(b"RCPT TO:<x@example.com>") == r(b"451-x") + failure(b":f", b"can't execute")


def test_failure_at_each_phase_refuses():
    fail = echo((b"", b"can't execute"))
    h = spp({"mail": [b":m"]}, {b":m": fail})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == failure(b":m", b"can't execute")
    assert h.cmd(b"RCPT TO:<x@example.com>") == MF503

    h = spp({"rcpt": [b":r"]}, {b":r": fail})
    h.cmd(b"MAIL FROM:<a@b.example>")
    assert h.cmd(b"RCPT TO:<x@example.com>") == failure(b":r", b"can't execute")
    assert h.cmd(b"DATA") == RF503

    h = spp({"data": [b":d"]}, {b":d": fail})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>")
    assert h.cmd(b"DATA") == failure(b":d", b"can't execute")
    assert h.queue.attempts == 0
    # the transaction is kept: DATA may be retried
    h.engine.sections["data"] = []
    assert h.cmd(b"DATA") == GO


def test_section_stops_at_first_terminator():
    h = spp({"helo": [b":a", b":b", b":c"]},
            {b":a": echo(b"HX-1: a\n"), b":b": echo(b"N\n"), b":c": echo(b"E550 c\n")})
    assert h.cmd(b"HELO h") == SPP_HELO
    assert h.runner.calls == [b":a", b":b"]


def test_runner_arguments():
    h = Harness(spp_settings(), sections={"helo": [b":h"]}, programs={b":h": echo(b"")},
                spp_timeout=7)
    h.cmd(b"HELO h")
    assert h.runner.timeouts == [7]
    assert h.runner.stdin == [None]
    assert h.runner.envs[0][b"SMTPHELOHOST"] == b"h"


def test_mail_and_rcpt_env_after_c_in_refused_command():
    h = spp({"mail": [b":m"]}, {b":m": echo(b"Cother@b.example\nE550 no\n")})
    assert h.cmd(b"MAIL FROM:<a@b.example>") == r(b"550 no")
    assert h.env[b"SMTPMAILFROM"] == b"other@b.example"
    assert h.cmd(b"RCPT TO:<x@example.com>") == MF503


def test_c_ignored_outside_mail_and_rcpt():
    h = spp({"helo": [b":c"], "data": [b":c"]}, {b":c": echo(b"Cnobody@x\n")})
    h.cmd(b"HELO h")
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.envelope == b"Fa@b.example\0Tx@example.com\0\0"
    assert h.env[b"SMTPMAILFROM"] == b"a@b.example"
    assert h.env[b"SMTPRCPTTO"] == b"x@example.com"


def test_empty_e_text_is_bare_crlf():
    h = spp({"helo": [b":h"]}, {b":h": echo(b"E\n")})
    assert h.cmd(b"HELO h") == b"\r\n"


def test_s_in_data_hook_reaches_this_queue():
    h = spp({"data": [b":d"]}, {b":d": echo(b"SX_DATA=1\n")})
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.env[b"X_DATA"] == b"1"


def test_after_a_mail_and_rcpt_variables_not_exported():
    h = spp({"connection": [b":c"]}, {b":c": echo(b"A\n")})
    h.cmd(b"MAIL FROM:<a@b.example>")
    h.cmd(b"RCPT TO:<x@example.com>")
    assert b"SMTPMAILFROM" not in h.env
    assert b"SMTPRCPTTO" not in h.env
    assert h.env[b"SMTPRCPTCOUNT"] == b"1"      # counters: plugins off too
    assert h.env[b"SMTPRCPTCOUNTALL"] == b"1"


@pytest.mark.parametrize("queued, dialogue, replies", [
    # qmail's checks before the hook come before the pending-queue check (§3.1)
    (b"LM451 m\n", [b"MAIL FROM:<" + b"a" * 900 + b">"], SYN555),
    (b"LR451 r\n", [b"RCPT TO:<x@example.com>"], MF503),
    (b"LR451 r\n", [b"MAIL FROM:<bad@spam.example>", b"RCPT TO:<x@example.com>"],
     OK + BMF553),
    (b"LR451 r\n", [b"MAIL FROM:<a@b.example>", b"RCPT TO:<" + b"a" * 900 + b">"],
     OK + SYN555),
    (b"LD451 d\n", [b"DATA"], MF503),
    (b"LD451 d\n", [b"MAIL FROM:<a@b.example>", b"DATA"], OK + RF503),
], ids=["555-before-LM", "503-before-LR", "bmf-before-LR", "555-before-LR",
        "mail-first-before-LD", "rcpt-first-before-LD"])
def test_pending_check_after_qmail_checks(queued, dialogue, replies):
    h = spp({"connection": [b":c"]}, {b":c": echo(queued)})
    assert h.cmds(*dialogue) == replies


def test_counters_reset_by_mail_refused_at_hook():
    def mail(env):
        return b"E550 no\n" if env[b"SMTPMAILFROM"].startswith(b"rej@") else b""

    h = spp({"mail": [b":m"], "rcpt": [b":r"]}, {b":m": mail, b":r": echo(b"")})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"RCPT TO:<y@example.com>")
    assert h.cmd(b"MAIL FROM:<rej@b.example>") == r(b"550 no")
    # the variables keep their values until the next RCPT ...
    assert h.env[b"SMTPRCPTCOUNT"] == b"2"
    assert h.env[b"SMTPRCPTCOUNTALL"] == b"2"
    # ... which sees counters reset by the MAIL that reached the hook (§3.3)
    assert h.cmd(b"RCPT TO:<z@example.com>") == OK
    assert h.runner.envs[-1][b"SMTPRCPTCOUNT"] == b"0"
    assert h.runner.envs[-1][b"SMTPRCPTCOUNTALL"] == b"1"
    assert h.cmd(b"DATA") == GO
    h.feed(b".\r\n")
    assert h.queue.last.envelope == (b"Fa@b.example\0Tx@example.com\0Ty@example.com\0"
                                     b"Tz@example.com\0\0")


def test_counters_kept_by_refused_data_and_helo():
    h = spp({"rcpt": [b":r"], "data": [b":d"]},
            {b":r": echo(b""), b":d": echo(b"E451 not yet\n")})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>")
    assert h.cmd(b"DATA") == r(b"451 not yet")
    h.cmd(b"RCPT TO:<y@example.com>")
    assert h.runner.envs[-1][b"SMTPRCPTCOUNT"] == b"1"
    assert h.runner.envs[-1][b"SMTPRCPTCOUNTALL"] == b"2"


def test_localiphost_rewrite_before_length_check():
    # §5.1 steps 4-5: the rewritten address is what must be <= 899 bytes
    h = Harness(settings(localiphost=b"h", rcpthosts=control.Rcpthosts(None)))
    long_literal = b"a" * 888 + b"@[127.0.0.1]"        # 900 bytes as sent
    assert h.cmd(b"MAIL FROM:<" + long_literal + b">") == OK
    h2 = Harness(settings(localiphost=b"h" * 898, rcpthosts=control.Rcpthosts(None)))
    assert h2.cmd(b"MAIL FROM:<x@[127.0.0.1]>") == SYN555   # 900 bytes after it
    h3 = Harness(settings(localiphost=b"h" * 897, rcpthosts=control.Rcpthosts(None)))
    assert h3.cmd(b"MAIL FROM:<x@[127.0.0.1]>") == OK        # 899 bytes after it
    h.cmds(b"RCPT TO:<y@[127.0.0.1]>", b"DATA")
    h.feed(b".\r\n")
    assert h.queue.last.envelope == b"F" + b"a" * 888 + b"@h\0Ty@h\0\0"


# -- 7.6 and §6.1: [body] -------------------------------------------------------------

def stdin_text(stdin_fd):
    return os.pread(stdin_fd, 1 << 20, 0)


def test_spp44_body_refuses_spam():
    def body(env, stdin_fd):
        return b"E554 spam\n" if b"\nSubject: spam" in stdin_text(stdin_fd) else b""

    h = spp({"body": [b":b"]}, {b":b": fakes.with_stdin(body)})
    h.cmd(b"HELO h")
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA") == (
        OK + OK + GO)
    assert h.queue.attempts == 0          # spooled, qmail-queue not started before 354
    assert h.feed(b"Subject: spam\r\n\r\nbody\r\n.\r\n") == r(b"554 spam")
    assert h.queue.attempts == 0          # the recorder is not started
    assert h.state == COMMAND
    assert h.cmd(b"DATA") == MF503        # the transaction is over
    assert spp_txn(h) == TXN_OK
    assert h.queue.attempts == 1
    q = h.queue.last
    assert q.message == RCVD + SPP_DATA
    assert q.envelope == b"Fa@b.example\0Tx@example.com\0\0"


def test_spp45_body_sees_message_and_adds_header():
    seen = []

    def body(env, stdin_fd):
        data = stdin_text(stdin_fd)
        seen.append(data)
        return b"HX-Lines: %d\n" % data.count(b"\n")

    h = spp({"data": [b":d"], "body": [b":b"]},
            {b":d": echo(b"HX-D: 1\n"), b":b": fakes.with_stdin(body)})
    h.cmd(b"HELO h")
    assert spp_txn(h) == TXN_OK
    # stdin: Received line, the 354-time headers, the converted client data
    assert seen == [RCVD + b"X-D: 1\n" + SPP_DATA]
    assert h.queue.last.message == RCVD + b"X-D: 1\nX-Lines: 6\n" + SPP_DATA
    assert h.queue.last.envelope == b"Fa@b.example\0Tx@example.com\0\0"


def test_body_headers_not_shown_to_later_body_runs():
    seen = []

    def first(env, stdin_fd):
        seen.append(stdin_text(stdin_fd))
        return b"HX-B1: 1\n"

    def second(env, stdin_fd):
        seen.append(stdin_text(stdin_fd))
        return b"HX-B2: 2\nN\n"

    h = spp({"body": [b":1", b":2"]},
            {b":1": fakes.with_stdin(first), b":2": fakes.with_stdin(second)})
    h.cmd(b"HELO h")
    assert spp_txn(h) == TXN_OK
    assert seen == [RCVD + SPP_DATA] * 2
    assert h.queue.last.message == RCVD + b"X-B1: 1\nX-B2: 2\n" + SPP_DATA
    # a second message: the [body] headers of the first are gone
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.message == RCVD + b"X-B1: 1\nX-B2: 2\n" + SPP_DATA


@pytest.mark.parametrize("out", [b"", b"N\n", b"O\n", b"A\n", b"Cz@far.example\n"],
                         ids=["silent", "N", "O", "A", "C-ignored"])
def test_body_continue_queues(out):
    h = spp({"body": [b":b"], "mail": [b":m"]}, {b":b": echo(out), b":m": echo(b"")})
    h.cmd(b"HELO h")
    assert spp_txn(h) == TXN_OK
    assert h.queue.last.message == RCVD + SPP_DATA
    assert h.queue.last.envelope == b"Fa@b.example\0Tx@example.com\0\0"
    spp_txn(h)
    if out == b"A\n":   # A: plugins off, [body] included, and the next message streams
        assert h.runner.calls == [b":m", b":b"]
    else:
        assert h.runner.calls == [b":m", b":b"] * 2


def test_body_a_next_message_streams():
    h = spp({"body": [b":b"]}, {b":b": echo(b"A\n")})
    spp_txn(h)
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>")
    assert h.cmd(b"DATA") == GO
    assert h.queue.attempts == 2          # started before the 354 again
    assert len(h.spool.spools) == 1


@pytest.mark.parametrize("out", [b"R421 bye\n", b"P250-x\nD\n"], ids=["R", "D"])
def test_body_close(out):
    h = spp({"body": [b":b"]}, {b":b": echo(out)})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA")
    assert h.feed(SPP_BODY) == (r(b"421 bye") if out[:1] == b"R" else r(b"250-x"))
    assert (h.state, h.exit_status) == (CLOSED, 0)
    assert h.queue.attempts == 0


def test_body_failure_discards():
    h = spp({"body": [b":b"]}, {b":b": echo((b"P451-x\n", b"child crashed"))})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA")
    assert h.feed(SPP_BODY) == r(b"451-x") + failure(b":b", b"child crashed")
    assert h.queue.attempts == 0
    assert h.state == COMMAND


def test_body_p_lines_then_queue_reply():
    h = spp({"body": [b":b"]}, {b":b": echo(b"P250-checked\n")})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA")
    assert h.feed(SPP_BODY) == r(b"250-checked") + DONE


def test_body_s_reaches_this_queue_and_l_later_commands():
    h = spp({"body": [b":b"]}, {b":b": echo(b"SX_BODY=1\nLM451 later\n")})
    assert spp_txn(h)[-len(DONE):] == DONE
    assert h.queue.last.env[b"X_BODY"] == b"1"
    assert h.cmd(b"MAIL FROM:<a@b.example>") == r(b"451 later")


@pytest.mark.parametrize("body, reply", [
    (b"Received: x\r\n" * 100 + b".\r\n", HOP554),
    (b"1234567890\r\n.\r\n", SIZE552),
], ids=["hops", "databytes"])
def test_body_not_run_after_limits(body, reply):
    h = spp({"body": [b":b"]}, {b":b": echo(b"")}, databytes=10)
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA")
    assert h.feed(body) == reply
    assert h.runner.calls == []
    assert h.queue.attempts == 0


def test_body_not_run_after_bare_lf():
    h = spp({"body": [b":b"]}, {b":b": echo(b"")})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA")
    assert h.feed(b"a\nb\r\n.\r\n") == LF451
    assert (h.state, h.exit_status) == (CLOSED, 1)
    assert h.runner.calls == []
    assert h.queue.attempts == 0


def test_body_queue_start_failure_is_the_reply():
    h = spp({"body": [b":b"]}, {b":b": echo(b"")})
    h.queue.fail = True
    assert h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA") == (
        OK + OK + GO)
    assert h.feed(SPP_BODY) == QQT451
    assert h.runner.calls == [b":b"]
    assert h.state == COMMAND


def test_body_spool_failure():
    h = Harness(spp_settings(), sections={"body": [b":b"]}, programs={b":b": echo(b"")},
                spool_fail=True)
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>")
    assert h.cmd(b"DATA") == GO
    # the data is still read to its end
    assert h.session.data(SPP_BODY + b"NOOP\r\n") == len(SPP_BODY)
    assert h.take() == r(b"451 qmail-spp failure: [body]: can't spool message (#4.3.0)")
    assert h.queue.attempts == 0
    assert h.state == COMMAND


def test_body_mode_decided_at_354():
    # [data] says A: plugins are off at the 354, so the message streams
    h = spp({"data": [b":d"], "body": [b":b"]}, {b":d": echo(b"A\n"), b":b": echo(b"E554")})
    h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>")
    assert h.cmd(b"DATA") == GO
    assert h.queue.attempts == 1
    assert h.feed(SPP_BODY) == DONE
    assert h.spool.spools == []
    assert h.runner.calls == [b":d"]


def test_body_in_chunks_of_every_size():
    def body(env, stdin_fd):
        return b"HX-Size: %d\n" % len(stdin_text(stdin_fd))

    stream = CHUNK_BODY + b"NOOP\r\n"
    for size in range(1, len(stream) + 1):
        h = spp({"body": [b":b"]}, {b":b": fakes.with_stdin(body)})
        h.cmds(b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@example.com>", b"DATA")
        s = h.session
        pos = used = 0
        while s.state == DATA:
            used += s.data(stream[pos:pos + size])
            pos += size
        assert used == len(CHUNK_BODY), size
        assert h.take() == DONE, size
        rcvd = RCVD.replace(b" (HELO h)", b"")
        assert h.queue.last.message == (rcvd + b"X-Size: %d\n" % (len(rcvd) + len(CHUNK_STORED))
                                        + CHUNK_STORED), size


def test_a_finished_session_needs_no_garbage_collector():
    """Nothing of a session holds itself in a cycle: its last reference frees
    it at once, in a worker that serves the next client right after."""
    import gc
    import weakref
    from qspp.authmode import AuthMode
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for auth in (False, True):
            mode = AuthMode(b"mx.example.org", [b"/bin/true"], None) if auth else None
            h = Harness(settings(auth=mode),
                        sections={"mail": [b"m"], "rcpt": [b"r"]},
                        programs={b"m": lambda env: b"", b"r": lambda env: b"HX-Seen: yes\n"})
            h.feed(b"HELO h\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
                   b"Subject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            assert h.session.state == CLOSED
            gone = weakref.ref(h.session), weakref.ref(h.engine)
            del h
            assert [ref() for ref in gone] == [None, None]
    finally:
        if was:
            gc.enable()
