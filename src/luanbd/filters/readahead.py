"""nbdkit-readahead-filter(1): after each read, a background thread asks the plugin to
prefetch (NBD_CMD_CACHE) what follows, over a window that adapts to sequential reading.
It only works when the plugin caches natively and the thread model is parallel; otherwise
it says so and does nothing.  No parameters."""

from __future__ import annotations

import queue
import threading

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    CacheMode,
    Handle,
    LoggedError,
    PluginError,
    ThreadModel,
)

READAHEAD_MIN = 32 * 1024
READAHEAD_MAX = 4 * 1024 * 1024


def background_cache(next: Context, count: int, offset: int) -> None:
    """One prefetch from a background thread: advisory, so a failure only shows in the log
    (as the plugin's own message under nbdkit)."""
    try:
        next.cache(count, offset, 0)
    except PluginError as err:
        if not isinstance(err, LoggedError):
            log.error(str(err))


class _Conn:
    """One connection: the next layer's can_cache, its size, and the prefetching thread."""

    __slots__ = ("can_cache", "commands", "size", "thread")

    def __init__(self, next: Context) -> None:
        self.can_cache = CacheMode.NONE
        self.size: int | None = None
        #: (count, offset) to prefetch; None ends the thread.
        self.commands: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, args=(next, current.connection()),
                                       name="readahead", daemon=True)
        self.thread.start()

    def _run(self, next: Context, info: current.ConnectionInfo | None) -> None:
        current.set_connection(info)
        while True:
            cmd = self.commands.get()
            if cmd is None:
                return
            background_cache(next, *cmd)


class Filter(Backend):
    name = "readahead"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True

    def __init__(self) -> None:
        # The window is the server's, shared by every connection (as nbdkit's).
        self._lock = threading.Lock()
        self.window = READAHEAD_MIN
        self.last_offset = 0
        self.last_readahead = 0

    def _working(self, h: _Conn) -> bool:
        return (h.can_cache is CacheMode.NATIVE
                and self.chain_thread_model is ThreadModel.PARALLEL)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        return _Conn(next)

    def close(self, next: Context, h: Handle) -> None:
        h.commands.put(None)
        h.thread.join()
        next.close()

    def get_size(self, next: Context, h: Handle) -> int:
        size = next.get_size()
        h.size = size  # kept: nbdkit asks the plugin once per connection
        return size

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        mode = next.can_cache()
        h.can_cache = mode
        if not self._working(h):
            log.error("readahead: warning: underlying plugin does not support "
                      "NBD_CMD_CACHE or PARALLEL thread model, so the filter "
                      "won't do anything")
            if self.chain_thread_model is ThreadModel.PARALLEL:
                log.error("readahead: try adding --filter=cache after this filter")
        return mode

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        if self._working(h):
            if h.size is None:
                h.size = next.get_size()
            size = h.size
            start = offset + count
            cmd = None
            with self._lock:
                if start < size:
                    cmd = (min(self.window, size - start), start)
                # Reading past the last prefetch doubles the window; going forward keeps
                # it; anything else starts again from the minimum.
                if self.last_readahead < offset:
                    self.window = min(self.window * 2, READAHEAD_MAX)
                elif not self.last_offset < offset:
                    self.window = READAHEAD_MIN
                self.last_offset = offset
                self.last_readahead = start + (cmd[0] if cmd else 0)
            if cmd is not None:
                h.commands.put(cmd)
        return next.pread(count, offset, flags)
