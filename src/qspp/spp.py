"""SppEngine: runs qmail-spp plugins and applies their commands (spp.md §3-§5).

The engine owns the per-connection plugin state: the environment edits, the
three deferred-error queues, the header buffer, the recipient counters and the
`A` flag.  Each hook returns `(verdict, text)`: text is what the client must be
sent (P lines, then the E/R text, a queue text or a 451 line), CRLF included.
The session sends it and acts on the verdict; the engine never writes output.
"""

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

    # -- hooks --------------------------------------------------------------

    def connection(self):
        return self.run_section("connection")

    def helo(self, arg: bytes):
        self.env[b"SMTPHELOHOST"] = arg
        return self.run_section("helo")

    def mail(self, sender: bytes):
        """Returns (verdict, text); `address` then holds the sender after C."""
        pending = self._pending("mail")
        if pending is not None:
            return pending
        self.rcptcount = self.rcptcountall = 0
        self.address = sender
        if self.on:
            self.env[b"SMTPMAILFROM"] = sender
        return self.run_section("mail")

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
        return self.run_section("rcpt")

    def rcpt_accepted(self) -> None:
        # Δ9: refreshed at once, so [data] sees the accepted total
        self.rcptcount += 1
        self.env[b"SMTPRCPTCOUNT"] = b"%d" % self.rcptcount

    def data(self):
        pending = self._pending("data")
        if pending is not None:
            return pending
        return self.run_section("data")

    def auth(self, user: bytes, method: bytes):
        """[auth] after the checkprogram accepted (spp.md §3.1); method lowercase."""
        self.env[b"SMTPAUTHUSER"] = user
        self.env[b"SMTPAUTHMETHOD"] = method
        return self.run_section("auth")

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

    # -- internals ----------------------------------------------------------

    def _pending(self, phase: str):
        q = self.queues[phase]
        if not q.text:
            return None
        q.shown = True
        self.refuser = b"deferred L" + phase[:1].upper().encode()
        return REFUSED, q.text

    def run_section(self, phase: str, stdin_fd=None):
        """Run one section's entries in order (spp.md §4.1); (verdict, text).

        The hooks above wrap it with their env exports and queue checks;
        `qspp plugin-test` calls it directly to explain one run."""
        entries = self.sections.get(phase)
        if not entries or not self.on:
            return CONTINUE, b""
        self._phase = phase
        self._text = bytearray()
        verdict = CONTINUE
        for entry in entries:
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
                verdict = _TERMINATORS[term[:1]]
                if term[:1] in b"ER":
                    self._text += term[1:] + b"\r\n"
                elif term[:1] == b"A":
                    self.on = False
                break
            if result.failure is not None:
                verdict = REFUSED
                self._text += replies.spp_failure(entry, result.failure) + b"\r\n"
                break
        return verdict, bytes(self._text)

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
