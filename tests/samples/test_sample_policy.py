"""samples/plugins/policy: rule file parsing, matching and actions."""

import pytest

from .helpers import SAMPLES, run_plugin

RULES = """\
# comment
   # indented comment
mail  <>                    pass
mail  *@spam.example        E553 5.7.1 sender refused
mail  @dodgy.example        tempfail
mail  later@*               tempfail come back tomorrow
mail  f?o@*.example         refuse
mail  ok-*@*                accept
mail  stop@example.net      stop
mail  redir@example.net     rewrite bounce@example.net
mail  none@example.net      rewrite <>
rcpt  old@example.org       Cnew@example.org
rcpt  *@old.example         rewrite %LOCAL%@new.example
rcpt  *@partner.example     O
rcpt  root@*                refuse no mail for root here
rcpt  nobody@example.org    refuse
rcpt  busy@example.org      tempfail
rcpt  n@example.org         N
rcpt  *@*.example.org       E550 5.1.1 no such subdomain
rcpt  *                     pass
rcpt  never@example.org     E550 never reached
"""


def policy(home, phase, address, rules=RULES, *extra, **env):
    (home / "control" / "spppolicy").write_text(rules)
    variable = "SMTPMAILFROM" if phase == "mail" else "SMTPRCPTTO"
    full = {variable: address}
    full.update(env)
    return run_plugin("policy", "--" + phase, "control/spppolicy", *extra, env=full, cwd=home)


@pytest.mark.parametrize("phase, address, out", [
    ("mail", "joe@spam.example", b"E553 5.7.1 sender refused\n"),
    ("mail", "Joe@SPAM.Example", b"E553 5.7.1 sender refused\n"),
    ("mail", "joe@sub.spam.example", b""),
    ("mail", "x@dodgy.example", b"E451 4.7.1 Sender temporarily refused, try again later\n"),
    ("mail", "x@sub.dodgy.example", b""),
    ("mail", "later@example.net", b"E451 4.7.1 come back tomorrow\n"),
    ("mail", "foo@a.example", b"E553 5.7.1 Sender address rejected by policy\n"),
    ("mail", "fo@a.example", b""),
    ("mail", "fooo@a.example", b""),
    ("mail", "ok-1@anything", b"O\n"),
    ("mail", "stop@example.net", b"N\n"),
    ("mail", "Redir@example.net", b"Cbounce@example.net\n"),
    ("mail", "none@example.net", b"C\n"),
    ("mail", "", b""),                         # <> pass wins over later rules
    ("mail", "someone@example.com", b""),
    ("rcpt", "old@example.org", b"Cnew@example.org\n"),
    ("rcpt", "OLD@Example.Org", b"Cnew@example.org\n"),
    ("rcpt", "Jane.Doe@OLD.example", b"CJane.Doe@new.example\n"),
    ("rcpt", "x@partner.example", b"O\n"),
    ("rcpt", "root@example.org", b"E550 5.7.1 no mail for root here\n"),
    ("rcpt", "nobody@example.org", b"E550 5.7.1 Recipient address rejected by policy\n"),
    ("rcpt", "busy@example.org", b"E451 4.7.1 Recipient temporarily refused, try again later\n"),
    ("rcpt", "n@example.org", b"N\n"),
    ("rcpt", "a@b.example.org", b"E550 5.1.1 no such subdomain\n"),
    ("rcpt", "never@example.org", b""),        # "rcpt * pass" came first
    ("rcpt", "joe@spam.example", b""),         # mail rules do not apply at RCPT
])
def test_actions(home, phase, address, out):
    r = policy(home, phase, address)
    assert (r.out, r.err, r.code) == (out, b"", 0)


def test_first_match_wins_and_star_matches_empty(home):
    rules = "mail * tempfail\nmail <> refuse\n"
    assert policy(home, "mail", "", rules).out == (
        b"E451 4.7.1 Sender temporarily refused, try again later\n")
    rules = "mail <> refuse\nmail * tempfail\n"
    assert policy(home, "mail", "", rules).out == b"E553 5.7.1 Sender address rejected by policy\n"
    assert policy(home, "mail", "<>", rules).out.startswith(b"E451")


def test_rewrite_domain_and_address_without_at(home):
    rules = "rcpt *@a.example rewrite %LOCAL%+a@%DOMAIN%\nrcpt local rewrite %LOCAL%@%DOMAIN%x\n"
    assert policy(home, "rcpt", "Me@A.example", rules).out == b"CMe+a@A.example\n"
    assert policy(home, "rcpt", "local", rules).out == b"Clocal@x\n"


def test_no_wildcards_beyond_star_and_question(home):
    rules = "rcpt [ab]@example.org refuse\nrcpt a.b@example.org O\n"
    assert policy(home, "rcpt", "a@example.org", rules).out == b""
    assert policy(home, "rcpt", "[ab]@example.org", rules).out.startswith(b"E550")
    assert policy(home, "rcpt", "axb@example.org", rules).out == b""
    assert policy(home, "rcpt", "a.b@example.org", rules).out == b"O\n"


def test_pathological_pattern_is_fast(home):
    rules = "rcpt " + "*a" * 40 + "*b refuse\n"
    r = policy(home, "rcpt", "a" * 5000 + "@example.org", rules)
    assert (r.out, r.code) == (b"", 0)
    assert r.elapsed < 5


