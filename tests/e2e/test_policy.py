"""policy: entries end to end (issue 13): qspp under the real tcpserver with the
recording queue, asking a policy server that runs in this test process.

PolicyServer speaks the protocol well or badly on demand, so the bad peers of
issue 13 (garbage, silence, a close in mid-answer, a 1 MB line, nobody
listening) each get a test of their reply and of how long it took.
test_policy_daemons.py runs the real daemons (postgrey, postfwd, policyd-spf).
"""

import re
import socket
import threading
import time

import pytest

from .test_starttls import certs, starttls  # noqa: F401 (certs is a fixture)

HANG = object()  # an answer: keep the connection, never answer
CLOSE = object()  # an answer: close the connection without answering


class PolicyServer:
    """A policy server on 127.0.0.1 (or a unix socket) in a thread.

    answer(attrs, n) gives the bytes to send for the n-th request (0-based,
    over all connections), HANG or CLOSE; a str is an action (`action=` and the
    empty line are added). requests holds (connection number, attrs)."""

    def __init__(self, answer, path=None):
        self.answer = answer if callable(answer) else (lambda attrs, n: answer)
        self.requests = []
        self.connections = 0
        self.close_after_answer = False
        self._lock = threading.Lock()
        self._socks = []
        self._stop = threading.Event()
        if path is None:
            self.listener = socket.socket()
            self.listener.bind(("127.0.0.1", 0))
            self.port = self.listener.getsockname()[1]
            self.endpoint = "inet:127.0.0.1:%d" % self.port
        else:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(str(path))
            self.endpoint = "unix:%s" % path
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                number = self.connections
                self.connections += 1
                self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn, number):
        f = conn.makefile("rb")
        try:
            while True:
                attrs = {}
                while True:
                    line = f.readline()
                    if not line:
                        return
                    if line == b"\n":
                        break
                    k, _, v = line.rstrip(b"\n").partition(b"=")
                    attrs[k.decode()] = v.decode("utf-8", "surrogateescape")
                with self._lock:
                    n = len(self.requests)
                    self.requests.append((number, attrs))
                out = self.answer(attrs, n)
                if out is HANG:
                    self._stop.wait(30)
                    return
                if out is CLOSE:
                    return
                if isinstance(out, str):
                    out = ("action=%s\n\n" % out).encode()
                conn.sendall(out)
                if self.close_after_answer:
                    return
        except OSError:
            pass
        finally:
            f.close()
            conn.close()

    def states(self):
        return [a["protocol_state"] for _, a in self.requests]

    def stop(self):
        self._stop.set()
        self.listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def policy_server():
    servers = []

    def start(answer="DUNNO", path=None):
        s = PolicyServer(answer, path)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def plugins(home, text):
    home.control("smtpplugins", text)


def message(c, body=b"Subject: t\r\n\r\nbody\r\n"):
    c.send(b"DATA\r\n")
    c.expect(b"354 go ahead")
    c.send(body + b".\r\n")
    return c.reply()


# -- what is asked ----------------------------------------------------------------

