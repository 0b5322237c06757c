"""Starting a child with the signal state netqmail's children have (spec §2.4,
spp.md §4.2): every signal at its default except SIGPIPE where the spec keeps it
ignored, and an empty signal mask.

posix_spawn is the cheap way to start a process from Python, but glibc's (and
musl's) leaves its own internal signals (32 and 33 on Linux) ignored in the
child unless they are in the spawn's "set to default" set, and exec keeps them
ignored.  sigaddset() refuses those numbers, so os.posix_spawn cannot name them.
Here the C library's posix_spawn is called through _ctypes with a sigset_t whose
bits are set directly.  _ctypes (not the ctypes package: a third of the import
cost) is loaded at the first spawn, never at import.  Where that is not
possible, os.posix_spawn does the job without the two internal signals.

A process whose signal state is fixed and proved (a serve worker, qspp.smtpd
under tcpserver) spawns by vfork instead (use_vfork): cheaper, and the same
state in the child.

spawn() takes the arguments os.posix_spawn takes that qspp uses, raises what it
raises: OSError (errno of the failed spawn or exec) and ValueError (NUL in a
string, an environment name with `=` or empty).
"""

import _thread
import posix
import select
import sys
from _operator import ne as _ne

try:
    import _signal
    _VALID = _signal.valid_signals()
    _SIGPIPE = _signal.SIGPIPE
    _SIGXFSZ = _signal.SIGXFSZ
    _SIG_DFL = _signal.SIG_DFL
    _NSIG = _signal.NSIG
except (ImportError, AttributeError):  # pragma: no cover - non-CPython
    _signal = None
    _VALID = set(range(1, 32))
    _SIGPIPE = 13
    _SIGXFSZ = 25
    _NSIG = 32

_EINVAL = 22
_EACCES = 13

DUP2 = posix.POSIX_SPAWN_DUP2
OPEN = posix.POSIX_SPAWN_OPEN

# os.posix_spawn's "set to default" sets, for the fallback: what sigaddset takes
_DEFAULT_ALL = tuple(sorted(s for s in _VALID if s not in (9, 19)))
_DEFAULT_BUT_PIPE = tuple(s for s in _DEFAULT_ALL if s != _SIGPIPE)

# glibc's values, which Linux C libraries share
_SETPGROUP = 0x02
_SETSIGDEF = 0x04
_SETSIGMASK = 0x08

# how many argv arrays and file action lists are kept: a session uses a handful
_CACHE_MAX = 32

_libc = None  # a _Libc once loaded; False when it cannot be


def _kept_argv(kept, argv, make):
    """argv in the form the spawn call takes, checked and made once per argv."""
    key = tuple(argv)
    made = kept.get(key)
    if made is None:
        for s in key:
            if b"\0" in s:
                raise ValueError("embedded null byte")
        if len(kept) >= _CACHE_MAX:
            kept.clear()
        made = kept[key] = make(key)
    return made


class _Envs:
    """The environments a process spawns with, kept in the form the spawn
    call takes (`make` turns a list of b"NAME=value" into it).

    A session spawns with a few environments, the same names each time (the
    plugins of MAIL, those of RCPT, the queue): one array is kept per list of
    names, and only the values that changed since it was last used are
    rewritten (a C-level compare finds them).  Names and values in order,
    not the dict, are compared: the child sees them in order.

    `x.find(y) >= 0` stands for `y in x` on every spawn: CPython 3.11's
    `in` on bytes first tries y as an integer and formats the TypeError it
    then drops.
    """

    def __init__(self, make):
        self.make = make
        self.kept = {}  # [the values in order, their array] by names

    def get(self, env):
        names = tuple(env)
        values = list(env.values())
        kept = self.kept.get(names)
        if kept is not None:
            old, array = kept
            if old == values:  # in C, each value first by identity
                return array
            # the values that differ, found in C: a session sets most anew
            # to what the session before had (the same sender, recipient...)
            changed = list(map(_ne, old, values))
            i = -1
            for _ in range(changed.count(True)):
                i = changed.index(True, i + 1)
                v = values[i]
                if v.find(b"\0") >= 0:
                    del self.kept[names]  # rewritten in part: never used again
                    break  # the full check below raises
                array[i] = names[i] + b"=" + v
            else:
                kept[0] = values
                return array
        envp = [k + b"=" + v for k, v in env.items()]
        # checked in bulk, name by name only when some name has a `=`
        if b"" in env:
            raise ValueError("illegal environment variable name")
        if b"".join(env).find(b"=") >= 0:
            for k in env:
                if k.find(b"=", 1) >= 0:
                    raise ValueError("illegal environment variable name")
        if b"".join(envp).find(b"\0") >= 0:
            raise ValueError("embedded null byte")
        array = self.make(envp)
        if len(self.kept) >= _CACHE_MAX:
            self.kept.clear()
        self.kept[names] = [values, array]
        return array


