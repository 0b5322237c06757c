"""The Debian package (issue 11): built from this checkout with scripts/build-deb,
checked with lintian, its contents listed, and its files smoke-tested unpacked
(scripts/package-smoke --root, the same script CI runs on the installed package).
Also: `pip install .` still makes a working qspp."""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("dpkg-buildpackage", "dh", "pybuild", "lintian", "tcprules", "swaks")


def need(*tools):
    missing = [t for t in tools if shutil.which(t, path=PATH) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail("missing in CI: %s" % " ".join(missing))
        pytest.skip("missing: %s" % " ".join(missing))


def version():
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"$', text, re.M).group(1)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    need("dpkg-buildpackage", "dh", "pybuild")
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run([str(REPO / "scripts" / "build-deb"), str(out)], capture_output=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    path = Path(r.stdout.decode().strip())
    assert path == out / ("qspp_%s_all.deb" % version())
    return path


def contents(deb):
    r = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, check=True,
                       timeout=60)
    # "-rwxr-xr-x root/root 123 2026-01-01 00:00 ./usr/bin/qspp"
    return {line.split()[5][1:]: line.split()[0]
            for line in r.stdout.decode().splitlines()}


def test_changelog_version_is_pyproject_version():
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith("qspp (%s) " % version())


def test_lintian_finds_no_errors(deb):
    need("lintian")
    r = subprocess.run(["lintian", "--fail-on", "error,warning", "--display-info",
                        str(deb)], capture_output=True, timeout=300,
                       env={"PATH": PATH, "LANG": "C.UTF-8"})
    tags = [line for line in r.stdout.decode().splitlines() if line[:2] in ("E:", "W:")]
    assert tags == []
    assert r.returncode == 0, r.stdout + r.stderr


def test_contents(deb):
    files = contents(deb)
    for path, mode in (("/usr/bin/qspp", "-rwxr-xr-x"), ("/usr/bin/qspp-smtpd", "-rwxr-xr-x"),
                       ("/usr/sbin/qspp-swap", "-rwxr-xr-x"),
                       ("/usr/libexec/qspp/qspp-tcpenv", "-rwxr-xr-x"),
                       ("/lib/systemd/system/qspp-serve.service", "-rw-r--r--"),
                       ("/lib/systemd/system/qspp-smtpd.socket", "-rw-r--r--"),
                       ("/lib/systemd/system/qspp-smtpd@.service", "-rw-r--r--"),
                       ("/usr/lib/python3/dist-packages/qspp/smtpd.py", "-rw-r--r--"),
                       ("/usr/share/man/man8/qspp.8.gz", "-rw-r--r--"),
                       ("/usr/share/man/man8/qspp-smtpd.8.gz", "-rw-r--r--"),
                       ("/usr/share/man/man8/qspp-swap.8.gz", "-rw-r--r--"),
                       ("/usr/share/man/man5/qspp-smtpplugins.5.gz", "-rw-r--r--"),
                       ("/usr/share/doc/qspp/migration.md.gz", "-rw-r--r--")):
        assert files.get(path) == mode, path
    # the service directories as examples, still executable, uncompressed
    for kind in ("daemontools", "runit"):
        for svc in ("qspp-smtpd", "qspp-serve"):
            for run in ("run", "log/run"):
                path = "/usr/share/doc/qspp/examples/%s/%s/%s" % (kind, svc, run)
                assert files.get(path) == "-rwxr-xr-x", path
    # every Python module of the checkout
    modules = {p.name for p in (REPO / "src" / "qspp").glob("*.py")}
    assert modules == {p.rsplit("/", 1)[1] for p in files
                       if p.startswith("/usr/lib/python3/dist-packages/qspp/") and
                       p.endswith(".py")}
    # every path of qspp's that the man pages and README name is in the package
    named = set()
    for doc in list((REPO / "man").iterdir()) + [REPO / "README.md"]:
        text = doc.read_text().replace("\\-", "-").replace("\\(bu", "")
        named |= set(re.findall(r"(/(?:usr/(?:bin|sbin|libexec|share/doc|share/man)|lib/systemd)"
                                r"/[\w./@-]*[\w/])", text))
    assert "/usr/share/doc/qspp/migration.md.gz" in named
    for path in (p for p in named if "qspp" in p):
        assert path in files or path.rstrip("/") + "/" in files, path
    # nothing of qmail's, nothing outside Debian's own directories
    for path in files:
        assert not path.startswith(("/var/", "/etc/", "/usr/local/")), path
        name = path.rsplit("/", 1)[1]
        assert name not in ("qmail-smtpd", "qmail-queue", "qmail-smtpd.orig"), path


def test_units_are_installed_disabled(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True,
                   timeout=60)
    postinst = (tmp_path / "control" / "postinst").read_text()
    assert "qspp-serve.service" in postinst and "qspp-smtpd.socket" in postinst
    # dh_installsystemd's default would enable them on a first install
    # ("was-enabled defaults to true") and start them with deb-systemd-invoke
    assert "was-enabled defaults to true" not in postinst
    assert "deb-systemd-invoke" not in postinst and "systemctl start" not in postinst


def test_lean_qspp_smtpd_entry_point(deb, tmp_path):
    # tcpserver runs it for every connection: no `import re` of the generated one
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / "usr/bin/qspp-smtpd").read_text() == (
        "#!/usr/bin/python3\nfrom qspp.smtpd import main\nmain()\n")


