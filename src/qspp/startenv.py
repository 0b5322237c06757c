"""Undo what Python did to qspp's environment before any qspp code ran.

With no locale variables (tcpserver under `env -i`, daemontools, runit), Python
finds the C locale and, by PEP 538, puts LC_CTYPE=C.UTF-8 (or C.utf8, UTF-8) into
its own environment.  Plugins, qmail-queue and the checkprogram must get the
environment tcpserver gave qspp, not that one (spec §2.4).  qspp/__init__.py
calls this only when LC_CTYPE holds one of those values, so an ordinary start
pays nothing.

Linux keeps the environment as exec'd in /proc/self/environ.  Elsewhere the
coercion is recognised by its other effect: the C locale also turns on Python's
UTF-8 mode, which an LC_CTYPE set by the caller does not.  There the variable is
taken as absent before (by far the usual case; LC_CTYPE=C or POSIX would have
been coerced too, and cannot be told apart).
"""

import posix
import sys

COERCION_TARGETS = (b"C.UTF-8", b"C.utf8", b"UTF-8")
_NAME = b"LC_CTYPE"
_UNKNOWN = object()


def from_proc(path=b"/proc/self/environ"):
    """LC_CTYPE's value at exec (None: absent), or _UNKNOWN if unreadable."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return _UNKNOWN
    try:
        chunks = []
        while True:
            chunk = posix.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return _UNKNOWN
    finally:
        posix.close(fd)
    data = b"".join(chunks)
    prefix = _NAME + b"="
    for entry in data.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):]  # the first one, as getenv() finds
    return None


def coerced_without_proc(environ, flags=sys.flags, xoptions=getattr(sys, "_xoptions", {})):
    """The guess where /proc is not available: did PEP 538 set LC_CTYPE?"""
    if environ.get(_NAME) not in COERCION_TARGETS or environ.get(b"LC_ALL"):
        return False
    if not flags.utf8_mode:
        return False  # the C locale would have turned UTF-8 mode on
    if "utf8" in xoptions or (not flags.ignore_environment and environ.get(b"PYTHONUTF8")):
        return False  # UTF-8 mode asked for: it proves nothing
    return True


def original_lc_ctype(environ):
    """LC_CTYPE as exec'd: bytes, None for absent."""
    value = from_proc()
    if value is not _UNKNOWN:
        return value
    return None if coerced_without_proc(environ) else environ.get(_NAME)


def undo_locale_coercion():
    """Put LC_CTYPE back as qspp was started with it, in posix.environ (what
    qspp-smtpd hands on), os.environ (what serve and the cli hand on) and the C
    library's environment."""
    environ = posix.environ
    if environ.get(_NAME) not in COERCION_TARGETS or environ.get(b"LC_ALL"):
        return
    value = original_lc_ctype(environ)
    if value == environ.get(_NAME):
        return
    if value is None:
        environ.pop(_NAME, None)
        posix.unsetenv(_NAME)
    else:
        environ[_NAME] = value
        posix.putenv(_NAME, value)
    # CPython's os.environ shares posix.environ's dict; should it ever hold a
    # copy, that copy needs the same change.
    os = sys.modules.get("os")
    if os is not None and os.environb.get(_NAME) != value:
        if value is None:
            del os.environb[_NAME]
        else:
            os.environb[_NAME] = value
