"""AUTH and STARTTLS as an admin sees them, under the real tcpserver and `qspp serve`:
FORCETLS set per client by tcprules (issue 10 #12), the server-side line for a
certificate the session cannot load (issue 10 #4), the auth-failed line and the
summary's AUTH and TLS fields (issue 11), and the shipped fail2ban filters run by
the real fail2ban-regex on what a real failed AUTH wrote (samples/fail2ban).
"""

import base64
import json
import os
import re
import shutil
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO
from .serve_harness import start_serve
from .test_auth import (EHLO_AUTH, FAIL535, OK, OK235, PLAIN_GOOD, auth_mode, checkpw_runs)
from .test_starttls import (EHLO_TLS, EHLO_TLS_AUTH, FAILED454, QUIT221, certs,  # noqa: F401
                            client_context, starttls)

ENC538 = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
UN502 = b"502 unimplemented (#5.5.1)\r\n"
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
# EHLO in AUTH mode with FORCETLS before STARTTLS: SIZE stays, AUTH goes
EHLO_FORCED = (b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
               b"250 SIZE 0\r\n")
RULES = '127.0.0.2:allow,FORCETLS="1"\n127.0.0.3:allow,FORCETLS="0"\n:allow\n'

SWAKS = shutil.which("swaks")
FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
SAMPLES = REPO / "samples" / "fail2ban"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def tls_auth_home(home, certs):  # noqa: F811 (the fixture, imported above)
    auth_mode(home)
    home.control("servercert.pem", certs.pem)
    return home


def concurrently(*jobs):
    """Run each callable in a thread (the 535s each take 5 s); re-raise the first error."""
    errors = []

    def run(job):
        try:
            job()
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert not [t for t in threads if t.is_alive()]
    if errors:
        raise errors[0]


def fail_auth(c, line=b"AUTH PLAIN " + b64(b"\0user\0wrong")):
    c.send(line + b"\r\n")
    assert c.reply(timeout=12) == FAIL535


# ---------------------------------------------------------------- FORCETLS (issue 10 #12)

def test_forcetls_per_client_from_tcprules(home, rules_smtpd, certs):  # noqa: F811
    tls_auth_home(home, certs)
    server = rules_smtpd(RULES)
    c = server.connect(source="127.0.0.2")
    assert c.cmd(b"EHLO c") == EHLO_FORCED
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == ENC538
    assert c.cmd(b"AUTH CRAM-MD5") == ENC538
    assert c.cmd(b"AUTH LOGIN") == ENC538
    assert c.cmd(b"dXNlcg==") == UN502          # no exchange: a command again
    assert checkpw_runs(home) == []
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == RH553
    starttls(c)
    assert c.cmd(b"EHLO c") == EHLO_AUTH
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == OK
    assert c.cmd(b"QUIT") == QUIT221
    c.assert_clean_exit(0)
    # FORCETLS=0 and no FORCETLS: netqmail's bytes, AUTH in cleartext as before
    for source in ("127.0.0.3", "127.0.0.1"):
        c = server.connect(source=source)
        assert c.cmd(b"EHLO c") == EHLO_TLS_AUTH, source
        assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235, source
        assert c.cmd(b"QUIT") == QUIT221
        c.assert_clean_exit(0)


