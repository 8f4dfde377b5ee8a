"""Large reads sent from Lua's memory (luanbd.lua.pinning), checked on the Lua binding.

A pinned read hands the connection a view of a Lua string instead of a copy.  What must
hold: the view shows exactly the bytes the script returned, it stays valid for as long as
it is alive whatever the script and Lua's collector do meanwhile, its string is given back
to Lua once the view is gone (memory stays bounded), every answer that is not a string of
exactly ``count`` bytes gets the same treatment as on the ordinary path, and Lua builds
whose string layout the start-up probe cannot confirm never use it.  A real client reading
through it is in tests/integration/test_large_reads.py.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path

import pytest

from luanbd.backend.interface import PluginError
from luanbd.lua.pinning import PIN_MIN
from luanbd.lua.plugin import LuaPlugin

KiB = 1024
MiB = 1024 * KiB

#: A RAM disk in a Lua table of 64 KiB strings, plus answers that are not a plain string.
SCRIPT = """
local pages, PAGE = {}, 65536
local ZERO = string.rep("\\0", PAGE)
function open(readonly) return {} end
function get_size(h) return 64 * 1048576 end
function can_write(h) return true end
function pread(h, count, offset)
  if offset == 63 * 1048576 then
    local mode = pages.mode
    if mode == "long" then return string.rep("L", count + 100) end
    if mode == "short" then return string.rep("S", count - 1) end
    if mode == "number" then return 12345 end
    if mode == "nothing" then return end
    if mode == "table" then return {} end
    if mode == "error" then nbdkit.set_error(nbdkit.ENOSPC); error("big read failed") end
  end
  local parts = {}
  local first = math.floor(offset / PAGE)
  for i = first, math.floor((offset + count - 1) / PAGE) do
    parts[#parts + 1] = pages[i] or ZERO
  end
  if #parts * PAGE == count then return table.concat(parts) end
  local skip = offset - first * PAGE
  return string.sub(table.concat(parts), skip + 1, skip + count)
end
function pwrite(h, buf, offset)
  if offset == 63 * 1048576 then pages.mode = buf; return end
  local first = math.floor(offset / 65536)
  for i = 0, #buf / 65536 - 1 do
    pages[first + i] = string.sub(buf, i * 65536 + 1, (i + 1) * 65536)
  end
end
"""


@pytest.fixture
def plugin(tmp_path: Path) -> LuaPlugin:
    path = tmp_path / "pages.lua"
    path.write_text(SCRIPT)
    p = LuaPlugin(str(path))
    p.config_complete()
    return p


def lua_kib(p: LuaPlugin) -> float:
    return float(p.g.collectgarbage(b"count"))


def test_lua_54_reads_large_strings_in_place(plugin: LuaPlugin) -> None:
    assert plugin._pinning is not None  # this lupa build's Lua 5.4 passed the probe
    h = plugin.open(False)
    data = os.urandom(MiB)
    plugin.pwrite(h, data, 2 * MiB, 0)
    view = plugin.pread(h, MiB, 2 * MiB, 0)
    assert isinstance(view, memoryview)
    assert view.readonly and view.format == "B" and view.nbytes == MiB
    assert view == data
    # Below PIN_MIN reads stay plain bytes (lupa's copy is cheaper there).
    small = plugin.pread(h, PIN_MIN // 2, 2 * MiB, 0)
    assert small.__class__ is bytes and small == data[:PIN_MIN // 2]


def test_a_view_outlives_overwrites_and_full_collections(plugin: LuaPlugin) -> None:
    h = plugin.open(False)
    old = [os.urandom(256 * KiB) for _ in range(8)]
    views = []
    for i, block in enumerate(old):
        plugin.pwrite(h, block, i * 256 * KiB, 0)
        views.append(plugin.pread(h, 256 * KiB, i * 256 * KiB, 0))
    # The script drops every page the views came from, Lua collects and reuses memory.
    for i in range(8):
        plugin.pwrite(h, os.urandom(256 * KiB), i * 256 * KiB, 0)
    for _ in range(3):
        plugin.g.collectgarbage(b"collect")
        plugin.runtime.execute("local t = {} for i = 1, 64 do "
                               "t[i] = string.rep('x', 65536 + i) end")
    assert [bytes(v) for v in views] == old


def test_strings_go_back_to_lua_once_their_views_are_gone(plugin: LuaPlugin) -> None:
    h = plugin.open(False)
    plugin.pwrite(h, os.urandom(4 * MiB), 0, 0)
    plugin.g.collectgarbage(b"collect")
    before = lua_kib(plugin)
    for i in range(200):  # 200 MiB read in all
        view = plugin.pread(h, MiB, (i % 4) * MiB, 0)
        assert view[:1] == view[:1]
        del view
    gc.collect()
    plugin.pread(h, 64 * KiB, 0, 0)  # gives back what is queued
    plugin.g.collectgarbage(b"collect")
    assert lua_kib(plugin) - before < 4 * 1024  # a few MiB of slack, not 200 MiB


@pytest.mark.parametrize(("mode", "expected"), [
    ("long", b"L" * (128 * KiB)),
    ("number", None),  # 12345 is shorter than count
    ("short", None),
    ("nothing", None),
    ("table", None),
    ("error", None),
])
def test_other_answers_take_the_ordinary_path(plugin: LuaPlugin, mode: str,
                                              expected: bytes | None) -> None:
    h = plugin.open(False)
    plugin.pwrite(h, mode.encode(), 63 * MiB, 0)
    if expected is not None:
        assert bytes(plugin.pread(h, 128 * KiB, 63 * MiB, 0)) == expected
        return
    with pytest.raises(PluginError) as failure:
        plugin.pread(h, 128 * KiB, 63 * MiB, 0)
    message, code = str(failure.value), failure.value.errno
    if mode == "error":
        assert message.endswith(": big read failed") and code == 28  # ENOSPC
    elif mode in ("short", "number"):
        assert message == "pread: returned string length < count bytes"
    else:
        assert message == "pread: return value is not a string"
    # The plugin goes on reading in place.
    assert isinstance(plugin.pread(h, 128 * KiB, 0, 0), memoryview)


@pytest.mark.parametrize("lua", ["5.3", "5.1", "luajit"])
def test_other_lua_builds_never_pin(tmp_path: Path, lua: str) -> None:
    module = {"5.3": "lupa.lua53", "5.1": "lupa.lua51", "luajit": "lupa.luajit21"}[lua]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"lupa has no {module} here")
    path = tmp_path / "pages.lua"
    path.write_text(SCRIPT)
    p = LuaPlugin(str(path), lua=lua)
    assert p._pinning is None
    h = p.open(False)
    data = os.urandom(MiB)
    p.pwrite(h, data, 0, 0)
    value = p.pread(h, MiB, 0, 0)
    assert value.__class__ is bytes and value == data
