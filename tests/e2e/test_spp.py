"""spp.md §7.1 rows 1-12, §7.2 rows 13-16 and §7.3 rows 17-26 end to end: a real
tcpserver, real plugin processes (`:` shell entries and Python scripts), the recording
queue. Also NOSPP / SPPCONFFILE / SPPTIMEOUT / SPPLOG set per client by a real tcprules
cdb (§2.1, §6.2, §6.5), SPPLOG's run and summary lines (text and JSON), and the
stderr rules of §6.5. Expected bytes are written out from the spec, never taken from
qspp.

All tests use the §7 fixture (`spp_home`); its Received line has TCPREMOTEHOST
client.example, TCPREMOTEIP 192.0.2.1 and TCPLOCALIP 127.0.0.1, which the harness
wrapper sets over tcpserver's own values.
"""

import json
import os
import shlex
import time

import pytest

G7 = b"220 test.example ESMTP\r\n"
HELO250 = b"250 test.example\r\n"
QUIT221 = b"221 test.example\r\n"
OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
FLUSHED = b"250 flushed\r\n"
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
BMF553 = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
CTL421 = b"421 unable to read controls (#4.3.0)\r\n"

# TXN of §7: the client's data and what the queue gets after the Received line and
# the plugin headers; the envelope of a plain TXN.
DATA_IN = b"Subject: t\r\n\r\nbody\r\n"
DATA_OUT = b"Subject: t\n\nbody\n"
E_TXN = b"Fa@b.example\0Tx@example.com\0\0"

# A Python plugin that saves its environment to dumps/NNN.<its file name> (NNN counts
# the runs), so a test sees exactly what a later plugin saw. No output: no verdict.
ENVDUMP = r'''import os, sys
os.makedirs("dumps", exist_ok=True)
name = "%03d.%s" % (len(os.listdir("dumps")), os.path.basename(sys.argv[0]))
with open(os.path.join("dumps", name), "wb") as f:
    f.write(b"\0".join(k + b"=" + v for k, v in os.environb.items()))
'''


def rcvd(helo=b"h") -> bytes:
    """RCVD of §7 with the date as `<D>` (Run.message); helo=None: no HELO given."""
    h = b"" if helo is None else b" (HELO " + helo + b")"
    return b"Received: from client.example" + h + b" (192.0.2.1)\n  by 127.0.0.1 with SMTP; <D>\n"


def config(home, text):
    home.control("smtpplugins", text)


def connect(server, **kw):
    return server.connect(greet=G7, **kw)


def txn(c, sender=b"a@b.example", rcpts=(b"x@example.com",)):
    """TXN of §7 (every reply must be the normal one); the recorder's Run."""
    return c.txn(b"MAIL FROM:<" + sender + b">",
                 [b"RCPT TO:<" + r + b">" for r in rcpts], DATA_IN)


def data(c):
    """DATA, the §7 message and the dot, with 354 expected; the recorder's Run."""
    assert c.cmd(b"DATA") == GO
    c.send(DATA_IN + b".\r\n")
    return c.queued(c.reply())


def quit_ok(c):
    assert c.cmd(b"QUIT") == QUIT221
    assert c.rest() == b""
    assert c.status() == 0


def log_lines(c, n):
    """qspp's stderr: exactly N lines, each `qspp: pid PID: TEXT`; the TEXTs."""
    lines = c.stderr_lines()
    prefix = b"qspp: pid %d: " % c.pid()
    assert len(lines) == n, lines
    for line in lines:
        assert line.startswith(prefix), lines
    return [line[len(prefix):] for line in lines]


def env_dumps(home):
    """[(plugin name, environment dict)] in run order."""
    d = home.root / "dumps"
    out = []
    for p in sorted(d.iterdir()) if d.exists() else ():
        raw = p.read_bytes()
        env = dict(e.split(b"=", 1) for e in raw.split(b"\0") if e)
        out.append((p.name.split(".", 1)[1], env))
    return out


def install_dump(home, name="dump"):
    home.python_plugin("plugins/" + name, ENVDUMP)


# ============================================================ §7.1 rows 1-12

def test_row01_missing_smtpplugins(spp_home, smtpd):
    config(spp_home, None)
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == HELO250
    quit_ok(c)
    (text,) = log_lines(c, 1)
    assert b"control/smtpplugins" in text


