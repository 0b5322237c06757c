"""The Received line qspp puts in front of every message (spec §6.5).

`Received: from R[ (HELO H)] ([I@]A)\\n  by L with P; D\\n`, as netqmail's
received.c writes it.  Values are bytes as they came from the environment or the
client; they are C strings there, so anything from a NUL on is ignored.
"""

import time

_SAFE = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
         b".@%+/=:-")
_FILTER = bytes(c if c in _SAFE else 63 for c in range(256))
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
           b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
_UNKNOWN = b"unknown"


def _cstr(s):
    i = s.find(b"\0")
    return s if i < 0 else s[:i]


def _safe(s):
    return _cstr(s).translate(_FILTER)


def date822(now=None):
    """`D Mon YYYY HH:MM:SS -0000` for `now` (default: the current time), in UTC."""
    t = time.gmtime(time.time() if now is None else now)
    return b"%d %s %d %02d:%02d:%02d -0000" % (
        t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def received(remotehost, helo, info, remoteip, localhost, protocol, now=None):
    """Build both lines, ending in `\\n`.

    remotehost, remoteip, localhost: None means unset and shows `unknown`.
    helo: the HELO/EHLO argument, None if none was given.  It is compared with
    the remote host as netqmail does, where an unset TCPREMOTEHOST has already
    become the string `unknown`: so `HELO unknown` from a host without
    TCPREMOTEHOST is not shown.  The comparison folds ASCII A-Z only and uses the
    unfiltered values.
    info: the AUTH user or TCPREMOTEINFO, None to omit `I@`.
    protocol: written as given, not filtered.
    """
    host = _UNKNOWN if remotehost is None else _cstr(remotehost)
    parts = [b"Received: from ", host.translate(_FILTER)]
    if helo is not None:
        helo = _cstr(helo)
        if helo.lower() != host.lower():
            parts += (b" (HELO ", helo.translate(_FILTER), b")")
    parts.append(b" (")
    if info is not None:
        parts += (_safe(info), b"@")
    parts += (_safe(_UNKNOWN if remoteip is None else remoteip),
              b")\n  by ", _safe(_UNKNOWN if localhost is None else localhost),
              b" with ", _cstr(protocol), b"; ", date822(now), b"\n")
    return b"".join(parts)
