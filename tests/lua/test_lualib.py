"""The compiled table.concat (luanbd.lua._lualib) against Lua 5.4's own, in one process.

luanbd puts its own table.concat into every Lua 5.4 state before the script loads, for
speed only: a script must not be able to tell.  What must hold: for any arguments it gives
the same string as Lua's, or raises the same error with the same message, and calls the same
metamethods in the same order (its fast path is only for plain tables of strings; all else
goes through a port of Lua's code).  So every case here runs in two Lua 5.4 states from the
same lupa build, one with the stock function and one with ours, and the outcomes must be
equal -- plus an expected value per case, so that a case that goes wrong the same way in
both (a typo in the snippet) still fails.  Also checked: the plugin installs it before the
script runs, LUANBD_LUALIB=0 and other Lua versions keep Lua's own, and --dump-config says
which.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luanbd.config import ServerConfig
from luanbd.lua import lualib
from luanbd.lua.plugin import LuaPlugin
from luanbd.lua.runtime import LUA_MODULES

lupa54: ModuleType = pytest.importorskip("lupa.lua54")

pytestmark = pytest.mark.skipif(not lualib.BUILT, reason="luanbd.lua._lualib is not built")

KiB = 1024
MiB = 1024 * KiB
MAXINT = 2**63 - 1
MININT = -(2**63)

#: ("ok", values returned) or ("error", first line of the message).
Outcome = tuple[str, Any]


def new_runtime() -> Any:
    """A Lua 5.4 state set up as LuaPlugin sets up its own."""
    return lupa54.LuaRuntime(encoding=None, register_eval=False, register_builtins=False,
                             unpack_returned_tuples=True)


def comparable(value: Any) -> Any:
    """A value returned by Lua as something that compares across the two states."""
    if isinstance(value, float):
        return ("float", repr(value))  # nan equals nan, -0.0 differs from 0.0
    if value is None or isinstance(value, bool | int | bytes):
        return value
    return ("lua", lupa54.lua_type(value))  # a table or function: only its type


def outcome(runtime: Any, snippet: str, *args: Any) -> Outcome:
    try:
        result = runtime.execute(snippet, *args)
    except lupa54.LuaError as error:
        return ("error", str(error).splitlines()[0])
    values = result if isinstance(result, tuple) else (result,)
    return ("ok", tuple(comparable(v) for v in values))


@dataclass
class Pair:
    stock: Any  # Lua's table.concat
    ours: Any  # luanbd's

    def run(self, snippet: str, *args: Any) -> Outcome:
        """The outcome of ``snippet`` (called with ``args`` as ``...``), the same in both."""
        theirs = outcome(self.stock, snippet, *args)
        ours = outcome(self.ours, snippet, *args)
        assert ours == theirs, f"differs from Lua's table.concat for:\n{snippet}\nargs={args!r}"
        return ours


def make_pair() -> Pair:
    """A state with Lua's own functions and one with luanbd's (also test_lualib_read.py)."""
    if not ServerConfig(script="").lualib:
        pytest.skip("LUANBD_LUALIB=0 in the environment")
    ours = new_runtime()
    assert lualib.install(ours.globals(), lupa54) is True
    return Pair(new_runtime(), ours)


@pytest.fixture(scope="module")
def pair() -> Pair:
    return make_pair()


@dataclass(frozen=True)
class Err:
    """An expected error: the message's first line ends with this."""

    text: str


Expected = bytes | tuple[Any, ...] | Err


def check(pair: Pair, snippet: str, expected: Expected) -> None:
    kind, value = pair.run(snippet)
    if isinstance(expected, Err):
        assert kind == "error", f"expected an error, got {value!r}"
        assert value.endswith(expected.text), value
    else:
        assert kind == "ok", value
        wanted = expected if isinstance(expected, tuple) else (expected,)
        assert value == tuple(comparable(v) for v in wanted)


def cases(*rows: tuple[str, str, Expected]) -> pytest.MarkDecorator:
    """Parametrizes (snippet, expected) with an id per row."""
    return pytest.mark.parametrize(("snippet", "expected"), [pytest.param(s, e, id=i)
                                                             for i, s, e in rows])


# --- the function in place ----------------------------------------------------------------
def test_install_replaces_the_stock_function(pair: Pair) -> None:
    probe = "return tostring(table.concat), debug.getinfo(table.concat).what"
    theirs, theirs_what = pair.stock.execute(probe)
    ours, ours_what = pair.ours.execute(probe)
    assert theirs_what == ours_what == b"C"
    # Lua's is the same C function in every state of this lupa module: ours is another.
    assert theirs == stock_name()
    assert ours != theirs
    # Where the standard library keeps it too (error messages name it from there).
    assert pair.ours.execute("return rawequal(package.loaded.table.concat, table.concat)")


