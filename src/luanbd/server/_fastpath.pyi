"""Types of the compiled request loop (_fastpath.c)."""

from luanbd.protocol.transmission import PlainRequests
from luanbd.server.compiled import CompiledLoop

def serve(loop: CompiledLoop, buf: bytearray, pos: int, end: int,
          send_lock: object) -> tuple[int, int, bool]: ...
def admits(plain: PlainRequests, cmd: int, flags: int, offset: int, length: int) -> bool: ...
