"""Where an `inet:HOST:PORT` milter or policy entry connects.

HOST is an IP address or `localhost`, never a name to look up: the resolver
(getaddrinfo) has no time limit, and a DNS server that does not answer would
hold every session past the entry's timeout. `localhost` is 127.0.0.1, then
::1, without asking the resolver either.
"""

import _socket
from time import monotonic as _monotonic

NAME_REFUSED = b"HOST must be an IP address or localhost"


def targets(host: str, port: int):
    """[(family, sockaddr)] to try in order, or None when HOST is a name."""
    if host.lower() == "localhost":
        return [(_socket.AF_INET, ("127.0.0.1", port)), (_socket.AF_INET6, ("::1", port))]
    try:
        # AI_NUMERICHOST: parsed here, never sent to a resolver.  Bytes, not
        # str: getaddrinfo runs a str through the idna codec, whose import
        # (stringprep, unicodedata) costs a new interpreter some 7 ms.
        infos = _socket.getaddrinfo(host.encode("ascii"), port, 0, _socket.SOCK_STREAM, 0,
                                    _socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return [(info[0], info[4]) for info in infos[:1]]


def connect(targets, deadline):
    """A stream socket connected to the first of TARGETS that accepts.

    deadline: a time.monotonic() value, or None for no limit. Raises
    TimeoutError once it has passed, else the last target's OSError.
    """
    error = None
    for family, address in targets:
        sock = None
        try:
            sock = _socket.socket(family, _socket.SOCK_STREAM)
            if deadline is not None:
                left = deadline - _monotonic()
                if left <= 0:
                    raise TimeoutError()
                sock.settimeout(left)
            sock.connect(address)
        except OSError as e:
            if sock is not None:
                sock.close()
            if isinstance(e, TimeoutError):
                raise
            error = e
            continue
        return sock
    raise error or OSError("no address")


def close(sock) -> None:
    """Close SOCK (or nothing, for None), ignoring errors: the peer is gone anyway."""
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
