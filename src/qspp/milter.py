"""Sendmail milter client: protocol versions 2 to 6, as Postfix's smtpd speaks it.

Imported only when `control/smtpmilters` (or the file MILTERS names) exists,
so plain connections never pay for it.  The packet codec and the message view
(`Draft`) do no I/O; `Link` is the one place that touches a socket, with a
deadline on every wait; `Milters` is what the session calls at each step and
turns every milter answer, or failure, into at most one SMTP reply.  The
changes a milter asks for at end of message are carried out by
qspp.milteredit, imported only for a message some milter changes.

What a milter sees and changes is what qmail-queue would get: the Received
line and the plugins' headers included, LF line ends made CRLF on the wire
(OpenDKIM hashes the bytes it is sent), CRLF made LF again on the way back.
"""

import _socket
import errno
import posix
import time

from . import control, inet, replies
from .diag import log

DEFAULT_PATH = b"control/smtpmilters"
DEFAULT_TIMEOUT = 30  # Postfix's milter_command_timeout
DEFAULTS = (b"tempfail", b"accept", b"reject")  # the first is the default default

VERSION = 6
MIN_VERSION = 2
MAX_PACKET = 1 << 20  # what a milter may send in one packet
BODY_CHUNK = 32000  # raw bytes per body packet: CRLF-expanded it stays <= 65535
MAX_HEADER = 64000  # a longer field, and all after it, goes to milters as body
MAX_HEADERS_TOTAL = 1 << 20
MAX_HEADER_COUNT = 2000
PATIENCE = 10  # timeouts one answer may take with progress packets

# actions (SMFIF_*) qspp can carry out, offered in full
ACTIONS = 0x1FF
# protocol steps (SMFIP_*)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
# everything but RCPT_REJ (refused recipients are never shown) and
# HDR_LEADSPC (values go without their leading blanks, as sendmail's)
PROTOCOL = 0xFFFFF & ~P_RCPT_REJ

# the steps: command byte, skip flag, no-reply flag, macro stage (SMFIM_*)
CONNECT = (b"C", P_NOCONNECT, P_NR_CONN, 0)
HELO = (b"H", P_NOHELO, P_NR_HELO, 1)
MAIL = (b"M", P_NOMAIL, P_NR_MAIL, 2)
RCPT = (b"R", P_NORCPT, P_NR_RCPT, 3)
DATA = (b"T", P_NODATA, P_NR_DATA, 4)
HEADER = (b"L", P_NOHDRS, P_NR_HDR, None)
EOH = (b"N", P_NOEOH, P_NR_EOH, 6)
BODY = (b"B", P_NOBODY, P_NR_BODY, None)
EOM = (b"E", 0, 0, 5)

# what a milter may ask at end of message: add, insert and change a header,
# replace the body, add and delete a recipient, change the sender, quarantine
EDIT_COMMANDS = frozenset((b"h", b"i", b"m", b"b", b"+", b"2", b"-", b"e", b"q"))

# SPPLOG's section names for the events a milter answers
_PHASES = {b"C": "connection", b"H": "helo", b"M": "mail", b"R": "rcpt", b"T": "data",
           b"E": "body"}

# the macros sent at each stage unless the milter asks for others (v6)
STAGE_MACROS = {
    0: (b"j", b"_", b"{daemon_name}", b"{if_addr}", b"{client_addr}",
        b"{client_name}", b"{client_port}"),
    1: (b"{tls_version}", b"{cipher}"),
    2: (b"i", b"{auth_type}", b"{auth_authen}", b"{mail_addr}"),
    3: (b"{rcpt_addr}",),
    4: (b"i",),
    5: (b"i",),
    6: (b"i",),
}


class ConfigError(control.ControlError):
    """An unusable milter list: like an unreadable control file, the
    connection gets `421 unable to read controls` and one log line."""

    def __init__(self, text: bytes):
        control.ControlError.__init__(self, DEFAULT_PATH, errno.EINVAL)
        self.text = text

    def __str__(self) -> str:
        return self.text.decode("utf-8", "backslashreplace")


class MilterError(Exception):
    """The milter broke the conversation: its default action applies."""


# -- configuration -----------------------------------------------------------

