import errno
import os
import shutil
import subprocess

import pytest

from qspp.cdb import Cdb, cdb_hash, make

CDB_TOOL = shutil.which("cdb")
needs_tool = pytest.mark.skipif(CDB_TOOL is None, reason="tinycdb's cdb tool not installed")


def tool_make(path, items):
    # tinycdb's input format is the one cdbmake reads: +klen,dlen:key->data
    # per record, then an empty line.
    src = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(d), k, d) for k, d in items) + b"\n"
    subprocess.run([CDB_TOOL, "-c", str(path)], input=src, check=True)


def tool_query(path, key):
    r = subprocess.run([CDB_TOOL, "-q", str(path), key], capture_output=True)
    return r.stdout if r.returncode == 0 else None


def colliding_pair():
    # Two different keys of one length with the same full 32-bit hash force
    # the reader past an equal-hash record whose key differs.
    seen = {}
    for a in range(256):
        for b in range(256):
            k = bytes((a, b))
            h = cdb_hash(k)
            if h in seen:
                return seen[h], k
            seen[h] = k
    raise AssertionError("no collision")


MANY = [(b"key%d.example" % i, b"data%d" % i) for i in range(1500)]


def test_hash_values():
    assert cdb_hash(b"") == 5381
    assert cdb_hash(b"a") == ((5381 * 33) & 0xFFFFFFFF) ^ 0x61
    # Bytes above 0x7f are unsigned, and the product wraps at 32 bits.
    h = 5381
    for c in b"\xff\x80" * 20:
        h = ((h * 33) % 2**32) ^ c
    assert cdb_hash(b"\xff\x80" * 20) == h


def test_open_missing_is_none(tmp_path):
    assert Cdb.open(str(tmp_path / "nope.cdb")) is None


def test_open_in_missing_directory_is_none(tmp_path):
    assert Cdb.open(str(tmp_path / "nodir" / "nope.cdb")) is None


