"""What a milter asks to change at end of message, and carrying it out.

Kept out of qspp.milter, which every connection with milters imports (under
tcpserver, each connection is a new interpreter): most messages come back
unchanged, and only one a milter changes pays for this module.
"""

import posix

from .diag import log
from .milter import MilterError, _field_name, _n, strings

MAX_EDITED_HEADERS = 4 << 20  # headers after the milters' additions
MAX_EDITS = 16 << 20  # one milter's changes, a replaced body aside
MAX_BODY = 1 << 30  # a replaced body (on disk)


class Edits:
    """One milter's changes, held until its verdict.  A replacement body goes
    straight to a temp file (LF line ends), so a milter rewriting a 50 MB
    body costs no memory; the rest is capped."""

    def __init__(self):
        self.items = []
        self.size = 0
        self.body_fd = -1
        self.body_size = 0
        self._carry = b""

    def add(self, cmd: bytes, data: bytes) -> None:
        if cmd == b"b":
            if self.body_fd < 0:
                self.body_fd = _temp_file()
            self.body_size += len(data)
            if self.body_size > MAX_BODY:
                raise MilterError("replaced body over 1 GiB")
            data = self._carry + data
            self._carry = b""
            if data[-1:] == b"\r":
                self._carry, data = b"\r", data[:-1]
            _write_all(self.body_fd, data.replace(b"\r\n", b"\n"))
            return
        self.size += len(data)
        if self.size > MAX_EDITS:
            raise MilterError("changes over 16 MiB")
        self.items.append((cmd, data))

    def finish(self) -> None:
        if self._carry:
            _write_all(self.body_fd, self._carry)
            self._carry = b""

    def close(self) -> None:
        if self.body_fd >= 0:
            posix.close(self.body_fd)
            self.body_fd = -1


def apply(draft, edits: Edits) -> None:
    """One milter's changes to DRAFT (a milter.Draft), once its verdict lets
    them through."""
    for cmd, data in edits.items:
        _EDITS[cmd](draft, data)
    if edits.body_fd >= 0:
        if draft.body_fd >= 0:
            posix.close(draft.body_fd)
        draft.body_fd, edits.body_fd = edits.body_fd, -1
        draft.edited = True
    if sum(len(h) for h in draft.headers) > MAX_EDITED_HEADERS:
        raise MilterError("headers over 4 MiB after changes")


def make_field(name: bytes, value: bytes) -> bytes:
    value = value.replace(b"\r\n", b"\n").replace(b"\r", b"")
    return name + b": " + value + b"\n"


def _add(draft, data):
    name, value = (strings(data) + [b""])[:2]
    draft.headers.append(make_field(name, value))
    draft.edited = True


def _insert(draft, data):
    index = _n(data[:4])
    name, value = (strings(data[4:]) + [b""])[:2]
    draft.headers.insert(min(index, len(draft.headers)), make_field(name, value))
    draft.edited = True


def _change(draft, data):
    index = _n(data[:4])
    name, value = (strings(data[4:]) + [b""])[:2]
    lname = name.lower()
    seen = 0
    for i, raw in enumerate(draft.headers):
        if (_field_name(raw) or b"").lower() == lname:
            seen += 1
            if seen == max(index, 1):
                if value:
                    draft.headers[i] = make_field(name, value)
                else:
                    del draft.headers[i]
                draft.edited = True
                return
    if value:
        draft.headers.append(make_field(name, value))
        draft.edited = True


def _addrcpt(draft, data):
    address = _unbracket(strings(data)[0])
    draft.recipients.append((address, address))


def _delrcpt(draft, data):
    address = _unbracket(strings(data)[0]).lower()
    draft.recipients = [r for r in draft.recipients if r[0].lower() != address]


def _chgfrom(draft, data):
    draft.sender = _unbracket(strings(data)[0])


def _quarantine(draft, data):
    reason = strings(data)[0]
    log(b"milter quarantine: " + reason)
    draft.headers.append(make_field(b"X-Qspp-Quarantine", reason))
    draft.edited = True


# a replaced body (b) never reaches apply's loop: Edits.add keeps it on disk
_EDITS = {b"h": _add, b"i": _insert, b"m": _change, b"+": _addrcpt, b"2": _addrcpt,
          b"-": _delrcpt, b"e": _chgfrom, b"q": _quarantine}


def _unbracket(address: bytes) -> bytes:
    if address[:1] == b"<" and address[-1:] == b">":
        return address[1:-1]
    return address


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view):]


_temp_counter = 0


def _temp_file() -> int:
    global _temp_counter
    _temp_counter += 1
    tmpdir = posix.environ.get(b"TMPDIR") or b"/tmp"
    name = b"%s/qspp-milter.%d.%d.%s" % (tmpdir, posix.getpid(), _temp_counter,
                                          posix.urandom(6).hex().encode())
    fd = posix.open(name, posix.O_RDWR | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC, 0o600)
    posix.unlink(name)
    return fd
