"""The embedded home as `qspp serve` sets it up, often as root (issue 10, findings 1-3).

No processes: make_embedded_home, embedded_home_path and the id choice are
called directly on temp directories.
"""

import os
import stat

import pytest

from qspp import home as homes, serve

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="ownership checks need root")
NOBODY = 65534


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o600)
    return victim


def _intact(victim):
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


def _planted(tmp_path, name):
    """A home whose bin/NAME is a link to a file root must not touch."""
    home = tmp_path / "qspp"
    (home / "bin").mkdir(parents=True)
    os.chmod(home, 0o755)
    os.chmod(home / "bin", 0o755)
    victim = _victim(tmp_path)
    os.symlink(victim, home / "bin" / name)
    return home, victim


def test_a_link_at_the_queue_scripts_temp_name_is_not_followed(tmp_path):
    home, victim = _planted(tmp_path, "qmail-queue.new")
    queue, _ = serve.make_embedded_home(os.fsencode(home))
    _intact(victim)
    st = os.lstat(queue)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert open(queue, "rb").read() == serve._queue_script()
    assert not os.path.lexists(home / "bin" / "qmail-queue.new")


def test_a_link_in_place_of_the_queue_script_is_replaced_not_written(tmp_path):
    home, victim = _planted(tmp_path, "qmail-queue")
    serve.make_embedded_home(os.fsencode(home))
    _intact(victim)
    assert not os.path.islink(home / "bin" / "qmail-queue")


@pytest.mark.parametrize("where", ["", "bin", "control"])
def test_a_home_others_can_write_is_refused(tmp_path, where):
    home = tmp_path / "qspp"
    for sub in ("bin", "control"):
        (home / sub).mkdir(parents=True)
    os.chmod(home, 0o755)
    victim = _victim(tmp_path)
    os.symlink(victim, home / "bin" / "qmail-queue.new")
    os.chmod(home / where, 0o777)
    with pytest.raises(serve.SetupError) as e:
        serve.make_embedded_home(os.fsencode(home))
    shown = os.fsencode(home / where).rstrip(b"/")
    assert str(e.value) == (
        "%s is writable by others than its owner (mode 0777); refusing to use it"
        % os.fsdecode(shown))
    _intact(victim)


@needs_root
def test_as_root_a_home_another_user_owns_is_refused(tmp_path):
    home, victim = _planted(tmp_path, "qmail-queue.new")
    os.chown(home / "bin", NOBODY, NOBODY)   # `chown -R nobody` on the bin dir
    with pytest.raises(serve.SetupError) as e:
        serve.make_embedded_home(os.fsencode(home))
    assert str(e.value) == ("%s belongs to uid %d, not to root; refusing to use it as root"
                            % (home / "bin", NOBODY))
    _intact(victim)


def test_a_new_home_is_readable_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        serve.make_embedded_home(os.fsencode(tmp_path / "qspp"))
    finally:
        os.umask(old)
    home = tmp_path / "qspp"
    for sub in ("", "bin", "control"):
        assert stat.S_IMODE((home / sub).stat().st_mode) == 0o755
    for name in ("me", "rcpthosts", "smtpplugins"):
        assert stat.S_IMODE((home / "control" / name).stat().st_mode) == 0o644
    assert stat.S_IMODE((home / "Maildir").stat().st_mode) == 0o700


@needs_root
def test_the_maildir_belongs_to_the_session_user(tmp_path):
    home = tmp_path / "qspp"
    os.makedirs(home / "Maildir" / "new", 0o700)   # left by a run without --user
    serve.make_embedded_home(os.fsencode(home), owner=(NOBODY, NOBODY))
    for sub in ("Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        st = (home / sub).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o700)
    st = (home / "bin").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)


@needs_root
def test_a_link_in_the_maildir_is_not_chowned_through(tmp_path):
    home = tmp_path / "qspp"
    os.makedirs(home / "Maildir", 0o700)
    victim = _victim(tmp_path)
    os.symlink(victim, home / "Maildir" / "new")
    with pytest.raises(OSError):
        serve.make_embedded_home(os.fsencode(home), owner=(NOBODY, NOBODY))
    assert victim.stat().st_uid == 0


def test_root_switching_users_keeps_the_embedded_home_out_of_roots_home():
    env = {b"HOME": b"/root"}
    assert homes.embedded_home_path(env) == b"/root/.local/share/qspp"
    assert homes.embedded_home_path(env, system=True) == b"/var/lib/qspp"
    # an explicit XDG_DATA_HOME still wins
    env[b"XDG_DATA_HOME"] = b"/srv/data"
    assert homes.embedded_home_path(env, system=True) == b"/srv/data/qspp"


def test_unreachable_home_is_named():
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="qspp-reach-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        top = os.path.join(base, "private")
        os.makedirs(os.path.join(top, "qspp"))
        os.chmod(top, 0o700)
        msg = serve.unreachable(os.fsencode(os.path.join(top, "qspp")), NOBODY, NOBODY)
        assert msg == "%s (mode 0700)" % top
        os.chmod(top, 0o711)
        assert serve.unreachable(os.fsencode(os.path.join(top, "qspp")), NOBODY, NOBODY) is None
        # not there yet: root creates it 0755
        assert serve.unreachable(os.fsencode(os.path.join(top, "new", "qspp")), NOBODY,
                                 NOBODY) is None
    finally:
        shutil.rmtree(base)


class _NS:
    def __init__(self, uid=None, gid=None, user=None):
        self.uid, self.gid, self.user = uid, gid, user


def test_uid_alone_takes_that_users_primary_group():
    import pwd
    pw = pwd.getpwuid(NOBODY)
    assert serve.switch_ids(_NS(uid=NOBODY)) == (NOBODY, pw.pw_gid, pw.pw_name)
    assert serve.switch_ids(_NS(uid=NOBODY, gid=7)) == (NOBODY, 7, pw.pw_name)
    assert serve.switch_ids(_NS()) is None


def test_uid_alone_without_a_passwd_entry_is_refused():
    with pytest.raises(serve.SetupError) as e:
        serve.switch_ids(_NS(uid=4123456))
    assert str(e.value) == "-u 4123456 has no passwd entry to take a group from; give -g too"


@needs_root
def test_an_interpreter_the_session_user_cannot_run_is_named(monkeypatch):
    import tempfile
    import shutil
    base = tempfile.mkdtemp(prefix="qspp-interp-", dir="/tmp")
    try:
        os.chmod(base, 0o700)
        python = os.path.join(base, "python3")
        os.symlink(os.path.realpath(os.sys.executable), python)
        monkeypatch.setattr(serve.sys, "executable", os.path.join(base, "bin", "python3"))
        os.makedirs(os.path.join(base, "bin"))
        with pytest.raises(serve.SetupError) as e:
            serve._check_runnable(NOBODY, NOBODY, "nobody")
        assert str(e.value) == (
            "user nobody (uid 65534) cannot run qspp's queue program: its interpreter"
            " %s/bin/python3 is behind %s (mode 0700); install qspp where that user can"
            " reach it" % (base, base))
    finally:
        shutil.rmtree(base)
