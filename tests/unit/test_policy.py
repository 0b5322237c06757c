"""policy: entries (issue 13): parsing, the request, the meaning of each answer,
and how the engine weighs them among plugins. No processes, no sockets: the
server is a stub answering from a script (tests/e2e/test_policy.py has real ones)."""

import pytest

from qspp import policy
from qspp.policy import Facts, decide, request
from qspp.session import CLOSE, CONTINUE, REFUSED
from qspp.spp import SppEngine
from qspp.sppconfig import parse, policy_entry


# -- entries ----------------------------------------------------------------------

@pytest.mark.parametrize("text, family, address, timeout, default, error", [
    (b"policy:inet:127.0.0.1:10023", "inet", ("127.0.0.1", 10023), None, None, None),
    (b"policy:inet:[::1]:12525 timeout=3", "inet", ("::1", 12525), 3, None, None),
    (b"policy:inet:localhost:1\ttimeout=0  default=DEFER_IF_PERMIT policy down",
     "inet", ("localhost", 1), 0, b"DEFER_IF_PERMIT policy down", None),
    (b"policy:unix:run/postgrey.sock default=DUNNO", "unix", b"run/postgrey.sock", None,
     b"DUNNO", None),
    (b"policy:unix:/a b", "unix", b"/a", None, None, b"bad option b"),
    (b"policy:inet:host", None, None, None, None, b"inet needs HOST:PORT"),
    (b"policy:inet::25", None, None, None, None, b"inet needs HOST:PORT"),
    (b"policy:inet:h:0", None, None, None, None, b"bad port"),
    (b"policy:inet:h:65536", None, None, None, None, b"bad port"),
    (b"policy:inet:h:+25", None, None, None, None, b"bad port"),
    (b"policy:unix:", None, None, None, None, b"unix needs a PATH"),
    (b"policy:tcp:h:1", None, None, None, None, b"needs inet:HOST:PORT or unix:PATH"),
    (b"policy:inet:192.0.2.1:1 timeout=1.5", "inet", ("192.0.2.1", 1), None, None,
     b"bad option timeout=1.5"),
    (b"policy:inet:192.0.2.1:1 default=", "inet", ("192.0.2.1", 1), None, b"", b"empty default="),
    (b"policy:inet:LocalHost:1", "inet", ("LocalHost", 1), None, None, None),
    (b"policy:inet:[fe80::1%lo]:1", "inet", ("fe80::1%lo", 1), None, None, None),
    # a name would be looked up with no time limit (getaddrinfo) at every session
    (b"policy:inet:policy.example:10023", None, None, None, None,
     b"HOST must be an IP address or localhost"),
    (b"policy:inet:[policy.example]:10023", None, None, None, None,
     b"HOST must be an IP address or localhost"),
])
def test_entry_parsing(text, family, address, timeout, default, error):
    pe = policy_entry(text)
    assert (pe.error, pe.timeout, pe.default) == (error, timeout, default)
    if error is None:
        assert (pe.family, pe.address) == (family, address)


def test_other_entries_are_not_policy_entries():
    assert policy_entry(b":echo policy:inet:h:1") is None
    assert policy_entry(b"plugins/policy:x") is None
    assert policy_entry(b"Policy:inet:h:1") is None


def test_config_notes_name_unusable_entries_and_spare_policy_entries_the_space_warning():
    cfg = parse(b"[rcpt]\npolicy:inet:127.0.0.1:10023 timeout=5\npolicy:inet:nohost\n")
    assert cfg.sections == {"rcpt": [b"policy:inet:127.0.0.1:10023 timeout=5",
                                     b"policy:inet:nohost"]}
    assert cfg.notes == [(3, "warning", b"unusable policy entry (inet needs HOST:PORT): "
                                        b"policy:inet:nohost")]


# -- the request ------------------------------------------------------------------

ENV = {b"TCPREMOTEIP": b"192.0.2.1", b"TCPREMOTEHOST": b"client.example",
       b"TCPREMOTEPORT": b"40000", b"TCPLOCALIP": b"127.0.0.1", b"TCPLOCALPORT": b"25",
       b"SMTPHELOHOST": b"h.example", b"SMTPAUTHUSER": b"user", b"SMTPAUTHMETHOD": b"plain"}


