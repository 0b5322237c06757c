import errno
import os
import shutil
import subprocess
import sys

import pytest

from qspp import control
from qspp.address import parse
from qspp.cdb import make
from qspp.control import (Badmailfrom, ControlError, NoLocalIPs, Rcpthosts, databytes,
                          is_local_ip, leading_int, local_ipv4, local_ipv4_addresses, read_int,
                          read_line, read_list, scan_ulong, timeout_smtpd)

CDB_TOOL = shutil.which("cdb")
needs_tool = pytest.mark.skipif(CDB_TOOL is None, reason="tinycdb's cdb tool not installed")
as_root = os.geteuid() == 0


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "control").mkdir()
    return tmp_path


def put(name, data):
    with open(name, "wb") as f:
        f.write(data)


def tool_cdb(path, keys):
    src = b"".join(b"+%d,0:%s->\n" % (len(k), k) for k in keys) + b"\n"
    subprocess.run([CDB_TOOL, "-c", path], input=src, check=True)


def own_cdb(path, keys):
    make(path, [(k, b"") for k in keys])


CDB_MAKERS = [pytest.param(own_cdb, id="own"), pytest.param(tool_cdb, id="tinycdb", marks=needs_tool)]


# ---- line ----

@pytest.mark.parametrize("data, expected", [
    (b"a.b\r\n", b"a.b\r"),
    (b"g.example hi  \n", b"g.example hi"),
    (b"", b""),
    (b"\n", b""),
    (b" \t \n", b""),
    (b"mx.example.org", b"mx.example.org"),
    (b"mx.example.org \t ", b"mx.example.org"),
    (b"x \t\nsecond\n", b"x"),
    (b"\nsecond\n", b""),
    (b"  a b\t\n", b"  a b"),
    (b"a\r \t\n", b"a\r"),
    (b"a \r\n", b"a \r"),
    (b"a\r\r\n", b"a\r\r"),
    (b"a\0b \n", b"a\0b"),
    (b"\xff\xfe\n", b"\xff\xfe"),
])
def test_read_line(home, data, expected):
    put("control/me", data)
    assert read_line("control/me") == expected


def test_read_line_long_first_line(home):
    line = b"x" * 200000
    put("control/me", line + b"  \n" + b"y" * 100)
    assert read_line("control/me") == line
    put("control/me", line + b"\t")
    assert read_line("control/me") == line


def test_read_line_absent(home):
    assert read_line("control/me") is None
    assert read_line("nodir/me") is None
    os.symlink("nowhere", "control/dangling")
    assert read_line("control/dangling") is None


def test_read_line_bytes_path(home):
    put("control/me", b"h\n")
    assert read_line(b"control/me") == b"h"


def test_directory_is_error(home):
    os.mkdir("control/me")
    with pytest.raises(ControlError) as ei:
        read_line("control/me")
    assert ei.value.path == "control/me"
    assert ei.value.errno == errno.EISDIR
    assert "control/me" in str(ei.value)
    for reader in (read_int, read_list):
        with pytest.raises(ControlError) as ei:
            reader("control/me")
        assert ei.value.errno == errno.EISDIR


def test_not_a_directory_is_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    put("control", b"")
    for reader in (read_line, read_int, read_list):
        with pytest.raises(ControlError) as ei:
            reader("control/me")
        assert ei.value.errno == errno.ENOTDIR


def test_symlink_loop_is_error(home):
    os.symlink("loop", "control/loop")
    with pytest.raises(ControlError) as ei:
        read_line("control/loop")
    assert ei.value.errno == errno.ELOOP


@pytest.mark.skipif(as_root, reason="root reads any file")
def test_unreadable_is_error(home):
    put("control/me", b"x\n")
    os.chmod("control/me", 0)
    with pytest.raises(ControlError) as ei:
        read_line("control/me")
    assert ei.value.errno == errno.EACCES


def test_fifo_without_writer_reads_empty(home):
    # qmail opens control files O_NONBLOCK, so a FIFO nobody writes is an
    # empty file rather than a hang.
    os.mkfifo("control/me")
    assert read_line("control/me") == b""
    assert read_list("control/me") == []
    assert read_int("control/me") is None


# ---- int ----

