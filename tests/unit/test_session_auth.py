"""AUTH and STARTTLS in the sans-IO Session (qmail-smtpd.md §8, spp.md [auth]).

The checkprogram, the failure delay and the TLS context are fakes: these tests
check what the session sends, what it hands the checkprogram on fd 3, and the
state it keeps or forgets.
"""

import base64

import pytest

from qspp import replies
from qspp.authmode import AuthMode, read_args
from qspp.session import CLOSED

try:
    from . import fakes
except ImportError:
    import fakes

Harness = fakes.Harness
echo = fakes.echo
settings = fakes.settings

CHECK = [b"bin/checkpw", b"/bin/true"]
PLAIN_OK = base64.b64encode(b"\0user\0secret")
MAL = replies.AUTH_MALFORMED + b"\r\n"


class FakeAuthIO:
    """Accepts only user/secret; records every fd 3 payload and delay."""

    pid = 4242

    def __init__(self, outcome=None):
        self.calls = []
        self.delays = 0
        self.outcome = outcome  # a fixed reply instead of checking, e.g. a 454

    def check(self, argv, data, env):
        self.calls.append((list(argv), data, dict(env)))
        if self.outcome is not None:
            return self.outcome
        fields = data.split(b"\0")
        if fields[0] == b"user" and fields[1] in (b"secret", b"digest"):
            return None
        return replies.AUTH_FAILED

    def delay(self):
        self.delays += 1


class FakeTlsIO:
    def __init__(self, offered=True, refusal=None):
        self._offered = offered
        self.refusal = refusal

    def offered(self):
        return self._offered

    def context(self, env):
        if self.refusal is not None:
            return None, self.refusal
        return "ctx", None


def harness(smtpauth=None, host=b"mx.example.org", tls=None, auth_outcome=None,
            forcetls=None, **kw):
    mode = AuthMode(host, CHECK, smtpauth) if forcetls is None else (
        AuthMode(host, CHECK, smtpauth, forcetls))
    s = settings(auth=mode, **kw.pop("settings", {}))
    h = Harness(settings_=s, start=False, **kw)
    h.auth = FakeAuthIO(auth_outcome)
    h.session.auth_io = h.auth
    if tls is not None:
        h.session.tls_io = tls
    h.session.start()
    h.greeting = h.take()
    return h


def b64(raw):
    return base64.b64encode(raw)


# -- EHLO and SMTPAUTH (§4.5, §8.1) --------------------------------------------

@pytest.mark.parametrize("value, line, required", [
    (None, b"250 AUTH LOGIN PLAIN CRAM-MD5", False),
    (b"", b"250 AUTH LOGIN PLAIN", False),
    (b"!", b"250 AUTH LOGIN PLAIN", True),
    (b"!+CRAM", b"250 AUTH LOGIN PLAIN CRAM-MD5", True),
    (b"!cram-only", b"250 AUTH CRAM-MD5", True),
    (b"+cram", b"250 AUTH LOGIN PLAIN CRAM-MD5", False),
    (b"Cram", b"250 AUTH CRAM-MD5", False),
    (b"login", b"250 AUTH LOGIN PLAIN", False),
])
def test_ehlo_auth_line_and_requirement(value, line, required):
    h = harness(smtpauth=value)
    assert h.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                b"250-SIZE 0\r\n" + line + b"\r\n")
    expected = replies.AUTH_REQUIRED if required else replies.OK
    assert h.cmd(b"MAIL FROM:<a@b>") == expected + b"\r\n"


def test_smtpauth_dash_hides_auth_and_refuses_it():
    h = harness(smtpauth=b"-")
    assert h.cmd(b"EHLO c").endswith(b"250-8BITMIME\r\n250 SIZE 0\r\n")
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == b"503 auth not available (#5.3.3)\r\n"
    assert h.auth.calls == []


def test_size_shows_databytes_and_auth_off_has_no_auth_verb():
    h = harness(settings={"databytes": 100000})
    assert b"250-SIZE 100000\r\n" in h.cmd(b"EHLO c")
    plain = Harness()
    assert plain.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.UNIMPLEMENTED + b"\r\n"
    assert plain.cmd(b"EHLO c") == b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


# -- the exchange (§8.2, §8.3) ---------------------------------------------------

