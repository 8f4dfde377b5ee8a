"""nbdkit-scan-filter(1): a background thread per connection prefetches (NBD_CMD_CACHE) the
whole disk from start to end, skipping ahead of the client's reads (``scan-ahead=``,
``scan-clock=``, ``scan-forever=``, ``scan-size=``).  It only works for the default export,
with a plugin that caches natively, under the parallel thread model; otherwise it says so."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import CacheMode, Handle, PluginError, StartupError, ThreadModel
from luanbd.filters.params import bool_parameter, size_parameter
from luanbd.filters.readahead import background_cache


class _Conn:
    __slots__ = ("commands", "thread")

    def __init__(self) -> None:
        #: Offsets the client has read up to; None ends the thread.
        self.commands: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None


class Filter(Backend):
    name = "scan"
    config_help = (
        "scan-ahead=false         Skip ahead when client reads faster.\n"
        "scan-clock=false         Always start prefetching from beginning.\n"
        "scan-forever=true        Scan in a loop while clients connected.\n"
        "scan-size=NN             Set scan block size.")

    def __init__(self) -> None:
        self.ahead = True
        self.use_clock = True
        self.forever = False
        self.size = 2 * 1024 * 1024
        # Where the scans have got to, shared by the connections (as nbdkit's).
        self._clock_lock = threading.Lock()
        self._clock = 0

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "scan-ahead":
            self.ahead = bool_parameter(value)
        elif key == "scan-clock":
            self.use_clock = bool_parameter(value)
        elif key == "scan-forever":
            self.forever = bool_parameter(value)
        elif key == "scan-size":
            # nbdkit keeps it in an unsigned int.
            self.size = size_parameter(key, value) & 0xFFFFFFFF
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        size = self.size
        if size < 512 or size > 32 * 1024 * 1024 or size & (size - 1):
            raise StartupError("scan-size parameter should be [512..32M] and a power of two")
        next()

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        h = _Conn()
        try:
            self._prepare(next, h)
        except BaseException:
            next.close()
            raise
        return h

    def _prepare(self, next: Context, h: _Conn) -> None:
        info = current.connection()
        if info is not None and info.export_name:
            log.error("scan: warning: not the default export, not scanning")
            return
        if self.chain_thread_model is not ThreadModel.PARALLEL:
            log.error("scan: warning: underlying plugin does not support "
                      "the PARALLEL thread model, not scanning")
            return
        if next.can_cache() is not CacheMode.NATIVE:
            log.error("scan: warning: underlying plugin does not support "
                      "NBD_CMD_CACHE, not scanning; try adding --filter=cache "
                      "after this filter")
            return
        h.thread = threading.Thread(target=self._scan, args=(next, h, info), name="scan",
                                    daemon=True)
        h.thread.start()

    def close(self, next: Context, h: Handle) -> None:
        if h.thread is not None:
            h.commands.put(None)
            h.thread.join()
        next.close()

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        if self.ahead and h.thread is not None:
            h.commands.put(offset + count)
        return next.pread(count, offset, flags)

    # --- the background thread -----------------------------------------------------------
    def _start(self) -> int:
        with self._clock_lock:
            return self._clock if self.use_clock else 0

    def _scan(self, next: Context, h: _Conn, info: current.ConnectionInfo | None) -> None:
        current.set_connection(info)
        try:
            size = next.get_size()
        except PluginError:
            return  # nothing to do without the size
        while True:
            offset = self._start()
            while offset < size:
                while True:  # the commands so far
                    try:
                        cmd = h.commands.get_nowait()
                    except queue.Empty:
                        break
                    if cmd is None:
                        log.debug("scan: exiting background thread on connection close")
                        return
                    offset = max(offset, cmd)
                with self._clock_lock:
                    self._clock = max(self._clock, offset)
                if offset < size:
                    background_cache(next, min(self.size, size - offset), offset)
                offset += self.size
            if not self.forever:
                break
            with self._clock_lock:
                self._clock = 0
        log.debug("scan: finished scanning the plugin")
