"""Property-based fuzzing of the sans-IO Session (issue 6), with hypothesis.

Every example is a byte stream a client could send: verbs known and unknown in
mixed case, hostile arguments (long, NUL, 8-bit, quotes, literals), CRLF, bare LF
and CR CR LF line ends, whole transactions with message bodies full of dots, bare
CRs and LFs, hop lines and NULs, cut into chunks at arbitrary byte positions.

A small reference model, written from qmail-smtpd.md §4.1, §4.4, §5 and §6.2-§6.6
and sharing no code with qspp, replays the same stream and says which bytes the
client must get and what qmail-queue must see.  The properties:

1. every input line gets exactly the reply bytes the §4.4 table gives for that
   verb in that state (and a message exactly the §6.6 reply);
2. the state machine never raises, whatever the bytes and the cuts;
3. the queue gets an envelope only after a complete `\\r\\n.\\r\\n` (or `.\\r\\n`
   right after 354), never after a bare LF or a stream that stops short;
4. one session's memory stays bounded: replies are drained every step, the
   message reader carries only a few bytes between feeds, the envelope guard
   holds, and a huge message never piles up inside the session.

CI runs 2,000 examples per property, derandomized and without an example
database, so every run tries the same inputs and a failure reproduces exactly
(QSPP_EXAMPLES=N changes the count for a quicker or a longer local run).
"""

import os
import re
import tracemalloc

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from qspp import control, session as session_module
from qspp.session import CLOSED, DATA

from fakes import QUEUED, Harness, settings as fixture_settings

CI = settings(max_examples=int(os.environ.get("QSPP_EXAMPLES", "2000")), deadline=None,
              derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])

G = b"mx.example.org"
RCPTHOSTS = (b"example.org", b".example.net")
BADMAILFROM = (b"bad@spam.example", b"@evil.example")
LOCAL_IPS = {b"127.0.0.1", b"0.0.0.0"}
# Small enough that a few long recipients reach it (the real one is 16 MiB).
ENVELOPE_CAP = 4000


def r(line):
    return line + b"\r\n"


