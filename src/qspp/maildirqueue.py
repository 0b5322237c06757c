"""A qmail-queue stand-in that delivers into one Maildir.

Run as `python -m qspp.maildirqueue` with the message on fd 0 and the envelope on
fd 1 (`F` sender `\\0`, `T` recipient `\\0` ..., `\\0`), exactly like qmail-queue.
Useful where no qmail is installed: qspp then works as a plain SMTP sink.

Delivery: one file per message, whatever the number of recipients, written by the
maildir protocol: in tmp/ (unnamed, O_TMPFILE, where the system allows; else
under a unique name), fsync, link() into new/, fsync of new/.  link() never
replaces a file, so a name already in new/ (a clock that stepped back, two hosts
of one name sharing the Maildir) costs a retry, never a message.
The file is

    Return-Path: <sender>
    X-Envelope-To: <recipient>          (one line per recipient, envelope order)
    <the message bytes exactly as received>

Return-Path is what qmail-local writes.  The recipients do not go in Delivered-To:
lines, as qmail-local would write for a single delivery: qmail-smtpd counts every
Delivered-To line as a hop, so a message for many recipients, passed on once,
would bounce as looping.

Maildir: $QSPP_MAILDIR, else ./Maildir (qspp runs the queue with cwd = its home).
tmp/, new/ and cur/ are created when missing.

Exit codes, as qmail-queue's: 0 delivered; 11 an address of 1003 bytes or more
(qmail-queue's limit); 31 an address holding CR or LF (see below); 53 write
error, disk full or a failed fsync (of new/ too); 54 read error (including an
envelope cut short, which is how qspp aborts a message); 61 the Maildir cannot be
created or entered; 62 the file cannot be created or moved into new/; 81 any
other failure; 91 malformed envelope.  Nothing is left in the Maildir on failure.

An address may hold a bare CR: qmail-smtpd accepts one, and qspp passes it on
byte for byte.  Written into Return-Path: or X-Envelope-To:, a CR or LF would end
the header line and let the sender write headers of its choice (CR alone is a
line end to many parsers, Python's email among them; NUL never reaches here, it
ends the address).  No real address holds one, and an escaped form is a new
syntax no reader knows, so the message is refused (31, qmail-queue's permanent
"mail server permanently rejected message"): the client gets a clear 554 and
nothing is written.
"""

import errno
import os
import time

_CHUNK = 65536
_ADDR = 1003
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
_LINE_ENDS = (b"\r", b"\n", b"\0")
_NAME_TRIES = 5


class _Exit(Exception):
    def __init__(self, code):
        Exception.__init__(self, code)
        self.code = code


def _write_all(fd, data):
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        raise _Exit(53) from None


def _read(fd, n):
    try:
        return os.read(fd, n)
    except OSError:
        raise _Exit(54) from None


class _Envelope:
    """Byte reader over fd 1 that knows qmail-queue's envelope grammar."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = b""
        self.pos = 0

    def byte(self):
        if self.pos >= len(self.buf):
            self.buf = _read(self.fd, _CHUNK)
            self.pos = 0
            if not self.buf:
                raise _Exit(54)
        c = self.buf[self.pos]
        self.pos += 1
        return c

    def address(self):
        parts = []
        size = 0
        while True:
            if self.pos >= len(self.buf):
                self.buf = _read(self.fd, _CHUNK)
                self.pos = 0
                if not self.buf:
                    raise _Exit(54)
            i = self.buf.find(b"\0", self.pos)
            stop = len(self.buf) if i < 0 else i
            size += stop - self.pos
            if size >= _ADDR:
                raise _Exit(11)
            parts.append(self.buf[self.pos:stop])
            if i >= 0:
                self.pos = i + 1
                return b"".join(parts)
            self.pos = stop


def read_envelope(fd):
    """Return (sender, [recipients]) read from `fd`; raise _Exit on error."""
    env = _Envelope(fd)
    if env.byte() != 70:  # F
        raise _Exit(91)
    sender = env.address()
    rcpts = []
    while True:
        c = env.byte()
        if c == 0:
            return sender, rcpts
        if c != 84:  # T
            raise _Exit(91)
        rcpts.append(env.address())


def _maildir_name(host):
    """A name unique to this delivery: time.MusecPpidRrandom.host.

    The maildir convention's time, microseconds and pid, plus 64 random bits, so
    that neither a clock stepping back nor a pid reused on another host of the
    same name (containers) can repeat a name.
    """
    # The maildir convention forbids / and : in the host part.
    host = host.replace("/", "\\057").replace(":", "\\072")
    now = time.time()
    return "%d.M%dP%dR%s.%s" % (int(now), int(now % 1 * 1000000), os.getpid(),
                               os.urandom(8).hex(), host)


def _ensure_dirs(maildir):
    for sub in ("", "/tmp", "/new", "/cur"):
        try:
            os.mkdir(maildir + sub, 0o700)
        except FileExistsError:
            pass
        except OSError:
            raise _Exit(61) from None


def _create_tmp(maildir, host, mode=os.O_WRONLY):
    """Open a new file in tmp/; retry on a name clash, as the maildir spec says."""
    for attempt in range(_NAME_TRIES):
        name = _maildir_name(host)
        path = maildir + "/tmp/" + name
        try:
            return name, os.open(path, mode | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
        except FileExistsError:
            time.sleep(2)
        except OSError as e:
            raise _Exit(53 if e.errno in _DISK_FULL else 62) from None
    raise _Exit(62)


def _create_unnamed(maildir, host, mode=os.O_WRONLY):
    """A new file in tmp/: (its path, fd), or (None, fd) for an unnamed one
    (O_TMPFILE).  Unnamed, the delivery's file gets its only name when linked
    into new/: nothing is left to remove after, and the delivery costs one
    directory change, as a rename would, not a link and an unlink."""
    global _tmpfile
    if _tmpfile is None:
        # the link into new/ goes through /proc/self/fd
        _tmpfile = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
    if _tmpfile:
        try:
            return None, os.open(maildir + "/tmp", os.O_TMPFILE | mode | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise _Exit(53) from None
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                _tmpfile = False  # not on this kernel or filesystem: names from now on
    name, fd = _create_tmp(maildir, host, mode)
    return maildir + "/tmp/" + name, fd


_tmpfile = None  # O_TMPFILE usable; None until the first delivery looks


def _link_new(new_fd, source, host, unnamed=False):
    """Link the finished file into new/ (NEW_FD) under a name nobody holds;
    return the name.  SOURCE: its path, or /proc/self/fd/N for an UNNAMED one.

    EEXIST means another message has that name: take a fresh one, never replace.
    """
    for attempt in range(_NAME_TRIES):
        name = _maildir_name(host)
        try:
            os.link(source, name, dst_dir_fd=new_fd, follow_symlinks=True)
            return name
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise _Exit(53) from None
            if unnamed:
                raise _Unlinkable() from None
            raise _Exit(62) from None
    raise _Exit(62)


def _fsync(fd):
    try:
        os.fsync(fd)
    except OSError:
        raise _Exit(53) from None


def _fsync_dir(fd):
    """Make a link in the directory FD durable.  Only EINVAL (a filesystem that
    cannot fsync a directory) is let pass: any other failure leaves the link's
    fate unknown."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise _Exit(53) from None


