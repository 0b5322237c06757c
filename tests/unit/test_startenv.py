"""qspp.startenv: LC_CTYPE as exec'd, before Python's C-locale coercion (PEP 538)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from qspp import startenv

FLAGS = SimpleNamespace(utf8_mode=1, ignore_environment=0)


def test_from_proc_finds_the_first_entry(tmp_path):
    p = tmp_path / "environ"
    p.write_bytes(b"A=1\0LC_CTYPE=C\0LC_CTYPE=x\0B=2\0")
    assert startenv.from_proc(bytes(p)) == b"C"
    p.write_bytes(b"A=1\0XLC_CTYPE=C\0")
    assert startenv.from_proc(bytes(p)) is None
    p.write_bytes(b"")
    assert startenv.from_proc(bytes(p)) is None
    assert startenv.from_proc(bytes(tmp_path / "missing")) is startenv._UNKNOWN


@pytest.mark.parametrize("environ, flags, xoptions, coerced", [
    ({b"LC_CTYPE": b"C.UTF-8"}, FLAGS, {}, True),
    ({b"LC_CTYPE": b"C.utf8"}, FLAGS, {}, True),
    ({b"LC_CTYPE": b"C.UTF-8"}, SimpleNamespace(utf8_mode=0, ignore_environment=0), {}, False),
    ({b"LC_CTYPE": b"C.UTF-8"}, FLAGS, {"utf8": True}, False),
    ({b"LC_CTYPE": b"C.UTF-8", b"PYTHONUTF8": b"1"}, FLAGS, {}, False),
    ({b"LC_CTYPE": b"C.UTF-8", b"PYTHONUTF8": b"1"},
     SimpleNamespace(utf8_mode=1, ignore_environment=1), {}, True),
    ({b"LC_CTYPE": b"C.UTF-8", b"LC_ALL": b"C"}, FLAGS, {}, False),
    ({b"LC_CTYPE": b"de_DE.UTF-8"}, FLAGS, {}, False),
    ({}, FLAGS, {}, False),
])
def test_coercion_guess_without_proc(environ, flags, xoptions, coerced):
    assert startenv.coerced_without_proc(environ, flags, xoptions) is coerced


@pytest.mark.parametrize("given, expect", [
    ({}, None), ({"LC_CTYPE": "C"}, "C"), ({"LC_CTYPE": "POSIX"}, "POSIX"),
    ({"LC_CTYPE": "C.UTF-8"}, "C.UTF-8"), ({"LANG": "C"}, None),
])
def test_import_restores_the_exec_environment(given, expect):
    """A real interpreter started with the C locale: after `import qspp`, os.environ,
    posix.environ and the C library's environment hold LC_CTYPE as exec'd."""
    code = ("import os, posix, sys; import qspp; import subprocess;"
            "print(os.environ.get('LC_CTYPE'), posix.environ.get(b'LC_CTYPE'),"
            " subprocess.run(['/bin/sh', '-c', 'echo ${LC_CTYPE-unset}'], env=None,"
            " capture_output=True).stdout.strip().decode())")
    env = dict(given, PYTHONPATH=os.path.dirname(os.path.dirname(startenv.__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         timeout=30, check=True).stdout.split()
    shown = expect or "None"
    assert out == [shown.encode(), repr(expect.encode() if expect else None).encode(),
                   (expect or "unset").encode()]
