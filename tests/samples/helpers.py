"""Helpers for the sample plugin tests: run a plugin of samples/plugins as a real process.

Each plugin runs as `PYTHON -I samples/plugins/NAME ARGS` with exactly the environment
given (nothing leaks in from pytest's), stdin /dev/null unless a file is given, and the
working directory a fresh tmp_path standing for QMAILHOME, as qspp would run it. Set
QSPP_SAMPLES_PYTHON to run the plugins under another interpreter (e.g. Python 3.9).

The interpreter gets -I (as the plugins' docstrings recommend) and -S: the plugins use
the standard library only, and skipping site (and whatever .pth files the test
interpreter has) makes each of the ~200 runs several times cheaper. test_sample_files
runs every plugin once through qspp's own runner with the recommended `#!PYTHON -I`
line instead.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
PLUGINS = SAMPLES / "plugins"
PYTHON = os.environ.get("QSPP_SAMPLES_PYTHON") or sys.executable


class Result:
    def __init__(self, out, err, code, elapsed):
        self.out = out
        self.err = err
        self.code = code
        self.elapsed = elapsed

    def __repr__(self):
        return "Result(code=%r, out=%r, err=%r)" % (self.code, self.out, self.err)


def command(name, *args):
    return [PYTHON, "-I", "-S", str(PLUGINS / name)] + [os.fsencode(a) if isinstance(a, str) else a
                                                  for a in args]


def to_env(env):
    return {os.fsencode(k): os.fsencode(v) if isinstance(v, str) else v
            for k, v in (env or {}).items()}


def run_plugin(name, *args, env=None, cwd, stdin=None, timeout=20):
    """Run one plugin to completion; stdin is a path or None (/dev/null)."""
    t0 = time.monotonic()
    f = open(stdin, "rb") if stdin is not None else subprocess.DEVNULL
    try:
        p = subprocess.run(command(name, *args), env=to_env(env), cwd=str(cwd), stdin=f,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    finally:
        if stdin is not None:
            f.close()
    return Result(p.stdout, p.stderr, p.returncode, time.monotonic() - t0)


def start_plugin(name, *args, env=None, cwd):
    """Start a plugin without waiting (for concurrency tests)."""
    return subprocess.Popen(command(name, *args), env=to_env(env), cwd=str(cwd),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
