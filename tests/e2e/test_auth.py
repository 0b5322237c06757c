"""SMTP AUTH end to end (qmail-smtpd.md §2.1, §2.4, §4.5, §8.1-8.6, §9.3 rows 44-53;
spp.md §3.1-3.2 and §7.6 row 46) under the real tcpserver, with a raw client,
smtplib and swaks.

The checkprogram is `bin/checkpw` in the home, a checkpassword-compatible program
written by `install_checkpw`: it reads fd 3 to EOF, records what it read together with
its arguments, environment, parent, cwd and open descriptors, accepts only
`user`/`secret` (for CRAM-MD5: the HMAC-MD5 of the challenge keyed with `secret`) and
then execs its subprogram as checkpassword does. Expected bytes are written out from
the spec, never taken from qspp.

The 535 replies come after a 5 s delay (§8.4); all tests that need one share a single
test that runs its connections concurrently.
"""

import ast
import base64
import hmac
import os
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time

import pytest


AUTH_ARGS = ["mx.example.org", "bin/checkpw", "/bin/true"]

OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
FLUSHED = b"250 flushed\r\n"
OK235 = b"235 ok, go ahead (#2.0.0)\r\n"
MAL501 = b"501 malformed auth input (#5.5.4)\r\n"
CANCEL501 = b"501 auth exchange canceled (#5.0.0)\r\n"
TYPE504 = b"504 auth type unimplemented (#5.5.1)\r\n"
FAIL535 = b"535 authentication failed (#5.7.1)\r\n"
CHILD454 = b"454 oops, problem with child and I can't auth (#4.3.0)\r\n"
INTXN503 = b"503 no auth during mail transaction (#5.5.0)\r\n"
AGAIN503 = b"503 you're already authenticated (#5.5.0)\r\n"
NOTAVAIL503 = b"503 auth not available (#5.3.3)\r\n"
REQUIRED530 = b"530 Authorization required (#5.7.1) \r\n"
SIZE552 = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
MF503 = b"503 MAIL first (#5.5.1)\r\n"
UN502 = b"502 unimplemented (#5.5.1)\r\n"
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
OOM421 = b"421 out of memory (#4.3.0)\r\n"
USER334 = b"334 VXNlcm5hbWU6\r\n"   # "Username:"
PASS334 = b"334 UGFzc3dvcmQ6\r\n"   # "Password:"
PLAIN334 = b"334 \r\n"

EHLO_DEFAULT = b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_AUTH = (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n"
             b"250 AUTH LOGIN PLAIN CRAM-MD5\r\n")

GOOD_FD3 = b"user\0secret\0\0"
PLAIN_GOOD = b"AHVzZXIAc2VjcmV0"   # \0user\0secret

SWAKS = shutil.which("swaks")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def received(helo=b"c", info=b"user@", proto=b"ESMTPA") -> bytes:
    """The Received line of fixture F, date as `<D>`; helo=None: no (HELO ...) part."""
    h = b"" if helo is None else b" (HELO " + helo + b")"
    return (b"Received: from client.example.com" + h + b" (" + info + b"192.0.2.7)\n"
            b"  by 198.51.100.1 with " + proto + b"; <D>\n")


# ---------------------------------------------------------------- the checkprogram

CHECKPW = r'''
# checkpassword-compatible test program (tests/e2e/test_auth.py)
import hmac, os, signal, sys, time

RECDIR = @RECDIR@


def read_to_eof(fd):
    out = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk


def open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if not target.startswith("/proc/"):   # the listing's own descriptor
            fds[int(name)] = target
    return fds


def same_file(a, b):
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


fds = open_fds()
try:
    data, error = read_to_eof(3), None
except OSError as e:
    data, error = None, e.errno
fields = data.split(b"\0") if data else []
accept = False
if len(fields) == 4 and fields[0] == b"user" and fields[3] == b"":
    if fields[2] == b"":
        accept = fields[1] == b"secret"
    else:
        digest = hmac.new(b"secret", fields[2], "md5").hexdigest().encode()
        accept = hmac.compare_digest(digest, fields[1])
record = {
    "name": os.path.basename(sys.argv[0]),
    "args": [os.fsencode(a) for a in sys.argv[1:]],
    "fd3": data,
    "fd3_error": error,
    "env": dict(os.environb),
    "cwd": os.getcwdb(),
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "fds": fds,
    "fd1_is_fd2": same_file(1, 2),
    "accept": accept,
    "time": time.time_ns(),
}
tmp = os.path.join(RECDIR, "%d.tmp" % os.getpid())
with open(tmp, "w") as f:
    f.write(repr(record))
os.rename(tmp, os.path.join(RECDIR, "%d.rec" % os.getpid()))
if record["name"] == "checkpw-kill":
    os.kill(os.getpid(), signal.SIGKILL)
if not accept:
    sys.exit(1)
if len(sys.argv) < 2:
    sys.exit(2)
os.execv(sys.argv[1], sys.argv[1:])
'''


def checkpw_dir(home):
    return home.base / "checkpw"


def install_checkpw(home):
    """Write bin/checkpw (and bin/checkpw-kill, which records and then SIGKILLs itself)."""
    recdir = checkpw_dir(home)
    recdir.mkdir(exist_ok=True)
    source = CHECKPW.replace("@RECDIR@", repr(str(recdir)))
    for name in ("checkpw", "checkpw-kill"):
        home.python_plugin("bin/" + name, source)
    return recdir


def auth_mode(home, args=AUTH_ARGS):
    install_checkpw(home)
    home.args = list(args)
    return home


def checkpw_runs(home):
    """The checkprogram's records, oldest first."""
    runs = [ast.literal_eval(p.read_text()) for p in checkpw_dir(home).glob("*.rec")]
    return sorted(runs, key=lambda r: r["time"])