def test_the_buffer_probe_fits_luas_buffer() -> None:
    # install() asks Lua, through luanbd_lualib_probe, how big a luaL_Buffer's initial buffer
    # is on this build before trusting _lualib.c's copy of the struct: Lua's default is 1 KiB.
    runtime = new_runtime()
    probe = runtime.globals().package.loadlib(lualib._lualib.__file__.encode(),
                                              b"luanbd_lualib_probe")
    lua_size, our_size = probe()
    assert lua_size == 16 * 8 * 8  # LUAL_BUFFERSIZE: 16 * sizeof(void *) * sizeof(double)
    assert lua_size <= our_size


# --- plain tables of strings (the fast path) ----------------------------------------------
@cases(
    ("empty", "return table.concat({})", b""),
    ("empty-sep", "return table.concat({}, ',')", b""),
    ("one", "return table.concat({'abc'})", b"abc"),
    ("one-sep", "return table.concat({'abc'}, ', ')", b"abc"),
    ("many", "return table.concat({'a', 'bc', 'def'})", b"abcdef"),
    ("empty-strings", "return table.concat({'', 'a', '', '', 'bc', ''}, ',')", b",a,,,bc,"),
    ("only-empty", "return table.concat({'', '', ''})", b""),
    ("only-empty-sep", "return table.concat({'', '', ''}, '--')", b"----"),
    ("binary", "return table.concat({'a\\0b', '\\0', '\\255\\254'})", b"a\0b\0\xff\xfe"),
    ("nul-sep", "return table.concat({'a', 'b', 'c'}, '\\0')", b"a\0b\0c"),
    ("empty-sep-given", "return table.concat({'a', 'b'}, '')", b"ab"),
    ("nil-sep", "return table.concat({'a', 'b'}, nil)", b"ab"),
    ("long-sep", "return table.concat({'a', 'b', 'c'}, string.rep('=', 300))",
     b"a" + b"=" * 300 + b"b" + b"=" * 300 + b"c"),
    ("utf8-sep", "return table.concat({'x', 'y'}, '\\u{2192}')", "x\u2192y".encode()),
    ("range", "return table.concat({'a', 'b', 'c', 'd'}, '-', 2, 3)", b"b-c"),
    ("i-only", "return table.concat({'a', 'b', 'c', 'd'}, '-', 3)", b"c-d"),
    ("i-eq-j", "return table.concat({'a', 'b', 'c'}, '-', 2, 2)", b"b"),
    ("i-gt-j", "return table.concat({'a', 'b', 'c'}, '-', 3, 2)", b""),
    ("i-far-gt-j", "return table.concat({'a', 'b', 'c'}, '-', 100, -100)", b""),
    ("i-past-end", "return table.concat({'a', 'b', 'c'}, '-', 4)", b""),
    ("nil-i-j", "return table.concat({'a', 'b', 'c'}, '-', nil, nil)", b"a-b-c"),
    ("j-past-end", "return table.concat({'a', 'b', 'c'}, '-', 1, 5)",
     Err("invalid value (nil) at index 4 in table for 'concat'")),
    ("i-zero", "return table.concat({'a', 'b'}, '', 0)",
     Err("invalid value (nil) at index 0 in table for 'concat'")),
    ("negative", "return table.concat({[-2] = 'x', [-1] = 'y', [0] = 'z', 'a'}, ',', -2)",
     b"x,y,z,a"),
    ("negative-j", "return table.concat({[-2] = 'x', [-1] = 'y'}, ',', -2, -1)", b"x,y"),
    ("min-to-max-empty", "return table.concat({}, '', math.mininteger, math.maxinteger)",
     Err("invalid value (nil) at index -9223372036854775808 in table for 'concat'")),
    ("one-to-max", "return table.concat({'a'}, '', 1, math.maxinteger)",
     Err("invalid value (nil) at index 2 in table for 'concat'")),
    ("max-to-min", "return table.concat({'a'}, '', math.maxinteger, math.mininteger)", b""),
    ("max-max", "return table.concat({[math.maxinteger] = 'top'}, '', math.maxinteger,"
     " math.maxinteger)", b"top"),
    ("max-1-max", "return table.concat({[math.maxinteger - 1] = 'p', [math.maxinteger] = 'q'},"
     " ',', math.maxinteger - 1, math.maxinteger)", b"p,q"),
    ("max-1-max-hole", "return table.concat({[math.maxinteger] = 'q'}, ',',"
     " math.maxinteger - 1, math.maxinteger)",
     Err("invalid value (nil) at index 9223372036854775806 in table for 'concat'")),
    ("min-min", "return table.concat({[math.mininteger] = 'm'}, '', math.mininteger,"
     " math.mininteger)", b"m"),
    ("min-min+1", "return table.concat({[math.mininteger] = 'm', [math.mininteger + 1] = 'n'},"
     " '/', math.mininteger, math.mininteger + 1)", b"m/n"),
    ("min-to-max-at-min", "return table.concat({[math.mininteger] = 'm'}, '', math.mininteger,"
     " math.maxinteger)",
     Err("invalid value (nil) at index -9223372036854775807 in table for 'concat'")),
    ("float-i", "return table.concat({'a', 'b', 'c'}, '', 2.0)", b"bc"),
    ("float-j", "return table.concat({'a', 'b', 'c'}, '', 1, 2.0)", b"ab"),
    ("string-i", "return table.concat({'a', 'b', 'c'}, '', '2')", b"bc"),
    ("string-j", "return table.concat({'a', 'b', 'c'}, '', '1', ' 0x2 ')", b"ab"),
    ("string-float-i", "return table.concat({'a', 'b', 'c'}, '', '2.0')", b"bc"),
    ("border", "local t = {'a', 'b', 'c'} t[5] = 'e' return #t, table.concat(t, ',')",
     (3, b"a,b,c")),
    ("hole-default-j", "local t = {'a', 'b', 'c', 'd'} t[2] = nil"
     " return #t, pcall(table.concat, t, ',')",
     (4, False, b"invalid value (nil) at index 2 in table for 'concat'")),
    ("same-string", "local s = string.rep('ab', 10) return table.concat({s, s, s}, s)",
     b"ab" * 50),
    ("reused-result", "local t = {'x', 'y'} local r = table.concat(t)"
     " t[3] = r return table.concat(t, '.')", b"x.y.xy"),
)
def test_plain_tables_of_strings(pair: Pair, snippet: str, expected: Expected) -> None:
    check(pair, snippet, expected)


