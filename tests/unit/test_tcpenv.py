"""qspp.tcpenv: the ucspi-tcp-ipv6 tcpserver environment (tables measured on the
real binary; tests/e2e/test_ipv6.py compares against it live), and the IPv6 rules keys."""

import socket

import pytest

from qspp.proxyproto import parse
from qspp.tcpenv import address, format_ip6, proxied_environ, tcp6_environ
from qspp.tcprules import keys


def p6(s):
    return socket.inet_pton(socket.AF_INET6, s)


# written by the real tcpserver for these peers (LD_PRELOAD-faked accept())
FORMS = {
    "2001:db8::1": b"2001:db8::1",
    "2001:db8:0:0:1:0:0:1": b"2001:db8::1:0:0:1",
    "2001:db8:0:1:1:1:1:1": b"2001:db8::1:1:1:1:1",
    "2001:0db8:abcd:0012::": b"2001:db8:abcd:12::",
    "::": b"::",
    "::ffff:10.1.2.3": b"::ffff:10.1.2.3",
    "::10.1.2.3": b"::a01:203",
    "64:ff9b::1.2.3.4": b"64:ff9b::102:304",
    "::ffff:0:1.2.3.4": b"::ffff:0:102:304",
    "1:2:3:4:5:6:7:8": b"1:2:3:4:5:6:7:8",
    "0:0:1::": b"0:0:1::",
    "1::": b"1::",
    "0:1:0:1:0:1:0:1": b"::1:0:1:0:1:0:1",
    "1:0:0:2:0:0:0:3": b"1:0:0:2::3",
    "1:0:0:0:2:0:0:3": b"1::2:0:0:3",
    "1:0:0:2:0:0:3:4": b"1::2:0:0:3:4",
    "0:0:1:0:0:1:0:0": b"::1:0:0:1:0:0",
    "FE80::ABCD": b"fe80::abcd",
}


@pytest.mark.parametrize("text", sorted(FORMS))
def test_format_ip6(text):
    assert format_ip6(p6(text)) == FORMS[text]


def test_ipv6_client():
    env = tcp6_environ(p6("::1"), 2525, p6("::1"), 40000, localhost=b"0")
    assert env == {
        b"PROTO": b"TCP6", b"TCPLOCALIP": b"::1", b"TCP6LOCALIP": b"::1",
        b"TCPLOCALPORT": b"2525", b"TCP6LOCALPORT": b"2525",
        b"TCPREMOTEIP": b"::1", b"TCP6REMOTEIP": b"::1",
        b"TCPREMOTEPORT": b"40000", b"TCP6REMOTEPORT": b"40000",
        b"TCPLOCALHOST": b"0", b"TCP6LOCALHOST": b"0"}


def test_ipv4_client_on_dual_stack():
    local, lport, scope = address(socket.AF_INET6, ("::ffff:127.0.0.1", 25, 0, 0))
    remote, rport, _ = address(socket.AF_INET6, ("::ffff:127.0.0.2", 4000, 0, 0))
    env = tcp6_environ(local, lport, remote, rport, scope, remotehost=b"h.example")
    assert env == {
        b"PROTO": b"TCP", b"TCPLOCALIP": b"127.0.0.1", b"TCP6LOCALIP": b"::ffff:127.0.0.1",
        b"TCPLOCALPORT": b"25", b"TCP6LOCALPORT": b"25",
        b"TCPREMOTEIP": b"127.0.0.2", b"TCP6REMOTEIP": b"::ffff:127.0.0.2",
        b"TCPREMOTEPORT": b"4000", b"TCP6REMOTEPORT": b"4000",
        b"TCPREMOTEHOST": b"h.example", b"TCP6REMOTEHOST": b"h.example"}


def test_ipv4_socket_gives_the_same_as_dual_stack():
    a = address(socket.AF_INET, ("127.0.0.2", 4000))
    b = address(socket.AF_INET6, ("::ffff:127.0.0.2", 4000, 0, 0))
    assert a == b


def test_interface_only_with_a_scope():
    local, lport, scope = address(socket.AF_INET6, ("fe80::2%lo", 25, 0, 1))
    assert scope == 1
    env = tcp6_environ(local, lport, p6("fe80::1"), 5, scope)
    assert env[b"TCP6INTERFACE"] == socket.if_indextoname(1).encode()
    assert env[b"TCPLOCALIP"] == b"fe80::2"
    assert tcp6_environ(local, lport, p6("fe80::1"), 5, 4000000)[b"TCP6INTERFACE"] \
        == b"[unknown]"
    assert b"TCP6INTERFACE" not in tcp6_environ(local, lport, p6("fe80::1"), 5, 0)


class FakeConn:
    family = socket.AF_INET6

    def getsockname(self):
        return ("::ffff:10.0.0.5", 25, 0, 0)


PEER = ("::ffff:10.0.0.9", 33000, 0, 0)


def test_proxied_environ_uses_the_header():
    h = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n")
    env = proxied_environ(h, FakeConn(), PEER)
    assert (env[b"PROTO"], env[b"TCPREMOTEIP"], env[b"TCPREMOTEPORT"],
            env[b"TCPLOCALIP"], env[b"TCPLOCALPORT"]) == (
        b"TCP6", b"2001:db8::7", b"40000", b"2001:db8::1", b"25")
    h4 = parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n")
    env = proxied_environ(h4, FakeConn(), PEER)
    assert (env[b"PROTO"], env[b"TCPREMOTEIP"], env[b"TCP6REMOTEIP"]) == (
        b"TCP", b"192.0.2.7", b"::ffff:192.0.2.7")


def test_proxied_environ_local_keeps_the_balancer():
    h = parse(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
    env = proxied_environ(h, FakeConn(), PEER)
    assert (env[b"PROTO"], env[b"TCPREMOTEIP"], env[b"TCPREMOTEPORT"]) == (
        b"TCP", b"10.0.0.9", b"33000")


# -- rules keys (order checked against the real ucspi-tcp-ipv6 tcprulescheck) --

def test_ipv6_keys_end_at_colons_too():
    assert list(keys(b"2001:db8:1:2::5", ipv6=True)) == [
        b"2001:db8:1:2::5", b"2001:db8:1:2::", b"2001:db8:1:2:", b"2001:db8:1:",
        b"2001:db8:", b"2001:", b""]
    assert list(keys(b"::1", ipv6=True)) == [b"::1", b"::", b":", b""]
    assert list(keys(b"::1", b"h.example", b"joe", ipv6=True)) == [
        b"joe@::1", b"joe@=h.example", b"::1", b"=h.example", b"::", b":",
        b"=.example", b"=", b""]


def test_ipv4_keys_unchanged_by_the_ipv6_rule():
    for ip in (b"10.119.75.38", b"127.0.0.1"):
        assert list(keys(ip, ipv6=True)) == list(keys(ip))
    # without ipv6, an IPv6 address has no prefixes (what ucspi-tcp 0.88 does)
    assert list(keys(b"::1")) == [b"::1", b""]

