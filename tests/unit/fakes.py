"""Test doubles for driving qspp.session.Session without processes or sockets.

- FakeQueue / QueueFactory: the `start_queue` callable and what it returns.
- SpoolFactory: the `start_spool` callable ([body] mode), real unlinked files.
- FakeRunner: a stand-in for spprun.run_entry that parses a scripted plugin's
  output the way run_entry does (spp.md §4.3) and feeds the engine.
- FakeCdb: a morercpthosts.cdb stand-in for control.Rcpthosts.
- Harness: a Session plus the fakes, with an input loop that splits command
  lines and message bytes the way qspp.smtpd's I/O loop does (spec §4.2).
"""


from qspp import control
from qspp.session import COMMAND, DATA, CLOSED, Session
from qspp.spp import SppEngine
from qspp.startup import Settings
from qspp.sppconfig import Config

CLOCK = 1795558454
QUEUED = b"250 ok 1795558460 qp 4242"

_TERMS = b"ANOERD"
_UNSET = object()


# -- queue ----------------------------------------------------------------------

class FakeQueue:
    """Records fd 0 (message) and fd 1 (envelope) as qmail-queue would see them."""

    def __init__(self, env, reply):
        self.env = dict(env)  # the environment qmail-queue would get
        self.reply = reply
        self.chunks = []
        self.envelope = _UNSET
        self.finish_calls = 0

    def write(self, data):
        assert self.finish_calls == 0, "write after finish"
        self.chunks.append(bytes(data))

    def finish(self, envelope):
        self.finish_calls += 1
        self.envelope = None if envelope is None else bytes(envelope)
        return self.reply

    @property
    def message(self):
        return b"".join(self.chunks)

    @property
    def finished(self):
        return self.finish_calls > 0

    @property
    def aborted(self):
        return self.finish_calls > 0 and self.envelope is None


class SpoolFactory:
    """The `start_spool(env)` callable: real spool.Spool files (unlinked, in
    TMPDIR), recorded; `fail=True` gives a spool whose creation failed."""

    def __init__(self, fail=False):
        self.fail = fail
        self.spools = []

    def __call__(self, env):
        from qspp.spool import Spool
        if self.fail:
            spool = Spool()
            spool.failed = True
        else:
            spool = Spool.create(env)
        self.spools.append(spool)
        return spool


class QueueFactory:
    """The `start_queue(env)` callable; `fail=True` simulates a spawn failure."""

    def __init__(self, reply=QUEUED, fail=False):
        self.reply = reply
        self.fail = fail
        self.queues = []
        self.attempts = 0

    def __call__(self, env):
        self.attempts += 1
        if self.fail:
            raise OSError(11, "Resource temporarily unavailable")
        q = FakeQueue(env, self.reply)
        self.queues.append(q)
        return q

    @property
    def last(self):
        return self.queues[-1]


# -- plugins --------------------------------------------------------------------

class FakeResult:
    __slots__ = ("terminator", "failure")

    def __init__(self, terminator, failure):
        self.terminator = terminator
        self.failure = failure


class FakeRunner:
    """runner(entry, env, timeout, stdin_fd, on_line) for SppEngine.

    programs maps an entry to a callable(env) (or, marked by with_stdin,
    callable(env, stdin_fd)) returning the plugin's stdout as bytes, or (stdout, failure) to simulate a §4.5 failure (b"child crashed",
    b"timeout", ...).  Output is split and cleaned as run_entry does: split at
    LF, one trailing CR stripped, cut at NUL, empty lines skipped, the first
    line starting with A N O E R D is the terminator and the rest is dropped.
    """

    def __init__(self, programs):
        self.programs = programs
        self.calls = []      # entries in run order
        self.envs = []       # a copy of the environment each run got
        self.timeouts = []
        self.stdin = []

    def __call__(self, entry, env, timeout, stdin_fd, on_line):
        self.calls.append(entry)
        self.envs.append(dict(env))
        self.timeouts.append(timeout)
        self.stdin.append(stdin_fd)
        program = self.programs[entry]
        if getattr(program, "wants_stdin", False):
            out = program(env, stdin_fd)
        else:
            out = program(env)
        failure = None
        if isinstance(out, tuple):
            out, failure = out
        term = None
        for line in out.split(b"\n"):
            if line[-1:] == b"\r":
                line = line[:-1]
            nul = line.find(b"\0")
            if nul >= 0:
                line = line[:nul]
            if not line:
                continue
            if line[0] in _TERMS:
                term = line
                break
            on_line(line)
        return FakeResult(term, failure)

    def count(self, entry):
        return self.calls.count(entry)