@pytest.mark.parametrize(("count", "size", "sep"), [
    (1, 0, b","),
    (64, 4096, b""),
    (64, 4096, b"\0|"),
    (256, 4096, b""),  # 1 MiB
    (255, 4111, b"-"),
    (2048, 4096, b""),  # 8 MiB
    (128, 65536, b"<sep>"),
    (4096, 1, b""),
    (10000, 0, b"ab"),
])
def test_large_results(pair: Pair, count: int, size: int, sep: bytes) -> None:
    snippet = """
    local count, size, sep = ...
    local t = {}
    for k = 1, count do
      t[k] = string.rep(string.char(k % 251), size - 1) .. string.char(k % 256)
    end
    if size == 0 then for k = 1, count do t[k] = '' end end
    return table.concat(t, sep)
    """
    pieces = [bytes([k % 251]) * (size - 1) + bytes([k % 256]) if size else b""
              for k in range(1, count + 1)]
    expected = sep.join(pieces)
    results = [outcome(rt, snippet, count, size, sep) for rt in (pair.stock, pair.ours)]
    digests = [(kind, len(value[0]), hashlib.sha256(value[0]).hexdigest())
               for kind, value in results]
    assert digests[1] == digests[0]
    assert digests[0] == ("ok", len(expected), hashlib.sha256(expected).hexdigest())


@pytest.mark.parametrize(("last", "expected"), [
    ("12345", (True, b"ab" * 4096 * 100 + b"12345")),  # falls back at the very end
    ("1.25", (True, b"ab" * 4096 * 100 + b"1.25")),
    ("{}", (False, b"invalid value (table) at index 101 in table for 'concat'")),
    ("false", (False, b"invalid value (boolean) at index 101 in table for 'concat'")),
])
def test_a_long_run_of_strings_then_something_else(pair: Pair, last: str,
                                                   expected: tuple[bool, bytes]) -> None:
    check(pair, f"""
    local t = {{}}
    for k = 1, 100 do t[k] = string.rep('ab', 4096) end
    t[101] = {last}
    return pcall(table.concat, t)
    """, expected)


