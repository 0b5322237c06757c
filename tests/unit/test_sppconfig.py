"""spp.md §2 (config file) and §4.4 (SPPTIMEOUT) for qspp.sppconfig."""

import errno
import os

import pytest

from qspp.sppconfig import (Config, SppConfigError, entry_argv, load_config, parse,
                            spptimeout)


@pytest.fixture
def home(tmp_path, monkeypatch):
    (tmp_path / "control").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(home, name, data):
    p = home / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def sections(data):
    return parse(data).sections


# --- §2.1 which file -------------------------------------------------------

def test_nospp_present_means_no_config(home):
    write(home, "control/smtpplugins", b"[helo]\n:echo E550 x\n")
    assert load_config({b"NOSPP": b""}) is None
    assert load_config({b"NOSPP": b"1"}) is None


def test_nospp_ignores_sppconffile_and_opens_nothing(home):
    assert load_config({b"NOSPP": b"", b"SPPCONFFILE": b"control/nonexistent"}) is None


def test_default_file_missing_gives_empty_config_and_message(home, capsys):
    cfg = load_config({})
    assert isinstance(cfg, Config)
    assert cfg.sections == {}
    assert cfg.missing is True
    assert b"control/smtpplugins" in cfg.message
    assert b"\n" not in cfg.message
    # the caller writes the stderr line, not the parser
    assert capsys.readouterr() == ("", "")


def test_default_file_present_is_not_missing(home):
    write(home, "control/smtpplugins", b"")
    cfg = load_config({})
    assert cfg.missing is False and cfg.message is None and cfg.sections == {}


def test_sppconffile_missing_is_an_error(home):
    with pytest.raises(SppConfigError) as ei:
        load_config({b"SPPCONFFILE": b"control/alt"})
    assert ei.value.errno == errno.ENOENT
    assert ei.value.path == b"control/alt"
    assert b"control/alt" in ei.value.text


def test_sppconffile_relative_to_home_and_empty_means_default(home):
    # §7.1 #3
    write(home, "control/alt", b"[helo]\n:echo E550 alt\n")
    write(home, "control/smtpplugins", b"[helo]\n:echo E550 default\n")
    assert load_config({b"SPPCONFFILE": b"control/alt"}).sections == {"helo": [b":echo E550 alt"]}
    assert load_config({b"SPPCONFFILE": b""}).sections == {"helo": [b":echo E550 default"]}
    assert load_config({}).sections == {"helo": [b":echo E550 default"]}


