"""`qspp serve` end to end: a running listener on 127.0.0.1, real clients,
the recording queue program of conftest.py, tcprules cdbs made by the real
tcprules.

The home is conftest's `home` (control/me mx.example.org, rcpthosts
example.org and .example.net).  serve sets the TCP variables itself, so the
Received line names the loopback addresses: `from unknown (HELO h)
(127.0.0.1)` and `by 127.0.0.1` (no --localname), as under `tcpserver -H -R`.
"""

import json
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .conftest import GREETING, SRC, TCPRULES, QmailHome, normalize_date, wait_for
from .serve_harness import ServeServer

OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
QUIT = b"221 mx.example.org\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"


@pytest.fixture
def serve(home, tmp_path):
    servers = []

    def start(*args, **kw):
        s = ServeServer(home, tmp_path / ("serve%d" % len(servers)), *args, **kw)
        servers.append(s)
        return s.start()
    yield start
    for s in servers:
        s.stop()


def make_rules(path, text):
    if TCPRULES is None:
        if os.environ.get("CI"):
            pytest.fail("tcprules (ucspi-tcp) is not installed")
        pytest.skip("tcprules (ucspi-tcp) is not installed")
    subprocess.run([TCPRULES, str(path), str(path) + ".tmp"], input=text.encode(),
                   check=True, stdout=subprocess.DEVNULL, timeout=10)
    return path


def received(helo=None, ip=b"127.0.0.1", by=b"127.0.0.1"):
    helo = b"" if helo is None else b" (HELO %s)" % helo
    return b"Received: from unknown%s (%s)\n  by %s with SMTP; <D>\n" % (helo, ip, by)


def test_one_session_environment_and_message(home, serve):
    # serve's own environment holds fixture F's TCP variables and more: none of
    # them may reach a session, which gets its connection's values instead
    env = dict(home.full_env(), TCPREMOTEINFO="leak", TCPLOCALHOST="leak", PROTO="leak",
               TCPREMOTEPORT="1", TCPLOCALPORT="2", KEEP="kept")
    assert env["TCPREMOTEHOST"] == "client.example.com"
    s = serve(env=env)
    c = s.connect()
    assert c.cmd(b"HELO h") == b"250 mx.example.org\r\n"
    run = c.txn(body=b"Subject: one\r\n\r\nbody\r\n")
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    assert run.message == received(b"h") + b"Subject: one\n\nbody\n"
    env = run.env
    # exactly what tcpserver -R -H sets (no TCPLOCALHOST without -l)
    assert env[b"PROTO"] == b"TCP"
    assert env[b"TCPLOCALIP"] == b"127.0.0.1"
    assert env[b"TCPLOCALPORT"] == b"%d" % s.port
    assert env[b"TCPREMOTEIP"] == b"127.0.0.1"
    assert env[b"TCPREMOTEPORT"] == b"%d" % c.port
    for name in (b"TCPLOCALHOST", b"TCPREMOTEHOST", b"TCPREMOTEINFO"):
        assert name not in env
    assert env[b"QMAILHOME"] == os.fsencode(home.root)
    assert env[b"KEEP"] == b"kept"
    assert run.cwd == os.fsencode(os.path.realpath(home.root))
    assert c.cmd(b"QUIT") == QUIT
    assert c.rest() == b""
    s.wait_idle()
    # the default --log text: one summary line for the connection
    m = s.wait_line(rb"qspp: pid (\d+): spp-summary ip=127\.0\.0\.1 host=unknown helo=h"
                    rb" mail1=<a@b> rcpt1=<x@example\.org>:250 bytes1=\d+"
                    rb" outcome1=\"250 ok \d+ qp %d\" .*end=quit$" % run.pid)
    assert int(m.group(1)) != s.pid


def test_localname_sets_tcplocalhost(home, serve):
    s = serve("--localname", "mx.local")
    c = s.connect()
    run = c.txn()
    assert run.env[b"TCPLOCALHOST"] == b"mx.local"
    assert run.message == (b"Received: from unknown (127.0.0.1)\n  by mx.local with SMTP; <D>\n"
                           b"hi\n")


# [connection] sets a variable from the session's own port; [rcpt] shows it next to
# the envelope, so a plugin environment leaking between sessions would show
PLUGINS_TAG = ('[connection]\n:echo "SSESSION_TAG=tag$TCPREMOTEPORT"\n'
               '[rcpt]\n:echo "HX-Env: $SMTPMAILFROM $SMTPRCPTTO $TCPREMOTEPORT $SESSION_TAG"\n')


