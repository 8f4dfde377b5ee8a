"""Every standard library function a script may call, in every runtime, is Lua's own.

tests/lua/stdlib/probe.lua runs a table of calls (io.popen, os.execute, os.tmpname, io.lines,
require beside the script and from LUA_PATH, package.loadlib of Debian's C modules,
string.pack, utf8, coroutines, debug.traceback, error messages...) once under Debian's stock
interpreter of the same Lua version and once under luanbd, where the script is a plugin whose
config_complete runs them.  The two result files must be equal line by line; the only lines
allowed to differ are listed below, each with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "stdlib"
PROBE = HERE / "probe.lua"
LUANBD = shutil.which("luanbd") or "luanbd"

#: luanbd's --lua choice -> Debian's interpreter of that version.  Debian has no Lua 5.5:
#: it is compared with 5.4's results, path names rewritten.
INTERPRETERS = {
    "5.1": "lua5.1", "5.2": "lua5.2", "5.3": "lua5.3", "5.4": "lua5.4",
    "luajit": "luajit", "5.5": "lua5.4",
}

#: Lines that may differ, and why.
EXPECTED_DIFFERENCES = {
    # lupa bundles LuaJIT 2.1 (rolling release); Debian has 2.1.0-beta3, whose own jit.*
    # modules in /usr/share/luajit-2.1.0-beta3 belong to that release.  Ours look in
    # /usr/share/luajit-2.1, where nothing is installed, so jit.v & co are missing.
    # (package.path and "module not found" messages are compared with that name rewritten.)
    "luajit": {"require.jit.v"},
    # What Lua 5.5 changed from 5.4: table.create; the 5.3 compatibility functions
    # (math.pow...) gone; debug.setcstacklimit gone; floats print with the fewest digits
    # that read back the same; Debian has no lua-cjson for 5.5.
    "5.5": {"lib.table", "lib.math", "lib.debug", "tostring.numbers", "loadlib.cjson",
            "loadlib.star", "cjson"},
}


def _env(tmp: Path, lua: str, out: Path, versioned: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUA_")}
    mods = tmp / "mods"
    mods.mkdir(exist_ok=True)
    (mods / "viaenv.lua").write_text('return { name = "from LUA_PATH" }\n')
    path, cpath = f"{mods}/?.lua;;", f"{mods}/?.so;;"
    if versioned:
        # The versioned names win over the plain ones where the version reads them (5.2+).
        env["LUA_PATH"] = env["LUA_CPATH"] = "/nowhere/?.x;;"
        for v in ("5_2", "5_3", "5_4", "5_5"):
            env[f"LUA_PATH_{v}"], env[f"LUA_CPATH_{v}"] = path, cpath
    else:
        env["LUA_PATH"], env["LUA_CPATH"] = path, cpath
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    env.update(PROBE_OUT=str(out), PROBE_VAR="a value", PROBE_TMP=str(scratch), TZ="UTC")
    return env


def _results(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="latin-1").split("\n")
    results: dict[str, str] = {}
    key = ""
    for line in lines:
        # A result may span lines (%q keeps newlines as "\" + newline).
        if "\t" in line and not line.startswith("\\"):
            key, _, value = line.partition("\t")
            results[key] = value
        elif key:
            results[key] += "\n" + line
    return results


def _run_both(tmp: Path, lua: str, versioned: bool) -> tuple[dict[str, str], dict[str, str]]:
    interpreter = shutil.which(INTERPRETERS[lua])
    assert interpreter, f"{INTERPRETERS[lua]} is missing: scripts/setup.sh installs it"
    theirs_out, ours_out = tmp / "theirs.txt", tmp / "ours.txt"
    stock = subprocess.run([interpreter, str(PROBE)], cwd=HERE, capture_output=True,
                           text=True, timeout=60, check=False,
                           env=_env(tmp, lua, theirs_out, versioned))
    assert stock.returncode == 0, stock
    served = subprocess.run([LUANBD, f"--lua={lua}", "-U", "-", str(PROBE), "--run", "true"],
                            cwd=HERE, capture_output=True, text=True, timeout=60, check=False,
                            env=_env(tmp, lua, ours_out, versioned))
    assert served.returncode == 0, served
    assert "Traceback" not in served.stderr, served.stderr
    theirs, ours = _results(theirs_out), _results(ours_out)
    if lua == "luajit":
        # Debian's LuaJIT names its jit.* module directory after its release (see below).
        theirs = {k: v.replace("/usr/share/luajit-2.1.0-beta3/", "/usr/share/luajit-2.1/")
                  for k, v in theirs.items()}
    if lua == "5.5":
        theirs = {k: v.replace("5.4", "5.5")
                  for k, v in theirs.items()}
    return theirs, ours


#: The C modules (lua-cjson, lua-posix) that need the Lua API among the global symbols.
SANITIZED_DIFFERENCES = {"cjson", "loadlib.cjson", "loadlib.star", "posix"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("versioned", [False, True], ids=["LUA_PATH", "LUA_PATH_5_x"])
@pytest.mark.parametrize("lua", list(INTERPRETERS))
def test_standard_library_matches_the_stock_interpreter(tmp_path: Path, lua: str,
                                                        versioned: bool) -> None:
    theirs, ours = _run_both(tmp_path, lua, versioned)
    assert set(theirs) == set(ours) or lua == "5.5", set(theirs) ^ set(ours)
    allowed = EXPECTED_DIFFERENCES.get(lua, set())
    if os.environ.get("LUANBD_SANITIZED"):
        # scripts/sanitize.sh: Lua is loaded RTLD_LOCAL there (lua/runtime.py), so Debian's
        # C modules cannot find the Lua API.
        allowed = allowed | SANITIZED_DIFFERENCES
    differing = {k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k)}
    unexpected = {k: (theirs.get(k), ours.get(k)) for k in differing - allowed}
    assert not unexpected, "\n".join(f"{k}:\n  stock:  {t}\n  luanbd: {o}"
                                     for k, (t, o) in sorted(unexpected.items()))
    # Equal is not enough if both were wrong: what the POSIX build must give.
    assert ours["popen.read"] == '"hi"'
    assert ours["popen.written"] == '"data1\\\n"'
    assert ours["tmpname.shape"] == "true" and ours["tmpname.exists"] == "true"
    assert ours["require.beside"] == "true, 42"
    if lua in ("5.1", "luajit"):
        assert ours["execute.3"] == "768"
        assert ours["popen.exit3"] == '"", true'
    else:
        assert ours["execute.3"] == 'nil, "exit", 3'
        assert ours["execute.killed"] == 'nil, "signal", 9'
        assert ours["popen.exit3"] == '"", nil, "exit", 3'
        assert ours["require.env"] == 'true, "from LUA_PATH"'
        if versioned:
            assert "/nowhere" not in ours["package.path"]
    if lua != "5.5" and not os.environ.get("LUANBD_SANITIZED"):
        assert ours["cjson"].startswith('"[1,2,\\"three\\"]", 2'), ours["cjson"]
        assert ours["loadlib.cjson"] == '"function"'
    if lua in ("5.1", "5.2", "5.3", "luajit") and not os.environ.get("LUANBD_SANITIZED"):
        assert ours["posix"] == 'true, "number"'


def test_dump_config_says_every_runtime_is_complete() -> None:
    result = subprocess.run([LUANBD, "--dump-config"], capture_output=True, text=True,
                            timeout=60, check=True)
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert fields["lua_incomplete"] == "", fields
    assert set(fields["lua_versions"].split(",")) == set(INTERPRETERS)


def test_stock_lupa_wheel_is_reported_incomplete() -> None:
    # What the check says of a Lua built without LUA_USE_LINUX: such a runtime exists in
    # this process only if lupa's own wheel is installed, so build the verdict from the
    # probe that --dump-config uses, on a runtime whose io.popen is taken away.
    from luanbd.lua import runtime

    module = runtime.import_module("5.4")
    assert runtime.stdlib_complete(module)

    class Crippled:
        __name__ = module.__name__

        @staticmethod
        def LuaRuntime(**kwargs: object) -> object:  # noqa: N802 (lupa's name)
            lua = module.LuaRuntime(**kwargs)
            lua.execute("io.popen = function() error(\"'popen' not supported\") end")
            return lua

    assert not runtime.stdlib_complete(Crippled)  # type: ignore[arg-type]