def test_installed_files_pass_the_smoke_test(deb):
    # issue 11: the run lines called `/usr/bin/python3 -m qspp.smtpd`, which failed
    # with "No module named 'qspp'"; the packaged unit lines now work as installed
    need("tcprules", "swaks")
    root = Path(tempfile.mkdtemp(prefix="qspp-deb-root-"))
    try:
        root.chmod(0o755)   # the unit's user (nobody here) must import from it
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
        r = subprocess.run([str(REPO / "scripts" / "package-smoke"), "--root", str(root)],
                           capture_output=True, timeout=180, env={"PATH": PATH})
        out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        assert r.returncode == 0, out
        assert "package-smoke: swaks through qspp serve: 250 ok" in out
        assert "package-smoke: smtplib through qspp-tcpenv: 250" in out
        assert out.endswith("package-smoke: all passed\n")
    finally:
        shutil.rmtree(root)


def test_smoke_test_can_fail(deb):
    # a unit whose ExecStart names a program the package lacks must fail it
    need("tcprules", "swaks")
    root = Path(tempfile.mkdtemp(prefix="qspp-deb-root-"))
    try:
        root.chmod(0o755)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
        (root / "usr/libexec/qspp/qspp-tcpenv").unlink()
        r = subprocess.run([str(REPO / "scripts" / "package-smoke"), "--root", str(root)],
                           capture_output=True, timeout=180, env={"PATH": PATH})
        assert r.returncode == 1
        assert r.stderr == b"package-smoke: FAILED: /usr/libexec/qspp/qspp-tcpenv is not an" \
                           b" installed program\n"
    finally:
        shutil.rmtree(root)


def test_pip_install_still_works(tmp_path):
    # the wheel path for everyone else: Debian's python3 with its setuptools,
    # no index needed (--no-build-isolation)
    need()
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                        "--no-build-isolation", "--no-deps", "--no-index", str(REPO)],
                       capture_output=True, timeout=300, cwd=str(tmp_path),
                       env={"PATH": PATH, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(venv / "bin/qspp"), "version"], capture_output=True, timeout=60,
                       cwd="/", env={"PATH": PATH})
    assert r.stdout == b"qspp %s\n" % version().encode()
    home = tmp_path / "home"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("wheel.example\n")
    r = subprocess.run([str(venv / "bin/qspp-smtpd")], input=b"QUIT\r\n", capture_output=True,
                       timeout=60, cwd="/", env={"PATH": PATH, "QMAILHOME": str(home)})
    assert r.stdout == b"220 wheel.example ESMTP\r\n221 wheel.example\r\n"


def test_build_dependencies_are_installed_by_ci_and_named_in_readme():
    control = (REPO / "debian" / "control").read_text()
    field = re.search(r"^Build-Depends:(.*?)^\S", control, re.M | re.S).group(1)
    deps = {re.sub(r"\s*\(.*\)", "", d).strip() for d in field.split(",") if d.strip()}
    deps = {"debhelper" if d == "debhelper-compat" else d for d in deps}
    ci = set((REPO / ".ci" / "run").read_text().replace("\\\n", " ").split())
    assert deps <= ci, deps - ci
    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("apt-get install -y debhelper"))
    assert set(line.split()[3:]) == deps
    build_deb = (REPO / "scripts" / "build-deb").read_text()
    assert "apt-get install -y " + " ".join(line.split()[3:]) in build_deb