def test_non_utf8_bytes_and_crlf_file(home):
    (home / "control" / "spppolicy").write_bytes(
        b"rcpt \xe4rger@example.org refuse\r\nrcpt x@example.org O\r\n")
    env = {"SMTPRCPTTO": b"\xe4rger@Example.org"}
    r = run_plugin("policy", "--rcpt", "control/spppolicy", env=env, cwd=home)
    assert (r.out, r.err) == (b"E550 5.7.1 Recipient address rejected by policy\n", b"")
    env = {"SMTPRCPTTO": b"x@example.org"}
    assert run_plugin("policy", "--rcpt", "control/spppolicy", env=env, cwd=home).out == b"O\n"


MALFORMED = """\
mail x@example.net
bogus *@example.net refuse
mail *@example.net E55 too short
mail *@example.net E250 not a refusal
mail *@example.net E553\tstrange
mail *@example.net frobnicate
mail *@example.net pass now
mail *@example.net rewrite a@b c@d
mail *@example.net Continue
rcpt *@example.net C
rcpt *@example.net rewrite <>
mail *@example.net E553 5.7.1 the good rule
"""


def test_malformed_lines_reported_and_skipped(home):
    r = policy(home, "mail", "a@example.net", MALFORMED)
    assert r.out == b"E553 5.7.1 the good rule\n"
    assert r.code == 1
    err = r.err.decode()
    lines = err.splitlines()
    assert len(lines) == 11
    assert all(line.startswith("policy: pid ") for line in lines)
    for number, reason in [(1, "needs PHASE PATTERN ACTION"), (2, "unknown phase 'bogus'"),
                           (3, "E needs a 4xx or 5xx code"), (4, "E needs a 4xx or 5xx code"),
                           (5, "E needs a 4xx or 5xx code"), (6, "unknown action 'frobnicate'"),
                           (7, "pass takes no argument"), (8, "rewrite needs one address"),
                           (9, "C needs an address with @"),
                           (10, "an empty rewrite is only allowed for mail"),
                           (11, "an empty rewrite is only allowed for mail")]:
        assert "control/spppolicy:%d: %s" % (number, reason) in err, number
    assert "line skipped: mail x@example.net" in err


def test_check_mode(home):
    (home / "control" / "spppolicy").write_text(MALFORMED)
    r = run_plugin("policy", "--check", "control/spppolicy", env={}, cwd=home)
    assert (r.out, r.code) == (b"", 1)
    assert b"1 rules (1 mail, 0 rcpt), 11 malformed lines" in r.err
    (home / "control" / "spppolicy").write_text(RULES)
    r = run_plugin("policy", "--check", env={}, cwd=home)      # default file
    assert (r.out, r.code) == (b"", 0)
    assert b"control/spppolicy: 19 rules (9 mail, 10 rcpt), 0 malformed lines" in r.err


def test_sample_rule_file_is_clean(home):
    r = run_plugin("policy", "--check", str(SAMPLES / "control" / "spppolicy"), env={}, cwd=home)
    assert r.code == 0, r.err
    assert b" 0 malformed lines" in r.err


def test_default_file_and_missing_file(home):
    (home / "control" / "spppolicy").write_text("rcpt * refuse\n")
    r = run_plugin("policy", "--rcpt", env={"SMTPRCPTTO": "a@b"}, cwd=home)
    assert r.out == b"E550 5.7.1 Recipient address rejected by policy\n"
    r = run_plugin("policy", "--rcpt", "control/nope", env={"SMTPRCPTTO": "a@b"}, cwd=home)
    assert (r.out, r.code) == (b"", 1)
    assert b"cannot read control/nope: No such file or directory; no verdict" in r.err


@pytest.mark.parametrize("args, message", [
    ((), b"say which phase: --mail or --rcpt"),
    (("--mail", "--rcpt"), b"give only one of --mail and --rcpt"),
    (("--rcpt", "--frob"), b"unknown option --frob"),
    (("--rcpt", "a", "b"), b"one rule file only"),
])
def test_usage_errors_fail_open(home, args, message):
    (home / "control" / "spppolicy").write_text("rcpt * refuse\nmail * refuse\n")
    r = run_plugin("policy", *args, env={"SMTPRCPTTO": "a@b", "SMTPMAILFROM": "c@d"}, cwd=home)
    assert (r.out, r.code) == (b"", 1)
    assert message in r.err


def test_missing_variable_fails_open(home):
    r = policy(home, "rcpt", "x", "rcpt * refuse\n")
    assert r.out.startswith(b"E550")
    (home / "control" / "spppolicy").write_text("rcpt * refuse\n")
    r = run_plugin("policy", "--rcpt", "control/spppolicy", env={"SMTPMAILFROM": "a@b"}, cwd=home)
    assert (r.out, r.code) == (b"", 1)
    assert b"SMTPRCPTTO not set, no verdict" in r.err


def test_unreadable_rule_file_is_not_a_crash(home):
    (home / "control" / "spppolicy").mkdir()
    r = run_plugin("policy", "--mail", env={"SMTPMAILFROM": "a@b"}, cwd=home)
    assert (r.out, r.code) == (b"", 1)
    assert b"cannot read control/spppolicy: Is a directory" in r.err
