"""The install files in scripts/: daemontools and runit run files, the systemd
units and qspp-tcpenv. The run files are started for real with their knobs
pointing at a home in tmp_path and a free port on 127.0.0.1."""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
SRC = REPO / "src"
PYTHON = os.path.realpath(sys.executable)
TCPRULES = shutil.which("tcprules")

RUN_FILES = sorted(p for p in SCRIPTS.glob("*/qspp-*/run")) + sorted(
    SCRIPTS.glob("*/qspp-*/log/run"))
UNITS = SCRIPTS / "systemd"

# a [connection] plugin that shows, before the greeting, what the session got
SHOW_ENV = ('[connection]\n:echo "P220-relay=${RELAYCLIENT-unset} spplog=${SPPLOG-unset}'
            ' ip=$TCPREMOTEIP local=$TCPLOCALIP proto=${PROTO-unset}'
            ' host=${TCPREMOTEHOST-unset}"\n')



def make_home(base):
    h = base / "qmail"
    (h / "control").mkdir(parents=True)
    (h / "bin").mkdir()
    (h / "control" / "me").write_bytes(b"test.example\n")
    (h / "control" / "rcpthosts").write_bytes(b"example.com\n")
    (h / "control" / "smtpplugins").write_text(SHOW_ENV)
    (h / "bin" / "qmail-queue").write_bytes(b"#!/bin/sh\nexit 0\n")
    (h / "bin" / "qmail-queue").chmod(0o755)
    return h


def make_rules(base, text):
    if TCPRULES is None:
        pytest.skip("tcprules is not installed")
    cdb = base / "rules.cdb"
    subprocess.run([TCPRULES, str(cdb), str(base / "rules.tmp")], input=text.encode(),
                   check=True, timeout=10)
    return cdb


def service(base, name, kind, knobs):
    """A copy of scripts/KIND/NAME as a service directory with ./env knobs."""
    svc = base / "service" / name
    shutil.copytree(SCRIPTS / kind / name, svc)
    (svc / "env").mkdir()
    for k, v in knobs.items():
        (svc / "env" / k).write_text(v + "\n" if v else "")
    return svc


