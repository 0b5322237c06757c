"""samples/plugins/bodycheck: header/body patterns on the [body] message, bounded memory."""

import os
import subprocess

import pytest

from .helpers import SAMPLES, command, run_plugin

REFUSED = b"E554 5.7.1 Message content rejected by local policy\n"

MESSAGE = (
    b"Received: from client.example (HELO h) (192.0.2.1)\n"
    b"  by 127.0.0.1 with SMTP; 1 Jan 2024 00:00:00 -0000\n"
    b"X-Spp: 1\n"
    b"Subject: an offer\n"
    b"\tyou cannot refuse: CASINO night\n"
    b"From: a@b.example\n"
    b"\n"
    b"Dear friend,\n"
    b"Subject: casino in the body\n"
    b"buy Cheap Replica watches\r\n"
    b"end\n"
)


def check(home, *args, message=MESSAGE):
    path = home / "message"
    path.write_bytes(message)
    return run_plugin("bodycheck", *args, env={}, cwd=home, stdin=path)


@pytest.mark.parametrize("args", [
    ("--text", "cheap replica"),
    ("--text", "CHEAP REPLICA WATCHES"),
    ("--text=nothing", "--text", "dear FRIEND"),
    ("--regex", r"^buy .* watches$"),                       # CR and LF removed
    ("--regex", r"(?i)^subject:.*refuse: casino"),         # folded header joined
    ("--regex", r"by 127\.0\.0\.1"),                       # qspp's Received line too
])
def test_refused(home, args):
    r = check(home, *args)
    assert (r.out, r.code) == (REFUSED, 0)
    assert b"bodycheck: pid " in r.err and b"message refused:" in r.err


@pytest.mark.parametrize("args", [
    ("--text", "cheap  replica"),
    ("--regex", r"Cheap replica"),                       # regexes are case-sensitive
    ("--regex", r"^you cannot"),                         # a continuation is not a line
    ("--regex", r"^buy .*watches\r"),
])
def test_passed(home, args):
    r = check(home, *args)
    assert (r.out, r.err, r.code) == (b"", b"", 0)


def test_scopes_from_pattern_file(home):
    patterns = home / "control" / "bodycheck"
    cases = [
        ("header-regex ^Subject: casino\n", b""),           # that line is in the body
        ("header-text dear friend\n", b""),
        ("header-text casino night\n", REFUSED),
        ("body-regex ^Subject: casino\n", REFUSED),
        ("body-text CASINO NIGHT\n", b""),
        ("body-text x-spp\n", b""),
        ("text x-spp: 1\n", REFUSED),
        ("regex ^end$\n", REFUSED),
        ("# only a comment\n\n  body-text   replica   \n", REFUSED),
    ]
    for text, out in cases:
        patterns.write_text(text)
        r = check(home, "control/bodycheck")
        assert (r.out, r.code) == (out, 0), text


def test_custom_message_and_text_logged(home):
    r = check(home, "--message", "550 5.7.0 spam, go away", "--text", "replica")
    assert r.out == b"E550 5.7.0 spam, go away\n"
    assert b"message refused: text 'replica' (argument --text) matched" in r.err


def test_bad_pattern_lines_skipped(home):
    patterns = home / "control" / "bodycheck"
    patterns.write_text("header-txt foo\nregex (unclosed\nbody-text\nbody-text replica\n")
    r = check(home, "control/bodycheck")
    assert (r.out, r.code) == (REFUSED, 1)
    err = r.err.decode()
    assert "control/bodycheck:1: unknown kind 'header-txt'" in err
    assert "control/bodycheck:2: invalid regex" in err
    assert "control/bodycheck:3: empty pattern, skipped" in err
    assert "control/bodycheck:4" in err  # named in the refusal log line


def test_no_usable_pattern_fails_open(home):
    r = check(home, "control/missing")
    assert (r.out, r.code) == (b"", 1)
    assert b"cannot read control/missing: No such file or directory, skipped" in r.err
    assert b"no usable pattern, message not checked" in r.err
    r = check(home)
    assert (r.out, r.code) == (b"", 1)
    r = check(home, "--regex", "(")
    assert (r.out, r.code) == (b"", 1)
    r = check(home, "--regex", "(casino)*", "--regex", "^$")
    assert (r.out, r.code) == (b"", 1)
    assert r.err.count(b"regex matches the empty string, so every message, skipped") == 2


