"""samples/plugins/greylist: the state machine, expiry, pruning, locking and concurrency."""

import fcntl
import os

import pytest

from .helpers import run_plugin, start_plugin

GREY = b"E451 4.7.1 Greylisted, please try again later\n"
HEADER = "# greylist state v1: network sender recipient first_seen last_seen passes\n"
T = 1700000000
DAY = 86400
ENV = {"TCPREMOTEIP": "192.0.2.9", "SMTPMAILFROM": "Sender@Example.NET",
       "SMTPRCPTTO": "User@Example.ORG"}
KEY = "192.0.2.0/24 sender@example.net user@example.org"


def grey(home, now, *args, **env):
    full = dict(ENV, GREYLIST_NOW=str(now))
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    return run_plugin("greylist", *args, env=full, cwd=home)


def state(home, name="greylist.db"):
    return (home / name).read_text()


def entries(home, name="greylist.db"):
    text = state(home, name)
    assert text.startswith(HEADER)
    return [line.split() for line in text[len(HEADER):].splitlines()]


def test_first_attempt_greylisted_and_recorded(home):
    r = grey(home, T)
    assert (r.out, r.err, r.code) == (GREY, b"", 0)
    assert state(home) == HEADER + "%s %d %d 0\n" % (KEY, T, T)
    assert oct((home / "greylist.db").stat().st_mode & 0o777) == "0o600"
    assert not (home / "greylist.db.tmp").exists()


def test_retry_before_delay_greylisted_then_passes(home):
    assert grey(home, T).out == GREY
    assert grey(home, T + 299).out == GREY
    assert state(home) == HEADER + "%s %d %d 0\n" % (KEY, T, T + 299)
    r = grey(home, T + 300)
    assert (r.out, r.err, r.code) == (b"", b"", 0)
    assert state(home) == HEADER + "%s %d %d 1\n" % (KEY, T, T + 300)
    # Passed: later messages pass at once, counted.
    assert grey(home, T + DAY).out == b""
    assert state(home) == HEADER + "%s %d %d 2\n" % (KEY, T, T + DAY)


def test_key_is_network_and_lowercased_addresses(home):
    assert grey(home, T).out == GREY
    assert grey(home, T + 300, TCPREMOTEIP="192.0.2.200", SMTPMAILFROM="sender@example.net",
                SMTPRCPTTO="USER@example.org").out == b""
    assert grey(home, T + 300, TCPREMOTEIP="192.0.3.9").out == GREY
    assert grey(home, T + 300, SMTPRCPTTO="other@example.org").out == GREY
    assert grey(home, T + 300, SMTPMAILFROM="").out == GREY
    assert [e[:3] for e in entries(home)] == [
        KEY.split(), ["192.0.3.0/24", "sender@example.net", "user@example.org"],
        ["192.0.2.0/24", "sender@example.net", "other@example.org"],
        ["192.0.2.0/24", "<>", "user@example.org"]]


def test_delay_options_and_environment(home):
    assert grey(home, T, "--delay", "10m").out == GREY
    assert grey(home, T + 599, "--delay=10m").out == GREY
    assert grey(home, T + 600, "--delay=10m").out == b""
    assert grey(home, T, SMTPRCPTTO="b@x", GREYLIST_DELAY="60").out == GREY
    assert grey(home, T + 60, SMTPRCPTTO="b@x", GREYLIST_DELAY="60").out == b""
    assert grey(home, T, "--delay", "0", SMTPRCPTTO="c@x").out == GREY
    assert grey(home, T, "--delay", "0", SMTPRCPTTO="c@x").out == b""


def test_unconfirmed_entry_expires_after_retry_window(home):
    assert grey(home, T).out == GREY
    assert grey(home, T + 4 * 3600 + 1).out == GREY          # too late: starts over
    assert state(home) == HEADER + "%s %d %d 0\n" % (KEY, T + 4 * 3600 + 1, T + 4 * 3600 + 1)
    assert grey(home, T + 4 * 3600 + 301).out == b""
    # At exactly the window's end a retry still passes.
    assert grey(home, T, "--retry-window", "1h", SMTPRCPTTO="w@x").out == GREY
    assert grey(home, T + 3600, "--retry-window", "1h", SMTPRCPTTO="w@x").out == b""


