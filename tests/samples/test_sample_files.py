"""The sample files as a whole: plugin file conventions, samples/smtpplugins, and every
plugin run once through qspp's own runner after the documented installation."""

import ast
import os
import shutil
import stat
import subprocess
import sys

import pytest

from .helpers import PLUGINS, PYTHON, REPO, SAMPLES

NAMES = ["addheader", "bodycheck", "dnsbl", "greylist", "policy"]
STDLIB_ALLOWED = {"os", "sys", "socket", "threading", "time", "fcntl", "re"}


def test_plugin_set():
    assert sorted(n for n in os.listdir(PLUGINS) if n != "__pycache__") == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_plugin_file_conventions(name):
    path = PLUGINS / name
    assert path.stat().st_mode & stat.S_IXUSR, "not executable"
    source = path.read_text()
    assert source.startswith("#!/usr/bin/env python3\n")
    tree = ast.parse(source, feature_version=(3, 9))      # nothing newer than 3.9
    doc = ast.get_docstring(tree)
    assert "#!/usr/bin/python3 -I" in doc and "absolute path" in doc
    assert "120" in doc and "fail open" in doc.lower()
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= STDLIB_ALLOWED, imported
    # No print(), no sys.stdout: verdicts go through os.write, so there is nothing
    # to flush at exit and no BrokenPipeError turning into exit status 120.
    assert "print(" not in source and "sys.stdout" not in source
    assert "os._exit(code)" in source


# ---------------------------------------------------------------- samples/smtpplugins

SECTIONS = {"connection", "helo", "mail", "rcpt", "data", "auth", "body"}


def read_config(data):
    """Parse as spp.md §2.2-2.3 do; returns [(section, entry)] and checks 0.42 portability."""
    entries = []
    section = None
    for raw in data.split(b"\n"):
        # Portable to qmail-spp 0.42: nothing for its simpler trimming to trip over.
        assert b"\r" not in raw and b"\0" not in raw
        assert raw == raw.rstrip(b" \t"), raw
        assert raw[:1] not in (b" ", b"\t"), raw
        line = raw.decode("ascii")
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            assert line.endswith("]") and line[1:-1] in SECTIONS, line
            section = line[1:-1]
            continue
        assert section is not None, "entry before the first section: %s" % line
        entries.append((section, line))
    return entries


def test_sample_config():
    data = (SAMPLES / "smtpplugins").read_bytes()
    entries = read_config(data)
    wired = set()
    for section, entry in entries:
        if entry.startswith(":"):
            program = entry[1:].split()[0]
        else:
            assert " " not in entry and "\t" not in entry, "arguments need ':' " + entry
            program = entry
        assert program.startswith("plugins/"), entry
        assert (SAMPLES / program).is_file(), entry
        wired.add((section, program[len("plugins/"):]))
    assert wired == {("connection", "dnsbl"), ("mail", "policy"), ("rcpt", "policy"),
                     ("rcpt", "dnsbl"), ("rcpt", "greylist"), ("data", "addheader"),
                     ("body", "bodycheck")}
    order = [e for s, e in entries if s == "rcpt"]
    assert [e.split()[0] for e in order] == [":plugins/policy", ":plugins/dnsbl",
                                             ":plugins/greylist"]
    assert [e for s, e in entries if s == "rcpt" and "dnsbl" in e][0].split()[1] == "--rcpt"
    text = data.decode()
    for pitfall in ("120", "stderr", "RSET", "SPPTIMEOUT", "LF", "only the byte after"):
        assert pitfall.lower() in text.lower(), pitfall


def test_readme_mentions_every_plugin():
    text = (SAMPLES / "README.md").read_text()
    for name in NAMES:
        assert "plugins/%s" % name in text


# ---------------------------------------------------------------- through qspp's runner


def spprun():
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    try:
        from qspp import spprun as module
    except ImportError as e:  # pragma: no cover - the engine is part of this repo
        pytest.skip("qspp.spprun not importable: %s" % e)
    return module


