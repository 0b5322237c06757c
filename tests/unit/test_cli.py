"""`qspp check`, `qspp plugin-test`, `qspp version` (spp.md §6.3, §6.4), in-process.

main() chdirs to QMAILHOME; the fixture chdirs first through monkeypatch so the
test process gets its cwd back. Plugins are real processes (small shell scripts).
"""

import os
import pwd
import re
from pathlib import Path

import pytest

from qspp import check, cli, diagnose


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    (h / "control").mkdir(parents=True)
    (h / "plugins").mkdir()
    (h / "control" / "me").write_bytes(b"test.example\n")
    (h / "control" / "rcpthosts").write_bytes(b"example.com\n")
    (h / "bin").mkdir()
    (h / "bin" / "qmail-queue").write_bytes(b"#!/bin/sh\nexit 0\n")
    (h / "bin" / "qmail-queue").chmod(0o755)
    for name in ("NOSPP", "SPPCONFFILE", "SPPTIMEOUT", "SPPLOG", "QMAILQUEUE", "TLSCIPHERS",
                 "NOMILTER", "MILTERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QMAILHOME", str(h))
    monkeypatch.chdir(tmp_path)
    # the note for a TLS home without it has tests of its own
    monkeypatch.setenv("FORCETLS", "1")
    # as a root check finds qmaild: sessions switch to this very user
    monkeypatch.setattr(diagnose, "SESSION_USER", pwd.getpwuid(os.geteuid()).pw_name)
    return h


def config(home, data):
    (home / "control" / "smtpplugins").write_bytes(data)


def plugin(home, name, body, mode=0o755):
    p = home / "plugins" / name
    p.write_bytes(body)
    p.chmod(mode)
    return p


# lines before `config:` in a home with control/me: see prelude()
PRE = 8
AUTH_LINE = PRE - 2
NO_MILTERS = "milters: none (no control/smtpmilters)"


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


QUEUE_LINE = "queue: bin/qmail-queue (default)"
NO_TLS = "STARTTLS: not offered (no control/servercert.pem; STARTTLS gets 502)"


def user_line():
    return diagnose.check_user().listing()


def prelude(home, auth="off (no arguments)", timeout="60 s (default)"):
    return ["home: %s (from QMAILHOME)" % home,
            'greeting: "220 test.example ESMTP" (control/me)',
            QUEUE_LINE,
            NO_TLS,
            user_line(),
            "SPPTIMEOUT: " + timeout,
            "AUTH mode: " + auth,
            NO_MILTERS]


# --- qspp check ---------------------------------------------------------------

def test_check_clean_config(home, capsys):
    plugin(home, "rbl", b"#!/bin/sh\necho N\n")
    config(home, b"# plugins\n[connection]\nplugins/rbl\n[rcpt]\n:echo E550 x\n:plugins/rbl -z zen\n")
    status, out, err = run(capsys, "check")
    assert out == prelude(home) + [
        "config: control/smtpplugins",
        "[connection]",
        '  line 3: plugins/rbl -> ["plugins/rbl"]',
        "[rcpt]",
        '  line 5: :echo E550 x -> ["/bin/sh", "-c", "echo E550 x"]',
        '  line 6: :plugins/rbl -z zen -> ["/bin/sh", "-c", "plugins/rbl -z zen"]',
        "check: 0 errors, 0 warnings, 0 notes",
    ]
    assert status == 0
    assert err == ""


def test_check_sections_listed_in_phase_order_with_repeats_appended(home, capsys):
    config(home, b"[rcpt]\n:echo 1\n[helo]\n:echo 2\n[rcpt]\n:echo 3\n")
    status, out, _ = run(capsys, "check")
    assert out[PRE + 1:PRE + 6] == [
        "[helo]",
        '  line 4: :echo 2 -> ["/bin/sh", "-c", "echo 2"]',
        "[rcpt]",
        '  line 2: :echo 1 -> ["/bin/sh", "-c", "echo 1"]',
        '  line 6: :echo 3 -> ["/bin/sh", "-c", "echo 3"]',
    ]
    assert status == 0


def test_check_undocumented_headers(home, capsys):
    config(home, b"[Helo]\n:echo E501\n[mailx]\n:echo E502\n")
    status, out, _ = run(capsys, "check")
    assert out[PRE:] == [
        "config: control/smtpplugins",
        "[mail]",
        '  line 4: :echo E502 -> ["/bin/sh", "-c", "echo E502"]',
        "control/smtpplugins:1: warning: header [Helo] selects no section: its entries never run",
        "control/smtpplugins:2: warning: entry under an ignored header never runs: :echo E501",
        "control/smtpplugins:3: warning: header [mailx] is not a documented name; it selects [mail]",
        "check: 0 errors, 3 warnings, 0 notes",
    ]
    assert status == 0


