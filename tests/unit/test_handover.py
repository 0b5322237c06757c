"""qspp.handover: listening sockets kept across exec (LISTEN_PID/LISTEN_FDS), with
a load loop running through the switch: nothing refused; and why not SO_REUSEPORT."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

# A tiny server: each connection gets its version and pid, then close.  SIGUSR2
# re-executes it, the listener handed over, as the next version.
SERVER = r'''
import os, signal, socket, sys
from qspp import handover
version = int(sys.argv[1])
env = dict(os.environb)
socks = handover.adopt(env)
upgrade = []
signal.signal(signal.SIGUSR2, lambda *a: upgrade.append(1))
# blocked across exec (the mask survives it) so that a SIGUSR2 during start-up
# waits for the handler instead of killing the process
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
if not socks:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    socks = [s]
    print(s.getsockname()[1], flush=True)
lst = socks[0]
lst.settimeout(0.05)
while True:
    if upgrade:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        env = handover.prepare(socks, env)
        os.execve(sys.executable, [sys.executable, __file__, str(version + 1)], env)
    try:
        c, _ = lst.accept()
    except socket.timeout:
        continue
    except InterruptedError:
        continue
    c.sendall(b"v%d %d\n" % (version, os.getpid()))
    c.close()
'''


def test_upgrade_by_exec_refuses_nothing(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), "1"], stdout=subprocess.PIPE,
                            env={"PYTHONPATH": SRC, "PATH": os.environ.get("PATH", "")},
                            start_new_session=True)
    try:
        port = int(proc.stdout.readline())
        seen, errors = [], []
        stop = threading.Event()

        def load():
            while not stop.is_set() and len(seen) + len(errors) < 50000:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                        seen.append(c.makefile("rb").readline())
                except OSError as e:
                    errors.append(e)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        for version in (2, 3, 4):  # three upgrades in a row under load
            os.kill(proc.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not any(line.startswith(b"v%d " % version) for line in seen[-50:]):
                assert time.monotonic() < deadline and not errors, (version, errors[:3])
                time.sleep(0.01)
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert errors == []
    versions = {line.split()[0] for line in seen}
    pids = {line.split()[1] for line in seen}
    assert versions == {b"v1", b"v2", b"v3", b"v4"}, versions
    assert pids == {b"%d" % proc.pid}  # the same process all along: supervisors keep it
    assert all(line.endswith(b"\n") for line in seen)


def run_adopt(fd3, environ):
    code = ("import os, sys\nfrom qspp import handover\nenv = dict(os.environb)\n"
            "try:\n    print(len(handover.adopt(env)), sorted(k for k in env if k.startswith(b'LISTEN')))\n"
            "except handover.HandoverError as e:\n    print('error', e)\n")
    env = {"PYTHONPATH": SRC, **environ}
    # the child's pid is not known in advance: a launcher moves the socket to fd 3,
    # sets LISTEN_PID to its own pid and execs, which keeps the pid
    launch = ("import os, sys\nos.dup2(int(sys.argv[1]), 3)\n"
              "os.environ['LISTEN_PID'] = str(os.getpid())\n"
              "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2]])\n")
    r = subprocess.run([sys.executable, "-c", launch, str(fd3), code], env=env,
                       pass_fds=(fd3,), capture_output=True, timeout=30)
    assert r.stderr == b""
    return r.stdout


def test_adopt_checks_the_descriptors():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    other = socket.socket()
    try:
        assert run_adopt(lst.fileno(), {"LISTEN_FDS": "1"}) == b"1 []\n"
        assert run_adopt(other.fileno(), {"LISTEN_FDS": "1"}) == \
            b"error fd 3 is not a listening TCP socket\n"
        assert run_adopt(lst.fileno(), {"LISTEN_FDS": "x"}) == b"error LISTEN_FDS=b'x'\n"
    finally:
        lst.close()
        other.close()
    # for another process (LISTEN_PID of the parent): nothing adopted, names removed
    from qspp import handover
    env = {b"LISTEN_PID": b"1", b"LISTEN_FDS": b"1", b"KEEP": b"x"}
    assert handover.adopt(env) == [] and env == {b"KEEP": b"x"}


def test_find_matches_host_and_port():
    from qspp import handover
    a = socket.socket()
    a.bind(("127.0.0.1", 0))
    b = socket.socket(socket.AF_INET6)
    try:
        b.bind(("::1", 0))
    except OSError:
        b.close()
        b = None
    try:
        socks = [a] + ([b] if b else [])
        assert handover.find(socks, "127.0.0.1", a.getsockname()[1]) is a
        assert handover.find(socks, "127.0.0.2", a.getsockname()[1]) is None
        assert handover.find(socks, "127.0.0.1", a.getsockname()[1] + 1) is None
        if b:
            assert handover.find(socks, "::1", b.getsockname()[1]) is b
            assert handover.find(socks, "0:0::1", b.getsockname()[1]) is b
    finally:
        a.close()
        if b:
            b.close()


def test_so_reuseport_would_reset_queued_clients():
    """The reason for fd handover: with SO_REUSEPORT the old server's queue dies
    with its socket."""
    try:
        if Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() != "0":
            pytest.skip("this kernel migrates queued connections (tcp_migrate_req)")
    except OSError:
        pass

    def listener(port=0):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        return s

    old = listener()
    port = old.getsockname()[1]
    new = listener(port)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(40)]
    old.close()  # the old server stops accepting
    new.setblocking(False)
    kept = []
    while True:
        try:
            kept.append(new.accept()[0])
        except BlockingIOError:
            break
    reset = 0
    for c in clients:
        c.settimeout(0.3)
        try:
            if c.recv(1) == b"":
                reset += 1
        except ConnectionResetError:
            reset += 1
        except socket.timeout:
            pass
    for s in clients + kept + [new]:
        s.close()
    assert len(kept) < 40 and reset == 40 - len(kept) > 0