@pytest.mark.parametrize("data, expected", [
    (b"30abc\n", 30),
    (b"30", 30),
    (b"1200\r\n", 1200),
    (b"0\n", 0),
    (b"007\n", 7),
    (b"5 6\n", 5),
    (b"5\n6\n", 5),
    (b" 30\n", None),
    (b"\t30\n", None),
    (b"", None),
    (b"\n30\n", None),
    (b"abc\n", None),
    (b"+5\n", None),
    (b"-5\n", None),
    (b"\xd9\xa1\n", None),
    (b"4294967295\n", 4294967295),
    (b"4294967296\n", 0),
    (b"4294967297\n", 1),
    (b"18446744073709551615\n", 4294967295),
    (b"18446744073709551617\n", 1),
    pytest.param(b"1" + b"0" * 5000 + b"42\n", 42, id="5000-digits"),
])
def test_read_int(home, data, expected):
    put("control/databytes", data)
    assert read_int("control/databytes") == expected


@pytest.mark.parametrize("data, expected", [
    (b"30\n", 30),
    (b"0\n", 0),
    (b"2147483647\n", 2147483647),
    (b"2147483648\n", -2147483648),
    (b"4294967295\n", -1),
    (b"4294967296\n", 0),
    (b"4294968496\n", 1200),
    (b"x\n", None),
])
def test_read_int_signed(home, data, expected):
    put("control/timeoutsmtpd", data)
    assert read_int("control/timeoutsmtpd", signed=True) == expected


def test_leading_int():
    assert leading_int(b"") is None
    assert leading_int(b" 1") is None
    assert leading_int(b"10xyz") == 10
    assert leading_int(b"4294967295") == 4294967295
    assert leading_int(b"4294967295", signed=True) == -1
    assert leading_int(b"18446744073709551616") == 0


def test_read_int_absent(home):
    assert read_int("control/databytes") is None


def test_scan_ulong():
    assert scan_ulong(b"") == (0, 0)
    assert scan_ulong(b"x1") == (0, 0)
    assert scan_ulong(b"12x3") == (12, 2)
    assert scan_ulong(b"0000") == (0, 4)
    assert scan_ulong(b"18446744073709551616") == (0, 20)


@pytest.mark.parametrize("value, expected", [
    (None, 1200),
    (30, 30),
    (1, 1),
    (0, 1),
    (2147483647, 2147483647),
    (2147483648, 1),
    (4294967295, 1),
    (4294967296, 1),
    (4294967297, 1),
    (4294967296 + 1200, 1200),
    (2**64 - 1, 1),
    (2**64 - 2**32 + 77, 77),
])
def test_timeout_smtpd(value, expected):
    assert timeout_smtpd(value) == expected


@pytest.mark.parametrize("control_value, env_value, expected", [
    (None, None, 0),
    (5, None, 5),
    (5, b"", 0),
    (5, b"abc", 0),
    (None, b"10", 10),
    (5, b"10", 10),
    (5, b"10xyz", 10),
    (5, b" 10", 0),
    (0, None, 0),
    (4294967294, None, 4294967294),
    (4294967295, None, 4294967294),
    (4294967296, None, 0),
    (4294967297, None, 1),
    (None, b"4294967295", 4294967294),
    (None, b"4294967296", 0),
    (None, b"18446744073709551615", 4294967294),
    (None, b"18446744073709551616", 0),
    pytest.param(None, b"9" * 5000, 4294967294, id="5000-nines"),
    pytest.param(None, b"1" + b"0" * 5000 + b"7", 7, id="5000-digits"),
])
def test_databytes(control_value, env_value, expected):
    assert databytes(control_value, env_value) == expected


def test_databytes_from_file(home):
    put("control/databytes", b"4294967295\n")
    assert databytes(read_int("control/databytes"), None) == 4294967294
    put("control/databytes", b"8589934591\n")
    assert databytes(read_int("control/databytes"), None) == 4294967294
    put("control/databytes", b"5\n")
    assert databytes(read_int("control/databytes"), b"") == 0
    assert databytes(read_int("control/databytes"), None) == 5


