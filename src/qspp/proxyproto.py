"""The PROXY protocol header a load balancer puts in front of a connection.

Versions 1 (one text line) and 2 (binary), as HAProxy's proxy-protocol.txt
defines them.  `parse` works on bytes only; `read_header` takes them from a
socket without ever consuming a byte of what follows, so the SMTP session
finds the client's first command (if the client pipelined one) where it was.
`ProxyFrom` is the `--proxy-from CIDR[,CIDR...]` list.

Nothing here is imported by `qspp.smtpd`: only the `qspp serve` parent and
its children use it.
"""

import socket
import time

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest valid line, CR LF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
TIMEOUT = 5.0

# v2 address block sizes by family nibble: INET, INET6, UNIX
_V2_BLOCK = {0x1: 12, 0x2: 36, 0x3: 216}


class ProxyError(Exception):
    """A header that must not be trusted; str() is the log line's reason."""


class Header:
    """What the balancer said about the connection.

    local: True when the connection's own addresses stand (v2 LOCAL, as used
    by health checks; v1 UNKNOWN; v2 PROXY with an unspecified family).
    source, dest: (family, packed address, port) of the real client and of
    the address it connected to; None when local.
    length: the header's size in bytes.
    """

    __slots__ = ("version", "local", "source", "dest", "length")

    def __init__(self, version, local, source, dest, length):
        self.version = version
        self.local = local
        self.source = source
        self.dest = dest
        self.length = length

    def __repr__(self):
        return "Header(v%d, local=%r, source=%r, dest=%r, length=%d)" % (
            self.version, self.local, self.source, self.dest, self.length)


def _port(field: bytes) -> int:
    # decimal 0..65535 without sign, space or leading zero, so one port has
    # one spelling
    if not field.isdigit() or not field.isascii() or len(field) > 5 \
            or (len(field) > 1 and field[:1] == b"0"):
        raise ProxyError("bad port %r" % field[:8])
    port = int(field)
    if port > 65535:
        raise ProxyError("bad port %r" % field)
    return port


def _ipv4(field: bytes) -> bytes:
    parts = field.split(b".")
    if len(parts) != 4:
        raise ProxyError("bad IPv4 address %r" % field[:40])
    out = bytearray()
    for p in parts:
        # no leading zeros: "010" is octal to some parsers, decimal to others
        if not p.isdigit() or not p.isascii() or len(p) > 3 \
                or (len(p) > 1 and p[:1] == b"0") or int(p) > 255:
            raise ProxyError("bad IPv4 address %r" % field[:40])
        out.append(int(p))
    return bytes(out)


def _ipv6(field: bytes) -> bytes:
    # inet_pton's grammar; a zone index ("%eth0") is not an address
    if not field or len(field) > 45 or not all(
            c in b"0123456789abcdefABCDEF:." for c in field):
        raise ProxyError("bad IPv6 address %r" % field[:45])
    try:
        return socket.inet_pton(socket.AF_INET6, field.decode("ascii"))
    except (OSError, ValueError):
        raise ProxyError("bad IPv6 address %r" % field) from None


def parse_v1(data: bytes) -> "Header | None":
    """The v1 line at the start of DATA; None while its end has not arrived."""
    lf = data.find(b"\n", 0, V1_MAX)
    if lf < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("v1 line longer than %d bytes" % V1_MAX)
        if b"\r" in data[:-1]:
            raise ProxyError("v1 line has a CR before its end")
        return None
    length = lf + 1
    if lf == 0 or data[lf - 1:lf] != b"\r":
        raise ProxyError("v1 line does not end in CR LF")
    line = data[:lf - 1]
    if not line.startswith(V1_PREFIX):
        raise ProxyError("not a v1 line")
    if b"\r" in line:
        raise ProxyError("v1 line has a CR before its end")
    fields = line.split(b" ")
    proto = fields[1]
    if proto == b"UNKNOWN":
        # the sender could not say; the rest of the line is to be ignored
        return Header(1, True, None, None, length)
    if proto == b"TCP4":
        family, address = socket.AF_INET, _ipv4
    elif proto == b"TCP6":
        family, address = socket.AF_INET6, _ipv6
    else:
        raise ProxyError("v1 protocol %r is not TCP4, TCP6 or UNKNOWN" % proto[:16])
    if len(fields) != 6:
        raise ProxyError("v1 line has %d fields, not 6" % len(fields))
    src, dst = address(fields[2]), address(fields[3])
    sport, dport = _port(fields[4]), _port(fields[5])
    return Header(1, False, (family, src, sport), (family, dst, dport), length)


def _check_tlvs(block: bytes) -> None:
    # TLVs carry nothing qspp uses, but they must tile the rest exactly
    pos = 0
    while pos < len(block):
        if pos + 3 > len(block):
            raise ProxyError("v2 TLV header cut short")
        pos += 3 + int.from_bytes(block[pos + 1:pos + 3], "big")
        if pos > len(block):
            raise ProxyError("v2 TLV value runs past the header")


