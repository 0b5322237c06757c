"""`qspp serve --metrics`: a real scrape after real traffic, checked by the real
promtool (Debian's prometheus package), with the counts the traffic must give."""

import base64
import os
import re
import shutil
import socket
import subprocess

import pytest

from .conftest import wait_for
from .test_auth import install_checkpw
from .test_starttls import certs, client_context  # noqa: F401 - the fixture

OK = b"250 ok\r\n"
from .serve_harness import ServeServer
from .test_serve import make_rules

PROMTOOL = shutil.which("promtool")

PLUGINS = ("[rcpt]\n"
           ':case "$SMTPRCPTTO" in nobody@*) echo "E550 no such user";; *) true;; esac\n')


def scrape(host, port) -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") or head.startswith(b"HTTP/1.1 200 "), head
    return body


def values(body: bytes) -> dict:
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_after_traffic_pass_promtool(home, tmp_path, certs):
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool (prometheus) is not installed")
        pytest.skip("promtool (prometheus) is not installed")
    home.control("smtpplugins", PLUGINS)
    install_checkpw(home)
    home.control("servercert.pem", certs.pem)
    rules = make_rules(tmp_path / "rules.cdb", "127.0.0.9:deny\n:allow\n")
    s = ServeServer(home, tmp_path / "serve", "-c", "2", "--per-ip", "0", "--rules", str(rules),
                    "--metrics", "127.0.0.1:0", "--", "mx.example.org", "bin/checkpw",
                    "/bin/true")
    s.start()
    try:
        m = s.wait_line(rb"serve: metrics on 127\.0\.0\.1 port (\d+)")
        mport = int(m.group(1))
        for n in range(3):  # three messages queued
            c = s.connect()
            c.cmd(b"HELO h")
            c.txn()
            assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
        c = s.connect()     # a plugin and qmail-smtpd refuse a recipient each
        c.cmd(b"HELO h")
        assert c.cmd(b"MAIL FROM:<a@b>") == OK
        assert c.cmd(b"RCPT TO:<nobody@example.org>") == b"550 no such user\r\n"
        assert c.cmd(b"RCPT TO:<x@elsewhere.test>").startswith(b"553 ")
        c.close()           # then it just goes: eof
        c = s.connect()     # STARTTLS, then AUTH: one failure, one success
        c.cmd(b"EHLO h")
        assert c.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
        c.sock = client_context().wrap_socket(c.sock, server_hostname="mx.example.org")
        c.cmd(b"EHLO h")
        # (a failure's 535 comes after checkpassword's 5 s delay)
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong"),
                     timeout=20).startswith(b"535 ")
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret")) == (
            b"235 ok, go ahead (#2.0.0)\r\n")
        assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
        with socket.create_connection(("127.0.0.1", s.port), timeout=5,
                                      source_address=("127.0.0.9", 0)) as d:
            assert d.recv(100) == b""   # denied by the rules
        s.wait_line(rb"serve: deny 127\.0\.0\.9")
        wait_for(lambda: not s.sessions(), 5, "sessions to end")
        wait_for(lambda: values(scrape("127.0.0.1", mport)).get(
            'qspp_sessions_total{end="eof"}') == 1, 5, "the eof session to be counted")
        body = scrape("127.0.0.1", mport)
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=body,
                               capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        v = values(body)
        assert v["qspp_connections_accepted_total"] == 6
        assert v['qspp_connections_denied_total{reason="rules"}'] == 1
        assert v['qspp_sessions_total{end="quit"}'] == 4
        assert v['qspp_tls_total{result="ok"}'] == 1
        assert v['qspp_auth_total{result="failed"}'] == 1
        assert v['qspp_auth_total{result="ok"}'] == 1
        assert v['qspp_sessions_total{end="eof"}'] == 1
        assert v["qspp_messages_queued_total"] == 3
        assert v["qspp_connections_active"] == 0
        assert v["qspp_queue_seconds_count"] == 3
        assert v['qspp_queue_seconds_bucket{le="+Inf"}'] == 3
        refused = {k: n for k, n in v.items() if k.startswith("qspp_refused_total") and n}
        plugin = [k for k in refused if 'kind="plugin"' in k]
        assert len(plugin) == 1 and 'class="5xx"' in plugin[0]
        assert refused['qspp_refused_total{kind="smtpd",name="qmail-smtpd",class="5xx"}'] == 1
        runs = [k for k in v if re.match(r'qspp_run_seconds_count\{kind="plugin"', k)]
        assert len(runs) == 1 and v[runs[0]] == 5  # one rcpt plugin run per RCPT
        # a scrape is not a session and counts nothing
        assert values(scrape("127.0.0.1", mport))["qspp_connections_accepted_total"] == 6
    finally:
        s.stop()


def test_bad_metrics_address_is_a_usage_error(home, tmp_path):
    s = ServeServer(home, tmp_path / "serve", "--metrics", "nocolon")
    with pytest.raises(AssertionError, match="not HOST:PORT"):
        s.start()
    s.stop()
