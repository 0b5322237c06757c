"""Counters and histograms for `qspp serve --metrics HOST:PORT`.

The serve parent maps one shared anonymous region before it forks anything.
The region is a table of rows, one per process that counts (the parent's
own row, then one per worker or session child); a process writes only its
own row, with plain memory stores: no lock, no syscall per event.  The
parent adds the rows up when scraped, and when a child has exited, folds its
row into the parent's private totals and clears it for the next child.

Labels that are not known in advance (plugin and filter names) live in a
small per-row table of names, filled by the row's own process; the parent
merges them by name.  A row holds at most NAMES of them; later names count
under `(other)`, so memory never grows with input.

Rendered as the Prometheus text exposition format, version 0.0.4.
"""

import bisect
import mmap
import selectors
import socket
import time

# bucket upper bounds in microseconds (rendered in seconds)
BOUNDS_US = (1000, 5000, 10000, 50000, 100000, 500000, 1000000, 5000000, 10000000,
             30000000, 120000000)
NB = len(BOUNDS_US) + 1  # the last bucket is +Inf
HIST = NB + 2  # buckets, sum in microseconds, count

# (name, type, help, label name, label values); each value is one slot
COUNTERS = (
    ("qspp_connections_accepted_total", "counter", "Connections accepted.", None, ("",)),
    ("qspp_connections_denied_total", "counter",
     "Connections closed before a session: by tcprules, the per-IP limit, or a PROXY header.",
     "reason", ("rules", "per_ip", "proxy", "error")),
    ("qspp_sessions_total", "counter", "Sessions by how they ended.",
     "end", ("quit", "eof", "timeout", "dropped", "error", "killed")),
    ("qspp_messages_queued_total", "counter", "Messages qmail-queue accepted (250).",
     None, ("",)),
    ("qspp_tls_total", "counter", "STARTTLS outcomes.",
     "result", ("ok", "failed", "refused")),
    ("qspp_auth_total", "counter", "AUTH outcomes.",
     "result", ("ok", "failed", "error", "cancelled")),
)
_INDEX = {}
_n = 0
for _name, _t, _h, _label, _values in COUNTERS:
    for _v in _values:
        _INDEX[_name, _v] = _n
        _n += 1
N_COUNTERS = _n
QUEUE_HIST = N_COUNTERS  # qmail-queue time
FIXED = N_COUNTERS + HIST

