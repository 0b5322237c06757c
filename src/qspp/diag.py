"""The one stderr line per abnormal event: `qspp: pid PID: TEXT` (spec §2.7)."""

import posix


def log(text) -> None:
    if isinstance(text, str):
        text = text.encode("utf-8", "backslashreplace")
    line = b"qspp: pid %d: %s\n" % (posix.getpid(), text.replace(b"\n", b" "))
    try:
        posix.write(2, line)
    except OSError:
        # stderr gone (closed by the admin's run script): the event is lost, the
        # connection must not be.
        pass
