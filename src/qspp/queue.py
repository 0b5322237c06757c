"""qmail-queue client (spec §2.4, §2.6, §6.6).

The queue program gets the message on fd 0 and the envelope on fd 1, both pipes,
fd 2 and the current directory inherited.  spawn.spawn_std keeps the start cheap
(vfork where the process has proved it may, else posix_spawn); the pipe ends are
created close-on-exec (posix.pipe does that), so only the two dup2 copies reach
the child.  This relies on fds 0 and 1 being open in qspp, which they
always are (the client connection), so pipe() never hands out 0 or 1.

Signals as under qmail: SIGPIPE ignored, every other one at its default (SIGXFSZ,
which Python ignores, included), mask empty (spawn.py).
"""

import errno
import posix
import time

from . import replies
from .spawn import spawn_std as _spawn_std

DEFAULT_PROGRAM = b"bin/qmail-queue"

# Failures that mean "no process": netqmail's pipe() or vfork() failing.  Every
# other spawn error is execve failing in the child, where netqmail's child would
# _exit(120).
_RESOURCE_ERRNOS = frozenset((errno.EAGAIN, errno.ENOMEM, errno.EMFILE,
                              errno.ENFILE))

_EXIT_REPLIES = {
    0: replies.QQ_READ,  # reached only after a failed write or an abort
    11: replies.QQ_TOO_LONG, 115: replies.QQ_TOO_LONG,
    31: replies.QQ_PERM_REJECTED,
    51: replies.QQ_NOMEM, 52: replies.QQ_TIMEOUT, 53: replies.QQ_WRITE,
    54: replies.QQ_READ, 55: replies.QQ_CONFIG, 56: replies.QQ_NETWORK,
    61: replies.QQ_HOME,
    62: replies.QQ_QUEUE_FILES, 63: replies.QQ_QUEUE_FILES,
    64: replies.QQ_QUEUE_FILES, 65: replies.QQ_QUEUE_FILES,
    66: replies.QQ_QUEUE_FILES,
    71: replies.QQ_TEMP_REJECTED, 72: replies.QQ_CONN_TIMEOUT,
    73: replies.QQ_CONN_REJECTED, 74: replies.QQ_COMMUNICATION,
    81: replies.QQ_BUG, 91: replies.QQ_BUG,
    120: replies.QQ_EXEC,
}


class QueueStartError(Exception):
    """The pipes or the process could not be created: `451 qqt failure (#4.3.0)`.

    args[0] is the underlying OSError.
    """


def queue_program(env):
    """The program to run: QMAILQUEUE from `env` if set and non-empty (D3)."""
    prog = env.get(b"QMAILQUEUE")
    return prog if prog else DEFAULT_PROGRAM


def reply_for_status(wait_status, write_failed, pid, now):
    """Reply text for a finished queue.

    wait_status: the status from waitpid, or None if the wait failed.
    write_failed: a write to either pipe failed, or the message was aborted.
    Mirrors qmail.c's qmail_close: crash test on the low 7 bits, then the exit code.
    """
    if wait_status is None:
        return replies.QQ_WAITPID
    if wait_status & 0x7f:
        return replies.QQ_CRASHED
    code = (wait_status >> 8) & 0xff
    if code == 0 and not write_failed:
        return replies.queued(int(now), pid)
    r = _EXIT_REPLIES.get(code)
    if r is not None:
        return r
    if 11 <= code <= 40:
        return replies.QQ_PERMANENT
    return replies.QQ_TEMPORARY


def _close(fd):
    if fd >= 0:
        try:
            posix.close(fd)
        except OSError:
            pass


class Queue:
    """One running queue program.

    Attributes: `pid` (None if exec failed), `exec_error` (the OSError of a failed
    exec, else None), `write_failed`, `status` (waitpid status after finish(), None
    before or if the wait failed).
    """

    __slots__ = ("pid", "exec_error", "write_failed", "status", "_fdm", "_fde")

    def __init__(self, pid, fdm, fde, exec_error=None):
        self.pid = pid
        self.exec_error = exec_error
        self.write_failed = False
        self.status = None
        self._fdm = fdm
        self._fde = fde

    @classmethod
    def start(cls, program, env):
        """Spawn `program` (bytes path, no PATH search) with environment `env`.

        Raises QueueStartError if pipes or process cannot be created.  If the
        program cannot be executed, returns a Queue that swallows writes and
        finishes as if the program had exited 120.
        """
        fds = []
        try:
            mr, mw = posix.pipe()
            fds += (mr, mw)
            er, ew = posix.pipe()
            fds += (er, ew)
        except OSError as e:
            for fd in fds:
                _close(fd)
            raise QueueStartError(e) from None
        try:
            pid = _spawn_std(program, [program], env, mr, er)
        except OSError as e:
            for fd in fds:
                _close(fd)
            if e.errno in _RESOURCE_ERRNOS:
                raise QueueStartError(e) from None
            return cls(None, -1, -1, e)
        except ValueError as e:
            # An environment entry execve cannot carry (NUL, `=` in a name).
            for fd in fds:
                _close(fd)
            raise QueueStartError(e) from None
        posix.close(mr)
        posix.close(er)
        return cls(pid, mw, ew)

    def _write_all(self, fd, data):
        view = memoryview(data)
        try:
            while view:
                view = view[posix.write(fd, view):]
        except OSError:
            self.write_failed = True

    def write(self, data):
        """Send message bytes to fd 0.  After a failed write, later ones are dropped."""
        if self._fdm >= 0 and not self.write_failed and data:
            self._write_all(self._fdm, data)

    def finish(self, envelope):
        """Close fd 0, send `envelope` unless it is None (abort) or a write failed,
        close fd 1, wait, and return the reply text (§2.6, §6.6)."""
        _close(self._fdm)
        self._fdm = -1
        aborted = envelope is None
        if not aborted and not self.write_failed and self._fde >= 0:
            self._write_all(self._fde, envelope)
        _close(self._fde)
        self._fde = -1
        if self.pid is None:
            return replies.QQ_EXEC
        try:
            _, status = posix.waitpid(self.pid, 0)
        except OSError:
            return replies.QQ_WAITPID
        self.status = status
        return reply_for_status(status, self.write_failed or aborted, self.pid,
                                time.time())
