"""qspp.proxyproto: PROXY protocol v1/v2 headers, hand-built, valid and each
malformed class; read_header on a socketpair never takes a byte past the header."""

import socket
import struct
import threading
import time

import pytest

from qspp.proxyproto import (V1_MAX, V2_SIGNATURE, ProxyError, ProxyFrom, parse,
                             read_header)

A4, A6 = socket.AF_INET, socket.AF_INET6


def ip4(s):
    return socket.inet_pton(A4, s)


def ip6(s):
    return socket.inet_pton(A6, s)


def v2(cmd=1, fam=0x11, block=b"", length=None, ver=2):
    return (V2_SIGNATURE + bytes([(ver << 4) | cmd, fam])
            + struct.pack(">H", len(block) if length is None else length) + block)


def block4(src="192.0.2.7", dst="198.51.100.1", sport=40000, dport=25):
    return ip4(src) + ip4(dst) + struct.pack(">HH", sport, dport)


def block6(src="2001:db8::7", dst="2001:db8::1", sport=40000, dport=25):
    return ip6(src) + ip6(dst) + struct.pack(">HH", sport, dport)


# -- v1 ----------------------------------------------------------------------

def test_v1_tcp4():
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n"
    h = parse(line + b"EHLO x\r\n")
    assert (h.version, h.local, h.length) == (1, False, len(line))
    assert h.source == (A4, ip4("192.0.2.7"), 40000)
    assert h.dest == (A4, ip4("198.51.100.1"), 25)


def test_v1_tcp6():
    h = parse(b"PROXY TCP6 2001:db8::7 ::ffff:10.0.0.1 0 65535\r\n")
    assert h.source == (A6, ip6("2001:db8::7"), 0)
    assert h.dest == (A6, ip6("::ffff:10.0.0.1"), 65535)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"])
def test_v1_unknown_keeps_own_addresses(line):
    h = parse(line)
    assert (h.local, h.source, h.dest, h.length) == (True, None, None, len(line))


def test_v1_longest_line_is_107_bytes():
    ff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = ("PROXY TCP6 %s %s 65535 65535\r\n" % (ff, ff)).encode()
    assert len(line) == 104  # the longest TCP6 line in inet_ntop form
    assert parse(line).source[2] == 65535
    # an UNKNOWN line may fill the 107 bytes the spec sets as the bound
    long_unknown = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(long_unknown) == V1_MAX
    assert parse(long_unknown).local
    with pytest.raises(ProxyError, match="longer than 107"):
        parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n")


