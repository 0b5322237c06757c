"""`python -m qspp.smtpd`: qmail-smtpd on fd 0/1, as tcpserver runs it.

This is the thin I/O loop around `Session`: it reads in blocks, splits command
lines, feeds DATA bytes, writes pending replies before every read that could
block, and enforces timeoutsmtpd on each read and write (spec §4.2, §7).
Every connection under tcpserver starts a new interpreter and pays for every
import here, so only what each connection needs is imported (`posix` rather
than `os`, which costs over a millisecond when site has not loaded it).
"""

import posix
import sys

import time

import _signal
from select import poll, POLLIN, POLLOUT

from . import control, replies, spawn, spp, sppconfig, startup
from .diag import log
from .queue import Queue, QueueStartError, queue_program
from .session import COMMAND, DATA, CLOSED, MAX_COMMAND, Fatal, Session
from .spprun import run_entry, cloexec_inherited_fds

READ_SIZE = 131072
# One write after one poll(): what POLLOUT promises room for on a pipe
# (PIPE_BUF), and far below what it does on a socket.  A larger blocking
# write, with a client that has stopped reading, would wait inside write()
# where the write timeout cannot end it (qmail writes 512 bytes at a time).
WRITE_MAX = 4096
# poll() takes a C int of milliseconds; a longer timeoutsmtpd waits in steps
_MAX_POLL_MS = 2000000000


class _Exit(Exception):
    def __init__(self, status: int, end: str):
        Exception.__init__(self, status)
        self.status = status
        self.end = end


class _Timeout(Exception):
    pass


