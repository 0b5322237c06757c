"""Real milters behind qspp: rspamd, OpenDKIM and OpenDMARC from Debian's packages.

Each test starts its own private daemon (own config in a temp dir, 127.0.0.1 on a
free port, run in the foreground and stopped by its pid) and talks to it through
the real tcpserver and qspp, with the recording queue.  Without a daemon the test
is skipped, or fails when CI is set.
"""

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def need(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(tool + " is not installed")
            pytest.skip(tool + " is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A foreground daemon in its own session, stopped by pid."""

    def __init__(self, argv, log: Path, port: int):
        self.log = log
        self.port = port
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                         start_new_session=True)

    def ready(self, timeout=30) -> None:
        """Wait until it completes a milter option negotiation."""
        from qspp import milter
        deadline = time.monotonic() + timeout
        spec = milter.Spec(b"inet:127.0.0.1:%d" % self.port, 2)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("daemon exited: " + self.log.read_text(errors="replace")[-2000:])
            m = milter.Milter(spec)
            try:
                m.negotiate()
                m.close(True)
                return
            except milter.MilterError:
                m.close(False)
            if time.monotonic() > deadline:
                raise AssertionError("daemon not ready: " + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.1)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()


@pytest.fixture
def world_dir():
    """A temp dir a daemon's unprivileged user can read (pytest's are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="qspp-milter-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def send(c, body, sender=b"a@b.example", rcpt=b"x@example.org"):
    c.send(b"HELO client.example.com\r\n")
    c.reply()
    c.send(b"MAIL FROM:<" + sender + b">\r\n")
    assert c.reply() == OK
    c.send(b"RCPT TO:<" + rcpt + b">\r\n")
    assert c.reply() == OK
    c.send(b"DATA\r\n")
    assert c.reply() == GO
    c.send(body + b".\r\n")
    return c.reply(timeout=30)


# -- rspamd ---------------------------------------------------------------------------

RSPAMD_CONF = """.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 30s;
    count = 1;
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
}}
"""
# offline: a dead resolver, a four-line TLD list (the stock one takes seconds to
# compile), every network module off, no greylisting, headers for local clients too
RSPAMD_OPTIONS = """url_tld = "{dir}/tld.dat";
local_addrs = [];
dns {{
    nameserver = ["127.0.0.1:9"];
    timeout = 0.1s;
    retransmits = 1;
}}
"""
RSPAMD_OFF = ("rbl surbl spf dkim dmarc fuzzy_check asn phishing emails hfilter greylist "
              "ratelimit replies neural mx_check reputation url_redirector history_redis "
              "rspamd_update dcc p0f clickhouse elastic metadata_exporter antivirus "
              "external_services arc bimi maillist mid spamtrap once_received dkim_signing "
              "whitelist classifier-bayes").split()


@pytest.fixture
def rspamd(world_dir):
    need("rspamd")
    d = world_dir
    for sub in ("local.d", "override.d", "db", "run", "log"):
        (d / sub).mkdir()
    port = free_port()
    (d / "rspamd.conf").write_text(RSPAMD_CONF.format(port=port))
    (d / "tld.dat").write_text("com\norg\nnet\nexample\n")
    (d / "override.d/options.inc").write_text(RSPAMD_OPTIONS.format(dir=d))
    for module in RSPAMD_OFF:
        (d / "local.d" / (module + ".conf")).write_text("enabled = false;\n")
    (d / "local.d/actions.conf").write_text("greylist = null;\n")
    (d / "local.d/milter_headers.conf").write_text(
        'skip_local = false;\nskip_authenticated = false;\n'
        'use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-status"];\n')
    for sub in ("db", "run", "log"):
        (d / sub).chmod(0o777)
    argv = ["rspamd", "-c", str(d / "rspamd.conf"), "-f", "-i",
            "--var", "LOCAL_CONFDIR=%s" % d, "--var", "DBDIR=%s/db" % d,
            "--var", "RUNDIR=%s/run" % d, "--var", "LOGDIR=%s/log" % d]
    if os.getuid() == 0:
        argv += ["-u", "_rspamd", "-g", "_rspamd"]
    daemon = Daemon(argv, d / "stdout.log", port)
    try:
        daemon.ready()
        yield daemon
    finally:
        daemon.stop()


def test_rspamd_negotiates_v6_with_every_no_reply_flag(rspamd, home):
    from qspp import milter
    spec = milter.Spec(b"inet:127.0.0.1:%d" % rspamd.port, 5)
    m = milter.Milter(spec)
    m.negotiate()
    m.close(True)
    assert m.version == 6
    no_reply = (milter.P_NR_CONN | milter.P_NR_HELO | milter.P_NR_MAIL | milter.P_NR_RCPT
                | milter.P_NR_DATA | milter.P_NR_HDR | milter.P_NR_EOH | milter.P_NR_BODY)
    assert m.protocol & no_reply == no_reply


def test_rspamd_refuses_gtube_and_queues_clean_mail_with_its_headers(rspamd, home, smtpd):
    home.control("smtpmilters", "inet:127.0.0.1:%d\n" % rspamd.port)
    c = smtpd.connect()
    spam = (b"From: a@b.example\r\nTo: x@example.org\r\nSubject: test\r\n"
            b"Message-ID: <gtube@b.example>\r\n\r\n" + GTUBE + b"\r\n")
    assert send(c, spam) == b"554 5.7.1 Gtube pattern\r\n"
    home.assert_no_new_runs()
    clean = (b"From: a@b.example\r\nTo: x@example.org\r\nSubject: lunch\r\n"
             b"Date: Sat, 05 Dec 2026 10:00:00 +0000\r\nMessage-ID: <clean@b.example>\r\n\r\n"
             b"Shall we meet at noon?\r\n")
    c.send(b"MAIL FROM:<a@b.example>\r\n")
    assert c.reply() == OK
    c.send(b"RCPT TO:<x@example.org>\r\nDATA\r\n")
    assert c.replies(2) == [OK, GO]
    c.send(clean + b".\r\n")
    run = c.queued(c.reply(timeout=30))
    head, _, body = run.M.partition(b"\n\n")
    assert body == b"Shall we meet at noon?\n"
    assert re.search(rb"\nX-Spamd-Result: default: False \[", head), head
    assert b"\nX-Rspamd-Queue-Id: " in head
    assert run.E == b"Fa@b.example\0Tx@example.org\0\0"
    c.send(b"QUIT\r\n")
    c.reply()
    c.assert_clean_exit(0)