def test_plain_initial_response_authenticates_and_grants_relay():
    h = harness()
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == b"235 ok, go ahead (#2.0.0)\r\n"
    argv, data, _ = h.auth.calls[0]
    assert argv == CHECK and data == b"user\0secret\0\0"
    assert h.env[b"TCPREMOTEINFO"] == b"user" and h.env[b"RELAYCLIENT"] == b""
    assert h.env[b"SMTPAUTHUSER"] == b"user" and h.env[b"SMTPAUTHMETHOD"] == b"plain"
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>") == b"250 ok\r\n250 ok\r\n"
    h.cmd(b"DATA")
    assert h.feed(b".\r\n").startswith(b"250 ok")
    m = h.queue.queues[-1].message
    assert m.startswith(b"Received: from client.example.com (user@192.0.2.7)\n"
                        b"  by 198.51.100.1 with ESMTPA; ")


def test_plain_with_prompt_and_authzid_ignored():
    h = harness()
    assert h.cmd(b"auth plain") == b"334 \r\n"
    assert h.cmd(b64(b"admin\0user\0secret\0extra")) == replies.AUTH_OK + b"\r\n"
    assert h.auth.calls[0][1] == b"user\0secret\0\0"


def test_login_with_and_without_initial_response():
    h = harness()
    assert h.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert h.cmd(b"dXNlcg==") == b"334 UGFzc3dvcmQ6\r\n"
    assert h.cmd(b"c2VjcmV0") == replies.AUTH_OK + b"\r\n"
    assert h.env[b"SMTPAUTHMETHOD"] == b"login"
    h2 = harness()
    assert h2.cmd(b"AUTH LOGIN dXNlcg==") == b"334 UGFzc3dvcmQ6\r\n"
    assert h2.cmd(b"c2VjcmV0") == replies.AUTH_OK + b"\r\n"


def test_cram_md5_challenge_and_fd3():
    h = harness()
    challenge = b"<4242.1795558454@mx.example.org>"
    assert h.cmd(b"AUTH CRAM-MD5 ignored") == b"334 " + b64(challenge) + b"\r\n"
    assert h.cmd(b64(b"user digest")) == replies.AUTH_OK + b"\r\n"
    assert h.auth.calls[0][1] == b"user\0digest\0" + challenge + b"\0"


def test_cram_md5_host_falls_back_to_local_host():
    h = harness(host=None)
    assert h.cmd(b"AUTH CRAM-MD5") == b"334 " + b64(b"<4242.1795558454@198.51.100.1>") + b"\r\n"


def test_failure_waits_then_535_and_changes_nothing():
    h = harness()
    h.cmd(b"AUTH LOGIN")
    h.cmd(b"dXNlcg==")
    assert h.cmd(b"d3Jvbmc=") == b"535 authentication failed (#5.7.1)\r\n"
    assert h.auth.delays == 1
    assert b"SMTPAUTHUSER" not in h.env and b"TCPREMOTEINFO" not in h.env
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>") == (
        b"250 ok\r\n" + replies.RCPTHOSTS + b"\r\n")
    # no retry limit
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.AUTH_IN_TRANSACTION + b"\r\n"
    h.cmd(b"RSET")
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.AUTH_OK + b"\r\n"


@pytest.mark.parametrize("outcome", [replies.AUTH_CHILD_CRASHED, replies.AUTH_CHILD_NOSTART,
                                     replies.AUTH_NO_PIPE, replies.AUTH_WRITE_PIPE])
def test_checkprogram_trouble_is_454_without_delay(outcome):
    h = harness(auth_outcome=outcome)
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == outcome + b"\r\n"
    assert h.auth.delays == 0