# --- numbers ------------------------------------------------------------------------------
@cases(
    ("integers", "return table.concat({1, 2, 3}, ',')", b"1,2,3"),
    ("negative", "return table.concat({-1, 0, -0}, ',')", b"-1,0,0"),
    ("extremes", "return table.concat({math.mininteger, math.maxinteger}, ' ')",
     b"-9223372036854775808 9223372036854775807"),
    ("floats", "return table.concat({1.5, 1e100, -0.0, math.huge, -math.huge, 2.0, 0.1,"
     " 1/3, 2^53, 2^63, 1e-300, 5e-324, 1e15, 1e16, 123456789012345.0}, ' ')",
     b"1.5 1e+100 -0.0 inf -inf 2.0 0.1 0.33333333333333 9.007199254741e+15"
     b" 9.2233720368548e+18 1e-300 4.9406564584125e-324 1e+15 1e+16 1.2345678901234e+14"),
    ("nan", "local s = table.concat({0/0, -(0/0)}, ' ')"
     " return s == tostring(0/0) .. ' ' .. tostring(-(0/0)), s:find('nan', 1, true) ~= nil",
     (True, True)),
    ("mixed", "return table.concat({'a', 1, 'b', 2.5, 'c'})", b"a1b2.5c"),
    ("strings-then-number", "return table.concat({'a', 'b', 'c', 4}, '-')", b"a-b-c-4"),
    ("number-first", "return table.concat({4, 'a', 'b'}, '-')", b"4-a-b"),
    ("number-range", "return table.concat({1, 2, 3, 4}, '', 2, 3)", b"23"),
    ("number-sep", "return table.concat({'a', 'b'}, 0)", b"a0b"),
    ("float-sep", "return table.concat({'a', 'b', 'c'}, 1.5)", b"a1.5b1.5c"),
    ("negzero-sep", "return table.concat({'a', 'b'}, -0.0)", b"a-0.0b"),
    ("big-float-sep", "return table.concat({'a', 'b'}, 2^63)", b"a9.2233720368548e+18b"),
    ("int-float-sep", "return table.concat({1, 2}, 3.0)", b"13.02"),
    ("numbers-not-changed", "local t = {1, 2.0} table.concat(t)"
     " return math.type(t[1]), math.type(t[2])", (b"integer", b"float")),
)
def test_numbers(pair: Pair, snippet: str, expected: Expected) -> None:
    check(pair, snippet, expected)


# --- values that are neither strings nor numbers ------------------------------------------
@cases(
    ("table", "return table.concat({'a', {}})",
     Err("invalid value (table) at index 2 in table for 'concat'")),
    ("boolean", "return table.concat({'a', true, 'c'}, ',')",
     Err("invalid value (boolean) at index 2 in table for 'concat'")),
    ("hole", "return table.concat({'a', nil, 'c'}, ',', 1, 3)",
     Err("invalid value (nil) at index 2 in table for 'concat'")),
    ("function", "return table.concat({'a', print})",
     Err("invalid value (function) at index 2 in table for 'concat'")),
    ("thread", "return table.concat({'a', coroutine.create(print)})",
     Err("invalid value (thread) at index 2 in table for 'concat'")),
    ("userdata", "return table.concat({'a', io.stdout})",
     Err("invalid value (userdata) at index 2 in table for 'concat'")),
    ("first", "return table.concat({false, 'a'})",
     Err("invalid value (boolean) at index 1 in table for 'concat'")),
    ("after-number", "return table.concat({1, 'a', {}})",
     Err("invalid value (table) at index 3 in table for 'concat'")),
    ("tostring-is-not-used", "local v = setmetatable({}, {__tostring = function() return 'v'"
     " end, __name = 'V'}) return table.concat({'a', v})",
     Err("invalid value (table) at index 2 in table for 'concat'")),
    ("through-pcall", "return pcall(table.concat, {'a', {}})",
     (False, b"invalid value (table) at index 2 in table for 'concat'")),
    ("negative-index", "return pcall(table.concat, {[-1] = 'a', [0] = true}, '', -1, 0)",
     (False, b"invalid value (boolean) at index 0 in table for 'concat'")),
)
def test_bad_values(pair: Pair, snippet: str, expected: Expected) -> None:
    check(pair, snippet, expected)