def test_check_non_executable_entry(home, capsys):
    plugin(home, "x", b"#!/bin/sh\n", mode=0o644)
    config(home, b"[helo]\nplugins/x\n")
    status, out, _ = run(capsys, "check")
    assert out[-2:] == [
        "control/smtpplugins:2: error: plugins/x: not executable (mode 0644)",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_missing_and_directory_entries(home, capsys):
    (home / "plugins" / "d").mkdir()
    config(home, b"[helo]\nplugins/none\nplugins/d\n/\n")
    status, out, _ = run(capsys, "check")
    assert out[-4:] == [
        "control/smtpplugins:2: error: plugins/none: no such file",
        "control/smtpplugins:3: error: plugins/d: is a directory",
        "control/smtpplugins:4: error: /: is a directory",
        "check: 3 errors, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_entries_before_first_header(home, capsys):
    # spp.md §7.1 #4
    config(home, b"#c\n:echo E500\n[helo]\n:true\n")
    status, out, _ = run(capsys, "check")
    assert out[-2:] == [
        "control/smtpplugins:2: warning: entry before the first header never runs: :echo E500",
        "check: 0 errors, 1 warning, 0 notes",
    ]
    assert status == 0


def test_check_missing_config_is_a_note(home, capsys):
    status, out, err = run(capsys, "check")
    assert out == prelude(home) + [
        "config: control/smtpplugins (missing)",
        "note: control/smtpplugins does not exist: no plugins",
        "check: 0 errors, 0 warnings, 1 note",
    ]
    assert status == 0
    assert err == ""


def test_check_empty_config(home, capsys):
    config(home, b"# nothing yet\n")
    status, out, _ = run(capsys, "check")
    assert out[PRE:] == ["config: control/smtpplugins", "no plugin entries",
                       "check: 0 errors, 0 warnings, 0 notes"]
    assert status == 0


def test_check_path_entry_with_space(home, capsys):
    # spp.md §7.1 #6: plugins/x exists, `plugins/x arg` is one file name
    plugin(home, "x", b"#!/bin/sh\necho N\n")
    config(home, b"[helo]\nplugins/x arg\n")
    status, out, _ = run(capsys, "check")
    assert out[PRE:] == [
        "config: control/smtpplugins",
        "[helo]",
        '  line 2: plugins/x arg -> ["plugins/x arg"]',
        "control/smtpplugins:2: warning: entry names a file containing a space or tab"
        " (arguments need ':'): plugins/x arg",
        "control/smtpplugins:2: error: plugins/x arg: no such file"
        " (plugins/x exists: write :plugins/x arg to pass arguments)",
        "check: 1 error, 1 warning, 0 notes",
    ]
    assert status == 1


def test_check_lines_042_reads_differently(home, capsys):
    # §7.1 #4 and #5: leading whitespace, CRLF
    config(home, b"[helo]\r\n:echo E550 crlf\r\n  # note\n")
    status, out, _ = run(capsys, "check")
    assert out[PRE:] == [
        "config: control/smtpplugins",
        "[helo]",
        '  line 2: :echo E550 crlf -> ["/bin/sh", "-c", "echo E550 crlf"]',
        "control/smtpplugins:1: note: trailing CR stripped; 0.42 keeps it",
        "control/smtpplugins:2: note: trailing CR stripped; 0.42 keeps it",
        "control/smtpplugins:3: note: leading whitespace/CR stripped; 0.42 reads this line as an entry",
        "check: 0 errors, 0 warnings, 3 notes",
    ]
    assert status == 0


def test_check_crlf_shebang_and_no_shebang(home, capsys):
    plugin(home, "crlf", b"#!/bin/sh\r\necho N\r\n")
    plugin(home, "text", b"echo N\n")
    config(home, b"[helo]\nplugins/crlf\nplugins/text\n")
    status, out, _ = run(capsys, "check")
    assert out[-3:] == [
        'control/smtpplugins:2: error: plugins/crlf: #! line ends in CR (CRLF file):'
        ' interpreter "/bin/sh\\r" does not exist',
        "control/smtpplugins:3: warning: plugins/text: neither a #! script nor an ELF binary:"
        " exec will likely fail (can't execute)",
        "check: 1 error, 1 warning, 0 notes",
    ]
    assert status == 1


def test_check_missing_interpreter(home, capsys):
    plugin(home, "py", b"#!/nonexistent/python3 -I\nprint('N')\n")
    config(home, b"[helo]\nplugins/py\n")
    status, out, _ = run(capsys, "check")
    assert out[-2] == ("control/smtpplugins:2: error: plugins/py: #! interpreter"
                       " /nonexistent/python3 is missing or not executable")
    assert status == 1


def test_check_unreadable_config(home, capsys):
    # §7.1 #2: a directory; a connection answers 421
    (home / "control" / "smtpplugins").mkdir()
    status, out, _ = run(capsys, "check")
    assert out[PRE:] == [
        "config: control/smtpplugins (unreadable)",
        "error: unable to read control/smtpplugins: Is a directory"
        " (connections get 421 unable to read controls (#4.3.0))",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_nospp(home, capsys, monkeypatch):
    (home / "control" / "smtpplugins").mkdir()
    monkeypatch.setenv("NOSPP", "")
    status, out, _ = run(capsys, "check")
    assert out[PRE:] == ["config: none: NOSPP is set, plugins are off and no file is read",
                       "check: 0 errors, 0 warnings, 0 notes"]
    assert status == 0


def test_check_sppconffile(home, capsys, monkeypatch):
    (home / "control" / "alt").write_bytes(b"[helo]\n:echo E550 alt\n")
    monkeypatch.setenv("SPPCONFFILE", "control/alt")
    status, out, _ = run(capsys, "check")
    assert out[PRE:PRE + 2] == ["config: control/alt (from SPPCONFFILE)", "[helo]"]
    assert status == 0


def test_check_sppconffile_missing_is_an_error(home, capsys, monkeypatch):
    monkeypatch.setenv("SPPCONFFILE", "control/typo")
    status, out, _ = run(capsys, "check")
    assert out[PRE:] == [
        "config: control/typo (unreadable)",
        "error: unable to read control/typo: No such file or directory"
        " (connections get 421 unable to read controls (#4.3.0))",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_bin_sh_missing(home, capsys, monkeypatch):
    real = os.access
    monkeypatch.setattr(cli.os, "access",
                        lambda p, m: False if p == "/bin/sh" else real(p, m))
    config(home, b"[helo]\n:echo N\n")
    status, out, _ = run(capsys, "check")
    assert out[-2:] == ["error: /bin/sh is missing or not executable, and ':' entries need it",
                        "check: 1 error, 0 warnings, 0 notes"]
    assert status == 1


def test_check_auth_entries_outside_auth_mode(home, capsys):
    config(home, b"[auth]\n:echo E535 no\n")
    status, out, _ = run(capsys, "check")
    assert out[-2:] == [
        "control/smtpplugins:2: note: [auth] entries run only in AUTH mode,"
        " which these arguments leave off",
        "check: 0 errors, 0 warnings, 1 note",
    ]
    assert status == 0


@pytest.mark.parametrize("args, how", [
    (["/bin/checkpassword", "/bin/true"],
     'on: no HOST (the first argument contains "/"), checkprogram'
     ' ["/bin/checkpassword", "/bin/true"]'),
    (["mail.example", "/bin/checkpassword", "/bin/true"],
     'on: HOST "mail.example", checkprogram ["/bin/checkpassword", "/bin/true"]'),
    (["bin/check"], 'on: no HOST (the first argument contains "/"), checkprogram ["bin/check"]'),
])
def test_check_auth_mode_reading(home, capsys, args, how):
    config(home, b"[auth]\n:echo E535 no\n")
    status, out, _ = run(capsys, "check", *args)
    assert out[AUTH_LINE] == "AUTH mode: " + how
    assert out[-1] == "check: 0 errors, 0 warnings, 0 notes"
    assert status == 0


def test_check_host_alone(home, capsys):
    config(home, b"")
    status, out, _ = run(capsys, "check", "mail.example")
    assert out[AUTH_LINE] == 'AUTH mode: off: HOST "mail.example" without a checkprogram'
    assert out[-2:] == ["warning: HOST without a checkprogram: AUTH is off"
                        " (connections log one stderr line)",
                        "check: 0 errors, 1 warning, 0 notes"]
    assert status == 0


def test_check_bare_checkprogram_on_path(home, capsys, monkeypatch, tmp_path):
    # qmail-smtpd.md §2.1: no "." and an executable on PATH: no HOST
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "checkpw").write_bytes(b"#!/bin/sh\n")
    (bindir / "checkpw").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    config(home, b"")
    status, out, _ = run(capsys, "check", "checkpw", "/bin/true")
    assert out[AUTH_LINE] == ('AUTH mode: on: no HOST (the first argument has no "." and is an executable'
                      ' on PATH: %s/checkpw), checkprogram ["checkpw", "/bin/true"]' % bindir)
    assert status == 0


def test_check_dashdash_before_args(home, capsys):
    config(home, b"")
    status, out, _ = run(capsys, "check", "--", "/bin/check")
    assert out[AUTH_LINE] == 'AUTH mode: on: no HOST (the first argument contains "/"), checkprogram ["/bin/check"]'


def test_check_control_files(home, capsys, monkeypatch):
    (home / "control" / "me").unlink()
    (home / "control" / "rcpthosts").unlink()
    (home / "control" / "badmailfrom").mkdir()
    monkeypatch.setenv("SPPTIMEOUT", "1.5")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out == [
        "home: %s (from QMAILHOME)" % home,
        QUEUE_LINE,
        NO_TLS,
        user_line(),
        "SPPTIMEOUT: 60 s",
        "AUTH mode: off (no arguments)",
        NO_MILTERS,
        "config: control/smtpplugins",
        "no plugin entries",
        "error: control/me and control/smtpgreeting are both absent"
        " (connections get 421 unable to read controls (#4.3.0))",
        "control/rcpthosts: warning: absent: every recipient domain is accepted (open relay)",
        "error: unable to read control/badmailfrom: Is a directory"
        " (connections get 421 unable to read controls (#4.3.0))",
        "warning: SPPTIMEOUT=1.5 is not a non-negative integer: using 60",
        "check: 2 errors, 2 warnings, 0 notes",
    ]
    assert status == 1


def test_check_greeting_from_smtpgreeting_with_cr(home, capsys):
    (home / "control" / "smtpgreeting").write_bytes(b"hi there\r\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[1] == 'greeting: "220 hi there\\r ESMTP" (control/smtpgreeting)'
    assert out[-2:] == ["control/smtpgreeting: warning: contains a CR (CRLF file?),"
                        " which qmail keeps in the greeting",
                        "check: 0 errors, 1 warning, 0 notes"]
    assert status == 0


def test_check_spptimeout_zero(home, capsys, monkeypatch):
    monkeypatch.setenv("SPPTIMEOUT", "0")
    config(home, b"")
    _, out, _ = run(capsys, "check")
    assert out[AUTH_LINE - 1] == "SPPTIMEOUT: no limit (0)"


def test_check_home_missing(home, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QMAILHOME", str(tmp_path / "nowhere"))
    status, out, _ = run(capsys, "check")
    assert out == ["home: %s (from QMAILHOME)" % (tmp_path / "nowhere"),
                   user_line(),
                   "error: cannot chdir to %s: No such file or directory"
                   " (connections get 421 unable to read controls (#4.3.0))" % (tmp_path / "nowhere"),
                   "check: 1 error, 0 warnings, 0 notes"]
    assert status == 1


# --- qspp check: what a newcomer's home gets wrong --------------------------

# A throwaway self-signed P-256 certificate (CN test.example, valid to 2126) and
# its key, a second unrelated key, and the first key encrypted (passphrase x).
CERT = b"""-----BEGIN CERTIFICATE-----
MIIBhjCCASugAwIBAgIUTr2T6Btx8Zt4+yiP6Vo3Om6NuZgwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMdGVzdC5leGFtcGxlMCAXDTI2MTEyNTE2MjgwNloYDzIxMjYx
MTAxMTYyODA2WjAXMRUwEwYDVQQDDAx0ZXN0LmV4YW1wbGUwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAASuE7cMZjz56SBXSpNVyACjbfm2tvmFARYjzxLjH6YwW0yy
8bbFymNmlFw2T0vmXGoAiQXifPnuO26ShAd45kZyo1MwUTAdBgNVHQ4EFgQUAFS/
c+MCwu6oo5BBPebEYEGlnA4wHwYDVR0jBBgwFoAUAFS/c+MCwu6oo5BBPebEYEGl
nA4wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEAimmx1JELqxsm
zJoPgzu+MhQz5JXXjRs+YN1ZbExUKpACIQD/4Sn4J/ub0hBl05lby/7C45i1sOFt
9kDF4GFJT1g5yA==
-----END CERTIFICATE-----
"""
KEY = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgvtQABNx19LetoK22
o9cL6T9+I3ggHtIHF02/mr1q6ZOhRANCAASuE7cMZjz56SBXSpNVyACjbfm2tvmF
ARYjzxLjH6YwW0yy8bbFymNmlFw2T0vmXGoAiQXifPnuO26ShAd45kZy
-----END PRIVATE KEY-----
"""
OTHER_KEY = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgFCzXSxp7ieB6Ig5r
8fttE8iAZH1SXjIELxWEQ6OMaV6hRANCAARjU+a4mu+BT4YJ4142x/S+A5BFUCIB
Z25bBbqWCGLFwgRm2tfV9coQcufj9rbp3ZSIPmz9E5/ABdb8kEPAg/YE
-----END PRIVATE KEY-----
"""
ENCRYPTED_KEY = b"""-----BEGIN EC PRIVATE KEY-----
Proc-Type: 4,ENCRYPTED
DEK-Info: AES-128-CBC,CDF533203E5CB5D8FDCA884DBBBF2670

WnBidkBNCENpOiKycH1MEW6MHMjUkgn42T2elV/Z5bHWoMmqtMydTHb6veRQdWaa
4aoLOTNnEMuljLoEyPz953BdhOSnnEBD4sbD6gH9DAT4FGyUbdCONQRDGdvMjxs8
2NlJHRUPt5SCVeR+wTfLeiZQ1FIAiCY4ysFQtvpQwkA=
-----END EC PRIVATE KEY-----
"""

CERT_LOADS = 'STARTTLS: offered (control/servercert.pem loads), ciphers "DEFAULT" (default)'
CERT_FAILS = ('STARTTLS: offered, but fails (control/servercert.pem does not load),'
              ' ciphers "DEFAULT" (default)')


def control_file(home, name, data):
    p = home / "control" / name
    p.write_bytes(data)
    if name == "servercert.pem":
        p.chmod(0o600)  # a private key: others must not read it


def findings(out):
    """The lines after the listing: findings and the count line."""
    k = next(i for i, line in enumerate(out) if line.startswith("config: "))
    return [line for line in out[k + 1:] if not line.startswith(("[", "  ", "no plugin"))]


def test_check_me_absent_with_smtpgreeting(home, capsys):
    (home / "control" / "me").unlink()
    control_file(home, "smtpgreeting", b"mx.example\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[1] == 'greeting: "220 mx.example ESMTP" (control/smtpgreeting)'
    assert findings(out) == [
        "control/me: warning: absent: the rest of qmail (qmail-send, qmail-inject) needs it;"
        " with no control/localiphost either, addresses at this host's [IP] are not rewritten",
        "check: 0 errors, 1 warning, 0 notes",
    ]
    assert status == 0
    control_file(home, "localiphost", b"mx.example\n")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "control/me: warning: absent: the rest of qmail (qmail-send, qmail-inject) needs it",
        "check: 0 errors, 1 warning, 0 notes",
    ]


def test_check_me_crlf(home, capsys):
    # the greeting qmail sends is then "220 a.b\r ESMTP"
    control_file(home, "me", b"a.b\r\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[1] == 'greeting: "220 a.b\\r ESMTP" (control/me)'
    assert findings(out) == [
        "control/me: warning: contains a CR (CRLF file?), which qmail keeps in the greeting",
        "check: 0 errors, 1 warning, 0 notes",
    ]
    assert status == 0


def test_check_me_and_localiphost_crlf_behind_smtpgreeting(home, capsys):
    control_file(home, "me", b"a.b\r\n")
    control_file(home, "localiphost", b"c.d\r\n")
    control_file(home, "smtpgreeting", b"a.b\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "control/me: warning: contains a CR (CRLF file?), which qmail keeps in the name",
        "control/localiphost: warning: contains a CR (CRLF file?), which qmail keeps in the name",
        "check: 0 errors, 2 warnings, 0 notes",
    ]
    assert status == 0


def test_check_rcpthosts_empty(home, capsys):
    control_file(home, "rcpthosts", b"# nothing yet\n\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "control/rcpthosts: warning: lists no domain: every recipient address with an @ is"
        " refused (553) unless RELAYCLIENT is set",
        "check: 0 errors, 1 warning, 0 notes",
    ]
    assert status == 0
    # the domains may all be in morercpthosts.cdb
    control_file(home, "morercpthosts.cdb", bytes(2048))
    status, out, _ = run(capsys, "check")
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]


def test_check_rcpthosts_absent_with_morercpthosts(home, capsys):
    (home / "control" / "rcpthosts").unlink()
    control_file(home, "morercpthosts.cdb", bytes(2048))
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "control/rcpthosts: warning: absent: every recipient domain is accepted (open relay)",
        "control/morercpthosts.cdb: warning: ignored: qmail reads it only when"
        " control/rcpthosts exists",
        "check: 0 errors, 2 warnings, 0 notes",
    ]
    assert status == 0


def test_check_unreadable_morercpthosts(home, capsys):
    (home / "control" / "morercpthosts.cdb").mkdir()
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "error: unable to read control/morercpthosts.cdb: Is a directory"
        " (connections get 421 unable to read controls (#4.3.0))",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_crlf_lists(home, capsys):
    control_file(home, "rcpthosts", b"example.com\r\nexample.net\r\nexample.org\n")
    control_file(home, "badmailfrom", b"bad@spam.example\r\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "control/rcpthosts: warning: 2 entries end in CR (CRLF file?): qmail keeps the CR,"
        " so those domains are never accepted",
        "control/badmailfrom: warning: 1 entry ends in CR (CRLF file?): qmail keeps the CR,"
        " so those senders are never refused",
        "check: 0 errors, 2 warnings, 0 notes",
    ]
    assert status == 0


def test_check_queue_program(home, capsys, monkeypatch):
    (home / "bin" / "qmail-queue").unlink()
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[2] == "queue: bin/qmail-queue (default)"
    assert findings(out) == [
        "error: bin/qmail-queue: no such file (the queue program: messages get 451"
        " instead of being queued)",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1
    q = plugin(home, "queue", b"#!/bin/sh\n", mode=0o644)
    monkeypatch.setenv("QMAILQUEUE", str(q))
    status, out, _ = run(capsys, "check")
    assert out[2] == "queue: %s (from QMAILQUEUE)" % q
    assert findings(out) == [
        "error: %s: not executable (mode 0644) (the queue program: messages get 451"
        " instead of being queued)" % q,
        "check: 1 error, 0 warnings, 0 notes",
    ]
    # D3: empty means the default
    monkeypatch.setenv("QMAILQUEUE", "")
    _, out, _ = run(capsys, "check")
    assert out[2] == "queue: bin/qmail-queue (default)"


def test_check_servercert_loads(home, capsys):
    control_file(home, "servercert.pem", CERT + KEY)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == CERT_LOADS
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]
    assert status == 0


# The SSL library's own reason comes first; its wording is OpenSSL's (3.0 here).
@pytest.mark.parametrize("pem, reason", [
    (CERT, r"\[SSL\] PEM lib: the file holds no private key"
           r" \(it needs the key after the certificate chain\)"),
    (KEY, r"\[SSL\] PEM lib: the file holds no certificate"),
    (b"junk\n", r"\[SSL\] PEM lib: the file holds no certificate"),
    (CERT + OTHER_KEY, r"\[X509: KEY_VALUES_MISMATCH\] key values mismatch"),
    (CERT + ENCRYPTED_KEY, r"\[SSL\] PEM lib: the private key is encrypted,"
                           r" and nobody is there to type its passphrase"),
])
def test_check_servercert_does_not_load(home, capsys, pem, reason):
    control_file(home, "servercert.pem", pem)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == CERT_FAILS
    (line, count) = findings(out)
    assert re.fullmatch(r"control/servercert\.pem: error: does not load: " + reason
                        + r" \(STARTTLS gets 454 TLS missing certificate\)", line), line
    assert count == "check: 1 error, 0 warnings, 0 notes"
    assert status == 1


def test_check_servercert_directory(home, capsys):
    (home / "control" / "servercert.pem").mkdir()
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == CERT_FAILS
    assert findings(out) == [
        "control/servercert.pem: error: does not load: Is a directory"
        " (STARTTLS gets 454 TLS missing certificate)",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_tlsserverciphers(home, capsys):
    control_file(home, "servercert.pem", CERT + KEY)
    control_file(home, "tlsserverciphers", b"HIGH\n!aNULL\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == ('STARTTLS: offered (control/servercert.pem loads),'
                      ' ciphers "HIGH:!aNULL" (control/tlsserverciphers)')
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]
    assert status == 0


def test_check_tlsserverciphers_rejected_and_crlf(home, capsys):
    control_file(home, "servercert.pem", CERT + KEY)
    control_file(home, "tlsserverciphers", b"HIGH\r\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == ('STARTTLS: offered (control/servercert.pem loads),'
                      ' ciphers "HIGH\\r" (control/tlsserverciphers)')
    assert findings(out) == [
        "control/tlsserverciphers: warning: 1 entry ends in CR (CRLF file?): qmail keeps"
        " the CR, so OpenSSL does not know those names",
        'control/tlsserverciphers: error: cipher list "HIGH\\r" rejected: No cipher can be'
        " selected. (STARTTLS gets 454 TLS unable to initialize ctx)",
        "check: 1 error, 1 warning, 0 notes",
    ]
    assert status == 1


def test_check_tlsciphers_env(home, capsys, monkeypatch):
    control_file(home, "servercert.pem", CERT + KEY)
    control_file(home, "tlsserverciphers", b"HIGH\n")
    monkeypatch.setenv("TLSCIPHERS", "nonsense")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == ('STARTTLS: offered (control/servercert.pem loads),'
                      ' ciphers "nonsense" (from TLSCIPHERS)')
    assert findings(out) == [
        'error: TLSCIPHERS="nonsense" rejected: No cipher can be selected.'
        " (STARTTLS gets 454 TLS unable to initialize ctx)",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_tlsserverciphers_unreadable(home, capsys):
    control_file(home, "servercert.pem", CERT + KEY)
    (home / "control" / "tlsserverciphers").mkdir()
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == "STARTTLS: offered (control/servercert.pem loads), ciphers unreadable"
    assert findings(out) == [
        "error: unable to read control/tlsserverciphers: Is a directory"
        " (STARTTLS gets 421 unable to read controls (#4.3.0))",
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_ciphers_unused_without_servercert(home, capsys):
    # never read while STARTTLS is not offered
    (home / "control" / "tlsserverciphers").mkdir()
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == NO_TLS
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]
    assert status == 0


def as_qmaild(monkeypatch, uid=4242, gids=(4243,)):
    """check as root on a system with a qmaild user: permissions are judged for it."""
    who = diagnose.Who("qmaild", uid, gids[0], gids, False, True, "test")
    monkeypatch.setattr(diagnose, "check_user", lambda *a: who)


def test_check_plugins_qmaild_cannot_run(home, capsys, monkeypatch):
    # qmaild is in the plugins' group, which may execute but not read "group"
    as_qmaild(monkeypatch, gids=(os.getgid(),))
    mine = plugin(home, "mine", b"#!/bin/sh\necho N\n", mode=0o700)
    group = plugin(home, "group", b"#!/bin/sh\necho N\n", mode=0o710)
    plugin(home, "binary", b"\x7fELF", mode=0o711)
    plugin(home, "fine", b"#!/bin/sh\necho N\n", mode=0o755)
    config(home, b"[helo]\nplugins/mine\nplugins/group\nplugins/binary\nplugins/fine\n")
    status, out, _ = run(capsys, "check")
    owner = "%d:%d" % (os.stat(mine).st_uid, os.stat(mine).st_gid)
    assert owner == "%d:%d" % (os.stat(group).st_uid, os.stat(group).st_gid)
    assert findings(out) == [
        "control/smtpplugins:2: error: plugins/mine: qmaild cannot read and execute it"
        " (mode 0700, owner %s)" % owner,
        "control/smtpplugins:3: error: plugins/group: qmaild cannot read and execute it"
        " (mode 0710, owner %s)" % owner,
        "check: 2 errors, 0 warnings, 0 notes",
    ]
    assert status == 1


def test_check_servercert_qmaild_cannot_read(home, capsys, monkeypatch):
    as_qmaild(monkeypatch)
    control_file(home, "servercert.pem", CERT + KEY)
    cert = home / "control" / "servercert.pem"
    cert.chmod(0o600)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == CERT_FAILS
    assert findings(out) == [
        "control/servercert.pem: error: does not load: qmaild cannot read it (mode 0600,"
        " owner %d:%d) (STARTTLS gets 454 TLS missing certificate)"
        % (os.stat(cert).st_uid, os.stat(cert).st_gid),
        "check: 1 error, 0 warnings, 0 notes",
    ]
    assert status == 1
    cert.chmod(0o644)
    status, out, _ = run(capsys, "check")
    assert out[3] == CERT_LOADS
    assert status == 0


def test_session_user_lookup(monkeypatch):
    # only root's view needs the correction; qmaild rarely exists on a test box
    monkeypatch.setattr(diagnose, "SESSION_USER", "qspp-no-such-user")
    who = diagnose.check_user()
    assert (who.uid, who.current, who.switched) == (os.geteuid(), True, False)
    if os.geteuid() == 0:
        monkeypatch.setattr(diagnose, "SESSION_USER", "nobody")
        who = diagnose.check_user()
        assert (who.name, who.current, who.switched) == ("nobody", False, True)


def test_check_newcomer_home(home, capsys):
    """Everything at once, as a first install tends to have it: every problem
    reported in one run, errors make the exit status."""
    (home / "control" / "me").write_bytes(b"mx.example\r\n")
    (home / "control" / "rcpthosts").unlink()
    control_file(home, "servercert.pem", CERT)
    plugin(home, "rbl", b"#!/bin/sh\necho N\n", mode=0o644)
    config(home, b"[connection]\r\nplugins/rbl -z zen\r\n[rcpts]\nplugins/rbl\n")
    status, out, _ = run(capsys, "check")
    assert out[:PRE] == [
        "home: %s (from QMAILHOME)" % home,
        'greeting: "220 mx.example\\r ESMTP" (control/me)',
        QUEUE_LINE,
        CERT_FAILS,
        user_line(),
        "SPPTIMEOUT: 60 s (default)",
        "AUTH mode: off (no arguments)",
        NO_MILTERS,
    ]
    assert out[PRE:PRE + 5] == [
        "config: control/smtpplugins",
        "[connection]",
        '  line 2: plugins/rbl -z zen -> ["plugins/rbl -z zen"]',
        "[rcpt]",
        '  line 4: plugins/rbl -> ["plugins/rbl"]',
    ]
    rest = out[PRE + 5:]
    assert rest[:2] == [
        "control/me: warning: contains a CR (CRLF file?), which qmail keeps in the greeting",
        "control/rcpthosts: warning: absent: every recipient domain is accepted (open relay)",
    ]
    assert rest[2].startswith("control/servercert.pem: error: does not load: ")
    assert rest[3:] == [
        "control/smtpplugins:1: note: trailing CR stripped; 0.42 keeps it",
        "control/smtpplugins:2: note: trailing CR stripped; 0.42 keeps it",
        "control/smtpplugins:2: warning: entry names a file containing a space or tab"
        " (arguments need ':'): plugins/rbl -z zen",
        "control/smtpplugins:2: error: plugins/rbl -z zen: no such file"
        " (plugins/rbl exists: write :plugins/rbl -z zen to pass arguments)",
        "control/smtpplugins:3: warning: header [rcpts] is not a documented name;"
        " it selects [rcpt]",
        "control/smtpplugins:4: error: plugins/rbl: not executable (mode 0644)",
        "check: 3 errors, 4 warnings, 2 notes",
    ]
    assert status == 1


def test_entry_lines_agree_with_parse():
    data = (b"x\n[helo]\n a \n#c\n[Helo]\nb\n[mail\nc\0junk\n\n[m]\r\nd\r\n[]\ne\n[body]\nf")
    located = check._entry_lines(data)
    assert located == [("helo", b"a", 3), ("mail", b"c", 8), ("mail", b"d", 11), ("body", b"f", 15)]
    grouped = {}
    for phase, entry, _ in located:
        grouped.setdefault(phase, []).append(entry)
    assert grouped == check.sppconfig.parse(data).sections


# --- qspp plugin-test ---------------------------------------------------------

def ptest(capsys, *argv):
    """Runs plugin-test; returns (status, lines without the time line, stderr)."""
    status, out, err = run(capsys, "plugin-test", *argv)
    times = [line for line in out if line.startswith("time: ")]
    assert len(times) == 1 and re.fullmatch(r"time: \d+ ms", times[0]), out
    return status, [line for line in out if not line.startswith("time: ")], err


def q(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def head(home, phase, entry, timeout="60 s (default)"):
    argv = ", ".join(q(a) for a in (["/bin/sh", "-c", entry[1:]] if entry[:1] == ":"
                                    else [entry]))
    return ["phase: " + phase, "entry: " + entry, "argv: [%s]" % argv,
            "cwd: %s" % home, "SPPTIMEOUT: " + timeout]


@pytest.mark.parametrize("phase, printed, explained, verdict, client", [
    ("rcpt", "SDNSBL_HIT=zen",
     "S DNSBL_HIT=zen: set DNSBL_HIT for later plugins and qmail-queue",
     "continue (rcpthosts check, then 250 ok); the next entry of the section would run first",
     "(qmail's normal reply)"),
    ("mail", "SRELAYCLIENT=",
     "S RELAYCLIENT=: set RELAYCLIENT for later plugins and qmail-queue"
     " (qspp keeps the value it read at connection start)",
     "continue (badmailfrom check, then 250 ok); the next entry of the section would run first",
     "(qmail's normal reply)"),
    ("helo", "SNOEQ", "S NOEQ: ignored (S needs NAME=value), logged",
     "continue (qmail's normal reply, HELO name stored); the next entry of the section would run"
     " first", "(qmail's normal reply)"),
    ("helo", "UTCPREMOTEINFO", "U TCPREMOTEINFO: remove TCPREMOTEINFO for later plugins and"
     " qmail-queue (qspp keeps the value it read at connection start)", None,
     "(qmail's normal reply)"),
    ("helo", "UX", "U X: remove X for later plugins and qmail-queue", None,
     "(qmail's normal reply)"),
    ("helo", "SQMAILQUEUE=bin/alt", "S QMAILQUEUE=bin/alt: set QMAILQUEUE for later plugins and"
     " qmail-queue (the queue program for later messages)", None, "(qmail's normal reply)"),
    ("data", "HX-A: 1", "H X-A: 1: add header line", None, "(qmail's normal reply)"),
    ("data", "H", "H: add an empty header line (ends the header block)", None,
     "(qmail's normal reply)"),
    ("mail", "Cnew@b.example", "C new@b.example: rewrite the sender", None,
     "(qmail's normal reply)"),
    ("rcpt", "Cnew@x", "C new@x: rewrite the recipient", None, "(qmail's normal reply)"),
    ("helo", "Cnew@x", "C new@x: ignored in helo", None, "(qmail's normal reply)"),
    ("data", "Cnew@x", "C new@x: ignored in data", None, "(qmail's normal reply)"),
    ("connection", "P220-welcome", "P 220-welcome: send this line to the client now",
     "continue (greeting); the next entry of the section would run first",
     '"220-welcome\\r\\n", then qmail\'s normal reply'),
    ("helo", "LM451 later", "LM 451 later: deferred error for later MAILs", None,
     "(qmail's normal reply)"),
    ("mail", "LR550 x", "LR 550 x: deferred error for later RCPTs", None,
     "(qmail's normal reply)"),
    ("rcpt", "LD452 y", "LD 452 y: deferred error for later DATAs", None,
     "(qmail's normal reply)"),
    ("helo", "Lx", "Lx: ignored (L needs M, R or D)", None, "(qmail's normal reply)"),
    ("helo", "zzz", "zzz: ignored (unknown command letter)", None, "(qmail's normal reply)"),
    ("helo", "n", "n: ignored (unknown command letter)", None, "(qmail's normal reply)"),
    ("helo", " E550 x", '" E550 x": ignored (starts with a space)', None,
     "(qmail's normal reply)"),
])
def test_plugin_test_non_terminators(home, capsys, phase, printed, explained, verdict, client):
    entry = ":printf '%s\\n'" % printed
    status, out, err = ptest(capsys, phase, entry)
    if verdict is None:
        verdict = {"helo": "continue (qmail's normal reply, HELO name stored)",
                   "mail": "continue (badmailfrom check, then 250 ok)",
                   "rcpt": "continue (rcpthosts check, then 250 ok)",
                   "data": "continue (354 go ahead, then the message)"}[phase] \
            + "; the next entry of the section would run first"
    assert out == head(home, phase, entry) + [
        "output:",
        "  " + explained,
        "terminator: none",
        "verdict: " + verdict,
        "exit status: 0",
        "client gets: " + client,
    ]
    assert status == 0


@pytest.mark.parametrize("phase, printed, explained, verdict, client", [
    ("helo", "A", "A: accept, and plugins off for the rest of the connection",
     "continue (qmail's normal reply, HELO name stored); plugins off for the rest of the connection",
     "(qmail's normal reply)"),
    ("mail", "N", "N: stop the section, continue",
     "continue (badmailfrom check, then 250 ok)", "(qmail's normal reply)"),
    ("mail", "Nok", "N ok: stop the section, continue (the text after the letter is ignored)",
     "continue (badmailfrom check, then 250 ok)", "(qmail's normal reply)"),
    ("rcpt", "O", "O: override", "override (accept: rcpthosts check skipped)",
     "(qmail's normal reply)"),
    ("mail", "O", "O: override", "override (accept: badmailfrom check skipped)",
     "(qmail's normal reply)"),
    ("helo", "O", "O: override", "override (as continue: qmail's normal reply, HELO name stored)",
     "(qmail's normal reply)"),
    ("rcpt", "E550 x", "E 550 x: refuse the command with this text",
     "refused (recipient not added)", '"550 x\\r\\n"'),
    ("data", "E451 greylisted", "E 451 greylisted: refuse the command with this text",
     "refused (no 354, DATA may be retried)", '"451 greylisted\\r\\n"'),
    ("helo", "E", "E: refuse the command with this text",
     "refused (HELO name and transaction unchanged)", '"\\r\\n"'),
    ("rcpt", "R421 bye", "R 421 bye: send this text and close the connection",
     "close (the connection ends, nothing is queued)", '"421 bye\\r\\n", then the connection closes'),
    ("mail", "D", "D: close the connection",
     "close (the connection ends, nothing is queued)", "nothing; the connection closes"),
])
def test_plugin_test_terminators(home, capsys, phase, printed, explained, verdict, client):
    entry = ":printf '%s\\nE599 never\\n'" % printed
    status, out, err = ptest(capsys, phase, entry)
    assert out == head(home, phase, entry) + [
        "output:",
        "  " + explained,
        "terminator: " + printed[0],
        "verdict: " + verdict,
        "exit status: 0",
        "client gets: " + client,
    ]
    assert status == 0


def test_plugin_test_lines_in_order_then_refusal(home, capsys):
    entry = ":printf 'P250-first\\nSA=1\\nHX-A: 1\\nE550 no\\n'"
    status, out, _ = ptest(capsys, "rcpt", entry)
    assert out[5:] == [
        "output:",
        "  P 250-first: send this line to the client now",
        "  S A=1: set A for later plugins and qmail-queue",
        "  H X-A: 1: add header line",
        "  E 550 no: refuse the command with this text",
        "terminator: E",
        "verdict: refused (recipient not added)",
        "exit status: 0",
        'client gets: "250-first\\r\\n550 no\\r\\n"',
    ]
    assert status == 0


def test_plugin_test_cr_stripped_and_last_line_without_lf(home, capsys):
    # Δ4: one CR stripped; an unterminated last line is whole
    status, out, _ = ptest(capsys, "helo", ":printf 'HX: 1\\r\\nE550 go away'")
    assert out[6:8] == ["  H X: 1: add header line", "  E 550 go away: refuse the command with this text"]
    assert out[-1] == 'client gets: "550 go away\\r\\n"'


def test_plugin_test_repeated_lines_collapse(home, capsys):
    status, out, _ = ptest(capsys, "helo", ":printf 'x\\nx\\nx\\nN\\n'")
    assert out[5:8] == ["output:", "  x: ignored (unknown command letter) (3 times)",
                        "  N: stop the section, continue"]


def test_plugin_test_exit_120(home, capsys):
    status, out, _ = ptest(capsys, "helo", ":exit 120")
    assert out == head(home, "helo", ":exit 120") + [
        "output: none",
        "terminator: none",
        "failure: can't execute (exit status 120)",
        "verdict: refused (HELO name and transaction unchanged)",
        "exit status: 120",
        'client gets: "451 qmail-spp failure: :exit 120: can\'t execute (#4.3.0)\\r\\n"',
    ]
    assert status == 1


def test_plugin_test_other_exit_status_is_ignored(home, capsys):
    # §4.5: E then exit 1 still refuses; the run did not fail
    status, out, _ = ptest(capsys, "helo", ":echo E550 via exit1; exit 1")
    assert out[-3:] == ["verdict: refused (HELO name and transaction unchanged)",
                        "exit status: 1", 'client gets: "550 via exit1\\r\\n"']
    assert status == 0


def test_plugin_test_missing_program(home, capsys):
    status, out, _ = ptest(capsys, "mail", "plugins/none")
    assert out[5:] == [
        "output: none",
        "terminator: none",
        "failure: can't execute (No such file or directory)",
        "verdict: refused (sender not accepted, previous transaction untouched)",
        "exit status: none, not started",
        'client gets: "451 qmail-spp failure: plugins/none: can\'t execute (#4.3.0)\\r\\n"',
    ]
    assert status == 1


def test_plugin_test_crash(home, capsys):
    status, out, _ = ptest(capsys, "helo", ":kill -SEGV $$")
    assert out[7:] == [
        "failure: child crashed (signal 11)",
        "verdict: refused (HELO name and transaction unchanged)",
        "exit status: none, signal 11 (SIGSEGV)",
        'client gets: "451 qmail-spp failure: :kill -SEGV $$: child crashed (#4.3.0)\\r\\n"',
    ]
    assert status == 1


def test_plugin_test_failure_after_terminator_keeps_verdict(home, capsys):
    # Δ7 (§7.5 #39)
    entry = ":echo E550 bye; kill -KILL $$"
    status, out, _ = ptest(capsys, "helo", entry)
    assert out[5:] == [
        "output:",
        "  E 550 bye: refuse the command with this text",
        "terminator: E",
        "failure: child crashed (signal 9)",
        "failure after the terminator: only logged, the verdict stands",
        "verdict: refused (HELO name and transaction unchanged)",
        "exit status: none, signal 9 (SIGKILL)",
        'client gets: "550 bye\\r\\n"',
    ]
    assert status == 1


def test_plugin_test_timeout(home, capsys, monkeypatch):
    monkeypatch.setenv("SPPTIMEOUT", "1")
    status, out, _ = ptest(capsys, "helo", ":sleep 5")
    assert out == head(home, "helo", ":sleep 5", timeout="1 s") + [
        "output: none",
        "terminator: none",
        "failure: timeout (the process group was killed after 1 s)",
        "verdict: refused (HELO name and transaction unchanged)",
        "exit status: none, signal 9 (SIGKILL, sent by qspp)",
        'client gets: "451 qmail-spp failure: :sleep 5: timeout (#4.3.0)\\r\\n"',
    ]
    assert status == 1


def test_plugin_test_output_too_long(home, capsys):
    status, out, _ = ptest(capsys, "helo", ":printf '%070000d\\n' 0")
    assert out[-4] == ("failure: output too long (a line over 65536 bytes;"
                       " the process group was killed)")
    assert status == 1


def test_plugin_test_body(home, capsys, tmp_path):
    msg = tmp_path / "msg"
    msg.write_bytes(b"Subject: spam\n\nbody\n")
    entry = ":grep -q '^Subject: spam' && echo E554 spam"
    status, out, _ = ptest(capsys, "body", entry, "--message", str(msg))
    assert out == head(home, "body", entry)[:4] + ["stdin: %s" % msg, "SPPTIMEOUT: 60 s (default)",
                                                  "output:",
                                                  "  E 554 spam: refuse the command with this text",
                                                  "terminator: E",
                                                  "verdict: refused (message discarded)",
                                                  "exit status: 0",
                                                  'client gets: "554 spam\\r\\n"']
    assert status == 0


def test_plugin_test_body_message_may_follow_assignments(home, capsys, tmp_path):
    msg = tmp_path / "msg"
    msg.write_bytes(b"a\nb\n")
    status, out, _ = ptest(capsys, "body", ':echo "HX-Lines: $(wc -l) $V"', "V=v",
                           "--message", str(msg))
    assert "  H X-Lines: 2 v: add header line (after the 354-time headers)" in out
    assert status == 0


def test_plugin_test_environment_and_cwd(home, capsys, monkeypatch):
    monkeypatch.setenv("FROM_ENV", "e")
    entry = ':echo "HX: $FROM_ENV $SMTPRCPTTO $EMPTY. $(pwd)"'
    status, out, _ = ptest(capsys, "rcpt", entry, "SMTPRCPTTO=x@example.com", "EMPTY=")
    assert "  H X: e x@example.com . %s: add header line" % home in out
    assert status == 0


def test_plugin_test_stdin_is_dev_null_outside_body(home, capsys):
    status, out, _ = ptest(capsys, "helo", ":test -c /dev/stdin && echo HX-In: null")
    assert "  H X-In: null: add header line" in out


def test_plugin_test_spptimeout_from_assignment_and_invalid(home, capsys):
    status, out, _ = ptest(capsys, "helo", ":true", "SPPTIMEOUT=soon")
    assert out[4:6] == ["SPPTIMEOUT: 60 s",
                        "warning: SPPTIMEOUT=soon is not a non-negative integer: using 60"]
    assert status == 0


# --- usage, version -----------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], "qspp: a command is required:\n  serve "),
    (["frobnicate"], "qspp: error: unknown command frobnicate: it is one of serve, check,"
                     " plugin-test, version"),
    (["plugin-test", "quit", ":true"], "qspp plugin-test: error: PHASE quit is not one of:"
                                       " connection, helo, mail, rcpt, data, auth, body"),
    (["plugin-test"], "qspp plugin-test: error: the following arguments are required:"
                      " PHASE, ENTRY\n"),
    (["plugin-test", "helo"], "qspp plugin-test: error: the following arguments are required: ENTRY"),
    (["plugin-test", "body", ":true"], "qspp plugin-test: error: the body phase needs --message FILE"),
    (["plugin-test", "--message", "m", "helo", ":true"],
     "qspp plugin-test: error: --message is for the body phase only"),
    (["plugin-test", "helo", ":true", "NOEQ"], "qspp plugin-test: error: NOEQ is not NAME=value"),
    (["plugin-test", "helo", ":true", "=v"], "qspp plugin-test: error: =v is not NAME=value"),
    (["plugin-test", "helo", "  "], "qspp plugin-test: error: ENTRY is empty"),
    (["version", "extra"], "qspp: error: unrecognized arguments: extra"),
])
def test_usage_errors_exit_2(home, capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == []
    assert err.startswith("usage: ")
    assert message in err


def test_plugin_test_unopenable_message(home, capsys, tmp_path):
    status, out, err = run(capsys, "plugin-test", "body", ":true", "--message",
                           str(tmp_path / "none"))
    assert status == 2 and out == []
    assert err == "qspp: cannot open message %s: No such file or directory\n" % (tmp_path / "none")


@pytest.mark.parametrize("argv", [["version"], ["--version"]])
def test_version(capsys, argv):
    status, out, err = run(capsys, *argv)
    assert status == 0
    assert len(out) == 1 and re.fullmatch(r"qspp (\d+\.\d+\S*|unknown)", out[0]), out
    assert out[0] == "qspp " + cli.version()


# --- qspp check and serve's start: the same home, the same findings ------------

from qspp import home as homes  # noqa: E402
from qspp.cdb import make as make_cdb  # noqa: E402


def test_home_lookup_order(tmp_path, monkeypatch):
    installed = tmp_path / "var-qmail"
    monkeypatch.setattr(homes, "QMAIL", os.fsencode(installed))
    env = {b"HOME": os.fsencode(tmp_path / "root")}
    embedded = os.fsencode(tmp_path / "root" / ".local" / "share" / "qspp")
    assert homes.find(None, env) == (embedded, homes.EMBEDDED)
    env[b"XDG_DATA_HOME"] = os.fsencode(tmp_path / "xdg")
    assert homes.find(None, env) == (os.fsencode(tmp_path / "xdg" / "qspp"), homes.EMBEDDED)
    env[b"XDG_DATA_HOME"] = b"relative"   # the XDG spec: ignored
    assert homes.find(None, env) == (embedded, homes.EMBEDDED)
    (installed / "control").mkdir(parents=True)
    # /var/qmail counts only as a qmail installation: one with control/me
    assert homes.find(None, env)[1] == homes.EMBEDDED
    (installed / "control" / "me").write_bytes(b"mx.example\n")
    assert homes.find(None, env) == (os.fsencode(installed), homes.INSTALLED)
    env[b"QMAILHOME"] = b""   # empty means unset
    assert homes.find(None, env)[1] == homes.INSTALLED
    env[b"QMAILHOME"] = b"/q"
    assert homes.find(None, env) == (b"/q", homes.ENVIRONMENT)
    assert homes.find("/opt/q", env) == (b"/opt/q", homes.OPTION)
    assert homes.find(b"/opt/q", env) == (b"/opt/q", homes.OPTION)


def test_serve_choose_home_uses_the_same_lookup(tmp_path, monkeypatch):
    from qspp import serve
    monkeypatch.setattr(homes, "QMAIL", os.fsencode(tmp_path / "none"))
    ns = serve.parse_args(["--qmailhome", str(tmp_path / "h")])
    assert serve.choose_home(ns, {}) == (os.fsencode(tmp_path / "h"), {})
    ns = serve.parse_args([])
    env = {b"QMAILHOME": os.fsencode(tmp_path / "e")}
    assert serve.choose_home(ns, env) == (os.fsencode(tmp_path / "e"), {})
    env = {b"XDG_DATA_HOME": os.fsencode(tmp_path / "xdg")}
    home, extra = serve.choose_home(ns, env)
    assert (home, homes.EMBEDDED) == homes.find(None, env)
    assert extra == {b"QMAILQUEUE": os.path.join(home, b"bin", b"qmail-queue")}


def test_check_qmailhome_option_wins(home, capsys, tmp_path):
    other = tmp_path / "other"
    (other / "control").mkdir(parents=True)
    config(home, b"")
    status, out, _ = run(capsys, "check", "--qmailhome", str(other))
    assert out[0] == "home: %s (from --qmailhome)" % other
    assert "error: control/me and control/smtpgreeting are both absent (connections get 421"\
           " unable to read controls (#4.3.0))" in out


def test_check_finds_the_embedded_home(home, capsys, monkeypatch, tmp_path):
    """No --qmailhome, no QMAILHOME, no /var/qmail: check looks where serve
    makes its embedded home, instead of failing on /var/qmail."""
    from qspp import serve
    monkeypatch.delenv("QMAILHOME")
    monkeypatch.setattr(homes, "QMAIL", os.fsencode(tmp_path / "no-var-qmail"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    embedded = tmp_path / "xdg" / "qspp"
    status, out, _ = run(capsys, "check")
    assert out == [
        "home: %s (embedded, qspp serve's own: no --qmailhome, no QMAILHOME,"
        " no /var/qmail/control/me)" % embedded,
        "note: the embedded home does not exist yet: qspp serve creates it at its first start",
        "check: 0 errors, 0 warnings, 1 note"]
    assert status == 0
    # once serve made it, check checks it, queue program included
    serve.make_embedded_home(os.fsencode(embedded))
    status, out, _ = run(capsys, "check")
    assert out[2] == "queue: %s/bin/qmail-queue (from QMAILQUEUE)" % embedded
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]
    assert status == 0


def queue_program(home, body):
    q = home / "bin" / "qmail-queue"
    q.write_bytes(body)
    q.chmod(0o755)
    return q


def test_check_queue_program_that_cannot_start(home, capsys):
    """The sample queue script with no python3 that can import qspp: it starts
    as a file but every message got 451; check used to say 0 errors."""
    queue_program(home, b'#!/bin/sh\necho "python3: No module named qspp" >&2\nexit 1\n')
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "error: bin/qmail-queue: the queue program, run as for an aborted message: exit status 1,"
        ' where qmail-queue exits 54 (messages get "451 qq temporary problem (#4.3.0)");'
        ' it said: "python3: No module named qspp"',
        "check: 1 error, 0 warnings, 0 notes"]
    assert status == 1


@pytest.mark.parametrize("body, how, reply", [
    (b"#!/bin/sh\nexec /nonexistent/python3 -m qspp.maildirqueue\n",
     "exit status 127, where qmail-queue exits 54", "451 qq temporary problem (#4.3.0)"),
    (b"#!/bin/sh\nkill -SEGV $$\n", "killed by signal 11", "451 qq crashed (#4.3.0)"),
    (b"#!/bin/sh\nexit 61\n", "exit status 61, where qmail-queue exits 54",
     "451 qq trouble in home directory (#4.3.0)"),
])
def test_check_queue_program_failures(home, capsys, body, how, reply):
    queue_program(home, body)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    (line, count) = findings(out)
    assert line.startswith("error: bin/qmail-queue: the queue program, run as for an aborted"
                           ' message: %s (messages get "%s")' % (how, reply)), line
    assert status == 1


def test_check_queue_program_hangs(home, capsys, monkeypatch):
    monkeypatch.setattr(diagnose, "PROBE_SECONDS", 0.5)
    queue_program(home, b"#!/bin/sh\nexec sleep 30\n")
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "error: bin/qmail-queue: the queue program, run as for an aborted message, still runs"
        " after 0 s (messages get 451 qq timeout at best)",
        "check: 1 error, 0 warnings, 0 notes"]


def test_check_queue_probe_queues_nothing(home, capsys, tmp_path):
    """qspp's own Maildir queue, run by the probe: exit 54, nothing delivered."""
    import sys
    src = os.path.dirname(os.path.dirname(os.path.abspath(diagnose.__file__)))
    queue_program(home, b"#!/bin/sh\nPYTHONPATH=%s exec %s -m qspp.maildirqueue\n"
                  % (os.fsencode(src), os.fsencode(sys.executable)))
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]
    assert not os.path.exists(home / "Maildir" / "new") or not os.listdir(home / "Maildir" / "new")


def test_check_queue_probe_runs_as_the_session_user(home, capsys):
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    import shutil
    import tempfile
    # pytest's tmp_path lies under a mode-0700 directory that nobody cannot enter
    base = tempfile.mkdtemp(prefix="qspp-check-")
    try:
        os.chmod(base, 0o777)
        shutil.copytree(home, base + "/home")
        ids = base + "/ids"
        queue_program(Path(base) / "home", b"#!/bin/sh\nid -u >%s; id -G >>%s\nexit 54\n"
                      % (os.fsencode(ids), os.fsencode(ids)))
        status, out, _ = run(capsys, "check", "--qmailhome", base + "/home",
                             "-u", "65534", "-g", "65533")
        with open(ids, "rb") as f:
            assert f.read() == b"65534\n65533\n"
        assert status == 0
    finally:
        shutil.rmtree(base)


def test_check_root_without_user_switch(home, capsys, monkeypatch):
    root = diagnose.Who("root", 0, 0, {0}, True, False, "this process, no user switch")
    monkeypatch.setattr(diagnose, "check_user", lambda *a: root)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[4] == "user: root (uid 0, gid 0; this process, no user switch)"
    assert findings(out) == [
        "warning: running as root without a user switch: sessions, plugins and the queue"
        " program run as root (give --user NAME, or -u UID -g GID)",
        "check: 0 errors, 1 warning, 0 notes"]
    assert status == 0
    # a switch to root asked for in so many words is not warned about
    root.switched = True
    assert findings(run(capsys, "check")[1]) == ["check: 0 errors, 0 warnings, 0 notes"]


def test_check_user_options():
    who = diagnose.check_user(uid=4242, gid=4243)
    assert (who.uid, who.gid, who.gids, who.current, who.switched) == (4242, 4243, {4243},
                                                                      False, True)
    assert who.listing() == "user: uid 4242 (uid 4242, gid 4243; the user switch given)"
    me = diagnose.check_user(name=pwd.getpwuid(os.geteuid()).pw_name)
    assert (me.uid, me.current, me.switched) == (os.geteuid(), True, True)
    with pytest.raises(diagnose.UserError) as e:
        diagnose.check_user(name="qspp-no-such-user")
    assert str(e.value) == "no such user: qspp-no-such-user"


def test_check_unknown_user_is_a_usage_error(home, capsys):
    status, out, err = run(capsys, "check", "--user", "qspp-no-such-user")
    assert (status, out, err) == (2, [], "qspp: no such user: qspp-no-such-user\n")


def test_check_servercert_others_can_read(home, capsys):
    control_file(home, "servercert.pem", CERT + KEY)
    (home / "control" / "servercert.pem").chmod(0o644)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert out[3] == CERT_LOADS
    assert findings(out) == [
        "control/servercert.pem: warning: others can read it (mode 0644), and it holds the"
        " private key: chmod o-r, and give the session user read access by owner or group",
        "check: 0 errors, 1 warning, 0 notes"]
    assert status == 0
    # a certificate alone may be public (it fails for lack of a key, a separate error)
    control_file(home, "servercert.pem", CERT)
    (home / "control" / "servercert.pem").chmod(0o644)
    _, out, _ = run(capsys, "check")
    assert not any("others can read" in line for line in out)


def test_check_servercert_session_user_cannot_read(home, capsys, monkeypatch):
    as_qmaild(monkeypatch, uid=4242, gids=(4243,))
    control_file(home, "servercert.pem", CERT + KEY)
    cert = home / "control" / "servercert.pem"
    os.chown(cert, 0, 4243) if os.geteuid() == 0 else None
    cert.chmod(0o640)   # qmaild's group may read it: the usual setup
    config(home, b"")
    status, out, _ = run(capsys, "check")
    if os.geteuid() == 0:
        assert out[3] == CERT_LOADS and status == 0
    os.chmod(cert, 0o600)
    status, out, _ = run(capsys, "check")
    st = os.stat(cert)
    assert findings(out) == [
        "control/servercert.pem: error: does not load: qmaild cannot read it (mode 0600,"
        " owner %d:%d) (STARTTLS gets 454 TLS missing certificate)" % (st.st_uid, st.st_gid),
        "check: 1 error, 0 warnings, 0 notes"]
    assert status == 1


FORCETLS_NOTE = ("note: FORCETLS is not set: in AUTH mode, LOGIN and PLAIN are offered and"
                 " accepted before STARTTLS (FORCETLS=1, per client in the rules, requires TLS"
                 " for AUTH)")


def test_check_tls_home_without_forcetls(home, capsys, monkeypatch, tmp_path):
    control_file(home, "servercert.pem", CERT + KEY)
    config(home, b"")
    for value in (None, "", "0"):
        if value is None:
            monkeypatch.delenv("FORCETLS")
        else:
            monkeypatch.setenv("FORCETLS", value)
        status, out, _ = run(capsys, "check")
        assert findings(out) == [FORCETLS_NOTE, "check: 0 errors, 0 warnings, 1 note"], value
        assert status == 0
    # set per client in the rules checked along: no note
    rules = tmp_path / "rules.cdb"
    make_cdb(rules, list({b"127.0.0.1": b"+RELAYCLIENT=\0", b"": b"+FORCETLS=1\0"}.items()))
    status, out, _ = run(capsys, "check", "-x", str(rules))
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]
    make_cdb(rules, list({b"": b"+FORCETLS=0\0"}.items()))
    assert FORCETLS_NOTE in run(capsys, "check", "-x", str(rules))[1]
    monkeypatch.setenv("FORCETLS", "yes")
    assert findings(run(capsys, "check")[1]) == ["check: 0 errors, 0 warnings, 0 notes"]
    # no certificate, no TLS: nothing to say
    (home / "control" / "servercert.pem").unlink()
    monkeypatch.delenv("FORCETLS")
    assert findings(run(capsys, "check")[1]) == ["check: 0 errors, 0 warnings, 0 notes"]


def test_check_rules_file(home, capsys, monkeypatch, tmp_path):
    config(home, b"")
    rules = tmp_path / "rules.cdb"
    make_cdb(rules, list({b"": b""}.items()))
    status, out, _ = run(capsys, "check", "-x", str(rules))
    assert out[4:6] == ["rules: %s" % rules, user_line()]
    assert findings(out) == ["check: 0 errors, 0 warnings, 0 notes"]
    # relative to where check was started, not to the home
    monkeypatch.chdir(tmp_path)
    _, out, _ = run(capsys, "check", "--rules", "rules.cdb")
    assert out[4] == "rules: %s" % rules
    rules.write_bytes(b"junk")
    status, out, _ = run(capsys, "check", "-x", str(rules))
    assert findings(out) == [
        "%s: error: cannot be used: 4 bytes: too short for a cdb (qspp serve does not start"
        " with it)" % rules,
        "check: 1 error, 0 warnings, 0 notes"]
    assert status == 1
    status, out, _ = run(capsys, "check", "-x", str(tmp_path / "none.cdb"))
    assert findings(out) == [
        "%s: error: cannot be used: No such file or directory (qspp serve does not start"
        " with it)" % (tmp_path / "none.cdb"),
        "check: 1 error, 0 warnings, 0 notes"]


def test_check_rules_the_session_user_cannot_read(home, capsys, monkeypatch, tmp_path):
    as_qmaild(monkeypatch)
    config(home, b"")
    rules = tmp_path / "rules.cdb"
    make_cdb(rules, list({b"": b""}.items()))
    rules.chmod(0o600)
    st = os.stat(rules)
    status, out, _ = run(capsys, "check", "-x", str(rules))
    assert findings(out) == [
        "%s: warning: qmaild cannot read it (mode 0600, owner %d:%d): changes to the rules never"
        " take effect (qspp serve keeps the rules of its start; tcpserver -x drops every"
        " connection)" % (rules, st.st_uid, st.st_gid),
        "check: 0 errors, 1 warning, 0 notes"]
    assert status == 0
    rules.chmod(0o644)
    assert findings(run(capsys, "check", "-x", str(rules))[1]) == [
        "check: 0 errors, 0 warnings, 0 notes"]


def test_check_control_file_the_session_user_cannot_read(home, capsys, monkeypatch):
    as_qmaild(monkeypatch)
    (home / "control" / "rcpthosts").chmod(0o600)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    assert findings(out) == [
        "error: unable to read control/rcpthosts: qmaild cannot read it (mode 0600, owner %d:%d)"
        " (connections get 421 unable to read controls (#4.3.0))"
        % (os.stat(home / "control" / "rcpthosts").st_uid,
           os.stat(home / "control" / "rcpthosts").st_gid),
        "check: 1 error, 0 warnings, 0 notes"]
    assert status == 1


def test_check_home_the_session_user_cannot_enter(home, capsys, monkeypatch):
    as_qmaild(monkeypatch)
    home.chmod(0o700)
    try:
        status, out, _ = run(capsys, "check")
    finally:
        home.chmod(0o755)
    st = os.stat(home)
    assert out[2:] == [
        "error: cannot chdir to %s: qmaild cannot enter it (mode 0700, owner %d:%d)"
        " (connections get 421 unable to read controls (#4.3.0))" % (home, st.st_uid, st.st_gid),
        "check: 1 error, 0 warnings, 0 notes"]
    assert status == 1


def startup(home, env=None, rules=None, switched=True):
    env = dict(os.environb if env is None else env)
    return diagnose.startup_lines(os.fsencode(home), env, rules, switched)


def test_serve_start_lines_are_checks_findings(home, capsys, monkeypatch, tmp_path):
    """A broken home: serve's start-up lines are check's errors and warnings,
    word for word, and the cwd is left where it was."""
    (home / "control" / "me").unlink()
    (home / "control" / "rcpthosts").write_bytes(b"")
    queue_program(home, b"#!/bin/sh\nexit 1\n")
    control_file(home, "servercert.pem", CERT + KEY)
    (home / "control" / "servercert.pem").chmod(0o644)
    config(home, b"")
    status, out, _ = run(capsys, "check")
    checked = [line for line in findings(out)[:-1] if ": note: " not in line
               and not line.startswith("note: ")]
    monkeypatch.chdir(tmp_path)
    lines = startup(home)
    assert os.getcwd() == str(tmp_path)
    assert lines == checked
    assert lines == [
        "error: control/me and control/smtpgreeting are both absent (connections get 421 unable"
        " to read controls (#4.3.0))",
        "control/rcpthosts: warning: lists no domain: every recipient address with an @ is"
        " refused (553) unless RELAYCLIENT is set",
        "error: bin/qmail-queue: the queue program, run as for an aborted message: exit status 1,"
        ' where qmail-queue exits 54 (messages get "451 qq temporary problem (#4.3.0)")',
        "control/servercert.pem: warning: others can read it (mode 0644), and it holds the"
        " private key: chmod o-r, and give the session user read access by owner or group",
    ]


def test_serve_start_lines_root_and_rcpthosts(home, monkeypatch):
    (home / "control" / "rcpthosts").unlink()
    config(home, b"")
    lines = startup(home, switched=False)
    expected = ["control/rcpthosts: warning: absent: every recipient domain is accepted"
                " (open relay)"]
    if os.geteuid() == 0:
        expected.insert(0, "warning: " + diagnose.ROOT_WARNING)
    assert lines == expected
    assert startup(home, switched=True) == expected[-1:]


def test_serve_start_lines_home_missing(tmp_path):
    assert startup(tmp_path / "none") == [
        "error: cannot chdir to %s: No such file or directory (connections get 421 unable to"
        " read controls (#4.3.0))" % (tmp_path / "none")]


def test_serve_logs_each_start_line(home, monkeypatch, capfd):
    (home / "control" / "rcpthosts").unlink()
    config(home, b"")
    diagnose.log_startup(os.fsencode(home), dict(os.environb), None, True)
    err = capfd.readouterr().err
    assert err == ("qspp: pid %d: serve: control/rcpthosts: warning: absent: every recipient"
                   " domain is accepted (open relay)\n" % os.getpid())


# --- usage and error texts ---------------------------------------------------

def test_help_lists_every_command(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    k = out.index("commands:")
    assert out[k + 1:k + 5] == [
        "  serve        listen for SMTP clients: tcpserver and qmail-smtpd in one",
        "  check        check the home as connections meet it, and the plugin config",
        "  plugin-test  run one plugin entry once and explain its output",
        "  version      print the version",
    ]
    status, out, err = run(capsys)
    assert status == 2 and out == []
    assert err.splitlines()[1:] == ["qspp: a command is required:"] + [
        line for line in cli._commands().splitlines()]


def test_plugin_test_usage_line(capsys):
    status, out, _ = run(capsys, "plugin-test", "--help")
    assert status == 0
    assert out[0] == ("usage: qspp plugin-test [-h] [--qmailhome DIR] [--message FILE] PHASE"
                      " ENTRY [NAME=value ...]")
    status, out, _ = run(capsys, "check", "--help")
    assert out[0] == ("usage: qspp check [-h] [--qmailhome DIR] [-x FILE.cdb]"
                      " [--user NAME | -u UID [-g GID]] [--] [SMTPD-ARGS ...]")


def test_plugin_test_qmailhome(home, capsys, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    status, out, _ = ptest(capsys, "--qmailhome", str(other), "helo", ":pwd -P; echo N")
    assert "cwd: %s" % other in out
    assert '  %s: ignored (unknown command letter)' % os.path.realpath(other) in out


@pytest.mark.parametrize("argv", [
    ["check", "--qmailhome", "/nonexistent"],
    ["check", "-x", "/nonexistent/rules.cdb"],
    ["check", "--user", "nobody-at-all"],
    ["check", "-u", "x"],
    ["plugin-test", "body", ":true", "--message", "/nonexistent"],
    ["plugin-test", "--qmailhome", "/nonexistent", "helo", ":true"],
    ["plugin-test", "nophase", ":true"],
    ["nonsense"],
])
def test_no_python_reprs_in_messages(home, capsys, argv):
    status, out, err = run(capsys, *argv)
    text = "\n".join(out) + err
    for bad in ("b'", 'b"', "Errno", "Traceback", "'nonsense'", "('", "')"):
        assert bad not in text, (bad, text)


def test_os_error_text():
    from qspp.show import os_error
    e = PermissionError(13, "Permission denied", b"/nonexistent")
    assert os_error(e) == "/nonexistent: Permission denied"
    assert os_error(OSError(5, "Input/output error")) == "Input/output error"
    assert os_error(e, b"/x\n") == "/x\\n: Permission denied"


def test_main_turns_an_os_error_into_one_line(capsys, monkeypatch):
    def boom(*a):
        raise PermissionError(13, "Permission denied", b"/nonexistent")
    monkeypatch.setattr(cli, "_check", boom)
    status, out, err = run(capsys, "check")
    assert (status, out, err) == (1, [], "qspp: /nonexistent: Permission denied\n")


# --- policy: entries in check and plugin-test ------------------------------------

import socket  # noqa: E402
import threading  # noqa: E402


class PolicyServer:
    """A one-connection Postfix policy server on 127.0.0.1 that answers every
    request with ACTION; requests() returns what it was asked."""

    def __init__(self, action):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.action = action
        self.asked = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        self.sock.settimeout(10)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            buf = b""
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n\n" in buf:
                    req, buf = buf.split(b"\n\n", 1)
                    self.asked.append(req)
                    conn.sendall(b"action=" + self.action + b"\n\n")

    def close(self):
        self.sock.close()
        self.thread.join(10)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_check_policy_entries(home, capsys):
    server = PolicyServer(b"DUNNO")
    dead = free_port()
    try:
        config(home, b"[mail]\npolicy:inet:127.0.0.1:%d\npolicy:inet:127.0.0.1:%d\n"
               b"policy:inet:127.0.0.1:%d default=DUNNO\n" % (server.port, dead, dead))
        status, out, _ = run(capsys, "check")
    finally:
        server.close()
    assert out[PRE:PRE + 5] == [
        "config: control/smtpplugins",
        "[mail]",
        "  line 2: policy:inet:127.0.0.1:%d -> policy server inet:127.0.0.1:%d: connected"
        % (server.port, server.port),
        "  line 3: policy:inet:127.0.0.1:%d -> policy server inet:127.0.0.1:%d: failed: can't"
        " connect (Connection refused)" % (dead, dead),
        "  line 4: policy:inet:127.0.0.1:%d default=DUNNO -> policy server inet:127.0.0.1:%d:"
        " failed: can't connect (Connection refused)" % (dead, dead),
    ]
    assert findings(out) == [
        "control/smtpplugins:3: error: policy:inet:127.0.0.1:%d: can't connect (Connection"
        ' refused) (every run fails: "451 qmail-spp failure: policy:inet:127.0.0.1:%d:'
        ' can\'t connect (#4.3.0)")' % (dead, dead),
        "control/smtpplugins:4: warning: policy:inet:127.0.0.1:%d default=DUNNO: can't connect"
        " (Connection refused) (every run takes default=DUNNO)" % dead,
        "check: 1 error, 1 warning, 0 notes"]
    assert status == 1
    # the probe connected and asked nothing
    assert server.asked == []


def test_plugin_test_policy_entry(home, capsys):
    server = PolicyServer(b"REJECT not here")
    try:
        status, out, _ = ptest(capsys, "mail", "policy:inet:127.0.0.1:%d" % server.port,
                               "SMTPMAILFROM=a@b.example")
    finally:
        server.close()
    assert out == [
        "phase: mail",
        "entry: policy:inet:127.0.0.1:%d" % server.port,
        "server: inet:127.0.0.1:%d" % server.port,
        "SPPTIMEOUT: 60 s (default)",
        "answer: action=REJECT not here",
        "action: REJECT: refuse the command",
        "verdict: refused (sender not accepted, previous transaction untouched)",
        'client gets: "554 5.7.1 <a@b.example>: Sender address rejected: not here\\r\\n"',
    ]
    assert status == 0
    (request,) = server.asked
    attrs = request.split(b"\n")
    assert b"protocol_state=MAIL" in attrs and b"sender=a@b.example" in attrs


def asked_attrs(capsys, phase, *assignments, action=b"DUNNO"):
    """The attributes of the one request plugin-test sends for PHASE."""
    server = PolicyServer(action)
    try:
        status, out, _ = ptest(capsys, phase, "policy:inet:127.0.0.1:%d" % server.port,
                               *assignments)
    finally:
        server.close()
    (request,) = server.asked
    return out, dict(line.split(b"=", 1) for line in request.split(b"\n"))


SESSION = ("SMTPHELOHOST=client.example", "SMTPAUTHUSER=joe", "SMTPAUTHMETHOD=plain",
           "TCPREMOTEIP=192.0.2.7", "SMTPMAILFROM=a@b.example", "SMTPRCPTTO=x@example.org")


def test_plugin_test_policy_request_takes_the_assignments(home, capsys):
    # As a session in that phase would send them (issue: they were empty).
    out, rcpt = asked_attrs(capsys, "rcpt", *SESSION, action=b"REJECT no")
    assert (rcpt[b"protocol_state"], rcpt[b"sender"], rcpt[b"recipient"], rcpt[b"helo_name"],
            rcpt[b"sasl_username"], rcpt[b"sasl_method"], rcpt[b"client_address"],
            rcpt[b"recipient_count"]) == (b"RCPT", b"a@b.example", b"x@example.org",
                                          b"client.example", b"joe", b"plain", b"192.0.2.7",
                                          b"0")
    assert rcpt[b"instance"] != b""
    assert out[-1] == 'client gets: "554 5.7.1 <x@example.org>: Recipient address rejected: no\\r\\n"'
    # the recipients accepted so far: one, so DATA names it
    _, data = asked_attrs(capsys, "data", *SESSION, "SMTPRCPTCOUNT=1")
    assert (data[b"protocol_state"], data[b"sender"], data[b"recipient"],
            data[b"recipient_count"]) == (b"DATA", b"a@b.example", b"x@example.org", b"1")
    _, data = asked_attrs(capsys, "data", *SESSION, "SMTPRCPTCOUNT=2")
    assert (data[b"recipient"], data[b"recipient_count"]) == (b"", b"2")
    # [mail] reports the sender, not a recipient; [helo] neither
    _, mail = asked_attrs(capsys, "mail", *SESSION)
    assert (mail[b"sender"], mail[b"recipient"]) == (b"a@b.example", b"")
    _, helo = asked_attrs(capsys, "helo", *SESSION)
    assert (helo[b"sender"], helo[b"recipient"], helo[b"instance"]) == (b"", b"", b"")


def test_plugin_test_policy_request_body(home, capsys, tmp_path):
    msg = tmp_path / "msg"
    msg.write_bytes(b"Subject: x\n\nhello\n")
    _, body = asked_attrs(capsys, "body", *SESSION, "SMTPRCPTCOUNT=1", "--message", str(msg))
    assert (body[b"protocol_state"], body[b"sender"], body[b"recipient"],
            body[b"recipient_count"], body[b"size"]) == (
        b"END-OF-MESSAGE", b"a@b.example", b"x@example.org", b"1", b"18")


def test_plugin_test_policy_entry_down(home, capsys):
    dead = free_port()
    status, out, err = ptest(capsys, "rcpt", "policy:inet:127.0.0.1:%d" % dead)
    assert out[4:] == [
        "failure: can't connect (Connection refused)",
        "verdict: refused (recipient not added)",
        "client gets: \"451 qmail-spp failure: policy:inet:127.0.0.1:%d: can't connect"
        ' (#4.3.0)\\r\\n"' % dead,
    ]
    assert status == 1
    status, out, err = ptest(capsys, "rcpt", "policy:inet:127.0.0.1:%d default=DUNNO" % dead)
    assert out[4:] == [
        "failure: can't connect (Connection refused)",
        "default: DUNNO (taken as the answer)",
        "action: DUNNO: continue",
        "verdict: continue (rcpthosts check, then 250 ok); the next entry of the section would"
        " run first",
        "client gets: (qmail's normal reply)",
    ]
    assert status == 0


# --- milters in check ------------------------------------------------------------

import time  # noqa: E402

try:
    from .test_milter_fake import FakeMilter  # noqa: E402
except ImportError:
    from test_milter_fake import FakeMilter  # noqa: E402

TEMPFAIL_ERROR = ('(default=tempfail: every connection gets "451 4.7.1 Service unavailable - try'
                  ' again later" from its first HELO, EHLO or MAIL on)')
MILTER_LINE = PRE - 1


def milters(home, data, name="smtpmilters"):
    (home / "control" / name).write_bytes(data)


@pytest.fixture
def fake(tmp_path, request):
    """FakeMilter(tmp_path / NAME, **kw), each stopped at the end of the test."""
    def make(name, **kw):
        m = FakeMilter(tmp_path / name, **kw)
        request.addfinalizer(m.stop)
        return m
    return make


def at(m):
    return b"unix:" + m.path.encode()


def test_check_milters(home, capsys, tmp_path, fake):
    good = fake("good.sock", version=6, protocol=0x10)
    old = fake("old.sock", version=1)
    silent = fake("silent.sock", negotiation=b"")
    gone = tmp_path / "gone.sock"
    dead = free_port()
    milters(home, b"%s\n%s timeout=3\n%s timeout=1 default=reject\nunix:%s default=accept\n"
            b"inet:127.0.0.1:%d\n" % (at(good), at(old), at(silent), bytes(gone), dead))
    started = time.monotonic()
    status, out, err = run(capsys, "check")
    took = time.monotonic() - started
    assert out[MILTER_LINE:MILTER_LINE + 7] == [
        "milters: control/smtpmilters",
        "  unix:%s (timeout 30 s, default=tempfail): protocol version 6, actions 0x1ff,"
        " steps 0x10" % good.path,
        "  unix:%s (timeout 3 s, default=tempfail): failed: unsupported protocol version 1"
        % old.path,
        "  unix:%s (timeout 1 s, default=reject): failed: timeout" % silent.path,
        "  unix:%s (timeout 30 s, default=accept): failed: cannot connect: No such file or"
        " directory" % gone,
        "  inet:127.0.0.1:%d (timeout 30 s, default=tempfail): failed: cannot connect:"
        " Connection refused" % dead,
        "config: control/smtpplugins (missing)",
    ]
    assert findings(out) == [
        "control/smtpmilters: error: milter unix:%s: unsupported protocol version 1 %s"
        % (old.path, TEMPFAIL_ERROR),
        "control/smtpmilters: error: milter unix:%s: timeout (default=reject: every connection"
        ' gets "550 5.7.1 Command rejected" from its first HELO, EHLO or MAIL on)' % silent.path,
        "control/smtpmilters: warning: milter unix:%s: cannot connect: No such file or directory"
        " (default=accept: mail passes it unfiltered)" % gone,
        "control/smtpmilters: error: milter inet:127.0.0.1:%d: cannot connect: Connection"
        " refused %s" % (dead, TEMPFAIL_ERROR),
        "note: control/smtpplugins does not exist: no plugins",
        "check: 3 errors, 1 warning, 1 note",
    ]
    assert status == 1
    assert err == ""
    # the silent one's own timeout bounds the wait
    assert 1 <= took < 10
    # each milter was negotiated with and told goodbye, nothing else
    for m in (good, old):
        assert all(c.closed.wait(5) for c in m.conversations)
        assert [c.cmds() for c in m.conversations] == [b"OQ"]


def test_check_milters_all_well(home, capsys, fake):
    m = fake("m.sock", version=2, protocol=0x7F)
    milters(home, b"# the signer\n\n%s timeout=5\n" % at(m))
    status, out, _ = run(capsys, "check")
    assert out[MILTER_LINE:MILTER_LINE + 2] == [
        "milters: control/smtpmilters",
        "  unix:%s (timeout 5 s, default=tempfail): protocol version 2, actions 0x1ff,"
        " steps 0x7f" % m.path,
    ]
    assert out[-1] == "check: 0 errors, 0 warnings, 1 note"
    assert status == 0


def test_check_nomilter(home, capsys, monkeypatch, fake):
    m = fake("m.sock")
    milters(home, at(m) + b"\n")
    monkeypatch.setenv("NOMILTER", "")
    status, out, _ = run(capsys, "check")
    assert out[MILTER_LINE] == "milters: none: NOMILTER is set, no milter list is read"
    assert out[MILTER_LINE + 1].startswith("config: ")
    assert m.conversations == []
    assert status == 0


def test_check_milters_file(home, capsys, monkeypatch, fake):
    m = fake("m.sock")
    milters(home, at(m) + b"\n", name="milters.special")
    milters(home, b"inet:127.0.0.1:%d\n" % free_port())
    monkeypatch.setenv("MILTERS", "control/milters.special")
    status, out, _ = run(capsys, "check")
    assert out[MILTER_LINE:MILTER_LINE + 3] == [
        "milters: control/milters.special (from MILTERS)",
        "  unix:%s (timeout 30 s, default=tempfail): protocol version 6, actions 0x1ff,"
        " steps 0x0" % m.path,
        "config: control/smtpplugins (missing)",
    ]
    assert status == 0
    # a MILTERS file that is not there fails every connection, as an SPPCONFFILE does
    monkeypatch.setenv("MILTERS", "control/nosuch")
    status, out, _ = run(capsys, "check")
    assert out[MILTER_LINE] == "milters: control/nosuch (from MILTERS) (unusable)"
    assert findings(out)[0] == ("error: unable to read control/nosuch: No such file or directory"
                                " (connections get 421 unable to read controls (#4.3.0))")
    assert status == 1


@pytest.mark.parametrize("data, why", [
    (b"unix:/x timeout=soon\n", "bad milter option: timeout=soon"),
    (b"tcp:127.0.0.1:25\n", "bad milter address (inet: or unix:): tcp:127.0.0.1:25"),
    (b"inet:127.0.0.1\n", "bad milter address (inet:HOST:PORT): inet:127.0.0.1"),
])
def test_check_bad_milter_list(home, capsys, data, why):
    milters(home, data)
    status, out, _ = run(capsys, "check")
    assert out[MILTER_LINE] == "milters: control/smtpmilters (unusable)"
    assert findings(out)[0] == ("error: control/smtpmilters: %s (connections get 421 unable to"
                                " read controls (#4.3.0))" % why)
    assert status == 1


def test_check_empty_milter_list(home, capsys):
    milters(home, b"# none yet\n\n")
    status, out, _ = run(capsys, "check")
    assert out[MILTER_LINE] == "milters: none (no entries in control/smtpmilters)"
    assert status == 0


def test_check_unreadable_milter_list(home, capsys):
    (home / "control" / "smtpmilters").mkdir()
    status, out, _ = run(capsys, "check")
    assert findings(out)[0] == ("error: unable to read control/smtpmilters: Is a directory"
                                " (connections get 421 unable to read controls (#4.3.0))")
    assert status == 1


# --- check's probes are bounded however long the entries' timeouts -----------------

@pytest.fixture
def syn_dropping_port():
    """A 127.0.0.1 port whose full listen queue makes the kernel drop new SYNs
    silently, as a firewalled host does: a connect there just waits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        # full once two connects in a row wait: on a loaded machine one
        # timeout alone may be the scheduler, with room left in the queue
        waited = 0
        for _ in range(16):
            s = socket.socket()
            fillers.append(s)
            s.settimeout(0.3)
            try:
                s.connect(listener.getsockname())
                waited = 0
            except TimeoutError:
                waited += 1
                if waited == 2:
                    break
        else:
            pytest.fail("the listen queue never filled")
        yield listener.getsockname()[1]
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_check_milter_probe_capped(home, capsys, fake, monkeypatch, syn_dropping_port):
    from qspp import milter
    # 1 s stands for the 5 s cap; the entries wait 30 s by default
    monkeypatch.setattr(milter, "CHECK_SECONDS", 1, raising=False)
    silent = fake("silent.sock", negotiation=b"")
    milters(home, b"inet:127.0.0.1:%d\n%s\n" % (syn_dropping_port, at(silent)))
    started = time.monotonic()
    status, out, _ = run(capsys, "check")
    took = time.monotonic() - started
    # now and then the kernel still completes a handshake on the full queue
    # (a filler's retransmitted SYN frees a slot); the probe then waits out
    # the negotiation instead of the connect, under the same cap
    inet, unix = out[MILTER_LINE + 1:MILTER_LINE + 3]
    assert inet in ["  inet:127.0.0.1:%d (timeout 30 s, default=tempfail): failed: %s"
                    % (syn_dropping_port, why) for why in ("connect timeout", "timeout")]
    assert unix == "  unix:%s (timeout 30 s, default=tempfail): failed: timeout" % silent.path
    assert 2 <= took < 5


def test_check_milter_probe_total_is_capped(fake, monkeypatch):
    # connect and negotiation share one bound: a milter that answers nothing
    # after a slow connect does not get the cap twice
    from qspp import milter
    monkeypatch.setattr(milter, "CHECK_SECONDS", 1, raising=False)
    opened = milter.Link.open

    def slow_open(link):
        opened(link)
        time.sleep(0.8)
    monkeypatch.setattr(milter.Link, "open", slow_open)
    silent = fake("silent.sock", negotiation=b"")
    with open(silent.path + ".list", "wb") as f:
        f.write(at(silent) + b" timeout=30\n")
    started = time.monotonic()
    results = milter.check({b"MILTERS": (silent.path + ".list").encode()})
    took = time.monotonic() - started
    assert results == [(at(silent), False, "timeout")]
    assert took < 1.5


def test_check_policy_probe_capped(home, capsys, monkeypatch):
    """The probe's connect gets PROBE_SECONDS however long the entry's timeout=.
    A connect that waits until its deadline stands in for a host that drops the
    SYNs: the kernel's full-queue drop let a connect through now and then on a
    loaded machine."""
    from qspp import inet, policy
    monkeypatch.setattr(policy, "PROBE_SECONDS", 1, raising=False)

    def waits_out(targets, deadline):
        time.sleep(30 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic())))
        raise TimeoutError()
    monkeypatch.setattr(inet, "connect", waits_out)
    port = 9  # never reached: connect is the stand-in above
    config(home, b"[rcpt]\npolicy:inet:127.0.0.1:%d timeout=30\n" % port)
    started = time.monotonic()
    status, out, _ = run(capsys, "check")
    took = time.monotonic() - started
    assert out[PRE + 2] == ("  line 2: policy:inet:127.0.0.1:%d timeout=30 -> policy server"
                            " inet:127.0.0.1:%d: failed: timeout (connecting)" % (port, port))
    assert took < 3
