"""End-to-end harness: a real tcpserver, real qspp processes, a recording queue program.

Fixtures
--------
home    QmailHome in tmp_path, set up as fixture F of qmail-smtpd.md §9: control/me =
        mx.example.org, rcpthosts = example.org and .example.net, an empty smtpplugins,
        TCPREMOTEIP / TCPLOCALIP / TCPREMOTEHOST as in F, QMAILQUEUE = the recorder.
        Change control files with home.control(name, data) and the environment of
        qspp with home.setenv(NAME=value or None); both apply to the next connection.
smtpd   TcpServer for that home: `tcpserver -v -R -H -l 0 127.0.0.1 PORT wrapper`.
        smtpd.connect() returns a Client (the greeting G is read and checked).
        The wrapper sources the current environment settings at every connection
        and records qspp's pid, stderr and exit status under the client's port.
        smtpd.connect(source="127.0.0.2") connects from another loopback address.
spp_home
        `home` turned into the fixture of spp.md §7 (control/me test.example, ...).
rules_smtpd
        Factory rules_smtpd(rules_text) -> RulesTcpServer: like smtpd, but tcpserver
        runs with `-x rules.cdb` built by the real tcprules from rules_text, and the
        variables the rules set reach qspp from tcpserver, not from the wrapper.
home.python_plugin(rel, source) writes an executable `#!<real python> -I` plugin.

The recorder (home.recorder) saves fd 0 as PID.M, fd 1 as PID.E, its environment
as PID.env and its cwd as PID.cwd in home.queue, then exits with $CODE (default
0). QMODE=segv makes it kill itself with SIGSEGV after recording; QMODE=unread
makes it exit 0 at once without reading anything.
"""

import calendar
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PYTHON = sys.executable
# The interpreter behind the venv, for plugin `#!` lines (spp.md §8: a real one, -I).
REAL_PYTHON = os.path.realpath(sys.executable)
TCPSERVER = shutil.which("tcpserver")
TCPRULES = shutil.which("tcprules")

G = b"mx.example.org"
GREETING = b"220 mx.example.org ESMTP\r\n"

# Fixture F's environment; everything qspp reads is listed so that nothing leaks in
# from the environment pytest runs in.
F_ENV = {
    "TCPREMOTEIP": "192.0.2.7",
    "TCPLOCALIP": "198.51.100.1",
    "TCPREMOTEHOST": "client.example.com",
}
MANAGED = [
    "TCPREMOTEIP", "TCPLOCALIP", "TCPLOCALHOST", "TCPREMOTEHOST", "TCPREMOTEINFO",
    "RELAYCLIENT", "DATABYTES", "QMAILHOME", "QMAILQUEUE", "SMTPAUTH", "TLSCIPHERS",
    "NOSPP", "SPPCONFFILE", "SPPTIMEOUT", "SPPLOG", "CODE", "QMODE",
    "NOMILTER", "MILTERS",
]

DATE_RE = re.compile(
    rb"; ((?:[1-9]|[12][0-9]|3[01]) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    rb" (\d{4}) (\d\d):(\d\d):(\d\d)) -0000\n"
)
MONTHS = [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
          b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"]
QP_RE = re.compile(rb"250 ok (\d+) qp (\d+)\r\n")

RECORDER = """#!/bin/sh
# e2e recorder standing in for qmail-queue (see tests/e2e/conftest.py)
q={queue}
: >"$q/$$.start"
if [ "$QMODE" = unread ]; then : >"$q/$$.done"; exit 0; fi
cat >"$q/$$.M"
cat 0<&1 >"$q/$$.E"
env -0 >"$q/$$.env"
pwd -P >"$q/$$.cwd"
: >"$q/$$.done"
if [ "$QMODE" = segv ]; then kill -SEGV $$; fi
exit "${{CODE:-0}}"
"""

WRAPPER = """#!/bin/sh
# one qspp connection under tcpserver: pid, stderr and exit status by client port
s={state}
p="$TCPREMOTEPORT"
. "$s/envsetup"
sh -c 'echo $$ >"$0"; exec "$@"' "$s/$p.pid" "$@" 2>"$s/$p.err"
echo $? >"$s/$p.st"
mv "$s/$p.st" "$s/$p.status"
"""


def _b(v):
    if isinstance(v, bytes):
        return v
    return str(v).encode("utf-8", "surrogateescape")


class ProcStat:
    """The fields of /proc/PID/stat the tests look at."""

    __slots__ = ("state", "ppid", "pgrp", "session")

    def __init__(self, state, ppid, pgrp, session):
        self.state, self.ppid, self.pgrp, self.session = state, ppid, pgrp, session


def proc_stat(pid):
    """ProcStat of a pid (zombies included), or None once it is gone."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as f:
            st = f.read()
    except OSError:
        return None
    fields = st[st.rindex(b")") + 2:].split()
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[3]))


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, timeout=10):
    """End a daemon a test started (by its pid): SIGTERM, SIGKILL after TIMEOUT."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if r:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def normalize_date(m: bytes) -> bytes:
    """Replace the Received line's date by <D>, checking it is a §6.5 date close to now."""
    match = DATE_RE.search(m)
    assert match, f"no §6.5 date in {m[:300]!r}"
    day = int(match.group(1).split(b" ")[0])
    mon = MONTHS.index(match.group(2)) + 1
    year, hh, mm, ss = (int(match.group(i)) for i in (3, 4, 5, 6))
    t = calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0))
    assert abs(t - time.time()) < 300, f"Received date {match.group(1)!r} is not now (UTC)"
    return m[:match.start()] + b"; <D>\n" + m[match.end():]