def attrs(req: bytes) -> dict:
    assert req.endswith(b"\n\n") and b"\n\n" not in req[:-2]
    return dict(line.split(b"=", 1) for line in req[:-2].split(b"\n"))


def test_request_carries_postfix_attributes():
    f = Facts()
    f.esmtp = True
    f.sender, f.recipient, f.rcpt_count = b"a@b.example", b"x@example.com", 1
    f.instance, f.size = b"1a.2b.3c.1", 1234
    f.tls_protocol, f.tls_cipher, f.tls_bits = b"TLSv1.3", b"TLS_AES_256_GCM_SHA384", 256
    req = request(b"DATA", ENV, f)
    assert req.startswith(b"request=smtpd_access_policy\nprotocol_state=DATA\n")
    a = attrs(req)
    assert {k: a[k] for k in (
        b"protocol_name", b"client_address", b"client_name", b"reverse_client_name",
        b"client_port", b"server_address", b"server_port", b"helo_name", b"sender",
        b"recipient", b"recipient_count", b"queue_id", b"instance", b"size",
        b"sasl_method", b"sasl_username", b"encryption_protocol", b"encryption_cipher",
        b"encryption_keysize")} == {
        b"protocol_name": b"ESMTP", b"client_address": b"192.0.2.1",
        b"client_name": b"client.example", b"reverse_client_name": b"client.example",
        b"client_port": b"40000", b"server_address": b"127.0.0.1", b"server_port": b"25",
        b"helo_name": b"h.example", b"sender": b"a@b.example", b"recipient": b"x@example.com",
        b"recipient_count": b"1", b"queue_id": b"", b"instance": b"1a.2b.3c.1",
        b"size": b"1234", b"sasl_method": b"plain", b"sasl_username": b"user",
        b"encryption_protocol": b"TLSv1.3", b"encryption_cipher": b"TLS_AES_256_GCM_SHA384",
        b"encryption_keysize": b"256"}


def test_request_without_names_and_values_that_would_break_it():
    f = Facts()
    f.sender = b"a\rb\0c@x"  # a C line can put anything but LF into an address
    a = attrs(request(b"CONNECT", {}, f))
    assert a[b"client_name"] == b"unknown" and a[b"helo_name"] == b""
    assert a[b"sender"] == b"a?b?c@x"
    assert a[b"protocol_name"] == b"SMTP" and a[b"encryption_keysize"] == b"0"


# -- answers ----------------------------------------------------------------------

R = b"<x@example.com>: Recipient address rejected: "


@pytest.mark.parametrize("action, kind, text", [
    (b"OK", policy.CONTINUE, b""),
    (b"ok whatever", policy.CONTINUE, b""),
    (b"DUNNO", policy.CONTINUE, b""),
    (b"1764000000", policy.CONTINUE, b""),  # all digits: OK to Postfix
    (b"450", policy.CONTINUE, b""),
    (b"REJECT", policy.REFUSE, b"554 5.7.1 " + R + b"Access denied"),
    (b"reject go away", policy.REFUSE, b"554 5.7.1 " + R + b"go away"),
    (b"REJECT 5.7.0 spam source", policy.REFUSE, b"554 5.7.0 " + R + b"spam source"),
    (b"REJECT 4.7.0 class follows the code", policy.REFUSE,
     b"554 5.7.0 " + R + b"class follows the code"),
    (b"DEFER", policy.REFUSE, b"450 4.7.1 " + R + b"Access denied"),
    (b"DEFER try later", policy.REFUSE, b"450 4.7.1 " + R + b"try later"),
    (b"550 no such user", policy.REFUSE, b"550 5.7.1 " + R + b"no such user"),
    (b"550 5.1.1 no such user", policy.REFUSE, b"550 5.1.1 " + R + b"no such user"),
    (b"550 5.1.8 sender code for a recipient", policy.REFUSE,
     b"550 5.1.2 " + R + b"sender code for a recipient"),
    (b"451 4.3.0 later", policy.REFUSE, b"451 4.3.0 " + R + b"later"),
    (b"421 4.7.0 bye", policy.CLOSE, b"421 4.7.0 " + R + b"bye"),
    (b"521 bye", policy.CLOSE, b"521 5.7.1 " + R + b"bye"),
    (b"DEFER_IF_PERMIT Greylisted", policy.DEFER_IF_PERMIT, b"450 4.7.1 " + R + b"Greylisted"),
    (b"defer_if_reject", policy.DEFER_IF_REJECT, b"450 4.7.1 " + R + b"Service unavailable"),
    (b"PREPEND X-Greylist: delayed 5 seconds", policy.PREPEND, b"X-Greylist: delayed 5 seconds"),
    (b"WARN odd client", policy.CONTINUE, b""),
    (b"INFO fyi", policy.CONTINUE, b""),
    (b"HOLD", policy.CONTINUE, b""),
    (b"DISCARD spam", policy.CONTINUE, b""),
    (b"REDIRECT a@b", policy.CONTINUE, b""),
    (b"FILTER smtp:[127.0.0.1]:10025", policy.CONTINUE, b""),
    (b"RELAY", policy.CONTINUE, b""),  # OK never grants relaying, RELAY neither
    (b"350 not a refusal", policy.CONTINUE, b""),
    (b"PREPEND not a header", policy.CONTINUE, b""),
])
def test_answers(action, kind, text):
    d = decide(action, "rcpt", b"x@example.com")
    assert (d.kind, d.text) == (kind, text)


