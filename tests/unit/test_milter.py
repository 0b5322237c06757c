"""Milter client: the codec, the message view and the session's milter steps,
against FakeMilter (a real unix socket, a thread speaking the protocol)."""

import struct
import time

import pytest

from qspp import control, milter, milteredit, replies
from qspp.session import CLOSED, COMMAND

try:
    from . import fakes
    from .test_milter_fake import CLOSE, HANG, FakeMilter, optneg_reply, pkt
except ImportError:
    import fakes
    from test_milter_fake import CLOSE, HANG, FakeMilter, optneg_reply, pkt

TEMPFAIL = replies.MILTER_TEMPFAIL + b"\r\n"
REJECT = replies.MILTER_REJECT + b"\r\n"
ALL_NR = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x80 | 0x40000 | 0x80000


@pytest.fixture
def milters(tmp_path):
    started = []

    def make(**kw):
        m = FakeMilter(tmp_path / ("m%d.sock" % len(started)), **kw)
        started.append(m)
        return m
    yield make
    for m in started:
        m.stop()


def harness(*fake, options=b"", env=None, **kw):
    """A Harness whose session has the given milters, started (greeting read)."""
    h = fakes.Harness(start=False, env=env if env is not None else {b"TCPREMOTEPORT": b"40000",
                                                                    b"TCPLOCALIP": b"198.51.100.1"},
                      **kw)
    specs = [milter.parse_line(m if isinstance(m, bytes) else m.address.encode() + b" " + options)
             for m in fake]
    h.session.milters = milter.Milters(specs, h.settings, h.env)
    h.session.start()
    h.greeting = h.take()
    return h


def transaction(h, body=b"Subject: hi\r\nTo: x@example.org\r\n\r\nline one\r\n.dot\r\n"):
    out = h.cmd(b"HELO client.example.com")
    out += h.cmd(b"MAIL FROM:<a@example.com>")
    out += h.cmd(b"RCPT TO:<x@example.org>")
    out += h.cmd(b"DATA")
    out += h.feed(body + b".\r\n")
    return out


# -- the codec --------------------------------------------------------------------

def test_packet_and_optneg():
    assert milter.packet(b"H", b"x\0") == b"\0\0\0\x03Hx\0"
    assert milter.optneg() == b"\0\0\0\x0dO" + struct.pack(">III", 6, 0x1FF, milter.PROTOCOL)
    assert not milter.PROTOCOL & 0x800  # refused recipients are never offered
    v, a, p, lists = milter.parse_optneg(struct.pack(">III", 6, 3, 0x10)
                                         + struct.pack(">I", 2) + b"{auth_type} i\0"
                                         + struct.pack(">I", 0) + b"j,client_addr\0")
    assert (v, a, p) == (6, 3, 0x10)
    assert lists == {2: [b"{auth_type}", b"i"], 0: [b"j", b"{client_addr}"]}
    with pytest.raises(milter.MilterError):
        milter.parse_optneg(b"\0\0\0\6")


def test_decoder_splits_and_refuses_bad_lengths():
    d = milter.Decoder()
    d.feed(pkt(b"c") + pkt(b"y", b"550 no\0")[:5])
    assert d.next() == (b"c", b"")
    assert d.next() is None
    d.feed(pkt(b"y", b"550 no\0")[5:])
    assert d.next() == (b"y", b"550 no\0")
    for bad in (b"\0\0\0\0c", struct.pack(">I", milter.MAX_PACKET + 1)):
        d = milter.Decoder()
        d.feed(bad)
        with pytest.raises(milter.MilterError):
            d.next()


def test_connect_data():
    assert milter.connect_data(b"h.example", b"192.0.2.7", b"25") == \
        b"h.example\0" + b"4" + struct.pack(">H", 25) + b"192.0.2.7\0"
    assert milter.connect_data(b"[::1]", b"::1", b"x")[:8] == b"[::1]\0" + b"6" + b"\0"
    assert milter.connect_data(b"[unknown]", b"unknown", b"0") == b"[unknown]\0U"