def test_row02_smtpplugins_is_a_directory(spp_home, smtpd):
    spp_home.mkdir("control/smtpplugins")
    c = smtpd.connect(greet=None)
    assert c.rest() == CTL421
    assert c.status() == 1
    log_lines(c, 1)


def test_row02_directory_with_nospp_empty(spp_home, smtpd):
    spp_home.mkdir("control/smtpplugins")
    spp_home.setenv(NOSPP="")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == HELO250
    quit_ok(c)
    assert c.stderr() == b""


@pytest.mark.parametrize("value, reply", [("control/alt", b"550 alt\r\n"),
                                          ("", b"550 default\r\n"),
                                          ("<abs>", b"550 alt\r\n")])
def test_row03_sppconffile(spp_home, smtpd, value, reply):
    spp_home.control("alt", "[helo]\n:echo E550 alt\n")
    config(spp_home, "[helo]\n:echo E550 default\n")
    if value == "<abs>":
        value = str(spp_home.root / "control" / "alt")
    spp_home.setenv(SPPCONFFILE=value)
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == reply
    quit_ok(c)
    assert c.stderr() == b""


def test_sppconffile_missing_file_is_ctl421(spp_home, smtpd):
    spp_home.setenv(SPPCONFFILE="control/nonesuch")
    c = smtpd.connect(greet=None)
    assert c.rest() == CTL421
    assert c.status() == 1
    log_lines(c, 1)
    spp_home.assert_no_new_runs()


def test_row04_comments_headers_and_trimming(spp_home, smtpd):
    config(spp_home, b"#c\n:echo E500\n[Helo]\n:echo E501\n[hx\n:echo HX: a   \n  # note")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == HELO250
    run = txn(c)
    assert run.message == rcvd() + b"X: a\n" + DATA_OUT
    assert run.E == E_TXN
    quit_ok(c)
    assert c.stderr() == b""


def test_row05_crlf_config(spp_home, smtpd):
    config(spp_home, b"[helo]\r\n:echo E550 crlf\r\n")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == b"550 crlf\r\n"
    quit_ok(c)


@pytest.mark.parametrize("entry, reply", [
    (b"plugins/x arg", b"451 qmail-spp failure: plugins/x arg: can't execute (#4.3.0)\r\n"),
    # control: the file itself does run
    (b"plugins/x", b"550 x ran\r\n"),
])
def test_row06_plain_entry_is_not_split(spp_home, smtpd, entry, reply):
    spp_home.write("plugins/x", "#!/bin/sh\necho E550 x ran\n", mode=0o755)
    config(spp_home, b"[helo]\n" + entry + b"\n")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == reply
    quit_ok(c)
    log_lines(c, 1 if reply.startswith(b"451") else 0)


def test_row07_ignored_exit_status(spp_home, smtpd):
    config(spp_home, "[helo]\n:nosuchcmd\n:echo HX-2: 1\n")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == HELO250
    run = txn(c)
    assert run.message == rcvd() + b"X-2: 1\n" + DATA_OUT
    quit_ok(c)
    # only the shell's own complaint; exit 127 is no qspp event
    assert not [ln for ln in c.stderr_lines() if ln.startswith(b"qspp:")]


def test_row08_cwd_and_stdin(spp_home, smtpd):
    config(spp_home, "[helo]\n:pwd >&2; test -c /dev/stdin && echo HX-In: null\n")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == HELO250
    run = txn(c)
    assert run.message == rcvd() + b"X-In: null\n" + DATA_OUT
    quit_ok(c)
    homes = {str(spp_home.root).encode(), os.path.realpath(spp_home.root).encode()}
    lines = c.stderr_lines()
    assert len(lines) == 1 and lines[0] in homes, lines


def test_row09_connection_refused_no_greeting(spp_home, smtpd):
    config(spp_home, '[connection]\n:printf "E554 no greeting"\n')
    c = smtpd.connect(greet=None)
    assert c.reply() == b"554 no greeting\r\n"
    assert c.cmd(b"HELO h") == HELO250
    quit_ok(c)
    assert c.stderr() == b""


def test_row10_connection_p_lines_then_greeting(spp_home, smtpd):
    config(spp_home, '[connection]\n:printf "P220-welcome\\nN\\n"\n')
    c = smtpd.connect(greet=None)
    assert c.reply() == b"220-welcome\r\n" + G7
    quit_ok(c)
    assert c.stderr() == b""