def _inet_targets(host: bytes, port: bytes):
    try:
        return inet.targets(host.strip(b"[]").decode("ascii"), int(port))
    except UnicodeError:
        return None


class Spec:
    __slots__ = ("address", "timeout", "default")

    def __init__(self, address: bytes, timeout: int = DEFAULT_TIMEOUT,
                 default: bytes = DEFAULTS[0]):
        self.address = address
        self.timeout = timeout
        self.default = default

    def __repr__(self):
        return "Spec(%r, %r, %r)" % (self.address, self.timeout, self.default)


def parse_line(line: bytes) -> Spec:
    """`inet:HOST:PORT` or `unix:PATH`, then `timeout=N` and `default=...`."""
    words = line.split()
    address = words[0]
    kind, _, rest = address.partition(b":")
    if kind == b"inet":
        host, sep, port = rest.rpartition(b":")
        if not sep or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            raise ConfigError(b"bad milter address (inet:HOST:PORT): " + address)
        if host and _inet_targets(host, port) is None:
            raise ConfigError(b"bad milter address (%s): %s" % (inet.NAME_REFUSED, address))
    elif kind in (b"unix", b"local"):
        if not rest:
            raise ConfigError(b"bad milter address (unix:PATH): " + address)
    else:
        raise ConfigError(b"bad milter address (inet: or unix:): " + address)
    spec = Spec(address)
    for word in words[1:]:
        name, eq, value = word.partition(b"=")
        if name == b"timeout" and value.isdigit() and 0 < len(value) < 7 and int(value):
            spec.timeout = int(value)
        elif name == b"default" and value in DEFAULTS:
            spec.default = value
        else:
            raise ConfigError(b"bad milter option: " + word)
    return spec


def parse(lines) -> list:
    return [parse_line(line) for line in lines]


def config_path(env):
    """The milter list a connection reads, or None when NOMILTER is set."""
    if b"NOMILTER" in env:
        return None
    return env.get(b"MILTERS") or DEFAULT_PATH


def load(env) -> list:
    """The connection's milters ([] for none); raises ConfigError or
    control.ControlError (both mean 421 unable to read controls)."""
    path = config_path(env)
    if path is None:
        return []
    lines = control.read_list(path)
    if lines is None:
        if path != DEFAULT_PATH:
            raise control.ControlError(path, errno.ENOENT)
        return []
    try:
        return parse(lines)
    except ConfigError as e:
        raise ConfigError(path + b": " + e.text)


# -- the wire ------------------------------------------------------------------

def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _n(b) -> int:
    return int.from_bytes(b, "big")


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return _u32(len(data) + 1) + cmd + data


def optneg(version=VERSION, actions=ACTIONS, protocol=PROTOCOL) -> bytes:
    return packet(b"O", _u32(version) + _u32(actions) + _u32(protocol))


def parse_optneg(data: bytes):
    """(version, actions, protocol, {stage: [macro names]}) from the milter's O."""
    if len(data) < 12:
        raise MilterError("short option negotiation")
    version, actions, protocol = _n(data[:4]), _n(data[4:8]), _n(data[8:12])
    lists = {}
    rest = data[12:]
    while len(rest) >= 5:
        stage = _n(rest[:4])
        end = rest.find(b"\0", 4)
        if end < 0:
            end = len(rest)
        names = rest[4:end].replace(b",", b" ").split()
        lists[stage] = [n if len(n) == 1 or n[:1] == b"{" else b"{" + n + b"}" for n in names]
        rest = rest[end + 1:]
    return version, actions, protocol, lists


def macro_packet(cmd: bytes, pairs) -> bytes:
    return packet(b"D", cmd + b"".join(n + b"\0" + v + b"\0" for n, v in pairs))


def connect_data(host: bytes, ip: bytes, port: bytes) -> bytes:
    if not ip or ip == b"unknown":
        return host + b"\0U"
    family = b"6" if b":" in ip else b"4"
    p = int(port) if port.isdigit() and int(port) < 65536 else 0
    return host + b"\0" + family + p.to_bytes(2, "big") + ip + b"\0"


def strings(data: bytes):
    """NUL-terminated strings of a packet."""
    if data[-1:] == b"\0":
        data = data[:-1]
    return data.split(b"\0")


