"""SppEngine: runs qmail-spp plugins and applies their commands (spp.md §3-§5).

The engine owns the per-connection plugin state: the environment edits, the
three deferred-error queues, the header buffer, the recipient counters and the
`A` flag.  Each hook returns `(verdict, text)`: text is what the client must be
sent (P lines, then the E/R text, a queue text or a 451 line), CRLF included.
The session sends it and acts on the verdict; the engine never writes output.

`policy:` entries (Postfix SMTPD policy delegation) run in the same order as
the plugins among which they stand; the engine also keeps the transaction
facts their requests report (qspp.policy), which plugins get from the
environment instead.
"""

import posix

from time import time_ns

from . import replies
from .diag import log
from .session import CONTINUE, OVERRIDE, REFUSED, CLOSE, Fatal

# Plugin output is capped per run (spprun), but H and L lines pile up across runs:
# a [rcpt] plugin adding a header per RCPT would let a client grow them forever.
MAX_PILE = 16 << 20

_TERMINATORS = {b"A": CONTINUE, b"N": CONTINUE, b"O": OVERRIDE,
                b"E": REFUSED, b"R": CLOSE, b"D": CLOSE}
_QUEUES = {b"M": "mail", b"R": "rcpt", b"D": "data"}


class _Queue:
    """One deferred-error queue (LM, LR or LD), spp.md §5.2."""

    __slots__ = ("text", "shown")

    def __init__(self):
        self.text = b""
        self.shown = False


