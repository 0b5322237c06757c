"""Debian's ucspi-tcp-ipv6, unpacked (not installed: it conflicts with ucspi-tcp).

`apt-get download ucspi-tcp-ipv6` then `dpkg -x` into a temporary directory, once
per test session; QSPP_UCSPI_IPV6_DEB names an already downloaded .deb instead.
Missing tools skip the test, or fail it under CI.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest


def need(what):
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


def unpack(base) -> dict:
    """{"tcpserver": path, "tcprules": path, "tcprulescheck": path}."""
    deb = os.environ.get("QSPP_UCSPI_IPV6_DEB")
    if not deb:
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            need("apt-get and dpkg are needed to fetch ucspi-tcp-ipv6")
        r = subprocess.run(["apt-get", "download", "ucspi-tcp-ipv6"], cwd=base,
                           capture_output=True, timeout=120)
        debs = sorted(base.glob("ucspi-tcp-ipv6_*.deb"))
        if r.returncode != 0 or not debs:
            need("apt-get download ucspi-tcp-ipv6 failed: %s" % r.stderr[-300:])
        deb = str(debs[0])
    root = base / "root"
    subprocess.run(["dpkg", "-x", deb, str(root)], check=True, timeout=60)
    tools = {n: str(root / "usr/bin" / n) for n in ("tcpserver", "tcprules", "tcprulescheck")}
    for path in tools.values():
        assert os.access(path, os.X_OK), path
    return tools


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def require_ipv6():
    if not have_ipv6_loopback():
        if os.environ.get("CI"):
            pytest.fail("::1 is not available")
        pytest.skip("::1 is not available")


class Server:
    """`tcpserver -HRl0 -1 [OPTIONS] HOST 0 PROGRAM...`, its own session, stopped
    by pid."""

    def __init__(self, tcpserver, host, program, env, options=(), cwd=None):
        self.proc = subprocess.Popen(
            [tcpserver, "-HRl0", "-1", *options, host, "0", *program],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=cwd, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("tcpserver did not start: %r %r"
                               % (line, self.proc.stderr.read()))
        self.port = int(line)

    def connect(self, host, source=None, timeout=10):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam)
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect((host, self.port))
        return s

    def stop(self):
        for sig in (15, 9):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=3)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def read_all(s, timeout=10) -> bytes:
    s.settimeout(timeout)
    out = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out
