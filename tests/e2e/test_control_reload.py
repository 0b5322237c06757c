"""A changed control file takes effect from the next connection, in both modes,
also where a process keeps what it read (qspp.control reuses an unchanged file;
a `qspp serve` worker may serve many connections)."""

import time

import pytest

from .serve_harness import ServeServer

QUIT = b"221 %s\r\n"


@pytest.fixture(params=["tcpserver", "serve"])
def server(request, home, tmp_path):
    if request.param == "tcpserver":
        yield request.getfixturevalue("smtpd")
        return
    s = ServeServer(home, tmp_path / "serve").start()
    yield s
    s.stop()


def greets(server, name: bytes) -> None:
    c = server.connect(greet=b"220 " + name + b" ESMTP\r\n")
    assert c.cmd(b"QUIT") == QUIT % name


def test_changes_show_at_the_next_connection(home, server):
    home.control("me", "aaaa.example\n")
    home.control("rcpthosts", "example.org\n")
    time.sleep(2.2)  # older than the 2 s under which nothing read is reused
    greets(server, b"aaaa.example")
    greets(server, b"aaaa.example")
    # same size, rewritten in place (same inode), twice within a second
    me = home.root / "control" / "me"
    me.write_bytes(b"bbbb.example\n")
    greets(server, b"bbbb.example")
    me.write_bytes(b"cccc.example\n")
    greets(server, b"cccc.example")
    c = server.connect(greet=b"220 cccc.example ESMTP\r\n")
    c.cmd(b"MAIL FROM:<a@b>")
    assert c.cmd(b"RCPT TO:<x@example.net>").startswith(b"553 ")
    c.cmd(b"QUIT")
    home.control("rcpthosts", "example.net\n")
    c = server.connect(greet=b"220 cccc.example ESMTP\r\n")
    c.cmd(b"MAIL FROM:<a@b>")
    assert c.cmd(b"RCPT TO:<x@example.net>") == b"250 ok\r\n"
    c.cmd(b"QUIT")
