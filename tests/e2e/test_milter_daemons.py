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
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import free_port

OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def need(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(tool + " is not installed")
            pytest.skip(tool + " is not installed")



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


# -- OpenDKIM ---------------------------------------------------------------------------

OPENDKIM_CONF = """Mode {mode}
Domain example.org
Selector sel
KeyFile {dir}/sel.private
Socket inet:{port}@127.0.0.1
Background no
Syslog no
RequireSafeKeys false
InternalHosts {internal}
TestPublicKeys {dir}/keys
AuthservID mx.example.org
Canonicalization simple/simple
PidFile {dir}/{mode}.pid
"""

SIGNED_MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: x@example.org\r\n"
                  b"Subject: a folded\r\n  subject line\r\nDate: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
                  b"Message-ID: <dkim@example.org>\r\n\r\n"
                  b"Body line one.\r\n\r\n..a stuffed dot, a trailing blank\r\n\r\n")


@pytest.fixture
def dkim_key(world_dir):
    """A key pair made by opendkim-genkey, and TestPublicKeys naming its public half."""
    need("opendkim", "opendkim-genkey", "openssl")
    subprocess.run(["opendkim-genkey", "-D", str(world_dir), "-d", "example.org", "-s", "sel",
                    "-b", "1024"], check=True, timeout=60)
    txt = (world_dir / "sel.txt").read_text()
    p = re.search(r"p=([A-Za-z0-9+/=]+)", txt).group(1)
    (world_dir / "keys").write_text("sel._domainkey.example.org v=DKIM1; k=rsa; p=%s\n" % p)
    return world_dir, p


def opendkim(world_dir, mode, internal="192.0.2.0/24"):
    port = free_port()
    conf = world_dir / ("opendkim-%s.conf" % mode)
    conf.write_text(OPENDKIM_CONF.format(mode=mode, dir=world_dir, port=port, internal=internal))
    daemon = Daemon(["opendkim", "-x", str(conf), "-f"], world_dir / ("opendkim-%s.log" % mode), port)
    daemon.ready()
    return daemon


@pytest.fixture
def dkim_signer(dkim_key):
    daemon = opendkim(dkim_key[0], "s")
    yield daemon
    daemon.stop()


@pytest.fixture
def dkim_verifier(dkim_key):
    daemon = opendkim(dkim_key[0], "v")
    yield daemon
    daemon.stop()


def _fields(head: bytes):
    """Raw header fields (continuation lines included), each ending in CRLF."""
    out = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line + b"\r\n"
        else:
            out.append(line + b"\r\n")
    return out


def verify_dkim(message: bytes, public_key_b64: str, tmp: Path) -> None:
    """A tiny DKIM verifier for simple/simple rsa-sha256 (RFC 6376 §3.4.1, §3.4.3,
    §3.7), the RSA check done by `openssl dgst -verify` against the test's key."""
    crlf = message.replace(b"\n", b"\r\n")
    head, _, body = crlf.partition(b"\r\n\r\n")
    fields = _fields(head)
    sig = [f for f in fields if f.lower().startswith(b"dkim-signature:")]
    assert len(sig) == 1, fields
    sig = sig[0]
    tags = {}
    for part in re.sub(rb"\s+", b"", sig.split(b":", 1)[1]).split(b";"):
        if b"=" in part:
            k, v = part.split(b"=", 1)
            tags[k] = v
    assert tags[b"a"] == b"rsa-sha256" and tags.get(b"c", b"simple/simple") == b"simple/simple"
    body = body.rstrip(b"\r\n") + b"\r\n" if body.strip(b"\r\n") else b"\r\n"
    assert base64.b64encode(hashlib.sha256(body).digest()) == tags[b"bh"], "body hash differs"
    unused = list(fields)
    data = b""
    for name in tags[b"h"].split(b":"):
        for i in range(len(unused) - 1, -1, -1):
            if unused[i].split(b":", 1)[0].strip().lower() == name.lower():
                data += unused.pop(i)
                break
    name, value = sig.split(b":", 1)
    data += name + b":" + re.sub(rb"((?:^|;)\s*b=)[^;]*", rb"\1", value[:-2])
    (tmp / "signed-data").write_bytes(data)
    (tmp / "signature").write_bytes(base64.b64decode(tags[b"b"]))
    wrapped = "\n".join(public_key_b64[i:i + 64] for i in range(0, len(public_key_b64), 64))
    (tmp / "pub.pem").write_text("-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n" % wrapped)
    r = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp / "pub.pem"),
                        "-signature", str(tmp / "signature"), str(tmp / "signed-data")],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr, data)


def test_opendkim_signs_and_the_signature_verifies(dkim_key, dkim_signer, home, smtpd, tmp_path):
    home.control("smtpmilters", "inet:127.0.0.1:%d\n" % dkim_signer.port)
    c = smtpd.connect()
    run = c.queued(send(c, SIGNED_MESSAGE, sender=b"alice@example.org"))
    assert run.M.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=example.org;")
    assert b"\r" not in run.M
    verify_dkim(run.M, dkim_key[1], tmp_path)
    # the verifier can fail: one changed body byte and it does
    with pytest.raises(AssertionError, match="body hash differs"):
        verify_dkim(run.M.replace(b"Body line one.", b"Body line 1."), dkim_key[1], tmp_path)


