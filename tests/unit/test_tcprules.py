"""qspp.tcprules against cdbs made by the real tcprules(1) (ucspi-tcp 0.88).

What tcprules writes was checked with `cdb -d`: `allow` is empty data, `deny`
is `D\\0`, each variable `+NAME=value\\0`, in rule order.
"""

import os
import shutil
import subprocess

import pytest

from qspp.cdb import Cdb, make
from qspp.tcprules import Rules, RulesError, keys, lookup, parse

TCPRULES = shutil.which("tcprules")


def tcprules(tmp_path, text, name="rules.cdb"):
    if TCPRULES is None:
        if os.environ.get("CI"):
            pytest.fail("tcprules (ucspi-tcp) is not installed")
        pytest.skip("tcprules (ucspi-tcp) is not installed")
    path = tmp_path / name
    subprocess.run([TCPRULES, str(path), str(tmp_path / (name + ".tmp"))],
                   input=text.encode(), check=True, timeout=10)
    return path


def test_keys_order_ip_only():
    assert list(keys(b"10.119.75.38")) == [
        b"10.119.75.38", b"10.119.75.", b"10.119.", b"10.", b""]


def test_keys_order_with_host_and_info():
    assert list(keys(b"1.2.3.4", b"mx.example.com", b"joe")) == [
        b"joe@1.2.3.4", b"joe@=mx.example.com", b"1.2.3.4", b"=mx.example.com",
        b"1.2.3.", b"1.2.", b"1.", b"=.example.com", b"=.com", b"=", b""]


def test_parse_like_tcpservers_found():
    assert parse(b"") == (False, [])
    assert parse(b"D\0") == (True, [])
    assert parse(b"+A=1\0+B=\0+C=x=y\0") == (False, [(b"A", b"1"), (b"B", b""), (b"C", b"x=y")])
    # no `=`: ignored (tcpserver has no "unset" form); unknown first byte: ignored;
    # an entry without its NUL: ignored
    assert parse(b"+NOEQ\0Xjunk\0+A=1\0+TAIL=1") == (False, [(b"A", b"1")])
    assert parse(b"+=empty\0") == (False, [])


def test_man_page_example(tmp_path):
    # tcprules(1) "ADDRESSES": the same four rules and the same answers
    path = tcprules(tmp_path, "joe@127.0.0.1:allow,R=\"first\"\n18.23.0.32:allow,R=\"second\"\n"
                    ":allow,R=\"third\"\n127.:allow,R=\"fourth\"\n")
    with Cdb.open(str(path)) as cdb:
        assert lookup(cdb, b"10.119.75.38").env == [(b"R", b"third")]
        assert lookup(cdb, b"18.23.0.32").env == [(b"R", b"second")]
        assert lookup(cdb, b"127.0.0.1", info=b"bill").env == [(b"R", b"fourth")]
        assert lookup(cdb, b"127.0.0.1", info=b"joe").env == [(b"R", b"first")]
        assert lookup(cdb, b"127.0.0.1").key == b"127."


def test_lookup_order_and_data(tmp_path):
    path = tcprules(tmp_path, "\n".join([
        "# a comment",
        '127.0.0.1:allow,RELAYCLIENT="",TCPLOCALHOST="movie.edu",X=/a=b/',
        "127.0.0.2:deny",
        '127.0.:allow,NOSPP=""',
        '127.:allow,SPPCONFFILE="control/other"',
        '=host.example.com:allow,H="exact"',
        '=.example.com:allow,H="suffix"',
        '=:allow,H="named"',
        '10.2-3.:allow,R="range"',
        '1.2.3.4:allow,A="1",A="2"',
        '1.2.3.5:deny,A="1"',
        "1.2.3.6:allow",
        ':allow,DEF="d"',
    ]) + "\n")
    r = Rules.load(str(path))
    try:
        rule = r.lookup(b"127.0.0.1")
        assert (rule.key, rule.deny) == (b"127.0.0.1", False)
        assert rule.env == [(b"RELAYCLIENT", b""), (b"TCPLOCALHOST", b"movie.edu"), (b"X", b"a=b")]
        rule = r.lookup(b"127.0.0.2")
        assert (rule.key, rule.deny, rule.env) == (b"127.0.0.2", True, [])
        assert r.lookup(b"127.0.0.9").env == [(b"NOSPP", b"")]
        assert r.lookup(b"127.1.0.1").env == [(b"SPPCONFFILE", b"control/other")]
        # the exact =HOST comes before the address prefixes, host suffixes after them
        assert r.lookup(b"127.1.0.1", b"host.example.com").key == b"=host.example.com"
        assert r.lookup(b"127.1.0.1", b"a.example.com").key == b"127."
        assert r.lookup(b"9.9.9.9", b"host.example.com").env == [(b"H", b"exact")]
        assert r.lookup(b"9.9.9.9", b"a.example.com").env == [(b"H", b"suffix")]
        assert r.lookup(b"9.9.9.9", b"a.example.net").env == [(b"H", b"named")]
        assert r.lookup(b"9.9.9.9").env == [(b"DEF", b"d")]
        assert r.lookup(b"10.2.0.1").env == [(b"R", b"range")]
        assert r.lookup(b"10.3.0.1").env == [(b"R", b"range")]
        assert r.lookup(b"10.4.0.1").key == b""
        env = {b"A": b"0"}
        r.lookup(b"1.2.3.4").apply(env)
        assert env == {b"A": b"2"}
        rule = r.lookup(b"1.2.3.5")
        assert rule.deny and rule.env == [(b"A", b"1")]
        # a bare allow stops the search: the default's DEF is not added
        rule = r.lookup(b"1.2.3.6")
        assert (rule.key, rule.deny, rule.env) == (b"1.2.3.6", False, [])
    finally:
        r.close()


def test_no_rule_at_all(tmp_path):
    path = tcprules(tmp_path, "10.:deny\n")
    r = Rules.load(str(path))
    assert r.lookup(b"127.0.0.1") is None
    r.close()


def test_load_refuses_damaged_files(tmp_path):
    good = tcprules(tmp_path, '127.:allow,A="1"\n:deny\n')
    data = good.read_bytes()
    bad = tmp_path / "bad.cdb"
    for damaged, why in ((data[:1000], "too short for a cdb"),
                         (data[:-8], "lies outside the file"),
                         (b"", "too short for a cdb")):
        bad.write_bytes(damaged)
        with pytest.raises(RulesError, match=why):
            Rules.load(str(bad))
    with pytest.raises(RulesError, match="No such file"):
        Rules.load(str(tmp_path / "missing.cdb"))
    # a record whose lengths run past the records
    make(str(bad), [(b"127.", b"+A=1\0")])
    raw = bytearray(bad.read_bytes())
    raw[2048 + 4:2048 + 8] = (10000).to_bytes(4, "little")
    bad.write_bytes(bytes(raw))
    with pytest.raises(RulesError, match="runs into the hash tables"):
        Rules.load(str(bad))
    assert Rules.load(str(good)).lookup(b"127.0.0.1").env == [(b"A", b"1")]