def one_checkpw_run(home):
    runs = checkpw_runs(home)
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture
def auth(home):
    """Fixture F in AUTH mode (§9.3): arguments `mx.example.org bin/checkpw /bin/true`."""
    return auth_mode(home)


def cram_md5(c, host=b"mx.example.org", user=b"user", key=b"secret", command=b"AUTH CRAM-MD5"):
    """AUTH CRAM-MD5 with a correct challenge check; sends the response and returns
    (challenge, response line) without reading the reply to it."""
    r = c.cmd(command)
    m = re.fullmatch(rb"334 ([A-Za-z0-9+/=]+)\r\n", r)
    assert m, r
    challenge = base64.b64decode(m.group(1), validate=True)
    cm = re.fullmatch(rb"<(\d+)\.(\d+)@" + re.escape(host) + rb">", challenge)
    assert cm, challenge
    assert int(cm.group(1)) == c.pid(), "challenge must hold qspp's pid"
    assert abs(int(cm.group(2)) - time.time()) < 30, "challenge must hold the time"
    digest = hmac.new(key, challenge, "md5").hexdigest().encode()
    line = b64(user + b" " + digest)
    c.send(line + b"\r\n")
    return challenge, digest


def assert_child_contract(run, home):
    """§2.4: cwd home, fd 0 /dev/null, fd 1 = qspp's fd 2, fd 3 a pipe, no socket (D6)."""
    assert run["cwd"] == os.fsencode(os.path.realpath(home.root))
    assert run["fds"][0] == "/dev/null"
    assert run["fd1_is_fd2"]
    assert run["fds"][3].startswith("pipe:")
    assert not [t for t in run["fds"].values() if t.startswith("socket:")], run["fds"]


# ---------------------------------------------------------------- the test program itself

def run_checkpw_by_hand(home, name, fd3: bytes, *args):
    """Run bin/NAME as qspp would: fd 0 /dev/null, DATA on a pipe at fd 3."""
    prog = str(home.root / "bin" / name)
    return subprocess.run(["/bin/sh", "-c", 'exec 3<&0 0</dev/null; exec "$@"', "sh", prog, *args],
                          input=fd3, capture_output=True, cwd=str(home.root), timeout=30)


def test_checkpw_program_itself(home):
    """The fixture's checkprogram answers as checkpassword does (no qspp involved)."""
    install_checkpw(home)
    challenge = b"<4242.1795558454@mx.example.org>"
    good_digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
    cases = [
        # program, fd 3, subprogram, exit status, credentials accepted
        ("checkpw", GOOD_FD3, ["/bin/true"], 0, True),
        ("checkpw", GOOD_FD3, ["/bin/false"], 1, True),
        ("checkpw", b"user\0wrong\0\0", ["/bin/true"], 1, False),
        ("checkpw", b"User\0secret\0\0", ["/bin/true"], 1, False),
        ("checkpw", b"user\0secret\0", ["/bin/true"], 1, False),
        ("checkpw", b"user\0" + good_digest + b"\0" + challenge + b"\0", ["/bin/true"], 0, True),
        ("checkpw", b"user\0" + b"0" * 32 + b"\0" + challenge + b"\0", ["/bin/true"], 1, False),
        ("checkpw", b"user\0secret\0" + challenge + b"\0", ["/bin/true"], 1, False),
        ("checkpw-kill", GOOD_FD3, ["/bin/true"], -signal.SIGKILL, True),
    ]
    for name, fd3, args, status, accept in cases:
        before = len(checkpw_runs(home))
        p = run_checkpw_by_hand(home, name, fd3, *args)
        assert p.returncode == status, (name, fd3, p.stderr)
        runs = checkpw_runs(home)
        assert len(runs) == before + 1
        run = runs[-1]
        assert run["fd3"] == fd3
        assert run["args"] == [a.encode() for a in args]
        assert run["fds"][0] == "/dev/null" and run["fds"][3].startswith("pipe:")
        assert run["accept"] == accept


# ---------------------------------------------------------------- §2.1 arguments

