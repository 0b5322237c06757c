"""The man pages in man/ (issue 11): mandoc -T lint finds nothing above style
level, man -l renders them without a groff warning, and they document what
the programs actually accept."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "man"
PAGES = ["qspp.8", "qspp-smtpd.8", "qspp-smtpplugins.5", "qspp-swap.8"]
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}


def need(tool):
    if shutil.which(tool, path=ENV["PATH"]) is None:
        if os.environ.get("CI"):
            pytest.fail("%s is needed in CI" % tool)
        pytest.skip("%s is not installed" % tool)


def rendered(page):
    """The page as man shows it, so wide that no line is broken or hyphenated."""
    need("man")
    r = subprocess.run(["man", "-l", str(MAN / page)], capture_output=True,
                       env=dict(ENV, MANWIDTH="1000"), timeout=60)
    assert r.returncode == 0, r.stderr
    # man(1) shows bold and underline with backspaces when not on a tty
    return re.sub(r".\x08", "", r.stdout.decode("utf-8"))


def flat(text):
    return " ".join(text.split())


def test_the_set_of_pages():
    assert sorted(p.name for p in MAN.iterdir()) == sorted(PAGES)
    assert sorted((REPO / "debian" / "qspp.manpages").read_text().split()) == sorted(
        "man/" + p for p in PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_finds_nothing_above_style(page):
    need("mandoc")
    r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(MAN / page)],
                       capture_output=True, env=ENV, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_mandoc_lint_can_fail(tmp_path):
    need("mandoc")
    bad = tmp_path / "bad.8"
    bad.write_text(".TH BAD 8\n.SH NAME\nbad \\- x\n.BI\n.RS\n")
    r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(bad)],
                       capture_output=True, env=ENV, timeout=60)
    assert r.returncode != 0 and b"WARNING" in r.stdout + r.stderr


@pytest.mark.parametrize("page", PAGES)
def test_man_renders_without_groff_warnings(page):
    need("man")
    r = subprocess.run(["man", "--warnings", "-l", str(MAN / page)], capture_output=True,
                       env=ENV, timeout=60)
    assert (r.returncode, r.stderr) == (0, b"")
    name, section = page.rsplit(".", 1)
    head = re.sub(r".\x08", "", r.stdout.decode("utf-8")).splitlines()[0]
    assert head.startswith("%s(%s)" % (name.upper(), section))


def help_options(*command):
    r = subprocess.run([sys.executable, "-m", "qspp"] + list(command) + ["--help"],
                       capture_output=True, timeout=60,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", r.stdout.decode()))


def test_qspp_8_documents_every_option():
    text = rendered("qspp.8")
    for section in ("qspp serve", "qspp check", "qspp plugin-test", "qspp version"):
        assert "\n   %s\n" % section in text, section
    for option in help_options("serve") | help_options("check") | help_options("plugin-test"):
        if option not in ("-h", "--help"):
            assert option in text, option
    # options being added by the serve and check work (issue 11)
    for option in ("--per-ip n", "--max-session-time seconds", "--qmailhome dir",
                   "-x file.cdb"):
        assert option in text, option
    assert "It stays in the foreground; stop it with SIGTERM (or Ctrl-C)." in flat(text)


def test_qspp_smtpd_8_documents_environment_control_files_exit_codes_auth():
    text = rendered("qspp-smtpd.8")
    for name in ("TCPREMOTEIP", "TCPREMOTEHOST", "TCPREMOTEINFO", "TCPLOCALHOST",
                 "RELAYCLIENT", "DATABYTES", "QMAILHOME", "QMAILQUEUE", "SMTPAUTH",
                 "TLSCIPHERS", "FORCETLS", "NOSPP", "SPPCONFFILE", "SPPTIMEOUT", "SPPLOG"):
        assert re.search(r"^       %s\b" % name, text, re.M), name
    for name in ("me", "smtpgreeting", "localiphost", "timeoutsmtpd", "rcpthosts",
                 "morercpthosts.cdb", "badmailfrom", "databytes", "smtpplugins",
                 "servercert.pem", "tlsserverciphers"):
        assert "\n       control/%s\n" % name in text, name
    assert ("AUTH command gets 538 5.7.11 Encryption required for requested authentication"
            " mechanism before any credential is sent" in flat(text))
    assert "\nEXIT STATUS\n" in text and "\nARGUMENTS\n" in text
    for d in range(1, 9):
        assert "\n       D%d\n" % d in text or "\n       D%d " % d in text


def test_qspp_smtpplugins_5_documents_the_interface():
    text = rendered("qspp-smtpplugins.5")
    for section in ("connection", "helo", "mail", "rcpt", "data", "auth", "body"):
        assert "[%s]" % section in text, section
    for command in ("A", "N", "O", "Etext", "Rtext", "D", "LMtext", "LRtext", "LDtext",
                    "Sname=value", "Uname", "Htext", "Caddress", "Ptext"):
        assert re.search(r"^       %s\b" % re.escape(command), text, re.M), command
    for name in ("SMTPHELOHOST", "SMTPMAILFROM", "SMTPRCPTTO", "SMTPRCPTCOUNT",
                 "SMTPRCPTCOUNTALL", "SMTPRCPTHOSTSOK", "SMTPAUTHUSER", "SPPTIMEOUT"):
        assert name in text, name
    assert "451 qmail-spp failure: entry: what (#4.3.0)" in flat(text)
