"""Running one plugin entry (spp.md §4.2-4.5).

One run = pipe, posix_spawn, read the pipe under a deadline while parsing lines
as they arrive, reap. No threads and no `subprocess`/`signal` import: this runs
for every plugin of every command, and a no-op plugin must cost little more than
the bare spawn.
"""

import errno as _errno
import posix
import select
import time

from .spawn import spawn as _spawn, spawn_std as _spawn_std, DUP2 as _DUP2, OPEN as _OPEN

try:
    from _signal import SIGKILL as _SIGKILL
except ImportError:  # pragma: no cover - non-CPython
    _SIGKILL = 9

# Failure texts, the WHAT of `451 qmail-spp failure: ENTRY: WHAT (#4.3.0)`.
CANT_PIPE = b"can't pipe()"
VFORK_FAILED = b"vfork() failed"
CANT_EXECUTE = b"can't execute"
TIMEOUT = b"timeout"
OUTPUT_TOO_LONG = b"output too long"
WAIT_FAILED = b"wait_pid() failed"
CHILD_CRASHED = b"child crashed"

TERMINATORS = b"ANOERD"
_TERMS = frozenset(TERMINATORS)

LINE_CAP = 65536
RUN_CAP = 1048576
_READ_SIZE = 65536
# poll() takes a C int of milliseconds; longer waits simply loop.
_MAX_POLL_MS = 2000000000

_pipe2 = posix.pipe2
_read = posix.read
_close = posix.close
_waitpid = posix.waitpid
_monotonic = time.monotonic
_poll = select.poll
_POLLIN = select.POLLIN
_O_RDONLY = posix.O_RDONLY
_O_CLOEXEC = posix.O_CLOEXEC
_WNOHANG = posix.WNOHANG
_pidfd_open = getattr(posix, "pidfd_open", None)
_sched_yield = getattr(posix, "sched_yield", None) or (lambda: None)


class RunResult:
    """What one run produced.

    terminator: the terminator line (letter included, CR stripped, cut at NUL)
        or None.
    failure: a §4.5 WHAT (bytes) or None. A failure after a terminator is
        recorded too; whether it counts is the engine's decision (Δ7).
    exit_status: exit code when the process exited, else None.
    signal: the signal that ended it (ours included), else None.
    killed: qspp sent SIGKILL (timeout, output too long).
    errno: errno of a failed pipe/spawn/wait, else None.
    pid: the child's pid, None if it never started.
    bytes_read: output bytes read (parsed plus discarded).
    elapsed_ms: spawn to reap, whole milliseconds.
    """

    __slots__ = ("terminator", "failure", "exit_status", "signal", "killed",
                 "errno", "pid", "bytes_read", "elapsed_ms")

    def __init__(self):
        self.terminator = None
        self.failure = None
        self.exit_status = None
        self.signal = None
        self.killed = False
        self.errno = None
        self.pid = None
        self.bytes_read = 0
        self.elapsed_ms = 0

    def __repr__(self):
        return ("RunResult(terminator=%r, failure=%r, exit_status=%r, signal=%r, killed=%r,"
                " errno=%r, pid=%r, bytes_read=%r, elapsed_ms=%r)"
                % (self.terminator, self.failure, self.exit_status, self.signal, self.killed,
                   self.errno, self.pid, self.bytes_read, self.elapsed_ms))


_null = None  # read-only /dev/null, close-on-exec, kept for every plugin's fd 0


def null_stdin():
    """The file action that gives a plugin /dev/null on fd 0: a dup2 of one
    descriptor kept open, cheaper in the spawned child than opening the path."""
    global _null
    if _null is None:
        try:
            _null = posix.open(b"/dev/null", _O_RDONLY | _O_CLOEXEC)
        except OSError:
            return (_OPEN, 0, b"/dev/null", _O_RDONLY, 0)  # the child reports it
    return (_DUP2, _null, 0)


def _kill(pid):
    # The group first (grandchildren); then the pid itself in case it left
    # its group. Both are safe: the pid is not reaped yet, so neither id can
    # have been recycled.
    try:
        posix.killpg(pid, _SIGKILL)
    except OSError:
        pass
    try:
        posix.kill(pid, _SIGKILL)
    except OSError:
        pass