def connect(port, proc, log, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("no listener; run printed %r" % log.read_bytes())
            time.sleep(0.05)


def start(svc, log):
    return subprocess.Popen(["./run"], cwd=str(svc), stdin=subprocess.DEVNULL,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                            start_new_session=True)


def stop(proc):
    # the run file execs tcpserver or qspp serve, which leads the session we made
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def session(sock):
    """Greeting lines, then QUIT; the greeting."""
    with sock:
        f = sock.makefile("rwb")
        greeting = []
        while True:
            line = f.readline()
            greeting.append(line)
            if line[3:4] != b"-":
                break
        f.write(b"QUIT\r\n")
        f.flush()
        assert f.readline() == b"221 test.example\r\n"
        assert f.read() == b""
    return greeting


def wait_for_text(path, text, timeout=10):
    deadline = time.monotonic() + timeout
    while text not in path.read_bytes():
        assert time.monotonic() < deadline, path.read_bytes()
        time.sleep(0.05)


# --- the files themselves ------------------------------------------------------

def test_run_files_are_executable_sh():
    names = {str(p.relative_to(SCRIPTS)) for p in RUN_FILES}
    assert names == {"%s/%s/%s" % (kind, svc, f) for kind in ("daemontools", "runit")
                     for svc in ("qspp-smtpd", "qspp-serve") for f in ("run", "log/run")}
    for p in RUN_FILES + [SCRIPTS / "qspp-swap"]:
        assert os.stat(p).st_mode & 0o111 == 0o111, p
        assert p.read_bytes().startswith(b"#!/bin/sh\n"), p
        r = subprocess.run(["sh", "-n", str(p)], capture_output=True, timeout=10)
        assert (r.returncode, r.stderr) == (0, b""), p


def test_runit_files_match_daemontools():
    # the tcpserver run file is the same file for both; serve differs in
    # comments only (it drops privileges itself; the upgrade command); the loggers are each system's own
    dt, ru = SCRIPTS / "daemontools", SCRIPTS / "runit"
    assert (ru / "qspp-smtpd/run").read_bytes() == (dt / "qspp-smtpd/run").read_bytes()
    a = (dt / "qspp-serve/run").read_text().splitlines()
    b = (ru / "qspp-serve/run").read_text().splitlines()
    assert [(x, y) for x, y in zip(a, b) if x != y] == [
        ("# supervise runs this from the service directory.",
         "# runsv runs this from the service directory (runit)."),
        ("#   svc -2 /service/qspp-serve", "#   sv 2 qspp-serve"),
        ("# which supervise keeps supervising, with its listening socket open: clients",
         "# which runsv keeps supervising, with its listening socket open: clients")]
    assert len(a) == len(b)
    for svc in ("qspp-smtpd", "qspp-serve"):
        assert (dt / svc / "log/run").read_text().splitlines()[-1] == (
            "exec setuidgid qmaill multilog t s1000000 n20 ./main")
        assert (ru / svc / "log/run").read_text().splitlines()[-1] == (
            "exec chpst -u qmaill svlogd -tt ./main")


def test_run_file_tcpserver_line():
    text = (SCRIPTS / "daemontools/qspp-smtpd/run").read_text()
    assert text.splitlines()[-3:] == [
        'exec tcpserver $TCPSERVER_OPTS -l "$LOCAL" "$@" -c "$MAXSMTPD" \\',
        '    -u "$QMAILDUID" -g "$NOFILESGID" "$IP" "$PORT" \\',
        '    "$PYTHON" -m qspp.smtpd $ARGS']
    assert "PYTHON=${PYTHON:-/usr/bin/python3}" in text


# --- the run files, started ---------------------------------------------------

def knobs(home, port, **more):
    k = {"QMAILHOME": str(home), "PYTHON": PYTHON, "PYTHONPATH": str(SRC),
         "IP": "127.0.0.1", "PORT": str(port), "RETRY_DELAY": "0"}
    k.update(more)
    return k


@pytest.mark.skipif(shutil.which("tcpserver") is None, reason="tcpserver is not installed")
def test_smtpd_run_file(tmp_path):
    home = make_home(tmp_path)
    rules = make_rules(tmp_path, '127.0.0.1:allow,RELAYCLIENT="@r"\n:deny\n')
    port = free_port()
    svc = service(tmp_path, "qspp-smtpd", "daemontools", knobs(
        home, port, RULES=str(rules), QMAILDUID=str(os.getuid()), NOFILESGID=str(os.getgid()),
        TCPSERVER_OPTS="-v -R -H"))
    log = tmp_path / "log"
    proc = start(svc, log)
    try:
        greeting = session(connect(port, proc, log))
        assert greeting == [
            b"220-relay=@r spplog=text ip=127.0.0.1 local=127.0.0.1 proto=TCP host=unset\r\n",
            b"220 test.example ESMTP\r\n"]
        # stderr reaches the log: tcpserver's lines and qspp's summary
        wait_for_text(log, b" spp-summary ip=127.0.0.1 host=unknown helo=- ")
    finally:
        stop(proc)
    out = log.read_bytes()
    # `qspp check` ran first and found nothing wrong
    assert b"\ncheck: 0 errors, 0 warnings, 0 notes\n" in out
    assert b"tcpserver: status: 1/20\n" in out


@pytest.mark.skipif(shutil.which("tcpserver") is None, reason="tcpserver is not installed")
def test_smtpd_run_file_spplog_off_and_no_rules(tmp_path):
    home = make_home(tmp_path)
    port = free_port()
    svc = service(tmp_path, "qspp-smtpd", "runit", knobs(
        home, port, RULES="none", SPPLOG="off", CHECK="no", MAXSMTPD="3",
        QMAILDUID=str(os.getuid()), NOFILESGID=str(os.getgid()), TCPSERVER_OPTS="-v -R -H"))
    log = tmp_path / "log"
    proc = start(svc, log)
    try:
        greeting = session(connect(port, proc, log))
        assert greeting[0] == (b"220-relay=unset spplog=unset ip=127.0.0.1 local=127.0.0.1"
                               b" proto=TCP host=unset\r\n")
        wait_for_text(log, b"tcpserver: status: 0/3\n")
    finally:
        stop(proc)
    assert b"check:" not in log.read_bytes()
    assert b"spp-summary" not in log.read_bytes()


@pytest.mark.parametrize("remove, why", [
    ("control/rcpthosts", b"%s/control/rcpthosts is missing: that would be an open relay"),
    ("control/me", b"%s/control/me is missing or empty"),
])
def test_smtpd_run_file_refuses_to_start(tmp_path, remove, why):
    home = make_home(tmp_path)
    (home / remove).unlink()
    svc = service(tmp_path, "qspp-smtpd", "daemontools", knobs(
        home, free_port(), QMAILDUID="0", NOFILESGID="0"))
    r = subprocess.run(["./run"], cwd=str(svc), capture_output=True, timeout=30,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert r.returncode == 111
    assert r.stdout == b"qspp-smtpd: " + why % bytes(home) + b"; not starting\n"
    assert r.stderr == b""


def test_serve_run_file(tmp_path):
    home = make_home(tmp_path)
    rules = make_rules(tmp_path, '127.0.0.1:allow,RELAYCLIENT="@s"\n')
    port = free_port()
    svc = service(tmp_path, "qspp-serve", "daemontools", knobs(
        home, port, RULES=str(rules), SMTPUSER="root", SPPLOG="json", MAXSMTPD="2"))
    log = tmp_path / "log"
    proc = start(svc, log)
    try:
        greeting = session(connect(port, proc, log))
        assert greeting == [
            b"220-relay=@s spplog=json ip=127.0.0.1 local=127.0.0.1 proto=TCP host=unset\r\n",
            b"220 test.example ESMTP\r\n"]
        wait_for_text(log, b'{"event":"spp-summary","ip":"127.0.0.1"')
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert b"\ncheck: 0 errors, 0 warnings, 0 notes\n" in log.read_bytes()


def test_serve_run_files_say_serve_drops_privileges():
    # issue 11: they said "qspp serve cannot drop privileges itself yet", but
    # --user works: the run file now hands SMTPUSER to it
    for kind in ("daemontools", "runit"):
        text = (SCRIPTS / kind / "qspp-serve/run").read_text()
        assert "cannot drop privileges" not in text
        assert "setuidgid $SMTPUSER" not in text and "chpst -u $SMTPUSER" not in text
        assert 'set -- "$@" --user "$SMTPUSER"' in text
        assert "ip_unprivileged_port_start" not in text


@pytest.mark.skipif(os.getuid() != 0, reason="switching users needs root")
def test_serve_run_file_binds_as_root_and_drops_to_smtpuser():
    import pwd
    nobody = pwd.getpwnam("nobody")
    # the session user must reach the home: pytest's tmp_path is root-only
    base = Path(tempfile.mkdtemp(prefix="qspp-drop-"))
    try:
        base.chmod(0o755)
        home = make_home(base)
        port = free_port()
        svc = service(base, "qspp-serve", "runit", knobs(
            home, port, RULES="none", SMTPUSER="nobody", CHECK="no"))
        log = base / "log"
        proc = start(svc, log)
        try:
            greeting = session(connect(port, proc, log))
            assert greeting[-1] == b"220 test.example ESMTP\r\n"
            status = Path("/proc/%d/status" % proc.pid).read_text()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
            gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
            assert set(uids) == {str(nobody.pw_uid)}, status
            assert set(gids) == {str(nobody.pw_gid)}, status
        finally:
            stop(proc)
    finally:
        shutil.rmtree(base)


# --- scripts/run-local ------------------------------------------------------------

def test_run_local_starts_in_under_a_second_and_delivers(tmp_path):
    # issue 11: it ran `pip install` into .venv on every start (seconds); now it
    # runs the checkout's src with python3 and installs nothing
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "QSPP_PORT": str(port),
           "QSPP_MAILDIR": str(tmp_path / "Maildir")}
    log = tmp_path / "log"
    took = []
    for attempt in range(2):
        started = time.monotonic()
        proc = subprocess.Popen([str(SCRIPTS / "run-local")], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                                start_new_session=True)
        try:
            sock = connect(port, proc, log)
            took.append(time.monotonic() - started)
            with sock:
                f = sock.makefile("rwb")
                assert f.readline() == b"220 localhost ESMTP\r\n"
                f.write(b"HELO h\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<you@localhost>\r\n"
                        b"DATA\r\nSubject: run-local %d\r\n\r\nhi\r\n.\r\nQUIT\r\n" % attempt)
                f.flush()
                replies = f.read()
            assert re.fullmatch(rb"250 localhost\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
                                rb"250 ok \d+ qp \d+\r\n221 localhost\r\n", replies), replies
        finally:
            stop(proc)
    text = log.read_bytes()
    assert b"in the foreground (Ctrl-C stops it)" in text
    assert b"pip" not in text and not (tmp_path / ".venv").exists()
    assert len(os.listdir(tmp_path / "Maildir" / "new")) == 2
    # the second start: nothing changed since the first
    assert took[1] < 1.0, took


def test_run_local_and_quick_start_need_no_sudo():
    # a root-only Debian box has no sudo
    assert "sudo" not in (SCRIPTS / "run-local").read_text()
    readme = (REPO / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):]
    quick = quick[:quick.index("\n## ", 1)]
    assert "sudo apt-get" not in quick.replace("`sudo apt-get ...`", "")
    assert "apt-get install -y ucspi-tcp swaks" in quick
    assert "foreground" in quick and "Ctrl-C" in quick


