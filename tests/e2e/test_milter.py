"""Milters end to end: a real tcpserver, real qspp processes, the recording queue,
and FakeMilter (tests/unit/test_milter_fake.py) on a unix socket in the test's
temp dir.  NOMILTER and MILTERS come from a real tcprules cdb."""

import re
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_milter_fake import CLOSE, HANG, FakeMilter, pkt  # noqa: E402

from .test_starttls import certs  # noqa: E402,F401  (the certificate fixture)

OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
TEMPFAIL = b"451 4.7.1 Service unavailable - try again later\r\n"
CTL421 = b"421 unable to read controls (#4.3.0)\r\n"
RCVD = (b"Received: from client.example.com (HELO h) (192.0.2.7)\n"
        b"  by 198.51.100.1 with SMTP; <D>\n")


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(name="m.sock", **kw):
        m = FakeMilter(tmp_path / name, **kw)
        made.append(m)
        return m
    yield make
    for m in made:
        m.stop()


def use(home, *milters, options=""):
    home.control("smtpmilters", "".join("%s %s\n" % (m.address, options) for m in milters))


def send(c, body=b"Subject: t\r\n\r\nbody\r\n"):
    c.send(b"HELO h\r\n")
    c.reply()
    c.send(b"MAIL FROM:<a@b.example>\r\n")
    assert c.reply() == OK
    c.send(b"RCPT TO:<x@example.org>\r\n")
    assert c.reply() == OK
    c.send(b"DATA\r\n")
    assert c.reply() == GO
    c.send(body + b".\r\n")
    return c.reply()


def test_changes_reach_the_real_queue_program(home, smtpd, fake):
    def eom(data):
        return (pkt(b"h", b"X-Filtered\0yes\0")
                + pkt(b"i", struct.pack(">I", 0) + b"X-Top\0first\0")
                + pkt(b"+", b"<copy@example.net>\0") + pkt(b"c"))
    m = fake(answers={b"E": eom})
    use(home, m)
    c = smtpd.connect()
    run = c.queued(send(c))
    assert run.message == b"X-Top: first\n" + RCVD + b"Subject: t\nX-Filtered: yes\n\nbody\n"
    assert run.E == b"Fa@b.example\0Tx@example.org\0Tcopy@example.net\0\0"
    assert m.last.body() == b"body\r\n"
    c.send(b"QUIT\r\n")
    assert c.reply() == b"221 mx.example.org\r\n"
    c.assert_clean_exit(0)
    assert m.last.closed.wait(5)
    assert m.last.cmds().replace(b"D", b"") == b"OCHMRTLLNBEQ"


def test_reject_at_end_never_queues(home, smtpd, fake):
    m = fake(answers={b"E": lambda d: pkt(b"y", b"554 5.7.1 Gtube pattern\0")})
    use(home, m)
    c = smtpd.connect()
    assert send(c) == b"554 5.7.1 Gtube pattern\r\n"
    c.send(b"QUIT\r\n")
    c.reply()
    c.assert_clean_exit(0)
    home.assert_no_new_runs()


@pytest.mark.parametrize("event", [b"B", b"E"])
def test_milter_closing_mid_message(home, smtpd, fake, event):
    m = fake(answers={event: lambda d: CLOSE})
    use(home, m)
    c = smtpd.connect()
    assert send(c) == TEMPFAIL
    c.send(b"MAIL FROM:<a@b.example>\r\n")
    assert c.reply() == TEMPFAIL
    c.send(b"QUIT\r\n")
    c.reply()
    assert c.status() == 0
    err = c.stderr_lines()
    assert len(err) == 1 and err[0].endswith(b": connection closed; default tempfail"), err
    home.assert_no_new_runs()


def test_silent_milter_times_out(home, smtpd, fake):
    m = fake(answers={b"E": lambda d: HANG})
    use(home, m, options="timeout=1")
    c = smtpd.connect()
    t = time.monotonic()
    assert send(c) == TEMPFAIL
    assert time.monotonic() - t < 4
    home.assert_no_new_runs()


def test_unreachable_milter_answers_the_first_command(home, smtpd, tmp_path):
    home.control("smtpmilters", "unix:%s/nobody.sock\n" % tmp_path)
    c = smtpd.connect()
    c.send(b"EHLO h\r\n")
    assert c.reply() == TEMPFAIL
    c.send(b"QUIT\r\n")
    assert c.reply() == b"221 mx.example.org\r\n"
    assert c.status() == 0


def test_bad_smtpmilters_is_an_unreadable_control(home, smtpd):
    home.control("smtpmilters", "tcp:localhost:25\n")
    c = smtpd.connect(greet=None)
    assert c.rest() == CTL421
    assert c.status() == 1
    assert c.stderr_lines()[0].endswith(
        b"control/smtpmilters: bad milter address (inet: or unix:): tcp:localhost:25")


def test_nomilter_and_milters_per_client(home, rules_smtpd, fake, tmp_path):
    m1 = fake("one.sock", answers={b"E": lambda d: pkt(b"h", b"X-One\01\0") + pkt(b"c")})
    m2 = fake("two.sock", answers={b"E": lambda d: pkt(b"h", b"X-Two\02\0") + pkt(b"c")})
    use(home, m1)
    home.write("control/othermilters", "%s\n" % m2.address)
    server = rules_smtpd('127.0.0.2:allow,NOMILTER=""\n'
                         '127.0.0.3:allow,MILTERS="control/othermilters"\n'
                         ':allow\n')
    seen = {}
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        c = server.connect(source=source)
        run = c.queued(send(c))
        seen[source] = [h for h in (b"X-One", b"X-Two") if h in run.M]
    assert seen == {"127.0.0.1": [b"X-One"], "127.0.0.2": [], "127.0.0.3": [b"X-Two"]}


