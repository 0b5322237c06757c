"""`qspp serve`: qspp's own listener, tcpserver's job done by a warm parent.

    qspp serve [--host IP ...] [--port N] [--concurrency N] [--rules FILE.cdb]
               [--qmailhome DIR] [--localname NAME] [--resolve] [--grace S]
               [--backlog N] [--log text|json|off] [-u UID] [-g GID] [--user NAME]
               [--per-ip N] [--max-session-time SECONDS] [--proxy-from CIDR[,CIDR...]]
               [--metrics HOST:PORT]
               [-- SMTPD-ARGS ...]

The parent imports everything a session needs once, binds, and forks --concurrency
worker processes.  Each worker accepts a client itself, runs its session (what
tcpserver's child plus `python -m qspp.smtpd` would be: the connection on fds 0
and 1, the environment Debian's ucspi-tcp-ipv6 tcpserver builds (PROTO,
TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT and their TCP6* twins,
TCPLOCALHOST only with --localname or --resolve, TCPREMOTEHOST only with
--resolve, never TCPREMOTEINFO; see tcpenv.py), the tcprules
variables on top, then `qspp.smtpd.run()`), and accepts the next.  Between
two sessions a worker puts back and checks what a session could change (see
Worker); after --worker-sessions sessions, or when it cannot prove itself
clean, it ends and the parent starts a fresh one, as it does for a crashed one.

As tcpserver -c, at most --concurrency sessions run: one per worker; more
clients wait in the kernel's backlog.

With the embedded home, the session process delivers each message itself
(qspp.maildirqueue's delivery, on the message it has kept) instead of
starting the home's queue program, a new interpreter.

--per-ip: at most N sessions per client address (default 20, at most -c - 1); one more is
closed with nothing sent and one line logged.  --max-session-time: a session's
whole life (default 1200 s); past it the session ends at its next wait for the
client, with netqmail's timeout reply.

--host: given more than once, one listener each, every worker accepting on
all of them (--port 0 picks one free port for them all).  An IPv6 address
listens on IPv6: `::` is dual-stack (IPv4 clients as ::ffff:a.b.c.d, with
PROTO=TCP and dotted quads in the TCP* names), any other only on itself.

--proxy-from CIDR[,CIDR...]: the load balancers.  A connection from them must
start with a PROXY header (v1 or v2) within 5 s, read by the worker; it then
stands for the client the header names: environment, rules, --resolve,
--per-ip and log lines.  A v2 LOCAL header (a health check) keeps the
balancer's own address.  A bad or missing header closes the connection with
nothing sent and one log line.  Balancers themselves are never held to
--per-ip.  From any other address a PROXY line is just a bad command.

--metrics HOST:PORT: Prometheus text format at /metrics (and /), served
by the parent from counts each worker keeps in its own row of shared memory
(metrics.py): plain stores, no lock, no syscall per event.  The sessions
count through their SPPLOG journal calls (smtpd.Observer), so nothing new is
imported or done by a session under tcpserver.

--rules: looked up as `tcpserver -x` does (see tcprules.py); a denied client is
closed at once with nothing sent.  The cdb is re-read when it changes (tcprules
renames a new one into place, which tcpserver users rely on: rules take effect
without a restart) and on SIGHUP; a file that cannot be read or is not a valid
cdb keeps the old rules and logs one line.

Signals: SIGTERM (and SIGINT) closes the listener, so new clients are refused,
and waits up to --grace seconds for running sessions; then they get SIGTERM,
and SIGKILL 2 s later; the exit status is 0.  A second SIGTERM ends the wait.
SIGHUP re-reads the rules.

SIGUSR2 upgrades without closing the listeners (handover.py): a trial run of
the command line as it is now (new code included) must parse the arguments
and import everything, else the upgrade is logged as refused and nothing
changes; then the workers are told to finish their session and accept no
more, and this process re-executes itself (same pid: the supervisor keeps
it) with its listening sockets open.  The new image adopts them, so clients
connecting meanwhile wait in the kernel's backlog, never refused.  The old
workers stay its children and are reaped when their sessions end.  Not
SO_REUSEPORT: the kernel resets clients queued on a socket that closes.

Home: --qmailhome, else $QMAILHOME, else /var/qmail when control/me exists
there, else the embedded home ($XDG_DATA_HOME/qspp, ~/.local/share/qspp),
created on first use as a receiver for this host that delivers into its
Maildir with qspp's own queue program (qspp.maildirqueue).

-u UID, -g GID (or --user NAME): switch after binding, so port 25 can be
bound as root while no session ever runs as root (tcpserver -u -g).  -u alone
takes that user's primary group; root's group 0 is never kept by accident.
Root switching users gets its embedded home in /var/lib/qspp (unless
XDG_DATA_HOME says otherwise), with the Maildir owned by the session user.

Arguments after `--` are qspp.smtpd's arguments (HOST CHECKPROGRAM ... for
AUTH), given to every session.

Log lines go to stderr as `qspp: pid PID: ...`; --log sets SPPLOG for the
sessions (text: one summary line per connection and one per plugin run,
json: the same as JSON, off: none); a tcprules variable SPPLOG still wins.
"""

import _signal
import _socket
import argparse
import errno
import gc
import mmap
import os
import resource
import select
import selectors
import signal
import socket
import struct
import sys
import time

from . import control, diagnose, home as homes, smtpd, spawn, spprun, tcpenv
from .diag import log
from .tcprules import Rules, RulesError, signature

PROG = "qspp serve"
DEFAULT_GRACE = 30.0
# A session's whole life, whatever timeoutsmtpd says about each read: a client
# sending a byte now and then would otherwise keep its slot for ever.  Twenty
# minutes (qmail's own timeoutsmtpd for a single read) carries a 50 MB message
# over a 512 kbit/s line.
DEFAULT_SESSION_TIME = 1200.0
# Sessions one client address may hold at once.  A big sender opens up to a
# dozen or so connections to one MX; Postfix's smtpd_client_connection_count_limit
# is 50 of its 100 processes.  20 is half of the default -c 40.
DEFAULT_PER_IP = 20
KILL_WAIT = 2.0
RULES_CHECK = 0.5       # how often the parent looks for a rerun of tcprules, to log it
# Idle workers kept ready for the next clients.  More are started as sessions
# take them, up to -c, so a large -c costs processes only under load.
SPARE_WORKERS = 8
TOP_UP_CHECK = 1.0      # how often the parent looks for spare workers unasked
# Variables tcpserver sets or unsets for every connection: what the parent's
# own environment holds under these names must not reach a session.
_PER_CONNECTION = (b"PROTO", b"TCPLOCALIP", b"TCPLOCALPORT", b"TCPLOCALHOST",
                   b"TCPREMOTEIP", b"TCPREMOTEPORT", b"TCPREMOTEHOST", b"TCPREMOTEINFO",
                   b"TCP6LOCALIP", b"TCP6LOCALPORT", b"TCP6LOCALHOST", b"TCP6REMOTEIP",
                   b"TCP6REMOTEPORT", b"TCP6REMOTEHOST", b"TCP6REMOTEINFO", b"TCP6INTERFACE")
PROXY_TIMEOUT = 5.0     # for a balancer's PROXY header (issue 14)
# Imported by a session only when it needs them; the parent imports them all,
# once, so a child never pays for an import.  Missing ones (a build without
# AUTH or TLS) are skipped.
_WARM_MODULES = ("qspp.received", "qspp.spplog", "qspp.spool", "qspp.auth", "qspp.tls",
                 "qspp.maildirqueue", "qspp.queue",
                 "qspp.checkpassword",
                 "json", "ssl", "_socket", "array", "fcntl", "struct")
_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
# Set in the environment of the trial run before an upgrade: parse the
# arguments and import everything, then exit 0 without binding anything.
UPGRADE_CHECK = b"QSPP_SERVE_UPGRADE_CHECK"
UPGRADE_CHECK_TIME = 60.0
# The old image's workers, for the new one to wait for and signal as its own.
RETIRED = b"QSPP_SERVE_RETIRED"