def valid_reply(text: bytes) -> bool:
    """A milter's own reply (SMFIR_REPLYCODE): 4xx/5xx lines joined by CRLF."""
    lines = text.split(b"\r\n")
    code = text[:3]
    if not (code[:1] in (b"4", b"5") and code.isdigit()):
        return False
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if line[:3] != code or line[3:4] != (b" " if last else b"-") and not (last and len(line) == 3):
            return False
        if b"\r" in line or b"\n" in line or b"\0" in line:
            return False
    return True


class Decoder:
    """Splits the milter's byte stream into (cmd, data) packets."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self):
        buf = self.buf
        if len(buf) < 4:
            return None
        n = _n(buf[:4])
        if n == 0 or n > MAX_PACKET:
            raise MilterError("bad packet length %d" % n)
        if len(buf) < 4 + n:
            return None
        cmd, data = bytes(buf[4:5]), bytes(buf[5:4 + n])
        del buf[:4 + n]
        return cmd, data


class Link:
    """One milter socket; every wait ends at the milter's timeout."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.sock = None
        self.decoder = Decoder()
        self.out = []
        self.pending = 0

    def open(self) -> None:
        kind, _, rest = self.spec.address.partition(b":")
        deadline = time.monotonic() + self.spec.timeout
        if kind == b"inet":
            host, _, port = rest.rpartition(b":")
            targets = _inet_targets(host or b"127.0.0.1", port)
            if targets is None:  # parse_line refuses such addresses
                raise MilterError("cannot connect: " + inet.NAME_REFUSED.decode())
        else:
            targets = [(_socket.AF_UNIX, rest)]
        self.close()
        try:
            self.sock = inet.connect(targets, deadline)
        except TimeoutError:
            raise MilterError("connect timeout")
        except OSError as e:
            raise MilterError("cannot connect: %s" % (e.strerror or e))
        self.deadline = deadline

    def send(self, data: bytes) -> None:
        """Queued until a reply is awaited or 64 KiB are pending: events that
        need no reply cost no write of their own."""
        self.out.append(data)
        self.pending += len(data)
        if self.pending > 65536:
            self.flush()

    def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out = []
        self.pending = 0
        try:
            self.sock.settimeout(self.spec.timeout)
            self.sock.sendall(data)
        except TimeoutError:
            raise MilterError("write timeout")
        except OSError as e:
            raise MilterError("write error: %s" % (e.strerror or e))

    def receive(self, limit=None):
        """The next packet, waiting at most the timeout (and never past LIMIT,
        a time.monotonic() value)."""
        self.flush()
        deadline = time.monotonic() + self.spec.timeout
        if limit is not None and limit < deadline:
            deadline = limit
        while True:
            got = self.decoder.next()
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise MilterError("timeout")
            try:
                self.sock.settimeout(left)
                data = self.sock.recv(65536)
            except TimeoutError:
                raise MilterError("timeout")
            except OSError as e:
                raise MilterError("read error: %s" % (e.strerror or e))
            if not data:
                raise MilterError("connection closed")
            self.decoder.feed(data)

    def close(self) -> None:
        inet.close(self.sock)
        self.sock = None


# -- the message as qmail-queue will get it ------------------------------------

