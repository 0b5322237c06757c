#!/usr/bin/env python3
"""Cost of one plugin run against a bare spawn.

Runs /bin/true N times through qspp.spprun.run_entry and N times through a raw
os.posix_spawn + os.waitpid, interleaved so that machine noise hits both the
same way, and prints the ratio of the totals (the spec target is <= 1.5).

usage: PYTHONPATH=src python3 scripts/bench_spp.py [N] [TIMEOUT]
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from qspp.spprun import run_entry  # noqa: E402

PROG = b"/bin/true"


def raw(env):
    pid = os.posix_spawn(PROG, [PROG], env)
    os.waitpid(pid, 0)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    timeout = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    env = dict(os.environb)
    clock = time.perf_counter
    for _ in range(20):
        raw(env)
        run_entry(PROG, env, timeout)
    t_raw = 0.0
    t_run = 0.0
    for i in range(n):
        # Alternate which goes first so neither always follows the other.
        if i & 1:
            a = clock(); raw(env); b = clock()
            r = run_entry(PROG, env, timeout); c = clock()
            t_raw += b - a
            t_run += c - b
        else:
            a = clock(); r = run_entry(PROG, env, timeout); b = clock()
            raw(env); c = clock()
            t_run += b - a
            t_raw += c - b
        if r.failure is not None or r.exit_status != 0:
            sys.exit("run failed: %r" % (r,))
    print("N=%d timeout=%d" % (n, timeout))
    print("raw posix_spawn+waitpid: %.1f us/run" % (t_raw / n * 1e6))
    print("run_entry:               %.1f us/run" % (t_run / n * 1e6))
    print("ratio: %.3f" % (t_run / t_raw))


if __name__ == "__main__":
    main()