def test_row44_ehlo_in_auth_mode(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_AUTH
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    c.assert_clean_exit(0)
    assert checkpw_runs(auth) == []


@pytest.mark.parametrize("first", ["bin/checkpw", "./bin/checkpw", "ABS"])
def test_slash_rule_first_argument_is_the_checkprogram(home, smtpd, first):
    """§2.1: a first argument with `/` is the checkprogram (no HOST); the CRAM-MD5
    host is then TCPLOCALIP (TCPLOCALHOST unset)."""
    if first == "ABS":
        first = str(home.root / "bin" / "checkpw")
    auth_mode(home, [first, "/bin/true"])
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_AUTH
    challenge, digest = cram_md5(c, host=b"198.51.100.1")
    assert c.reply() == OK235
    run = one_checkpw_run(home)
    assert run["fd3"] == b"user\0" + digest + b"\0" + challenge + b"\0"
    assert run["args"] == [b"/bin/true"]
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    c.assert_clean_exit(0)


def test_slash_rule_cram_host_is_tcplocalhost(home, smtpd):
    auth_mode(home, ["bin/checkpw", "/bin/true"])
    home.setenv(TCPLOCALHOST="local.host")
    c = smtpd.connect()
    challenge, digest = cram_md5(c, host=b"local.host")
    assert c.reply() == OK235


def test_bare_checkprogram_on_path_is_read_as_checkprogram(home, smtpd):
    """§2.1: a first argument without `.` naming an executable on PATH is the
    checkprogram, found by PATH search (§2.4), with one stderr line."""
    install_checkpw(home)
    home.args = ["checkpw", "/bin/true"]
    home.setenv(PATH=str(home.root / "bin") + ":" + os.environ.get("PATH", "/usr/bin:/bin"))
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_AUTH
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    assert one_checkpw_run(home)["fd3"] == GOOD_FD3
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    assert c.status() == 0
    lines = c.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith(b"qspp: pid %d: " % c.pid()), lines


@pytest.mark.parametrize("host", ["mx.example.org", "mailhost"])
def test_host_alone_is_auth_off_with_one_stderr_line(home, smtpd, host):
    install_checkpw(home)
    home.args = [host]
    home.setenv(SMTPAUTH="!", DATABYTES="10")   # SMTPAUTH and SIZE: AUTH mode only
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_DEFAULT
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == UN502
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=999999999999") == OK
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    assert c.status() == 0
    lines = c.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith(b"qspp: pid %d: " % c.pid()), lines
    assert checkpw_runs(home) == []


def test_no_arguments_auth_is_unknown_and_smtpauth_ignored(home, smtpd):
    home.setenv(SMTPAUTH="!")
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_DEFAULT
    assert c.cmd(b"AUTH LOGIN") == UN502
    assert c.cmd(b"MAIL FROM:<a@b>") == OK


# ---------------------------------------------------------------- rows 45, 47, 52, 53

def test_row45_plain_relays_with_esmtpa(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == EHLO_AUTH
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    run = c.txn(rcpts=(b"RCPT TO:<x@far.away>",))
    assert run.E == b"Fa@b\0Tx@far.away\0\0"
    assert run.message == received() + b"hi\n"
    assert run.env[b"RELAYCLIENT"] == b""
    assert run.env[b"TCPREMOTEINFO"] == b"user"
    assert run.env[b"SMTPAUTHUSER"] == b"user"
    assert run.env[b"SMTPAUTHMETHOD"] == b"plain"
    cp = one_checkpw_run(auth)
    assert cp["fd3"] == GOOD_FD3
    assert cp["args"] == [b"/bin/true"]
    assert cp["ppid"] == c.pid()
    assert_child_contract(cp, auth)
    # the checkprogram runs before anything of §8.5 is set
    for name in (b"TCPREMOTEINFO", b"RELAYCLIENT", b"SMTPAUTHUSER", b"SMTPAUTHMETHOD"):
        assert name not in cp["env"]
    assert cp["env"][b"TCPREMOTEIP"] == b"192.0.2.7"
    # §8.5: RSET, HELO and EHLO undo none of it; a second AUTH is refused
    assert c.cmd(b"RSET") == FLUSHED
    assert c.cmd(b"HELO d") == b"250 mx.example.org\r\n"
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == AGAIN503
    assert c.cmd(b"EHLO e") == EHLO_AUTH
    run = c.txn(mail=b"MAIL FROM:<>", rcpts=(b"RCPT TO:<y@far.away>", b"RCPT TO:<noat>"))
    assert run.E == b"F\0Ty@far.away\0Tnoat\0\0"
    assert run.message == received(b"e") + b"hi\n"
    assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
    c.assert_clean_exit(0)
    assert len(checkpw_runs(auth)) == 1


def test_row45_relayclient_suffix_from_startup_is_replaced_by_auth(auth, smtpd):
    """§8.5 (2): the relay right after AUTH has an empty suffix."""
    auth.setenv(RELAYCLIENT="@relay.suffix")
    c = smtpd.connect()
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    run = c.txn(rcpts=(b"RCPT TO:<x@far.away>",))
    assert run.E == b"Fa@b\0Tx@far.away\0\0"
    assert run.env[b"RELAYCLIENT"] == b""


def test_auth_before_helo_is_allowed(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    run = c.txn(rcpts=(b"RCPT TO:<x@far.away>",))
    assert run.message == received(None) + b"hi\n"


def test_tcpremoteinfo_is_replaced_by_the_auth_user(auth, smtpd):
    auth.setenv(TCPREMOTEINFO="ident")
    c = smtpd.connect()
    assert c.cmd(b"HELO client.example.com") == b"250 mx.example.org\r\n"
    run = c.txn()
    assert run.message == received(None, b"ident@", b"SMTP") + b"hi\n"
    assert c.cmd(b"AUTH LOGIN " + b64(b"user")) == PASS334
    assert c.cmd(b64(b"secret")) == OK235
    run = c.txn()
    assert run.message == received(None) + b"hi\n"
    assert run.env[b"TCPREMOTEINFO"] == b"user"
    assert run.env[b"SMTPAUTHMETHOD"] == b"login"


def test_row47_login_with_initial_response(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"AUTH LOGIN dXNlcg==") == PASS334
    assert c.cmd(b"c2VjcmV0") == OK235
    assert one_checkpw_run(auth)["fd3"] == GOOD_FD3


def test_login_with_prompts_and_case_insensitive_words(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"auth login") == USER334
    assert c.cmd(b"dXNlcg==") == PASS334
    assert c.cmd(b"c2VjcmV0") == OK235
    assert one_checkpw_run(auth)["fd3"] == GOOD_FD3


def test_auth_exchange_is_pipelined(auth, smtpd):
    """§8.2: exchange lines share the command buffer: a whole AUTH in one write."""
    c = smtpd.connect()
    c.send(b"EHLO c\r\nAUTH LOGIN\r\ndXNlcg==\r\nc2VjcmV0\r\nMAIL FROM:<a@b>\r\n"
           b"RCPT TO:<x@far.away>\r\nDATA\r\n")
    assert c.replies(7) == [EHLO_AUTH, USER334, PASS334, OK235, OK, OK, GO]
    c.send(b"hi\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.E == b"Fa@b\0Tx@far.away\0\0"
    assert run.message == received() + b"hi\n"


@pytest.mark.parametrize("response", [
    b"\0user\0secret",
    b"authz\0user\0secret",            # authzid ignored
    b"\0user\0secret\0more\0",         # after a third NUL: ignored
])
def test_plain_decoding(auth, smtpd, response):
    c = smtpd.connect()
    assert c.cmd(b"AUTH PLAIN") == PLAIN334
    assert c.cmd(b64(response)) == OK235
    assert one_checkpw_run(auth)["fd3"] == GOOD_FD3


def test_plain_with_several_spaces_before_the_initial_response(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"AUTH   Plain   " + PLAIN_GOOD) == OK235


def test_row52_cram_md5(auth, smtpd):
    c = smtpd.connect()
    challenge, digest = cram_md5(c)
    assert c.reply() == OK235
    cp = one_checkpw_run(auth)
    assert cp["fd3"] == b"user\0" + digest + b"\0" + challenge + b"\0"
    assert_child_contract(cp, auth)
    run = c.txn(rcpts=(b"RCPT TO:<x@far.away>",))
    assert run.message == received(None) + b"hi\n"
    assert run.env[b"SMTPAUTHMETHOD"] == b"cram-md5"


def test_cram_md5_initial_response_is_ignored(auth, smtpd):
    c = smtpd.connect()
    challenge, digest = cram_md5(c, command=b"AUTH CRAM-MD5 " + b64(b"user junk"))
    assert c.reply() == OK235
    assert one_checkpw_run(auth)["fd3"] == b"user\0" + digest + b"\0" + challenge + b"\0"


def test_row53_auth_parameter_is_ignored(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"MAIL FROM:<a@b> AUTH=spoof") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == RH553
    assert c.cmd(b"RCPT TO:<x@example.org>") == OK
    assert c.cmd(b"DATA") == GO
    c.send(b"hi\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.message == received(None, b"", b"SMTP") + b"hi\n"
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    assert b"TCPREMOTEINFO" not in run.env and b"RELAYCLIENT" not in run.env
    assert checkpw_runs(auth) == []


# ---------------------------------------------------------------- rows 48-51

def test_row48_cancel_malformed_unknown(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"AUTH PLAIN") == PLAIN334
    assert c.cmd(b"*") == CANCEL501
    assert c.cmd(b"AUTH LOGIN") == USER334
    assert c.cmd(b"") == MAL501
    assert c.cmd(b"AUTH FOO") == TYPE504
    assert c.cmd(b"AUTH") == TYPE504
    assert c.cmd(b"AUTH PLAIN !!!!") == MAL501
    assert c.cmd(b"AUTH PLAINX " + PLAIN_GOOD) == TYPE504
    assert checkpw_runs(auth) == []
    # none of that changed any state
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235


# where `*`, an empty line, bad base64 and an over-long line can arrive
PROMPTS = {
    "plain": ([b"AUTH PLAIN"], [PLAIN334]),
    "login-user": ([b"AUTH LOGIN"], [USER334]),
    "login-password": ([b"AUTH LOGIN", b"dXNlcg=="], [USER334, PASS334]),
    "login-password-initial": ([b"AUTH LOGIN dXNlcg=="], [PASS334]),
    "cram": ([b"AUTH CRAM-MD5"], None),
}


def to_prompt(c, name):
    lines, replies = PROMPTS[name]
    for i, line in enumerate(lines):
        r = c.cmd(line)
        if replies is None:
            assert re.fullmatch(rb"334 [A-Za-z0-9+/]+=*\r\n", r), r
        else:
            assert r == replies[i]


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_star_cancels_at_each_prompt(auth, smtpd, prompt):
    c = smtpd.connect()
    to_prompt(c, prompt)
    assert c.cmd(b"*") == CANCEL501
    assert c.cmd(b"NOOP") == OK
    assert checkpw_runs(auth) == []


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_empty_line_at_each_prompt_is_malformed(auth, smtpd, prompt):
    c = smtpd.connect()
    to_prompt(c, prompt)
    assert c.cmd(b"") == MAL501
    assert checkpw_runs(auth) == []


BAD_BASE64 = [b"!!!!", b"dXN", b"dXNlc", b"dXNlcg=", b"dXNlcg===", b"=dXN", b"dXNl\tcg==",
              b"dXNl*g==", b"AHVzZXIAc2VjcmV0=", b"AHVzZXIAc2VjcmV"]


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_bad_base64_at_each_prompt(auth, smtpd, prompt):
    """§8.2 (D6): input that does not decode cleanly is 501 and changes nothing;
    for a LOGIN user the 501 comes at once, without the password prompt."""
    c = smtpd.connect()
    for bad in BAD_BASE64:
        to_prompt(c, prompt)
        assert c.cmd(bad) == MAL501, bad
    assert checkpw_runs(auth) == []
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235


@pytest.mark.parametrize("bad", BAD_BASE64)
def test_bad_base64_initial_response(auth, smtpd, bad):
    c = smtpd.connect()
    assert c.cmd(b"AUTH PLAIN " + bad) == MAL501
    assert c.cmd(b"AUTH LOGIN " + bad) == MAL501
    assert checkpw_runs(auth) == []


@pytest.mark.parametrize("response", [
    b"\0\0secret",          # empty user
    b"\0user\0",            # empty password
    b"user\0secret",        # one NUL only
    b"usersecret",          # none
    b"",                    # nothing: an empty line after the prompt
])
def test_plain_malformed_credentials(auth, smtpd, response):
    c = smtpd.connect()
    if response:
        assert c.cmd(b"AUTH PLAIN " + b64(response)) == MAL501
    assert c.cmd(b"AUTH PLAIN") == PLAIN334
    assert c.cmd(b64(response)) == MAL501
    assert checkpw_runs(auth) == []


def test_login_nul_or_empty(auth, smtpd):
    c = smtpd.connect()
    # NUL in the user: 501 at once, no password prompt
    assert c.cmd(b"AUTH LOGIN") == USER334
    assert c.cmd(b64(b"us\0er")) == MAL501
    assert c.cmd(b"AUTH LOGIN " + b64(b"user\0")) == MAL501
    # NUL in the password
    assert c.cmd(b"AUTH LOGIN " + b64(b"user")) == PASS334
    assert c.cmd(b64(b"sec\0ret")) == MAL501
    assert c.cmd(b"AUTH LOGIN") == USER334
    assert c.cmd(b64(b"user")) == PASS334
    assert c.cmd(b64(b"\0")) == MAL501
    assert checkpw_runs(auth) == []
    assert c.cmd(b"AUTH LOGIN") == USER334
    assert c.cmd(b64(b"user")) == PASS334
    assert c.cmd(b64(b"secret")) == OK235


@pytest.mark.parametrize("response", [b"usernospace", b"user ", b" 0123abcd", b"us\0er 0123abcd",
                                      b"user 0123\0abcd"])
def test_cram_md5_malformed(auth, smtpd, response):
    c = smtpd.connect()
    r = c.cmd(b"AUTH CRAM-MD5")
    assert r.startswith(b"334 "), r
    assert c.cmd(b64(response)) == MAL501
    assert checkpw_runs(auth) == []


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_auth_line_at_limit_and_over(auth, smtpd, prompt):
    """§2.7 (D4): an AUTH line of 65536 bytes before its LF (CR included) is read;
    one byte more is `421 out of memory (#4.3.0)`, exit 1."""
    c = smtpd.connect(timeout=10)
    to_prompt(c, prompt)
    c.send(b"A" * 65535 + b"\r\n")
    assert c.reply() == MAL501
    to_prompt(c, prompt)
    c.send(b"A" * 65536 + b"\r\n")
    assert c.rest(timeout=10) == OOM421
    assert c.status() == 1


def test_auth_command_over_limit(auth, smtpd):
    c = smtpd.connect(timeout=10)
    c.send(b"AUTH PLAIN " + b"A" * 70000 + b"\r\n")
    assert c.rest(timeout=10) == OOM421
    assert c.status() == 1


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_eof_inside_auth_exits_silently(auth, smtpd, prompt):
    c = smtpd.connect()
    to_prompt(c, prompt)
    c.shutdown_write()
    assert c.rest() == b""
    c.assert_clean_exit(1)
    assert checkpw_runs(auth) == []


def test_row49_auth_after_mail_and_twice(auth, smtpd):
    c = smtpd.connect()
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == INTXN503
    assert c.cmd(b"AUTH LOGIN") == INTXN503
    assert c.cmd(b"AUTH FOO") == INTXN503         # checked before the mechanism
    assert c.cmd(b"RSET") == FLUSHED
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == AGAIN503
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"AUTH FOO") == AGAIN503         # checked before the transaction
    assert len(checkpw_runs(auth)) == 1


def test_row49_smtpauth_dash(auth, smtpd):
    auth.setenv(SMTPAUTH="-")
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                b"250 SIZE 0\r\n")
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == NOTAVAIL503
    assert c.cmd(b"AUTH") == NOTAVAIL503
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == NOTAVAIL503
    assert checkpw_runs(auth) == []


def test_row50_auth_required(auth, smtpd):
    auth.setenv(SMTPAUTH="!")
    c = smtpd.connect()
    assert c.cmd(b"MAIL FROM:<a@b>") == REQUIRED530
    assert c.cmd(b"RCPT TO:<x@example.org>") == MF503
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert one_checkpw_run(auth)["fd3"] == GOOD_FD3


def test_row51_size_over_databytes(auth, smtpd):
    auth.setenv(DATABYTES="100000")
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                b"250-SIZE 100000\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n")
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=100001") == SIZE552
    assert c.cmd(b"RCPT TO:<x@example.org>") == MF503
    assert c.cmd(b"MAIL FROM:<a@b> size=100000") == OK
    assert c.cmd(b"MAIL FROM:<c@d> BODY=8BITMIME SIZE=100001x") == SIZE552
    # the failed MAIL left the previous transaction (§4.3)
    assert c.cmd(b"RCPT TO:<x@example.org>") == OK
    assert c.cmd(b"DATA") == GO
    c.send(b"hi\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.E == b"Fa@b\0Tx@example.org\0\0"
    # `>` before offset 5: parameters not parsed
    assert c.cmd(b"MAIL <a@b> SIZE=100001") == OK
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=abc") == OK


def test_size_is_the_effective_databytes(auth, smtpd):
    """§4.5 (5), §2.2: DATABYTES over control/databytes; 4294967295 becomes 4294967294."""
    auth.control("databytes", "5\n")
    auth.setenv(DATABYTES="4294967295")
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                b"250-SIZE 4294967294\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n")
    auth.setenv(DATABYTES=None)
    c = smtpd.connect()
    assert c.cmd(b"EHLO c") == (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                b"250-SIZE 5\r\n250 AUTH LOGIN PLAIN CRAM-MD5\r\n")
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=6") == SIZE552


def test_timeout_inside_auth_exchange(auth, smtpd):
    auth.control("timeoutsmtpd", "1\n")
    c = smtpd.connect()
    assert c.cmd(b"AUTH LOGIN") == USER334
    t = time.monotonic()
    assert c.rest(timeout=10) == b"451 timeout (#4.4.2)\r\n"
    assert 0.9 <= time.monotonic() - t < 4
    assert c.status() == 1
    assert checkpw_runs(auth) == []


def test_checkprogram_gets_the_current_environment(auth, smtpd):
    """§2.4: plugin S/U edits reach the checkprogram."""
    auth.control("smtpplugins", "[helo]\n:printf 'SFOO=bar\\nUTCPREMOTEHOST\\n'\n")
    c = smtpd.connect()
    assert c.cmd(b"HELO h") == b"250 mx.example.org\r\n"
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    env = one_checkpw_run(auth)["env"]
    assert env[b"FOO"] == b"bar"
    assert b"TCPREMOTEHOST" not in env
    assert env[b"SMTPHELOHOST"] == b"h"


# ---------------------------------------------------------------- §8.1 SMTPAUTH

SMTPAUTH_TABLE = [
    # value, EHLO AUTH mechanisms (None: no AUTH line), required before MAIL
    (None, b"LOGIN PLAIN CRAM-MD5", False),
    ("-", None, False),
    ("!", b"LOGIN PLAIN", True),
    ("!+cram", b"LOGIN PLAIN CRAM-MD5", True),
    ("!+CRAM-MD5", b"LOGIN PLAIN CRAM-MD5", True),
    ("!cram", b"CRAM-MD5", True),
    ("!Cram-md5", b"CRAM-MD5", True),
    ("+cram", b"LOGIN PLAIN CRAM-MD5", False),
    ("+CRAMx", b"LOGIN PLAIN CRAM-MD5", False),
    ("cram", b"CRAM-MD5", False),
    ("CRAM-MD5", b"CRAM-MD5", False),
    ("", b"LOGIN PLAIN", False),
    ("login", b"LOGIN PLAIN", False),
    ("!x", b"LOGIN PLAIN", False),
    ("-x", b"LOGIN PLAIN", False),
    (" !", b"LOGIN PLAIN", False),
    ("! ", b"LOGIN PLAIN", False),
]


@pytest.mark.parametrize("value, mechs, required", SMTPAUTH_TABLE,
                         ids=[repr(v[0]) for v in SMTPAUTH_TABLE])
def test_smtpauth_table(auth, smtpd, value, mechs, required):
    auth.setenv(SMTPAUTH=value)
    c = smtpd.connect()
    ehlo = b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    ehlo += b"250 SIZE 0\r\n" if mechs is None else b"250-SIZE 0\r\n250 AUTH " + mechs + b"\r\n"
    assert c.cmd(b"EHLO c") == ehlo
    if required:
        assert c.cmd(b"MAIL FROM:<a@b>") == REQUIRED530
    else:
        assert c.cmd(b"MAIL FROM:<a@b>") == OK
        assert c.cmd(b"RSET") == FLUSHED
    if mechs is None:
        assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == NOTAVAIL503
        return
    # every mechanism works whatever is advertised (D6): use the unadvertised one
    if mechs == b"CRAM-MD5":
        assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    else:
        cram_md5(c)
        assert c.reply() == OK235
    assert c.cmd(b"MAIL FROM:<a@b>") == OK


# ---------------------------------------------------------------- §8.4 outcomes

def test_checkprogram_killed_by_a_signal(home, smtpd):
    auth_mode(home, ["mx.example.org", "bin/checkpw-kill", "/bin/true"])
    c = smtpd.connect()
    t = time.monotonic()
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == CHILD454
    assert time.monotonic() - t < 3, "454 comes without the 535 delay"
    assert one_checkpw_run(home)["fd3"] == GOOD_FD3
    # not authenticated, state unchanged
    assert c.cmd(b"MAIL FROM:<a@b>") == OK
    assert c.cmd(b"RCPT TO:<x@far.away>") == RH553


def test_delayed_failures_run_concurrently(home, smtpd):
    """Every path to `535 authentication failed (#5.7.1)`, each after ≥ 5 s and < 8 s,
    on concurrent connections (a delay must not hold up another connection)."""
    install_checkpw(home)
    home.write("bin/checkpw-noexec", "#!/bin/sh\nexit 0\n", mode=0o644)
    cases = {}

    def connect(args, plugins=""):
        home.args = list(args)
        home.control("smtpplugins", plugins)
        return smtpd.connect(timeout=10)   # the greeting is read: qspp has its settings

    def timed(c, line, want=FAIL535):
        t = time.monotonic()
        c.send(line + b"\r\n")
        r = c.reply(timeout=12)
        dt = time.monotonic() - t
        assert r == want
        assert 5 <= dt < 8, f"535 after {dt:.2f}s"

    def row46(c):
        assert c.cmd(b"AUTH LOGIN") == USER334
        assert c.cmd(b"dXNlcg==") == PASS334
        timed(c, b"d3Jvbmc=")                          # "wrong"
        assert c.cmd(b"MAIL FROM:<a@b>") == OK
        assert c.cmd(b"RCPT TO:<x@far.away>") == RH553
        # no retry limit; the failure changed nothing
        assert c.cmd(b"RSET") == FLUSHED
        assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
        assert c.cmd(b"MAIL FROM:<a@b>") == OK
        assert c.cmd(b"RCPT TO:<x@far.away>") == OK
    cases["row46"] = (connect(AUTH_ARGS), row46, [b"user\0wrong\0\0", GOOD_FD3])

    def slash_rule(c):
        # read as HOST CHECK, /bin/true would be the checkprogram and accept this
        timed(c, b"AUTH PLAIN " + b64(b"\0user\0wrong2"))
    cases["slash"] = (connect(["bin/checkpw", "/bin/true"]), slash_rule, [b"user\0wrong2\0\0"])

    def noexec(c):
        timed(c, b"AUTH PLAIN " + PLAIN_GOOD)
        assert c.cmd(b"MAIL FROM:<a@b>") == OK
        assert c.cmd(b"RCPT TO:<x@far.away>") == RH553
    cases["noexec"] = (connect(["mx.example.org", "bin/checkpw-noexec", "/bin/true"]), noexec, [])
    cases["missing"] = (connect(["mx.example.org", "bin/nonexistent", "/bin/true"]), noexec, [])

    def cram_wrong(c):
        r = c.cmd(b"AUTH CRAM-MD5")
        assert r.startswith(b"334 ")
        challenge = base64.b64decode(r[4:-2])
        digest = hmac.new(b"wrong", challenge, "md5").hexdigest().encode()
        timed(c, b64(b"user " + digest))
        c.cram = (challenge, digest, b"user")
    cases["cram"] = (connect(AUTH_ARGS), cram_wrong, None)

    def cram_space(c):
        # §8.3: split at the last space: user `us er`, which the checkprogram refuses
        r = c.cmd(b"AUTH CRAM-MD5")
        assert r.startswith(b"334 ")
        challenge = base64.b64decode(r[4:-2])
        digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
        timed(c, b64(b"us er " + digest))
        c.cram = (challenge, digest, b"us er")
    cases["cram-space"] = (connect(AUTH_ARGS), cram_space, None)

    def subprogram_fails(c):
        timed(c, b"AUTH PLAIN " + b64(b"\0user\0secret"))
    cases["false"] = (connect(["mx.example.org", "bin/checkpw", "/bin/false"]),
                      subprogram_fails, [GOOD_FD3])

    def plugin_not_run(c):
        timed(c, b"AUTH PLAIN " + b64(b"\0user\0wrong3"))
    cases["plugin"] = (connect(AUTH_ARGS, "[auth]\n:echo E554 plugin ran\n"), plugin_not_run,
                       [b"user\0wrong3\0\0"])
    home.control("smtpplugins", "")

    errors = {}

    def run(name, c, fn):
        try:
            fn(c)
        except BaseException as e:  # reported below, in the test's thread
            errors[name] = e

    threads = [threading.Thread(target=run, args=(name, c, fn), daemon=True)
               for name, (c, fn, _) in cases.items()]
    for t in threads:
        t.start()
    # meanwhile a good AUTH on another connection is answered at once
    time.sleep(0.5)
    fast = connect(AUTH_ARGS)
    t0 = time.monotonic()
    assert fast.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    assert time.monotonic() - t0 < 3
    for t in threads:
        t.join(timeout=30)
    assert not [t for t in threads if t.is_alive()]
    if errors:
        name, e = sorted(errors.items())[0]
        raise AssertionError(f"case {name}: {e!r}") from e

    runs = checkpw_runs(home)
    by_parent = {}
    for r in runs:
        by_parent.setdefault(r["ppid"], []).append(r)
    for name, (c, fn, fd3s) in cases.items():
        got = [r["fd3"] for r in by_parent.get(c.pid(), [])]
        if fd3s is None:
            challenge, digest, user = c.cram
            fd3s = [user + b"\0" + digest + b"\0" + challenge + b"\0"]
        assert got == fd3s, name
    for name in ("noexec", "missing"):
        c = cases[name][0]
        assert c.cmd(b"QUIT") == b"221 mx.example.org\r\n"
        lines = c.stderr_lines()
        # the cause, then the auth-failed line every 535 gets (issue 11)
        assert len(lines) == 2 and lines[0].startswith(b"qspp: pid %d: cannot " % c.pid()), (
            name, lines)
        assert lines[1] == b"qspp: pid %d: auth-failed ip=192.0.2.7 mechanism=plain user=user" % (
            c.pid()), (name, lines)


# ---------------------------------------------------------------- spp.md [auth]

SPP_EHLO = (b"250-test.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n"
            b"250 AUTH LOGIN PLAIN CRAM-MD5\r\n")
XU = r'''[rcpt]
:echo "HX-U: ${SMTPAUTHUSER-unset} ${SMTPAUTHMETHOD-unset} $SMTPRCPTHOSTSOK"
'''


def spp_received(info=b"", proto=b"SMTP"):
    return (b"Received: from client.example (HELO h) (" + info + b"192.0.2.1)\n"
            b"  by 127.0.0.1 with " + proto + b"; <D>\n")


def spp_auth_dialogue(c):
    assert c.cmd(b"EHLO h") == SPP_EHLO
    return c.cmd(b"AUTH PLAIN " + b64(b"\0user\0secret"))


def test_spp_row46_refusing_auth_plugin(spp_home, smtpd):
    auth_mode(spp_home, ["test.example", "bin/checkpw", "/bin/true"])
    spp_home.control("smtpplugins", "[auth]\n:echo E535 no\n" + XU)
    c = smtpd.connect(greet=b"220 test.example ESMTP\r\n")
    t = time.monotonic()
    assert spp_auth_dialogue(c) == b"535 no\r\n"
    assert time.monotonic() - t < 3   # the plugin's reply; no checkprogram delay
    assert one_checkpw_run(spp_home)["fd3"] == GOOD_FD3
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<r@far.example>") == RH553
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"DATA") == GO
    c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.message == (spp_received() + b"X-U: unset unset 0\nX-U: unset unset 1\n"
                           b"Subject: t\n\nbody\n")
    assert run.E == b"Fa@b.example\0Tx@example.com\0\0"
    for name in (b"SMTPAUTHUSER", b"SMTPAUTHMETHOD", b"TCPREMOTEINFO", b"RELAYCLIENT"):
        assert name not in run.env
    # not authenticated: AUTH is accepted again (and refused again by the plugin)
    assert c.cmd(b"RSET") == FLUSHED
    assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == b"535 no\r\n"


def test_spp_row46_silent_auth_plugin(spp_home, smtpd):
    auth_mode(spp_home, ["test.example", "bin/checkpw", "/bin/true"])
    spp_home.control("smtpplugins", "[auth]\n:true\n" + XU)
    c = smtpd.connect(greet=b"220 test.example ESMTP\r\n")
    assert spp_auth_dialogue(c) == OK235
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<r@far.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"DATA") == GO
    c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.message == (spp_received(b"user@", b"ESMTPA") +
                           b"X-U: user plain 1\nX-U: user plain 1\nSubject: t\n\nbody\n")
    assert run.E == b"Fa@b.example\0Tr@far.example\0Tx@example.com\0\0"


