"""Plugin and queue faults, end to end (issue 6; spp.md §4.5, qmail-smtpd.md §2.6, §6.6, §7).

tests/e2e/test_spp_matrix.py already checks each plugin failure's reply in many
phases.  Here every fault is followed further: the same session keeps working
(NOOP and a whole transaction), no process of the plugin's group is left and
qspp has no child (not even a zombie), and the next connection behaves exactly
the same.  For the queue: a missing or non-executable program, a representative
set of exit codes, a crash, a queue killed half-way through the message, a slow
one, and clients that disconnect inside DATA.  Never a `250` for a message the
recorder did not get with its envelope.
"""

import os
import time

import pytest

from .conftest import QP_RE, REAL_PYTHON, proc_stat, wait_for

OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
HELO_OK = b"250 mx.example.org\r\n"
BYE = b"221 mx.example.org\r\n"
E1 = b"Fa@b\0Tx@example.org\0\0"
RECEIVED = b"Received: from client.example.com (192.0.2.7)\n  by 198.51.100.1 with SMTP; <D>\n"


def failure(entry, what):
    return b"451 qmail-spp failure: " + entry.encode() + b": " + what + b" (#4.3.0)\r\n"


# ---------------------------------------------------------------- process checks

def children(pid):
    """Every child of PID, zombies included."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = proc_stat(d)
            if s is not None and s.ppid == pid:
                out.append((int(d), s.state))
    return out


def group_members(pgid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = proc_stat(d)
            if s is not None and s.pgrp == pgid:
                out.append(int(d))
    return out


def assert_no_leftovers(home, c):
    """The plugin's process group (its leader wrote `pg`) is gone and qspp has no
    child, not even an unreaped one."""
    pg = home.root / "pg"
    if pg.exists():
        pgid = int(pg.read_text())
        wait_for(lambda: not group_members(pgid), 3, "plugin group %d gone" % pgid)
        pg.unlink()
    assert children(c.pid()) == []


# ---------------------------------------------------------------- plugin faults

BINARY_PY = """
import os
block = bytes(range(256)) * 4        # LF followed by \\x0b: no line is a command
for _ in range(2048):                # 2 MiB
    os.write(1, block[:1023])