@pytest.mark.parametrize("data", [b"", b"P", b"PROXY", b"PROXY TCP4 1.2.3.4",
                                  b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"])
def test_v1_incomplete_needs_more(data):
    assert parse(data) is None


V1_BAD = {
    "lf only": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\n",
    "cr inside": b"PROXY TCP4 192.0.2.7\r198.51.100.1 40000 25\r\n",
    "lower case": b"proxy TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    "no space": b"PROXYTCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    "tab": b"PROXY\tTCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    "two spaces": b"PROXY TCP4  192.0.2.7 198.51.100.1 40000 25\r\n",
    "trailing space": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25 \r\n",
    "unknown proto": b"PROXY UDP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    "unknownx": b"PROXY UNKNOWNX\r\n",
    "empty proto": b"PROXY \r\n",
    "bare PROXY": b"PROXY\r\n",
    "five fields": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",
    "seven fields": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25 1\r\n",
    "v6 in tcp4": b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 25\r\n",
    "v4 in tcp6": b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 25\r\n",
    "octet 256": b"PROXY TCP4 192.0.2.256 198.51.100.1 40000 25\r\n",
    "octet leading zero": b"PROXY TCP4 192.0.2.07 198.51.100.1 40000 25\r\n",
    "three octets": b"PROXY TCP4 192.0.2 198.51.100.1 40000 25\r\n",
    "empty octet": b"PROXY TCP4 192..2.7 198.51.100.1 40000 25\r\n",
    "signed octet": b"PROXY TCP4 +1.0.2.7 198.51.100.1 40000 25\r\n",
    "non-ascii digit": "PROXY TCP4 1.0.2.\u0667 198.51.100.1 40000 25\r\n".encode(),
    "zone index": b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 25\r\n",
    "bad v6": b"PROXY TCP6 2001:db8:::7 2001:db8::1 40000 25\r\n",
    "port 65536": b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
    "port leading zero": b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 25\r\n",
    "port sign": b"PROXY TCP4 192.0.2.7 198.51.100.1 +4 25\r\n",
    "port empty": b"PROXY TCP4 192.0.2.7 198.51.100.1  25\r\n",
    "port hex": b"PROXY TCP4 192.0.2.7 198.51.100.1 0x19 25\r\n",
    "too long": b"PROXY UNKNOWN " + b"x" * 200,
    "not proxy": b"EHLO client.example\r\n",
    "nul": b"\x00PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
}


@pytest.mark.parametrize("name", sorted(V1_BAD))
def test_v1_malformed(name):
    with pytest.raises(ProxyError):
        parse(V1_BAD[name])


# -- v2 ----------------------------------------------------------------------

def test_v2_proxy_inet():
    data = v2(block=block4())
    h = parse(data + b"EHLO x\r\n")
    assert (h.version, h.local, h.length) == (2, False, 28)
    assert h.source == (A4, ip4("192.0.2.7"), 40000)
    assert h.dest == (A4, ip4("198.51.100.1"), 25)


def test_v2_proxy_inet6_with_tlvs_skipped():
    tlvs = b"\x04\x00\x00" + b"\x01\x00\x02h2" + b"\xee\x00\x05abcde"
    h = parse(v2(fam=0x21, block=block6() + tlvs))
    assert h.source == (A6, ip6("2001:db8::7"), 40000)
    assert h.dest == (A6, ip6("2001:db8::1"), 25)
    assert h.length == 16 + 36 + len(tlvs)


@pytest.mark.parametrize("fam,block", [(0x11, block4()), (0x21, block6()), (0x00, b""),
                                       (0x31, b"\0" * 216), (0xff, b"junk")])
def test_v2_local_keeps_own_addresses_whatever_the_block(fam, block):
    h = parse(v2(cmd=0, fam=fam, block=block))
    assert (h.version, h.local, h.source, h.length) == (2, True, None, 16 + len(block))


def test_v2_proxy_unspec_is_like_local():
    h = parse(v2(cmd=1, fam=0x00, block=b"\x04\x00\x00"))
    assert h.local and h.length == 19


@pytest.mark.parametrize("n", [0, 1, 11, 12, 15, 16, 27])
def test_v2_incomplete_needs_more(n):
    assert parse(v2(block=block4())[:n]) is None


V2_BAD = {
    "signature": b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + block4(),
    "signature early": b"\r\n\r\n\x01",
    "version 1": v2(ver=1, block=block4()),
    "version 3": v2(ver=3, block=block4()),
    "command 2": v2(cmd=2, block=block4()),
    "command 15": v2(cmd=15, block=block4()),
    "inet short": v2(fam=0x11, block=block4()[:11]),
    "inet6 short": v2(fam=0x21, block=block6()[:35]),
    "inet6 with inet block": v2(fam=0x21, block=block4()),
    "family 4": v2(fam=0x41, block=block4()),
    "dgram": v2(fam=0x12, block=block4()),
    "transport unspec": v2(fam=0x10, block=block4()),
    "unix": v2(fam=0x31, block=b"\0" * 216),
    "tlv header cut": v2(block=block4() + b"\x04\x00"),
    "tlv value past end": v2(block=block4() + b"\x04\x00\x05abc"),
}


@pytest.mark.parametrize("name", sorted(V2_BAD))
def test_v2_malformed(name):
    with pytest.raises(ProxyError):
        parse(V2_BAD[name])


def test_v2_length_field_bounds_the_read():
    # a length of 65535 is legal; until its bytes are there it is incomplete,
    # and exactly that many are taken
    data = v2(cmd=0, fam=0, block=b"\0" * 65535)
    assert parse(data[:-1]) is None
    assert parse(data + b"x").length == 16 + 65535


# -- read_header --------------------------------------------------------------

@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def rest(sock):
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16)
    except BlockingIOError:
        return b""
    finally:
        sock.setblocking(True)


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(block=block4()),
    v2(cmd=0, fam=0, block=b""),
    v2(fam=0x21, block=block6() + b"\x04\x00\x01x"),
])
def test_read_header_leaves_the_smtp_bytes(pair, header):
    server, client = pair
    client.sendall(header + b"EHLO client\r\nMAIL")
    h = read_header(server, timeout=2)
    assert h.length == len(header)
    assert rest(server) == b"EHLO client\r\nMAIL"
    assert server.gettimeout() is None