# --- bad arguments ------------------------------------------------------------------------
@cases(
    ("none", "return table.concat()",
     Err("bad argument #1 to 'concat' (table expected, got no value)")),
    ("nil", "return table.concat(nil)",
     Err("bad argument #1 to 'concat' (table expected, got nil)")),
    ("string", "return table.concat('abc')",
     Err("bad argument #1 to 'concat' (table expected, got string)")),
    ("number", "return table.concat(42)",
     Err("bad argument #1 to 'concat' (table expected, got number)")),
    ("file", "return table.concat(io.stdout)",
     Err("bad argument #1 to 'concat' (table expected, got FILE*)")),
    ("pcall-none", "return pcall(table.concat)",
     (False, b"bad argument #1 to 'table.concat' (table expected, got no value)")),
    ("pcall-string", "return pcall(table.concat, 'abc')",
     (False, b"bad argument #1 to 'table.concat' (table expected, got string)")),
    ("local-name", "local join = table.concat return join(true)",
     Err("bad argument #1 to 'join' (table expected, got boolean)")),
    ("method", "local o = {join = table.concat} return o:join({})",
     Err("bad argument #1 to 'join' (string expected, got table)")),
    ("method-self", "local o = setmetatable({}, {__index = {join = table.concat}})"
     " return o:join()", b""),
    ("table-sep", "return table.concat({}, {})",
     Err("bad argument #2 to 'concat' (string expected, got table)")),
    ("boolean-sep", "return table.concat({'a'}, false)",
     Err("bad argument #2 to 'concat' (string expected, got boolean)")),
    ("named-sep", "return table.concat({'a'}, setmetatable({}, {__name = 'Thing'}))",
     Err("bad argument #2 to 'concat' (string expected, got Thing)")),
    ("fractional-i", "return table.concat({'a'}, '', 1.5)",
     Err("bad argument #3 to 'concat' (number has no integer representation)")),
    ("fractional-j", "return table.concat({'a'}, '', 1, 1.5)",
     Err("bad argument #4 to 'concat' (number has no integer representation)")),
    ("huge-i", "return table.concat({'a'}, '', math.huge)",
     Err("bad argument #3 to 'concat' (number has no integer representation)")),
    ("nan-j", "return table.concat({'a'}, '', 1, 0/0)",
     Err("bad argument #4 to 'concat' (number has no integer representation)")),
    ("2^63-i", "return table.concat({'a'}, '', 2^63)",
     Err("bad argument #3 to 'concat' (number has no integer representation)")),
    ("fractional-string-i", "return table.concat({'a'}, '', '1.5')",
     Err("bad argument #3 to 'concat' (number has no integer representation)")),
    ("word-i", "return table.concat({'a'}, '', 'one')",
     Err("bad argument #3 to 'concat' (number expected, got string)")),
    ("table-i", "return table.concat({'a'}, '', {})",
     Err("bad argument #3 to 'concat' (number expected, got table)")),
    ("boolean-j", "return table.concat({'a'}, '', 1, true)",
     Err("bad argument #4 to 'concat' (number expected, got boolean)")),
    ("first-bad-wins", "return table.concat({'a', {}}, {}, 'x')",
     Err("bad argument #2 to 'concat' (string expected, got table)")),
    ("sep-before-i", "return table.concat({'a'}, true, 1.5)",
     Err("bad argument #2 to 'concat' (string expected, got boolean)")),
    ("args-before-values", "return table.concat({{}}, '', 1, 'x')",
     Err("bad argument #4 to 'concat' (number expected, got string)")),
    ("extra-args", "return table.concat({'a', 'b'}, '+', 1, 2, 'ignored', {})", b"a+b"),
)
def test_bad_arguments(pair: Pair, snippet: str, expected: Expected) -> None:
    check(pair, snippet, expected)


# --- metatables: the same metamethods, called in the same order ---------------------------
#: Lua helpers for the snippets below: note() logs a call, trail() joins the log without
#: table.concat (which is what is under test).
LOG = """
local log = {}
local function note(...) local s = '' for k = 1, select('#', ...) do
  s = s .. tostring((select(k, ...))) end log[#log + 1] = s end
local function trail() local s = '' for k = 1, #log do
  s = s .. (k > 1 and ';' or '') .. log[k] end return s end
"""


