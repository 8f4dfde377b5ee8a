"""A filter layer in the backend chain (backend/chain.py), driven by a real client (libnbd).

A counting filter written in Python sits in front of a Lua plugin: it sees every call, also
the plain small READs and WRITEs the compiled request loop would otherwise take straight to
Lua (a layer that looks at them switches that loop off), and its counts match what the
client sent.  A filter that overrides nothing keeps the compiled loop.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from luanbd.backend.chain import Backend, Chain, Context
from luanbd.backend.interface import Handle, ThreadModel
from luanbd.config import ServerConfig
from luanbd.lua.plugin import LuaPlugin
from luanbd.server.listener import Listener, bind_unix
from luanbd.server.service import Service

SCRIPT = """
local disk = {}
function open(readonly) return {} end
function get_size(h) return 1024 * 1024 end
function pread(h, count, offset)
  local out = {}
  for i = offset, offset + count - 1 do out[#out + 1] = disk[i] or "\\0" end
  return table.concat(out)
end
function pwrite(h, buf, offset)
  for i = 1, #buf do disk[offset + i - 1] = buf:sub(i, i) end
end
function flush(h) end
"""


class Counting(Backend):
    """Counts each call it passes on, and the bytes of reads and writes."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()

    @property
    def thread_model(self) -> ThreadModel:
        return ThreadModel.SERIALIZE_CONNECTIONS  # stricter than the script's

    def open(self, next: Context, readonly: bool) -> Handle:
        self.calls["open"] += 1
        next.open(readonly)
        return "counting-handle"

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        assert h == "counting-handle"  # the filter's own handle, not the plugin's
        self.calls["pread"] += 1
        self.bytes["pread"] += count
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self.calls["pwrite"] += 1
        self.bytes["pwrite"] += len(buf)
        next.pwrite(buf, offset, flags)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        self.calls["flush"] += 1
        next.flush(flags)


class PassThrough(Backend):
    """Overrides nothing."""


def _plugin(tmp_path: Path) -> LuaPlugin:
    script = tmp_path / "disk.lua"
    script.write_text(SCRIPT)
    plugin = LuaPlugin(str(script))
    plugin.load()
    plugin.config_complete()
    plugin.get_ready()
    plugin.after_fork()
    plugin.serving()
    return plugin


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    def start(filters: list[Backend]) -> tuple[str, Service]:
        path = str(tmp_path / "socket")
        service = Service(Chain(_plugin(tmp_path), filters),
                          ServerConfig(script="disk.lua", foreground=True))
        listener = Listener([bind_unix(path)])
        listener.start(service.handle)
        started.append((listener, service))
        return f"nbd+unix:///?socket={path}", service

    started: list[tuple[Listener, Service]] = []
    yield start
    for listener, service in started:
        listener.close()
        assert service.shutdown_connections(10)
        service.chain.cleanup()
        service.chain.unload()


def test_a_counting_filter_sees_every_call(served: Any) -> None:
    counting = Counting()
    uri, service = served([counting])
    assert service.chain.thread_model is ThreadModel.SERIALIZE_CONNECTIONS
    assert service.chain.compiled_calls() is None  # it looks at READ/WRITE: no compiled loop
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(50):  # plain small requests: what the compiled loop would take
        h.pwrite(bytes([i + 1]) * 512, i * 4096)
    for i in range(50):
        assert h.pread(512, i * 4096) == bytes([i + 1]) * 512
    assert h.pread(128 * 1024, 0)[:512] == b"\x01" * 512  # a large READ, in Python
    h.flush()
    h.shutdown()
    assert counting.calls == {"open": 1, "pwrite": 50, "pread": 51, "flush": 1}
    assert counting.bytes == {"pwrite": 50 * 512, "pread": 50 * 512 + 128 * 1024}


def test_a_filter_that_overrides_nothing_keeps_the_compiled_loop(served: Any,
                                                                 tmp_path: Path) -> None:
    uri, service = served([PassThrough()])
    if os.environ.get("LUANBD_FASTPATH", "1") != "0":
        assert service.chain.compiled_calls() is service.chain.plugin
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"abc" * 100, 1000)
    assert h.pread(300, 1000) == b"abc" * 100
    h.shutdown()


def test_chain_thread_model_is_the_most_restrictive() -> None:
    class Plugin:
        thread_model = ThreadModel.PARALLEL

    chain = Chain(Plugin(), [PassThrough()])  # type: ignore[arg-type]
    assert chain.thread_model is ThreadModel.PARALLEL
    assert Chain(Plugin(), [PassThrough(), Counting()]).thread_model is (  # type: ignore[arg-type]
        ThreadModel.SERIALIZE_CONNECTIONS)