# ---------------------------------------------------------------------------
# arguments

def _int_option(what, low, high=None):
    """An argparse type: an integer in [low, high], else the error `WHAT: 'TEXT'`."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError("%s: %s" % (what, text))
        return n
    return parse


_positive = _int_option("must be at least 1", 1)
_count = _int_option("must not be negative", 0)
_port = _int_option("not a port number", 0, 65535)
_id = _int_option("not a numeric id", 0)


def _host_port(text):
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError("not HOST:PORT: %r" % text)
    return host, int(port)


def _seconds(text):
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %s" % text)
    if not n >= 0:
        raise argparse.ArgumentTypeError("must not be negative: %s" % text)
    return n


def parser():
    p = argparse.ArgumentParser(
        prog=PROG, description="Listen for SMTP clients and run a qspp session for each,"
        " in one of -c worker processes forked from this one, each serving many sessions"
        " (tcpserver and qmail-smtpd in one).",
        epilog="Arguments after -- are qspp.smtpd's own (HOST CHECKPROGRAM ... turns AUTH on).")
    p.add_argument("--host", action="append", metavar="IP",
                   help="address to listen on, again for more listeners: 0 or 0.0.0.0 for"
                   " all IPv4, :: for all IPv6 and IPv4, ::1 and others for that one"
                   " (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=2525,
                   help="TCP port (default 2525; 0 picks a free one, logged at startup)")
    p.add_argument("-c", "--concurrency", type=_positive, default=40, metavar="N",
                   help="at most N sessions at once, as tcpserver -c (default 40)")
    p.add_argument("--per-ip", type=_count, metavar="N",
                   help="at most N sessions from one client address; more are closed"
                   " with nothing sent and logged (default 20, or -c minus 1 when"
                   " that is less: one address never holds every slot; 0 = no limit)")
    p.add_argument("--max-session-time", type=_seconds, default=DEFAULT_SESSION_TIME,
                   metavar="SECONDS",
                   help="a session still open after SECONDS gets qmail's 451 timeout at"
                   " its next wait for the client and ends (default 1200; 0 = no limit)")
    p.add_argument("--worker-sessions", type=_positive, default=Worker.RECYCLE, metavar="N",
                   help="a worker process serves N sessions, then a fresh one takes over"
                   " (default %d)" % Worker.RECYCLE)
    p.add_argument("--proxy-from", metavar="CIDR[,CIDR...]",
                   help="load balancers: their connections must start with a PROXY"
                   " header (v1 or v2), which names the real client")
    p.add_argument("--metrics", metavar="HOST:PORT", type=_host_port,
                   help="serve Prometheus metrics over HTTP on HOST:PORT"
                   " ([::1]:PORT for IPv6)")
    p.add_argument("-x", "--rules", metavar="FILE.cdb",
                   help="tcprules cdb, looked up as tcpserver -x does")
    p.add_argument("--qmailhome", metavar="DIR", help=homes.OPTION_HELP)
    p.add_argument("-l", "--localname", metavar="NAME",
                   help="TCPLOCALHOST for every session, as tcpserver -l")
    p.add_argument("--resolve", action="store_true",
                   help="look up TCPREMOTEHOST (and TCPLOCALHOST unless --localname) in the"
                   " DNS, in the session's process; off by default")
    p.add_argument("--grace", type=_seconds, default=DEFAULT_GRACE, metavar="SECONDS",
                   help="after SIGTERM, how long running sessions may take (default 30)")
    p.add_argument("--backlog", type=_positive, default=128, metavar="N",
                   help="listen(2) backlog: clients waiting while at the limit (default 128)")
    p.add_argument("--log", choices=("text", "json", "off"), default="text",
                   help="per-connection summary lines on stderr (SPPLOG; default text)")
    p.add_argument("-u", "--uid", type=_id, metavar="UID",
                   help="after binding, switch to this numeric user id, as tcpserver -u")
    p.add_argument("-g", "--gid", type=_id, metavar="GID",
                   help="after binding, switch to this numeric group id, as tcpserver -g")
    p.add_argument("--user", metavar="NAME",
                   help="after binding, switch to NAME's uid and primary gid"
                   " (envuidgid NAME tcpserver -U)")
    return p


def parse_args(argv):
    argv = list(argv)
    smtpd_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, smtpd_args = argv[:cut], argv[cut + 1:]
    p = parser()
    ns = p.parse_args(argv)
    ns.host = ns.host or ["127.0.0.1"]
    if ns.proxy_from is not None:
        from .proxyproto import ProxyFrom
        try:
            ns.proxy_from = ProxyFrom.parse(ns.proxy_from)
        except ValueError as e:
            p.error("argument --proxy-from: %s" % e)
    if ns.per_ip is None:
        ns.per_ip = max(1, min(DEFAULT_PER_IP, ns.concurrency - 1))
    ns.smtpd_args = [os.fsencode(a) for a in smtpd_args]
    return ns


# ---------------------------------------------------------------------------
# the home

class SetupError(Exception):
    """A start-up refusal; its text is the whole explanation."""


def _queue_script() -> bytes:
    """A qmail-queue that runs qspp.maildirqueue from this very installation."""
    import shlex
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, %r); from qspp.maildirqueue import main; main()"
            % package_root)
    return ("#!/bin/sh\n"
            "# qspp's Maildir queue: the message on fd 0, the envelope on fd 1.\n"
            "# Rewritten by `qspp serve` at every start, so it follows the installation.\n"
            "exec %s -I -c %s\n" % (shlex.quote(sys.executable), shlex.quote(code))).encode()


# Everything below the home is opened relative to a directory fd and never
# through a symbolic link: this code often runs as root, and a link planted
# by a less privileged user must not make root write or chown somewhere else.
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _subdir(parent_fd, name: bytes, mode: int) -> int:
    """Open directory NAME under PARENT_FD, created with exactly MODE when missing."""
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        created = False
    fd = os.open(name, _DIR, dir_fd=parent_fd)
    if created:
        os.fchmod(fd, mode)  # the umask must not take the session user's access away
    return fd


def _check_private(fd, shown: bytes) -> None:
    """Refuse a directory that someone other than us (or root) could write into."""
    st = os.fstat(fd)
    if st.st_mode & 0o022:
        raise SetupError("%s is writable by others than its owner (mode %04o); refusing to"
                         " use it" % (os.fsdecode(shown), st.st_mode & 0o7777))
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        if euid == 0:
            raise SetupError("%s belongs to uid %d, not to root; refusing to use it as root"
                             % (os.fsdecode(shown), st.st_uid))
        raise SetupError("%s belongs to uid %d; refusing to use it as uid %d"
                         % (os.fsdecode(shown), st.st_uid, euid))


def _write_if_missing(dir_fd, name: bytes, data: bytes) -> None:
    try:
        fd = os.open(name, _NEW_FILE, 0o644, dir_fd=dir_fd)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o644)
        f.write(data)


def _install_queue(bin_fd) -> None:
    script = _queue_script()
    try:
        fd = os.open(b"qmail-queue", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=bin_fd)
        with os.fdopen(fd, "rb") as f:
            if f.read() == script:
                return
    except OSError:
        pass
    try:
        os.unlink(b"qmail-queue.new", dir_fd=bin_fd)  # a leftover, or a planted link
    except FileNotFoundError:
        pass
    fd = os.open(b"qmail-queue.new", _NEW_FILE, 0o755, dir_fd=bin_fd)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o755)
        f.write(script)
    os.rename(b"qmail-queue.new", b"qmail-queue", src_dir_fd=bin_fd, dst_dir_fd=bin_fd)


def make_embedded_home(home: bytes, owner=None) -> "tuple[bytes, bool]":
    """Create what is missing of the embedded home; (queue program, created?).

    OWNER, (uid, gid) of the session user when root switches users: the
    Maildir is theirs, everything else stays root's and read-only to them.
    """
    os.makedirs(os.path.dirname(home) or b"/", 0o755, exist_ok=True)
    try:
        os.mkdir(home, 0o755)
        made_top = True
    except FileExistsError:
        made_top = False
    fds = []
    try:
        top = os.open(home, _DIR & ~os.O_NOFOLLOW)  # the admin's chosen path may be a link
        fds.append(top)
        if made_top:
            os.fchmod(top, 0o755)
        _check_private(top, home)
        try:
            os.stat(b"control", dir_fd=top, follow_symlinks=False)
            created = False
        except FileNotFoundError:
            created = True
        control = _subdir(top, b"control", 0o755)
        fds.append(control)
        _check_private(control, os.path.join(home, b"control"))
        bin_fd = _subdir(top, b"bin", 0o755)
        fds.append(bin_fd)
        _check_private(bin_fd, os.path.join(home, b"bin"))
        maildir = _subdir(top, b"Maildir", 0o700)
        fds.append(maildir)
        boxes = [maildir]
        for sub in (b"tmp", b"new", b"cur"):
            boxes.append(_subdir(maildir, sub, 0o700))
            fds.append(boxes[-1])
        if owner is not None:
            for fd in boxes:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != owner:
                    os.fchown(fd, *owner)
                    os.fchmod(fd, 0o700)
        me = socket.gethostname().encode("ascii", "replace") or b"localhost"
        _write_if_missing(control, b"me", me + b"\n")
        hosts = [me] + ([b"localhost"] if me != b"localhost" else [])
        _write_if_missing(control, b"rcpthosts", b"".join(h + b"\n" for h in hosts))
        _write_if_missing(control, b"smtpplugins", b"")
        _install_queue(bin_fd)
    finally:
        for fd in fds:
            os.close(fd)
    return os.path.join(home, b"bin", b"qmail-queue"), created


def unreachable(path: bytes, uid: int, gid: int) -> "str | None":
    """The first directory on PATH that UID (group GID only) may not search, as text."""
    path = os.path.abspath(path)
    parts = path.split(b"/")
    for i in range(1, len(parts) + 1):
        d = b"/".join(parts[:i]) or b"/"
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return None  # created later, by root, with mode 0755
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return "%s (mode %04o)" % (os.fsdecode(d), st.st_mode & 0o7777)
    return None


def _check_runnable(uid, gid, name) -> None:
    """The embedded queue program runs this interpreter and package as UID."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for what, path in (("interpreter", os.path.realpath(sys.executable)),
                       ("package", package_root)):
        blocked = unreachable(os.fsencode(os.path.dirname(path)), uid, gid)
        if blocked is not None:
            raise SetupError("user %s (uid %d) cannot run qspp's queue program: its %s %s is"
                             " behind %s; install qspp where that user can reach it"
                             % (name or uid, uid, what, path, blocked))


