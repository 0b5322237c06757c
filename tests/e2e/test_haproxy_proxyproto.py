"""qspp.proxyproto reads what the real HAProxy (Debian's haproxy) sends with
send-proxy (v1), send-proxy-v2, and v2 health checks (LOCAL), to a small listener
in this test; the bytes after the header stay in the socket."""

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from qspp.proxyproto import read_header
from qspp.tcpenv import proxied_environ

from .conftest import free_port, stop_process

HAPROXY = shutil.which("haproxy")

CONFIG = """global
    pidfile {pidfile}
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend v1
    bind 127.0.0.1:{p1}
{bind6_1}    default_backend v1
backend v1
    server s 127.0.0.1:{backend} send-proxy
frontend v2
    bind 127.0.0.1:{p2}
{bind6_2}    default_backend v2
backend v2
    server s 127.0.0.1:{backend} send-proxy-v2
backend health
    server s 127.0.0.1:{backend} send-proxy-v2 check check-send-proxy inter 200ms
"""



@pytest.fixture
def backend():
    """A listener that reads one PROXY header per connection, then everything else."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    lst.settimeout(0.2)
    got = queue.Queue()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, peer = lst.accept()
            except socket.timeout:
                continue
            with conn:
                try:
                    h = read_header(conn, timeout=5)
                except Exception as e:  # noqa: BLE001 - reported to the test
                    got.put((e, None, None))
                    continue
                env = proxied_environ(h, conn, peer)
                conn.settimeout(2)
                rest = b""
                try:
                    while True:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        rest += chunk
                except (socket.timeout, ConnectionResetError):
                    pass
                got.put((h, env, rest))

    t = threading.Thread(target=serve)
    t.start()
    yield lst.getsockname()[1], got
    stop.set()
    t.join()
    lst.close()


def start_haproxy(tmp_path, config, probe_port):
    if HAPROXY is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed")
        pytest.skip("haproxy is not installed")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    with open(tmp_path / "haproxy.log", "wb") as log:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", probe_port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc, 5)
                raise RuntimeError((tmp_path / "haproxy.log").read_text())
            time.sleep(0.05)


@pytest.fixture
def haproxy(tmp_path, backend):
    port, got = backend
    p1, p2 = free_port(), free_port()
    from .ucspi6 import have_ipv6_loopback
    v6 = have_ipv6_loopback()  # test_ipv6_client skips (or fails under CI) without it
    config = CONFIG.format(pidfile=tmp_path / "haproxy.pid", p1=p1, p2=p2, backend=port,
                           bind6_1="    bind ::1:%d\n" % p1 if v6 else "",
                           bind6_2="    bind ::1:%d\n" % p2 if v6 else "")
    proc = start_haproxy(tmp_path, config, p2)
    try:
        yield p1, p2, got
    finally:
        stop_process(proc, 5)


def through(port, got, version):
    """Connect from 127.0.0.2, send an SMTP line, close; the backend's view."""
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=("127.0.0.2", 0)) as c:
        cport = c.getsockname()[1]
        c.sendall(b"EHLO client.example\r\nQUIT\r\n")
        c.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while True:
            h, env, rest = got.get(timeout=10)
            if isinstance(h, Exception):
                raise h
            # skip health checks and the fixture's readiness probes (from 127.0.0.1)
            if not h.local and h.source[1] == socket.inet_aton("127.0.0.2"):
                break
            assert time.monotonic() < deadline
    assert h.version == version
    assert rest == b"EHLO client.example\r\nQUIT\r\n"
    assert h.source == (socket.AF_INET, socket.inet_aton("127.0.0.2"), cport)
    assert h.dest == (socket.AF_INET, socket.inet_aton("127.0.0.1"), port)
    assert (env[b"PROTO"], env[b"TCPREMOTEIP"], env[b"TCPREMOTEPORT"], env[b"TCPLOCALIP"],
            env[b"TCPLOCALPORT"], env[b"TCP6REMOTEIP"]) == (
        b"TCP", b"127.0.0.2", b"%d" % cport, b"127.0.0.1", b"%d" % port,
        b"::ffff:127.0.0.2")


