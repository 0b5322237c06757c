"""The SMTP state machine of qmail-smtpd, without I/O.

The I/O loop hands `Session` one command line at a time (`command`) or raw DATA
bytes (`data`), and sends whatever has collected in `out` before its next read
(which alone makes pipelining work, spec §4.2).  The session never reads a
socket or sleeps; plugin runs and the queue are reached through the engine and
the queue factory it was given, so tests can drive it with fakes.
"""

from . import replies
from .address import parse as addrparse
from .control import ControlError, NoLocalIPs
from .message import MessageReader

# session.state
COMMAND = 0
DATA = 1
CLOSED = 2

# engine verdicts (spp.md terms)
CONTINUE = 0
OVERRIDE = 1
REFUSED = 2
CLOSE = 3

MAX_COMMAND = 65536  # bytes before LF, CR included (spec §2.7, D4)
MAX_ENVELOPE = 16 << 20  # bytes qmail-queue would read on fd 1 (spec §2.7, D4)

_received_line = None  # qspp.received.received, imported at the first message

# verb: the method that answers it.  Names, not bound methods kept per
# session: those would hold the session in a cycle that only the garbage
# collector could free, where now it goes with its last reference.
_VERBS = {
    b"helo": "helo",
    b"ehlo": "ehlo",
    b"mail": "mail",
    b"rcpt": "rcpt",
    b"data": "data_command",
    b"rset": "rset",
    b"noop": "noop",
    b"vrfy": "vrfy",
    b"help": "help",
    b"quit": "quit",
    b"starttls": "starttls",
}
_VERBS_AUTH = {**_VERBS, b"auth": "auth"}


class Fatal(Exception):
    """Ends the connection after `reply`, exit status 1 (spec's "fatal 421")."""

    def __init__(self, reply: bytes, why: str = ""):
        Exception.__init__(self, reply)
        self.reply = reply
        self.why = why


class _NoTls:
    """tls_io until the I/O loop gives a real one: STARTTLS never offered."""

    @staticmethod
    def offered() -> bool:
        return False