def switch_ids(ns) -> "tuple[int, int, str] | None":
    """(uid, gid, user name) the sessions run as after the switch; None without one."""
    import pwd
    uid, gid, name = ns.uid, ns.gid, ns.user
    if name is not None:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise SetupError("no such user: %s" % name) from None
        uid = pw.pw_uid if uid is None else uid
        gid = pw.pw_gid if gid is None else gid
    elif uid is not None:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            pw = None
        if gid is None:
            # tcpserver -u alone keeps root's group 0: every session would be
            # in the root group.  Take the user's own, as envuidgid does.
            if pw is None:
                raise SetupError("-u %d has no passwd entry to take a group from; give -g too"
                                 % uid)
            gid = pw.pw_gid
        name = pw.pw_name if pw is not None else None
    if uid is None and gid is None:
        return None
    return uid, gid, name


def _who(ids) -> bytes:
    """`user NAME (uid U, gid G)` of the process that writes the mail."""
    if ids is None or ids[0] is None:
        import pwd
        uid, gid = os.geteuid(), os.getegid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = None
    else:
        uid, gid, name = ids
        gid = os.getegid() if gid is None else gid
    user = b"user %s " % os.fsencode(name) if name else b""
    return b"%s(uid %d, gid %d)" % (user, uid, gid)


def choose_home(ns, environ) -> "tuple[bytes, dict]":
    """(home, variables to set); logs where mail goes for the embedded home."""
    ids = switch_ids(ns)
    # after an upgrade the switch has been made already; the home is the same
    switching = ids is not None and (os.geteuid() == 0 or _switched(ids))
    home, how = homes.find(ns.qmailhome, environ, system=switching)  # as `qspp check` finds it
    if how != homes.EMBEDDED:
        return home, {}
    owner = None
    if switching:
        uid = os.geteuid() if ids[0] is None else ids[0]
        gid = os.getegid() if ids[1] is None else ids[1]
        blocked = unreachable(home, uid, gid)
        if blocked is not None:
            raise SetupError("user %s (uid %d) cannot reach %s: %s; give --qmailhome or"
                             " XDG_DATA_HOME a place it can reach"
                             % (ids[2] or uid, uid, os.fsdecode(home), blocked))
        owner = (uid, gid)
        if not environ.get(b"QMAILQUEUE"):
            _check_runnable(uid, gid, ids[2])
    queue, created = make_embedded_home(home, owner)
    extra = {}
    if not environ.get(b"QMAILQUEUE"):
        extra[b"QMAILQUEUE"] = queue
    maildir = environ.get(b"QSPP_MAILDIR") or os.path.join(home, b"Maildir")
    log(b"serve: embedded home %s%s; mail is delivered to %s by %s" % (
        home, b" (created)" if created else b"", os.path.join(maildir, b"new"),
        _who(ids if switching else None)))
    return home, extra


# ---------------------------------------------------------------------------
# one connection, in a worker

def resolve_names(env: dict, localname) -> None:
    """--resolve: TCPREMOTEHOST (and TCPLOCALHOST unless -l) from the DNS,
    with their TCP6 twins, as tcpserver does without -H."""
    if localname is None:
        name = _reverse(env[b"TCPLOCALIP"].decode())
        if name is not None:
            env[b"TCPLOCALHOST"] = env[b"TCP6LOCALHOST"] = name
    name = _reverse(env[b"TCPREMOTEIP"].decode())
    if name is not None:
        env[b"TCPREMOTEHOST"] = env[b"TCP6REMOTEHOST"] = name


def _reverse(ip: str) -> "bytes | None":
    try:
        name = socket.gethostbyaddr(ip)[0]
    except (OSError, UnicodeError):
        return None
    return name.lower().encode("ascii", "replace") if name else None


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # what qspp.smtpd.main sets up (spec §2.1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # CPython ignores SIGXFSZ so that a write past RLIMIT_FSIZE fails with
    # EFBIG; with no such limit none can, and the default is what children
    # need: then no spawn has to set it and put it back
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY:
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


# where a session waits for its client (see Worker._on_alarm)
_READ_WAIT = smtpd.Connection._raw_read.__code__
_WRITE_WAIT = smtpd.Connection._raw_write.__code__


_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO/SO_SNDTIMEO
_SOL_SOCKET, _SO_RCVTIMEO, _SO_SNDTIMEO = socket.SOL_SOCKET, socket.SO_RCVTIMEO, socket.SO_SNDTIMEO


class _Stop(Exception):
    """Raised out of an idle worker's accept() when serve stops."""


def _maildir_of(env) -> str:
    maildir = os.fsdecode(env.get(b"QSPP_MAILDIR") or b"./Maildir")
    return maildir.rstrip("/") or "/"


def _deliver_code(msg_fd, env_fd, maildir) -> int:
    """qspp.maildirqueue's delivery; its exit code, as qmail-queue's."""
    from . import maildirqueue
    try:
        return maildirqueue.deliver_stored(msg_fd, env_fd, maildir)
    except Exception as e:  # noqa: BLE001 - a queue answers with an exit code
        code = getattr(e, "code", None)
        if isinstance(code, int):
            return code
        log("embedded queue: %s: %s" % (e.__class__.__name__, e))
        return 81


