"""STARTTLS end to end (qmail-smtpd.md §4.5, §7, §8.7, §9.4 rows 54-60, D7, D8) under
the real tcpserver: the handshake done by hand on the harness client's socket (for
the exact-bytes rows), smtplib and swaks.

The certificate is made at test time with openssl (one per session);
control/servercert.pem is its key followed by the certificate. Expected bytes are
written out from the spec, never taken from qspp.
"""

import re
import shutil
import smtplib
import ssl
import subprocess
import time
from types import SimpleNamespace

import pytest

from .test_auth import (AGAIN503, EHLO_AUTH, EHLO_DEFAULT, GO, GOOD_FD3, MF503, OK,
                        OK235, PLAIN_GOOD, auth_mode, checkpw_runs, cram_md5, one_checkpw_run)

READY220 = b"220 ready for tls\r\n"
UN502 = b"502 unimplemented (#5.5.1)\r\n"
PARAM501 = b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
TLS553 = (b"553 sorry, that domain isn't in my list of allowed rcpthosts; "
          b"no valid cert for gatewaying (#5.7.1)\r\n")
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
CTL421 = b"421 unable to read controls (#4.3.0)\r\n"
TIMEOUT451 = b"451 timeout (#4.4.2)\r\n"
FAILED454 = re.compile(rb"454 TLS connection failed: [^\r\n]* \(#4\.3\.0\)\r\n")
MISSING454 = re.compile(rb"454 TLS missing certificate: [^\r\n]* \(#4\.3\.0\)\r\n")
CTX454 = re.compile(rb"454 TLS unable to initialize ctx: [^\r\n]* \(#4\.3\.0\)\r\n")
EHLO_TLS = b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_TLS_AUTH = (b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                 b"250-SIZE 0\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n")
QUIT221 = b"221 mx.example.org\r\n"

OPENSSL = shutil.which("openssl")


def received(helo=b"c", info=b"", proto=b"SMTP") -> bytes:
    h = b"" if helo is None else b" (HELO " + helo + b")"
    return (b"Received: from client.example.com" + h + b" (" + info + b"192.0.2.7)\n"
            b"  by 198.51.100.1 with " + proto + b"; <D>\n")


def esmtps(cipher: str) -> bytes:
    return b"ESMTPS (" + cipher.encode() + b" encrypted)"


# ---------------------------------------------------------------- certificate

@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A self-signed certificate for mx.example.org, made with openssl at test time."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("cert")
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=mx.example.org", "-days", "2",
                    "-keyout", str(d / "k"), "-out", str(d / "c")],
                   check=True, capture_output=True, timeout=60)
    key, cert = (d / "k").read_bytes(), (d / "c").read_bytes()
    (d / "servercert.pem").write_bytes(key + cert)
    return SimpleNamespace(key=key, cert=cert, pem=key + cert, certfile=str(d / "c"),
                           pemfile=str(d / "servercert.pem"))


@pytest.fixture
def tls(home, certs):
    """Fixture F plus a valid control/servercert.pem (§9.4 TLS fixture)."""
    home.control("servercert.pem", certs.pem)
    return home


def client_context(cafile=None, tls12=False):
    """A client context: trusting only CAFILE (hostname checked), or verifying nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def handshake(c, ctx=None):
    """After `220 ready for tls`: TLS on the client's socket; the cipher's OpenSSL name.
    Nothing may have arrived after the 220 before the handshake."""
    assert c.buf == b"", f"bytes after the 220 before the handshake: {c.buf!r}"
    c.sock = (ctx or client_context()).wrap_socket(c.sock, server_hostname="mx.example.org")
    return c.sock.cipher()[0]


def starttls(c, ctx=None):
    assert c.cmd(b"STARTTLS") == READY220
    return handshake(c, ctx)


def test_certificate_fixture(certs):
    """The fixture's servercert.pem works as a server chain with its key (no qspp)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.pemfile)
    assert certs.pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert b"-----BEGIN CERTIFICATE-----\n" in certs.pem
    client_context(certs.certfile)   # loads as a trust anchor


# ---------------------------------------------------------------- rows 54, 55 (D7)

