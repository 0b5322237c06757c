"""`qspp serve`'s pre-forked workers (issue 12): one process serves many
sessions, so this proves that nothing crosses from one session to the next.

With `-c 1` there is exactly one worker.  A clean session runs first (on the
fresh worker), then sessions that leave every kind of state behind (TLS, AUTH,
a rule's RELAYCLIENT, plugin S and U, the plugin A flag, a pending deferred
error, a header buffer, an open transaction cut by EOF), then the very same
clean session again: its replies, queued envelope, message and environment
must equal the first one's, and the worker's cwd, umask, signal dispositions,
open descriptors and memory high-water mark must be as they were.
"""

import base64
import os
import signal
import time

import pytest

from .conftest import GREETING, wait_for
from .test_auth import install_checkpw
from .test_serve import GO, OK, QUIT, make_rules, serve  # noqa: F401 - the fixture
from .test_starttls import certs, client_context  # noqa: F401 - the fixture

PLUGINS = (
    "[connection]\n"
    ':[ "$TCPREMOTEIP" = 127.0.0.7 ] && printf "SDIRTY=yes\\nUPYTHONPATH\\n"; true\n'
    "[helo]\n"
    ':[ "$SMTPHELOHOST" = deferring ] && echo "LR550 deferred by a plugin"; true\n'
    "[mail]\n"
    ':case "$SMTPMAILFROM" in accept@*) echo A;; *) echo "HX-Mail: $SMTPMAILFROM";; esac\n'
    "[rcpt]\n"
    ':echo "HX-Rcpt: $SMTPRCPTTO ${SMTPAUTHUSER-noauth} ${RELAYCLIENT-norelay}'
    ' ${RULEVAR-none} ${DIRTY-clean} ${PYTHONPATH:+pythonpath}"\n'
)
ENV_PER_CONNECTION = (b"TCPREMOTEPORT", b"TCP6REMOTEPORT")


def _status(pid):
    with open("/proc/%d/status" % pid) as f:
        return dict(line.split(":", 1) for line in f.read().splitlines())