@pytest.mark.parametrize("lines, expected", [
    ([b"AUTH PLAIN", b"*"], b"334 \r\n501 auth exchange canceled (#5.0.0)\r\n"),
    ([b"AUTH LOGIN", b"*"], b"334 VXNlcm5hbWU6\r\n501 auth exchange canceled (#5.0.0)\r\n"),
    ([b"AUTH LOGIN", b"dXNlcg==", b"*"],
     b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n501 auth exchange canceled (#5.0.0)\r\n"),
    ([b"AUTH CRAM-MD5", b"*"], None),
    ([b"AUTH LOGIN", b""], b"334 VXNlcm5hbWU6\r\n" + MAL),
    ([b"AUTH LOGIN", b"dXNlcg==", b""], b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n" + MAL),
    ([b"AUTH FOO"], b"504 auth type unimplemented (#5.5.1)\r\n"),
    ([b"AUTH"], b"504 auth type unimplemented (#5.5.1)\r\n"),
    ([b"AUTH PLAIN !!!!"], MAL),
    ([b"AUTH PLAIN AHVzZXIAc2VjcmV0="], MAL),  # bad padding
    ([b"AUTH PLAIN AHVzZXIAc2VjcmV"], MAL),  # not a multiple of four
    ([b"AUTH PLAIN " + b64(b"\0\0secret")], MAL),  # empty user
    ([b"AUTH PLAIN " + b64(b"\0user\0")], MAL),  # empty password
    ([b"AUTH PLAIN " + b64(b"usersecret\0")], MAL),  # one NUL
    ([b"AUTH LOGIN " + b64(b"us\0er")], MAL),  # NUL in the user: no password prompt
    ([b"AUTH LOGIN", b64(b"us\0er")], b"334 VXNlcm5hbWU6\r\n" + MAL),
    ([b"AUTH LOGIN", b"dXNlcg==", b64(b"se\0cret")],
     b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n" + MAL),
    ([b"AUTH CRAM-MD5", b64(b"nospace")], None),
    ([b"AUTH CRAM-MD5", b64(b"user ")], None),
    ([b"AUTH CRAM-MD5", b64(b" digest")], None),
])
def test_refused_exchanges(lines, expected):
    h = harness()
    out = h.cmds(*lines)
    if expected is None:  # CRAM-MD5: the prompt, then 501
        assert out.startswith(b"334 ") and out.count(b"\r\n") == 2
        assert out.endswith(MAL) or out.endswith(b"501 auth exchange canceled (#5.0.0)\r\n")
    else:
        assert out == expected
    assert h.auth.calls == []
    assert h.cmd(b"NOOP") == b"250 ok\r\n"  # back to commands


def test_exchange_line_is_never_a_command():
    h = harness()
    h.cmd(b"AUTH LOGIN")
    # "QUIT" is valid base64: it is taken as the user name, not obeyed
    assert h.cmd(b"QUIT") == b"334 UGFzc3dvcmQ6\r\n"
    assert h.cmd(b"RSET now") == MAL
    assert h.session.state != CLOSED


def test_pipelined_exchange_in_one_write():
    h = harness()
    out = h.feed(b"AUTH LOGIN\r\ndXNlcg==\r\nc2VjcmV0\r\nMAIL FROM:<a@b>\r\n")
    assert out == (b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n" + replies.AUTH_OK
                   + b"\r\n250 ok\r\n")


def test_second_auth_and_auth_in_transaction():
    h = harness()
    assert h.cmds(b"MAIL FROM:<a@b>", b"AUTH PLAIN " + PLAIN_OK) == (
        b"250 ok\r\n503 no auth during mail transaction (#5.5.0)\r\n")
    h.cmd(b"RSET")
    h.cmd(b"AUTH PLAIN " + PLAIN_OK)
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == b"503 you're already authenticated (#5.5.0)\r\n"
    # RSET, HELO and EHLO keep the AUTH (§8.5)
    h.cmds(b"RSET", b"HELO x", b"EHLO y")
    assert h.cmd(b"AUTH LOGIN") == replies.AUTH_ALREADY + b"\r\n"


def test_auth_suffix_replaces_relayclient_suffix():
    h = harness(settings={"relayclient": b"@relay.suffix"})
    h.cmd(b"AUTH PLAIN " + PLAIN_OK)
    h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@any.com>", b"DATA")
    h.feed(b".\r\n")
    assert h.queue.queues[-1].envelope == b"Fa@b\0Tx@any.com\0\0"


# -- MAIL SIZE= (§8.6) -----------------------------------------------------------

@pytest.mark.parametrize("arg, refused", [
    (b"FROM:<a@b> SIZE=100001", True),
    (b"FROM:<a@b> size=100000", False),
    (b"FROM:<a@b> SIZE=100001x", True),
    (b"FROM:<a@b> SIZE=x", False),
    (b"<a@b> SIZE=100001", False),  # the first > before offset 5
    (b"FROM:<a@b> BODY=8BITMIME SIZE=999999", True),
    (b"FROM:<a@b> AUTH=spoof", False),
    (b"FROM:<a@b> SIZE=" + b"9" * 60000, True),  # past int()'s digit limit
    (b"FROM:<a@b> SIZE=" + b"0" * 60000 + b"1", False),
])
def test_size_parameter(arg, refused):
    h = harness(settings={"databytes": 100000})
    expected = replies.DATABYTES if refused else replies.OK
    assert h.cmd(b"MAIL " + arg) == expected + b"\r\n"
    if refused:
        assert h.cmd(b"RCPT TO:<x@example.org>") == replies.MAIL_FIRST + b"\r\n"


def test_size_unchecked_without_databytes_or_auth_mode():
    assert harness().cmd(b"MAIL FROM:<a@b> SIZE=999999999") == b"250 ok\r\n"
    h = Harness(settings_=settings(databytes=10))
    assert h.cmd(b"MAIL FROM:<a@b> SIZE=999999999") == b"250 ok\r\n"


def test_auth_parameter_is_ignored():
    h = harness()
    h.cmds(b"MAIL FROM:<a@b> AUTH=spoof", b"RCPT TO:<x@example.org>", b"DATA")
    h.feed(b".\r\n")
    assert h.queue.queues[-1].message.startswith(
        b"Received: from client.example.com (192.0.2.7)\n  by 198.51.100.1 with SMTP; ")


# -- [auth] plugins (spp.md §3.1, Δ10) -----------------------------------------------

def test_auth_plugin_refusal_unsets_the_user():
    h = harness(sections={"auth": [b":no"]}, programs={b":no": echo(b"E535 no")})
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == b"535 no\r\n"
    assert b"SMTPAUTHUSER" not in h.env and b"SMTPAUTHMETHOD" not in h.env
    assert b"RELAYCLIENT" not in h.env
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>") == (
        b"250 ok\r\n" + replies.RCPTHOSTS + b"\r\n")
    assert h.runner.calls == [b":no"]


def test_auth_plugin_sees_user_and_method():
    seen = {}

    def plugin(env):
        seen.update(env)
        return b""

    h = harness(sections={"auth": [b":look"]}, programs={b":look": plugin})
    assert h.cmd(b"AUTH LOGIN dXNlcg==") == b"334 UGFzc3dvcmQ6\r\n"
    assert h.cmd(b"c2VjcmV0") == replies.AUTH_OK + b"\r\n"
    assert seen[b"SMTPAUTHUSER"] == b"user" and seen[b"SMTPAUTHMETHOD"] == b"login"
    # the relay right comes after the hook
    assert b"RELAYCLIENT" not in seen


def test_auth_plugin_not_run_when_checkprogram_refuses():
    h = harness(sections={"auth": [b":x"]}, programs={b":x": echo(b"N")})
    h.cmd(b"AUTH PLAIN " + b64(b"\0user\0wrong"))
    assert h.runner.calls == []


# -- STARTTLS (§8.7) ---------------------------------------------------------------

def tls_harness(**kw):
    return harness(tls=FakeTlsIO(), **kw)


def test_starttls_unknown_without_certificate():
    h = Harness()
    assert h.cmd(b"STARTTLS") == replies.UNIMPLEMENTED + b"\r\n"
    assert b"STARTTLS" not in h.cmd(b"EHLO c")


def test_starttls_offered_then_ready():
    h = Harness(start=False)
    h.session.tls_io = FakeTlsIO()
    h.session.start()
    h.take()
    assert h.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n"
                                b"250 8BITMIME\r\n")
    assert h.cmd(b"STARTTLS x") == b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
    assert h.session.tls_request is None
    assert h.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    assert h.session.tls_request == "ctx" and h.session.flush_soon


def test_starttls_setup_refusal_continues_in_plaintext():
    refusal = replies.tls_missing_certificate(b"no start line")
    h = Harness(start=False)
    h.session.tls_io = FakeTlsIO(refusal=refusal)
    h.session.start()
    h.take()
    assert h.cmd(b"STARTTLS") == b"454 TLS missing certificate: no start line (#4.3.0)\r\n"
    assert h.session.tls_request is None
    assert h.cmd(b"NOOP") == b"250 ok\r\n"


def test_after_tls_everything_from_the_client_is_forgotten():
    h = tls_harness(settings={"remoteinfo": b"ident"}, env={b"TCPREMOTEINFO": b"ident"})
    h.cmds(b"HELO x", b"AUTH PLAIN " + PLAIN_OK, b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>")
    assert h.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    h.session.tls_started(b"TLS_AES_256_GCM_SHA384")
    assert h.session.helo_name is None
    assert h.env[b"TCPREMOTEINFO"] == b"ident"
    for name in (b"RELAYCLIENT", b"SMTPAUTHUSER", b"SMTPAUTHMETHOD"):
        assert name not in h.env
    assert h.cmd(b"DATA") == replies.MAIL_FIRST + b"\r\n"
    assert h.cmd(b"EHLO y") == (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                b"250-SIZE 0\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n")
    assert h.cmd(b"STARTTLS") == replies.UNIMPLEMENTED + b"\r\n"
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>", b"RCPT TO:<x@example.org>",
                  b"DATA") == (b"250 ok\r\n" + replies.RCPTHOSTS_TLS + b"\r\n250 ok\r\n"
                               b"354 go ahead\r\n")
    h.feed(b".\r\n")
    assert h.queue.queues[-1].message.startswith(
        b"Received: from client.example.com (HELO y) (ident@192.0.2.7)\n  by 198.51.100.1 with"
        b" ESMTPS (TLS_AES_256_GCM_SHA384 encrypted); ")
    # AUTH is accepted again, and then wins the protocol
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.AUTH_OK + b"\r\n"
    h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>", b"DATA")
    h.feed(b".\r\n")
    assert h.queue.queues[-1].message.startswith(
        b"Received: from client.example.com (HELO y) (user@192.0.2.7)\n"
        b"  by 198.51.100.1 with ESMTPA; ")


def test_tls_keeps_startup_relayclient_and_plugin_state():
    h = tls_harness(settings={"relayclient": b""}, env={b"RELAYCLIENT": b""},
                    sections={"helo": [b":s"]}, programs={b":s": echo(b"SX=1")})
    h.cmd(b"HELO x")
    h.cmd(b"STARTTLS")
    h.session.tls_started(b"C")
    assert h.env[b"RELAYCLIENT"] == b"" and h.env[b"X"] == b"1"
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>") == b"250 ok\r\n250 ok\r\n"


# -- FORCETLS (issue 10 #12): no AUTH in cleartext ------------------------------------

ENC538 = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
EHLO_HEAD = b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"


def test_encryption_required_reply_text():
    assert replies.AUTH_ENCRYPTION_REQUIRED + b"\r\n" == ENC538


@pytest.mark.parametrize("value", [b"1", b"yes", b"00", b" "])
def test_forcetls_hides_auth_and_refuses_every_mechanism_before_tls(value):
    h = harness(forcetls=value, tls=FakeTlsIO())
    assert h.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n"
                                b"250-8BITMIME\r\n250 SIZE 0\r\n")
    for line in (b"AUTH PLAIN " + PLAIN_OK, b"AUTH LOGIN", b"auth login dXNlcg==",
                 b"AUTH CRAM-MD5", b"AUTH XOAUTH2 abc", b"AUTH"):
        assert h.cmd(line) == ENC538, line
    # no exchange was started: the next line is a command, not a credential
    assert h.cmd(b"AUTH LOGIN") == ENC538
    assert h.cmd(b"dXNlcg==") == replies.UNIMPLEMENTED + b"\r\n"
    assert h.auth.calls == [] and not h.session.authenticated
    # the rest of the session is untouched: not required, so MAIL works, no relaying
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>") == (
        b"250 ok\r\n" + replies.RCPTHOSTS + b"\r\n")


