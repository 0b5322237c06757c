"""spp.md §7.4-§7.6 (rows 27-45), a command x phase matrix, and every failure kind,
end to end: the real tcpserver, real plugin processes (`:` shell entries and small
Python scripts run through a `#!` line), the recording queue program.

Expected bytes are written out from spp.md and qmail-smtpd.md, never taken from
qspp.  The §7 fixture (control/me test.example, rcpthosts example.com, badmailfrom
bad@spam.example, TCPREMOTEIP=192.0.2.1, TCPREMOTEHOST=client.example,
TCPLOCALIP=127.0.0.1) is built by `spp_home` below; the harness's wrapper exports
those values over the ones tcpserver sets, so RCVD is exactly the spec's.
"""

import os
import shlex
import sys
import textwrap
import time

import pytest

from .conftest import proc_stat, wait_for

# ---------------------------------------------------------------- fixture §7

PY = os.path.realpath(sys.executable)  # the real interpreter behind the venv

GREET = b"220 test.example ESMTP\r\n"
HELO_OK = b"250 test.example\r\n"
OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
FLUSHED = b"250 flushed\r\n"
QUIT_OK = b"221 test.example\r\n"
MF503 = b"503 MAIL first (#5.5.1)\r\n"
RF503 = b"503 RCPT first (#5.5.1)\r\n"
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
BMF553 = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"

MAIL = b"MAIL FROM:<a@b.example>"
RCPT = b"RCPT TO:<x@example.com>"
DATA_IN = b"Subject: t\r\n\r\nbody\r\n"
DATA_OUT = b"Subject: t\n\nbody\n"
ENV1 = b"Fa@b.example\0Tx@example.com\0\0"

PHASES = ["connection", "helo", "mail", "rcpt", "data", "body"]

# what a `continue` gives at each phase (body: `250 ok T qp P`, checked by queued())
NORMAL = {"connection": GREET, "helo": HELO_OK, "mail": OK, "rcpt": OK, "data": GO}
# the reply code of that normal reply, for P lines that continue it
CODE = {"connection": "220", "helo": "250", "mail": "250", "rcpt": "250", "data": "354",
        "body": "250"}


def rcvd(helo=b"h"):
    """RCVD of spp.md §7 (date normalised to <D> as Run.message does)."""
    h = b"" if helo is None else b" (HELO " + helo + b")"
    return (b"Received: from client.example" + h + b" (192.0.2.1)\n"
            b"  by 127.0.0.1 with SMTP; <D>\n")


def spp_home(home, config, **env):
    """Turn the harness's fixture F into the §7 fixture, with CONFIG as smtpplugins."""
    home.control("me", "test.example\n")
    home.control("rcpthosts", "example.com\n")
    home.control("badmailfrom", "bad@spam.example\n")
    home.setenv(TCPREMOTEIP="192.0.2.1", TCPREMOTEHOST="client.example",
                TCPLOCALIP="127.0.0.1")
    home.control("smtpplugins", config)
    home.setenv(**env)


def cfg(*lines):
    return "\n".join(lines) + "\n"


def py_plugin(home, name, body, mode=0o755):
    """A Python plugin at plugins/NAME run through `#!<real python> -I`; returns the entry."""
    rel = "plugins/" + name
    home.write(rel, "#!%s -I\n%s" % (PY, textwrap.dedent(body).lstrip("\n")), mode=mode)
    return rel


# ---------------------------------------------------------------- dialogue helpers

def cmd(c, line, want):
    got = c.cmd(line)
    assert got == want, (line, got)


def send_message(c, data=DATA_IN):
    c.send(data + b".\r\n")
    return c.reply()


def txn(c, sender=b"a@b.example", rcpts=(b"x@example.com",), data=DATA_IN):
    """MAIL, RCPTs, DATA, message: every step must succeed; returns the recorder run."""
    return c.txn(mail=b"MAIL FROM:<" + sender + b">",
                 rcpts=tuple(b"RCPT TO:<" + r + b">" for r in rcpts), body=data)


def quit_(c):
    cmd(c, b"QUIT", QUIT_OK)
    assert c.rest() == b""
    assert c.status() == 0


def log_lines(c, n):
    """Exactly N stderr lines, each in the `qspp: pid N: ` form."""
    lines = c.stderr_lines()
    prefix = b"qspp: pid %d: " % c.pid()
    assert len(lines) == n, lines
    for ln in lines:
        assert ln.startswith(prefix), lines
    return lines


def err_so_far(c):
    """What qspp and its plugins have written to stderr up to now."""
    p = c.server.state / ("%d.err" % c.port)
    return p.read_bytes() if p.exists() else b""


def failure(entry, what):
    return b"451 qmail-spp failure: " + entry.encode() + b": " + what + b" (#4.3.0)\r\n"


def reach(smtpd, phase):
    """Connect and go through the standard dialogue up to PHASE's command."""
    c = smtpd.connect(greet=None if phase == "connection" else GREET)
    if phase in ("mail", "rcpt", "data", "body"):
        cmd(c, b"HELO h", HELO_OK)
    if phase in ("rcpt", "data", "body"):
        cmd(c, MAIL, OK)
    if phase in ("data", "body"):
        cmd(c, RCPT, OK)
    if phase == "body":
        cmd(c, b"DATA", GO)
    return c


def trigger(c, phase):
    """Send the command whose hook is PHASE (nothing for connection); its reply."""
    if phase == "connection":
        return c.reply()
    if phase == "body":
        return send_message(c)
    return c.cmd({"helo": b"HELO h", "mail": MAIL, "rcpt": RCPT, "data": b"DATA"}[phase])


def send_trigger(c, phase, extra=b""):
    """Send PHASE's command (and EXTRA right behind it) without reading a reply."""
    if phase == "body":
        c.send(DATA_IN + b".\r\n" + extra)
    elif phase != "connection":
        c.send({"helo": b"HELO h", "mail": MAIL, "rcpt": RCPT, "data": b"DATA"}[phase]
               + b"\r\n" + extra)
    elif extra:
        c.send(extra)


def finish(c, phase, reply):
    """PHASE's hook gave `continue` with REPLY: check it, complete the message, return the run."""
    if phase == "body":
        return c.queued(reply)
    assert reply == NORMAL[phase]
    if phase == "connection":
        cmd(c, b"HELO h", HELO_OK)
    if phase in ("connection", "helo"):
        return txn(c)
    if phase == "mail":
        cmd(c, RCPT, OK)
    if phase in ("mail", "rcpt"):
        cmd(c, b"DATA", GO)
    return c.queued(send_message(c))


