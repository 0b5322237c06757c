"""qspp.metrics: rows written by forked processes without locks, folded by the
parent; the Prometheus text checked by the real promtool; the HTTP responder."""

import os
import selectors
import shutil
import socket
import subprocess
import threading
import time

import pytest

from qspp import metrics as M

PROMTOOL = shutil.which("promtool")


def fork_and_count(m, row, fn):
    pid = os.fork()
    if pid == 0:
        try:
            fn(m.recorder(row))
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


def session(r):
    r.count("qspp_sessions_total", "quit")
    r.count("qspp_messages_queued_total")
    r.queue_time(0.003)
    r.run_time("plugin", "plugins/greylist", 0.02)
    r.refused("plugin", "plugins/greylist", 451)
    r.refused("smtpd", "qmail-smtpd", 553)
    r.count("qspp_tls_total", "ok")
    r.count("qspp_auth_total", "failed")


def test_children_rows_summed_live_and_folded_after_exit():
    m = M.Metrics(4)
    m.parent.count("qspp_connections_accepted_total")
    rows = [m.claim(), m.claim()]
    for row in rows:
        fork_and_count(m, row, session)
    fixed, named = m.snapshot()
    idx = M._INDEX
    assert fixed[idx["qspp_connections_accepted_total", ""]] == 1
    assert fixed[idx["qspp_sessions_total", "quit"]] == 2
    assert named["plugin", "plugins/greylist"][:2] == [2, 0]
    assert named["smtpd", "qmail-smtpd"][:2] == [0, 2]
    for row in rows:
        m.release(row)
    assert m.snapshot() == (fixed, named)  # nothing lost by folding
    # a freed row is clean for its next process
    row = m.claim()
    assert row in rows
    assert not any(m.words[row * M.ROW_WORDS:(row + 1) * M.ROW_WORDS])
    fork_and_count(m, row, session)
    fixed2, _ = m.snapshot()
    assert fixed2[idx["qspp_sessions_total", "quit"]] == 3


def test_no_row_means_counting_nothing():
    m = M.Metrics(1)
    assert m.claim() is None
    r = m.recorder(None)
    r.count("qspp_sessions_total", "eof")
    r.refused("plugin", "x", 550)
    assert m.snapshot()[0][M._INDEX["qspp_sessions_total", "eof"]] == 0


def test_names_are_bounded_per_row():
    m = M.Metrics(2)
    r = m.recorder(m.claim())
    for i in range(M.NAMES + 10):
        r.refused("plugin", "p%d" % i, 550)
    _, named = m.snapshot()
    assert len(named) == M.NAMES
    assert named["plugin", M.OTHER][1] == 11  # its own slot plus the 10 that did not fit
    long = "x" * 500
    r2 = m.recorder(m.claim()) if m.free else r
    r2.run_time("filter", long, 0.1)


def test_histogram_buckets_are_cumulative_and_sum_in_seconds():
    m = M.Metrics(2)
    r = m.recorder(m.claim())
    for s in (0.0005, 0.001, 0.002, 7.0, 500.0):
        r.queue_time(s)
    text = m.render().decode()
    assert 'qspp_queue_seconds_bucket{le="0.001"} 2\n' in text
    assert 'qspp_queue_seconds_bucket{le="0.005"} 3\n' in text
    assert 'qspp_queue_seconds_bucket{le="10.0"} 4\n' in text
    assert 'qspp_queue_seconds_bucket{le="120.0"} 4\n' in text
    assert 'qspp_queue_seconds_bucket{le="+Inf"} 5\n' in text
    assert "qspp_queue_seconds_sum 507.0035\n" in text
    assert "qspp_queue_seconds_count 5\n" in text


def test_label_values_are_escaped():
    m = M.Metrics(2)
    m.recorder(m.claim()).refused("plugin", 'a"b\\c\nd', 554)
    assert 'name="a\\"b\\\\c\\nd",class="5xx"} 1\n' in m.render().decode()


