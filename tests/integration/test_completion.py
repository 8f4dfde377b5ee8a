"""The bash completion (completion/luanbd), run by a real bash as readline would call it:
COMP_WORDS and COMP_CWORD set, ``_luanbd`` called, COMPREPLY read back.  It asks the
luanbd on PATH, which here is the one under test."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from luanbd_procs import VENV_BIN, client_env, run_luanbd

from luanbd import cli
from luanbd.filters import BUILTIN

REPO = Path(__file__).resolve().parents[2]
COMPLETION = REPO / "completion" / "luanbd"

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")]

SCRIPT = """\
config_help = "size=<SIZE>  the disk's size\\nlabel=<TEXT>  a name\\n  not=a key"
function config(k, v) end
function open(readonly) return 1 end
function get_size(h) return 512 end
function pread(h, count, offset) return string.rep("\\0", count) end
"""


def complete(*words: str, cwd: Path | None = None) -> list[str]:
    """What the completion offers for the command line ``words`` (the last is the word
    being completed), with bash's own stderr required to be empty."""
    result = subprocess.run(
        ["bash", "-c", 'source "$0"; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _luanbd; '
         'status=$?; printf "%s\\n" "${COMPREPLY[@]}"; exit $status',
         str(COMPLETION), "luanbd", *words],
        capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
        env=client_env(PATH=f"{VENV_BIN}:/usr/bin:/bin"), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result
    assert result.stderr == "", result
    return [line for line in result.stdout.splitlines() if line]


def test_long_and_short_options_come_from_the_parser() -> None:
    long = run_luanbd("--long-options")
    short = run_luanbd("--short-options")
    assert long.returncode == short.returncode == 0, (long, short)
    assert long.stdout.splitlines() == cli.option_names("--")
    assert {"--filter", "--foreground", "--no-fork", "--tls", "--dump-plugin"} <= set(
        long.stdout.split())
    assert "--long-options" not in long.stdout
    assert set(short.stdout.split()) >= {"-U", "-f", "-r", "-V", "-4"}
    assert all(re.fullmatch(r"-[A-Za-z0-9]", o) for o in short.stdout.split()), short.stdout


def test_options() -> None:
    assert complete("--fil") == ["--filter"]
    assert complete("--tls-") == ["--tls-certificates", "--tls-psk", "--tls-verify-peer"]
    both = complete("-")
    assert {"-U", "-f", "--unix", "--foreground", "--run"} <= set(both)
    # After the script, options still complete (GNU permutation).
    assert complete("disk.lua", "--read") == ["--read-only", "--readonly"]


@pytest.mark.parametrize("form", ["split", "one word", "separate"])
def test_filter_names(form: str, tmp_path: Path) -> None:
    (tmp_path / "cowlike.lua").write_text("")
    (tmp_path / "cowboy.txt").write_text("")
    words = {"split": ["--filter", "=", "c"], "one word": ["--filter=c"],
             "separate": ["--filter", "c"]}[form]
    got = complete(*words, cwd=tmp_path)
    expected = [*(n for n in [*BUILTIN, "limit"] if n.startswith("c")), "cowlike.lua"]
    prefix = "--filter=" if form == "one word" else ""
    assert sorted(got) == sorted(prefix + n for n in expected), got
    assert {"cow", "cbt"} <= {g.removeprefix(prefix) for g in got}
    every = complete("--filter", "=", "", cwd=tmp_path)
    assert set(every) >= {*BUILTIN, "limit", "cowlike.lua"}, every
    assert "cowboy.txt" not in every


def test_lua_runtimes_are_the_installed_ones() -> None:
    fields = dict(line.split("=", 1) for line in run_luanbd("--dump-config").stdout.splitlines())
    versions = fields["lua_versions"].split(",")
    assert "5.4" in versions
    assert complete("--lua", "=", "") == versions
    assert complete("--lua=5.") == [f"--lua={v}" for v in versions if v.startswith("5.")]


def test_fixed_values() -> None:
    assert complete("--tls", "=", "") == ["off", "on", "require"]
    assert complete("--tls", "r") == ["require"]
    assert complete("--lua-gc=g") == ["--lua-gc=generational"]
    assert complete("--log", "=", "s") == ["stderr", "syslog"]
    assert complete("--log=/et") == ["--log=/etc"]  # a path must be absolute


def test_script_files(tmp_path: Path) -> None:
    (tmp_path / "disk.lua").write_text(SCRIPT)
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden.lua").write_text("")
    assert sorted(complete("", cwd=tmp_path)) == ["disk.lua", "sub/"]
    # An option's value (-U's socket) is not the script; "lua" is not either.
    assert sorted(complete("-U", "-", "lua", "", cwd=tmp_path)) == ["disk.lua", "sub/"]


def test_script_keys(tmp_path: Path) -> None:
    (tmp_path / "disk.lua").write_text(SCRIPT)
    assert complete("disk.lua", "", cwd=tmp_path) == ["size=", "label="]
    assert complete("-r", "disk.lua", "size=1M", "l", cwd=tmp_path) == ["label="]
    assert complete("-U", "-", "script=disk.lua", "s", cwd=tmp_path) == ["size="]
    # As readline splits words at "=" (COMP_WORDBREAKS).
    assert complete("script", "=", "disk.lua", "s", cwd=tmp_path) == ["size="]
    assert complete("disk.lua", "size", "=", "1M", "l", cwd=tmp_path) == ["label="]
    assert complete("--lua", "=", "5.4", "disk.lua", "si", cwd=tmp_path) == ["size="]
    # The keys of the filters on the command line come too, in their --help order.
    assert complete("--filter=offset", "disk.lua", "", cwd=tmp_path) == [
        "offset=", "range=", "size=", "label="]
    assert complete("--filter", "=", "cow", "disk.lua", "cow-on-r", cwd=tmp_path) == [
        "cow-on-read="]


def test_missing_or_broken_script_gives_nothing(tmp_path: Path) -> None:
    (tmp_path / "broken.lua").write_text("this is not Lua\n")
    assert complete("nosuch.lua", "", cwd=tmp_path) == []
    assert complete("nosuch", "s", cwd=tmp_path) == []
    assert complete("broken.lua", "", cwd=tmp_path) == []


def test_value_options_match_the_parser() -> None:
    # The completion must know which options take the next word as their value, or it
    # would take a value for the script.
    text = COMPLETION.read_text()
    listed = re.search(r'_luanbd_value_options="([^"]*)"', text)
    assert listed is not None
    takes_value = {name for action in cli._parser()._actions if action.nargs != 0
                   for name in action.option_strings}
    hidden = {"--long-options", "--short-options"}
    assert set(listed.group(1).split()) == takes_value - hidden