def test_usage_errors(home):
    r = check(home, "--frob")
    assert (r.out, r.code) == (b"", 1)
    assert b"unknown option --frob" in r.err
    r = check(home, "--text")
    assert (r.out, r.code) == (b"", 1)
    assert b"--text needs a value" in r.err


def test_empty_and_odd_messages(home):
    assert check(home, "--text", "x", message=b"").out == b""
    r = run_plugin("bodycheck", "--text", "x", env={}, cwd=home)       # /dev/null
    assert (r.out, r.code) == (b"", 0)
    # Header only, no empty line, no final LF.
    assert check(home, "--regex", "^Subject: hi$", message=b"A: 1\nSubject: hi").out == REFUSED
    assert check(home, "--regex", "^b$", message=b"A: 1\n\nb").out == REFUSED
    assert check(home, "--text", "needle", message=b"\x00\xff\nneedle\x00\n").out == REFUSED
    # A message starting with the empty line has no header.
    assert check(home, "--regex", "^A: 1", message=b"\nA: 1\n").out == REFUSED
    assert check(home, "--regex", "^A: 1", "--regex", "x^",
                 message=b"\nA: 1\n").out == REFUSED


def test_long_lines_matched_in_overlapping_pieces(home):
    chunk = 65536
    for offset in (chunk - 3, 2 * chunk - 500, 3 * chunk + 7, 5 * chunk - 1):
        line = b"x" * offset + b"NEEDLE" + b"y" * 100000
        assert check(home, "--text", "needle", message=b"H: 1\n\n" + line).out == REFUSED, offset
        # The same inside an endlessly folded header.
        header = b"Subject: " + b" x\n" * (offset // 3) + b" NEEDLE\n"
        assert check(home, "--regex", "x NEEDLE", message=header + b"\nbody\n").out == REFUSED
    assert check(home, "--text", "needle", message=b"\n" + b"z" * 300000).out == b""


def test_sample_pattern_file_is_clean(home):
    path = str(SAMPLES / "control" / "bodycheck")
    r = check(home, path, message=b"Subject: Casino royale\n\nhi\n")
    assert (r.out, r.code) == (REFUSED, 0)
    r = check(home, path, message=b"Subject: hello\n\nthe watches are cheap\n")
    assert (r.out, r.err, r.code) == (b"", b"", 0)


# Measures a child's peak RSS. wait4() from pytest itself would not do: subprocess
# starts children with vfork(), and Linux carries the parent's high-water mark (pytest's,
# tens of MiB) across the exec. A small interpreter forking the plugin gives a baseline
# of a few MiB instead.
RSS_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write("%d %d" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss))
"""


def max_rss_kib(home, args, message_path):
    """Run bodycheck on a file: its stdout, exit status and peak RSS in KiB."""
    report = home / "rss"
    cmd = command("bodycheck", *args)
    with open(message_path, "rb") as f:
        p = subprocess.run([cmd[0], "-I", "-S", "-c", RSS_WRAPPER, str(report)] + cmd,
                           env={}, stdin=f, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, timeout=30)
    code, rss = report.read_text().split()
    return p.stdout, int(code), int(rss)


def test_big_message_bounded_memory(home):
    """A 48 MiB message (12 MiB header, 16 MiB of lines, a 20 MiB line) is read in bounded
    memory: the peak RSS grows by far less than the message, compared to a tiny one."""
    small = home / "small"
    small.write_bytes(b"Subject: hi\n\nneedle\n")
    big = home / "big"
    with open(big, "wb") as f:
        f.write(b"Subject: folded\n")
        f.write(b" continuation of a very long header line\n" * (12 * 2 ** 20 // 42))
        f.write(b"\n")
        f.write(b"an ordinary line of a long message body, nothing in it\n" * (2 ** 24 // 56))
        f.write(b"q" * (20 * 2 ** 20))
        f.write(b"\nlast line has the needle\n")
    size = big.stat().st_size
    assert size > 45 * 2 ** 20
    args = ("--text", "needle", "--regex", "^no such line$", "--regex", "(?i)header line, no")
    out, code, base = max_rss_kib(home, args, small)
    assert (out, code) == (REFUSED, 0)
    out, code, peak = max_rss_kib(home, args, big)
    assert (out, code) == (REFUSED, 0)     # read to the very end
    print("peak RSS: %d KiB on a tiny message, %d KiB on %d MiB" % (base, peak, size >> 20))
    assert (peak - base) * 1024 < 4 * 2 ** 20, (base, peak)