@cases(
    ("proxy", """
     local data = {'a', 'b', 'c'}
     local p = setmetatable({}, {
       __index = function(_, k) note('index ', k) return data[k] end,
       __len = function() note('len') return #data end})
     return table.concat(p, ','), trail()""",
     (b"a,b,c", b"len;index 1;index 2;index 3")),
    ("proxy-range", """
     local p = setmetatable({}, {
       __index = function(_, k) note('index ', k) return 'v' .. k end,
       __len = function() note('len') return 100 end})
     return table.concat(p, '', -1, 2), trail()""",
     (b"v-1v0v1v2", b"len;index -1;index 0;index 1;index 2")),
    ("proxy-empty-range", """
     local p = setmetatable({}, {
       __index = function(_, k) note('index ', k) return 'v' end,
       __len = function() note('len') return 0 end})
     return table.concat(p), trail()""",
     (b"", b"len")),
    ("index-fills-holes", """
     local t = setmetatable({'a', nil, 'c', nil}, {
       __index = function(_, k) note('index ', k) return k == 2 and 'B' or nil end})
     local ok, r = pcall(table.concat, t, '', 1, 4)
     return ok, r, trail()""",
     (False, b"invalid value (nil) at index 4 in table for 'concat'", b"index 2;index 4")),
    ("index-table", """
     local t = setmetatable({}, {__index = {'x', 'y', 'z'}})
     return #t, table.concat(t), table.concat(t, '-', 1, 3)""",
     (0, b"", b"x-y-z")),
    ("index-number", """
     local t = setmetatable({'a'}, {__index = function(_, k) note('index ', k) return k * 1.5 end})
     return table.concat(t, ',', 1, 3), trail()""",
     (b"a,3.0,4.5", b"index 2;index 3")),
    ("index-bad-value", """
     local t = setmetatable({'a'}, {__index = function(_, k) note('index ', k) return {} end})
     local ok, r = pcall(table.concat, t, ',', 1, 3)
     return ok, r, trail()""",
     (False, b"invalid value (table) at index 2 in table for 'concat'", b"index 2")),
    ("index-error", """
     local t = setmetatable({'a'}, {__index = function(_, k) note('index ', k)
       error('no item ' .. k) end})
     local ok, r = pcall(table.concat, t, ',', 1, 3)
     return ok, r, trail()""",
     (False, b'[string "<python>"]:9: no item 2', b"index 2")),
    ("index-error-object", """
     local t = setmetatable({}, {__index = function(_, k) error({code = k}) end})
     local ok, r = pcall(table.concat, t, ',', 5, 6)
     return ok, type(r), r.code""",
     (False, b"table", 5)),
    ("index-yields", """
     local t = setmetatable({}, {__index = function(_, k) note('index ', k)
       coroutine.yield(k) end})
     local ok, r = coroutine.wrap(function() return pcall(table.concat, t, '', 1, 2) end)()
     return ok, r, trail()""",
     (False, b"attempt to yield across a C-call boundary", b"index 1")),
    ("index-changes-table", """
     local t = setmetatable({}, {__index = function(t, k) note('index ', k)
       rawset(t, k + 1, 'r' .. (k + 1)) return 'i' .. k end})
     return table.concat(t, '', 1, 4), trail()""",
     (b"i1r2i3r4", b"index 1;index 3")),
    ("len-only", """
     local t = setmetatable({'a', 'b', 'c', 'd'}, {__len = function(t) note('len') return 2 end})
     return table.concat(t), trail()""",
     (b"ab", b"len")),
    ("len-not-called-for-j", """
     local t = setmetatable({'a', 'b', 'c'}, {__len = function() note('len') return 1 end})
     return table.concat(t, '', 1, 3), trail()""",
     (b"abc", b"len")),
    ("len-string", """
     local t = setmetatable({'a', 'b', 'c'}, {__len = function() note('len') return '2' end})
     return table.concat(t), trail()""",
     (b"ab", b"len")),
    ("len-float", """
     local t = setmetatable({'a', 'b', 'c'}, {__len = function() return 3.0 end})
     return table.concat(t)""",
     b"abc"),
    ("len-fraction", """
     local t = setmetatable({'a', 'b', 'c'}, {__len = function() note('len') return 2.5 end})
     local ok, r = pcall(table.concat, t)
     return ok, r, trail()""",
     (False, b"object length is not an integer", b"len")),
    ("len-table", """
     local t = setmetatable({}, {__len = function() return {} end})
     return pcall(table.concat, t)""",
     (False, b"object length is not an integer")),
    ("len-error", """
     local t = setmetatable({}, {__len = function() error('no length', 0) end})
     return pcall(table.concat, t)""",
     (False, b"no length")),
    ("len-before-sep", """
     local t = setmetatable({}, {__len = function() note('len') return 0 end})
     local ok, r = pcall(table.concat, t, {})
     return ok, r, trail()""",
     (False, b"bad argument #2 to 'table.concat' (string expected, got table)", b"len")),
    ("empty-metatable", "return table.concat(setmetatable({'a', 'b'}, {}), ',')", b"a,b"),
    ("protected-metatable", """
     local t = setmetatable({'a'}, {__metatable = false,
       __index = function(_, k) note('index ', k) return 'x' end})
     return table.concat(t, '', 1, 2), trail()""",
     (b"ax", b"index 2")),
    ("newindex-only", """
     local t = setmetatable({'a', 'b'}, {__newindex = function() note('newindex') end})
     return table.concat(t), trail()""",
     (b"ab", b"")),
    ("number-with-metatable", """
     debug.setmetatable(0, {
       __index = function(n, k) note('index ', n, ' ', k) return n * k end,
       __len = function(n) note('len ', n) return 3 end})
     local ok, r = pcall(table.concat, 7, '-')
     debug.setmetatable(0, nil)
     return ok, r, trail()""",
     (True, b"7-14-21", b"len 7;index 7 1;index 7 2;index 7 3")),
    ("number-index-only", """
     debug.setmetatable(0, {__index = function() note('index') return 'x' end})
     local ok, r = pcall(table.concat, 7)
     debug.setmetatable(0, nil)
     return ok, r, trail()""",
     (False, b"bad argument #1 to 'table.concat' (table expected, got number)", b"")),
    ("number-len-only", """
     debug.setmetatable(0, {__len = function() note('len') return 1 end})
     local ok, r = pcall(table.concat, 7)
     debug.setmetatable(0, nil)
     return ok, r, trail()""",
     (False, b"bad argument #1 to 'table.concat' (table expected, got number)", b"")),
    ("boolean-with-metatable", """
     debug.setmetatable(true, {__name = 'Flag',
       __index = function(b, k) note('index ', k) return tostring(b) end,
       __len = function() note('len') return 2 end})
     local ok, r = pcall(table.concat, false, ' ')
     local ok2, r2 = pcall(table.concat, {}, true)
     debug.setmetatable(true, nil)
     return ok, r, ok2, r2, trail()""",
     (True, b"false false", False,
      b"bad argument #2 to 'table.concat' (string expected, got Flag)", b"len;index 1;index 2")),
    ("string-metatable-not-enough", """
     local mt = getmetatable('')
     return pcall(table.concat, 'abc')""",
     (False, b"bad argument #1 to 'table.concat' (table expected, got string)")),
)
def test_metatables(pair: Pair, snippet: str, expected: Expected) -> None:
    check(pair, LOG + snippet, expected)


