"""qspp.proxyproto reads what the real HAProxy (Debian's haproxy) sends with
send-proxy (v1), send-proxy-v2, and v2 health checks (LOCAL), to a small listener
in this test; the bytes after the header stay in the socket."""

import os
import queue
import shutil
import socket
import subprocess
import threading
import time

import pytest

from qspp.proxyproto import read_header
from qspp.tcpenv import proxied_environ

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
    default_backend v1
backend v1
    server s 127.0.0.1:{backend} send-proxy
frontend v2
    bind 127.0.0.1:{p2}
    default_backend v2
backend v2
    server s 127.0.0.1:{backend} send-proxy-v2
backend health
    server s 127.0.0.1:{backend} send-proxy-v2 check check-send-proxy inter 200ms
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def haproxy(tmp_path, backend):
    if HAPROXY is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed")
        pytest.skip("haproxy is not installed")
    port, got = backend
    p1, p2 = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG.format(pidfile=tmp_path / "haproxy.pid", p1=p1, p2=p2, backend=port))
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", p2), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "haproxy.log").read_text())
                time.sleep(0.05)
        yield p1, p2, got
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