class Run:
    """One execution of the recorder."""

    def __init__(self, queue: Path, pid: int):
        self.pid = pid

        def get(ext):
            p = queue / f"{pid}.{ext}"
            return p.read_bytes() if p.exists() else None

        self.M = get("M")
        self.E = get("E")
        env = get("env")
        self.env = None if env is None else dict(
            e.split(b"=", 1) for e in env.split(b"\0") if e)
        cwd = get("cwd")
        self.cwd = None if cwd is None else cwd.rstrip(b"\n")

    @property
    def message(self) -> bytes:
        """M with the Received date replaced by `<D>`."""
        assert self.M is not None, f"recorder {self.pid} saved no message"
        return normalize_date(self.M)

    def __repr__(self):
        return f"Run(pid={self.pid}, E={self.E!r}, M={self.M!r:.200})"


class QmailHome:
    def __init__(self, base: Path):
        self.base = base
        self.root = base / "qmail"
        (self.root / "control").mkdir(parents=True)
        (self.root / "bin").mkdir()
        self.queue = base / "queue"
        self.queue.mkdir()
        self.recorder = base / "recorder"
        self.recorder.write_text(RECORDER.format(queue=shlex.quote(str(self.queue))))
        self.recorder.chmod(0o755)
        self.env = dict(F_ENV, QMAILHOME=str(self.root), QMAILQUEUE=str(self.recorder))
        self.args = []
        self._taken = set()
        self.control("me", "mx.example.org\n")
        self.control("rcpthosts", "example.org\n.example.net\n")
        self.control("smtpplugins", "")

    # -- files --------------------------------------------------------------
    def control(self, name: str, data):
        """Write control/NAME (bytes or str); None removes it (file or directory)."""
        self.write("control/" + name, data)

    def write(self, rel: str, data, mode=None):
        p = self.root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        if data is None:
            return p
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_b(data))
        if mode is not None:
            p.chmod(mode)
        return p

    def mkdir(self, rel: str):
        self.write(rel, None)
        (self.root / rel).mkdir(parents=True)

    def install_recorder(self, rel="bin/qmail-queue"):
        self.write(rel, self.recorder.read_bytes(), mode=0o755)

    def python_plugin(self, rel: str, source: str):
        """Write an executable Python plugin at REL (under the home): `#!REAL_PYTHON -I`
        followed by SOURCE."""
        return self.write(rel, "#!%s -I\n%s" % (REAL_PYTHON, source), mode=0o755)

    def cdb(self, rel: str, records: dict):
        """Write a djb cdb (tinycdb's `cdb -c` if present, else our own writer)."""
        p = self.write(rel, None)
        tool = shutil.which("cdb")
        if tool:
            lines = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v)
                             for k, v in ((_b(k), _b(v)) for k, v in records.items()))
            subprocess.run([tool, "-c", str(p)], input=lines + b"\n", check=True)
        else:
            p.write_bytes(make_cdb({_b(k): _b(v) for k, v in records.items()}))

    # -- environment --------------------------------------------------------
    def setenv(self, **kw):
        """NAME=str/bytes sets, NAME=None unsets (for the next connection)."""
        for k, v in kw.items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = v

    def full_env(self) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC)}
        for k, v in self.env.items():
            env[k] = v if isinstance(v, str) else v.decode("utf-8", "surrogateescape")
        return env

    def command(self):
        return [PYTHON, "-m", "qspp.smtpd", *self.args]

    def run_pipes(self, data: bytes, timeout=30):
        """Run qspp on two pipes (no tcpserver): CompletedProcess with stdout/stderr bytes."""
        return subprocess.run(self.command(), input=data, capture_output=True,
                              env=self.full_env(), cwd=str(self.base), timeout=timeout)

    # -- recorder runs ------------------------------------------------------
    def run(self, pid: int, timeout=5) -> Run:
        wait_for(lambda: (self.queue / f"{pid}.done").exists(), timeout,
                 f"recorder pid {pid} to finish")
        self._taken.add(pid)
        return Run(self.queue, pid)

    def started(self):
        return {int(p.name.split(".")[0]) for p in self.queue.glob("*.start")}

    def new_runs(self, n=1, timeout=5):
        """Wait for exactly n recorder runs not yet taken; return them."""
        def ready():
            pids = {int(p.name.split(".")[0]) for p in self.queue.glob("*.done")}
            fresh = pids - self._taken
            return fresh if len(fresh) >= n else None
        fresh = wait_for(ready, timeout, f"{n} recorder run(s)")
        assert len(fresh) == n, f"expected {n} new recorder runs, got {sorted(fresh)}"
        self._taken |= fresh
        return [Run(self.queue, p) for p in sorted(fresh)]

    def assert_no_new_runs(self):
        fresh = self.started() - self._taken
        assert not fresh, f"queue program unexpectedly started: {sorted(fresh)}"


