"""LUKSv1 for the luks filter (nbdkit 1.32's luks-encryption.c, in Python): the header and
its checks, the cipher strings, and unlocking a key slot with the passphrase (PBKDF2, the
anti-forensic merge, the master key digest).

What nbdkit 1.32 supports, and so this: AES-128/256 in XTS mode and AES-128/192/256 in CBC
mode, IVs ``plain`` and ``plain64``, hashes md5, sha1, sha224, sha256, sha384, sha512 and
ripemd160.  ESSIV, ECB, CTR and other ciphers are refused with nbdkit's messages (their
wording names GnuTLS, nbdkit's crypto library, as nbdkit's does).  AES is the
``cryptography`` package's (luks_cipher.py), PBKDF2 and the hashes hashlib's.  Where a key
slot's material does not end on a sector (AES-192-CBC's 24 x 4000 bytes) its last piece is
decrypted too (in CBC the same bytes as cryptsetup's decryption of that whole sector);
nbdkit 1.32 leaves it encrypted, so it can never open such a slot.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from luanbd import log
from luanbd.backend.interface import PluginError
from luanbd.filters.luks_cipher import SECTOR, SectorCipher

MAGIC = b"LUKS\xba\xbe"
DIGEST_SIZE = 20
NUM_KEYS = 8
KEY_DISABLED = 0x0000DEAD
KEY_ENABLED = 0x00AC71F3
ALIGN_KEYSLOTS = 4096

#: The header (592 bytes, big-endian), without its 8 key slots of 48 bytes each.
_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_KEYSLOT = struct.Struct(">II32sII")
HEADER_SIZE = _PHDR.size + NUM_KEYS * _KEYSLOT.size
assert HEADER_SIZE == 592

#: The hash names of LUKS (hashlib knows them by the same names).
HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
MODES = ("ecb", "cbc", "xts", "ctr")
IVGENS = ("plain", "plain64")
#: (cipher algorithm, mode) pairs nbdkit 1.32 can use (GnuTLS has no AES-192-XTS).
SUPPORTED = {("aes-128", "xts"), ("aes-256", "xts"),
             ("aes-128", "cbc"), ("aes-192", "cbc"), ("aes-256", "cbc")}


def fail(message: str) -> PluginError:
    """A connection that cannot be opened: nbdkit's message alone on the log line."""
    return PluginError("open", message, bare=True)


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass
class KeySlot:
    active: int
    iterations: int
    salt: bytes
    offset: int
    stripes: int

    def sectors(self, key_len: int) -> int:
        """Length of the key material in sectors (as qemu and nbdkit compute it)."""
        n = -(-key_len * self.stripes // SECTOR)
        align = ALIGN_KEYSLOTS // SECTOR
        return -(-n // align) * align


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a),
                                                                              "little")


