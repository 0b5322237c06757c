"""scripts/soak in CI: a small load, no message lost or duplicated (issue 6).

The full figure (10,000 messages at concurrency 16) is run by hand; here 200 at
concurrency 8 per mode keep the check under ~30 s.  The self-test proves the
soak can fail: a queue that acknowledges but drops messages must be caught.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO

SOAK = str(REPO / "scripts" / "soak")
PY = os.path.realpath(sys.executable)
MODES = ["tcpserver", "serve", "embedded"]


def run_soak(*args, timeout=120):
    return subprocess.run([PY, SOAK, *args], capture_output=True, timeout=timeout,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})


@pytest.fixture(autouse=True)
def need_tcpserver():
    if not shutil.which("tcpserver"):
        if os.environ.get("CI"):
            pytest.fail("tcpserver (ucspi-tcp) is not installed")
        pytest.skip("tcpserver (ucspi-tcp) is not installed")


@pytest.mark.parametrize("mode", MODES)
def test_soak_loses_nothing(mode):
    p = run_soak("-n", "200", "-c", "8", "--mode", mode, "--max-seconds", "90")
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert re.search(r"soak %s: 200 messages at concurrency 8 " % mode, out), out
    assert ("acknowledged 200, queued 200 (files 200), duplicates 0, lost 0,"
            " unacknowledged 0, malformed 0, tmp left 0") in out, out
    assert "client errors 0, refusals 0;" in out and "zombies 0" in out, out
    fds = re.search(r"server fds (\d+) -> (\d+)", out)
    assert fds and fds.group(1) == fds.group(2), out
    assert out.rstrip().endswith("PASS"), out


def test_soak_catches_a_lost_message():
    mode = "serve"  # the quicker of the modes with a queue program
    p = run_soak("-n", "40", "-c", "4", "--mode", mode, "--self-test-drop")
    out = p.stdout.decode()
    assert p.returncode == 1, out
    assert "acknowledged 40, queued 36 (files 36), duplicates 0, lost 4," in out, out
    assert "FAIL: 4 acknowledged but not queued (e.g. [7, 17, 27, 37])" in out, out


def test_soak_self_test_needs_a_queue_program():
    p = run_soak("-n", "10", "--mode", "embedded", "--self-test-drop")
    assert p.returncode == 2
    assert b"--self-test-drop needs a queue program: not in embedded mode" in p.stderr