def test_fifty_megabytes_through_a_milter_in_bounded_memory(home, smtpd, fake, background_send):
    """The message is spooled, sent to the milter in chunks and copied to the queue:
    qspp's peak RSS stays far below the message size."""
    m = fake(answers={b"E": lambda d: pkt(b"h", b"X-Big\0yes\0") + pkt(b"c")},
             protocol=0x80000 | 0x80)  # no replies to headers and body chunks
    use(home, m)
    c = smtpd.connect(timeout=60)
    c.send(b"HELO h\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    assert c.replies(4) == [b"250 mx.example.org\r\n", OK, OK, GO]
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (50 * 1024 * 1024 // len(line)) + b".\r\n"
    pid = c.pid()
    background_send(c, body)
    reply = c.reply(timeout=120)
    with open("/proc/%d/status" % pid) as f:
        hwm = [int(x.split()[1]) for x in f if x.startswith("VmHWM:")][0]
    run = c.queued(reply)
    n = 50 * 1024 * 1024 // len(line)
    head = run.M.index(b"\nSubject: ")
    assert run.M[head:head + 26] == b"\nSubject: big\nX-Big: yes\n\n"
    assert len(run.M) - head - 26 == n * 999 and run.M.endswith(b"x\n")
    assert sum(len(d) for d in m.last.data(b"B")) == len(body) - len(b"Subject: big\r\n\r\n") - 3
    assert hwm < 40 * 1024, "qspp peak RSS %d kB" % hwm


def test_milter_code_is_imported_only_when_smtpmilters_exists(home, fake):
    """Every connection starts an interpreter: without a milter list qspp.milter
    must not be imported at all."""
    import subprocess
    from .conftest import PYTHON

    def imported():
        r = subprocess.run([PYTHON, "-X", "importtime", "-m", "qspp.smtpd"], input=b"QUIT\r\n",
                           capture_output=True, env=home.full_env(), timeout=30)
        assert r.stdout == b"220 mx.example.org ESMTP\r\n221 mx.example.org\r\n"
        return b"qspp.milter" in r.stderr
    assert not imported()
    use(home, fake())
    assert imported()
    home.setenv(NOMILTER="")
    assert not imported()


def test_edit_code_is_imported_only_for_a_message_a_milter_changes(home, fake):
    """qspp.milteredit is the part of the milter client only a changed message
    needs: a message that comes back untouched does not import it."""
    import subprocess
    from .conftest import PYTHON

    def session(m):
        use(home, m)
        r = subprocess.run([PYTHON, "-X", "importtime", "-m", "qspp.smtpd"],
                           input=b"HELO h\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.org>"
                                 b"\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n",
                           capture_output=True, env=home.full_env(), timeout=30)
        assert re.fullmatch(rb"220 .*\r\n250 .*\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
                            rb"250 ok \d+ qp \d+\r\n221 mx.example.org\r\n", r.stdout), r.stdout
        return b"qspp.milteredit" in r.stderr
    assert not session(fake("same.sock"))
    assert session(fake("edits.sock", answers={b"E": lambda d: pkt(b"h", b"X-A\0b\0") + pkt(b"c")}))


def test_spplog_shows_each_milter_verdict_and_time(home, smtpd, fake):
    m = fake(protocol=0x1000 | 0x2000,  # no replies to connect and HELO
             answers={b"R": lambda d: pkt(b"y", b"550 5.1.1 no\0") if b"bad" in d else None})
    use(home, m)
    home.setenv(SPPLOG="1")
    c = smtpd.connect()
    c.send(b"HELO h\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bad@example.org>\r\n")
    assert c.replies(3) == [b"250 mx.example.org\r\n", OK, b"550 5.1.1 no\r\n"]
    c.send(b"RCPT TO:<x@example.org>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    assert c.replies(3)[:2] == [OK, GO]
    c.reply()
    assert c.status() == 0
    lines = [re.sub(rb",\d+,milter:", b",N,milter:", re.sub(rb" ms=\d+", b" ms=N", ln.split(b": ", 2)[2]))
             for ln in c.stderr_lines()]
    entry = b"milter:" + m.address.encode()
    runs = ((b"mail", b"c"), (b"rcpt", b"550"), (b"rcpt", b"c"), (b"data", b"c"), (b"body", b"ok"))
    assert lines[:5] == [b"spp-run section=%s entry=%s verdict=%s exit=- ms=N" % (p, entry, v)
                         for p, v in runs]
    assert b" rcpt1=<bad@example.org>:550/milter,<x@example.org>:250 " in lines[5]
    assert b" ".join(b"run%d=%s,%s,N,%s" % (n, p, v, entry)
                     for n, (p, v) in enumerate(runs, 1)) + b" end=quit" in lines[5]


def test_tls_macros_after_starttls(home, smtpd, fake, certs):
    from .test_starttls import starttls
    home.control("servercert.pem", certs.pem)
    m = fake()
    use(home, m)
    c = smtpd.connect()
    c.send(b"EHLO h\r\n")
    c.reply()
    cipher = starttls(c).encode()
    c.send(b"EHLO h\r\n")
    c.reply()
    c.queued(send(c))
    # three HELO events (EHLO, EHLO after STARTTLS, send's HELO); the first had
    # no TLS macros, so no macro packet at all
    assert m.last.cmds().replace(b"D", b"")[:4] == b"OCHH"
    helos = [d for d in m.last.data(b"D") if d[:1] == b"H"]
    assert helos == [b"H{tls_version}\0%s\0{cipher}\0%s\0" % (c.sock.version().encode(), cipher)] * 2
