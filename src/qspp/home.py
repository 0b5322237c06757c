"""Which qmail home `qspp serve` and `qspp check` use: one lookup for both.

In order: --qmailhome DIR; $QMAILHOME (empty means unset, as for qspp.smtpd);
/var/qmail when control/me exists there (a qmail installation); else the
embedded home, $XDG_DATA_HOME/qspp or ~/.local/share/qspp (/var/lib/qspp when
root starts sessions as another user: root's ~ is 0700), which `qspp serve`
creates at its first start (serve.make_embedded_home).

qspp.smtpd under tcpserver knows only the first two and /var/qmail: it has
no home of its own to fall back on.
"""

import os

QMAIL = b"/var/qmail"

# how each home was found, as the listing and the start line say it
OPTION = "--qmailhome"
ENVIRONMENT = "$QMAILHOME"
INSTALLED = "qmail's"
EMBEDDED = "embedded"

# --qmailhome's help, the same for check, plugin-test and serve
OPTION_HELP = ("qmail home (default $QMAILHOME, else /var/qmail if it has control/me,"
               " else the embedded home)")


def embedded_home_path(environ, system=False) -> bytes:
    """system: root starting sessions as another user."""
    xdg = environ.get(b"XDG_DATA_HOME")
    # the XDG spec: a relative value is invalid and must be ignored
    if xdg and xdg.startswith(b"/"):
        return os.path.join(xdg, b"qspp")
    if system:
        # root's ~ is 0700: the session user could not enter a home under it
        return b"/var/lib/qspp"
    home = environ.get(b"HOME") or os.path.expanduser(b"~")
    return os.path.join(home, b".local", b"share", b"qspp")


def find(qmailhome, environ, system=False) -> "tuple[bytes, str]":
    """(absolute home, how it was found: OPTION, ENVIRONMENT, INSTALLED or
    EMBEDDED).  qmailhome: the --qmailhome value (str or bytes) or None;
    system: root starting sessions as another user."""
    if qmailhome:
        return os.path.abspath(os.fsencode(qmailhome)), OPTION
    if environ.get(b"QMAILHOME"):
        return os.path.abspath(environ[b"QMAILHOME"]), ENVIRONMENT
    if os.path.exists(os.path.join(QMAIL, b"control", b"me")):
        return QMAIL, INSTALLED
    return os.path.abspath(embedded_home_path(environ, system)), EMBEDDED
