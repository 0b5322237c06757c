"""The control-file cache: a process serving many connections reads each
unchanged file once, and a change shows from the next connection (qmail reads
control files at every connection)."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from qspp import control
from qspp.control import ControlError, read_line, read_list

as_root = os.geteuid() == 0
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "src")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "control").mkdir()
    monkeypatch.setattr(control, "_cache", {})
    monkeypatch.setattr(control, "_sets", {})
    monkeypatch.setattr(control, "_absent", {})
    monkeypatch.setattr(control, "_dirs_now", {})
    return tmp_path


@pytest.fixture
def remembering(monkeypatch):
    """A process serving many connections, as a `qspp serve` worker."""
    monkeypatch.setattr(control, "remember_absent", True)


@pytest.fixture
def settled(monkeypatch):
    """Every file looks older than _SETTLED, as on a server that runs for a while."""
    monkeypatch.setattr(control, "_time", lambda: time.time() + 3600)


def recorded(monkeypatch, module, name):
    """The paths MODULE.NAME(path) is called with, from now on."""
    calls = []
    real = getattr(module, name)

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture
def opens(monkeypatch):
    return recorded(monkeypatch, control, "_open")


def put(name, data):
    with open(name, "wb") as f:
        f.write(data)


def next_tick():
    # past the coarse clock that stamps ctime (a jiffy, at most 10 ms)
    time.sleep(0.03)


def test_unchanged_file_is_read_once(home, settled, opens):
    put("control/me", b"mx.example.org\n")
    assert read_line(b"control/me") == b"mx.example.org"
    assert read_line(b"control/me") == b"mx.example.org"
    assert read_line(b"control/me") == b"mx.example.org"
    assert opens == [b"control/me"]


def test_same_size_rewrite_shows_at_the_next_read(home, settled):
    put("control/me", b"aaaa.example\n")
    assert read_line(b"control/me") == b"aaaa.example"
    next_tick()
    put("control/me", b"bbbb.example\n")
    assert read_line(b"control/me") == b"bbbb.example"


def test_freshly_changed_file_is_not_reused(home, opens):
    # written just now: a second change within the same clock tick would keep
    # size, mtime and ctime, so the content is not trusted until it settles
    put("control/rcpthosts", b"example.org\n")
    assert read_list(b"control/rcpthosts") == [b"example.org"]
    assert read_list(b"control/rcpthosts") == [b"example.org"]
    assert opens == [b"control/rcpthosts", b"control/rcpthosts"]


def test_rename_into_place_and_removal(home, settled):
    put("control/rcpthosts", b"a.example\n")
    assert read_list(b"control/rcpthosts") == [b"a.example"]
    put("control/rcpthosts.new", b"b.example\n")
    os.rename("control/rcpthosts.new", "control/rcpthosts")
    assert read_list(b"control/rcpthosts") == [b"b.example"]
    os.unlink("control/rcpthosts")
    assert read_list(b"control/rcpthosts") is None


@pytest.mark.skipif(as_root, reason="root reads a mode 000 file")
def test_unreadable_after_caching_is_an_error(home, settled):
    put("control/me", b"mx.example.org\n")
    assert read_line(b"control/me") == b"mx.example.org"
    next_tick()
    os.chmod("control/me", 0)
    with pytest.raises(ControlError):
        read_line(b"control/me")


def test_fifo_is_never_cached(home, settled, opens):
    os.mkfifo("control/me")
    assert read_line(b"control/me") == b""
    assert read_line(b"control/me") == b""
    assert len(opens) == 2


def test_line_and_list_reads_are_kept_apart(home, settled):
    put("control/x", b"one\ntwo\n")
    assert read_line(b"control/x") == b"one"
    assert read_list(b"control/x") == [b"one", b"two"]


DRIVER = textwrap.dedent("""
    import os, socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from qspp import control, smtpd
    control._time = lambda: time.time() + 3600  # a long-running server
    os.environ.clear()
    env = {b"QMAILHOME": sys.argv[2].encode(), b"TCPREMOTEIP": b"127.0.0.1",
           b"TCPLOCALIP": b"127.0.0.1", b"PATH": b"/usr/bin:/bin"}
    saved = os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    for name in sys.argv[3:]:
        with open(os.path.join(sys.argv[2], "control", "me"), "w") as f:
            f.write(name + "\\n")
        time.sleep(0.03)
        client, server = socket.socketpair()
        client.sendall(b"QUIT\\r\\n")
        os.dup2(server.fileno(), 0)
        os.dup2(server.fileno(), 1)
        server.close()
        status = smtpd.run([], env)
        os.dup2(null, 0)
        os.dup2(null, 1)
        client.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            got += chunk
        os.write(saved, b"%d %r\\n" % (status, got))
