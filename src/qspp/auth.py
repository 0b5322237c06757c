"""The SMTP AUTH exchange, without I/O (spec §8.2, §8.3).

Imported at the first AUTH command only.  Each mechanism is a generator: it
yields the 334 prompt to send, is sent the client's next line (cancel `*` and
empty lines are already answered by the session), and returns
(user, secret, challenge) for the checkprogram, or raises Malformed.
"""

import binascii

PROMPT_USER = b"334 VXNlcm5hbWU6"  # base64 "Username:"
PROMPT_PASSWORD = b"334 UGFzc3dvcmQ6"  # base64 "Password:"
PROMPT_PLAIN = b"334 "


class Malformed(Exception):
    """The client's input is not acceptable: `501 malformed auth input`."""


def decode(text: bytes) -> bytes:
    """Strict base64 (D6): the standard alphabet, `=` padding, nothing else.

    Re-encoding must give back the input, which refuses stray characters,
    missing or extra padding and non-zero bits after the last full byte alike.
    """
    if len(text) % 4:
        raise Malformed()
    try:
        raw = binascii.a2b_base64(text)
    except (binascii.Error, ValueError):
        raise Malformed()
    if binascii.b2a_base64(raw, newline=False) != text:
        raise Malformed()
    return raw


def _decode_nonul(text: bytes) -> bytes:
    raw = decode(text)
    if b"\0" in raw:
        raise Malformed()
    return raw


def login(initial: bytes):
    if initial:
        user = _decode_nonul(initial)
    else:
        user = _decode_nonul((yield PROMPT_USER))
    password = _decode_nonul((yield PROMPT_PASSWORD))
    if not user or not password:
        raise Malformed()
    return user, password, b""


def plain(initial: bytes):
    raw = decode(initial if initial else (yield PROMPT_PLAIN))
    fields = raw.split(b"\0")
    if len(fields) < 3:
        raise Malformed()
    user, password = fields[1], fields[2]  # authzid and a fourth field ignored
    if not user or not password:
        raise Malformed()
    return user, password, b""


def cram_md5(challenge: bytes):
    raw = _decode_nonul((yield b"334 " + binascii.b2a_base64(challenge, newline=False)))
    space = raw.rfind(b" ")
    if space <= 0 or space == len(raw) - 1:
        raise Malformed()
    return raw[:space], raw[space + 1:], challenge


def challenge(pid: int, now: int, host: bytes) -> bytes:
    return b"<%d.%d@%s>" % (pid, now, host)


def checkprogram_data(user: bytes, secret: bytes, challenge: bytes) -> bytes:
    """What fd 3 carries (§8.4): Shupp's three fields in every mechanism."""
    return user + b"\0" + secret + b"\0" + challenge + b"\0"
