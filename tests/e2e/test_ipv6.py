"""IPv6 under Debian's real ucspi-tcp-ipv6 tcpserver (unpacked, see ucspi6.py):
qspp.tcpenv builds exactly its environment, qspp.tcprules looks up its keys, and
qspp.smtpd under it writes the Received line netqmail would and passes plugins
the TCP6 variables."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from qspp.cdb import Cdb
from qspp.tcpenv import address, format_ip6, tcp6_environ
from qspp.tcprules import Rules, keys

from .conftest import SRC, normalize_date
from .ucspi6 import Server, need, read_all, require_ipv6, unpack

ENVDUMP = "#!/bin/sh\nenv\n"


@pytest.fixture(scope="module")
def ucspi(tmp_path_factory):
    return unpack(tmp_path_factory.mktemp("ucspi6"))


@pytest.fixture
def envdump(tmp_path):
    p = tmp_path / "envdump"
    p.write_text(ENVDUMP)
    p.chmod(0o755)
    return str(p)


def tcp_vars(text: bytes) -> dict:
    env = dict(line.split(b"=", 1) for line in text.splitlines() if b"=" in line)
    return {k: v for k, v in env.items() if k.startswith(b"TCP") or k == b"PROTO"}


def expected(sock) -> dict:
    # what qspp would build for the server's side of this connection
    local, lport, scope = address(sock.family, sock.getpeername())
    remote, rport, _ = address(sock.family, sock.getsockname())
    return tcp6_environ(local, lport, remote, rport, scope, localhost=b"0")


@pytest.mark.parametrize("listen,client,source", [
    ("0", "::1", None),                  # dual-stack socket, IPv6 client
    ("0", "127.0.0.1", "127.0.0.2"),     # dual-stack socket, IPv4 client
    ("::1", "::1", None),                # IPv6-only address
    ("127.0.0.1", "127.0.0.1", "127.0.0.2"),  # IPv4 address
])
def test_environment_is_the_real_tcpservers(ucspi, envdump, listen, client, source):
    if ":" in client or ":" in listen or listen == "0":
        require_ipv6()
    srv = Server(ucspi["tcpserver"], listen, [envdump], {"PATH": "/usr/bin:/bin"})
    try:
        with srv.connect(client, source) as s:
            want = expected(s)
            got = tcp_vars(read_all(s))
    finally:
        srv.stop()
    assert got == want
    if client == "::1":
        assert (got[b"PROTO"], got[b"TCPREMOTEIP"]) == (b"TCP6", b"::1")
    else:
        assert (got[b"PROTO"], got[b"TCPREMOTEIP"], got[b"TCP6REMOTEIP"]) == (
            b"TCP", b"127.0.0.2", b"::ffff:127.0.0.2")


# An LD_PRELOAD shim (written for this test) that rewrites the peer address accept()
# returns and the local address getsockname() returns, so the real tcpserver formats
# addresses no loopback connection could have.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

static void rewrite(struct sockaddr *sa, const char *ip, const char *scope) {
  if (!ip || !sa || sa->sa_family != AF_INET6) return;
  struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)sa;
  inet_pton(AF_INET6, ip, &s6->sin6_addr);
  if (scope) s6->sin6_scope_id = (unsigned)atoi(scope);
}
int accept(int fd, struct sockaddr *sa, socklen_t *len) {
  int (*next)(int, struct sockaddr *, socklen_t *) = dlsym(RTLD_NEXT, "accept");
  int r = next(fd, sa, len);
  if (r >= 0) rewrite(sa, getenv("SHIM_PEER"), NULL);
  return r;
}
int getsockname(int fd, struct sockaddr *sa, socklen_t *len) {
  int (*next)(int, struct sockaddr *, socklen_t *) = dlsym(RTLD_NEXT, "getsockname");
  int r = next(fd, sa, len);
  if (r == 0) rewrite(sa, getenv("SHIM_LOCAL"), getenv("SHIM_SCOPE"));
  return r;
}
"""

FORMS = ["2001:db8::1", "2001:db8:0:0:1:0:0:1", "2001:db8:0:1:1:1:1:1",
         "2001:0db8:abcd:0012::", "::", "::ffff:10.1.2.3", "::10.1.2.3",
         "64:ff9b::1.2.3.4", "::ffff:0:1.2.3.4", "1:2:3:4:5:6:7:8", "0:0:1::", "1::",
         "0:1:0:1:0:1:0:1", "1:0:0:2:0:0:0:3", "1:0:0:0:2:0:0:3", "1:0:0:2:0:0:3:4",
         "FE80::ABCD", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc")
    if cc is None:
        need("cc is needed to build the accept() shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "shim.so"), str(d / "shim.c"),
                    "-ldl"], check=True, timeout=60)
    return str(d / "shim.so")