def test_concurrent_clients_no_cross_talk(home, serve):
    """8 sessions at once, each with its own sender, recipients and plugin
    environment; every queued message carries only its own."""
    home.control("smtpplugins", PLUGINS_TAG)
    s = serve("--concurrency", "8", "--per-ip", "0")  # eight from one address
    n = 8
    barrier = threading.Barrier(n, timeout=20)
    results = [None] * n
    errors = []

    def client(i):
        try:
            c = s.connect(timeout=20)
            barrier.wait()  # all eight sessions are running at this point
            assert len(s.sessions()) >= n
            c.send(b"MAIL FROM:<s%d@example.net>\r\n" % i)
            c.expect(OK)
            rcpts = [b"r%d-%d@example.org" % (i, k) for k in range(3)]
            for r in rcpts:
                c.send(b"RCPT TO:<%s>\r\n" % r)
                c.expect(OK)
            c.send(b"DATA\r\n")
            c.expect(GO)
            c.send(b"Subject: m%d\r\n\r\n" % i + b"line of %d\r\n" % i * 50 + b".\r\n")
            run = c.queued(c.reply(timeout=20))
            assert c.cmd(b"QUIT") == QUIT
            results[i] = (c.port, rcpts, run)
        except BaseException as e:  # reported by the main thread
            errors.append((i, e))
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    pids = set()
    for i, (port, rcpts, run) in enumerate(results):
        pids.add(run.pid)
        assert run.E == b"Fs%d@example.net\0" % i + b"".join(b"T%s\0" % r for r in rcpts) + b"\0"
        headers = b"".join(b"X-Env: s%d@example.net %s %d tag%d\n" % (i, r, port, port)
                           for r in rcpts)
        assert run.message == (received()
                               + headers + b"Subject: m%d\n\n" % i + b"line of %d\n" % i * 50)
        assert run.env[b"TCPREMOTEPORT"] == b"%d" % port
        assert run.env[b"SESSION_TAG"] == b"tag%d" % port
    assert len(pids) == n
    s.wait_idle()
    assert s.zombies() == []


def test_rules_from_real_tcprules(home, serve, tmp_path):
    home.control("smtpplugins", "[rcpt]\n:echo E550 plugin says no\n")
    home.control("other", "[rcpt]\n:echo HX-Other: $TCPREMOTEIP\n")
    rules = make_rules(tmp_path / "rules.cdb", "\n".join([
        "127.0.0.2:deny",
        '127.0.0.3:allow,RELAYCLIENT="",NOSPP=""',
        '127.0.0.4:allow,NOSPP=""',
        '127.0.0.5:allow,SPPCONFFILE="control/other",TCPLOCALHOST="rules.example"',
        ":allow",
    ]) + "\n")
    s = serve("--rules", str(rules))

    # denied: closed at once, nothing sent, no session started
    c = s.connect(greet=None, source="127.0.0.2")
    assert c.rest(timeout=5) == b""
    s.wait_line(rb"serve: deny 127\.0\.0\.2 port %d \(rule \"127\.0\.0\.2\"\)$" % c.port)

    # the default rule: plugins as configured
    c = s.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    assert c.cmd(b"RCPT TO:<x@example.org>") == b"550 plugin says no\r\n"
    assert c.cmd(b"RCPT TO:<x@far.example>") == b"550 plugin says no\r\n"
    c.cmd(b"QUIT")

    # RELAYCLIENT and NOSPP: any domain, no plugin
    c = s.connect(source="127.0.0.3")
    run = c.txn(rcpts=(b"RCPT TO:<x@far.example>",))
    assert run.E == b"Fa@b\0Tx@far.example\0\0"
    assert run.env[b"RELAYCLIENT"] == b"" and run.env[b"NOSPP"] == b""
    assert run.message == received(ip=b"127.0.0.3") + b"hi\n"
    assert c.cmd(b"QUIT") == QUIT

    # NOSPP alone: no plugin, rcpthosts still enforced
    c = s.connect(source="127.0.0.4")
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    assert c.cmd(b"RCPT TO:<x@far.example>") == RH553
    assert c.cmd(b"RCPT TO:<x@example.org>") == OK
    c.cmd(b"QUIT")

    # SPPCONFFILE per client, and a rule overriding TCPLOCALHOST as tcpserver allows
    c = s.connect(source="127.0.0.5")
    run = c.txn()
    assert run.message == (b"Received: from unknown (127.0.0.5)\n  by rules.example with SMTP;"
                           b" <D>\nX-Other: 127.0.0.5\nhi\n")
    assert b"RELAYCLIENT" not in run.env and b"NOSPP" not in run.env
    assert c.cmd(b"QUIT") == QUIT
    s.wait_idle()


