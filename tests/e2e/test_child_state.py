"""What a child of qspp starts with (issue 10, findings 8 and 9).

Plugins, qmail-queue and the checkprogram get the environment tcpserver gave qspp
plus the spec's SMTP* variables, nothing of Python's own (PEP 538 adds
LC_CTYPE=C.UTF-8 when no locale variable is set), and netqmail's signal state:
every signal at its default except SIGPIPE, ignored as qmail-smtpd ignores it.
Each child here reads its own /proc/$$ entries from a real shell, so what it
shows is what exec gave it.
"""

import os
import shlex

import pytest

from .conftest import wait_for
from .serve_harness import ServeServer

# The dump a child makes of its exec environment and signal state.  The masks
# are read by grep exec'd in the shell's place: the shell's own status would
# show what it blocks while it waits for a child (dash blocks every signal).
DUMP = "cat /proc/$$/environ >{out}.env; exec grep -E '^Sig(Ign|Blk):' /proc/self/status >{out}.sig"

QUEUE = """#!/bin/sh
cat >/dev/null
cat <&1 >/dev/null
{dump}
"""


def environ(data):
    return dict(e.split(b"=", 1) for e in data.split(b"\0") if e)


def signals(text):
    return dict(line.split(b":\t") for line in text.splitlines())


@pytest.fixture
def dumping(home):
    """A [mail] plugin and a queue program, each dumping what exec gave it."""
    out = home.base / "dumps"
    out.mkdir()
    plugin = shlex.quote(str(out / "plugin"))
    home.control("smtpplugins", "[mail]\n:" + DUMP.format(out=plugin) + "\n")
    home.write("bin/dump-queue", QUEUE.format(dump=DUMP.format(
        out=shlex.quote(str(out / "queue")))), mode=0o755)
    home.setenv(QMAILQUEUE=str(home.root / "bin" / "dump-queue"))
    return out


def transaction(c):
    assert c.cmd(b"MAIL FROM:<a@b.example>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    assert c.cmd(b"hi\r\n.").startswith(b"250 ok ")


def one_message(server):
    """A session that queues one message and quits."""
    c = server.connect()
    transaction(c)
    c.cmd(b"QUIT")


def read(out, who, ext):
    p = out / (who + "." + ext)
    wait_for(p.exists, 5, str(p))
    return p.read_bytes()


SPEC_ADDED = {b"SMTPMAILFROM", b"SMTPRCPTTO", b"SMTPRCPTCOUNT", b"SMTPRCPTCOUNTALL",
              b"SMTPRCPTHOSTSOK", b"SMTPHELOHOST"}


def test_children_get_the_environment_tcpserver_gave(home, smtpd, dumping):
    """tcpserver runs with PATH alone (conftest), so no locale variable reaches qspp:
    none may reach its children either."""
    c = smtpd.connect()
    with open("/proc/%d/environ" % c.pid(), "rb") as f:
        given = environ(f.read())  # qspp's own, as exec'd (the session still runs)
    assert not any(k.startswith(b"LC_") or k == b"LANG" for k in given), given
    transaction(c)
    assert c.cmd(b"QUIT").startswith(b"221 ")
    for who in ("plugin", "queue"):
        got = environ(read(dumping, who, "env"))
        assert b"LC_CTYPE" not in got, who
        assert {k: got[k] for k in given if k in got} == given, who
        assert set(got) - set(given) <= SPEC_ADDED, (who, set(got) - set(given))


def test_a_given_lc_ctype_is_kept(home, smtpd, dumping):
    """LC_CTYPE=C makes Python coerce it to C.UTF-8: children still get C."""
    home.setenv(LC_CTYPE="C")
    c = smtpd.connect()
    transaction(c)
    c.cmd(b"QUIT")
    for who in ("plugin", "queue"):
        assert environ(read(dumping, who, "env"))[b"LC_CTYPE"] == b"C", who


def test_serve_children_get_no_coerced_locale(home, dumping, tmp_path):
    """`qspp serve` started with no locale variable: none in any child's environment."""
    server = ServeServer(home, tmp_path / "serve").start()
    try:
        one_message(server)
        for who in ("plugin", "queue"):
            got = environ(read(dumping, who, "env"))
            assert not any(k.startswith(b"LC_") for k in got), (who, got)
            assert got[b"QMAILQUEUE"] == os.fsencode(home.root / "bin" / "dump-queue")
    finally:
        server.stop()


IGNORING = ["/bin/sh", "-c", "trap '' INT QUIT; exec \"$@\"", "sh"]


@pytest.mark.parametrize("started", ["plain", "ignoring"])
def test_children_get_netqmail_signal_state(home, smtpd, dumping, monkeypatch, started):
    """Nothing blocked, only SIGPIPE (bit 13) ignored: what a child
    of netqmail's qmail-smtpd shows.  glibc's posix_spawn left signals 32 and 33
    (its own) ignored: SigIgn 0000000180001000.  qspp started with SIGINT and
    SIGQUIT ignored (a shell's background job) starts its children by
    posix_spawn, which resets them, not by vfork, which would hand them on."""
    if started == "ignoring":
        command = home.command
        monkeypatch.setattr(home, "command", lambda: IGNORING + command())
    one_message(smtpd)
    for who in ("plugin", "queue"):
        sig = signals(read(dumping, who, "sig"))
        assert sig == {b"SigBlk": b"0000000000000000", b"SigIgn": b"0000000000001000"}, who


class _ServeIgnoring(ServeServer):
    """qspp serve started as a shell's background job would be: SIGINT and
    SIGQUIT ignored (`trap ''` survives exec)."""

    def command(self):
        return IGNORING + ServeServer.command(self)


@pytest.mark.parametrize("started", ["plain", "ignoring"])
def test_serve_children_get_netqmail_signal_state(home, dumping, tmp_path, started):
    """The same state from a serve worker.  A worker whose own state is
    netqmail's starts children by vfork, which hands on what is ignored and
    blocked (CPython's own SIGXFSZ ignore included: defaulted for the spawn);
    one that inherited more ignored signals keeps posix_spawn, which resets
    them.  Either way the child sees only SIGPIPE ignored."""
    server = (_ServeIgnoring if started == "ignoring" else ServeServer)(home, tmp_path / "serve")
    server.start()
    try:
        one_message(server)
        for who in ("plugin", "queue"):
            sig = signals(read(dumping, who, "sig"))
            assert sig == {b"SigBlk": b"0000000000000000", b"SigIgn": b"0000000000001000"}, who
        if started == "ignoring":
            # what the worker itself was left with: the reason it keeps posix_spawn
            worker = min(server.children())
            with open("/proc/%d/status" % worker) as f:
                ign = [line for line in f if line.startswith("SigIgn:")][0]
            assert int(ign.split()[1], 16) & (1 << (3 - 1))  # SIGQUIT
    finally:
        server.stop()