def test_states_left_as_found(pair: Pair) -> None:
    """The metatable cases above put back the metatables they set on numbers and booleans."""
    assert pair.run("return getmetatable(0), getmetatable(true)") == ("ok", (None, None))


# --- any table, any arguments -------------------------------------------------------------
HOLE = object()  # an item left nil
TOP = object()  # items placed to end at math.maxinteger

STRINGS = st.one_of(st.binary(max_size=12), st.sampled_from([b"", b"\0", b"a,b"]))
ITEMS = st.one_of(
    STRINGS,
    st.integers(-1000, 1000),
    st.integers(MININT, MAXINT),
    st.floats(),
    st.sampled_from([0.0, -0.0, 2.0, 1e100, 0.1]),
    st.booleans(),
    st.just(HOLE),
)
SEPARATORS = st.one_of(st.binary(max_size=4), st.sampled_from([b"", b",", b"\0"]), st.none(),
                       st.integers(-100, 100), st.floats(), st.sampled_from([True, b"x" * 100]))
MODES = st.sampled_from([b"plain"] * 5 + [b"index", b"len", b"both", b"empty-mt"])

#: Builds the table from its arguments, then calls table.concat with the first ``nargs`` of
#: (t, sep, i, j).  __index answers only near the items, so that no call runs for long.
PROPERTY = """
local n, base, nargs, sep, i, j, mode, fill, len, lo, hi = ...
local t = {}
for k = 1, n do t[base + k - 1] = (select(11 + k, ...)) end
local log = {}
local mt = {}
if mode == 'index' or mode == 'both' then
  mt.__index = function(_, k)
    log[#log + 1] = 'index ' .. k
    if k >= lo and k <= hi then return fill end
  end
end
if mode == 'len' or mode == 'both' then
  mt.__len = function() log[#log + 1] = 'len' return len end
end
if mode ~= 'plain' then setmetatable(t, mt) end
local args = {t, sep, i, j}
local ok, r = pcall(table.concat, table.unpack(args, 1, nargs))
local s = ''
for k = 1, #log do s = s .. log[k] .. ';' end
return ok, r, s
"""


@st.composite
def concat_calls(draw: st.DrawFn) -> tuple[Any, ...]:
    # Mostly tables of strings only: the fast path's case.
    items = draw(st.lists(draw(st.sampled_from([STRINGS, STRINGS, ITEMS])), max_size=24))
    n = len(items)
    where = draw(st.one_of(st.just(1), st.integers(-3, 3), st.just(TOP)))
    base = MAXINT - max(n, 1) + 1 if where is TOP else where
    assert isinstance(base, int)

    def clamp(k: int) -> int:
        return max(MININT, min(MAXINT, k))

    near = st.builds(lambda d: clamp(base + d), st.integers(-3, n + 3))
    bounds = st.one_of(
        st.none(), st.none(), near, near,
        st.sampled_from([MININT, MAXINT, MININT + 1, MAXINT - 1, 0, 1]),
        st.builds(lambda d: float(clamp(base + d)), st.integers(-2, n + 2)),
        st.builds(lambda d: str(clamp(base + d)).encode(), st.integers(-2, n + 2)),
        st.sampled_from([1.5, b"x", True]),
    )
    i, j = draw(bounds), draw(bounds)
    nargs = draw(st.sampled_from([1, 1, 1, 2, 2, 2, 3, 4, 4, 4, 0]))
    lengths = st.one_of(st.builds(lambda d: clamp(base + d - 1), st.integers(-2, n + 2)),
                        st.sampled_from([0, -1, 2.0, b"3", 2.5]))
    fill = draw(st.one_of(st.binary(max_size=3), st.integers(-9, 9), st.none(), st.just(1.5),
                          st.just(False)))
    values = [None if v is HOLE else v for v in items]
    return (n, base, nargs, draw(SEPARATORS), i, j, draw(MODES), fill, draw(lengths),
            clamp(base - 3), clamp(base + n + 3), *values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=concat_calls())