"""
LINES_PY = """
import os
os.write(1, b"# not a command\\n" * 131072)   # 2 MiB of ignored lines
"""

# kind: (entry or a callable(home) -> entry, what the HELO gets, SPPTIMEOUT)
PLUGIN_FAULTS = {
    "crash (SIGKILL)": (":echo $$ >pg; kill -KILL $$", b"child crashed", "10"),
    "SIGSEGV": (":echo $$ >pg; kill -SEGV $$", b"child crashed", "10"),
    "hang past SPPTIMEOUT": (":echo $$ >pg; sleep 30", b"timeout", "1"),
    "hang after closing stdout": (":echo $$ >pg; exec >&-; sleep 30", b"timeout", "1"),
    "grandchild keeps the pipe": (":echo $$ >pg; (sleep 30) & echo N", None, "1"),
    "megabytes on one line": (":echo $$ >pg; head -c 3000000 /dev/zero | tr '\\0' X",
                              b"output too long", "10"),
    "megabytes of lines": ("plugins/lines", b"output too long", "10"),
    "binary garbage": ("plugins/binary", b"output too long", "10"),
    "exit 120": (":echo $$ >pg; exit 120", b"can't execute", "10"),
    "missing": ("plugins/nonexistent", b"can't execute", "10"),
    "not executable": ("plugins/noexec", b"can't execute", "10"),
}


def install_plugin(home, kind):
    entry, what, timeout = PLUGIN_FAULTS[kind]
    if entry == "plugins/lines":
        home.python_plugin(entry, LINES_PY)
    elif entry == "plugins/binary":
        home.python_plugin(entry, BINARY_PY)
    elif entry == "plugins/noexec":
        home.write(entry, "#!/bin/sh\necho N\n", mode=0o644)
    home.control("smtpplugins", "[helo]\n%s\n" % entry)
    home.setenv(SPPTIMEOUT=timeout)
    want = HELO_OK if what is None else failure(entry, what)
    return entry, want, float(timeout)


def faulty_session(home, smtpd, want, limit):
    """HELO meets the fault; then NOOP and a whole transaction still work."""
    c = smtpd.connect()
    t = time.monotonic()
    assert c.cmd(b"HELO h") == want
    assert time.monotonic() - t < limit + 2
    assert_no_leftovers(home, c)
    assert c.cmd(b"NOOP") == OK
    run = c.txn()
    # a refused HELO stores no name (spp.md §3.1); an accepted one shows
    helo = b" (HELO h)" if want == HELO_OK else b""
    assert run.message == RECEIVED.replace(b" (192", helo + b" (192") + b"hi\n"
    assert run.E == E1
    assert c.cmd(b"QUIT") == BYE
    assert c.rest() == b""
    assert c.status() == 0
    return c


@pytest.mark.parametrize("kind", list(PLUGIN_FAULTS))
def test_plugin_fault_leaves_the_session_usable(home, smtpd, kind):
    _, want, limit = install_plugin(home, kind)
    faulty_session(home, smtpd, want, limit)
    # the next connection meets the same fault the same way, unharmed
    c2 = faulty_session(home, smtpd, want, limit)
    # one log line per failed run (spp.md §6.5), nothing else
    lines = c2.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith(b"qspp: pid %d: " % c2.pid())


def test_fault_does_not_slow_a_concurrent_connection(home, smtpd):
    """While one connection waits on a hung plugin, another one from the same
    server (no plugins for it) completes a transaction at normal speed."""
    home.control("smtpplugins", "[helo]\n:echo $$ >pg; sleep 30\n")
    home.setenv(SPPTIMEOUT="3")
    slow = smtpd.connect()
    slow.send(b"HELO h\r\n")
    home.setenv(NOSPP="")
    fast = smtpd.connect()
    t = time.monotonic()
    fast.txn()
    assert time.monotonic() - t < 2
    assert slow.reply(timeout=6) == failure(":echo $$ >pg; sleep 30", b"timeout")
    assert_no_leftovers(home, slow)
    assert slow.cmd(b"NOOP") == OK


# ---------------------------------------------------------------- queue faults

QQ_EXEC = b"451 unable to exec qq (#4.3.0)\r\n"
QQ_CRASHED = b"451 qq crashed (#4.3.0)\r\n"

EXIT_CODES = [
    (11, b"554 envelope address too long for qq (#5.1.3)"),
    (12, b"554 qq permanent problem (#5.3.0)"),
    (31, b"554 mail server permanently rejected message (#5.3.0)"),
    (40, b"554 qq permanent problem (#5.3.0)"),
    (51, b"451 qq out of memory (#4.3.0)"),
    (53, b"451 qq write error or disk full (#4.3.0)"),
    (54, b"451 qq read error (#4.3.0)"),
    (61, b"451 qq trouble in home directory (#4.3.0)"),
    (64, b"451 qq trouble creating files in queue (#4.3.0)"),
    (71, b"451 mail server temporarily rejected message (#4.3.0)"),
    (74, b"451 communication with mail server failed (#4.4.2)"),
    (81, b"451 qq internal bug (#4.3.0)"),
    (100, b"451 qq temporary problem (#4.3.0)"),
    (115, b"554 envelope address too long for qq (#5.1.3)"),
    (120, b"451 unable to exec qq (#4.3.0)"),
    (255, b"451 qq temporary problem (#4.3.0)"),
]


def message_reply(c, body=b"hi\r\n"):
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(OK, OK, GO)
    c.send(body + b".\r\n")
    return c.reply(timeout=20)


def still_usable(home, smtpd, c):
    """NOOP works on C, and a fresh connection with the normal queue queues mail."""
    assert c.cmd(b"NOOP") == OK
    assert c.cmd(b"QUIT") == BYE
    assert c.status() == 0
    home.setenv(CODE=None, QMODE=None, QMAILQUEUE=str(home.recorder))
    c2 = smtpd.connect()
    run = c2.txn()
    assert run.E == E1


@pytest.mark.parametrize("code, reply", EXIT_CODES, ids=[str(c) for c, _ in EXIT_CODES])
def test_queue_exit_code(home, smtpd, code, reply):
    home.setenv(CODE=str(code))
    c = smtpd.connect()
    assert message_reply(c) == reply + b"\r\n"
    (run,) = home.new_runs()
    assert run.E == E1          # it got everything, then said no
    still_usable(home, smtpd, c)


def test_queue_killed_by_a_signal(home, smtpd):
    home.setenv(QMODE="segv")
    c = smtpd.connect()
    assert message_reply(c) == QQ_CRASHED
    home.new_runs()
    still_usable(home, smtpd, c)


@pytest.mark.parametrize("how", ["missing", "not executable", "a directory"])
def test_queue_cannot_be_executed(home, smtpd, how):
    """§2.6: as if it had exited 120, after the 354 and the whole message."""
    if how == "missing":
        prog = home.base / "nonexistent"
    elif how == "not executable":
        prog = home.base / "noexec"
        prog.write_bytes(home.recorder.read_bytes())
        prog.chmod(0o644)
    else:
        prog = home.base / "adir"
        prog.mkdir()
    home.setenv(QMAILQUEUE=str(prog))
    c = smtpd.connect()
    assert message_reply(c, b"x" * 300000 + b"\r\n") == QQ_EXEC
    assert home.started() == set()
    still_usable(home, smtpd, c)


def test_queue_killed_mid_message(home, smtpd):
    """The queue reads 1000 bytes and SIGKILLs itself: qspp's writes fail, it reads
    the message to its end and answers `qq crashed`, never 250."""
    prog = home.base / "dies"
    prog.write_text("#!/bin/sh\n: >%s/$$.start\nhead -c 1000 >/dev/null\nkill -KILL $$\n"
                    % home.queue)
    prog.chmod(0o755)
    home.setenv(QMAILQUEUE=str(prog))
    c = smtpd.connect()
    # well over a pipe buffer, so a write after the death must fail
    assert message_reply(c, (b"y" * 999 + b"\r\n") * 2000) == QQ_CRASHED
    still_usable(home, smtpd, c)


def test_slow_queue(home, smtpd):
    """A queue that takes its time and then exits 0 gets its 250, late."""
    prog = home.base / "slow"
    prog.write_text("#!/bin/sh\nsleep 2\nexec %s\n" % home.recorder)
    prog.chmod(0o755)
    home.setenv(QMAILQUEUE=str(prog))
    c = smtpd.connect()
    t = time.monotonic()
    reply = message_reply(c)
    assert time.monotonic() - t >= 1.9
    run = c.queued(reply)
    assert run.E == E1 and run.message == RECEIVED + b"hi\n"
    still_usable(home, smtpd, c)


@pytest.mark.parametrize("sent", [
    b"",                       # right after 354
    b"Subject: x\r\n\r\npart",
    b"line\r\n",
    b"line\r\n.",              # the dot, but not its CR LF
    b"line\r\n.\r",            # one byte short of the end
    b"line\r\n" * 50000,       # several reads' worth
], ids=["nothing", "mid line", "line end", "dot", "dot CR", "big"])
def test_client_gone_mid_data_queues_nothing(home, smtpd, sent):
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(OK, OK, GO)
    c.send(sent)
    c.close()
    (run,) = home.new_runs()
    assert run.E == b""         # no envelope: qmail-queue queues nothing
    assert c.status() == 1      # EOF: exit 1, no reply (§7)
    assert c.stderr() == b""


def test_client_gone_after_half_close(home, smtpd):
    """A client that shuts down its sending side inside DATA and keeps reading gets
    no reply at all, and nothing is queued."""
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    c.expect(OK, OK, GO)
    c.send(b"a\r\n.\r")
    c.shutdown_write()
    assert c.rest() == b""
    (run,) = home.new_runs()
    assert run.E == b""
    assert c.status() == 1


def test_never_250_without_the_envelope(home, smtpd):
    """A queue that exits 0 without reading anything (QMODE=unread) made qspp's
    writes fail: `451 qq read error`, not 250 (§2.6)."""
    home.setenv(QMODE="unread")
    c = smtpd.connect()
    reply = message_reply(c, (b"z" * 999 + b"\r\n") * 2000)
    assert not QP_RE.fullmatch(reply)
    assert reply == b"451 qq read error (#4.3.0)\r\n"
    still_usable(home, smtpd, c)


def test_queue_failing_after_a_partial_read(home, smtpd):
    """A queue that reads a few bytes and exits 53 while qspp is still writing:
    its exit code decides the reply."""
    prog = home.base / "pyqueue"
    prog.write_text("#!%s -I\nimport os, sys\nos.read(0, 10)\nsys.exit(53)\n" % REAL_PYTHON)
    prog.chmod(0o755)
    home.setenv(QMAILQUEUE=str(prog))
    c = smtpd.connect()
    reply = message_reply(c, b"w" * 200000 + b"\r\n")
    assert reply == b"451 qq write error or disk full (#4.3.0)\r\n"
    still_usable(home, smtpd, c)


def test_body_spool_is_private_and_unlinked(home, smtpd):
    """The [body] spool (spp.md §6.1): the plugin reads it on fd 0, read-only, from a
    mode-0600 file that no longer has a name, so no other process can open it."""
    home.control("smtpplugins", "[body]\n"
                 ":echo \"HX-Spool: $(stat -L -c %a /proc/self/fd/0)"
                 " $(readlink /proc/self/fd/0 | grep -c '(deleted)$')"
                 " $(grep ^flags: /proc/self/fdinfo/0 | tr -d ' \\t')\"\n")
    c = smtpd.connect()
    run = c.txn()
    head = run.message.split(b"\n")
    spool = [ln for ln in head if ln.startswith(b"X-Spool: ")]
    assert len(spool) == 1 and spool[0].startswith(b"X-Spool: 600 1 flags:"), head
    assert int(spool[0].split(b"flags:")[1], 8) & 3 == os.O_RDONLY
    assert c.cmd(b"QUIT") == BYE