def make_cdb(records: dict) -> bytes:
    """A djb cdb with the given records (used only when tinycdb is missing)."""
    def h(key):
        v = 5381
        for c in key:
            v = ((v * 33) & 0xFFFFFFFF) ^ c
        return v
    body = bytearray()
    pos = 2048
    tables = [[] for _ in range(256)]
    for k, v in records.items():
        tables[h(k) & 255].append((h(k), pos))
        rec = len(k).to_bytes(4, "little") + len(v).to_bytes(4, "little") + k + v
        body += rec
        pos += len(rec)
    header = bytearray()
    out = bytearray()
    for t in tables:
        n = len(t) * 2
        slots = [(0, 0)] * n
        for hv, rp in t:
            i = (hv >> 8) % n
            while slots[i][1]:
                i = (i + 1) % n
            slots[i] = (hv, rp)
        header += pos.to_bytes(4, "little") + n.to_bytes(4, "little")
        for hv, rp in slots:
            out += hv.to_bytes(4, "little") + rp.to_bytes(4, "little")
        pos += 8 * n
    return bytes(header + body + out)


class Client:
    """A raw SMTP client on one connection."""

    def __init__(self, server, timeout=5.0, source=None):
        self.server = server
        self.home = server.home
        self.timeout = timeout
        self.t0 = time.time()
        # source: the client's own address (any 127.x.y.z works on loopback), for
        # tcprules that match on it
        self.sock = socket.create_connection(
            ("127.0.0.1", server.port), timeout=timeout,
            source_address=None if source is None else (source, 0))
        self.port = self.sock.getsockname()[1]
        self.buf = b""
        self.eof = False

    # -- sending ------------------------------------------------------------
    def send(self, data: bytes):
        self.sock.sendall(data)

    def cmd(self, line: bytes, timeout=None) -> bytes:
        """Send LINE + CRLF, return the complete reply (all its lines, CRLFs included)."""
        self.send(line + b"\r\n")
        return self.reply(timeout)

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- receiving ----------------------------------------------------------
    def _fill(self, timeout) -> bool:
        """Read more bytes; False at EOF. Raises AssertionError on timeout."""
        if self.eof:
            return False
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"no reply within {self.sock.gettimeout()}s; pending {self.buf!r}")
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self, timeout=None) -> bytes:
        while b"\n" not in self.buf:
            if not self._fill(timeout):
                raise AssertionError(f"EOF while waiting for a reply line; pending {self.buf!r}")
        i = self.buf.index(b"\n") + 1
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def reply(self, timeout=None) -> bytes:
        out = b""
        while True:
            ln = self.line(timeout)
            out += ln
            if ln[3:4] != b"-":
                return out

    def replies(self, n, timeout=None):
        return [self.reply(timeout) for _ in range(n)]

    def expect(self, *replies, timeout=None):
        """Read one reply per argument and compare exactly (CRLF added if missing)."""
        for want in replies:
            if not want.endswith(b"\n"):
                want += b"\r\n"
            got = self.reply(timeout)
            assert got == want

    def rest(self, timeout=None) -> bytes:
        """Everything up to EOF."""
        while self._fill(timeout):
            pass
        out, self.buf = self.buf, b""
        return out

    def silent(self, wait=0.3):
        """Assert that nothing arrives (and no EOF) within WAIT seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        raise AssertionError(f"unexpected output {data!r}")

    # -- the qspp process ---------------------------------------------------
    def _state(self, ext):
        return self.server.state / f"{self.port}.{ext}"

    def status(self, timeout=10) -> int:
        p = self._state("status")
        wait_for(p.exists, timeout, f"qspp exit status (port {self.port})")
        return int(p.read_text())

    def pid(self, timeout=5) -> int:
        p = self._state("pid")
        wait_for(lambda: p.exists() and p.read_text().strip(), timeout, "qspp pid")
        return int(p.read_text())

    def stderr(self, timeout=10) -> bytes:
        self.status(timeout)
        return self._state("err").read_bytes()

    def stderr_lines(self, timeout=10):
        err = self.stderr(timeout)
        assert err == b"" or err.endswith(b"\n"), err
        return err.splitlines()

    def assert_clean_exit(self, status, timeout=10):
        assert self.status(timeout) == status
        assert self.stderr() == b""

    # -- transactions -------------------------------------------------------
    def queued(self, reply: bytes) -> Run:
        """Check REPLY is exactly `250 ok T qp P`, T now, P the recorder's pid."""
        m = QP_RE.fullmatch(reply)
        assert m, f"not a 250 ok T qp P reply: {reply!r}"
        t, pid = int(m.group(1)), int(m.group(2))
        assert self.t0 - 2 <= t <= time.time() + 2, f"T={t} is not now"
        assert (self.home.queue / f"{pid}.start").exists(), f"P={pid} is not the recorder's pid"
        return self.home.run(pid)

    def txn(self, mail=b"MAIL FROM:<a@b>", rcpts=(b"RCPT TO:<x@example.org>",),
            body=b"hi\r\n") -> Run:
        """MAIL, RCPTs, DATA, BODY, `.`: all must succeed; return the recorder's run."""
        self.send(mail + b"\r\n")
        self.expect(b"250 ok")
        for r in rcpts:
            self.send(r + b"\r\n")
            self.expect(b"250 ok")
        self.send(b"DATA\r\n")
        self.expect(b"354 go ahead")
        self.send(body + b".\r\n")
        return self.queued(self.reply())


