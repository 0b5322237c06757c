"""Runs the checkprogram, the checkpassword interface (spec §2.4, §8.4).

The child gets /dev/null on fd 0, qspp's fd 2 on fd 1 (D6: never the client
connection), fd 2 inherited and the credentials on a pipe at fd 3.  Imported at
the first AUTH that reaches the checkprogram.
"""

import errno
import os
import time

from . import replies
from .diag import log
from .spawn import spawn as _spawn, DUP2, OPEN

FAILURE_DELAY = 5  # seconds before `535`, which slows down password guessing

_NO_PROCESS = frozenset((errno.EAGAIN, errno.ENOMEM))


def check(argv, data: bytes, env):
    """None if the checkprogram accepted `data`, else the reply to send.

    A plain refusal (`535`) comes back at once; the caller waits
    FAILURE_DELAY before sending it.
    """
    try:
        rfd, wfd = os.pipe()
    except OSError as e:
        log("cannot make a pipe for the checkprogram: %s" % (e.strerror,))
        return replies.AUTH_NO_PIPE
    try:
        if rfd == 3:
            # a dup2(3, 3) action clears close-on-exec only in newer C libraries
            # (glibc 2.29+); elsewhere the child would start without fd 3
            moved = os.dup(rfd)
            os.close(rfd)
            rfd = moved
        actions = [(OPEN, 0, b"/dev/null", os.O_RDONLY, 0), (DUP2, 2, 1), (DUP2, rfd, 3)]
        try:
            # every signal at its default, SIGPIPE too (§2.4), mask empty
            pid = _spawn(argv[0], argv, env, actions, keep_sigpipe=False,
                         search=b"/" not in argv[0])
        except OSError as e:
            if e.errno in _NO_PROCESS:
                log("cannot start the checkprogram: %s" % (e.strerror,))
                return replies.AUTH_CHILD_NOSTART
            # execve failed in the child: as an exit other than 0 (§8.4)
            log(b"cannot execute the checkprogram " + argv[0] + b": "
                + (e.strerror or "").encode())
            return replies.AUTH_FAILED
        os.close(rfd)
        rfd = -1
        write_failed = False
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(wfd, view):]
        except OSError:
            write_failed = True
        os.close(wfd)
        wfd = -1
        try:
            _, status = os.waitpid(pid, 0)
        except OSError:
            return replies.AUTH_CHILD_CRASHED
        if os.WIFSIGNALED(status):
            return replies.AUTH_CHILD_CRASHED
        if os.WEXITSTATUS(status) != 0:
            # a refusal stands even if the program quit before reading fd 3
            # (then the write may fail, depending on who runs first)
            return replies.AUTH_FAILED
        if write_failed:
            return replies.AUTH_WRITE_PIPE  # accepted without reading: don't trust it
        return None
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)


def delay() -> None:
    time.sleep(FAILURE_DELAY)
