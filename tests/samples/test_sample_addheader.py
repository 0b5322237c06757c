"""samples/plugins/addheader: X-Originating-IP for authenticated clients."""

import pytest

from .helpers import run_plugin


def addheader(home, *args, **env):
    full = {"TCPREMOTEIP": "192.0.2.1", "SMTPAUTHUSER": "user"}
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    return run_plugin("addheader", *args, env=full, cwd=home)


def test_authenticated_client_gets_header(home):
    r = addheader(home)
    assert (r.out, r.err, r.code) == (b"HX-Originating-IP: [192.0.2.1]\n", b"", 0)


@pytest.mark.parametrize("user", [None, ""])
def test_unauthenticated_client_gets_none(home, user):
    r = addheader(home, SMTPAUTHUSER=user)
    assert (r.out, r.err, r.code) == (b"", b"", 0)
    # A relay client is not an authenticated one.
    assert addheader(home, SMTPAUTHUSER=user, RELAYCLIENT="").out == b""


def test_all_and_name(home):
    assert addheader(home, "--all", SMTPAUTHUSER=None).out == b"HX-Originating-IP: [192.0.2.1]\n"
    assert addheader(home, "--name", "X-Client-IP").out == b"HX-Client-IP: [192.0.2.1]\n"
    assert addheader(home, "--name=Y", "--all", SMTPAUTHUSER=None).out == b"HY: [192.0.2.1]\n"


@pytest.mark.parametrize("ip, shown", [
    ("::ffff:192.0.2.1", b"192.0.2.1"),
    ("2001:db8::1", b"2001:db8::1"),
    (" 198.51.100.7 ", b"198.51.100.7"),
])
def test_address_forms(home, ip, shown):
    assert addheader(home, TCPREMOTEIP=ip).out == b"HX-Originating-IP: [" + shown + b"]\n"


@pytest.mark.parametrize("ip", ["192.0.2.1\nHX-Evil: 1", "192.0.2.300", "host.example", "1.2.3",
                                "192.0.2.1]", "x" * 50])
def test_bad_address_no_header(home, ip):
    r = addheader(home, TCPREMOTEIP=ip)
    assert (r.out, r.code) == (b"", 1)
    assert b"addheader: pid " in r.err and b"is not an IP address, no header" in r.err


def test_missing_address_no_header(home):
    r = addheader(home, TCPREMOTEIP=None)
    assert (r.out, r.code) == (b"", 1)
    assert b"TCPREMOTEIP not set" in r.err


@pytest.mark.parametrize("args, message", [
    (("--name", "Bad Name"), b"invalid header name"),
    (("--name", "X:Y"), b"invalid header name"),
    (("--name",), b"--name needs a value"),
    (("--everyone",), b"unknown argument --everyone"),
])
def test_usage_errors(home, args, message):
    r = addheader(home, *args)
    assert (r.out, r.code) == (b"", 1)
    assert message in r.err
