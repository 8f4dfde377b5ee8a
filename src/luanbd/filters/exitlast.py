"""nbdkit-exitlast-filter(1): the server shuts down when the last client connection
closes (counted from handles opened, as nbdkit's)."""

from __future__ import annotations

import threading

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle


class Filter(Backend):
    name = "exitlast"
    config_help = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        with self._lock:
            self.connections += 1
        return None

    def close(self, next: Context, h: Handle) -> None:
        with self._lock:
            self.connections -= 1
            last = self.connections == 0
        if last:
            log.debug("exitlast: exiting on last client connection")
            current.request_shutdown()
        next.close()
