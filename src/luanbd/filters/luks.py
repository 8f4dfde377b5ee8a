"""nbdkit-luks-filter(1) (nbdkit 1.32): read and write a LUKSv1-encrypted disk.

``passphrase=SECRET``, ``passphrase=+FILE`` (its first line), ``passphrase=-FD`` (the first
line read from file descriptor FD, which is then closed) or ``passphrase=-`` (asked on the
terminal, without echo: only when stdin is a tty), read as nbdkit_read_password does, with
its messages.  Each connection reads the header and unlocks a key slot when it opens (as
nbdkit's .prepare), so a wrong passphrase fails the connection, not the start-up; the
master key of a disk already unlocked is remembered (nbdkit runs PBKDF2 on every
connection).  The export is the payload, decrypted: its size is the disk's less the
payload offset; reads and writes are encrypted by 512-byte sectors (luks_cipher.py), a
write that covers part of a sector reading the rest of it first.  Trim and extents are
not offered, zeroes are written as encrypted zeroes, cache requests are reads.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.context import ZERO_EMULATION_CHUNK
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    CacheMode,
    FastZeroRefused,
    Handle,
    PluginError,
    StartupError,
    ZeroMode,
)
from luanbd.backend.password import read_password
from luanbd.filters.luks_cipher import SECTOR, SectorCipher
from luanbd.filters.luks_header import load_header


class _Disk:
    """One connection's unlocked disk: where the payload starts, its cipher, and where the
    last whole sector of the disk ends."""

    __slots__ = ("cipher", "end", "offset")

    def __init__(self, offset: int, cipher: SectorCipher, size: int) -> None:
        self.offset = offset
        self.cipher = cipher
        self.end = size - size % SECTOR

    def check(self, call: str, end_sector: int) -> None:
        """A sector cut short by the end of the disk cannot be decrypted (nbdkit 1.32 reads
        past the plugin's end there, and aborts)."""
        if self.offset + end_sector * SECTOR > self.end:
            raise PluginError(call, "the disk ends inside this sector of the LUKS payload "
                              "(its size is not a multiple of 512)", errno.EIO, bare=True)


class Filter(Backend):
    name = "luks"
    config_help = "passphrase=<SECRET>      Secret passphrase."

    def __init__(self) -> None:
        self.passphrase: bytes | None = None
        #: Read-modify-write cycles of partly written sectors never overlap (nbdkit's lock).
        self.rmw = threading.Lock()
        #: The master keys of the disks unlocked so far (luks_header.load_header).
        self.unlocked: dict[bytes, bytes] = {}

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "passphrase":
            self.passphrase = read_password(value)
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        if self.passphrase is None:
            raise StartupError('LUKS "passphrase" parameter is missing')
        next()

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        assert self.passphrase is not None

        def read(count: int, offset: int) -> bytes:
            return bytes(next.pread(count, offset, 0))

        size = next.get_size()
        header, cipher = load_header(read, size, self.passphrase, self.unlocked)
        return _Disk(header.payload_offset * SECTOR, cipher, size)

    def get_size(self, next: Context, h: Handle) -> int:
        disk: _Disk = h
        size = next.get_size()
        if size < disk.offset:
            raise PluginError("get_size", "disk too small, or contains an incomplete LUKS "
                              "partition", bare=True)
        return size - disk.offset

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        sizes = next.block_size()
        if sizes is None or sizes[0] == 0:
            return (SECTOR, SECTOR, 0xFFFFFFFF)
        minimum = max(sizes[0], SECTOR)
        return (minimum, max(minimum, sizes[1], SECTOR), sizes[2])

    def can_trim(self, next: Context, h: Handle) -> bool:
        return False

    def can_extents(self, next: Context, h: Handle) -> bool:
        return False

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        return ZeroMode.EMULATE

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return False

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        return CacheMode.EMULATE

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        first = offset // SECTOR
        end = -(-(offset + count) // SECTOR)
        h.check("pread", end)
        data = next.pread((end - first) * SECTOR, h.offset + first * SECTOR, flags)
        skip = offset - first * SECTOR
        plain: bytes = h.cipher.decrypt(data, first)
        return plain[skip:skip + count]

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        first = offset // SECTOR
        end = -(-(offset + len(buf)) // SECTOR)
        h.check("pwrite", end)
        where = h.offset + first * SECTOR
        head = offset - first * SECTOR
        tail = end * SECTOR - offset - len(buf)
        if not head and not tail:
            next.pwrite(h.cipher.encrypt(buf, first), where, flags)
            return
        with self.rmw:
            plain = bytearray((end - first) * SECTOR)
            if head:
                plain[:SECTOR] = h.cipher.decrypt(next.pread(SECTOR, where, 0), first)
            if tail and (end - first > 1 or not head):
                last = where + len(plain) - SECTOR
                plain[-SECTOR:] = h.cipher.decrypt(next.pread(SECTOR, last, 0), end - 1)
            plain[head:head + len(buf)] = buf
            next.pwrite(h.cipher.encrypt(plain, first), where, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        # nbdkit emulates a zero at this layer: encrypted zeroes, through this pwrite.
        if flags & FLAG_FAST_ZERO:
            raise FastZeroRefused
        while count:
            chunk = min(count, ZERO_EMULATION_CHUNK)
            self.pwrite(next, h, bytes(chunk), offset, flags & FLAG_FUA)
            offset += chunk
            count -= chunk
