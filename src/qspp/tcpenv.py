"""The environment Debian's ucspi-tcp-ipv6 tcpserver (0.88 with the IPv6
patch) gives a program on a dual-stack socket; `qspp serve` copies it.

Measured on the real binary (tests/e2e/test_ipv6.py does again):

- An IPv6 client: PROTO=TCP6, and TCPREMOTEIP, TCPLOCALIP equal to
  TCP6REMOTEIP, TCP6LOCALIP in the patch's own address form (see format_ip6).
- An IPv4 client, seen as ::ffff:a.b.c.d: PROTO=TCP, TCPREMOTEIP and
  TCPLOCALIP dotted quads, TCP6REMOTEIP and TCP6LOCALIP `::ffff:a.b.c.d`.
  An IPv4-only listener gives the same.
- TCP6REMOTEPORT = TCPREMOTEPORT and TCP6LOCALPORT = TCPLOCALPORT, always.
- TCP6LOCALHOST, TCP6REMOTEHOST, TCP6REMOTEINFO repeat their TCP* twins,
  and are unset when those are.
- TCP6INTERFACE only when the local address has a scope id (link-local):
  the interface's name, or `[unknown]` when the index has none.
"""

import socket

_MAPPED = b"\0" * 10 + b"\xff\xff"


def format_ip6(packed: bytes) -> bytes:
    """The 16-byte address as the IPv6 tcpserver writes it.

    Not RFC 5952: the longest run of zero groups is shortened to `::` even
    when it is one group long (2001:db8::1:1:1:1:1), the first of equal runs
    wins, only ::ffff:0:0/96 is written with a dotted quad, and hex is
    lowercase without leading zeros.
    """
    if packed[:12] == _MAPPED:
        return b"::ffff:" + format_ip4(packed[12:])
    words = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    best_at, best_len, i = -1, 0, 0
    while i < 8:
        if words[i] == 0:
            j = i
            while j < 8 and words[j] == 0:
                j += 1
            if j - i > best_len:
                best_at, best_len = i, j - i
            i = j
        else:
            i += 1
    if best_len == 0:
        return b":".join(b"%x" % w for w in words)
    head = b":".join(b"%x" % w for w in words[:best_at])
    tail = b":".join(b"%x" % w for w in words[best_at + best_len:])
    return head + b"::" + tail


def format_ip4(packed: bytes) -> bytes:
    return b"%d.%d.%d.%d" % tuple(packed)


def address(family, sockaddr) -> "tuple[bytes, int, int]":
    """(16-byte IPv6 or IPv4-mapped address, port, scope id) from what
    getsockname(), getpeername() or accept() return."""
    if family == socket.AF_INET:
        return _MAPPED + socket.inet_aton(sockaddr[0]), sockaddr[1], 0
    host = sockaddr[0].split("%", 1)[0]  # Python appends "%zone" when scoped
    return socket.inet_pton(socket.AF_INET6, host), sockaddr[1], sockaddr[3]


def interface_name(scope_id: int) -> bytes:
    try:
        return socket.if_indextoname(scope_id).encode()
    except OSError:
        return b"[unknown]"


def tcp6_environ(local: bytes, local_port: int, remote: bytes, remote_port: int,
                 scope_id: int = 0, localhost: "bytes | None" = None,
                 remotehost: "bytes | None" = None,
                 remoteinfo: "bytes | None" = None) -> "dict[bytes, bytes]":
    """The tcpserver variables for one connection (before any rules).

    local, remote: 16-byte addresses (IPv4 clients as ::ffff:a.b.c.d, see
    address()); scope_id: the local address's scope, for TCP6INTERFACE.
    """
    env = {
        b"TCP6LOCALIP": format_ip6(local),
        b"TCP6REMOTEIP": format_ip6(remote),
        b"TCPLOCALPORT": b"%d" % local_port,
        b"TCP6LOCALPORT": b"%d" % local_port,
        b"TCPREMOTEPORT": b"%d" % remote_port,
        b"TCP6REMOTEPORT": b"%d" % remote_port,
    }
    if remote[:12] == _MAPPED:
        # the patch decides by the client alone and then writes the last
        # four bytes of both addresses as dotted quads (a non-mapped local
        # ::1 would show as 0.0.0.1, which a real socket never pairs)
        env[b"PROTO"] = b"TCP"
        env[b"TCPREMOTEIP"] = format_ip4(remote[12:])
        env[b"TCPLOCALIP"] = format_ip4(local[12:])
    else:
        env[b"PROTO"] = b"TCP6"
        env[b"TCPREMOTEIP"] = env[b"TCP6REMOTEIP"]
        env[b"TCPLOCALIP"] = env[b"TCP6LOCALIP"]
    if scope_id:
        env[b"TCP6INTERFACE"] = interface_name(scope_id)
    for name, value in ((b"LOCALHOST", localhost), (b"REMOTEHOST", remotehost),
                        (b"REMOTEINFO", remoteinfo)):
        if value is not None:
            env[b"TCP" + name] = value
            env[b"TCP6" + name] = value
    return env


def connection_environ(conn, peer, localhost=None, remotehost=None) -> "dict[bytes, bytes]":
    """tcp6_environ for an accepted socket (IPv4 or IPv6, dual-stack or not);
    PEER as accept() returned it (getpeername() fails once the client has
    gone, as a health check does at once)."""
    local, lport, scope = address(conn.family, conn.getsockname())
    remote, rport, _ = address(conn.family, peer)
    return tcp6_environ(local, lport, remote, rport, scope, localhost, remotehost)


def proxied_environ(header, conn, peer, localhost=None, remotehost=None) -> "dict[bytes, bytes]":
    """The environment for a connection that came through a PROXY header:
    the addresses the balancer reports, or the connection's own for a LOCAL
    (health check) header.  The scope of a reported address is unknown, so
    TCP6INTERFACE is never set from a header."""
    if header.local:
        return connection_environ(conn, peer, localhost, remotehost)
    return tcp6_environ(_as16(header.dest), header.dest[2],
                        _as16(header.source), header.source[2],
                        0, localhost, remotehost)


def _as16(addr) -> bytes:
    family, packed, _ = addr
    return _MAPPED + packed if family == socket.AF_INET else packed


def client_environ(conn, peer, proxy_from=None, timeout=5.0, localhost=None,
                   resolve=None) -> "tuple[dict[bytes, bytes], object]":
    """(environment, PROXY header or None) for an accepted connection: what
    `qspp serve` calls in the session process before any rule or byte.

    A peer in PROXY_FROM (a proxyproto.ProxyFrom) must send a PROXY header
    within TIMEOUT seconds; ProxyError otherwise, and the caller closes the
    connection without a word.  Any other peer is its own client.
    RESOLVE(ip) -> name or None looks up TCPREMOTEHOST for the real client.
    """
    header = None
    if proxy_from is not None and peer[0] in proxy_from:
        from .proxyproto import read_header
        header = read_header(conn, timeout)
        env = proxied_environ(header, conn, peer, localhost)
    else:
        env = connection_environ(conn, peer, localhost)
    if resolve is not None:
        name = resolve(env[b"TCPREMOTEIP"].decode())
        if name is not None:
            env[b"TCPREMOTEHOST"] = env[b"TCP6REMOTEHOST"] = name
    return env, header