@pytest.mark.parametrize("mech", ["login", "plain", "cram-md5"])
def test_spp_auth_plugin_sees_user_and_method(spp_home, smtpd, mech):
    auth_mode(spp_home, ["test.example", "bin/checkpw", "/bin/true"])
    spp_home.control("smtpplugins",
                     '[auth]\n:echo "HX-A: $SMTPAUTHUSER $SMTPAUTHMETHOD $TCPREMOTEINFO"\n')
    c = smtpd.connect(greet=b"220 test.example ESMTP\r\n")
    assert c.cmd(b"EHLO h") == SPP_EHLO
    if mech == "login":
        assert c.cmd(b"AUTH LOGIN " + b64(b"user")) == PASS334
        assert c.cmd(b64(b"secret")) == OK235
    elif mech == "plain":
        assert c.cmd(b"AUTH PLAIN " + PLAIN_GOOD) == OK235
    else:
        cram_md5(c, host=b"test.example")
        assert c.reply() == OK235
    run = c.txn(b"MAIL FROM:<a@b.example>", (b"RCPT TO:<x@far.example>",),
                b"Subject: t\r\n\r\nbody\r\n")
    # the hook runs before TCPREMOTEINFO is set (spp.md §3.1)
    assert run.message == (spp_received(b"user@", b"ESMTPA") +
                           b"X-A: user " + mech.encode() + b" \nSubject: t\n\nbody\n")