def test_valid_reply():
    assert milter.valid_reply(b"554 5.7.1 Gtube pattern")
    assert milter.valid_reply(b"451-4.7.1 one\r\n451 4.7.1 two")
    assert milter.valid_reply(b"550")
    for bad in (b"250 ok", b"55 x", b"554 a\r\n451 b", b"554-a", b"554 a\nb", b"abc"):
        assert not milter.valid_reply(bad), bad


def test_parse_line():
    s = milter.parse_line(b"inet:127.0.0.1:11332")
    assert (s.address, s.timeout, s.default) == (b"inet:127.0.0.1:11332", 30, b"tempfail")
    s = milter.parse_line(b"unix:/run/x.sock\ttimeout=5 default=accept")
    assert (s.address, s.timeout, s.default) == (b"unix:/run/x.sock", 5, b"accept")
    assert milter.parse_line(b"inet:[::1]:8891 default=reject").default == b"reject"
    assert milter.parse_line(b"inet:localhost:8891").address == b"inet:localhost:8891"
    # a name would be looked up with no time limit (getaddrinfo) at every connection
    with pytest.raises(milter.ConfigError) as e:
        milter.parse_line(b"inet:milter.example:8891")
    assert e.value.text == (b"bad milter address (HOST must be an IP address or localhost):"
                            b" inet:milter.example:8891")
    for bad in (b"inet:127.0.0.1", b"inet:host:0", b"inet:host:70000", b"tcp:x:1",
                b"unix:", b"unix:/x timeout=0", b"unix:/x timeout=-1", b"unix:/x default=quarantine",
                b"unix:/x bogus"):
        with pytest.raises(milter.ConfigError):
            milter.parse_line(bad)


def test_load_follows_nomilter_and_milters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "control").mkdir()
    assert milter.load({}) == []  # no control/smtpmilters: no milters
    (tmp_path / "control/smtpmilters").write_bytes(b"# filters\n\nunix:/a\ninet:127.0.0.1:1 timeout=2\n")
    assert [s.address for s in milter.load({})] == [b"unix:/a", b"inet:127.0.0.1:1"]
    assert milter.load({b"NOMILTER": b""}) == []
    (tmp_path / "other").write_bytes(b"unix:/b default=accept\n")
    assert [s.address for s in milter.load({b"MILTERS": b"other"})] == [b"unix:/b"]
    with pytest.raises(control.ControlError):
        milter.load({b"MILTERS": b"missing"})
    (tmp_path / "control/smtpmilters").write_bytes(b"unix:/a\nsmtp:x\n")
    with pytest.raises(control.ControlError) as e:
        milter.load({})
    assert str(e.value) == "control/smtpmilters: bad milter address (inet: or unix:): smtp:x"


# -- the message view ---------------------------------------------------------------

def draft(message: bytes, rcpts=((b"x@example.org", b"x@example.org"),)):
    return milter.Draft([message], b"a@example.com", list(rcpts))


def queued(d):
    q = fakes.FakeQueue({}, b"")
    d.copy_to(q)
    return q.message


def test_draft_splits_header_and_body():
    d = draft(b"Received: one\n two\nSubject:  hi\n\nbody\n.\n")
    assert d.fields() == [(b"Received", b"one\n two"), (b"Subject", b"hi")]
    assert d.separator == b"\n"
    assert b"".join(d.body_chunks()) == b"body\r\n.\r\n"
    # no blank line: the first line that is no header starts the body
    d = draft(b"Received: x\nhi there\n")
    assert d.fields() == [(b"Received", b"x")] and d.separator == b""
    assert b"".join(d.body_chunks()) == b"hi there\r\n"
    assert queued(d) == b"Received: x\nhi there\n"