class _Libc:
    """posix_spawn and its attribute calls from the C library, via _ctypes."""

    def __init__(self):
        import _ctypes
        # not the ctypes package: the few types needed, declared here
        CData = _ctypes._SimpleCData

        class c_int(CData):
            _type_ = "i"

        class c_short(CData):
            _type_ = "h"

        class c_ulong(CData):
            _type_ = "L"

        class c_char_p(CData):
            _type_ = "z"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL
            _restype_ = c_int

        class Handle:
            _handle = _ctypes.dlopen(None, getattr(posix, "RTLD_NOW", 2))

        def array(kind, n):
            return type("Array", (_ctypes.Array,), {"_type_": kind, "_length_": n})

        for name in ("posix_spawn", "posix_spawnp",
                     "posix_spawn_file_actions_init", "posix_spawn_file_actions_destroy",
                     "posix_spawn_file_actions_adddup2", "posix_spawn_file_actions_addopen",
                     "posix_spawnattr_init", "posix_spawnattr_destroy",
                     "posix_spawnattr_setflags", "posix_spawnattr_setsigdefault",
                     "posix_spawnattr_setsigmask", "posix_spawnattr_setpgroup"):
            setattr(self, name, Function((name, Handle)))
        self.byref = _ctypes.byref
        self.c_int = c_int
        self.c_short = c_short
        self.c_char_p = c_char_p
        self.array = array
        word = _ctypes.sizeof(c_ulong) * 8
        # sigset_t is at most 1024 bits in every Linux C library; the opaque
        # attribute structures are far smaller than 2 KiB and 1 KiB (glibc: 336
        # and 80 bytes); long-aligned
        self.sigset = array(c_ulong, 1024 // word)
        self.attr = array(c_ulong, 2048 * 8 // word)
        self.actions = array(c_ulong, 1024 * 8 // word)
        self.pointers = {}  # argv/envp array types by length
        self.envs = _Envs(self.strings)
        self.argvs = {}  # argv arrays by argv
        self.fas = {}  # file actions objects by action list
        self.attrs = {}  # spawn attributes by (pgroup, keep_sigpipe)

        def signals(keep_ignored):
            s = self.sigset()
            for sig in range(1, max(_NSIG, 65)):
                if sig not in keep_ignored:
                    s[(sig - 1) // word] |= 1 << ((sig - 1) % word)
            return s
        self.default_all = signals(())
        self.default_but_pipe = signals((_SIGPIPE,))
        self.empty = self.sigset()

    def strings(self, items):
        n = len(items)
        kind = self.pointers.get(n)
        if kind is None:
            kind = self.pointers[n] = self.array(self.c_char_p, n + 1)
        return kind(*items)  # the last stays NULL

    def _actions(self, file_actions):
        # The same few action lists recur (the pipe's write end usually gets
        # the same fd number), so their glibc objects are built once and kept.
        key = tuple(file_actions)
        fa = self.fas.get(key)
        if fa is not None:
            return fa
        fa = self.actions()
        byref = self.byref
        err = self.posix_spawn_file_actions_init(byref(fa))
        if err:
            raise OSError(err, posix.strerror(err))
        try:
            for action in key:
                if action[0] == DUP2:
                    err = self.posix_spawn_file_actions_adddup2(byref(fa), action[1], action[2])
                elif action[0] == OPEN:
                    _, fd, name, flags, mode = action
                    if b"\0" in name:
                        raise ValueError("embedded null byte")
                    err = self.posix_spawn_file_actions_addopen(byref(fa), fd, name, flags, mode)
                else:
                    raise ValueError("unknown file action")
                if err:
                    raise OSError(err, posix.strerror(err))
        except BaseException:
            self.posix_spawn_file_actions_destroy(byref(fa))
            raise
        if len(self.fas) >= _CACHE_MAX:
            for old in self.fas.values():
                self.posix_spawn_file_actions_destroy(byref(old))
            self.fas.clear()
        self.fas[key] = fa
        return fa

    def _attr(self, pgroup, keep_sigpipe):
        key = (bool(pgroup), bool(keep_sigpipe))
        attr = self.attrs.get(key)
        if attr is not None:
            return attr
        attr = self.attr()
        byref = self.byref
        err = self.posix_spawnattr_init(byref(attr))
        if err:
            raise OSError(err, posix.strerror(err))
        flags = _SETSIGDEF | _SETSIGMASK
        if pgroup:
            flags |= _SETPGROUP
            self.posix_spawnattr_setpgroup(byref(attr), 0)
        self.posix_spawnattr_setflags(byref(attr), self.c_short(flags))
        self.posix_spawnattr_setsigdefault(
            byref(attr), byref(self.default_but_pipe if keep_sigpipe else self.default_all))
        self.posix_spawnattr_setsigmask(byref(attr), byref(self.empty))
        self.attrs[key] = attr
        return attr

    def spawn(self, path, argv, env, file_actions, pgroup, keep_sigpipe, search):
        if path.find(b"\0") >= 0:
            raise ValueError("embedded null byte")
        argv_c = _kept_argv(self.argvs, argv, self.strings)
        envp_c = self.envs.get(env)
        fa = self._actions(file_actions)
        attr = self._attr(pgroup, keep_sigpipe)
        byref = self.byref
        pid = self.c_int()
        call = self.posix_spawnp if search else self.posix_spawn
        err = call(byref(pid), path, byref(fa), byref(attr), argv_c, envp_c)
        if err:
            raise OSError(err, posix.strerror(err), path)
        return pid.value


class _Forker:
    """vfork and exec through CPython's own helper for subprocess.

    glibc's posix_spawn maps and unmaps a fresh stack for every child; the
    child takes page faults on it, and the unmap flushes the other CPU's TLB.
    A vfork child runs on the parent's stack and needs none of that (0 to
    25 us less CPU per spawn here, by `scripts/bench spawn` and perf stat),
    and its first use in a new interpreter costs 0.6 ms (its check included)
    where loading posix_spawn through _ctypes costs 0.9 ms.
    _posixsubprocess.fork_exec is private, so it is used only on the CPython
    versions whose argument list is known (the same 23 arguments from 3.11
    to 3.13), and only from a process whose signal state has been proved to
    be the one children must get (use_vfork): its child resets handlers and
    restores the parent's mask, but leaves ignored signals ignored.
    """

    def __init__(self, fork_exec, thread, xfsz_ignored):
        self.fork_exec = fork_exec
        self.thread = thread  # signal.signal works in the main thread only
        self.xfsz_ignored = xfsz_ignored
        self.envs = _Envs(list)
        self.argvs = {}  # argv tuples, checked once
        # The child writes "OSError:<errno in hex>:..." here when exec fails,
        # all of it before it exits, and the parent resumes only once the
        # child has exited or its exec is past returning (use_vfork made
        # sure vfork suspends it): nothing there now means the program runs.
        # So one pipe serves every spawn, never waited on: made per spawn it
        # cost three more syscalls, and a blocking read waited for exec to
        # close it, 50 us a spawn here.
        self.er, self.ew = posix.pipe2(posix.O_CLOEXEC | posix.O_NONBLOCK)
        self.reported = select.poll()  # cheaper than a read that fails
        self.reported.register(self.er, select.POLLIN)

    def close(self):
        posix.close(self.er)
        posix.close(self.ew)

    def spawn(self, path, argv, env, fd0, fd1, pgroup, keep_sigpipe):
        if path.find(b"\0") >= 0:
            raise ValueError("embedded null byte")
        argv_l = _kept_argv(self.argvs, argv, tuple)
        env_l = self.envs.get(env)
        # CPython ignores SIGXFSZ (a write past RLIMIT_FSIZE fails with
        # EFBIG instead), and the child would inherit that: default for the
        # moment of the spawn.  A single thread: no write of ours can meet
        # the limit meanwhile.  restore_signals would default it too, but
        # SIGPIPE with it.
        xfsz = _signal.signal(_SIGXFSZ, _SIG_DFL) if keep_sigpipe and self.xfsz_ignored else None
        try:
            pid = self.fork_exec(argv_l, (path,), False, (), None, env_l,
                                 fd0, -1, -1, fd1, -1, -1, self.er, self.ew,
                                 not keep_sigpipe, False, 0 if pgroup else -1,
                                 None, None, None, -1, None, True)
        finally:
            if xfsz is not None:
                _signal.signal(_SIGXFSZ, xfsz)
        if not self.reported.poll(0):
            return pid
        report = b""
        try:
            while True:  # written in several pieces, all there: leave none
                report += posix.read(self.er, 4096)
        except BlockingIOError:
            pass
        posix.waitpid(pid, 0)  # it exits at once, status 255
        parts = report.split(b":", 2)
        try:
            err = int(parts[1], 16) if parts[0] == b"OSError" else 0
        except (IndexError, ValueError):
            err = 0
        err = err or _EINVAL
        raise OSError(err, posix.strerror(err), path)


_forker = None  # a _Forker once use_vfork() has proved this process's signals


def _std_dups(file_actions):
    """(fd for 0, fd for 1) when the actions only dup2 onto fds 0 and 1
    (-1: inherited); None for anything else."""
    fd0 = fd1 = -1
    for action in file_actions:
        if action[0] != DUP2:
            return None
        if action[2] == 0 and fd0 < 0:
            fd0 = action[1]
        elif action[2] == 1 and fd1 < 0:
            fd1 = action[1]
        else:
            return None
    return fd0, fd1


def use_vfork() -> bool:
    """From now on spawn through vfork where this process allows it; False
    when it does not (then posix_spawn goes on as before).

    For a process that keeps its signal state for good, as a serve worker
    does: the kernel must show no signal blocked and none ignored but
    SIGPIPE (and SIGXFSZ, CPython's own, then defaulted around each spawn),
    because a vfork child inherits both; spawn() then holds the same promise
    as through posix_spawn.  Every spawn after this one relies on the state
    staying so; qspp.smtpd itself only ever ignores SIGPIPE and defaults
    SIGCHLD.  Spawns from other threads than this one keep posix_spawn.
    """
    global _forker, _forgets_at_fork
    if (_signal is None or sys.implementation.name != "cpython"
            or not (3, 11) <= sys.version_info[:2] <= (3, 13)
            or not sys.platform.startswith("linux")):
        return False
    try:
        import _posixsubprocess
        fork_exec = _posixsubprocess.fork_exec
        with open("/proc/self/status", "rb") as f:
            status = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        ignored, blocked = int(status[b"SigIgn"], 16), int(status[b"SigBlk"], 16)
    except (ImportError, AttributeError, OSError, KeyError, ValueError):
        return False
    xfsz = 1 << (_SIGXFSZ - 1)
    if blocked or ignored & ~(1 << (_SIGPIPE - 1)) & ~xfsz:
        return False
    try:
        forker = _Forker(fork_exec, _thread.get_ident(), bool(ignored & xfsz))
    except OSError:
        return False
    # Where vfork is fork in disguise (some emulators; CPython also falls back
    # to fork where vfork is refused) the parent does not wait, and an exec
    # error would come too late to be seen: an exec that must fail shows it.
    try:
        pid = forker.spawn(b"/", [b"/"], {}, -1, -1, False, True)
    except OSError as e:
        if e.errno == _EACCES:
            stop_vfork()
            if not _forgets_at_fork:
                posix.register_at_fork(after_in_child=stop_vfork)
                _forgets_at_fork = True
            _forker = forker
            return True
        # no child to tell it (EAGAIN, ENOMEM): proves nothing
    else:
        posix.waitpid(pid, 0)
    forker.close()
    return False


_forgets_at_fork = False  # stop_vfork runs in every os.fork() child


def stop_vfork() -> None:
    """Spawn by posix_spawn again.  Also in a forked child, whose copy of
    the error pipe would be shared with the parent's."""
    global _forker, _vfork_wanted
    if _forker is not None:
        _forker.close()
    _forker = None
    _vfork_wanted = False


_vfork_wanted = False


def prefer_vfork() -> None:
    """use_vfork() at this process's first spawn: for qspp.smtpd under
    tcpserver, which sets its signal state once at its start and keeps it,
    so that a session that starts no child pays nothing for the check."""
    global _vfork_wanted
    _vfork_wanted = True


def _load():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                _libc = _Libc()
            except (ImportError, AttributeError, OSError, TypeError):
                _libc = False
    return _libc


def spawn_std(path, argv, env, fd0, fd1, pgroup=False):
    """spawn() of what every plugin and queue start is: FD0 and FD1 (-1:
    inherited) dup2'd onto the child's fds 0 and 1, SIGPIPE kept ignored, no
    PATH search.  Straight to vfork where this process has proved it."""
    forker = _forker
    if forker is not None and forker.thread == _thread.get_ident():
        return forker.spawn(path, argv, env, fd0, fd1, pgroup, True)
    actions = []
    if fd0 >= 0:
        actions.append((DUP2, fd0, 0))
    if fd1 >= 0:
        actions.append((DUP2, fd1, 1))
    return spawn(path, argv, env, actions, pgroup)


def spawn(path, argv, env, file_actions=(), pgroup=False, keep_sigpipe=True, search=False):
    """Start `path` (bytes) with `argv` and `env` (dict bytes -> bytes); return its pid.

    file_actions: (DUP2, fd, newfd) and (OPEN, fd, path, flags, mode) tuples.
    pgroup: the child leads a new process group.  keep_sigpipe: SIGPIPE stays
    ignored (plugins, qmail-queue); else it too is set to default (checkprogram).
    search: look `path` up on PATH (posix_spawnp).
    """
    global _vfork_wanted
    if _vfork_wanted:
        _vfork_wanted = False
        use_vfork()
    if _forker is not None and not search and _thread.get_ident() == _forker.thread:
        fds = _std_dups(file_actions)
        if fds is not None:
            return _forker.spawn(path, argv, env, fds[0], fds[1], pgroup, keep_sigpipe)
    libc = _libc if _libc is not None else _load()
    if libc:
        return libc.spawn(path, argv, env, file_actions, pgroup, keep_sigpipe, search)
    call = posix.posix_spawnp if search else posix.posix_spawn
    kw = {}
    if pgroup:
        kw["setpgroup"] = 0
    return call(path, argv, env, file_actions=list(file_actions), setsigmask=(),
                setsigdef=_DEFAULT_BUT_PIPE if keep_sigpipe else _DEFAULT_ALL, **kw)
