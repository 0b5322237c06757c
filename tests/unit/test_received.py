"""The Received line, spec §6.5 and examples 27-29, 45, 58."""

import time

import pytest

from qspp.received import date822, received

# 2026-11-04 07:05:09 UTC
T = 1793775909


def test_date_format():
    assert date822(T) == b"4 Nov 2026 07:05:09 -0000"
    assert date822(0) == b"1 Jan 1970 00:00:00 -0000"
    assert date822(951782400) == b"29 Feb 2000 00:00:00 -0000"
    assert date822(1767225599.9) == b"31 Dec 2025 23:59:59 -0000"


def test_date_defaults_to_now():
    before = time.time()
    d = date822()
    after = time.time()
    assert d in (date822(before), date822(after))


def test_example_27_helo_same_as_host():
    assert received(b"client.example.com", b"Client.Example.COM", None, b"192.0.2.7",
                    b"198.51.100.1", b"SMTP", T) == (
        b"Received: from client.example.com (192.0.2.7)\n"
        b"  by 198.51.100.1 with SMTP; 4 Nov 2026 07:05:09 -0000\n")


def test_example_28_filtering_and_info():
    assert received(b"client.example.com", b"[1.2.3.4] x_y", b"ident user", b"192.0.2.7",
                    b"local.host", b"SMTP", T) == (
        b"Received: from client.example.com (HELO ?1.2.3.4??x?y) (ident?user@192.0.2.7)\n"
        b"  by local.host with SMTP; 4 Nov 2026 07:05:09 -0000\n")


def test_example_29_nothing_set():
    assert received(None, b"", None, None, None, b"SMTP", T) == (
        b"Received: from unknown (HELO ) (unknown)\n"
        b"  by unknown with SMTP; 4 Nov 2026 07:05:09 -0000\n")
    assert received(None, None, None, None, None, b"SMTP", T) == (
        b"Received: from unknown (unknown)\n"
        b"  by unknown with SMTP; 4 Nov 2026 07:05:09 -0000\n")


def test_helo_unknown_without_remotehost_is_hidden():
    # netqmail turns an unset TCPREMOTEHOST into "unknown" before comparing.
    assert received(None, b"UNKNOWN", None, None, None, b"SMTP", T).startswith(
        b"Received: from unknown (unknown)\n")
    # An empty TCPREMOTEHOST is a value: HELO unknown differs from it.
    assert received(b"", b"unknown", None, None, None, b"SMTP", T).startswith(
        b"Received: from  (HELO unknown) (unknown)\n")
    assert received(b"", b"", None, None, None, b"SMTP", T).startswith(
        b"Received: from  (unknown)\n")


def test_comparison_uses_raw_values_and_ascii_folding():
    # Raw values differ although the filtered ones are equal.
    assert received(b"a_b", b"a?b", None, b"1", b"l", b"SMTP", T).startswith(
        b"Received: from a?b (HELO a?b) (1)\n")
    assert received(b"a_b", b"A_B", None, b"1", b"l", b"SMTP", T).startswith(
        b"Received: from a?b (1)\n")
    # Only A-Z fold: \xc4 and \xe4 differ.
    assert received(b"\xc4", b"\xe4", None, b"1", b"l", b"SMTP", T).startswith(
        b"Received: from ? (HELO ?) (1)\n")
    # Trailing spaces are part of the name.
    assert received(b"h", b"h ", None, b"1", b"l", b"SMTP", T).startswith(
        b"Received: from h (HELO h?) (1)\n")


def test_filter_table():
    everything = bytes(range(1, 256))
    line = received(everything, None, everything, everything, everything, b"P", T)
    safe = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.@%+/=:-")
    filtered = bytes(c if c in safe else 63 for c in everything)
    assert line == (b"Received: from " + filtered + b" (" + filtered + b"@" + filtered
                    + b")\n  by " + filtered + b" with P; 4 Nov 2026 07:05:09 -0000\n")


def test_protocol_not_filtered():
    line = received(b"h", None, b"user", b"1.2.3.4", b"l", b"ESMTPS (TLS_AES_256_GCM_SHA384 encrypted)", T)
    assert line == (b"Received: from h (user@1.2.3.4)\n  by l with "
                    b"ESMTPS (TLS_AES_256_GCM_SHA384 encrypted); 4 Nov 2026 07:05:09 -0000\n")


@pytest.mark.parametrize("proto", [b"ESMTPA", b"SMTP"])
def test_example_45_auth(proto):
    assert received(b"client.example.com", b"c", b"user", b"192.0.2.7", b"198.51.100.1",
                    proto, T).startswith(
        b"Received: from client.example.com (HELO c) (user@192.0.2.7)\n  by 198.51.100.1 with "
        + proto + b"; ")


def test_nul_ends_a_value():
    assert received(b"h\0x", b"h\0y", b"i\0z", b"1\0w", b"l\0v", b"SMTP\0u", T) == (
        b"Received: from h (i@1)\n  by l with SMTP; 4 Nov 2026 07:05:09 -0000\n")