def _field_name(line: bytes):
    """The name of a header field starting LINE, or None for a non-header line."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")
    if not name:
        return None
    for c in name:
        if c <= 32 or c >= 127:
            return None
    return name


def split_field(raw: bytes):
    """(name, value) as a milter gets them: value without leading blanks and
    without the final LF; folds stay LF as sendmail sends them."""
    colon = raw.find(b":")
    value = raw[colon + 1:]
    if value[-1:] == b"\n":
        value = value[:-1]
    return raw[:colon].rstrip(b" \t"), value.lstrip(b" \t")


class Draft:
    """Headers held in memory (bounded), the body left where it is.

    pieces: the message in order, each bytes or (fd, start, end) in a file.
    """

    def __init__(self, pieces, sender: bytes, recipients):
        self.pieces = pieces
        self.sender = sender
        self.recipients = recipients  # [(address as the milters see it, envelope form)]
        self.headers = []
        self.separator = b""
        self.body = []  # pieces
        self.body_fd = -1  # a replacement body (LF line ends)
        self.edited = False  # the headers or the body differ from the pieces
        self._split()

    def _blocks(self, pieces):
        for p in pieces:
            if isinstance(p, (bytes, bytearray)):
                if p:
                    yield p
                continue
            fd, start, end = p
            while start < end:
                block = posix.pread(fd, min(262144, end - start), start)
                if not block:
                    raise OSError("spool file shrank")
                yield block
                start += len(block)

    def _split(self) -> None:
        """Find the header fields and where the body starts."""
        headers = self.headers
        total = 0
        pending = b""
        offset = 0  # of `pending` in the message
        body_at = None
        for block in self._blocks(self.pieces):
            pending += block
            i = 0
            while body_at is None:
                nl = pending.find(b"\n", i)
                if nl < 0:
                    if len(pending) - i > MAX_HEADER:
                        body_at = offset + i
                    break
                line = pending[i:nl + 1]
                if line == b"\n":
                    self.separator = b"\n"
                    body_at = offset + nl + 1
                elif line[0] in b" \t" and headers:
                    if len(headers[-1]) + len(line) > MAX_HEADER:
                        # the field goes to the body whole
                        last = headers.pop()
                        total -= len(last)
                        body_at = offset + i - len(last)
                        break
                    headers[-1] += line
                    total += len(line)
                elif (_field_name(line) is not None and len(line) <= MAX_HEADER
                      and len(headers) < MAX_HEADER_COUNT and total + len(line) <= MAX_HEADERS_TOTAL):
                    headers.append(line)
                    total += len(line)
                else:
                    body_at = offset + i
                i = nl + 1
            if body_at is not None:
                break
            offset += i
            pending = pending[i:]
        if body_at is None:
            # no body line at all; a header without a final LF is body too
            body_at = offset
        self.body = _slice(self.pieces, body_at)

    # -- what the milters are sent

    def fields(self):
        return [split_field(h) for h in self.headers]

    def body_chunks(self):
        """The body with CRLF line ends, in packets of at most 65535 bytes."""
        if self.body_fd >= 0:
            size = posix.fstat(self.body_fd).st_size
            source = self._blocks([(self.body_fd, 0, size)])
        else:
            source = self._blocks(self.body)
        for block in source:
            for i in range(0, len(block), BODY_CHUNK):
                yield bytes(block[i:i + BODY_CHUNK]).replace(b"\n", b"\r\n")

    # -- what qmail-queue gets

    def envelope(self) -> bytes:
        parts = [b"F", self.sender, b"\0"]
        for _, r in self.recipients:
            parts += (b"T", r, b"\0")
        parts.append(b"\0")
        return b"".join(parts)

    def copy_to(self, queue) -> None:
        if not self.edited:
            for block in self._blocks(self.pieces):
                queue.write(block)
            return
        queue.write(b"".join(self.headers) + self.separator)
        if self.body_fd >= 0:
            size = posix.fstat(self.body_fd).st_size
            body = [(self.body_fd, 0, size)]
        else:
            body = self.body
        for block in self._blocks(body):
            queue.write(block)

    def close(self) -> None:
        if self.body_fd >= 0:
            posix.close(self.body_fd)
            self.body_fd = -1


def _slice(pieces, at: int):
    """The pieces from message offset AT on."""
    out = []
    for p in pieces:
        n = len(p) if isinstance(p, (bytes, bytearray)) else p[2] - p[1]
        if at >= n:
            at -= n
            continue
        if isinstance(p, (bytes, bytearray)):
            out.append(p[at:])
        else:
            out.append((p[0], p[1] + at, p[2]))
        at = 0
    return out


# -- one milter, one connection ------------------------------------------------

class Milter:
    """The state of one milter in a connection."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.link = Link(spec)
        self.version = 0
        self.actions = 0
        self.protocol = 0
        self.macros = {}
        self.off = False  # accepted the connection, or failed with default=accept
        self.message_off = False  # accepted the message
        self.in_message = False  # has been sent MAIL since the last end or abort

    @property
    def name(self) -> bytes:
        return self.spec.address

    def negotiate(self, limit=None) -> None:
        """limit: a time.monotonic() value the answer may not wait past."""
        self.link.open()
        self.link.send(optneg())
        cmd, data = self.link.receive(limit)
        if cmd != b"O":
            raise MilterError("answered option negotiation with %r" % cmd)
        version, actions, protocol, lists = parse_optneg(data)
        if not MIN_VERSION <= version <= VERSION:
            raise MilterError("unsupported protocol version %d" % version)
        self.version = version
        self.actions = actions & ACTIONS
        self.protocol = protocol & PROTOCOL
        if version < 6:
            # no-reply steps and skip came with version 6
            self.protocol &= 0x7F | P_NOUNKNOWN | P_NODATA
        self.macros = lists

    def wants(self, step) -> bool:
        if self.off or step[1] & self.protocol:
            return False
        if step is DATA and self.version < 4:
            return False
        return True

    def send_step(self, step, data: bytes, macros) -> bool:
        """Send one event (and its macros); True when a reply must be read."""
        stage = step[3]
        if stage is not None and macros:
            names = self.macros.get(stage) or STAGE_MACROS[stage]
            pairs = [(n, macros[n]) for n in names if macros.get(n) is not None]
            if pairs:
                self.link.send(macro_packet(step[0], pairs))
        self.link.send(packet(step[0], data))
        return not (step[2] & self.protocol)

    def answer(self, edits=None):
        """The milter's verdict.  EDITS, a list (at end of message): the
        milter's changes collect meanwhile in the milteredit.Edits it gets at
        the first one.  `progress` and each change start a new timeout, but
        one answer never takes more than ten timeouts in all."""
        limit = time.monotonic() + PATIENCE * self.spec.timeout
        while True:
            cmd, data = self.link.receive(limit)
            if cmd == b"p":
                continue
            if edits is not None and cmd in EDIT_COMMANDS:
                if not edits:
                    from .milteredit import Edits
                    edits.append(Edits())
                edits[0].add(cmd, data)
                continue
            if cmd in b"cartsd" and len(cmd) == 1:
                return cmd, data
            if cmd == b"y":
                text = strings(data)[0] if data else b""
                if not valid_reply(text):
                    raise MilterError("bad reply text %r" % text[:80])
                return cmd, text
            raise MilterError("unknown response code %r" % cmd)

    def close(self, polite: bool) -> None:
        if polite and self.link.sock is not None:
            try:
                self.link.send(packet(b"Q"))
                self.link.flush()
            except MilterError:
                pass
        self.link.close()
        self.off = True


