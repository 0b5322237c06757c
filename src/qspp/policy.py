"""Postfix SMTPD policy delegation: the client side of `policy:` entries.

A request is `name=value` lines and an empty line; the answer is one
`action=...` line and an empty line (Postfix's SMTPD_POLICY_README). The
server keeps the connection open, so a session opens one connection per
server and asks every question over it.

The answer is judged the way Postfix's access(5) actions are: OK and DUNNO
continue, REJECT/DEFER/4NN/5NN refuse with Postfix's reply wording, the
DEFER_IF_* pair is remembered until the command's checks are over, PREPEND
adds a header. Anything qmail has no place for is logged and ignored.

Imported only by a connection whose config has a `policy:` entry. It uses
`_socket` rather than `socket`, whose Python layer (enum, selectors...) would
cost every such connection a few milliseconds.
"""

import _socket
import time

from . import inet
from .diag import log

# The failure WHATs of `451 qmail-spp failure: ENTRY: WHAT (#4.3.0)` (spp.md §4.5).
CANT_CONNECT = b"can't connect"
TIMEOUT = b"timeout"
CLOSED = b"connection closed"
BAD_ANSWER = b"bad answer"
TOO_LONG = b"answer too long"
BAD_ENTRY = b"bad policy entry"

# An answer is one short line; anything this long is a broken or hostile peer.
MAX_ANSWER = 65536
_READ_SIZE = 65536

# What a decision asks the engine to do.
CONTINUE = 0
REFUSE = 1
CLOSE = 2
DEFER_IF_PERMIT = 3
DEFER_IF_REJECT = 4
PREPEND = 5

# Postfix's protocol_state for each section; [auth] has no Postfix state and
# gets its own.
STATES = {"connection": b"CONNECT", "helo": b"HELO", "mail": b"MAIL", "rcpt": b"RCPT",
          "data": b"DATA", "body": b"END-OF-MESSAGE", "auth": b"AUTH"}

# What Postfix calls the thing a reply refuses, by section.
_CLASSES = {"connection": b"Client host", "helo": b"Helo command", "mail": b"Sender address",
            "rcpt": b"Recipient address", "data": b"Data command", "body": b"End-of-data",
            "auth": b"SASL login name"}
SENDER_CLASS = _CLASSES["mail"]
RECIPIENT_CLASS = _CLASSES["rcpt"]

_monotonic = time.monotonic


class Failure(Exception):
    """The server could not give an answer: what (a WHAT above) and detail (log text)."""

    def __init__(self, what, detail=b""):
        Exception.__init__(self, what, detail)
        self.what = what
        self.detail = detail


class _Broken(Exception):
    """The connection failed before any byte of the answer: worth one reconnect."""


def _reason(e) -> bytes:
    return (e.strerror or type(e).__name__).encode("ascii", "replace")


class Client:
    """One policy server, one connection kept across requests."""

    __slots__ = ("family", "address", "sock", "connects")

    def __init__(self, family, address):
        self.family = family
        self.address = address
        self.sock = None
        self.connects = 0

    def close(self) -> None:
        inet.close(self.sock)
        self.sock = None

    def _connect(self, deadline) -> None:
        if self.family == "unix":
            targets = [(_socket.AF_UNIX, self.address)]
        else:
            targets = inet.targets(*self.address)
            if targets is None:  # policy_entry refuses such entries
                raise Failure(BAD_ENTRY, inet.NAME_REFUSED)
        try:
            sock = inet.connect(targets, deadline)
        except TimeoutError:
            raise Failure(TIMEOUT, b"connecting")
        except OSError as e:
            raise Failure(CANT_CONNECT, _reason(e))
        if self.family != "unix":
            try:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.sock = sock
        self.connects += 1

    def ask(self, request: bytes, deadline) -> bytes:
        """Send one request, return the answer's action value.

        deadline: a time.monotonic() value, or None for no limit. A kept
        connection the server has meanwhile closed is replaced once; any other
        trouble raises Failure, and the connection is closed so that the next
        request starts clean.
        """
        may_retry = self.sock is not None
        while True:
            if self.sock is None:
                self._connect(deadline)
            try:
                return self._exchange(request, deadline)
            except _Broken as e:
                self.close()
                if not may_retry:
                    raise Failure(CLOSED, e.args[0])
                may_retry = False
            except Failure:
                self.close()
                raise
            except BaseException:
                self.close()
                raise

    def _exchange(self, request, deadline) -> bytes:
        sock = self.sock
        try:
            _settimeout(sock, deadline)
            sock.sendall(request)
        except TimeoutError:
            raise Failure(TIMEOUT, b"sending")
        except OSError as e:
            raise _Broken(b"sending: " + _reason(e))
        buf = b""
        while True:
            try:
                _settimeout(sock, deadline)
                data = sock.recv(_READ_SIZE)
            except TimeoutError:
                raise Failure(TIMEOUT, b"no answer" if not buf else b"answer unfinished")
            except OSError as e:
                if not buf:
                    raise _Broken(b"reading: " + _reason(e))
                raise Failure(CLOSED, b"reading: " + _reason(e))
            if not data:
                if not buf:
                    raise _Broken(b"closed before answering")
                raise Failure(CLOSED, b"closed in the middle of the answer")
            buf += data
            end = _answer_end(buf)
            if end is None:
                if len(buf) > MAX_ANSWER:
                    raise Failure(TOO_LONG, b"over %d bytes" % MAX_ANSWER)
                continue
            if end > MAX_ANSWER:
                raise Failure(TOO_LONG, b"over %d bytes" % MAX_ANSWER)
            if end < len(buf):
                # More than one answer to one request: the next would read a
                # stale one. This answer stands; the connection does not.
                log(b"policy server sent more than one answer; reconnecting next time")
                self.close()
            return _action(buf[:end])