def test_forcetls_with_smtplib_and_swaks(home, rules_smtpd, certs):  # noqa: F811
    tls_auth_home(home, certs)
    server = rules_smtpd(RULES)   # started by the factory

    def client():
        return smtplib.SMTP("127.0.0.1", server.port, local_hostname="c", timeout=10,
                            source_address=("127.0.0.2", 0))
    s = client()
    try:
        s.ehlo()
        assert not s.has_extn("auth")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            s.login("user", "secret")
        # asked anyway, the server says why
        assert s.docmd("AUTH", "PLAIN " + PLAIN_GOOD.decode()) == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        s.starttls(context=client_context())
        s.ehlo()
        assert s.has_extn("auth")
        assert s.login("user", "secret") == (235, b"ok, go ahead (#2.0.0)")
        assert s.sendmail("a@b.c", ["x@far.away"], b"Subject: s\r\n\r\nbody\r\n") == {}
    finally:
        s.quit()
    (run,) = home.new_runs()
    assert run.E == b"Fa@b.c\0Tx@far.away\0\0"
    assert b" with ESMTPA; " in run.M

    if SWAKS is None:
        if os.environ.get("CI"):
            pytest.fail("swaks is not installed")
        pytest.skip("swaks is not installed")
    common = [SWAKS, "--server", "127.0.0.1", "--port", str(server.port),
              "--local-interface", "127.0.0.2", "--timeout", "15", "--from", "a@b.c",
              "--to", "x@far.away", "--auth", "PLAIN", "--auth-user", "user",
              "--auth-password", "secret"]
    plain = subprocess.run(common, capture_output=True, timeout=60)
    assert plain.returncode != 0
    assert b"250 SIZE 0" in plain.stdout and b"AUTH LOGIN" not in plain.stdout
    assert b"did not advertise authentication" in plain.stdout + plain.stderr
    home.assert_no_new_runs()
    tls = subprocess.run(common + ["--tls"], capture_output=True, timeout=60)
    assert tls.returncode == 0, tls.stdout + tls.stderr
    assert b"235 ok, go ahead (#2.0.0)" in tls.stdout
    (run,) = home.new_runs()
    assert run.E == b"Fa@b.c\0Tx@far.away\0\0"


# ---------------------------------------------------------------- issue 10 #4

def test_unreadable_servercert_is_logged_with_its_reason(home, smtpd, certs):  # noqa: F811
    home.control("servercert.pem", certs.pem)
    (home.root / "control" / "servercert.pem").chmod(0)
    if os.geteuid() == 0:
        # root reads any file: drop the two capabilities that let it, so the session
        # is refused as an unprivileged session user would be
        home.command = lambda: ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                                PYTHON, "-m", "qspp.smtpd", *home.args]
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_TLS          # still offered, as the TLS patch does
    assert c.cmd(b"STARTTLS") == b"454 TLS missing certificate: Permission denied (#4.3.0)\r\n"
    assert c.cmd(b"NOOP") == OK
    assert c.cmd(b"QUIT") == QUIT221
    assert c.status() == 0
    assert c.stderr_lines() == [
        b"qspp: pid %d: STARTTLS answered 454: cannot load control/servercert.pem (uid %d):"
        b" Permission denied" % (c.pid(), os.geteuid())]


def test_rejected_cipher_list_is_logged_with_its_reason(home, smtpd, certs):  # noqa: F811
    home.control("servercert.pem", certs.pem)
    home.setenv(TLSCIPHERS="NO-SUCH-CIPHER")
    c = smtpd.connect()
    assert c.cmd(b"STARTTLS") == (b"454 TLS unable to initialize ctx: no cipher can be selected."
                                  b" (#4.3.0)\r\n")
    assert c.cmd(b"QUIT") == QUIT221
    assert c.stderr_lines() == [
        b"qspp: pid %d: STARTTLS answered 454: cipher list from TLSCIPHERS or"
        b" control/tlsserverciphers rejected (uid %d): no cipher can be selected."
        % (c.pid(), os.geteuid())]


# ---------------------------------------------------------------- issue 11: the lines

