"""The compiled file:read (luanbd.lua._lualib) against Lua 5.4's own, in one process.

For a single integer count of 64 KiB or more on an open file, luanbd's read makes the
string first and reads into it (one copy and half the memory less than Lua's read_chars);
every other call is Lua's own function on the same stack.  As for table.concat
(test_lualib.py), each case runs in a state with the stock method and one with ours, and
the outcomes (values, or the error's first line) must be equal and as expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_lualib import Pair, make_pair

from luanbd.lua import lualib

pytestmark = pytest.mark.skipif(not lualib.BUILT, reason="luanbd.lua._lualib is not built")

KiB = 1024
MiB = 1024 * KiB
SIZE = 300_000
DATA = os.urandom(SIZE)


@pytest.fixture(scope="module")
def pair() -> Pair:
    return make_pair()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("read") / "data.bin"
    path.write_bytes(DATA)
    return path


def reads(pair: Pair, path: Path, body: str) -> Any:
    """Run ``body`` with ``f`` open on the data file; its results, equal in both states."""
    snippet = (f"local f = assert(io.open({str(path)!r}, 'rb'))\n"
               f"local r = table.pack((function() {body} end)())\n"
               "f:close()\nreturn table.unpack(r, 1, r.n)")
    return pair.run(snippet)


def test_installed_as_the_file_method(pair: Pair) -> None:
    probe = ("return getmetatable(io.stdout).__index.read == io.stdout.read, "
             "tostring(io.stdout.read)")
    theirs = pair.stock.execute(probe)
    ours = pair.ours.execute(probe)
    assert theirs[0] is ours[0] is True
    assert theirs[1] != ours[1]  # ours is another C function
    # io.read (the default input's) is another function, left as it is.
    assert pair.stock.execute("return tostring(io.read)") == \
        pair.ours.execute("return tostring(io.read)")


@pytest.mark.parametrize("count", [1, 4095, 64 * KiB - 1, 64 * KiB, 100_000, SIZE - 1, SIZE,
                                   SIZE + 1, 10 * MiB, 64 * MiB, 64 * MiB + 1, 0])
def test_one_count_from_the_start(pair: Pair, data_file: Path, count: int) -> None:
    kind, value = reads(pair, data_file, f"return f:read({count})")
    assert kind == "ok"
    assert value == ((DATA[:count] if count else b""),)


def test_reads_across_the_end(pair: Pair, data_file: Path) -> None:
    kind, value = reads(pair, data_file, "return f:read(100000), f:read(150000), "
                                         "f:read(70000), f:read(70000), f:read(0)")
    assert kind == "ok"
    assert value == (DATA[:100000], DATA[100000:250000], DATA[250000:], None, None)


def test_after_seek_and_the_string_is_a_plain_string(pair: Pair, data_file: Path) -> None:
    body = ("f:seek('set', 12345)\nlocal s = f:read(200000)\n"
            "local t = {[s] = 1}\n"  # hashed only now, with the bytes read
            "return s, t[f:seek('set', 12345) and f:read(200000)], #s, s:sub(1, 3)")
    kind, value = reads(pair, data_file, body)
    assert kind == "ok"
    assert value == (DATA[12345:212345], 1, 200000, DATA[12345:12348])


@pytest.mark.parametrize(("call", "expected"), [
    ("f:read(70000, 70000)", (DATA[:70000], DATA[70000:140000])),
    ("f:read(70000.0)", (DATA[:70000],)),
    ("f:read('a'):sub(1, 70000)", (DATA[:70000],)),
    ("f:read('70000')", None),
    ("f:read(70000.5)", None),
])
def test_other_calls_are_luas(pair: Pair, data_file: Path, call: str,
                              expected: tuple[bytes, ...] | None) -> None:
    kind, value = reads(pair, data_file, f"return {call}")
    if expected is None:
        assert kind == "error", value
    else:
        assert (kind, value) == ("ok", expected)


def test_errors_are_luas(pair: Pair, data_file: Path, tmp_path: Path) -> None:
    closed = pair.run(f"local f = io.open({str(data_file)!r}, 'rb'); f:close(); "
                      "return f:read(70000)")
    assert closed[0] == "error" and closed[1].endswith("attempt to use a closed file")
    for snippet in ("return io.stdin.read(3, 70000)", "return io.stdin.read()",
                    "return io.stdout.read({}, 70000)"):
        kind, _ = pair.run(snippet)
        assert kind == "error"
    # A read that fails (a directory): nil, the message and errno.
    kind, value = pair.run(f"local f = assert(io.open({str(tmp_path)!r}, 'rb')); "
                           "return f:read(70000)")
    assert kind == "ok" and value[0] is None and value[2] == 21  # EISDIR
