"""Whether a connection offers AUTH, and how (spec §2.1 and §8.1).

Read at startup from qspp.smtpd's arguments and SMTPAUTH.  Kept apart from
auth.py so a connection that only needs the EHLO lines imports nothing more.
"""

import os


class AuthMode:
    """AUTH mode for one connection.

    host: the HOST argument (bytes) or None; checkargv: the checkpassword argv.
    mechanisms: the EHLO `AUTH` line's list, None when not offered (SMTPAUTH=-).
    required: MAIL needs a successful AUTH first (SMTPAUTH starting with `!`).
    forcetls: AUTH only under TLS (FORCETLS set, not empty and not `0`), so no
    password ever crosses the wire in cleartext.
    """

    __slots__ = ("host", "checkargv", "mechanisms", "required", "forcetls")

    def __init__(self, host, checkargv, smtpauth=None, forcetls=None):
        self.host = host
        self.checkargv = checkargv
        self.mechanisms, self.required = _smtpauth(smtpauth)
        self.forcetls = bool(forcetls) and forcetls != b"0"


def _smtpauth(value):
    """(EHLO mechanism list or None, required) for an SMTPAUTH value (§8.1)."""
    if value is None:
        return b"LOGIN PLAIN CRAM-MD5", False
    v = value.lower()
    if v == b"-":
        return None, False
    if v == b"!":
        return b"LOGIN PLAIN", True
    if v.startswith(b"!+cram"):
        return b"LOGIN PLAIN CRAM-MD5", True
    if v.startswith(b"!cram"):
        return b"CRAM-MD5", True
    if v.startswith(b"+cram"):
        return b"LOGIN PLAIN CRAM-MD5", False
    if v.startswith(b"cram"):
        return b"CRAM-MD5", False
    return b"LOGIN PLAIN", False


def on_path(name: bytes, path: bytes):
    """The executable file `name` found on `path`, or None (like `which`)."""
    if path is None:
        path = b"/bin:/usr/bin"  # the C library's default search path
    for d in path.split(b":"):
        candidate = os.path.join(d or b".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def read_args(argv, env):
    """How qspp.smtpd's arguments set AUTH mode (§2.1).

    Returns (host, checkargv, note): checkargv None means AUTH off; note is the
    one stderr line the spec asks for, or None.
    """
    if not argv:
        return None, None, None
    first = argv[0]
    if b"/" in first:
        return None, list(argv), None
    if b"." not in first:
        found = on_path(first, env.get(b"PATH"))
        if found is not None:
            return None, list(argv), (
                b"first argument " + first + b" has no '.' and is an executable on PATH ("
                + found + b"): read as the checkprogram, no HOST")
    if len(argv) == 1:
        return first, None, b"HOST " + first + b" without a checkprogram: AUTH is off"
    return first, list(argv[1:]), None