def test_auth_and_tls_outcomes_in_the_summary(home, smtpd, certs):  # noqa: F811
    tls_auth_home(home, certs)
    clients = {}
    for name, spplog in (("text", "text"), ("json", "json"), ("none", None),
                         ("handshake", "text")):
        home.setenv(SPPLOG=spplog)
        clients[name] = smtpd.connect(timeout=15)
    ciphers = {}

    def tls_then_auth(name):
        def job():
            c = clients[name]
            assert c.cmd(b"EHLO c") == EHLO_TLS_AUTH
            ciphers[name] = starttls(c)
            assert c.cmd(b"EHLO c") == EHLO_AUTH
            fail_auth(c)
            assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
            assert c.cmd(b"QUIT") == QUIT221
        return job

    def no_spplog():
        c = clients["none"]
        assert c.cmd(b"AUTH LOGIN " + b64(b"bob \"the\" builder")) == b"334 UGFzc3dvcmQ6\r\n"
        fail_auth(c, b64(b"wrong"))
        assert c.cmd(b"QUIT") == QUIT221

    def bad_handshake():
        c = clients["handshake"]
        assert c.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
        c.send(b"this is not TLS\r\n" * 8)
        assert FAILED454.fullmatch(c.reply())
    concurrently(tls_then_auth("text"), tls_then_auth("json"), no_spplog, bad_handshake)

    def err(name):
        c = clients[name]
        prefix = b"qspp: pid %d: " % c.pid()
        lines = c.stderr_lines()
        assert all(line.startswith(prefix) for line in lines), lines
        return [line[len(prefix):].decode() for line in lines]

    failed = "auth-failed ip=192.0.2.7 mechanism=plain user=user"
    assert err("text") == [
        failed,
        "spp-summary ip=192.0.2.7 host=client.example.com helo=c tls=ok tls_protocol=TLSv1.3"
        " tls_cipher=%s auth1=failed,plain,user auth2=ok,plain,user end=quit"
        % ciphers["text"]]
    line, summary = err("json")
    assert line == failed
    s = json.loads(summary)
    assert s["tls"] == {"outcome": "ok", "protocol": "TLSv1.3", "cipher": ciphers["json"]}
    assert s["auth"] == [{"mechanism": "plain", "user": "user", "outcome": "failed"},
                         {"mechanism": "plain", "user": "user", "outcome": "ok"}]
    assert (s["more_auth"], s["end"]) == (0, "quit")
    # without SPPLOG: the auth-failed line alone
    assert err("none") == ['auth-failed ip=192.0.2.7 mechanism=login user="bob \\"the\\" builder"']
    (summary,) = err("handshake")
    assert re.fullmatch(r'spp-summary ip=192\.0\.2\.7 host=client\.example\.com helo=-'
                        r' tls=failed tls_reason="454 TLS connection failed: [^"]+ \(#4\.3\.0\)"'
                        r' end="TLS handshake failed"', summary), summary


def test_serve_writes_the_same_lines(home, tmp_path):
    auth_mode(home)
    s = start_serve(home, tmp_path / "serve", "--", "mx.example.org", "bin/checkpw", "/bin/true")
    try:
        c = s.connect(timeout=15)
        assert c.cmd(b"EHLO c") == EHLO_AUTH
        fail_auth(c, b"AUTH PLAIN " + b64(b"\0eve\nqspp: pid 1: auth-failed ip=1.2.3.4\0x"))
        assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
        assert c.cmd(b"QUIT") == QUIT221
        m = s.wait_line(rb"^qspp: pid (\d+): auth-failed ip=127\.0\.0\.1 mechanism=plain"
                        rb' user="eve\\nqspp: pid 1: auth-failed ip=1\.2\.3\.4"$')
        session = int(m.group(1))
        assert session != s.pid
        s.wait_line(rb'^qspp: pid %d: spp-summary ip=127\.0\.0\.1 host=unknown helo=c'
                    rb' auth1="failed,plain,eve\\nqspp: pid 1: auth-failed ip=1\.2\.3\.4"'
                    rb" auth2=ok,plain,user end=quit$" % session)
        assert not [line for line in s.lines() if line.startswith(b"qspp: pid 1:")]
    finally:
        s.stop()


# ---------------------------------------------------------------- fail2ban

def tai64n(line: bytes, when: float) -> bytes:
    """The line as multilog's `t` action stamps it."""
    secs = int(when)
    return b"@%016x%08x %s" % ((1 << 62) + 10 + secs, int((when - secs) * 1e9), line)


