"""A running `qspp serve` for end-to-end tests (the tcpserver harness is conftest.py).

ServeServer(home, base, *args).start() runs `python -m qspp serve --port 0
--qmailhome HOME ARGS...` in its own session with the home's environment
(QMAILQUEUE = the recorder), reads the port it chose from its startup line,
and offers connect() like conftest's TcpServer (Client objects, greeting
checked).  stderr goes to base/serve.err; lines() returns it.  stop() sends
SIGTERM and waits; teardown kills what is left of the process group, which
only this harness started.
"""

import os
import re
import signal
import socket
import subprocess
import time

from .conftest import GREETING, PYTHON, Client, wait_for

LISTENING_RE = re.compile(rb"qspp: pid (\d+): serve: listening on (\S+) port (\d+)[, ]")


class ServeServer:
    def __init__(self, home, base, *args, env=None, qmailhome=True, python=PYTHON):
        self.python = python
        self.home = home
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.env = env
        self.qmailhome = qmailhome
        self.err = base / "serve.err"
        self.proc = None
        self.port = None
        self.clients = []

    @property
    def pid(self):
        return self.proc.pid

    def command(self):
        cmd = [self.python, "-m", "qspp", "serve", "--port", "0"]
        if "--host" not in self.args:
            cmd += ["--host", "127.0.0.1"]
        if self.qmailhome:
            cmd += ["--qmailhome", str(self.home.root)]
        smtpd_args = []
        args = self.args
        if "--" in args:
            cut = args.index("--")
            args, smtpd_args = args[:cut], args[cut:]
        return cmd + list(args) + smtpd_args

    def start(self, timeout=10):
        env = self.env
        if env is None:
            env = self.home.full_env()
            # serve sets these per connection itself; conftest's fixture F values
            # would only show that serve drops them
            for k in ("TCPREMOTEIP", "TCPLOCALIP", "TCPREMOTEHOST"):
                env.pop(k, None)
        queue = getattr(self.home, "queue", None)
        before = set(queue.iterdir()) if queue is not None else set()
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=env,
                                         cwd=str(self.base), start_new_session=True)

        def listening():
            m = LISTENING_RE.search(self.err.read_bytes())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError("qspp serve exited %s: %r"
                                     % (self.proc.returncode, self.err.read_bytes()))
            return None
        m = wait_for(listening, timeout, "qspp serve to listen")
        assert int(m.group(1)) == self.proc.pid
        self.host = m.group(2).decode()
        self.port = int(m.group(3))
        # serve ran the queue program once at its start, as an aborted message
        # (diagnose.probe_queue): that run is none of the test's, so its
        # recorder files go (it has finished: serve waited for it)
        if queue is not None:
            for f in set(queue.iterdir()) - before:
                f.unlink()
        # the listener is bound before the workers exist; a test counting them
        # wants at least the first one
        wait_for(self.children, timeout, "qspp serve's first worker")
        return self

    def connect(self, greet=GREETING, timeout=5.0, source=None) -> Client:
        c = Client(self, timeout, source)
        self.clients.append(c)
        if greet is not None:
            assert c.reply() == greet
        return c

    def lines(self):
        return self.err.read_bytes().splitlines()

    def wait_line(self, pattern, timeout=5):
        """Wait for a stderr line matching the regex PATTERN (bytes); return the match."""
        rx = re.compile(pattern)

        def find():
            for line in self.lines():
                m = rx.search(line)
                if m:
                    return m
            return None
        return wait_for(find, timeout, "serve log line %r in %r" % (pattern, self.lines()))

    def children(self):
        """The pids of serve's child processes (sessions not yet reaped included)."""
        out = set()
        try:
            tasks = os.listdir("/proc/%d/task" % self.pid)
        except FileNotFoundError:
            return out  # serve has exited: its children were handed to init
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/children" % (self.pid, task)) as f:
                    out |= {int(p) for p in f.read().split()}
            except FileNotFoundError:
                pass  # that thread ended meanwhile
        return out

    def sessions(self):
        """The pids of serve's workers that are in a session (fd 0 is a client socket)."""
        out = set()
        for pid in self.children():
            try:
                if os.readlink("/proc/%d/fd/0" % pid).startswith("socket:"):
                    out.add(pid)
            except OSError:
                pass
        return out

    def zombies(self):
        found = []
        for pid in self.children():
            try:
                with open("/proc/%d/stat" % pid) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":
                found.append(pid)
        return found

    def wait_idle(self, timeout=5):
        """Wait until no worker is in a session (the workers themselves stay)."""
        wait_for(lambda: not self.sessions(), timeout, "serve's sessions to end")

    def signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout):
        return self.proc.wait(timeout=timeout)

    def refused(self) -> bool:
        """True when a new connection is refused outright."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    def stop(self):
        for c in self.clients:
            c.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        # sessions, plugins and queue programs still around belong to the group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_serve(home, base, *args, **kw) -> ServeServer:
    return ServeServer(home, base, *args, **kw).start()


__all__ = ["ServeServer", "start_serve"]