@pytest.mark.parametrize("value", [None, b"", b"0"])
def test_forcetls_unset_empty_or_zero_is_netqmail(value):
    h = harness(forcetls=value, tls=FakeTlsIO())
    assert h.session.settings.auth.forcetls is False
    assert h.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n"
                                b"250-8BITMIME\r\n250-SIZE 0\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n")
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.AUTH_OK + b"\r\n"


def test_forcetls_under_tls_is_as_today():
    h = harness(forcetls=b"1", tls=FakeTlsIO())
    assert h.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    h.session.tls_started(b"TLS_AES_256_GCM_SHA384", b"TLSv1.3")
    assert h.cmd(b"EHLO c") == EHLO_HEAD + b"250-SIZE 0\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n"
    assert h.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert h.cmd(b64(b"user")) == b"334 UGFzc3dvcmQ6\r\n"
    assert h.cmd(b64(b"secret")) == replies.AUTH_OK + b"\r\n"
    assert h.cmds(b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>") == b"250 ok\r\n250 ok\r\n"


def test_forcetls_with_smtpauth_cram_and_required():
    h = harness(smtpauth=b"!cram", forcetls=b"1", tls=FakeTlsIO())
    assert h.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n"
                                b"250-8BITMIME\r\n250 SIZE 0\r\n")
    assert h.cmd(b"AUTH CRAM-MD5") == ENC538
    assert h.cmd(b"MAIL FROM:<a@b>") == replies.AUTH_REQUIRED + b"\r\n"
    h.cmd(b"STARTTLS")
    h.session.tls_started(b"C", b"TLSv1.2")
    assert h.cmd(b"EHLO c").endswith(b"250-SIZE 0\r\n250 AUTH CRAM-MD5\r\n")