def _af_hash(hash_name: str, block: bytes) -> bytes:
    """The diffusion of the AF merge: each digest-sized piece i hashed with be32(i)."""
    size = hashlib.new(hash_name).digest_size
    out = []
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        out.append(hashlib.new(hash_name, struct.pack(">I", i // size) + piece)
                   .digest()[:len(piece)])
    return b"".join(out)


def af_merge(hash_name: str, stripes: int, material: bytes, key_len: int) -> bytes:
    """The anti-forensic merge: ``stripes`` pieces of ``key_len`` bytes -> one key."""
    block = bytes(key_len)
    for i in range(stripes - 1):
        block = _af_hash(hash_name, _xor(material[i * key_len:(i + 1) * key_len], block))
    return _xor(material[(stripes - 1) * key_len:stripes * key_len], block)


class Header:
    """A LUKSv1 header read from the disk and checked as nbdkit's load_header does."""

    def __init__(self, raw: bytes, size: int) -> None:
        fields = _PHDR.unpack_from(raw)
        (magic, self.version, cipher_name, cipher_mode, hash_spec, self.payload_offset,
         self.key_len, self.mk_digest, self.mk_salt, self.mk_iterations, uuid) = fields
        if magic != MAGIC:
            raise fail("this disk does not contain a LUKS header")
        if self.version != 1:
            raise fail(f"this disk contains a LUKS version {self.version} header, "
                       "but this filter only supports LUKSv1")
        self.slots = [KeySlot(*_KEYSLOT.unpack_from(raw, _PHDR.size + i * _KEYSLOT.size))
                      for i in range(NUM_KEYS)]
        self.cipher_name, self.cipher_mode = _cstr(cipher_name), _cstr(cipher_mode)
        self.hash_spec, self.uuid = _cstr(hash_spec), _cstr(uuid)
        self._check(size)
        self._parse_ciphers()

    def _check(self, size: int) -> None:
        if self.payload_offset >= size // SECTOR:
            raise fail("bad LUKSv1 header: payload offset points beyond the end of the disk")
        if self.mk_iterations == 0:
            raise fail("bad LUKSv1 header: master key iterations is 0")
        if self.key_len > 1024:
            raise fail("bad LUKSv1 header: master key is too long")
        for i, ks in enumerate(self.slots):
            if ks.active == KEY_ENABLED:
                if not ks.stripes:
                    raise fail(f"bad LUKSv1 header: key slot {i} is corrupted")
                if ks.stripes >= 10000:
                    raise fail(f"bad LUKSv1 header: key slot {i} stripes too large")
                if ks.iterations == 0:
                    raise fail(f"bad LUKSv1 header: key slot {i} iterations is 0")
                length = ks.sectors(self.key_len)
                if length > 4096:
                    raise fail(f"bad LUKSv1 header: key slot {i} key material length "
                               "is too large")
                if ks.offset * SECTOR >= size or (ks.offset + length) * SECTOR >= size:
                    raise fail(f"bad LUKSv1 header: key slot {i} key material offset "
                               "points beyond the end of the disk")
            elif ks.active != KEY_DISABLED:
                raise fail(f"bad LUKSv1 header: key slot {i} has an invalid active flag")

    def _parse_ciphers(self) -> None:
        """``cipher_mode`` is ``MODE-IVGEN[:IVHASH]``; each part checked in nbdkit's
        order, with its messages."""
        log.debug(f"LUKS v{self.version} cipher: {self.cipher_name} mode: "
                  f"{self.cipher_mode} hash: {self.hash_spec} master key: "
                  f"{self.key_len * 8} bits")
        mode, dash, ivgen = self.cipher_mode.partition("-")
        if not dash:
            raise fail("incorrect cipher_mode header, expecting mode-ivgenerator but got "
                       f'"{self.cipher_mode}"')
        ivgen, colon, ivhash = ivgen.partition(":")
        if colon:
            _check_hash(ivhash)
        if mode not in MODES:
            raise fail(f'unknown cipher mode: {mode} (expecting "ecb", "cbc", "xts" or '
                       '"ctr")')
        key_bytes = self.key_len // 2 if mode == "xts" else self.key_len
        if self.cipher_name != "aes" or key_bytes not in (16, 24, 32):
            raise fail(f'unknown cipher algorithm: {self.cipher_name} (expecting "aes", '
                       'etc)')
        algorithm = f"aes-{key_bytes * 8}"
        _check_hash(self.hash_spec)
        if ivgen not in IVGENS:
            raise fail(f'unknown IV generation algorithm: {ivgen} (expecting "plain", '
                       '"plain64" etc)')
        log.debug(f"LUKS parsed ciphers: {algorithm} {mode} {self.hash_spec} {ivgen} "
                  f"{ivhash if colon else 'unknown'} {algorithm}")
        if (algorithm, mode) not in SUPPORTED:
            raise fail(f"cipher algorithm {algorithm} in mode {mode} is not supported by "
                       "GnuTLS")
        self.mode, self.ivgen = mode, ivgen

    def cipher(self, key: bytes) -> SectorCipher:
        return SectorCipher(key, self.mode, self.ivgen)

    def try_slot(self, ks: KeySlot, encrypted: bytes, passphrase: bytes) -> bytes | None:
        """The master key if ``passphrase`` unlocks key slot ``ks``, whose key material on
        the disk is ``encrypted``; else None."""
        slot_key = _pbkdf2(self.hash_spec, passphrase, ks.salt, ks.iterations,
                           self.key_len)
        try:
            material = self.cipher(slot_key).decrypt(encrypted, 0)
        except ValueError as err:  # a key OpenSSL refuses (XTS with equal halves)
            raise fail(f"{self.mode}: {err}") from None
        candidate = af_merge(self.hash_spec, ks.stripes, material, self.key_len)
        digest = _pbkdf2(self.hash_spec, candidate, self.mk_salt, self.mk_iterations,
                         DIGEST_SIZE)
        return candidate if hmac.compare_digest(digest, self.mk_digest) else None


def _check_hash(name: str) -> None:
    if name not in HASHES:
        raise fail(f'unknown hash algorithm: {name} (expecting "md5", "sha1", "sha224", '
                   'etc)')


def _pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    try:
        return hashlib.pbkdf2_hmac(hash_name, secret, salt, iterations, length)
    except (ValueError, OverflowError) as err:  # a hash this OpenSSL lacks
        raise fail(f"pbkdf2: {err}") from None


#: How many unlocked disks a filter remembers.
CACHED = 16


def load_header(read: Callable[[int, int], bytes], size: int, passphrase: bytes,
                unlocked: dict[bytes, bytes]) -> tuple[Header, SectorCipher]:
    """nbdkit's load_header: read and check the header of a disk of ``size`` bytes, then
    unlock a key slot; the header and the payload's cipher.  ``read(count, offset)``
    reads the disk.

    ``unlocked`` maps what was read (the header and every active slot's key material, as a
    digest) to the master key it gave: with the same passphrase the same bytes give the
    same key, so a connection to a disk already unlocked skips the PBKDF2 (seconds with
    qemu's and cryptsetup's defaults; nbdkit pays them on every connection)."""
    if size < 16384:
        raise fail("disk is too small to be LUKS-encrypted")
    raw = read(HEADER_SIZE, 0)
    header = Header(raw, size)
    log.debug(f"LUKS UUID: {header.uuid}")
    material: list[bytes] = []
    for i, ks in enumerate(header.slots):
        if ks.active == KEY_ENABLED:
            log.debug(f"LUKS key slot {i}: key material in sectors {ks.offset}.."
                      f"{ks.offset + ks.sectors(header.key_len) - 1}")
            material.append(read(header.key_len * ks.stripes, ks.offset * SECTOR))
        else:
            material.append(b"")
    fingerprint = hashlib.sha256(raw + b"".join(material)).digest()
    key = unlocked.get(fingerprint)
    if key is None:
        for ks, encrypted in zip(header.slots, material, strict=True):
            if ks.active == KEY_ENABLED:
                key = header.try_slot(ks, encrypted, passphrase)
                if key is not None:
                    break
        else:
            raise fail("LUKS passphrase is not correct, no key slot could be unlocked")
        if len(unlocked) >= CACHED:
            del unlocked[next(iter(unlocked))]
        unlocked[fingerprint] = key
    log.debug("LUKS unlocked block device with passphrase")
    return header, header.cipher(key)
