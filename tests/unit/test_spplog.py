"""spplog.Journal: the spp-run lines and the per-connection spp-summary line
(spp.md §6.5, README "Logs"), written to the real fd 2 and read back with capfd."""

import json
import os

import pytest

from qspp import spplog
from qspp.spplog import MAX_LISTED, Journal, queue_id


class Settings:
    remoteip = b"192.0.2.1"
    remotehost = b"client.example"


PREFIX = "qspp: pid %d: " % os.getpid()


def lines(capfd):
    out, err = capfd.readouterr()
    assert out == ""
    assert err.endswith("\n")
    got = err.splitlines()
    for line in got:
        assert line.startswith(PREFIX), line
    return [line[len(PREFIX):] for line in got]


def session(j):
    """A connection: two plugin runs, a refused MAIL, one queued message with a
    refused and an accepted recipient, then a refused DATA."""
    j.run("helo", b":echo N", b"N", 0, 3)
    j.mail(b"bad@example.net", b"550 no thanks\r\n", b"plugin :echo E550 no thanks")
    j.mail(b"a@b.example", b"250 ok", b"qmail")
    j.rcpt(b"x@example.com", b"250 ok", b"qmail")
    j.run("rcpt", b":grep -q, x", b"can't execute", 120, 12)
    j.rcpt(b"y@far.example", b"553 sorry, that domain isn't in my list of allowed rcpthosts"
           b" (#5.7.1)", b"qmail")
    j.message(55, b"250 ok 1764000000 qp 4242", b"queue")
    j.mail(b"c@b.example", b"250 ok", b"qmail")
    j.rcpt(b"x@example.com", b"250 ok", b"qmail")
    j.message(None, b"451 greylisted\r\n", b"plugin :greylist")


def test_text_summary(capfd):
    j = Journal(b"1")
    session(j)
    j.summary(Settings, b"h", "quit")
    got = lines(capfd)
    assert got[:2] == [
        "spp-run section=helo entry=\":echo N\" verdict=N exit=0 ms=3",
        "spp-run section=rcpt entry=\":grep -q, x\" verdict=\"can't execute\" exit=120 ms=12",
    ]
    assert got[2:] == [
        "spp-summary ip=192.0.2.1 host=client.example helo=h"
        " mail1=<bad@example.net> rcpt1=- bytes1=- outcome1=\"550 no thanks\" qp1=-"
        " by1=\"plugin :echo E550 no thanks\""
        " mail2=<a@b.example> rcpt2=<x@example.com>:250,<y@far.example>:553/qmail bytes2=55"
        " outcome2=\"250 ok 1764000000 qp 4242\" qp2=4242 by2=queue"
        " mail3=<c@b.example> rcpt3=<x@example.com>:250 bytes3=- outcome3=\"451 greylisted\""
        " qp3=- by3=\"plugin :greylist\""
        " run1=\"helo,N,3,:echo N\" run2=\"rcpt,can't execute,12,:grep -q, x\""
        " end=quit"
    ]


def test_json_summary(capfd):
    j = Journal(b"json")
    session(j)
    j.summary(Settings, None, "eof")
    got = [json.loads(line) for line in lines(capfd)]
    assert got[0] == {"event": "spp-run", "section": "helo", "entry": ":echo N",
                      "verdict": "N", "exit": 0, "ms": 3}
    s = got[2]
    assert s["event"] == "spp-summary"
    assert (s["ip"], s["host"], s["helo"], s["end"]) == ("192.0.2.1", "client.example", "-", "eof")
    assert [(t["from"], t["outcome"], t["qp"], t["bytes"], t["by"])
            for t in s["transactions"]] == [
        ("bad@example.net", "550 no thanks", None, None, "plugin :echo E550 no thanks"),
        ("a@b.example", "250 ok 1764000000 qp 4242", 4242, 55, "queue"),
        ("c@b.example", "451 greylisted", None, None, "plugin :greylist"),
    ]
    assert s["transactions"][1]["rcpt"] == [
        {"to": "x@example.com", "reply": "250", "by": "qmail"},
        {"to": "y@far.example", "reply": "553", "by": "qmail"}]
    assert s["runs"] == [
        {"section": "helo", "entry": ":echo N", "verdict": "N", "ms": 3},
        {"section": "rcpt", "entry": ":grep -q, x", "verdict": "can't execute", "ms": 12}]
    assert (s["more_transactions"], s["more_runs"]) == (0, 0)
    assert list(s) == ["event", "ip", "host", "helo", "transactions", "more_transactions",
                       "runs", "more_runs", "end"]


@pytest.mark.parametrize("mode", [b"text", b"json"])
def test_runs_capped(capfd, mode):
    j = Journal(mode)
    for n in range(MAX_LISTED + 7):
        j.run("rcpt", b":p%d" % n, b"-", 0, 1)
    assert len(j.runs) == MAX_LISTED and j.unlisted_runs == 7
    lines(capfd)
    j.summary(Settings, b"h", "quit")
    (summary,) = lines(capfd)
    if mode == b"json":
        s = json.loads(summary)
        assert len(s["runs"]) == MAX_LISTED and s["more_runs"] == 7
        assert s["runs"][-1]["entry"] == ":p%d" % (MAX_LISTED - 1)
    else:
        assert summary.endswith(' run%d=rcpt,-,1,:p%d more_runs=7 end=quit'
                                % (MAX_LISTED, MAX_LISTED - 1))
        assert " run%d=" % (MAX_LISTED + 1) not in summary


