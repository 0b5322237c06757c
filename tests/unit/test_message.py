"""MessageReader against spec §6.2-6.4 and against a byte-for-byte port of
netqmail's blast(), fed whole, byte by byte and in random splits."""

import random

import pytest

from qspp.message import MessageReader


class _StrayNewline(Exception):
    pass


def reference(raw, databytes=0):
    """netqmail 1.06 blast() + the DATA epilogue, one byte at a time.

    Returns (output, consumed, hops_abort, size_abort) or raises _StrayNewline;
    consumed is None when the input ends before the message does.
    """
    # put() counts every stored byte; the abort itself is judged at the end, as
    # netqmail's bytestooverflow reaching 0 is.
    out = bytearray()
    put = out.append

    state, hops, inheader = 1, 0, True
    pos, mx, my, mz = 0, True, True, True
    for idx, ch in enumerate(raw):
        if inheader:
            if pos < 9:
                if ch != b"delivered"[pos] and ch != b"DELIVERED"[pos]:
                    mz = False
                if mz and pos == 8:
                    hops += 1
                if pos < 8 and ch != b"received"[pos] and ch != b"RECEIVED"[pos]:
                    mx = False
                if mx and pos == 7:
                    hops += 1
                if pos < 2 and ch != b"\r\n"[pos]:
                    my = False
                if my and pos == 1:
                    inheader = False
                pos += 1
            if ch == 10:
                pos, mx, my, mz = 0, True, True, True
        if state == 0:
            if ch == 10:
                raise _StrayNewline
            if ch == 13:
                state = 4
                continue
        elif state == 1:
            if ch == 10:
                raise _StrayNewline
            if ch == 46:
                state = 2
                continue
            if ch == 13:
                state = 4
                continue
            state = 0
        elif state == 2:
            if ch == 10:
                raise _StrayNewline
            if ch == 13:
                state = 3
                continue
            state = 0
        elif state == 3:
            if ch == 10:
                return (bytes(out), idx + 1, hops >= 100,
                        bool(databytes) and len(out) > databytes)
            put(46)
            put(13)
            if ch == 13:
                state = 4
                continue
            state = 0
        elif state == 4:
            if ch == 10:
                state = 1
            elif ch != 13:
                put(13)
                state = 0
        put(ch)
    return bytes(out), None, hops >= 100, bool(databytes) and len(out) > databytes


def run(chunks, databytes=0):
    """Feed `chunks` in order as a caller would; return (reader, output, consumed)."""
    r = MessageReader(databytes)
    out = []
    consumed = 0
    for i, c in enumerate(chunks):
        if r.done or r.bare_lf:
            break
        # The session may hand over memoryviews of its read buffer.
        k = r.feed(memoryview(c) if i % 2 else c)
        assert 0 <= k <= len(c)
        if not r.bare_lf:
            assert k == len(c) or r.done
        consumed += k
        out.append(r.take())
    out.append(r.take())
    return r, b"".join(out), consumed


def splits(raw, rng, n):
    """Byte-by-byte, whole, and `n` random partitions of `raw`."""
    yield [raw]
    yield [raw[i:i + 1] for i in range(len(raw))]
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(1, 6)))) \
            if len(raw) > 1 else []
        yield [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]


def check_all_splits(raw, databytes=0, n=30, seed=0):
    """Every split gives what the reference gives; returns the whole-feed reader."""
    rng = random.Random(seed)
    try:
        ref = reference(raw, databytes)
    except _StrayNewline:
        ref = None
    results = []
    for chunks in splits(raw, rng, n):
        r, out, consumed = run(chunks, databytes)
        if ref is None:
            assert r.bare_lf and not r.done, (raw, chunks)
        else:
            ref_out, ref_consumed, ref_hops, ref_big = ref
            assert not r.bare_lf, (raw, chunks)
            assert r.done == (ref_consumed is not None), (raw, chunks)
            if r.done:
                assert consumed == ref_consumed, (raw, chunks)
                assert r.too_many_hops == ref_hops, (raw, chunks)
                # Size is not tracked once the hop limit aborts: that reply wins.
                if not ref_hops:
                    assert r.too_big == ref_big, (raw, chunks)
                if not (ref_hops or ref_big):
                    assert out == ref_out, (raw, chunks)
            else:
                assert consumed == len(raw)
                # An unfinished message: everything judged so far is a prefix.
                if not r.too_big and not r.too_many_hops:
                    assert ref_out.startswith(out), (raw, chunks)
        results.append(r)
    return results[0]