def after_refusal(c, home, phase):
    """PHASE's command was refused: show the section's `refused` effect (spp.md §3.1)."""
    if phase == "connection":
        cmd(c, b"HELO h", HELO_OK)         # no greeting, commands are read as usual
    elif phase == "helo":
        run = txn(c)                        # HELO name not stored
        assert run.message == rcvd(None) + DATA_OUT
        assert run.E == ENV1
    elif phase == "mail":
        cmd(c, RCPT, MF503)                 # no transaction started
    elif phase == "rcpt":
        cmd(c, b"DATA", RF503)              # recipient not added
    elif phase == "data":
        cmd(c, b"RSET", FLUSHED)            # no 354: the transaction was still open
        cmd(c, b"DATA", MF503)
    elif phase == "body":
        cmd(c, RCPT, MF503)                 # transaction over, message discarded
        home.assert_no_new_runs()


def group_alive(pgid):
    """Live (non-zombie) members of process group PGID."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = proc_stat(d)
            if s is not None and s.pgrp == pgid and s.state != b"Z":
                out.append(int(d))
    return out


def session_procs(smtpd, needle):
    """Live processes under our tcpserver (its session) whose argv starts with NEEDLE."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        s = proc_stat(d)
        if s is None or s.state == b"Z" or s.session != smtpd.proc.pid:
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if argv.startswith(needle):
            out.append(int(d))
    return out


def assert_group_gone(home, name="pg"):
    """The plugin wrote its process group id to NAME: none of that group is left."""
    pgid = int((home.root / name).read_text())
    wait_for(lambda: not group_alive(pgid), 2, "plugin process group %d to be gone" % pgid)


def vmhwm_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for ln in f:
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1])
    raise AssertionError("no VmHWM")


# ================================================================ §7.4 rows 27-35

