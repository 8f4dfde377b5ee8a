"""A Lua filter as a layer of the chain (lua/filter.py): which calls it takes, the chain's
thread model, and whether the compiled request loop stays engaged."""

from __future__ import annotations

from pathlib import Path

from luanbd.backend.chain import Chain
from luanbd.backend.interface import ThreadModel
from luanbd.lua.filter import LuaFilter, is_lua_filter
from luanbd.lua.plugin import LuaPlugin

PLUGIN = """
API_VERSION = 2
thread_model = "parallel"
function open(readonly) return {} end
function get_size(h) return 65536 end
function pread(h, count, offset, flags) return string.rep("p", count) end
function pwrite(h, buf, offset, flags) end
"""


def _load(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _plugin(tmp: Path) -> LuaPlugin:
    plugin = LuaPlugin(_load(tmp, "plugin.lua", PLUGIN))
    plugin.config_complete()
    return plugin


def test_a_pass_through_lua_filter_keeps_the_compiled_loop(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path)
    size_only = LuaFilter(_load(tmp_path, "size.lua",
                                "function get_size(next, h) return 4096 end\n"))
    chain = Chain(plugin, [size_only])
    assert size_only.passes_plain_requests()
    assert chain.compiled_calls() is plugin
    assert chain.thread_model is ThreadModel.PARALLEL


def test_a_lua_filter_that_reads_switches_it_off(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path)
    reads = LuaFilter(_load(tmp_path, "reads.lua",
                            "function pread(next, h, c, o, f) return next:pread(c, o, f) end\n"))
    writes = LuaFilter(_load(tmp_path, "writes.lua",
                             "function pwrite(next, h, b, o, f) return next:pwrite(b, o, f) end\n"))
    assert Chain(plugin, [reads]).compiled_calls() is None
    assert Chain(plugin, [writes]).compiled_calls() is None


def test_a_declared_thread_model_restricts_the_chain(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path)
    strict = LuaFilter(_load(tmp_path, "strict.lua", 'thread_model = "serialize_requests"\n'))
    assert Chain(plugin, [strict]).thread_model is ThreadModel.SERIALIZE_REQUESTS


def test_data_through_a_lua_filter(tmp_path: Path) -> None:
    plugin = _plugin(tmp_path)
    upper = LuaFilter(_load(tmp_path, "upper.lua", """
function pread(next, h, count, offset, flags) return next:pread(count, offset, flags):upper() end
"""))
    top = Chain(plugin, [upper]).connect()
    top.open(False)
    assert top.get_size() == 65536
    assert bytes(top.pread(4, 0, 0)) == b"PPPP"
    top.close()


def test_filter_names() -> None:
    assert is_lua_filter("./x.lua") and is_lua_filter("dir/x") and is_lua_filter("x.lua")
    assert not is_lua_filter("cow")