# -- what the session calls ------------------------------------------------------

class Verdict:
    """End of message: `reply` refuses it, `discard` drops it, else `draft`
    (sender, recipients and content) goes to qmail-queue."""

    __slots__ = ("reply", "discard", "draft")

    def __init__(self, reply=None, discard=False, draft=None):
        self.reply = reply
        self.discard = discard
        self.draft = draft


def reply_for(cmd: bytes, text: bytes = b""):
    if cmd == b"r":
        return replies.MILTER_REJECT
    if cmd == b"t":
        return replies.MILTER_TEMPFAIL
    if cmd == b"y":
        return text
    return None


_counter = 0


def queue_id() -> bytes:
    """The `i` macro: unique per message on this host."""
    global _counter
    _counter += 1
    return b"%X%05X%X" % (int(time.time()), posix.getpid() & 0xFFFFF, _counter)


class Milters:
    """All milters of one connection, in control-file order."""

    def __init__(self, specs, settings, env):
        self.milters = [Milter(s) for s in specs]
        self.macros = facts(settings, env)
        ip = settings.remoteip
        self._client = connect_data(settings.remotehost or b"[" + ip + b"]", ip,
                                    env.get(b"TCPREMOTEPORT") or b"0")
        self.refusal = None  # once set, every later command gets it
        self.discard = False  # the current message is accepted and dropped
        self.journal = None

    def _fail(self, m: Milter, why) -> None:
        default = m.spec.default
        log(b"milter %s: %s; default %s" % (m.name, str(why).encode("utf-8", "replace"), default))
        m.close(False)
        if default == b"tempfail":
            self.refusal = self.refusal or replies.MILTER_TEMPFAIL
        elif default == b"reject":
            self.refusal = self.refusal or replies.MILTER_REJECT

    def _live(self):
        return [m for m in self.milters if not m.off]

    # -- SMTP steps

    def connect(self) -> None:
        """Negotiate with every milter and send connect; a refusal waits for
        the first command (the greeting goes out as usual)."""
        data = self._client
        for m in self.milters:
            try:
                m.negotiate()
            except MilterError as e:
                self._fail(m, e)
                continue
        reply = self._step(CONNECT, data, session_level=True)
        if reply is not None:
            self.refusal = reply

    def helo(self, name: bytes, tls_version=None, cipher=None):
        if self.refusal is not None:
            return self.refusal
        self.abort()
        self.macros[b"{tls_version}"] = tls_version
        self.macros[b"{cipher}"] = cipher
        return self._step(HELO, name + b"\0", session_level=True)

    def mail(self, sender: bytes, auth_type=None, auth_authen=None):
        if self.refusal is not None:
            return self.refusal
        self.abort()
        self.discard = False
        self.macros[b"i"] = queue_id()
        self.macros[b"{mail_addr}"] = sender
        self.macros[b"{auth_type}"] = auth_type
        self.macros[b"{auth_authen}"] = auth_authen
        for m in self.milters:
            m.message_off = False
            if not m.off:
                m.in_message = True
        reply = self._step(MAIL, b"<" + sender + b">\0")
        if reply is not None:
            self.abort()
        return reply

    def rcpt(self, recipient: bytes):
        if self.refusal is not None:
            return self.refusal
        self.macros[b"{rcpt_addr}"] = recipient
        return self._step(RCPT, b"<" + recipient + b">\0")

    def data(self):
        if self.refusal is not None:
            return self.refusal
        return self._step(DATA, b"")

    def _step(self, step, data: bytes, session_level=False):
        """Send one event to each milter that takes it; the first refusal wins."""
        for m in self.milters:
            if m.off or m.message_off or not m.wants(step):
                continue
            started = time.monotonic()
            try:
                if not m.send_step(step, data, self.macros):
                    continue
                cmd, text = m.answer()
            except MilterError as e:
                self._note(step, m, b"failed", started)
                self._fail(m, e)
                if self.refusal is not None:
                    return self.refusal
                continue
            self._note(step, m, text[:3] if cmd == b"y" else cmd, started)
            if cmd == b"a":
                if session_level:
                    m.close(True)
                else:
                    m.message_off = True
            elif cmd == b"d":
                if not session_level:
                    log(b"milter %s: discard at %s" % (m.name, _PHASES[step[0]].encode()))
                    self.discard = True
                    m.message_off = True
            else:
                reply = reply_for(cmd, text)
                if reply is not None:
                    return reply
        return None

    def _note(self, step, m: Milter, verdict: bytes, started: float) -> None:
        """One SPPLOG run line (and summary entry) per milter answer."""
        if self.journal is not None:
            self.journal.run(_PHASES[step[0]], b"milter:" + m.name, verdict, None,
                             int((time.monotonic() - started) * 1000))

    # -- the message

    def wants_message(self) -> bool:
        return bool(self._live())

    def message(self, pieces, sender: bytes, recipients) -> Verdict:
        """Headers, body and end of message to each milter in turn; each sees
        the message as the milters before it left it."""
        if self.refusal is not None:
            return Verdict(self.refusal)
        draft = Draft(pieces, sender, list(recipients))
        verdict = Verdict(draft=draft)
        try:
            for m in self.milters:
                if m.off or m.message_off or self.discard:
                    continue
                started = time.monotonic()
                try:
                    outcome = self._message_to(m, draft)
                except MilterError as e:
                    self._note(EOM, m, b"failed", started)
                    self._fail(m, e)
                    if self.refusal is not None:
                        verdict.reply = self.refusal
                        break
                    continue
                self._note(EOM, m, b"discard" if self.discard else
                           b"ok" if outcome is None else outcome[:3], started)
                if outcome is not None:
                    verdict.reply = outcome
                    break
        except BaseException:
            draft.close()
            raise
        if self.discard and verdict.reply is None:
            verdict.discard = True
        elif verdict.reply is None and not draft.recipients:
            log(b"milter: every recipient removed; message discarded")
            verdict.discard = True
        if verdict.reply is not None or verdict.discard:
            draft.close()
            verdict.draft = None
            self.abort()
        return verdict

    def end_message(self, draft) -> None:
        """The message is queued, refused or dropped: forget it."""
        if draft is not None:
            draft.close()
        self.abort()

    def _message_to(self, m: Milter, draft: Draft):
        """One milter's view of the message; None when it lets it through."""
        if m.wants(HEADER):
            for name, value in draft.fields():
                if m.send_step(HEADER, name + b"\0" + value + b"\0", self.macros):
                    cmd, text = m.answer()
                    if cmd != b"c":
                        return self._verdict(m, cmd, text, b"during the message")
        if m.wants(EOH):
            if m.send_step(EOH, b"", self.macros):
                cmd, text = m.answer()
                if cmd != b"c":
                    return self._verdict(m, cmd, text, b"during the message")
        if m.wants(BODY):
            for chunk in draft.body_chunks():
                if m.send_step(BODY, chunk, None):
                    cmd, text = m.answer()
                    if cmd == b"s" and m.protocol & P_SKIP:
                        break
                    if cmd != b"c":
                        return self._verdict(m, cmd, text, b"during the message")
        m.send_step(EOM, b"", self.macros)
        edits = []
        try:
            cmd, text = m.answer(edits)
            m.in_message = False  # the verdict ends the milter's message
            if cmd in b"ca":
                if edits:
                    from .milteredit import apply
                    edits[0].finish()
                    apply(draft, edits[0])
                return None
        finally:
            if edits:
                edits[0].close()
        return self._verdict(m, cmd, text, b"at end of message")

    def _verdict(self, m: Milter, cmd: bytes, text: bytes, where: bytes):
        """A verdict that takes no changes: accept and discard end this milter's
        part of the message, a refusal ends the message (its reply)."""
        if cmd == b"a":
            m.message_off = True
            return None
        if cmd == b"d":
            log(b"milter %s: discard %s" % (m.name, where))
            self.discard = True
            return None
        if cmd == b"s":
            raise MilterError("skip %s" % where.decode())
        return reply_for(cmd, text)

    def abort(self) -> None:
        """RSET, a new transaction, or a message that will not be queued."""
        for m in self.milters:
            if m.in_message and not m.off:
                try:
                    m.link.send(packet(b"A"))
                except MilterError as e:
                    self._fail(m, e)
            m.in_message = False

    def close(self) -> None:
        """End of the SMTP connection: QUIT to each milter."""
        for m in self.milters:
            if not m.off:
                m.close(True)