def test_row27_headers_across_phases_and_messages(home, smtpd):
    spp_home(home, cfg("[connection]", ":echo HX-C: 1", "[helo]", ":echo HX-H: 1",
                       "[rcpt]", ':echo "HX-R: $SMTPRCPTTO"', "[data]", ":echo HX-D: 1"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, MAIL, OK)
    cmd(c, RCPT, OK)
    cmd(c, b"RCPT TO:<y@far.example>", RH553)
    cmd(c, b"DATA", GO)
    r1 = c.queued(send_message(c))
    cmd(c, MAIL, OK)
    cmd(c, b"RCPT TO:<z@example.com>", OK)
    cmd(c, b"DATA", GO)
    r2 = c.queued(send_message(c))
    assert r1.message == (rcvd() + b"X-C: 1\nX-H: 1\nX-R: x@example.com\nX-R: y@far.example\n"
                          b"X-D: 1\n" + DATA_OUT)
    assert r1.E == ENV1
    assert r2.message == rcvd() + b"X-R: z@example.com\nX-D: 1\n" + DATA_OUT
    assert r2.E == b"Fa@b.example\0Tz@example.com\0\0"
    quit_(c)
    assert c.stderr() == b""


def test_row28_bare_H_ends_the_header_block(home, smtpd):
    spp_home(home, cfg("[rcpt]", r":printf 'HX-B: 1\nH\nHX-A: 2\n'"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    run = txn(c)
    assert run.message == rcvd() + b"X-B: 1\n\nX-A: 2\n" + DATA_OUT
    assert run.E == ENV1


def test_row29_rset_drops_helo_headers(home, smtpd):
    spp_home(home, cfg("[helo]", ":echo HX-H: 1"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, b"RSET", FLUSHED)
    run = txn(c)
    assert run.message == rcvd() + DATA_OUT
    quit_(c)


def test_row30_lm_from_helo_until_rset(home, smtpd):
    spp_home(home, cfg("[helo]", ":echo LM451 later", "[mail]", ":echo run >&2"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, MAIL, b"451 later\r\n")
    cmd(c, MAIL, b"451 later\r\n")
    assert err_so_far(c) == b""             # [mail] has not run yet
    cmd(c, b"RSET", FLUSHED)
    cmd(c, MAIL, OK)
    quit_(c)
    assert c.stderr_lines() == [b"run"]


def test_row31_lr_from_mail(home, smtpd):
    spp_home(home, cfg("[mail]", ":echo LR550 later"))
    c = smtpd.connect(greet=GREET)
    cmd(c, MAIL, OK)
    cmd(c, RCPT, b"550 later\r\n")
    cmd(c, RCPT, b"550 later\r\n")
    cmd(c, b"DATA", RF503)
    quit_(c)


def test_row32_multiline_ld(home, smtpd):
    spp_home(home, cfg("[mail]", r":printf 'LD452-first\nLD452 second\n'"))
    c = smtpd.connect(greet=GREET)
    cmd(c, MAIL, OK)
    cmd(c, RCPT, OK)
    cmd(c, b"DATA", b"452-first\r\n452 second\r\n")
    cmd(c, b"DATA", b"452-first\r\n452 second\r\n")
    cmd(c, b"RSET", FLUSHED)
    cmd(c, b"DATA", MF503)
    quit_(c)
    home.assert_no_new_runs()


@pytest.mark.parametrize("variant", ["two HELOs before showing", "HELO after showing"])
def test_row33_lines_after_showing_are_discarded(home, smtpd, variant):
    spp_home(home, cfg("[helo]", ':echo "LR550 first $SMTPHELOHOST"'))
    c = smtpd.connect(greet=GREET)
    if variant == "two HELOs before showing":
        cmd(c, b"HELO one", HELO_OK)
        cmd(c, b"HELO two", HELO_OK)
        cmd(c, MAIL, OK)
        # two final lines for one RCPT: sent as they are (§4.6), so read them as lines
        c.send(RCPT + b"\r\n")
        assert c.line() == b"550 first one\r\n"
        assert c.line() == b"550 first two\r\n"
    else:
        cmd(c, b"HELO one", HELO_OK)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, b"550 first one\r\n")
        cmd(c, b"HELO two", HELO_OK)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, b"550 first one\r\n")
    quit_(c)


def test_row34_empty_lm_is_a_bare_crlf(home, smtpd):
    spp_home(home, cfg("[helo]", ":echo LM"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    c.send(MAIL + b"\r\nNOOP\r\n")
    assert c.line() == b"\r\n"
    assert c.line() == OK
    quit_(c)


def test_row34_l_then_a_still_fires(home, smtpd):
    spp_home(home, cfg("[helo]", r":printf 'LR550 deferred\nA\n'"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, MAIL, OK)
    cmd(c, RCPT, b"550 deferred\r\n")
    quit_(c)


def test_row35_a_silences_every_later_plugin(home, smtpd):
    spp_home(home, cfg("[helo]", r":printf 'HX-h: 1\nA\n'", "[mail]", ":echo E550 no",
                       "[rcpt]", ":echo E550 no", "[data]", ":echo E550 no"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, MAIL, OK)
    cmd(c, b"RCPT TO:<y@far.example>", RH553)
    cmd(c, RCPT, OK)
    cmd(c, b"DATA", GO)
    run = c.queued(send_message(c))
    assert run.message == rcvd() + b"X-h: 1\n" + DATA_OUT
    assert run.E == ENV1
    cmd(c, MAIL, OK)
    quit_(c)
    assert c.stderr() == b""


# ================================================================ §7.5 rows 36-43

@pytest.mark.parametrize("entry, want", [
    (r':printf "E550 crlf\r\n"', b"550 crlf\r\n"),
    (r':printf "X\n\n e\nn\nN\nE550 x\n"', HELO_OK),
])
def test_row36_cr_stripped_and_junk_ignored(home, smtpd, entry, want):
    spp_home(home, cfg("[helo]", entry))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", want)
    quit_(c)
    assert c.stderr() == b""


def test_row37_exit_status_ignored_after_e(home, smtpd):
    spp_home(home, cfg("[helo]", ":echo E550 via exit1; exit 1"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", b"550 via exit1\r\n")
    quit_(c)
    assert c.stderr() == b""


def test_row38_crash_stops_the_section(home, smtpd):
    spp_home(home, cfg("[helo]", ":kill -SEGV $$", ":touch second-ran; echo E550 second"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", failure(":kill -SEGV $$", b"child crashed"))
    assert not (home.root / "second-ran").exists()
    quit_(c)
    log_lines(c, 1)


def test_row39_crash_after_e_is_only_logged(home, smtpd):
    spp_home(home, cfg("[helo]", ":echo E550 bye; kill -KILL $$"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", b"550 bye\r\n")
    c.send(b"NOOP\r\n")
    assert c.reply() == OK                  # nothing else came with the 550
    quit_(c)
    log_lines(c, 1)


def test_row40_python_writes_after_its_terminator(home, smtpd):
    entry = py_plugin(home, "py", """
        import sys, time
        print("N")
        sys.stdout.flush()
        time.sleep(0.5)
        print("E550 too late")
    """)
    spp_home(home, cfg("[helo]", entry))
    c = smtpd.connect(greet=GREET)
    t = time.monotonic()
    cmd(c, b"HELO h", HELO_OK)
    assert time.monotonic() - t >= 0.45     # drained to EOF (Δ5)
    quit_(c)
    assert c.stderr() == b""


def test_row41_timeout(home, smtpd):
    spp_home(home, cfg("[helo]", ":sleep 5"), SPPTIMEOUT="1")
    c = smtpd.connect(greet=GREET)
    t = time.monotonic()
    cmd(c, b"HELO h", failure(":sleep 5", b"timeout"))
    assert 0.9 <= time.monotonic() - t < 3
    wait_for(lambda: not session_procs(smtpd, b"sleep\x005"), 2, "no sleep left")
    cmd(c, b"NOOP", OK)
    quit_(c)
    log_lines(c, 1)


def test_row42_background_child_holds_stdout(home, smtpd):
    spp_home(home, cfg("[helo]", ":(sleep 30) & echo N"), SPPTIMEOUT="2")
    c = smtpd.connect(greet=GREET)
    t = time.monotonic()
    cmd(c, b"HELO h", HELO_OK)
    assert 1.9 <= time.monotonic() - t < 4
    wait_for(lambda: not session_procs(smtpd, b"sleep\x0030"), 2, "background sleep killed")
    quit_(c)
    log_lines(c, 1)


def test_row42_short_background_child_default_timeout(home, smtpd):
    spp_home(home, cfg("[helo]", ":(sleep 1) & echo N"))
    c = smtpd.connect(greet=GREET)
    t = time.monotonic()
    cmd(c, b"HELO h", HELO_OK)
    assert 0.9 <= time.monotonic() - t < 3
    quit_(c)
    assert c.stderr() == b""


@pytest.mark.parametrize("entry, want", [
    (r":printf '%070000d\n' 0", failure(r":printf '%070000d\n' 0", b"output too long")),
    (":yes X", failure(":yes X", b"output too long")),
    (":yes N", HELO_OK),
])
def test_row43_output_caps(home, smtpd, entry, want):
    spp_home(home, cfg("[helo]", entry))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", want)
    assert vmhwm_kb(c.pid()) < 64 * 1024
    wait_for(lambda: not session_procs(smtpd, b"yes\x00"), 2, "yes killed")
    quit_(c)
    log_lines(c, 1)


# ================================================================ §7.6 rows 44-45

def test_row44_body_refuses_spam(home, smtpd):
    spp_home(home, cfg("[body]", ":grep -q '^Subject: spam' && echo E554 spam"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, MAIL, OK)
    cmd(c, RCPT, OK)
    cmd(c, b"DATA", GO)
    assert send_message(c, b"Subject: spam\r\n\r\nbody\r\n") == b"554 spam\r\n"
    home.assert_no_new_runs()
    run = txn(c)
    assert run.message == rcvd() + DATA_OUT
    assert run.E == ENV1
    quit_(c)
    assert c.stderr() == b""


def test_row45_body_sees_the_queued_bytes(home, smtpd):
    spp_home(home, cfg("[data]", ":echo HX-D: 1", "[body]", ':echo "HX-Lines: $(wc -l)"'))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    run = txn(c)
    assert run.message == rcvd() + b"X-D: 1\nX-Lines: 6\n" + DATA_OUT
    assert run.E == ENV1
    quit_(c)


# ================================================================ matrix: N O A

@pytest.mark.parametrize("letter", ["N", "O", "A"])
@pytest.mark.parametrize("phase", PHASES)
def test_matrix_continue_verdicts(home, smtpd, phase, letter):
    """N everywhere continues; O overrides badmailfrom at MAIL (Δ8) and rcpthosts at RCPT,
    and is N elsewhere; A is N and turns every later section off, [body] included."""
    lines = []
    for ph in PHASES:
        lines += ["[%s]" % ph, ":echo %s >&2" % ph]     # observers: which hooks ran
        if ph == phase:
            lines.append(":echo %s" % letter)
    spp_home(home, cfg(*lines))
    o_mail = phase == "mail" and letter == "O"
    o_rcpt = phase == "rcpt" and letter == "O"

    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, b"MAIL FROM:<bad@spam.example>", OK)
    cmd(c, RCPT, OK if o_mail else BMF553)
    cmd(c, MAIL, OK)
    cmd(c, b"RCPT TO:<r@far.example>", OK if o_rcpt else RH553)
    cmd(c, RCPT, OK)
    cmd(c, b"DATA", GO)
    r1 = c.queued(send_message(c))
    cmd(c, b"RSET", FLUSHED)
    r2 = txn(c)
    quit_(c)

    assert r1.message == rcvd() + DATA_OUT
    assert r1.E == (b"Fa@b.example\0Tr@far.example\0Tx@example.com\0\0" if o_rcpt else ENV1)
    assert r2.message == rcvd() + DATA_OUT
    assert r2.E == ENV1
    ran = (["connection", "helo", "mail"] + (["rcpt"] if o_mail else [])
           + ["mail", "rcpt", "rcpt", "data", "body", "mail", "rcpt", "data", "body"])
    if letter == "A":
        ran = ran[:ran.index(phase) + 1]
    assert c.stderr_lines() == [p.encode() for p in ran]


# ================================================================ matrix: E

@pytest.mark.parametrize("phase", PHASES)
def test_matrix_e_refuses(home, smtpd, phase):
    if phase == "connection":
        spp_home(home, cfg("[connection]", ":echo E554 no greeting"))
        c = smtpd.connect(greet=None)
        assert c.reply() == b"554 no greeting\r\n"
        cmd(c, b"HELO h", HELO_OK)
        run = txn(c)
        assert run.message == rcvd() + DATA_OUT
        assert run.E == ENV1
    elif phase == "helo":
        spp_home(home, cfg("[helo]", ":echo E550 no helo",
                           "[data]", ':echo "HX-Helo: $SMTPHELOHOST"'))
        c = smtpd.connect(greet=GREET)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)
        cmd(c, b"HELO h", b"550 no helo\r\n")
        cmd(c, b"DATA", GO)                 # the transaction survived the refused HELO
        run = c.queued(send_message(c))
        # no HELO in Received, but SMTPHELOHOST was already updated
        assert run.message == rcvd(None) + b"X-Helo: h\n" + DATA_OUT
        assert run.E == ENV1
    elif phase == "mail":
        spp_home(home, cfg("[mail]", ':case "$SMTPMAILFROM" in rej@*) echo E550 no mail;; esac'))
        c = smtpd.connect(greet=GREET)
        cmd(c, b"HELO h", HELO_OK)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)
        cmd(c, b"MAIL FROM:<rej@b.example>", b"550 no mail\r\n")
        cmd(c, b"DATA", GO)                 # previous transaction untouched
        run = c.queued(send_message(c))
        assert run.E == ENV1
        assert run.env[b"SMTPMAILFROM"] == b"rej@b.example"
    elif phase == "rcpt":
        spp_home(home, cfg("[rcpt]", ':case "$SMTPRCPTTO" in rej@*) echo E550 no rcpt;; esac'))
        c = smtpd.connect(greet=GREET)
        cmd(c, b"HELO h", HELO_OK)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)
        cmd(c, b"RCPT TO:<rej@example.com>", b"550 no rcpt\r\n")
        cmd(c, b"DATA", GO)
        run = c.queued(send_message(c))
        assert run.E == ENV1                # refused recipient not added
        assert run.env[b"SMTPRCPTTO"] == b"rej@example.com"
        assert run.env[b"SMTPRCPTCOUNT"] == b"1"
        assert run.env[b"SMTPRCPTCOUNTALL"] == b"2"
    elif phase == "data":
        spp_home(home, cfg("[data]", ":echo run >&2; echo E451 greylisted"))
        c = smtpd.connect(greet=GREET)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)
        cmd(c, b"DATA", b"451 greylisted\r\n")
        cmd(c, b"DATA", b"451 greylisted\r\n")   # transaction kept, plugin runs again
        cmd(c, b"RSET", FLUSHED)
        cmd(c, b"DATA", MF503)
        home.assert_no_new_runs()
    else:
        spp_home(home, cfg("[body]", ":echo E554 spam"))
        c = smtpd.connect(greet=GREET)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)
        cmd(c, b"DATA", GO)
        assert send_message(c) == b"554 spam\r\n"
        home.assert_no_new_runs()
        cmd(c, RCPT, MF503)                 # transaction over
        cmd(c, b"DATA", MF503)
    quit_(c)
    if phase == "data":
        assert c.stderr_lines() == [b"run", b"run"]
    else:
        assert c.stderr() == b""


# ================================================================ matrix: R D

@pytest.mark.parametrize("letter", ["R", "D"])
@pytest.mark.parametrize("phase", PHASES)
def test_matrix_close(home, smtpd, phase, letter):
    """R/D: earlier P lines flushed, R's text, output after it drained, the connection
    ends with exit 0, no 221, nothing queued; a pipelined command gets no reply."""
    term = "R421 bye" if letter == "R" else "D ignored text"
    spp_home(home, cfg("[%s]" % phase, r":printf 'P421-first\n%s\nE500 never\n'" % term))
    c = reach(smtpd, phase)
    send_trigger(c, phase, b"NOOP\r\nQUIT\r\n")
    want = b"421-first\r\n" + (b"421 bye\r\n" if letter == "R" else b"")
    assert c.rest() == want
    assert c.status() == 0
    assert c.stderr() == b""
    home.assert_no_new_runs()


# ================================================================ matrix: LM LR LD

LTEXT = {"M": b"451 lm\r\n", "R": b"452 lr\r\n", "D": b"453 ld\r\n"}


@pytest.mark.parametrize("q", ["M", "R", "D"])
@pytest.mark.parametrize("phase", PHASES)
def test_matrix_deferred(home, smtpd, phase, q):
    """L from each phase: fires at the next MAIL/RCPT/DATA reaching its hook, again and
    again, HELO does not clear it, RSET does; from [data] the 354 wipes it."""
    line = {"M": "LM451 lm", "R": "LR452 lr", "D": "LD453 ld"}[q]
    spp_home(home, cfg("[%s]" % phase, ":echo %s" % line))
    lt = LTEXT[q]
    c = reach(smtpd, phase)
    reply = trigger(c, phase)
    if phase == "data":
        finish(c, phase, reply)             # 354: spp reset right after it
        cmd(c, MAIL, OK)
        if q != "M":
            cmd(c, RCPT, OK)
        if q == "D":
            cmd(c, b"DATA", GO)
            c.queued(send_message(c))
        quit_(c)
        return
    if phase == "body":
        c.queued(reply)
    else:
        assert reply == NORMAL[phase]
    if phase == "connection":
        cmd(c, b"HELO h", HELO_OK)
    open_txn = phase in ("mail", "rcpt")
    if q == "M":
        cmd(c, MAIL, lt)
        cmd(c, b"HELO h", HELO_OK)          # HELO keeps it; [helo] adds nothing once shown
        cmd(c, MAIL, lt)
        cmd(c, b"RSET", FLUSHED)
        if phase == "mail":
            cmd(c, MAIL, OK)                # queued anew after the reset ...
            cmd(c, MAIL, lt)                # ... hits the next MAIL
        else:
            txn(c)
            # after a TXN: gone (354 reset), except that [body] queues it anew
            cmd(c, MAIL, lt if phase == "body" else OK)
    elif q == "R":
        if not open_txn:
            cmd(c, MAIL, OK)
        to = b"RCPT TO:<y@example.com>"
        cmd(c, to, lt)
        cmd(c, to, lt)
        if phase == "rcpt":
            cmd(c, b"DATA", GO)             # x was accepted before the LR
            run = c.queued(send_message(c))
            assert run.E == ENV1
            cmd(c, MAIL, OK)
            cmd(c, RCPT, OK)                # wiped by the 354
        else:
            cmd(c, b"DATA", RF503)
            cmd(c, b"RSET", FLUSHED)
            if phase == "mail":
                cmd(c, MAIL, OK)
                cmd(c, RCPT, lt)
            else:
                txn(c)
    else:
        if not open_txn:
            cmd(c, MAIL, OK)
        if phase != "rcpt":
            cmd(c, RCPT, OK)
        cmd(c, b"DATA", lt)
        cmd(c, b"DATA", lt)
        cmd(c, b"RSET", FLUSHED)
        if open_txn:
            cmd(c, b"DATA", MF503)
        else:
            txn(c)
    quit_(c)
    assert c.stderr() == b""


@pytest.mark.parametrize("phase", PHASES)
def test_matrix_deferred_after_a(home, smtpd, phase):
    """`L` then `A`: plugins are off, the queued error still fires; RSET escapes it."""
    lines = ["[%s]" % phase, r":printf 'LR452 lr\nA\n'"]
    if phase not in ("data", "body"):
        lines += ["[data]", ":echo E499 plugins still on"]
    spp_home(home, cfg(*lines))
    c = reach(smtpd, phase)
    reply = trigger(c, phase)
    lt = LTEXT["R"]
    to = b"RCPT TO:<y@example.com>"
    if phase in ("connection", "helo", "body"):
        if phase == "body":
            c.queued(reply)
        else:
            assert reply == NORMAL[phase]
        if phase == "connection":
            cmd(c, b"HELO h", HELO_OK)
        cmd(c, MAIL, OK)
        cmd(c, to, lt)
        cmd(c, to, lt)
        cmd(c, b"RSET", FLUSHED)
        txn(c)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)                    # [body] did not run again
    elif phase == "mail":
        assert reply == OK
        cmd(c, to, lt)
        cmd(c, b"RSET", FLUSHED)
        txn(c)                              # no plugin queues it again
    elif phase == "rcpt":
        assert reply == OK
        cmd(c, to, lt)
        cmd(c, b"DATA", GO)
        run = c.queued(send_message(c))
        assert run.E == ENV1
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)
    else:
        finish(c, phase, reply)
        cmd(c, MAIL, OK)
        cmd(c, RCPT, OK)                    # wiped at the 354
    quit_(c)
    assert c.stderr() == b""


# ================================================================ matrix: S U

def observers(phase, entry, var):
    """ENTRY in PHASE's section; in every section an H line showing $VAR after it."""
    lines = []
    for ph in PHASES:
        lines.append("[%s]" % ph)
        if ph == phase:
            lines.append(entry)
        lines.append(':echo "HX-%s: ${%s-unset}"' % (ph, var))
    return cfg(*lines)


def seen(phase, before, after):
    """The header block the observers give: BEFORE up to PHASE, AFTER from PHASE on."""
    i = PHASES.index(phase)
    return b"".join(b"X-%s: %s\n" % (ph.encode(), before if k < i else after)
                    for k, ph in enumerate(PHASES))


@pytest.mark.parametrize("phase", PHASES)
def test_matrix_s(home, smtpd, phase):
    """S is seen by the rest of its section, every later phase and qmail-queue."""
    spp_home(home, observers(phase, ":echo SSPPVAR=v=1", "SPPVAR"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    run = txn(c)
    assert run.message == rcvd() + seen(phase, b"unset", b"v=1") + DATA_OUT
    assert run.env[b"SPPVAR"] == b"v=1"
    assert run.E == ENV1
    quit_(c)
    assert c.stderr() == b""


@pytest.mark.parametrize("phase", PHASES)
def test_matrix_u(home, smtpd, phase):
    """U removes a variable for later plugins and qmail-queue, tcpserver's too; qspp's own
    reading of TCPREMOTEHOST (Received) is not affected."""
    spp_home(home, observers(phase, r":printf 'USPPVAR\nUTCPREMOTEHOST\nUNOSUCHVAR\n'",
                             "SPPVAR"), SPPVAR="orig")
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    run = txn(c)
    assert run.message == rcvd() + seen(phase, b"orig", b"unset") + DATA_OUT
    assert b"SPPVAR" not in run.env
    assert b"TCPREMOTEHOST" not in run.env
    assert run.env[b"TCPREMOTEIP"] == b"192.0.2.1"
    quit_(c)
    assert c.stderr() == b""


def marked_queue(home, rel, mark):
    """Install at REL a queue program that marks QUEUE/PID.MARK, then execs the recorder."""
    q = shlex.quote(str(home.queue))
    home.write(rel, "#!/bin/sh\necho %s >%s/$$.%s\nexec %s\n"
               % (mark, q, mark, shlex.quote(str(home.recorder))), mode=0o755)


def queue_mark(home, run):
    return sorted(p.suffix for p in home.queue.glob("%d.*" % run.pid)
                  if p.suffix in (".alt", ".default"))


@pytest.mark.parametrize("phase", PHASES)
def test_matrix_s_qmailqueue(home, smtpd, phase):
    """SQMAILQUEUE=prog picks the queue program (relative to QMAILHOME) for this and
    every later queue start (Δ13)."""
    marked_queue(home, "bin/alt-queue", "alt")
    spp_home(home, cfg("[%s]" % phase, ":echo SQMAILQUEUE=bin/alt-queue"))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    runs = [txn(c), txn(c)]
    for run in runs:
        assert queue_mark(home, run) == [".alt"]
        assert run.env[b"QMAILQUEUE"] == b"bin/alt-queue"
        assert run.message == rcvd() + DATA_OUT
        assert run.E == ENV1
    quit_(c)


def test_qmailqueue_unset_or_empty_restores_default(home, smtpd):
    marked_queue(home, "bin/alt-queue", "alt")
    marked_queue(home, "bin/qmail-queue", "default")
    spp_home(home, cfg("[helo]", ":echo SQMAILQUEUE=bin/alt-queue", "[rcpt]",
                       ':case "$SMTPRCPTTO" in u@*) echo UQMAILQUEUE;; '
                       'e@*) echo SQMAILQUEUE=;; esac'))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    r1 = txn(c)
    r2 = txn(c, rcpts=(b"u@example.com",))
    cmd(c, b"HELO h", HELO_OK)
    r3 = txn(c)
    r4 = txn(c, rcpts=(b"e@example.com",))
    assert [queue_mark(home, r) for r in (r1, r2, r3, r4)] == [
        [".alt"], [".default"], [".alt"], [".default"]]
    assert b"QMAILQUEUE" not in r2.env
    assert r4.env[b"QMAILQUEUE"] == b""
    quit_(c)


# ================================================================ matrix: H

@pytest.mark.parametrize("phase", PHASES)
def test_matrix_h(home, smtpd, phase):
    """H from [connection]/[helo] reaches only the first message; from MAIL on, each
    message gets its own; [body]'s H goes after the 354-time headers and is not shown
    to later [body] runs."""
    lines = ["[data]", ":echo HX-Pre: 1", "[%s]" % phase, ':echo "HX-P: %s"' % phase]
    if phase == "body":
        lines.append(":echo \"HX-Seen: $(grep -c '^X-P:')\"")
    spp_home(home, cfg(*lines))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    r1 = txn(c)
    r2 = txn(c)
    quit_(c)
    ours = b"X-P: %s\n" % phase.encode()
    if phase == "body":
        h1 = h2 = b"X-Pre: 1\n" + ours + b"X-Seen: 0\n"
    elif phase == "data":
        h1 = h2 = b"X-Pre: 1\n" + ours
    elif phase in ("mail", "rcpt"):
        h1 = h2 = ours + b"X-Pre: 1\n"
    else:
        h1, h2 = ours + b"X-Pre: 1\n", b"X-Pre: 1\n"
    assert r1.message == rcvd() + h1 + DATA_OUT
    assert r2.message == rcvd() + h2 + DATA_OUT


# ================================================================ matrix: C

@pytest.mark.parametrize("phase", PHASES)
def test_matrix_c(home, smtpd, phase):
    """C rewrites the sender at MAIL, the recipient at RCPT, and is ignored elsewhere
    (the variables stay as they were)."""
    spp_home(home, cfg("[%s]" % phase, ":echo Cnew@example.com",
                       ':echo "HX-V: ${SMTPMAILFROM-unset} ${SMTPRCPTTO-unset}"'))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    run = txn(c)
    quit_(c)
    view = {"connection": b"unset unset", "helo": b"unset unset",
            "mail": b"new@example.com unset", "rcpt": b"a@b.example new@example.com",
            "data": b"a@b.example x@example.com", "body": b"a@b.example x@example.com"}
    assert run.message == rcvd() + b"X-V: " + view[phase] + b"\n" + DATA_OUT
    assert run.E == {"mail": b"Fnew@example.com\0Tx@example.com\0\0",
                     "rcpt": b"Fa@b.example\0Tnew@example.com\0\0"}.get(phase, ENV1)


def test_c_does_not_change_the_rcpthosts_decision(home, smtpd):
    """rcpthosts was judged on the original address: far→local plus no verdict still gets
    the 553; local→far is accepted."""
    spp_home(home, cfg("[rcpt]", ':case "$SMTPRCPTTO" in *@far.example) echo Clocal@example.com;;'
                       ' x@example.com) echo Cr@far.example;; esac'))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", HELO_OK)
    cmd(c, MAIL, OK)
    cmd(c, b"RCPT TO:<redir@far.example>", RH553)
    cmd(c, RCPT, OK)
    cmd(c, b"DATA", GO)
    run = c.queued(send_message(c))
    assert run.E == b"Fa@b.example\0Tr@far.example\0\0"
    assert run.env[b"SMTPRCPTTO"] == b"r@far.example"
    quit_(c)


# ================================================================ matrix: P

@pytest.mark.parametrize("phase", PHASES)
def test_matrix_p(home, smtpd, phase):
    """P lines go out at once, before the reply; reading goes on."""
    code = CODE[phase]
    spp_home(home, cfg("[%s]" % phase, r":printf 'P%s-p1\nP%s-p2\n'" % (code, code)))
    c = reach(smtpd, phase)
    reply = trigger(c, phase)
    pre = ("%s-p1\r\n%s-p2\r\n" % (code, code)).encode()
    assert reply.startswith(pre)
    run = finish(c, phase, reply[len(pre):])
    assert run.message == rcvd() + DATA_OUT
    assert run.E == ENV1
    quit_(c)


# ================================================================ failures

def sh_or_py(home, lang, shell, python, name="f"):
    """The entry for a failure: the shell command, or a Python plugin with that body."""
    if lang == "sh":
        return shell
    return py_plugin(home, name + ".py", python)


def refused_by(home, smtpd, phase, entry, reply, env=None, extra=b""):
    """Config [PHASE] ENTRY; PHASE's command gets REPLY, then the refused effect, QUIT."""
    spp_home(home, cfg("[%s]" % phase, entry), **(env or {}))
    c = reach(smtpd, phase)
    t = time.monotonic()
    assert trigger(c, phase) == reply
    elapsed = time.monotonic() - t
    after_refusal(c, home, phase)
    return c, elapsed


FAILURES = {
    # kind: (phases, shell entry, python body, WHAT)
    "exit 120": (("connection", "rcpt"), ":exit 120",
                 "import sys\nsys.exit(120)\n", b"can't execute"),
    "signal": (("mail", "body"), ":kill -SEGV $$",
               "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", b"child crashed"),
    "timeout": (("helo", "rcpt"), ":echo $$ >pg; sleep 5",
                "import os, subprocess, time\nopen('pg', 'w').write(str(os.getpgid(0)))\n"
                "subprocess.Popen(['sleep', '5'])\ntime.sleep(5)\n", b"timeout"),
    "line too long": (("helo", "mail"), r":echo $$ >pg; printf '%070000d' 0; sleep 5",
                      "import os, time\nopen('pg', 'w').write(str(os.getpgid(0)))\n"
                      "os.write(1, b'E' * 70000)\ntime.sleep(5)\n", b"output too long"),
    "run too long": (("helo", "data"), ":echo $$ >pg; yes X",
                     "import os\nopen('pg', 'w').write(str(os.getpgid(0)))\n"
                     "b = b'X\\n' * 32768\nwhile True:\n    os.write(1, b)\n",
                     b"output too long"),
}


@pytest.mark.parametrize("lang", ["sh", "py"])
@pytest.mark.parametrize("kind, phase", [(k, p) for k, v in FAILURES.items() for p in v[0]])
def test_failure_refuses(home, smtpd, kind, phase, lang):
    _, shell, python, what = FAILURES[kind]
    entry = sh_or_py(home, lang, shell, python)
    timed = kind == "timeout"
    c, elapsed = refused_by(home, smtpd, phase, entry, failure(entry, what),
                            env={"SPPTIMEOUT": "1"} if timed else
                            {"SPPTIMEOUT": "10"})
    if timed:
        assert 0.9 <= elapsed < 3
    else:
        assert elapsed < 5                  # killed at the cap, not at the sleep's end
    if kind in ("timeout", "line too long", "run too long"):
        assert_group_gone(home)
        assert vmhwm_kb(c.pid()) < 64 * 1024
    quit_(c)
    log_lines(c, 1)


@pytest.mark.parametrize("entry_kind", ["missing file", "not executable", "bad interpreter"])
@pytest.mark.parametrize("phase", ["helo", "data"])
def test_failure_cant_execute(home, smtpd, entry_kind, phase):
    if entry_kind == "missing file":
        entry = "plugins/nonexistent"
    elif entry_kind == "not executable":
        entry = py_plugin(home, "noexec.py", "print('N')\n", mode=0o644)
    else:
        entry = "plugins/badinterp"
        home.write(entry, "#!/nonexistent/interpreter\necho N\n", mode=0o755)
    c, _ = refused_by(home, smtpd, phase, entry, failure(entry, b"can't execute"))
    quit_(c)
    log_lines(c, 1)


@pytest.mark.parametrize("phase", ["helo", "rcpt"])
def test_shell_exit_127_is_no_verdict(home, smtpd, phase):
    """`:nosuchcmd` (sh exits 127) quietly gives no verdict: the next entry runs."""
    spp_home(home, cfg("[%s]" % phase, ":exec /nonexistent/cmd", ":nosuchcmd-qspp",
                       ":echo HX-Next: 1"))
    c = reach(smtpd, phase)
    run = finish(c, phase, trigger(c, phase))
    assert run.message == rcvd() + b"X-Next: 1\n" + DATA_OUT
    quit_(c)
    # only the shell's own complaints reach stderr, no qspp line
    assert not [ln for ln in c.stderr_lines() if ln.startswith(b"qspp: ")]


GARBAGE_SH = r":printf '\000E550 nul\n\377\200junk\ne550 lower\n E550 space\n" \
             r"\tE550 tab\nn\n\nHX-After: 1\n'"
GARBAGE_PY = """
    import os
    os.write(1, bytes(range(256)) + b"\\n")       # starts with NUL, no letter after LF
    os.write(1, b"\\x00E550 nul\\n\\xff\\x80junk\\ne550 lower\\n E550 space\\n")
    os.write(1, b"\\tE550 tab\\nn\\n\\r\\n\\nHX-After: 1\\n")
"""


@pytest.mark.parametrize("lang", ["sh", "py"])
@pytest.mark.parametrize("phase", ["helo", "data"])
def test_garbage_output_is_ignored(home, smtpd, phase, lang):
    entry = sh_or_py(home, lang, GARBAGE_SH, GARBAGE_PY)
    spp_home(home, cfg("[%s]" % phase, entry))
    c = reach(smtpd, phase)
    run = finish(c, phase, trigger(c, phase))
    assert run.message == rcvd() + b"X-After: 1\n" + DATA_OUT
    assert run.E == ENV1
    quit_(c)
    assert c.stderr() == b""


GRANDCHILD_PY = """
    import os, subprocess, sys
    open("pg", "w").write(str(os.getpgid(0)))
    subprocess.Popen(["sleep", "30"])
    sys.stdout.write("N\\n")
    sys.stdout.flush()
"""


@pytest.mark.parametrize("lang", ["sh", "py"])
@pytest.mark.parametrize("phase", ["connection", "rcpt"])
def test_grandchild_holding_stdout(home, smtpd, phase, lang):
    """N read, then the drain times out: N stands (Δ7), one log line, group killed."""
    entry = sh_or_py(home, lang, ":echo $$ >pg; (sleep 30) & echo N", GRANDCHILD_PY)
    spp_home(home, cfg("[%s]" % phase, entry), SPPTIMEOUT="1")
    c = reach(smtpd, phase)
    t = time.monotonic()
    reply = trigger(c, phase)
    assert 0.9 <= time.monotonic() - t < 3
    assert_group_gone(home)
    run = finish(c, phase, reply)
    assert run.E == ENV1
    quit_(c)
    log_lines(c, 1)


AFTER_TERMINATOR = {
    "E then SIGKILL": (":echo E550 bye; kill -KILL $$",
                       "import os, sys\nprint('E550 bye')\nsys.stdout.flush()\n"
                       "os.kill(os.getpid(), 9)\n"),
    "N then exit 120": (":echo N; exit 120",
                        "import sys\nprint('N')\nsys.exit(120)\n"),
    "O then SIGSEGV": (":echo O; kill -SEGV $$",
                       "import os, signal, sys\nprint('O')\nsys.stdout.flush()\n"
                       "os.kill(os.getpid(), signal.SIGSEGV)\n"),
}


@pytest.mark.parametrize("lang", ["sh", "py"])
@pytest.mark.parametrize("what", list(AFTER_TERMINATOR))
@pytest.mark.parametrize("phase", ["helo", "data", "body"])
def test_failure_after_terminator(home, smtpd, phase, what, lang):
    """Δ7: the terminator's verdict stands, the failure is one log line only."""
    shell, python = AFTER_TERMINATOR[what]
    entry = sh_or_py(home, lang, shell, python)
    if what.startswith("E"):
        c, _ = refused_by(home, smtpd, phase, entry, b"550 bye\r\n")
    else:
        spp_home(home, cfg("[%s]" % phase, entry))
        c = reach(smtpd, phase)
        run = finish(c, phase, trigger(c, phase))
        assert run.message == rcvd() + DATA_OUT
        assert run.E == ENV1
    quit_(c)
    log_lines(c, 1)


# ================================================================ edges of §4.3-§4.5

@pytest.mark.parametrize("phase", ["helo", "mail", "rcpt"])
def test_lines_before_a_failure_stay(home, smtpd, phase):
    """After a failure the P lines precede the 451 line, and H and S already applied
    stay (§4.5). The entry fails only on its first run."""
    code = CODE[phase]
    entry = (r":test -e once && exit 0; touch once; printf 'P%s-before\nHX-Kept: 1\nSKEPT=1\n';"
             " exit 120" % code)
    spp_home(home, cfg("[%s]" % phase, entry))
    c = reach(smtpd, phase)
    want = ("%s-before\r\n" % code).encode() + failure(entry, b"can't execute")
    c.send({"helo": b"HELO h", "mail": MAIL, "rcpt": RCPT}[phase] + b"\r\n")
    assert c.line() + c.line() == want
    if phase == "helo":
        cmd(c, b"HELO h", HELO_OK)
    elif phase == "rcpt":
        cmd(c, b"DATA", RF503)
    run = txn(c)
    assert run.message == rcvd() + b"X-Kept: 1\n" + DATA_OUT
    assert run.env[b"KEPT"] == b"1"
    assert run.E == ENV1
    quit_(c)
    log_lines(c, 1)


def test_timeout_is_per_run(home, smtpd):
    spp_home(home, cfg("[helo]", ":sleep 0.6", ":sleep 0.6", ":echo E550 both ran"),
             SPPTIMEOUT="1")
    c = smtpd.connect(greet=GREET)
    t = time.monotonic()
    cmd(c, b"HELO h", b"550 both ran\r\n")
    assert time.monotonic() - t >= 1.1
    quit_(c)
    assert c.stderr() == b""


@pytest.mark.parametrize("size, tail, ok", [
    (65536, b"\n", True),          # exactly at the cap
    (65536, b"\r\n", True),        # the CR does not count
    (65536, b"", True),            # last line without LF at EOF
    (65536, b"\r", True),          # ... its one trailing CR stripped
    (65536, b"\ry", False),        # a CR inside the line counts
    (65537, b"\n", False),
    (65537, b"", False),
])
def test_line_cap_boundary(home, smtpd, size, tail, ok):
    """A line over 65536 bytes (without LF/CR) is `output too long` (§4.3, Δ11)."""
    entry = py_plugin(home, "long.py", """
        import os
        line = b"E550 " + b"x" * (%d - 5) + %r
        for i in range(0, len(line), 4096):   # many small writes: a line over many reads
            os.write(1, line[i:i + 4096])
    """ % (size, tail))
    spp_home(home, cfg("[helo]", entry))
    c = smtpd.connect(greet=GREET)
    want = (b"550 " + b"x" * (size - 5) + b"\r\n") if ok else failure(entry, b"output too long")
    cmd(c, b"HELO h", want)
    quit_(c)
    log_lines(c, 0 if ok else 1)


@pytest.mark.parametrize("extra, ok", [(0, True), (1, False)])
def test_run_cap_boundary(home, smtpd, extra, ok):
    """1048576 bytes read in one run pass; one more is `output too long` (§4.3, Δ11)."""
    entry = py_plugin(home, "big.py", """
        import os
        end = b"E550 end\\n"
        filler = b"#" * 1023 + b"\\n"                  # unknown letter: ignored
        os.write(1, filler * 1023)
        os.write(1, b"#" * (1048576 - 1023 * 1024 - len(end) - 1 + %d) + b"\\n")
        os.write(1, end)
    """ % extra)
    spp_home(home, cfg("[helo]", entry))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", b"550 end\r\n" if ok else failure(entry, b"output too long"))
    quit_(c)
    log_lines(c, 0 if ok else 1)


@pytest.mark.parametrize("lang", ["sh", "py"])
@pytest.mark.parametrize("form, shell, python, want", [
    ("NUL cuts the line", r":printf 'E550 a\000b\n'", "os.write(1, b'E550 a\\x00b\\n')",
     b"550 a\r\n"),
    ("last line without LF", r":printf 'E550 no lf'", "os.write(1, b'E550 no lf')",
     b"550 no lf\r\n"),
    ("one-byte last line", r":printf 'HX-1: 1\nN'", "os.write(1, b'HX-1: 1\\nN')", HELO_OK),
    ("line split across writes", r":printf 'E55'; sleep 0.2; printf '0 split\r\n'",
     "os.write(1, b'E55'); time.sleep(0.2); os.write(1, b'0 split\\r\\n')",
     b"550 split\r\n"),
])
def test_output_line_forms(home, smtpd, form, shell, python, want, lang):
    entry = sh_or_py(home, lang, shell, "import os, time\n" + python + "\n")
    spp_home(home, cfg("[helo]", entry))
    c = smtpd.connect(greet=GREET)
    cmd(c, b"HELO h", want)
    quit_(c)
    assert c.stderr() == b""