def _write_all(fd, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _InProcessQueue:
    """The embedded home's delivery done by the session process itself.

    Message and envelope go to anonymous files (the message to memory up to
    SPILL bytes, then to an unnamed file in the Maildir's tmp/, so a big one
    costs no memory); at the end maildirqueue.deliver_stored reads them as
    the queue program reads its two pipes, less the spool the message is
    already in, so the durability (the file fsynced, linked into new/, new/
    fsynced, all before the 250), the exit codes and thus the replies are the
    queue program's.
    """

    SPILL = 1 << 20
    __slots__ = ("pid", "exec_error", "write_failed", "status", "_msg", "_size", "_on_disk",
                 "_maildir", "_fail")

    def __init__(self, env):
        self.pid = os.getpid()
        self.exec_error = None
        self.write_failed = False
        self.status = None
        self._maildir = _maildir_of(env)
        self._fail = None
        self._size = 0
        self._on_disk = False
        try:
            self._msg = os.memfd_create("message", os.MFD_CLOEXEC)
        except OSError:
            self._msg = -1
            self._fail = 81

    def _spill(self) -> None:
        """Move what is in memory to an unnamed file in tmp/ (made when missing,
        as maildirqueue makes it)."""
        try:
            try:
                fd = self._tmpfile()
            except FileNotFoundError:
                for part in ("", "/tmp", "/new", "/cur"):
                    try:
                        os.mkdir(self._maildir + part, 0o700)
                    except FileExistsError:
                        pass
                fd = self._tmpfile()
        except OSError as e:
            self._fail = 53 if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else 61
            return
        try:
            os.lseek(self._msg, 0, os.SEEK_SET)
            while True:
                chunk = os.read(self._msg, 65536)
                if not chunk:
                    break
                _write_all(fd, chunk)
        except OSError:
            os.close(fd)
            self.write_failed = True
            return
        os.close(self._msg)
        self._msg = fd
        self._on_disk = True

    def _tmpfile(self) -> int:
        return os.open(self._maildir + "/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)

    def write(self, data):
        if self._msg < 0 or self.write_failed or self._fail is not None or not data:
            return
        self._size += len(data)
        if self._size > self.SPILL and not self._on_disk:
            self._spill()
            if self.write_failed or self._fail is not None:
                return
        try:
            _write_all(self._msg, data)
        except OSError:
            self.write_failed = True

    def finish(self, envelope):
        from .queue import reply_for_status
        try:
            if envelope is None:
                code = 54  # aborted: qmail-queue would read a cut envelope
            elif self._fail is not None:
                code = self._fail
            elif self.write_failed:
                code = 53
            else:
                code = self._deliver(envelope)
        finally:
            if self._msg >= 0:
                os.close(self._msg)
                self._msg = -1
        self.status = code << 8
        return reply_for_status(self.status, False, self.pid, time.time())

    def _deliver(self, envelope) -> int:
        try:
            env_fd = os.memfd_create("envelope", os.MFD_CLOEXEC)
        except OSError:
            return 81
        try:
            try:
                _write_all(env_fd, envelope)
                os.lseek(env_fd, 0, os.SEEK_SET)
                os.lseek(self._msg, 0, os.SEEK_SET)
            except OSError:
                return 53
            return _deliver_code(self._msg, env_fd, self._maildir)
        finally:
            os.close(env_fd)


class _EmbeddedQueue:
    """The embedded home's bin/qmail-queue, without starting an interpreter.

    The script would start a new interpreter for every message.  Instead the
    session delivers itself (_InProcessQueue), running maildirqueue's own
    delivery, so the durability and the replies are the script's.  Any other
    program (QMAILQUEUE set by a rule, say) is spawned as usual.
    """

    program = None     # the embedded home's queue script

    @classmethod
    def start(cls, program, env):
        from .queue import Queue
        if program != cls.program:
            return Queue.start(program, env)
        return _InProcessQueue(env)


class _TimedQueue:
    """qmail-queue timed from its start to its answer, for --metrics."""

    start_queue = None
    rec = None
    __slots__ = ("queue", "t0")

    def __init__(self, queue, t0):
        self.queue = queue
        self.t0 = t0

    @classmethod
    def start(cls, program, env):
        t0 = time.monotonic()
        return cls(cls.start_queue(program, env), t0)

    def __getattr__(self, name):
        return getattr(self.queue, name)

    def write(self, data):
        self.queue.write(data)

    def finish(self, envelope):
        try:
            return self.queue.finish(envelope)
        finally:
            _TimedQueue.rec.queue_time(time.monotonic() - self.t0)


class _SessionAuthIO(smtpd._AuthIO):
    """AUTH as smtpd does it, with a CRAM-MD5 challenge number unique per session.

    netqmail's challenge is <pid.time@host>: unique because every connection
    had a process of its own.  A worker serves many, so two sessions within a
    second would be offered the same challenge, and a response overheard in
    one could be replayed in the other.  The number is the worker's pid for
    its first session and n * 10^7 + pid for its n-th after (a Linux pid is
    below 2^22): unique among live workers and among one worker's sessions.
    """

    sessions = 0

    def __init__(self):
        super().__init__()
        self.pid += _SessionAuthIO.sessions * 10_000_000
        _SessionAuthIO.sessions += 1


class Slots:
    """Which client address each worker is serving, in memory all workers share.

    Slot i belongs to worker i: 0 while idle, else 1 and the address.  The
    per-ip count is taken by marking one's own slot first and counting after,
    so two workers racing for one address can both refuse but never both pass.
    After the slots, the parent keeps how many workers it has, so that a
    worker taking a client can tell whether spare ones are running short.
    """

    SIZE = 17

    def __init__(self, n):
        self.n = n
        self.end = n * self.SIZE
        self.mem = mmap.mmap(-1, self.end + 4)  # MAP_SHARED: the workers see one copy

    # a balancer's connection: busy, but counted for no address
    BALANCER = b"\2" + bytes(16)

    @staticmethod
    def key(packed: bytes) -> bytes:
        """The slot value for a client at PACKED (16 bytes, IPv4 as ::ffff:a.b.c.d,
        so one client is one key on IPv4 and dual-stack listeners alike)."""
        return b"\1" + packed

    def take(self, i, key) -> int:
        size = self.SIZE
        self.mem[i * size:(i + 1) * size] = key
        data = self.mem[:self.end]
        n = 0
        j = data.find(key)
        while j >= 0:  # only a match at a slot's start is a slot
            if j % size:
                j = data.find(key, j + 1)
            else:
                n += 1
                j = data.find(key, j + size)
        return n

    def free(self, i):
        self.mem[i * self.SIZE:(i + 1) * self.SIZE] = bytes(self.SIZE)

    def busy(self) -> int:
        return self.n - self.mem[0:self.end:self.SIZE].count(0)

    def set_workers(self, n):
        self.mem[self.end:] = n.to_bytes(4, "little")

    def idle(self) -> int:
        return int.from_bytes(self.mem[self.end:], "little") - self.busy()


def _asking(fds) -> "select.poll":
    """A poll object asking nothing of FDS: its poll(0) answers POLLNVAL for
    each of them that is closed."""
    poller = select.poll()
    for n in fds:
        poller.register(n, 0)
    return poller


def _open_fds() -> "set[int]":
    listed = {int(n) for n in os.listdir("/proc/self/fd")}
    # one of them was the listing's own, closed by now: poll() tells which
    listed.difference_update(n for n, ev in _asking(listed).poll(0) if ev & select.POLLNVAL)
    return listed


class FdCheck:
    """Finds what a session left open, without listing /proc/self/fd each time.

    Listing it costs a worker some 30 us per session.  Descriptors are
    numbered lowest free first, so every one a session opens takes one of the
    lowest numbers the worker does not hold; poll() answers POLLNVAL for each
    closed descriptor it is asked about, so one poll() of the PROBED lowest
    free numbers proves them all closed (an open one answers something else
    or nothing).  A session holding more than PROBED at once could leave one
    beyond them: the full listing runs every FULL_EVERY sessions, and at once
    whenever the poll finds one open.
    """

    PROBED = 64
    FULL_EVERY = 64

    def __init__(self):
        self.rebase(_open_fds())

    def rebase(self, held) -> None:
        """From now on HELD (descriptor numbers) are the worker's own."""
        self.held = set(held)
        probed = []
        n = 0
        while len(probed) < self.PROBED:
            if n not in self.held:
                probed.append(n)
            n += 1
        self.poller = _asking(probed)
        # poll() lists its answers in the order they were registered
        self.all_closed = [(n, select.POLLNVAL) for n in probed]
        self.countdown = self.FULL_EVERY

    def left_open(self, also_held=()) -> "list[int]":
        """The descriptors open now that are neither the worker's nor in
        ALSO_HELD (ones the worker opened since, such as reloaded rules)."""
        self.countdown -= 1
        if self.countdown > 0 and self.poller.poll(0) == self.all_closed:
            return []
        now = _open_fds()
        left = now - self.held
        left.difference_update(also_held)
        if left:
            return sorted(left)
        if now != self.held:
            self.rebase(now)  # the worker's own changed: reloaded rules
        else:
            self.countdown = self.FULL_EVERY
        return []


def _max_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Worker:
    """One pre-forked process: accepts a client, runs its session, and again.

    Between sessions everything a session may have changed is put back (fds 0
    and 1, cwd, umask, signal dispositions, the alarm) and checked (open fds,
    the memory high-water mark): a worker that cannot be proved clean ends
    and the parent starts a fresh one.  It ends anyway after RECYCLE sessions.
    """

    RECYCLE = 1000
    MAX_GROWTH_KB = 32 * 1024

    def __init__(self, server, index):
        self.server = server
        self.index = index
        self.idle = False
        self.stopping = False
        self.reload = False
        self.in_rules = False
        self.client = None      # (ip, port) the session stands for
        self.conn = None        # its socket, while it runs
        self.ready = None       # epoll on the listeners
        self.kinds = {}         # (family, type, proto) by listener fd
        self.listener = None    # the one the session came from
        self.fds = None         # FdCheck, once running

    def _on_stop(self, signum, frame):
        self.stopping = True
        for s in self.server.listeners:
            try:
                s.close()  # from now on, new clients are refused
            except OSError:
                pass
        if self.idle:
            raise _Stop()

    def _on_alarm(self, signum, frame):
        """--max-session-time is up: end the session at its next wait for the client.

        The end comes only where the client is being waited for, never while a
        plugin or the queue program runs: there the alarm is put off, so a
        message being queued is never cut between qmail-queue's answer and the
        reply.  Waiting to read, the client gets netqmail's timeout reply.
        """
        code = frame.f_code if frame is not None else None
        if code is not _READ_WAIT and code is not _WRITE_WAIT:
            _signal.setitimer(_signal.ITIMER_REAL, 0.25)
            return
        server, remote = self.server, self.client
        if server.log_mode == "json":
            import json
            log(json.dumps({"event": "serve-session-time", "ip": remote[0], "port": remote[1],
                            "seconds": server.session_time}, separators=(",", ":")))
        elif server.log_mode == "text":
            log("serve: session time limit (%g s) reached: %s port %d"
                % (server.session_time, remote[0], remote[1]))
        if code is _READ_WAIT:
            raise smtpd._Timeout()
        raise smtpd._Exit(1, "session time")  # the client is not reading: nothing to say

    def _io_timeouts(self, seconds) -> bool:
        """timeoutsmtpd for the session's reads and writes, kept by the
        socket itself: then they need no poll() first (smtpd.run).

        An accepted socket starts with its listener's options, so the
        listener gets them as well and the next sessions only read them back:
        in 3.11 setsockopt() with bytes first tries two other argument forms
        and formats a TypeError for each.  Read back, not assumed: another
        worker may have set the listener to another timeoutsmtpd meanwhile.
        """
        try:
            tv = _TIMEVAL.pack(seconds, 0)
            conn = self.conn
            if (conn.getsockopt(_SOL_SOCKET, _SO_RCVTIMEO, _TIMEVAL.size) == tv
                    and conn.getsockopt(_SOL_SOCKET, _SO_SNDTIMEO, _TIMEVAL.size) == tv):
                return True
            conn.setsockopt(_SOL_SOCKET, _SO_RCVTIMEO, tv)
            conn.setsockopt(_SOL_SOCKET, _SO_SNDTIMEO, tv)
        except (OSError, struct.error):
            return False
        try:
            self.listener.setsockopt(_SOL_SOCKET, _SO_RCVTIMEO, tv)
            self.listener.setsockopt(_SOL_SOCKET, _SO_SNDTIMEO, tv)
        except (OSError, AttributeError):
            pass  # closed by a stop signal, or none: this session has them anyway
        return True

    def _on_hup(self, signum, frame):
        # The parent has just loaded good rules: follow at once, even in a
        # session (which never looks at them), so that a bad file written
        # later cannot leave this worker with older rules than the parent's.
        self.reload = True
        if not self.in_rules:
            self.in_rules = True
            try:
                self.reload_rules()
            finally:
                self.in_rules = False

    def reload_rules(self):
        self.reload = False
        self.server.load_rules(None)
        if self.fds is not None:
            self.fds.countdown = 1  # the old cdb's number is free now: list again

    def run(self) -> int:
        server = self.server
        _reset_signals()
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS + (signal.SIGUSR1,))
        server.close_in_worker()
        smtpd._AuthIO = _SessionAuthIO
        if server.embedded_queue is not None:
            _EmbeddedQueue.program = server.embedded_queue
            smtpd.Queue = _EmbeddedQueue
        if server.metrics is not None:
            from .metrics import SessionObserver
            rec = server.rec
            smtpd.Observer = lambda journal: SessionObserver(journal, rec)
            _TimedQueue.start_queue = smtpd.Queue.start
            _TimedQueue.rec = rec
            smtpd.Queue = _TimedQueue
        self.cwd = os.getcwd()
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        # Idle workers wait in epoll, not in accept(): a stop signal may then
        # end the wait at any moment without losing a client accept() had
        # already taken (SIGUSR1 at an upgrade comes while clients arrive).
        # EPOLLEXCLUSIVE wakes one waiter per client, as a blocking accept would.
        import select
        self.ready = select.epoll()
        for s in server.listeners:
            self.ready.register(s, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        # what this process inherited (listeners adopted at an upgrade come
        # inheritable) is marked once; each session is then proved to leave
        # nothing open, so smtpd.run need not look again
        spprun.cloexec_inherited_fds()
        smtpd.mark_inherited_fds = False
        spprun.null_stdin()  # opened now, it is not taken for a session's leftover
        control.remember_absent = True  # many connections: one stat of control/ each
        # the signal state just set is kept for good (a session's own changes
        # are put back after it): plugins and the queue can start by vfork
        spawn.use_vfork()
        self.fds = FdCheck()
        self.rss = _max_rss_kb()
        served = 0
        try:
            while not self.stopping and served < server.worker_sessions:
                events = self.wait()
                if self.stopping:
                    break
                try:
                    got = self.accept(events)
                except OSError as e:
                    # out of descriptors or memory: the client stays in the backlog
                    log("serve: accept: %s" % e.strerror)
                    time.sleep(0.1)
                    continue
                if got is None:
                    continue
                served += 1
                if not self.serve(*got):
                    return 0
        except _Stop:
            pass
        return 0

    def wait(self):
        """The listeners' events; [] when told to stop."""
        self.idle = True
        try:
            if self.stopping:
                return []
            return self.ready.poll()
        except _Stop:
            return []
        finally:
            self.idle = False

    def accept(self, events):
        """(conn, peer) from a listener with a client; None: another worker
        took it first."""
        for fd, _ in events:
            for s in self.server.listeners:
                if s.fileno() == fd:
                    try:
                        # blocking, though the listener is not: accept4()
                        # passes on no O_NONBLOCK, and the timeout is None
                        cfd, peer = s._accept()
                    except (BlockingIOError, ConnectionAbortedError):
                        continue
                    kind = self.kinds.get(fd)
                    if kind is None:
                        kind = self.kinds[fd] = (int(s.family), int(s.type), s.proto)
                    # the C socket: socket.socket.accept() takes as long again
                    # making enums of family and type and running its __init__
                    try:
                        conn = _socket.socket(*kind, cfd)
                        self.listener = s
                        return conn, peer
                    except BaseException:
                        os.close(cfd)
                        raise
        return None

    def serve(self, conn, remote) -> bool:
        """One client; False when this worker must not serve another."""
        server = self.server
        slots = server.slots
        rec = server.rec
        try:
            rec.count("qspp_connections_accepted_total")
            proxied = server.proxy_from is not None and remote[0] in server.proxy_from
            if proxied:
                n = slots.take(self.index, Slots.BALANCER)  # held to no --per-ip
            else:
                n = slots.take(self.index, Slots.key(tcpenv.address(conn.family, remote)[0]))
            if slots.idle() < server.spare:
                server.note_busy()
            if not proxied and server.per_ip and n > server.per_ip:
                conn.close()
                rec.count("qspp_connections_denied_total", "per_ip")
                server.log_per_ip(remote, n - 1)
                return True
            try:
                env, header = tcpenv.client_environ(
                    conn, remote, server.proxy_from if proxied else None, PROXY_TIMEOUT,
                    server.localname)
            except OSError:
                conn.close()
                return True  # the client is already gone (getsockname)
            except server.proxy_error as e:
                conn.close()
                rec.count("qspp_connections_denied_total", "proxy")
                server.log_proxy(remote, e)
                return True
            env = {**server.base_env, **env}
            client = (env[b"TCPREMOTEIP"].decode(), int(env[b"TCPREMOTEPORT"]))
            if header is not None and not header.local and server.per_ip:
                n = slots.take(self.index, Slots.key(tcpenv._as16(header.source)))
                if n > server.per_ip:
                    conn.close()
                    rec.count("qspp_connections_denied_total", "per_ip")
                    server.log_per_ip(client, n - 1)
                    return True
            if server.resolve:
                resolve_names(env, server.localname)
            return self.session(conn, env, client)
        finally:
            slots.free(self.index)

    def session(self, conn, env, client) -> bool:
        server = self.server
        if server.rules_path is not None:
            self.in_rules = True
            try:
                if self.reload or server.rules_changed():
                    self.reload_rules()
                rule = server.lookup(env, client)
            finally:
                self.in_rules = False
            if rule is False:
                conn.close()
                server.rec.count("qspp_connections_denied_total", "rules")
                return True
            if rule is not None:
                rule.apply(env)
        clean = True
        try:
            self.client = client
            if server.session_time:
                _signal.setitimer(_signal.ITIMER_REAL, server.session_time)
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            self.conn = conn  # kept open for _io_timeouts; close-on-exec
            smtpd.run(server.smtpd_args, env, self._io_timeouts)
        except Exception as e:  # noqa: BLE001 - the session's own last words
            log("internal error: %s: %s" % (type(e).__name__, e))
            clean = False
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            self.conn = None
            conn.close()
            # what qspp.smtpd.main sets up (spec §2.1), should a session have changed it
            if _signal.getsignal(_signal.SIGPIPE) != _signal.SIG_IGN:
                _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
            if _signal.getsignal(_signal.SIGCHLD) != _signal.SIG_DFL:
                _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            os.dup2(self.null, 0)  # the last copies of the connection: it closes
            os.dup2(self.null, 1)
            os.chdir(self.cwd)
            os.umask(self.umask)
        # reloaded rules: a new number, not a leak
        left = self.fds.left_open(() if server.rules is None else (server.rules.cdb.fd,))
        if left:
            log("serve: descriptors %s left open by a session; starting a fresh worker"
                % ",".join(map(str, left)))
            return False
        if _max_rss_kb() > self.rss + self.MAX_GROWTH_KB:
            return False  # a big session: the next one gets a small process
        return clean


# ---------------------------------------------------------------------------
# the parent

class Server:
    def __init__(self, ns, base_env, rules_path):
        self.limit = ns.concurrency
        self.per_ip = ns.per_ip
        self.session_time = ns.max_session_time
        self.worker_sessions = ns.worker_sessions
        self.grace = ns.grace
        self.localname = os.fsencode(ns.localname) if ns.localname is not None else None
        self.resolve = ns.resolve
        self.smtpd_args = ns.smtpd_args
        self.base_env = base_env
        self.log_mode = ns.log
        self.rules_path = rules_path
        self.rules = None
        self.bad_rules = None   # signature of a file already reported as unusable
        self.embedded_queue = None
        self.workers = {}       # pid -> (slot index, start time, metrics row)
        self.retired = set()    # workers of the image before an upgrade
        self.slots = Slots(self.limit)
        self.pending = set()
        self.listeners = []
        self.proxy_from = ns.proxy_from
        self.proxy_error = _NeverRaised
        if ns.proxy_from is not None:
            from .proxyproto import ProxyError
            self.proxy_error = ProxyError
        self.rec = _NO_METRICS
        self.metrics = None     # metrics.Metrics with --metrics
        self.exporter = None
        self.sel = None
        self.spare = min(self.limit, SPARE_WORKERS)
        self.free_slots = list(range(self.limit - 1, -1, -1))  # indexes no worker holds
        self.resume_at = None   # after a failed fork or a worker dying at once
        self.stopping = False
        self.deadline = None
        self.killed = None      # when the stragglers got SIGTERM

    # -- setup ---------------------------------------------------------------
    def listen(self, hosts, port, backlog, adopted=()):
        """One listener per host, all on one port (port 0: the first one's).

        ADOPTED: sockets handed over by the image before an upgrade; one bound
        to a host and port asked for is used as it is, the others are closed.
        [(host, port)] as bound; OSError names the host that failed.
        """
        from .handover import find
        names = []
        adopted = list(adopted)
        self.taken = 0
        for host in hosts:
            host = "0.0.0.0" if host in ("", "0") else host
            s = find(adopted, host, port)
            if s is not None:
                adopted.remove(s)
                self.listeners.append(s)
                self.taken += 1
                port = s.getsockname()[1]
                names.append((host, port))
                continue
            try:
                s = _listener(host, port, backlog)
            except (OSError, OverflowError) as e:
                raise OSError(getattr(e, "errno", None), "%s port %d: %s" % (
                    host, port, getattr(e, "strerror", None) or e)) from None
            self.listeners.append(s)
            port = s.getsockname()[1]
            names.append((host, port))
        for s in adopted:
            s.close()  # a --host no longer asked for
        for s in self.listeners:
            s.setblocking(False)  # workers wait in epoll; one wins each client
        return names

    def load_rules(self, why):
        """(Re)load the rules; on failure keep the old ones and say so once.

        WHY None: a worker catching up, silently (the parent says it once).
        """
        path = self.rules_path
        try:
            st_sig = signature(os.stat(path))
        except OSError as e:
            st_sig = ("error", e.errno)
        try:
            rules = Rules.load(path)
        except RulesError as e:
            if self.rules is None:
                raise
            if why is not None and (st_sig != self.bad_rules or why == "SIGHUP"):
                log("serve: rules %s: %s; keeping the rules loaded before"
                    % (os.fsdecode(path), e))
            self.bad_rules = st_sig
            return
        old, self.rules = self.rules, rules
        self.bad_rules = None
        if old is not None:
            old.close()
            if why is not None:
                self._signal_workers(signal.SIGHUP)  # before the line: a client told
                log("serve: rules %s reloaded (%s)" % (os.fsdecode(path), why))  # may come

    def rules_changed(self) -> bool:
        try:
            sig = signature(os.stat(self.rules_path))
        except OSError as e:
            sig = ("error", e.errno)
        return sig != self.rules.signature and sig != self.bad_rules

    def lookup(self, env, remote):
        """The client's rule: a Rule, None (no rule), or False (closed: denied or unreadable).

        REMOTE: the client's (ip, port), the PROXY header's when there is one.
        """
        rules = self.rules
        ip = env[b"TCPREMOTEIP"]
        try:
            rule = rules.lookup(ip, env.get(b"TCPREMOTEHOST"), ipv6=True)
        except OSError as e:
            log(b"serve: unable to read %s: %s: dropped %s port %d" % (
                os.fsencode(rules.path), (e.strerror or str(e)).encode(), ip, remote[1]))
            return False
        if rule is not None and rule.deny:
            if self.log_mode == "json":
                import json
                log(json.dumps({"event": "serve-deny", "ip": ip.decode(), "port": remote[1],
                                "rule": rule.key.decode("utf-8", "backslashreplace")},
                               separators=(",", ":")))
            elif self.log_mode == "text":
                log(b"serve: deny %s port %d (rule \"%s\")" % (ip, remote[1], rule.key))
            return False  # as tcpserver: the close sends nothing
        return rule

    def log_per_ip(self, remote, n):
        """A client over --per-ip was closed (finding 10).

        Closed with nothing sent, as tcpserver closes a denied client: no reply
        text netqmail never sends, and a sending MTA retries later as it would
        after a 421.  It costs the worker only an accept and a close.
        """
        if self.log_mode == "json":
            import json
            log(json.dumps({"event": "serve-per-ip", "ip": remote[0], "port": remote[1],
                            "sessions": n}, separators=(",", ":")))
        elif self.log_mode == "text":
            log("serve: per-ip limit: closed %s port %d (%d sessions from it)"
                % (remote[0], remote[1], n))

    def log_proxy(self, peer, error):
        """A balancer's connection without a valid PROXY header was closed."""
        if self.log_mode == "json":
            import json
            log(json.dumps({"event": "serve-proxy", "ip": peer[0], "port": peer[1],
                            "error": str(error)}, separators=(",", ":")))
        elif self.log_mode == "text":
            log("serve: proxy: closed %s port %d: %s" % (peer[0], peer[1], error))

    def close_in_worker(self):
        if self.exporter is not None:
            self.exporter.close_in_child()
        self.sel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.close(self.note_r)

    def note_busy(self):
        """A worker took a client, leaving fewer than SPARE_WORKERS idle: the
        parent looks whether to start another."""
        try:
            os.write(self.note_w, b"\0")
        except OSError:
            pass  # the pipe is full: the parent has been told already

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.pending.add(signum)

    def install_signals(self):
        self.wake_r, self.wake_w = os.pipe()
        self.note_r, self.note_w = os.pipe()
        for fd in (self.wake_r, self.wake_w, self.note_r, self.note_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # blocked across the exec of an upgrade, until the handlers are back
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    # -- the loop ------------------------------------------------------------
    def run(self) -> int:
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.sel.register(self.note_r, selectors.EVENT_READ)
        exp = self.exporter
        if exp is not None:
            exp.register(self.sel)
        # after an upgrade: old workers that ended before our SIGCHLD handler was
        # in place sent their signal to nobody
        self.reap()
        # what the parent has now is shared, unchanged, by every worker
        gc.freeze()
        self.top_up()
        while True:
            now = time.monotonic()
            timeout = None
            if self.resume_at is not None:
                timeout = max(0.0, self.resume_at - now)
            if self.rules_path is not None and not self.stopping:
                timeout = RULES_CHECK if timeout is None else min(timeout, RULES_CHECK)
            if not self.stopping and len(self.workers) < self.limit:
                # a worker reads the count of workers without a lock and may
                # miss a note it should have sent: the parent looks anyway
                timeout = TOP_UP_CHECK if timeout is None else min(timeout, TOP_UP_CHECK)
            if self.stopping:
                if not self.workers and not self.retired:
                    log("serve: stopped")
                    return 0
                until = self.killed + KILL_WAIT if self.killed is not None else self.deadline
                left = max(0.0, until - now)
                timeout = left if timeout is None else min(timeout, left)
            if exp is not None:
                t = exp.timeout()
                if t is not None:
                    timeout = t if timeout is None else min(timeout, t)
            for key, events in self.sel.select(timeout):
                if exp is not None and exp.owns(key):
                    exp.ready(key, events)
                    continue
                try:
                    while os.read(key.fd, 512):
                        pass
                except BlockingIOError:
                    pass
            if exp is not None:
                exp.expire()
            self.handle_signals()
            if self.stopping:
                self.enforce_deadline()
                continue
            if self.rules_path is not None and self.rules_changed():
                self.load_rules("file changed")
            self.top_up()

    def handle_signals(self):
        sigs, self.pending = self.pending, set()
        if signal.SIGCHLD in sigs or self.workers:
            self.reap()
        if signal.SIGHUP in sigs and self.rules_path is not None and not self.stopping:
            self.load_rules("SIGHUP")
        if signal.SIGUSR2 in sigs and not self.stopping and not sigs & {
                signal.SIGTERM, signal.SIGINT}:
            self.upgrade()
        if sigs & {signal.SIGTERM, signal.SIGINT}:
            if self.stopping:
                self.deadline = time.monotonic()  # asked again: no more waiting
            else:
                self.stop_accepting()

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if pid in self.retired:
                self.retired.discard(pid)
                continue
            index, started, row = self.workers.pop(pid, (None, None, None))
            if index is None:
                continue
            self.slots.set_workers(len(self.workers))
            if self.metrics is not None:
                if os.WIFSIGNALED(status) and self.slots.mem[index * Slots.SIZE]:
                    self.rec.count("qspp_sessions_total", "killed")
                self.metrics.release(row)
            self.slots.free(index)
            self.free_slots.append(index)
            if self.stopping:
                continue
            if os.WIFSIGNALED(status):
                log("serve: worker %d killed by signal %d" % (pid, os.WTERMSIG(status)))
            if time.monotonic() - started < 1.0 and status != 0:
                # dying at once: do not fork in a tight loop
                self.resume_at = time.monotonic() + 0.5

    def top_up(self):
        """Start workers until SPARE are idle, never more than -c in all."""
        if self.resume_at is not None:
            if time.monotonic() < self.resume_at:
                return
            self.resume_at = None
        idle = len(self.workers) - self.slots.busy()
        for _ in range(min(self.limit - len(self.workers), self.spare - idle)):
            if not self.start_worker():
                return

    def start_worker(self) -> bool:
        index = self.free_slots.pop()
        row = self.metrics.claim() if self.metrics is not None else None
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS + (signal.SIGUSR1,))
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS + (signal.SIGUSR1,))
            log("serve: fork: %s" % e.strerror)
            self.free_slots.append(index)
            if row is not None:
                self.metrics.free.append(row)
            self.resume_at = time.monotonic() + 0.5
            return False
        if pid == 0:
            status = 1
            try:
                if self.metrics is not None:
                    self.rec = self.metrics.recorder(row)
                status = Worker(self, index).run()
            except BaseException as e:  # noqa: B902 - nothing may return into the parent's loop
                try:
                    log("internal error: %s: %s" % (type(e).__name__, e))
                except BaseException:
                    pass
                status = 1
            finally:
                os._exit(status)
        self.workers[pid] = (index, time.monotonic(), row)
        self.slots.set_workers(len(self.workers))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS + (signal.SIGUSR1,))
        return True

    def start_metrics(self, host, port):
        """The shared table and the parent's HTTP listener, before any fork."""
        from . import metrics
        # row 0 is the parent's; a worker reaped frees its row for the next
        self.metrics = metrics.Metrics(rows=self.limit + 1)
        self.rec = self.metrics.parent
        self.exporter = metrics.Exporter(
            metrics.listen(host, port),
            lambda: self.metrics.render(active=self.slots.busy()))
        return self.exporter.listener.getsockname()

    def upgrade(self):
        """SIGUSR2: re-execute this command line in this process, listeners kept."""
        argv = _command_line()
        why = _trial_run(argv)
        if why is not None:
            log("serve: upgrade refused, still serving: %s" % why)
            return
        from . import handover
        # a SIGTERM during the new image's start would find no handler: it
        # waits, blocked, for install_signals
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        self._signal_workers(signal.SIGUSR1)  # finish the session, accept no more
        env = handover.prepare(self.listeners, dict(os.environb))
        env[RETIRED] = b" ".join(b"%d" % pid for pid in list(self.workers) + list(self.retired))
        log("serve: upgrade: re-executing with %d listening socket%s; %d worker%s finishing"
            % (len(self.listeners), "" if len(self.listeners) == 1 else "s",
               len(self.workers), "" if len(self.workers) == 1 else "s"))
        try:
            os.execve(sys.executable, argv, env)
        except OSError as e:
            # the descriptors have been moved for the new image: this one
            # cannot go on; the supervisor starts a fresh one
            log("serve: upgrade: cannot execute %s: %s" % (sys.executable, e.strerror))
            os._exit(111)

    def stop_accepting(self):
        self.stopping = True
        for s in self.listeners:
            s.close()
        self._signal_workers(signal.SIGUSR1)  # idle ones end, busy ones after their session
        self.deadline = time.monotonic() + self.grace
        # the listener is gone only when every idle worker has closed its copy:
        # wait for them (briefly) so that "stopping" means clients are refused
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            self.reap()
            if len(self.workers) <= self.slots.busy():
                break
            time.sleep(0.005)
        busy = self.slots.busy()
        if busy:
            log("serve: stopping: waiting up to %g s for %d session%s"
                % (self.grace, busy, "" if busy == 1 else "s"))

    def enforce_deadline(self):
        if not self.workers and not self.retired:
            return
        now = time.monotonic()
        if self.killed is None and now >= self.deadline:
            n = len(self.workers) + len(self.retired)
            log("serve: %d session%s still running after %g s: SIGTERM"
                % (n, "" if n == 1 else "s", self.grace))
            self._signal_workers(signal.SIGTERM)
            self.killed = now
        elif self.killed is not None and now >= self.killed + KILL_WAIT:
            self._signal_workers(signal.SIGKILL)
            for pid in list(self.workers) + list(self.retired):
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                self.workers.pop(pid, None)
            self.retired.clear()

    def _signal_workers(self, sig):
        for pid in list(self.workers) + list(self.retired):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------

