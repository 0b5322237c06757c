"""Plugin configuration: which file, how it is parsed, SPPTIMEOUT (spp.md §2, §4.4).

Imported on every connection that may run plugins, so it stays on posix/errno only.
Everything is bytes: the file is never decoded, entries are quoted verbatim in
failure replies.
"""

import errno as _errno
import posix

from . import control

DEFAULT_PATH = b"control/smtpplugins"

# Only the second byte of a header counts (§2.3); keyed by its integer value
# because indexing bytes yields ints.
_SECTION_BY_BYTE = {
    0x63: "connection",  # c
    0x68: "helo",        # h
    0x6D: "mail",        # m
    0x72: "rcpt",        # r
    0x64: "data",        # d
    0x61: "auth",        # a
    0x62: "body",        # b
}
PHASES = ("connection", "helo", "mail", "rcpt", "data", "auth", "body")
_DOCUMENTED = frozenset(b"[" + p.encode() + b"]" for p in PHASES)

DEFAULT_TIMEOUT = 60


class SppConfigError(Exception):
    """The config named by the environment cannot be read: the caller answers
    `421 unable to read controls (#4.3.0)` and exits 1."""

    def __init__(self, path, errno):
        self.path = path
        self.errno = errno
        Exception.__init__(self, path, errno)

    @property
    def text(self):
        """Log text (without the `qspp: pid PID: ` prefix)."""
        return (b"unable to read " + self.path + b": "
                + posix.strerror(self.errno).encode("ascii", "replace"))

    def __str__(self):
        return self.text.decode("ascii", "backslashreplace")


class Config:
    """A parsed plugin config.

    sections: phase name -> entry texts in run order; a key exists only when
        the section has at least one entry, so `"body" in cfg.sections`
        answers "are there [body] entries".
    notes: (lineno, kind, text) for `qspp check`; kind is "warning" or "note",
        text is bytes. Never printed by the engine.
    missing: the default file does not exist (Δ1); message holds the one
        stderr line text then, else None.
    policies: some entry is a `policy:` entry (read once per parse, not by
        every session's engine).
    """

    __slots__ = ("path", "sections", "notes", "missing", "message", "policies")

    def __init__(self, path, sections, notes, missing=False, message=None):
        self.path = path
        self.sections = sections
        self.notes = notes
        self.missing = missing
        self.message = message
        self.policies = any(entry[:7] == POLICY_PREFIX
                            for entries in sections.values() for entry in entries)

    def entries(self, phase):
        return self.sections.get(phase, ())

    def __repr__(self):
        return "Config(%r, %r, missing=%r)" % (self.path, self.sections, self.missing)


def load_config(env):
    """Read the config that NOSPP/SPPCONFFILE select (§2.1), relative to the
    current directory (QMAILHOME).

    Returns None when NOSPP is present. Raises SppConfigError for an unreadable
    file, including a missing SPPCONFFILE file; a missing default file gives an
    empty Config with missing=True.
    """
    if b"NOSPP" in env:
        return None
    path = env.get(b"SPPCONFFILE")
    explicit = bool(path)
    if not explicit:
        path = DEFAULT_PATH
    hit = _parsed.get(path)
    if hit is not None:
        if control.unchanged(path, hit[0]):
            return hit[1]
        del _parsed[path]
    if not explicit and control.known_absent(path):
        return _no_plugins(path)
    try:
        data, st = _read_file(path)
    except OSError as e:
        if e.errno == _errno.ENOENT and not explicit:
            control.found_absent(path)
            return _no_plugins(path)
        raise SppConfigError(path, e.errno or _errno.EIO)
    config = parse(data, path)
    signature = control.reusable(st)
    if signature is not None:
        _parsed[path] = (signature, config)
    return config


def _no_plugins(path):
    text = path + b" does not exist: no plugins"
    return Config(path, {}, [(0, "note", text)], True, text)


# The parsed file, reused as qspp.control reuses what it read: a process that
# serves many sessions (a `qspp serve` worker) then pays one stat for it.
# Sessions only read a Config.
_parsed: "dict[bytes, tuple]" = {}


def _read_file(path):
    # posix.open on a directory succeeds on Linux; the EISDIR comes from read,
    # which is why reading happens inside the same error handling.
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        return control.read_fd(fd), posix.fstat(fd)
    finally:
        posix.close(fd)


def parse(data, path=DEFAULT_PATH):
    """Parse config bytes per §2.2-2.3 into a Config (never raises)."""
    sections = {}
    notes = []
    current = None          # phase name, or None under an ignored header
    seen_header = False
    lineno = 0
    for raw in data.split(b"\n"):
        lineno += 1
        nul = raw.find(b"\0")
        if nul >= 0:
            raw = raw[:nul]
            notes.append((lineno, "note", b"NUL byte: the rest of the line is ignored"))
        text = raw.strip(b" \t\r")
        # 0.42 stripped only trailing SP/HT; keep the difference for `qspp check`.
        old = raw.rstrip(b" \t")
        if old != text:
            if old[:1] in (b" ", b"\t", b"\r"):
                notes.append((lineno, "note",
                              b"leading whitespace/CR stripped; 0.42 reads this line as an entry"))
            elif text[:1] != b"#":
                notes.append((lineno, "note", b"trailing CR stripped; 0.42 keeps it"))
        if not text or text[0] == 0x23:
            continue
        if text[0] == 0x5B:
            seen_header = True
            current = _SECTION_BY_BYTE.get(text[1]) if len(text) > 1 else None
            if text not in _DOCUMENTED:
                if current is None:
                    notes.append((lineno, "warning",
                                  b"header " + text + b" selects no section: its entries never run"))
                else:
                    notes.append((lineno, "warning",
                                  b"header " + text + b" is not a documented name; it selects ["
                                  + current.encode() + b"]"))
            elif current == "body":
                notes.append((lineno, "note", b"[body] is a qspp extension; 0.42 ignores it"))
            continue
        if current is None:
            if seen_header:
                notes.append((lineno, "warning", b"entry under an ignored header never runs: " + text))
            else:
                notes.append((lineno, "warning", b"entry before the first header never runs: " + text))
            continue
        if text[:7] == POLICY_PREFIX:
            pe = policy_entry(text)
            if pe.error is not None:
                notes.append((lineno, "warning",
                              b"unusable policy entry (" + pe.error + b"): " + text))
        elif text[0] != 0x3A and (b" " in text or b"\t" in text):
            notes.append((lineno, "warning",
                          b"entry names a file containing a space or tab (arguments need ':'): " + text))
        lst = sections.get(current)
        if lst is None:
            sections[current] = [text]
        else:
            lst.append(text)
    return Config(path, sections, notes)


