"""The embedded home's delivery without a new interpreter (issue 12): the
in-process queue object gives the replies and files the queue script would."""

import os
import re

from qspp import serve

ENVELOPE = b"Fa@b\0Tu@localhost\0\0"


def _queue(tmp_path, maildir="Maildir"):
    return serve._InProcessQueue({b"QSPP_MAILDIR": os.fsencode(tmp_path / maildir)})


def test_delivers_with_the_scripts_reply_and_file(tmp_path):
    q = _queue(tmp_path)
    assert q.pid == os.getpid()
    q.write(b"Subject: x\n\n")
    q.write(b"hello\n")
    reply = q.finish(ENVELOPE)
    assert re.fullmatch(rb"250 ok \d+ qp %d" % os.getpid(), reply.rstrip(b"\r\n")), reply
    (name,) = os.listdir(tmp_path / "Maildir" / "new")
    assert (tmp_path / "Maildir" / "new" / name).read_bytes() == (
        b"Return-Path: <a@b>\nX-Envelope-To: <u@localhost>\nSubject: x\n\nhello\n")
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    assert q.status == 0


def test_an_abort_delivers_nothing(tmp_path):
    q = _queue(tmp_path)
    q.write(b"half")
    assert q.finish(None).startswith(b"451 ")
    assert not (tmp_path / "Maildir").exists()   # the message never left memory


def test_a_malformed_envelope_is_the_scripts_exit_91(tmp_path):
    q = _queue(tmp_path)
    q.write(b"x\n")
    q.finish(b"Xa@b\0\0")
    assert q.status == 91 << 8
    assert os.listdir(tmp_path / "Maildir" / "new") == []


def test_a_maildir_that_cannot_be_made_is_exit_61(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    q = _queue(tmp_path, "file/Maildir")
    q.write(b"x\n")
    assert q.finish(ENVELOPE).startswith(b"451 ")
    assert q.status == 61 << 8


def test_no_descriptor_is_left_open(tmp_path):
    before = set(os.listdir("/proc/self/fd"))
    for envelope in (ENVELOPE, None):
        q = _queue(tmp_path)
        q.write(b"x\n")
        q.finish(envelope)
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_big_message_goes_to_disk_not_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(serve._InProcessQueue, "SPILL", 100)
    q = _queue(tmp_path)
    q.write(b"Subject: big\n\n")
    q.write(b"x" * 150 + b"\n")
    assert os.readlink("/proc/self/fd/%d" % q._msg).startswith(str(tmp_path / "Maildir" / "tmp"))
    q.write(b"end\n")
    assert q.finish(ENVELOPE).startswith(b"250 ok ")
    (name,) = os.listdir(tmp_path / "Maildir" / "new")
    assert (tmp_path / "Maildir" / "new" / name).read_bytes().endswith(
        b"Subject: big\n\n" + b"x" * 150 + b"\nend\n")
