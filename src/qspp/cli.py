"""`qspp`: the administrator's command (spp.md §6.3, §6.4).

    qspp check [ARGS...]                  config and control-file sanity
    qspp plugin-test [--message FILE] PHASE ENTRY [NAME=value ...]
    qspp serve [--port N] [--rules FILE.cdb] ...  the built-in listener (serve.py)
    qspp version | qspp --version

Never on the per-connection path, so argparse and friends are fine here.
Output is plain ASCII (bytes outside it are shown as \\xHH) so that it reads
the same under every locale and tests can assert it line by line.
"""

import argparse
import os
import re
import stat
import sys

from . import control, sppconfig

PROG = "qspp"

# Exit statuses: 2 is argparse's own for usage errors, kept for ours.
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

_CONTROLS_421 = "connections get 421 unable to read controls (#4.3.0)"


# ---------------------------------------------------------------------------
# showing bytes

_ESCAPES = {0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t"}


def _escape(b, quoted):
    out = ['"'] if quoted else []
    for c in b:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < 0x20 or c >= 0x7F:
            out.append("\\x%02x" % c)
        elif quoted and c in (0x5C, 0x22):
            out.append("\\" + chr(c))
        else:
            out.append(chr(c))
    if quoted:
        out.append('"')
    return "".join(out)


def _text(b):
    """Bytes as one line of ASCII for prose (entries, file names): control
    and non-ASCII bytes escaped, backslashes left alone so shell commands
    read as written."""
    return _escape(b, False)


def _q(b):
    """Bytes as a double-quoted C-style string: exact, so CR LF, spaces at
    the ends and backslashes are all visible (argv, bytes sent to clients)."""
    return _escape(b, True)


def _argv(argv):
    return "[" + ", ".join(_q(a) for a in argv) + "]"


def _out(line=""):
    sys.stdout.write(line + "\n")


def _err(line):
    sys.stderr.write("%s: %s\n" % (PROG, line))


def _home(environ):
    # qmail-smtpd.md §2.1: unset and empty both mean the default.
    return environ.get(b"QMAILHOME") or b"/var/qmail"


def _timeout_line(env, timeout):
    v = env.get(b"SPPTIMEOUT")
    if not v:
        return "SPPTIMEOUT: %d s (default)" % timeout
    if timeout == 0:
        return "SPPTIMEOUT: no limit (0)"
    return "SPPTIMEOUT: %d s" % timeout


# ---------------------------------------------------------------------------
# qspp check

class _Report:
    """Findings of `qspp check`, printed after the listing."""

    def __init__(self):
        self.items = []     # finished lines, in the order found
        self.count = {"error": 0, "warning": 0, "note": 0}

    def add(self, kind, text, place=None, lineno=None):
        self.count[kind] += 1
        where = ""
        if place is not None:
            where = _text(place) + (":%d" % lineno if lineno else "") + ": "
        self.items.append(where + kind + ": " + text)


def _read_smtpd_args(args):
    """How qspp.smtpd reads its arguments (qmail-smtpd.md §2.1).

    The decision is authmode.read_args's, the one a connection makes.
    Returns (auth_mode, description, warning or None).
    """
    from .authmode import on_path, read_args
    if not args:
        return False, "off (no arguments)", None
    argv = [os.fsencode(a) for a in args]
    host, checkargv, _ = read_args(argv, os.environb)
    if checkargv is None:
        return (False, "off: HOST %s without a checkprogram" % _q(argv[0]),
                "HOST without a checkprogram: AUTH is off (connections log one stderr line)")
    if host is not None:
        return True, "on: HOST %s, checkprogram %s" % (_q(host), _argv(checkargv)), None
    if b"/" in argv[0]:
        return (True, "on: no HOST (the first argument contains \"/\"), checkprogram "
                + _argv(checkargv), None)
    found = on_path(argv[0], os.environb.get(b"PATH"))
    return (True, "on: no HOST (the first argument has no \".\" and is an executable"
            " on PATH: %s), checkprogram %s" % (_text(found), _argv(checkargv)), None)


def _entry_lines(data):
    """(phase, entry, lineno) for each entry that runs, in file order.

    sppconfig.parse keeps no line numbers; this re-walks the lines with the
    same trimming and asks parse itself which section a header selects, so the
    second-byte rule lives in one place.
    """
    out = []
    current = None
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        nul = raw.find(b"\0")
        if nul >= 0:
            raw = raw[:nul]
        text = raw.strip(b" \t\r")
        if not text or text[:1] == b"#":
            continue
        if text[:1] == b"[":
            current = next(iter(sppconfig.parse(text + b"\n:x").sections), None)
            continue
        if current is not None:
            out.append((current, text, lineno))
    return out


# The user connections run as: tcpserver -u in every qmail guide.
SESSION_USER = "qmaild"


def _session_user():
    """(name, uid, gids) of SESSION_USER when check runs as root and the user
    exists, else None. Root may read and run nearly anything, so only then do
    the permission checks need to ask what qmaild may do."""
    if os.geteuid() != 0:
        return None
    try:
        import grp
        import pwd
        pw = pwd.getpwnam(SESSION_USER)
    except (ImportError, KeyError):
        return None
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if SESSION_USER in g.gr_mem}
    return SESSION_USER, pw.pw_uid, gids


