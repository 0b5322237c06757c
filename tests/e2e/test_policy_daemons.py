"""policy: entries against the real policy daemons from Debian (issue 13).

Each test starts its own instance on a free 127.0.0.1 port with its own files
in the test's temporary directory, and stops it by pid (notes/real-daemons.md):

- postgrey, with --delay=2: the first attempt is greylisted with postgrey's
  own text, an early retry too, and the retry after the delay is accepted with
  postgrey's X-Greylist header in the queued message;
- postfwd2 (Debian's postfwd 1.35), rules that REJECT, DEFER, PREPEND and
  DUNNO at CONNECT, HELO, MAIL, RCPT, DATA and END-OF-MESSAGE;
- policyd-spf, which Postfix spawns per connection: here tcpserver does. Its
  verdicts need DNS except for two cases: a localhost client, which it
  declines to check, and a null sender whose HELO is an address literal, which
  has no SPF record by definition (verdict None). Both headers are proven to
  reach the queued message; Pass/Fail verdicts would need a DNS zone.
"""

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from .conftest import TCPSERVER, free_port, stop_process, wait_for


def need(tool):
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("%s is not installed" % tool)
        pytest.skip("%s is not installed" % tool)
    return path



def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def gone(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def me():
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


# -- postgrey -------------------------------------------------------------------------

@pytest.fixture
def postgrey(tmp_path):
    exe = need("postgrey")
    port = free_port()
    db = tmp_path / "postgrey"
    db.mkdir()
    empty = tmp_path / "empty"
    empty.write_text("")
    user, group = me()
    with open(tmp_path / "postgrey.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, "--inet=127.0.0.1:%d" % port, "--delay=2", "--dbdir=%s" % db,
             "--user=%s" % user, "--group=%s" % group, "--hostname=test.host",
             "--whitelist-clients=%s" % empty, "--whitelist-recipients=%s" % empty],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, 20, "postgrey")
        assert proc.poll() is None, (tmp_path / "postgrey.log").read_text()
        yield port
    finally:
        stop_process(proc)


GREYLISTED = (b"450 4.2.0 <x@example.org>: Recipient address rejected: Greylisted,"
              b" see http://postgrey.schweikert.ch/help/example.org.html")


def test_postgrey_greylists_then_accepts_with_its_header(home, smtpd, postgrey):
    home.control("smtpplugins", "[rcpt]\npolicy:inet:127.0.0.1:%d\n" % postgrey)
    t0 = time.monotonic()
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b.example>\r\n")
    c.expect(b"250 ok")
    c.send(b"RCPT TO:<x@example.org>\r\n")
    c.expect(GREYLISTED)
    # too early: still greylisted
    c.send(b"RCPT TO:<x@example.org>\r\n")
    c.expect(GREYLISTED)
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    home.assert_no_new_runs()
    time.sleep(max(0, 3 - (time.monotonic() - t0)))
    c = smtpd.connect()
    run = c.txn(mail=b"MAIL FROM:<a@b.example>")
    lines = run.message.split(b"\n")
    assert re.fullmatch(rb"X-Greylist: delayed [2-9] seconds by postgrey-[0-9.]+ at test\.host;"
                        rb" .*\d\d:\d\d:\d\d \S+", lines[2]), lines[2]
    assert lines[3:] == [b"hi", b""]
    assert run.E == b"Fa@b.example\0Tx@example.org\0\0"
    # postgrey's header goes with the first accepted retry only
    run = c.txn(mail=b"MAIL FROM:<a@b.example>")
    assert run.message.split(b"\n")[2] == b"hi"
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    assert c.stderr() == b""


# -- postfwd ----------------------------------------------------------------------

POSTFWD_RULES = """\
id=C1; protocol_state==CONNECT; client_address==192.0.2.66; action=REJECT listed client
id=H1; protocol_state==HELO; helo_name==bad.helo; action=REJECT bad helo
id=M1; protocol_state==MAIL; sender==spammer@bad.example; action=REJECT bad sender
id=R1; protocol_state==RCPT; recipient==reject@example.org; action=REJECT no thanks
id=R2; protocol_state==RCPT; recipient==defer@example.org; action=DEFER later please
id=R3; protocol_state==RCPT; recipient==tag@example.org; action=PREPEND X-Postfwd: tagged
id=R4; protocol_state==RCPT; recipient==code@example.org; action=550 5.1.1 unknown here
id=D1; protocol_state==DATA; sender==nodata@b.example; action=DEFER no data now
id=E1; protocol_state==END-OF-MESSAGE; size>=3000; action=REJECT too big for postfwd
id=Z; action=DUNNO
"""