""")


def test_one_process_many_connections_sees_each_change(tmp_path):
    """What a worker serving several connections does: control/me rewritten
    (same size) between connections changes the very next greeting."""
    home = tmp_path / "home"
    (home / "control").mkdir(parents=True)
    (home / "control" / "rcpthosts").write_bytes(b"example.org\n")
    (home / "control" / "smtpplugins").write_bytes(b"")
    names = ["aaaa.example", "aaaa.example", "bbbb.example", "cccc.example", "cccc.example"]
    out = subprocess.run([sys.executable, "-c", DRIVER, SRC, str(home)] + names,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines == ["0 %r" % (b"220 %s ESMTP\r\n221 %s\r\n" % (n.encode(), n.encode()))
                     for n in names]


@pytest.fixture
def spp_home(home, monkeypatch):
    from qspp import sppconfig
    monkeypatch.setattr(sppconfig, "_parsed", {})
    return recorded(monkeypatch, sppconfig, "_read_file")


def test_plugin_list_is_parsed_once_and_each_change_shows(spp_home, settled):
    from qspp.sppconfig import load_config
    put("control/smtpplugins", b"[mail]\n/bin/a\n")
    first = load_config({})
    assert first.sections == {"mail": [b"/bin/a"]}
    assert load_config({}) is first
    assert spp_home == [b"control/smtpplugins"]
    next_tick()
    put("control/smtpplugins", b"[mail]\n/bin/b\n")  # same size
    assert load_config({}).sections == {"mail": [b"/bin/b"]}
    os.unlink("control/smtpplugins")
    assert load_config({}).missing
    put("control/other", b"[rcpt]\n/bin/c\n")
    assert load_config({b"SPPCONFFILE": b"control/other"}).sections == {"rcpt": [b"/bin/c"]}
    assert load_config({b"NOSPP": b""}) is None


def test_fresh_plugin_list_is_read_each_time(spp_home):
    from qspp.sppconfig import load_config
    put("control/smtpplugins", b"[mail]\n/bin/a\n")
    load_config({})
    load_config({})
    assert spp_home == [b"control/smtpplugins"] * 2


def test_rcpthosts_and_badmailfrom_sets_are_built_once_per_content(home, settled):
    """A worker builds the lookup sets again only when the file changed: the
    same content read again gives the very same set, a change a new one that
    answers by the new content from the next connection on."""
    put("control/rcpthosts", b"Example.ORG\n.example.net\n")
    put("control/badmailfrom", b"Bad@Spam.example\n")
    first, again = control.Rcpthosts.load(), control.Rcpthosts.load()
    assert first._hosts is again._hosts == {b"example.org", b".example.net"}
    bmf = control.Badmailfrom.load()
    assert bmf._entries is control.Badmailfrom.load()._entries == {b"bad@spam.example"}
    assert bmf.flags(b"BAD@spam.example")
    next_tick()
    put("control/rcpthosts", b"example.com\n")
    put("control/badmailfrom", b"other@spam.example\n")
    changed = control.Rcpthosts.load()
    assert changed._hosts == {b"example.com"}
    assert changed.allows(b"x@example.com") and not changed.allows(b"x@example.org")
    assert not control.Badmailfrom.load().flags(b"bad@spam.example")
    os.unlink("control/rcpthosts")
    assert control.Rcpthosts.load().allows(b"x@anywhere.example")  # absent: all allowed


# -- absent files -------------------------------------------------------------

def connection():
    control.new_connection()


def test_absent_file_is_tried_once_and_shows_at_the_next_connection(home, settled, opens,
                                                                     remembering):
    for _ in range(3):
        connection()
        assert read_line(b"control/smtpgreeting") is None
        assert read_line(b"control/localiphost") is None
    assert opens == [b"control/smtpgreeting", b"control/localiphost"]
    put("control/smtpgreeting", b"hello.example\n")
    connection()
    assert read_line(b"control/smtpgreeting") == b"hello.example"
    assert read_line(b"control/localiphost") is None  # the same directory changed
    os.unlink("control/smtpgreeting")
    connection()
    assert read_line(b"control/smtpgreeting") is None


def test_absent_files_cost_one_stat_of_their_directory_per_connection(home, settled,
                                                                      remembering, monkeypatch):
    for name in (b"control/smtpgreeting", b"control/databytes"):
        assert read_line(name) is None
    stats = recorded(monkeypatch, control.posix, "stat")
    for _ in range(2):
        connection()
        assert read_line(b"control/smtpgreeting") is None
        assert control.read_int(b"control/databytes") is None
    assert stats == [b"control", b"control"]


def test_a_whole_startup_stats_control_once_besides_its_files(home, settled, remembering,
                                                               monkeypatch):
    """The absent files a connection looks for (morercpthosts.cdb and
    badmailfrom among them) share one stat of control/."""
    from qspp import startup
    put("control/me", b"me.example\n")
    put("control/rcpthosts", b"example.org\n")
    startup.load({})
    stats = recorded(monkeypatch, control.posix, "stat")
    for _ in range(2):
        startup.load({})
    assert sorted(stats) == sorted([b"control", b"control/me", b"control/rcpthosts"] * 2)


def test_a_new_directory_is_a_change(home, settled, remembering):
    """control/ replaced as a whole (renamed into place): its own identity
    differs, even where its times would not."""
    assert read_line(b"control/smtpgreeting") is None
    os.mkdir("control.new")
    put("control.new/smtpgreeting", b"new.example\n")
    os.rename("control", "control.old")
    os.rename("control.new", "control")
    connection()
    assert read_line(b"control/smtpgreeting") == b"new.example"


def test_absent_files_are_not_remembered_by_default(home, settled, opens):
    for _ in range(2):
        connection()
        assert read_line(b"control/smtpgreeting") is None
    assert opens == [b"control/smtpgreeting"] * 2
    assert control._absent == {}


def test_a_freshly_changed_directory_is_not_trusted(home, opens, remembering):
    # control/ was made just now: a file created within the same clock tick
    # would leave its times as they are
    for _ in range(2):
        connection()
        assert read_line(b"control/smtpgreeting") is None
    assert opens == [b"control/smtpgreeting"] * 2


def test_a_dangling_link_is_never_remembered(home, settled, opens, remembering):
    """Its target may appear anywhere, the directory holding the link unchanged."""
    os.mkdir("elsewhere")
    os.symlink("../elsewhere/greeting", "control/smtpgreeting")
    for _ in range(2):
        connection()
        assert read_line(b"control/smtpgreeting") is None
    put("elsewhere/greeting", b"linked.example\n")
    connection()
    assert read_line(b"control/smtpgreeting") == b"linked.example"
    assert opens == [b"control/smtpgreeting"] * 3


def test_absent_morercpthosts_and_plugin_list(home, settled, remembering, monkeypatch):
    from qspp import sppconfig
    from qspp.cdb import Cdb, make
    monkeypatch.setattr(sppconfig, "_parsed", {})
    put("control/rcpthosts", b"example.org\n")
    cdb_opens = recorded(monkeypatch, Cdb, "open")
    reads = recorded(monkeypatch, sppconfig, "_read_file")
    for _ in range(3):
        connection()
        assert not control.Rcpthosts.load().allows(b"x@example.net")
        config = sppconfig.load_config({})
        assert config.missing and config.sections == {}
    assert cdb_opens == [control.MORERCPTHOSTS]
    assert reads == [b"control/smtpplugins"]
    make("control/morercpthosts.cdb", [(b"example.net", b"")])
    put("control/smtpplugins", b"[mail]\n/bin/a\n")
    connection()
    assert control.Rcpthosts.load().allows(b"x@example.net")
    assert sppconfig.load_config({}).sections == {"mail": [b"/bin/a"]}
    # an explicit SPPCONFFILE that is missing stays an error every time
    for _ in range(2):
        with pytest.raises(sppconfig.SppConfigError):
            sppconfig.load_config({b"SPPCONFFILE": b"control/nosuch"})