def deliver(msg_fd, env_fd, maildir):
    """Spool the message, read the envelope, write the final file; return 0."""
    host = os.uname().nodename or "localhost"
    _ensure_dirs(maildir)
    # The envelope comes only after fd 0 is closed, so the message must be stored
    # before the headers are known: spool it, then copy it after the headers.
    spool_path, spool = _create_unnamed(maildir, host + ".spool", os.O_RDWR)
    try:
        if spool_path is not None:
            os.unlink(spool_path)  # open and unlinked: nothing to clean up later
        while True:
            chunk = _read(msg_fd, _CHUNK)
            if not chunk:
                break
            _write_all(spool, chunk)
        return _write_final(spool, env_fd, maildir, host)
    finally:
        os.close(spool)


def deliver_stored(msg_fd, env_fd, maildir):
    """deliver() for a message already in a file MSG_FD can seek (qspp serve's
    own delivery keeps it in one): no spool."""
    host = os.uname().nodename or "localhost"
    _ensure_dirs(maildir)
    return _write_final(msg_fd, env_fd, maildir, host)


def _write_final(message, env_fd, maildir, host):
    """The headers from the envelope on ENV_FD, then MESSAGE (a file read from
    its start), into a new file linked into new/ once it is on disk."""
    global _tmpfile
    sender, rcpts = read_envelope(env_fd)
    for address in [sender] + rcpts:
        if any(c in address for c in _LINE_ENDS):
            raise _Exit(31)
    head = [b"Return-Path: <", sender, b">\n"]
    for r in rcpts:
        head += (b"X-Envelope-To: <", r, b">\n")
    head = b"".join(head)
    try:
        return _store(head, message, maildir, host)
    except _Unlinkable:
        # a system where /proc/self/fd cannot be linked from: named files
        # from now on, this message included
        _tmpfile = False
        return _store(head, message, maildir, host)


class _Unlinkable(Exception):
    """An unnamed file could not be linked into new/ through /proc/self/fd."""


def _store(head, message, maildir, host):
    tmp_path, fd = _create_unnamed(maildir, host)
    try:
        _write_all(fd, head)
        try:
            os.lseek(message, 0, os.SEEK_SET)
        except OSError:
            raise _Exit(53) from None
        while True:
            try:
                chunk = os.read(message, _CHUNK)
            except OSError:
                raise _Exit(53) from None
            if not chunk:
                break
            _write_all(fd, chunk)
        _fsync(fd)
        try:
            new_fd = os.open(maildir + "/new", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise _Exit(53) from None
        try:
            name = _link_new(new_fd, tmp_path or "/proc/self/fd/%d" % fd, host,
                             unnamed=tmp_path is None)
            try:
                _fsync_dir(new_fd)
            except _Exit:
                # A temporary failure makes the client send the message again:
                # the copy whose link may not last goes, so as not to deliver twice.
                try:
                    os.unlink(name, dir_fd=new_fd)
                except OSError:
                    pass
                raise
        finally:
            os.close(new_fd)
        return 0
    finally:
        os.close(fd)
        if tmp_path is not None:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass


def main():
    maildir = os.environ.get("QSPP_MAILDIR") or "./Maildir"
    maildir = maildir.rstrip("/") or "/"
    try:
        code = deliver(0, 1, maildir)
    except _Exit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 - a queue must answer with an exit code
        try:
            os.write(2, ("qspp.maildirqueue: %r\n" % (e,)).encode())
        except OSError:
            pass
        code = 81
    # os._exit: fd 1 is the envelope pipe, so an interpreter shutdown flush of
    # sys.stdout must not get a chance to turn the code into 120.
    os._exit(code)


if __name__ == "__main__":
    main()