def test_passed_entry_expires_after_last_use(home):
    assert grey(home, T).out == GREY
    assert grey(home, T + 300).out == b""
    assert grey(home, T + 300 + 35 * DAY).out == b""          # refreshes last_seen
    assert grey(home, T + 300 + 70 * DAY).out == b""
    assert grey(home, T + 300 + 106 * DAY + 1).out == GREY    # unused for > 36 days
    assert entries(home) == [KEY.split() + [str(T + 300 + 106 * DAY + 1)] * 2 + ["0"]]
    assert grey(home, T, "--expire", "1d", SMTPRCPTTO="e@x").out == GREY
    assert grey(home, T + 300, "--expire", "1d", SMTPRCPTTO="e@x").out == b""
    assert grey(home, T + 300 + DAY + 1, "--expire", "1d", SMTPRCPTTO="e@x").out == GREY


def test_expired_entries_pruned_by_any_run(home):
    for rcpt in ("a@x", "b@x", "c@x"):
        assert grey(home, T, SMTPRCPTTO=rcpt).out == GREY
    assert grey(home, T + 300, SMTPRCPTTO="c@x").out == b""   # c passed
    assert len(entries(home)) == 3
    assert grey(home, T + 5 * 3600, SMTPRCPTTO="d@x").out == GREY
    # a and b never came back within 4 h: gone; c passed and stays.
    assert [e[2] for e in entries(home)] == ["c@x", "d@x"]
    assert grey(home, T + 300 + 37 * DAY, SMTPRCPTTO="e@x").out == GREY
    assert [e[2] for e in entries(home)] == ["e@x"]


def test_max_entries_cap(home):
    cap = ("--max-entries", "3")
    assert grey(home, T, *cap, SMTPRCPTTO="p@x").out == GREY
    assert grey(home, T + 300, *cap, SMTPRCPTTO="p@x").out == b""      # p passed
    for i, rcpt in enumerate(["a@x", "b@x", "c@x", "d@x"]):
        assert grey(home, T + 400 + i, *cap, SMTPRCPTTO=rcpt).out == GREY
        assert len(entries(home)) <= 3
    # Unconfirmed keys go first, oldest first; the passed key and the newest stay.
    assert [e[2] for e in entries(home)] == ["p@x", "c@x", "d@x"]


def test_relay_clients_and_skip_pass_without_state(home):
    for extra in ({"RELAYCLIENT": ""}, {"SMTPAUTHUSER": "user"}, {"GREYLIST_SKIP": ""}):
        r = grey(home, T, **extra)
        assert (r.out, r.err, r.code) == (b"", b"", 0)
    assert not (home / "greylist.db").exists()
    assert grey(home, T, SMTPAUTHUSER="").out == GREY          # empty: not authenticated


def test_address_encoding_keeps_lines_short(home):
    assert grey(home, T, SMTPMAILFROM=b"j\xf6rg doe%<x>@Example.com",
                SMTPRCPTTO="a" * 5000 + "@example.org").out == GREY
    (line,) = entries(home)
    assert line[1] == "j%F6rg%20doe%25%3Cx%3E@example.com"
    assert line[2] == "a" * 256
    # The same long address finds its entry again.
    assert grey(home, T + 300, SMTPMAILFROM=b"j\xf6rg doe%<x>@Example.com",
                SMTPRCPTTO="a" * 5000 + "@example.org").out == b""


@pytest.mark.parametrize("ip, network", [
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:DB8::1", "2001:db8:0:0::/64"),
    ("::ffff:198.51.100.7", "198.51.100.0/24"),
])
def test_networks(home, ip, network):
    assert grey(home, T, TCPREMOTEIP=ip).out == GREY
    assert entries(home)[0][0] == network


@pytest.mark.parametrize("env, message", [
    ({"TCPREMOTEIP": None}, b"TCPREMOTEIP not set, not greylisting"),
    ({"SMTPMAILFROM": None}, b"SMTPMAILFROM not set, not greylisting"),
    ({"SMTPRCPTTO": None}, b"SMTPRCPTTO not set, not greylisting"),
    ({"TCPREMOTEIP": "192.0.2"}, b"is not an IP address"),
    ({"TCPREMOTEIP": "2001:zz::1"}, b"is not an IP address"),
])
def test_missing_or_bad_variables_fail_open(home, env, message):
    r = grey(home, T, **env)
    assert (r.out, r.code) == (b"", 1)
    assert b"greylist: pid " in r.err and message in r.err