def test_timeout_from_file(home):
    assert timeout_smtpd(read_int("control/timeoutsmtpd", signed=True)) == 1200
    put("control/timeoutsmtpd", b"4294967295\n")
    assert timeout_smtpd(read_int("control/timeoutsmtpd", signed=True)) == 1
    put("control/timeoutsmtpd", b" 5\n")
    assert timeout_smtpd(read_int("control/timeoutsmtpd", signed=True)) == 1200
    put("control/timeoutsmtpd", b"5s\n")
    assert timeout_smtpd(read_int("control/timeoutsmtpd", signed=True)) == 5


# ---- list ----

@pytest.mark.parametrize("data, expected", [
    (b"example.org\n.example.net\n", [b"example.org", b".example.net"]),
    (b"example.org\n.example.net", [b"example.org", b".example.net"]),
    (b"", []),
    (b"\n\n\n", []),
    (b" \n\t\n \t \n", []),
    (b"# comment\n#\na\n", [b"a"]),
    (b" #x\n", [b" #x"]),
    (b"a#b\n", [b"a#b"]),
    (b"  x@y\n", [b"  x@y"]),
    (b"\tx@y \t \n", [b"\tx@y"]),
    (b"a.b\r\n", [b"a.b\r"]),
    (b"\r\n", [b"\r"]),
    (b"a \r\n", [b"a \r"]),
    (b"A.Example\n", [b"A.Example"]),
    (b"dup\ndup\n", [b"dup", b"dup"]),
    (b"a\n\nb\n \n#c\nd  ", [b"a", b"b", b"d"]),
    # NUL bytes, as control_readfile + constmap see them.
    (b"a\0b\n", [b"a", b"b"]),
    (b"a\0\n", [b"a", b""]),
    (b"a\0\0b\n", [b"a", b"", b"b"]),
    (b"\0a\n", []),
    (b"a\0#b\n", [b"a", b"#b"]),
    (b"a\0 \n", [b"a", b""]),
])
def test_read_list(home, data, expected):
    put("control/rcpthosts", data)
    assert read_list("control/rcpthosts") == expected


def test_read_list_absent(home):
    assert read_list("control/rcpthosts") is None


def test_read_list_large(home):
    lines = [b"host%d.example" % i for i in range(50000)]
    put("control/rcpthosts", b"\n".join(lines) + b"\n")
    assert read_list("control/rcpthosts") == lines


# ---- rcpthosts ----

F_RCPTHOSTS = b"example.org\n.example.net\n"


@pytest.mark.parametrize("addr, allowed", [
    # spec 9.1 row 20
    (b"x@sub.example.org", False),
    (b"x@EXAMPLE.ORG", True),
    (b"x@example.net", False),
    (b"x@a.b.example.net", True),
    (b"x@", False),
    (b"noat", True),
    (b"x@y@example.org", True),
    (b"x@example.org.", False),
    # more
    (b"", True),
    (b"x@example.org", True),
    (b"x@b.example.net", True),
    (b"x@.example.net", True),
    (b"x@Sub.Example.NET", True),
    (b"x@example.org@evil.com", False),
    (b"example.org", True),
    (b"@example.org", True),
    (b"x@xexample.org", False),
    (b"x@example.orgx", False),
    (b"x@example.net.", False),
    (b"x@[192.0.2.99]", False),
    (b"x@example.org\r", False),
    (b"x@ example.org", False),
])
def test_rcpthosts_fixture_f(home, addr, allowed):
    put("control/rcpthosts", F_RCPTHOSTS)
    rh = Rcpthosts.load()
    assert rh.present
    assert rh.allows(addr) is allowed


def test_rcpthosts_absent_allows_all(home):
    rh = Rcpthosts.load()
    assert not rh.present
    for addr in (b"x@anywhere", b"noat", b"", b"x@", b"x@[192.0.2.99]"):
        assert rh.allows(addr)


def test_rcpthosts_empty_refuses_every_at(home):
    put("control/rcpthosts", b"")
    rh = Rcpthosts.load()
    assert rh.present
    assert not rh.allows(b"x@anywhere")
    assert rh.allows(b"noat")
    assert rh.allows(b"")
    put("control/rcpthosts", b"# only a comment\n\n")
    assert not Rcpthosts.load().allows(b"x@anywhere")


def test_rcpthosts_entries_case_insensitive(home):
    put("control/rcpthosts", b"Example.ORG\n.EXAMPLE.net\n")
    rh = Rcpthosts.load()
    assert rh.allows(b"x@example.org")
    assert rh.allows(b"x@a.Example.Net")