def test_row10_connection_r_closes(spp_home, smtpd):
    config(spp_home, "[connection]\n:echo R421 go away\n")
    c = smtpd.connect(greet=None)
    assert c.rest() == b"421 go away\r\n"
    assert c.status() == 0
    assert c.stderr() == b""


def test_row11_connection_exit_120(spp_home, smtpd):
    config(spp_home, "[connection]\n:exit 120\n")
    c = smtpd.connect(greet=None)
    assert c.reply() == b"451 qmail-spp failure: :exit 120: can't execute (#4.3.0)\r\n"
    assert c.cmd(b"HELO h") == HELO250
    quit_ok(c)
    log_lines(c, 1)


def test_row12_refused_helo_keeps_name_updates_env(spp_home, smtpd):
    config(spp_home, '[helo]\n:[ "$SMTPHELOHOST" = bad ] && echo E550 nope\n'
                     '[mail]\n:echo "HX-Helo: $SMTPHELOHOST"\n')
    c = connect(smtpd)
    assert c.cmd(b"HELO good") == HELO250
    assert c.cmd(b"HELO bad") == b"550 nope\r\n"
    run = txn(c)
    assert run.message == rcvd(b"good") + b"X-Helo: bad\n" + DATA_OUT
    assert run.E == E_TXN
    assert run.env[b"SMTPHELOHOST"] == b"bad"
    quit_ok(c)
    assert c.stderr() == b""


def test_refused_helo_keeps_transaction(spp_home, smtpd):
    # §3.1 helo refused: "HELO name (Received line) and transaction unchanged"
    config(spp_home, '[helo]\n:[ "$SMTPHELOHOST" = bad ] && echo E550 nope\n')
    c = connect(smtpd)
    assert c.cmd(b"HELO good") == HELO250
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"HELO bad") == b"550 nope\r\n"
    run = data(c)
    assert run.E == E_TXN
    assert run.message == rcvd(b"good") + DATA_OUT
    # an accepted HELO does end the transaction
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"HELO other") == HELO250
    assert c.cmd(b"RCPT TO:<x@example.com>") == b"503 MAIL first (#5.5.1)\r\n"
    quit_ok(c)


# ============================================================ §7.2 rows 13-16

def test_row13_counters(spp_home, smtpd):
    install_dump(spp_home)
    config(spp_home,
           '[rcpt]\n:echo "HX-R: $SMTPRCPTTO $SMTPRCPTCOUNT $SMTPRCPTCOUNTALL $SMTPRCPTHOSTSOK"\n'
           '[data]\n:echo "HX-D: $SMTPRCPTCOUNT $SMTPRCPTCOUNTALL"\nplugins/dump\n')
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"RCPT TO:<y@other.example>") == RH553
    assert c.cmd(b"RCPT TO:<z@example.com>") == OK
    run = data(c)
    assert run.message == rcvd(None) + (
        b"X-R: x@example.com 0 1 1\nX-R: y@other.example 1 2 0\nX-R: z@example.com 1 3 1\n"
        b"X-D: 2 3\n") + DATA_OUT
    assert run.E == b"Fa@b.example\0Tx@example.com\0Tz@example.com\0\0"
    want = {b"SMTPMAILFROM": b"a@b.example", b"SMTPRCPTTO": b"z@example.com",
            b"SMTPRCPTCOUNT": b"2", b"SMTPRCPTCOUNTALL": b"3", b"SMTPRCPTHOSTSOK": b"1"}
    (name, seen), = env_dumps(spp_home)
    assert name == "dump"
    for env in (seen, run.env):  # the later [data] plugin, then qmail-queue
        assert {k: env.get(k) for k in want} == want
        assert b"SMTPHELOHOST" not in env  # no HELO in this connection
    quit_ok(c)
    assert c.stderr() == b""


def test_row14_null_sender_and_source_route(spp_home, smtpd):
    config(spp_home, '[mail]\n:echo "HX-F: [${SMTPMAILFROM-unset}]"\n'
                     '[rcpt]\n:echo "HX-T: $SMTPRCPTTO"\n')
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<>") == OK
    assert c.cmd(b'RCPT TO:<@r.example:"john doe"@example.com>') == OK
    run = data(c)
    assert run.message == rcvd(None) + b"X-F: []\nX-T: john doe@example.com\n" + DATA_OUT
    assert run.E == b"F\0Tjohn doe@example.com\0\0"
    assert run.env[b"SMTPMAILFROM"] == b""
    assert run.env[b"SMTPRCPTTO"] == b"john doe@example.com"
    quit_ok(c)


