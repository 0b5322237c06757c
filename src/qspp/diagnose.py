"""What is wrong with a qmail home, said once for `qspp check` and `qspp serve`.

`qspp check` prints every finding and a listing of what a connection would
meet; `qspp serve` logs one line per error or warning at its start and keeps
serving (log_startup).  Both take their findings from home_checks, so the
two cannot disagree: the same home (home.find), the same lines.

"The session user" is whoever connections run as: for serve, the process
itself after its user switch; for check, its --user (or -u), else qmaild when
check runs as root (qmail's run files switch to it), else check's own user.
Permissions are judged by trying (os.access) when the session user is this
process, else from the mode bits.

Never on the per-connection path: subprocess, pwd and ssl are fine here.
Everything is imported up front: serve runs these checks after its user
switch, when the session user may not be able to read Python's own library.
"""

import grp
import os
import pwd
import re
import signal
import stat
import subprocess

from . import control
from .diag import log
from .cdb import HEADER_SIZE
from .queue import queue_program, reply_for_status
from .tcprules import Rules, RulesError, parse as parse_rule

try:
    import ssl
except ImportError:  # pragma: no cover - a Python without ssl has no STARTTLS either
    ssl = None
from .show import q as _q, text as _text

CONTROLS_421 = "connections get 421 unable to read controls (#4.3.0)"
SERVERCERT = b"control/servercert.pem"
# The user connections run as: tcpserver -u in every qmail guide.
SESSION_USER = "qmaild"
# How long the queue program may take to give up on an aborted message.
PROBE_SECONDS = 10

ROOT_WARNING = ("running as root without a user switch: sessions, plugins and the queue"
                " program run as root (give --user NAME, or -u UID -g GID)")


class Report:
    """Findings in the order found; check prints them after its listing."""

    def __init__(self):
        self.items = []     # (kind, finished line)
        self.count = {"error": 0, "warning": 0, "note": 0}

    def add(self, kind, text, place=None, lineno=None):
        self.count[kind] += 1
        where = ""
        if place is not None:
            where = _text(place) + (":%d" % lineno if lineno else "") + ": "
        self.items.append((kind, where + kind + ": " + text))

    def lines(self, kinds=("error", "warning", "note")):
        return [line for kind, line in self.items if kind in kinds]


# ---------------------------------------------------------------------------
# the session user

def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


class Who:
    """The session user.  current: it is this process, so ask the kernel;
    switched: a user switch was asked for (or, for check, assumed)."""

    __slots__ = ("name", "uid", "gid", "gids", "current", "switched", "why")

    def __init__(self, name, uid, gid, gids, current, switched, why=""):
        self.name, self.uid, self.gid, self.gids = name, uid, gid, set(gids)
        self.current, self.switched, self.why = current, switched, why

    @classmethod
    def this_process(cls, switched, why=""):
        uid, gid = os.geteuid(), os.getegid()
        return cls(_user_name(uid), uid, gid, set(os.getgroups()) | {gid}, True, switched, why)

    def may(self, path, st, bits):
        """May it read (4), execute (1) or both (5) the file at path, whose stat is st?"""
        if self.current:
            mode = (os.R_OK if bits & 4 else 0) | (os.X_OK if bits & 1 else 0)
            return os.access(path, mode)
        if self.uid == 0:
            return True
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid in self.gids else 0
        return (st.st_mode >> shift) & bits == bits

    def denied(self, st, what):
        return "%s cannot %s it (mode %04o, owner %d:%d)" % (
            self.name, what, st.st_mode & 0o7777, st.st_uid, st.st_gid)

    def listing(self):
        line = "user: %s (uid %d, gid %d" % (self.name, self.uid, self.gid)
        return line + ("; " + self.why if self.why else "") + ")"


class UserError(Exception):
    """A --user or -u that names nobody; str() is the message."""


def check_user(uid=None, gid=None, name=None):
    """The session user `qspp check` judges permissions for."""
    if name is not None:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise UserError("no such user: %s" % _text(name)) from None
        uid = pw.pw_uid if uid is None else uid
        gid = pw.pw_gid if gid is None else gid
    if uid is not None:
        if gid is None:
            # what -u alone should mean: that user's primary group
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = os.getegid()
        if uid == os.geteuid() and gid == os.getegid():
            return Who.this_process(True, "the user switch given")
        return Who(_user_name(uid), uid, gid, {gid}, False, True, "the user switch given")
    if os.geteuid() == 0:
        # Root may read and run nearly anything: what matters is what the
        # connections' user may do.
        try:
            pw = pwd.getpwnam(SESSION_USER)
        except KeyError:
            pass
        else:
            gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if SESSION_USER in g.gr_mem}
            return Who(SESSION_USER, pw.pw_uid, pw.pw_gid, gids, False, True,
                       "qmail's run files switch to it; --user NAME for another")
    return Who.this_process(False, "this process, no user switch")