def test_no_runs_no_transactions(capfd):
    Journal(b"1").summary(Settings, None, "eof")
    assert lines(capfd) == ["spp-summary ip=192.0.2.1 host=client.example helo=- end=eof"]


def test_code_is_the_last_lines(capfd):
    j = Journal(b"1")
    j.mail(b"a@b", b"250 ok", b"qmail")
    j.rcpt(b"x@y", b"250-first\r\n250-second\r\n550 no\r\n", b"plugin :x")
    j.summary(Settings, None, "quit")
    (line,) = lines(capfd)
    assert " rcpt1=<x@y>:550/plugin :x " not in line  # quoted, as it has a space
    assert ' rcpt1="<x@y>:550/plugin :x" ' in line


def test_control_bytes_stay_on_one_line(capfd):
    j = Journal(b"1")
    j.mail(b"a@b", b"250-pending\r\n421 bye\r\n", b"plugin :x")
    j.summary(Settings, b"h\tx\x01", "closed by plugin :x")
    (line,) = lines(capfd)
    assert line == ('spp-summary ip=192.0.2.1 host=client.example helo="h\\tx\\x01"'
                    ' mail1=<a@b> rcpt1=- bytes1=- outcome1="250-pending\\r\\n421 bye" qp1=-'
                    ' by1="plugin :x" end="closed by plugin :x"')


@pytest.mark.parametrize("reply, qp", [
    (b"250 ok 1764000000 qp 4242", 4242),
    (b"250 ok 1764000000 qp 4242\r\n", 4242),
    (b"250 ok", None),
    (b"250 ok 1764000000 qp x", None),
    (b"451 qq temporary problem (#4.3.0)", None),
    (b"-", None),
])
def test_queue_id(reply, qp):
    assert queue_id(reply) == qp


def test_quote_escapes():
    assert spplog._quote(b'a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert spplog._quote(b"") == '""'
    assert spplog._quote(7) == "7"


# -- AUTH and TLS outcomes (issue 11) -------------------------------------------------

def tls_and_auth(j):
    j.tls("ok", b"TLSv1.3", b"TLS_AES_256_GCM_SHA384", None)
    j.auth(b"login", b"bob", "failed")
    j.auth(b"plain", b"bob, the admin", "ok")
    j.auth(b"login", None, "canceled")


def test_text_summary_with_tls_and_auth(capfd):
    j = Journal(b"1")
    j.mail(b"a@b", b"250 ok", b"qmail")
    tls_and_auth(j)
    j.summary(Settings, b"h", "quit")
    assert lines(capfd) == [
        "spp-summary ip=192.0.2.1 host=client.example helo=h"
        " mail1=<a@b> rcpt1=- bytes1=- outcome1=- qp1=- by1=-"
        " tls=ok tls_protocol=TLSv1.3 tls_cipher=TLS_AES_256_GCM_SHA384"
        ' auth1=failed,login,bob auth2="ok,plain,bob, the admin" auth3=canceled,login,-'
        " end=quit"]


def test_json_summary_with_tls_and_auth(capfd):
    j = Journal(b"json")
    tls_and_auth(j)
    j.summary(Settings, b"h", "quit")
    (s,) = [json.loads(line) for line in lines(capfd)]
    assert s["tls"] == {"outcome": "ok", "protocol": "TLSv1.3",
                        "cipher": "TLS_AES_256_GCM_SHA384"}
    assert s["auth"] == [{"mechanism": "login", "user": "bob", "outcome": "failed"},
                         {"mechanism": "plain", "user": "bob, the admin", "outcome": "ok"},
                         {"mechanism": "login", "user": None, "outcome": "canceled"}]
    assert list(s) == ["event", "ip", "host", "helo", "transactions", "more_transactions",
                       "runs", "more_runs", "tls", "auth", "more_auth", "end"]


@pytest.mark.parametrize("mode", [b"text", b"json"])
def test_tls_failure_reason(capfd, mode):
    j = Journal(mode)
    j.tls("failed", None, None, b"454 TLS connection failed: wrong version number (#4.3.0)\r\n")
    j.summary(Settings, None, "TLS handshake failed")
    (line,) = lines(capfd)
    if mode == b"json":
        assert json.loads(line)["tls"] == {
            "outcome": "failed",
            "reason": "454 TLS connection failed: wrong version number (#4.3.0)"}
    else:
        assert line.endswith(' tls=failed tls_reason="454 TLS connection failed: wrong version'
                             ' number (#4.3.0)" end="TLS handshake failed"')


@pytest.mark.parametrize("mode", [b"text", b"json"])
def test_auth_attempts_capped(capfd, mode):
    j = Journal(mode)
    for n in range(MAX_LISTED + 3):
        j.auth(b"plain", b"u%d" % n, "failed")
    j.summary(Settings, None, "eof")
    (line,) = lines(capfd)
    if mode == b"json":
        s = json.loads(line)
        assert len(s["auth"]) == MAX_LISTED and s["more_auth"] == 3
    else:
        assert line.endswith(" auth%d=failed,plain,u%d more_auth=3 end=eof"
                             % (MAX_LISTED, MAX_LISTED - 1))


def test_auth_failed_line(capfd):
    spplog.auth_failed(b"192.0.2.1", b"login", b"bob@example.org")
    spplog.auth_failed(b"2001:db8::1", b"cram-md5", b"a b\n\x00\xff\xe2\x80\xa8")
    assert lines(capfd) == [
        "auth-failed ip=192.0.2.1 mechanism=login user=bob@example.org",
        'auth-failed ip=2001:db8::1 mechanism=cram-md5 user="a b\\n\\x00\\xff\\u2028"']
