"""luanbd_blank_string (luanbd.lua._lualib): the new string a big WRITE payload or file
read is received into, made without copying anything into it.

Its memory comes from the state's own allocator and is handed to Lua when Lua asks for
that string, so Lua's accounting (collectgarbage "count", lupa's max_memory) sees it as
any other string, and the state's allocator is the same one afterwards.
"""

from __future__ import annotations

from typing import Any

import lupa.lua54 as lupa54
import pytest

from luanbd.lua import lualib

pytestmark = pytest.mark.skipif(not lualib.BUILT, reason="luanbd.lua._lualib is not built")

KiB = 1024
MiB = 1024 * KiB


def state(**kwargs: Any) -> Any:
    runtime = lupa54.LuaRuntime(**kwargs)
    assert lualib.install(runtime.globals(), lupa54) is True
    runtime.globals().blank = lualib.blank_string(runtime.globals())
    return runtime


@pytest.mark.parametrize("size", [0, 1, 40, 41, 4096, MiB, 16 * MiB + 3])
def test_a_string_of_that_size(size: int) -> None:
    lua = state()
    length, kind = lua.execute("local s = blank(...) return #s, type(s)", size)
    assert (length, kind) == (size, "string")


def test_each_call_makes_its_own_string() -> None:
    lua = state()
    first, second = lua.execute(
        "local a, b = blank(65536), blank(65536) "
        "return string.format('%p', a), string.format('%p', b)")
    assert first != second


def test_the_states_accounting_sees_it() -> None:
    lua = state()
    before, held, after = lua.execute(
        "collectgarbage() collectgarbage() "
        "local before = collectgarbage('count') "
        "local s = blank(8 * 1048576) "
        "local held = collectgarbage('count') "
        "s = nil collectgarbage() collectgarbage() "
        "return before, held, collectgarbage('count')")
    assert held - before >= 8 * 1024  # KiB
    assert abs(after - before) < 256


def test_a_memory_limit_refuses_it_and_the_state_goes_on() -> None:
    lua = state(max_memory=4 * MiB)
    ok, message = lua.execute("return pcall(blank, 8 * 1048576)")
    assert ok is False
    assert "not enough memory" in str(message)
    # The allocator in place afterwards is the limited one: more than the limit still
    # fails, and what fits still works.
    assert lua.execute("return (pcall(string.rep, 'x', 8 * 1048576))") is False
    assert lua.execute("return #blank(1048576)") == MiB
    assert lua.execute("return #string.rep('x', 1048576)") == MiB


def test_many_in_a_row_keep_memory_flat() -> None:
    lua = state()
    grew = lua.execute(
        "collectgarbage() local before = collectgarbage('count') "
        "for i = 1, 200 do local s = blank(1048576) end "
        "collectgarbage() collectgarbage() return collectgarbage('count') - before")
    assert grew < 1024  # KiB: the 200 MiB made were all given back