def _user_may(st, user, bits):
    """Do the mode bits give `user` all of `bits` (4 read, 1 execute)?"""
    _, uid, gids = user
    if uid == 0:
        return True
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
    return (st.st_mode >> shift) & bits == bits


def _denied(st, user, what):
    return "%s cannot %s it (mode %04o, owner %d:%d)" % (
        user[0], what, st.st_mode & 0o7777, st.st_uid, st.st_gid)


def _exec_problems(entry):
    """(kind, text) findings for a non-`:` entry, relative to the cwd."""
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
    user = _session_user()
    if user is not None:
        # an interpreter must also read the script
        script = head[:2] == b"#!"
        if not _user_may(st, user, 5 if script else 1):
            return [("error", "%s: %s" % (_text(entry), _denied(
                st, user, "read and execute" if script else "execute")))]
    if head[:2] == b"#!":
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


def _cr_warning(report, name, entries, effect):
    """One warning for a list file whose entries end in CR (a CRLF file):
    qmail strips only spaces and tabs, so each such entry keeps its CR."""
    n = sum(1 for e in entries if e.endswith(b"\r"))
    if n:
        report.add("warning", "%d %s in CR (CRLF file?): qmail keeps the CR, so %s"
                   % (n, "entry ends" if n == 1 else "entries end", effect), name)


def _check_controls(report):
    """The startup control files (qmail-smtpd.md §2.2, §3 step 2), all of them
    even after an error, unlike a connection which stops at the first."""
    lines = []
    values = {}
    unreadable = set()
    for name in (b"control/me", b"control/smtpgreeting", b"control/localiphost"):
        try:
            values[name] = control.read_line(name)
        except control.ControlError as e:
            values[name] = None
            unreadable.add(name)
            report.add("error", "%s (%s)" % (e, _CONTROLS_421))
    greeting = values[b"control/smtpgreeting"]
    source = b"control/smtpgreeting"
    if greeting is None:
        greeting, source = values[b"control/me"], b"control/me"
    if greeting is None:
        # An unreadable one is already an error; "absent" would misstate it.
        if not unreadable & {b"control/me", b"control/smtpgreeting"}:
            report.add("error", "control/me and control/smtpgreeting are both absent (%s)"
                       % _CONTROLS_421)
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
            control.read_int(name)
        except control.ControlError as e:
            report.add("error", "%s (%s)" % (e, _CONTROLS_421))
    try:
        hosts = control.read_list(b"control/rcpthosts")
    except control.ControlError as e:
        report.add("error", "%s (%s)" % (e, _CONTROLS_421))
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
            rh = control.Rcpthosts.load()
            try:
                # The cdb is read only at a lookup: connections meet a broken
                # one at the first recipient outside rcpthosts.
                rh.allows(b"postmaster@qspp-check.invalid")
            finally:
                rh.close()
        except control.ControlError as e:
            report.add("error", "%s (%s)" % (e, _CONTROLS_421))
        if not hosts and not more:
            report.add("warning", "lists no domain: every recipient address with an @ is refused"
                       " (553) unless RELAYCLIENT is set", b"control/rcpthosts")
        _cr_warning(report, b"control/rcpthosts", hosts, "those domains are never accepted")
    try:
        bad = control.read_list(b"control/badmailfrom")
    except control.ControlError as e:
        report.add("error", "%s (%s)" % (e, _CONTROLS_421))
    else:
        _cr_warning(report, b"control/badmailfrom", bad or (), "those senders are never refused")
    return lines