def test_sighup_and_rerun_of_tcprules_reload(home, serve, tmp_path):
    rules = make_rules(tmp_path / "rules.cdb", "127.0.0.6:deny\n:allow\n")
    s = serve("--rules", str(rules))
    assert s.connect(greet=None, source="127.0.0.6").rest() == b""

    make_rules(rules, ':allow,RELAYCLIENT=""\n')
    s.signal(signal.SIGHUP)
    s.wait_line(rb"serve: rules .*rules\.cdb reloaded \(SIGHUP\)$")
    c = s.connect(source="127.0.0.6")
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.example>") == OK  # RELAYCLIENT now set

    # a file that is not a cdb (written in place by hand, say): old rules kept,
    # one line for it, and one more for each SIGHUP asking to read it
    bad = tmp_path / "bad.cdb"
    bad.write_bytes(b"not a cdb\n")
    os.rename(bad, rules)
    c = s.connect(source="127.0.0.6")
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.example>") == OK
    s.connect().close()
    s.wait_line(rb"serve: rules .*rules\.cdb: 10 bytes: too short for a cdb;"
                rb" keeping the rules loaded before$")
    assert sum(b"keeping the rules" in line for line in s.lines()) == 1
    s.signal(signal.SIGHUP)
    wait_for(lambda: sum(b"keeping the rules" in line for line in s.lines()) == 2, 5,
             "a second complaint")

    # tcprules run again: picked up at the next connection, as under tcpserver -x
    make_rules(rules, "127.0.0.6:deny\n:allow\n")
    assert s.connect(greet=None, source="127.0.0.6").rest() == b""
    s.wait_line(rb"serve: rules .*rules\.cdb reloaded \(file changed\)$")
    assert s.connect().cmd(b"QUIT") == QUIT


def test_rules_file_must_be_usable_at_start(home, tmp_path):
    s = ServeServer(home, tmp_path / "s", "--rules", str(tmp_path / "missing.cdb"))
    env = home.full_env()
    proc = subprocess.run(s.command(), env=env, capture_output=True, timeout=20)
    assert proc.returncode == 111
    assert re.fullmatch(rb"qspp: pid \d+: serve: rules .*/missing\.cdb: No such file or"
                        rb" directory\n", proc.stderr), proc.stderr