class Connection:
    """Reads and writes fds 0/1 for one session under the per-I/O timeout.

    After STARTTLS every byte goes through `channel` (tls.Channel), which uses
    the raw reads and writes below, so the timeout holds for TLS as well.
    """

    def __init__(self, session, timeout, rfd=0, wfd=1, kernel_timeouts=False):
        self.session = session
        self.timeout = timeout
        self.rfd = rfd
        self.wfd = wfd
        self.channel = None
        # True: a read or write on these fds gives up by itself after
        # `timeout` (a socket with SO_RCVTIMEO and SO_SNDTIMEO, as serve sets
        # them), so no poll() has to come first
        self._kernel_timeouts = kernel_timeouts
        # poll objects registered once: cheaper per wait than select()
        self._timeout_ms = max(0, int(timeout * 1000))
        self._readable = poll()
        self._readable.register(rfd, POLLIN)
        self._writable = poll()
        self._writable.register(wfd, POLLOUT)

    # The waits stay inline in these two: serve's session-time alarm looks for
    # their frames to tell a session waiting for its client.
    def _raw_write(self, data) -> None:
        if self._kernel_timeouts:
            try:
                # waits at most the timeout for room, then writes what fits
                n = posix.write(self.wfd, data)
                if n < len(data):
                    view = memoryview(data)[n:]
                    while view:
                        view = view[posix.write(self.wfd, view):]
            except BlockingIOError:  # no room for a whole timeout
                raise _Exit(1, "write timeout")
            except OSError:
                raise _Exit(1, "write error")
            return
        view = memoryview(data)
        try:
            while view:
                ms = self._timeout_ms
                while not self._writable.poll(min(ms, _MAX_POLL_MS)):
                    ms -= _MAX_POLL_MS
                    if ms <= 0:
                        raise _Exit(1, "write timeout")  # silently, spec §7
                view = view[posix.write(self.wfd, view[:WRITE_MAX]):]
        except OSError:
            raise _Exit(1, "write error")

    def _raw_read(self) -> bytes:
        if self._kernel_timeouts:
            try:
                return posix.read(self.rfd, READ_SIZE)
            except BlockingIOError:  # nothing came for a whole timeout
                raise _Timeout()
        ms = self._timeout_ms
        while not self._readable.poll(min(ms, _MAX_POLL_MS)):
            ms -= _MAX_POLL_MS
            if ms <= 0:
                raise _Timeout()
        return posix.read(self.rfd, READ_SIZE)

    def flush(self) -> None:
        out = self.session.out
        if not out:
            return
        data = bytes(out)
        out.clear()
        self.session.flush_soon = False
        if self.channel is None:
            self._raw_write(data)
        else:
            try:
                self.channel.write(data)
            except OSError:  # ssl.SSLError included
                raise _Exit(1, "write error")

    def read(self) -> bytes:
        self.flush()
        try:
            if self.channel is None:
                data = self._raw_read()
            else:
                data = self.channel.read()
        except _Timeout:
            self.session.abort()
            self.session.reply(replies.TIMEOUT)
            self.flush()
            raise _Exit(1, "timeout")
        except OSError:  # ssl.SSLError included
            self.session.abort()
            raise _Exit(1, "read error")
        if not data:
            # EOF anywhere: no reply, exit 1, a message in progress is dropped
            self.session.abort()
            raise _Exit(1, "eof")
        return data

    def run(self) -> int:
        session = self.session
        try:
            buf = b""
            pos = 0
            while session.state != CLOSED:
                if session.flush_soon:
                    self.flush()
                if session.state == COMMAND:
                    lf = buf.find(b"\n", pos)
                    if lf < 0:
                        buf = self._rest_of_line(buf[pos:])
                        pos = 0
                        continue
                    if lf - pos > MAX_COMMAND:
                        raise Fatal(replies.OUT_OF_MEMORY, "command line over 64 KiB")
                    line = buf[pos:lf]
                    pos = lf + 1
                    session.command(line)
                    if session.tls_request is not None:
                        # the injection fix (§8.7): what came after STARTTLS is dropped
                        buf = b""
                        pos = 0
                        self._start_tls()
                else:
                    if pos < len(buf):
                        pos += session.data(memoryview(buf)[pos:])
                    if session.state == DATA:
                        buf = self.read()
                        pos = 0
            self.flush()
            if session.fatal_why:
                log(session.fatal_why)
            return session.exit_status
        except Fatal as err:
            return self._die(err)
        except _Exit as ex:
            session.end = ex.end
            return ex.status
        except MemoryError:
            session.out.clear()
            return self._die(Fatal(replies.OUT_OF_MEMORY))

    def _rest_of_line(self, partial: bytes) -> bytes:
        """Read until an LF arrives; returns `partial` + what was read.

        Chunks are joined once, so a client sending a line a byte at a time
        costs linear, not quadratic, copying.
        """
        chunks = [partial] if partial else []
        size = len(partial)
        while True:
            if size > MAX_COMMAND:
                raise Fatal(replies.OUT_OF_MEMORY, "command line over 64 KiB")
            chunk = self.read()
            chunks.append(chunk)
            size += len(chunk)
            if chunk.find(b"\n") >= 0:  # cheaper than `in` (spawn.py)
                # most often the whole line came in one read: no join
                return chunk if len(chunks) == 1 else b"".join(chunks)

    def _start_tls(self) -> None:
        from .tls import Channel, reason
        self.flush()
        channel = Channel(self.session.tls_request, self._raw_read, self._raw_write)
        try:
            channel.handshake()
        except (_Timeout, OSError) as e:
            why = b"timeout" if isinstance(e, _Timeout) else reason(e)
            self.session.tls_failed(why)
            return  # the 454 goes out in cleartext: no channel yet
        self.channel = channel
        self.session.tls_started(channel.cipher, channel.version, channel.bits)

    def _die(self, err: Fatal) -> int:
        """A fatal error the session did not catch itself: its reply, exit 1."""
        self.session.abort()
        self.session.fatal(err)
        if err.why:
            log(err.why)
        try:
            self.flush()
        except _Exit:
            pass
        return 1


class _TlsIO:
    @staticmethod
    def offered() -> bool:
        try:
            posix.stat(b"control/servercert.pem")
        except OSError:
            return False
        return True

    @staticmethod
    def context(env):
        from .tls import context
        return context(env)


class _AuthIO:
    def __init__(self):
        self.pid = posix.getpid()  # at connection time: `qspp serve` forks after import

    @staticmethod
    def check(argv, data, env):
        from .checkpassword import check
        return check(argv, data, env)

    @staticmethod
    def delay() -> None:
        from .checkpassword import delay
        delay()


def _startup_fatal(reply: bytes, why) -> int:
    if why:
        log(why)
    try:
        posix.write(1, reply + b"\r\n")
    except OSError:
        pass
    return 1


_SMTPMILTERS = b"control/smtpmilters"


