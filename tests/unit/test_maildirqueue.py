"""qspp.maildirqueue run as a real queue through qspp.queue, plus its envelope parser."""

import os
import sys

import pytest

import qspp
from qspp import maildirqueue
from qspp.queue import Queue

SRC = os.fsencode(os.path.dirname(os.path.dirname(os.path.abspath(qspp.__file__))))


@pytest.fixture
def mq(tmp_path):
    """Path of a wrapper running `python -m qspp.maildirqueue`, and its environment."""
    prog = tmp_path / "mq"
    prog.write_bytes(b"#!/bin/sh\nexec " + os.fsencode(sys.executable)
                     + b" -m qspp.maildirqueue\n")
    prog.chmod(0o755)
    env = {b"PYTHONPATH": SRC, b"QSPP_MAILDIR": os.fsencode(tmp_path / "md"),
           b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin")}
    return os.fsencode(prog), env


def deliver(mq, chunks, envelope):
    prog, env = mq
    q = Queue.start(prog, env)
    for c in chunks:
        q.write(c)
    reply = q.finish(envelope)
    return q, reply


def files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else None


def test_delivers_byte_identical_with_headers(tmp_path, mq):
    body = b"Received: from x\n  by y with SMTP; 1 Jan 2026 00:00:00 -0000\n" \
           b"Subject: hi\n\nbinary \x00\xff\r\x80 line\n" + bytes(range(256)) * 8000
    chunks = [body[i:i + 70001] for i in range(0, len(body), 70001)]
    q, reply = deliver(mq, chunks, b"Fa@b.c\0Tx@example.org\0Ty@sub.example.net\0Tx@example.org\0\0")
    assert reply.startswith(b"250 ok ") and reply.endswith(b" qp %d" % q.pid)
    md = tmp_path / "md"
    assert files(md / "tmp") == [] and files(md / "cur") == []
    [name] = files(md / "new")
    t, pid, host = name.split(".", 2)
    assert int(pid) == q.pid and t.isdigit() and host
    assert (md / "new" / name).read_bytes() == (
        b"Return-Path: <a@b.c>\n"
        b"X-Envelope-To: <x@example.org>\n"
        b"X-Envelope-To: <y@sub.example.net>\n"
        b"X-Envelope-To: <x@example.org>\n" + body)


def test_null_sender_and_empty_message(tmp_path, mq):
    _, reply = deliver(mq, [], b"F\0Tx@example.org\0\0")
    assert reply.startswith(b"250 ok ")
    [name] = files(tmp_path / "md" / "new")
    assert (tmp_path / "md" / "new" / name).read_bytes() == (
        b"Return-Path: <>\nX-Envelope-To: <x@example.org>\n")


def test_default_maildir_relative_to_cwd(tmp_path, mq, monkeypatch):
    prog, env = mq
    del env[b"QSPP_MAILDIR"]
    monkeypatch.chdir(tmp_path)
    _, reply = deliver((prog, env), [b"hi\n"], b"Fa@b\0Tc@d\0\0")
    assert reply.startswith(b"250 ok ")
    [name] = files(tmp_path / "Maildir" / "new")
    assert (tmp_path / "Maildir" / "new" / name).read_bytes() == (
        b"Return-Path: <a@b>\nX-Envelope-To: <c@d>\nhi\n")


@pytest.mark.parametrize("envelope, code", [
    (None, 54),                            # qspp's abort: no envelope byte
    (b"Fa@b\0Tx", 54),                     # cut short
    (b"Fa@b\0Tx@y\0", 54),                 # no final NUL
    (b"Xa@b\0Tx@y\0\0", 91),
    (b"Fa@b\0Xx@y\0\0", 91),
    (b"F" + b"a" * 1003 + b"\0Tx@y\0\0", 11),
    (b"Fa@b\0T" + b"a" * 1003 + b"\0\0", 11),
])
def test_envelope_errors_leave_nothing(tmp_path, mq, envelope, code):
    q, reply = deliver(mq, [b"hi\n" * 50000], envelope)
    assert os.WIFEXITED(q.status) and os.WEXITSTATUS(q.status) == code
    if envelope is not None:
        assert reply == {54: b"451 qq read error (#4.3.0)",
                         91: b"451 qq internal bug (#4.3.0)",
                         11: b"554 envelope address too long for qq (#5.1.3)"}[code]
    md = tmp_path / "md"
    assert files(md / "new") == [] and files(md / "tmp") == []


def test_longest_address_accepted(tmp_path, mq):
    _, reply = deliver(mq, [b"x\n"], b"F" + b"a" * 1002 + b"\0Tb\0\0")
    assert reply.startswith(b"250 ok ")


def test_unusable_maildir_is_home_trouble(tmp_path, mq):
    prog, env = mq
    (tmp_path / "file").write_bytes(b"")
    env[b"QSPP_MAILDIR"] = os.fsencode(tmp_path / "file" / "md")
    _, reply = deliver((prog, env), [b"x\n"], b"Fa@b\0Tc@d\0\0")
    assert reply == b"451 qq trouble in home directory (#4.3.0)"


def test_existing_maildir_is_used(tmp_path, mq):
    md = tmp_path / "md"
    for sub in ("", "tmp", "new", "cur"):
        (md / sub).mkdir(exist_ok=True)
    (md / "cur" / "old").write_bytes(b"keep")
    _, reply = deliver(mq, [b"x\n"], b"Fa@b\0Tc@d\0\0")
    assert reply.startswith(b"250 ok ")
    assert len(files(md / "new")) == 1 and (md / "cur" / "old").read_bytes() == b"keep"


# The parser on its own -----------------------------------------------------

def parse(data, chunk=None):
    r, w = os.pipe()
    try:
        if chunk:
            # Writes in pieces still reach the reader as one stream.
            for i in range(0, len(data), chunk):
                os.write(w, data[i:i + chunk])
        else:
            os.write(w, data)
        os.close(w)
        w = -1
        return maildirqueue.read_envelope(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_read_envelope():
    assert parse(b"Fa@b\0Tx\0Ty\0Tx\0\0") == (b"a@b", [b"x", b"y", b"x"])
    assert parse(b"F\0\0") == (b"", [])
    assert parse(b"Fs\0T\0\0trailing ignored") == (b"s", [b""])
    assert parse(b"F" + b"s" * 1002 + b"\0\0", chunk=7) == (b"s" * 1002, [])


@pytest.mark.parametrize("data, code", [
    (b"", 54), (b"F", 54), (b"Fa", 54), (b"Fa\0", 54), (b"Fa\0Tb", 54),
    (b"\0", 91), (b"Fa\0\x01b\0\0", 91), (b"T\0\0", 91),
    (b"F" + b"x" * 1003, 11), (b"F" + b"x" * 1003 + b"\0\0", 11),
])
def test_read_envelope_errors(data, code):
    with pytest.raises(maildirqueue._Exit) as ei:
        parse(data)
    assert ei.value.code == code
