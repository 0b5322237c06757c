"""The message held back while `[body]` plugins judge it (spp.md §6.1).

Only a connection with `[body]` entries pays for this: the message goes to an
unlinked mode-0600 file in TMPDIR instead of qmail-queue, plugins read it on
fd 0 through a read-only descriptor, and only an accepted message is copied to
qmail-queue, with the plugins' headers inserted after the 354-time headers.
"""

import os

_COPY_BLOCK = 262144
_counter = 0


class Spool:
    __slots__ = ("fd", "reader", "failed", "size", "split")

    def __init__(self):
        self.fd = -1
        self.reader = -1
        self.failed = False
        self.size = 0
        self.split = 0

    @classmethod
    def create(cls, env):
        """A new spool; on any failure one whose `failed` is set, so the
        message is still read to its end (the reply is then the spool 451)."""
        global _counter
        spool = cls()
        tmpdir = env.get(b"TMPDIR") or b"/tmp"
        _counter += 1
        name = b"%s/qspp-spool.%d.%d.%s" % (tmpdir, os.getpid(), _counter,
                                             os.urandom(6).hex().encode())
        try:
            spool.fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                spool.reader = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            finally:
                os.unlink(name)
        except OSError:
            spool.close()
            spool.failed = True
        return spool

    def write(self, data) -> None:
        if self.failed or not data:
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.size += n
        except OSError:
            self.failed = True

    def mark(self) -> None:
        """Where the client's data starts: `[body]` headers go here."""
        self.split = self.size

    def copy_to(self, queue, headers: bytes) -> None:
        """Send the spooled message to `queue` with `headers` at the mark."""
        self._copy(queue, 0, self.split)
        queue.write(headers)
        self._copy(queue, self.split, self.size)

    def _copy(self, queue, start: int, end: int) -> None:
        while start < end:
            block = os.pread(self.fd, min(_COPY_BLOCK, end - start), start)
            if not block:
                raise OSError("spool file shrank")
            queue.write(block)
            start += len(block)

    def close(self) -> None:
        for fd in (self.fd, self.reader):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.reader = -1
