"""MAIL/RCPT address parsing, byte for byte as netqmail's addrparse().

qmail never validates an address; it only strips the envelope syntax it
recognises.  The rules here are therefore deliberately permissive and must not
be "improved": every quirk is visible to clients and in the queue envelope.
"""


MAX_ADDRESS = 899

_LT = 0x3C
_GT = 0x3E
_COLON = 0x3A
_SPACE = 0x20
_AT = 0x40
_BACKSLASH = 0x5C
_QUOTE = 0x22


def addrparse(arg: bytes) -> bytes:
    # qmail works on C strings; the session already cuts lines at NUL, but an
    # embedded NUL must end the argument whoever calls us.
    nul = arg.find(b"\0")
    if nul >= 0:
        arg = arg[:nul]
    n = len(arg)

    i = arg.find(b"<")
    if i >= 0:
        pos = i + 1
        terminator = _GT
    else:
        terminator = _SPACE
        i = arg.find(b":")
        pos = n if i < 0 else i + 1
        while pos < n and arg[pos] == _SPACE:
            pos += 1

    if pos < n and arg[pos] == _AT:
        i = arg.find(b":", pos)
        pos = n if i < 0 else i + 1

    # Fast path: nothing to unescape or unquote.
    if arg.find(b"\\", pos) < 0 and arg.find(b'"', pos) < 0:
        end = arg.find(bytes((terminator,)), pos)
        return arg[pos:] if end < 0 else arg[pos:end]

    return _copy(arg, pos, terminator)


def _copy(arg: bytes, pos: int, terminator: int) -> bytes:
    # Jump between special bytes instead of looping per byte: an argument may
    # be 64 KiB.  Each cached position is recomputed only once passed, so the
    # scan stays linear however many quotes or escapes there are.
    n = len(arg)
    term = bytes((terminator,))
    out = []
    quoted = False
    next_bs = next_q = next_t = -1
    while pos < n:
        if next_bs < pos:
            next_bs = arg.find(b"\\", pos)
            if next_bs < 0:
                next_bs = n
        if next_q < pos:
            next_q = arg.find(b'"', pos)
            if next_q < 0:
                next_q = n
        if next_t < pos:
            next_t = arg.find(term, pos)
            if next_t < 0:
                next_t = n
        stop = next_bs if next_bs < next_q else next_q
        if not quoted and next_t < stop:
            stop = next_t
        if stop > pos:
            out.append(arg[pos:stop])
        if stop >= n:
            break
        c = arg[stop]
        if c == _BACKSLASH:
            # A trailing backslash escapes nothing and is dropped.
            out.append(arg[stop + 1:stop + 2])
            pos = stop + 2
        elif c == _QUOTE:
            quoted = not quoted
            pos = stop + 1
        else:
            break
    return b"".join(out)


def _ip_group(digits: bytes) -> "int | None":
    if not digits or not digits.isdigit():
        return None
    # 10**8 is a multiple of 256, so the last eight digits fix the octet; this
    # also keeps int() clear of its digit limit on hostile input.
    return int(digits[-8:]) % 256


def localip_rewrite(addr: bytes, localiphost: "bytes | None", is_local_ip) -> bytes:
    """Replace a trailing `[d.d.d.d]` naming this host by localiphost.

    is_local_ip gets the literal normalised as b"a.b.c.d" and is called only
    when a literal qualifies, so it may look the interfaces up lazily.
    """
    if localiphost is None:
        return addr
    at = addr.rfind(b"@")
    if at < 0:
        return addr
    literal = addr[at + 1:]
    if len(literal) < 9 or literal[0] != 0x5B or literal[-1] != 0x5D:
        return addr
    groups = literal[1:-1].split(b".")
    if len(groups) != 4:
        return addr
    octets = []
    for g in groups:
        v = _ip_group(g)
        if v is None:
            return addr
        octets.append(b"%d" % v)
    if not is_local_ip(b".".join(octets)):
        return addr
    return addr[:at + 1] + localiphost


def parse(arg: bytes, localiphost: "bytes | None", is_local_ip) -> "bytes | None":
    """The address for MAIL/RCPT, or None for `555 syntax error`."""
    addr = localip_rewrite(addrparse(arg), localiphost, is_local_ip)
    if len(addr) > MAX_ADDRESS:
        return None
    # A NUL can only come from localiphost.  netqmail counted it in the
    # length above but then used the address as a C string everywhere.
    nul = addr.find(b"\0")
    if nul >= 0:
        addr = addr[:nul]
    return addr
