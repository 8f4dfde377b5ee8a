"""LuaScript: an nbdkit-style Lua script loaded into its own Lua state.

The script runs in one lupa ``LuaRuntime`` (Lua 5.4 unless asked otherwise).  Loading
follows nbdkit's ``plugins/lua/lua.c``: a first line starting with ``#`` is skipped but
counted, and the chunk is named after the path as given, so errors read ``plugin.lua:12:``.
Every callback goes through the wrapper of ``nbdkit.lua`` (luanbd.lua.nbdkit_table), which
turns a Lua error into (message, errno) so that it becomes one PluginError, never a Python
traceback.

Scripts without ``API_VERSION = 2`` get exactly the 2018 seed API (nbdkit-lua-plugin(3)):
only its callbacks are looked up.  With it, every nbdkit-plugin(3) callback.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from luanbd import gctrace
from luanbd.backend.interface import PluginError, StartupError, ThreadModel
from luanbd.lua import lualib, nbdkit_table, runtime
from luanbd.lua.pinning import Pinning
from luanbd.lua.results import first, text, unwrap, values
from luanbd.lua.runtime import LUA_MODULES

#: Every callback name a script may define (for --dump-plugin ``has_*`` lines).
CALLBACKS = (
    "load", "unload", "dump_plugin", "config", "config_complete", "thread_model",
    "get_ready", "after_fork", "cleanup", "preconnect", "list_exports", "default_export",
    "open", "close", "export_description", "get_size", "block_size", "can_write",
    "can_flush", "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_extents",
    "can_fua", "can_multi_conn", "can_cache", "pread", "pwrite", "flush", "trim", "zero",
    "cache", "extents", "meta_contexts", "meta_extents",
)
#: The callbacks of the seed (API 1); others are ignored by API 1 scripts, as in nbdkit.
SEED_CALLBACKS = frozenset({
    "dump_plugin", "config", "config_complete", "open", "close", "get_size", "can_write",
    "can_flush", "is_rotational", "can_trim", "pread", "pwrite", "flush", "trim", "zero",
})
REQUIRED = ("open", "get_size", "pread")
#: Under --lua-memory-limit, payloads bigger than this are checked against the room left.
MEMORY_CHECK = 4096
#: Room kept free for the call itself (frames, the string's header) under that limit.
MEMORY_MARGIN = 256 * 1024
#: A READ or WRITE of this many bytes or more counts toward a full collection (big_request),
#: which runs once such requests add up to BIG_COLLECT bytes, or to the heap if it is larger.
BIG_REQUEST = 1 << 20
BIG_COLLECT = 32 << 20
#: --lua-gc choices (Lua 5.4's collectgarbage modes).
GC_MODES = ("incremental", "generational")


class LuaScript:
    """One Lua script loaded into one Lua state: its callbacks, API version and thread
    model, and calling a callback by name."""

    #: The callbacks looked up (API 2), those a script must define, and the thread model
    #: of a script that declares none (a filter script changes these: lua/filter.py).
    callbacks: tuple[str, ...] = CALLBACKS
    required: tuple[str, ...] = REQUIRED
    default_thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS

    def __init__(self, script: str, *, lua: str = "5.4",
                 memory_limit: int | None = None, gc: str | None = None,
                 compiled_lualib: bool = True, track_memory: bool = False,
                 source: bytes | None = None) -> None:
        self.script = script
        #: The script's text as loaded (``source``, or read from ``script``): a
        #: connection's own state gets the same code even if the file has changed since.
        self.source = source
        self.lua_name = lua
        try:
            module = runtime.import_module(lua)
        except (KeyError, ImportError):
            raise StartupError(f"--lua={lua}: this Lua runtime is not available "
                               f"(choose from {', '.join(LUA_MODULES)})") from None
        self._lupa = module
        # unpack_returned_tuples: a Python primitive's (nil, message) reaches Lua as two
        # values, which is how nbdkit.lua tells failure from success.
        self.runtime = module.LuaRuntime(encoding=None, register_eval=False,
                                         register_builtins=False,
                                         unpack_returned_tuples=True,
                                         # --lua-memory-limit: allocations past it fail
                                         # with Lua's "not enough memory" (ENOMEM).
                                         # track_memory (--metrics): lupa's allocator
                                         # counts the state's bytes, with no limit.
                                         max_memory=memory_limit or
                                         (0 if track_memory else None))
        self._memory_limit = memory_limit or 0
        self.g = self.runtime.globals()
        # lupa's `python` table is of no use to an nbdkit script and would let it reach
        # Python objects: scripts see plain Lua plus the `nbdkit` table.
        self.g[b"python"] = None
        self.g.package.loaded[b"python"] = None
        # Before the script: its `local concat = table.concat` must get the faster one.
        self.lualib = lualib.install(self.g, module, enabled=compiled_lualib)
        # Lua's own `load` is a global too: only a script's redefinition is the callback.
        self._builtin_load = self.g.load
        # Lua 5.1 and LuaJIT load strings with loadstring(); load() wants a function there.
        self._load_string = self.g.loadstring or self.g.load
        # Lua's own, whatever global of that name the script defines.
        self._collectgarbage = self.g.collectgarbage
        self._big_bytes = 0
        self._big_threshold = BIG_COLLECT
        self._call, self._control = nbdkit_table.install(self.runtime, self._load_string)
        if self.lualib and not self._memory_limit:
            # --lua-memory-limit keeps the usual path, which checks a payload's size first.
            self._control.blank = lualib.blank_string(self.g)
        # Probed on the fresh state, before the script has allocated anything.
        self._pinning = Pinning.probe(self._control, self.lua_version)
        if gc is not None:
            self._set_gc_mode(gc)
        self._before_script()
        self._load_script()
        self.api_version = self._read_api_version()
        self.thread_model = self.default_thread_model
        self.fn: dict[str, Any] = {}
        self.resolve_callbacks()

    # --- loading ------------------------------------------------------------------------
    def _before_script(self) -> None:
        """Anything the state needs before the script's top level runs."""

    def _set_gc_mode(self, mode: str) -> None:
        """--lua-gc: Lua 5.4's collector mode, before the script allocates anything."""
        if mode not in GC_MODES:
            raise StartupError(f"--lua-gc={mode}: choose from {', '.join(GC_MODES)}")
        try:
            self.g.collectgarbage(mode.encode())
        except self._lupa.LuaError:
            # Lua before 5.4 and LuaJIT know neither mode by name.
            raise StartupError(f"--lua-gc={mode}: needs Lua 5.4 or later (--lua=5.4)") from None

    def _load_script(self) -> None:
        if self.source is None:
            try:
                with open(self.script, "rb") as f:
                    self.source = f.read()
            except OSError as err:
                raise StartupError(f"could not parse Lua script cannot open {self.script}: "
                                   f"{err.strerror}") from None
        source = self.source
        if source.startswith(b"#"):
            # Skip the shebang line but keep its newline so line numbers stay right.
            newline = source.find(b"\n")
            source = b"" if newline < 0 else source[newline:]
        result = self._load_string(source, b"@" + os.fsencode(self.script))
        if isinstance(result, tuple):
            raise StartupError(f"could not parse Lua script {text(result[1])}")
        ok, *rest = values(self._call(result))
        if not ok:
            raise StartupError(f"could not run Lua script: {text(rest[0])}")
        for name in self.required:
            if self._lua_type(self.g[name.encode()]) != "function":
                raise StartupError(
                    f"{self.script}: one of the required callbacks 'open', 'get_size' or "
                    f"'pread' is not defined by this Lua script.  nbdkit requires these "
                    f"callbacks.")

    def _read_api_version(self) -> int:
        value = self.g[b"API_VERSION"]
        if value is None:
            return 1
        if value in (1, 2) and not isinstance(value, bool):
            return int(value)
        raise StartupError(f"{self.script}: API_VERSION must be 1 or 2, not {text(value)}")

    def _lua_type(self, value: Any) -> str:
        return str(self._lupa.lua_type(value)) if value is not None else "nil"

    def resolve_callbacks(self) -> None:
        """Look up the callback functions (again after config_complete)."""
        allowed = SEED_CALLBACKS if self.api_version == 1 else frozenset(self.callbacks)
        self.fn = {}
        for name in self.callbacks:
            value = self.g[name.encode()]
            if name == "load" and self.g.rawequal(value, self._builtin_load):
                continue
            if name in allowed and self._lua_type(value) == "function":
                self.fn[name] = value
        if self.api_version == 2:
            self.thread_model = self._thread_model()

    def _thread_model(self) -> ThreadModel:
        value = self.g[b"thread_model"]
        if self._lua_type(value) == "function":
            value = self._startup_call("thread_model")
        if value is None:
            return self.default_thread_model
        if not isinstance(value, bytes | int | float):
            raise StartupError(f"thread_model: unknown thread model (a {self._lua_type(value)} "
                               f"value)")
        try:
            return ThreadModel[text(value).upper()]
        except KeyError:
            raise StartupError(f"thread_model: unknown thread model '{text(value)}'") from None

    # --- what the script is -------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.fn

    def string_global(self, name: str) -> str | None:
        value = self.g[name.encode()]
        return text(value) if isinstance(value, bytes) else None

    @property
    def lua_release(self) -> str:
        """The release number, as nbdkit's ``lua_version=`` ("5.4.8")."""
        return runtime.release(self._lupa)

    @property
    def lua_version(self) -> str:
        """The runtime's own name: ``_VERSION`` ("Lua 5.4"), or LuaJIT's "LuaJIT 2.1..."."""
        jit = self.g.jit
        if jit is not None:
            return text(jit.version)
        return text(self.g._VERSION)

    # --- calling ------------------------------------------------------------------------
    def call(self, name: str, *args: Any) -> Any:
        """Call callback ``name``; its first result, or PluginError."""
        return first(name, self._call(self.fn[name], *args))

    def call_multi(self, name: str, *args: Any) -> tuple[Any, ...]:
        return unwrap(name, self._call(self.fn[name], *args))

    def _startup_call(self, name: str, *args: Any) -> Any:
        """A callback of start-up, where a failure ends the server (StartupError)."""
        try:
            return self.call(name, *args)
        except PluginError as err:
            raise StartupError(str(err)) from None

    def big_request(self, size: int) -> None:
        """A READ or WRITE of ``size`` >= BIG_REQUEST bytes is about to be called.

        Lua's collector starts a cycle only once the heap has grown to twice its size after
        the last one (the default pause) and then works in steps, while a big request's
        string is garbage as soon as the call returned or its reply was sent: four clients
        with 64 MiB requests took a file-backed script's process to 1 GB (3.8 x the bytes in
        flight).  So once big requests since the last collection add up to the heap's
        size (the script's own data, without strings pinned for replies in flight; at least
        BIG_COLLECT), collect now, before this request's string is made: a full collection
        costs about what walking the heap costs, once per that many bytes.
        """
        self._big_bytes += size
        if self._big_bytes >= self._big_threshold:
            self.collect_garbage()

    def memory_in_use(self) -> int | None:
        """The state's bytes as lupa's allocator counts them (--metrics or
        --lua-memory-limit), else None.  A counter read: safe from any thread."""
        used = self.runtime.get_memory_used()
        return int(used) if used is not None else None

    def collect_garbage(self) -> None:
        """A full collection, strings of replies already sent included (big_request)."""
        pinning = self._pinning
        if pinning is not None and pinning.released:
            pinning.unpin_released()  # replies already sent: their strings can go too
        collect = self._collectgarbage
        if gctrace.enabled():
            start = time.perf_counter()
            collect(b"collect")
            gctrace.record("lua-full", time.perf_counter() - start)
        else:
            collect(b"collect")
        self._big_bytes = 0
        kib = collect(b"count")  # Lua 5.2 adds a second result (the bytes beyond)
        # The heap without the strings of replies still being sent: those go anyway.
        heap = int((kib[0] if isinstance(kib, tuple) else kib) * 1024)
        heap -= pinning.pinned_bytes if pinning else 0
        self._big_threshold = max(BIG_COLLECT, heap)

    def _reserve(self, size: int) -> None:
        """Under --lua-memory-limit, refuse (ENOMEM) a payload the Lua state has no room for.

        lupa copies arguments into Lua outside any pcall: an allocation failing there is a
        Lua panic, which aborts the whole process.  So make sure it cannot fail.
        """
        lua = self.runtime
        if lua.get_memory_used() + size + MEMORY_MARGIN <= self._memory_limit:
            return
        self.g.collectgarbage(b"collect")  # garbage may be what fills it
        if lua.get_memory_used() + size + MEMORY_MARGIN > self._memory_limit:
            raise PluginError("pwrite", f"not enough memory for a {size}-byte payload "
                                        f"(--lua-memory-limit)", errno.ENOMEM)