@pytest.mark.parametrize("header", [
    b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n",
    v2(fam=0x21, block=block6()),
])
def test_read_header_byte_by_byte(pair, header):
    server, client = pair

    def dribble():
        for i in range(len(header)):
            client.sendall(header[i:i + 1])
            time.sleep(0.002)
        client.sendall(b"QUIT\r\n")

    t = threading.Thread(target=dribble)
    t.start()
    try:
        h = read_header(server, timeout=5)
    finally:
        t.join()
    assert h.source[1] == ip6("2001:db8::7")
    assert rest(server) == b"QUIT\r\n"


@pytest.mark.parametrize("partial", [b"", b"PROXY TCP4 192.0.2.7", V2_SIGNATURE + b"\x21"])
def test_read_header_total_deadline(pair, partial):
    server, client = pair
    client.sendall(partial)
    t0 = time.monotonic()
    with pytest.raises(ProxyError, match="within 0.3 s"):
        read_header(server, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 1.5


def test_read_header_deadline_is_total_not_per_read(pair):
    # a byte every 0.1 s never lets one read time out; the total deadline still ends it
    server, client = pair
    stop = threading.Event()

    def trickle():
        for c in b"PROXY UNKNOWN " + b"x" * 80:
            if stop.wait(0.1):
                return
            client.sendall(bytes([c]))

    t = threading.Thread(target=trickle)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ProxyError, match="within 0.5 s"):
            read_header(server, timeout=0.5)
    finally:
        stop.set()
        t.join()
    assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("data,why", [
    (b"", "closed before"), (b"PROXY TCP4", "closed in"), (V2_SIGNATURE, "closed in")])
def test_read_header_eof(pair, data, why):
    server, client = pair
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyError, match=why):
        read_header(server, timeout=2)


@pytest.mark.parametrize("data", [b"EHLO x\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
                                  b"PROXY UNKNOWN " + b"y" * 200 + b"\r\n"])
def test_read_header_rejects_without_reading_past_107(pair, data):
    server, client = pair
    client.sendall(data)
    with pytest.raises(ProxyError):
        read_header(server, timeout=2)
    # whatever was consumed, it was never more than the longest possible line
    assert len(rest(server)) >= len(data) - V1_MAX


# -- --proxy-from -------------------------------------------------------------

def test_proxy_from_membership():
    pf = ProxyFrom.parse("10.0.0.0/8, 192.0.2.7,2001:db8::/32")
    assert "10.1.2.3" in pf
    assert "192.0.2.7" in pf
    assert "192.0.2.8" not in pf
    assert "::ffff:10.1.2.3" in pf  # an IPv4 client on a dual-stack socket
    assert "2001:db8:1::5" in pf
    assert "2001:db9::5" not in pf
    assert "fe80::1%lo" not in pf
    assert "not an address" not in pf


@pytest.mark.parametrize("text", ["", "10.0.0.0/8,", "10.0.0.1/8", "10.0.0.0/33",
                                  "example.org", "2001:db8::/129"])
def test_proxy_from_rejects(text):
    with pytest.raises(ValueError):
        ProxyFrom.parse(text)


def test_not_on_the_smtpd_import_path():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c",
                          "import sys, qspp.smtpd; print(sorted(m for m in sys.modules"
                          " if m in ('qspp.proxyproto', 'ipaddress', 'qspp.tcpenv',"
                          " 'qspp.metrics')))"],
                         capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": __import__("os").path.join(
                             __import__("os").path.dirname(__file__), "..", "..", "src")})
    assert out.stdout.strip() == "[]"