def test_installed_plugins_through_qspp_runner(tmp_path, monkeypatch, capfd):
    """Install as samples/README.md says (copy, chmod, absolute #! with -I) and run each
    plugin the way qspp's engine does: cwd QMAILHOME, /dev/null or the message on fd 0."""
    runner = spprun()
    home = tmp_path
    (home / "plugins").mkdir()
    (home / "control").mkdir()
    for name in NAMES:
        target = home / "plugins" / name
        shutil.copy(PLUGINS / name, target)
        lines = target.read_text().split("\n", 1)
        target.write_text("#!%s -I\n%s" % (PYTHON, lines[1]))
        target.chmod(0o755)
    (home / "fake").write_text("127.0.0.2 1.2.0.192.zen.example\n")
    (home / "control" / "spppolicy").write_text("rcpt *@partner.example O\n")
    message = home / "message"
    message.write_bytes(b"Subject: casino\n\nhello\n")
    monkeypatch.chdir(home)

    base = {b"TCPREMOTEIP": b"192.0.2.1"}

    def run(entry, extra=None, stdin_fd=None, code=0):
        env = dict(base)
        env.update(extra or {})
        lines = []
        res = runner.run_entry(entry, env, 20, stdin_fd=stdin_fd, on_line=lines.append)
        assert res.failure is None and res.exit_status == code, res
        return lines, res.terminator

    assert run(b":plugins/dnsbl zen.example",
               {b"DNSBL_RESOLVER": b"file:" + os.fsencode(home / "fake")}) == (
        [b"SDNSBL_HIT=zen.example"], None)
    assert run(b"plugins/dnsbl", {b"DNSBL_ZONES": b"zen.example",
                                  b"DNSBL_RESOLVER": b"file:" + os.fsencode(home / "fake")}) == (
        [b"SDNSBL_HIT=zen.example"], None)
    assert run(b":plugins/dnsbl --rcpt", {b"DNSBL_HIT": b"zen.example"}) == (
        [], b"E554 5.7.1 Service unavailable; client [192.0.2.1] listed by zen.example")
    assert run(b":plugins/policy --rcpt control/spppolicy",
               {b"SMTPRCPTTO": b"x@partner.example"}) == ([], b"O")
    assert run(b"plugins/addheader", {b"SMTPAUTHUSER": b"u"}) == (
        [b"HX-Originating-IP: [192.0.2.1]"], None)
    grey_env = {b"SMTPMAILFROM": b"a@b.example", b"SMTPRCPTTO": b"x@example.org",
                b"GREYLIST_NOW": b"1000"}
    assert run(b":plugins/greylist --file greylist.db", grey_env) == (
        [], b"E451 4.7.1 Greylisted, please try again later")
    # Log lines carry qspp's pid (here pytest's), also behind the /bin/sh of ":".
    capfd.readouterr()
    for entry in (b"plugins/policy", b":plugins/policy --mail control/nope"):
        assert run(entry, {b"SMTPMAILFROM": b"a@b"}, code=1) == ([], None)
        err = capfd.readouterr().err
        assert err.startswith("policy: pid %d: " % os.getpid()), err
    fd = os.open(str(message), os.O_RDONLY)
    try:
        assert run(b":plugins/bodycheck --text casino", stdin_fd=fd) == (
            [], b"E554 5.7.1 Message content rejected by local policy")
    finally:
        os.close(fd)


# ---------------------------------------------------------------- samples/qmail/bin/qmail-queue

def run_sample_queue(queue, cwd, env):
    """Run a qmail-queue as qspp does: message on fd 0, envelope on fd 1, cwd = home."""
    read_env, write_env = os.pipe()
    os.write(write_env, b"Fme@example.net\0Tyou@localhost\0\0")
    os.close(write_env)
    try:
        return subprocess.run([str(queue)], input=b"Subject: q\n\nbody\n", stdout=read_env,
                              stderr=subprocess.PIPE, cwd=str(cwd), env=env, timeout=60)
    finally:
        os.close(read_env)


def test_sample_queue_needs_no_qspp_python(tmp_path):
    # issue 11: it ran "${QSPP_PYTHON:-python3}" -m qspp.maildirqueue, so without
    # QSPP_PYTHON (only scripts/run-local set it) a python3 that cannot import
    # qspp gave every message "451 qq temporary problem"
    env = {"PATH": "/usr/bin:/bin", "QSPP_MAILDIR": str(tmp_path / "Maildir")}
    r = run_sample_queue(SAMPLES / "qmail" / "bin" / "qmail-queue", tmp_path, env)
    assert (r.returncode, r.stderr) == (0, b"")
    (name,) = os.listdir(tmp_path / "Maildir" / "new")
    assert (tmp_path / "Maildir" / "new" / name).read_bytes() == (
        b"Return-Path: <me@example.net>\nX-Envelope-To: <you@localhost>\nSubject: q\n\nbody\n")
    assert "QSPP_PYTHON" not in (SAMPLES / "qmail" / "bin" / "qmail-queue").read_text()


def test_sample_queue_copied_out_of_the_checkout_uses_the_installed_qspp(tmp_path):
    # a copy of the sample home has no ../../../src: python3 must import qspp itself
    home = tmp_path / "home"
    shutil.copytree(SAMPLES / "qmail", home, ignore=shutil.ignore_patterns("Maildir"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src")}
    r = run_sample_queue(home / "bin" / "qmail-queue", home, env)
    assert (r.returncode, r.stderr) == (0, b"")
    assert len(os.listdir(home / "Maildir" / "new")) == 1