def test_open_other_error_raises(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(OSError) as ei:
        Cdb.open(str(f / "x.cdb"))
    assert ei.value.errno == errno.ENOTDIR


def test_directory_opens_and_fails_at_lookup(tmp_path):
    d = tmp_path / "dir.cdb"
    d.mkdir()
    db = Cdb.open(str(d))
    assert db is not None
    with pytest.raises(OSError) as ei:
        b"x" in db
    assert ei.value.errno == errno.EISDIR
    db.close()


def test_empty_file_is_read_error(tmp_path):
    f = tmp_path / "empty.cdb"
    f.write_bytes(b"")
    with Cdb.open(str(f)) as db:
        with pytest.raises(OSError) as ei:
            db.get(b"x")
        assert ei.value.errno == errno.EPROTO


def test_short_header_is_read_error(tmp_path):
    f = tmp_path / "short.cdb"
    make(str(f), [(b"a", b"1")])
    whole = f.read_bytes()
    # Key b"a" hashes to a table late in the header; cut inside that entry.
    t = cdb_hash(b"a") & 255
    f.write_bytes(whole[: t * 8 + 4])
    with Cdb.open(str(f)) as db:
        with pytest.raises(OSError):
            db.get(b"a")


def test_record_past_end_is_read_error(tmp_path):
    f = tmp_path / "bad.cdb"
    h = cdb_hash(b"k")
    header = bytearray(2048)
    header[(h & 255) * 8:(h & 255) * 8 + 8] = (2048).to_bytes(4, "little") + (1).to_bytes(4, "little")
    slot = h.to_bytes(4, "little") + (5000).to_bytes(4, "little")
    f.write_bytes(bytes(header) + slot)
    with Cdb.open(str(f)) as db:
        with pytest.raises(OSError):
            b"k" in db


def test_key_length_mismatch_skips_key_read(tmp_path):
    # The record's key bytes lie past the end, but its length differs from
    # the looked-up key's, so (as cdb_seek) the key is never read.
    f = tmp_path / "lenmismatch.cdb"
    h = cdb_hash(b"k")
    header = bytearray(2048)
    header[(h & 255) * 8:(h & 255) * 8 + 8] = (2048).to_bytes(4, "little") + (1).to_bytes(4, "little")
    slot = h.to_bytes(4, "little") + (2056).to_bytes(4, "little")
    record = (7).to_bytes(4, "little") + (0).to_bytes(4, "little")
    f.write_bytes(bytes(header) + slot + record)
    with Cdb.open(str(f)) as db:
        assert db.get(b"k") is None


def key_cut_off(path, key, stored_key, keep):
    # One record whose slot hash equals key's but whose stored key (of the
    # same length) is stored_key, with the file ending after keep key bytes.
    h = cdb_hash(key)
    header = bytearray(2048)
    header[(h & 255) * 8:(h & 255) * 8 + 8] = (2048).to_bytes(4, "little") + (1).to_bytes(4, "little")
    slot = h.to_bytes(4, "little") + (2056).to_bytes(4, "little")
    record = len(stored_key).to_bytes(4, "little") + (0).to_bytes(4, "little") + stored_key[:keep]
    path.write_bytes(bytes(header) + slot + record)


def test_cut_off_key_differing_in_complete_chunk_is_absent(tmp_path):
    # cdb's match() compares 32 bytes at a time and stops at a difference.
    key = b"k" * 70
    f = tmp_path / "cut.cdb"
    key_cut_off(f, key, b"x" + key[1:], 40)
    with Cdb.open(str(f)) as db:
        assert db.get(key) is None
    key_cut_off(f, key, key[:31] + b"x" + key[32:], 32)
    with Cdb.open(str(f)) as db:
        assert db.get(key) is None


@pytest.mark.parametrize("stored, keep", [
    (b"k" * 70, 40),
    (b"k" * 35 + b"x" + b"k" * 34, 40),
    (b"k" * 31 + b"x" + b"k" * 38, 31),
    (b"k" * 70, 0),
])
def test_cut_off_key_reaching_gap_is_read_error(tmp_path, stored, keep):
    f = tmp_path / "cut.cdb"
    key_cut_off(f, b"k" * 70, stored, keep)
    with Cdb.open(str(f)) as db:
        with pytest.raises(OSError) as ei:
            db.get(b"k" * 70)
        assert ei.value.errno == errno.EPROTO


def test_truncated_data_is_read_error(tmp_path):
    f = tmp_path / "trunc.cdb"
    make(str(f), [(b"key", b"0123456789")])
    whole = f.read_bytes()
    # Move the record's data length past the end of the file.
    i = whole.index(b"key") - 4
    f.write_bytes(whole[:i] + (10**6).to_bytes(4, "little") + whole[i + 4:])
    with Cdb.open(str(f)) as db:
        assert b"key" in db
        with pytest.raises(OSError):
            db.get(b"key")


def test_empty_tables(tmp_path):
    f = tmp_path / "none.cdb"
    make(str(f), [])
    assert len(f.read_bytes()) == 2048
    with Cdb.open(str(f)) as db:
        assert db.get(b"") is None
        assert b"anything" not in db


def test_close_is_idempotent_and_lookups_fail_after(tmp_path):
    f = tmp_path / "c.cdb"
    make(str(f), [(b"a", b"b")])
    db = Cdb.open(str(f))
    db.close()
    db.close()
    with pytest.raises(OSError):
        db.get(b"a")


def check_contents(db, items):
    for k, d in items:
        assert db.get(k) == d
        assert k in db
    for k in (b"nokey", b"key1500.example", b"KEY1.example", b"key1.example ", b"ey1.example"):
        assert db.get(k) is None
        assert k not in db


def test_own_writer_roundtrip(tmp_path):
    f = tmp_path / "own.cdb"
    items = MANY + [(b"", b"empty key"), (b"empty data", b""), (bytes(range(256)), bytes(range(255, -1, -1)))]
    make(str(f), items)
    with Cdb.open(str(f)) as db:
        check_contents(db, items)


def test_duplicate_keys_first_wins(tmp_path):
    f = tmp_path / "dup.cdb"
    make(str(f), [(b"k", b"first"), (b"k", b"second")])
    with Cdb.open(str(f)) as db:
        assert db.get(b"k") == b"first"


def test_equal_hash_different_key(tmp_path):
    k1, k2 = colliding_pair()
    assert cdb_hash(k1) == cdb_hash(k2) and k1 != k2 and len(k1) == len(k2)
    f = tmp_path / "coll.cdb"
    make(str(f), [(k1, b"one")])
    with Cdb.open(str(f)) as db:
        assert db.get(k1) == b"one"
        assert db.get(k2) is None
    make(str(f), [(k1, b"one"), (k2, b"two")])
    with Cdb.open(str(f)) as db:
        assert db.get(k1) == b"one"
        assert db.get(k2) == b"two"


def test_path_bytes_accepted(tmp_path):
    f = tmp_path / "b.cdb"
    make(str(f), [(b"a", b"b")])
    with Cdb.open(os.fsencode(str(f))) as db:
        assert db.get(b"a") == b"b"


def test_large_read_loops(tmp_path):
    f = tmp_path / "big.cdb"
    big = bytes(range(256)) * 4096
    make(str(f), [(b"big", big)])
    with Cdb.open(str(f)) as db:
        assert db.get(b"big") == big


@needs_tool
def test_reads_tool_made_cdb(tmp_path):
    f = tmp_path / "tool.cdb"
    items = MANY + [(b"", b"empty key"), (b"empty data", b""), (b"more.example", b""),
                    (bytes(range(1, 256)), b"\x00\xff\n->"), (b"a:b->c", b"+1,2:x")]
    tool_make(f, items)
    with Cdb.open(str(f)) as db:
        check_contents(db, items)


@needs_tool
def test_reads_tool_made_colliding_keys(tmp_path):
    k1, k2 = colliding_pair()
    f = tmp_path / "tool-coll.cdb"
    tool_make(f, [(k1, b"one"), (k2, b"two")])
    with Cdb.open(str(f)) as db:
        assert db.get(k1) == b"one"
        assert db.get(k2) == b"two"


@needs_tool
def test_tool_reads_own_writer(tmp_path):
    f = tmp_path / "own-for-tool.cdb"
    make(str(f), MANY[:200])
    for k, d in MANY[:200:7]:
        assert tool_query(f, k) == d
    assert tool_query(f, b"absent") is None


@needs_tool
def test_tool_made_empty_cdb(tmp_path):
    f = tmp_path / "tool-empty.cdb"
    tool_make(f, [])
    with Cdb.open(str(f)) as db:
        assert b"x" not in db
        assert db.get(b"") is None