def test_row15_set_and_unset(spp_home, smtpd):
    install_dump(spp_home)
    config(spp_home,
           "[helo]\n"
           ":printf 'SA=1\\nSA=3\\nSB=2\\nUB\\nSNOEQ\\nS\\nSC=x=y\\n'\n"
           ':echo "HX-E: A=$A B=${B-unset} C=$C"\n'
           '[mail]\n:echo "HX-A: $A"\n'
           "[rcpt]\nplugins/dump\n")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == HELO250
    run1 = txn(c)
    assert c.cmd(b"RSET") == FLUSHED
    run2 = txn(c)
    assert run1.message == rcvd() + b"X-E: A=3 B=unset C=x=y\nX-A: 3\n" + DATA_OUT
    assert run2.message == rcvd() + b"X-A: 3\n" + DATA_OUT
    dumps = env_dumps(spp_home)
    assert [n for n, _ in dumps] == ["dump", "dump"]
    for env in [run1.env, run2.env] + [e for _, e in dumps]:
        assert env.get(b"A") == b"3"
        assert env.get(b"C") == b"x=y"
        assert b"B" not in env
        assert not [k for k in env if k.startswith(b"NOEQ") or k in (b"", b"S")], env.keys()
    quit_ok(c)
    # the two ignored S lines (SNOEQ and bare S) are logged, one line each (Δ12)
    log_lines(c, 2)


def test_row16_s_relayclient_grants_nothing(spp_home, smtpd):
    config(spp_home, "[mail]\n:echo SRELAYCLIENT=\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<r@far.example>") == RH553
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    run = data(c)
    # qmail-queue sees the variable, but no suffix was appended
    assert run.E == E_TXN
    assert run.env[b"RELAYCLIENT"] == b""
    quit_ok(c)


def test_row16_s_qmailqueue_picks_the_queue(spp_home, smtpd):
    q = str(spp_home.queue)
    spp_home.write("bin/alt-queue",
                   f'#!/bin/sh\n: >"{q}/$$.alt"\nexec "{spp_home.recorder}"\n', mode=0o755)
    config(spp_home, "[mail]\n:echo SQMAILQUEUE=bin/alt-queue\n")
    c = connect(smtpd)
    runs = [txn(c), txn(c)]
    for run in runs:
        assert (spp_home.queue / f"{run.pid}.alt").exists(), "not run through bin/alt-queue"
        assert run.env[b"QMAILQUEUE"] == b"bin/alt-queue"
        assert run.message == rcvd(None) + DATA_OUT
        assert run.E == E_TXN
    quit_ok(c)


# ============================================================ §7.3 rows 17-26