POLICY_PREFIX = b"policy:"


class PolicyEntry:
    """A `policy:` entry (Postfix SMTPD policy delegation, README "Plugins").

    family: "inet" or "unix"; address: (host str, port int) or a path (bytes,
    relative to QMAILHOME); timeout: whole seconds, or None for SPPTIMEOUT;
    default: the action taken when the server fails (bytes), or None for the
    plugin-failure 451; error: why the entry cannot be used, else None.
    """

    __slots__ = ("text", "family", "address", "timeout", "default", "error")

    def __init__(self, text):
        self.text = text
        self.family = None
        self.address = None
        self.timeout = None
        self.default = None
        self.error = None

    @property
    def server(self):
        """The endpoint as written (`inet:HOST:PORT`, `unix:PATH`): entries naming
        the same one share a connection."""
        return self.text[7:].split(None, 1)[0] if len(self.text) > 7 else b""

    def __repr__(self):
        return "PolicyEntry(%r, %r, %r, timeout=%r, default=%r, error=%r)" % (
            self.text, self.family, self.address, self.timeout, self.default, self.error)


def policy_entry(entry):
    """The PolicyEntry for a `policy:` entry, None for any other entry.

    `policy:inet:HOST:PORT` (HOST may be `[IPv6]`) or `policy:unix:PATH`, then
    options after whitespace: `timeout=SECONDS`, and `default=ACTION`, which
    takes the rest of the line (an action may hold spaces) so it comes last.
    """
    if entry[:7] != POLICY_PREFIX:
        return None
    pe = PolicyEntry(entry)
    parts = entry[7:].split(None, 1)
    endpoint = parts[0] if parts else b""
    options = parts[1] if len(parts) > 1 else b""
    if endpoint[:5] == b"inet:":
        hostport = endpoint[5:]
        colon = hostport.rfind(b":")
        host, port = hostport[:colon], hostport[colon + 1:]
        if host[:1] == b"[" and host[-1:] == b"]":
            host = host[1:-1]
        if colon <= 0 or not host:
            pe.error = b"inet needs HOST:PORT"
        elif not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            pe.error = b"bad port"
        else:
            try:
                pe.address = (host.decode("ascii"), int(port))
                pe.family = "inet"
            except UnicodeDecodeError:
                pe.error = b"bad host"
            else:
                from . import inet
                if inet.targets(*pe.address) is None:
                    pe.error = inet.NAME_REFUSED
    elif endpoint[:5] == b"unix:":
        if len(endpoint) == 5:
            pe.error = b"unix needs a PATH"
        else:
            pe.family = "unix"
            pe.address = endpoint[5:]
    else:
        pe.error = b"needs inet:HOST:PORT or unix:PATH"
    while options and pe.error is None:
        if options[:8] == b"default=":
            pe.default = options[8:]
            if not pe.default:
                pe.error = b"empty default="
            break
        split = options.split(None, 1)
        word = split[0]
        options = split[1] if len(split) > 1 else b""
        if word[:8] == b"timeout=" and word[8:].isdigit() and len(word) <= 18:
            pe.timeout = int(word[8:])
        else:
            pe.error = b"bad option " + word
    return pe


def entry_argv(entry):
    """argv for an entry (§2.4); argv[0] is also the path to exec, unsearched."""
    if entry[:1] == b":":
        return [b"/bin/sh", b"-c", entry[1:]]
    return [entry]


def spptimeout(env):
    """(seconds, warning) from SPPTIMEOUT (§4.4). 0 means no limit; warning is
    the stderr line text (no prefix) for an invalid value, else None."""
    v = env.get(b"SPPTIMEOUT")
    if not v:
        return DEFAULT_TIMEOUT, None
    # bytes.isdigit is ASCII-only, so signs, spaces, '.' and non-ASCII digits fail.
    if not v.isdigit():
        return DEFAULT_TIMEOUT, (b"SPPTIMEOUT=" + _printable(v)
                                 + b" is not a non-negative integer: using 60")
    v = v.lstrip(b"0")
    # Beyond ~31 years the limit is moot; capping also avoids Python 3.11's
    # int-from-string digit limit on absurd values.
    if len(v) > 10:
        return 10 ** 10, None
    return int(v or b"0"), None


def _printable(b):
    # The warning must stay one log line whatever the variable holds.
    out = bytearray()
    for c in b[:200]:
        if 0x20 <= c < 0x7F and c != 0x5C:
            out.append(c)
        else:
            out += b"\\x%02x" % c
    if len(b) > 200:
        out += b"..."
    return bytes(out)