def convert(raw, databytes=0):
    """Output for a complete message, checked under every split."""
    r = check_all_splits(raw, databytes)
    r2, out, _ = run([raw], databytes)
    assert r2.done
    return out


# §6.2, row by row ---------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    (b"a\r\nb\r\n.\r\n", b"a\nb\n"),                      # CRLF -> LF
    (b"a\rb\r\n.\r\n", b"a\rb\n"),                        # CR + other byte kept
    (b"a\r\r\nb\r\n.\r\n", b"a\r\nb\n"),                  # all CRs but the last kept
    (b"a\r\r\r\r\n.\r\n", b"a\r\r\r\n"),
    (b"..\r\n...x\r\n.x\r\n. \r\n.\r\n", b".\n..x\nx\n \n"),  # dot dropped
    (b".\r\n", b""),                                       # right after 354
    (b"\r\n.\r\n", b"\n"),
    (b"a\r\n.\rx\r\n.\r\n", b"a\n.\rx\n"),                 # .\r + byte kept whole
    (b".\r\r\n.\r\n", b".\r\n"),                           # .\r\r\n -> .\r\n
    (b".\rx\r\n.\r\n", b".\rx\n"),
    (b".\r\r\r\n.\r\n", b".\r\r\n"),
    (b"x\r\n.\r\r\n.\r\n", b"x\n.\r\n"),
    (b"\x00\xff\x80\r\n.\r\n", b"\x00\xff\x80\n"),        # NUL and high bytes
    (b"Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n", b"Subject: hi\n\nbody\n.dot\n"),
    (b"a\r\n\r\r\n.\r\n", b"a\n\r\n"),
    (b"a\r\n.\r.\r\n.\r\n", b"a\n.\r.\n"),
    (b"\r.\r\n.\r\n", b"\r.\n"),
    (b"a\r\n..\r\n.\r\n", b"a\n.\n"),
    (b"a.\r\n.\r\n", b"a.\n"),
    (b"\r\r\n.\r\n", b"\r\n"),
])
def test_conversion(raw, expected):
    assert convert(raw) == expected


@pytest.mark.parametrize("raw", [
    b"a\nb\r\n.\r\n", b"a\r\n.\n", b"a\n.\r\n", b"\n.\r\n", b"\r\n.\n",
    b"\n", b".\n", b"a\r\n\n", b"abc\r\n.\r\r\n.\n", b"x" * 100 + b"\n",
    b"Received: x\r\n" * 5 + b"\n",
])
def test_bare_lf(raw):
    r = check_all_splits(raw)
    assert r.bare_lf
    # Once set, nothing more is consumed.
    assert r.feed(b"more\r\n.\r\n") == 0


def test_bare_lf_consumes_through_the_lf():
    r = MessageReader()
    assert r.feed(b"ab\r\ncd\nef") == 7
    assert r.bare_lf and not r.done


def test_stops_after_end_leftover_not_consumed():
    r = MessageReader()
    data = b"hi\r\n.\r\nQUIT\r\n"
    assert r.feed(data) == len(data) - 6
    assert r.done and r.take() == b"hi\n"
    assert r.feed(b"NOOP\r\n") == 0


def test_leftover_may_hold_a_bare_lf():
    r = MessageReader()
    assert r.feed(memoryview(b"hi\r\n.\r\nNOOP\n")) == 7
    assert r.done and not r.bare_lf


def test_end_only_after_crlf():
    # `.\r\n` inside a line does not end the message; bare `\n.\r\n` is an error.
    r = check_all_splits(b"a.\r\n.x\r\n")
    assert not r.done
    assert convert(b"a.\r\nb\r\n.\r\n") == b"a.\nb\n"


def test_eof_before_end_is_not_done():
    r, out, consumed = run([b"a\r\nb"])
    assert not r.done and not r.bare_lf and consumed == 4 and out == b"a\n"


def test_memoryview_input():
    r = MessageReader()
    mv = memoryview(b"xx" + b"a\r\n.\r\n" + b"yy")[2:]
    assert r.feed(mv) == 6 and r.done and r.take() == b"a\n"


# §6.3 hops ----------------------------------------------------------------

def hops(lines, body=b""):
    return check_all_splits(b"".join(lines) + body + b".\r\n", n=8)


def test_99_hops_pass():
    r = hops([b"Received: x\r\n"] * 99, b"\r\n")
    assert not r.too_many_hops and r.hops == 99