def echo(text):
    """A plugin that always prints `text` (a shell `printf`)."""
    return lambda env: text


def with_stdin(fn):
    """Mark a program that also takes the run's stdin fd: fn(env, stdin_fd)."""
    fn.wants_stdin = True
    return fn


def config(**sections):
    """An sppconfig.Config as parsed: config(helo=[b":x"], mail=[...])."""
    return Config(b"(fake)", {k: list(v) for k, v in sections.items()}, [])


class FakeCdb:
    """morercpthosts.cdb: `key in cdb`, recording every lookup."""

    def __init__(self, keys, error=None):
        self.keys = set(keys)
        self.error = error
        self.lookups = []

    def __contains__(self, key):
        self.lookups.append(bytes(key))
        if self.error is not None:
            raise self.error
        return key in self.keys

    def close(self):
        pass


# -- settings and session ----------------------------------------------------------

def settings(**kw):
    """Settings of fixture F (qmail-smtpd.md §9), overridable by keyword."""
    s = Settings()
    s.greeting = b"mx.example.org"
    s.localiphost = b"mx.example.org"
    s.timeout = 1200
    s.rcpthosts = control.Rcpthosts([b"example.org", b".example.net"])
    s.badmailfrom = control.Badmailfrom(None)
    s.databytes = 0
    s.relayclient = None
    s.remotehost = b"client.example.com"
    s.remoteip = b"192.0.2.7"
    s.localhost = b"198.51.100.1"
    s.remoteinfo = None
    s.is_local_ip = lambda ip: ip in {b"127.0.0.1", b"0.0.0.0"}
    s.auth = None
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def spp_settings(**kw):
    """Settings of the spp.md §7 fixture."""
    base = dict(
        greeting=b"test.example",
        localiphost=b"test.example",
        rcpthosts=control.Rcpthosts([b"example.com"]),
        badmailfrom=control.Badmailfrom([b"bad@spam.example"]),
        remotehost=b"client.example",
        remoteip=b"192.0.2.1",
        localhost=b"127.0.0.1",
    )
    base.update(kw)
    return settings(**base)


class Harness:
    """A Session wired to fakes.

    sections: phase -> entries (plugins on); None means plugins off (NOSPP).
    programs: entry -> callable(env), for FakeRunner.
    """

    def __init__(self, settings_=None, env=None, sections=None, programs=None,
                 queue_reply=QUEUED, queue_fail=False, engine=None, start=True,
                 spp_timeout=60, spool_fail=False):
        self.settings = settings_ if settings_ is not None else settings()
        self.env = {} if env is None else env
        self.runner = FakeRunner(programs or {})
        if engine is None:
            cfg = None if sections is None else config(**sections)
            engine = SppEngine(cfg, self.env, spp_timeout, self.runner)
        self.engine = engine
        self.queue = QueueFactory(queue_reply, queue_fail)
        self.spool = SpoolFactory(spool_fail)
        self.session = Session(self.settings, self.env, self.engine, self.queue,
                               lambda: CLOCK, start_spool=self.spool)
        self.buf = b""
        self.greeting = b""
        if start:
            self.session.start()
            self.greeting = self.take()

    # output

    def take(self):
        out = bytes(self.session.out)
        self.session.out.clear()
        return out

    # input

    def cmd(self, line):
        """One command line without its LF; returns the replies it produced."""
        assert self.session.state == COMMAND
        self.session.command(line)
        return self.take()

    def cmds(self, *lines):
        return b"".join(self.cmd(line) for line in lines)

    def feed(self, raw):
        """Client bytes as the I/O loop sees them: command lines split at LF,
        message bytes handed to data() with leftovers serving the next command.
        Returns the replies; an unfinished command line waits for more input."""
        buf = self.buf + raw
        pos = 0
        s = self.session
        while s.state != CLOSED:
            if s.state == COMMAND:
                lf = buf.find(b"\n", pos)
                if lf < 0:
                    break
                line, pos = buf[pos:lf], lf + 1
                s.command(line)
            else:
                if pos == len(buf):
                    break
                used = s.data(memoryview(buf)[pos:])
                assert 0 <= used <= len(buf) - pos
                pos += used
                if s.state == DATA:
                    # a message in progress swallows everything it is given
                    assert pos == len(buf)
                    break
        self.buf = buf[pos:]
        return self.take()

    @property
    def state(self):
        return self.session.state

    @property
    def exit_status(self):
        return self.session.exit_status