def test_sigterm_lets_a_session_finish(home, serve):
    s = serve("--grace", "20")
    c = s.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(OK)
    c.send(b"RCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(OK, GO)
    c.send(b"Subject: half\r\n\r\nfirst half\r\n")
    t0 = time.monotonic()
    s.signal(signal.SIGTERM)
    s.wait_line(rb"serve: stopping: waiting up to 20 s for 1 session$")
    assert s.refused()
    c.send(b"second half\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.message == received() + (
        b"Subject: half\n\nfirst half\nsecond half\n")
    assert c.cmd(b"QUIT") == QUIT
    assert s.wait(10) == 0
    assert time.monotonic() - t0 < 10
    assert s.lines()[-1].endswith(b"serve: stopped")


def test_sigterm_grace_is_bounded(home, serve):
    s = serve("--grace", "1")
    idle = s.connect()
    t0 = time.monotonic()
    s.signal(signal.SIGTERM)
    assert s.wait(10) == 0
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 5, elapsed
    assert idle.rest() == b""  # killed: no reply
    assert any(line.endswith(b"serve: 1 session still running after 1 s: SIGTERM")
               for line in s.lines())


def test_idle_client_timeout_frees_the_slot(home, serve):
    home.control("timeoutsmtpd", "1\n")
    s = serve("--concurrency", "1")
    idle = s.connect()
    t0 = time.monotonic()
    second = s.connect(greet=None)
    assert second.reply(timeout=10) == GREETING
    waited = time.monotonic() - t0
    assert 0.7 <= waited < 5, waited
    assert idle.rest() == TIMEOUT
    assert second.cmd(b"QUIT") == QUIT
    s.wait_idle()


def test_a_control_file_that_appears_counts_from_the_next_connection(home, serve):
    """A worker remembers which control files are absent (one stat of control/
    per connection stands for them all); one that appears, or goes again,
    shows at the very next connection to the same worker."""
    s = serve("--concurrency", "1")  # one worker: it serves every connection
    time.sleep(2.2)  # control/ settles: from now on absent files are remembered

    def session(greeting, quit=QUIT):
        c = s.connect(greet=greeting)
        assert c.cmd(b"QUIT") == quit
        assert c.rest() == b""
        s.wait_idle()

    session(GREETING)
    session(GREETING)
    home.control("smtpgreeting", "hello.example\n")
    session(b"220 hello.example ESMTP\r\n", b"221 hello.example\r\n")
    os.unlink(os.path.join(home.root, "control", "smtpgreeting"))
    session(GREETING)
    summary = re.compile(rb"qspp: pid (\d+): spp-summary ")

    def worker_pids():
        pids = [m.group(1) for m in map(summary.search, s.lines()) if m]
        return pids if len(pids) == 4 else None
    assert len(set(wait_for(worker_pids, 5, "four spp-summary lines"))) == 1


def test_timeoutsmtpd_changed_between_sessions_of_one_worker(home, serve):
    """The listener carries the last timeout a session set (accepted sockets
    start with it); each session still gets the one control/ holds then."""
    home.control("timeoutsmtpd", "1\n")
    s = serve("--concurrency", "1")  # one worker serves every connection

    def idle_for(seconds):
        c = s.connect()
        t0 = time.monotonic()
        got = c.rest(timeout=seconds)
        return got, time.monotonic() - t0

    got, took = idle_for(10)
    assert got == TIMEOUT and 0.7 <= took < 5, took
    home.control("timeoutsmtpd", "3\n")
    s.wait_idle()
    got, took = idle_for(10)
    assert got == TIMEOUT and 2.7 <= took < 7, took
    os.unlink(os.path.join(home.root, "control", "timeoutsmtpd"))  # 1200 s
    s.wait_idle()
    c = s.connect()
    c.silent(4)
    assert c.cmd(b"QUIT") == QUIT
    s.wait_idle()


def test_concurrency_limit_defers_the_greeting(home, serve):
    s = serve("--concurrency", "1")
    first = s.connect()
    second = s.connect(greet=None)
    second.silent(0.8)  # accepted by the kernel, no session yet
    assert len(s.sessions()) == 1
    assert first.cmd(b"QUIT") == QUIT
    assert second.reply() == GREETING
    assert second.cmd(b"QUIT") == QUIT
    s.wait_idle()
    assert s.zombies() == []


def test_no_zombies_after_many_short_sessions(home, serve):
    s = serve("--concurrency", "4", "--log", "off", "--per-ip", "0")
    for _ in range(12):
        c = s.connect()
        c.close()  # EOF: the session exits at once
    s.wait_idle()
    assert not any(b"spp-summary" in line for line in s.lines())


@pytest.mark.skipif(os.path.exists("/var/qmail/control/me"),
                    reason="a real qmail is installed: serve would use /var/qmail")
def test_embedded_default_home(home, tmp_path):
    xdg = tmp_path / "xdg"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XDG_DATA_HOME": str(xdg),
           "HOME": str(tmp_path), "PYTHONPATH": str(SRC)}
    s = ServeServer(home, tmp_path / "s", env=env, qmailhome=False)
    try:
        s.start(timeout=20)
        qhome = xdg / "qspp"
        s.wait_line(rb"serve: embedded home %s \(created\); mail is delivered to %s/Maildir/new"
                    rb" by (user \S+ )?\(uid %d, gid %d\)$"
                    % (re.escape(os.fsencode(qhome)), re.escape(os.fsencode(qhome)),
                       os.geteuid(), os.getegid()))
        me = (qhome / "control" / "me").read_bytes()
        assert (qhome / "control" / "rcpthosts").read_bytes() == me + b"localhost\n"
        assert (qhome / "control" / "smtpplugins").read_bytes() == b""
        greeting = b"220 " + me.rstrip(b"\n") + b" ESMTP\r\n"
        c = s.connect(greet=greeting, timeout=20)
        for cmd, want in ((b"MAIL FROM:<a@b>", OK), (b"RCPT TO:<you@localhost>", OK),
                          (b"DATA", GO)):
            assert c.cmd(cmd) == want
        c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        assert re.fullmatch(rb"250 ok \d+ qp \d+\r\n", c.reply(timeout=20))
        new = list((qhome / "Maildir" / "new").iterdir())
        assert len(new) == 1
        assert normalize_date(new[0].read_bytes()) == (
            b"Return-Path: <a@b>\nX-Envelope-To: <you@localhost>\n"
            + received() + b"Subject: x\n\nhello\n")
    finally:
        s.stop()