# ---------------------------------------------------------------- smtplib

@pytest.mark.parametrize("mech, initial", [("LOGIN", False), ("LOGIN", True), ("PLAIN", False),
                                           ("PLAIN", True), ("CRAM-MD5", False)])
def test_smtplib_auth(auth, smtpd, mech, initial):
    smtpd.start()
    s = smtplib.SMTP("127.0.0.1", smtpd.port, local_hostname="c", timeout=10)
    try:
        assert s.ehlo() == (250, b"mx.example.org\nPIPELINING\n8BITMIME\nSIZE 0\n"
                                 b"AUTH LOGIN PLAIN CRAM-MD5")
        assert s.has_extn("auth") and s.has_extn("size")
        s.user, s.password = "user", "secret"
        method = {"LOGIN": s.auth_login, "PLAIN": s.auth_plain, "CRAM-MD5": s.auth_cram_md5}[mech]
        assert s.auth(mech, method, initial_response_ok=initial) == (235, b"ok, go ahead (#2.0.0)")
        assert s.sendmail("a@b.c", ["x@far.away"], b"Subject: s\r\n\r\nbody\r\n") == {}
    finally:
        s.quit()
    (run,) = auth.new_runs()
    assert run.E == b"Fa@b.c\0Tx@far.away\0\0"
    assert run.message == received() + b"Subject: s\n\nbody\n"
    assert run.env[b"SMTPAUTHMETHOD"] == mech.lower().encode()
    fd3 = one_checkpw_run(auth)["fd3"]
    if mech == "CRAM-MD5":
        m = re.fullmatch(rb"user\0([0-9a-f]{32})\0(<\d+\.\d+@mx\.example\.org>)\0", fd3)
        assert m, fd3
        assert m.group(1) == hmac.new(b"secret", m.group(2), "md5").hexdigest().encode()
    else:
        assert fd3 == GOOD_FD3