@pytest.mark.parametrize("lines", [
    [b"Received: x\r\n"] * 100,
    [b"Received:\r\n"] * 50 + [b"Delivered-To: y\r\n"] * 50,
    [b"ReCeIvEd\r\n"] * 100,
    [b"Receivedx\r\n"] * 100,
    [b"DELIVERED\r\n"] * 100,
    [b"a: b\r\n"] + [b"received: x\r\n"] * 100,
])
def test_100_hops_abort(lines):
    r = hops(lines)
    assert r.too_many_hops and r.done


@pytest.mark.parametrize("lines", [
    [b"Subject: x\r\n", b"\r\n"] + [b"Received: x\r\n"] * 100,
    [b"..Received: x\r\n"] * 100,
    [b" Received: x\r\n"] * 100,
    [b"Receive\r\n"] * 100,
    [b"Delivere\r\n"] * 100,
    [b"\r\n"] + [b"Received: x\r\n"] * 100,
])
def test_not_hops(lines):
    r = hops(lines)
    assert not r.too_many_hops and r.done


def test_header_ends_only_at_exact_crlf_line():
    # `\r\r\n` and ` \r\n` are not empty lines, so the header goes on.
    for sep in (b"\r\r\n", b" \r\n", b"x\r\n"):
        r = hops([b"Received: x\r\n"] * 50 + [sep] + [b"Received: x\r\n"] * 50)
        assert r.too_many_hops


def test_hop_lines_counted_with_long_lines():
    r = hops([b"Received: " + b"x" * 300 + b"\r\n"] * 100)
    assert r.too_many_hops
    raw = b"Received: " + b"x" * 100000 + b"\r\n"
    raw = raw * 99 + b"\r\n" + raw + b".\r\n"
    r, _, consumed = run([raw[i:i + 4093] for i in range(0, len(raw), 4093)])
    assert r.done and not r.too_many_hops and r.hops == 99 and consumed == len(raw)


# §6.4 databytes -----------------------------------------------------------

@pytest.mark.parametrize("raw, limit, big", [
    (b"123456789\r\n.\r\n", 10, False),
    (b"1234567890\r\n.\r\n", 10, True),
    (b"..\r\n" * 5 + b".\r\n", 10, False),
    (b"..\r\n" * 5 + b"\r\n.\r\n", 10, True),
    (b"1234567890\r\n.\r\n", 0, False),
    (b"1234567890\r\n.\r\n", 11, False),
    (b".\r\n", 1, False),
])
def test_databytes(raw, limit, big):
    r = check_all_splits(raw, limit)
    assert r.done and r.too_big == big


def test_hops_counted_after_too_big():
    # Row 38: DATABYTES=10 and 100 Received lines gives the hop reply.
    r = check_all_splits(b"Received: x\r\n" * 100 + b".\r\n", 10, n=5)
    assert r.too_many_hops
    r, _, _ = run([b"0123456789\r\n", b"Received: x\r\n" * 100 + b".\r\n"], 10)
    assert r.done and r.too_big and r.too_many_hops


def test_bare_lf_still_fatal_after_too_big():
    r = check_all_splits(b"x" * 50 + b"\r\nab\ncd\r\n.\r\n", 10)
    assert r.bare_lf


# fuzz against the reference -----------------------------------------------

_ALPHABET = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"a", b"R", b"Received",
             b"delivered", b"\r\n\r\n", b".\r", b"x", b"\x00"]


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_against_reference(seed):
    rng = random.Random(seed)
    for _ in range(25):
        parts = [rng.choice(_ALPHABET) for _ in range(rng.randint(0, 25))]
        raw = b"".join(parts)
        # Bias towards messages without bare LF so conversion is exercised.
        if rng.random() < 0.7:
            raw = raw.replace(b"\r\n", b"\0").replace(b"\n", b"\r\n").replace(b"\0", b"\r\n")
        if rng.random() < 0.8:
            raw += b"\r\n.\r\nNOOP\r\n"
        if raw:
            check_all_splits(raw, rng.choice([0, 0, 1, 5, 20]), n=10, seed=seed)


def test_big_message_streamed():
    line = b"x" * 76 + b"\r\n"
    chunk = line * 1000
    r = MessageReader()
    total = 0
    for _ in range(50):
        for i in range(0, len(chunk), 4096 + 7):
            assert r.feed(chunk[i:i + 4096 + 7]) == len(chunk[i:i + 4096 + 7])
            total += len(r.take())
    assert r.feed(b".\r\n") == 3 and r.done
    assert total == 50 * 1000 * 77 and r.size == total