def test_draft_pieces_keep_the_body_plugin_headers_at_the_mark(tmp_path):
    f = tmp_path / "spool"
    f.write_bytes(b"Received: r\nSubject: s\n\nbody\n")
    import os
    fd = os.open(f, os.O_RDONLY)
    try:
        d = milter.Draft([(fd, 0, 12), b"X-Body: 1\n", (fd, 12, 29)], b"", [])
        assert [n for n, _ in d.fields()] == [b"Received", b"X-Body", b"Subject"]
        assert queued(d) == b"Received: r\nX-Body: 1\nSubject: s\n\nbody\n"
    finally:
        os.close(fd)


def test_draft_edits():
    d = draft(b"Received: r\nSubject: s\nX-A: 1\nx-a: 2\n\nold\n",
              [(b"x@example.org", b"x@example.org"), (b"y@example.org", b"y@example.orgSUFFIX")])
    edits = milteredit.Edits()
    for cmd, data in [
        (b"h", b"X-Spam\0yes\0"),
        (b"i", struct.pack(">I", 0) + b"DKIM-Signature\0v=1;\r\n\tb=abc\0"),
        (b"m", struct.pack(">I", 2) + b"X-A\0changed\0"),
        (b"m", struct.pack(">I", 1) + b"Subject\0\0"),
        (b"m", struct.pack(">I", 1) + b"X-New\0v\0"),  # not there: added
        (b"b", b"new\r\nbo"), (b"b", b"dy\r"), (b"b", b"\n"),
        (b"+", b"<z@example.net>\0"), (b"-", b"<Y@example.org>\0"),
        (b"e", b"<b@example.com>\0SIZE=10\0"),
        (b"q", b"suspicious\0"),
    ]:
        edits.add(cmd, data)
    edits.finish()
    milteredit.apply(d, edits)
    assert edits.body_fd == -1  # the draft owns the new body now
    assert queued(d) == (b"DKIM-Signature: v=1;\n\tb=abc\nReceived: r\nX-A: 1\nX-A: changed\n"
                         b"X-Spam: yes\nX-New: v\nX-Qspp-Quarantine: suspicious\n\nnew\nbody\n")
    assert d.envelope() == b"Fb@example.com\0Tx@example.org\0Tz@example.net\0\0"
    assert b"".join(d.body_chunks()) == b"new\r\nbody\r\n"
    d.close()


def test_draft_untouched_is_copied_byte_for_byte():
    msg = b"Received: r\nweird line\n\n\nbody\r\nwith CR\n"
    d = draft(msg)
    milteredit.apply(d, milteredit.Edits())
    assert queued(d) == msg


def test_draft_bounds_the_header_section():
    big = b"X-Big: " + b"a" * (milter.MAX_HEADER + 10) + b"\n"
    d = draft(b"Received: r\n" + big + b"\nbody\n")
    assert [n for n, _ in d.fields()] == [b"Received"]
    assert b"".join(d.body_chunks()).startswith(b"X-Big: aaa")
    many = b"".join(b"X-%d: v\n" % i for i in range(milter.MAX_HEADER_COUNT + 5))
    d = draft(many + b"\nbody\n")
    assert len(d.fields()) == milter.MAX_HEADER_COUNT
    assert queued(d) == many + b"\nbody\n"


def test_body_chunks_stay_under_the_packet_limit():
    d = draft(b"Subject: x\n\n" + b"\n" * 200000)
    chunks = list(d.body_chunks())
    assert max(len(c) for c in chunks) <= 65535
    assert b"".join(chunks) == b"\r\n" * 200000


# -- the session with a milter ---------------------------------------------------------