def test_address_forms_are_the_real_tcpservers(ucspi, envdump, shim):
    require_ipv6()
    cases = [(peer, "::1", None) for peer in FORMS]
    cases += [("fe80::1", "fe80::2", "1"), ("fe80::1", "fe80::2", "4000000")]
    for peer, local, scope in cases:
        env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": shim, "SHIM_PEER": peer,
               "SHIM_LOCAL": local}
        if scope:
            env["SHIM_SCOPE"] = scope
        srv = Server(ucspi["tcpserver"], "::1", [envdump], env)
        try:
            with srv.connect("::1") as s:
                got = tcp_vars(read_all(s))
                lport = s.getpeername()[1]
                rport = s.getsockname()[1]
        finally:
            srv.stop()
        want = tcp6_environ(socket.inet_pton(socket.AF_INET6, local), lport,
                            socket.inet_pton(socket.AF_INET6, peer), rport,
                            int(scope or 0), localhost=b"0")
        assert got == want, peer
        assert got[b"TCP6REMOTEIP"] == format_ip6(socket.inet_pton(socket.AF_INET6, peer))


def _rules_cdb(tcprules, path, lines):
    subprocess.run([tcprules, str(path), str(path) + ".tmp"],
                   input="".join(lines).encode(), check=True, timeout=10,
                   stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("ip", ["2001:db8:1:2::5", "::1", "fe80::1", "1.2.3.4"])
def test_rules_key_order_is_the_real_tcprulescheck(ucspi, tmp_path, ip):
    """Take away the key the real tcprulescheck picked, rule by rule: the order in
    which it finds them is the order qspp's keys(ipv6=True) tries."""
    want = list(keys(ip.encode(), ipv6=True))
    # every key it could try, plus near misses that must never match
    candidates = set(want[:-1]) | {b"2001:db8:1:2", b"2001:db8:1", b"2001", b"::1:", b"fe80",
                                   b"1.2.3", b"1.2", b"::ffff:1.2.3.4"}
    found = []
    cdb = tmp_path / "r.cdb"
    while True:
        lines = ['%s:allow,K="%s"\n' % (k.decode(), k.decode()) for k in sorted(candidates)]
        lines.append(':allow,K=""\n')
        _rules_cdb(ucspi["tcprules"], cdb, lines)
        out = subprocess.run([ucspi["tcprulescheck"], str(cdb)], env={"TCPREMOTEIP": ip},
                             capture_output=True, check=True, timeout=10).stdout
        k = out.split(b"K=", 1)[1].split(b"\n", 1)[0]
        # qspp's own lookup on the very same cdb agrees at every step
        with open(cdb, "rb") as f:
            rules = Rules(str(cdb), Cdb(os.dup(f.fileno()), str(cdb)), None)
            try:
                assert rules.lookup(ip.encode(), ipv6=True).env == [(b"K", k)]
            finally:
                rules.close()
        found.append(k)
        if not k:
            break
        candidates.discard(k)
    assert found == want


# -- qspp.smtpd under the IPv6 tcpserver -------------------------------------------

DUMP_PLUGIN = r'''import os
keep = {k: v for k, v in os.environb.items()
        if k.startswith(b"TCP") or k in (b"PROTO", b"RULE")}
with open("plugin.env", "wb") as f:
    f.write(b"\0".join(k + b"=" + v for k, v in sorted(keep.items())))
'''


def smtp(s, lines):
    """Send each line, return the replies (one read per reply, single-line replies)."""
    f = s.makefile("rb")
    out = [f.readline()]
    for line in lines:
        s.sendall(line)
        out.append(f.readline())
    return out


@pytest.mark.parametrize("listen,client,source", [
    ("::1", "::1", None), ("0", "::1", None), ("0", "127.0.0.1", "127.0.0.2")])
def test_smtpd_under_the_ipv6_tcpserver(ucspi, home, tmp_path, listen, client, source):
    require_ipv6()
    home.control("smtpplugins", "[connection]\nplugins/dump\n")
    home.python_plugin("plugins/dump", DUMP_PLUGIN)
    shown = "127.0.0.2" if source else client
    rules = tmp_path / "rules.cdb"
    # allow with a variable for this client, by an IPv6 prefix key where it is one
    key = "::" if client == "::1" else "127.0.0."
    _rules_cdb(ucspi["tcprules"], rules, ['%s:allow,RULE="%s"\n' % (key, key), ":deny\n"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC),
           "QMAILHOME": str(home.root), "QMAILQUEUE": str(home.recorder)}
    srv = Server(ucspi["tcpserver"], listen, [sys.executable, "-m", "qspp.smtpd"], env,
                 options=("-x", str(rules)), cwd=str(home.root))
    try:
        with srv.connect(client, source) as s:
            replies = smtp(s, [b"HELO h\r\n", b"MAIL FROM:<a@b>\r\n",
                               b"RCPT TO:<x@example.org>\r\n", b"DATA\r\n",
                               b"Subject: t\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n"])
            assert read_all(s) == b""
        assert replies[:5] == [b"220 mx.example.org ESMTP\r\n", b"250 mx.example.org\r\n",
                               b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
        assert replies[5].startswith(b"250 ok ") and replies[6] == b"221 mx.example.org\r\n"
        (run,) = home.new_runs(1)
        # netqmail: no TCPREMOTEHOST is "unknown"; the address as TCPREMOTEIP has it;
        # `by` is TCPLOCALHOST, which -l0 sets to 0
        assert run.message == (b"Received: from unknown (HELO h) (%s)\n  by 0 with SMTP; <D>\n"
                               b"Subject: t\n\nhi\n" % shown.encode())
        assert normalize_date(run.M) == run.message
        seen = dict(e.split(b"=", 1) for e in
                    (home.root / "plugin.env").read_bytes().split(b"\0"))
        want = {k: v for k, v in seen.items() if k == b"RULE"}
        assert want == {b"RULE": key.encode()}
        assert seen[b"TCPREMOTEIP"] == shown.encode()
        assert seen[b"PROTO"] == (b"TCP6" if client == "::1" else b"TCP")
        assert seen[b"TCP6REMOTEIP"] == (b"::1" if client == "::1" else b"::ffff:127.0.0.2")
        for name in (b"TCP6LOCALIP", b"TCP6LOCALPORT", b"TCP6REMOTEPORT", b"TCP6LOCALHOST"):
            assert name in seen

        # the same client denied by its IPv6 prefix (or IPv4 prefix): tcpserver closes
        # at once, qspp never runs; qspp's own lookup on the same cdb agrees
        _rules_cdb(ucspi["tcprules"], rules, ["%s:deny\n" % key, ":allow\n"])
        with srv.connect(client, source) as s:
            assert read_all(s) == b""
        home.assert_no_new_runs()
        r = Rules.load(str(rules))
        try:
            assert r.lookup(shown.encode(), ipv6=True).deny
        finally:
            r.close()
    finally:
        srv.stop()


# -- client_environ on real loopback sockets ------------------------------------

def _pair(family, host, client_host=None, source=None):
    lst = socket.socket(family)
    if family == socket.AF_INET6:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lst.bind((host, 0))
    lst.listen(1)
    c = socket.socket(socket.AF_INET6 if ":" in (client_host or host) else socket.AF_INET)
    if source:
        c.bind((source, 0))
    c.connect((client_host or host, lst.getsockname()[1]))
    conn, peer = lst.accept()
    lst.close()
    return c, conn, peer


def test_client_environ_direct_and_proxied():
    from qspp.proxyproto import ProxyError, ProxyFrom
    from qspp.tcpenv import client_environ
    require_ipv6()
    pf = ProxyFrom.parse("127.0.0.2/32")
    # a dual-stack listener; the balancer at 127.0.0.2 says who the client is
    c, conn, peer = _pair(socket.AF_INET6, "::", "127.0.0.1", "127.0.0.2")
    with c, conn:
        c.sendall(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\nEHLO x\r\n")
        env, h = client_environ(conn, peer, pf, resolve=lambda ip: b"r.example")
        assert h.version == 1
        assert (env[b"TCPREMOTEIP"], env[b"TCPREMOTEHOST"], env[b"TCP6REMOTEHOST"]) == (
            b"2001:db8::7", b"r.example", b"r.example")
        assert conn.recv(100) == b"EHLO x\r\n"
    # any other client is itself, and its PROXY line is left for the SMTP session
    c, conn, peer = _pair(socket.AF_INET6, "::", "127.0.0.1", "127.0.0.3")
    with c, conn:
        c.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
        env, h = client_environ(conn, peer, pf)
        assert h is None and env[b"TCPREMOTEIP"] == b"127.0.0.3"
        assert env[b"TCP6REMOTEIP"] == b"::ffff:127.0.0.3"
        assert conn.recv(100) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    # a listed balancer that sends no header: an error within the deadline
    c, conn, peer = _pair(socket.AF_INET, "127.0.0.1", source="127.0.0.2")
    with c, conn:
        c.sendall(b"EHLO x\r\n")
        with pytest.raises(ProxyError, match="no PROXY header"):
            client_environ(conn, peer, pf, timeout=1)
    # IPv6 client, no balancer configured
    c, conn, peer = _pair(socket.AF_INET6, "::1")
    with c, conn:
        env, h = client_environ(conn, peer)
        assert (env[b"PROTO"], env[b"TCPREMOTEIP"], env[b"TCPLOCALIP"]) == (
            b"TCP6", b"::1", b"::1")
