"""`python -m qspp.cli` as a process: exit statuses, stdout/stderr split, the
engine's log line on the real fd 2. The output itself is covered in
tests/unit/test_cli.py."""

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def qhome(tmp_path):
    h = tmp_path / "qhome"
    (h / "control").mkdir(parents=True)
    (h / "control" / "me").write_bytes(b"test.example\n")
    (h / "control" / "rcpthosts").write_bytes(b"example.com\n")
    (h / "bin").mkdir()
    (h / "bin" / "qmail-queue").write_bytes(b"#!/bin/sh\nexit 0\n")
    (h / "bin" / "qmail-queue").chmod(0o755)
    return h


def qspp(qhome, *args, **env):
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC),
         "QMAILHOME": str(qhome)}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "qspp.cli"] + list(args), env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)


def test_version_process(qhome):
    p = qspp(qhome, "--version")
    assert p.returncode == 0
    assert p.stdout.startswith(b"qspp ") and p.stdout.endswith(b"\n")
    assert p.stderr == b""


# sessions run as this very user: no root warning when the tests run as root
ME = pwd.getpwuid(os.geteuid()).pw_name


def test_check_process_exit_status(qhome):
    (qhome / "control" / "smtpplugins").write_bytes(b"[helo]\nplugins/none\n")
    p = qspp(qhome, "check", "--user", ME)
    assert p.returncode == 1
    assert b"control/smtpplugins:2: error: plugins/none: no such file\n" in p.stdout
    assert p.stderr == b""
    (qhome / "control" / "smtpplugins").write_bytes(b"[helo]\n:echo N\n")
    assert qspp(qhome, "check", "--user", ME).returncode == 0
    # warnings alone leave the status 0
    (qhome / "control" / "rcpthosts").unlink()
    p = qspp(qhome, "check", "--user", ME)
    assert p.returncode == 0
    assert p.stdout.endswith(b"\ncheck: 0 errors, 1 warning, 0 notes\n")
    # a certificate that does not load is an error
    (qhome / "control" / "servercert.pem").write_bytes(b"junk\n")
    p = qspp(qhome, "check", "--user", ME, FORCETLS="1")
    assert p.returncode == 1
    assert b"\ncontrol/servercert.pem: error: does not load: " in p.stdout
    assert p.stdout.endswith(b"\ncheck: 1 error, 1 warning, 0 notes\n")


def test_plugin_test_process(qhome):
    p = qspp(qhome, "plugin-test", "helo", ":exit 120")
    assert p.returncode == 1
    assert (b'client gets: "451 qmail-spp failure: :exit 120: can\'t execute (#4.3.0)\\r\\n"\n'
            in p.stdout)
    # the line a connection would log, in the common stderr form
    assert p.stderr.startswith(b"qspp: pid ")
    assert p.stderr.count(b"\n") == 1
    p = qspp(qhome, "plugin-test", "rcpt", ":echo O", SPPTIMEOUT="2")
    assert p.returncode == 0
    assert b"verdict: override (accept: rcpthosts check skipped)\n" in p.stdout


def test_usage_error_process(qhome):
    p = qspp(qhome, "nonsense")
    assert p.returncode == 2
    assert p.stdout == b""
    assert p.stderr == (b"usage: qspp [-h] [--version] COMMAND [ARGS ...]\n"
                        b"qspp: error: unknown command nonsense: it is one of serve, check,"
                        b" plugin-test, version\n")



# --- `qspp serve`'s start and `qspp check` agree ---------------------------------

import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from .conftest import QmailHome  # noqa: E402
from .serve_harness import ServeServer  # noqa: E402

START_LINE = re.compile(rb"^qspp: pid \d+: serve: (.*)$")
ROOT = os.geteuid() == 0


def pem(tmp_path):
    """A fresh self-signed key and certificate, the key first as qmail's servercert.pem."""
    d = tmp_path / "pem"
    d.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=mx.example.org",
                    "-days", "2", "-keyout", str(d / "k"), "-out", str(d / "c")],
                   check=True, capture_output=True, timeout=30)
    return (d / "k").read_bytes() + (d / "c").read_bytes()


