"""`qspp plugin-test`: run one plugin entry once and explain what it said.

    qspp plugin-test [--qmailhome DIR] [--message FILE] PHASE ENTRY [NAME=value ...]

The entry runs as the engine would run it in PHASE (spp.md §3), in the home
`qspp serve` and `qspp check` use (home.py), with the current environment
plus the NAME=value assignments.  Each line it printed is explained, then the
verdict and the exact bytes the client would get.  Exit status 1 when the
run failed (spp.md's "qmail-spp failure").
"""

import os

from . import home as homes, sppconfig
from .show import (argv as _argv, err as _err, out as _out, q as _q, text as _text,
                   timeout_line as _timeout_line)

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


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


def cmd_plugin_test(phase, entry, assignments, message, environ, qmailhome=None):
    from . import spp
    from .spprun import cloexec_inherited_fds, run_entry

    home, how = homes.find(qmailhome, environ)
    env = dict(environ)
    if how in (homes.OPTION, homes.EMBEDDED):
        env[b"QMAILHOME"] = home  # as serve's sessions have it
    env.update(assignments)
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
    pe = sppconfig.policy_entry(entry)
    asked = []
    if pe is not None:
        # the engine asks the server itself: keep its Result to explain it
        servers = engine._servers
        ask = servers.ask

        def recording_ask(*args):
            r = ask(*args)
            asked.append(r)
            return r
        servers.ask = recording_ask
        engine.transaction_from_env(phase)
    try:
        # _run, not the public hooks: those set SMTPHELOHOST, SMTPMAILFROM,
        # the counters... from SMTP state this command does not have; here the
        # caller supplies them as NAME=value and they must reach the plugin.
        verdict, text = engine.run_section(phase, stdin_fd)
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)
        if pe is not None:
            engine._servers.close()
    if pe is not None:
        _out("phase: %s" % phase)
        _out("entry: %s" % _text(entry))
        _out("server: %s" % _text(pe.server))
        _out(_timeout_line(env, timeout) + (" (timeout=%d in the entry wins)" % pe.timeout
                                            if pe.timeout is not None else ""))
        if warning:
            _out("warning: " + _text(warning))
        return _policy_report(phase, asked[0], verdict, text)
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


def _policy_report(phase, res, verdict, text):
    """The rest of plugin-test's listing for a `policy:` entry."""
    from . import policy
    if res.failure is not None:
        _out("failure: %s%s" % (_text(res.failure), " (%s)" % _text(res.detail)
                                if res.detail else ""))
        if res.action is not None:
            _out("default: %s (taken as the answer)" % _text(res.action))
    else:
        _out("answer: action=%s" % _text(res.action))
    d = res.decision
    if d is not None:
        meaning = {
            policy.CONTINUE: "continue",
            policy.REFUSE: "refuse the command",
            policy.CLOSE: "refuse and close the connection",
            policy.DEFER_IF_PERMIT: "refuse at the end of the command's checks if they accept",
            policy.DEFER_IF_REJECT: "answer 450 instead if the command's checks refuse it",
            policy.PREPEND: "add header line " + _q(d.text),
        }[d.kind]
        _out("action: %s: %s" % (_text(d.word), meaning))
        if d.note is not None:
            _out("note: " + _text(d.note))
    _out("verdict: " + _verdict_line(verdict, phase, None))
    _out("time: %d ms" % int(res.elapsed * 1000 + 0.5))
    _out(_client_line(verdict, text))
    return EXIT_FAIL if res.failure is not None and res.action is None else EXIT_OK
