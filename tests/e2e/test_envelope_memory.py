"""A session's memory for a big envelope (issue 10, finding 11).

1.3 million pipelined RCPTs fill the 16 MiB envelope guard.  The session's peak
RSS (VmHWM, read while it lives) must stay under twice the guard plus what an
idle session uses; a list of address objects cost about five times the envelope.
The session runs on pipes, as scripts/bench bigmessage runs it: the client side
is generated in pieces, so nothing here inflates the figure.
"""

import os
import subprocess
import threading
import time

from .conftest import PYTHON, SRC

GUARD = 16 << 20


def vm_hwm_kb(pid):
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def session_peak(tmp_path, rcpts, then=b"QUIT\r\n"):
    """(replies, peak VmHWM in KiB) of one session given `rcpts` pipelined RCPTs."""
    home = tmp_path / "qmail"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_bytes(b"mx.example.org\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC), "QMAILHOME": str(home),
           "RELAYCLIENT": "", "TCPREMOTEIP": "127.0.0.1", "TCPLOCALIP": "127.0.0.1"}
    r, w = os.pipe()
    proc = subprocess.Popen([PYTHON, "-m", "qspp.smtpd"], stdin=r, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    os.close(r)
    peak = [0]

    def feed():
        try:
            os.write(w, b"HELO x\r\nMAIL FROM:<a@example.net>\r\n")
            for base in range(0, rcpts, 10000):
                os.write(w, b"".join(b"RCPT TO:<%07d@e.org>\r\n" % i
                                     for i in range(base, min(rcpts, base + 10000))))
                peak[0] = max(peak[0], vm_hwm_kb(proc.pid))
            time.sleep(0.3)
            peak[0] = max(peak[0], vm_hwm_kb(proc.pid))
            os.write(w, then)
        except OSError:
            pass  # the session ended (the 421)
        finally:
            os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    try:
        out = proc.stdout.read()
    finally:
        t.join(120)
        proc.kill()
        proc.wait()
    return out.split(b"\r\n")[:-1], peak[0]


def test_envelope_memory_stays_near_its_size(tmp_path):
    _, idle = session_peak(tmp_path / "idle", 0)
    replies, peak = session_peak(tmp_path / "big", 1300000)
    assert replies[-1] == b"421 out of memory (#4.3.0)"
    # MAIL, then every RCPT up to the guard (13 + 2 envelope bytes each)
    assert replies.count(b"250 ok") == 1 + (GUARD - len(b"a@example.net") - 3) // 15
    print("idle session %d KiB, 1.3M RCPTs %d KiB" % (idle, peak))
    assert idle > 0 and peak < 2 * GUARD // 1024 + idle, (idle, peak)
