"""The sector cipher of the luks filter: AES-XTS or AES-CBC, each 512-byte sector with the
IV ``plain`` (the sector number's low 32 bits, little-endian) or ``plain64`` (64 bits).

A cipher context per sector costs more than the AES itself, so whole requests are done
with a few AES-ECB calls over every sector at once, and the per-sector chaining in big
integers, where each 16-byte block is a 128-bit lane:

- XTS (IEEE 1619, no ciphertext stealing: 512 is a multiple of 16): block j of sector s is
  ``E1(P xor T) xor T`` with ``T = E2(iv(s)) * alpha**j`` in GF(2^128); multiplying every
  sector's T by alpha is one shift of the integer of all lanes, the carries out of each
  lane folded back in as 0x87.
- CBC: decryption is ``D(C) xor (the previous block, the IV for block 0)`` over the whole
  buffer; encryption chains, so it goes block j of every sector at a time (32 steps).

A piece shorter than a sector (only key material can end with one) goes through the
``cryptography`` package's own XTS/CBC modes, which the tests compare with this.
"""

from __future__ import annotations

import functools
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECTOR = 512
BLOCK = 16
BLOCKS = SECTOR // BLOCK


#: Blocks split apart by one struct call at most.
_GROUP = 4096


@functools.lru_cache(maxsize=64)
def _splitter(n: int) -> struct.Struct:
    return struct.Struct("16s" * n)


def _split(data: bytes) -> list[bytes]:
    """``data`` as its 16-byte blocks."""
    out: list[bytes] = []
    whole = _splitter(_GROUP)
    size = _GROUP * BLOCK
    for pos in range(0, len(data), size):
        piece = data[pos:pos + size]
        out += (whole if len(piece) == size else _splitter(len(piece) // BLOCK)).unpack(piece)
    return out


@functools.lru_cache(maxsize=64)
def _top_bits(n: int) -> int:
    """Bit 127 of each of ``n`` lanes."""
    return int.from_bytes(b"\0" * 15 + b"\x80", "little") * int.from_bytes(
        (b"\1" + b"\0" * 15) * n, "little")


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def _interleave(columns: list[bytes], n: int) -> bytes:
    """``columns[j]`` holds block j of each of ``n`` sectors: the sectors in order."""
    blocks: list[bytes] = [b""] * (n * BLOCKS)
    for j, column in enumerate(columns):
        blocks[j::BLOCKS] = _split(column)
    return b"".join(blocks)


class SectorCipher:
    """Encrypts and decrypts whole sectors starting at a given sector number."""

    def __init__(self, key: bytes, mode: str, ivgen: str) -> None:
        self.xts = mode == "xts"
        self.key = key
        self.iv_mask = (1 << (32 if ivgen == "plain" else 64)) - 1
        half = len(key) // 2
        self.ecb1 = Cipher(algorithms.AES(key[:half] if self.xts else key), modes.ECB())
        self.ecb2 = Cipher(algorithms.AES(key[half:]), modes.ECB()) if self.xts else None

    def _ivs(self, sector: int, n: int) -> bytes:
        mask = self.iv_mask
        return b"".join(((sector + i) & mask).to_bytes(BLOCK, "little") for i in range(n))

    def _tweaks(self, sector: int, n: int) -> bytes:
        """XTS: the tweak of every block of ``n`` sectors, in the data's order."""
        assert self.ecb2 is not None
        lanes = int.from_bytes(self.ecb2.encryptor().update(self._ivs(sector, n)), "little")
        top = _top_bits(n)
        columns = []
        for _ in range(BLOCKS):
            columns.append(lanes.to_bytes(n * BLOCK, "little"))
            carry = lanes & top
            lanes = ((lanes ^ carry) << 1) ^ ((carry >> 127) * 0x87)
        return _interleave(columns, n)

    def _cbc_encrypt(self, data: bytes, sector: int, n: int) -> bytes:
        blocks = _split(data)
        ecb = self.ecb1.encryptor()
        previous = self._ivs(sector, n)
        columns = []
        for j in range(BLOCKS):
            previous = ecb.update(_xor(b"".join(blocks[j::BLOCKS]), previous))
            columns.append(previous)
        return _interleave(columns, n)

    def _cbc_decrypt(self, data: bytes, sector: int, n: int) -> bytes:
        ivs = self._ivs(sector, n)
        chained = b"".join(part for s in range(n) for part in (
            ivs[s * BLOCK:(s + 1) * BLOCK], data[s * SECTOR:(s + 1) * SECTOR - BLOCK]))
        return _xor(self.ecb1.decryptor().update(data), chained)

    def _whole(self, data: bytes, sector: int, decrypt: bool) -> bytes:
        n = len(data) // SECTOR
        if self.xts:
            tweaks = self._tweaks(sector, n)
            ecb = self.ecb1.decryptor() if decrypt else self.ecb1.encryptor()
            return _xor(ecb.update(_xor(data, tweaks)), tweaks)
        if decrypt:
            return self._cbc_decrypt(data, sector, n)
        return self._cbc_encrypt(data, sector, n)

    def one_by_one(self, data: bytes, sector: int, decrypt: bool) -> bytes:
        """The same with the ``cryptography`` package's XTS or CBC mode, a sector (or the
        shorter piece at the end) at a time."""
        aes = algorithms.AES(self.key)
        out = []
        for pos in range(0, len(data), SECTOR):
            iv = ((sector + pos // SECTOR) & self.iv_mask).to_bytes(BLOCK, "little")
            cipher = Cipher(aes, modes.XTS(iv) if self.xts else modes.CBC(iv))
            ctx = cipher.decryptor() if decrypt else cipher.encryptor()
            out.append(ctx.update(data[pos:pos + SECTOR]) + ctx.finalize())
        return b"".join(out)

    def _run(self, data: bytes | bytearray | memoryview, sector: int, decrypt: bool) -> bytes:
        raw = bytes(data)
        whole = len(raw) - len(raw) % SECTOR
        out = self._whole(raw[:whole], sector, decrypt) if whole else b""
        if whole < len(raw):
            out += self.one_by_one(raw[whole:], sector + whole // SECTOR, decrypt)
        return out

    def decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        """``data`` (whole sectors; the last may be shorter) starting at ``sector``."""
        return self._run(data, sector, True)

    def encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        return self._run(data, sector, False)
