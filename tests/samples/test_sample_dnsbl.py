"""samples/plugins/dnsbl: connection-time lookup and the [rcpt] refusal, without DNS."""

import importlib.machinery
import importlib.util
import socket
import sys

import pytest

from .helpers import PLUGINS, run_plugin

IP = "192.0.2.1"
Q = "1.2.0.192"          # IP's octets reversed
REFUSAL = b"E554 5.7.1 Service unavailable; client [192.0.2.1] listed by zen.example\n"


@pytest.fixture
def fake(home):
    """Write the fake resolver file; returns a function taking its lines."""
    path = home / "fake-dns"

    def write(*lines):
        path.write_text("".join(line + "\n" for line in lines))
        return "file:%s" % path
    return write


def connection(home, resolver, *zones, **env):
    full = {"TCPREMOTEIP": IP, "DNSBL_RESOLVER": resolver}
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    return run_plugin("dnsbl", *zones, env=full, cwd=home)


def rcpt(home, *args, **env):
    full = {"TCPREMOTEIP": IP, "DNSBL_HIT": "zen.example", "SMTPRCPTTO": "user@example.org"}
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    return run_plugin("dnsbl", "--rcpt", *args, env=full, cwd=home)


# ---------------------------------------------------------------- connection mode


def test_hit_sets_variable(home, fake):
    r = connection(home, fake("127.0.0.2 %s.zen.example" % Q), "zen.example", "other.example")
    assert (r.out, r.err, r.code) == (b"SDNSBL_HIT=zen.example\n", b"", 0)


def test_no_hit_prints_nothing(home, fake):
    r = connection(home, fake("127.0.0.2 9.9.9.9.zen.example"), "zen.example", "other.example")
    assert (r.out, r.err, r.code) == (b"", b"", 0)


def test_first_listing_zone_in_argument_order(home, fake):
    res = fake("127.0.0.2 %s.a.example" % Q, "127.0.0.3 %s.b.example" % Q)
    assert connection(home, res, "b.example", "a.example").out == b"SDNSBL_HIT=b.example\n"
    assert connection(home, res, "a.example", "b.example").out == b"SDNSBL_HIT=a.example\n"
    assert connection(home, res, "c.example", "b.example").out == b"SDNSBL_HIT=b.example\n"


def test_zone_normalised_and_from_environment(home, fake):
    res = fake("127.0.0.2 %s.ZEN.example." % Q)
    assert connection(home, res, "Zen.Example.").out == b"SDNSBL_HIT=zen.example\n"
    r = connection(home, res, DNSBL_ZONES="other.example, zen.example")
    assert (r.out, r.code) == (b"SDNSBL_HIT=zen.example\n", 0)


def test_error_codes_and_foreign_answers_are_not_hits(home, fake):
    # 127.255.255.254: "query via public resolver" style error code; 10.x: a
    # resolver that turns NXDOMAIN into an advertising server.
    res = fake("127.255.255.254 %s.zen.example" % Q, "10.1.2.3 %s.bad.example" % Q)
    r = connection(home, res, "zen.example", "bad.example")
    assert (r.out, r.code) == (b"", 0)
    assert b"ignoring answer 127.255.255.254" in r.err
    assert b"ignoring answer 10.1.2.3" in r.err


def test_several_records_one_listing(home, fake):
    res = fake("127.255.255.254 %s.zen.example" % Q, "127.0.0.4 %s.zen.example" % Q)
    assert connection(home, res, "zen.example").out == b"SDNSBL_HIT=zen.example\n"


def test_ipv4_mapped_ipv6_is_looked_up(home, fake):
    res = fake("127.0.0.2 %s.zen.example" % Q)
    r = connection(home, res, "zen.example", TCPREMOTEIP="::FFFF:" + IP)
    assert r.out == b"SDNSBL_HIT=zen.example\n"