class Session:
    def __init__(self, settings, env, engine, start_queue, clock, start_spool=None):
        self.settings = settings
        self.env = env  # the environment every later child gets (spec §2.4)
        self.engine = engine
        self.start_queue = start_queue  # (env) -> queue; raises QueueStartError
        self.clock = clock
        self.start_spool = start_spool  # (env) -> spool.Spool, for [body] plugins
        self.journal = None  # spplog.Journal when SPPLOG is set
        self.milters = None  # milter.Milters when the connection has milters
        self.tls_cipher = self.tls_version = None  # for the milters' macros
        # I/O the session asks for but never does itself (set by the I/O loop):
        # auth_io has .pid, .check(argv, data, env) -> None or a reply, .delay();
        # tls_io has .offered() -> bool, .context(env) -> (context, None or a 454)
        self.auth_io = None
        self.tls_io = _NoTls
        self.tls_request = None  # a TLS context: the I/O loop does the handshake
        self.tls = False
        self.authenticated = False
        self._exchange = None  # the running AUTH mechanism (auth.py generator)
        self._auth_method = b""
        self.out = bytearray()
        self.flush_soon = False
        self.state = COMMAND
        self.exit_status = 0
        self.end = "eof"  # how the connection ended, for the SPPLOG summary
        self.fatal_why = ""
        self.helo_name = None
        self.relay = settings.relayclient  # the relay right and its suffix, §5.5
        self.protocol = b"SMTP"
        self.remoteinfo = settings.remoteinfo
        self._close_transaction()
        self.reader = None
        self.queue = None
        self.spool = None
        self._verbs = _VERBS if settings.auth is None else _VERBS_AUTH

    # -- output -------------------------------------------------------------

    def reply(self, text: bytes, flush: bool = False) -> None:
        self.out += text
        self.out += b"\r\n"
        if flush:
            self.flush_soon = True

    def close(self, status: int, end: str) -> None:
        self.state = CLOSED
        self.exit_status = status
        self.end = end
        self.flush_soon = True

    def fatal(self, err: Fatal) -> None:
        self.fatal_why = err.why  # the I/O loop logs it (spec §2.7)
        self.reply(err.reply)
        self.close(1, "fatal: " + err.reply.decode("ascii", "replace"))

    # -- connection ---------------------------------------------------------

    def start(self) -> None:
        """Run the connection hook and greet (spec §3 steps 4-5)."""
        if not self._stopped(self.engine.connection()):
            if self.milters is not None:
                self.milters.connect()
            self.reply(replies.greeting(self.settings.greeting), flush=True)
        else:
            self.milters = None  # milters see only what the plugins let through

    def command(self, line: bytes) -> None:
        """One client line, without its LF (spec §4.1)."""
        if line[-1:] == b"\r":
            line = line[:-1]
        if self._exchange is not None:
            try:
                self._auth_line(line)
            except Fatal as err:
                self.fatal(err)
            return
        nul = line.find(b"\0")
        if nul >= 0:
            line = line[:nul]
        space = line.find(b" ")
        if space < 0:
            verb, arg = line, b""
        else:
            verb, arg = line[:space], line[space:].lstrip(b" ")
        handler = self._verbs.get(verb.lower())
        try:
            if handler is None:
                self.reply(replies.UNIMPLEMENTED, flush=True)
            else:
                getattr(self, handler)(arg)
        except Fatal as err:
            self.fatal(err)

    def _close_transaction(self) -> None:
        self.mail_seen = False
        self.sender = b""
        self.flagged = False
        self.rcpt_count = 0
        # The envelope as qmail-queue will read it, built as MAIL and RCPTs are
        # accepted: one byte per envelope byte, where a list of recipients cost
        # about five (an object per address), so a 16 MiB envelope stays 16 MiB.
        self.pending_envelope = bytearray()
        self.envelope_size = 0  # bytes qmail-queue would read, final \0 included

    # -- verbs --------------------------------------------------------------

    def helo(self, arg: bytes) -> None:
        self._helo(arg, ehlo=False)

    def ehlo(self, arg: bytes) -> None:
        self._helo(arg, ehlo=True)

    def _helo(self, arg: bytes, ehlo: bool) -> None:
        if self._stopped(self.engine.helo(arg, ehlo=ehlo)):
            return
        if self.milters is not None:
            refusal = self.milters.helo(arg, self.tls_version, self.tls_cipher)
            if refusal is not None:
                self._milter_refused(refusal)
                return
        self.helo_name = arg
        self._close_transaction()
        g = self.settings.greeting
        if ehlo:
            lines = [g]
            if not self.tls and self.tls_io.offered():
                lines.append(b"STARTTLS")
            lines += (b"PIPELINING", b"8BITMIME")
            mode = self.settings.auth
            if mode is not None:
                lines.append(b"SIZE %d" % self.settings.databytes)
                if mode.mechanisms is not None and (self.tls or not mode.forcetls):
                    lines.append(b"AUTH " + mode.mechanisms)
            for text in lines[:-1]:
                self.reply(b"250-" + text)
            self.reply(b"250 " + lines[-1], flush=True)
        else:
            self.reply(replies.helo(g), flush=True)

    def _stopped(self, outcome, trail=None, subject=None) -> bool:
        """Sends a hook's text; True when it refused the command or closed."""
        verdict, text = outcome
        self.out += text
        if verdict != REFUSED and verdict != CLOSE:
            return False
        if trail is not None:
            self._trail(trail, subject, text, self.engine.refuser)
        if verdict == REFUSED:
            self.flush_soon = True
        else:
            self.close(0, "closed by " + self.engine.refuser.decode("utf-8", "replace"))
        return True

    def _trail(self, kind, *args) -> None:
        """Tell the SPPLOG journal (if any) what became of a command."""
        if self.journal is not None:
            getattr(self.journal, kind)(*args)

    def _address(self, arg: bytes):
        s = self.settings
        try:
            return addrparse(arg, s.localiphost, s.is_local_ip)
        except NoLocalIPs as e:
            raise Fatal(replies.MY_IP, "cannot list local IP addresses: %s" % (e,))

    def mail(self, arg: bytes) -> None:
        mode = self.settings.auth
        if mode is not None and mode.required and not self.authenticated:
            self.reply(replies.AUTH_REQUIRED)
            self._trail("mail", arg, replies.AUTH_REQUIRED, b"qmail")
            return
        sender = self._address(arg)
        if sender is None:
            self.reply(replies.SYNTAX)
            self._trail("mail", arg, replies.SYNTAX, b"qmail")
            return
        if mode is not None and self._size_too_big(arg):
            self.reply(replies.DATABYTES)
            self._trail("mail", sender, replies.DATABYTES, b"qmail")
            return
        outcome = self.engine.mail(sender, _mail_size(arg))
        if self._stopped(outcome, "mail", sender):
            return
        verdict = outcome[0]
        sender = self.engine.address
        if self.milters is not None:
            refusal = self.milters.mail(sender, *self._auth_macros())
            if refusal is not None:
                self._trail("mail", sender, refusal, b"milter")
                self._milter_refused(refusal)
                return
        self._close_transaction()
        self.mail_seen = True
        self.sender = sender
        self.flagged = verdict != OVERRIDE and self.settings.badmailfrom.flags(sender)
        self.pending_envelope += b"F"
        self.pending_envelope += sender
        self.pending_envelope += b"\0"
        self.envelope_size = len(self.pending_envelope) + 1  # and the final \0
        self.reply(replies.OK)
        self._trail("mail", sender, replies.OK, b"qmail")

    def rcpt(self, arg: bytes) -> None:
        if not self.mail_seen:
            self.reply(replies.MAIL_FIRST)
            return
        recipient = self._address(arg)
        if recipient is None:
            self.reply(replies.SYNTAX)
            return
        if self.flagged:
            self.reply(replies.BADMAILFROM)
            self._trail("rcpt", recipient, replies.BADMAILFROM, b"qmail")
            return
        try:
            hostsok = self.relay is not None or self.settings.rcpthosts.allows(recipient)
        except ControlError as e:
            raise Fatal(replies.CONTROLS, str(e))
        outcome = self.engine.rcpt(recipient, hostsok)
        if self._stopped(outcome, "rcpt", recipient):
            return
        verdict = outcome[0]
        recipient = self.engine.address
        if verdict == CONTINUE and not hostsok:
            refusal = replies.RCPTHOSTS_TLS if self.tls else replies.RCPTHOSTS
            self.reply(refusal)
            self._trail("rcpt", recipient, refusal, b"qmail")
            return
        if self.milters is not None:
            refusal = self.milters.rcpt(recipient)
            if refusal is not None:
                self._trail("rcpt", recipient, refusal, b"milter")
                self._milter_refused(refusal)
                return
        if self.relay is not None:
            recipient += self.relay
        self.envelope_size += len(recipient) + 2
        if self.envelope_size > MAX_ENVELOPE:
            raise Fatal(replies.OUT_OF_MEMORY, "envelope over 16 MiB")
        self.pending_envelope += b"T"
        self.pending_envelope += recipient
        self.pending_envelope += b"\0"
        self.rcpt_count += 1
        self.engine.rcpt_accepted()
        self.reply(replies.OK)
        self._trail("rcpt", recipient, replies.OK,
                    self.engine.refuser if verdict == OVERRIDE else b"qmail")

    def data_command(self, arg: bytes) -> None:
        if not self.mail_seen:
            self.reply(replies.MAIL_FIRST, flush=True)
            return
        if not self.rcpt_count:
            self.reply(replies.RCPT_FIRST, flush=True)
            return
        if self._stopped(self.engine.data(), "message"):
            return
        milters = self.milters
        if milters is not None:
            refusal = milters.data()
            if refusal is not None:
                self._trail("message", None, refusal, b"milter")
                self._milter_refused(refusal)
                return
            self.transaction = (self.sender, self._recipients())
        envelope = self._envelope()
        self._close_transaction()
        if self.engine.wants_body() or (milters is not None and milters.wants_message()):
            # spp.md §6.1: qmail-queue starts only once [body] lets the message through
            self.spool = sink = self.start_spool(self.env)
        else:
            try:
                self.queue = sink = self.start_queue(self.env)
            except OSError:
                self.reply(replies.QQT_FAILURE, flush=True)
                self._trail("message", None, replies.QQT_FAILURE, b"queue")
                return
        self.reply(replies.GO_AHEAD, flush=True)
        self.envelope = envelope
        sink.write(self._received() + self.engine.headers())
        if self.spool is not None:
            self.spool.mark()
        self.engine.reset()
        self.reader = MessageReader(self.settings.databytes)
        self.state = DATA

    def _recipients(self) -> list:
        """The accepted recipients, read back from the envelope being built
        (F sender \\0, then T recipient \\0 each); only milters need a list."""
        return [t[1:] for t in bytes(self.pending_envelope).split(b"\0")[1:-1]]

    def _envelope(self) -> bytearray:
        """The finished envelope; handed over, not copied (a copy would double
        the peak for a 16 MiB envelope)."""
        envelope = self.pending_envelope
        envelope += b"\0"
        self.pending_envelope = bytearray()
        return envelope

    def _received(self) -> bytes:
        global _received_line
        if _received_line is None:
            from .received import received as _received_line
        s = self.settings
        return _received_line(s.remotehost, self.helo_name, self.remoteinfo, s.remoteip,
                              s.localhost, self.protocol, self.clock())

    def _size_too_big(self, arg: bytes) -> bool:
        """The SIZE= parameter of MAIL in AUTH mode (spec §8.6)."""
        databytes = self.settings.databytes
        return bool(databytes) and _mail_size(arg) > databytes

    # -- AUTH (spec §8) -------------------------------------------------------

    def auth(self, arg: bytes) -> None:
        self.flush_soon = True
        mode = self.settings.auth
        if mode.mechanisms is None:
            self.reply(replies.AUTH_NOT_AVAILABLE)
            return
        if self.authenticated:
            self.reply(replies.AUTH_ALREADY)
            return
        if self.mail_seen:
            self.reply(replies.AUTH_IN_TRANSACTION)
            return
        space = arg.find(b" ")
        if space < 0:
            mechanism, initial = arg, b""
        else:
            mechanism, initial = arg[:space], arg[space:].lstrip(b" ")
        mechanism = mechanism.lower()
        if mode.forcetls and not self.tls:
            # refused before the exchange: no credential is sent in cleartext
            self.reply(replies.AUTH_ENCRYPTION_REQUIRED)
            self._trail("auth", mechanism, None, "encryption-required")
            return
        from . import auth
        if mechanism == b"login":
            exchange = auth.login(initial)
        elif mechanism == b"plain":
            exchange = auth.plain(initial)
        elif mechanism == b"cram-md5":
            host = self.settings.auth.host or self.settings.localhost
            exchange = auth.cram_md5(auth.challenge(self.auth_io.pid, int(self.clock()), host))
        else:
            self.reply(replies.AUTH_TYPE)
            return
        self._auth_method = mechanism
        self._exchange = exchange
        self._auth_step(None)

    def _auth_line(self, line: bytes) -> None:
        """One line of the AUTH exchange: never a command (spec §8.2)."""
        self.flush_soon = True
        if line == b"*":
            self._exchange = None
            self.reply(replies.AUTH_CANCELED)
            self._trail("auth", self._auth_method, None, "canceled")
        elif not line:
            self._exchange = None
            self.reply(replies.AUTH_MALFORMED)
            self._trail("auth", self._auth_method, None, "malformed")
        else:
            self._auth_step(line)

    def _auth_step(self, line) -> None:
        from .auth import Malformed
        try:
            prompt = self._exchange.send(line)
        except StopIteration as done:
            self._exchange = None
            self._authenticate(*done.value)
        except Malformed:
            self._exchange = None
            self.reply(replies.AUTH_MALFORMED)
            self._trail("auth", self._auth_method, None, "malformed")
        else:
            self.reply(prompt, flush=True)

    def _authenticate(self, user: bytes, secret: bytes, challenge: bytes) -> None:
        from .auth import checkprogram_data
        io = self.auth_io
        refusal = io.check(self.settings.auth.checkargv,
                           checkprogram_data(user, secret, challenge), self.env)
        method = self._auth_method
        if refusal is not None:
            if refusal == replies.AUTH_FAILED:
                # written with or without SPPLOG: fail2ban and audits need it always
                from .spplog import auth_failed
                auth_failed(self.settings.remoteip, method, user)
                self._trail("auth", method, user, "failed")
                io.delay()
            else:
                self._trail("auth", method, user, "error")
            self.reply(refusal)
            return
        env = self.env
        outcome = self.engine.auth(user, method)
        if self._stopped(outcome):
            # Δ10: a refused user must not look authenticated to later plugins
            env.pop(b"SMTPAUTHUSER", None)
            env.pop(b"SMTPAUTHMETHOD", None)
            self._trail("auth", method, user, "refused")
            return
        self.authenticated = True
        self.relay = b""
        self.protocol = b"ESMTPA"
        self.remoteinfo = user
        env[b"TCPREMOTEINFO"] = user
        env[b"RELAYCLIENT"] = b""
        self.reply(replies.AUTH_OK)
        self._trail("auth", method, user, "ok")

    # -- STARTTLS (spec §8.7) -------------------------------------------------

    def starttls(self, arg: bytes) -> None:
        self.flush_soon = True
        if self.tls or not self.tls_io.offered():
            self.reply(replies.UNIMPLEMENTED)
            return
        if arg:
            self.reply(replies.TLS_NO_PARAMETERS)
            return
        try:
            context, refusal = self.tls_io.context(self.env)
        except ControlError as e:
            raise Fatal(replies.CONTROLS, str(e))
        if refusal is not None:
            self.reply(refusal)
            self._trail("tls", "unavailable", None, None, refusal)
            return
        self.reply(replies.TLS_READY)
        self.tls_request = context

    def tls_failed(self, why: bytes) -> None:
        """The handshake failed: the 454 goes out in cleartext, then exit 1."""
        self.tls_request = None
        refusal = replies.tls_failed(why)
        self.reply(refusal)
        self._trail("tls", "failed", None, None, refusal)
        self.close(1, "TLS handshake failed")

    def tls_started(self, cipher: bytes, version=None, bits: int = 0) -> None:
        """The handshake succeeded: forget what the client said before (D8)."""
        self.engine.tls_started(version or b"", cipher, bits)
        self._trail("tls", "ok", version, cipher, None)
        self.tls_request = None
        self.tls_cipher, self.tls_version = cipher, version
        self.tls = True
        self.protocol = b"ESMTPS (" + cipher + b" encrypted)"
        self.helo_name = None
        self._close_transaction()
        if self.authenticated:
            s = self.settings
            env = self.env
            self.authenticated = False
            self.relay = s.relayclient
            self.remoteinfo = s.remoteinfo
            for name, value in ((b"TCPREMOTEINFO", s.remoteinfo),
                                (b"RELAYCLIENT", s.relayclient)):
                if value is None:
                    env.pop(name, None)
                else:
                    env[name] = value
            env.pop(b"SMTPAUTHUSER", None)
            env.pop(b"SMTPAUTHMETHOD", None)

    def rset(self, arg: bytes) -> None:
        self._close_transaction()
        self.engine.reset()
        if self.milters is not None:
            self.milters.abort()
        self.reply(replies.FLUSHED)

    def noop(self, arg: bytes) -> None:
        self.reply(replies.OK, flush=True)

    def vrfy(self, arg: bytes) -> None:
        self.reply(replies.VRFY, flush=True)

    def help(self, arg: bytes) -> None:
        self.reply(replies.HELP, flush=True)

    def quit(self, arg: bytes) -> None:
        self.reply(replies.quit(self.settings.greeting))
        self.close(0, "quit")

    # -- DATA ---------------------------------------------------------------

    def data(self, buf) -> int:
        """Feed raw message bytes; returns how many belonged to the message."""
        reader = self.reader
        used = reader.feed(buf)
        chunk = reader.take()
        if chunk:
            (self.spool or self.queue).write(chunk)
        if reader.bare_lf:
            self.abort()
            self._end(replies.BARE_LF, b"qmail")
            self.close(1, "bare LF")
        elif reader.done:
            if reader.too_many_hops:
                self.abort()
                self._end(replies.TOO_MANY_HOPS, b"qmail")
            elif reader.too_big:
                self.abort()
                self._end(replies.DATABYTES, b"qmail")
            elif self.spool is not None:
                self._judge_body()
            else:
                queue, self.queue = self.queue, None
                self._end(queue.finish(self.envelope), b"queue")
            self.reader = None
            self.envelope = None  # up to 16 MiB: not kept until the next message
            if self.state == DATA:
                self.state = COMMAND
        return used

    def _end(self, reply: bytes, by: bytes) -> None:
        """The one reply after a message (spec §6.6)."""
        self.reply(reply, flush=True)
        self._trail("message", self.reader.size, reply, by)

    def _judge_body(self) -> None:
        """Run [body] on the spooled message, then queue it if let through."""
        spool, self.spool = self.spool, None
        cant_spool = replies.spp_failure(b"[body]", b"can't spool message")
        try:
            if spool.failed:
                self._end(cant_spool, b"qspp")
                return
            if self._stopped(self.engine.body(spool.reader), "message", self.reader.size):
                return
            draft = None
            if self.milters is not None:
                try:
                    draft = self._milter_verdict(spool)
                except OSError:
                    self._end(cant_spool, b"qspp")
                    return
                if draft is None:
                    return
            try:
                queue = self.start_queue(self.env)
            except OSError:
                self._end(replies.QQT_FAILURE, b"queue")
                return
            try:
                if draft is None:
                    spool.copy_to(queue, self.engine.body_headers())
                else:
                    draft.copy_to(queue)
            except OSError:
                queue.finish(None)
                self._end(cant_spool, b"qspp")
                return
            self._end(queue.finish(self.envelope if draft is None else draft.envelope()),
                      b"queue")
        finally:
            spool.close()
            if self.milters is not None:
                self.milters.end_message(draft)

    def _milter_verdict(self, spool):
        """The milters' end of message: the draft to queue, or None once the
        reply (a refusal, or a discard's 250) is given."""
        from .milter import pieces
        sender, recipients = self.transaction
        relay = self.relay
        shown = [(r[:-len(relay)] if relay and r.endswith(relay) else r, r) for r in recipients]
        verdict = self.milters.message(pieces(spool, self.engine.body_headers()), sender, shown)
        if verdict.reply is not None:
            self._end(verdict.reply, b"milter")
            if verdict.reply[:3] == b"421":
                self.close(0, "closed by milter")
        elif verdict.discard:
            self._end(replies.MILTER_DISCARDED, b"milter")
        else:
            return verdict.draft
        return None

    def _milter_refused(self, refusal: bytes) -> None:
        """A milter's refusal of a command; a 421 also ends the connection,
        as under Postfix."""
        self.reply(refusal, flush=True)
        if refusal[:3] == b"421":
            self.close(0, "closed by milter")

    def _auth_macros(self):
        """{auth_type} and {auth_authen} for the milters."""
        if not self.authenticated:
            return None, None
        return self._auth_method.upper(), self.remoteinfo

    def abort(self) -> None:
        """End a message that will not be queued: no envelope byte (spec §2.6)."""
        if self.queue is not None:
            self.queue.finish(None)
            self.queue = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.milters is not None:
            self.milters.abort()


def _mail_size(arg: bytes) -> int:
    """MAIL's SIZE= value, 0 when absent; more than 10 digits counts as 2**40,
    beyond any databytes (< 2**32), since int() refuses very long digit strings."""
    if arg.find(b">") < 5:
        return 0
    size = 0
    for word in arg.split(b" ")[1:]:
        if word[:5].lower() == b"size=":
            digits = 0
            for c in word[5:]:
                if not 48 <= c <= 57:
                    break
                digits += 1
            value = word[5:5 + digits].lstrip(b"0")
            size = max(size, 1 << 40 if len(value) > 10 else int(value or b"0"))
    return size
