"""Where an `inet:HOST:PORT` milter or policy entry connects.

HOST is an IP address or `localhost`, never a name to look up: the resolver
(getaddrinfo) has no time limit, and a DNS server that does not answer would
hold every session past the entry's timeout. `localhost` is 127.0.0.1, then
::1, without asking the resolver either.
"""

import _socket

NAME_REFUSED = b"HOST must be an IP address or localhost"


def targets(host: str, port: int):
    """[(family, sockaddr)] to try in order, or None when HOST is a name."""
    if host.lower() == "localhost":
        return [(_socket.AF_INET, ("127.0.0.1", port)), (_socket.AF_INET6, ("::1", port))]
    try:
        # AI_NUMERICHOST: parsed here, never sent to a resolver
        infos = _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM, 0,
                                    _socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return [(info[0], info[4]) for info in infos[:1]]