def _worker_state(pid):
    st = _status(pid)
    return {
        "cwd": os.readlink("/proc/%d/cwd" % pid),
        "umask": st["Umask"].strip(),
        "signals": tuple(st[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt")),
        "fds": sorted((fd, os.readlink("/proc/%d/fd/%s" % (pid, fd)))
                      for fd in os.listdir("/proc/%d/fd" % pid)),
    }


def _idle_state(pid):
    """The worker's state once it waits in accept()."""
    def waiting():
        with open("/proc/%d/wchan" % pid) as f:
            return f.read() in ("ep_poll", "do_epoll_wait")  # idle: waiting for a client
    wait_for(waiting, 5, "worker %d to wait for a client" % pid)
    return _worker_state(pid)


def _clean_session(s):
    """The same commands every time; what the client saw and what was queued."""
    c = s.connect()
    seen = [c.cmd(b"EHLO c")]
    for cmd in (b"MAIL FROM:<m@example.net>", b"RCPT TO:<r@example.org>", b"DATA"):
        seen.append(c.cmd(cmd))
    c.send(b"Subject: clean\r\n\r\nbody\r\n.\r\n")
    run = c.queued(c.reply())
    seen.append(c.cmd(b"QUIT"))
    assert c.rest() == b""
    env = {k: v for k, v in run.env.items() if k not in ENV_PER_CONNECTION}
    return seen, run.E, run.message, env


def test_nothing_crosses_between_sessions_of_one_worker(home, serve, certs, tmp_path):
    install_checkpw(home)
    home.control("servercert.pem", certs.pem)
    home.control("smtpplugins", PLUGINS)
    rules = make_rules(tmp_path / "rules.cdb",
                       '127.0.0.7:allow,RELAYCLIENT="",RULEVAR="one"\n:allow\n')
    s = serve("-c", "1", "--rules", str(rules), "--", "mx.example.org", "bin/checkpw",
              "/bin/true")
    (worker,) = s.children()
    before = _idle_state(worker)  # fresh from the parent
    first = _clean_session(s)
    assert first[0][0].startswith(b"250-mx.example.org\r\n")
    assert b"\nX-Rcpt: r@example.org noauth norelay none clean pythonpath\n" in first[2]
    assert b"\nX-Mail: m@example.net\n" in first[2]
    wait_for(lambda: not s.sessions(), 5, "the first session to end")
    assert _idle_state(worker) == before
    hwm = int(_status(worker)["VmHWM"].split()[0])

    # 1: TLS, AUTH, a rule's variables, plugin S and U, the A flag
    dirty = s.connect(source="127.0.0.7")
    assert dirty.cmd(b"EHLO a").startswith(b"250-mx.example.org\r\n")
    assert dirty.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    dirty.sock = client_context().wrap_socket(dirty.sock, server_hostname="mx.example.org")
    dirty.cmd(b"EHLO a")
    assert dirty.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret")) == (
        b"235 ok, go ahead (#2.0.0)\r\n")
    for cmd, want in ((b"MAIL FROM:<accept@example.net>", OK),
                      (b"RCPT TO:<x@far.example>", OK), (b"DATA", GO)):
        assert dirty.cmd(cmd) == want
    dirty.send(b"Subject: dirty\r\n\r\nbody\r\n.\r\n")
    run = dirty.queued(dirty.reply())
    assert run.env[b"DIRTY"] == b"yes" and b"PYTHONPATH" not in run.env
    assert run.env[b"SMTPAUTHUSER"] == b"user" and run.env[b"RELAYCLIENT"] == b""
    assert b"X-Rcpt" not in run.message  # the A flag: no [rcpt] plugin ran
    dirty.close()

    # 2: a deferred error, a header buffer, a transaction cut by EOF
    dirty = s.connect()
    assert dirty.cmd(b"HELO deferring") == b"250 mx.example.org\r\n"
    assert dirty.cmd(b"MAIL FROM:<half@example.net>") == OK
    assert dirty.cmd(b"RCPT TO:<a@example.org>") == b"550 deferred by a plugin\r\n"
    dirty.close()
    wait_for(lambda: not s.sessions(), 5, "the cut session to end")

    # 3: a client that dies during STARTTLS
    dirty = s.connect()
    assert dirty.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    dirty.send(b"\x16\x03\x01\x00")
    dirty.close()
    wait_for(lambda: not s.sessions(), 5, "the TLS session to end")

    again = _clean_session(s)
    assert again == first
    wait_for(lambda: not s.sessions(), 5, "the last session to end")
    assert s.children() == {worker}  # all of it in one process
    assert _idle_state(worker) == before
    assert int(_status(worker)["VmHWM"].split()[0]) < hwm + 16 * 1024
    assert s.zombies() == []


def test_a_crashed_worker_is_replaced(home, serve):
    s = serve("-c", "2", "--per-ip", "0")
    workers = wait_for(lambda: len(s.children()) == 2 and s.children(), 5, "2 workers")
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    s.wait_line(rb"serve: worker %d killed by signal 9$" % victim)
    wait_for(lambda: len(s.children()) == 2 and victim not in s.children(), 5,
             "a new worker")
    for _ in range(4):
        c = s.connect()
        assert c.cmd(b"QUIT") == QUIT


def test_workers_are_recycled_after_their_sessions(home, serve):
    s = serve("-c", "1", "--worker-sessions", "3")
    (first,) = s.children()
    for _ in range(3):
        assert s.connect().cmd(b"QUIT") == QUIT
    wait_for(lambda: s.children() and first not in s.children(), 5, "a fresh worker")
    c = s.connect()
    assert c.cmd(b"QUIT") == QUIT
    assert not any(b"killed" in ln for ln in s.lines())


def test_concurrency_still_bounds_sessions(home, serve):
    s = serve("-c", "2", "--per-ip", "0")
    a, b = s.connect(), s.connect()
    third = s.connect(greet=None)
    third.silent(0.8)
    assert len(s.sessions()) == 2
    assert a.cmd(b"QUIT") == QUIT
    assert third.reply() == GREETING
    for c in (b, third):
        assert c.cmd(b"QUIT") == QUIT


@pytest.mark.parametrize("n", [3])
def test_embedded_queue_needs_no_interpreter(tmp_path, n):
    """The embedded home's queue runs in the worker, not in a new interpreter,
    and keeps the script's reply and files."""
    import re
    from .conftest import SRC
    from .serve_harness import ServeServer
    xdg = tmp_path / "xdg"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XDG_DATA_HOME": str(xdg),
           "HOME": str(tmp_path), "PYTHONPATH": str(SRC)}
    s = ServeServer(None, tmp_path / "s", "-c", "1", env=env, qmailhome=False)
    s.start(timeout=20)
    try:
        qhome = xdg / "qspp"
        me = (qhome / "control" / "me").read_bytes().rstrip(b"\n")
        for i in range(n):
            c = s.connect(greet=b"220 " + me + b" ESMTP\r\n", timeout=20)
            for cmd, want in ((b"MAIL FROM:<a@b>", OK), (b"RCPT TO:<u%d@localhost>" % i, OK),
                              (b"DATA", GO)):
                assert c.cmd(cmd) == want
            c.send(b"Subject: %d\r\n\r\nhello\r\n.\r\n" % i)
            m = re.fullmatch(rb"250 ok \d+ qp (\d+)\r\n", c.reply(timeout=20))
            assert m
            (worker,) = s.children()
            assert int(m.group(1)) == worker  # the session delivered itself
            c.send(b"QUIT\r\n")
            assert c.rest().startswith(b"221 ")
        new = sorted(p.read_bytes() for p in (qhome / "Maildir" / "new").iterdir())
        assert len(new) == n
        assert all(b"X-Envelope-To: <u%d@localhost>" % i in m for i, m in enumerate(new))
        assert list((qhome / "Maildir" / "tmp").iterdir()) == []
    finally:
        s.stop()