def test_answer_notes_are_logged_lines():
    assert decide(b"WARN odd client", "rcpt", b"x").note == b"warn: odd client"
    assert decide(b"INFO fyi", "rcpt", b"x").note == b"info: fyi"
    assert decide(b"HOLD quarantine", "rcpt", b"x").note == (
        b"unsupported action, treated as DUNNO: HOLD quarantine")


@pytest.mark.parametrize("phase, name, expected", [
    ("connection", b"client.example[192.0.2.1]",
     b"554 5.7.1 <client.example[192.0.2.1]>: Client host rejected: no"),
    ("helo", b"h", b"554 5.7.1 <h>: Helo command rejected: no"),
    ("mail", b"", b"554 5.7.1 <>: Sender address rejected: no"),
    ("data", b"DATA", b"554 5.7.1 <DATA>: Data command rejected: no"),
    ("body", b"END-OF-MESSAGE", b"554 5.7.1 <END-OF-MESSAGE>: End-of-data rejected: no"),
])
def test_reply_names_what_is_refused(phase, name, expected):
    assert decide(b"REJECT no", phase, name).text == expected


def test_reply_is_one_printable_line_of_at_most_510_bytes():
    d = decide(b"REJECT a\tb\x7fc" + b"x" * 1000, "rcpt", b"x@example.com")
    assert d.text.startswith(b"554 5.7.1 " + R + b"a b c")
    assert len(d.text) == 510


# -- the engine -------------------------------------------------------------------

class StubServers:
    """Answers each request with the next action of its entry's script
    (None: the server failed with `timeout`)."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.requests = []

    def ask(self, entry, req, timeout, phase, name):
        self.requests.append((entry.text, attrs(req), timeout))
        res = policy.Result()
        action = self.script[entry.text].pop(0)
        if action is None:
            res.failure, res.detail = policy.TIMEOUT, b"no answer"
            action = entry.default
        if action is not None:
            res.action = action
            res.decision = decide(action, phase, name)
        return res


def plugin_runner(outputs):
    """A runner for `:` entries: the entry's text after ':' is its output."""
    from qspp.spprun import RunResult

    def run(entry, env, timeout, stdin_fd, apply):
        res = RunResult()
        for line in entry[1:].split(b"|"):
            if line[:1] in b"ANOERD":
                res.terminator = line
                break
            apply(line)
        return res
    return run


def engine(config: bytes, script, env=None):
    e = SppEngine(parse(config), dict(ENV if env is None else env), 60, plugin_runner({}))
    e._servers = StubServers(script)
    return e


P = b"policy:inet:127.0.0.1:10023"


def test_ok_and_dunno_go_on_to_the_next_entry():
    e = engine(b"[helo]\n" + P + b"\n:HX-after: 1|N\n", {P: [b"OK"]})
    assert e.helo(b"h") == (CONTINUE, b"")
    assert e.headers() == b"X-after: 1\n"