# --- systemd -------------------------------------------------------------------

def unit(name):
    """{section: [(key, value)]} of a unit file, continuation lines joined."""
    sections = {}
    current = None
    text = (UNITS / name).read_text().replace("\\\n", "")
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), [])
            continue
        key, _, value = line.partition("=")
        current.append((key, value))
    return sections


def test_systemd_units_key_lines():
    sock = dict(unit("qspp-smtpd.socket")["Socket"])
    assert (sock["ListenStream"], sock["Accept"]) == ("0.0.0.0:25", "yes")
    svc = dict(unit("qspp-smtpd@.service")["Service"])
    assert svc["ExecStart"].split() == [
        "/usr/bin/python3", "/usr/libexec/qspp/qspp-tcpenv", "-x", "/etc/tcp.smtp.cdb"]
    assert (svc["StandardInput"], svc["StandardOutput"], svc["StandardError"]) == (
        "socket", "socket", "journal")
    assert (svc["User"], svc["Group"]) == ("qmaild", "nofiles")
    assert "NoNewPrivileges" not in svc  # qmail-queue is setuid
    serve = dict(unit("qspp-serve.service")["Service"])
    assert serve["ExecStart"].split() == [
        "/usr/bin/qspp", "serve", "--host", "0", "--port", "25",
        "--concurrency", "20", "--rules", "/etc/tcp.smtp.cdb", "--qmailhome", "/var/qmail",
        "--log", "text"]
    assert (serve["User"], serve["AmbientCapabilities"], serve["KillMode"]) == (
        "qmaild", "CAP_NET_BIND_SERVICE", "mixed")
    assert serve["ExecReload"] == "/bin/kill -USR2 $MAINPID"
    assert "NoNewPrivileges" not in serve
    assert unit("qspp-serve.service")["Install"] == [("WantedBy", "multi-user.target")]
    assert unit("qspp-smtpd.socket")["Install"] == [("WantedBy", "sockets.target")]