def sample_text():
    m = M.Metrics(3)
    m.parent.count("qspp_connections_accepted_total")
    m.parent.count("qspp_connections_denied_total", "rules")
    fork_and_count(m, m.claim(), session)
    return m.render(active=1)


NAMES = ["qspp_connections_accepted_total", "qspp_connections_denied_total",
         "qspp_connections_active", "qspp_sessions_total", "qspp_messages_queued_total",
         "qspp_refused_total", "qspp_run_seconds_bucket", "qspp_queue_seconds_bucket",
         "qspp_tls_total", "qspp_auth_total"]


def test_promtool_check_metrics():
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool (Debian's prometheus package) is not installed")
        pytest.skip("promtool is not installed")
    text = sample_text()
    for name in NAMES:  # promtool passes empty input, so the content is checked too
        assert ("\n" + name).encode() in b"\n" + text, name
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                       timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    # and it can fail: a broken exposition is rejected
    bad = text.replace(b"# TYPE qspp_queue_seconds histogram", b"# TYPE qspp_queue_seconds bogus")
    assert subprocess.run([PROMTOOL, "check", "metrics"], input=bad, capture_output=True,
                          timeout=30).returncode != 0


def test_hot_path_cost():
    m = M.Metrics(2)
    r = m.recorder(m.claim())
    r.refused("plugin", "p", 550)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        r.count("qspp_sessions_total", "quit")
        r.run_time("plugin", "p", 0.01)
    per = (time.perf_counter() - t0) / n
    assert per < 20e-6, per  # two events well under the cost of one syscall-heavy session step


# -- HTTP -----------------------------------------------------------------------

@pytest.fixture
def exporter():
    lst = M.listen("127.0.0.1", 0)
    sel = selectors.DefaultSelector()
    ex = M.Exporter(lst, lambda: b"qspp_x 1\n")
    ex.register(sel)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            t = ex.timeout()
            for key, ev in sel.select(0.05 if t is None else min(t, 0.05)):
                assert ex.owns(key)
                ex.ready(key, ev)
            ex.expire()

    t = threading.Thread(target=loop)
    t.start()
    yield ex, lst.getsockname()[1]
    stop.set()
    t.join()
    ex.close()
    sel.close()


def http(port, raw, timeout=5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_http_get_metrics(exporter):
    _, port = exporter
    out = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out == (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
                   b"\r\nContent-Length: 9\r\nConnection: close\r\n\r\nqspp_x 1\n")
    head = http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.endswith(b"Content-Length: 9\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("req,status", [
    (b"POST /metrics HTTP/1.0\r\n\r\n", b"405"), (b"GET /x HTTP/1.0\r\n\r\n", b"404"),
    (b"GET /metrics\r\n\r\n", b"400"), (b"hello\r\n\r\n", b"400")])
def test_http_errors(exporter, req, status):
    _, port = exporter
    assert http(port, req).startswith(b"HTTP/1.0 " + status + b" ")


def _dropped(talk) -> bool:
    """True when the exporter closed the connection without a word: an EOF,
    or a reset where it closed with the client's bytes still unread."""
    try:
        return talk() == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_http_oversized_and_slow_requests_are_dropped(exporter, monkeypatch):
    ex, port = exporter
    assert _dropped(lambda: http(port, b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 2000))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /met")
        # once the exporter holds the client, time jumps past its deadline (a
        # jump before the accept would move the deadline along with it)
        until = time.monotonic() + 5
        while not ex.clients and time.monotonic() < until:
            time.sleep(0.01)
        assert ex.clients
        monkeypatch.setattr(ex, "clock", lambda: time.monotonic() + M.CLIENT_TIMEOUT + 1)
        assert _dropped(lambda: s.recv(10))
    monkeypatch.undo()
    # many idle clients at once do not lock others out for good
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(M.MAX_CLIENTS + 2)]
    for s in idle:
        s.close()
    assert http(port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 OK")


def test_close_in_child_leaves_the_parents_loop_alone(exporter):
    ex, port = exporter
    pid = os.fork()
    if pid == 0:
        try:
            ex.close_in_child()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert http(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 OK")
