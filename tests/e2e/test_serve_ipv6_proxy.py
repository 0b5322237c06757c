"""`qspp serve` with IPv6 listeners and behind the real HAProxy (issue 14).

IPv6: `--host ::1 --host 127.0.0.1` and `--host ::` give a plugin exactly the
environment Debian's ucspi-tcp-ipv6 tcpserver gives its program (the real
binary, unpacked by ucspi6.py, run side by side).  PROXY: with `--proxy-from`,
the Received line, a plugin's environment and a tcprules deny all act on the
address HAProxy saw; a health check (v2 LOCAL) keeps the balancer's address;
a bad header closes with nothing sent and one log line; a client not listed
that sends a PROXY line gets qmail's reply to an unknown command.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest

from .conftest import free_port, normalize_date, wait_for
from .serve_harness import ServeServer
from .test_ipv6 import DUMP_PLUGIN, _rules_cdb, envdump, smtp, tcp_vars  # noqa: F401 - envdump is a fixture
from .test_serve import make_rules, serve  # noqa: F401 - the fixture
from .ucspi6 import Server, read_all, require_ipv6, unpack

HAPROXY = shutil.which("haproxy")
PORTS = (b"TCPLOCALPORT", b"TCP6LOCALPORT", b"TCPREMOTEPORT", b"TCP6REMOTEPORT")
SESSION = [b"HELO h\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<x@example.org>\r\n",
           b"DATA\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n"]


@pytest.fixture(scope="module")
def ucspi(tmp_path_factory):
    return unpack(tmp_path_factory.mktemp("ucspi6"))


def connect(host, port, source=None):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(10)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def plugin_env(home) -> dict:
    path = home.root / "plugin.env"
    wait_for(path.exists, 5, "the plugin's dump")
    data = path.read_bytes()
    path.unlink()
    return dict(e.split(b"=", 1) for e in data.split(b"\0"))


def tcpserver_env(ucspi, envdump, listen, client, source) -> dict:
    srv = Server(ucspi["tcpserver"], listen, [envdump], {"PATH": "/usr/bin:/bin"})
    try:
        with srv.connect(client, source) as s:
            return tcp_vars(read_all(s))
    finally:
        srv.stop()


def without_ports(env):
    return {k: v for k, v in env.items() if k not in PORTS}


@pytest.mark.parametrize("hosts,cases", [
    # serve's listeners; (client, source, the real tcpserver's listen address)
    (("::1", "127.0.0.1"), [("::1", None, "::1"), ("127.0.0.1", "127.0.0.2", "127.0.0.1")]),
    (("::",), [("::1", None, "0"), ("127.0.0.1", "127.0.0.2", "0")]),
])
def test_ipv6_environment_is_the_real_ipv6_tcpserve(ucspi, envdump, home, serve,
                                                        hosts, cases):
    require_ipv6()
    home.control("smtpplugins", "[connection]\nplugins/dump\n")
    home.python_plugin("plugins/dump", DUMP_PLUGIN)
    args = [a for h in hosts for a in ("--host", h)]
    s = serve(*args, "--localname", "0")
    assert s.host == hosts[0]
    if len(hosts) > 1:
        s.wait_line(rb"listening on ::1 port %d and 127\.0\.0\.1 port %d," % (s.port, s.port))
    for client, source, listen in cases:
        with connect(client, s.port, source) as c:
            replies = smtp(c, SESSION)
            assert read_all(c) == b""
            local_port = c.getpeername()[1]
            remote_port = c.getsockname()[1]
        assert replies[0] == b"220 mx.example.org ESMTP\r\n"
        assert replies[5].startswith(b"250 ok ")
        got = {k: v for k, v in plugin_env(home).items() if k.startswith(b"TCP") or k == b"PROTO"}
        want = tcpserver_env(ucspi, envdump, listen, client, source)
        assert without_ports(got) == without_ports(want)
        assert set(got) == set(want)
        for name, port in ((b"LOCALPORT", local_port), (b"REMOTEPORT", remote_port)):
            assert got[b"TCP" + name] == got[b"TCP6" + name] == b"%d" % port
        shown = source or client
        (run,) = home.new_runs(1)
        assert run.message == (b"Received: from unknown (HELO h) (%s)\n  by 0 with SMTP; <D>\n"
                               b"Subject: t\n\nhi\n" % shown.encode())
        assert normalize_date(run.M) == run.message


def test_ipv6_rules_use_the_ipv6_tcpservers_keys(ucspi, home, serve, tmp_path):
    require_ipv6()
    # written by the IPv6 tcprules; "::" is a prefix of ::1 for the IPv6 tcpserver
    rules = tmp_path / "rules.cdb"
    _rules_cdb(ucspi["tcprules"], rules, ["::1:deny\n", "::allow,RULE=\"v6\"\n", ":allow\n"])
    s = serve("--host", "::", "--rules", str(rules))
    with connect("::1", s.port) as c:
        assert read_all(c) == b""
    s.wait_line(rb"serve: deny ::1 port \d+ \(rule \"::1\"\)")
    _rules_cdb(ucspi["tcprules"], rules, ["::allow,RULE=\"v6\"\n", ":allow\n"])
    home.control("smtpplugins", "[connection]\nplugins/dump\n")
    home.python_plugin("plugins/dump", DUMP_PLUGIN)
    with connect("::1", s.port) as c:
        smtp(c, [b"QUIT\r\n"])
    assert plugin_env(home)[b"RULE"] == b"v6"


def test_a_host_that_cannot_be_bound_is_named(home, tmp_path):
    s = ServeServer(home, tmp_path / "s", "--host", "127.0.0.1", "--host", "192.0.2.1")
    with pytest.raises(AssertionError, match="cannot listen on 192.0.2.1 port"):
        s.start()
    s.stop()


# -- behind HAProxy --------------------------------------------------------------

HAPROXY_CONFIG = """global
    pidfile {pidfile}