def _check_root(report, who):
    if who.uid == 0 and not who.switched:
        report.add("warning", ROOT_WARNING)


# ---------------------------------------------------------------------------
# programs

def exec_problems(entry, who):
    """(kind, text) findings for a program path, relative to the cwd."""
    try:
        st = os.stat(entry)
    except FileNotFoundError:
        hint = ""
        for sep in (b" ", b"\t"):
            k = entry.find(sep)
            if k > 0 and os.path.isfile(entry[:k]):
                hint = " (%s exists: write :%s to pass arguments)" % (
                    _text(entry[:k]), _text(entry))
                break
        return [("error", "%s: no such file%s" % (_text(entry), hint))]
    except OSError as e:
        return [("error", "%s: %s" % (_text(entry), e.strerror))]
    if stat.S_ISDIR(st.st_mode):
        return [("error", "%s: is a directory" % _text(entry))]
    if not stat.S_ISREG(st.st_mode):
        return [("error", "%s: not a regular file" % _text(entry))]
    if not os.access(entry, os.X_OK):
        return [("error", "%s: not executable (mode %04o)" % (_text(entry), st.st_mode & 0o7777))]
    try:
        with open(entry, "rb") as f:
            head = f.read(256)
    except OSError:
        # Executable but unreadable to us: the kernel may still run a binary.
        return []
    script = head[:2] == b"#!"
    if not who.current and not who.may(entry, st, 5 if script else 1):
        # an interpreter must also read the script
        return [("error", "%s: %s" % (_text(entry), who.denied(
            st, "read and execute" if script else "execute")))]
    if script:
        line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
        interp = line
        for sep in (b" ", b"\t"):
            k = interp.find(sep)
            if k >= 0:
                interp = interp[:k]
        if not interp:
            return [("error", "%s: empty #! line" % _text(entry))]
        if interp.endswith(b"\r"):
            return [("error", "%s: #! line ends in CR (CRLF file): interpreter %s does not exist"
                     % (_text(entry), _q(interp)))]
        if not os.path.isfile(interp) or not os.access(interp, os.X_OK):
            return [("error", "%s: #! interpreter %s is missing or not executable"
                     % (_text(entry), _text(interp)))]
        return []
    if head[:4] != b"\x7fELF":
        # posix_spawn has no sh fallback for ENOEXEC; only binfmt_misc could
        # still run it, so this stays a warning.
        return [("warning", "%s: neither a #! script nor an ELF binary: exec will likely fail"
                 " (can't execute)" % _text(entry))]
    return []


# ---------------------------------------------------------------------------
# control files

class _Denied(control.ControlError):
    """A control file the session user may not read, seen from a root check."""

    def __init__(self, path, why):
        control.ControlError.__init__(self, path, 13)
        self.why = why

    def __str__(self):
        return "unable to read %s: %s" % (_text(self.path), self.why)


def _as(who, read, name):
    """read(name), refused as it would be for the session user."""
    if not who.current:
        try:
            st = os.stat(name)
        except OSError:
            pass
        else:
            if stat.S_ISREG(st.st_mode) and not who.may(name, st, 4):
                raise _Denied(name, who.denied(st, "read"))
    return read(name)


def _cr_warning(report, name, entries, effect):
    """One warning for a list file whose entries end in CR (a CRLF file):
    qmail strips only spaces and tabs, so each such entry keeps its CR."""
    n = sum(1 for e in entries if e.endswith(b"\r"))
    if n:
        report.add("warning", "%d %s in CR (CRLF file?): qmail keeps the CR, so %s"
                   % (n, "entry ends" if n == 1 else "entries end", effect), name)