class _NeverRaised(Exception):
    """Stands for proxyproto.ProxyError when there is no --proxy-from."""


class _NoMetrics:
    """The recorder without --metrics: every call does nothing."""

    def count(self, name, value=""):
        pass


_NO_METRICS = _NoMetrics()


def _listener(host, port, backlog):
    if ":" in host:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        # `::` takes IPv4 clients too, as the IPv6 tcpserver's socket does;
        # any other IPv6 address only its own
        any6 = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0]) == bytes(16)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if any6 else 1)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


# what a trial run must import besides _WARM_MODULES: the code serve itself runs
_UPGRADE_MODULES = ("qspp.serve", "qspp.smtpd", "qspp.session", "qspp.handover",
                    "qspp.tcpenv", "qspp.tcprules")


def _command_line() -> "list[bytes]":
    """This process's argv as the kernel has it (interpreter options and all)."""
    with open("/proc/self/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").split(b"\0")


def _trial_run(argv) -> "str | None":
    """Run the command line as a trial (UPGRADE_CHECK): None when it passes,
    else why not."""
    import subprocess
    env = dict(os.environb)
    env[UPGRADE_CHECK] = b"1"
    try:
        p = subprocess.run(argv, executable=sys.executable, env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=UPGRADE_CHECK_TIME)
    except subprocess.TimeoutExpired:
        return "the trial run of the new code took over %g s" % UPGRADE_CHECK_TIME
    except OSError as e:
        return "cannot run %s: %s" % (sys.executable, e.strerror)
    if p.returncode != 0:
        lines = p.stderr.decode("utf-8", "replace").strip().splitlines()
        return "the trial run of the new code exited %d%s" % (
            p.returncode, (": " + lines[-1]) if lines else "")
    return None


