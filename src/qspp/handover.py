"""Listening sockets passed to a new `qspp serve` across exec, for upgrades.

The running server re-executes itself (same pid, so daemontools, runit and
systemd keep supervising it) with its listening descriptors left open, and
says which they are the way systemd socket activation does: LISTEN_PID (the
pid that is to use them), LISTEN_FDS (how many, starting at fd 3).  The new
image adopts them instead of binding: the kernel's accept queue is the same
one throughout, so a client connecting during the switch waits in the
backlog instead of being refused.  The same code takes sockets from systemd.

SO_REUSEPORT was not chosen: the kernel spreads new connections over every
socket bound to the port, and those waiting in the old socket's queue when
it closes are reset (net.ipv4.tcp_migrate_req is off by default);
tests/unit/test_handover.py shows both.
"""

import os
import socket

FIRST_FD = 3  # SD_LISTEN_FDS_START


class HandoverError(Exception):
    """Descriptors named by LISTEN_FDS that are not listening TCP sockets."""


def prepare(sockets, environ: dict) -> dict:
    """Move SOCKETS to fds 3, 4, ... (inheritable) and return the environment
    for os.execve in this very process.  Anything else at those fds must
    already be close-on-exec or be one of SOCKETS."""
    fds = [s.fileno() for s in sockets]
    # dup everything out of the way first so no target clobbers a source
    tmp = [os.dup(fd) for fd in fds]
    try:
        for i, fd in enumerate(tmp):
            os.dup2(fd, FIRST_FD + i, inheritable=True)
    finally:
        for fd in tmp:
            os.close(fd)
    env = {k: v for k, v in environ.items()
           if k not in (b"LISTEN_PID", b"LISTEN_FDS", b"LISTEN_FDNAMES")}
    env[b"LISTEN_PID"] = b"%d" % os.getpid()
    env[b"LISTEN_FDS"] = b"%d" % len(fds)
    return env


def adopt(environ: dict) -> "list[socket.socket]":
    """The listening sockets handed to this process, [] if none.

    Removes LISTEN_* from ENVIRON so sessions never see them, and makes each
    descriptor close-on-exec again.  Raises HandoverError for a descriptor
    that is not a listening stream socket."""
    pid = environ.pop(b"LISTEN_PID", None)
    count = environ.pop(b"LISTEN_FDS", None)
    environ.pop(b"LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process (an ancestor's leftovers)
    if not count.isdigit() or not 0 < int(count) <= 64:
        raise HandoverError("LISTEN_FDS=%r" % count)
    out = []
    for fd in range(FIRST_FD, FIRST_FD + int(count)):
        try:
            s = socket.socket(fileno=fd)
        except OSError as e:
            raise HandoverError("fd %d: %s" % (fd, e.strerror)) from None
        if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6) \
                or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            s.detach()
            raise HandoverError("fd %d is not a listening TCP socket" % fd)
        os.set_inheritable(fd, False)
        out.append(s)
    return out


def find(sockets, host: str, port: int) -> "socket.socket | None":
    """The adopted socket bound to HOST:PORT (as --host and --port name it),
    so an unchanged listener is reused and a changed one is bound anew."""
    for s in sockets:
        name = s.getsockname()
        bound = name[0].split("%", 1)[0]
        if name[1] != port and port != 0:
            continue
        try:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            if fam == s.family and socket.inet_pton(fam, host) == socket.inet_pton(fam, bound):
                return s
        except OSError:
            continue
    return None
