"""tcpserver's `-x rules.cdb`, for `qspp serve`.

A cdb built by tcprules(1) maps an address key to instructions.  The keys a
client is looked up under, in order, stopping at the first key present
(ucspi-tcp 0.88, tcprules(1) "ADDRESSES"):

    INFO@IP          if TCPREMOTEINFO is known (qspp serve never asks identd)
    INFO@=HOST       if TCPREMOTEINFO and TCPREMOTEHOST are known
    IP               the full dotted quad
    =HOST            if TCPREMOTEHOST is known
    IP prefixes      "1.2.3.", "1.2.", "1."
    =.SUFFIX ...     each ".suffix" of HOST, longest first, if HOST is known
    =                if HOST is known
    (empty key)      the default rule

The data of the first key found is a run of NUL-terminated entries, which
tcpserver reads one by one: `D` denies the connection; `+NAME=value` sets
NAME (later entries win, so `+A=1`, `+A=2` leaves 2); a `+` entry without `=`
and any other first byte are ignored, as is a last entry without its NUL.
`allow` compiles to no entries at all.  A present key with empty data is an
allow: the search stops there.

Rules are variables on top of what the listener sets, so a rule may also
override TCPLOCALHOST (tcprules(1)'s own example does).

Debian's ucspi-tcp-ipv6 (checked with its own tcprules and tcprulescheck)
looks up the same keys with TCPREMOTEIP as it sets it: an IPv4 client on a
dual-stack socket under its dotted quad (so `::ffff:` rules never match), an
IPv6 client in that tcpserver's address form (tcpenv.format_ip6).  Its
prefixes end with `.` or `:`: 2001:db8:1:2::5 tries "2001:db8:1:2::",
"2001:db8:1:2:", "2001:db8:1:", "2001:db8:", "2001:", then "".  Its
tcprules writes each key exactly as given (no case folding, no
normalisation, no IPv6 ranges), so a rule must be written in that form.
"""

import os

from .cdb import HEADER_SIZE, Cdb


class RulesError(Exception):
    """A rules file that cannot be used; str() is the one log line's reason."""


class Rule:
    __slots__ = ("key", "deny", "env")

    def __init__(self, key: bytes, deny: bool, env):
        self.key = key
        self.deny = deny
        self.env = env  # [(name, value)] in file order

    def apply(self, environ: dict) -> None:
        for name, value in self.env:
            environ[name] = value

    def __repr__(self):
        return "Rule(key=%r, deny=%r, env=%r)" % (self.key, self.deny, self.env)


def keys(ip: bytes, host: "bytes | None" = None, info: "bytes | None" = None,
         ipv6: bool = False):
    """The keys tcpserver tries for a client, in its order; IPV6: as the
    ucspi-tcp-ipv6 tcpserver, whose prefixes also end at a colon."""
    ends = b".:" if ipv6 else b"."
    if info is not None:
        yield info + b"@" + ip
        if host is not None:
            yield info + b"@=" + host
    yield ip
    if host is not None:
        yield b"=" + host
    # shorter and shorter prefixes that end with a dot (or colon); the full
    # address itself is never tried twice, even when it ends with a colon
    for n in range(len(ip) - 1, 0, -1):
        if ip[n - 1:n] in ends:
            yield ip[:n]
    if host is not None:
        for n in range(len(host)):
            if host[n:n + 1] == b".":
                yield b"=" + host[n:]
        yield b"="
    yield b""


def parse(data: bytes):
    """(deny, [(name, value)]) from a rule's data, as tcpserver's found()."""
    deny = False
    env = []
    start = 0
    while True:
        end = data.find(b"\0", start)
        if end < 0:
            break  # an unterminated tail is not an entry
        entry = data[start:end]
        start = end + 1
        first = entry[:1]
        if first == b"D":
            deny = True
        elif first == b"+":
            eq = entry.find(b"=", 1)
            # an empty name could not be passed on to any program
            if eq > 1:
                env.append((entry[1:eq], entry[eq + 1:]))
    return deny, env


def lookup(cdb: Cdb, ip: bytes, host=None, info=None, ipv6=False) -> "Rule | None":
    """The first matching rule, or None when no key (not even "") is present.

    Raises OSError when the cdb cannot be read, which tcpserver answers by
    dropping the connection ("unable to read").
    """
    for key in keys(ip, host, info, ipv6):
        data = cdb.get(key)
        if data is not None:
            deny, env = parse(data)
            return Rule(key, deny, env)
    return None


def _check_structure(fd: int, path) -> None:
    """Walk the whole file as a cdb: hash tables and records must lie inside it.

    A cdb being written by hand (not by tcprules' rename) or cut short would
    otherwise only fail at some client's lookup.
    """
    size = os.fstat(fd).st_size
    if size < HEADER_SIZE:
        raise RulesError("%d bytes: too short for a cdb" % size)
    data = bytearray()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        data += chunk
        offset += len(chunk)
    if len(data) < size:
        raise RulesError("short read")
    tables_start = size
    for i in range(256):
        pos = int.from_bytes(data[8 * i:8 * i + 4], "little")
        nslots = int.from_bytes(data[8 * i + 4:8 * i + 8], "little")
        if pos < HEADER_SIZE or pos + 8 * nslots > size:
            raise RulesError("hash table %d lies outside the file" % i)
        tables_start = min(tables_start, pos)
        for s in range(nslots):
            at = pos + 8 * s
            recpos = int.from_bytes(data[at + 4:at + 8], "little")
            if recpos and (recpos < HEADER_SIZE or recpos + 8 > size):
                raise RulesError("a slot points outside the file")
    pos = HEADER_SIZE
    while pos < tables_start:
        if pos + 8 > tables_start:
            raise RulesError("record at %d is cut short" % pos)
        klen = int.from_bytes(data[pos:pos + 4], "little")
        dlen = int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8 + klen + dlen
        if pos > tables_start:
            raise RulesError("record data runs into the hash tables")


class Rules:
    """An open, checked rules cdb; lookups read only the bytes they need."""

    def __init__(self, path, cdb: Cdb, signature):
        self.path = path
        self.cdb = cdb
        self.signature = signature

    @classmethod
    def load(cls, path) -> "Rules":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise RulesError(e.strerror) from None
        try:
            st = os.fstat(fd)
            _check_structure(fd, path)
        except OSError as e:
            os.close(fd)
            raise RulesError(e.strerror) from None
        except RulesError:
            os.close(fd)
            raise
        return cls(path, Cdb(fd, path), signature(st))

    def lookup(self, ip: bytes, host=None, info=None, ipv6=False) -> "Rule | None":
        return lookup(self.cdb, ip, host, info, ipv6)

    def close(self) -> None:
        self.cdb.close()


def signature(st) -> tuple:
    """What changes when tcprules renames a new cdb into place (or anyone edits it)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
