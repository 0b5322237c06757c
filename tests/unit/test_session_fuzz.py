"""Random dialogues, random plugins, random segmentation: the Session's promises hold.

Seeded, so every failure is reproducible by its seed.  What must hold whatever
the input (the guide's rules): no exception escapes, every reply is a CRLF line,
a `250 ok T qp P` is sent exactly for a message whose envelope reached the
queue, an aborted message reaches the queue with no envelope, every queue is
finished exactly once, and what the session buffers stays bounded.
"""

import random

import pytest

from qspp.session import CLOSED, DATA

from fakes import QUEUED, Harness

PIECES = [
    b"HELO x\r\n", b"EHLO y\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<bad@spam.example>\r\n",
    b"MAIL FROM:<>\r\n", b"RCPT TO:<x@example.org>\r\n", b"RCPT TO:<x@far.away>\r\n",
    b"RCPT TO:<noat>\r\n", b"DATA\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n",
    b"hello\r\n", b".\r\n", b"..x\r\n", b".\rx\r\n", b"Received: x\r\n", b"\r\n", b"a\rb\r\n",
    b"bare\nlf\r\n", b"MAIL FROM:<" + b"a" * 950 + b">\r\n", b"QUIT\r\n", b"mail from:<q@r>\n",
]
PLUGIN_OUTPUT = [b"", b"N\n", b"O\n", b"A\n", b"E550 no\n", b"LM451 later\n", b"LR452 later\n",
                 b"LD453 later\n", b"HX-F: 1\n", b"P250-note\n", b"Cz@example.org\nN\n",
                 b"SX=1\nUX\n", b"R421 bye\n", b"D\n", b"junk\n e\n"]
PHASES = ("connection", "helo", "mail", "rcpt", "data", "body")


TRANSACTION = (b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
               b"Subject: t\r\n\r\nbody\r\n..dot\r\n.\r\n")


def dialogue(rng):
    out = []
    for _ in range(rng.randrange(1, 40)):
        r = rng.random()
        if r < 0.15:
            out.append(TRANSACTION)
        elif r < 0.25:
            out.append(bytes(rng.choice(b"ab.\r\n\0 :<>@") for _ in range(rng.randrange(1, 12))))
        else:
            out.append(rng.choice(PIECES))
    return b"".join(out)


def plugins(rng):
    if rng.random() < 0.3:
        return None, {}
    sections, programs = {}, {}
    for phase in PHASES:
        if rng.random() < 0.4:
            entry = b":" + phase.encode()
            text = rng.choice(PLUGIN_OUTPUT)
            sections[phase] = [entry]
            programs[entry] = (lambda t: lambda env: t)(text)
    return sections, programs


@pytest.mark.parametrize("seed", range(400))
def test_random_dialogue_keeps_the_promises(seed):
    rng = random.Random(seed)
    sections, programs = plugins(rng)
    h = Harness(sections=sections, programs=programs,
                settings_=None if rng.random() < 0.5 else _limited())
    raw = dialogue(rng)
    out = h.greeting
    pos = 0
    while pos < len(raw) and h.state != CLOSED:
        step = rng.choice((1, 2, 7, 64, 4096))
        out += h.feed(raw[pos:pos + step])
        pos += step
        assert len(h.session.out) == 0  # feed() drains it: nothing piles up unsent
    assert out == b"" or out.endswith(b"\r\n")
    queues = h.queue.queues
    delivered = [q for q in queues if q.finished and q.envelope is not None]
    assert out.count(QUEUED + b"\r\n") == len(delivered)
    for q in queues:
        if q.finished:
            assert q.finish_calls == 1
        else:
            assert h.state == DATA  # only a message still arriving has an open queue
    for q in delivered:
        assert q.envelope[:1] == b"F" and q.envelope.endswith(b"\0\0")
        assert q.message.startswith(b"Received: from ")


def _limited():
    from fakes import settings
    from qspp import control
    return settings(databytes=20, badmailfrom=control.Badmailfrom([b"bad@spam.example"]))
