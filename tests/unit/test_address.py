import pytest

from qspp.address import MAX_ADDRESS, addrparse, localip_rewrite, parse

LIPHOST = b"mx.example.org"


def never(ip):
    raise AssertionError("interface list consulted for %r" % ip)


def local_only(*ips):
    calls = []

    def is_local(ip):
        calls.append(ip)
        return ip in ips
    is_local.calls = calls
    return is_local


@pytest.mark.parametrize("arg, expected", [
    # spec 9.1 row 14: source route
    (b"FROM:<@a,@b:user@host>", b"user@host"),
    # row 15
    (b"FROM: user@host SIZE=10", b"user@host"),
    (b"FROM x@y", b""),
    (b"", b""),
    (b"TO:<r@x>", b"r@x"),
    (b"<x@y>", b"x@y"),
    # row 16
    (b'FROM:<"quoted local"@host>', b"quoted local@host"),
    (b"FROM:<a\\>b@c>", b"a>b@c"),
    (b'FROM:<a"b>c"d@e>', b"ab>cd@e"),
    (b"FROM:<abc", b"abc"),
    (b"FROM:<a\0@b>", b"a"),
    # 5.1 prose
    (b"FROM:a@b", b"a@b"),
    (b"FROM:<>", b""),
    (b"TO:<x@example.org>", b"x@example.org"),
])
def test_spec_examples(arg, expected):
    assert addrparse(arg) == expected


@pytest.mark.parametrize("arg, expected", [
    # The first '<' wins wherever it is, and nothing before it counts.
    (b"FROM:x<y>", b"y"),
    (b"FROM:a@b <c@d>", b"c@d"),
    (b"<<a>", b"<a"),
    (b"FROM:<a>b>", b"a"),
    (b"FROM:<a@b> SIZE=10 BODY=8BITMIME", b"a@b"),
    # No space skipping after '<'; spaces are kept up to '>'.
    (b"FROM:< a@b >", b" a@b "),
    (b"FROM:<a b@c>", b"a b@c"),
    # Without '<': after the first ':', only spaces (not tabs) skipped.
    (b"FROM:   a@b", b"a@b"),
    (b"FROM:\ta@b", b"\ta@b"),
    (b"FROM:a@b\tc d", b"a@b\tc"),
    (b"FROM::a@b", b":a@b"),
    (b"FROM:a:b@c", b"a:b@c"),
    (b"FROM:   ", b""),
    (b"FROM:", b""),
    (b"x y:z", b"z"),
    (b"FROM:a>b", b"a>b"),
    # Source route: a leading '@' drops everything through the first ':'.
    (b"FROM:<@a:b@c>", b"b@c"),
    (b"FROM:<@a,@b>", b""),
    (b"FROM:<@a:b>c>", b"b"),
    (b"FROM:<@a:@b:c@d>", b"@b:c@d"),
    (b"FROM:@a:b@c d", b"b@c"),
    (b"FROM: @a:b@c", b"b@c"),
    (b"FROM:<@>", b""),
    (b"FROM:<x@a:b>", b"x@a:b"),
    (b'FROM:<"@a:b">', b"@a:b"),
    # Escapes: next byte literal, even '\\', '"' and the terminator.
    (b"FROM:<a\\\\b>", b"a\\b"),
    (b'FROM:<a\\"b>', b'a"b'),
    (b"FROM:a\\ b c", b"a b"),
    (b"FROM:<ab\\", b"ab"),
    (b"FROM:<\\", b""),
    (b'FROM:<"a\\"b">', b'a"b'),
    (b'FROM:<"a\\>b">', b"a>b"),
    (b"FROM:<a\\\x80b>", b"a\x80b"),
    # Quotes toggle and vanish; inside them the terminator is ordinary.
    (b'FROM:"a b"@c d', b"a b@c"),
    (b'FROM:<"a>b', b"a>b"),
    (b'FROM:<""a"""b">', b"ab"),
    (b'FROM:<"a"b"c">d>', b"abc"),
    (b'FROM:<"', b""),
    # Non-ASCII and control bytes pass through untouched.
    (b"FROM:<\xff\xfe@\x01\r>", b"\xff\xfe@\x01\r"),
    (b"FROM:<a@b>\r", b"a@b"),
    (b"FROM:a@b\r", b"a@b\r"),
    # An embedded NUL ends the argument in every position.
    (b"FROM:\0<a@b>", b""),
    (b"FROM:<a@b\0>", b"a@b"),
    (b'FROM:<"a\0b">', b"a"),
    (b"FROM:<a\\\0b>", b"a"),
])
def test_addrparse_rules(arg, expected):
    assert addrparse(arg) == expected