def test_sppconffile_absolute(home, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "plugins.conf"
    other.write_bytes(b"[mail]\n:x\n")
    cfg = load_config({b"SPPCONFFILE": os.fsencode(other)})
    assert cfg.sections == {"mail": [b":x"]}
    assert cfg.path == os.fsencode(other)


def test_directory_is_an_error_unless_nospp(home):
    # §7.1 #2
    (home / "control" / "smtpplugins").mkdir()
    with pytest.raises(SppConfigError) as ei:
        load_config({})
    assert ei.value.errno == errno.EISDIR
    assert load_config({b"NOSPP": b""}) is None


def test_directory_named_by_sppconffile_is_an_error(home):
    with pytest.raises(SppConfigError) as ei:
        load_config({b"SPPCONFFILE": b"control"})
    assert ei.value.errno == errno.EISDIR


def test_enotdir_is_an_error_not_missing(home):
    (home / "control").rmdir()
    (home / "control").write_bytes(b"")
    with pytest.raises(SppConfigError) as ei:
        load_config({})
    assert ei.value.errno == errno.ENOTDIR


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_unreadable_is_an_error(home):
    p = write(home, "control/smtpplugins", b"[helo]\n:x\n")
    p.chmod(0)
    with pytest.raises(SppConfigError) as ei:
        load_config({})
    assert ei.value.errno == errno.EACCES


def test_error_str_is_printable(home):
    e = SppConfigError(b"control/smtpplugins", errno.EISDIR)
    assert "control/smtpplugins" in str(e)
    assert e.text.startswith(b"unable to read control/smtpplugins: ")


# --- §2.2 lines --------------------------------------------------------------

def test_example_4_headers_comments_and_whitespace():
    # §7.1 #4: only `[hx` selects a section (helo); `[Helo]` entries never run,
    # entries before the first header never run, `  # note` is a comment.
    data = b"#c\n:echo E500\n[Helo]\n:echo E501\n[hx\n:echo HX: a   \n  # note"
    assert sections(data) == {"helo": [b":echo HX: a"]}


def test_example_5_crlf_file():
    assert sections(b"[helo]\r\n:echo E550 crlf\r\n") == {"helo": [b":echo E550 crlf"]}


def test_example_6_entry_kept_verbatim_with_space():
    assert sections(b"[helo]\nplugins/x arg\n") == {"helo": [b"plugins/x arg"]}


def test_example_7_and_8_entries_in_order():
    assert sections(b"[helo]\n:nosuchcmd\n:echo HX-2: 1\n") == {
        "helo": [b":nosuchcmd", b":echo HX-2: 1"]}
    data = b"[helo]\n:pwd >&2; test -c /dev/stdin && echo HX-In: null\n"
    assert sections(data) == {"helo": [b":pwd >&2; test -c /dev/stdin && echo HX-In: null"]}


def test_last_line_without_lf_counts():
    assert sections(b"[helo]\n:echo a") == {"helo": [b":echo a"]}


def test_strip_leading_and_trailing_sp_ht_cr():
    data = b" \t[helo] \r\n\t :echo a \t\r\r\n\r:echo b\r\n"
    assert sections(data) == {"helo": [b":echo a", b":echo b"]}


def test_inner_whitespace_and_cr_are_kept():
    assert sections(b"[helo]\n:echo a \t b\r c\n") == {"helo": [b":echo a \t b\r c"]}


def test_nul_cuts_the_line():
    data = b"[helo]\n:echo a\0junk\n\0[mail]\n:echo b \0\n[mail\0]\n:echo c\n"
    # `\0[mail]` is empty, so `:echo b` is still helo; `[mail\0]` is `[mail`.
    assert sections(data) == {"helo": [b":echo a", b":echo b"], "mail": [b":echo c"]}


def test_nul_before_hash_or_header_byte():
    assert sections(b"[h\0elo]\n:x\n") == {"helo": [b":x"]}
    assert sections(b"[\0helo]\n:x\n") == {}
    assert sections(b"[helo]\n#\0x\n:\0y\n") == {"helo": [b":"]}


def test_empty_and_comment_lines_dropped():
    data = b"\n[helo]\n\n   \n\t\r\n# c\n  # indented comment\n#[mail]\n:x\n"
    assert sections(data) == {"helo": [b":x"]}


def test_hash_inside_entry_is_kept():
    assert sections(b"[helo]\n:echo a # b\n") == {"helo": [b":echo a # b"]}


def test_empty_and_comment_only_files():
    assert sections(b"") == {}
    assert sections(b"# nothing\n\n#more") == {}


# --- §2.3 sections -------------------------------------------------------------

@pytest.mark.parametrize("header,phase", [
    (b"[connection]", "connection"), (b"[helo]", "helo"), (b"[mail]", "mail"),
    (b"[rcpt]", "rcpt"), (b"[data]", "data"), (b"[auth]", "auth"), (b"[body]", "body"),
    (b"[m]", "mail"), (b"[mailxyz", "mail"), (b"[mail", "mail"), (b"[hx", "helo"),
    (b"[c", "connection"), (b"[rcpt ] junk", "rcpt"), (b"[d]]]", "data"), (b"[b", "body"),
    (b"[a", "auth"),
])
def test_second_byte_selects(header, phase):
    assert sections(header + b"\n:x\n") == {phase: [b":x"]}


@pytest.mark.parametrize("header", [
    b"[Helo]", b"[pass]", b"[]", b"[", b"[ helo]", b"[HELO]", b"[xmail]", b"[M]",
    b"[e]", b"[\thelo]",
])
def test_other_second_bytes_are_ignored_sections(header):
    assert sections(b"[helo]\n:a\n" + header + b"\n:x\n[mail]\n:b\n") == {
        "helo": [b":a"], "mail": [b":b"]}


def test_entries_before_first_header_never_run():
    assert sections(b":a\nplugins/b\n[rcpt]\n:c\n") == {"rcpt": [b":c"]}


def test_sections_repeat_and_append_in_file_order():
    data = b"[helo]\n:a\n[mail]\n:b\n[helo]\n:c\n[hello]\n:d\n"
    assert sections(data) == {"helo": [b":a", b":c", b":d"], "mail": [b":b"]}


def test_only_nonempty_sections_have_keys():
    cfg = parse(b"[helo]\n[body]\n[mail]\n:x\n[data]\n# c\n")
    assert cfg.sections == {"mail": [b":x"]}
    assert "body" not in cfg.sections
    assert cfg.entries("helo") == ()
    assert cfg.entries("mail") == [b":x"]


def test_header_looking_entry_after_strip_is_header():
    # 0.42 read `  [helo]` as an entry; §2.2 step 3 makes it a header
    assert sections(b"[mail]\n  [helo]\n:x\n") == {"helo": [b":x"]}


def test_bytes_not_decoded():
    data = b"[helo]\n:echo \xff\xfe caf\xc3\xa9\n"
    assert sections(data) == {"helo": [b":echo \xff\xfe caf\xc3\xa9"]}


# --- notes for `qspp check` (collected, never printed) -------------------------

def kinds(data):
    return [(n, k) for n, k, _ in parse(data).notes]


def test_notes_collected_not_printed(capsys):
    data = (b":before\n"               # 1 entry before first header
            b"[Helo]\n"                # 2 ignored header
            b":under ignored\n"        # 3
            b"[hx\n"                   # 4 undocumented, selects helo
            b"plugins/x arg\n"         # 5 space in a non-: entry
            b"  # note\n"              # 6 0.42 reads an entry
            b":echo a\r\n"             # 7 CR stripped
            b"[body]\n")               # 8 extension
    notes = parse(data).notes
    assert capsys.readouterr() == ("", "")
    got = {(n, k) for n, k, _ in notes}
    assert {(1, "warning"), (2, "warning"), (3, "warning"), (4, "warning"), (5, "warning"),
            (6, "note"), (7, "note"), (8, "note")} <= got
    texts = dict(((n, k), t) for n, k, t in notes)
    assert b"helo" in texts[(4, "warning")]
    assert all(isinstance(t, bytes) for _, _, t in notes)


def test_clean_config_has_no_notes():
    assert parse(b"# plugins\n[helo]\n:echo a\n[mail]\nplugins/rbl\n").notes == []


# --- §2.4 entries ----------------------------------------------------------------

def test_entry_argv():
    assert entry_argv(b":echo a b") == [b"/bin/sh", b"-c", b"echo a b"]
    assert entry_argv(b":") == [b"/bin/sh", b"-c", b""]
    assert entry_argv(b"::x") == [b"/bin/sh", b"-c", b":x"]
    assert entry_argv(b"plugins/foo -x") == [b"plugins/foo -x"]
    assert entry_argv(b"/abs/path") == [b"/abs/path"]


# --- §4.4 SPPTIMEOUT -------------------------------------------------------------

@pytest.mark.parametrize("value,seconds", [
    (None, 60), (b"", 60), (b"0", 0), (b"1", 1), (b"5", 5), (b"007", 7), (b"000", 0),
    (b"3600", 3600), (b"60", 60),
])
def test_spptimeout_valid(value, seconds):
    env = {} if value is None else {b"SPPTIMEOUT": value}
    assert spptimeout(env) == (seconds, None)


@pytest.mark.parametrize("value", [
    b"1.5", b"-1", b"+5", b" 5", b"5 ", b"abc", b"5s", b"0x10", b"\xd9\xa3", b"1e3", b"\n",
])
def test_spptimeout_invalid(value):
    seconds, warning = spptimeout({b"SPPTIMEOUT": value})
    assert seconds == 60
    assert warning.startswith(b"SPPTIMEOUT=")
    assert b"\n" not in warning and b"\r" not in warning


def test_spptimeout_huge_is_effectively_unlimited():
    seconds, warning = spptimeout({b"SPPTIMEOUT": b"9" * 5000})
    assert warning is None and seconds >= 10 ** 9
    assert spptimeout({b"SPPTIMEOUT": b"0" * 30 + b"42"}) == (42, None)


@pytest.mark.parametrize("err", [errno.EACCES, errno.EIO, errno.ELOOP])
def test_other_open_errors_on_default_file_are_errors(home, monkeypatch, err):
    import qspp.sppconfig as sc

    def fail(path):
        raise OSError(err, os.strerror(err), path)
    monkeypatch.setattr(sc, "_read_file", fail)
    with pytest.raises(SppConfigError) as ei:
        load_config({})
    assert ei.value.errno == err and ei.value.path == b"control/smtpplugins"