def test_log_json(home, serve, tmp_path):
    rules = make_rules(tmp_path / "rules.cdb", "127.0.0.2:deny\n:allow\n")
    s = serve("--log", "json", "--rules", str(rules))
    c = s.connect(greet=None, source="127.0.0.2")
    assert c.rest() == b""
    m = s.wait_line(rb"^qspp: pid \d+: (\{\"event\":\"serve-deny\".*\})$")
    assert json.loads(m.group(1)) == {"event": "serve-deny", "ip": "127.0.0.2",
                                      "port": c.port, "rule": "127.0.0.2"}
    c = s.connect()
    assert c.cmd(b"QUIT") == QUIT
    m = s.wait_line(rb"^qspp: pid \d+: (\{\"event\":\"spp-summary\".*\})$")
    summary = json.loads(m.group(1))
    assert (summary["ip"], summary["end"]) == ("127.0.0.1", "quit")


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "0"], b"argument -c/--concurrency: must be at least 1: 0"),
    (["--port", "70000"], b"argument --port: not a port number: 70000"),
    # how argparse lists the choices after this differs between Python versions
    (["--log", "xml"], b"argument --log: invalid choice: 'xml'"),
])
def test_usage_errors(home, tmp_path, args, message):
    s = ServeServer(home, tmp_path / "s", *args)
    proc = subprocess.run(s.command(), env=home.full_env(), capture_output=True, timeout=20)
    assert proc.returncode == 2
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(b"qspp serve: error: " + message), proc.stderr
    if b"choice" not in message:
        assert last == b"qspp serve: error: " + message


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.parametrize("args, gid", [
    (["-u", "65534", "-g", "65533"], "65533"),
    (["-u", "65534"], "65534"),     # issue 10 #3: nobody's primary group, never root's 0
])
def test_sessions_run_as_the_given_uid_and_gid(tmp_path, args, gid):
    base = tempfile.mkdtemp(prefix="qspp-serve-uid-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        qhome = QmailHome(Path(base))
        os.chmod(qhome.queue, 0o777)
        qhome.control("me", "mx.example.org\n")
        s = ServeServer(qhome, tmp_path / "s", *args)
        s.start()
        try:
            c = s.connect()
            (pid,) = s.sessions()
            with open("/proc/%d/status" % pid) as f:
                status = dict(line.split(":", 1) for line in f.read().splitlines())
            assert status["Uid"].split() == ["65534"] * 4
            assert status["Gid"].split() == [gid] * 4
            assert status["Groups"].split() == [gid]
            with open("/proc/%d/status" % s.pid) as f:
                assert "\nUid:\t65534\t" in f.read()  # the listener too, as tcpserver
            run = c.txn()
            assert run.E == b"Fa@b\0Tx@example.org\0\0"
            assert c.cmd(b"QUIT") == QUIT
        finally:
            s.stop()
    finally:
        shutil.rmtree(base)


def test_resolve_sets_tcpremotehost_and_host_rules_apply(home, serve, tmp_path):
    try:
        name = socket.gethostbyaddr("127.0.0.1")[0].lower()
    except OSError:
        pytest.skip("127.0.0.1 has no name here")
    rules = make_rules(tmp_path / "rules.cdb", '=%s:allow,HOSTRULE="yes"\n:allow\n' % name)
    s = serve("--resolve", "--localname", "mx.local", "--rules", str(rules))
    c = s.connect()
    run = c.txn()
    assert run.env[b"TCPREMOTEHOST"] == name.encode()
    assert run.env[b"TCPLOCALHOST"] == b"mx.local"
    assert run.env[b"HOSTRULE"] == b"yes"
    assert run.message == (b"Received: from %s (127.0.0.1)\n  by mx.local with SMTP; <D>\nhi\n"
                           % name.encode())
    assert c.cmd(b"QUIT") == QUIT


def test_auth_delay_never_stalls_the_listener(home, serve):
    # issue 4: a failed AUTH waits 5 s before its 535, in that session's own process
    from .test_auth import install_checkpw
    install_checkpw(home)
    s = serve("--", "mx.example.org", "bin/checkpw", "/bin/true")
    failing = s.connect()
    failing.send(b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong") + b"\r\n")
    t0 = time.monotonic()
    other = s.connect()  # the greeting is checked by connect()
    assert other.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret")) == (
        b"235 ok, go ahead (#2.0.0)\r\n")
    assert other.cmd(b"MAIL FROM:<a@b>") == OK
    assert other.cmd(b"RCPT TO:<x@far.away>") == OK  # AUTH grants relaying
    assert other.cmd(b"QUIT") == QUIT
    assert time.monotonic() - t0 < 3
    assert failing.reply(timeout=10) == b"535 authentication failed (#5.7.1)\r\n"
    assert time.monotonic() - t0 >= 4.9
    assert failing.cmd(b"QUIT") == QUIT