def _warm_up():
    import importlib
    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _ensure_std_fds():
    # a closed fd 0, 1 or 2 would be handed out to the listener or a client
    # socket, and the child's dup2 onto 0 and 1 would then clobber it
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _switched(ids) -> bool:
    """Already running as the user and group asked for, without root (the
    image after an upgrade of a serve that switched users)."""
    if ids is None or os.geteuid() == 0:
        return False
    uid, gid, _ = ids
    return (uid is None or (os.getuid(), os.geteuid()) == (uid, uid)) and (
        gid is None or (os.getgid(), os.getegid(), os.getgroups()) == (gid, gid, [gid]))


def drop_privileges(ns) -> None:
    """tcpserver's prot_gid then prot_uid: the group list becomes the one gid."""
    try:
        ids = switch_ids(ns)
    except SetupError as e:
        raise OSError(str(e)) from None
    if ids is None:
        return
    uid, gid, _ = ids
    if _switched(ids):
        return  # re-executed by an upgrade: done before the exec
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def base_environ(environ, home, extra, log_mode) -> dict:
    env = {k: v for k, v in environ.items() if k not in _PER_CONNECTION}
    env[b"QMAILHOME"] = home
    env.update(extra)
    if log_mode == "off":
        env.pop(b"SPPLOG", None)
    else:
        env[b"SPPLOG"] = log_mode.encode()
    return env