def test_refusal_stops_the_section():
    e = engine(b"[mail]\n" + P + b"\n:HX-never: 1\n", {P: [b"REJECT go away"]})
    assert e.mail(b"a@b") == (REFUSED, b"554 5.7.1 <a@b>: Sender address rejected: go away\r\n")
    assert e.headers() == b"" and e.refuser == b"plugin " + P


def test_421_closes():
    e = engine(b"[helo]\n" + P + b"\n", {P: [b"421 4.3.2 shutting down"]})
    assert e.helo(b"h") == (CLOSE, b"421 4.3.2 <h>: Helo command rejected: shutting down\r\n")


def test_prepend_is_h_and_body_prepend_follows_the_354_headers():
    e = engine(b"[rcpt]\n" + P + b"\n[body]\n" + P + b"\n",
               {P: [b"PREPEND X-Greylist: delayed", b"PREPEND X-Body: 1"]})
    e.mail(b"a@b")
    assert e.rcpt(b"x@example.com", True) == (CONTINUE, b"")
    assert e.headers() == b"X-Greylist: delayed\n"
    e.rcpt_accepted()
    e.data()
    e.reset()
    assert e.body(None) == (CONTINUE, b"")
    assert e.body_headers() == b"X-Body: 1\n"


def test_defer_if_permit_is_judged_after_rcpthosts():
    gl = b"450 4.7.1 <x@example.com>: Recipient address rejected: Greylisted\r\n"
    e = engine(b"[rcpt]\n" + P + b"\n", {P: [b"DEFER_IF_PERMIT Greylisted"] * 3})
    e.mail(b"a@b")
    # permitted: the deferral
    assert e.rcpt(b"x@example.com", True) == (REFUSED, gl)
    # qmail refuses (rcpthosts): its own 553 follows, not the deferral
    assert e.rcpt(b"x@example.com", False) == (CONTINUE, b"")
    e2 = engine(b"[rcpt]\n" + P + b"\n:O\n", {P: [b"DEFER_IF_PERMIT Greylisted"]})
    e2.mail(b"a@b")
    assert e2.rcpt(b"x@example.com", False) == (REFUSED, gl)


def test_defer_if_reject_turns_a_later_permanent_refusal_into_the_deferral():
    dr = b"450 4.7.1 <x@example.com>: Recipient address rejected: Service unavailable\r\n"
    e = engine(b"[rcpt]\n" + P + b"\n:P250-note|E550 no\n", {P: [b"DEFER_IF_REJECT"]})
    e.mail(b"a@b")
    assert e.rcpt(b"x@example.com", True) == (REFUSED, b"250-note\r\n" + dr)
    assert e.refuser == b"plugin " + P
    # qmail's own 553 is a permanent refusal too
    e = engine(b"[rcpt]\n" + P + b"\n", {P: [b"DEFER_IF_REJECT"] * 2})
    e.mail(b"a@b")
    assert e.rcpt(b"x@example.com", False) == (REFUSED, dr)
    # permitted: nothing to defer
    assert e.rcpt(b"x@example.com", True) == (CONTINUE, b"")
    # a temporary refusal stands
    e = engine(b"[rcpt]\n" + P + b"\n:E451 later\n", {P: [b"DEFER_IF_REJECT"]})
    e.mail(b"a@b")
    assert e.rcpt(b"x@example.com", True) == (REFUSED, b"451 later\r\n")


def test_the_first_deferral_of_a_kind_counts_and_lasts_one_command():
    e = engine(b"[mail]\n" + P + b"\n" + P + b" timeout=1\n",
               {P: [b"DEFER_IF_PERMIT one", b"DUNNO"],
                P + b" timeout=1": [b"DEFER_IF_PERMIT two", b"DUNNO"]})
    assert e.mail(b"a@b") == (REFUSED, b"450 4.7.1 <a@b>: Sender address rejected: one\r\n")
    assert e.mail(b"a@b") == (CONTINUE, b"")