def start_lines(s):
    """serve's own lines up to `listening on`: the start-up findings."""
    out = []
    for line in s.lines():
        m = START_LINE.match(line)
        if m is None:
            continue
        if m.group(1).startswith(b"listening on "):
            return out
        out.append(m.group(1))
    raise AssertionError("no listening line in %r" % s.lines())


def check_findings(env, *args):
    p = subprocess.run([sys.executable, "-m", "qspp.cli", "check"] + list(args), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert p.stderr == b""
    out = p.stdout.splitlines()
    k = next(i for i, line in enumerate(out) if line.startswith(b"config: "))
    found = [line for line in out[k + 1:] if not line.startswith((b"[", b"  ", b"no plugin"))]
    return p.returncode, found


def test_serve_start_logs_what_check_reports(home, tmp_path):
    """A broken home: serve logs one line per problem, the very lines check
    prints, and keeps serving (every client gets the 421 of a missing me)."""
    home.control("me", None)
    home.control("rcpthosts", None)
    home.write("bin/broken-queue", b"#!/bin/sh\necho 'no module named qspp' >&2\nexit 1\n",
               mode=0o755)
    home.env["QMAILQUEUE"] = "bin/broken-queue"
    home.control("servercert.pem", pem(tmp_path))
    (home.root / "control" / "servercert.pem").chmod(0o644)
    env = home.full_env()
    for k in ("TCPREMOTEIP", "TCPLOCALIP", "TCPREMOTEHOST"):
        env.pop(k, None)
    # the sessions' user given to both, so no root warning either way
    user = ["--user", pwd.getpwuid(os.geteuid()).pw_name] if ROOT else []
    s = ServeServer(home, tmp_path / "s", *user, env=env).start()
    try:
        lines = start_lines(s)
        c = s.connect(greet=None)
        assert c.reply() == b"421 unable to read controls (#4.3.0)\r\n"
    finally:
        s.stop()
    assert lines == [
        b"error: control/me and control/smtpgreeting are both absent (connections get 421"
        b" unable to read controls (#4.3.0))",
        b"control/rcpthosts: warning: absent: every recipient domain is accepted (open relay)",
        b"error: bin/broken-queue: the queue program, run as for an aborted message: exit"
        b' status 1, where qmail-queue exits 54 (messages get "451 qq temporary problem'
        b' (#4.3.0)"); it said: "no module named qspp"',
        b"control/servercert.pem: warning: others can read it (mode 0644), and it holds the"
        b" private key: chmod o-r, and give the session user read access by owner or group",
    ]
    status, found = check_findings(env, "--qmailhome", str(home.root), *user)
    assert status == 1
    assert [line for line in found if b"note: " not in line][:-1] == lines
    assert found[-1] == b"check: 2 errors, 2 warnings, 1 note"


@pytest.mark.skipif(not ROOT, reason="starting as root needs root")
def test_serve_root_start_without_user_switch_warns(home, tmp_path):
    env = home.full_env()
    s = ServeServer(home, tmp_path / "s", env=env).start()
    try:
        assert s.connect().cmd(b"QUIT") == b"221 mx.example.org\r\n"
        lines = start_lines(s)
    finally:
        s.stop()
    assert lines == [b"warning: running as root without a user switch: sessions, plugins and"
                     b" the queue program run as root (give --user NAME, or -u UID -g GID)"]


@pytest.mark.skipif(not ROOT, reason="switching users needs root")
def test_serve_start_as_nobody_and_check_agree_on_unreadable_files(tmp_path):
    """Rules and key readable by root only: after --user nobody, a changed rules
    file is never read again and STARTTLS cannot load its key.  serve says so
    at start, and `check --user nobody -x RULES` says the same."""
    base = tempfile.mkdtemp(prefix="qspp-check-e2e-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        qhome = QmailHome(Path(base))
        os.chmod(qhome.queue, 0o777)
        qhome.control("servercert.pem", pem(tmp_path))
        cert = qhome.root / "control" / "servercert.pem"
        cert.chmod(0o600)
        rules = Path(base) / "rules.cdb"
        if shutil.which("tcprules") is None:
            if os.environ.get("CI"):
                pytest.fail("tcprules (ucspi-tcp) is not installed")
            pytest.skip("tcprules (ucspi-tcp) is not installed")
        subprocess.run(["tcprules", str(rules), str(rules) + ".tmp"], input=b":allow\n",
                       check=True, timeout=10)
        rules.chmod(0o600)
        env = qhome.full_env()
        env["FORCETLS"] = "1"
        for k in ("TCPREMOTEIP", "TCPLOCALIP", "TCPREMOTEHOST"):
            env.pop(k, None)
        s = ServeServer(qhome, tmp_path / "s", "--user", "nobody", "--rules", str(rules),
                        env=env).start()
        try:
            assert s.connect().cmd(b"QUIT") == b"221 mx.example.org\r\n"
            lines = start_lines(s)
        finally:
            s.stop()
        assert lines == [
            b"control/servercert.pem: error: does not load: nobody cannot read it (mode 0600,"
            b" owner 0:0) (STARTTLS gets 454 TLS missing certificate)",
            b"%s: warning: nobody cannot read it (mode 0600, owner 0:0): changes to the rules"
            b" never take effect (qspp serve keeps the rules of its start; tcpserver -x drops"
            b" every connection)" % os.fsencode(rules),
        ]
        status, found = check_findings(env, "--qmailhome", str(qhome.root), "--user", "nobody",
                                       "-x", str(rules))
        assert status == 1
        assert found == lines + [b"check: 1 error, 1 warning, 0 notes"]
    finally:
        shutil.rmtree(base)


def test_check_finds_the_home_serve_made(home, tmp_path):
    """No --qmailhome and no QMAILHOME: serve makes its embedded home, and check
    finds the same one (not /var/qmail, unless qmail is installed there)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC),
           "HOME": str(tmp_path / "root"), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    user = ["--user", pwd.getpwuid(os.geteuid()).pw_name] if ROOT else []
    s = ServeServer(home, tmp_path / "s", *user, env=env, qmailhome=False).start()
    try:
        m = s.wait_line(rb"serve: listening on .* home (\S+)")
        served = m.group(1)
        # where mail goes, and no problem
        assert [line for line in start_lines(s)
                if not line.startswith(b"embedded home ")] == []
    finally:
        s.stop()
    p = subprocess.run([sys.executable, "-m", "qspp.cli", "check"] + user, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    first = p.stdout.splitlines()[0]
    assert first.startswith(b"home: " + served + b" ("), (first, served)
    if not os.path.exists("/var/qmail/control/me"):
        assert served == os.fsencode(tmp_path / "xdg" / "qspp")
        assert b"(embedded, qspp serve's own" in first
        assert p.returncode == 0, p.stdout
        assert p.stdout.endswith(b"\ncheck: 0 errors, 0 warnings, 0 notes\n")


@pytest.mark.parametrize("args, env", [
    (["--port", "0"], {"HOME": "/etc/passwd/x"}),    # the embedded home cannot be made
    (["--port", "abc"], {}),
    (["--grace", "soon"], {}),
])
def test_serve_start_errors_have_no_python_reprs(tmp_path, args, env):
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC)}
    e.update(env)
    p = subprocess.run([sys.executable, "-m", "qspp", "serve"] + args, env=e, cwd=str(tmp_path),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode != 0
    for bad in (b"b'", b"[Errno", b"Traceback", b"'abc'", b"'soon'"):
        assert bad not in p.stderr, p.stderr


@pytest.mark.skipif(not ROOT, reason="the warning is about running as root")
def test_check_as_root_without_a_user_switch(qhome):
    """check as root with no --user judges for qmaild when it exists (qmail's
    run files switch to it); with no qmaild, sessions would run as root: a warning."""
    p = qspp(qhome, "check")
    out = p.stdout.splitlines()
    user = next(line for line in out if line.startswith(b"user: "))
    try:
        pwd.getpwnam("qmaild")
    except KeyError:
        assert user == b"user: root (uid 0, gid 0; this process, no user switch)"
        assert (b"warning: running as root without a user switch: sessions, plugins and the"
                b" queue program run as root (give --user NAME, or -u UID -g GID)") in out
        assert out[-1].startswith(b"check: 0 errors, 1 warning, ")
    else:
        assert user.startswith(b"user: qmaild (")
    assert p.returncode == 0


# --- check connects to the milters and policy servers --------------------------

from .test_milter_daemons import dkim_key, dkim_signer, world_dir  # noqa: E402,F401
from .test_policy_daemons import postgrey  # noqa: E402,F401


def dead_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_connects_to_real_milters_and_policy_servers(qhome, dkim_signer, postgrey):
    """A real OpenDKIM and a real postgrey answer; a port nobody listens on is
    reported for each kind, with what every connection would then get."""
    down = dead_port()
    (qhome / "control" / "smtpmilters").write_bytes(
        b"inet:127.0.0.1:%d\ninet:127.0.0.1:%d timeout=2\n" % (dkim_signer.port, down))
    (qhome / "control" / "smtpplugins").write_bytes(
        b"[rcpt]\npolicy:inet:127.0.0.1:%d\npolicy:inet:127.0.0.1:%d default=DUNNO\n"
        % (postgrey, down))
    p = qspp(qhome, "check", "--user", ME)
    assert p.stderr == b""
    out = p.stdout.splitlines()
    k = out.index(b"milters: control/smtpmilters")
    assert re.fullmatch(rb"  inet:127\.0\.0\.1:%d \(timeout 30 s, default=tempfail\): protocol"
                        rb" version 6, actions 0x[0-9a-f]+, steps 0x[0-9a-f]+" % dkim_signer.port,
                        out[k + 1]), out[k + 1]
    assert out[k + 2:k + 8] == [
        b"  inet:127.0.0.1:%d (timeout 2 s, default=tempfail): failed: cannot connect:"
        b" Connection refused" % down,
        b"config: control/smtpplugins",
        b"[rcpt]",
        b"  line 2: policy:inet:127.0.0.1:%d -> policy server inet:127.0.0.1:%d: connected"
        % (postgrey, postgrey),
        b"  line 3: policy:inet:127.0.0.1:%d default=DUNNO -> policy server inet:127.0.0.1:%d:"
        b" failed: can't connect (Connection refused)" % (down, down),
        b"control/smtpmilters: error: milter inet:127.0.0.1:%d: cannot connect: Connection"
        b' refused (default=tempfail: every connection gets "451 4.7.1 Service unavailable -'
        b' try again later" from its first HELO, EHLO or MAIL on)' % down,
    ]
    assert out[k + 8:] == [
        b"control/smtpplugins:3: warning: policy:inet:127.0.0.1:%d default=DUNNO: can't"
        b" connect (Connection refused) (every run takes default=DUNNO)" % down,
        b"check: 1 error, 1 warning, 0 notes",
    ]
    assert p.returncode == 1
    # with both servers answering, check passes
    (qhome / "control" / "smtpmilters").write_bytes(b"inet:127.0.0.1:%d\n" % dkim_signer.port)
    (qhome / "control" / "smtpplugins").write_bytes(b"[rcpt]\npolicy:inet:127.0.0.1:%d\n" % postgrey)
    p = qspp(qhome, "check", "--user", ME)
    assert p.stdout.endswith(b"\ncheck: 0 errors, 0 warnings, 0 notes\n")
    assert p.returncode == 0
    # NOMILTER: the list is not read, OpenDKIM not asked
    p = qspp(qhome, "check", "--user", ME, NOMILTER="")
    assert b"\nmilters: none: NOMILTER is set, no milter list is read\n" in p.stdout
    assert p.returncode == 0