defaults
    mode tcp
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend v1
    bind 127.0.0.1:{p1}
    default_backend v1
backend v1
    server s 127.0.0.1:{backend} send-proxy
frontend v2
    bind 127.0.0.1:{p2}
    default_backend v2
backend v2
    server s 127.0.0.1:{backend} send-proxy-v2
{health}"""
HEALTH = """backend health
    server s 127.0.0.1:{backend} send-proxy-v2 check check-send-proxy inter 300ms
"""



class HAProxy:
    def __init__(self, base, backend, health=False):
        if HAPROXY is None:
            if os.environ.get("CI"):
                pytest.fail("haproxy is not installed")
            pytest.skip("haproxy is not installed")
        self.p1, self.p2 = free_port(), free_port()
        cfg = base / "haproxy.cfg"
        cfg.write_text(HAPROXY_CONFIG.format(
            pidfile=base / "haproxy.pid", p1=self.p1, p2=self.p2, backend=backend,
            health=HEALTH.format(backend=backend) if health else ""))
        self.log = open(base / "haproxy.log", "wb")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.p2), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(up, 10, "haproxy to listen")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def haproxy(tmp_path):
    made = []

    def start(backend, health=False):
        h = HAProxy(tmp_path, backend, health)
        made.append(h)
        return h
    yield start
    for h in made:
        h.stop()


@pytest.mark.parametrize("version", [1, 2])
def test_behind_haproxy_the_client_is_the_one_haproxy_saw(home, serve, haproxy, tmp_path,
                                                          version):
    home.control("smtpplugins", "[connection]\nplugins/dump\n")
    home.python_plugin("plugins/dump", DUMP_PLUGIN)
    rules = make_rules(tmp_path / "rules.cdb",
                       '127.0.0.3:deny\n127.0.0.2:allow,RULE="two"\n:deny\n')
    s = serve("--proxy-from", "127.0.0.1/32", "--localname", "0", "--rules", str(rules))
    h = haproxy(s.port)
    front = h.p1 if version == 1 else h.p2
    with connect("127.0.0.1", front, "127.0.0.2") as c:
        replies = smtp(c, SESSION)
        assert read_all(c) == b""
        client_port = c.getsockname()[1]
    assert replies[0] == b"220 mx.example.org ESMTP\r\n" and replies[5].startswith(b"250 ok ")
    (run,) = home.new_runs(1)
    assert run.message == (b"Received: from unknown (HELO h) (127.0.0.2)\n  by 0 with SMTP;"
                           b" <D>\nSubject: t\n\nhi\n")
    env = plugin_env(home)
    assert env[b"RULE"] == b"two"
    assert (env[b"PROTO"], env[b"TCPREMOTEIP"], env[b"TCPREMOTEPORT"]) == (
        b"TCP", b"127.0.0.2", b"%d" % client_port)
    assert (env[b"TCPLOCALIP"], env[b"TCPLOCALPORT"]) == (b"127.0.0.1", b"%d" % front)
    assert env[b"TCP6REMOTEIP"] == b"::ffff:127.0.0.2"
    # a client the rules deny, as HAProxy saw it: closed with nothing sent
    with connect("127.0.0.1", front, "127.0.0.3") as c:
        assert read_all(c) == b""
    # (HAProxy's own probe at its start, from 127.0.0.1, was denied too)
    s.wait_line(rb"serve: deny 127\.0\.0\.3 port \d+ \(rule \"127\.0\.0\.3\"\)")
    home.assert_no_new_runs()


def test_a_health_check_keeps_the_balancers_address(home, serve, haproxy, tmp_path):
    home.control("smtpplugins", "[connection]\nplugins/conn\n")
    home.write("plugins/conn", '#!/bin/sh\necho "$TCPREMOTEIP $TCPLOCALIP" >> conns.log\n',
               mode=0o755)
    s = serve("--proxy-from", "127.0.0.1")
    haproxy(s.port, health=True)
    log = home.root / "conns.log"
    wait_for(lambda: log.exists() and len(log.read_bytes().splitlines()) >= 2, 10,
             "two health checks")
    assert set(log.read_bytes().splitlines()) == {b"127.0.0.1 127.0.0.1"}
    assert not [ln for ln in s.lines() if b"proxy:" in ln]


def test_bad_or_missing_headers_close_with_nothing_sent(home, serve):
    s = serve("--proxy-from", "127.0.0.1/32")
    # a listed balancer sending an SMTP command instead of a header
    with connect("127.0.0.1", s.port) as c:
        c.sendall(b"EHLO x\r\n")
        try:
            assert read_all(c) == b""
        except ConnectionResetError:
            pass  # closed with the client's bytes unread: a reset, still nothing sent
    s.wait_line(rb"serve: proxy: closed 127\.0\.0\.1 port \d+: ")
    # a listed balancer sending nothing: closed after 5 s, logged
    t0 = time.monotonic()
    with connect("127.0.0.1", s.port) as c:
        assert read_all(c, timeout=10) == b""
    assert 4.5 < time.monotonic() - t0 < 8
    s.wait_line(rb"serve: proxy: closed 127\.0\.0\.1 port \d+: no complete PROXY header"
                rb" within 5 s")
    assert len([ln for ln in s.lines() if b"proxy: closed" in ln]) == 2
    home.assert_no_new_runs()


def test_a_proxy_line_from_anyone_else_is_a_bad_command(home, serve):
    s = serve("--proxy-from", "127.0.0.1/32")
    with connect("127.0.0.1", s.port, "127.0.0.2") as c:
        replies = smtp(c, [b"PROXY TCP4 192.0.2.9 127.0.0.1 4000 25\r\n", b"QUIT\r\n"])
    assert replies == [b"220 mx.example.org ESMTP\r\n", b"502 unimplemented (#5.5.1)\r\n",
                       b"221 mx.example.org\r\n"]


def test_balancers_are_not_held_to_per_ip_but_their_clients_are(home, serve, haproxy):
    s = serve("--proxy-from", "127.0.0.1", "--per-ip", "1", "-c", "4")
    h = haproxy(s.port)
    first = connect("127.0.0.1", h.p2, "127.0.0.2")
    other = connect("127.0.0.1", h.p2, "127.0.0.3")
    try:
        f = first.makefile("rb")
        o = other.makefile("rb")
        assert f.readline() == b"220 mx.example.org ESMTP\r\n"
        assert o.readline() == b"220 mx.example.org ESMTP\r\n"
        with connect("127.0.0.1", h.p2, "127.0.0.2") as again:
            assert read_all(again) == b""
        s.wait_line(rb"serve: per-ip limit: closed 127\.0\.0\.2 port \d+ \(1 sessions")
    finally:
        first.close()
        other.close()