@pytest.mark.parametrize("args, message", [
    (("--delay", "soon"), b"--delay: invalid duration 'soon'"),
    (("--delay", "-5"), b"invalid duration"),
    (("--delay", "5h"), b"--retry-window must not be shorter than --delay"),
    (("--max-entries", "0"), b"--max-entries needs a positive integer"),
    (("--lock-timeout", "x"), b"--lock-timeout 0 to 3600 s"),
    (("--frob",), b"unknown argument --frob"),
    (("--file",), b"--file needs a value"),
])
def test_usage_errors_fail_open(home, args, message):
    r = grey(home, T, *args)
    assert (r.out, r.code) == (b"", 1)
    assert message in r.err


def test_file_option_and_environment(home):
    (home / "spp").mkdir()
    assert grey(home, T, "--file", "spp/grey").out == GREY
    assert entries(home, "spp/grey")[0][:3] == KEY.split()
    assert grey(home, T + 300, GREYLIST_FILE="spp/grey").out == b""
    assert sorted(os.listdir(home / "spp")) == ["grey", "grey.lock"]


def test_unwritable_location_fails_open(home):
    r = grey(home, T, "--file", "missing-dir/greylist.db")
    assert (r.out, r.code) == (b"", 1)
    assert b"cannot open or lock missing-dir/greylist.db.lock" in r.err
    (home / "greylist.db.tmp").mkdir()           # the temporary file cannot be made
    r = grey(home, T)
    assert (r.out, r.code) == (b"", 1)
    assert b"greylist.db: Is a directory; not greylisting" in r.err


def test_malformed_state_lines_dropped(home):
    (home / "greylist.db").write_text(
        HEADER + "garbage\n%s %d %d 0\n1 2 3 4 5 six\n%s -1 2 0\n\xff x y 1 2 3\n" % (KEY, T, T, KEY))
    r = grey(home, T + 300)
    assert (r.out, r.code) == (b"", 0)
    assert b"greylist.db: dropped 4 malformed lines" in r.err
    assert entries(home) == [KEY.split() + [str(T), str(T + 300), "1"]]
    assert grey(home, T + 301).err == b""


def test_clock_going_back(home):
    assert grey(home, T).out == GREY
    assert grey(home, T - 1000).out == GREY      # first_seen moves back to "now"
    assert entries(home)[0][3:] == [str(T - 1000), str(T), "0"]
    assert grey(home, T - 700).out == b""


def test_lock_timeout_fails_open(home):
    fd = os.open(str(home / "greylist.db.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = grey(home, T, "--lock-timeout", "0.3")
        assert (r.out, r.code) == (b"", 1)
        assert b"greylist.db.lock still locked after 0.3 s; not greylisting" in r.err
        assert r.elapsed < 5
        # A process waiting for the lock proceeds as soon as it is released.
        p = start_plugin("greylist", env=dict(ENV, GREYLIST_NOW=str(T)), cwd=home)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, err = p.communicate(timeout=10)
    assert (out, err, p.returncode) == (GREY, b"", 0)


def run_parallel(home, envs):
    procs = [start_plugin("greylist", env=env, cwd=home) for env in envs]
    results = [p.communicate(timeout=20) + (p.returncode,) for p in procs]
    return results


def test_concurrent_runs_do_not_corrupt_the_file(home):
    envs = [dict(ENV, SMTPRCPTTO="r%d@example.org" % i, GREYLIST_NOW=str(T)) for i in range(10)]
    for out, err, code in run_parallel(home, envs):
        assert (out, err, code) == (GREY, b"", 0)
    got = entries(home)
    assert sorted(e[2] for e in got) == sorted("r%d@example.org" % i for i in range(10))
    assert all(e[3:] == [str(T), str(T), "0"] for e in got)
    # All ten retry together after the delay: all pass, no update lost.
    envs = [dict(e, GREYLIST_NOW=str(T + 300)) for e in envs]
    for out, err, code in run_parallel(home, envs):
        assert (out, err, code) == (b"", b"", 0)
    assert sorted(e[3:] for e in entries(home)) == [[str(T), str(T + 300), "1"]] * 10
    assert sorted(os.listdir(home)) == ["control", "greylist.db", "greylist.db.lock"]


def test_concurrent_runs_same_key(home):
    envs = [dict(ENV, GREYLIST_NOW=str(T))] * 10
    for out, err, code in run_parallel(home, envs):
        assert (out, err, code) == (GREY, b"", 0)
    assert entries(home) == [KEY.split() + [str(T), str(T), "0"]]