def test_serve_unit_options_exist():
    # every option the unit and the run files pass is one qspp serve knows
    r = subprocess.run([PYTHON, "-m", "qspp.cli", "serve", "--help"], capture_output=True,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=30)
    assert r.returncode == 0, r.stderr
    for option in ("--host", "--port", "--concurrency", "--rules", "--qmailhome", "--log"):
        assert option.encode() in r.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path):
    # verify wants the ExecStart programs to exist: point them at this python
    qspp = tmp_path / "qspp"
    qspp.write_text("#!/bin/sh\n")
    qspp.chmod(0o755)

    def local(text):
        return text.replace("/usr/bin/python3", PYTHON).replace("/usr/bin/qspp ", "%s " % qspp)

    for name in ("qspp-smtpd.socket", "qspp-serve.service"):
        (tmp_path / name).write_text(local((UNITS / name).read_text()))
    # a template is verified through an instance
    (tmp_path / "qspp-smtpd@.service").write_text(local((UNITS / "qspp-smtpd@.service").read_text()))
    shutil.copy(tmp_path / "qspp-smtpd@.service", tmp_path / "qspp-smtpd@1.service")
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        str(tmp_path / "qspp-smtpd.socket"),
                        str(tmp_path / "qspp-smtpd@1.service"),
                        str(tmp_path / "qspp-serve.service")],
                       capture_output=True, timeout=60, cwd=str(tmp_path))
    complaints = [line for line in r.stderr.decode().splitlines()
                  if "qspp" in line and ("Unknown" in line or "Failed" in line
                                         or "Invalid" in line or "not executable" in line)]
    assert complaints == []
    assert r.returncode == 0, r.stderr


