"""LUANBD_GC_TRACE=FILE: every garbage collection pause, Python's and Lua's full ones, as a
line of FILE (``python-gen2 0.000412`` / ``lua-full 0.001630``: kind, seconds), so that the
latency bench (bench/latency.py) can tell whether a collector is behind a tail-latency spike.

Off unless the variable is set; then each pause costs a clock read and a short write.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any, TextIO

_out: TextIO | None = None
_lock = threading.Lock()
_started: dict[int, float] = {}


def enabled() -> bool:
    return _out is not None


def record(kind: str, seconds: float) -> None:
    out = _out
    if out is not None:
        with _lock:
            out.write(f"{kind} {seconds:.6f}\n")


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    me = threading.get_ident()
    if phase == "start":
        _started[me] = time.perf_counter()
    elif me in _started:
        record(f"python-gen{info.get('generation', '?')}",
               time.perf_counter() - _started.pop(me))


def install_from_env() -> None:
    """Start tracing if LUANBD_GC_TRACE names a file (appended to, line-buffered)."""
    global _out
    path = os.environ.get("LUANBD_GC_TRACE")
    if not path or _out is not None:
        return
    try:
        _out = open(path, "a", buffering=1)  # noqa: SIM115 (kept for the process's life)
    except OSError:
        return
    gc.callbacks.append(_on_gc)