def test_every_event_in_order_with_macros(milters):
    m = milters()
    h = harness(m)
    assert h.greeting == b"220 mx.example.org ESMTP\r\n"
    out = transaction(h)
    assert out == (b"250 mx.example.org\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
                   + fakes.QUEUED + b"\r\n")
    conv = m.last
    assert conv.cmds() == b"ODCHDMDRDTLLLDNBDE"
    assert conv.data(b"C") == [b"client.example.com\0" + b"4" + struct.pack(">H", 40000)
                               + b"192.0.2.7\0"]
    assert conv.macros(b"C") == {b"j": b"mx.example.org",
                                 b"_": b"client.example.com [192.0.2.7]",
                                 b"{daemon_name}": b"qspp", b"{if_addr}": b"198.51.100.1",
                                 b"{client_addr}": b"192.0.2.7",
                                 b"{client_name}": b"client.example.com",
                                 b"{client_port}": b"40000"}
    assert conv.data(b"H") == [b"client.example.com\0"]
    assert conv.data(b"M") == [b"<a@example.com>\0"]
    assert conv.macros(b"M")[b"{mail_addr}"] == b"a@example.com"
    qid = conv.macros(b"M")[b"i"]
    assert qid and conv.macros(b"E")[b"i"] == qid
    assert conv.data(b"R") == [b"<x@example.org>\0"]
    assert conv.macros(b"R") == {b"{rcpt_addr}": b"x@example.org"}
    fields = conv.data(b"L")
    assert fields[0].startswith(b"Received\0from client.example.com (192.0.2.7)\n  by 198.51.100.1 with SMTP; ")
    assert fields[1:] == [b"Subject\0hi\0", b"To\0x@example.org\0"]
    assert conv.body() == b"line one\r\ndot\r\n"
    # what qmail-queue got is what it gets without milters
    plain = fakes.Harness()
    transaction(plain)
    assert h.queue.last.message == plain.queue.last.message
    assert h.queue.last.envelope == b"Fa@example.com\0Tx@example.org\0\0"
    h.session.milters.close()
    assert conv.closed.wait(5)
    assert conv.cmds().endswith(b"EQ")


def test_no_reply_flags_and_skipped_steps_rspamd_style(milters):
    """rspamd: every no-reply flag, answers only at end of message; its replycode
    is sent as given and nothing is queued."""
    m = milters(protocol=ALL_NR, answers={b"E": lambda d: pkt(b"y", b"554 5.7.1 Gtube pattern\0")})
    h = harness(m)
    t = time.monotonic()
    out = transaction(h)
    assert time.monotonic() - t < 2
    assert out.endswith(b"354 go ahead\r\n554 5.7.1 Gtube pattern\r\n")
    assert h.queue.queues == []
    m2 = milters(protocol=0x1 | 0x2 | 0x8 | 0x20 | 0x40 | 0x200)  # only MAIL, body, EOM
    h = harness(m2)
    transaction(h)
    assert m2.last.cmds().replace(b"D", b"") == b"OMBE"
    assert len(h.queue.queues) == 1


def test_reject_tempfail_and_replycode_per_command(milters):
    def rcpt(data):
        if b"bad" in data:
            return pkt(b"r")
        if b"later" in data:
            return pkt(b"t")
        if b"own" in data:
            return pkt(b"y", b"550-5.1.1 no such\r\n550 5.1.1 user\0")
        return None
    m = milters(answers={b"R": rcpt})
    h = harness(m)
    h.cmds(b"HELO h", b"MAIL FROM:<a@example.com>")
    assert h.cmd(b"RCPT TO:<bad@example.org>") == REJECT
    assert h.cmd(b"RCPT TO:<later@example.org>") == TEMPFAIL
    assert h.cmd(b"RCPT TO:<own@example.org>") == b"550-5.1.1 no such\r\n550 5.1.1 user\r\n"
    assert h.cmd(b"RCPT TO:<good@example.org>") == b"250 ok\r\n"
    h.cmd(b"DATA")
    h.feed(b"hi\r\n.\r\n")
    assert h.queue.last.envelope == b"Fa@example.com\0Tgood@example.org\0\0"
    # qmail refused it first: the milter never sees it
    assert h.cmd(b"MAIL FROM:<a@example.com>") == b"250 ok\r\n"
    assert h.cmd(b"RCPT TO:<bad@elsewhere.example>").startswith(b"553 ")
    assert b"elsewhere" not in b"".join(m.last.data(b"R"))


