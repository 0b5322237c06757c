"""Real clients (smtplib, swaks) against qspp, and qspp on plain pipes (no tcpserver)."""

import os
import re
import shlex
import shutil
import smtplib
import subprocess

import pytest

RECEIVED_F = b"Received: from client.example.com (192.0.2.7)\n  by 198.51.100.1 with SMTP; <D>\n"
SWAKS = shutil.which("swaks")


# ---------------------------------------------------------------- smtplib

def test_smtplib_sendmail(home, smtpd):
    smtpd.start()
    s = smtplib.SMTP("127.0.0.1", smtpd.port, local_hostname="client.example.com", timeout=10)
    try:
        assert s.ehlo() == (250, b"mx.example.org\nPIPELINING\n8BITMIME")
        assert s.has_extn("pipelining") and not s.has_extn("size")
        assert s.mail("a@b.c") == (250, b"ok")
        assert s.rcpt("x@example.org") == (250, b"ok")
        assert s.rcpt("z@far.away") == (
            553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
        assert s.rcpt("y@sub.example.net") == (250, b"ok")
        code, text = s.data(b"Subject: smtplib\r\n\r\nline 1\r\n.dot\r\n\r\nend")
        assert code == 250
        m = re.fullmatch(rb"ok (\d+) qp (\d+)", text)
        assert m, text
        run = home.run(int(m.group(2)))
        assert run.E == b"Fa@b.c\0Tx@example.org\0Ty@sub.example.net\0\0"
        assert run.message == RECEIVED_F + b"Subject: smtplib\n\nline 1\n.dot\n\nend\n"
        assert s.verify("x") == (252, b"send some mail, i'll try my best")
        assert s.rset() == (250, b"flushed")
        assert s.noop() == (250, b"ok")
        assert s.docmd("EXPN", "x") == (502, b"unimplemented (#5.5.1)")
    finally:
        assert s.quit() == (221, b"mx.example.org")


def test_smtplib_refused_everything(home, smtpd):
    home.control("badmailfrom", "spam@example.com\n")
    smtpd.start()
    with smtplib.SMTP("127.0.0.1", smtpd.port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("spam@example.com", ["x@example.org"], b"hi\r\n")
        assert e.value.recipients == {"x@example.org": (
            553, b"sorry, your envelope sender is in my badmailfrom list (#5.7.1)")}
    home.assert_no_new_runs()


# ---------------------------------------------------------------- swaks

def swaks(smtpd, *args, timeout=30):
    if SWAKS is None:
        pytest.skip("swaks is not installed")
    smtpd.start()
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(smtpd.port),
                           "--timeout", "10", *args],
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("pipeline", [False, True])
def test_swaks_delivers(home, smtpd, pipeline):
    extra = ["--pipeline"] if pipeline else []
    p = swaks(smtpd, "--from", "a@b.c", "--to", "x@example.org,y@a.example.net",
              "--helo", "helo.example", "--data", "Subject: swaks\n\nhello\n.dot\n..two",
              *extra)
    out = p.stdout
    assert p.returncode == 0, out
    assert b"<-  220 mx.example.org ESMTP" in out
    assert b"<-  250-PIPELINING" in out and b"<-  250 8BITMIME" in out
    m = re.search(rb"<-  250 ok (\d+) qp (\d+)\r?\n", out)
    assert m, out
    run = home.run(int(m.group(2)))
    assert run.E == b"Fa@b.c\0Tx@example.org\0Ty@a.example.net\0\0"
    assert run.message == (b"Received: from client.example.com (HELO helo.example) (192.0.2.7)\n"
                           b"  by 198.51.100.1 with SMTP; <D>\n"
                           b"Subject: swaks\n\nhello\n.dot\n..two\n")
    assert b"<-  221 mx.example.org" in out


def test_swaks_relay_refused(home, smtpd):
    p = swaks(smtpd, "--from", "a@b.c", "--to", "x@far.away", "--data", "Subject: x\n\nx\n")
    assert p.returncode == 24, p.stdout  # swaks: no RCPTs accepted
    assert (b"<** 553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
            in p.stdout)
    home.assert_no_new_runs()


def test_swaks_relayclient(home, smtpd):
    home.setenv(RELAYCLIENT="")
    p = swaks(smtpd, "--from", "<>", "--to", "x@far.away", "--data", "Subject: x\n\nx\n")
    assert p.returncode == 0, p.stdout
    m = re.search(rb"<-  250 ok \d+ qp (\d+)", p.stdout)
    run = home.run(int(m.group(1)))
    assert run.E == b"F\0Tx@far.away\0\0"


def test_swaks_databytes(home, smtpd):
    home.setenv(DATABYTES="20")
    p = swaks(smtpd, "--from", "a@b", "--to", "x@example.org",
              "--data", "Subject: this is too long\n\nx\n")
    assert p.returncode == 26, p.stdout  # swaks: server did not accept mail following data
    assert (b"<** 552 sorry, that message size exceeds my databytes limit (#5.3.4)"
            in p.stdout)


# swaks --pipe starts its child with SIGCHLD ignored, and ignored signals survive exec:
# the kernel would then reap qmail-queue itself and waitpid fail. netqmail, which never
# touches SIGCHLD, answers `451 qq waitpid surprise` for a message it did queue; qspp
# resets SIGCHLD at startup (a deliberate difference), so the client is told the truth.
RESET_SIGCHLD = ("import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_DFL); "
                 "os.execv(sys.executable, [sys.executable, '-m', 'qspp.smtpd'])")


def swaks_pipe(home, cmd):
    if SWAKS is None:
        pytest.skip("swaks is not installed")
    return subprocess.run([SWAKS, "--pipe", " ".join(shlex.quote(a) for a in cmd),
                           "--from", "a@b", "--to", "x@example.org",
                           "--helo", "client.example.com", "--data", "Subject: p\n\npiped"],
                          capture_output=True, env=home.full_env(), timeout=30)


def test_swaks_over_pipes(home):
    """swaks --pipe runs qspp with its stdin and stdout on two pipes."""
    p = swaks_pipe(home, [home.command()[0], "-c", RESET_SIGCHLD])
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(rb"<-  250 ok \d+ qp (\d+)", p.stdout)
    assert m, p.stdout
    run = home.run(int(m.group(1)))
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    assert run.message == RECEIVED_F + b"Subject: p\n\npiped\n"


def test_swaks_over_pipes_sigchld_ignored(home):
    p = swaks_pipe(home, home.command())
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(rb"<-  250 ok \d+ qp (\d+)", p.stdout)
    assert m, p.stdout
    run = home.run(int(m.group(1)))
    assert run.E == b"Fa@b\0Tx@example.org\0\0"


# ---------------------------------------------------------------- pipes, exit status

def test_pipes_quit(home):
    p = home.run_pipes(b"HELO x\r\nQUIT\r\nNOOP\r\n")
    assert p.stdout == b"220 mx.example.org ESMTP\r\n250 mx.example.org\r\n221 mx.example.org\r\n"
    assert p.returncode == 0
    assert p.stderr == b""


def test_pipes_eof_exits_1(home):
    p = home.run_pipes(b"HELO x\r\nNOOP\r\n")
    assert p.stdout == b"220 mx.example.org ESMTP\r\n250 mx.example.org\r\n250 ok\r\n"
    assert p.returncode == 1
    assert p.stderr == b""


def test_pipes_whole_transaction(home):
    p = home.run_pipes(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
                       b"Subject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert p.returncode == 0, p.stderr
    m = re.fullmatch(rb"220 mx.example.org ESMTP\r\n250-mx.example.org\r\n250-PIPELINING\r\n"
                     rb"250 8BITMIME\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
                     rb"250 ok \d+ qp (\d+)\r\n221 mx.example.org\r\n", p.stdout)
    assert m, p.stdout
    run = home.run(int(m.group(1)))
    assert run.message == (b"Received: from client.example.com (HELO c) (192.0.2.7)\n"
                           b"  by 198.51.100.1 with SMTP; <D>\nSubject: s\n\nbody\n")
    assert run.E == b"Fa@b\0Tx@example.org\0\0"


def test_pipes_fatal_controls(home):
    home.control("me", None)
    p = home.run_pipes(b"HELO x\r\n")
    assert p.stdout == b"421 unable to read controls (#4.3.0)\r\n"
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and re.match(rb"qspp: pid \d+: ", lines[0]), p.stderr


def test_pipes_bare_lf_in_data(home):
    p = home.run_pipes(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nx\n.\r\nQUIT\r\n")
    assert p.stdout == (b"220 mx.example.org ESMTP\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
                        b"451 See http://pobox.com/~djb/docs/smtplf.html.\r\n")
    assert p.returncode == 1
    (run,) = home.new_runs()
    assert run.E == b""


def test_pipes_stdout_closed_exits_1_silently(home):
    """A failed write exits 1 silently (SIGPIPE ignored)."""
    r, w = os.pipe()
    os.close(r)  # nobody reads fd 1: the greeting cannot be written
    try:
        proc = subprocess.Popen(home.command(), stdin=subprocess.PIPE, stdout=w,
                                stderr=subprocess.PIPE, env=home.full_env())
    finally:
        os.close(w)
    _, err = proc.communicate(b"NOOP\r\n", timeout=10)
    assert proc.returncode == 1
    assert err == b""


def test_missing_smtpplugins_one_stderr_line(home):
    home.control("smtpplugins", None)
    p = home.run_pipes(b"QUIT\r\n")
    assert p.stdout == b"220 mx.example.org ESMTP\r\n221 mx.example.org\r\n"
    assert p.returncode == 0
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and re.match(rb"qspp: pid \d+: ", lines[0]), p.stderr


# ---------------------------------------------------------------- stderr lines (spec §2.7)

def test_queue_that_cannot_be_executed_is_logged_once(home):
    home.setenv(QMAILQUEUE="/nonexistent")
    p = home.run_pipes(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    assert p.stdout.endswith(b"354 go ahead\r\n451 unable to exec qq (#4.3.0)\r\n"
                             b"221 mx.example.org\r\n")
    lines = p.stderr.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(rb"qspp: pid \d+: cannot execute /nonexistent: No such file or directory",
                        lines[0])


def test_host_without_checkprogram_is_auth_off_with_one_line(home):
    home.args = ["mx.example.org"]
    p = home.run_pipes(b"EHLO c\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\nQUIT\r\n")
    assert p.stdout == (b"220 mx.example.org ESMTP\r\n250-mx.example.org\r\n250-PIPELINING\r\n"
                        b"250 8BITMIME\r\n502 unimplemented (#5.5.1)\r\n221 mx.example.org\r\n")
    assert p.returncode == 0
    lines = p.stderr.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(rb"qspp: pid \d+: HOST mx.example.org without a checkprogram: AUTH is off",
                        lines[0])
