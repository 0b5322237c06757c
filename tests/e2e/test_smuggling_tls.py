"""SMTP smuggling over TLS, and AUTH across STARTTLS (qmail-smtpd.md §6.2, §8.2, §8.7;
issue 6), under the real tcpserver.

TLS changes how the bytes arrive (records, not TCP segments) but not what ends a
message: the rows of tests/e2e/test_smuggling.py that a TLS-aware smuggler would
try are sent after STARTTLS and must get exactly the replies and queue runs
they get in cleartext.  Then the AUTH rows: an AUTH given before STARTTLS, or a
STARTTLS hidden in an AUTH exchange, must not carry the relay right into the TLS
session (D8) nor turn data into commands.

The certificate and the client-side handshake are those of test_starttls.py;
expected bytes are written out from the spec.
"""

import pytest

from .test_auth import (AGAIN503, CANCEL501, EHLO_AUTH, GOOD_FD3, MF503, OK, OK235, PASS334,
                        PLAIN_GOOD, USER334, auth_mode, checkpw_runs)
from .test_smuggling import GO, OPEN, VECTORS, check_vector
from .test_starttls import (EHLO_TLS, EHLO_TLS_AUTH, READY220, TLS553, certs, esmtps,  # noqa: F401
                            handshake, received, starttls, tls)

EHLO_AFTER_TLS = b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
RF503 = b"503 RCPT first (#5.5.1)\r\n"
QUIT221 = b"221 mx.example.org\r\n"

# The rows that matter to a smuggler (bare LF and its dotted variants, a bare CR
# before the dot, pipelining after the real end, a hidden MAIL FROM:<evil@x>),
# taken by id from the cleartext table so the two can never disagree.
TLS_ROWS = ("bare LF mid line", "LF dot LF", "CRLF dot LF", "LF dot CRLF", "CR dot LF",
            "LF dot LF right after 354", "bare LF in the hidden message",
            "CRLF dot CR then commands", "CR dot CR", "NUL bytes",
            "pipelined after the dot", "empty message then pipelined",
            "bare LF after a megabyte line")
SUBSET = [v for v in VECTORS if v.id in TLS_ROWS]
assert len(SUBSET) == len(TLS_ROWS), "a row of test_smuggling.VECTORS was renamed"


def open_tls(smtpd):
    """Connect, EHLO, STARTTLS, handshake, EHLO again; returns (client, cipher)."""
    c = smtpd.connect(timeout=20)
    assert c.cmd(b"EHLO c") == EHLO_TLS
    cipher = starttls(c)
    assert c.cmd(b"EHLO c") == EHLO_AFTER_TLS
    return c, cipher


@pytest.mark.parametrize("data, replies, status, messages, aborted", SUBSET)
def test_vector_over_tls(tls, smtpd, data, replies, status, messages, aborted):
    c, cipher = open_tls(smtpd)
    check_vector(tls, c, received(b"c", proto=esmtps(cipher)), data, replies, status,
                 messages, aborted)


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_terminator_split_across_tls_records(tls, smtpd, cut):
    """Each write is its own TLS record: `\\r\\n.\\r\\n` is found across them all."""
    c, cipher = open_tls(smtpd)
    c.send(OPEN)
    c.expect(OK, OK, GO)
    data = b"a\r\n.\r\nNOOP\r\n"
    for i in range(0, len(data), cut):
        c.send(data[i:i + cut])
    run = c.queued(c.reply())
    assert run.message == received(b"c", proto=esmtps(cipher)) + b"a\n"
    assert c.reply() == OK
    assert c.cmd(b"QUIT") == QUIT221
    assert c.status() == 0


# ---------------------------------------------------------------- AUTH and STARTTLS

