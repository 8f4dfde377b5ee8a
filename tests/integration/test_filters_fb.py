"""blocksize, blocksize-policy, cacheextents, checkwrite, exitlast, exitwhen against
nbdkit's: the same ramdisk.lua behind the same ``--filter``, observed through libnbd (size,
capabilities, block size, data, errno, and with ``trace=1`` every call the plugin got)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import (  # noqa: E402
    LUANBD,
    NBDKIT,
    Observation,
    Session,
    diff_observations,
    nbdkit_available,
    observe,
)
from test_filters import SIZE, exercise  # noqa: E402

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

KiB = 1024


def block_sizes(s: Session, h: nbd.NBD) -> None:
    s.record("block_size", [h.get_block_size(k) for k in
                            (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)])


def unaligned(s: Session) -> None:
    """Requests off any block boundary (libnbd's strict mode off, so that the server
    gets them as sent)."""
    h = s.connect(strict=0)
    s.probe(h)
    block_sizes(s, h)
    size = h.get_size()
    for seed, (count, offset) in enumerate([(100, 3), (1000, 511), (5000, 4000),
                                            (512, 1024), (3, 70000), (9000, 8192)], 1):
        s.write(h, seed, count, offset)
    for count, offset in [(100, 3), (1, 0), (2000, 500), (9000, 8190), (513, 1023),
                          (300, size - 300), (10, size - 5)]:
        s.read(h, count, offset)
    if h.can_zero():
        s.op("zero 700@300", h.zero, 700, 300)
        s.op("zero 4096@8192", h.zero, 4096, 8192)
        s.op("fast zero 700@300", h.zero, 700, 300, nbd.CMD_FLAG_FAST_ZERO)
        s.op("fast zero 4096@8192", h.zero, 4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
        s.read(h, 2000, 0)
    if h.can_trim():
        s.op("trim 3000@100", h.trim, 3000, 100)
    if h.can_fua():
        s.write(h, 20, 700, 50, nbd.CMD_FLAG_FUA)
        s.read(h, 1000, 0)
    if h.can_cache():
        s.op("cache 100@10", h.cache, 100, 10)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        s.block_status(h, 5000, 77)
    s.disconnect(h)


def both(args: tuple[str, ...], filters: tuple[str, ...],
         client: Callable[[Session], None] = exercise) -> tuple[Observation, Observation]:
    options = tuple(f"--filter={f}" for f in filters)
    obs = [observe(server, "ramdisk.lua", args, options=options, client=client)
           for server in (NBDKIT, LUANBD)]
    return obs[0], obs[1]


def assert_same(filters: tuple[str, ...], args: tuple[str, ...],
                client: Callable[[Session], None] = exercise) -> Observation:
    expected, got = both((f"size={SIZE}", *args), filters, client)
    assert not expected.timed_out and not got.timed_out
    assert expected == got, diff_observations(expected, got)
    return got


# ----------------------------------------------------------------------------- blocksize
BLOCKSIZE = [
    (("blocksize",), ()),
    (("blocksize",), ("minblock=512",)),
    (("blocksize",), ("minblock=4K", "maxdata=8K")),
    (("blocksize",), ("minblock=1K", "maxdata=2K", "maxlen=3K")),
    (("blocksize",), ("maxdata=1000", "trace=1")),
    (("blocksize",), ("minblock=512", "maxdata=1K", "maxlen=2K", "trace=1")),
    (("blocksize", "truncate"), ("minblock=4K", "truncate=1000003")),
]


@pytest.mark.parametrize(("filters", "args"), BLOCKSIZE,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in BLOCKSIZE])
def test_blocksize_same_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    assert_same(filters, args, exercise)
    assert_same(filters, args, unaligned)


def test_blocksize_figures() -> None:
    got = assert_same(("blocksize", "truncate"), ("minblock=4K", "truncate=1000003"),
                      unaligned)
    assert got.size == 1000003 // 4096 * 4096
    assert got.extra["block_size"] == [1, 4096, 0xFFFFFFFF]
    got = assert_same(("blocksize",), ("minblock=512", "maxdata=1K", "maxlen=2K", "trace=1"),
                      unaligned)
    # The plugin sees whole blocks only: the write of 100 bytes at 3 is a read-modify-write.
    assert "trace: pread count=512 offset=0 (integer, integer)" in got.log
    assert all("count=100 " not in line for line in got.log)


# ---------------------------------------------------------------------- blocksize-policy
POLICY = [
    (("blocksize-policy",), ()),
    (("blocksize-policy",), ("blocksize-preferred=64K",)),
    (("blocksize-policy",), ("blocksize-minimum=512", "blocksize-error-policy=error")),
    (("blocksize-policy",), ("blocksize-minimum=4K", "blocksize-maximum=8K",
                             "blocksize-error-policy=error", "trace=1")),
    (("blocksize-policy",), ("blocksize-minimum=1K", "blocksize-preferred=2K",
                             "blocksize-maximum=1M", "blocksize-error-policy=allow")),
    (("blocksize-policy",), ("blocksize-minimum=512", "blocksize-preferred=4K",
                             "blocksize-maximum=4K", "blocksize-error-policy=error")),
    # Only a minimum above the default preferred 4096: the handshake fails, as nbdkit's.
    (("blocksize-policy",), ("blocksize-minimum=8K",)),
    # The man page's stack: the client is told 64K, the plugin sees only 64K blocks.
    (("blocksize-policy", "blocksize"), ("blocksize-error-policy=allow",
                                         "blocksize-minimum=64K", "minblock=64K", "trace=1")),
    (("blocksize", "blocksize-policy"), ("minblock=512", "blocksize-minimum=512",
                                         "blocksize-error-policy=error")),
]


@pytest.mark.parametrize(("filters", "args"), POLICY,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in POLICY])
def test_blocksize_policy_same_as_nbdkit(filters: tuple[str, ...],
                                         args: tuple[str, ...]) -> None:
    assert_same(filters, args, exercise)
    assert_same(filters, args, unaligned)


def test_blocksize_policy_figures() -> None:
    got = assert_same(("blocksize-policy",), ("blocksize-minimum=4K", "blocksize-maximum=8K",
                                              "blocksize-error-policy=error"), unaligned)
    assert got.extra["block_size"] == [4096, 4096, 8192]
    assert got.outcome("write#1 100@3") == "EINVAL"
    assert "client pwrite request rejected: count 100 is smaller than minimum size 4096" \
        in got.log
    got = assert_same(("blocksize-policy",), ("blocksize-preferred=64K",), unaligned)
    assert got.extra["block_size"] == [1, 65536, 0xFFFFFFFF]


BAD = [
    (("blocksize",), ("minblock=3",)),
    (("blocksize",), ("minblock=128K",)),
    (("blocksize",), ("minblock=0",)),
    (("blocksize",), ("maxdata=5G",)),
    (("blocksize",), ("minblock=512", "maxdata=1000")),
    (("blocksize",), ("minblock=512", "maxlen=1000")),
    (("blocksize",), ("maxlen=x",)),
    (("blocksize-policy",), ("blocksize-minimum=3",)),
    (("blocksize-policy",), ("blocksize-minimum=128K",)),
    (("blocksize-policy",), ("blocksize-minimum=x",)),
    (("blocksize-policy",), ("blocksize-maximum=5G",)),
    (("blocksize-policy",), ("blocksize-preferred=256",)),
    (("blocksize-policy",), ("blocksize-preferred=3000",)),
    (("blocksize-policy",), ("blocksize-minimum=8K", "blocksize-preferred=4K")),
    (("blocksize-policy",), ("blocksize-preferred=64K", "blocksize-maximum=32K")),
    (("blocksize-policy",), ("blocksize-error-policy=maybe",)),
    # Not a parameter of nbdkit 1.32's filter: it reaches the script.
    (("blocksize-policy",), ("blocksize-write-disconnect=1M",)),
]


@pytest.mark.parametrize(("filters", "args"), BAD,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in BAD])
def test_bad_parameters_fail_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), filters)
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1 or expected.connect_error is not None
