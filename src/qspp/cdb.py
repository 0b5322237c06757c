"""Reader for djb's constant database, as qmail-smtpd uses morercpthosts.cdb.

Lookups read only the few bytes they need with pread, so a large cdb costs
nothing at connection start.  Every read failure, including a file that ends
too early, is an OSError: qmail-smtpd treats a damaged cdb exactly like an
unreadable one (fatal 421 at the RCPT that touched it).
"""


import errno
import posix

HEADER_SIZE = 2048
_MASK32 = 0xFFFFFFFF


def cdb_hash(key: bytes) -> int:
    h = 5381
    for c in key:
        h = ((h * 33) & _MASK32) ^ c
    return h


def _u32(b: bytes, at: int = 0) -> int:
    return int.from_bytes(b[at:at + 4], "little")


class Cdb:
    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path) -> "Cdb | None":
        # O_NONBLOCK as qmail's open_read: a FIFO must not hang the connection.
        # posix.open (unlike open()) accepts a directory; qmail only notices that
        # at the first lookup, and so must we.
        try:
            fd = posix.open(path, posix.O_RDONLY | posix.O_NONBLOCK)
        except FileNotFoundError:
            return None
        return cls(fd, path)

    def _read_upto(self, size: int, offset: int) -> bytes:
        if self.fd < 0:
            raise OSError(errno.EBADF, posix.strerror(errno.EBADF), self.path)
        chunks = []
        while size > 0:
            chunk = posix.pread(self.fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read(self, size: int, offset: int) -> bytes:
        data = self._read_upto(size, offset)
        if len(data) < size:
            # cdb_bread reports a premature end as error_proto.
            raise OSError(errno.EPROTO, "truncated cdb", self.path)
        return data

    def _key_matches(self, key: bytes, offset: int) -> bool:
        stored = self._read_upto(len(key), offset)
        if len(stored) == len(key):
            return stored == key
        # A key cut off by the end of the file: cdb's match() reads and
        # compares 32 bytes at a time, so a difference inside a complete
        # chunk means "not this record" and only reaching the gap is an error.
        for i in range(len(stored)):
            if stored[i] != key[i]:
                chunk_end = min(i - i % 32 + 32, len(key))
                if chunk_end <= len(stored):
                    return False
                break
        raise OSError(errno.EPROTO, "truncated cdb", self.path)

    def find(self, key: bytes) -> "tuple[int, int] | None":
        """(data offset, data length) of the first record for key, or None."""
        h = cdb_hash(key)
        head = self._read(8, (h & 255) * 8)
        pos = _u32(head)
        nslots = _u32(head, 4)
        if not nslots:
            return None
        slot = (h >> 8) % nslots
        klen = len(key)
        for _ in range(nslots):
            # cdb_seek computes the slot offset in 32-bit arithmetic.
            entry = self._read(8, (pos + 8 * slot) & _MASK32)
            recpos = _u32(entry, 4)
            if not recpos:
                return None
            if _u32(entry) == h:
                rec = self._read(8, recpos)
                if _u32(rec) == klen:
                    # Read the key only after its length matched, as cdb_seek
                    # does: a mismatching record's key may lie past the end.
                    if self._key_matches(key, recpos + 8):
                        return recpos + 8 + klen, _u32(rec, 4)
            slot += 1
            if slot == nslots:
                slot = 0
        return None

    def get(self, key: bytes) -> "bytes | None":
        found = self.find(key)
        if found is None:
            return None
        offset, dlen = found
        return self._read(dlen, offset)

    def __contains__(self, key: bytes) -> bool:
        return self.find(key) is not None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            posix.close(fd)

    def __enter__(self) -> "Cdb":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make(path, items) -> None:
    """Write a cdb of (key, data) pairs in order; for tests and fixtures."""
    records = bytearray()
    tables: "list[list[tuple[int, int]]]" = [[] for _ in range(256)]
    pos = HEADER_SIZE
    for key, data in items:
        key = bytes(key)
        data = bytes(data)
        h = cdb_hash(key)
        tables[h & 255].append((h, pos))
        records += len(key).to_bytes(4, "little") + len(data).to_bytes(4, "little")
        records += key + data
        pos += 8 + len(key) + len(data)
    header = bytearray()
    slots_out = bytearray()
    for entries in tables:
        nslots = 2 * len(entries)
        header += (pos + len(slots_out)).to_bytes(4, "little") + nslots.to_bytes(4, "little")
        slots = [(0, 0)] * nslots
        for h, recpos in entries:
            i = (h >> 8) % nslots
            while slots[i][1]:
                i = (i + 1) % nslots
            slots[i] = (h, recpos)
        for h, recpos in slots:
            slots_out += h.to_bytes(4, "little") + recpos.to_bytes(4, "little")
    if pos + len(slots_out) > _MASK32 + 1:
        raise ValueError("cdb too large")
    with open(path, "wb") as f:
        f.write(bytes(header) + bytes(records) + bytes(slots_out))
