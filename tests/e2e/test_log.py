"""The per-connection log (README "Logs", spp.md §6.5) from a real qspp under
tcpserver: the spp-summary line on stderr carries each plugin run and the
queue id of each queued message, in text and JSON."""

import json
import shlex

G = b"220 test.example ESMTP\r\n"
OK = b"250 ok\r\n"
RH553 = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"

CONFIG = (
    "[helo]\n:echo N\n"
    '[mail]\n:case "$SMTPMAILFROM" in no@*) echo E550 not you;; esac\n'
    "[data]\n:echo HX-Seen: 1\n"
)
MAIL_ENTRY = ':case "$SMTPMAILFROM" in no@*) echo E550 not you;; esac'


def dialogue(c):
    """HELO, a refused MAIL, one queued message, QUIT; the queue's pid."""
    assert c.cmd(b"HELO h") == b"250 test.example\r\n"
    assert c.cmd(b"MAIL FROM:<no@b.example>") == b"550 not you\r\n"
    assert c.cmd(b"MAIL FROM:<a@b.example>") == OK
    assert c.cmd(b"RCPT TO:<x@example.com>") == OK
    assert c.cmd(b"RCPT TO:<y@far.example>") == RH553
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    run = c.queued(c.reply())
    assert run.M.endswith(b"X-Seen: 1\nSubject: t\n\nbody\n")
    assert c.cmd(b"QUIT") == b"221 test.example\r\n"
    assert c.rest() == b""
    assert c.status() == 0
    return run.pid


def summary_of(c):
    """The last stderr line (the summary) without the common prefix; the
    lines before it are the spp-run lines, one per plugin run."""
    lines = c.stderr_lines()
    prefix = b"qspp: pid %d: " % c.pid()
    assert all(line.startswith(prefix) for line in lines), lines
    texts = [line[len(prefix):].decode() for line in lines]
    assert len(texts) == 5, texts  # helo, mail twice, data, then the summary
    return texts[-1]


def test_summary_text(spp_home, smtpd):
    spp_home.control("smtpplugins", CONFIG)
    spp_home.setenv(SPPLOG="text")
    c = smtpd.connect(greet=G)
    qp = dialogue(c)
    words = shlex.split(summary_of(c))
    assert words[0] == "spp-summary"
    f = dict(w.split("=", 1) for w in words[1:])
    assert list(f) == [
        "ip", "host", "helo",
        "mail1", "rcpt1", "bytes1", "outcome1", "qp1", "by1",
        "mail2", "rcpt2", "bytes2", "outcome2", "qp2", "by2",
        "run1", "run2", "run3", "run4", "end"]
    assert (f["ip"], f["host"], f["helo"]) == ("192.0.2.1", "client.example", "h")
    assert (f["mail1"], f["rcpt1"], f["bytes1"], f["outcome1"], f["qp1"], f["by1"]) == (
        "<no@b.example>", "-", "-", "550 not you", "-", "plugin " + MAIL_ENTRY)
    assert (f["mail2"], f["rcpt2"], f["bytes2"], f["qp2"], f["by2"]) == (
        "<a@b.example>", "<x@example.com>:250,<y@far.example>:553/qmail", "17", str(qp),
        "queue")
    assert f["outcome2"].startswith("250 ok ") and f["outcome2"].endswith(" qp %d" % qp)
    runs = [f["run%d" % n].split(",", 3) for n in range(1, 5)]
    assert [(s, v, e) for s, v, _, e in runs] == [
        ("helo", "N", ":echo N"), ("mail", "E", MAIL_ENTRY), ("mail", "-", MAIL_ENTRY),
        ("data", "-", ":echo HX-Seen: 1")]
    assert all(ms.isdigit() for _, _, ms, _ in runs)
    assert f["end"] == "quit"


def test_summary_json(spp_home, smtpd):
    spp_home.control("smtpplugins", CONFIG)
    spp_home.setenv(SPPLOG="json")
    c = smtpd.connect(greet=G)
    qp = dialogue(c)
    s = json.loads(summary_of(c))
    assert s["event"] == "spp-summary"
    assert [(t["from"], t["qp"], t["by"]) for t in s["transactions"]] == [
        ("no@b.example", None, "plugin " + MAIL_ENTRY), ("a@b.example", qp, "queue")]
    assert [(r["section"], r["verdict"], r["entry"]) for r in s["runs"]] == [
        ("helo", "N", ":echo N"), ("mail", "E", MAIL_ENTRY), ("mail", "-", MAIL_ENTRY),
        ("data", "-", ":echo HX-Seen: 1")]
    assert all(isinstance(r["ms"], int) and r["ms"] >= 0 for r in s["runs"])
    assert (s["more_runs"], s["more_transactions"], s["end"]) == (0, 0, "quit")