def _settimeout(sock, deadline) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - _monotonic()
    if left <= 0:
        raise TimeoutError()
    sock.settimeout(left)


def _answer_end(buf: bytes):
    """Offset just past the empty line that ends the answer, or None yet."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return None
        if nl == pos or (nl == pos + 1 and buf[pos] == 0x0D):
            return nl + 1
        pos = nl + 1


def _action(answer: bytes) -> bytes:
    action = None
    for line in answer.split(b"\n"):
        if line[-1:] == b"\r":
            line = line[:-1]
        if not line:
            break
        eq = line.find(b"=")
        if eq <= 0:
            raise Failure(BAD_ANSWER, b"not name=value: " + _printable(line[:200]))
        if line[:eq] == b"action" and action is None:
            action = line[eq + 1:]
    if not action or not action.strip():
        raise Failure(BAD_ANSWER, b"no action")
    return action


# -- the request ------------------------------------------------------------------

_UNSAFE = bytes.maketrans(b"\n\r\0", b"???")


def _value(v) -> bytes:
    # A newline in a value would end the request early or forge an attribute.
    if b"\n" in v or b"\r" in v or b"\0" in v:
        return v.translate(_UNSAFE)
    return v


class Facts:
    """What a request reports beyond the environment (the engine keeps it)."""

    __slots__ = ("esmtp", "sender", "recipient", "rcpt_count", "instance", "size",
                 "tls_protocol", "tls_cipher", "tls_bits")

    def __init__(self):
        self.esmtp = False
        self.sender = b""
        self.recipient = b""
        self.rcpt_count = 0
        self.instance = b""
        self.size = 0
        self.tls_protocol = b""
        self.tls_cipher = b""
        self.tls_bits = 0


def request(state: bytes, env, facts: Facts) -> bytes:
    """The request for protocol_state STATE, with the attributes Postfix sends."""
    host = env.get(b"TCPREMOTEHOST") or b"unknown"
    helo = env.get(b"SMTPHELOHOST", b"") if state != b"CONNECT" else b""
    attrs = (
        (b"request", b"smtpd_access_policy"),
        (b"protocol_state", state),
        (b"protocol_name", b"ESMTP" if facts.esmtp else b"SMTP"),
        (b"client_address", env.get(b"TCPREMOTEIP", b"")),
        (b"client_name", host),
        (b"reverse_client_name", host),
        (b"client_port", env.get(b"TCPREMOTEPORT", b"")),
        (b"server_address", env.get(b"TCPLOCALIP", b"")),
        (b"server_port", env.get(b"TCPLOCALPORT", b"")),
        (b"helo_name", helo),
        (b"sender", facts.sender),
        (b"recipient", facts.recipient),
        (b"recipient_count", b"%d" % facts.rcpt_count),
        (b"queue_id", b""),
        (b"instance", facts.instance),
        (b"size", b"%d" % facts.size),
        (b"sasl_method", env.get(b"SMTPAUTHMETHOD", b"")),
        (b"sasl_username", env.get(b"SMTPAUTHUSER", b"")),
        (b"sasl_sender", b""),
        (b"ccert_subject", b""),
        (b"ccert_issuer", b""),
        (b"ccert_fingerprint", b""),
        (b"ccert_pubkey_fingerprint", b""),
        (b"encryption_protocol", facts.tls_protocol),
        (b"encryption_cipher", facts.tls_cipher),
        (b"encryption_keysize", b"%d" % facts.tls_bits),
        (b"etrn_domain", b""),
        (b"stress", b""),
    )
    return b"".join([name + b"=" + _value(value) + b"\n" for name, value in attrs]) + b"\n"


# -- the answer -----------------------------------------------------------------

class Decision:
    """kind: CONTINUE, REFUSE, CLOSE, DEFER_IF_PERMIT, DEFER_IF_REJECT or PREPEND;
    text: the reply line (no CRLF) or the header; note: a log line or None;
    word: the action's verb for the SPPLOG run line."""

    __slots__ = ("kind", "text", "note", "word")

    def __init__(self, kind, text=b"", note=None, word=b""):
        self.kind = kind
        self.text = text
        self.note = note
        self.word = word

    def __repr__(self):
        return "Decision(%r, %r, note=%r, word=%r)" % (self.kind, self.text, self.note, self.word)