# ---------------------------------------------------------------- swaks

def swaks(smtpd, *args, timeout=60):
    if SWAKS is None:
        pytest.skip("swaks is not installed")
    smtpd.start()
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(smtpd.port),
                           "--timeout", "15", *args], capture_output=True, timeout=timeout)


def qspp_pids(smtpd):
    return [int(p.read_text()) for p in smtpd.state.glob("*.pid")]


@pytest.mark.parametrize("mech", ["LOGIN", "PLAIN", "CRAM-MD5"])
def test_swaks_auth(auth, smtpd, mech):
    p = swaks(smtpd, "--auth", mech, "--auth-user", "user", "--auth-password", "secret",
              "--from", "a@b.c", "--to", "x@far.away", "--helo", "h.example",
              "--data", "Subject: swaks\n\nhello")
    assert p.returncode == 0, p.stdout + p.stderr
    assert b"<-  235 ok, go ahead (#2.0.0)" in p.stdout
    m = re.search(rb"<-  250 ok \d+ qp (\d+)\r?\n", p.stdout)
    assert m, p.stdout
    run = auth.run(int(m.group(1)))
    assert run.E == b"Fa@b.c\0Tx@far.away\0\0"
    assert run.message == received(b"h.example") + b"Subject: swaks\n\nhello\n"
    fd3 = one_checkpw_run(auth)["fd3"]
    if mech == "CRAM-MD5":
        (pid,) = qspp_pids(smtpd)
        m = re.fullmatch(rb"user\0([0-9a-f]{32})\0(<(\d+)\.\d+@mx\.example\.org>)\0", fd3)
        assert m, fd3
        assert int(m.group(3)) == pid
        assert m.group(1) == hmac.new(b"secret", m.group(2), "md5").hexdigest().encode()
    else:
        assert fd3 == GOOD_FD3


def test_swaks_auth_required(auth, smtpd):
    auth.setenv(SMTPAUTH="!")
    p = swaks(smtpd, "--from", "a@b.c", "--to", "x@example.org")
    assert b"<** 530 Authorization required (#5.7.1) " in p.stdout, p.stdout
    assert p.returncode != 0
    auth.assert_no_new_runs()