def test_rcpthosts_only_ascii_folds():
    rh = Rcpthosts([b"\xc3\x89xample.org"])
    assert rh.allows(b"x@\xc3\x89XAMPLE.org")
    assert not rh.allows(b"x@\xc3\xa9xample.org")


def test_rcpthosts_entry_kinds():
    # CRLF files keep the CR in each entry, and leading blanks match nothing.
    assert not Rcpthosts([b"example.org\r"]).allows(b"x@example.org")
    assert not Rcpthosts([b"  example.org"]).allows(b"x@example.org")
    # A trailing dot is just a byte.
    assert Rcpthosts([b"example.org."]).allows(b"x@example.org.")
    assert not Rcpthosts([b"example.org."]).allows(b"x@example.org")
    # Literals are plain strings.
    assert Rcpthosts([b"[192.0.2.99]"]).allows(b"x@[192.0.2.99]")
    assert Rcpthosts([b".99]"]).allows(b"x@[192.0.2.99]")
    # A dot-suffix entry covers every depth, not the bare domain.
    rh = Rcpthosts([b".net"])
    assert rh.allows(b"x@a.b.c.net")
    assert not rh.allows(b"x@net")
    # An empty entry (from a NUL) never matches: candidates are never empty.
    assert not Rcpthosts([b""]).allows(b"x@")
    # Odd domains: candidates start at every dot, including a leading one.
    assert Rcpthosts([b"..b"]).allows(b"x@a..b")
    assert Rcpthosts([b"."]).allows(b"x@trailing.")
    assert not Rcpthosts([b"."]).allows(b"x@notrailing")


class RecordingCdb:
    def __init__(self, keys=(), fail=None):
        self.keys = set(keys)
        self.lookups = []
        self.fail = fail
        self.path = b"control/morercpthosts.cdb"

    def __contains__(self, key):
        self.lookups.append(key)
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        return key in self.keys

    def close(self):
        pass


def test_candidates_order_and_cdb_only_after_rcpthosts():
    db = RecordingCdb({b".b.example"})
    rh = Rcpthosts([b"example.org", b".example"], db)
    assert rh.allows(b"x@A.B.example")
    assert db.lookups == []
    rh = Rcpthosts([b"example.org"], db)
    assert rh.allows(b"x@A.B.example")
    assert db.lookups == [b"a.b.example", b".b.example"]
    db.lookups.clear()
    assert not rh.allows(b"x@c.d.Other")
    assert db.lookups == [b"c.d.other", b".d.other", b".other"]
    db.lookups.clear()
    assert not rh.allows(b"x@")
    assert rh.allows(b"noat")
    assert db.lookups == []


def test_cdb_error_is_control_error_at_lookup():
    rh = Rcpthosts([b"example.org"], RecordingCdb(fail=errno.EIO))
    assert rh.allows(b"x@example.org")
    with pytest.raises(ControlError) as ei:
        rh.allows(b"x@far.example")
    assert ei.value.errno == errno.EIO
    assert ei.value.path == b"control/morercpthosts.cdb"


def test_cdb_ignored_without_rcpthosts():
    db = RecordingCdb(fail=errno.EIO)
    assert Rcpthosts(None, db).allows(b"x@far.example")
    assert db.lookups == []


@pytest.mark.parametrize("maker", CDB_MAKERS)
def test_morercpthosts_row_22(home, maker):
    put("control/rcpthosts", F_RCPTHOSTS)
    maker("control/morercpthosts.cdb", [b"more.example", b".dot.example", b"Upper.example"])
    rh = Rcpthosts.load()
    assert rh.allows(b"x@MORE.example")
    assert rh.allows(b"x@more.example")
    assert not rh.allows(b"x@a.more.example")
    assert not rh.allows(b"x@example")
    assert rh.allows(b"x@a.dot.example")
    assert rh.allows(b"x@b.a.DOT.example")
    assert not rh.allows(b"x@dot.example")
    # Keys are exact bytes and the domain is lowercased first, so an
    # uppercase key can never match (qmail-newmrh writes lowercase).
    assert not rh.allows(b"x@Upper.example")
    assert not rh.allows(b"x@upper.example")
    # rcpthosts still works alongside.
    assert rh.allows(b"x@example.org")
    assert not rh.allows(b"x@sub.example.org")
    rh.close()