def test_row54_no_certificate(home, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_DEFAULT
    assert c.cmd(b"STARTTLS") == UN502
    assert c.cmd(b"STARTTLS x") == UN502
    assert c.cmd(b"QUIT") == QUIT221
    c.assert_clean_exit(0)


def test_certificate_is_looked_up_at_each_ehlo_and_starttls(home, smtpd, certs):
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_DEFAULT
    home.control("servercert.pem", certs.pem)
    assert c.cmd(b"EHLO c") == EHLO_TLS
    home.control("servercert.pem", None)
    assert c.cmd(b"STARTTLS") == UN502
    assert c.cmd(b"EHLO c") == EHLO_DEFAULT
    home.control("servercert.pem", certs.pem)
    starttls(c)
    assert c.cmd(b"NOOP") == OK


@pytest.mark.parametrize("pem", ["garbage", "cert only", "key only", "empty"])
def test_row55_unusable_certificate(home, smtpd, certs, pem):
    home.control("servercert.pem", {"garbage": b"not a certificate\n", "cert only": certs.cert,
                                    "key only": certs.key, "empty": b""}[pem])
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS   # the file exists
    r = c.cmd(b"STARTTLS")
    assert MISSING454.fullmatch(r), r
    assert c.cmd(b"NOOP") == OK           # plaintext goes on
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == RH553
    assert c.cmd(b"QUIT") == QUIT221
    assert c.status() == 0


# ---------------------------------------------------------------- row 56

def test_row56_starttls_replies(tls, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS
    assert c.cmd(b"STARTTLS x") == PARAM501
    assert c.cmd(b"starttls") == READY220
    handshake(c)
    assert c.cmd(b"EHLO d") == EHLO_DEFAULT
    assert c.cmd(b"STARTTLS") == UN502
    assert c.cmd(b"STARTTLS x") == UN502      # TLS active: checked before the argument
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == TLS553
    assert c.cmd(b"RCPT TO:<x@example.org>") == OK
    assert c.cmd(b"QUIT") == QUIT221
    assert c.rest() == b""
    c.assert_clean_exit(0)


def test_served_certificate_is_servercert_pem(tls, smtpd, certs):
    c = smtpd.connect()
    handshake_ctx = client_context(certs.certfile)   # full verification, hostname included
    assert c.cmd(b"STARTTLS") == READY220
    handshake(c, handshake_ctx)
    assert c.sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(certs.cert.decode())
    assert c.cmd(b"NOOP") == OK


# ---------------------------------------------------------------- row 57 (injection)

def test_row57_pipelined_rset_is_discarded(tls, smtpd):
    c = smtpd.connect()
    c.send(b"STARTTLS\r\nRSET\r\n")
    assert c.reply() == READY220
    handshake(c)
    assert c.cmd(b"NOOP") == OK
    c.silent(0.3)


@pytest.mark.parametrize("injected", [b"MAIL FROM:<evil@x>\r\n", b"MAIL FROM:<evil@x>\r\nRCPT TO:<",
                                      b"MAIL FROM:<evil@x>"])
def test_row57_injected_mail_does_not_run(tls, smtpd, injected):
    """CVE-2011-0411 class: a command sent in cleartext with STARTTLS must not run
    inside the TLS session."""
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS
    c.send(b"STARTTLS\r\n" + injected)
    assert c.reply() == READY220
    handshake(c)
    assert c.cmd(b"RCPT TO:<x@example.org>") == MF503
    run = c.txn()
    assert run.E == b"Fa@b\0Tx@example.org\0\0"


def test_commands_before_starttls_in_one_write_are_answered(tls, smtpd):
    c = smtpd.connect()
    c.send(b"EHLO c\r\nNOOP\r\nSTARTTLS\r\n")
    assert c.replies(3) == [EHLO_TLS, OK, READY220]
    handshake(c)
    assert c.cmd(b"NOOP") == OK


# ---------------------------------------------------------------- row 58 (D8)

def test_row58_transaction_and_helo_discarded(tls, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"HELO x") == b"250 mx.example.org\r\n"
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@example.org>") == OK
    cipher = starttls(c)
    assert c.cmd(b"DATA") == MF503
    assert c.cmd(b"EHLO y") == EHLO_DEFAULT
    run = c.txn()
    assert run.message == received(b"y", proto=esmtps(cipher)) + b"hi\n"
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    assert c.cmd(b"QUIT") == QUIT221
    c.assert_clean_exit(0)


def test_helo_name_cleared_by_starttls(tls, smtpd):
    """§6.5: STARTTLS clears the HELO name; with no new EHLO, no (HELO ...) part."""
    c = smtpd.connect()
    assert c.cmd(b"EHLO x") == EHLO_TLS
    cipher = starttls(c)
    run = c.txn()
    assert run.message == received(None, proto=esmtps(cipher)) + b"hi\n"


# ---------------------------------------------------------------- row 59 and other failures

def test_row59_cleartext_after_220(tls, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"STARTTLS") == READY220
    c.send(b"NOOP\r\n")
    out = c.rest(timeout=10)
    assert FAILED454.fullmatch(out), out
    assert c.status() == 1


def test_eof_during_handshake(tls, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"STARTTLS") == READY220
    c.shutdown_write()
    out = c.rest(timeout=10)
    assert FAILED454.fullmatch(out), out
    assert c.status() == 1


def test_timeout_during_handshake(tls, smtpd):
    tls.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    assert c.cmd(b"STARTTLS") == READY220
    t = time.monotonic()
    out = c.rest(timeout=10)
    assert FAILED454.fullmatch(out), out
    assert 0.9 <= time.monotonic() - t < 4
    assert c.status() == 1


def test_timeout_over_tls(tls, smtpd):
    tls.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    starttls(c)
    assert c.cmd(b"NOOP") == OK
    t = time.monotonic()
    assert c.reply(timeout=10) == TIMEOUT451
    assert 0.9 <= time.monotonic() - t < 4
    assert c.rest(timeout=10) == b""
    assert c.status() == 1


def test_tls_close_is_eof(tls, smtpd):
    c = smtpd.connect()
    starttls(c)
    assert c.cmd(b"NOOP") == OK
    try:
        c.sock = c.sock.unwrap()   # close_notify, then the plain socket
    except (ssl.SSLError, OSError):
        pass
    c.status(timeout=10)
    c.assert_clean_exit(1)


def test_quit_over_tls(tls, smtpd):
    c = smtpd.connect()
    starttls(c)
    assert c.cmd(b"QUIT") == QUIT221
    assert c.rest() == b""
    c.assert_clean_exit(0)


# ---------------------------------------------------------------- ciphers

def test_tlsserverciphers_list_joined(tls, smtpd):
    """TLS ≤ 1.2 ciphers from control/tlsserverciphers, a list joined by `:`."""
    tls.control("tlsserverciphers",
                "# only one usable\nNO-SUCH-CIPHER\n\nECDHE-RSA-AES128-GCM-SHA256  \n")
    c = smtpd.connect()
    cipher = starttls(c, client_context(tls12=True))
    assert cipher == "ECDHE-RSA-AES128-GCM-SHA256"
    run = c.txn()
    assert run.message == (received(None, proto=b"ESMTPS (ECDHE-RSA-AES128-GCM-SHA256 encrypted)")
                           + b"hi\n")


def test_tlsciphers_overrides_the_file(tls, smtpd):
    tls.control("tlsserverciphers", "ECDHE-RSA-AES128-GCM-SHA256\n")
    tls.setenv(TLSCIPHERS="ECDHE-RSA-AES256-GCM-SHA384")
    c = smtpd.connect()
    assert starttls(c, client_context(tls12=True)) == "ECDHE-RSA-AES256-GCM-SHA384"


def test_rejected_cipher_list(tls, smtpd):
    tls.setenv(TLSCIPHERS="NO-SUCH-CIPHER")
    c = smtpd.connect()
    r = c.cmd(b"STARTTLS")
    assert CTX454.fullmatch(r), r
    assert c.cmd(b"NOOP") == OK
    assert c.cmd(b"QUIT") == QUIT221
    assert c.status() == 0


def test_unreadable_tlsserverciphers_is_fatal(tls, smtpd):
    tls.mkdir("control/tlsserverciphers")
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS
    c.send(b"STARTTLS\r\n")
    assert c.rest(timeout=10) == CTL421
    assert c.status() == 1


# ---------------------------------------------------------------- row 60 and D8 with AUTH

def test_row60_auth_after_starttls(tls, smtpd):
    auth_mode(tls)
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS_AUTH
    starttls(c)
    assert c.cmd(b"EHLO c") == EHLO_AUTH
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    run = c.txn(rcpts=(b"RCPT TO:<x@far.away>",))
    assert run.message == received(b"c", b"user@", b"ESMTPA") + b"hi\n"
    assert run.E == b"Fa@b\0Tx@far.away\0\0"
    assert one_checkpw_run(tls)["fd3"] == GOOD_FD3


@pytest.mark.parametrize("info", [None, "ident"])
def test_d8_pre_tls_auth_is_discarded(tls, smtpd, info):
    auth_mode(tls)
    tls.setenv(TCPREMOTEINFO=info)
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS_AUTH
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    cipher = starttls(c)
    assert c.cmd(b"EHLO d") == EHLO_AUTH
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == TLS553
    assert c.cmd(b"RCPT TO:<x@example.org>") == OK
    assert c.cmd(b"DATA") == GO
    c.send(b"hi\r\n.\r\n")
    run = c.queued(c.reply())
    ident = b"" if info is None else info.encode() + b"@"
    assert run.message == received(b"d", ident, esmtps(cipher)) + b"hi\n"
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    for name in (b"RELAYCLIENT", b"SMTPAUTHUSER", b"SMTPAUTHMETHOD"):
        assert name not in run.env
    if info is None:
        assert b"TCPREMOTEINFO" not in run.env
    else:
        assert run.env[b"TCPREMOTEINFO"] == b"ident"
    # AUTH is accepted again, and then wins the protocol mark
    challenge, digest = cram_md5(c)
    assert c.reply() == OK235
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == AGAIN503
    run = c.txn(rcpts=(b"RCPT TO:<y@far.away>",))
    assert run.message == received(b"d", b"user@", b"ESMTPA") + b"hi\n"
    assert run.E == b"Fa@b\0Ty@far.away\0\0"
    assert run.env[b"RELAYCLIENT"] == b"" and run.env[b"TCPREMOTEINFO"] == b"user"
    assert run.env[b"SMTPAUTHMETHOD"] == b"cram-md5"
    assert [r["fd3"] for r in checkpw_runs(tls)] == [
        GOOD_FD3, b"user\0" + digest + b"\0" + challenge + b"\0"]


def test_d8_relayclient_from_startup_is_kept(tls, smtpd):
    tls.setenv(RELAYCLIENT="@relay.suffix")
    c = smtpd.connect()
    cipher = starttls(c)
    run = c.txn(rcpts=(b"RCPT TO:<x@far.away>",))
    assert run.E == b"Fa@b\0Tx@far.away@relay.suffix\0\0"
    assert run.env[b"RELAYCLIENT"] == b"@relay.suffix"
    assert run.message == received(None, proto=esmtps(cipher)) + b"hi\n"


def test_d8_auth_required_again_after_starttls(tls, smtpd):
    auth_mode(tls)
    tls.setenv(SMTPAUTH="!")
    c = smtpd.connect()
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    starttls(c)
    assert c.cmd(b"MAIL FROM:<a@b>") == b"530 Authorization required (#5.7.1) \r\n"


# ---------------------------------------------------------------- smtplib

def test_smtplib_starttls(tls, smtpd, certs):
    smtpd.start()
    ctx = client_context(certs.certfile)
    ctx.check_hostname = False   # smtplib sends the address it connected to as SNI
    s = smtplib.SMTP("127.0.0.1", smtpd.port, local_hostname="c.example", timeout=10)
    try:
        assert s.ehlo() == (250, b"mx.example.org\nSTARTTLS\nPIPELINING\n8BITMIME")
        assert s.starttls(context=ctx) == (220, b"ready for tls")
        cipher = s.sock.cipher()[0]
        assert s.ehlo() == (250, b"mx.example.org\nPIPELINING\n8BITMIME")
        assert s.sendmail("a@b.c", ["x@example.org"], b"Subject: s\r\n\r\nbody\r\n") == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("a@b.c", ["x@far.away"], b"x\r\n")
        assert e.value.recipients == {"x@far.away": (553, TLS553[4:-2])}
    finally:
        s.quit()
    (run,) = tls.new_runs()
    assert run.message == received(b"c.example", proto=esmtps(cipher)) + b"Subject: s\n\nbody\n"
    assert run.E == b"Fa@b.c\0Tx@example.org\0\0"


@pytest.mark.parametrize("mech", ["LOGIN", "PLAIN", "CRAM-MD5"])
def test_smtplib_starttls_then_login(tls, smtpd, mech):
    auth_mode(tls)
    smtpd.start()
    s = smtplib.SMTP("127.0.0.1", smtpd.port, local_hostname="c.example", timeout=10)
    try:
        s.starttls(context=client_context())
        s.ehlo()
        assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN", "CRAM-MD5"]
        s.esmtp_features["auth"] = mech   # smtplib.login picks from the advertised ones
        assert s.login("user", "secret") == (235, b"ok, go ahead (#2.0.0)")
        assert s.sendmail("a@b.c", ["x@far.away"], b"Subject: s\r\n\r\nbody\r\n") == {}
    finally:
        s.quit()
    (run,) = tls.new_runs()
    assert run.message == received(b"c.example", b"user@", b"ESMTPA") + b"Subject: s\n\nbody\n"
    assert run.env[b"SMTPAUTHMETHOD"] == mech.lower().encode()


# ---------------------------------------------------------------- swaks

SWAKS = shutil.which("swaks")


def swaks(smtpd, *args):
    if SWAKS is None:
        pytest.skip("swaks is not installed")
    smtpd.start()
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(smtpd.port),
                           "--timeout", "15", "--helo", "h.example", "--from", "a@b.c",
                           "--data", "Subject: swaks\n\nhello", *args],
                          capture_output=True, timeout=60)


