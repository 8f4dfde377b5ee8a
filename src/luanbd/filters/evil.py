"""nbdkit-evil-filter(1) (nbdkit 1.36, newer than the 1.32 the other filters follow):
corrupt data as it is read (writes are untouched, so the plugin keeps the right data).

``evil=cosmic-rays`` flips random bits (a different set on every read); ``evil=stuck-bits``
(the default) sticks fixed bits of the disk high or low, the same ones on every read of the
same place; ``evil=stuck-wires`` sticks fixed bit positions of every request, wherever it
reads.  ``evil-probability=P`` (``0.001``, ``1e-6``, ``1:1000000``, ``1/10``, ``1%``; default
1e-8, or 1e-6 for stuck-wires) is the chance of each bit being corrupted;
``evil-stuck-probability=P`` (default 1) the chance that a stuck bit reads as stuck;
``evil-seed=N`` makes runs repeatable (default: the start time).  As nbdkit's: a probability
under 1e-12 corrupts nothing and one over 1/8 corrupts every bit, the corrupt bits are found
with nbdkit's xoshiro256** generator (random.h) jumping by up to 2/P bits at a time, so the
same seed corrupts the same bits as nbdkit 1.36+ does, and cosmic-rays serializes requests
(one global generator).  As the manual page says, sparse parts of the plugin (extents
it reports as holes) are left as they are: combine with noextents to corrupt those too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from luanbd import log
from luanbd.backend import helpers
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import EXTENT_HOLE, Handle, PluginError, StartupError, ThreadModel
from luanbd.filters.params import parse_number

EPSILON = 1e-12
MAXP = 1.0 / 8.0
MASK64 = (1 << 64) - 1
MODES = {"cosmic-rays": "cosmic-rays", "cosmic": "cosmic-rays",
         "stuck-bits": "stuck-bits", "stuck-bit": "stuck-bits", "stuck": "stuck-bits",
         "stuck-wires": "stuck-wires", "stuck-wire": "stuck-wires"}


def parse_probability(what: str, value: str) -> float:
    """nbdkit_parse_probability (backend/helpers.py), as a start-up error."""
    try:
        return helpers.parse_probability(what, value)
    except ValueError as err:
        raise StartupError(str(err)) from None


class Random:
    """nbdkit's random.h: xoshiro256** seeded by splitmix64."""

    __slots__ = ("s",)

    def __init__(self, seed: int) -> None:
        seed &= MASK64
        s = []
        for _ in range(4):
            seed = (seed + 0x9E3779B97F4A7C15) & MASK64
            z = seed
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
            s.append(z ^ (z >> 31))
        self.s = s

    def next(self) -> int:
        s = self.s
        x = (s[1] * 5) & MASK64
        result = ((((x << 7) | (x >> 57)) & MASK64) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = ((s[3] << 45) | (s[3] >> 19)) & MASK64
        return result


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class Filter(Backend):
    name = "evil"
    config_help = ("evil=cosmic-rays|stuck-bits|stuck-wires\n"
                   "                               Set the mode (default: stuck-bits).\n"
                   "evil-probability=PROB          Probability of flipped or stuck bit.\n"
                   "evil-seed=SEED                 Random number seed.\n"
                   "evil-stuck-probability=PROB    Probability of stuck bit being stuck.")

    def __init__(self) -> None:
        self.mode = "stuck-bits"
        self.probability = -1.0
        self.stuck_probability = 1.0
        self.seed = int(time.time()) & 0xFFFFFFFF
        self.blksize = 1024 * 1024
        self.state = Random(self.seed)

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key in ("evil", "evil-mode"):
            if value not in MODES:
                raise StartupError(f"evil: unknown mode: {value}")
            self.mode = MODES[value]
        elif key in ("evil-probability", "evil-stuck-probability"):
            p = parse_probability(key, value)
            if p > 1:
                raise StartupError(f"{key}: probability out of range, should be [0..1]")
            if key == "evil-probability":
                self.probability = p
            else:
                self.stuck_probability = p
        elif key == "evil-seed":
            self.seed = parse_number("evil-seed", value)
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        if self.probability < 0:
            self.probability = 1e-6 if self.mode == "stuck-wires" else 1e-8
        next()

    @property
    def thread_model(self) -> ThreadModel:
        # cosmic-rays draws from one generator for every request.
        if self.mode == "cosmic-rays":
            return ThreadModel.SERIALIZE_REQUESTS
        return ThreadModel.PARALLEL

    def get_ready(self) -> None:
        self.state = Random(self.seed)
        p = self.probability
        if EPSILON <= p <= MAXP:
            self.blksize = next_power_of_2(int(int(100.0 / p) / 8))
        log.debug(f"evil: mode: {self.mode}, P: {p:g}, seed: {self.seed}")
        log.debug(f"evil: block_size: {self.blksize} "
                  f"(2**{self.blksize.bit_length() - 1})")

    # --- corruption -----------------------------------------------------------------------
    def _one_bit(self, byte: int, bit: int, rand: int, stuck: bool) -> int:
        mask = 1 << bit
        if not stuck:
            return byte ^ mask
        rand &= 0xFFFFFFFF
        if self.stuck_probability * 0x100000000 > rand:
            return byte | mask if rand & 1 else byte & ~mask
        return byte

    def _corrupt(self, buf: bytearray, start: int, count: int, offset_in_block: int,
                 *, rs: Random, stuck: bool) -> None:
        """Corrupt ``buf[start:start+count]``, which is at ``offset_in_block`` of a block
        whose corrupt bits ``rs`` chooses from the block's start."""
        p = self.probability
        if p < EPSILON:
            return
        if p > MAXP:
            for i in range(start, start + count):
                b = buf[i]
                for bit in range(8):
                    b = self._one_bit(b, bit, rs.next(), stuck)
                buf[i] = b
            return
        invp2 = int(2.0 / p)
        end = offset_in_block + count
        offs = 0
        while offs < end:
            intvl = rs.next() % invp2
            rand = rs.next()  # always two draws per step, as nbdkit
            offs += intvl // 8
            if offs >= end:
                break
            if offs >= offset_in_block:
                i = start + offs - offset_in_block
                buf[i] = self._one_bit(buf[i], intvl & 7, rand, stuck)

    @staticmethod
    def _holes(next: Context, count: int, offset: int) -> list[tuple[int, int]]:
        """The sparse parts of the request, as (start, end) in the buffer."""
        if not next.can_extents():
            return []
        try:
            got = next.extents(count, offset, 0)
        except PluginError:
            return []  # corrupt it all rather than fail the read
        end = offset + count
        return [(max(start, offset) - offset, min(start + length, end) - offset)
                for start, length, kind in got
                if kind & EXTENT_HOLE and start < end and start + length > offset]

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        data = next.pread(count, offset, flags)
        if self.probability < EPSILON:
            return data
        holes = self._holes(next, count, offset)
        buf = bytearray(data)
        self._corrupt_read(buf, count, offset)
        for start, stop in holes:
            buf[start:stop] = data[start:stop]
        return memoryview(buf)

    def _corrupt_read(self, buf: bytearray, count: int, offset: int) -> None:
        if self.mode == "cosmic-rays":
            self._corrupt(buf, 0, count, 0, rs=self.state, stuck=False)
        elif self.mode == "stuck-wires":
            self._corrupt(buf, 0, count, 0, rs=Random(self.seed), stuck=True)
        else:
            bs = self.blksize
            bstart = offset & ~(bs - 1)
            pos = 0
            while pos < count:
                n = min(count - pos, bstart + bs - offset)
                self._corrupt(buf, pos, n, offset - bstart, rs=Random(self.seed + bstart),
                              stuck=True)
                bstart += bs
                offset += n
                pos += n