def _check_controls(report, who):
    """The startup control files (qmail-smtpd.md §2.2, §3 step 2), all of them
    even after an error, unlike a connection which stops at the first."""
    lines = []
    values = {}
    unreadable = set()
    for name in (b"control/me", b"control/smtpgreeting", b"control/localiphost"):
        try:
            values[name] = _as(who, control.read_line, name)
        except control.ControlError as e:
            values[name] = None
            unreadable.add(name)
            report.add("error", "%s (%s)" % (e, CONTROLS_421))
    greeting = values[b"control/smtpgreeting"]
    source = b"control/smtpgreeting"
    if greeting is None:
        greeting, source = values[b"control/me"], b"control/me"
    if greeting is None:
        # An unreadable one is already an error; "absent" would misstate it.
        if not unreadable & {b"control/me", b"control/smtpgreeting"}:
            report.add("error", "control/me and control/smtpgreeting are both absent (%s)"
                       % CONTROLS_421)
    else:
        lines.append("greeting: %s (%s)" % (_q(b"220 " + greeting + b" ESMTP"), _text(source)))
        if b"\r" in greeting:
            report.add("warning", "contains a CR (CRLF file?), which qmail keeps in the greeting",
                       source)
        if values[b"control/me"] is None and b"control/me" not in unreadable:
            # qmail-send, qmail-inject and friends refuse to run without it.
            report.add("warning", "absent: the rest of qmail (qmail-send, qmail-inject) needs it"
                       + ("" if values[b"control/localiphost"] is not None else
                          "; with no control/localiphost either, addresses at this host's"
                          " [IP] are not rewritten"), b"control/me")
    for name in (b"control/me", b"control/localiphost"):
        value = values[name]
        if name != source and value is not None and b"\r" in value:
            report.add("warning", "contains a CR (CRLF file?), which qmail keeps in the name", name)
    for name in (b"control/timeoutsmtpd", b"control/databytes"):
        try:
            _as(who, control.read_int, name)
        except control.ControlError as e:
            report.add("error", "%s (%s)" % (e, CONTROLS_421))
    try:
        hosts = _as(who, control.read_list, b"control/rcpthosts")
    except control.ControlError as e:
        report.add("error", "%s (%s)" % (e, CONTROLS_421))
        hosts = False
    more = os.path.lexists(b"control/morercpthosts.cdb")
    if hosts is False:
        pass
    elif hosts is None:
        report.add("warning", "absent: every recipient domain is accepted (open relay)",
                   b"control/rcpthosts")
        if more:
            report.add("warning", "ignored: qmail reads it only when control/rcpthosts exists",
                       b"control/morercpthosts.cdb")
    else:
        try:
            _as(who, os.stat, b"control/morercpthosts.cdb")
        except FileNotFoundError:
            pass
        except control.ControlError as e:
            report.add("error", "%s (%s)" % (e, CONTROLS_421))
        try:
            rh = control.Rcpthosts.load()
            try:
                # The cdb is read only at a lookup: connections meet a broken
                # one at the first recipient outside rcpthosts.
                rh.allows(b"postmaster@qspp-check.invalid")
            finally:
                rh.close()
        except control.ControlError as e:
            report.add("error", "%s (%s)" % (e, CONTROLS_421))
        if not hosts and not more:
            report.add("warning", "lists no domain: every recipient address with an @ is refused"
                       " (553) unless RELAYCLIENT is set", b"control/rcpthosts")
        _cr_warning(report, b"control/rcpthosts", hosts, "those domains are never accepted")
    try:
        bad = _as(who, control.read_list, b"control/badmailfrom")
    except control.ControlError as e:
        report.add("error", "%s (%s)" % (e, CONTROLS_421))
    else:
        _cr_warning(report, b"control/badmailfrom", bad or (), "those senders are never refused")
    return lines


# ---------------------------------------------------------------------------
# the queue program

def _first_line(data):
    for line in data.splitlines():
        line = line.strip()
        if line:
            return line[:200]
    return b""


