"""Bytes shown as one line of plain ASCII, for the admin commands' output.

Bytes outside printable ASCII appear as \\xHH (CR, LF and TAB as \\r, \\n, \\t),
so every line reads the same under every locale, and tests and log readers can
match it line by line.  Never a Python repr: no b'...', no quotes of its own.
"""

import sys

PROG = "qspp"

_ESCAPES = {0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t"}


def _escape(b, quoted):
    out = ['"'] if quoted else []
    for c in b:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < 0x20 or c >= 0x7F:
            out.append("\\x%02x" % c)
        elif quoted and c in (0x5C, 0x22):
            out.append("\\" + chr(c))
        else:
            out.append(chr(c))
    if quoted:
        out.append('"')
    return "".join(out)


def text(b):
    """Bytes (or str) as ASCII prose (entries, file names): control and non-ASCII
    bytes escaped, backslashes left alone so shell commands read as written."""
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogateescape")
    return _escape(b, False)


def q(b):
    """Bytes as a double-quoted C-style string: exact, so CR LF, spaces at
    the ends and backslashes are all visible (argv, bytes sent to clients)."""
    return _escape(b, True)


def argv(args):
    return "[" + ", ".join(q(a) for a in args) + "]"


def os_error(e, path=None):
    """An OSError as `PATH: reason`, the way C tools say it: no errno number,
    no repr of a bytes file name."""
    reason = e.strerror or e.__class__.__name__
    name = path if path is not None else e.filename
    if name is None:
        return reason
    return "%s: %s" % (text(name), reason)


def out(line=""):
    sys.stdout.write(line + "\n")


def err(line):
    sys.stderr.write("%s: %s\n" % (PROG, line))


def timeout_line(env, timeout):
    """The SPPTIMEOUT listing line of check and plugin-test."""
    v = env.get(b"SPPTIMEOUT")
    if not v:
        return "SPPTIMEOUT: %d s (default)" % timeout
    if timeout == 0:
        return "SPPTIMEOUT: no limit (0)"
    return "SPPTIMEOUT: %d s" % timeout