def _wait_until(pid, deadline):
    """Reap pid before deadline: wait status, or None when time ran out.
    For a child just found still running."""
    # EOF usually arrives while the child is still inside exit(): a couple
    # of yields let it become a zombie, cheaper than setting up a pidfd.
    for _ in (0, 1):
        _sched_yield()
        p, st = _waitpid(pid, _WNOHANG)
        if p:
            return st
    # The process lives on (closed stdout, or a slow exit): a pidfd turns its
    # exit into something poll can wait on.
    pfd = -1
    if _pidfd_open is not None:
        try:
            pfd = _pidfd_open(pid)
        except OSError:
            pfd = -1
    try:
        if pfd >= 0:
            poller = _poll()
            poller.register(pfd, _POLLIN)
        nap = 0.001
        while True:
            left = deadline - _monotonic()
            if left <= 0:
                return None
            if pfd >= 0:
                poller.poll(min(int(left * 1000) + 1, _MAX_POLL_MS))
            else:
                time.sleep(min(left, nap))
                nap = min(nap * 2, 0.05)
            p, st = _waitpid(pid, _WNOHANG)
            if p:
                return st
    finally:
        if pfd >= 0:
            _close(pfd)


def _dispatch(line, on_line):
    """One output line, its CR already stripped (§4.3): cut at NUL, skip if
    empty, return it if it is a terminator, else hand it to on_line."""
    k = line.find(b"\0")
    if k >= 0:
        line = line[:k]
    if line:
        if line[0] in _TERMS:
            return line
        if on_line is not None:
            on_line(line)
    return None