def test_mail_refusal_and_rset_abort_the_milter_transaction(milters):
    m = milters(answers={b"M": lambda d: pkt(b"t") if b"no@" in d else None})
    h = harness(m)
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<no@example.com>") == TEMPFAIL
    assert h.cmd(b"RCPT TO:<x@example.org>") == b"503 MAIL first (#5.5.1)\r\n"
    h.cmds(b"MAIL FROM:<a@example.com>", b"RCPT TO:<x@example.org>")
    assert h.cmd(b"RSET") == b"250 flushed\r\n"
    h.session.milters.close()
    m.last.closed.wait(5)
    assert m.last.cmds().replace(b"D", b"") == b"OCHMAMRAQ"


def test_end_of_message_changes_reach_the_queue(milters):
    def eom(data):
        return b"".join([
            pkt(b"h", b"X-Spam-Status\0No, score=0.1\0"),
            pkt(b"i", struct.pack(">I", 0) + b"DKIM-Signature\0v=1; a=rsa-sha256;\n\tb=xyz\0"),
            pkt(b"m", struct.pack(">I", 1) + b"Subject\0[tagged] hi\0"),
            pkt(b"+", b"<copy@example.net>\0"), pkt(b"-", b"<x@example.org>\0"),
            pkt(b"e", b"<bounce@example.com>\0"), pkt(b"b", b"replaced\r\n"),
            pkt(b"p"), pkt(b"a")])
    m = milters(answers={b"E": eom})
    h = harness(m)
    assert transaction(h).endswith(fakes.QUEUED + b"\r\n")
    q = h.queue.last
    assert q.envelope == b"Fbounce@example.com\0Tcopy@example.net\0\0"
    msg = q.message
    assert msg.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;\n\tb=xyz\nReceived: from ")
    assert msg.endswith(b"Subject: [tagged] hi\nTo: x@example.org\n"
                        b"X-Spam-Status: No, score=0.1\n\nreplaced\n")


def test_two_milters_the_second_sees_the_first_ones_changes(milters):
    m1 = milters(answers={b"E": lambda d: pkt(b"h", b"X-First\0one\0") + pkt(b"b", b"new\r\n")
                          + pkt(b"c")})
    m2 = milters(answers={b"E": lambda d: pkt(b"h", b"X-Second\0two\0") + pkt(b"c")})
    h = harness(m1, m2)
    transaction(h)
    assert m2.last.data(b"L")[-1] == b"X-First\0one\0"
    assert m2.last.body() == b"new\r\n"
    assert h.queue.last.message.endswith(b"X-First: one\nX-Second: two\n\nnew\n")


def test_discard_is_accepted_and_dropped_with_one_log_line(milters, capfdbinary):
    m = milters(answers={b"E": lambda d: pkt(b"d")})
    h = harness(m)
    assert transaction(h).endswith(b"354 go ahead\r\n250 ok discarded\r\n")
    assert h.queue.queues == []
    err = capfdbinary.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].endswith(b": milter %s: discard at end of message" % m.address.encode())


def test_skip_and_progress_are_honoured(milters):
    m = milters(protocol=0x400, answers={b"B": lambda d: pkt(b"p") + pkt(b"s")})
    h = harness(m)
    transaction(h, b"Subject: x\r\n\r\n" + b"y" * 100000 + b"\r\n")
    assert len(m.last.data(b"B")) == 1  # skipped after the first chunk
    assert m.last.cmds().endswith(b"BDE")
    assert len(h.queue.queues) == 1


def test_accept_at_connect_ends_the_milters_part(milters):
    m = milters(answers={b"C": lambda d: pkt(b"a")})
    h = harness(m)
    transaction(h)
    assert m.last.closed.wait(5)
    assert m.last.cmds().replace(b"D", b"") == b"OCQ"
    assert len(h.queue.queues) == 1


def test_version_2_milter_gets_no_data_event(milters):
    m = milters(version=2, actions=0x3F)
    h = harness(m)
    transaction(h)
    assert m.last.cmds().replace(b"D", b"") == b"OCHMRLLLNBE"
    assert len(h.queue.queues) == 1


