"""nbdkit-tls-fallback-filter(1) (nbdkit 1.32): plaintext clients get a harmless export.

For a connection without TLS the plugin is never opened: the client's export name is
ignored and it sees one read-only export of 512 bytes holding ``tlsreadme=MESSAGE``
(default: nbdkit's message), padded with NUL bytes.  TLS connections pass through.  The
filter refuses to start under the serialize_connections thread model (a plaintext client
could hold the only connection).
"""

from __future__ import annotations

from collections.abc import Callable

from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    CacheMode,
    FuaMode,
    Handle,
    StartupError,
    ThreadModel,
    ZeroMode,
)

MESSAGE = "This NBD server requires TLS authentication before it will serve useful data.\n"
SIZE = 512


class _NotTLS:
    """The handle of a plaintext connection (nbdkit's NOT_TLS)."""


NOT_TLS = _NotTLS()


def _is_tls() -> bool:
    info = current.connection()
    return info is not None and info.is_tls


class Filter(Backend):
    name = "tls-fallback"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = "tlsreadme=<MESSAGE>  Alternative contents for the plaintext dummy export."

    def __init__(self) -> None:
        self.message = MESSAGE.encode()

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "tlsreadme":
            self.message = value.encode()
        else:
            next(key, value)

    def get_ready(self) -> None:
        if self.chain_thread_model == ThreadModel.SERIALIZE_CONNECTIONS:
            raise StartupError("the tls-fallback filter requires parallel connection support")

    # --- before a handle exists ---------------------------------------------------------
    def list_exports(self, next: Context, readonly: bool,
                     is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        if not is_tls:
            return [(b"", None)]
        return next.list_exports(readonly, is_tls)

    def default_export(self, next: Context, readonly: bool, is_tls: bool) -> bytes | None:
        if not is_tls:
            return b""
        return next.default_export(readonly, is_tls)

    def open(self, next: Context, readonly: bool) -> Handle:
        if not _is_tls():
            return NOT_TLS  # the plugin is never opened for a plaintext client
        next.open(readonly)
        return None

    def close(self, next: Context, h: Handle) -> None:
        if h is not NOT_TLS:
            next.close()

    # --- the dummy export -----------------------------------------------------------------
    def get_size(self, next: Context, h: Handle) -> int:
        return SIZE if h is NOT_TLS else next.get_size()

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        return None if h is NOT_TLS else next.block_size()

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        return None if h is NOT_TLS else next.export_description()

    def can_write(self, next: Context, h: Handle) -> bool:
        return False if h is NOT_TLS else next.can_write()

    def can_flush(self, next: Context, h: Handle) -> bool:
        return False if h is NOT_TLS else next.can_flush()

    def is_rotational(self, next: Context, h: Handle) -> bool:
        return False if h is NOT_TLS else next.is_rotational()

    def can_trim(self, next: Context, h: Handle) -> bool:
        return False if h is NOT_TLS else next.can_trim()

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        return ZeroMode.NONE if h is NOT_TLS else next.can_zero()

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return False if h is NOT_TLS else next.can_fast_zero()

    def can_extents(self, next: Context, h: Handle) -> bool:
        return False if h is NOT_TLS else next.can_extents()

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        return FuaMode.NONE if h is NOT_TLS else next.can_fua()

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        return False if h is NOT_TLS else next.can_multi_conn()

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        return CacheMode.NONE if h is NOT_TLS else next.can_cache()

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        if h is not NOT_TLS:
            return next.pread(count, offset, flags)
        data = self.message[offset:offset + count]
        return data + bytes(count - len(data))