def test_a_message_cut_by_eof_leaves_nothing_behind(home, serve):
    home.control("smtpplugins", PLUGINS)
    s = serve("-c", "1")
    c = s.connect()
    for cmd, want in ((b"MAIL FROM:<half@example.net>", OK), (b"RCPT TO:<a@example.org>", OK),
                      (b"DATA", GO)):
        assert c.cmd(cmd) == want
    c.send(b"Subject: never ends\r\n\r\nhalf")
    time.sleep(0.2)
    c.close()
    wait_for(lambda: not s.sessions(), 5, "the cut session to end")
    c = s.connect()
    run = c.txn(mail=b"MAIL FROM:<m@example.net>")
    assert run.message.count(b"X-Mail") == 1 and b"half" not in run.message
    assert c.cmd(b"QUIT") == QUIT


def test_cram_md5_challenges_differ_between_sessions_of_one_worker(home, serve):
    import re
    install_checkpw(home)
    s = serve("-c", "1", "--", "mx.example.org", "bin/checkpw", "/bin/true")
    (worker,) = s.children()
    seen = []
    for _ in range(3):   # well within one second
        c = s.connect()
        m = re.fullmatch(rb"334 ([A-Za-z0-9+/=]+)\r\n", c.cmd(b"AUTH CRAM-MD5"))
        challenge = base64.b64decode(m.group(1))
        assert re.fullmatch(rb"<\d+\.\d+@mx\.example\.org>", challenge)
        seen.append(challenge)
        assert c.cmd(b"*").startswith(b"501 ")   # cancelled: no 5 s failure delay
        assert c.cmd(b"QUIT") == QUIT
    assert len(set(seen)) == 3, seen
    assert seen[0].startswith(b"<%d." % worker)  # the first is netqmail's <pid.time@host>


def test_workers_start_as_sessions_need_them(home, serve):
    """-c 40 does not mean 40 idle processes: 8 wait, more start as sessions take
    them, and -c stays the bound."""
    s = serve("-c", "12", "--per-ip", "0")
    wait_for(lambda: len(s.children()) == 8, 5, "8 spare workers")
    time.sleep(0.3)
    assert len(s.children()) == 8
    clients = [s.connect() for _ in range(12)]   # the last four wait for new workers
    assert len(s.sessions()) == 12 and len(s.children()) == 12
    late = s.connect(greet=None)
    late.silent(0.5)                      # -c 12: the thirteenth waits in the backlog
    assert len(s.children()) == 12
    for c in clients:
        assert c.cmd(b"QUIT") == QUIT
    assert late.reply() == GREETING
    assert late.cmd(b"QUIT") == QUIT