@pytest.mark.parametrize("maker", CDB_MAKERS)
def test_morercpthosts_many_keys(home, maker):
    put("control/rcpthosts", b"")
    keys = [b"host%d.example" % i for i in range(3000)]
    maker("control/morercpthosts.cdb", keys)
    rh = Rcpthosts.load()
    for i in range(0, 3000, 37):
        assert rh.allows(b"x@HOST%d.example" % i)
    assert not rh.allows(b"x@host3000.example")


def test_morercpthosts_directory_row_23(home):
    put("control/rcpthosts", F_RCPTHOSTS)
    os.mkdir("control/morercpthosts.cdb")
    rh = Rcpthosts.load()
    assert rh.allows(b"x@example.org")
    assert rh.allows(b"noat")
    with pytest.raises(ControlError) as ei:
        rh.allows(b"x@far.example")
    assert ei.value.errno == errno.EISDIR
    assert ei.value.path == b"control/morercpthosts.cdb"


def test_morercpthosts_truncated(home):
    put("control/rcpthosts", F_RCPTHOSTS)
    put("control/morercpthosts.cdb", b"\0" * 100)
    rh = Rcpthosts.load()
    with pytest.raises(ControlError) as ei:
        rh.allows(b"x@far.example")
    assert ei.value.errno == errno.EPROTO


def test_morercpthosts_absent(home):
    put("control/rcpthosts", F_RCPTHOSTS)
    rh = Rcpthosts.load()
    assert not rh.allows(b"x@far.example")


def test_morercpthosts_not_opened_without_rcpthosts(home):
    os.symlink("morercpthosts.cdb", "control/morercpthosts.cdb")
    assert Rcpthosts.load().allows(b"x@far.example")
    put("control/rcpthosts", F_RCPTHOSTS)
    with pytest.raises(ControlError) as ei:
        Rcpthosts.load()
    assert ei.value.errno == errno.ELOOP
    assert ei.value.path == b"control/morercpthosts.cdb"


def test_rcpthosts_unreadable(home):
    os.mkdir("control/rcpthosts")
    with pytest.raises(ControlError) as ei:
        Rcpthosts.load()
    assert ei.value.path == b"control/rcpthosts"
    assert ei.value.errno == errno.EISDIR


# ---- badmailfrom ----

def test_badmailfrom_row_18(home):
    put("control/badmailfrom", b"bad@Evil.com\n")
    bmf = Badmailfrom.load()
    assert bmf.present
    assert bmf.flags(b"BAD@evil.COM")
    assert not bmf.flags(b"bad@evil.com.")
    assert not bmf.flags(b"xbad@evil.com")
    assert not bmf.flags(b"")


def test_badmailfrom_row_19(home):
    put("control/badmailfrom", b"@spam.example\n  x@y\n")
    bmf = Badmailfrom.load()
    assert not bmf.flags(b"u@sub.spam.example")
    assert bmf.flags(b"u@SPAM.example")
    assert bmf.flags(b"@spam.example")
    assert not bmf.flags(b"x@y")
    assert not bmf.flags(b"  x@y" + b"z")
    assert bmf.flags(b"  x@y")


def test_badmailfrom_last_at():
    bmf = Badmailfrom([b"@c", b"@b@c", b"noat", b"x@", b"a@b@d"])
    assert bmf.flags(b"a@b@c")
    assert bmf.flags(b"z@b@c")
    assert bmf.flags(b"a@b@d")
    assert not bmf.flags(b"z@b@d")
    assert bmf.flags(b"NOAT")
    assert not bmf.flags(b"x@noat")
    assert bmf.flags(b"x@")
    assert not bmf.flags(b"y@")
    assert Badmailfrom([b"@"]).flags(b"y@")


def test_badmailfrom_absent_and_empty(home):
    bmf = Badmailfrom.load()
    assert not bmf.present
    assert not bmf.flags(b"a@b")
    assert not bmf.flags(b"")
    put("control/badmailfrom", b"\n# comment\n   \n")
    bmf = Badmailfrom.load()
    assert bmf.present
    assert not bmf.flags(b"")
    assert not bmf.flags(b"a@b")