def test_any_call_gives_what_lua_gives(pair: Pair, call: tuple[Any, ...]) -> None:
    kind, value = pair.run(PROPERTY, *call)
    assert kind == "ok"  # pcall caught whatever table.concat raised
    ok, result, log = value
    assert isinstance(ok, bool)
    nargs, mode = call[2], call[6]
    if nargs and mode in (b"len", b"both"):
        assert log.startswith(b"len;")  # the length comes first, and only once (below)
        assert log.count(b"len;") == 1
    if ok:
        assert isinstance(result, bytes)
    else:
        assert b"concat" in result or result == b"object length is not an integer"


# --- through the plugin -------------------------------------------------------------------
SCRIPT = """
local concat = table.concat
captured = concat
function open(readonly) return {} end
function get_size(h) return 1048576 end
function pread(h, count, offset)
  local parts = {}
  for k = 1, math.floor(count / 4096) do parts[k] = string.rep(string.char(65 + k % 26), 4096) end
  return concat(parts)
end
"""


def expected_read(count: int) -> bytes:
    return b"".join(bytes([65 + k % 26]) * 4096 for k in range(1, count // 4096 + 1))


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "concat.lua"
    path.write_text(SCRIPT)
    return path


def stock_name() -> bytes:
    name: bytes = new_runtime().eval("tostring(table.concat)")
    return name


def test_the_plugin_installs_it_before_the_script_loads(script: Path) -> None:
    if not ServerConfig(script="").lualib:
        pytest.skip("LUANBD_LUALIB=0 in the environment")
    plugin = LuaPlugin(str(script))
    assert plugin.lualib is True
    g = plugin.g
    assert g.rawequal(g.captured, g.table.concat)
    assert g.tostring(g.captured) != stock_name()
    plugin.config_complete()
    h = plugin.open(False)
    assert bytes(plugin.pread(h, 256 * KiB, 0, 0)) == expected_read(256 * KiB)


@pytest.mark.parametrize("lua", ["5.1", "5.2", "5.3", "5.5", "luajit"])
def test_other_lua_versions_keep_their_own(script: Path, lua: str) -> None:
    module = pytest.importorskip(LUA_MODULES[lua])
    plugin = LuaPlugin(str(script), lua=lua)
    assert plugin.lualib is False
    g = plugin.g
    before = g.table.concat
    assert lualib.install(g, module) is False
    assert g.rawequal(g.table.concat, before)
    assert g.rawequal(g.captured, before)
    plugin.config_complete()
    h = plugin.open(False)
    assert bytes(plugin.pread(h, 64 * KiB, 0, 0)) == expected_read(64 * KiB)


CHILD = """
import sys
import lupa.lua54
from luanbd.config import ServerConfig
from luanbd.lua.startup import LuaStartup
config = ServerConfig(script=sys.argv[1])
plugin = LuaStartup(config).load().plugin
stock = lupa.lua54.LuaRuntime(encoding=None).eval("tostring(table.concat)")
print(config.lualib, plugin.lualib, plugin.g.tostring(plugin.g.captured) == stock)
"""


def child_env(setting: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LUANBD_LUALIB", None)
    if setting is not None:
        env["LUANBD_LUALIB"] = setting
    return env


@pytest.mark.parametrize(("setting", "expected"), [
    (None, "True True False"),
    ("1", "True True False"),
    ("", "True True False"),
    ("0", "False False True"),  # the script captured Lua's own
])
def test_luanbd_lualib_0_keeps_luas_own(script: Path, setting: str | None,
                                        expected: str) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(script)], capture_output=True,
                            text=True, timeout=60, env=child_env(setting), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(("setting", "expected"), [
    (None, "lualib=yes"),
    ("0", "lualib=off"),
])
def test_dump_config_says_which(setting: str | None, expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", "luanbd", "--dump-config"],
                            capture_output=True, text=True, timeout=60,
                            env=child_env(setting), check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("lualib=")] == [expected]