def test_pipelined_auth_before_tls_does_not_survive_it(tls, smtpd):
    """AUTH, MAIL and a relayed RCPT in one cleartext write; after STARTTLS the
    relay right is gone (D8) and the refusal is the TLS 553."""
    auth_mode(tls)
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS_AUTH
    c.send(b"AUTH PLAIN " + PLAIN_GOOD + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@far.away>\r\n")
    assert c.replies(3) == [OK235, OK, OK]
    cipher = starttls(c)
    assert c.cmd(b"DATA") == MF503            # the pre-TLS transaction is gone too
    assert c.cmd(b"EHLO c") == EHLO_AUTH
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == TLS553
    assert c.cmd(b"DATA") == RF503
    # what qmail-queue sees: no trace of the pre-TLS user
    run = c.txn()
    assert run.message == received(b"c", proto=esmtps(cipher)) + b"hi\n"
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    for name in (b"RELAYCLIENT", b"TCPREMOTEINFO", b"SMTPAUTHUSER", b"SMTPAUTHMETHOD"):
        assert name not in run.env, name
    assert c.cmd(b"QUIT") == QUIT221
    assert c.rest() == b""
    c.assert_clean_exit(0)
    assert [r["fd3"] for r in checkpw_runs(tls)] == [GOOD_FD3]
    tls.assert_no_new_runs()


def test_auth_and_starttls_in_one_write_with_injected_mail(tls, smtpd):
    """AUTH, STARTTLS and a relayed MAIL/RCPT in one write: the AUTH is answered,
    the injected commands after STARTTLS are dropped (§8.7), and the AUTH is
    forgotten once TLS is up."""
    auth_mode(tls)
    c = smtpd.connect()
    c.send(b"EHLO c\r\nAUTH PLAIN " + PLAIN_GOOD + b"\r\nSTARTTLS\r\n"
           b"MAIL FROM:<evil@x>\r\nRCPT TO:<x@far.away>\r\nDATA\r\nevil\r\n.\r\n")
    assert c.replies(3) == [EHLO_TLS_AUTH, OK235, READY220]
    handshake(c)
    c.silent(0.3)                             # nothing ran from the cleartext leftovers
    assert c.cmd(b"RCPT TO:<x@far.away>") == MF503
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == TLS553
    # AUTH is accepted again inside TLS, and grants the relay right there
    assert c.cmd(b"RSET") == b"250 flushed\r\n"
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == AGAIN503
    run = c.txn(rcpts=(b"RCPT TO:<x@far.away>",))
    assert run.E == b"Fa@b\0Tx@far.away\0\0"
    assert c.cmd(b"QUIT") == QUIT221
    c.assert_clean_exit(0)
    assert [r["fd3"] for r in checkpw_runs(tls)] == [GOOD_FD3, GOOD_FD3]
    tls.assert_no_new_runs()


def test_starttls_inside_an_auth_exchange_is_data(tls, smtpd):
    """`STARTTLS` is valid base64: in an AUTH LOGIN exchange it is the user name.
    No 220, no handshake; the line after it is the password."""
    auth_mode(tls)
    c = smtpd.connect()
    assert c.cmd(b"AUTH LOGIN") == USER334
    assert c.cmd(b"STARTTLS") == PASS334
    assert c.cmd(b"*") == CANCEL501
    assert c.cmd(b"NOOP") == OK               # still cleartext: a TLS client would choke
    starttls(c)
    assert c.cmd(b"NOOP") == OK
    assert c.cmd(b"QUIT") == QUIT221
    c.assert_clean_exit(0)
    assert checkpw_runs(tls) == []


def test_auth_exchange_lines_pipelined_over_tls(tls, smtpd):
    """A whole LOGIN exchange and a relayed transaction in one TLS write."""
    auth_mode(tls)
    c = smtpd.connect()
    cipher = starttls(c)
    c.send(b"EHLO c\r\nAUTH LOGIN\r\ndXNlcg==\r\nc2VjcmV0\r\nMAIL FROM:<a@b>\r\n"
           b"RCPT TO:<x@far.away>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    assert c.replies(7) == [EHLO_AUTH, USER334, PASS334, OK235, OK, OK, GO]
    run = c.queued(c.reply())
    # ESMTPA, not ESMTPS (cipher): an AUTH wins the protocol mark (§8.5, row 60)
    assert run.message == received(b"c", b"user@", b"ESMTPA") + b"hi\n"
    assert esmtps(cipher) not in run.message
    assert c.reply() == QUIT221
    assert c.rest() == b""
    c.assert_clean_exit(0)
