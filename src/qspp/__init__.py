"""qspp: qmail-smtpd with the qmail-spp plugin interface built in."""

import posix as _posix

# Python's C-locale coercion (PEP 538) may have added LC_CTYPE to the environment
# that every child inherits; see startenv.py.  Every entry point imports this
# package first, so this runs before any environment is copied.
if _posix.environ.get(b"LC_CTYPE") in (b"C.UTF-8", b"C.utf8", b"UTF-8"):
    from .startenv import undo_locale_coercion as _undo
    _undo()
    del _undo