def test_long_arguments_are_linear_and_exact():
    body = b'a\\>"q q"' * 8000
    expected = b'a>q q' * 8000
    assert addrparse(b"FROM:<" + body + b">") == expected
    assert addrparse(b"FROM:<" + b'"' * 65536 + b"x>") == b"x"
    assert addrparse(b"FROM:<" + b"\\\\" * 30000 + b">") == b"\\" * 30000


def test_length_limit_row_17():
    ok = b"FROM:<" + b"a" * 893 + b"@b.org>"
    bad = b"FROM:<" + b"a" * 894 + b"@b.org>"
    assert parse(ok, None, never) == b"a" * 893 + b"@b.org"
    assert len(parse(ok, None, never)) == MAX_ADDRESS == 899
    assert parse(bad, None, never) is None


def test_length_limit_row_11():
    assert parse(b"FROM:<" + b"a" * 900 + b">", None, never) is None
    assert parse(b"FROM:<" + b"a" * 899 + b">", None, never) == b"a" * 899


def test_length_counts_unescaped_bytes():
    arg = b"FROM:<" + b'"' * 50 + b"a" * 899 + b"\\"
    assert parse(arg, None, never) == b"a" * 899
    arg = b"FROM:<" + b"\\a" * 899 + b">"
    assert parse(arg, None, never) == b"a" * 899


def test_parse_without_literal_never_lists_interfaces():
    assert parse(b"FROM:<x@[127.0.0.1]>", None, never) == b"x@[127.0.0.1]"
    assert parse(b"TO:<x@example.org>", LIPHOST, never) == b"x@example.org"
    assert parse(b"TO:<noat>", LIPHOST, never) == b"noat"
    assert parse(b"TO:<>", LIPHOST, never) == b""


def test_row_26_literal_rewrite():
    is_local = local_only(b"127.0.0.1", b"0.0.0.0")
    assert parse(b"TO:<x@[127.0.0.1]>", LIPHOST, is_local) == b"x@mx.example.org"
    assert parse(b"TO:<x@[192.0.2.99]>", LIPHOST, is_local) == b"x@[192.0.2.99]"
    assert parse(b"FROM:<x@[127.0.0.1]>", LIPHOST, is_local) == b"x@mx.example.org"
    assert is_local.calls == [b"127.0.0.1", b"192.0.2.99", b"127.0.0.1"]


@pytest.mark.parametrize("addr, normalised", [
    (b"x@[127.0.0.257]", b"127.0.0.1"),
    (b"x@[0127.000.0.01]", b"127.0.0.1"),
    (b"x@[383.256.512.769]", b"127.0.0.1"),
    (b"x@[0.0.0.0]", b"0.0.0.0"),
    (b"x@[18446744073709551743.0.0.1]", b"127.0.0.1"),
    (b"x@[" + b"1" + b"0" * 5000 + b"127.0.0.1]", b"127.0.0.1"),
    (b"x@y@[127.0.0.1]", b"127.0.0.1"),
    (b"@[127.0.0.1]", b"127.0.0.1"),
    (b"[1.2.3.4]@[127.0.0.1]", b"127.0.0.1"),
])
def test_literal_normalisation(addr, normalised):
    is_local = local_only(normalised)
    at = addr.rfind(b"@")
    assert localip_rewrite(addr, LIPHOST, is_local) == addr[:at + 1] + LIPHOST
    assert is_local.calls == [normalised]


@pytest.mark.parametrize("addr", [
    b"x@[127.0.0.1",
    b"x@127.0.0.1]",
    b"x@127.0.0.1",
    b"x@[127.0.0]",
    b"x@[127.0.0.1.5]",
    b"x@[127..0.1]",
    b"x@[.127.0.0.1]",
    b"x@[127.0.0.1.]",
    b"x@[127.0.0.1]]",
    b"x@[[127.0.0.1]",
    b"x@[127.0.0.1] ",
    b"x@[127.0.0.1]\r",
    b"x@[ 127.0.0.1]",
    b"x@[127.0.0.1 ]",
    b"x@[+127.0.0.1]",
    b"x@[-1.0.0.1]",
    b"x@[127.0.0.0x1]",
    b"x@[127.0.0.\xd9\xa1]",
    b"x@[]",
    b"x@",
    b"[127.0.0.1]",
    b"x@[127.0.0.1]@y",
    b"x@a[127.0.0.1]",
])
def test_literal_must_be_exact(addr):
    assert localip_rewrite(addr, LIPHOST, never) == addr