def facts(settings, env) -> dict:
    """The connection macros from what tcpserver and the controls say."""
    ip = settings.remoteip
    host = settings.remotehost
    return {
        b"j": settings.greeting.split(b" ")[0],
        b"_": (host or b"unknown") + b" [" + ip + b"]",
        b"{daemon_name}": b"qspp",
        b"{if_addr}": env.get(b"TCPLOCALIP"),
        b"{client_addr}": ip,
        b"{client_name}": host or b"unknown",
        b"{client_port}": env.get(b"TCPREMOTEPORT"),
    }


def pieces(spool, headers: bytes):
    """The spooled message with the [body] plugins' headers at the mark."""
    return [(spool.fd, 0, spool.split), headers, (spool.fd, spool.split, spool.size)]


# A milter that keeps `qspp check` waiting longer is as good as down, whatever
# its timeout: connecting and negotiating get this much in all.
CHECK_SECONDS = 5


def check(env):
    """For `qspp check`: [(address, ok, text)] after connecting to and
    negotiating with each milter; raises ConfigError or control.ControlError."""
    results = []
    for spec in load(env):
        seconds = min(spec.timeout, CHECK_SECONDS)
        m = Milter(Spec(spec.address, seconds, spec.default))
        try:
            m.negotiate(time.monotonic() + seconds)
        except MilterError as e:
            results.append((spec.address, False, str(e)))
        else:
            results.append((spec.address, True, "protocol version %d, actions 0x%x, steps 0x%x"
                            % (m.version, m.actions, m.protocol)))
        m.close(True)
    return results