def probe_queue(program, env, who):
    """Run the queue program once as every aborted message does: an empty
    message on fd 0, an envelope that ends at once on fd 1.  qmail-queue then
    exits 54 having queued nothing.  Any status but 0 or 54 is what every
    message would get too.  Returns (kind, text) findings."""
    switch = {}
    if not who.current and who.uid != os.geteuid() and os.geteuid() == 0:
        switch = {"user": who.uid, "group": who.gid, "extra_groups": sorted(who.gids)}
    what = "the queue program, run as for an aborted message"
    r, w = os.pipe()
    os.close(w)
    try:
        p = subprocess.Popen([program], stdin=subprocess.DEVNULL, stdout=r,
                             stderr=subprocess.PIPE, env=env, start_new_session=True, **switch)
    except OSError as e:
        return [("error", "%s: cannot execute: %s (messages get %s)"
                 % (_text(program), e.strerror, _q(reply_for_status(120 << 8, False, 0, 0))))]
    finally:
        os.close(r)
    try:
        _, said = p.communicate(timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.communicate()
        return [("error", "%s: %s, still runs after %d s (messages get 451 qq timeout"
                 " at best)" % (_text(program), what, PROBE_SECONDS))]
    rc = p.returncode
    if rc in (0, 54):
        return []
    if rc < 0:
        how, status = "killed by signal %d" % -rc, -rc
    else:
        how, status = "exit status %d, where qmail-queue exits 54" % rc, rc << 8
    said = _first_line(said)
    return [("error", "%s: %s: %s (messages get %s)%s" % (
        _text(program), what, how, _q(reply_for_status(status, False, 0, 0)),
        "; it said: " + _q(said) if said else ""))]


def _check_queue(report, env, who, probe):
    """The queue program (qmail-smtpd.md §2.6), relative to the home as a
    connection runs it; the listing line says which one."""
    program = queue_program(env)
    found = exec_problems(program, who)
    if probe and not any(kind == "error" for kind, _ in found):
        found += probe_queue(program, env, who)
    for kind, text in found:
        if "(messages get " not in text:
            text += " (the queue program: messages get 451 instead of being queued)"
        report.add(kind, text)
    return "queue: %s (%s)" % (_text(program),
                               "from QMAILQUEUE" if env.get(b"QMAILQUEUE") else "default")


# ---------------------------------------------------------------------------
# STARTTLS

_SSL_SOURCE = re.compile(r" \(_ssl\.c:\d+\)$")


def _ssl_reason(e):
    # The SSL library's text without the CPython source position, on one line.
    text = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else str(e.args[0])
    return _SSL_SOURCE.sub("", text).replace("\r", " ").replace("\n", " ")


def _pem(path):
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None


def _cert_hint(data):
    """What a PEM file lacks, in words: OpenSSL says only "PEM lib"."""
    if data is None:
        return ""
    if b"ENCRYPTED" in data:
        return ": the private key is encrypted, and nobody is there to type its passphrase"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return ": the file holds no certificate"
    if b"PRIVATE KEY-----" not in data:
        return ": the file holds no private key (it needs the key after the certificate chain)"
    return ""


def on(value):
    """A yes/no variable as FORCETLS reads it: set, non-empty and not `0`."""
    return value is not None and value not in (b"", b"0")


def _check_tls(report, env, who, rules):
    """STARTTLS as qmail-smtpd.md §8.7 decides it; returns the listing line."""
    try:
        st = os.stat(SERVERCERT)
    except FileNotFoundError:
        return "STARTTLS: not offered (no control/servercert.pem; STARTTLS gets 502)"
    except OSError as e:
        report.add("error", "%s (STARTTLS is not offered)" % e.strerror, SERVERCERT)
        return "STARTTLS: not offered (control/servercert.pem cannot be looked up)"
    if ssl is None:
        report.add("error", "this Python has no ssl module (STARTTLS gets 454)", SERVERCERT)
        return "STARTTLS: offered, but fails (no ssl module)"

    def context():
        return ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    state = "offered (control/servercert.pem loads)"
    data = _pem(SERVERCERT)
    reason = None
    if stat.S_ISREG(st.st_mode) and not who.may(SERVERCERT, st, 4):
        reason = who.denied(st, "read")
    else:
        try:
            # A callable password: an encrypted key fails instead of prompting on the tty.
            context().load_cert_chain(os.fsdecode(SERVERCERT), password=lambda: b"")
        except ssl.SSLError as e:
            reason = _ssl_reason(e) + _cert_hint(data)
        except OSError as e:
            reason = e.strerror or e.__class__.__name__
    if reason is not None:
        state = "offered, but fails (control/servercert.pem does not load)"
        report.add("error", "does not load: %s (STARTTLS gets 454 TLS missing certificate)"
                   % reason, SERVERCERT)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o004 and data and b"PRIVATE KEY-----" in data:
        report.add("warning", "others can read it (mode %04o), and it holds the private key:"
                   " chmod o-r, and give the session user read access by owner or group"
                   % (st.st_mode & 0o7777), SERVERCERT)
    if not on(env.get(b"FORCETLS")) and not (rules is not None and _rules_set(rules, b"FORCETLS")):
        report.add("note", "FORCETLS is not set: in AUTH mode, LOGIN and PLAIN are offered and"
                   " accepted before STARTTLS (FORCETLS=1, per client in the rules, requires TLS"
                   " for AUTH)")

    ciphers = env.get(b"TLSCIPHERS")
    place = None
    if ciphers is not None:
        source = "from TLSCIPHERS"
        what = "TLSCIPHERS=%s" % _q(ciphers)
    else:
        place = b"control/tlsserverciphers"
        try:
            names = _as(who, control.read_list, place)
        except control.ControlError as e:
            report.add("error", "%s (STARTTLS gets 421 unable to read controls (#4.3.0))" % e)
            return "STARTTLS: %s, ciphers unreadable" % state
        if names is None:
            ciphers, source, place = b"DEFAULT", "default", None
        else:
            _cr_warning(report, place, names, "OpenSSL does not know those names")
            ciphers, source = b":".join(names), "control/tlsserverciphers"
        what = "cipher list %s" % _q(ciphers)
    try:
        context().set_ciphers(ciphers.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as e:
        reason = (_ssl_reason(e) if isinstance(e, ssl.SSLError)
                  else "not ASCII")
        report.add("error", "%s rejected: %s (STARTTLS gets 454 TLS unable to initialize ctx)"
                   % (what, reason), place)
    return "STARTTLS: %s, ciphers %s (%s)" % (state, _q(ciphers), source)


# ---------------------------------------------------------------------------
# the rules file (tcpserver -x, qspp serve --rules)

_RULES_UNREADABLE = ("changes to the rules never take effect (qspp serve keeps the rules of"
                     " its start; tcpserver -x drops every connection)")


def _rules_set(path, name):
    """Does any rule in the cdb at path set name to a value that is on()?"""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    if len(data) < HEADER_SIZE:
        return False
    # records run from the header to the first hash table
    end = min(int.from_bytes(data[8 * i:8 * i + 4], "little") for i in range(256))
    pos = HEADER_SIZE
    while pos + 8 <= min(end, len(data)):
        klen = int.from_bytes(data[pos:pos + 4], "little")
        dlen = int.from_bytes(data[pos + 4:pos + 8], "little")
        start = pos + 8 + klen
        for n, value in parse_rule(data[start:start + dlen])[1]:
            if n == name and on(value):
                return True
        pos = start + dlen
    return False


def _check_rules(report, path, who):
    try:
        st = os.stat(path)
    except OSError as e:
        report.add("error", "cannot be used: %s (qspp serve does not start with it)"
                   % e.strerror, path)
        return "rules: %s (cannot be used)" % _text(path)
    if stat.S_ISREG(st.st_mode) and not who.may(path, st, 4):
        report.add("warning", "%s: %s" % (who.denied(st, "read"), _RULES_UNREADABLE), path)
        return "rules: %s" % _text(path)
    try:
        Rules.load(path).close()
    except RulesError as e:
        report.add("error", "cannot be used: %s (qspp serve does not start with it)"
                   % _text(str(e)), path)
        return "rules: %s (cannot be used)" % _text(path)
    return "rules: %s" % _text(path)


# ---------------------------------------------------------------------------
# all of it

def home_checks(report, home, env, who, rules=None, probe=True):
    """Check the home as the session user meets it; leaves the cwd at home
    (when it can be entered) and returns (listing lines, entered?).  rules: the rules
    file's path (absolute, or relative to the cwd on entry), or None."""
    _check_root(report, who)
    if rules is not None:
        rules = os.path.abspath(rules)
    try:
        os.chdir(home)
    except OSError as e:
        report.add("error", "cannot chdir to %s: %s (%s)" % (_text(home), e.strerror, CONTROLS_421))
        return [who.listing()], False
    if not who.current:
        st = os.stat(b".")
        if not who.may(b".", st, 1):
            report.add("error", "cannot chdir to %s: %s (%s)" % (
                _text(home), who.denied(st, "enter"), CONTROLS_421))
            return [who.listing()], False
    lines = _check_controls(report, who)
    lines.append(_check_queue(report, env, who, probe))
    lines.append(_check_tls(report, env, who, rules))
    if rules is not None:
        lines.append(_check_rules(report, rules, who))
    return lines + [who.listing()], True


def startup_lines(home, env, rules=None, switched=False):
    """The errors and warnings `qspp serve` logs at its start, as this
    process (after its user switch) meets the home; the cwd is kept."""
    report = Report()
    who = Who.this_process(switched)
    # O_PATH: the session user may be unable to read the directory it started in
    cwd = os.open(".", getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        home_checks(report, home, env, who, rules)
    finally:
        try:
            os.fchdir(cwd)
        except OSError as e:
            # the user switch took the right to enter it: a relative --rules
            # path now means another file
            report.add("warning", "cannot return to the directory serve started in: %s"
                       % e.strerror)
        os.close(cwd)
    return report.lines(("error", "warning"))


def log_startup(home, env, rules=None, switched=False):
    """One log line per problem; serve starts anyway, as qmail-smtpd would."""
    for line in startup_lines(home, env, rules, switched):
        log("serve: " + line)


__all__ = ["Report", "Who", "check_user", "exec_problems", "home_checks", "startup_lines",
           "log_startup", "probe_queue", "UserError", "CONTROLS_421"]
