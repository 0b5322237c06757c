"""docs/fleet/ run as written (issue 14): the real HAProxy in front of two
`qspp serve` nodes that share greylisting through one real postgrey.  The doc's
files are read here and only their addresses, ports and paths are rewritten;
a change to them that breaks the fleet fails this test."""

import re
import shlex
import subprocess
import time
from pathlib import Path

from .conftest import QmailHome, free_port, stop_process, wait_for
from .serve_harness import ServeServer
from .test_ipv6 import smtp
from .test_policy_daemons import listening, me, need
from .test_serve import make_rules
from .test_serve_ipv6_proxy import HAPROXY, connect

DOCS = Path(__file__).resolve().parents[2] / "docs" / "fleet"


def rewrite(text: str, changes: dict) -> str:
    for old, new in changes.items():
        assert old in text, "docs/fleet no longer has %r" % old
        text = text.replace(old, new)
    return text


def test_two_nodes_behind_haproxy_share_greylisting(home, tmp_path):
    pg_exe = need("postgrey")
    if HAPROXY is None:
        need("haproxy")
    # -- postgrey, from postgrey.args
    pg_port = free_port()
    (tmp_path / "pgdb").mkdir()
    empty = tmp_path / "empty"
    empty.write_text("")
    user, group = me()
    pg_args = shlex.split(rewrite((DOCS / "postgrey.args").read_text(), {
        "10.0.0.20:10023": "127.0.0.1:%d" % pg_port, "--delay=300": "--delay=2",
        "/var/lib/postgrey": str(tmp_path / "pgdb")}))
    pg_log = open(tmp_path / "postgrey.log", "wb")
    pg = subprocess.Popen([pg_exe, *pg_args, "--user=%s" % user, "--group=%s" % group,
                           "--hostname=test.host", "--whitelist-clients=%s" % empty,
                           "--whitelist-recipients=%s" % empty],
                          stdin=subprocess.DEVNULL, stdout=pg_log, stderr=pg_log)
    nodes, haproxy = [], None
    try:
        wait_for(lambda: listening(pg_port) or pg.poll() is not None, 20, "postgrey")
        assert pg.poll() is None, (tmp_path / "postgrey.log").read_text()
        # -- two nodes, from node.args and smtpplugins
        rules = make_rules(tmp_path / "rules.cdb", ":allow\n")
        plugins = rewrite((DOCS / "smtpplugins").read_text(),
                          {"10.0.0.20:10023": "127.0.0.1:%d" % pg_port})
        args = shlex.split(rewrite((DOCS / "node.args").read_text(), {
            "--host 0 --port 2525": "--host 127.0.0.1",
            "--proxy-from 192.0.2.10": "--proxy-from 127.0.0.1",
            "--metrics 0.0.0.0:9225": "--metrics 127.0.0.1:0",
            " --qmailhome /var/qmail": "",      # the harness gives each node its home
            " --user qmaild": "",               # the test is one user throughout
            "/etc/tcp.smtp.cdb": str(rules)}))
        for n, h in enumerate((home, QmailHome(tmp_path / "node2")), 1):
            h.control("me", "node%d.example.org\n" % n)
            h.control("smtpplugins", plugins)
            nodes.append(ServeServer(h, tmp_path / ("serve%d" % n), *args).start())
        # -- HAProxy, from haproxy.cfg
        front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(rewrite((DOCS / "haproxy.cfg").read_text(), {
            "/run/haproxy-smtp.pid": str(tmp_path / "haproxy.pid"),
            "192.0.2.10:25": "127.0.0.1:%d" % front,
            "10.0.0.11:2525": "127.0.0.1:%d" % nodes[0].port,
            "10.0.0.12:2525": "127.0.0.1:%d" % nodes[1].port,
            "inter 2s": "inter 300ms"}))
        hlog = open(tmp_path / "haproxy.log", "wb")
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=hlog,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: listening(front) or haproxy.poll() is not None, 10, "haproxy")
        assert haproxy.poll() is None, (tmp_path / "haproxy.log").read_text()

        # first attempt, from 127.0.0.2: greylisted by whichever node took it
        t0 = time.monotonic()
        with connect("127.0.0.1", front, "127.0.0.2") as c:
            got = smtp(c, [b"HELO client\r\n", b"MAIL FROM:<a@b.example>\r\n",
                                b"RCPT TO:<x@example.org>\r\n", b"QUIT\r\n"])
        first = re.match(rb"220 (node\d)\.example\.org ESMTP", got[0]).group(1)
        assert got[3].startswith(b"450 4.2.0 <x@example.org>: Recipient address rejected:"
                                 b" Greylisted"), got
        # the retry after the delay, on the other node (round robin: reconnect
        # until the other one answers; HAProxy's health checks are not
        # connections through the frontend)
        time.sleep(max(0, 3 - (time.monotonic() - t0)))
        for _ in range(4):
            c = connect("127.0.0.1", front, "127.0.0.2")
            f = c.makefile("rb")
            greeting = f.readline()
            if first not in greeting:
                break
            c.sendall(b"QUIT\r\n")
            f.readline()
            c.close()
        else:
            raise AssertionError("HAProxy sent every connection to %s" % first)
        with c:
            got = [greeting]
            for line in (b"HELO client\r\n", b"MAIL FROM:<a@b.example>\r\n",
                         b"RCPT TO:<x@example.org>\r\n", b"DATA\r\n",
                         b"Subject: fleet\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n"):
                c.sendall(line)
                got.append(f.readline())
        assert got[1:5] == [b"250 node2.example.org\r\n" if first == b"node1" else
                            b"250 node1.example.org\r\n", b"250 ok\r\n", b"250 ok\r\n",
                            b"354 go ahead\r\n"], got
        assert got[5].startswith(b"250 ok ")
        other = nodes[1] if first == b"node1" else nodes[0]
        (run,) = other.home.new_runs(1)
        lines = run.message.split(b"\n")
        # the client as HAProxy saw it, and postgrey's header from the shared state
        assert re.fullmatch(rb"Received: from unknown \(HELO client\) \(127\.0\.0\.2\)", lines[0])
        assert re.fullmatch(rb"X-Greylist: delayed [2-9] seconds by postgrey-[0-9.]+ at"
                            rb" test\.host; .*", lines[2]), lines[2]
        # both nodes answered HAProxy's health checks as the balancer itself
        for node in nodes:
            assert not [ln for ln in node.lines() if b"proxy: closed" in ln]
    finally:
        if haproxy is not None:
            stop_process(haproxy)
        for node in nodes:
            node.stop()
        stop_process(pg)
        pg_log.close()