def _check_queue(report, env):
    """The queue program (qmail-smtpd.md §2.6), relative to the home as a
    connection runs it; the listing line says which one."""
    from .queue import queue_program
    program = queue_program(env)
    for kind, text in _exec_problems(program):
        report.add(kind, text + " (the queue program: messages get 451 instead of being queued)")
    return "queue: %s (%s)" % (_text(program),
                               "from QMAILQUEUE" if env.get(b"QMAILQUEUE") else "default")


_SERVERCERT = b"control/servercert.pem"
_SSL_SOURCE = re.compile(r" \(_ssl\.c:\d+\)$")


def _ssl_reason(e):
    # The SSL library's text without the CPython source position, on one line.
    text = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else str(e.args[0])
    return _SSL_SOURCE.sub("", text).replace("\r", " ").replace("\n", " ")


def _cert_hint(path):
    """What a PEM file lacks, in words: OpenSSL says only "PEM lib"."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return ""
    if b"ENCRYPTED" in data:
        return ": the private key is encrypted, and nobody is there to type its passphrase"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return ": the file holds no certificate"
    if b"PRIVATE KEY-----" not in data:
        return ": the file holds no private key (it needs the key after the certificate chain)"
    return ""


def _check_tls(report, env):
    """STARTTLS as qmail-smtpd.md §8.7 decides it; returns the listing line."""
    try:
        os.stat(_SERVERCERT)
    except FileNotFoundError:
        return "STARTTLS: not offered (no control/servercert.pem; STARTTLS gets 502)"
    except OSError as e:
        report.add("error", "%s (STARTTLS is not offered)" % e.strerror, _SERVERCERT)
        return "STARTTLS: not offered (control/servercert.pem cannot be looked up)"
    # Only here: ssl is slow to import and the rest of check has no use for it.
    import ssl

    def context():
        return ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    state = "offered (control/servercert.pem loads)"
    try:
        # A callable password: an encrypted key fails instead of prompting on the tty.
        context().load_cert_chain(os.fsdecode(_SERVERCERT), password=lambda: b"")
    except ssl.SSLError as e:
        reason = _ssl_reason(e) + _cert_hint(_SERVERCERT)
    except OSError as e:
        reason = e.strerror or str(e)
    else:
        reason = None
    if reason is None:
        user = _session_user()
        st = os.stat(_SERVERCERT)
        if user is not None and not _user_may(st, user, 4):
            reason = _denied(st, user, "read")
    if reason is not None:
        state = "offered, but fails (control/servercert.pem does not load)"
        report.add("error", "does not load: %s (STARTTLS gets 454 TLS missing certificate)"
                   % reason, _SERVERCERT)

    ciphers = env.get(b"TLSCIPHERS")
    place = None
    if ciphers is not None:
        source = "from TLSCIPHERS"
        what = "TLSCIPHERS=%s" % _q(ciphers)
    else:
        place = b"control/tlsserverciphers"
        try:
            names = control.read_list(place)
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


def cmd_check(args, environ):
    report = _Report()
    home = _home(environ)
    _out("home: %s" % _text(home))
    try:
        os.chdir(home)
    except OSError as e:
        report.add("error", "cannot chdir to %s: %s (%s)" % (_text(home), e.strerror, _CONTROLS_421))
        return _finish(report)
    env = dict(environ)

    for line in _check_controls(report):
        _out(line)
    _out(_check_queue(report, env))
    _out(_check_tls(report, env))
    timeout, warning = sppconfig.spptimeout(env)
    _out(_timeout_line(env, timeout))
    if warning:
        report.add("warning", _text(warning))
    auth, how, warning = _read_smtpd_args(args)
    _out("AUTH mode: " + how)
    if warning:
        report.add("warning", warning)

    try:
        cfg = sppconfig.load_config(env)
    except sppconfig.SppConfigError as e:
        _out("config: %s (unreadable)" % _text(e.path))
        report.add("error", "%s (%s)" % (_text(e.text), _CONTROLS_421))
        return _finish(report)
    if cfg is None:
        _out("config: none: NOSPP is set, plugins are off and no file is read")
        return _finish(report)
    path = cfg.path
    explicit = bool(env.get(b"SPPCONFFILE"))
    _out("config: %s%s" % (_text(path), " (from SPPCONFFILE)" if explicit else
                           " (missing)" if cfg.missing else ""))

    located = None
    if not cfg.missing:
        try:
            with open(path, "rb") as f:
                located = _entry_lines(f.read())
        except OSError:
            located = None
        # The file may have changed since load_config read it; line numbers
        # are then dropped rather than pinned to the wrong lines.
        if located is not None:
            regrouped = {}
            for phase, entry, _ in located:
                regrouped.setdefault(phase, []).append(entry)
            if regrouped != cfg.sections:
                located = None
    if located is None:
        located = [(phase, entry, None) for phase in sppconfig.PHASES
                   for entry in cfg.entries(phase)]

    found = []      # (lineno, kind, text) from the file, sorted below
    for lineno, kind, text in cfg.notes:
        found.append((lineno, kind, _text(text)))
    if not located and not cfg.missing:
        _out("no plugin entries")
    shell_entries = False
    for phase in sppconfig.PHASES:
        mine = [(e, n) for p, e, n in located if p == phase]
        if not mine:
            continue
        _out("[%s]" % phase)
        for entry, lineno in mine:
            where = ("line %d: " % lineno) if lineno else ""
            _out("  %s%s -> %s" % (where, _text(entry), _argv(sppconfig.entry_argv(entry))))
            if entry[:1] == b":":
                shell_entries = True
            else:
                for kind, text in _exec_problems(entry):
                    found.append((lineno or 0, kind, text))
    if shell_entries and not os.access("/bin/sh", os.X_OK):
        found.append((0, "error", "/bin/sh is missing or not executable, and ':' entries need it"))
    if "auth" in cfg.sections and not auth:
        first = min((n or 0 for p, e, n in located if p == "auth"))
        found.append((first, "note", "[auth] entries run only in AUTH mode, which these arguments"
                      " leave off"))
    found.sort(key=lambda f: f[0])
    for lineno, kind, text in found:
        # Line 0 is about the file as a whole; its name is in the text or
        # in the `config:` line already.
        report.add(kind, text, path if lineno else None, lineno)
    return _finish(report)


def _finish(report):
    for item in report.items:
        _out(item)
    c = report.count

    def n(k):
        return "%d %s%s" % (c[k], k, "" if c[k] == 1 else "s")
    _out("check: %s, %s, %s" % (n("error"), n("warning"), n("note")))
    return EXIT_FAIL if c["error"] else EXIT_OK


# ---------------------------------------------------------------------------
# qspp plugin-test

# What each verdict means in each phase (spp.md §3.1), for the summary line.
_CONTINUE = {
    "connection": "greeting",
    "helo": "qmail's normal reply, HELO name stored",
    "mail": "badmailfrom check, then 250 ok",
    "rcpt": "rcpthosts check, then 250 ok",
    "data": "354 go ahead, then the message",
    "body": "message queued",
    "auth": "235, authenticated with the relay right",
}
_OVERRIDE = {
    "mail": "accept: badmailfrom check skipped",
    "rcpt": "accept: rcpthosts check skipped",
}
_REFUSED = {
    "connection": "no greeting",
    "helo": "HELO name and transaction unchanged",
    "mail": "sender not accepted, previous transaction untouched",
    "rcpt": "recipient not added",
    "data": "no 354, DATA may be retried",
    "body": "message discarded",
    "auth": "not authenticated",
}
_QUEUE_NAMES = {b"M": "MAILs", b"R": "RCPTs", b"D": "DATAs"}
# Settings qspp reads once at connection start (spp.md §3.2): S/U on them
# reach children only, which surprises plugin authors (SRELAYCLIENT=).
_START_SETTINGS = (b"NOSPP", b"SPPCONFFILE", b"SPPTIMEOUT", b"SPPLOG", b"SMTPAUTH",
                   b"RELAYCLIENT", b"DATABYTES")


def _shown(cmd, text):
    return _text(cmd) + (" " + _text(text) if text else "")


def _setting_note(name):
    if name in _START_SETTINGS or name.startswith(b"TCP"):
        return " (qspp keeps the value it read at connection start)"
    if name == b"QMAILQUEUE":
        return " (the queue program for later messages)"
    return ""


def _explain(line, phase):
    """One non-terminator output line and what the engine does with it."""
    cmd, text = line[:1], line[1:]
    if cmd == b"S":
        eq = text.find(b"=")
        if eq <= 0:
            return _shown(cmd, text) + ": ignored (S needs NAME=value), logged"
        name = text[:eq]
        return (_shown(cmd, text) + ": set %s for later plugins and qmail-queue" % _text(name)
                + _setting_note(name))
    if cmd == b"U":
        if not text:
            return "U: no-op (no variable name)"
        return (_shown(cmd, text) + ": remove %s for later plugins and qmail-queue" % _text(text)
                + _setting_note(text))
    if cmd == b"H":
        where = " (after the 354-time headers)" if phase == "body" else ""
        if not text:
            return "H: add an empty header line (ends the header block)" + where
        return _shown(cmd, text) + ": add header line" + where
    if cmd == b"C":
        if phase == "mail":
            return _shown(cmd, text) + ": rewrite the sender"
        if phase == "rcpt":
            return _shown(cmd, text) + ": rewrite the recipient"
        return _shown(cmd, text) + ": ignored in %s" % phase
    if cmd == b"P":
        return _shown(cmd, text) + ": send this line to the client now"
    if cmd == b"L":
        which = text[:1]
        name = _QUEUE_NAMES.get(which)
        if name is None:
            return _text(line) + ": ignored (L needs M, R or D)"
        return _shown(line[:2], text[1:]) + ": deferred error for later " + name
    if cmd == b" ":
        return '"%s": ignored (starts with a space)' % _text(line)
    return _text(line) + ": ignored (unknown command letter)"


# A runaway plugin may print a megabyte of lines; the listing stays readable.
_MAX_SHOWN = 1000


def _explain_all(lines, phase):
    shown = 0
    i = 0
    while i < len(lines):
        j = i + 1
        while j < len(lines) and lines[j] == lines[i]:
            j += 1
        if shown == _MAX_SHOWN:
            _out("  ... %d more lines not shown" % (len(lines) - i))
            return
        times = " (%d times)" % (j - i) if j - i > 1 else ""
        _out("  " + _explain(lines[i], phase) + times)
        shown += 1
        i = j


def _explain_terminator(term):
    cmd, text = term[:1], term[1:]
    ignored = " (the text after the letter is ignored)" if text else ""
    if cmd == b"A":
        return _shown(cmd, text) + ": accept, and plugins off for the rest of the connection" + ignored
    if cmd == b"N":
        return _shown(cmd, text) + ": stop the section, continue" + ignored
    if cmd == b"O":
        return _shown(cmd, text) + ": override" + ignored
    if cmd == b"E":
        return _shown(cmd, text) + ": refuse the command with this text"
    if cmd == b"R":
        return _shown(cmd, text) + ": send this text and close the connection"
    return _shown(cmd, text) + ": close the connection" + ignored


def _verdict_line(verdict, phase, term):
    from .session import CONTINUE, OVERRIDE, REFUSED
    if verdict == CONTINUE:
        line = "continue (%s)" % _CONTINUE[phase]
        if term is None:
            line += "; the next entry of the section would run first"
        elif term[:1] == b"A":
            line += "; plugins off for the rest of the connection"
        return line
    if verdict == OVERRIDE:
        return "override (%s)" % _OVERRIDE.get(phase, "as continue: " + _CONTINUE[phase])
    if verdict == REFUSED:
        return "refused (%s)" % _REFUSED[phase]
    return "close (the connection ends, nothing is queued)"


def _end_line(res):
    import signal as _signal
    if res.exit_status is not None:
        return "exit status: %d" % res.exit_status
    if res.signal is not None:
        try:
            name = _signal.Signals(res.signal).name
        except ValueError:
            name = "?"
        by = ", sent by qspp" if res.killed else ""
        return "exit status: none, signal %d (%s%s)" % (res.signal, name, by)
    if res.pid is None:
        return "exit status: none, not started"
    return "exit status: unknown"


def _failure_line(res, timeout):
    from .spprun import LINE_CAP, RUN_CAP
    what = res.failure.decode("ascii")
    if res.failure == b"timeout":
        detail = "the process group was killed after %d s" % timeout
    elif res.failure == b"can't execute" and res.exit_status == 120:
        detail = "exit status 120"
    elif res.failure == b"output too long":
        if res.bytes_read > RUN_CAP:
            detail = "over %d bytes in one run; the process group was killed" % RUN_CAP
        else:
            detail = "a line over %d bytes; the process group was killed" % LINE_CAP
    elif res.errno is not None:
        detail = os.strerror(res.errno)
    elif res.signal is not None:
        detail = "signal %d" % res.signal
    else:
        detail = ""
    return "failure: " + what + (" (%s)" % detail if detail else "")


def _client_line(verdict, text):
    from .session import CONTINUE, OVERRIDE, CLOSE
    if verdict in (CONTINUE, OVERRIDE):
        if text:
            return "client gets: %s, then qmail's normal reply" % _q(text)
        return "client gets: (qmail's normal reply)"
    if verdict == CLOSE:
        if text:
            return "client gets: %s, then the connection closes" % _q(text)
        return "client gets: nothing; the connection closes"
    return "client gets: %s" % _q(text)


def cmd_plugin_test(phase, entry, assignments, message, environ):
    from . import spp
    from .spprun import cloexec_inherited_fds, run_entry

    env = dict(environ)
    env.update(assignments)
    home = _home(environ)
    try:
        os.chdir(home)
    except OSError as e:
        _err("cannot chdir to %s: %s" % (_text(home), e.strerror))
        return EXIT_FAIL
    stdin_fd = None
    if message is not None:
        try:
            stdin_fd = os.open(message, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            _err("cannot open message %s: %s" % (_text(os.fsencode(message)), e.strerror))
            return EXIT_USAGE
    timeout, warning = sppconfig.spptimeout(env)
    # As the connection does: nothing inherited by accident reaches the plugin.
    cloexec_inherited_fds()

    lines = []
    results = []

    def runner(entry, env, timeout, stdin_fd, apply):
        def on_line(line):
            lines.append(line)
            apply(line)
        res = run_entry(entry, env, timeout, stdin_fd, on_line)
        results.append(res)
        return res

    cfg = sppconfig.Config(b"(plugin-test)", {phase: [entry]}, [])
    engine = spp.SppEngine(cfg, env, timeout, runner)
    try:
        # _run, not the public hooks: those set SMTPHELOHOST, SMTPMAILFROM,
        # the counters... from SMTP state this command does not have; here the
        # caller supplies them as NAME=value and they must reach the plugin.
        verdict, text = engine.run_section(phase, stdin_fd)
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)
    res = results[0]

    _out("phase: %s" % phase)
    _out("entry: %s" % _text(entry))
    _out("argv: %s" % _argv(sppconfig.entry_argv(entry)))
    _out("cwd: %s" % _text(home))
    if message is not None:
        _out("stdin: %s" % _text(os.fsencode(message)))
    _out(_timeout_line(env, timeout))
    if warning:
        _out("warning: " + _text(warning))
    if lines or res.terminator is not None:
        _out("output:")
        _explain_all(lines, phase)
        if res.terminator is not None:
            _out("  " + _explain_terminator(res.terminator))
    else:
        _out("output: none")
    if res.terminator is not None:
        _out("terminator: %s" % _text(res.terminator[:1]))
    else:
        _out("terminator: none")
    if res.failure is not None:
        _out(_failure_line(res, timeout))
        if res.terminator is not None:
            _out("failure after the terminator: only logged, the verdict stands")
    _out("verdict: " + _verdict_line(verdict, phase, res.terminator))
    _out(_end_line(res))
    _out("time: %d ms" % res.elapsed_ms)
    _out(_client_line(verdict, text))
    return EXIT_FAIL if res.failure is not None else EXIT_OK


# ---------------------------------------------------------------------------
# qspp version

def version():
    try:
        from importlib.metadata import PackageNotFoundError, version as _version
    except ImportError:  # pragma: no cover - Python < 3.8
        return "unknown"
    try:
        return _version("qspp")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------
# argument handling

class _Parser(argparse.ArgumentParser):
    """Usage errors go to stderr with status 2 as argparse does, but raise
    instead of exiting so main() can return the status to in-process callers."""

    def exit(self, status=0, message=None):
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


class _Exit(Exception):
    def __init__(self, status):
        Exception.__init__(self, status)
        self.status = status


def _parser():
    p = _Parser(prog=PROG, description="qspp administration: check the plugin config,"
                " test a plugin.")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, version()))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    c = sub.add_parser("check", help="check control/smtpplugins and the control files",
                       description="Read the plugin config as a connection would, list each"
                       " section's entries with their argv, and report problems. ARGS are the"
                       " arguments qspp.smtpd gets (they decide AUTH mode).")
    c.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="qspp.smtpd's arguments: [HOST] CHECKPROGRAM [SUBPROGRAM ...]")
    t = sub.add_parser("plugin-test", help="run one plugin entry once and explain its output",
                       description="Run ENTRY once as the engine would in PHASE, with the"
                       " current environment plus NAME=value, cwd QMAILHOME.")
    t.add_argument("--message", metavar="FILE",
                   help="the message file given to the plugin as stdin (body phase only)")
    t.add_argument("phase", metavar="PHASE", choices=sppconfig.PHASES,
                   help="one of: " + ", ".join(sppconfig.PHASES))
    t.add_argument("entry", metavar="ENTRY", help="a config entry: ':CMD' or a path")
    t.add_argument("assignments", nargs="*", metavar="NAME=value",
                   help="environment variables to add for the run")
    sub.add_parser("version", help="print the version", description="Print the version.")
    return p, t


def main(argv=None):
    """Run the `qspp` command; returns the exit status (argv: sys.argv[1:])."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        return _main(argv)
    except BrokenPipeError:
        # `qspp check | head`: stop quietly, and keep the interpreter's final
        # flush from raising the same error again at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAIL


def _main(argv):
    if argv[:1] == ["serve"]:
        # its own parser and no import of the rest here: see serve.py
        from . import serve
        return serve.main(argv[1:])
    parser, test_parser = _parser()
    try:
        if argv[:1] == ["plugin-test"]:
            # Intermixed, so --message may also follow ENTRY or NAME=value;
            # the top-level parser cannot intermix through a subcommand.
            ns = test_parser.parse_intermixed_args(argv[1:])
            ns.command = "plugin-test"
        else:
            ns = parser.parse_args(argv)
        if ns.command is None:
            parser.error("a command is required: check, plugin-test or version")
        environ = os.environb
        if ns.command == "version":
            _out("%s %s" % (PROG, version()))
            return EXIT_OK
        if ns.command == "check":
            args = ns.args
            # REMAINDER keeps the "--" that lets ARGS start with "-".
            if args[:1] == ["--"]:
                args = args[1:]
            return cmd_check(args, environ)
        return _plugin_test(test_parser, ns, environ)
    except _Exit as e:
        return e.status


def _plugin_test(parser, ns, environ):
    entry = os.fsencode(ns.entry).strip(b" \t\r")
    if not entry:
        parser.error("ENTRY is empty")
    if ns.phase == "body" and ns.message is None:
        parser.error("the body phase needs --message FILE")
    if ns.phase != "body" and ns.message is not None:
        parser.error("--message is for the body phase only")
    assignments = {}
    for a in ns.assignments:
        b = os.fsencode(a)
        eq = b.find(b"=")
        if eq <= 0:
            parser.error("%s is not NAME=value" % a)
        assignments[b[:eq]] = b[eq + 1:]
    return cmd_plugin_test(ns.phase, entry, assignments, ns.message, environ)


if __name__ == "__main__":
    sys.exit(main())