def test_row17_badmailfrom_before_rcpt_hook(spp_home, smtpd):
    config(spp_home, "[rcpt]\n:echo E550 ran\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<bad@spam.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == BMF553  # not `550 ran`: plugin not run
    quit_ok(c)
    assert c.stderr() == b""


def test_row18_o_at_mail_clears_badmailfrom_flag(spp_home, smtpd):
    spp_home.control("badmailfrom", "bad@spam.example\n@spam.example\n")
    config(spp_home, '[mail]\n:case "$SMTPMAILFROM" in ok-*) echo O;; esac\n')
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<bad@spam.example>") == OK
    assert c.cmd(b"MAIL FROM:<ok-1@spam.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"MAIL FROM:<p@spam.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == BMF553
    quit_ok(c)


def test_row19_o_at_rcpt_relays(spp_home, smtpd):
    config(spp_home, "[rcpt]\n:echo O\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<r@far.example>") == OK
    run = data(c)
    assert run.E == b"Fa@b.example\0Tr@far.example\0\0"
    assert run.env[b"SMTPRCPTHOSTSOK"] == b"0"
    quit_ok(c)


def test_row19_n_at_rcpt_keeps_rcpthosts(spp_home, smtpd):
    config(spp_home, "[rcpt]\n:echo N\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<r@far.example>") == RH553
    quit_ok(c)


def test_row20_c_does_not_rejudge_rcpthosts(spp_home, smtpd):
    config(spp_home, "[rcpt]\n:printf 'Cnew@example.com\\nN\\n'\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<redir@far.example>") == RH553
    quit_ok(c)


def test_c_to_far_address_after_local_is_accepted(spp_home, smtpd):
    # §5.1 C: rcpthosts was judged on the original, "and the reverse is accepted"
    config(spp_home, "[rcpt]\n:printf 'Cout@far.example\\nN\\n'\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    run = data(c)
    assert run.E == b"Fa@b.example\0Tout@far.example\0\0"
    assert run.env[b"SMTPRCPTTO"] == b"out@far.example"
    assert run.env[b"SMTPRCPTHOSTSOK"] == b"1"
    quit_ok(c)


@pytest.mark.parametrize("cmd, rcpt", [(b"'C<br@example.com>'", b"<br@example.com>"),
                                       (b"C", b"")])
def test_row21_c_is_verbatim(spp_home, smtpd, cmd, rcpt):
    config(spp_home, b"[rcpt]\n:echo " + cmd + b"\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<br@example.com>") == OK
    run = data(c)
    assert run.E == b"Fa@b.example\0T" + rcpt + b"\0\0"
    assert run.env[b"SMTPRCPTTO"] == rcpt
    quit_ok(c)


def test_row22_c_at_mail_to_badmailfrom(spp_home, smtpd):
    config(spp_home, "[mail]\n:echo Cbad@spam.example\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == BMF553
    quit_ok(c)


def test_row22_c_at_mail_new_sender(spp_home, smtpd):
    config(spp_home, "[mail]\n:echo Cnew@b.example\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    run = data(c)
    assert run.E == b"Fnew@b.example\0Tx@example.com\0\0"
    assert run.env[b"SMTPMAILFROM"] == b"new@b.example"
    quit_ok(c)


def test_row23_relayclient_suffix_after_c(spp_home, smtpd):
    install_dump(spp_home)
    spp_home.setenv(RELAYCLIENT="+sfx")
    config(spp_home, '[rcpt]\n:echo "HX-ok: $SMTPRCPTHOSTSOK"; echo Cchanged@far.example\n'
                     "[data]\nplugins/dump\n")
    c = connect(smtpd)
    run = txn(c)
    assert run.E == b"Fa@b.example\0Tchanged@far.example+sfx\0\0"
    assert run.message == rcvd(None) + b"X-ok: 1\n" + DATA_OUT
    (_, seen), = env_dumps(spp_home)
    for env in (seen, run.env):
        assert env[b"SMTPRCPTTO"] == b"changed@far.example"  # no suffix in the variable
        assert env[b"SMTPRCPTHOSTSOK"] == b"1"
        assert env[b"RELAYCLIENT"] == b"+sfx"
    quit_ok(c)


def test_row24_refused_mail_keeps_transaction(spp_home, smtpd):
    config(spp_home, '[mail]\n:case "$SMTPMAILFROM" in rej@*) echo E550 no;; esac\n')
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<f@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"MAIL FROM:<rej@b.example>") == b"550 no\r\n"
    run = data(c)
    assert run.E == b"Ff@b.example\0Tx@example.com\0\0"
    assert run.message == rcvd(None) + DATA_OUT
    # the variable was set before [mail] and is never unset
    assert run.env[b"SMTPMAILFROM"] == b"rej@b.example"
    quit_ok(c)


def test_row25_refused_data_can_be_retried(spp_home, smtpd):
    config(spp_home, "[data]\n:echo run >&2; echo E451 greylisted\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"DATA") == b"451 greylisted\r\n"
    assert c.cmd(b"DATA") == b"451 greylisted\r\n"
    quit_ok(c)
    assert c.stderr() == b"run\nrun\n"
    spp_home.assert_no_new_runs()


def test_row26_r_at_rcpt(spp_home, smtpd):
    config(spp_home, "[rcpt]\n:echo R421 bye\n")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    c.send(b"RCPT TO:<x@example.com>\r\nDATA\r\n")
    assert c.rest() == b"421 bye\r\n"
    assert c.status() == 0
    assert c.stderr() == b""
    spp_home.assert_no_new_runs()


def test_row26_p_then_d_at_mail(spp_home, smtpd):
    config(spp_home, "[mail]\n:printf 'P250-pending\\nD\\n'\n")
    c = connect(smtpd)
    c.send(b"MAIL FROM:<a@b.example>\r\nQUIT\r\n")
    assert c.rest() == b"250-pending\r\n"
    assert c.status() == 0
    assert c.stderr() == b""
    spp_home.assert_no_new_runs()


# ============================================================ per-client settings by tcprules

# One plugin per section that would leave a trace in ran.log and refuse.
EVERYWHERE = "".join(
    f"[{sec}]\n:echo {sec} >>ran.log; echo E554 {sec} refused\nplugins/dump\n"
    for sec in ("connection", "helo", "mail", "rcpt", "data", "body"))


def test_tcprules_nospp_turns_plugins_off(spp_home, rules_smtpd):
    install_dump(spp_home)
    config(spp_home, EVERYWHERE)
    server = rules_smtpd('127.0.0.1:allow,NOSPP=""\n:allow\n')
    c = connect(server)
    assert c.cmd(b"HELO h") == HELO250
    run = txn(c)
    quit_ok(c)
    assert c.stderr() == b""
    assert run.message == rcvd() + DATA_OUT
    assert run.E == E_TXN
    assert not (spp_home.root / "ran.log").exists()
    assert env_dumps(spp_home) == []
    env = run.env
    assert env[b"NOSPP"] == b""
    # spp.md §3.2 "plugins off too": yes for these, no for SMTPMAILFROM/SMTPRCPTTO
    assert env[b"SMTPHELOHOST"] == b"h"
    assert env[b"SMTPRCPTCOUNT"] == b"1"
    assert env[b"SMTPRCPTCOUNTALL"] == b"1"
    assert env[b"SMTPRCPTHOSTSOK"] == b"1"
    assert b"SMTPMAILFROM" not in env
    assert b"SMTPRCPTTO" not in env

    # the rule is per client: from 127.0.0.2 the `:allow` rule sets nothing
    c2 = server.connect(greet=None, source="127.0.0.2")
    assert c2.reply() == b"554 connection refused\r\n"
    assert c2.cmd(b"HELO h") == b"554 helo refused\r\n"
    quit_ok(c2)
    assert (spp_home.root / "ran.log").read_bytes() == b"connection\nhelo\n"


@pytest.mark.parametrize("rules", [
    '127.0.0.1:allow,NOSPP=""\n',
    # NOSPP wins: SPPCONFFILE is ignored, even naming a missing file (§2.1)
    '127.0.0.1:allow,NOSPP="",SPPCONFFILE="control/nonesuch"\n',
])
def test_tcprules_nospp_with_unreadable_config(spp_home, rules_smtpd, rules):
    spp_home.mkdir("control/smtpplugins")
    c = connect(rules_smtpd(rules))
    assert c.cmd(b"HELO h") == HELO250
    quit_ok(c)
    assert c.stderr() == b""


def test_tcprules_sppconffile(spp_home, rules_smtpd):
    spp_home.control("alt", "[helo]\n:echo E550 alt\n")
    config(spp_home, "[helo]\n:echo E550 default\n")
    server = rules_smtpd('127.0.0.1:allow,SPPCONFFILE="control/alt"\n:allow\n')
    c = connect(server)
    assert c.cmd(b"HELO h") == b"550 alt\r\n"
    quit_ok(c)
    c2 = connect(server, source="127.0.0.2")
    assert c2.cmd(b"HELO h") == b"550 default\r\n"
    quit_ok(c2)
    assert c.stderr() == c2.stderr() == b""


def test_tcprules_sppconffile_missing(spp_home, rules_smtpd):
    config(spp_home, "[helo]\n:echo E550 default\n")
    c = rules_smtpd('127.0.0.1:allow,SPPCONFFILE="control/nonesuch"\n').connect(greet=None)
    assert c.rest() == CTL421
    assert c.status() == 1
    log_lines(c, 1)


def test_tcprules_spptimeout(spp_home, rules_smtpd):
    config(spp_home, "[helo]\n:sleep 5\n")
    c = connect(rules_smtpd('127.0.0.1:allow,SPPTIMEOUT="1"\n'))
    t0 = time.monotonic()
    assert c.cmd(b"HELO h") == b"451 qmail-spp failure: :sleep 5: timeout (#4.3.0)\r\n"
    took = time.monotonic() - t0
    assert 0.9 <= took < 3.5, took
    assert c.cmd(b"NOOP") == OK
    quit_ok(c)
    log_lines(c, 1)


def test_tcprules_spptimeout_invalid(spp_home, rules_smtpd):
    # §4.4: invalid -> 60 s and one stderr line; the plugins still run
    config(spp_home, "[helo]\n:echo E550 ran\n")
    c = connect(rules_smtpd('127.0.0.1:allow,SPPTIMEOUT="1.5"\n'))
    assert c.cmd(b"HELO h") == b"550 ran\r\n"
    quit_ok(c)
    log_lines(c, 1)


# ============================================================ stderr and SPPLOG (§6.5)

QUIET = (
    "# every plugin succeeds: no stderr at all\n"
    "[connection]\n:echo HX-C: 1\n"
    "[helo]\n:echo SQUIET=1; echo N\nplugins/dump\n"
    "[mail]\n:echo Cfrom@b.example\n"
    "[rcpt]\nplugins/relay\n"
    "[data]\n:echo HX-D: $QUIET\n"
    "[body]\n:cat >/dev/null; echo HX-Body: seen\n"
)

RELAY = r'''import os, sys
to = os.environb.get(b"SMTPRCPTTO", b"")
sys.stdout.write("O\n" if to.endswith(b"@far.example") else "")
'''


@pytest.mark.parametrize("spplog", [None, ""])  # SPPLOG set but empty is off (§6.5)
def test_plugins_without_failures_write_nothing_to_stderr(spp_home, smtpd, spplog):
    install_dump(spp_home)
    spp_home.python_plugin("plugins/relay", RELAY)
    config(spp_home, QUIET)
    spp_home.setenv(SPPLOG=spplog)
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == HELO250
    run = txn(c, rcpts=(b"x@example.com", b"r@far.example"))
    assert run.message == rcvd() + b"X-C: 1\nX-D: 1\nX-Body: seen\n" + DATA_OUT
    assert run.E == b"Ffrom@b.example\0Tx@example.com\0Tr@far.example\0\0"
    assert run.env[b"QUIET"] == b"1"
    quit_ok(c)
    assert c.stderr() == b""


SPPLOG_CONFIG = (
    "[connection]\n:true\n"
    "[helo]\n:echo N\n"
    "[mail]\nplugins/dump\n"
    '[rcpt]\n:case "$SMTPRCPTTO" in no@*) echo E550 no rcpt;; esac\n'
    "[data]\n:echo HX-D: 1\n"
)
# (section, entry, verdict, exit) of each run, in order
SPPLOG_RUNS = [
    ("connection", ":true", "-", 0),
    ("helo", ":echo N", "N", 0),
    ("mail", "plugins/dump", "-", 0),
    ("rcpt", ':case "$SMTPRCPTTO" in no@*) echo E550 no rcpt;; esac', "-", 0),
    ("rcpt", ':case "$SMTPRCPTTO" in no@*) echo E550 no rcpt;; esac', "E", 0),
    ("rcpt", ':case "$SMTPRCPTTO" in no@*) echo E550 no rcpt;; esac', "-", 0),
    ("data", ":echo HX-D: 1", "-", 0),
]


def spplog_dialogue(c):
    assert c.cmd(b"HELO h") == HELO250
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"RCPT TO:<no@example.com>") == b"550 no rcpt\r\n"
    assert c.cmd(b"RCPT TO:<y@far.example>") == RH553
    run = data(c)
    assert run.message == rcvd() + b"X-D: 1\n" + DATA_OUT
    assert run.E == E_TXN
    quit_ok(c)
    return run


def kv(text: bytes):
    """Parse `event key=value ...` (values may be "quoted")."""
    words = shlex.split(text.decode("utf-8"))
    return words[0], dict(w.split("=", 1) for w in words[1:])


def test_spplog_text(spp_home, smtpd):
    install_dump(spp_home)
    config(spp_home, SPPLOG_CONFIG)
    spp_home.setenv(SPPLOG="1")
    c = connect(smtpd)
    run = spplog_dialogue(c)
    texts = log_lines(c, len(SPPLOG_RUNS) + 1)
    for text, (section, entry, verdict, exit_) in zip(texts, SPPLOG_RUNS):
        event, f = kv(text)
        assert event == "spp-run", text
        assert (f["section"], f["entry"], f["verdict"], f["exit"]) == (
            section, entry, verdict, str(exit_)), text
        assert int(f["ms"]) >= 0
    event, f = kv(texts[-1])
    assert event == "spp-summary", texts[-1]
    assert f["ip"] == "192.0.2.1" and f["host"] == "client.example" and f["helo"] == "h"
    assert "a@b.example" in f["mail1"]
    rcpts = f["rcpt1"]
    for to, code in (("x@example.com", "250"), ("no@example.com", "550"),
                     ("y@far.example", "553")):
        assert to + ">:" + code in rcpts, rcpts
    assert "case" in rcpts  # the refusing plugin entry is named
    assert f["outcome1"] == "250 ok %s qp %d" % (f["outcome1"].split()[2], run.pid)
    assert int(f["bytes1"]) == len(DATA_OUT)  # the stored bytes, as databytes counts
    assert "end" in f


def test_spplog_json_by_tcprules(spp_home, rules_smtpd):
    install_dump(spp_home)
    config(spp_home, SPPLOG_CONFIG)
    c = connect(rules_smtpd('127.0.0.1:allow,SPPLOG="json"\n'))
    run = spplog_dialogue(c)
    objs = [json.loads(t) for t in log_lines(c, len(SPPLOG_RUNS) + 1)]
    for obj, (section, entry, verdict, exit_) in zip(objs, SPPLOG_RUNS):
        assert obj["event"] == "spp-run"
        assert (obj["section"], obj["entry"], obj["verdict"], obj["exit"]) == (
            section, entry, verdict, exit_), obj
        assert isinstance(obj["ms"], int) and obj["ms"] >= 0
    s = objs[-1]
    assert s["event"] == "spp-summary"
    assert (s["ip"], s["host"], s["helo"]) == ("192.0.2.1", "client.example", "h")
    (t,) = s["transactions"]
    assert t["from"] == "a@b.example"
    assert [(r["to"], r["reply"]) for r in t["rcpt"]] == [
        ("x@example.com", "250"), ("no@example.com", "550"), ("y@far.example", "553")]
    assert "case" in t["rcpt"][1]["by"]
    assert t["outcome"].startswith("250 ok ") and t["outcome"].endswith(" qp %d" % run.pid)
    assert t["bytes"] == len(DATA_OUT)
    assert "qmail" in t["rcpt"][2]["by"]  # rcpthosts refused it, not a plugin
    assert "end" in s


def test_spplog_failure_run(spp_home, smtpd):
    config(spp_home, "[helo]\n:exit 120\n")
    spp_home.setenv(SPPLOG="1")
    c = connect(smtpd)
    assert c.cmd(b"HELO h") == b"451 qmail-spp failure: :exit 120: can't execute (#4.3.0)\r\n"
    quit_ok(c)
    texts = log_lines(c, 3)  # the failure line, the run line, the summary
    runs = [kv(t)[1] for t in texts if t.startswith(b"spp-run ")]
    assert len(runs) == 1
    assert (runs[0]["section"], runs[0]["entry"], runs[0]["verdict"], runs[0]["exit"]) == (
        "helo", ":exit 120", "can't execute", "120")
    assert sum(t.startswith(b"spp-summary ") for t in texts) == 1
    assert texts[-1].startswith(b"spp-summary ")


def test_spplog_summary_after_close_and_eof(spp_home, smtpd):
    config(spp_home, "[rcpt]\n:echo R421 bye\n")
    spp_home.setenv(SPPLOG="1")
    c = connect(smtpd)
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    c.send(b"RCPT TO:<x@example.com>\r\n")
    assert c.rest() == b"421 bye\r\n"
    assert c.status() == 0
    run_line, summary = log_lines(c, 2)
    event, f = kv(run_line)
    assert event == "spp-run"
    assert (f["section"], f["entry"], f["verdict"], f["exit"]) == (
        "rcpt", ":echo R421 bye", "R", "0")
    event, f = kv(summary)
    assert event == "spp-summary"
    assert "x@example.com" in f["rcpt1"] and "421" in f["rcpt1"]
    assert "end" in f

    # EOF right after the greeting: no runs, still one summary line
    c2 = connect(smtpd)
    c2.shutdown_write()
    assert c2.rest() == b""
    assert c2.status() == 1
    (summary,) = log_lines(c2, 1)
    event, f = kv(summary)
    assert event == "spp-summary" and f["ip"] == "192.0.2.1" and "helo" in f