OK = r(b"250 ok")
FLUSHED = r(b"250 flushed")
UNIMPLEMENTED = r(b"502 unimplemented (#5.5.1)")
MAIL_FIRST = r(b"503 MAIL first (#5.5.1)")
RCPT_FIRST = r(b"503 RCPT first (#5.5.1)")
SYNTAX = r(b"555 syntax error (#5.5.4)")
BADMAIL = r(b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
NOT_RCPTHOST = r(b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
OUT_OF_MEMORY = r(b"421 out of memory (#4.3.0)")
GO_AHEAD = r(b"354 go ahead")
BARE_LF = r(b"451 See http://pobox.com/~djb/docs/smtplf.html.")
TOO_MANY_HOPS = r(b"554 too many hops, this message is looping (#5.4.6)")
TOO_BIG = r(b"552 sorry, that message size exceeds my databytes limit (#5.3.4)")
VRFY = r(b"252 send some mail, i'll try my best")
HELP = r(b"214 netqmail home page: http://qmail.org/netqmail")
HELO_REPLY = r(b"250 " + G)
EHLO_REPLY = r(b"250-" + G) + r(b"250-PIPELINING") + r(b"250 8BITMIME")
QUIT_REPLY = r(b"221 " + G)
QUEUED_REPLY = r(QUEUED)


# ---------------------------------------------------------------- reference model

def ref_addrparse(arg):
    """§5.1 steps 1-3 and 5, literally, one byte at a time."""
    arg = arg.split(b"\0", 1)[0]
    if b"<" in arg:
        i = arg.index(b"<") + 1
        term = ord(">")
    else:
        i = arg.index(b":") + 1 if b":" in arg else len(arg)
        while i < len(arg) and arg[i] == 0x20:
            i += 1
        term = 0x20
    if i < len(arg) and arg[i] == ord("@"):
        j = arg.find(b":", i)
        i = len(arg) if j < 0 else j + 1
    out = bytearray()
    quoted = False
    while i < len(arg):
        c = arg[i]
        if c == ord("\\"):
            out += arg[i + 1:i + 2]
            i += 2
            continue
        if c == ord('"'):
            quoted = not quoted
        elif c == term and not quoted:
            break
        else:
            out.append(c)
        i += 1
    return bytes(out)


_LITERAL = re.compile(rb"\[([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)\]")


def ref_address(arg):
    """The address MAIL/RCPT use, or None for 555 (§5.1, §5.4)."""
    a = ref_addrparse(arg)
    at = a.rfind(b"@")
    if at >= 0:
        m = _LITERAL.fullmatch(a[at + 1:])
        if m and b".".join(b"%d" % (int(g) % 256) for g in m.groups()) in LOCAL_IPS:
            a = a[:at + 1] + G
    return a if len(a) <= 899 else None


def ref_flagged(sender):
    low = sender.lower()
    at = low.rfind(b"@")
    return low in BADMAILFROM or (at >= 0 and low[at:] in BADMAILFROM)


def ref_rcpthost(addr):
    at = addr.rfind(b"@")
    if at < 0:
        return True
    domain = addr[at + 1:].lower()
    candidates = [domain[i:] for i in range(len(domain)) if i == 0 or domain[i] == ord(".")]
    return any(c in RCPTHOSTS for c in candidates)


def ref_message(stream, pos):
    """§6.2-§6.4 over the raw bytes after 354, line by line.

    Returns (kind, end, stored, hops) with kind "end" (the `.` line, consumed
    through `end`), "bare LF" or "short" (the stream stopped inside the message).
    """
    stored = bytearray()
    header = True
    hops = 0
    while True:
        lf = stream.find(b"\n", pos)
        if lf < 0:
            return "short", len(stream), bytes(stored), hops
        if lf == pos or stream[lf - 1] != 0x0D:
            return "bare LF", lf + 1, None, hops
        line = stream[pos:lf - 1]
        pos = lf + 1
        if line == b".":
            return "end", pos, bytes(stored), hops
        if header:
            if line == b"":
                header = False
            elif line[:8].lower() == b"received" or line[:9].lower() == b"delivered":
                hops += 1
        if line[:1] == b"." and line[1:2] != b"\r":
            line = line[1:]
        stored += line + b"\n"


class Model:
    """What qmail-smtpd.md says a session with fixture F (plugins off) does with
    a whole input stream: the exact output, the queue runs, how it ends."""

    def __init__(self, databytes):
        self.databytes = databytes
        self.out = bytearray()
        self.sender = None
        self.recipients = []
        self.flagged = False
        self.envelope_size = 0
        self.closed = False
        self.exit_status = None
        # one (stored message, envelope or None) per 354; None for a message
        # the stream left unfinished (aborted at EOF)
        self.messages = []

    def run(self, stream):
        pos = 0
        while not self.closed:
            lf = stream.find(b"\n", pos)
            if lf < 0:
                return
            line = stream[pos:lf]
            pos = lf + 1
            if self.command(line):
                pos = self.message(stream, pos)

    def close(self, status):
        self.closed = True
        self.exit_status = status

    def command(self, line):
        """One line; True when it started a message."""
        if line[-1:] == b"\r":
            line = line[:-1]
        line = line.split(b"\0", 1)[0]
        verb, _, arg = line.partition(b" ")
        arg = arg.lstrip(b" ")
        verb = verb.lower()
        if verb in (b"helo", b"ehlo"):
            self.out += HELO_REPLY if verb == b"helo" else EHLO_REPLY
            self.sender = None
            self.recipients = []
        elif verb == b"mail":
            a = ref_address(arg)
            if a is None:
                self.out += SYNTAX
            else:
                self.sender, self.recipients = a, []
                self.flagged = ref_flagged(a)
                self.envelope_size = len(a) + 3
                self.out += OK
        elif verb == b"rcpt":
            a = ref_address(arg) if self.sender is not None else b""
            if self.sender is None:
                self.out += MAIL_FIRST
            elif a is None:
                self.out += SYNTAX
            elif self.flagged:
                self.out += BADMAIL
            elif not ref_rcpthost(a):
                self.out += NOT_RCPTHOST
            else:
                self.envelope_size += len(a) + 2
                if self.envelope_size > ENVELOPE_CAP:
                    self.out += OUT_OF_MEMORY
                    self.close(1)
                else:
                    self.recipients.append(a)
                    self.out += OK
        elif verb == b"data":
            if self.sender is None:
                self.out += MAIL_FIRST
            elif not self.recipients:
                self.out += RCPT_FIRST
            else:
                self.out += GO_AHEAD
                return True
        elif verb == b"rset":
            self.sender, self.recipients = None, []
            self.out += FLUSHED
        elif verb == b"noop":
            self.out += OK
        elif verb == b"vrfy":
            self.out += VRFY
        elif verb == b"help":
            self.out += HELP
        elif verb == b"quit":
            self.out += QUIT_REPLY
            self.close(0)
        else:
            self.out += UNIMPLEMENTED
        return False

    def message(self, stream, pos):
        envelope = b"F" + self.sender + b"\0" + b"".join(
            b"T" + x + b"\0" for x in self.recipients) + b"\0"
        self.sender, self.recipients = None, []
        kind, end, stored, hops = ref_message(stream, pos)
        if kind == "short":
            self.messages.append((None, None))
        elif kind == "bare LF":
            self.out += BARE_LF
            self.messages.append((None, None))
            self.close(1)
        elif hops >= 100:
            self.out += TOO_MANY_HOPS
            self.messages.append((None, None))
        elif self.databytes and len(stored) > self.databytes:
            self.out += TOO_BIG
            self.messages.append((None, None))
        else:
            self.out += QUEUED_REPLY
            self.messages.append((stored, envelope))
        return end


# ---------------------------------------------------------------- strategies

def mixed_case(word):
    """A verb in random case."""
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda ups: bytes(c ^ 0x20 if up and 0x61 <= c <= 0x7A else c
                          for c, up in zip(word, ups)))


KNOWN = [b"helo", b"ehlo", b"mail", b"rcpt", b"data", b"rset", b"noop", b"vrfy",
         b"help", b"quit"]
# AUTH and STARTTLS are left out: their replies depend on the AUTH/TLS setup.
UNKNOWN = [b"", b"datax", b"mai", b"expn", b"turn", b"etrn", b"bdat", b" noop",
           b"noop\t", b"helo\x00x", b"\xffhelo", b"hel o", b"quit\r"]

local_part = st.one_of(
    st.sampled_from([b"a", b"x", b"bad", b"Bad", b"postmaster", b"", b"a.b", b"q\"u o\"te",
                     b"back\\>slash", b"@route:a", b"\xe9t\xe9"]),
    st.binary(min_size=0, max_size=12),
)
domain = st.one_of(
    st.sampled_from([b"example.org", b"EXAMPLE.ORG", b"sub.example.net", b"example.net",
                     b".example.net", b"far.away", b"spam.example", b"SPAM.example",
                     b"evil.example", b"example.org.", b"[127.0.0.1]", b"[0.0.0.0]",
                     b"[383.0.0.1]", b"[1.2.3.4]", b"", b"example.org@far.away",
                     b"far.away@example.org"]),
    st.binary(min_size=0, max_size=10),
)
address = st.one_of(
    st.builds(lambda l, d: l + b"@" + d, local_part, domain),
    local_part,
    st.sampled_from([b"bad@spam.example", b"x@evil.example", b"<>"]),
    # at and around the 899-byte limit, and far past it
    st.builds(lambda n, d: b"l" * n + b"@" + d, st.integers(870, 905), domain),
    st.integers(880, 1200).map(lambda n: b"y" * n + b"@example.org"),
)
mail_arg = st.one_of(
    st.builds(lambda kw, a, tail: kw + b"<" + a + b">" + tail,
              st.sampled_from([b"FROM:", b"from:", b"TO:", b"FROM: ", b"", b"FROM:x"]),
              address, st.sampled_from([b"", b" SIZE=10", b" BODY=8BITMIME", b"junk"])),
    st.builds(lambda kw, a: kw + a, st.sampled_from([b"FROM:", b"TO:", b"FROM: ", b"x "]),
              address),
    st.binary(max_size=30),
)
rcpt_arg = mail_arg.map(lambda a: a.replace(b"FROM", b"TO", 1))
junk_arg = st.one_of(st.just(b""), st.binary(max_size=20),
                     st.integers(1, 3000).map(lambda n: b"z" * n))
ending = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r\r\n"])


@st.composite
def command_line(draw):
    if draw(st.integers(0, 9)) == 0:
        verb = draw(st.sampled_from(UNKNOWN))
    else:
        verb = draw(mixed_case(draw(st.sampled_from(KNOWN))))
    low = verb.lower()
    if low == b"mail":
        arg = draw(mail_arg)
    elif low == b"rcpt":
        arg = draw(rcpt_arg)
    else:
        arg = draw(junk_arg)
    sep = draw(st.sampled_from([b" ", b" ", b"   ", b""])) if arg else b""
    if not sep and arg and low in (b"mail", b"rcpt"):
        sep = b" "
    return verb + sep + arg + draw(ending)


# pieces with no LF that lacks its CR: the message survives them
safe_piece = st.one_of(
    st.sampled_from([
        b"Subject: t\r\n", b"\r\n", b"body\r\n", b"..dot\r\n", b".x\r\n", b". \r\n",
        b".\rx\r\n", b".\r\r\n", b"a\rb\r\n", b"a\r\r\n", b"\r", b"\0nul\r\n",
        b"\x80\xff8bit\r\n", b"Received: x\r\n", b"delivered\r\n", b"ReCeIvEd\r\n",
        b"..Received: no\r\n", b" Received: no\r\n", b"\r\n.\r", b"\r\n.\r\r\n",
        b"MAIL FROM:<evil@x>\r\n",
    ]),
    st.binary(max_size=16).map(lambda b: b.replace(b"\n", b"\r\n")),
    st.integers(1, 5000).map(lambda n: b"L" * n + b"\r\n"),
    st.integers(95, 105).map(lambda n: b"Received: hop\r\n" * n),
)
hostile_piece = st.one_of(
    st.sampled_from([b"bare\nlf\r\n", b"x\n", b"\n.\n", b"\r.\n", b"\n.\r\n"]),
    st.binary(max_size=16),
)
safe_body = st.lists(safe_piece, max_size=12).map(b"".join)
message_body = st.one_of(
    safe_body, safe_body, safe_body, safe_body, safe_body,
    st.tuples(safe_body, hostile_piece, safe_body).map(b"".join),
)
terminator = st.sampled_from([b".\r\n"] * 12 + [b"", b".", b".\r", b".\n"])


@st.composite
def transaction(draw):
    """MAIL, some RCPTs, DATA and a message, so DATA is often reached."""
    sender = draw(st.one_of(address, st.just(b"a@b"), st.just(b"")))
    parts = [b"MAIL FROM:<" + sender + b">\r\n"]
    for _ in range(draw(st.integers(0, 3))):
        parts.append(b"RCPT TO:<" + draw(st.sampled_from(
            [b"x@example.org", b"y@sub.example.net", b"z@far.away", b"local"])) + b">\r\n")
    if draw(st.booleans()):
        parts.append(b"RCPT TO:<x@example.org>\r\n")
    # any command may come between them: RSET, HELO or a new MAIL change the state
    for _ in range(draw(st.integers(0, 2))):
        parts.insert(draw(st.integers(1, len(parts))), draw(st.one_of(
            command_line(), st.sampled_from([b"RSET\r\n", b"HELO x\r\n", b"NOOP\r\n"]))))
    parts.append(draw(st.sampled_from([b"DATA\r\n", b"data\r\n", b"DATA\n", b"DATA x\r\n"])))
    body = draw(message_body)
    # the end must follow a line end to count
    parts.append(body + draw(st.sampled_from([b"", b"\r\n"])) + draw(terminator))
    return b"".join(parts)


dialogue = st.lists(st.one_of(command_line(), transaction(), transaction()),
                    min_size=1, max_size=10).map(b"".join)


def cuts():
    """Chunk sizes for feeding; 1 means byte by byte."""
    return st.lists(st.sampled_from([1, 1, 2, 3, 5, 8, 64, 1000, 1 << 20]),
                    min_size=1, max_size=8)


# ---------------------------------------------------------------- driving

def harness(databytes):
    s = fixture_settings(databytes=databytes,
                         badmailfrom=control.Badmailfrom(list(BADMAILFROM)))
    return Harness(settings_=s)


def drive(h, stream, sizes):
    """Feed STREAM in chunks of SIZES (cycled), checking the memory bounds after
    every step; then end the stream as the I/O loop does at EOF."""
    out = bytearray()
    pos = 0
    k = 0
    s = h.session
    while pos < len(stream) and s.state != CLOSED:
        n = sizes[k % len(sizes)]
        k += 1
        out += h.feed(stream[pos:pos + n])
        pos += n
        assert len(s.out) == 0
        assert s.envelope_size <= ENVELOPE_CAP
        assert s.rcpt_count <= ENVELOPE_CAP // 2
        assert len(s.pending_envelope) < ENVELOPE_CAP
        if s.state == DATA:
            # only the unjudged head of a line (or one CR) is carried; all else went on
            assert len(s.reader._carry) <= 9
            assert not s.reader.out
    if s.state == DATA:
        s.abort()  # EOF inside the message (§7)
        out += h.take()
    return bytes(out)


def received_end(message):
    """Where the Received line (two lines, §6.5) ends."""
    first = message.index(b"\n")
    return message.index(b"\n", first + 1) + 1


def check_queue(h, model):
    queues = h.queue.queues
    assert len(queues) == len(model.messages)
    for q, (stored, envelope) in zip(queues, model.messages):
        assert q.finish_calls == 1
        assert q.envelope == envelope
        if envelope is not None:
            assert q.message.startswith(b"Received: from client.example.com")
            assert q.message[received_end(q.message):] == stored


@pytest.fixture(autouse=True)
def small_envelope_cap(monkeypatch):
    monkeypatch.setattr(session_module, "MAX_ENVELOPE", ENVELOPE_CAP)


# ---------------------------------------------------------------- properties

@CI
@given(stream=dialogue, sizes=cuts(), databytes=st.sampled_from([0, 0, 0, 30, 200]))
def test_every_line_gets_the_table_reply(stream, sizes, databytes):
    """Properties 1-3 on whole dialogues: exact replies, no exception, envelopes
    only for complete messages."""
    h = harness(databytes)
    out = drive(h, stream, sizes)
    model = Model(databytes)
    model.run(stream)
    assert out == bytes(model.out)
    check_queue(h, model)
    # shown by --hypothesis-show-statistics: how often each outcome was reached
    event("queued: %d" % min(sum(1 for m in model.messages if m[1] is not None), 2))
    event("exit status: %s" % (model.exit_status,))
    if model.closed:
        assert h.state == CLOSED and h.exit_status == model.exit_status
    else:
        assert h.state != CLOSED


@CI
@given(stream=st.binary(max_size=600), sizes=cuts())
def test_arbitrary_bytes_never_raise(stream, sizes):
    """Property 2 on raw noise, with a DATA reachable in front of it half the time."""
    for prefix in (b"", b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"):
        h = harness(0)
        out = drive(h, prefix + stream, sizes)
        model = Model(0)
        model.run(prefix + stream)
        assert out == bytes(model.out)
        check_queue(h, model)


OPEN = b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"


@CI
@given(body=message_body, end=terminator, after=st.sampled_from(
           [b"", b"NOOP\r\n", b"MAIL FROM:<smuggled@x>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n"
            b"second\r\n.\r\n"]),
       data=st.data())
def test_queued_only_after_a_full_end_of_data(body, end, after, data):
    """Property 3: one message, cut at arbitrary byte positions.  An envelope
    reaches the queue only if the model finds `\\r\\n.\\r\\n`; whatever follows the
    end is read as commands, never as part of the message."""
    stream = OPEN + body + end + after
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    bounds = sorted(set([0, len(stream)] + points))
    h = harness(0)
    out = bytearray()
    for a, b in zip(bounds, bounds[1:]):
        if h.state == CLOSED:
            break
        out += h.feed(stream[a:b])
        assert len(h.session.out) == 0
    if h.state == DATA:
        h.session.abort()
        out += h.take()
    model = Model(0)
    model.run(stream)
    assert bytes(out) == bytes(model.out)
    check_queue(h, model)
    if h.queue.queues[0].envelope is not None:
        assert ref_message(stream, len(OPEN))[0] == "end"


@CI
@given(line=st.integers(1, 200000), lines=st.integers(1, 3), chunk=st.sampled_from(
           [1 << 12, 1 << 14, 1 << 16, 1 << 17]),
       dots=st.booleans(), cr_split=st.booleans())
def test_a_huge_message_never_piles_up(line, lines, chunk, dots, cr_split):
    """Property 4: whatever the line lengths, the session passes message bytes on
    as they come; what it allocates while doing so stays a small multiple of the
    chunk the I/O loop hands it, not of the message (up to 600 kB here)."""
    h = harness(0)
    h.feed(OPEN)
    q = h.queue.last
    q.write = lambda data: None  # a real queue pipe keeps nothing either
    text = (b"." if dots else b"") + b"m" * line + (b"\r" if cr_split else b"")
    raw = (text + b"\r\n") * lines
    tracemalloc.start()
    try:
        for i in range(0, len(raw), chunk):
            h.feed(raw[i:i + chunk])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the slice handed in, the harness's buffer, the reader's converted copy and
    # its unstuffed copy: a handful of chunks at most
    assert peak < 6 * chunk + 64 * 1024
    assert h.feed(b".\r\n") == QUEUED_REPLY
    assert q.envelope == b"Fa@b\0Tx@example.org\0\0"


def test_envelope_guard_is_exact():
    """The monkeypatched cap is the one the session checks: one byte under passes,
    one over is the fatal 421 (the 16 MiB guard, D4, scaled down)."""
    h = harness(0)
    assert h.feed(b"MAIL FROM:<a@b>\r\n") == OK  # F a@b \0, final \0: 6 bytes
    size = 6
    while ENVELOPE_CAP - size >= 2:
        n = min(ENVELOPE_CAP - size - 2, 899)
        assert h.feed(b"RCPT TO:<" + b"r" * n + b">\r\n") == OK
        size += n + 2
    assert h.session.envelope_size == size == ENVELOPE_CAP
    assert h.feed(b"RCPT TO:<>\r\n") == OUT_OF_MEMORY
    assert h.state == CLOSED and h.exit_status == 1


# Every vector of tests/e2e/test_smuggling.py, fed one byte at a time and in one go:
# the cut never changes the outcome.
SPLIT_VECTORS = [
    b"a\r\n.\r\n", b"a\n.\n", b"a\r.\n", b"a\n.\r\n", b"a\r\n.\r", b"a\r\n.\r\r\n",
    b"a\r\n.\n", b"\0\x80\xff\r\n.\r\n", b"x\r\n.\r\nMAIL FROM:<e@x>\r\n", b".\r\n",
    b"..\r\n.\r\n", b"\r\n\r\n.\r\n", b"a\r\r\n.\r\n", b"a\rb\r\n.\r\n",
]


@pytest.mark.parametrize("vector", SPLIT_VECTORS, ids=repr)
def test_split_at_every_byte(vector):
    stream = OPEN + vector
    model = Model(0)
    model.run(stream)
    for split in range(len(OPEN), len(stream) + 1):
        for sizes in ([len(stream)], [1]):
            h = harness(0)
            out = h.feed(stream[:split])
            if h.state != CLOSED:
                out += drive(h, stream[split:], sizes)
            assert out == bytes(model.out), (split, sizes)
            check_queue(h, model)
