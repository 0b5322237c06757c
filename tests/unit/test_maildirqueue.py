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
    t, unique, host = name.split(".", 2)
    assert "P%d" % q.pid in unique and t.isdigit() and host
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


# Header injection, name clashes and directory fsync (issue 10, findings 5-7) ----

# the delivery's own file: unnamed in tmp/ (O_TMPFILE) or named, one outcome
@pytest.fixture(params=[True, False], ids=["unnamed", "named"])
def final_file(request, monkeypatch):
    monkeypatch.setattr(maildirqueue, "_tmpfile", request.param)
    return request.param


def deliver_here(maildir, message, envelope):
    """deliver() in this process (so tests can patch it); returns the exit code."""
    mr, mw = os.pipe()
    er, ew = os.pipe()
    try:
        os.write(mw, message)
        os.close(mw)
        mw = -1
        os.write(ew, envelope)
        os.close(ew)
        ew = -1
        try:
            return maildirqueue.deliver(mr, er, os.fsencode(maildir).decode(
                "utf-8", "surrogateescape"))
        except maildirqueue._Exit as e:
            return e.code
    finally:
        for fd in (mr, mw, er, ew):
            if fd >= 0:
                os.close(fd)


@pytest.mark.parametrize("envelope", [
    b"Fx\rX-Spam-Status: No\r@evil.example\0Tx@example.org\0\0",
    b"Fa@b\0Tx@example.org\0Ty\rX-Spam-Status: No\r@example.org\0\0",
    b"Fa@b\nX-Spam: no\0Tx@example.org\0\0",
    b"Fa@b\0Tx@example.org\r\0\0",
])
def test_address_that_ends_a_header_line_is_refused(tmp_path, mq, envelope):
    """qspp accepts `MAIL FROM:<x\\rX-Spam-Status: No\\r@evil.example>` as netqmail
    does, but its own Maildir must never turn that into a header line: refused
    with qmail-queue's permanent code 31, nothing written."""
    q, reply = deliver(mq, [b"Subject: hi\n\nbody\n"], envelope)
    assert os.WIFEXITED(q.status) and os.WEXITSTATUS(q.status) == 31
    assert reply == b"554 mail server permanently rejected message (#5.3.0)"
    md = tmp_path / "md"
    assert files(md / "new") == [] and files(md / "tmp") == []


def test_cr_address_is_not_a_header_to_a_mail_parser(tmp_path, mq):
    """What a reader would have seen: no X-Spam-Status header in any delivery."""
    import email
    deliver(mq, [b"Subject: hi\n\nbody\n"],
            b"Fx\rX-Spam-Status: No\r@evil.example\0Tx@example.org\0\0")
    for name in files(tmp_path / "md" / "new"):
        msg = email.message_from_bytes((tmp_path / "md" / "new" / name).read_bytes())
        assert msg["X-Spam-Status"] is None


def test_existing_message_is_never_replaced(tmp_path, monkeypatch, final_file):
    """Same name twice (a clock that steps back, two hosts of one name sharing the
    Maildir): the message already in new/ stays, the new one gets another name."""
    md = tmp_path / "md"
    for sub in ("", "tmp", "new", "cur"):
        (md / sub).mkdir()
    (md / "new" / "1000.1.host").write_bytes(b"older message")
    names = iter(["1000.1.host"] * 3 + ["1000.%d.host" % i for i in range(2, 50)])
    monkeypatch.setattr(maildirqueue, "_maildir_name", lambda host: next(names))
    monkeypatch.setattr(maildirqueue.time, "sleep", lambda s: None)
    assert deliver_here(md, b"newer\n", b"Fa@b\0Tc@d\0\0") == 0
    assert (md / "new" / "1000.1.host").read_bytes() == b"older message"
    new = files(md / "new")
    assert len(new) == 2 and files(md / "tmp") == []
    [other] = [n for n in new if n != "1000.1.host"]
    assert (md / "new" / other).read_bytes() == (
        b"Return-Path: <a@b>\nX-Envelope-To: <c@d>\nnewer\n")


def test_names_follow_the_maildir_convention(tmp_path):
    md = tmp_path / "md"
    for _ in range(3):
        assert deliver_here(md, b"x\n", b"Fa@b\0Tc@d\0\0") == 0
    new = files(md / "new")
    assert len(new) == 3
    for name in new:
        t, unique, host = name.split(".", 2)
        assert t.isdigit() and unique.startswith("M") and "P%d" % os.getpid() in unique
        assert host and "/" not in host and ":" not in host


def _fsync_failing_on_directories(err):
    import stat
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(err, os.strerror(err))
        return real(fd)
    return fsync