def decide(action: bytes, phase: str, name: bytes) -> Decision:
    """What an action means for a command of PHASE that refers to NAME (the
    client, HELO name, sender, recipient...), as Postfix's access(5) reads it."""
    parts = action.strip(b" \t").split(None, 1)
    verb = parts[0] if parts else b""
    text = parts[1].strip(b" \t") if len(parts) > 1 else b""
    word = verb.upper()
    cls = _CLASSES[phase]
    if word in (b"OK", b"DUNNO") or verb.isdigit() and not text:
        # An all-numeric action is OK to Postfix (a time stamp some servers use).
        return Decision(CONTINUE, word=b"OK" if verb.isdigit() else word)
    if word == b"REJECT":
        return Decision(REFUSE, reply(554, b"5.7.1", text, cls, name, b"Access denied"), word=word)
    if word == b"DEFER":
        return Decision(REFUSE, reply(450, b"4.7.1", text, cls, name, b"Access denied"), word=word)
    if word == b"DEFER_IF_PERMIT":
        return Decision(DEFER_IF_PERMIT, reply(450, b"4.7.1", text, cls, name,
                                               b"Service unavailable"), word=word)
    if word == b"DEFER_IF_REJECT":
        return Decision(DEFER_IF_REJECT, reply(450, b"4.7.1", text, cls, name,
                                               b"Service unavailable"), word=word)
    if len(verb) == 3 and verb[:1] in b"45" and verb.isdigit() and text:
        line = reply(int(verb), verb[:1] + b".7.1", text, cls, name, b"Access denied")
        # 421 and 521 end the session in Postfix as they do in qmail.
        return Decision(CLOSE if verb in (b"421", b"521") else REFUSE, line, word=verb)
    if word == b"PREPEND":
        if not _is_header(text):
            return Decision(CONTINUE, note=b"PREPEND without a header: ignored: "
                            + _printable(text[:200]), word=word)
        return Decision(PREPEND, _printable(text), word=word)
    if word in (b"WARN", b"INFO"):
        return Decision(CONTINUE, note=word.lower() + b": " + _printable(text), word=word)
    return Decision(CONTINUE, note=b"unsupported action, treated as DUNNO: "
                    + _printable(action[:200]), word=b"unsupported")


