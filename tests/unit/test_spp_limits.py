"""What plugins make qspp keep across runs stays bounded (spec §2.7 memory guard)."""

from qspp.session import CLOSED
from qspp.spp import MAX_PILE

from fakes import Harness, echo

OOM = b"421 out of memory (#4.3.0)\r\n"
MEGA_HEADER = b"HX-Big: " + b"x" * (1 << 20) + b"\n"


def test_headers_piling_up_across_rcpts_end_the_connection():
    h = Harness(sections={"rcpt": [b":big"]}, programs={b":big": echo(MEGA_HEADER)})
    assert h.cmd(b"MAIL FROM:<a@b>") == b"250 ok\r\n"
    accepted = MAX_PILE // len(MEGA_HEADER)
    for _ in range(accepted):
        assert h.cmd(b"RCPT TO:<x@example.org>") == b"250 ok\r\n"
    assert h.cmd(b"RCPT TO:<x@example.org>") == OOM
    assert h.session.state == CLOSED
    assert h.session.exit_status == 1
    assert h.session.fatal_why == "plugin headers over 16 MiB"


def test_deferred_errors_piling_up_before_they_are_shown_end_the_connection():
    line = b"LM451 " + b"y" * (1 << 20) + b"\n"
    h = Harness(sections={"helo": [b":later"]}, programs={b":later": echo(line)})
    grows = MAX_PILE // (len(line) + 1)
    for _ in range(grows):
        assert h.cmd(b"HELO x") == b"250 mx.example.org\r\n"
    assert h.cmd(b"HELO x") == OOM
    assert h.session.state == CLOSED
    assert h.session.exit_status == 1


def test_a_shown_deferred_error_stops_growing():
    h = Harness(sections={"helo": [b":later"]}, programs={b":later": echo(b"LM451 later\n")})
    h.cmd(b"HELO x")
    assert h.cmd(b"MAIL FROM:<a@b>") == b"451 later\r\n"
    for _ in range(3):
        h.cmd(b"HELO x")
    assert h.cmd(b"MAIL FROM:<a@b>") == b"451 later\r\n"