def swaks_cipher(out: bytes) -> str:
    m = re.search(rb"=== TLS started with cipher [^:\s]+:([^:\s]+):\d+", out)
    assert m, out
    return m.group(1).decode()


def swaks_run(home, out):
    m = re.search(rb"<~  250 ok \d+ qp (\d+)\r?\n", out)
    assert m, out
    return home.run(int(m.group(1)))


def test_swaks_tls(tls, smtpd):
    p = swaks(smtpd, "--tls", "--to", "x@example.org")
    assert p.returncode == 0, p.stdout + p.stderr
    assert b"<-  220 ready for tls" in p.stdout
    cipher = swaks_cipher(p.stdout)
    run = swaks_run(tls, p.stdout)
    assert run.message == (received(b"h.example", proto=esmtps(cipher))
                           + b"Subject: swaks\n\nhello\n")
    assert run.E == b"Fa@b.c\0Tx@example.org\0\0"


def test_swaks_tls_relay_refused(tls, smtpd):
    p = swaks(smtpd, "--tls", "--to", "x@far.away")
    assert p.returncode == 24, p.stdout
    assert b"<~* " + TLS553[:-2] in p.stdout
    tls.assert_no_new_runs()


@pytest.mark.parametrize("mech", ["LOGIN", "PLAIN", "CRAM-MD5"])
def test_swaks_tls_auth(tls, smtpd, mech):
    auth_mode(tls)
    p = swaks(smtpd, "--tls", "--auth", mech, "--auth-user", "user", "--auth-password", "secret",
              "--to", "x@far.away")
    assert p.returncode == 0, p.stdout + p.stderr
    run = swaks_run(tls, p.stdout)
    assert run.message == received(b"h.example", b"user@", b"ESMTPA") + b"Subject: swaks\n\nhello\n"
    assert run.E == b"Fa@b.c\0Tx@far.away\0\0"
    assert len(checkpw_runs(tls)) == 1