def test_forcetls_keeps_the_earlier_auth_refusals_first():
    """The order of the deployed force-tls patch: not available, already
    authenticated, in a transaction, then encryption required."""
    h = harness(smtpauth=b"-", forcetls=b"1")
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.AUTH_NOT_AVAILABLE + b"\r\n"
    h = harness(forcetls=b"1")
    h.cmd(b"MAIL FROM:<a@b>")
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.AUTH_IN_TRANSACTION + b"\r\n"


# -- what AUTH and STARTTLS leave in the logs (issue 11) ------------------------------

def err_lines(capfd):
    out, err = capfd.readouterr()
    assert out == ""
    prefix = "qspp: pid %d: " % __import__("os").getpid()
    got = err.splitlines()
    assert all(line.startswith(prefix) for line in got), got
    return [line[len(prefix):] for line in got]


def test_failed_auth_writes_one_line_without_spplog(capfd):
    # nothing for a success, a malformed or canceled exchange, or checkprogram trouble
    h = harness()
    h.cmds(b"AUTH PLAIN x", b"AUTH LOGIN", b"*", b"AUTH PLAIN " + PLAIN_OK)
    assert h.session.authenticated
    h = harness(auth_outcome=replies.AUTH_CHILD_CRASHED)
    assert h.cmd(b"AUTH PLAIN " + PLAIN_OK) == replies.AUTH_CHILD_CRASHED + b"\r\n"
    assert err_lines(capfd) == []
    # a 535: one line, SPPLOG or not
    h = harness()
    assert h.session.journal is None
    assert h.cmd(b"AUTH PLAIN " + b64(b"\0user\0wrong")) == replies.AUTH_FAILED + b"\r\n"
    assert h.auth.delays == 1
    assert err_lines(capfd) == ["auth-failed ip=192.0.2.7 mechanism=plain user=user"]
    assert h.cmd(b"AUTH LOGIN " + b64(b"bob@example.org")) == b"334 UGFzc3dvcmQ6\r\n"
    h.cmd(b64(b"x"))
    h.cmd(b"AUTH CRAM-MD5")
    h.cmd(b64(b"carol 0123"))
    assert err_lines(capfd) == ["auth-failed ip=192.0.2.7 mechanism=login user=bob@example.org",
                                "auth-failed ip=192.0.2.7 mechanism=cram-md5 user=carol"]