def test_not_local_is_unchanged():
    assert localip_rewrite(b"x@[10.1.2.3]", LIPHOST, local_only()) == b"x@[10.1.2.3]"


def test_rewrite_keeps_localiphost_bytes():
    # A CRLF localiphost keeps its CR (line class), and so does the address.
    assert localip_rewrite(b"x@[0.0.0.0]", b"h.example\r", local_only(b"0.0.0.0")) == b"x@h.example\r"
    assert localip_rewrite(b"x@[0.0.0.0]", b"", local_only(b"0.0.0.0")) == b"x@"


def test_rewrite_before_length_check():
    is_local = local_only(b"127.0.0.1")
    # Too long as written, short enough once rewritten.
    long_literal = b"x@[" + b"0" * 1000 + b"127.0.0.1]"
    assert parse(b"<" + long_literal + b">", LIPHOST, is_local) == b"x@" + LIPHOST
    # Short enough as written, too long once rewritten.
    local = b"a" * (MAX_ADDRESS - 1 - len(b"[127.0.0.1]"))
    assert parse(b"<" + local + b"@[127.0.0.1]>", None, never) is not None
    assert parse(b"<" + local + b"@[127.0.0.1]>", LIPHOST, is_local) is None
    exact = b"a" * (MAX_ADDRESS - 1 - len(LIPHOST))
    assert parse(b"<" + exact + b"@[127.0.0.1]>", LIPHOST, is_local) == exact + b"@" + LIPHOST
    assert parse(b"<a" + exact + b"@[127.0.0.1]>", LIPHOST, is_local) is None


def test_nul_in_localiphost_counts_then_cuts():
    is_local = local_only(b"127.0.0.1")
    assert parse(b"<x@[127.0.0.1]>", b"mx\0junk", is_local) == b"x@mx"
    local = b"a" * (MAX_ADDRESS - 1 - len(b"mx\0junk"))
    assert parse(b"<" + local + b"@[127.0.0.1]>", b"mx\0junk", is_local) == local + b"@mx"
    assert parse(b"<a" + local + b"@[127.0.0.1]>", b"mx\0junk", is_local) is None


def test_lookup_failure_propagates():
    class Boom(Exception):
        pass

    def failing(ip):
        raise Boom()
    with pytest.raises(Boom):
        parse(b"<x@[127.0.0.1]>", LIPHOST, failing)
    assert parse(b"<x@[127.0.0]>", LIPHOST, failing) == b"x@[127.0.0]"


def reference_addrparse(arg):
    # A byte-at-a-time transcription of netqmail's loop, to check the
    # optimised implementation against on random input.
    s = arg.split(b"\0")[0] + b"\0"
    p = 0
    terminator = b">"[0]
    i = s.find(b"<")
    if i >= 0:
        p = i + 1
    else:
        terminator = b" "[0]
        while s[p] != 0 and s[p] != b":"[0]:
            p += 1
        if s[p] == b":"[0]:
            p += 1
        while s[p] == b" "[0]:
            p += 1
    if s[p] == b"@"[0]:
        while s[p] != 0:
            c = s[p]
            p += 1
            if c == b":"[0]:
                break
    out = bytearray()
    esc = quoted = False
    while s[p] != 0:
        c = s[p]
        if esc:
            out.append(c)
            esc = False
        elif not quoted and c == terminator:
            break
        elif c == b"\\"[0]:
            esc = True
        elif c == b'"'[0]:
            quoted = not quoted
        else:
            out.append(c)
        p += 1
    return bytes(out)


def test_matches_reference_on_random_input():
    import random
    rnd = random.Random(20240601)
    alphabet = b'<>:@"\\ \t.a\0\xff'
    for _ in range(20000):
        arg = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(24)))
        assert addrparse(arg) == reference_addrparse(arg), arg
