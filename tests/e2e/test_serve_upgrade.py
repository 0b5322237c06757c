"""`qspp serve` upgrades in place on SIGUSR2 (issue 14): the same pid
re-executes itself with its listening sockets (handover.py), while a bounded
load loop runs: no connection refused, no message lost or queued twice."""

import os
import shutil
import signal
import socket
import threading
import time

from .conftest import SRC, free_port, wait_for
from .serve_harness import ServeServer
from .test_serve_metrics import scrape, values

THREADS = 4
PER_THREAD = 60


def send_one(port, tag: bytes):
    """One message; its 250 line, or raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")

        def reply():
            line = f.readline()
            if not line:
                raise AssertionError("connection closed without a reply (%s)" % tag)
            return line
        assert reply().startswith(b"220 ")
        for cmd, want in ((b"HELO h\r\n", b"250 "), (b"MAIL FROM:<a@b>\r\n", b"250 "),
                          (b"RCPT TO:<x@example.org>\r\n", b"250 "), (b"DATA\r\n", b"354 ")):
            s.sendall(cmd)
            line = reply()
            assert line.startswith(want), (cmd, line)
        s.sendall(b"Subject: " + tag + b"\r\n\r\nhi\r\n.\r\n")
        done = reply()
        s.sendall(b"QUIT\r\n")
        reply()
        return done


def queued_tags(home):
    tags = []
    for p in home.queue.iterdir():
        if p.name.endswith(".M"):
            data = p.read_bytes()
            i = data.find(b"Subject: ")
            if i >= 0:
                tags.append(data[i + 9:data.index(b"\n", i)])
    return tags


def test_upgrades_under_load_lose_and_refuse_nothing(home, tmp_path):
    mport = free_port()
    s = ServeServer(home, tmp_path / "serve", "-c", "8", "--per-ip", "0",
                    "--metrics", "127.0.0.1:%d" % mport)
    s.start()
    try:
        accepted, errors = [], []
        stop = threading.Event()

        def loop(n):
            for i in range(PER_THREAD):
                if stop.is_set():
                    return
                tag = b"m-%d-%d" % (n, i)
                try:
                    line = send_one(s.port, tag)
                except (OSError, AssertionError) as e:
                    errors.append((tag, repr(e)))
                    continue
                if line.startswith(b"250 "):
                    accepted.append(tag)
                else:
                    errors.append((tag, line))
        threads = [threading.Thread(target=loop, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        pid = s.pid
        for n in range(1, 3):
            time.sleep(0.7)
            os.kill(pid, signal.SIGUSR2)
            wait_for(lambda: len([ln for ln in s.lines() if b"serve: upgraded: took over 1"
                                  b" listening socket" in ln]) == n, 30, "upgrade %d" % n)
        for t in threads:
            t.join(120)
        assert not [t for t in threads if t.is_alive()]
        assert errors == []
        assert len(accepted) == THREADS * PER_THREAD
        tags = queued_tags(home)
        assert sorted(tags) == sorted(accepted)   # every 250 queued exactly once
        assert len(set(tags)) == len(tags)
        lines = s.lines()
        assert sum(b"serve: upgrade: re-executing with 1 listening socket" in ln
                   for ln in lines) == 2
        assert s.proc.poll() is None and s.pid == pid     # the same process throughout
        # the old workers finished and were reaped by the new image
        wait_for(lambda: not s.zombies(), 10, "old workers to be reaped")
        assert len(s.children()) <= 8
        assert send_one(s.port, b"after").startswith(b"250 ")
        # the new image serves metrics on the same port, counting from its start
        wait_for(lambda: values(scrape("127.0.0.1", mport)).get(
            "qspp_messages_queued_total", 0) >= 1, 5, "the new image's metrics")
    finally:
        s.stop()


def test_an_upgrade_that_cannot_start_keeps_serving(home, tmp_path):
    # serve runs from a copy of the package, which then gets a broken module:
    # the trial run fails to import it, and the running serve goes on
    src = tmp_path / "src"
    shutil.copytree(SRC / "qspp", src / "qspp", ignore=shutil.ignore_patterns("__pycache__"))
    env = home.full_env()
    for k in ("TCPREMOTEIP", "TCPLOCALIP", "TCPREMOTEHOST"):
        env.pop(k, None)
    env["PYTHONPATH"] = str(src)
    s = ServeServer(home, tmp_path / "serve", "-c", "2", env=env)
    s.start()
    try:
        with open(src / "qspp" / "handover.py", "a") as f:
            f.write("\ndef broken(:\n")
        os.kill(s.pid, signal.SIGUSR2)
        s.wait_line(rb"serve: upgrade refused, still serving: the trial run of the new code"
                    rb" exited 1: SyntaxError", timeout=30)
        assert not [ln for ln in s.lines() if b"re-executing" in ln]
        assert send_one(s.port, b"still").startswith(b"250 ")
        assert s.proc.poll() is None
    finally:
        s.stop()


def test_a_session_spans_the_upgrade_and_the_new_image_waits_for_it(home, tmp_path):
    s = ServeServer(home, tmp_path / "serve", "-c", "2")
    s.start()
    try:
        c = s.connect()
        assert c.cmd(b"HELO h") == b"250 mx.example.org\r\n"
        (old,) = s.sessions()
        os.kill(s.pid, signal.SIGUSR2)
        s.wait_line(rb"serve: upgraded: took over 1 listening socket", timeout=30)
        # the old worker is still this process's child, its session going on
        assert old in s.children()
        os.kill(s.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert s.proc.poll() is None  # waiting for the old image's session too
        run = c.txn()
        assert run.E == b"Fa@b\0Tx@example.org\0\0"
        assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
        assert s.wait(10) == 0
        assert s.lines()[-1].endswith(b"serve: stopped")
    finally:
        s.stop()
