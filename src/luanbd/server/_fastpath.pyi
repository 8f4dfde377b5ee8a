"""Types of the compiled request loop (_fastpath.c)."""

from typing import Any

FAST_MAX: int

def serve(setup: tuple[Any, ...], buf: bytearray, pos: int, end: int,
          send_lock: Any) -> tuple[int, int, bool]: ...