# --- qspp-tcpenv ---------------------------------------------------------------

def tcpenv(tmp_path, *args, env=None):
    """Accept one connection on 127.0.0.1 and run qspp-tcpenv on it, as systemd
    would with Accept=yes; returns (client socket, process)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=10)
    conn, _ = listener.accept()
    listener.close()
    e = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC), "QMAILHOME": str(make_home(tmp_path))}
    e.update(env or {})
    proc = subprocess.Popen([PYTHON, str(UNITS / "qspp-tcpenv")] + list(args),
                            stdin=conn, stdout=conn, stderr=subprocess.PIPE, env=e)
    conn.close()
    return client, proc


def test_tcpenv_sets_tcpserver_variables_and_rules(tmp_path):
    rules = make_rules(tmp_path, '127.0.0.1:allow,RELAYCLIENT="@t"\n')
    client, proc = tcpenv(tmp_path, "-x", str(rules), "-l", "mx.local",
                          env={"TCPREMOTEHOST": "stale", "SPPLOG": "1"})
    greeting = session(client)
    assert greeting == [
        b"220-relay=@t spplog=1 ip=127.0.0.1 local=127.0.0.1 proto=TCP host=unset\r\n",
        b"220 test.example ESMTP\r\n"]
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b" spp-summary ip=127.0.0.1 host=unknown helo=- run1=" in err, err
    assert err.endswith(b" end=quit\n")


def test_tcpenv_deny(tmp_path):
    rules = make_rules(tmp_path, "127.0.0.1:deny\n")
    client, proc = tcpenv(tmp_path, "-x", str(rules))
    with client:
        assert client.recv(100) == b""
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, b"")


def test_tcpenv_unreadable_rules(tmp_path):
    client, proc = tcpenv(tmp_path, "-x", str(tmp_path / "missing.cdb"))
    with client:
        assert client.recv(100) == b""
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 111
    assert err == b"qspp-tcpenv: pid %d: unable to read %s: No such file or directory\n" % (
        proc.pid, bytes(tmp_path / "missing.cdb"))


def test_tcpenv_not_a_socket(tmp_path):
    r = subprocess.run([PYTHON, str(UNITS / "qspp-tcpenv")], stdin=subprocess.DEVNULL,
                       capture_output=True, env={"PYTHONPATH": str(SRC)}, timeout=30)
    assert r.returncode == 100
    assert r.stderr.startswith(b"qspp-tcpenv: pid ")
    assert b": fd 0 is not a socket: " in r.stderr
    assert stat.S_IMODE(os.stat(UNITS / "qspp-tcpenv").st_mode) == 0o755
