"""Start-up errors: luanbd prints exactly one line on stderr and exits 1, before serving.

Each case runs ``luanbd ... -U - --run 'echo SERVED'`` from the scripts directory with the
script named by its bare file name, so Lua positions read ``disk.lua:41:`` as nbdkit prints
them (nbdkit 1.32.5 gives the same text with ``nbdkit`` in place of ``luanbd``).  The
``--run`` command must never run: the server may not start when its configuration failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from luanbd_procs import SCRIPTS, client_env, line_of, run_luanbd, script, where

DISK = script("disk.lua")
CONFIG_LINE = line_of(DISK, 'error("config failed")')
SIZE_LINE = line_of(DISK, 'error("cannot parse size: ')
COMPLETE_LINE = line_of(DISK, 'error("config_complete failed")')

CASES = {
    "missing-script": (
        ["missing.lua"],
        "luanbd: error: could not parse Lua script cannot open missing.lua: "
        "No such file or directory",
    ),
    "syntax-error": (
        ["syntax_error.lua"],
        "luanbd: error: could not parse Lua script syntax_error.lua:2: "
        "unexpected symbol near '='",
    ),
    "top-level-error": (
        ["toplevel_error.lua"],
        "luanbd: error: could not run Lua script: toplevel_error.lua:5: top level failure",
    ),
    "missing-required-callback": (
        ["no_pread.lua"],
        "luanbd: error: no_pread.lua: one of the required callbacks 'open', 'get_size' or "
        "'pread' is not defined by this Lua script.  nbdkit requires these callbacks.",
    ),
    "key-value-without-config": (
        ["noconfig.lua", "size=1M"],
        "luanbd: error: noconfig.lua: this plugin does not need command line configuration",
    ),
    "config-error": (
        ["disk.lua", "size=1M", "fail=config"],
        f"luanbd: error: config: disk.lua:{CONFIG_LINE}: "
        "config failed",
    ),
    "config-error-in-value-parser": (
        ["disk.lua", "size=12Q"],
        f"luanbd: error: config: disk.lua:{SIZE_LINE}: "
        "cannot parse size: 12Q",
    ),
    "config-complete-error": (
        ["disk.lua", "fail=config_complete"],
        f"luanbd: error: config_complete: disk.lua:{COMPLETE_LINE}: config_complete failed",
    ),
    "first-param-not-script": (
        ["foo=bar", "disk.lua"],
        "luanbd: error: the first parameter must be script=/path/to/script.lua",
    ),
    "lua-word-then-key-value": (
        ["lua", "foo=bar"],
        "luanbd: error: the first parameter must be script=/path/to/script.lua",
    ),
    "unknown-lua-runtime": (
        ["--lua=9.9", "disk.lua"],
        "luanbd: error: --lua=9.9: this Lua runtime is not available "
        "(choose from 5.4, 5.1, 5.2, 5.3, 5.5, luajit)",
    ),
    "no-script": (
        [],
        "luanbd: no Lua script given (try: luanbd SCRIPT.lua, or luanbd --help)",
    ),
    "bind-failure": (
        ["-U", "/nonexistent-dir/s.sock", "disk.lua"],
        "luanbd: error: bind: /nonexistent-dir/s.sock: No such file or directory",
    ),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(CASES))
def test_startup_error_is_one_line_and_exit_1(case: str) -> None:
    args, expected = CASES[case]
    listen = [] if "-U" in args else ["-U", "-"]
    result = run_luanbd(*listen, "--run", "echo SERVED", *args, cwd=SCRIPTS)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""


# nbdkit prints these two without "error: " (main.c: "%s: expecting key=value on the
# command line but got: %s"), like every other command-line mistake.
BARE_ARGUMENT_CASES = {
    "second-bare-argument": (["disk.lua", "size=1M", "extra"], "extra"),
    "key-starting-with-digit": (["disk.lua", "1a=b"], "1a=b"),
    "key-with-space": (["disk.lua", "a b=c"], "a b=c"),
    "after-double-dash": (["disk.lua", "--", "-r"], "-r"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(BARE_ARGUMENT_CASES))
def test_bad_key_value_exits_1(case: str) -> None:
    args, bad = BARE_ARGUMENT_CASES[case]
    result = run_luanbd("-U", "-", "--run", "echo SERVED", *args, cwd=SCRIPTS)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(f"expecting key=value on the command line but got: {bad}")
    assert result.stdout == ""


@pytest.mark.timeout(30)
def test_bad_key_value_message_matches_nbdkit() -> None:
    result = run_luanbd("-U", "-", "--run", "echo SERVED", "disk.lua", "size=1M", "extra",
                        cwd=SCRIPTS)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "luanbd: expecting key=value on the command line but got: extra"]


@pytest.mark.timeout(30)
def test_absolute_script_path_appears_as_given() -> None:
    # The chunk is named after the path exactly as given on the command line.
    result = run_luanbd("-U", "-", "--run", "echo SERVED", str(SCRIPTS / "syntax_error.lua"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"luanbd: error: could not parse Lua script {where(str(SCRIPTS / 'syntax_error.lua'), 2)}: "
        "unexpected symbol near '='"]


@pytest.mark.timeout(30)
def test_startup_error_with_dot_slash_path() -> None:
    result = run_luanbd("-U", "-", "--run", "echo SERVED", "./toplevel_error.lua",
                        cwd=SCRIPTS)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "luanbd: error: could not run Lua script: ./toplevel_error.lua:5: top level failure"]


@pytest.mark.timeout(30)
def test_unwritable_pidfile_exits_1_and_cleans_up(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = run_luanbd("-f", "-U", "-", "-P", "/nonexistent-dir/x.pid", "disk.lua",
                        cwd=SCRIPTS, env=client_env(TMPDIR=str(tmpdir)))
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("luanbd: error: ")
    assert "/nonexistent-dir/x.pid" in result.stderr
    assert list(tmpdir.iterdir()) == []  # the private socket directory is removed


@pytest.mark.timeout(30)
def test_unwritable_pidfile_message() -> None:
    result = run_luanbd("-f", "-U", "-", "-P", "/nonexistent-dir/x.pid", "disk.lua",
                        cwd=SCRIPTS)
    assert result.returncode == 1
    assert "[Errno" not in result.stderr
    assert result.stderr.splitlines() == [
        "luanbd: error: /nonexistent-dir/x.pid: No such file or directory"]