class SppEngine:
    def __init__(self, config, env, timeout=60, runner=None, journal=None):
        # config: sppconfig.Config, or None when NOSPP turned plugins off
        self.sections = config.sections if config is not None else {}
        self.on = config is not None
        self.env = env
        self.timeout = timeout
        self._runner = runner
        self.journal = journal  # spplog.Journal when SPPLOG asks for run lines
        self.refuser = b""  # who gave the last refused/close verdict, for the log
        self.header_buffer = bytearray()
        self.body_buffer = bytearray()  # H from [body]: after the 354-time headers
        self.queues = {"mail": _Queue(), "rcpt": _Queue(), "data": _Queue()}
        self.rcptcount = 0
        self.rcptcountall = 0
        self.address = b""
        self._phase = ""
        self._text = bytearray()
        self._final = 0  # where the refusal line starts in _text
        self._defer_if_permit = None  # (refuser, reply) from DEFER_IF_PERMIT
        self._defer_if_reject = None
        # What policy requests report beyond the environment (qspp.policy.Facts)
        self.esmtp = False
        self.tls = (b"", b"", 0)  # encryption_protocol, _cipher, _keysize
        self._txn_sender = None  # None: no transaction
        self._txn_first = b""  # the first accepted recipient
        self._txn_instance = b""
        self._txn_size = 0
        self._message = None  # the transaction [body] judges, saved at DATA
        self._seqno = 0
        self._policies = None
        self._servers = None
        if config is not None and config.policies:
            self._load_policies()

    # -- hooks --------------------------------------------------------------

    def connection(self):
        return self.run_section("connection")

    def helo(self, arg: bytes, ehlo=None):
        """ehlo: True for EHLO, False for HELO, None when the caller cannot tell."""
        self.env[b"SMTPHELOHOST"] = arg
        if ehlo is not None:
            self.esmtp = ehlo
        outcome = self.run_section("helo")
        if outcome[0] != REFUSED and outcome[0] != CLOSE:
            self._txn_sender = None  # the session ends the transaction
        return outcome

    def mail(self, sender: bytes, size: int = 0):
        """Returns (verdict, text); `address` then holds the sender after C.
        size: the MAIL SIZE= value, 0 when none (policy requests report it)."""
        pending = self._pending("mail")
        if pending is not None:
            return pending
        self.rcptcount = self.rcptcountall = 0
        self.address = sender
        if self.on:
            self.env[b"SMTPMAILFROM"] = sender
        if self._policies is None:
            return self.run_section("mail")
        before = self._txn_instance, self._txn_size
        self._txn_instance = self._instance()
        self._txn_size = size
        outcome = self.run_section("mail")
        if outcome[0] == REFUSED or outcome[0] == CLOSE:
            self._txn_instance, self._txn_size = before
        else:
            self._txn_sender = self.address
            self._txn_first = b""
        return outcome

    def rcpt(self, recipient: bytes, hostsok: bool):
        """Returns (verdict, text); `address` then holds the recipient after C."""
        pending = self._pending("rcpt")
        if pending is not None:
            return pending
        self.rcptcountall += 1
        env = self.env
        env[b"SMTPRCPTCOUNT"] = b"%d" % self.rcptcount
        env[b"SMTPRCPTCOUNTALL"] = b"%d" % self.rcptcountall
        env[b"SMTPRCPTHOSTSOK"] = b"1" if hostsok else b"0"
        self.address = recipient
        if self.on:
            env[b"SMTPRCPTTO"] = recipient
        # rcpthosts is enforced after the section: a DEFER_IF_* answer must know
        return self.run_section("rcpt", qmail_refuses=not hostsok)

    def rcpt_accepted(self) -> None:
        # Δ9: refreshed at once, so [data] sees the accepted total
        self.rcptcount += 1
        if self.rcptcount == 1:
            self._txn_first = self.address
        self.env[b"SMTPRCPTCOUNT"] = b"%d" % self.rcptcount

    def data(self):
        pending = self._pending("data")
        if pending is not None:
            return pending
        outcome = self.run_section("data")
        if self._policies is not None and outcome[0] != REFUSED and outcome[0] != CLOSE:
            # the spp reset right after 354 clears the counters [body] still reports
            self._message = (self._txn_sender or b"", self._txn_first, self.rcptcount,
                             self._txn_instance, self._txn_size)
        return outcome

    def auth(self, user: bytes, method: bytes):
        """[auth] after the checkprogram accepted (spp.md §3.1); method lowercase."""
        self.env[b"SMTPAUTHUSER"] = user
        self.env[b"SMTPAUTHMETHOD"] = method
        return self.run_section("auth")

    def tls_started(self, protocol: bytes, cipher: bytes, bits: int) -> None:
        """STARTTLS succeeded: what policy requests report as encryption_*."""
        self.tls = (protocol, cipher, bits)
        self._txn_sender = None

    def wants_body(self) -> bool:
        """Decided at 354: spool the message for [body] plugins?"""
        return self.on and bool(self.sections.get("body"))

    def body(self, fd: int):
        """[body] with the spooled message on fd 0 (spp.md §6.1)."""
        self.body_buffer = bytearray()
        return self.run_section("body", fd)

    def headers(self) -> bytes:
        return bytes(self.header_buffer)

    def body_headers(self) -> bytes:
        return bytes(self.body_buffer)

    def reset(self) -> None:
        """The spp reset: RSET, and right after 354 (spp.md §5.3)."""
        self.header_buffer.clear()
        for q in self.queues.values():
            q.text = b""
            q.shown = False
        self.rcptcount = self.rcptcountall = 0
        self._txn_sender = None
        self._txn_first = b""

    # -- internals ----------------------------------------------------------

    def _pending(self, phase: str):
        q = self.queues[phase]
        if not q.text:
            return None
        q.shown = True
        self.refuser = b"deferred L" + phase[:1].upper().encode()
        return REFUSED, q.text

    def run_section(self, phase: str, stdin_fd=None, qmail_refuses=False):
        """Run one section's entries in order (spp.md §4.1); (verdict, text).

        qmail_refuses: qmail's own check after the hook will refuse the command
        unless an entry overrides (rcpthosts), which DEFER_IF_* answers weigh.
        The hooks above wrap it with their env exports and queue checks;
        `qspp plugin-test` calls it directly to explain one run."""
        entries = self.sections.get(phase)
        if not entries or not self.on:
            return CONTINUE, b""
        self._phase = phase
        self._text = bytearray()
        self._defer_if_permit = self._defer_if_reject = None
        verdict = CONTINUE
        policies = self._policies
        for entry in entries:
            if policies is not None:
                pe = policies.get(entry)
                if pe is not None:
                    v = self._run_policy(phase, entry, pe, stdin_fd)
                    if v is None:
                        continue
                    verdict = v
                    break
            result = self._runner(entry, self.env, self.timeout, stdin_fd, self._apply)
            term = result.terminator
            if result.failure is not None:
                log(b"qmail-spp failure: [%s] %s: %s%s" % (
                    phase.encode(), entry, result.failure,
                    b"" if term is None else b" (after " + term[:1] + b", which stands)"))
            if self.journal is not None:
                label = term[:1] if term is not None else (result.failure or b"-")
                self.journal.run(phase, entry, label, result.exit_status, result.elapsed_ms)
            self.refuser = b"plugin " + entry
            if term is not None:
                kind = term[:1]
                verdict = _TERMINATORS[kind]
                if kind == b"E" or kind == b"R":
                    self._final = len(self._text)
                    self._text += term[1:] + b"\r\n"
                elif kind == b"A":
                    self.on = False
                break
            if result.failure is not None:
                verdict = REFUSED
                self._final = len(self._text)
                self._text += replies.spp_failure(entry, result.failure) + b"\r\n"
                break
        if self._defer_if_permit is not None or self._defer_if_reject is not None:
            verdict = self._judge_deferrals(verdict, qmail_refuses)
        return verdict, bytes(self._text)

    def _judge_deferrals(self, verdict, qmail_refuses):
        """Postfix's DEFER_IF_PERMIT and DEFER_IF_REJECT, at the end of the
        command's checks: the first of each kind counts."""
        text = self._text
        if verdict == REFUSED or (verdict == CONTINUE and qmail_refuses):
            # a permanent refusal becomes the deferral; a temporary one stands
            if self._defer_if_reject is not None and (
                    verdict != REFUSED or text[self._final:self._final + 1] == b"5"):
                if verdict == REFUSED:
                    del text[self._final:]
                self.refuser, line = self._defer_if_reject
                text += line + b"\r\n"
                return REFUSED
            return verdict
        if verdict != CLOSE and self._defer_if_permit is not None:
            self.refuser, line = self._defer_if_permit
            text += line + b"\r\n"
            return REFUSED
        return verdict

    # -- policy entries ---------------------------------------------------------

    def _load_policies(self) -> None:
        from . import policy
        from .sppconfig import policy_entry
        self._policy = policy
        self._policies = {}
        for entries in self.sections.values():
            for entry in entries:
                pe = policy_entry(entry)
                if pe is not None:
                    self._policies[entry] = pe
        self._servers = policy.Servers()

    def transaction_from_env(self, phase) -> None:
        """For `qspp plugin-test`: the transaction a session would have reached
        PHASE with, taken from SMTPMAILFROM, SMTPRCPTTO and SMTPRCPTCOUNT (the
        recipients accepted so far), so that policy requests report it and a
        refusal names the address."""
        if phase not in ("mail", "rcpt", "data", "body"):
            return
        env = self.env
        sender = env.get(b"SMTPMAILFROM", b"")
        recipient = env.get(b"SMTPRCPTTO", b"")
        count = env.get(b"SMTPRCPTCOUNT", b"")
        count = int(count) if count.isdigit() and len(count) < 10 else int(bool(recipient))
        self._txn_instance = self._instance()
        if phase == "mail":
            self.address = sender
            return
        self._txn_sender = sender
        if phase == "rcpt":
            self.address = recipient
            return
        self.rcptcount = count
        self._txn_first = recipient
        if phase == "body":
            self._message = (sender, recipient, count, self._txn_instance, 0)

    def _instance(self) -> bytes:
        # Postfix's form: pid, arrival time, sequence number, in hex
        self._seqno += 1
        t = time_ns() // 1000
        return b"%x.%x.%x.%x" % (posix.getpid(), t // 1000000, t % 1000000, self._seqno)

    def _facts(self, phase, stdin_fd):
        p = self._policy
        f = p.Facts()
        f.esmtp = self.esmtp
        f.tls_protocol, f.tls_cipher, f.tls_bits = self.tls
        if phase == "mail":
            f.sender = self.address
            f.instance, f.size = self._txn_instance, self._txn_size
        elif phase == "rcpt" or phase == "data":
            f.sender = self._txn_sender or b""
            f.instance, f.size = self._txn_instance, self._txn_size
            if phase == "rcpt":
                f.recipient = self.address
            else:
                f.rcpt_count = self.rcptcount
                f.recipient = self._txn_first if self.rcptcount == 1 else b""
        elif phase == "body" and self._message is not None:
            f.sender, first, f.rcpt_count, f.instance, f.size = self._message
            f.recipient = first if f.rcpt_count == 1 else b""
            if stdin_fd is not None:
                try:
                    f.size = posix.fstat(stdin_fd).st_size
                except OSError:
                    pass
        return f

    def _reply_name(self, phase) -> bytes:
        """What Postfix puts in <...> when it refuses the command."""
        env = self.env
        if phase == "connection":
            return (env.get(b"TCPREMOTEHOST") or b"unknown") + b"[" + env.get(
                b"TCPREMOTEIP", b"") + b"]"
        if phase == "helo":
            return env.get(b"SMTPHELOHOST", b"")
        if phase == "mail" or phase == "rcpt":
            return self.address
        if phase == "auth":
            return env.get(b"SMTPAUTHUSER", b"")
        return b"DATA" if phase == "data" else b"END-OF-MESSAGE"

    def _run_policy(self, phase, entry, pe, stdin_fd):
        """One policy entry; the verdict that ends the section, or None to go on."""
        p = self._policy
        state = p.STATES[phase]
        if phase == "helo" and self.esmtp:
            state = b"EHLO"
        request = p.request(state, self.env, self._facts(phase, stdin_fd))
        res = self._servers.ask(pe, request, self.timeout, phase, self._reply_name(phase))
        d = res.decision
        if res.failure is not None:
            log(b"qmail-spp failure: [%s] %s: %s (%s)%s" % (
                phase.encode(), entry, res.failure, res.detail,
                b"" if d is None else b"; default=" + pe.default))
        if self.journal is not None:
            if res.failure is None:
                label = d.word
            else:
                label = res.failure + (b"" if d is None else b":" + d.word)
            self.journal.run(phase, entry, label, None, int(res.elapsed * 1000 + 0.5))
        self.refuser = b"plugin " + entry
        if d is None:
            self._final = len(self._text)
            self._text += replies.spp_failure(entry, res.failure) + b"\r\n"
            return REFUSED
        if d.note is not None:
            log(b"policy " + entry + b": " + d.note)
        kind = d.kind
        if kind == p.CONTINUE:
            return None
        if kind == p.PREPEND:
            self._apply(b"H" + d.text)
            return None
        if kind == p.DEFER_IF_PERMIT:
            if self._defer_if_permit is None:
                self._defer_if_permit = (self.refuser, d.text)
            return None
        if kind == p.DEFER_IF_REJECT:
            if self._defer_if_reject is None:
                self._defer_if_reject = (self.refuser, d.text)
            return None
        self._final = len(self._text)
        self._text += d.text + b"\r\n"
        return CLOSE if kind == p.CLOSE else REFUSED

    def _apply(self, line: bytes) -> None:
        """One non-terminating plugin line (spp.md §5.1), applied at once."""
        cmd = line[:1]
        text = line[1:]
        if cmd == b"P":
            self._text += text + b"\r\n"
        elif cmd == b"H":
            buf = self.body_buffer if self._phase == "body" else self.header_buffer
            buf += text + b"\n"
            if len(buf) > MAX_PILE:
                raise Fatal(replies.OUT_OF_MEMORY, "plugin headers over 16 MiB")
        elif cmd == b"S":
            eq = text.find(b"=")
            if eq <= 0:
                log(b"ignored plugin line without a name=value: S" + text)
            else:
                self.env[text[:eq]] = text[eq + 1:]
        elif cmd == b"U":
            self.env.pop(text, None)
        elif cmd == b"C":
            if self._phase == "mail":
                self.address = text
                self.env[b"SMTPMAILFROM"] = text
            elif self._phase == "rcpt":
                self.address = text
                self.env[b"SMTPRCPTTO"] = text
        elif cmd == b"L":
            name = _QUEUES.get(text[:1])
            if name is not None:
                q = self.queues[name]
                if not q.shown:
                    q.text += text[1:] + b"\r\n"
                    if len(q.text) > MAX_PILE:
                        raise Fatal(replies.OUT_OF_MEMORY, "deferred plugin errors over 16 MiB")