def test_v6_macro_lists_choose_the_macros(milters):
    m = milters(extra=struct.pack(">I", 2) + b"{mail_addr}\0")
    h = harness(m)
    transaction(h)
    assert m.last.macros(b"M") == {b"{mail_addr}": b"a@example.com"}


def test_auth_and_tls_macros(milters):
    m = milters()
    h = harness(m)
    h.session.authenticated = True
    h.session._auth_method = b"plain"
    h.session.remoteinfo = b"alice"
    h.session.tls_version, h.session.tls_cipher = b"TLSv1.3", b"TLS_AES_256_GCM_SHA384"
    transaction(h)
    assert m.last.macros(b"H") == {b"{tls_version}": b"TLSv1.3",
                                   b"{cipher}": b"TLS_AES_256_GCM_SHA384"}
    mm = m.last.macros(b"M")
    assert (mm[b"{auth_type}"], mm[b"{auth_authen}"]) == (b"PLAIN", b"alice")


# -- bad peers: a defined reply, never past the timeout, nothing queued twice ------------

@pytest.mark.parametrize("version", [1, 7])
def test_unsupported_version_gets_the_default_at_the_first_command(milters, version, capfdbinary):
    m = milters(version=version)
    h = harness(m)
    assert h.greeting == b"220 mx.example.org ESMTP\r\n"
    assert h.cmd(b"HELO h") == TEMPFAIL
    assert h.cmd(b"MAIL FROM:<a@example.com>") == TEMPFAIL
    assert h.cmd(b"NOOP") == b"250 ok\r\n"
    assert b"unsupported protocol version %d; default tempfail" % version in capfdbinary.readouterr().err


@pytest.mark.parametrize("default,first", [(b"accept", b"250 mx.example.org\r\n"),
                                           (b"reject", REJECT), (b"tempfail", TEMPFAIL)])
def test_unreachable_milter_defaults(tmp_path, default, first):
    h = harness(b"unix:%s/none.sock default=%s" % (str(tmp_path).encode(), default))
    assert h.greeting == b"220 mx.example.org ESMTP\r\n"
    assert h.cmd(b"HELO h") == first
    if default == b"accept":
        assert transaction(h).endswith(fakes.QUEUED + b"\r\n")


def test_unknown_response_code(milters, capfdbinary):
    m = milters(answers={b"R": lambda d: pkt(b"Z")})
    h = harness(m)
    h.cmds(b"HELO h", b"MAIL FROM:<a@example.com>")
    assert h.cmd(b"RCPT TO:<x@example.org>") == TEMPFAIL
    assert h.cmd(b"DATA") == b"503 RCPT first (#5.5.1)\r\n"
    assert b"unknown response code b'Z'; default tempfail" in capfdbinary.readouterr().err
    assert h.queue.queues == []


def test_bad_replycode_text_is_a_failure(milters):
    m = milters(answers={b"M": lambda d: pkt(b"y", b"250 fine\0")}, )
    h = harness(m, options=b"default=reject")
    h.cmd(b"HELO h")
    assert h.cmd(b"MAIL FROM:<a@example.com>") == REJECT


@pytest.mark.parametrize("event", [b"L", b"B", b"E"])
def test_closes_mid_message(milters, event):
    m = milters(answers={event: lambda d: CLOSE})
    h = harness(m)
    out = transaction(h)
    assert out.endswith(b"354 go ahead\r\n" + TEMPFAIL)
    assert h.queue.queues == [] and h.queue.attempts == 0
    assert h.session.state == COMMAND
    assert h.cmd(b"MAIL FROM:<a@example.com>") == TEMPFAIL


def test_closes_mid_message_default_accept_queues_once_without_its_changes(milters):
    def eom(data):
        return pkt(b"h", b"X-Half\0done\0")[:-3]  # then the socket closes
    m = milters(answers={b"E": lambda d: (eom(d), CLOSE)[0]})
    h = harness(m, options=b"default=accept")
    assert transaction(h).endswith(fakes.QUEUED + b"\r\n")
    assert len(h.queue.queues) == 1 and h.queue.last.finish_calls == 1
    assert b"X-Half" not in h.queue.last.message


