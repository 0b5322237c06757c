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

spawn() takes the arguments os.posix_spawn takes that qspp uses, raises what it
raises: OSError (errno of the failed spawn or exec) and ValueError (NUL in a
string, an environment name with `=` or empty).
"""

import posix
import sys

try:
    import _signal
    _VALID = _signal.valid_signals()
    _SIGPIPE = _signal.SIGPIPE
    _NSIG = _signal.NSIG
except (ImportError, AttributeError):  # pragma: no cover - non-CPython
    _VALID = set(range(1, 32))
    _SIGPIPE = 13
    _NSIG = 32

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
        self.envs = {}  # [the env's items in order, their envp array] by names
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

    def _envp(self, env):
        # A session spawns with a few environments, the same names each time
        # (the plugins of MAIL, those of RCPT, the queue): one C array is kept
        # per list of names, and only the values that changed since it was
        # last used are rewritten (a C-level compare finds them).  Items, not
        # the dict, are compared: the child sees them in order.
        items = list(env.items())
        names = tuple(env)
        kept = self.envs.get(names)
        if kept is not None:
            old, envp_c = kept
            if old == items:
                return envp_c
            for i in [i for i in range(len(items)) if old[i][1] != items[i][1]]:
                k, v = items[i]
                if b"\0" in v:
                    del self.envs[names]  # rewritten in part: never used again
                    break  # the full check below raises
                envp_c[i] = k + b"=" + v
            else:
                kept[0] = items
                return envp_c
        envp = [k + b"=" + v for k, v in items]
        # checked in bulk, name by name only when some name has a `=`
        if b"" in env:
            raise ValueError("illegal environment variable name")
        if b"=" in b"".join(env):
            for k in env:
                if b"=" in k[1:]:
                    raise ValueError("illegal environment variable name")
        if b"\0" in b"".join(envp):
            raise ValueError("embedded null byte")
        envp_c = self.strings(envp)
        if len(self.envs) >= _CACHE_MAX:
            self.envs.clear()
        self.envs[names] = [items, envp_c]
        return envp_c

    def _argv(self, argv):
        key = tuple(argv)
        argv_c = self.argvs.get(key)
        if argv_c is None:
            for s in key:
                if b"\0" in s:
                    raise ValueError("embedded null byte")
            if len(self.argvs) >= _CACHE_MAX:
                self.argvs.clear()
            argv_c = self.argvs[key] = self.strings(key)
        return argv_c

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
        if b"\0" in path:
            raise ValueError("embedded null byte")
        argv_c = self._argv(argv)
        envp_c = self._envp(env)
        fa = self._actions(file_actions)
        attr = self._attr(pgroup, keep_sigpipe)
        byref = self.byref
        pid = self.c_int()
        call = self.posix_spawnp if search else self.posix_spawn
        err = call(byref(pid), path, byref(fa), byref(attr), argv_c, envp_c)
        if err:
            raise OSError(err, posix.strerror(err), path)
        return pid.value


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


def spawn(path, argv, env, file_actions=(), pgroup=False, keep_sigpipe=True, search=False):
    """Start `path` (bytes) with `argv` and `env` (dict bytes -> bytes); return its pid.

    file_actions: (DUP2, fd, newfd) and (OPEN, fd, path, flags, mode) tuples.
    pgroup: the child leads a new process group.  keep_sigpipe: SIGPIPE stays
    ignored (plugins, qmail-queue); else it too is set to default (checkprogram).
    search: look `path` up on PATH (posix_spawnp).
    """
    libc = _libc if _libc is not None else _load()
    if libc:
        return libc.spawn(path, argv, env, file_actions, pgroup, keep_sigpipe, search)
    call = posix.posix_spawnp if search else posix.posix_spawn
    kw = {}
    if pgroup:
        kw["setpgroup"] = 0
    return call(path, argv, env, file_actions=list(file_actions), setsigmask=(),
                setsigdef=_DEFAULT_BUT_PIPE if keep_sigpipe else _DEFAULT_ALL, **kw)