class TcpServer:
    # extra tcpserver options (before the address) and the variables the wrapper
    # must leave as tcpserver set them (see RulesTcpServer)
    options = ()
    passthrough = frozenset()

    def __init__(self, home: QmailHome, base: Path):
        self.home = home
        self.state = base / "state"
        self.state.mkdir()
        self.wrapper = base / "wrapper"
        self.wrapper.write_text(WRAPPER.format(state=shlex.quote(str(self.state))))
        self.wrapper.chmod(0o755)
        self.log = base / "tcpserver.log"
        self.proc = None
        self.port = None
        self.clients = []

    def _write_envsetup(self):
        lines = ["unset " + " ".join(n for n in MANAGED if n not in self.passthrough)]
        lines.append("export PYTHONPATH=" + shlex.quote(str(SRC)))
        for k, v in self.home.env.items():
            assert k not in self.passthrough, f"{k} is set by the tcprules, not home.setenv"
            v = v if isinstance(v, str) else v.decode("utf-8", "surrogateescape")
            lines.append(f"export {k}={shlex.quote(v)}")
        lines.append("set -- " + " ".join(shlex.quote(a) for a in self.home.command()))
        tmp = self.state / "envsetup.tmp"
        tmp.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
        tmp.rename(self.state / "envsetup")

    def start(self):
        if TCPSERVER is None:
            if os.environ.get("CI"):
                pytest.fail("tcpserver (ucspi-tcp) is not installed")
            pytest.skip("tcpserver (ucspi-tcp) is not installed")
        self._write_envsetup()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for _ in range(20):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with open(self.log, "wb") as log:
                proc = subprocess.Popen(
                    [TCPSERVER, "-v", "-R", "-H", "-l", "0", *self.options,
                     "127.0.0.1", str(port), str(self.wrapper)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    env=env, start_new_session=True)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if b"status: 0/" in self.log.read_bytes():
                    self.proc, self.port = proc, port
                    return
                if proc.poll() is not None:
                    break  # most likely the port was taken meanwhile: try another
                time.sleep(0.005)
            else:
                self._kill(proc)
        raise RuntimeError("could not start tcpserver: " + self.log.read_text(errors="replace"))

    def connect(self, greet=GREETING, timeout=5.0, source=None) -> Client:
        """Connect; if GREET is not None, read the first reply and compare it exactly.
        SOURCE: the client address to connect from (default: the system's choice,
        127.0.0.1)."""
        if self.proc is None:
            self.start()
        else:
            self._write_envsetup()
        c = Client(self, timeout, source)
        self.clients.append(c)
        if greet is not None:
            assert c.reply() == greet
        return c

    @staticmethod
    def _kill(proc):
        # tcpserver leads its own session: the group holds it, the wrappers, qspp and
        # the recorders; all of them were started by this fixture.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                continue
        proc.wait()

    def stop(self):
        for c in self.clients:
            c.close()
        if self.proc is None:
            return
        # let the per-connection children finish on their own first
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            pids = {p.name.split(".")[0] for p in self.state.glob("*.pid")}
            done = {p.name.split(".")[0] for p in self.state.glob("*.status")}
            if pids <= done:
                break
            time.sleep(0.02)
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class RulesTcpServer(TcpServer):
    """A TcpServer started with `-x rules.cdb`, the cdb built by the real tcprules
    from RULES (tcprules(1) syntax, e.g. `127.0.0.1:allow,NOSPP=""`).

    The variables the rules set (NOSPP, SPPCONFFILE, ...) pass through the wrapper
    untouched, so qspp sees exactly what tcpserver set from the matching rule; they
    must not also be given with home.setenv."""

    def __init__(self, home: QmailHome, base: Path, rules: str):
        base.mkdir()
        super().__init__(home, base)
        if TCPRULES is None:
            if os.environ.get("CI"):
                pytest.fail("tcprules (ucspi-tcp) is not installed")
            pytest.skip("tcprules (ucspi-tcp) is not installed")
        self.rules = rules
        self.cdb = base / "rules.cdb"
        subprocess.run([TCPRULES, str(self.cdb), str(base / "rules.tmp")],
                       input=rules.encode("utf-8", "surrogateescape"), check=True,
                       stdout=subprocess.DEVNULL, timeout=10)
        self.options = ("-x", str(self.cdb))
        self.passthrough = frozenset(re.findall(r"[:,]([A-Za-z_][A-Za-z0-9_]*)=", rules))


@pytest.fixture
def home(tmp_path) -> QmailHome:
    return QmailHome(tmp_path)


@pytest.fixture
def spp_home(home) -> QmailHome:
    """The fixture of spp.md §7 on top of `home`: control/me = test.example,
    rcpthosts = example.com, badmailfrom = bad@spam.example, TCPREMOTEIP=192.0.2.1,
    TCPREMOTEHOST=client.example, TCPLOCALIP=127.0.0.1, QMAILQUEUE = the recorder,
    an empty smtpplugins. Greeting: `220 test.example ESMTP`."""
    home.control("me", "test.example\n")
    home.control("rcpthosts", "example.com\n")
    home.control("badmailfrom", "bad@spam.example\n")
    home.setenv(TCPREMOTEIP="192.0.2.1", TCPREMOTEHOST="client.example",
                TCPLOCALIP="127.0.0.1")
    return home


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _report_connections(server, request):
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        # shown under "Captured stdout teardown": what each qspp process said and returned
        for err in sorted(server.state.glob("*.err")):
            port = err.name.split(".")[0]
            st = server.state / f"{port}.status"
            status = st.read_text().strip() if st.exists() else "?"
            print(f"connection port {port}: exit {status}, stderr {err.read_bytes()!r}")


@pytest.fixture
def smtpd(home, tmp_path, request):
    server = TcpServer(home, tmp_path)
    yield server
    server.stop()
    _report_connections(server, request)


@pytest.fixture
def rules_smtpd(home, tmp_path, request):
    """Factory: rules_smtpd(rules_text) -> a started RulesTcpServer for `home`
    (tcpserver -x on a cdb that tcprules built from RULES_TEXT). Each call starts
    its own server; all are stopped at teardown."""
    servers = []

    def start(rules_text: str) -> RulesTcpServer:
        server = RulesTcpServer(home, tmp_path / f"rules{len(servers)}", rules_text)
        servers.append(server)
        server.start()
        return server
    yield start
    for server in servers:
        server.stop()
        _report_connections(server, request)


class Sender(threading.Thread):
    """Sends a large byte string in the background while the test reads replies."""

    def __init__(self, client, data):
        super().__init__(daemon=True)
        self.client, self.data, self.error = client, data, None

    def run(self):
        try:
            self.client.sock.sendall(self.data)
        except OSError as e:
            self.error = e


@pytest.fixture
def background_send():
    threads = []

    def start(client, data):
        t = Sender(client, data)
        t.start()
        threads.append(t)
        return t
    yield start
    for t in threads:
        t.join(timeout=10)