def reply(code: int, default_dsn: bytes, text: bytes, cls: bytes, name: bytes,
          generic: bytes) -> bytes:
    """Postfix's reply to a refusing action: `CODE D.S.N <NAME>: CLASS rejected: TEXT`.

    A text that starts with an enhanced status code supplies it; its class digit
    always follows the reply code, and an address-status code is made to fit
    what is refused (sender or recipient), as Postfix does.
    """
    dsn, rest = _split_dsn(text, default_dsn)
    dsn = _fix_dsn(dsn, cls)
    line = b"%d %s <%s>: %s rejected: %s" % (code, b"%c" % (0x30 + code // 100) + dsn[1:],
                                               name, cls, rest or generic)
    return _printable(line[:510])


def _split_dsn(text: bytes, default: bytes):
    word, _, rest = text.partition(b" ")
    fields = word.split(b".")
    if (len(fields) == 3 and fields[0] in (b"2", b"4", b"5")
            and all(f.isdigit() and 0 < len(f) <= 3 for f in fields[1:])):
        return word, rest.lstrip(b" \t")
    return default, text


# The address-status detail of a recipient code read as a sender code, and the
# reverse (RFC 3463 X.1.Y); Postfix maps them so a refusal names the right party.
_SENDER_DSN = {b"1": b"1.7", b"2": b"1.8", b"3": b"1.7", b"4": b"1.7", b"5": b"1.0",
               b"6": b"1.7", b"7": b"1.7", b"8": b"1.8"}
_RECIPIENT_DSN = {b"1": b"1.1", b"2": b"1.2", b"3": b"1.3", b"4": b"1.4", b"5": b"1.5",
                  b"6": b"1.6", b"7": b"1.3", b"8": b"1.2"}


def _fix_dsn(dsn: bytes, cls: bytes) -> bytes:
    if dsn[1:4] != b".1.":
        return dsn
    if cls == SENDER_CLASS:
        return dsn[:2] + _SENDER_DSN.get(dsn[4:], b"1.0")
    if cls == RECIPIENT_CLASS:
        return dsn[:2] + _RECIPIENT_DSN.get(dsn[4:], b"1.0")
    return dsn[:2] + b"0.0"


def _is_header(text: bytes) -> bool:
    colon = text.find(b":")
    if colon <= 0:
        return False
    name = text[:colon].rstrip(b" \t")
    return bool(name) and all(0x21 <= c <= 0x7E for c in name)


def _printable(b: bytes) -> bytes:
    # One reply line, one log line: control bytes become spaces, as Postfix does.
    for c in b:
        if c < 0x20 or c == 0x7F:
            return bytes(c if 0x20 <= c != 0x7F else 0x20 for c in b)
    return b


# -- the session's servers --------------------------------------------------------

class Result:
    """One policy run: decision (None after a failure without default=),
    failure and detail (None, or what went wrong), elapsed (seconds)."""

    __slots__ = ("decision", "failure", "detail", "elapsed", "action")

    def __init__(self):
        self.decision = None
        self.failure = None
        self.detail = b""
        self.elapsed = 0.0
        self.action = None


class Servers:
    """The policy connections of one session, one per server."""

    def __init__(self):
        self.clients = {}

    def client(self, entry):
        key = (entry.family, entry.address)
        c = self.clients.get(key)
        if c is None:
            c = self.clients[key] = Client(entry.family, entry.address)
        return c

    def ask(self, entry, req: bytes, timeout, phase: str, name: bytes) -> Result:
        """Ask ENTRY's server; timeout in whole seconds, 0 or None for no limit
        (the entry's own timeout= wins over the one given)."""
        res = Result()
        t0 = _monotonic()
        if entry.timeout is not None:
            timeout = entry.timeout
        action = None
        if entry.error is not None:
            res.failure, res.detail = BAD_ENTRY, entry.error
        else:
            deadline = t0 + timeout if timeout else None
            try:
                action = self.client(entry).ask(req, deadline)
            except Failure as f:
                res.failure, res.detail = f.what, f.detail
        if res.failure is not None:
            action = entry.default
        if action is not None:
            res.action = action
            res.decision = decide(action, phase, name)
        res.elapsed = _monotonic() - t0
        return res

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


# A server that keeps `qspp check` waiting longer is as good as down, whatever
# the entry's timeout.
PROBE_SECONDS = 5


def probe(entry, timeout=0):
    """For `qspp check`: connect to ENTRY's server and close again, waiting as
    long as a session would (the entry's timeout=, else TIMEOUT, 0 for none)
    but at most PROBE_SECONDS. Returns None when it accepted the connection,
    else (WHAT, detail)."""
    if entry.error is not None:
        return BAD_ENTRY, entry.error
    seconds = entry.timeout if entry.timeout is not None else timeout
    seconds = min(seconds or PROBE_SECONDS, PROBE_SECONDS)
    c = Client(entry.family, entry.address)
    try:
        c._connect(_monotonic() + seconds)
    except Failure as f:
        return f.what, f.detail
    finally:
        c.close()
    return None

