"""`qspp`: the administrator's command (spp.md §6.3, §6.4), a dispatcher.

    qspp serve [OPTIONS] [-- SMTPD-ARGS]     the built-in listener (serve.py)
    qspp check [OPTIONS] [SMTPD-ARGS]        the home and the plugin config (check.py)
    qspp plugin-test PHASE ENTRY [NAME=value ...]   one plugin run, explained (plugintest.py)
    qspp version | qspp --version

Never on the per-connection path, so argparse and friends are fine here.
Errors are one line on stderr, `qspp: TEXT`, with no traceback and no Python
repr; usage errors exit 2, as argparse's own.
"""

import argparse
import os
import sys

from . import home as homes, sppconfig
from .show import PROG, err as _err, os_error, out as _out

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

COMMANDS = (
    ("serve", "listen for SMTP clients: tcpserver and qmail-smtpd in one"),
    ("check", "check the home as connections meet it, and the plugin config"),
    ("plugin-test", "run one plugin entry once and explain its output"),
    ("version", "print the version"),
)


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


def _commands():
    return "".join("  %-12s %s\n" % c for c in COMMANDS)


def _id(what):
    def parse(text):
        if not text.isdigit():
            raise argparse.ArgumentTypeError("not a numeric %s id: %s" % (what, text))
        return int(text)
    return parse


def _parser():
    # the command list is written out: argparse's would wrap plugin-test's line
    p = _Parser(prog=PROG, usage="%(prog)s [-h] [--version] COMMAND [ARGS ...]",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="qmail-smtpd with qmail-spp plugins built in, and the tools to"
                " run it.\n\ncommands:\n" + _commands(),
                epilog="`qspp COMMAND --help` describes each command.")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, version()))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS,
                           parser_class=_Parser)
    helps = dict(COMMANDS)
    # serve parses its own arguments (serve.py); listed here for --help only
    sub.add_parser("serve", help=helps["serve"], add_help=False)
    c = sub.add_parser("check", help=helps["check"], prog=PROG + " check",
                       usage="%(prog)s [-h] [--qmailhome DIR] [-x FILE.cdb]"
                       " [--user NAME | -u UID [-g GID]] [--] [SMTPD-ARGS ...]",
                       description="Check the qmail home as connections meet it (control files,"
                       " queue program, STARTTLS certificate, rules file, the user sessions"
                       " run as), then read the plugin config as a connection would and list"
                       " each section's entries with their argv. The home is found as qspp"
                       " serve finds it. Exit status 1 when there is an error.")
    c.add_argument("--qmailhome", metavar="DIR", help=homes.OPTION_HELP)
    c.add_argument("-x", "--rules", metavar="FILE.cdb",
                   help="the tcprules cdb given to tcpserver -x or qspp serve --rules")
    c.add_argument("--user", metavar="NAME",
                   help="the user sessions run as (serve --user, tcpserver -u); default"
                   " qmaild when check runs as root")
    c.add_argument("-u", "--uid", type=_id("user"), metavar="UID",
                   help="the numeric user id sessions run as")
    c.add_argument("-g", "--gid", type=_id("group"), metavar="GID",
                   help="the numeric group id sessions run as")
    c.add_argument("args", nargs=argparse.REMAINDER, metavar="SMTPD-ARGS",
                   help="qspp.smtpd's arguments: [HOST] CHECKPROGRAM [SUBPROGRAM ...]")
    t = sub.add_parser("plugin-test", help=helps["plugin-test"], prog=PROG + " plugin-test",
                       usage="%(prog)s [-h] [--qmailhome DIR] [--message FILE] PHASE ENTRY"
                       " [NAME=value ...]",
                       description="Run ENTRY once as the engine would in PHASE, with the"
                       " current environment plus NAME=value, in the qmail home.")
    t.add_argument("--qmailhome", metavar="DIR", help="qmail home, found as for check")
    t.add_argument("--message", metavar="FILE",
                   help="the message file given to the plugin as stdin (body phase only)")
    # "?" and checks of our own: argparse would call NAME=value required too,
    # and quote the phases as Python strings
    t.add_argument("phase", metavar="PHASE", nargs="?",
                   help="one of: " + ", ".join(sppconfig.PHASES))
    t.add_argument("entry", metavar="ENTRY", nargs="?", help="a config entry: ':CMD' or a path")
    t.add_argument("assignments", nargs="*", metavar="NAME=value",
                   help="environment variables to add for the run (optional)")
    sub.add_parser("version", help=helps["version"], prog=PROG + " version",
                   description="Print the version.")
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
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        _err(os_error(e))
        return EXIT_FAIL


def _main(argv):
    if argv[:1] == ["serve"]:
        # its own parser and no import of the rest here: see serve.py
        from . import serve
        return serve.main(argv[1:])
    parser, test_parser = _parser()
    names = [name for name, _ in COMMANDS]
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in names:
            parser.error("unknown command %s: it is one of %s" % (argv[0], ", ".join(names)))
        if argv[:1] == ["plugin-test"]:
            # Intermixed, so --message may also follow ENTRY or NAME=value;
            # the top-level parser cannot intermix through a subcommand.
            ns = test_parser.parse_intermixed_args(argv[1:])
            ns.command = "plugin-test"
        else:
            ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_usage(sys.stderr)
            sys.stderr.write("%s: a command is required:\n%s" % (PROG, _commands()))
            return EXIT_USAGE
        environ = os.environb
        if ns.command == "version":
            _out("%s %s" % (PROG, version()))
            return EXIT_OK
        if ns.command == "check":
            return _check(parser, ns, environ)
        return _plugin_test(test_parser, ns, environ)
    except _Exit as e:
        return e.status


def _check(parser, ns, environ):
    from . import check, diagnose
    args = ns.args
    # REMAINDER keeps the "--" that lets ARGS start with "-".
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        who = diagnose.check_user(ns.uid, ns.gid, ns.user)
    except diagnose.UserError as e:
        _err(str(e))
        return EXIT_USAGE
    rules = os.fsencode(ns.rules) if ns.rules else None
    return check.cmd_check(args, environ, ns.qmailhome, rules, who)


def _plugin_test(parser, ns, environ):
    from .plugintest import cmd_plugin_test
    missing = [name for name, value in (("PHASE", ns.phase), ("ENTRY", ns.entry))
               if value is None]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(missing))
    if ns.phase not in sppconfig.PHASES:
        parser.error("PHASE %s is not one of: %s" % (ns.phase, ", ".join(sppconfig.PHASES)))
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
    return cmd_plugin_test(ns.phase, entry, assignments, ns.message, environ, ns.qmailhome)


if __name__ == "__main__":
    sys.exit(main())
