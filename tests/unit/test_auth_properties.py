"""Property-based fuzzing of AUTH and STARTTLS in the sans-IO Session (issue 6).

Three groups of properties, each written from qmail-smtpd.md §8 and sharing no
code with qspp's AUTH implementation:

1. `auth.decode` accepts exactly the canonical base64 strings (those that
   `base64.b64encode(base64.b64decode(x, validate=True))` gives back unchanged),
   returns their bytes, and raises nothing but `auth.Malformed` (§8.2, D6).
2. The AUTH exchange: random dialogues of AUTH commands, exchange lines (valid
   and invalid base64, `*`, empty, very long, lines that look like commands) and
   other commands, fed in random chunks, get exactly the replies a small
   reference model of §8.1-§8.5 predicts; the checkprogram sees only
   well-formed fd 3 data, exactly when the model says; the relay right exists
   exactly after a 235; no exchange line is ever obeyed as a command.
3. STARTTLS (§8.7, D8): whatever came before, the state after `tls_started`
   is that of a fresh connection that only said STARTTLS, except for what the
   server side did (plugin S/U edits stay).

2,000 examples per property, derandomized and without an example database,
like tests/unit/test_session_properties.py (QSPP_EXAMPLES=N changes the count).
"""

import base64
import binascii
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from qspp import auth, replies
from qspp.authmode import AuthMode
from qspp.session import CLOSED, COMMAND

from fakes import Harness, echo, settings as fixture_settings

CI = settings(max_examples=int(os.environ.get("QSPP_EXAMPLES", "2000")), deadline=None,
              derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])

G = b"mx.example.org"
PID = 4242
CLOCK = 1795558454  # fakes.CLOCK: the session's clock
CHALLENGE = b"<%d.%d@%s>" % (PID, CLOCK, G)
CHECK = [b"bin/checkpw", b"/bin/true"]
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def r(line):
    return line + b"\r\n"