def fail2ban_regex(config: Path, log: Path, filter_name: str):
    """(matched lines, the IP of each failure) as the real fail2ban-regex reports them."""
    def run(*extra):
        p = subprocess.run([FAIL2BAN_REGEX, "--usedns=no", "-c", str(config), *extra,
                            str(log), filter_name], capture_output=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout
    m = re.search(rb"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed",
                  run(), re.M)
    assert m, run()
    return int(m.group(3)), run("-o", "ip").decode().split()


def test_fail2ban_filters_on_real_lines(home, smtpd, tmp_path):
    if FAIL2BAN_REGEX is None:
        if os.environ.get("CI"):
            pytest.fail("fail2ban-regex (Debian's fail2ban) is not installed")
        pytest.skip("fail2ban-regex (Debian's fail2ban) is not installed")
    auth_mode(home)
    # the address as tcpserver sets it, not fixture F's
    home.setenv(TCPREMOTEIP=None, SPPLOG="text")
    smtpd.passthrough = frozenset({"TCPREMOTEIP"})
    forged = [b"mallory ip=1.2.3.4",
              b"m\nqspp: pid 1: auth-failed ip=1.2.3.4 mechanism=plain user=z",
              b"m\r@400000006a0b0c0d00000000 qspp: pid 1: auth-failed ip=1.2.3.4 mechanism=x"]
    guessers = [smtpd.connect(source="127.0.0.2", timeout=15) for _ in range(3)]

    jobs = []
    for c, user in zip(guessers, forged):
        def job(c=c, user=user):
            assert c.cmd(b"AUTH LOGIN " + b64(user)) == b"334 UGFzc3dvcmQ6\r\n"
            fail_auth(c, b64(b"wrong"))
            assert c.cmd(b"QUIT") == QUIT221
        jobs.append(job)
    # a good client whose HELO name plays at the summary's fields
    good = smtpd.connect(source="127.0.0.5")
    assert good.cmd(b"EHLO h rcpt1=<x@far.away>:553/qmail ip=1.2.3.4").startswith(b"250-")
    assert good.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    assert good.cmd(b"MAIL FROM:<a@b>") == OK
    assert good.cmd(b"RCPT TO:<x@far.away>") == OK
    assert good.cmd(b"QUIT") == QUIT221
    # relay attempts, logged in text and in JSON
    relays = []
    for source, spplog in (("127.0.0.3", "text"), ("127.0.0.4", "json")):
        home.setenv(SPPLOG=spplog)
        c = smtpd.connect(source=source)
        assert c.cmd(b"HELO h") == b"250 mx.example.org\r\n"
        assert c.cmd(b"MAIL FROM:<a@b>") == OK
        assert c.cmd(b"RCPT TO:<x@example.org>") == OK
        assert c.cmd(b"RCPT TO:<y@far.away>") == RH553
        assert c.cmd(b"QUIT") == QUIT221
        relays.append(c)
    concurrently(*jobs)

    # one log as a run file's logger gets it: tcpserver's lines and every session's
    now = time.time()
    lines = smtpd.log.read_bytes().splitlines()
    for c in guessers + [good] + relays:
        assert c.status() == 0
        lines += c.stderr_lines()
    assert len([line for line in lines
                if re.match(rb"qspp: pid \d+: auth-failed ip=127\.0\.0\.2 ", line)]) == 3
    raw = tmp_path / "current.raw"
    raw.write_bytes(b"".join(line + b"\n" for line in lines))
    stamped = tmp_path / "current"
    stamped.write_bytes(b"".join(tai64n(line, now) + b"\n" for line in lines))

    # filters that include common.conf load only from a config dir holding it
    config = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", config)
    for f in (SAMPLES / "filter.d").iterdir():
        shutil.copy(f, config / "filter.d" / f.name)
    for log in (raw, stamped):
        assert fail2ban_regex(config, log, "qspp-auth") == (3, ["127.0.0.2"] * 3), log
        assert fail2ban_regex(config, log, "qspp-rcpthosts") == (
            2, ["127.0.0.3", "127.0.0.4"]), log

    # the jail example loads, with both jails on the log
    shutil.copy(SAMPLES / "jail.d" / "qspp.conf", config / "jail.d" / "qspp.conf")
    (config / "jail.d" / "qspp.local").write_text(
        "[qspp-auth]\nlogpath = %s\n[qspp-rcpthosts]\nlogpath = %s\n" % (stamped, stamped))
    p = subprocess.run([shutil.which("fail2ban-client"), "-c", str(config), "-d"],
                       capture_output=True, timeout=60)
    assert p.returncode == 0 and b"ERROR" not in p.stdout + p.stderr, p.stdout + p.stderr
    for jail in (b"qspp-auth", b"qspp-rcpthosts"):
        assert b"['set', '%s', 'addlogpath', '%s', 'head']" % (jail, bytes(stamped)) in p.stdout