# per named source (a plugin, a filter, qmail-smtpd itself, qmail-queue):
# refused with 4xx, refused with 5xx, then a run-time histogram
KINDS = ("smtpd", "queue", "plugin", "filter")
NAMES = 32
NAME_BYTES = 120
PER_NAME = 2 + HIST
OTHER = "(other)"
# row layout in 8-byte words: [fixed][used names][NAMES x PER_NAME][names text]
_NAMES_AT = FIXED + 1
_TEXT_AT = _NAMES_AT + NAMES * PER_NAME
ROW_WORDS = _TEXT_AT + NAMES * (NAME_BYTES // 8)


class Recorder:
    """One process's pen on its own row; every method is a few stores."""

    __slots__ = ("w", "text", "base", "names")

    def __init__(self, words, text, row):
        self.w = words
        self.text = text
        self.base = row * ROW_WORDS
        self.names = {}  # (kind, name) -> word offset of its block

    def count(self, name, value=""):
        self.w[self.base + _INDEX[name, value]] += 1

    def queue_time(self, seconds):
        _observe(self.w, self.base + QUEUE_HIST, seconds)

    def _slot(self, kind, name):
        key = (kind, name)
        at = self.names.get(key)
        if at is not None:
            return at
        used = self.w[self.base + FIXED]
        # the last slot is kept for what does not fit
        if used >= NAMES - 1 and name != OTHER:
            return self._slot(kind, OTHER)
        if used >= NAMES:
            return self._last()
        raw = (kind + "\0" + name).encode("utf-8", "surrogateescape")[:NAME_BYTES - 1]
        off = (self.base + _TEXT_AT) * 8 + used * NAME_BYTES
        self.text[off:off + NAME_BYTES] = raw.ljust(NAME_BYTES, b"\0")
        at = self.base + _NAMES_AT + used * PER_NAME
        # the name is in place before the parent can see the slot in use
        self.w[self.base + FIXED] = used + 1
        self.names[key] = at
        return at

    def _last(self):
        return self.base + _NAMES_AT + (NAMES - 1) * PER_NAME

    def refused(self, kind, name, code):
        """A message or recipient refused with reply CODE, by NAME of KIND."""
        self.w[self._slot(kind, name) + (0 if code < 500 else 1)] += 1

    def run_time(self, kind, name, seconds):
        _observe(self.w, self._slot(kind, name) + 2, seconds)


def _observe(w, at, seconds):
    us = int(seconds * 1e6)
    w[at + bisect.bisect_left(BOUNDS_US, us)] += 1
    w[at + NB] += us
    w[at + NB + 1] += 1


class NullRecorder:
    """The same calls doing nothing, for serve without --metrics."""

    def count(self, name, value=""):
        pass

    def queue_time(self, seconds):
        pass

    def refused(self, kind, name, code):
        pass

    def run_time(self, kind, name, seconds):
        pass


NULL = NullRecorder()


_ENDS = {"quit": "quit", "eof": "eof", "timeout": "timeout", "write timeout": "timeout"}
_TLS = {"ok": "ok", "failed": "failed", "unavailable": "refused"}
_AUTH = {"ok": "ok", "failed": "failed", "refused": "failed", "error": "error",
         "canceled": "cancelled", "malformed": "error", "encryption-required": "error"}


def _source(by: bytes):
    """(kind, name) of who gave a reply, from the journal's `by`."""
    if by == b"qmail":
        return "smtpd", "qmail-smtpd"
    if by == b"queue":
        return "queue", "qmail-queue"
    if by.startswith(b"plugin "):
        by = by[7:]
    name = by.decode("utf-8", "backslashreplace")
    return ("filter" if by.startswith((b"milter", b"policy:")) else "plugin"), name


def _code(reply) -> int:
    head = reply[:3] if reply else b""
    return int(head) if head.isdigit() else 0


class SessionObserver:
    """What a session tells its SPPLOG journal, counted on a Recorder.

    qspp.smtpd wraps its journal (INNER, None without SPPLOG) in this when
    `qspp serve --metrics` runs it: every call is passed on, so the log lines
    are the same with metrics on or off.
    """

    __slots__ = ("inner", "rec")

    def __init__(self, inner, rec):
        self.inner = inner
        self.rec = rec

    def run(self, phase, entry, verdict, exit_status, ms):
        kind = "filter" if entry.startswith((b"milter:", b"policy:")) else "plugin"
        self.rec.run_time(kind, entry.decode("utf-8", "backslashreplace"), ms / 1000.0)
        if self.inner is not None:
            self.inner.run(phase, entry, verdict, exit_status, ms)

    def _refused(self, reply, by):
        code = _code(reply)
        if code >= 400:
            self.rec.refused(*_source(by), code)

    def mail(self, sender, reply, by):
        self._refused(reply, by)
        if self.inner is not None:
            self.inner.mail(sender, reply, by)

    def rcpt(self, recipient, reply, by):
        self._refused(reply, by)
        if self.inner is not None:
            self.inner.rcpt(recipient, reply, by)

    def message(self, size, reply, by):
        if _code(reply) == 250:
            self.rec.count("qspp_messages_queued_total")
        else:
            self._refused(reply, by)
        if self.inner is not None:
            self.inner.message(size, reply, by)

    def auth(self, mechanism, user, outcome):
        self.rec.count("qspp_auth_total", _AUTH.get(outcome, "error"))
        if self.inner is not None:
            self.inner.auth(mechanism, user, outcome)

    def tls(self, outcome, protocol, cipher, refusal):
        self.rec.count("qspp_tls_total", _TLS.get(outcome, "failed"))
        if self.inner is not None:
            self.inner.tls(outcome, protocol, cipher, refusal)

    def summary(self, settings, helo, end):
        self.rec.count("qspp_sessions_total",
                       "dropped" if end.startswith("closed by") else _ENDS.get(end, "error"))
        if self.inner is not None:
            self.inner.summary(settings, helo, end)


class Metrics:
    """The shared table; create in the serve parent before the first fork.

    rows: the most processes counting at once, the parent included (row 0).
    """

    def __init__(self, rows):
        self.rows = rows
        self.map = mmap.mmap(-1, rows * ROW_WORDS * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self.words = memoryview(self.map).cast("Q")
        self.free = list(range(rows - 1, 0, -1))
        self.totals = [0] * FIXED
        self.named = {}  # (kind, name) -> [PER_NAME ints]
        self.parent = Recorder(self.words, self.map, 0)

    def claim(self) -> "int | None":
        """A free row for the next child (call before fork), None if none."""
        return self.free.pop() if self.free else None

    def recorder(self, row) -> "Recorder | NullRecorder":
        """The child's side (after fork): its pen, or NULL without a row."""
        return NULL if row is None else Recorder(self.words, self.map, row)

    def release(self, row) -> None:
        """After the row's process has exited: keep its counts, free the row."""
        if row is None:
            return
        fixed, named = self._read(row)
        self.totals = [a + b for a, b in zip(self.totals, fixed)]
        for key, vals in named.items():
            have = self.named.setdefault(key, [0] * PER_NAME)
            self.named[key] = [a + b for a, b in zip(have, vals)]
        base = row * ROW_WORDS
        self.words[base:base + ROW_WORDS] = memoryview(bytes(ROW_WORDS * 8)).cast("Q")
        self.free.append(row)

    def _read(self, row):
        base = row * ROW_WORDS
        w = self.words
        fixed = list(w[base:base + FIXED])
        named = {}
        used = min(w[base + FIXED], NAMES)
        for i in range(used):
            off = (base + _TEXT_AT) * 8 + i * NAME_BYTES
            raw = bytes(self.map[off:off + NAME_BYTES]).rstrip(b"\0")
            kind, _, name = raw.decode("utf-8", "replace").partition("\0")
            at = base + _NAMES_AT + i * PER_NAME
            vals = list(w[at:at + PER_NAME])
            have = named.get((kind, name))
            named[kind, name] = vals if have is None else [a + b for a, b in zip(have, vals)]
        return fixed, named

    def snapshot(self, live_rows=None):
        """(fixed sums, {(kind, name): sums}) over totals and every row in use."""
        fixed = list(self.totals)
        named = {k: list(v) for k, v in self.named.items()}
        free = set(self.free)
        for row in range(self.rows) if live_rows is None else live_rows:
            if row in free:
                continue
            f, n = self._read(row)
            fixed = [a + b for a, b in zip(fixed, f)]
            for key, vals in n.items():
                have = named.setdefault(key, [0] * PER_NAME)
                named[key] = [a + b for a, b in zip(have, vals)]
        return fixed, named

    def render(self, active=0) -> bytes:
        return render(*self.snapshot(), active=active)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(pairs) -> str:
    if not pairs:
        return ""
    return "{" + ",".join('%s="%s"' % (k, _escape(v)) for k, v in pairs) + "}"


def _seconds(us) -> str:
    return repr(us / 1e6)


def _histogram(out, name, pairs, vals):
    running = 0
    for i, bound in enumerate(BOUNDS_US + (None,)):
        running += vals[i]
        le = "+Inf" if bound is None else _seconds(bound)
        out.append("%s_bucket%s %d" % (name, _labels(pairs + [("le", le)]), running))
    out.append("%s_sum%s %s" % (name, _labels(pairs), _seconds(vals[NB])))
    out.append("%s_count%s %d" % (name, _labels(pairs), vals[NB + 1]))


def render(fixed, named, active=0) -> bytes:
    out = []
    for name, kind, help_, label, values in COUNTERS:
        out.append("# HELP %s %s" % (name, help_))
        out.append("# TYPE %s %s" % (name, kind))
        for v in values:
            pairs = [(label, v)] if label else []
            out.append("%s%s %d" % (name, _labels(pairs), fixed[_INDEX[name, v]]))
    out.append("# HELP qspp_connections_active Sessions running now.")
    out.append("# TYPE qspp_connections_active gauge")
    out.append("qspp_connections_active %d" % active)
    out.append("# HELP qspp_queue_seconds Time qmail-queue took per message.")
    out.append("# TYPE qspp_queue_seconds histogram")
    _histogram(out, "qspp_queue_seconds", [], fixed[QUEUE_HIST:QUEUE_HIST + HIST])
    keys = sorted(named)
    out.append("# HELP qspp_refused_total Messages and recipients refused, by reply class"
               " and by what refused them.")
    out.append("# TYPE qspp_refused_total counter")
    for kind, name in keys:
        vals = named[kind, name]
        for i, cls in enumerate(("4xx", "5xx")):
            out.append("qspp_refused_total%s %d" % (
                _labels([("kind", kind), ("name", name), ("class", cls)]), vals[i]))
    out.append("# HELP qspp_run_seconds Run time of each plugin and filter.")
    out.append("# TYPE qspp_run_seconds histogram")
    for kind, name in keys:
        vals = named[kind, name]
        if kind in ("plugin", "filter"):
            _histogram(out, "qspp_run_seconds", [("kind", kind), ("name", name)], vals[2:])
    return ("\n".join(out) + "\n").encode()


# -- the HTTP side ---------------------------------------------------------------

MAX_REQUEST = 8192
MAX_CLIENTS = 8
CLIENT_TIMEOUT = 5.0
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _response(status: bytes, body: bytes, ctype=b"text/plain; charset=utf-8") -> bytes:
    return (b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


def answer(request_head: bytes, render) -> bytes:
    """The whole response to one request head (up to the empty line)."""
    line = request_head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(b"400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response(b"405 Method Not Allowed", b"GET only\n")
    if target not in (b"/metrics", b"/"):
        return _response(b"404 Not Found", b"try /metrics\n")
    resp = _response(b"200 OK", render(), CONTENT_TYPE)
    if method == b"HEAD":
        resp = resp[:resp.index(b"\r\n\r\n") + 4]
    return resp


class Exporter:
    """A non-blocking HTTP/1.0 responder on a listening socket, driven by the
    serve parent's selector: register(sel), then for every ready key with
    owns(key), call ready(key, events); call expire() now and then (timeout()
    says when).  RENDER() returns the body.  Slow or oversized requests are
    dropped; at most MAX_CLIENTS at once, the rest wait in the backlog."""

    def __init__(self, listener, render, clock=time.monotonic):
        listener.setblocking(False)
        self.listener = listener
        self.render = render
        self.clock = clock
        self.sel = None
        self.paused = False
        self.clients = {}  # fd -> [socket, inbuf, outbuf, deadline]

    def register(self, sel):
        self.sel = sel
        sel.register(self.listener, selectors.EVENT_READ, self)

    def owns(self, key) -> bool:
        return key.data is self

    def ready(self, key, events):
        if key.fileobj is self.listener:
            self._accept()
        else:
            self._client(key.fileobj, events)

    def timeout(self) -> "float | None":
        if not self.clients:
            return None
        return max(0.0, min(c[3] for c in self.clients.values()) - self.clock())

    def expire(self):
        now = self.clock()
        for c in [c for c in self.clients.values() if c[3] <= now]:
            self._close(c[0])

    def close(self):
        for c in list(self.clients.values()):
            self._close(c[0])
        if self.sel is not None and not self.paused:
            self.sel.unregister(self.listener)
        self.listener.close()

    def close_in_child(self):
        """In a forked child: close the sockets only.  The selector's epoll
        descriptor is shared with the parent, so unregistering here would
        take them out of the parent's loop."""
        for c in self.clients.values():
            c[0].close()
        self.clients = {}
        self.listener.close()

    def _accept(self):
        while len(self.clients) < MAX_CLIENTS:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of descriptors: the scraper retries
            conn.setblocking(False)
            self.clients[conn.fileno()] = [conn, b"", b"", self.clock() + CLIENT_TIMEOUT]
            self.sel.register(conn, selectors.EVENT_READ, self)
        if len(self.clients) >= MAX_CLIENTS:
            self.sel.unregister(self.listener)
            self.paused = True

    def _client(self, conn, events):
        c = self.clients.get(conn.fileno())
        if c is None:
            return
        try:
            if c[2]:
                n = conn.send(c[2])
                c[2] = c[2][n:]
                if not c[2]:
                    self._close(conn)
                return
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        c[1] += data
        end = c[1].find(b"\r\n\r\n")
        if end < 0:
            if len(c[1]) > MAX_REQUEST:
                self._close(conn)
            return
        c[2] = answer(c[1][:end], self.render)
        self.sel.modify(conn, selectors.EVENT_WRITE, self)

    def _close(self, conn):
        c = self.clients.pop(conn.fileno(), None)
        if c is None:
            return
        self.sel.unregister(conn)
        conn.close()
        if self.paused:
            self.paused = False
            self.sel.register(self.listener, selectors.EVENT_READ, self)


def listen(host: str, port: int) -> socket.socket:
    """The --metrics socket (IPv6 when HOST has a colon)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    return s