@pytest.fixture
def postfwd(tmp_path):
    exe = need("postfwd2")
    port = free_port()
    d = tmp_path / "postfwd"
    d.mkdir()
    (d / "rules").write_text(POSTFWD_RULES)
    user, group = me()
    pidfile = d / "pid"
    # postfwd2 always daemonizes (notes/real-daemons.md): its pidfile names it
    with open(d / "log", "wb") as log:
        subprocess.run([exe, "--file=%s" % (d / "rules"), "--interface=127.0.0.1",
                        "--port=%d" % port, "--pidfile=%s" % pidfile, "--user=%s" % user,
                        "--group=%s" % group, "--cache_socket=unix::%s" % (d / "cache.sock"),
                        "--nodns"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                       check=True, timeout=30)
    pid = None
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "postfwd pidfile")
        pid = int(pidfile.read_text())
        wait_for(lambda: listening(port) or gone(pid), 20, "postfwd")
        assert not gone(pid), (d / "log").read_text()
        yield port
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            # its children share the process group it made for itself
            try:
                wait_for(lambda: gone(pid), 10, "postfwd to stop")
            finally:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_postfwd_rules_in_several_sections(home, smtpd, postfwd):
    e = "policy:inet:127.0.0.1:%d" % postfwd
    home.control("smtpplugins", "[connection]\n%s\n[helo]\n%s\n[mail]\n%s\n[rcpt]\n%s\n"
                                "[data]\n%s\n[body]\n%s\n" % ((e,) * 6))
    home.setenv(TCPREMOTEIP="192.0.2.66", TCPREMOTEHOST=None)
    c = smtpd.connect(greet=None)
    c.expect(b"554 5.7.1 <unknown[192.0.2.66]>: Client host rejected: listed client")
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    home.setenv(TCPREMOTEIP="192.0.2.7", TCPREMOTEHOST="client.example.com")
    c = smtpd.connect()
    c.send(b"HELO bad.helo\r\n")
    c.expect(b"554 5.7.1 <bad.helo>: Helo command rejected: bad helo")
    c.send(b"HELO good.helo\r\n")
    c.expect(b"250 mx.example.org")
    c.send(b"MAIL FROM:<spammer@bad.example>\r\n")
    c.expect(b"554 5.7.1 <spammer@bad.example>: Sender address rejected: bad sender")
    c.send(b"MAIL FROM:<a@b.example>\r\n")
    c.expect(b"250 ok")
    for rcpt, reply in (
            (b"reject", b"554 5.7.1 <reject@example.org>: Recipient address rejected: no thanks"),
            (b"defer", b"450 4.7.1 <defer@example.org>: Recipient address rejected: later please"),
            (b"code", b"550 5.1.1 <code@example.org>: Recipient address rejected: unknown here"),
            (b"tag", b"250 ok"), (b"plain", b"250 ok")):
        c.send(b"RCPT TO:<%s@example.org>\r\n" % rcpt)
        c.expect(reply)
    run = c.queued(message(c, b"Subject: small\r\n\r\nhi\r\n"))
    assert run.E == b"Fa@b.example\0Ttag@example.org\0Tplain@example.org\0\0"
    assert run.message.split(b"\n")[1:4] == [
        b"  by 198.51.100.1 with SMTP; <D>", b"X-Postfwd: tagged", b"Subject: small"]
    # END-OF-MESSAGE sees the size
    c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<plain@example.org>\r\n")
    c.expect(b"250 ok", b"250 ok")
    assert message(c, b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 50) == (
        b"554 5.7.1 <END-OF-MESSAGE>: End-of-data rejected: too big for postfwd\r\n")
    # DATA
    c.send(b"MAIL FROM:<nodata@b.example>\r\nRCPT TO:<plain@example.org>\r\nDATA\r\n")
    c.expect(b"250 ok", b"250 ok", b"450 4.7.1 <DATA>: Data command rejected: no data now")
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    assert c.stderr() == b""
    home.assert_no_new_runs()


def message(c, body):
    c.send(b"DATA\r\n")
    c.expect(b"354 go ahead")
    c.send(body + b".\r\n")
    return c.reply()


# -- policyd-spf ------------------------------------------------------------------

SPF_CONF = """\
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1
"""


@pytest.fixture
def policyd_spf(tmp_path):
    exe = need("policyd-spf")
    if TCPSERVER is None:
        need("tcpserver")
    conf = tmp_path / "policyd-spf.conf"
    conf.write_text(SPF_CONF)
    port = free_port()
    # Postfix's spawn(8) runs it per connection on stdin/stdout: tcpserver does here
    with open(tmp_path / "spf.log", "wb") as log:
        proc = subprocess.Popen([TCPSERVER, "-R", "-H", "-l", "0", "127.0.0.1", str(port),
                                 exe, str(conf)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, 20, "policyd-spf's tcpserver")
        assert proc.poll() is None
        yield port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        stop_process(proc)


def spf_header(home, smtpd, ip, helo, mail):
    """The header policyd-spf had prepended to a message from IP after HELO."""
    home.setenv(TCPREMOTEIP=ip)
    c = smtpd.connect()
    c.send(b"HELO " + helo + b"\r\n")
    c.expect(b"250 mx.example.org")
    run = c.txn(mail=b"MAIL FROM:<" + mail + b">")
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    assert c.stderr() == b""
    return run.message.split(b"\n")[2]


def test_policyd_spf_is_asked_and_its_verdicts_reach_the_message(home, smtpd, policyd_spf):
    home.control("smtpplugins", "[rcpt]\npolicy:inet:127.0.0.1:%d\n" % policyd_spf)
    # a localhost client: policyd-spf declines, and says so in a header
    assert spf_header(home, smtpd, "127.0.0.1", b"h.example", b"a@b.example") == (
        b"X-Comment: SPF check N/A for local connections - client-ip=127.0.0.1;"
        b" helo=h.example; envelope-from=a@b.example; receiver=example.org")
    # a null sender from an address-literal HELO: SPF's verdict None, without DNS
    assert spf_header(home, smtpd, "192.0.2.7", b"[192.0.2.7]", b"") == (
        b"Received-SPF: None (no SPF record) identity=helo; client-ip=192.0.2.7;"
        b" helo=[192.0.2.7]; envelope-from=<>; receiver=example.org")