def main(argv=None, environ=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if environ is None:
        environ = os.environb
    ns = parse_args(argv)
    if environ.get(UPGRADE_CHECK) == b"1":
        _warm_up()
        import importlib
        for name in _UPGRADE_MODULES:
            importlib.import_module(name)  # an ImportError fails the trial
        return 0
    _ensure_std_fds()
    from . import handover
    try:
        adopted = handover.adopt(environ)  # before anything copies the environment
    except handover.HandoverError as e:
        log("serve: cannot take over listening sockets: %s" % e)
        return 111
    retired = environ.pop(RETIRED, b"").split()
    try:
        home, extra = choose_home(ns, environ)
    except OSError as e:
        from .show import os_error
        log("serve: cannot set up the embedded home: %s" % os_error(e))
        return 111
    except SetupError as e:
        log("serve: cannot set up the embedded home: %s" % e)
        return 111
    if not os.path.isdir(home):
        log(b"serve: the qmail home %s is not a directory" % home)
        return 111
    rules_path = os.fsencode(ns.rules) if ns.rules else None
    server = Server(ns, base_environ(environ, home, extra, ns.log), rules_path)
    server.embedded_queue = extra.get(b"QMAILQUEUE")
    if adopted:  # our own children, from before the exec
        server.retired = {int(p) for p in retired if p.isdigit()}
    if rules_path is not None:
        try:
            server.load_rules("start")
        except RulesError as e:
            log("serve: rules %s: %s" % (ns.rules, e))
            return 111
    _warm_up()
    try:
        names = server.listen(ns.host, ns.port, ns.backlog, adopted)
    except OSError as e:
        log("serve: cannot listen on %s" % e.strerror)
        return 111
    server.install_signals()
    if adopted:
        log("serve: upgraded: took over %d listening socket%s"
            % (server.taken, "" if server.taken == 1 else "s"))
    metrics_at = None
    if ns.metrics is not None:
        try:
            metrics_at = server.start_metrics(*ns.metrics)
        except (OSError, OverflowError) as e:
            log("serve: cannot listen for metrics on %s port %d: %s"
                % (ns.metrics[0], ns.metrics[1], getattr(e, "strerror", None) or e))
            return 111
    try:
        drop_privileges(ns)
    except OSError as e:
        log("serve: cannot switch user or group: %s" % (e.strerror or e))
        return 111
    # what `qspp check` would say, seen as the sessions' user; serve runs anyway
    diagnose.log_startup(home, server.base_env, rules_path,
                         switched=ns.uid is not None or ns.user is not None)
    log(b"serve: listening on %s, concurrency %d, per-ip %d, session time %s,"
        b" home %s%s" % (
        b" and ".join(b"%s port %d" % (h.encode(), p) for h, p in names),
        ns.concurrency, ns.per_ip,
        b"%gs" % ns.max_session_time if ns.max_session_time else b"unlimited", home,
        b", rules " + rules_path if rules_path else b""))
    if metrics_at is not None:
        log("serve: metrics on %s port %d" % metrics_at[:2])
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