@pytest.mark.parametrize("ip", ["2001:db8::1", "::1", "fe80::1%eth0"])
def test_ipv6_no_lookup(home, ip):
    # A resolver that cannot be read would log an error if a lookup happened.
    r = connection(home, "file:/nonexistent/fake", "zen.example", TCPREMOTEIP=ip)
    assert (r.out, r.err, r.code) == (b"", b"", 0)


def test_no_tcpremoteip(home, fake):
    r = connection(home, fake("127.0.0.2 %s.zen.example" % Q), "zen.example", TCPREMOTEIP=None)
    assert (r.out, r.code) == (b"", 1)
    assert b"dnsbl: pid " in r.err and b"TCPREMOTEIP not set" in r.err


@pytest.mark.parametrize("ip", ["192.0.2", "192.0.2.256", "192.0.2.-1", "a.b.c.d",
                                "192.0.2.1.5", "0x7f.0.0.1", "192.0.2.1\nSX=1"])
def test_malformed_address_no_lookup(home, ip):
    r = connection(home, "file:/nonexistent/fake", "zen.example", TCPREMOTEIP=ip)
    assert (r.out, r.code) == (b"", 1)
    assert b"is not an IPv4 address" in r.err


def test_relay_clients_and_skip_not_looked_up(home):
    for extra in ({"RELAYCLIENT": ""}, {"DNSBL_SKIP": ""}):
        r = connection(home, "file:/nonexistent/fake", "zen.example", **extra)
        assert (r.out, r.err, r.code) == (b"", b"", 0)


def test_lookup_failure_fails_open_other_zone_still_counts(home, fake):
    res = fake("!fail %s.zen.example" % Q, "127.0.0.2 %s.other.example" % Q)
    r = connection(home, res, "zen.example")
    assert (r.out, r.code) == (b"", 1)
    assert b"lookup failed" in r.err and b"treated as not listed" in r.err
    r = connection(home, res, "zen.example", "other.example")
    assert (r.out, r.code) == (b"SDNSBL_HIT=other.example\n", 0)


def test_timeout_is_bounded(home, fake):
    res = fake("!hang %s.zen.example" % Q, "127.0.0.2 %s.other.example" % Q)
    r = connection(home, res, "--timeout", "0.3", "zen.example")
    assert (r.out, r.code) == (b"", 1)
    assert b"no answer within 0.3 s" in r.err
    assert r.elapsed < 5
    # Another zone answering in time still counts; the hung thread is abandoned.
    r = connection(home, res, "zen.example", "other.example", DNSBL_TIMEOUT="0.3")
    assert r.out == b"SDNSBL_HIT=other.example\n"
    assert r.elapsed < 5


def test_bad_zones_and_options(home, fake):
    res = fake("127.0.0.2 %s.zen.example" % Q)
    r = connection(home, res, "bad zone!", "zen.example")
    assert r.out == b"SDNSBL_HIT=zen.example\n"
    assert b"invalid zone 'bad zone!', skipped" in r.err
    r = connection(home, res)
    assert (r.out, r.code) == (b"", 1)
    assert b"no zones given" in r.err
    r = connection(home, res, "--bogus", "zen.example")
    assert (r.out, r.code) == (b"", 1)
    assert b"unknown option --bogus" in r.err
    r = connection(home, "dns:8.8.8.8", "zen.example")
    assert (r.out, r.code) == (b"", 1)
    assert b"only file:PATH" in r.err
    r = connection(home, res, "--timeout", "soon", "zen.example")
    assert r.out == b"SDNSBL_HIT=zen.example\n"
    assert b"invalid timeout" in r.err


def test_missing_resolver_file_fails_open(home):
    r = connection(home, "file:/nonexistent/fake", "zen.example")
    assert (r.out, r.code) == (b"", 1)
    assert b"/nonexistent/fake" in r.err


# ---------------------------------------------------------------- rcpt mode