def parse_v2(data: bytes) -> "Header | None":
    """The v2 header at the start of DATA; None while part of it is missing."""
    if len(data) < V2_FIXED:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyError("not a v2 signature")
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyError("not a v2 signature")
    ver_cmd, fam_proto = data[12], data[13]
    size = int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyError("v2 version nibble is %d" % (ver_cmd >> 4))
    command = ver_cmd & 0xF
    if command > 1:
        raise ProxyError("v2 command %d is neither LOCAL nor PROXY" % command)
    length = V2_FIXED + size
    if len(data) < length:
        return None
    body = data[V2_FIXED:length]
    if command == 0:
        # LOCAL: the balancer speaks for itself (a health check); the block,
        # whatever it holds, is to be skipped
        return Header(2, True, None, None, length)
    family, proto = fam_proto >> 4, fam_proto & 0xF
    if family == 0:
        # UNSPEC: the spec says to keep the real endpoints, as for LOCAL
        return Header(2, True, None, None, length)
    need = _V2_BLOCK.get(family)
    if need is None:
        raise ProxyError("v2 address family %d is unknown" % family)
    if proto != 1:
        raise ProxyError("v2 transport %d is not STREAM" % proto)
    if family == 0x3:
        raise ProxyError("v2 AF_UNIX addresses cannot name a TCP client")
    if size < need:
        raise ProxyError("v2 length %d is shorter than the %d-byte address block"
                         % (size, need))
    _check_tlvs(body[need:])
    if family == 0x1:
        af, n = socket.AF_INET, 4
    else:
        af, n = socket.AF_INET6, 16
    src, dst = body[:n], body[n:2 * n]
    sport = int.from_bytes(body[2 * n:2 * n + 2], "big")
    dport = int.from_bytes(body[2 * n + 2:2 * n + 4], "big")
    return Header(2, False, (af, src, sport), (af, dst, dport), length)


def version(data: bytes) -> "int | None":
    """1 or 2 from the first bytes; None if they could still be either."""
    if not data:
        return None
    if data[:1] == b"P":
        if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
            raise ProxyError("no PROXY header")
        return 1
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyError("no PROXY header")
        return 2
    raise ProxyError("no PROXY header")


def parse(data: bytes) -> "Header | None":
    """The header at the start of DATA, None if more bytes are needed.

    Raises ProxyError for anything but a valid header.  Header.length bytes
    belong to it; the rest is the client's.
    """
    v = version(data)
    if v is None:
        return None
    return parse_v1(data) if v == 1 else parse_v2(data)


def read_header(sock, timeout: float = TIMEOUT, clock=time.monotonic) -> Header:
    """Read one header from SOCK, all of it within TIMEOUT seconds in total.

    Never reads a byte past the header: a v1 line is peeked at and only its
    bytes up to LF are taken; a v2 header is taken as 16 bytes, then its
    stated length.  Raises ProxyError (timeout, early end of stream, bad
    header).  SOCK's timeout is restored before returning.
    """
    deadline = clock() + timeout
    saved = sock.gettimeout()

    def recv(n, flags=0):
        left = deadline - clock()
        if left <= 0:
            raise ProxyError("no complete PROXY header within %g s" % timeout)
        sock.settimeout(left)
        try:
            chunk = sock.recv(n, flags)
        except socket.timeout:
            raise ProxyError("no complete PROXY header within %g s" % timeout) from None
        except OSError as e:
            raise ProxyError("reading the PROXY header: %s" % e.strerror) from None
        if not chunk:
            raise ProxyError("connection closed %s" % (
                "in the PROXY header" if buf else "before a PROXY header"))
        return chunk

    buf = bytearray()
    try:
        v = None
        while v is None:
            v = version(bytes(buf) + recv(1, socket.MSG_PEEK))
            if v is None:
                buf += recv(1)
        if v == 2:
            while True:
                header = parse_v2(bytes(buf))
                if header is not None:
                    return header
                want = V2_FIXED if len(buf) < V2_FIXED \
                    else V2_FIXED + int.from_bytes(buf[14:16], "big")
                buf += recv(want - len(buf))
        while True:
            ahead = recv(V1_MAX - len(buf), socket.MSG_PEEK)
            lf = ahead.find(b"\n")
            # take only what is surely the line: up to its LF, or all of
            # what arrived while the LF has not
            buf += recv(len(ahead) if lf < 0 else lf + 1)
            header = parse_v1(bytes(buf))
            if header is not None:
                return header
    finally:
        sock.settimeout(saved)


class ProxyFrom:
    """The `--proxy-from` networks: connections from them must carry a header.

    An IPv4 client seen on a dual-stack socket as ::ffff:a.b.c.d matches the
    IPv4 networks, so one list serves both kinds of listener.
    """

    def __init__(self, networks):
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, text: str) -> "ProxyFrom":
        """CIDR[,CIDR...]; a bare address is a /32 or /128.  ValueError names
        the bad item."""
        import ipaddress  # only a serve run with --proxy-from pays for it
        nets = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                raise ValueError("empty network in %r" % text)
            try:
                nets.append(ipaddress.ip_network(item, strict=True))
            except ValueError as e:
                raise ValueError("%s: %s" % (item, e)) from None
        return cls(nets)

    def __contains__(self, ip: str) -> bool:
        import ipaddress
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)