def test_opendkim_verifies_with_authentication_results(dkim_key, dkim_signer, dkim_verifier,
                                                       home, smtpd):
    """Sign through one OpenDKIM, then send the queued message (qmail's LF made CRLF,
    dots stuffed) from an outside client through a verifying OpenDKIM."""
    home.control("smtpmilters", "inet:127.0.0.1:%d\n" % dkim_signer.port)
    c = smtpd.connect()
    signed = c.queued(send(c, SIGNED_MESSAGE, sender=b"alice@example.org")).M
    home.control("smtpmilters", "inet:127.0.0.1:%d\n" % dkim_verifier.port)
    home.setenv(TCPREMOTEIP="203.0.113.9")
    wire = signed.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
    for tamper, result in ((False, b"dkim=pass"), (True, b"dkim=fail")):
        c = smtpd.connect()
        msg = wire.replace(b"Body line one.", b"Body line 1.") if tamper else wire
        run = c.queued(send(c, msg, sender=b"alice@example.org"))
        ar = re.search(rb"(?:^|\n)Authentication-Results: mx\.example\.org;\s*(dkim=\w+)", run.M)
        assert ar and ar.group(1) == result, run.M[:1500]


# -- OpenDMARC ---------------------------------------------------------------------------

OPENDMARC_CONF = """AuthservID mx.example.org
Socket inet:{port}@127.0.0.1
Background false
Syslog false
PidFile {dir}/opendmarc.pid
TestDNSData {dir}/dns
RejectFailures true
IgnoreHosts {dir}/ignore
"""


@pytest.fixture
def dmarc(dkim_key):
    need("opendmarc")
    d = dkim_key[0]
    (d / "dns").write_text("_dmarc.example.org v=DMARC1; p=reject\n")
    (d / "ignore").write_text("127.0.0.1\n")
    port = free_port()
    (d / "opendmarc.conf").write_text(OPENDMARC_CONF.format(port=port, dir=d))
    daemon = Daemon(["opendmarc", "-c", str(d / "opendmarc.conf"), "-f"], d / "opendmarc.log", port)
    try:
        daemon.ready()
        yield daemon
    finally:
        daemon.stop()


def test_opendmarc_offline_reads_opendkims_result(dkim_key, dkim_signer, dkim_verifier, dmarc,
                                                   home, smtpd):
    """OpenDKIM verifies first; OpenDMARC, the second milter, sees its
    Authentication-Results as it would under Postfix, and judges example.org's
    p=reject policy from TestDNSData."""
    home.control("smtpmilters", "inet:127.0.0.1:%d\n" % dkim_signer.port)
    c = smtpd.connect()
    signed = c.queued(send(c, SIGNED_MESSAGE, sender=b"alice@example.org")).M
    home.control("smtpmilters", "inet:127.0.0.1:%d\ninet:127.0.0.1:%d\n"
                 % (dkim_verifier.port, dmarc.port))
    home.setenv(TCPREMOTEIP="203.0.113.9")
    wire = signed.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
    c = smtpd.connect()
    run = c.queued(send(c, wire, sender=b"alice@example.org"))
    assert re.search(rb"(?:^|\n)Authentication-Results: mx\.example\.org; dmarc=pass "
                     rb"\(p=reject dis=none\) header\.from=example\.org\n", run.M), run.M[:1500]
    c = smtpd.connect()
    reply = send(c, wire.replace(b"Body line one.", b"Body line 1."), sender=b"alice@example.org")
    assert reply == b"550 5.7.1 rejected by DMARC policy for example.org\r\n"
    home.assert_no_new_runs()


CHECKPW = """import os, sys
data = os.read(3, 512)
if data.split(b"\\0")[:2] != [b"user", b"secret"]:
    sys.exit(1)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_opendkim_signs_for_clients_that_auth(dkim_key, home, smtpd, tmp_path):
    """No internal hosts: OpenDKIM signs because qspp tells it {auth_type} and
    {auth_authen} after a successful AUTH, and only then (the README's recipe)."""
    d = dkim_key[0]
    (d / "s.pid").unlink(missing_ok=True)
    signer = opendkim(d, "s", internal="127.0.0.2")
    try:
        home.python_plugin("bin/checkpw", CHECKPW)
        home.args = ["mx.example.org", "bin/checkpw", "/bin/true"]
        home.control("smtpmilters", "inet:127.0.0.1:%d\n" % signer.port)
        c = smtpd.connect()
        c.send(b"EHLO client.example.com\r\n")
        c.reply()
        c.send(b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n")
        assert c.reply() == b"235 ok, go ahead (#2.0.0)\r\n"
        run = c.queued(send(c, SIGNED_MESSAGE, sender=b"alice@example.org"))
        assert run.M.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
        verify_dkim(run.M, dkim_key[1], tmp_path)
        c = smtpd.connect()
        run = c.queued(send(c, SIGNED_MESSAGE, sender=b"alice@example.org"))
        assert b"DKIM-Signature:" not in run.M
    finally:
        signer.stop()
