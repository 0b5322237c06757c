"""`python -m qspp.cli` as a process: exit statuses, stdout/stderr split, the
engine's log line on the real fd 2. The output itself is covered in
tests/unit/test_cli.py."""

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def qhome(tmp_path):
    h = tmp_path / "qhome"
    (h / "control").mkdir(parents=True)
    (h / "control" / "me").write_bytes(b"test.example\n")
    (h / "control" / "rcpthosts").write_bytes(b"example.com\n")
    (h / "bin").mkdir()
    (h / "bin" / "qmail-queue").write_bytes(b"#!/bin/sh\nexit 0\n")
    (h / "bin" / "qmail-queue").chmod(0o755)
    return h


def qspp(qhome, *args, **env):
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC),
         "QMAILHOME": str(qhome)}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "qspp.cli"] + list(args), env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)


def test_version_process(qhome):
    p = qspp(qhome, "--version")
    assert p.returncode == 0
    assert p.stdout.startswith(b"qspp ") and p.stdout.endswith(b"\n")
    assert p.stderr == b""


# sessions run as this very user: no root warning when the tests run as root
ME = pwd.getpwuid(os.geteuid()).pw_name


def test_check_process_exit_status(qhome):
    (qhome / "control" / "smtpplugins").write_bytes(b"[helo]\nplugins/none\n")
    p = qspp(qhome, "check", "--user", ME)
    assert p.returncode == 1
    assert b"control/smtpplugins:2: error: plugins/none: no such file\n" in p.stdout
    assert p.stderr == b""
    (qhome / "control" / "smtpplugins").write_bytes(b"[helo]\n:echo N\n")
    assert qspp(qhome, "check", "--user", ME).returncode == 0
    # warnings alone leave the status 0
    (qhome / "control" / "rcpthosts").unlink()
    p = qspp(qhome, "check", "--user", ME)
    assert p.returncode == 0
    assert p.stdout.endswith(b"\ncheck: 0 errors, 1 warning, 0 notes\n")
    # a certificate that does not load is an error
    (qhome / "control" / "servercert.pem").write_bytes(b"junk\n")
    p = qspp(qhome, "check", "--user", ME, FORCETLS="1")
    assert p.returncode == 1
    assert b"\ncontrol/servercert.pem: error: does not load: " in p.stdout
    assert p.stdout.endswith(b"\ncheck: 1 error, 1 warning, 0 notes\n")


def test_plugin_test_process(qhome):
    p = qspp(qhome, "plugin-test", "helo", ":exit 120")
    assert p.returncode == 1
    assert (b'client gets: "451 qmail-spp failure: :exit 120: can\'t execute (#4.3.0)\\r\\n"\n'
            in p.stdout)
    # the line a connection would log, in the common stderr form
    assert p.stderr.startswith(b"qspp: pid ")
    assert p.stderr.count(b"\n") == 1
    p = qspp(qhome, "plugin-test", "rcpt", ":echo O", SPPTIMEOUT="2")
    assert p.returncode == 0
    assert b"verdict: override (accept: rcpthosts check skipped)\n" in p.stdout


def test_usage_error_process(qhome):
    p = qspp(qhome, "nonsense")
    assert p.returncode == 2
    assert p.stdout == b""
    assert p.stderr == (b"usage: qspp [-h] [--version] COMMAND [ARGS ...]\n"
                        b"qspp: error: unknown command nonsense: it is one of serve, check,"
                        b" plugin-test, version\n")
