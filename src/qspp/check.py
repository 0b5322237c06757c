"""`qspp check`: the home as a connection meets it, and the plugin config.

    qspp check [--qmailhome DIR] [-x RULES.cdb] [--user NAME | -u UID [-g GID]]
               [--] [SMTPD-ARGS ...]

The home is found as `qspp serve` finds it (home.py), and everything about it
comes from diagnose.py, which also gives serve its start-up lines: the two
agree by construction.  Then the plugin config is read as a connection reads
it, each section's entries listed with their argv, and problems reported.
SMTPD-ARGS are the arguments qspp.smtpd gets (they decide AUTH mode).

Output is plain ASCII (show.py).  Exit status 1 when there is an error.
"""

import os

from . import diagnose, home as homes, sppconfig
from .show import argv as _argv, out as _out, q as _q, text as _text, timeout_line as _timeout_line

EXIT_OK = 0
EXIT_FAIL = 1

_CONTROLS_421 = diagnose.CONTROLS_421

_HOW = {
    homes.OPTION: "from --qmailhome",
    homes.ENVIRONMENT: "from QMAILHOME",
    homes.INSTALLED: "qmail's: /var/qmail/control/me exists",
    homes.EMBEDDED: "embedded, qspp serve's own: no --qmailhome, no QMAILHOME,"
                    " no /var/qmail/control/me",
}


def read_smtpd_args(args):
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


def cmd_check(args, environ, qmailhome=None, rules=None, who=None):
    """who: a diagnose.Who, default diagnose.check_user()."""
    if who is None:
        who = diagnose.check_user()
    report = diagnose.Report()
    # serve's embedded home moves to /var/lib/qspp when root switches users
    home, how = homes.find(qmailhome, environ,
                           system=os.geteuid() == 0 and who.switched and not who.current)
    _out("home: %s (%s)" % (_text(home), _HOW[how]))
    env = dict(environ)
    # what serve gives its sessions
    env[b"QMAILHOME"] = home
    if how == homes.EMBEDDED:
        if not os.path.isdir(home):
            report.add("note", "the embedded home does not exist yet: qspp serve creates it"
                       " at its first start")
            return _finish(report)
        if not env.get(b"QMAILQUEUE"):
            env[b"QMAILQUEUE"] = os.path.join(home, b"bin", b"qmail-queue")
    lines, entered = diagnose.home_checks(report, home, env, who, rules)
    for line in lines:
        _out(line)
    if not entered:
        return _finish(report)
    timeout, warning = sppconfig.spptimeout(env)
    _out(_timeout_line(env, timeout))
    if warning:
        report.add("warning", _text(warning))
    auth, how, warning = read_smtpd_args(args)
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
            pe = sppconfig.policy_entry(entry)
            if pe is not None:
                _out("  %s%s -> policy server %s" % (where, _text(entry), _text(pe.server)))
                # an unusable entry is already one of cfg.notes
                if pe.error is None:
                    found += [(lineno or 0, kind, text)
                              for kind, text in _policy_problems(pe, entry, timeout)]
                continue
            _out("  %s%s -> %s" % (where, _text(entry), _argv(sppconfig.entry_argv(entry))))
            if entry[:1] == b":":
                shell_entries = True
            else:
                for kind, text in diagnose.exec_problems(entry, who):
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


# A policy server that lets check wait longer is as good as down.
POLICY_PROBE_SECONDS = 5


def _policy_problems(pe, entry, timeout):
    """Connect to a `policy:` entry's server once, as a session's first run does."""
    from . import policy
    failed = policy.probe(pe, min(timeout or POLICY_PROBE_SECONDS, POLICY_PROBE_SECONDS))
    if failed is None:
        return []
    what, detail = failed
    said = "%s: %s%s" % (_text(entry), _text(what), " (%s)" % _text(detail) if detail else "")
    if pe.default is not None:
        return [("warning", said + " (every run takes default=%s)" % _text(pe.default))]
    from .replies import spp_failure
    return [("error", said + " (every run fails: %s)" % _q(spp_failure(entry, what)))]


def _finish(report):
    for item in report.lines():
        _out(item)
    c = report.count

    def n(k):
        return "%d %s%s" % (c[k], k, "" if c[k] == 1 else "s")
    _out("check: %s, %s, %s" % (n("error"), n("warning"), n("note")))
    return EXIT_FAIL if c["error"] else EXIT_OK