def test_hang_never_waits_past_the_timeout(milters):
    m = milters(answers={b"E": lambda d: HANG})
    h = harness(m, options=b"timeout=1")
    t = time.monotonic()
    out = transaction(h)
    took = time.monotonic() - t
    assert out.endswith(TEMPFAIL)
    assert 0.9 < took < 3
    assert h.queue.queues == []


def test_garbage_negotiation(milters):
    m = milters(negotiation=pkt(b"c"))
    h = harness(m, options=b"default=reject")
    assert h.cmd(b"EHLO h") == REJECT


def test_reject_at_connect_answers_every_later_command(milters):
    m = milters(answers={b"C": lambda d: pkt(b"y", b"554 5.7.1 go away\0")})
    h = harness(m)
    assert h.greeting == b"220 mx.example.org ESMTP\r\n"
    assert h.cmd(b"EHLO h") == b"554 5.7.1 go away\r\n"
    assert h.cmd(b"MAIL FROM:<a@example.com>") == b"554 5.7.1 go away\r\n"
    assert h.cmd(b"QUIT") == b"221 mx.example.org\r\n"


def test_message_refused_by_qmail_aborts_the_milter(milters):
    m = milters()
    h = harness(m, settings_=fakes.settings(databytes=10))
    out = transaction(h, b"Subject: a long message\r\n\r\nbody\r\n")
    assert out.endswith(replies.DATABYTES + b"\r\n")
    h.session.milters.close()
    assert m.last.closed.wait(5)
    assert m.last.cmds().replace(b"D", b"").endswith(b"MRTAQ")
    assert h.queue.queues == []


def test_body_plugins_run_first_and_milters_see_their_headers(milters):
    m = milters()
    h = harness(m, sections={"body": [b"b"]}, programs={b"b": lambda env: b"HX-Body: seen\n"})
    transaction(h)
    names = [d.split(b"\0")[0] for d in m.last.data(b"L")]
    assert names == [b"Received", b"X-Body", b"Subject", b"To"]
    assert b"\nX-Body: seen\nSubject: hi\n" in h.queue.last.message


def test_discard_at_rcpt_drops_the_whole_message(milters):
    m = milters(answers={b"R": lambda d: pkt(b"d") if b"trap" in d else None})
    h = harness(m)
    h.cmds(b"HELO h", b"MAIL FROM:<a@example.com>")
    assert h.cmd(b"RCPT TO:<trap@example.org>") == b"250 ok\r\n"
    assert h.cmd(b"RCPT TO:<x@example.org>") == b"250 ok\r\n"
    h.cmd(b"DATA")
    assert h.feed(b"hi\r\n.\r\n") == b"250 ok discarded\r\n"
    assert h.queue.queues == []
    # the next transaction is judged afresh
    assert transaction(h).endswith(fakes.QUEUED + b"\r\n")


def test_accept_during_the_headers_ends_that_milters_part(milters):
    m = milters(answers={b"L": lambda d: pkt(b"a")})
    h = harness(m)
    assert transaction(h).endswith(fakes.QUEUED + b"\r\n")
    assert m.last.cmds().replace(b"D", b"").endswith(b"TL")


def test_check_reports_each_milter(milters, tmp_path, monkeypatch):
    good = milters(protocol=ALL_NR)
    bad = milters(version=9)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "control").mkdir()
    (tmp_path / "control/smtpmilters").write_text(
        "%s\n%s\nunix:%s/none.sock timeout=1\n" % (good.address, bad.address, tmp_path))
    got = milter.check({})
    assert got[0] == (good.address.encode(), True,
                      "protocol version 6, actions 0x1ff, steps 0x%x" % ALL_NR)
    assert got[1] == (bad.address.encode(), False, "unsupported protocol version 9")
    assert got[2][1] is False and got[2][2].startswith("cannot connect: ")


