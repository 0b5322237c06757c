"""Sans-IO reader for the bytes after `354 go ahead` (spec §6.2-6.4).

Every `\\n` must follow a `\\r`, so the raw stream is a sequence of lines ending in
`\\r\\n`.  On such a line netqmail's byte machine reduces to: `\\r\\n` becomes `\\n`,
other `\\r` stay; a line that is exactly `.` ends the message; a line starting with
`.\\r` is kept whole; any other leading `.` is dropped.  That lets whole blocks of
complete lines be converted with a few C-level bytes operations instead of a loop
per byte.  Only a partial line is carried between feeds, and only its first few
bytes (or one held `\\r`), so memory stays small whatever the line length.
"""

_CRLF = b"\r\n"
_END_MID = b"\r\n.\r\n"
_LF_DOT = b"\n."
_LF_DOT_CR = b"\n.\r"
_HOP_LIMIT = 100
# A partial line at line start is carried until its head can be judged: nine bytes
# for `delivered` while in the header, three for `.\r` + a byte in the body.
_HEAD_HDR = 9
_HEAD_BODY = 3


def _unstuff(s):
    """Drop the leading dot of every line of converted text except `.\\r` lines.

    `s` starts at a line start.  Converted text never holds a lone `.` line (that
    was the end), so every `\\n.` not followed by `\\r` is a stuffed dot.
    """
    if s[:1] == b"." and s[1:2] != b"\r":
        s = s[1:]
    if s.find(_LF_DOT) < 0:  # cheaper than `in` (spawn.py)
        return s
    if s.find(_LF_DOT_CR) < 0:
        return s.replace(_LF_DOT, b"\n")
    # Splitting at the kept `.\r` lines leaves only stuffed dots inside the parts.
    return _LF_DOT_CR.join([p.replace(_LF_DOT, b"\n") for p in s.split(_LF_DOT_CR)])


class MessageReader:
    """Feed raw client bytes; collect what qmail-queue gets on fd 0.

    Attributes: `done` (the terminating `.` line was consumed), `bare_lf` (a `\\n`
    not right after `\\r`: fatal, nothing more is consumed), `too_many_hops`,
    `too_big`, `size` (stored bytes so far), `hops`.  Output accumulates in `out`
    (a list of bytes) and is drained with `take()`; it stops growing once the
    message is aborted, because the queue will get no envelope anyway.
    """

    __slots__ = ("databytes", "done", "bare_lf", "too_many_hops", "too_big",
                 "size", "hops", "out", "_carry", "_mid", "_hdr")

    def __init__(self, databytes=0):
        self.databytes = databytes
        self.done = False
        self.bare_lf = False
        self.too_many_hops = False
        self.too_big = False
        self.size = 0
        self.hops = 0
        self.out = []
        # Bytes already consumed but not yet judged: the head of a short partial
        # line, or the `\r` that may turn out to be half of `\r\n`.
        self._carry = b""
        # True inside a line whose head has been judged.
        self._mid = False
        self._hdr = True

    def take(self):
        """Return and forget the converted bytes produced so far."""
        out = self.out
        if not out:
            return b""
        self.out = []
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _emit(self, chunk):
        if not chunk or self.too_big or self.too_many_hops:
            return
        self.size += len(chunk)
        if self.databytes and self.size > self.databytes:
            self.too_big = True
            return
        self.out.append(chunk)

    def _fail_lf(self, data, p, base):
        """Mark a bare LF found at or after `p`; return bytes consumed from the feed."""
        self.bare_lf = True
        self._carry = b""
        i = data.find(b"\n", p)
        while i > 0 and data[i - 1] == 13:
            i = data.find(b"\n", i + 1)
        return max(i + 1 - base, 0)

    def feed(self, buf):
        """Consume from the start of `buf`; return how many bytes were consumed.

        Stops right after the terminating `.\\r\\n`; what follows is the next
        command.  Consumes nothing once `done` or `bare_lf` is set.
        """
        if self.done or self.bare_lf or not buf:
            return 0
        base = len(self._carry)
        data = self._carry + buf if base else bytes(buf)
        self._carry = b""
        n = len(data)
        p = 0
        while p < n:
            if self._mid:
                i = data.find(b"\n", p)
                if i < 0:
                    end = n - 1 if data[n - 1] == 13 else n
                    self._emit(data[p:end])
                    self._carry = data[end:]
                    return n - base
                if i == 0 or data[i - 1] != 13:
                    return self._fail_lf(data, p, base)
                self._emit(data[p:i - 1])
                self._emit(b"\n")
                self._mid = False
                p = i + 1
                continue

            # Line start.  First every complete line up to the last LF, in one go.
            q = data.rfind(b"\n", p) + 1
            if q > p:
                # Both the end and a stuffed dot need a line starting with `.`;
                # most blocks have none, which one search settles.
                if data[p] == 46:
                    d = p
                else:
                    d = data.find(_LF_DOT, p, q) + 1 or -1
                e, stop = q, 0
                if d >= 0:
                    if data.startswith(b".\r\n", p):
                        e, stop = p, p + 3
                    else:
                        k = data.find(_END_MID, max(p, d - 2), q)
                        if k >= 0:
                            e, stop = k + 2, k + 5
                s = data[p:e].replace(_CRLF, b"\n")
                # Every LF must have come from a CRLF.
                if data.count(b"\n", p, e) != e - p - len(s):
                    return self._fail_lf(data, p, base)
                if self._hdr:
                    self._count_header(data, p, e)
                if s and not (self.too_big or self.too_many_hops):
                    self._emit(_unstuff(s) if 0 <= d < e else s)
                if stop:
                    self.done = True
                    return stop - base
                p = q
                if p == n:
                    break

            # A partial line remains: judge its head once enough of it is here.
            if n - p < (_HEAD_HDR if self._hdr else _HEAD_BODY):
                self._carry = data[p:]
                return n - base
            if self._hdr:
                head = data[p:p + 9].lower()
                if head.startswith(b"received") or head == b"delivered":
                    self._hop(1)
            start = p
            if data[p] == 46 and data[p + 1] != 13:
                start = p + 1
            end = n - 1 if data[n - 1] == 13 else n
            self._emit(data[start:end])
            self._carry = data[end:]
            self._mid = True
            return n - base
        return n - base

    def _count_header(self, data, p, e):
        """Count hop lines among the complete raw lines data[p:e], ending the header
        at the first empty line."""
        if data.startswith(_CRLF, p):
            h = p
        else:
            k = data.find(b"\n\r\n", p, e)
            h = k + 1 if k >= 0 else e
        if h < e:
            self._hdr = False
        if h == p:
            return
        low = data[p:h].lower()
        c = low.count(b"\nreceived") + low.count(b"\ndelivered")
        if low.startswith(b"received") or low.startswith(b"delivered"):
            c += 1
        if c:
            self._hop(c)

    def _hop(self, c):
        self.hops += c
        if self.hops >= _HOP_LIMIT:
            self.too_many_hops = True