def test_failure_is_the_plugin_failure_reply_unless_default_says_otherwise():
    e = engine(b"[helo]\n" + P + b"\n", {P: [None]})
    assert e.helo(b"h") == (REFUSED, b"451 qmail-spp failure: " + P + b": timeout (#4.3.0)\r\n")
    d = P + b" default=DUNNO"
    e = engine(b"[helo]\n" + d + b"\n", {d: [None]})
    assert e.helo(b"h") == (CONTINUE, b"")
    d = P + b" default=DEFER_IF_PERMIT 4.3.5 policy server down"
    e = engine(b"[helo]\n" + d + b"\n", {d: [None]})
    assert e.helo(b"h") == (
        REFUSED, b"450 4.3.5 <h>: Helo command rejected: policy server down\r\n")


def test_requests_follow_the_transaction():
    e = engine(b"[connection]\n" + P + b"\n[helo]\n" + P + b"\n[mail]\n" + P + b"\n:Cnew@b\n"
               + b"[rcpt]\n" + P + b"\n[data]\n" + P + b"\n[body]\n" + P + b"\n",
               {P: [b"DUNNO"] * 9})
    reqs = e._servers.requests
    e.connection()
    e.helo(b"h.example", ehlo=True)
    e.mail(b"a@b", size=500)
    e.rcpt(b"x@example.com", True)
    e.rcpt_accepted()
    e.data()
    e.reset()
    e.body(None)
    seen = [(a[b"protocol_state"], a[b"protocol_name"], a[b"sender"], a[b"recipient"],
             a[b"recipient_count"], a[b"size"], bool(a[b"instance"])) for _, a, _ in reqs]
    assert seen == [
        (b"CONNECT", b"SMTP", b"", b"", b"0", b"0", False),
        (b"EHLO", b"ESMTP", b"", b"", b"0", b"0", False),
        (b"MAIL", b"ESMTP", b"a@b", b"", b"0", b"500", True),
        (b"RCPT", b"ESMTP", b"new@b", b"x@example.com", b"0", b"500", True),
        (b"DATA", b"ESMTP", b"new@b", b"x@example.com", b"1", b"500", True),
        (b"END-OF-MESSAGE", b"ESMTP", b"new@b", b"x@example.com", b"1", b"500", True),
    ]
    assert len({a[b"instance"] for _, a, _ in reqs[2:]}) == 1
    e.mail(b"c@d")
    assert reqs[-1][1][b"instance"] != reqs[2][1][b"instance"]


def test_refused_mail_keeps_the_previous_transaction():
    e = engine(b"[mail]\n" + P + b"\n[rcpt]\n" + P + b"\n", {P: [b"DUNNO", b"REJECT", b"DUNNO"]})
    e.mail(b"first@b")
    e.mail(b"second@b")
    e.rcpt(b"x@example.com", True)
    first, _, rcpt = [a for _, a, _ in e._servers.requests]
    assert rcpt[b"sender"] == b"first@b" and rcpt[b"instance"] == first[b"instance"]


def test_recipient_only_when_exactly_one_was_accepted():
    e = engine(b"[data]\n" + P + b"\n", {P: [b"DUNNO"]})
    e.mail(b"a@b")
    for r in (b"x@example.com", b"y@example.com"):
        e.rcpt(r, True)
        e.rcpt_accepted()
    e.data()
    a = e._servers.requests[0][1]
    assert (a[b"recipient"], a[b"recipient_count"]) == (b"", b"2")


def test_entry_timeout_and_spptimeout():
    e = engine(b"[helo]\n" + P + b"\n", {P: [b"DUNNO"]})
    e.helo(b"h")
    assert e._servers.requests[0][2] == 60  # Servers.ask applies timeout= itself


def test_plugins_off_silence_policy_entries_too():
    e = engine(b"[helo]\n:A\n[mail]\n" + P + b"\n", {P: []})
    e.helo(b"h")
    assert e.mail(b"a@b") == (CONTINUE, b"")
    assert e._servers.requests == []


def test_a_config_without_policy_entries_never_imports_the_client():
    e = SppEngine(parse(b"[helo]\n:N\n"), {}, 60, plugin_runner({}))
    assert e._policies is None and e._servers is None


def test_mail_override_then_deferral():
    e = engine(b"[mail]\n" + P + b"\n:O\n", {P: [b"DEFER_IF_PERMIT"]})
    # O is a permit: the deferral wins
    assert e.mail(b"a@b") == (
        REFUSED, b"450 4.7.1 <a@b>: Sender address rejected: Service unavailable\r\n")