def test_rcpt_refuses_listed_client(home):
    r = rcpt(home)
    assert (r.out, r.err, r.code) == (REFUSAL, b"", 0)
    # SMTPAUTHUSER set but empty is not an authenticated client.
    assert rcpt(home, SMTPAUTHUSER="").out == REFUSAL


@pytest.mark.parametrize("env", [{"RELAYCLIENT": ""}, {"RELAYCLIENT": "+ext"},
                                 {"SMTPAUTHUSER": "user"}, {"DNSBL_HIT": None},
                                 {"DNSBL_HIT": ""}])
def test_rcpt_passes(home, env):
    r = rcpt(home, **env)
    assert (r.out, r.err, r.code) == (b"", b"", 0)


def test_rcpt_custom_message(home):
    r = rcpt(home, "--message", "550 5.7.1 %IP% is on %ZONE%, see https://example.org/%ZONE%")
    assert r.out == (b"E550 5.7.1 192.0.2.1 is on zen.example,"
                     b" see https://example.org/zen.example\n")
    r = rcpt(home, TCPREMOTEIP=None)
    assert r.out == b"E554 5.7.1 Service unavailable; client [unknown] listed by zen.example\n"


def test_rcpt_allowed_recipients(home):
    args = ("--allow-rcpt", "postmaster", "--allow-rcpt=Abuse@Example.org")
    assert rcpt(home, *args, SMTPRCPTTO="PostMaster@example.net").out == b""
    assert rcpt(home, *args, SMTPRCPTTO="abuse@example.ORG").out == b""
    assert rcpt(home, *args, SMTPRCPTTO="abuse@example.net").out == REFUSAL
    assert rcpt(home, *args, SMTPRCPTTO="user@example.org").out == REFUSAL
    assert rcpt(home, *args, SMTPRCPTTO="postmaster").out == b""


def test_rcpt_usage_errors(home):
    r = rcpt(home, "zen.example")
    assert (r.out, r.code) == (b"", 1)
    assert b"--rcpt takes no zones" in r.err
    r = rcpt(home, "--connection")
    assert (r.out, r.code) == (b"", 1)


def test_connection_then_rcpt_like_the_engine(home, fake):
    """The S line of [connection] becomes the environment of [rcpt]."""
    r = connection(home, fake("127.0.0.2 %s.zen.example" % Q), "zen.example")
    name, _, value = r.out.rstrip(b"\n")[1:].partition(b"=")
    env = {"TCPREMOTEIP": IP, "SMTPRCPTTO": "x@example.org", name.decode(): value.decode()}
    assert run_plugin("dnsbl", "--rcpt", env=env, cwd=home).out == REFUSAL


# ---------------------------------------------------------------- the real resolver


def load_plugin(monkeypatch):
    """Import the plugin file as a module (its main() does not run on import)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)   # no __pycache__ in samples/
    loader = importlib.machinery.SourceFileLoader("dnsbl_plugin", str(PLUGINS / "dnsbl"))
    spec = importlib.util.spec_from_loader("dnsbl_plugin", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_dns_resolver_maps_getaddrinfo(monkeypatch):
    plugin = load_plugin(monkeypatch)
    asked = []

    def fake_getaddrinfo(host, port, family, type_):
        asked.append((host, family))
        if host.startswith("2."):
            return [(family, type_, 6, "", ("127.0.0.2", 0)), (family, type_, 6, "", ("127.0.0.2", 0))]
        if host.startswith("3."):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert plugin.dns_resolver("2.0.0.127.zen.example") == ["127.0.0.2"]
    # Absolute name: no resolv.conf search domain is ever appended.
    assert asked == [("2.0.0.127.zen.example.", socket.AF_INET)]
    assert plugin.dns_resolver("3.0.0.127.zen.example") == []
    with pytest.raises(plugin.LookupFailed, match="Temporary failure"):
        plugin.dns_resolver("4.0.0.127.zen.example")