def test_every_section_asks_with_postfix_attributes_over_one_connection(
        home, smtpd, policy_server):
    srv = policy_server("DUNNO")
    e = "policy:" + srv.endpoint
    plugins(home, "[connection]\n%s\n[helo]\n%s\n[mail]\n%s\n[rcpt]\n%s\n[data]\n%s\n"
                  "[body]\n%s\n" % ((e,) * 6))
    c = smtpd.connect()
    c.send(b"HELO h.example\r\n")
    c.expect(b"250 mx.example.org")
    run = c.txn(mail=b"MAIL FROM:<a@b.example>", rcpts=(b"RCPT TO:<x@example.org>",))
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    assert srv.states() == ["CONNECT", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE"]
    assert {n for n, _ in srv.requests} == {0} and srv.connections == 1
    a = [attrs for _, attrs in srv.requests]
    for attrs in a:
        assert attrs["request"] == "smtpd_access_policy"
        assert attrs["client_address"] == "192.0.2.7"
        assert attrs["client_name"] == attrs["reverse_client_name"] == "client.example.com"
        assert attrs["client_port"] == str(c.port)
        assert attrs["server_address"] == "198.51.100.1"
        assert attrs["server_port"] == str(smtpd.port)
        assert attrs["protocol_name"] == "SMTP"
        assert attrs["queue_id"] == "" and attrs["sasl_username"] == ""
        assert attrs["encryption_protocol"] == "" and attrs["encryption_keysize"] == "0"
    assert [x["helo_name"] for x in a] == ["", "h.example", "h.example", "h.example",
                                           "h.example", "h.example"]
    assert [x["sender"] for x in a] == ["", "", "a@b.example", "a@b.example", "a@b.example",
                                        "a@b.example"]
    assert [x["recipient"] for x in a] == ["", "", "", "x@example.org", "x@example.org",
                                           "x@example.org"]
    assert [x["recipient_count"] for x in a] == ["0", "0", "0", "0", "1", "1"]
    assert a[0]["instance"] == a[1]["instance"] == ""
    assert re.fullmatch(r"[0-9a-f]+\.[0-9a-f]+\.[0-9a-f]+\.[0-9a-f]+", a[2]["instance"])
    assert len({x["instance"] for x in a[2:]}) == 1
    # at the end of the message: its size as qmail-queue gets it
    assert a[5]["size"] == str(len(run.M))
    assert c.stderr() == b""


def test_ehlo_size_and_tls_reach_the_request(home, smtpd, policy_server, certs):
    srv = policy_server("DUNNO")
    plugins(home, "[helo]\npolicy:%s\n[mail]\npolicy:%s\n" % (srv.endpoint, srv.endpoint))
    home.control("servercert.pem", certs.pem)
    c = smtpd.connect()
    c.send(b"EHLO h\r\n")
    c.reply()
    c.send(b"MAIL FROM:<a@b.example> SIZE=1234\r\n")
    c.expect(b"250 ok")
    cipher = starttls(c)
    c.send(b"EHLO t\r\n")
    c.reply()
    c.send(b"MAIL FROM:<a@b.example>\r\n")
    c.expect(b"250 ok")
    a = [attrs for _, attrs in srv.requests]
    assert [x["protocol_state"] for x in a] == ["EHLO", "MAIL", "EHLO", "MAIL"]
    assert [x["protocol_name"] for x in a] == ["ESMTP"] * 4
    assert [x["size"] for x in a] == ["0", "1234", "0", "0"]
    assert [x["encryption_cipher"] for x in a] == ["", "", cipher, cipher]
    assert a[3]["encryption_protocol"].startswith("TLSv1.")
    assert int(a[3]["encryption_keysize"]) >= 128 and a[1]["encryption_keysize"] == "0"


def test_each_transaction_has_its_own_instance(home, smtpd, policy_server):
    srv = policy_server("DUNNO")
    plugins(home, "[rcpt]\npolicy:%s\n" % srv.endpoint)
    c = smtpd.connect()
    c.txn()
    c.txn()
    first, second = (a["instance"] for _, a in srv.requests)
    assert first and second and first != second


def test_auth_user_is_reported(home, smtpd, policy_server):
    from .test_auth import auth_mode
    srv = policy_server("DUNNO")
    plugins(home, "[mail]\npolicy:%s\n" % srv.endpoint)
    auth_mode(home)
    c = smtpd.connect()
    c.send(b"EHLO h\r\n")
    c.reply()
    c.send(b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n")
    c.expect(b"235 ok, go ahead (#2.0.0)")
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(b"250 ok")
    a = srv.requests[0][1]
    assert (a["sasl_method"], a["sasl_username"]) == ("plain", "user")


# -- answers ----------------------------------------------------------------------

def test_answers_in_several_sections(home, smtpd, policy_server):
    def answer(attrs, n):
        return {"bad@b.example": "REJECT go away", "slow@b.example": "DEFER",
                "x@example.org": "550 5.1.1 no such user", "y@example.org": "DUNNO",
                "w@example.org": "WARN odd", "i@example.org": "INFO fyi",
                "h@example.org": "HOLD", "p@example.org": "PREPEND X-Policy: tagged",
                }.get(attrs["recipient"] or attrs["sender"], "OK")
    srv = policy_server(answer)
    plugins(home, "[mail]\npolicy:%s\n[rcpt]\npolicy:%s\n" % (srv.endpoint, srv.endpoint))
    c = smtpd.connect()
    c.send(b"MAIL FROM:<bad@b.example>\r\n")
    c.expect(b"554 5.7.1 <bad@b.example>: Sender address rejected: go away")
    c.send(b"MAIL FROM:<slow@b.example>\r\n")
    c.expect(b"450 4.7.1 <slow@b.example>: Sender address rejected: Access denied")
    c.send(b"MAIL FROM:<a@b.example>\r\n")
    c.expect(b"250 ok")
    c.send(b"RCPT TO:<x@example.org>\r\n")
    c.expect(b"550 5.1.1 <x@example.org>: Recipient address rejected: no such user")
    for r in (b"y", b"w", b"i", b"h", b"p"):
        c.send(b"RCPT TO:<%s@example.org>\r\n" % r)
        c.expect(b"250 ok")
    # OK never grants relaying: rcpthosts still refuses
    c.send(b"RCPT TO:<far@elsewhere.example>\r\n")
    c.expect(b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
    run = c.queued(message(c))
    assert run.E == (b"Fa@b.example\0Ty@example.org\0Tw@example.org\0Ti@example.org\0"
                     b"Th@example.org\0Tp@example.org\0\0")
    assert run.message.split(b"\n")[2] == b"X-Policy: tagged"
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    err = c.stderr()
    entry = ("policy:" + srv.endpoint).encode()
    assert b": policy " + entry + b": warn: odd\n" in err
    assert b": policy " + entry + b": info: fyi\n" in err
    assert b": policy " + entry + b": unsupported action, treated as DUNNO: HOLD\n" in err
    assert srv.connections == 1


def test_defer_if_permit_and_defer_if_reject(home, smtpd, policy_server):
    def answer(attrs, n):
        return {"gl@example.org": "DEFER_IF_PERMIT 4.2.0 Greylisted",
                "gl@far.example": "DEFER_IF_PERMIT 4.2.0 Greylisted",
                "dr@example.org": "DEFER_IF_REJECT maybe later",
                "dr@far.example": "DEFER_IF_REJECT maybe later"}.get(attrs["recipient"], "DUNNO")
    srv = policy_server(answer)
    plugins(home, "[rcpt]\npolicy:%s\n:case \"$SMTPRCPTTO\" in dr@example.org) echo E550 no;; esac\n"
            % srv.endpoint)
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(b"250 ok")
    c.send(b"RCPT TO:<gl@example.org>\r\n")
    c.expect(b"450 4.2.0 <gl@example.org>: Recipient address rejected: Greylisted")
    # a refusal of qmail's own stands against DEFER_IF_PERMIT...
    c.send(b"RCPT TO:<gl@far.example>\r\n")
    c.expect(b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
    # ...and becomes the deferral with DEFER_IF_REJECT, as a later plugin's E550 does
    c.send(b"RCPT TO:<dr@far.example>\r\n")
    c.expect(b"450 4.7.1 <dr@far.example>: Recipient address rejected: maybe later")
    c.send(b"RCPT TO:<dr@example.org>\r\n")
    c.expect(b"450 4.7.1 <dr@example.org>: Recipient address rejected: maybe later")
    c.send(b"RCPT TO:<ok@example.org>\r\n")
    c.expect(b"250 ok")


def test_421_answer_ends_the_session(home, smtpd, policy_server):
    srv = policy_server("421 4.3.2 going down")
    plugins(home, "[helo]\npolicy:%s\n" % srv.endpoint)
    c = smtpd.connect()
    c.send(b"HELO h\r\n")
    assert c.rest() == b"421 4.3.2 <h>: Helo command rejected: going down\r\n"
    assert c.status() == 0


# -- the connection -----------------------------------------------------------------

def test_a_kept_connection_the_server_closed_is_reopened_once(home, smtpd, policy_server):
    srv = policy_server(lambda attrs, n: "DUNNO" if n == 0 else CLOSE)
    srv.close_after_answer = True
    e = "policy:" + srv.endpoint
    plugins(home, "[helo]\n%s\n[mail]\n%s\n" % (e, e))
    c = smtpd.connect()
    c.send(b"HELO h\r\n")
    c.expect(b"250 mx.example.org")
    # the kept connection is gone: one new one, which closes without answering
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(b"451 qmail-spp failure: %s: connection closed (#4.3.0)" % e.encode())
    assert srv.connections == 2
    # a fresh connection that fails is not retried
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(b"451 qmail-spp failure: %s: connection closed (#4.3.0)" % e.encode())
    assert srv.connections == 3
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    lines = c.stderr_lines()
    assert lines[0].endswith(b": qmail-spp failure: [mail] " + e.encode()
                             + b": connection closed (closed before answering)")


def test_reconnect_succeeds(home, smtpd, policy_server):
    srv = policy_server("DUNNO")
    srv.close_after_answer = True  # a server that answers one request per connection
    e = "policy:" + srv.endpoint
    plugins(home, "[mail]\n%s\n[rcpt]\n%s\n" % (e, e))
    c = smtpd.connect()
    c.txn()
    assert srv.connections == 2 and len(srv.requests) == 2
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    assert c.stderr() == b""


def test_unix_socket_relative_to_the_qmail_home(home, smtpd, policy_server):
    (home.root / "run").mkdir()
    srv = policy_server("REJECT from a unix socket", path=home.root / "run" / "policy")
    plugins(home, "[helo]\npolicy:unix:run/policy\n")
    c = smtpd.connect()
    c.send(b"HELO h\r\n")
    c.expect(b"554 5.7.1 <h>: Helo command rejected: from a unix socket")
    assert srv.states() == ["HELO"]


# -- bad peers ----------------------------------------------------------------------

def bad_peer(home, smtpd, entry, seconds):
    """HELO against ENTRY: the reply and how long it took; the session goes on."""
    plugins(home, "[helo]\n%s\n" % entry)
    c = smtpd.connect()
    t0 = time.monotonic()
    c.send(b"HELO h\r\n")
    got = c.reply(timeout=seconds + 5)
    took = time.monotonic() - t0
    c.send(b"NOOP\r\n")
    c.expect(b"250 ok")
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    home.assert_no_new_runs()
    return got, took, c.stderr_lines()


@pytest.mark.parametrize("answer, what, detail, seconds", [
    ("hello there\n\n", b"bad answer", b"not name=value: hello there", 0.8),
    ("result=fine\n\n", b"bad answer", b"no action", 0.8),
    ("action=\n\n", b"bad answer", b"no action", 0.8),
    ("action=DU", b"connection closed", b"closed in the middle of the answer", 0.8),
    ("action=OK", b"timeout", b"answer unfinished", None),
    (HANG, b"timeout", b"no answer", None),
    ("action=" + "x" * (1 << 20) + "\n\n", b"answer too long", b"over 65536 bytes", 0.8),
    ("\0\xff garbage without end" * 100, b"timeout", b"answer unfinished", None),
])
def test_bad_peer(home, smtpd, policy_server, answer, what, detail, seconds):
    srv = policy_server(lambda attrs, n: answer.encode("latin-1") if isinstance(answer, str)
                        else answer)
    # the server closes after what it said, except where the test wants it to hang on
    srv.close_after_answer = what != b"timeout"
    entry = "policy:%s timeout=1" % srv.endpoint
    got, took, err = bad_peer(home, smtpd, entry, 1)
    assert got == b"451 qmail-spp failure: %s: %s (#4.3.0)\r\n" % (entry.encode(), what)
    if seconds is None:
        assert 0.9 <= took < 2.5
    else:
        assert took < seconds
    assert err[0].endswith(b": qmail-spp failure: [helo] %s: %s (%s)"
                           % (entry.encode(), what, detail))


def test_nobody_listening(home, smtpd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = "policy:inet:127.0.0.1:%d" % port
    got, took, err = bad_peer(home, smtpd, entry, 1)
    assert got == b"451 qmail-spp failure: %s: can't connect (#4.3.0)\r\n" % entry.encode()
    assert took < 0.8
    assert err[0].endswith(b"[helo] %s: can't connect (Connection refused)" % entry.encode())


def test_no_such_unix_socket_and_a_default(home, smtpd):
    got, _, err = bad_peer(home, smtpd, "policy:unix:run/none default=DUNNO", 1)
    assert got == b"250 mx.example.org\r\n"
    assert err[0].endswith(b"[helo] policy:unix:run/none default=DUNNO: can't connect"
                           b" (No such file or directory); default=DUNNO")


def test_default_action_with_text(home, smtpd, policy_server):
    srv = policy_server(HANG)
    entry = "policy:%s timeout=1 default=450 4.3.5 policy service down" % srv.endpoint
    got, took, _ = bad_peer(home, smtpd, entry, 1)
    assert got == b"450 4.3.5 <h>: Helo command rejected: policy service down\r\n"
    assert 0.9 <= took < 2.5


def test_spptimeout_bounds_a_server_without_timeout_option(home, smtpd, policy_server):
    srv = policy_server(HANG)
    home.setenv(SPPTIMEOUT="1")
    entry = "policy:%s" % srv.endpoint
    got, took, _ = bad_peer(home, smtpd, entry, 1)
    assert got == b"451 qmail-spp failure: %s: timeout (#4.3.0)\r\n" % entry.encode()
    assert 0.9 <= took < 2.5


def test_bad_entry_is_a_failure_not_a_file(home, smtpd):
    got, _, err = bad_peer(home, smtpd, "policy:inet:nohostport", 1)
    assert got == b"451 qmail-spp failure: policy:inet:nohostport: bad policy entry (#4.3.0)\r\n"
    assert err[0].endswith(b"bad policy entry (inet needs HOST:PORT)")


# -- the log ------------------------------------------------------------------------

def test_spplog_shows_policy_runs(home, smtpd, policy_server):
    srv = policy_server(lambda attrs, n: "DUNNO" if attrs["protocol_state"] == "MAIL"
                        else "REJECT no")
    e = "policy:" + srv.endpoint
    plugins(home, "[mail]\n%s\n:true\n[rcpt]\n%s\n" % (e, e))
    home.setenv(SPPLOG="text")
    c = smtpd.connect()
    c.send(b"MAIL FROM:<a@b>\r\n")
    c.expect(b"250 ok")
    c.send(b"RCPT TO:<x@example.org>\r\n")
    c.expect(b"554 5.7.1 <x@example.org>: Recipient address rejected: no")
    c.send(b"QUIT\r\n")
    c.expect(b"221 mx.example.org")
    lines = c.stderr_lines()
    assert re.search(rb"spp-run section=mail entry=%s verdict=DUNNO exit=- ms=\d+$"
                     % re.escape(e.encode()), lines[0])
    summary = lines[-1]
    assert re.search(rb" run1=mail,DUNNO,\d+,%s run2=mail,-,\d+,:true run3=rcpt,REJECT,\d+,%s "
                     % (re.escape(e.encode()), re.escape(e.encode())), summary)
    assert b' rcpt1="<x@example.org>:554/plugin ' + e.encode() + b'" ' in summary


# -- what `qspp check` and `qspp plugin-test` can call --------------------------------

def test_probe(policy_server):
    from qspp import policy
    from qspp.sppconfig import policy_entry
    srv = policy_server("REJECT 5.7.0 not from there")
    pe = policy_entry(("policy:%s timeout=2" % srv.endpoint).encode())
    assert policy.probe(pe) is None
    assert srv.requests == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = policy_entry(b"policy:inet:127.0.0.1:%d" % s.getsockname()[1])
    assert policy.probe(closed) == (policy.CANT_CONNECT, b"Connection refused")
    assert policy.probe(policy_entry(b"policy:inet:x")) == (policy.BAD_ENTRY, b"inet needs HOST:PORT")


@pytest.mark.parametrize("family, address", [(socket.AF_INET, "127.0.0.1"),
                                             (socket.AF_INET6, "::1")])
def test_localhost_reaches_either_loopback(family, address):
    # localhost needs no resolver: 127.0.0.1, then ::1, for policy servers and milters
    from qspp import milter, policy
    from qspp.sppconfig import policy_entry
    with socket.socket(family) as listener:
        listener.bind((address, 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        assert policy.probe(policy_entry(b"policy:inet:localhost:%d" % port)) is None
        link = milter.Link(milter.parse_line(b"inet:localhost:%d timeout=2" % port))
        link.open()
        assert link.sock.getpeername()[:2] == (address, port)
        link.close()


def test_an_inet_entry_costs_a_connection_no_codec_import(home, policy_server):
    """Under tcpserver every connection is a new interpreter: an inet entry's
    address is parsed without the idna codec (getaddrinfo given str loads
    encodings.idna, stringprep and unicodedata: some 7 ms a connection)."""
    import subprocess
    from .conftest import PYTHON
    srv = policy_server("DUNNO")
    plugins(home, "[mail]\npolicy:%s\n[rcpt]\npolicy:%s\n" % (srv.endpoint, srv.endpoint))
    assert srv.endpoint.startswith("inet:127.0.0.1:")
    r = subprocess.run([PYTHON, "-X", "importtime", "-m", "qspp.smtpd"],
                       input=b"HELO h\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.org>\r\n"
                             b"QUIT\r\n",
                       capture_output=True, env=home.full_env(), timeout=30)
    assert r.stdout.endswith(b"250 ok\r\n250 ok\r\n221 mx.example.org\r\n"), r.stdout
    assert srv.states() == ["MAIL", "RCPT"]
    imported = [line.rsplit(b"|", 1)[1].strip() for line in r.stderr.splitlines()
                if line.startswith(b"import time:")]
    assert b"qspp.policy" in imported
    assert not {b"encodings.idna", b"stringprep", b"unicodedata"} & set(imported)