def _milters(settings, env):
    """The connection's milters (milter.Milters), or None.  The milter module
    is imported only when a milter list exists: one stat for the rest."""
    if b"NOMILTER" in env:
        return None
    if not env.get(b"MILTERS"):
        if control.known_absent(_SMTPMILTERS):
            return None
        try:
            posix.stat(_SMTPMILTERS)
        except FileNotFoundError:
            control.found_absent(_SMTPMILTERS)
            return None
        except OSError:
            pass  # milter.load reports it
    from . import milter
    specs = milter.load(env)  # milter.ConfigError is a control.ControlError
    return milter.Milters(specs, settings, env) if specs else None


# `qspp serve --metrics` sets a class that wraps the journal (None without
# SPPLOG) and counts what it is told; under tcpserver it stays None.
Observer = None

# A `qspp serve` worker marks its descriptors close-on-exec once, when it
# starts, and ends after any session that leaves one open: it sets this to
# False.  A process that runs one session marks them here, at its start.
mark_inherited_fds = True


def run(argv, environ, io_timeouts=None) -> int:
    """One connection, fds 0/1; returns the exit status (spec §2.5).

    io_timeouts(seconds): makes each read and write on fds 0/1 give up by
    itself after that long, and says whether it could (`qspp serve` sets
    socket options); otherwise every wait is a poll() under timeoutsmtpd.
    """
    home = environ.get(b"QMAILHOME") or b"/var/qmail"
    try:
        posix.chdir(home)
    except OSError as e:
        return _startup_fatal(replies.CONTROLS, "cannot chdir to %s: %s" % (
            home.decode("utf-8", "replace"), e.strerror))
    auth_mode = None
    if argv:
        from . import authmode  # arguments mean AUTH: plain connections skip it
        host, checkargv, note = authmode.read_args(argv, environ)
        if note is not None:
            log(note)
        if checkargv is not None:
            auth_mode = authmode.AuthMode(host, checkargv, environ.get(b"SMTPAUTH"),
                                          environ.get(b"FORCETLS"))
    env = dict(environ)
    # no child may inherit a descriptor qspp did not give it (spec §2.4)
    if mark_inherited_fds:
        cloexec_inherited_fds()
    try:
        settings = startup.load(env, auth_mode)
        config = sppconfig.load_config(env)
        milters = _milters(settings, env)
    except control.ControlError as e:
        return _startup_fatal(replies.CONTROLS, str(e))
    except sppconfig.SppConfigError as e:
        return _startup_fatal(replies.CONTROLS, e.text)
    if config is not None and config.missing:
        log(config.message)
    timeout, warning = sppconfig.spptimeout(env)
    if warning:
        log(warning)
    journal = None
    if env.get(b"SPPLOG"):
        from .spplog import Journal
        journal = Journal(env[b"SPPLOG"])
    if Observer is not None:
        journal = Observer(journal)
    engine = spp.SppEngine(config, env, timeout, run_entry, journal)

    def start_queue(env):
        program = queue_program(env)
        try:
            queue = Queue.start(program, env)
        except QueueStartError as e:
            log(b"cannot start " + program + b": " + str(e).encode())
            raise OSError()
        if queue.exec_error is not None:
            log(b"cannot execute " + program + b": " + queue.exec_error.strerror.encode())
        return queue

    def start_spool(env):
        from .spool import Spool
        return Spool.create(env)

    session = Session(settings, env, engine, start_queue, time.time, start_spool)
    session.journal = journal
    session.milters = milters
    if milters is not None:
        milters.journal = journal
    session.tls_io = _TlsIO
    if auth_mode is not None:
        session.auth_io = _AuthIO()
    try:
        session.start()
    except Fatal as err:
        session.fatal(err)
    kernel_timeouts = io_timeouts is not None and io_timeouts(settings.timeout)
    status = Connection(session, settings.timeout, kernel_timeouts=kernel_timeouts).run()
    if milters is not None:
        milters.close()
    if journal is not None:
        journal.summary(settings, session.helo_name, session.end)
    return status


def main() -> None:
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    # A parent that ignores SIGCHLD (swaks --pipe does) would make the kernel reap
    # qmail-queue for us: waitpid would fail and a queued message get a 451.
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    # that state stays: plugins and the queue may start by vfork if it is netqmail's
    spawn.prefer_vfork()
    try:
        status = run([a.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
                      for a in sys.argv[1:]], posix.environ)
    except Exception as e:  # spec §2.5: nothing more sent, one stderr line
        log("internal error: %s: %s" % (type(e).__name__, e))
        status = 1
    posix._exit(status)


if __name__ == "__main__":
    main()
