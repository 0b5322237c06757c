"""`qspp serve` options of issue 14, parsed without starting anything."""

import pytest

from qspp import serve


def test_host_repeats_and_defaults_to_loopback():
    assert serve.parse_args([]).host == ["127.0.0.1"]
    assert serve.parse_args(["--host", "::1", "--host", "127.0.0.1"]).host == ["::1",
                                                                           "127.0.0.1"]


def test_proxy_from_is_parsed_once_and_a_bad_one_is_a_usage_error(capsys):
    ns = serve.parse_args(["--proxy-from", "10.0.0.5, 192.0.2.0/28,2001:db8::/64"])
    assert "10.0.0.5" in ns.proxy_from and "192.0.2.15" in ns.proxy_from
    assert "::ffff:10.0.0.5" in ns.proxy_from and "2001:db8::9" in ns.proxy_from
    assert "10.0.0.6" not in ns.proxy_from and "192.0.2.16" not in ns.proxy_from
    assert serve.parse_args([]).proxy_from is None
    for bad in ("10.0.0.300", "10.0.0.1/24", "", "10.0.0.5,"):
        with pytest.raises(SystemExit) as e:
            serve.parse_args(["--proxy-from", bad])
        assert e.value.code == 2
        assert "argument --proxy-from:" in capsys.readouterr().err


@pytest.mark.parametrize("text,want", [("127.0.0.1:9225", ("127.0.0.1", 9225)),
                                       ("[::1]:0", ("::1", 0)), ("::1:80", ("::1", 80))])
def test_metrics_address(text, want):
    assert serve.parse_args(["--metrics", text]).metrics == want


@pytest.mark.parametrize("bad", ["9225", ":9225", "host:", "host:x", "host:65536"])
def test_bad_metrics_address_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit):
        serve.parse_args(["--metrics", bad])
    assert "not HOST:PORT" in capsys.readouterr().err
