"""nbdkit-rate-filter(1): limit the bandwidth of reads and writes, for the whole server
(``rate=``) and per connection (``connection-rate=``), in bits per second; the limits can be
changed while serving by files read before each request (``rate-file=``,
``connection-rate-file=``); ``burstiness=`` is the bucket size in seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.helpers import absolute_path, parse_size
from luanbd.backend.interface import Handle, StartupError
from luanbd.filters.error import _FLOAT, _c_double
from luanbd.filters.params import size_parameter


class Bucket:
    """A token bucket (nbdkit's bucket.c): tokens (bits) come in at ``rate`` per second up
    to ``capacity``; a request takes its bits out, or sleeps until they would be there."""

    def __init__(self, rate: int, capacity_secs: float) -> None:
        self.lock = threading.Lock()
        self.rate = rate
        self.capacity_secs = capacity_secs
        self.capacity = int(rate * capacity_secs)
        self.level = self.capacity  # buckets start full
        self.last = time.monotonic()

    def adjust_rate(self, rate: int) -> int:
        old = self.rate
        self.rate = rate
        self.capacity = int(rate * self.capacity_secs)
        self.level = min(self.level, self.capacity)
        return old

    def run(self, bits: int) -> tuple[int, float]:
        """Take ``bits``: (bits still missing, seconds to sleep for them)."""
        if self.rate == 0:  # no limit
            return 0, 0.0
        now = time.monotonic()
        usec = max(0, int((now - self.last) * 1_000_000))
        add = min(self.rate * usec // 1_000_000, self.capacity - self.level)
        self.level += add
        self.last = now
        if self.level >= bits:
            self.level -= bits
            return 0, 0.0
        bits -= self.level
        self.level = 0
        return bits, bits / self.rate

    def take(self, bits: int) -> None:
        while bits > 0:
            with self.lock:
                bits, seconds = self.run(bits)
            if bits > 0:
                current.nanosleep(seconds, "rate")


def _read_rate(path: str | None, bucket: Bucket) -> None:
    """The first line of a rate file, if there is one, is the bucket's new rate."""
    if path is None:
        return
    try:
        with open(path, errors="surrogateescape") as f:
            line = f.readline()
    except OSError:
        return  # no file (or unreadable) is not an error
    if not line:
        log.debug(f"could not read rate file: {path}")
        return  # empty: nothing to read, not an error either
    if line.endswith("\n"):
        line = line[:-1]
    try:
        rate = parse_size(line)
    except ValueError as err:
        log.error(str(err))  # nbdkit_parse_size logs, and the rate stays as it was
        return
    with bucket.lock:
        old = bucket.adjust_rate(rate)
    if old != rate:
        log.debug(f"rate adjusted from {old} to {rate}")


def _absolute(value: str) -> str:
    """nbdkit_absolute_path, a start-up error when it fails."""
    try:
        return absolute_path(value)
    except ValueError as err:
        raise StartupError(str(err)) from None


class _Conn:
    __slots__ = ("read", "write")

    def __init__(self, rate: int, capacity: float) -> None:
        self.read = Bucket(rate, capacity)
        self.write = Bucket(rate, capacity)


class Filter(Backend):
    name = "rate"
    config_help = (
        "rate=BITSPERSEC                Limit total bandwidth.\n"
        "connection-rate=BITSPERSEC     Limit per-connection bandwidth.\n"
        "rate-file=FILENAME             Dynamically adjust total bandwidth.\n"
        "connection-rate-file=FILENAME  Dynamically adjust per-connection bandwidth.")

    def __init__(self) -> None:
        self.rate = 0
        self.connection_rate = 0
        self.rate_file: str | None = None
        self.connection_rate_file: str | None = None
        self.capacity = 2.0
        self.read = Bucket(0, 0.0)
        self.write = Bucket(0, 0.0)

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key in ("rate", "connection-rate"):
            attr = key.replace("-", "_")
            if getattr(self, attr) > 0:
                raise StartupError(f"{key} set twice on the command line")
            rate = size_parameter(key, value)
            if rate == 0:
                raise StartupError(f"{key} cannot be set to 0")
            setattr(self, attr, rate)
        elif key == "rate-file":
            self.rate_file = _absolute(value)
        elif key == "connection-rate-file":
            self.connection_rate_file = _absolute(value)
        elif key == "burstiness":
            m = _FLOAT.match(value)  # sscanf("%lg"): what follows the number is ignored
            if m is None:
                raise StartupError("burstiness must be a floating point number (seconds)")
            self.capacity = _c_double(m.group(1))
        else:
            next(key, value)

    def get_ready(self) -> None:
        self.read = Bucket(self.rate, self.capacity)
        self.write = Bucket(self.rate, self.capacity)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        return _Conn(self.connection_rate, self.capacity)

    def _limit(self, shared: Bucket, own: Bucket, count: int) -> None:
        # Bytes are counted as bits (nbdkit does not add framing either).
        _read_rate(self.rate_file, shared)
        shared.take(count * 8)
        _read_rate(self.connection_rate_file, own)
        own.take(count * 8)

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        self._limit(self.read, h.read, count)
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._limit(self.write, h.write, len(buf))
        next.pwrite(buf, offset, flags)