def test_a_connect_that_times_out_is_named(monkeypatch):
    # a firewalled host drops the SYN: the wait ends at the deadline, and the
    # report says it was the connect, not the milter, that did not answer
    seen = []

    def waits(targets, deadline):
        seen.append(deadline - time.monotonic())
        raise TimeoutError()
    monkeypatch.setattr(milter.inet, "connect", waits)
    link = milter.Link(milter.Spec(b"inet:192.0.2.1:8891", 7, b"tempfail"))
    with pytest.raises(milter.MilterError) as e:
        link.open()
    assert str(e.value) == "connect timeout"
    assert 6 < seen[0] <= 7


def test_a_replaced_body_is_not_held_in_memory():
    """Replacement chunks go to a temp file as they come: 20 MB through Edits
    leaves no trace in memory, and CRLF split across chunks still becomes LF."""
    import tracemalloc
    chunk = (b"z" * 998 + b"\r\n") * 65
    edits = milteredit.Edits()
    tracemalloc.start()
    try:
        for _ in range(20 * 1024 * 1024 // len(chunk)):
            edits.add(b"b", chunk[:1000])
            edits.add(b"b", chunk[1000:])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    edits.finish()
    assert peak < 1024 * 1024, peak
    d = draft(b"Subject: x\n\nold\n")
    milteredit.apply(d, edits)
    out = queued(d)
    n = 20 * 1024 * 1024 // len(chunk) * 65
    assert len(out) == len(b"Subject: x\n\n") + n * 999 and out.endswith(b"z\n")
    assert b"\r" not in out
    d.close()


def test_replacement_body_through_the_session(milters):
    m = milters(answers={b"E": lambda d: pkt(b"b", b"one\r") + pkt(b"b", b"\ntwo\r\n") + pkt(b"c")})
    h = harness(m)
    transaction(h)
    assert h.queue.last.message.endswith(b"To: x@example.org\n\none\ntwo\n")


def test_progress_forever_still_ends(milters, monkeypatch):
    """A milter answering end of message with `progress` every 0.3 s, forever:
    each one starts a new timeout, but the answer is given up after PATIENCE
    timeouts in all."""
    import threading
    monkeypatch.setattr(milter, "PATIENCE", 3)
    stop = threading.Event()

    def drip(data):
        while not stop.wait(0.3):
            yield pkt(b"p")
    m = milters(answers={b"E": drip})
    h = harness(m, options=b"timeout=1")
    t = time.monotonic()
    out = transaction(h)
    took = time.monotonic() - t
    stop.set()
    assert out.endswith(TEMPFAIL)
    assert 2.9 < took < 5, took
    assert h.queue.queues == []


def test_a_connection_the_plugins_refused_never_reaches_the_milters(milters):
    m = milters()
    h = harness(m, sections={"connection": [b"c"]}, programs={b"c": lambda env: b"E554 not you\n"})
    assert h.greeting == b"554 not you\r\n"
    assert h.cmd(b"HELO h") == b"250 mx.example.org\r\n"
    assert m.conversations == []


@pytest.mark.parametrize("event", [b"M", b"E"])
def test_a_421_from_a_milter_ends_the_connection(milters, event):
    m = milters(answers={event: lambda d: pkt(b"y", b"421 4.7.0 shutting down\0")})
    h = harness(m)
    if event == b"M":
        out = h.cmds(b"HELO h", b"MAIL FROM:<a@example.com>")
    else:
        out = transaction(h)
    assert out.endswith(b"421 4.7.0 shutting down\r\n")
    assert h.state == CLOSED and h.exit_status == 0
    assert h.queue.queues == []


def test_every_change_a_milter_may_ask_is_carried_out():
    # the session knows the change commands without importing milteredit;
    # the two lists must agree (a replaced body is kept by Edits itself)
    assert milter.EDIT_COMMANDS == set(milteredit._EDITS) | {b"b"}
