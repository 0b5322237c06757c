"""Control files, rcpthosts, badmailfrom and this host's IPv4 addresses.

Parsing follows qmail's control.c and rcpthosts.c rather than a cleaner idea
of the formats, because administrators' files (CRLF endings, stray blanks,
overlong numbers) must give exactly the behaviour netqmail gives them.

Absent means ENOENT and nothing else; every other failure is a ControlError,
which the session turns into `421 unable to read controls (#4.3.0)`.
"""


import posix
import sys
from time import time as _time

from qspp.cdb import Cdb

_RDONLY = posix.O_RDONLY | posix.O_NONBLOCK
_CHUNK = 65536
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


class ControlError(Exception):
    """A control file exists but could not be read."""

    def __init__(self, path, err: int) -> None:
        super().__init__(path, err)
        self.path = path
        self.errno = err

    def __str__(self) -> str:
        path = self.path
        if isinstance(path, bytes):
            path = path.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
        return "unable to read %s: %s" % (path, posix.strerror(self.errno))


class NoLocalIPs(Exception):
    """This host's interface addresses could not be listed."""


def _open(path) -> "int | None":
    # O_NONBLOCK as qmail's open_read, so a FIFO in control/ cannot hang us.
    try:
        return posix.open(path, _RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ControlError(path, e.errno) from None


# What _read returned for a regular file, reused while the file is unchanged.
# A process that serves many connections (a `qspp serve` worker, or a parent
# that reads the files before it forks) then pays one stat per file instead of
# open, read and close; a process that serves one connection pays one fstat.
# qmail reads control files at every connection, so a change must show from
# the next one: the key is the file's identity and its change time, and a file
# changed less than _SETTLED seconds before it was read is never reused, so a
# second change within one tick of a coarse clock cannot hide behind an equal
# ctime.  Any later change, chmod included, sets ctime past the stored one.
_cache: "dict[tuple, tuple]" = {}
_SETTLED = 2.0
_S_IFMT = 0o170000
_S_IFREG = 0o100000


def _signature(st) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def reusable(st) -> "tuple | None":
    """What to compare a later stat with before reusing what was read from a
    file with status ST: None when it must be read again every time (not a
    regular file, or changed within the last _SETTLED seconds)."""
    if st.st_mode & _S_IFMT == _S_IFREG and _time() - st.st_ctime > _SETTLED:
        return _signature(st)
    return None


def unchanged(path, signature) -> bool:
    try:
        return _signature(posix.stat(path)) == signature
    except OSError:
        return False


# Files found absent, by path: the directory that would hold them and its
# signature as it was then.  No file appears in a directory without changing
# the directory's mtime and ctime, so while it is unchanged one stat of it per
# connection stands for every absent file in it: a `qspp serve` worker would
# otherwise fail to open half a dozen files at every connection, each failure
# an exception.  Only a process that serves many connections sets
# remember_absent; a process that serves one would only pay for the records.
# A dangling symbolic link is never remembered (its target may appear
# anywhere), nor a directory changed less than _SETTLED seconds ago.
remember_absent = False
_absent: "dict[bytes, tuple]" = {}  # path: (directory, signature)
_dirs_now: "dict[bytes, tuple]" = {}  # each directory's stat, this connection


def new_connection() -> None:
    """Forget the directory stats taken for the connection before."""
    _dirs_now.clear()


def _directory(path):
    """The directory part of PATH (str or bytes, as it came)."""
    if isinstance(path, bytes):
        slash, here = path.rfind(b"/"), b"."
    else:
        slash, here = path.rfind("/"), "."
    if slash < 0:
        return here
    return path[:slash] or path[:1]  # "/x": the root


def known_absent(path) -> bool:
    """PATH was found absent, and the directory that would hold it has not
    changed since."""
    hit = _absent.get(path)
    if hit is None:
        return False
    directory, then = hit
    now = _dirs_now.get(directory)
    if now is None:  # the first look at it this connection
        try:
            now = _signature(posix.stat(directory))
        except OSError:
            now = ()
        _dirs_now[directory] = now
    if now == then:
        return True
    del _absent[path]
    return False


def found_absent(path) -> None:
    """PATH failed to open with ENOENT just now: remembered where that is safe."""
    if not remember_absent:
        return
    try:
        posix.lstat(path)
        return  # a dangling symbolic link
    except FileNotFoundError:
        pass
    except OSError:
        return
    directory = _directory(path)
    try:
        st = posix.stat(directory)
    except OSError:
        return
    if _time() - st.st_ctime > _SETTLED:
        _absent[path] = (directory, _signature(st))


def _read(path, first_line: bool) -> "bytes | None":
    key = (path, first_line)
    hit = _cache.get(key)
    if hit is not None:
        if unchanged(path, hit[0]):
            return hit[1]
        del _cache[key]
    if known_absent(path):
        return None
    fd = _open(path)
    if fd is None:
        found_absent(path)
        return None
    try:
        data = read_fd(fd, first_line)
        st = posix.fstat(fd)
    except OSError as e:
        raise ControlError(path, e.errno) from None
    finally:
        posix.close(fd)
    signature = reusable(st)
    if signature is not None:
        _cache[key] = (signature, data)
    return data


def read_fd(fd: int, first_line: bool = False) -> bytes:
    """FD's content to its end (with FIRST_LINE: up to the first LF, excluded)."""
    chunks = []
    while True:
        chunk = posix.read(fd, _CHUNK)
        if not chunk:
            return b"".join(chunks)
        if first_line:
            # qmail reads only up to the first LF; stopping there keeps a
            # read error further into the file from mattering, as there.
            lf = chunk.find(b"\n")
            if lf >= 0:
                chunks.append(chunk[:lf])
                return b"".join(chunks)
        chunks.append(chunk)


def read_line(path) -> "bytes | None":
    """The `line` class: first line, trailing blanks stripped, CR kept."""
    line = _read(path, True)
    if line is None:
        return None
    return line.rstrip(b" \t")


def scan_ulong(s: bytes) -> "tuple[int, int]":
    """(value, digits used) of s's leading ASCII digits, as djb's scan_ulong.

    The value wraps modulo 2**64 like the C unsigned long it emulates.
    """
    n = 0
    end = len(s)
    while n < end and 0x30 <= s[n] <= 0x39:
        n += 1
    if not n:
        return 0, 0
    # 10**64 is a multiple of 2**64, so the last 64 digits decide the value;
    # this also keeps int() clear of its digit limit.
    return int(s[max(0, n - 64):n]) & _MASK64, n


def _narrow(value: int, signed: bool) -> int:
    # control_readint stores into a C int (databytes is read through an
    # unsigned int), so only the low 32 bits survive.
    value &= _MASK32
    if signed and value >= 0x80000000:
        value -= 0x100000000
    return value


def leading_int(s: bytes, signed: bool = False) -> "int | None":
    """s's leading ASCII digits as a 32-bit C int, or None if none."""
    value, used = scan_ulong(s)
    if not used:
        return None
    return _narrow(value, signed)


def read_int(path, signed: bool = False) -> "int | None":
    """The `int` class: None if absent or no leading digit.

    The value wraps to 32 bits, unsigned (databytes) or signed (timeoutsmtpd).
    """
    line = read_line(path)
    if line is None:
        return None
    return leading_int(line, signed)


def timeout_smtpd(value: "int | None") -> int:
    """Seconds per read/write from control/timeoutsmtpd's read_int value."""
    if value is None:
        return 1200
    value = _narrow(value, True)
    return value if value > 0 else 1


def databytes(control_value: "int | None", env_value: "bytes | None") -> int:
    """Effective databytes, 0 meaning unlimited.

    control_value is read_int("control/databytes"); env_value is DATABYTES
    as set (b"" counts as set and gives 0).
    """
    if env_value is not None:
        value = scan_ulong(env_value)[0]
    elif control_value is not None:
        value = control_value
    else:
        value = 0
    value &= _MASK32
    # netqmail: `if (!(databytes + 1)) --databytes;` keeps the size arithmetic
    # in DATA from wrapping.
    if value == _MASK32:
        value -= 1
    return value


def read_list(path) -> "list[bytes] | None":
    """The `list` class, as the entries qmail's constmap ends up holding.

    control_readfile NUL-terminates each kept line and constmap splits the
    result at NULs, so a NUL inside a line separates entries (possibly empty
    ones) and a line starting with NUL is dropped like an empty one.
    """
    data = _read(path, False)
    if data is None:
        return None
    return _entries(data)


def _entries(data: bytes) -> "list[bytes]":
    entries = []
    for line in data.split(b"\n"):
        line = line.rstrip(b" \t")
        if not line or line[0] == 0x23 or line[0] == 0:
            continue
        if b"\0" in line:
            entries.extend(line.split(b"\0"))
        else:
            entries.append(line)
    return entries


# rcpthosts and badmailfrom as the sets they are looked up in, by path: (the
# content they were built from, the set).  _read hands out the very object it
# keeps while a file is unchanged, so a worker builds a set again only when its
# file changed (a 1,000-line rcpthosts costs 0.3 ms to build).
_sets: "dict[object, tuple]" = {}


def read_lowered(path) -> "frozenset | None":
    """read_list's entries lowercased, as a set; None when the file is absent."""
    data = _read(path, False)
    if data is None:
        return None
    hit = _sets.get(path)
    if hit is not None and hit[0] is data:
        return hit[1]
    lowered = _lowered(_entries(data))
    _sets[path] = (data, lowered)
    return lowered


def _lowered(entries) -> "frozenset | None":
    """ENTRIES lowercased, as the set rcpthosts and badmailfrom look up in."""
    return None if entries is None else frozenset(e.lower() for e in entries)


# bytes, as every other control path: a str one would be another key for the
# same directory in _dirs_now, and its stat taken twice per connection
RCPTHOSTS = b"control/rcpthosts"
MORERCPTHOSTS = b"control/morercpthosts.cdb"
BADMAILFROM = b"control/badmailfrom"


class Rcpthosts:
    """rcpthosts plus morercpthosts.cdb; see allows()."""

    __slots__ = ("_hosts", "_cdb", "_cdb_path")

    def __init__(self, entries: "list[bytes] | None", cdb: "Cdb | None" = None, *,
                 lowered: "frozenset | None" = None) -> None:
        # None means rcpthosts is absent: everything is allowed and the cdb
        # is ignored, as rcpthosts.c never opens it then.
        if lowered is None:
            lowered = _lowered(entries)
        self._hosts = lowered
        self._cdb = cdb if lowered is not None else None
        self._cdb_path = getattr(cdb, "path", MORERCPTHOSTS)

    @classmethod
    def load(cls, rcpthosts=RCPTHOSTS, morercpthosts=MORERCPTHOSTS) -> "Rcpthosts":
        hosts = read_lowered(rcpthosts)
        if hosts is None:
            return cls(None)
        if known_absent(morercpthosts):
            return cls(None, None, lowered=hosts)
        try:
            cdb = Cdb.open(morercpthosts)
        except OSError as e:
            raise ControlError(morercpthosts, e.errno) from None
        if cdb is None:
            found_absent(morercpthosts)
        return cls(None, cdb, lowered=hosts)

    @property
    def present(self) -> bool:
        return self._hosts is not None

    def allows(self, addr: bytes) -> bool:
        hosts = self._hosts
        if hosts is None:
            return True
        at = addr.rfind(b"@")
        if at < 0:
            return True
        domain = addr[at + 1:].lower()
        # The domain, then every suffix that starts at a dot, longest first.
        candidates = [domain] if domain else []
        dot = domain.find(b".", 1)
        while dot >= 0:
            candidates.append(domain[dot:])
            dot = domain.find(b".", dot + 1)
        for c in candidates:
            if c in hosts:
                return True
        cdb = self._cdb
        if cdb is not None:
            try:
                for c in candidates:
                    if c in cdb:
                        return True
            except OSError as e:
                raise ControlError(self._cdb_path, e.errno) from None
        return False

    def close(self) -> None:
        if self._cdb is not None:
            self._cdb.close()
            self._cdb = None


class Badmailfrom:
    """badmailfrom entries; flags() is netqmail's bmfcheck()."""

    __slots__ = ("_entries",)

    def __init__(self, entries: "list[bytes] | None", *, lowered: "frozenset | None" = None) -> None:
        if lowered is None:
            lowered = _lowered(entries)
        self._entries = lowered

    @classmethod
    def load(cls, path=BADMAILFROM) -> "Badmailfrom":
        return cls(None, lowered=read_lowered(path))

    @property
    def present(self) -> bool:
        return self._entries is not None

    def flags(self, sender: bytes) -> bool:
        entries = self._entries
        if not entries:
            return False
        # An empty sender is looked up like any other and so can only match
        # an empty entry, which read_list yields only from a NUL in the file.
        if sender.lower() in entries:
            return True
        at = sender.rfind(b"@")
        return at >= 0 and sender[at:].lower() in entries


# ---- this host's IPv4 addresses (localiphost, spec 5.4) ----

_local_ips: "frozenset | None" = None

_SIOCGIFCONF = 0x8912
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFNAMSIZ = 16


def _list_interfaces() -> frozenset:
    # qmail's ipme_init(): SIOCGIFCONF for every IPv4 address, kept when
    # SIOCGIFFLAGS says its interface is up, plus 0.0.0.0 always.  The
    # modules are imported here because only an address literal needs them.
    if not sys.platform.startswith("linux"):
        raise NoLocalIPs("interface listing is implemented for Linux only")
    try:
        import _socket
        import array
        import fcntl
        import struct
    except ImportError as e:
        raise NoLocalIPs(str(e)) from None

    # struct ifreq: the name, then a union whose largest member is struct
    # ifmap (24 bytes on LP64, 16 on ILP32) or a struct sockaddr (16).
    ifreq_size = _IFNAMSIZ + max(16, struct.calcsize("LLHBBB0L"))
    try:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    except OSError as e:
        raise NoLocalIPs(str(e)) from None
    try:
        fd = sock.fileno()
        size = 256
        while True:
            buf = array.array("B", bytes(size))
            ifconf = struct.pack("iP", size, buf.buffer_info()[0])
            try:
                used = struct.unpack("iP", fcntl.ioctl(fd, _SIOCGIFCONF, ifconf))[0]
            except OSError:
                used = None
            # Linux silently truncates the list to the buffer; like qmail,
            # trust it only with room to spare.
            if used is not None and used + ifreq_size + 64 < size:
                break
            if size > 200000:
                raise NoLocalIPs("SIOCGIFCONF failed")
            size += 100 + (size >> 2)
        data = buf.tobytes()[:used]
        found = {b"0.0.0.0"}
        for off in range(0, len(data) - ifreq_size + 1, ifreq_size):
            rec = data[off:off + ifreq_size]
            family = struct.unpack("H", rec[16:18])[0]
            if family != _socket.AF_INET:
                continue
            ip = b"%d.%d.%d.%d" % tuple(rec[20:24])
            req = rec[:_IFNAMSIZ] + bytes(ifreq_size - _IFNAMSIZ)
            try:
                flags = struct.unpack("h", fcntl.ioctl(fd, _SIOCGIFFLAGS, req)[16:18])[0]
            except OSError:
                continue
            if flags & _IFF_UP:
                found.add(ip)
        return frozenset(found)
    finally:
        sock.close()


def local_ipv4_addresses() -> frozenset:
    """This host's up IPv4 addresses as b"a.b.c.d", listed once; NoLocalIPs."""
    global _local_ips
    if _local_ips is None:
        _local_ips = _list_interfaces()
    return _local_ips


def local_ipv4(addr: bytes) -> bool:
    """is_local_ip for address.parse: addr is normalised b"a.b.c.d"."""
    return addr in local_ipv4_addresses()


is_local_ip = local_ipv4