@pytest.mark.parametrize("user", [
    b"x ip=1.2.3.4",
    b"x\nqspp: pid 1: auth-failed ip=1.2.3.4 mechanism=plain user=y",
    b"x\rauth-failed ip=1.2.3.4",
    b"x\xc2\x85auth-failed ip=1.2.3.4",            # U+0085, NEL
    b"x\xe2\x80\xa8auth-failed ip=1.2.3.4",        # U+2028
    b'x" ip=1.2.3.4 "',
])
def test_a_hostile_user_name_cannot_forge_a_line_or_an_address(capfd, user):
    h = harness()
    h.cmd(b"AUTH PLAIN " + b64(b"\0" + user + b"\0wrong"))
    (line,) = err_lines(capfd)
    assert line.startswith('auth-failed ip=192.0.2.7 mechanism=plain user="x')
    assert line.endswith('"')
    head, _, quoted = line.partition(" user=")
    assert " ip=" not in quoted.replace('\\"', "").split('"')[0]  # nothing unquoted
    assert not any(c in line for c in "\r\n\x85\u2028")


def journal_harness(**kw):
    from qspp.spplog import Journal
    h = harness(**kw)
    h.session.journal = Journal(b"1")
    return h


def summary(h, capfd):
    h.session.journal.summary(h.settings, h.session.helo_name, h.session.end)
    return err_lines(capfd)[-1]