def test_send_proxy_v1(haproxy):
    p1, _, got = haproxy
    through(p1, got, 1)


def test_send_proxy_v2(haproxy):
    _, p2, got = haproxy
    through(p2, got, 2)


@pytest.mark.parametrize("version", [1, 2])
def test_ipv6_client(haproxy, version):
    from .ucspi6 import require_ipv6
    require_ipv6()
    p1, p2, got = haproxy
    port = p1 if version == 1 else p2
    with socket.create_connection(("::1", port), timeout=5) as c:
        cport = c.getsockname()[1]
        c.sendall(b"QUIT\r\n")
        c.shutdown(socket.SHUT_WR)
        while True:
            h, env, rest = got.get(timeout=10)
            if isinstance(h, Exception):
                raise h
            if not h.local and h.source[0] == socket.AF_INET6:
                break
    assert h.version == version and rest == b"QUIT\r\n"
    assert h.source == (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1"), cport)
    assert h.dest == (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1"), port)
    assert (env[b"PROTO"], env[b"TCPREMOTEIP"], env[b"TCPREMOTEPORT"], env[b"TCPLOCALIP"]) == (
        b"TCP6", b"::1", b"%d" % cport, b"::1")


def test_v2_health_check_is_local(haproxy):
    _, _, got = haproxy
    deadline = time.monotonic() + 10
    while True:
        h, env, rest = got.get(timeout=10)
        if isinstance(h, Exception):
            raise h
        if h.local:
            break
        assert time.monotonic() < deadline
    # LOCAL: the balancer's own address stands
    assert (h.version, h.source, h.dest) == (2, None, None)
    assert env[b"TCPREMOTEIP"] == b"127.0.0.1"
    assert rest == b""


# -- today's qspp.smtpd behind HAProxy: the header is only a bad command --------

def test_untrusted_proxy_line_is_a_bad_command(tmp_path, home):
    """qspp.smtpd under plain tcpserver, HAProxy in front with send-proxy: the line
    gets netqmail's 502 and the session keeps HAProxy's own address (127.0.0.1),
    not the 127.0.0.2 the header claims."""
    from .conftest import SRC, TCPSERVER
    from .ucspi6 import Server
    if TCPSERVER is None:
        if os.environ.get("CI"):
            pytest.fail("tcpserver (ucspi-tcp) is not installed")
        pytest.skip("tcpserver (ucspi-tcp) is not installed")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC),
           "QMAILHOME": str(home.root), "QMAILQUEUE": str(home.recorder)}
    srv = Server(TCPSERVER, "127.0.0.1", [sys.executable, "-m", "qspp.smtpd"], env,
                 cwd=str(home.root))
    front = free_port()
    proc = None
    try:
        proc = start_haproxy(tmp_path, CONFIG_SMTPD.format(front=front, backend=srv.port),
                             front)
        with socket.create_connection(("127.0.0.1", front), timeout=10,
                                      source_address=("127.0.0.2", 0)) as c:
            f = c.makefile("rb")
            assert f.readline() == b"220 mx.example.org ESMTP\r\n"
            assert f.readline() == b"502 unimplemented (#5.5.1)\r\n"
            for line, reply in ((b"HELO h", b"250 mx.example.org"),
                                (b"MAIL FROM:<a@b>", b"250 ok"),
                                (b"RCPT TO:<x@example.org>", b"250 ok"),
                                (b"DATA", b"354 go ahead")):
                c.sendall(line + b"\r\n")
                assert f.readline() == reply + b"\r\n"
            c.sendall(b"hi\r\n.\r\n")
            assert f.readline().startswith(b"250 ok ")
            c.sendall(b"QUIT\r\n")
            assert f.readline() == b"221 mx.example.org\r\n"
        run = [r for r in home.new_runs(1)][0]
        assert run.message == (b"Received: from unknown (HELO h) (127.0.0.1)\n"
                               b"  by 0 with SMTP; <D>\nhi\n")
    finally:
        if proc is not None:
            stop_process(proc, 5)
        srv.stop()


CONFIG_SMTPD = """defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend smtp
    bind 127.0.0.1:{front}
    default_backend smtp
backend smtp
    server s 127.0.0.1:{backend} send-proxy
"""