def run_entry(entry, env, timeout, stdin_fd=None, on_line=None):
    """Run one entry once and return a RunResult.

    entry: the config entry (`:CMD` runs `/bin/sh -c CMD`, else a path,
        relative to the current directory, not searched on PATH).
    env: the complete environment, dict bytes -> bytes.
    timeout: whole seconds from spawn to reap; 0 means no limit.
    stdin_fd: fd 0 for the plugin (a regular file, rewound to offset 0 here);
        None gives /dev/null.
    on_line: called with each non-empty, non-terminator line (bytes, CR and
        NUL handled) as soon as it is read, before the run ends. Lines after a
        terminator are discarded, not delivered. If it raises, the process
        group is killed and reaped and the exception propagates.
    """
    res = RunResult()
    t0 = _monotonic()
    if entry[:1] == b":":
        path = b"/bin/sh"
        argv = [path, b"-c", entry[1:]]
    else:
        path = entry
        argv = [entry]
    try:
        rfd, wfd = _pipe2(_O_CLOEXEC)
    except OSError as e:
        res.failure = CANT_PIPE
        res.errno = e.errno
        res.elapsed_ms = int((_monotonic() - t0) * 1000 + 0.5)
        return res
    try:
        if stdin_fd is None:
            fd0 = _null
        else:
            try:
                posix.lseek(stdin_fd, 0, 0)  # SEEK_SET
            except OSError:
                pass
            fd0 = stdin_fd
        # A missing or non-executable entry surfaces here as OSError.  Signals:
        # SIGPIPE ignored, the rest default, mask empty (spp.md §4.2; spawn.py).
        if fd0 is None:
            pid = _spawn(path, argv, env, [null_stdin(), (_DUP2, wfd, 1)], pgroup=True)
        else:
            pid = _spawn_std(path, argv, env, fd0, wfd, pgroup=True)
    except OSError as e:
        _close(rfd)
        res.failure = VFORK_FAILED if e.errno in (_errno.EAGAIN, _errno.ENOMEM) else CANT_EXECUTE
        res.errno = e.errno
        res.elapsed_ms = int((_monotonic() - t0) * 1000 + 0.5)
        return res
    except ValueError:
        # NUL in a path/argv/env string or '=' in an env name: nothing exec could run.
        _close(rfd)
        res.failure = CANT_EXECUTE
        res.elapsed_ms = int((_monotonic() - t0) * 1000 + 0.5)
        return res
    finally:
        _close(wfd)
    res.pid = pid

    deadline = t0 + timeout if timeout and timeout > 0 else None
    poller = None
    if deadline is not None:
        poller = _poll()
        poller.register(rfd, _POLLIN)
    failure = None
    term = None
    total = 0
    parts = []      # pieces of the line being parsed (no LF seen yet)
    plen = 0
    try:
        while True:
            if poller is not None:
                left = deadline - _monotonic()
                if left <= 0:
                    failure = TIMEOUT
                    break
                if not poller.poll(min(int(left * 1000) + 1, _MAX_POLL_MS)):
                    continue
            data = _read(rfd, _READ_SIZE)
            if not data:
                break
            n = len(data)
            total += n
            over = total > RUN_CAP
            if over:
                # Bytes within the cap still count as read: a terminator
                # among them stands (§7.5 #43, `yes N`).
                data = data[:n - (total - RUN_CAP)]
            if term is None and data:
                pieces = data.split(b"\n")
                rest = pieces.pop()     # after the last LF: an unfinished line
                if pieces and parts:
                    parts.append(pieces[0])
                    pieces[0] = b"".join(parts)
                    parts = []
                    plen = 0
                for line in pieces:
                    if line[-1:] == b"\r":
                        line = line[:-1]
                    if len(line) > LINE_CAP:
                        failure = OUTPUT_TOO_LONG
                        break
                    term = _dispatch(line, on_line)
                    if term is not None:
                        break
                if failure is not None:
                    break
                if term is None and rest:
                    parts.append(rest)
                    plen += len(rest)
                    # One byte of slack: a CR may still be followed by the LF.
                    if plen > LINE_CAP + 1 or (plen == LINE_CAP + 1 and rest[-1] != 0x0D):
                        failure = OUTPUT_TOO_LONG
                        break
            if over:
                failure = OUTPUT_TOO_LONG
                break
        res.bytes_read = total

        if failure is None and parts and term is None:
            # EOF: an unterminated last line is a whole line (Δ4).
            line = b"".join(parts)
            if line[-1:] == b"\r":
                line = line[:-1]
            term = _dispatch(line, on_line)
    except BaseException:
        _kill(pid)
        _close(rfd)
        try:
            _waitpid(pid, 0)
        except OSError:
            pass
        raise

    res.terminator = term
    if failure is not None:
        # The pgid names only our plugin's group while its leader is
        # unreaped, so the kill must come before the wait.
        _kill(pid)
        res.killed = True
        _close(rfd)
        try:
            st = _waitpid(pid, 0)[1]
        except OSError as e:
            st = None
            res.errno = e.errno
    else:
        _close(rfd)
        try:
            if deadline is None:
                st = _waitpid(pid, 0)[1]
            else:
                # EOF most often comes with the exit: reaped at the first try
                p, st = _waitpid(pid, _WNOHANG)
                if not p:
                    st = _wait_until(pid, deadline)
                if st is None:
                    failure = TIMEOUT
                    _kill(pid)
                    res.killed = True
                    st = _waitpid(pid, 0)[1]
        except OSError as e:
            st = None
            res.errno = e.errno
            if failure is None:
                failure = WAIT_FAILED
    if st is not None:
        code = posix.waitstatus_to_exitcode(st)
        if code < 0:
            res.signal = -code
            if failure is None:
                failure = CHILD_CRASHED
        else:
            res.exit_status = code
            if code == 120 and failure is None:
                failure = CANT_EXECUTE
    res.failure = failure
    res.elapsed_ms = int((_monotonic() - t0) * 1000 + 0.5)
    return res


def cloexec_inherited_fds():
    """Mark every descriptor above 2 close-on-exec.

    posix_spawn has no portable "close the rest", so a descriptor inherited
    without FD_CLOEXEC (from tcpserver's parent, or made inheritable by
    posix.dup2) would reach every plugin. Call once at startup, before any run;
    Python's own descriptors are already non-inheritable (PEP 446).
    """
    try:
        fds = [int(n) for n in posix.listdir(b"/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2:
            try:
                posix.set_inheritable(fd, False)
            except OSError:
                pass