def test_failed_directory_fsync_is_a_temporary_failure(tmp_path, monkeypatch, final_file):
    """EIO on the fsync of new/ after the link: the client must not get 250."""
    import errno
    md = tmp_path / "md"
    monkeypatch.setattr(maildirqueue.os, "fsync", _fsync_failing_on_directories(errno.EIO))
    assert deliver_here(md, b"x\n", b"Fa@b\0Tc@d\0\0") == 53
    # a temporary failure makes the client send it again: no second copy stays
    assert files(md / "new") == [] and files(md / "tmp") == []


def test_directory_fsync_unsupported_is_ignored(tmp_path, monkeypatch, final_file):
    """A filesystem that cannot fsync a directory (EINVAL) is not an error."""
    import errno
    md = tmp_path / "md"
    monkeypatch.setattr(maildirqueue.os, "fsync", _fsync_failing_on_directories(errno.EINVAL))
    assert deliver_here(md, b"x\n", b"Fa@b\0Tc@d\0\0") == 0
    assert len(files(md / "new")) == 1 and files(md / "tmp") == []


def test_both_ways_to_the_final_file_deliver_the_same(tmp_path, final_file, monkeypatch):
    md = tmp_path / "md"
    created = []
    real = maildirqueue._create_tmp
    monkeypatch.setattr(maildirqueue, "_create_tmp",
                        lambda *a, **k: created.append(a[1]) or real(*a, **k))
    assert deliver_here(md, b"Subject: s\n\nbody\n", b"Fa@b\0Tc@d\0Te@f\0\0") == 0
    [name] = files(md / "new")
    assert (md / "new" / name).read_bytes() == (
        b"Return-Path: <a@b>\nX-Envelope-To: <c@d>\nX-Envelope-To: <e@f>\nSubject: s\n\nbody\n")
    assert files(md / "tmp") == []
    host = os.uname().nodename
    # without O_TMPFILE the spool (unlinked at once) and the final file have names
    assert created == ([] if final_file else [host + ".spool", host])


def test_stored_message_needs_no_spool(tmp_path, final_file, monkeypatch):
    """qspp serve's own delivery: the message is already in a file, so the only
    file made is the final one (and, with O_TMPFILE, no name in tmp/ at all)."""
    md = str(tmp_path / "md")
    created = []
    real = maildirqueue._create_tmp
    monkeypatch.setattr(maildirqueue, "_create_tmp",
                        lambda *a, **k: created.append(a[1]) or real(*a, **k))
    msg = os.memfd_create("m")
    env = os.memfd_create("e")
    try:
        os.write(msg, b"Subject: s\n\nbody\n")  # left at its end: delivery reads from 0
        os.write(env, b"Fa@b\0Tc@d\0\0")
        os.lseek(env, 0, os.SEEK_SET)
        assert maildirqueue.deliver_stored(msg, env, md) == 0
    finally:
        os.close(msg)
        os.close(env)
    [name] = files(tmp_path / "md" / "new")
    assert (tmp_path / "md" / "new" / name).read_bytes() == (
        b"Return-Path: <a@b>\nX-Envelope-To: <c@d>\nSubject: s\n\nbody\n")
    assert created == ([] if final_file else [os.uname().nodename])


def test_no_o_tmpfile_here_means_named_files_from_then_on(tmp_path, monkeypatch):
    import errno
    monkeypatch.setattr(maildirqueue, "_tmpfile", True)
    real = os.open

    def refusing(path, flags, *a, **k):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real(path, flags, *a, **k)
    monkeypatch.setattr(maildirqueue.os, "open", refusing)
    md = tmp_path / "md"
    assert deliver_here(md, b"x\n", b"Fa@b\0Tc@d\0\0") == 0
    assert maildirqueue._tmpfile is False
    assert len(files(md / "new")) == 1 and files(md / "tmp") == []


def test_no_link_through_proc_here_means_named_files_this_message_included(tmp_path, monkeypatch):
    """A sandbox where /proc/self/fd cannot be linked from: the message still
    goes into new/ (by a named file in tmp/), and later ones go that way."""
    import errno
    monkeypatch.setattr(maildirqueue, "_tmpfile", True)
    real = os.link

    def refusing(src, dst, **kw):
        if str(src).startswith("/proc/"):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real(src, dst, **kw)
    monkeypatch.setattr(maildirqueue.os, "link", refusing)
    md = tmp_path / "md"
    assert deliver_here(md, b"x\n", b"Fa@b\0Tc@d\0\0") == 0
    assert maildirqueue._tmpfile is False
    [name] = files(md / "new")
    assert (md / "new" / name).read_bytes() == b"Return-Path: <a@b>\nX-Envelope-To: <c@d>\nx\n"
    assert files(md / "tmp") == []