def test_summary_lists_each_auth_outcome(capfd):
    h = journal_harness(sections={"auth": [b":no"]},
                        programs={b":no": lambda env: b"E554 not you\n"
                                  if env[b"SMTPAUTHMETHOD"] == b"login" else b""})
    h.cmds(b"AUTH PLAIN " + b64(b"\0user\0wrong"),       # failed
           b"AUTH LOGIN", b"*",                            # canceled
           b"AUTH PLAIN !!!!",                             # malformed
           b"AUTH LOGIN " + b64(b"user"), b64(b"secret"))  # refused by [auth]
    h.auth.outcome = replies.AUTH_CHILD_CRASHED
    h.cmd(b"AUTH PLAIN " + PLAIN_OK)                       # error (454)
    h.auth.outcome = None
    h.cmd(b"AUTH PLAIN " + PLAIN_OK)                       # ok
    h.cmd(b"QUIT")
    assert summary(h, capfd) == (
        "spp-summary ip=192.0.2.7 host=client.example.com helo=-"
        " auth1=failed,plain,user auth2=canceled,login,- auth3=malformed,plain,-"
        " auth4=refused,login,user auth5=error,plain,user auth6=ok,plain,user end=quit")


def test_summary_tls_ok_and_encryption_required(capfd):
    h = journal_harness(forcetls=b"1", tls=FakeTlsIO())
    h.cmds(b"EHLO c", b"AUTH LOGIN")
    h.cmd(b"STARTTLS")
    h.session.tls_started(b"TLS_AES_256_GCM_SHA384", b"TLSv1.3")
    h.cmd(b"AUTH PLAIN " + PLAIN_OK)
    h.cmd(b"QUIT")
    assert summary(h, capfd) == (
        "spp-summary ip=192.0.2.7 host=client.example.com helo=-"
        " tls=ok tls_protocol=TLSv1.3 tls_cipher=TLS_AES_256_GCM_SHA384"
        " auth1=encryption-required,login,- auth2=ok,plain,user end=quit")


def test_summary_tls_unavailable_then_failed(capfd):
    refusal = replies.tls_missing_certificate(b"Permission denied")
    h = journal_harness(tls=FakeTlsIO(refusal=refusal))
    assert h.cmd(b"STARTTLS") == refusal + b"\r\n"
    h.session.journal.summary(h.settings, None, "eof")
    assert err_lines(capfd)[-1].endswith(
        ' tls=unavailable tls_reason="454 TLS missing certificate: Permission denied (#4.3.0)"'
        " end=eof")
    h.session.tls_io = FakeTlsIO()
    h.cmd(b"STARTTLS")
    h.session.tls_failed(b"wrong version number")
    assert h.take() == b"454 TLS connection failed: wrong version number (#4.3.0)\r\n"
    assert h.session.state == CLOSED and h.session.exit_status == 1
    assert summary(h, capfd).endswith(
        ' tls=failed tls_reason="454 TLS connection failed: wrong version number (#4.3.0)"'
        ' end="TLS handshake failed"')


# -- argument reading (§2.1) ----------------------------------------------------------

def test_read_args(tmp_path):
    exe = tmp_path / "checkpassword"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    path = {b"PATH": bytes(tmp_path)}
    assert read_args([], path) == (None, None, None)
    assert read_args([b"mx.example.org", b"bin/checkpw", b"/bin/true"], path) == (
        b"mx.example.org", [b"bin/checkpw", b"/bin/true"], None)
    # the / rule: never make /usr/bin/true the checkprogram
    assert read_args([b"/home/vpopmail/bin/vchkpw", b"/usr/bin/true"], path) == (
        None, [b"/home/vpopmail/bin/vchkpw", b"/usr/bin/true"], None)
    host, argv, note = read_args([b"checkpassword", b"/bin/true"], path)
    assert host is None and argv == [b"checkpassword", b"/bin/true"] and note
    assert read_args([b"mx"], path)[:2] == (b"mx", None)
    assert read_args([b"mx"], path)[2].startswith(b"HOST mx without a checkprogram")
    assert read_args([b"mx.example.org"], path)[1] is None