OK = r(b"250 ok")
FLUSHED = r(b"250 flushed")
UNIMPLEMENTED = r(b"502 unimplemented (#5.5.1)")
MAIL_FIRST = r(b"503 MAIL first (#5.5.1)")
RCPTHOSTS = r(b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
RCPTHOSTS_TLS = r(b"553 sorry, that domain isn't in my list of allowed rcpthosts; "
                  b"no valid cert for gatewaying (#5.7.1)")
REQUIRED = r(b"530 Authorization required (#5.7.1) ")
HELO_REPLY = r(b"250 " + G)
QUIT_REPLY = r(b"221 " + G)
AUTH_OK = r(b"235 ok, go ahead (#2.0.0)")
FAILED = r(b"535 authentication failed (#5.7.1)")
CANCELED = r(b"501 auth exchange canceled (#5.0.0)")
MALFORMED = r(b"501 malformed auth input (#5.5.4)")
NOT_AVAILABLE = r(b"503 auth not available (#5.3.3)")
ALREADY = r(b"503 you're already authenticated (#5.5.0)")
IN_TRANSACTION = r(b"503 no auth during mail transaction (#5.5.0)")
TYPE = r(b"504 auth type unimplemented (#5.5.1)")
CHILD_CRASHED = b"454 oops, problem with child and I can't auth (#4.3.0)"
WRITE_PIPE = b"454 oops, unable to write pipe and I can't auth (#4.3.0)"
PLUGIN_NO = b"535 plugin says no"
USER_PROMPT = r(b"334 VXNlcm5hbWU6")
PASSWORD_PROMPT = r(b"334 UGFzc3dvcmQ6")
PLAIN_PROMPT = r(b"334 ")
HELP = r(b"214 netqmail home page: http://qmail.org/netqmail")
CRAM_PROMPT = r(b"334 " + base64.b64encode(CHALLENGE))
TLS_READY = r(b"220 ready for tls")

# the mechanism lists of §8.1, by SMTPAUTH value
MECHANISMS = {None: b"LOGIN PLAIN CRAM-MD5", b"-": None, b"!": b"LOGIN PLAIN",
              b"!cram": b"CRAM-MD5", b"cram": b"CRAM-MD5", b"x": b"LOGIN PLAIN"}


def ehlo_reply(smtpauth, starttls=False):
    lines = [G] + ([b"STARTTLS"] if starttls else []) + [b"PIPELINING", b"8BITMIME", b"SIZE 0"]
    if MECHANISMS[smtpauth] is not None:
        lines.append(b"AUTH " + MECHANISMS[smtpauth])
    return b"".join(b"250-" + t + b"\r\n" for t in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"


def canonical(text):
    """The reference decoder: the bytes, or None when TEXT is not canonical base64."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw) == text else None


# ---------------------------------------------------------------- 1. auth.decode

def check_decode(text):
    want = canonical(text)
    try:
        got = auth.decode(text)
    except auth.Malformed:
        got = None
    # any other exception escapes and fails the test
    assert got == want, (text, got, want)


@CI
@given(st.one_of(st.binary(max_size=40),
                 st.text(st.characters(max_codepoint=127), max_size=40).map(str.encode),
                 st.text(ALPHABET.decode() + "=", max_size=24).map(str.encode)))
def test_decode_accepts_exactly_canonical_base64(text):
    check_decode(text)


@CI
@given(raw=st.binary(max_size=30), where=st.integers(0, 10 ** 6),
       new=st.one_of(st.sampled_from(list(ALPHABET + b"=\r\n \0-_.")), st.integers(0, 255)),
       how=st.sampled_from(["replace", "insert", "delete"]))
def test_decode_of_a_mutated_encoding(raw, where, new, how):
    text = base64.b64encode(raw)
    check_decode(text)
    i = where % (len(text) + 1)
    if how == "insert":
        mutated = text[:i] + bytes([new]) + text[i:]
    elif not text:
        return
    elif how == "delete":
        i %= len(text)
        mutated = text[:i] + text[i + 1:]
    else:
        i %= len(text)
        mutated = text[:i] + bytes([new]) + text[i + 1:]
    check_decode(mutated)


# ---------------------------------------------------------------- 2. the AUTH exchange

class CheckProgram:
    """The checkprogram: refuses malformed fd 3 data outright (a test failure),
    accepts user/secret (CRAM-MD5: user/digest with the right challenge), and
    answers with a scripted 454 where the test says so."""

    pid = PID

    def __init__(self, troubles=()):
        self.calls = []
        self.delays = 0
        self.troubles = list(troubles)

    def check(self, argv, data, env):
        assert argv == CHECK
        fields = data.split(b"\0")
        # user \0 secret \0 challenge-or-empty \0: three NUL-free fields, two non-empty
        assert len(fields) == 4 and fields[3] == b"", data
        user, secret, challenge = fields[:3]
        assert user and secret, data
        assert challenge in (b"", CHALLENGE), data
        self.calls.append(data)
        trouble = self.troubles[len(self.calls) % len(self.troubles)] if self.troubles else None
        if trouble is not None:
            return trouble
        if user == b"user" or user == b"refused":
            if secret == (b"digest" if challenge else b"secret"):
                return None
        return replies.AUTH_FAILED

    def delay(self):
        self.delays += 1


class Model:
    """§8.1-§8.5 and the few §4.4 rows the dialogues use, one line at a time."""

    def __init__(self, smtpauth, troubles, plugin):
        self.smtpauth = smtpauth
        self.required = smtpauth is not None and smtpauth.startswith(b"!")
        self.troubles = list(troubles)
        self.plugin = plugin
        self.authenticated = False
        self.user = self.method = None
        self.mail = False
        self.closed = False
        self.step = None  # the exchange: a generator, waiting for the next line
        self.prompt = None  # the last 334 sent
        self.out = b""
        self.calls = []
        self.delays = 0

    # the exchange, as §8.3 describes it
    def _login(self, initial):
        user = initial if initial else (yield USER_PROMPT)
        user = self._decode(user, nul_ok=False)
        password = self._decode((yield PASSWORD_PROMPT), nul_ok=False)
        if not user or not password:
            raise ValueError()
        return user, password, b""

    def _plain(self, initial):
        fields = self._decode(initial if initial else (yield PLAIN_PROMPT), nul_ok=True)
        fields = fields.split(b"\0")
        if len(fields) < 3 or not fields[1] or not fields[2]:
            raise ValueError()
        return fields[1], fields[2], b""

    def _cram(self):
        answer = self._decode((yield CRAM_PROMPT), nul_ok=False)
        user, space, digest = answer.rpartition(b" ")
        if not space or not user or not digest:
            raise ValueError()
        return user, digest, CHALLENGE

    @staticmethod
    def _decode(text, nul_ok):
        raw = canonical(text)
        if raw is None or (not nul_ok and b"\0" in raw):
            raise ValueError()
        return raw

    def _advance(self, line):
        try:
            prompt = self.step.send(line)
        except StopIteration as done:
            self.step = None
            self._check(*done.value)
        except ValueError:
            self.step = None
            self.out += MALFORMED
        else:
            self.prompt = prompt
            self.out += prompt

    def _check(self, user, secret, challenge):
        data = user + b"\0" + secret + b"\0" + challenge + b"\0"
        self.calls.append(data)
        n = len(self.calls)
        trouble = self.troubles[n % len(self.troubles)] if self.troubles else None
        if trouble is not None:
            self.out += r(trouble)
            return
        good = user in (b"user", b"refused") and secret == (b"digest" if challenge else b"secret")
        if not good:
            self.delays += 1
            self.out += FAILED
            return
        if self.plugin and user == b"refused":
            self.out += r(PLUGIN_NO)
            return
        self.authenticated = True
        self.user = user
        self.out += AUTH_OK

    def line(self, raw):
        """RAW: one client line including its LF."""
        line = raw[:-1]
        if line[-1:] == b"\r":
            line = line[:-1]
        if self.closed:
            return
        if self.step is not None:
            if line == b"*":
                self.step = None
                self.out += CANCELED
            elif not line:
                self.step = None
                self.out += MALFORMED
            else:
                self._advance(line)
            return
        line = line.split(b"\0", 1)[0]
        verb, _, arg = line.partition(b" ")
        arg = arg.lstrip(b" ")
        verb = verb.lower()
        if verb == b"auth":
            self._auth(arg)
        elif verb == b"helo":
            self.mail = False
            self.out += HELO_REPLY
        elif verb == b"ehlo":
            self.mail = False
            self.out += ehlo_reply(self.smtpauth)
        elif verb == b"rset":
            self.mail = False
            self.out += FLUSHED
        elif verb == b"noop":
            self.out += OK
        elif verb == b"quit":
            self.closed = True
            self.out += QUIT_REPLY
        elif verb == b"mail":
            assert arg == b"FROM:<a@b>"
            if self.required and not self.authenticated:
                self.out += REQUIRED
            else:
                self.mail = True
                self.out += OK
        elif verb == b"rcpt":
            if not self.mail:
                self.out += MAIL_FIRST
            elif self.authenticated or arg == b"TO:<x@example.org>":
                self.out += OK
            else:
                assert arg == b"TO:<x@far.away>"
                self.out += RCPTHOSTS
        elif verb == b"help":
            self.out += HELP
        else:
            # STARTTLS is unknown here: no certificate (§8.7, D7)
            assert verb not in UNMODELLED, verb
            self.out += UNIMPLEMENTED

    def _auth(self, arg):
        if MECHANISMS[self.smtpauth] is None:
            self.out += NOT_AVAILABLE
            return
        if self.authenticated:
            self.out += ALREADY
            return
        if self.mail:
            self.out += IN_TRANSACTION
            return
        mechanism, _, initial = arg.partition(b" ")
        initial = initial.lstrip(b" ")
        mechanism = mechanism.lower()
        if mechanism == b"login":
            self.step = self._login(initial)
        elif mechanism == b"plain":
            self.step = self._plain(initial)
        elif mechanism == b"cram-md5":
            self.step = self._cram()
        else:
            self.out += TYPE
            return
        self.method = mechanism
        self._advance(None)

    @property
    def in_exchange(self):
        return self.step is not None


b64 = base64.b64encode
# one_of flattens and merges its branches, so weights are repeats inside sampled_from
user_name = st.one_of(
    st.sampled_from([b"user"] * 5 + [b"refused"] * 3
                    + [b"User", b"other", b"", b"us er", b"user ", b"a\0b"]),
    st.binary(max_size=8))
password = st.one_of(
    st.sampled_from([b"secret"] * 5 + [b"digest"] * 4 + [b"wrong", b"", b"secret ", b"se\0cret"]),
    st.binary(max_size=8))
plain_response = st.builds(lambda z, u, p, tail: b64(z + b"\0" + u + b"\0" + p + tail),
                           st.sampled_from([b"", b"admin", b"user"]), user_name, password,
                           st.sampled_from([b"", b"", b"\0", b"\0extra"]))
cram_response = st.builds(lambda u, sep, d: b64(u + sep + d), user_name,
                          st.sampled_from([b" ", b" ", b"", b"  "]), password)
garbage = st.one_of(
    st.sampled_from([b"=", b"==", b"!!!!", b"AHVzZXIAc2VjcmV0=", b"dXNlcg=", b"dXNlcg",
                     b"dXNlcg==x", b"dXNlcg== ", b" dXNlcg==", b"dXNl\0cg==", b"*x", b"**",
                     b"dXNlcg==\r", b"-_-_"]),
    st.binary(max_size=20).filter(lambda b: b"\n" not in b),
)
# lines a client might send as commands: inside an exchange they are data
command_like = st.sampled_from([
    b"QUIT", b"quit", b"UVVJVA==", b"RSET", b"NOOP", b"HELO x", b"MAIL FROM:<a@b>",
    b"RCPT TO:<x@far.away>", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS", b"DATA",
    b"AUTH PLAIN AHVzZXIAc2VjcmV0", b"EHLO", b"HELP", b"ABCD"])
exchange_line = st.one_of(
    st.builds(b64, user_name), st.builds(b64, password), plain_response, cram_response,
    st.sampled_from([b"*", b"", b"dXNlcg==", b"c2VjcmV0", b64(b"user digest")]),
    garbage, command_like,
    # very long lines: a 3-6 kB user name, and as much garbage
    st.integers(3000, 6000).map(lambda n: b64(b"u" * n)),
    st.integers(3000, 6000).map(lambda n: b"A" * n + b"!"),
)
initial = st.one_of(st.sampled_from([b"", b"", b"", b"=", b"AHVzZXIAc2VjcmV0"]), plain_response,
                    st.builds(b64, user_name), garbage)
MECHANISM_NAMES = [b"login", b"plain", b"cram-md5"]
auth_command = st.builds(
    lambda verb, mech, spaces, init: verb + b" " + mech + (spaces + init if init else b""),
    st.sampled_from([b"AUTH", b"auth", b"Auth", b"aUtH"]),
    st.sampled_from([v for m in MECHANISM_NAMES for v in (m, m.upper(), m.title(), m.upper())]
                    + [b"", b"foo", b"cram-md", b"plainx", b"login\t"]),
    st.sampled_from([b" ", b" ", b"  "]), initial)
other_command = st.sampled_from([
    b"NOOP", b"RSET", b"HELO x", b"EHLO c", b"MAIL FROM:<a@b>", b"MAIL FROM:<a@b>",
    b"RCPT TO:<x@far.away>", b"RCPT TO:<x@far.away>", b"RCPT TO:<x@example.org>",
    b"*", b"", b"FOO", b"QUIT", b"AUTH"])
UNMODELLED = (b"data", b"vrfy")
DIALOGUE = {b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>", b"RCPT TO:<x@example.org>"}


def verb_of(line):
    # a CR before the line end goes, so `mail\r` can be MAIL
    return line.split(b"\0", 1)[0].split(b" ", 1)[0].lower().rstrip(b"\r")


def modelled_command(line):
    """A line the model answers exactly when it arrives as a command."""
    verb = verb_of(line)
    if verb in (b"mail", b"rcpt"):
        return line in DIALOGUE
    return verb not in UNMODELLED


def harmless_before_tls(line):
    """As a command, it keeps the session in COMMAND state and leaves TLS off."""
    return modelled_command(line) and verb_of(line) not in (b"quit", b"starttls", b"data")


line_end = st.sampled_from([b"\r\n", b"\r\n", b"\n"])
PROBE = [b"RSET\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<x@far.away>\r\n"]


def auth_harness(smtpauth, troubles, plugin, relayclient=None, remoteinfo=None, tls=False):
    s = fixture_settings(auth=AuthMode(G, CHECK, smtpauth), relayclient=relayclient,
                         remoteinfo=remoteinfo)
    env = {}
    if relayclient is not None:
        env[b"RELAYCLIENT"] = relayclient
    if remoteinfo is not None:
        env[b"TCPREMOTEINFO"] = remoteinfo
    sections, programs = {}, {}
    if plugin:
        def refuse(env):
            return b"E" + PLUGIN_NO + b"\n" if env.get(b"SMTPAUTHUSER") == b"refused" else b""
        sections["auth"] = [b":refuse"]
        programs[b":refuse"] = refuse
    if tls:
        sections["helo"] = [b":edits"]
        programs[b":edits"] = echo(b"SX=1\nSY=helo\nUZ\n")
    h = Harness(settings_=s, env=env, sections=sections, programs=programs, start=False)
    h.auth = CheckProgram(troubles)
    h.session.auth_io = h.auth
    if tls:
        h.session.tls_io = TlsIO()
    h.session.start()
    h.greeting = h.take()
    return h


# built once: hypothesis validates a strategy the first time it draws from it.
# (weight, strategy): most command lines are AUTH; inside an exchange, half the
# lines answer the prompt in its own terms.
AS_COMMAND = ((6, auth_command), (2, other_command),
              (2, exchange_line.filter(lambda b: len(b) < 100 and modelled_command(b))))
IN_EXCHANGE = {
    prompt: ((5, fit), (3, exchange_line), (2, other_command))
    for prompt, fit in ((USER_PROMPT, st.builds(b64, user_name)),
                        (PASSWORD_PROMPT, st.builds(b64, password)),
                        (PLAIN_PROMPT, plain_response), (CRAM_PROMPT, cram_response))}
WHICH = st.integers(0, 9)


def pick(data, choices):
    k = data.draw(WHICH)
    for weight, strategy in choices:
        if k < weight:
            return data.draw(strategy)
        k -= weight
    raise AssertionError(choices)


troubles = st.one_of(st.just(()), st.lists(
    st.sampled_from([None, None, None, CHILD_CRASHED, WRITE_PIPE]), min_size=1, max_size=4))
smtpauth = st.sampled_from([None, None, None, b"-", b"!", b"!cram", b"cram", b"x"])


@CI
@given(data=st.data(), smtpauth=smtpauth, troubles=troubles, plugin=st.booleans(),
       sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5))
def test_auth_exchange_follows_the_model(data, smtpauth, troubles, plugin, sizes):
    model = Model(smtpauth, troubles, plugin)
    lines = []
    for _ in range(data.draw(st.integers(1, 12), label="lines")):
        line = pick(data, IN_EXCHANGE[model.prompt] if model.in_exchange else AS_COMMAND)
        raw = line + data.draw(line_end)
        lines.append(raw)
        model.line(raw)
    for raw in PROBE:
        lines.append(raw)
        model.line(raw)
    stream = b"".join(lines)

    h = auth_harness(smtpauth, troubles, plugin)
    out, pos, i = b"", 0, 0
    # at most ~100 feeds: the harness re-joins its buffer at each one
    least = len(stream) // 100
    while pos < len(stream):
        n = max(sizes[i % len(sizes)], least)
        out += h.feed(stream[pos:pos + n])
        pos += n
        i += 1
    if not model.closed:
        assert h.buf == b""
    assert out == model.out
    assert h.auth.calls == model.calls
    assert h.auth.delays == model.delays
    s = h.session
    assert (s.state == CLOSED) == model.closed
    assert s.authenticated == model.authenticated
    env = h.env
    if model.authenticated:
        assert s.relay == b"" and env[b"RELAYCLIENT"] == b""
        assert env[b"TCPREMOTEINFO"] == model.user == env[b"SMTPAUTHUSER"]
        assert env[b"SMTPAUTHMETHOD"] == model.method
    else:
        assert s.relay is None
        for name in (b"RELAYCLIENT", b"TCPREMOTEINFO", b"SMTPAUTHUSER", b"SMTPAUTHMETHOD"):
            assert name not in env, name
    if not model.closed and not model.in_exchange:
        # the relay right, asked once more in a fresh transaction
        if model.required and not model.authenticated:
            want = REQUIRED + MAIL_FIRST
        else:
            want = OK + (OK if model.authenticated else RCPTHOSTS)
        assert h.feed(b"".join(PROBE)) == FLUSHED + want


@CI
@given(mechanism=st.sampled_from([b"LOGIN", b"PLAIN", b"CRAM-MD5"]),
       hidden=st.sampled_from([b"QUIT", b"UVVJVA==", b"quit", b"RSET", b"STARTTLS",
                               b"MAIL FROM:<a@b>"]),
       end=line_end, cut=st.sampled_from([1, 2, 3, 5, 8, 13, 40]))
def test_command_lines_inside_an_exchange_are_data(mechanism, hidden, end, cut):
    """Whatever an exchange line says, it answers the prompt: a 334 or a 501,
    never 221, never a closed session, never a reply of the verb it names."""
    h = auth_harness(None, (), False)
    stream = b"AUTH " + mechanism + end + hidden + end + b"NOOP" + end
    out = b""
    for i in range(0, len(stream), cut):
        out += h.feed(stream[i:i + cut])
    prompt = {b"LOGIN": USER_PROMPT, b"PLAIN": PLAIN_PROMPT, b"CRAM-MD5": CRAM_PROMPT}[mechanism]
    assert out.startswith(prompt)
    rest = out[len(prompt):]
    if mechanism == b"LOGIN" and canonical(hidden) is not None:
        # a valid user name: the password prompt, and NOOP is the password
        assert rest in (PASSWORD_PROMPT + FAILED, PASSWORD_PROMPT + MALFORMED), rest
    else:
        assert rest in (MALFORMED + OK, FAILED + OK), rest
    assert h.session.state == COMMAND
    assert h.feed(b"NOOP\r\n") == OK


# ---------------------------------------------------------------- 3. STARTTLS

class TlsIO:
    @staticmethod
    def offered():
        return True

    @staticmethod
    def context(env):
        return "ctx", None


CLIENT_SIDE = (b"TCPREMOTEINFO", b"RELAYCLIENT", b"SMTPAUTHUSER", b"SMTPAUTHMETHOD")


def tls_state(s):
    """What a fresh post-TLS connection must look like, and the server-side rest."""
    return dict(tls=s.tls, protocol=s.protocol, helo_name=s.helo_name,
                mail_seen=s.mail_seen, sender=s.sender, rcpt_count=s.rcpt_count,
                pending_envelope=bytes(s.pending_envelope),
                flagged=s.flagged, envelope_size=s.envelope_size,
                authenticated=s.authenticated, relay=s.relay, remoteinfo=s.remoteinfo,
                exchange=s._exchange is not None, tls_request=s.tls_request, state=s.state)


before_tls = st.one_of(
    auth_command, other_command, exchange_line,
    st.sampled_from([b"AUTH PLAIN AHVzZXIAc2VjcmV0", b"AUTH LOGIN dXNlcg==", b"c2VjcmV0",
                     b"AUTH PLAIN " + b64(b"\0refused\0secret"), b"STARTTLS x",
                     b"RCPT TO:<x@example.org>"])).filter(harmless_before_tls)
after_tls = st.sampled_from([
    b"EHLO d", b"HELO d", b"MAIL FROM:<a@b>", b"RCPT TO:<x@far.away>", b"RCPT TO:<x@example.org>",
    b"AUTH PLAIN AHVzZXIAc2VjcmV0", b"AUTH PLAIN " + b64(b"\0user\0wrong"), b"AUTH LOGIN",
    b"dXNlcg==", b"c2VjcmV0", b"*", b"RSET", b"NOOP", b"STARTTLS", b"STARTTLS x", b"DATA",
    b"AUTH PLAIN " + b64(b"\0refused\0secret")])


@CI
@given(before=st.lists(st.tuples(before_tls, line_end), max_size=10),
       after=st.lists(after_tls, max_size=8),
       smtpauth=st.sampled_from([None, b"!", b"cram"]), plugin=st.booleans(),
       relayclient=st.sampled_from([None, b"", b"@relay.suffix"]),
       remoteinfo=st.sampled_from([None, b"ident"]),
       cipher=st.sampled_from([b"TLS_AES_256_GCM_SHA384", b"ECDHE-RSA-AES128-GCM-SHA256"]),
       cut=st.integers(1, 64))
def test_starttls_forgets_the_client(before, after, smtpauth, plugin, relayclient, remoteinfo,
                                     cipher, cut):
    kw = dict(relayclient=relayclient, remoteinfo=remoteinfo, tls=True)
    h = auth_harness(smtpauth, (), plugin, **kw)
    # EHLO first: the [helo] plugin makes its S/U edits, which must survive TLS
    stream = b"EHLO c\r\n" + b"".join(line + end for line, end in before) + b"*\r\n"
    cut = max(cut, len(stream) // 100)
    for i in range(0, len(stream), cut):
        h.feed(stream[i:i + cut])
    assert h.session.state == COMMAND and h.session._exchange is None
    env_before = dict(h.env)
    assert h.feed(b"STARTTLS\r\n") == TLS_READY
    assert h.session.tls_request == "ctx"
    h.session.tls_started(cipher)

    fresh = auth_harness(smtpauth, (), plugin, **kw)
    assert fresh.feed(b"STARTTLS\r\n") == TLS_READY
    fresh.session.tls_started(cipher)

    assert tls_state(h.session) == tls_state(fresh.session)
    # startup values back on the client-side names, the rest as the server left it
    for name in CLIENT_SIDE:
        assert h.env.get(name) == fresh.env.get(name), name
    assert {k: v for k, v in h.env.items() if k not in CLIENT_SIDE} == {
        k: v for k, v in env_before.items() if k not in CLIENT_SIDE}
    assert h.env[b"X"] == b"1" and h.env[b"Y"] == b"helo" and b"Z" not in h.env

    # and from here on it behaves exactly like the fresh one
    for line in after:
        if h.session.state != COMMAND:
            break
        as_command = h.session._exchange is None
        got, want = h.feed(line + b"\r\n"), fresh.feed(line + b"\r\n")
        assert got == want, line
        if line == b"RCPT TO:<x@far.away>" and got.startswith(b"553"):
            assert got == RCPTHOSTS_TLS
        if line.startswith(b"STARTTLS") and as_command:
            assert got == UNIMPLEMENTED  # TLS active: checked before the argument
    assert tls_state(h.session) == tls_state(fresh.session)
    assert h.auth.calls[len(h.auth.calls) - len(fresh.auth.calls):] == fresh.auth.calls