def test_badmailfrom_comments_and_crlf(home):
    put("control/badmailfrom", b"#a@b\nc@d\r\ne@f \t\n")
    bmf = Badmailfrom.load()
    assert not bmf.flags(b"#a@b")
    assert not bmf.flags(b"a@b")
    assert not bmf.flags(b"c@d")
    assert bmf.flags(b"c@d\r")
    assert bmf.flags(b"e@f")


def test_badmailfrom_nul_gives_empty_entry(home):
    # netqmail looks the null sender up like any other; only an empty entry,
    # which only a NUL in the file can produce, matches it.
    put("control/badmailfrom", b"a@b\0\n")
    bmf = Badmailfrom.load()
    assert bmf.flags(b"a@b")
    assert bmf.flags(b"")


def test_badmailfrom_unreadable(home):
    os.mkdir("control/badmailfrom")
    with pytest.raises(ControlError):
        Badmailfrom.load()


# ---- local IPv4 addresses ----

def fib_trie_local_hosts():
    try:
        with open("/proc/net/fib_trie", "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    found = set()
    for prev, line in zip(lines, lines[1:]):
        if line.strip() == b"/32 host LOCAL":
            found.add(prev.split()[-1])
    return found


@pytest.fixture
def fresh_ips(monkeypatch):
    monkeypatch.setattr(control, "_local_ips", None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux interface listing")
def test_local_addresses(fresh_ips):
    ips = local_ipv4_addresses()
    assert b"0.0.0.0" in ips
    for ip in ips:
        parts = ip.split(b".")
        assert len(parts) == 4
        assert all(p.isdigit() and b"%d" % int(p) == p and int(p) < 256 for p in parts)
    expected = fib_trie_local_hosts()
    if expected is not None:
        assert expected <= ips
    assert local_ipv4(b"0.0.0.0")
    assert is_local_ip is local_ipv4
    assert not local_ipv4(b"255.255.255.255")
    assert not local_ipv4(b"127.0.0.01")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux interface listing")
def test_local_addresses_in_parse(fresh_ips):
    ips = local_ipv4_addresses()
    assert parse(b"<x@[0.0.0.0]>", b"mx.example.org", local_ipv4) == b"x@mx.example.org"
    if b"127.0.0.1" in ips:
        assert parse(b"<x@[127.0.0.257]>", b"mx.example.org", local_ipv4) == b"x@mx.example.org"
    if b"192.0.2.99" not in ips:
        assert parse(b"<x@[192.0.2.99]>", b"mx.example.org", local_ipv4) == b"x@[192.0.2.99]"


def test_local_addresses_listed_once(fresh_ips, monkeypatch):
    calls = []

    def fake():
        calls.append(1)
        return frozenset({b"0.0.0.0", b"10.0.0.1"})
    monkeypatch.setattr(control, "_list_interfaces", fake)
    assert local_ipv4(b"10.0.0.1")
    assert not local_ipv4(b"10.0.0.2")
    assert local_ipv4_addresses() == {b"0.0.0.0", b"10.0.0.1"}
    assert calls == [1]


def test_local_addresses_failure_not_cached(fresh_ips, monkeypatch):
    calls = []

    def broken():
        calls.append(1)
        raise NoLocalIPs("nope")
    monkeypatch.setattr(control, "_list_interfaces", broken)
    with pytest.raises(NoLocalIPs):
        local_ipv4(b"0.0.0.0")
    with pytest.raises(NoLocalIPs):
        parse(b"<x@[127.0.0.1]>", b"mx", local_ipv4)
    assert calls == [1, 1]
    # No literal, or no localiphost: the list is never needed.
    assert parse(b"<x@example.org>", b"mx", local_ipv4) == b"x@example.org"
    assert parse(b"<x@[127.0.0.1]>", None, local_ipv4) == b"x@[127.0.0.1]"
    assert calls == [1, 1]


def test_unsupported_platform(fresh_ips, monkeypatch):
    monkeypatch.setattr(sys, "platform", "plan9")
    with pytest.raises(NoLocalIPs):
        local_ipv4_addresses()


def test_exceptions_are_distinct():
    assert not issubclass(ControlError, OSError)
    assert not issubclass(NoLocalIPs, ControlError)
    assert not issubclass(ControlError, NoLocalIPs)
