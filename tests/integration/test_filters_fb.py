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


def unaligned(s: Session, *, fast: bool = True) -> None:
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
        if fast:
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


def unaligned_slow(s: Session) -> None:
    """:func:`unaligned` without fast zeroes (nbdkit 1.32's checkwrite filter frees an
    uninitialised pointer when it refuses one, and dies)."""
    unaligned(s, fast=False)


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
    (("checkwrite",), ("fail=open",)),
    (("cacheextents",), ("fail=config",)),
    (("exitwhen",), ("exit-when-pipe-closed=x",)),
    (("exitwhen",), ("exit-when-pipe-closed=2147483648",)),
    (("exitwhen",), ("exit-when-fd-closed=12abc",)),
    (("exitwhen",), ("exit-when-process-exits=-1",)),
    (("exitwhen",), ("exit-when-pid-exits=999999999",)),
    (("exitwhen",), ("exit-when-poll=x",)),
    (("exitwhen",), ("exit-when-poll=-3",)),
    (("exitlast",), ("fail=config_complete",)),
]


@pytest.mark.parametrize(("filters", "args"), BAD,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in BAD])
def test_bad_parameters_fail_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), filters)
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1 or expected.connect_error is not None


# ------------------------------------------------------------------------------ checkwrite
HALF = SIZE // 2


def checks(s: Session) -> None:
    """Writes that match what the plugin holds and writes that do not."""
    h = s.connect(strict=0)
    s.probe(h)
    for label, buf, offset in [("same", bytes(range(256)) * 16, 0),
                               ("same-unaligned", bytes(range(10, 250)), 10),
                               ("zeroes-in-tail", bytes(4096), HALF + 4096),
                               ("other", b"x" * 512, 0),
                               ("zeroes-in-head", bytes(512), 0)]:
        s.op(f"write {label}", h.pwrite, buf, offset)
    s.op("write fua", h.pwrite, bytes(range(256)), 256, nbd.CMD_FLAG_FUA)
    for label, count, offset in [("tail", 8192, HALF), ("head", 8192, 0),
                                 ("across", 8192, HALF - 4096), ("one byte", 1, 0)]:
        s.op(f"zero {label}", h.zero, count, offset)
        s.op(f"trim {label}", h.trim, count, offset)
    s.op("flush", h.flush)
    s.read(h, 4096, 1000)
    s.disconnect(h)


def both_script(script: str, args: tuple[str, ...], filters: tuple[str, ...],
                client: Callable[[Session], None]) -> Observation:
    options = tuple(f"--filter={f}" for f in filters)
    expected, got = (observe(server, script, args, options=options, client=client)
                     for server in (NBDKIT, LUANBD))
    assert not expected.timed_out and not got.timed_out
    assert expected == got, diff_observations(expected, got)
    return got


@pytest.mark.parametrize("client", [exercise, unaligned_slow, checks])
def test_checkwrite_over_zeroes_same_as_nbdkit(client: Callable[[Session], None]) -> None:
    assert_same(("checkwrite",), ("trace=1",), client)


@pytest.mark.parametrize("client", [exercise, checks])
def test_checkwrite_over_a_pattern_same_as_nbdkit(client: Callable[[Session], None]) -> None:
    got = both_script("pattern.lua", (f"size={SIZE}",), ("checkwrite",), client)
    if client is checks:
        assert got.outcome("write same") == "ok"
        assert got.outcome("write other") == "EIO"
        assert got.outcome("zero tail") == "ok"
        assert got.outcome("zero head") == "EIO"
        assert "data written does not match expected" in got.log
        assert got.caps["can_fua"] and got.caps["can_multi_conn"]
        assert not got.caps["is_read_only"]


def test_checkwrite_stacked_same_as_nbdkit() -> None:
    both_script("pattern.lua", (f"size={SIZE}", "offset=1000", "minblock=512"),
                ("checkwrite", "blocksize", "offset"), checks)


# ---------------------------------------------------------------------------- cacheextents
@pytest.mark.parametrize("client", [exercise, unaligned])
def test_cacheextents_same_as_nbdkit(client: Callable[[Session], None]) -> None:
    assert_same(("cacheextents",), ("trace=1",), client)
    assert_same(("cacheextents", "truncate"), ("truncate=600000",), client)


class _Next:
    """A next layer that answers extents from a table and counts the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def extents(self, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        self.calls.append((count, offset, flags))
        table = [(0, 4096, 0), (4096, 8192, 3), (12288, 4096, 0)]
        return [e for e in table if e[0] + e[1] > offset]

    def pwrite(self, buf: bytes, offset: int, flags: int) -> None:
        pass

    def zero(self, count: int, offset: int, flags: int) -> None:
        pass


def test_cacheextents_answers_from_its_cache() -> None:
    from luanbd.backend.interface import FLAG_REQ_ONE
    from luanbd.filters import create

    layer, nxt = create("cacheextents"), _Next()
    first = layer.extents(nxt, None, 16384, 0, FLAG_REQ_ONE)  # type: ignore[arg-type]
    assert nxt.calls == [(16384, 0, 0)]  # REQ_ONE is dropped: as much as the plugin has
    assert first == [(0, 4096, 0), (4096, 8192, 3), (12288, 4096, 0)]
    # Inside the cached range: no call, the cached extents from the offset on.
    assert layer.extents(nxt, None, 100, 5000, 0) == [(5000, 7288, 3),  # type: ignore[arg-type]
                                                       (12288, 4096, 0)]
    assert len(nxt.calls) == 1
    layer.pwrite(nxt, None, b"x", 0, 0)  # type: ignore[arg-type]
    layer.extents(nxt, None, 100, 5000, 0)  # type: ignore[arg-type]
    assert nxt.calls[1:] == [(100, 5000, 0)]  # a write forgot the cache
    layer.extents(nxt, None, 10, 20000, 0)  # type: ignore[arg-type]
    assert len(nxt.calls) == 3  # past the cached range: asked again


def test_checkwrite_refuses_fast_zeroes_and_lives_on() -> None:
    """No oracle here: nbdkit 1.32 dies on this (see unaligned_slow)."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.op("fast zero", h.zero, 4096, HALF, nbd.CMD_FLAG_FAST_ZERO)
        s.op("zero", h.zero, 4096, HALF)
        s.read(h, 16, 0)

    got = observe(LUANBD, "pattern.lua", (f"size={SIZE}",), options=("--filter=checkwrite",),
                  client=client)
    assert got.ops == [("fast zero", "ENOTSUP"), ("zero", "ok"),
                       ("read 16@0", got.outcome("read 16@0"))]
    assert got.outcome("read 16@0").startswith("data n=16")
    assert got.stop_code == 0


# ------------------------------------------------------------------------ exitlast, exitwhen
def _alive(s: Session, wait: float = 0.5) -> bool:
    """Still running after ``wait`` seconds?"""
    return s.wait_exit(wait) is None


def last_one_out(s: Session) -> None:
    """Two clients; the server lives on while one is connected and ends after the last."""
    a = s.connect_and_probe()
    b = s.connect()
    s.read(a, 512, 0)
    s.disconnect(a)
    s.record("alive after the first left", _alive(s))
    s.read(b, 512, 0)
    s.disconnect(b)
    s.record("exit status after the last left", s.wait_exit(10))


def test_exitlast_same_as_nbdkit() -> None:
    got = assert_same(("exitlast",), ("trace=1",), last_one_out)
    assert got.extra["alive after the first left"] is True
    assert got.extra["exit status after the last left"] == 0


def test_exitlast_no_client_no_exit() -> None:
    def client(s: Session) -> None:
        s.record("alive", _alive(s, 1.0))
        h = s.connect_and_probe()
        s.disconnect(h)
        s.record("exit status", s.wait_exit(10))

    got = assert_same(("exitlast", "offset"), ("offset=4K",), client)
    assert got.extra == {"alive": True, "exit status": 0, "structured_replies": True}


def _when(event: str, name: str) -> Callable[[Session], None]:
    """A client around ``event`` (create or delete the file ``name`` in the server's
    directory): connected while it happens, the server waits for it to leave."""
    def client(s: Session) -> None:
        flag = s.tmp / name
        a = s.connect_and_probe()
        if event == "create":
            flag.write_text("x")
        else:
            flag.unlink()
        s.read(a, 512, 0)
        s.record("alive while connected", _alive(s, 1.5))
        s.disconnect(a)
        s.record("exit status", s.wait_exit(10))

    return client


@pytest.mark.parametrize(("key", "event", "name"),
                         [("exit-when-file-created", "create", "flag"),
                          # The script itself (copied into the server's directory).
                          ("exit-when-file-deleted", "delete", "ramdisk.lua")])
def test_exitwhen_file_same_as_nbdkit(key: str, event: str, name: str) -> None:
    got = assert_same(("exitwhen",), (f"{key}={name}", "exit-when-poll=1", "trace=1"),
                      _when(event, name))
    assert got.extra["alive while connected"] is True
    assert got.extra["exit status"] == 0


def test_exitwhen_polls_without_clients_same_as_nbdkit() -> None:
    def client(s: Session) -> None:
        s.record("alive", _alive(s, 1.0))
        (s.tmp / "flag").write_text("x")
        s.record("exit status", s.wait_exit(10))

    got = assert_same(("exitwhen",), ("exit-when-file-created=flag", "exit-when-poll=1"),
                      client)
    assert got.extra == {"alive": True, "exit status": 0}


def test_exitwhen_refuses_new_clients_once_exiting_same_as_nbdkit() -> None:
    def client(s: Session) -> None:
        a = s.connect_and_probe()
        (s.tmp / "flag").write_text("x")
        try:
            s.connect()
        except Exception as err:  # ConnectFailed, recorded by connect
            s.record("second", type(err).__name__)
        s.disconnect(a)
        s.record("exit status", s.wait_exit(10))

    got = assert_same(("exitwhen",), ("exit-when-file-created=flag", "exit-when-poll=1"),
                      client)
    assert got.extra["exit status"] == 0
    assert "exitwhen: SERVER is exiting: rejecting new connection" in got.log


def test_exitwhen_event_before_serving_same_as_nbdkit() -> None:
    expected, got = (observe(server, "ramdisk.lua",
                             (f"size={SIZE}", "exit-when-file-deleted=nothing-here"),
                             options=("--filter=exitwhen",)) for server in (NBDKIT, LUANBD))
    assert expected == got, diff_observations(expected, got)
    assert got.exit_code == 0


def test_exitwhen_script_same_as_nbdkit() -> None:
    def client(s: Session) -> None:
        s.record("alive", _alive(s, 1.5))
        (s.tmp / "flag").write_text("x")
        s.record("exit status", s.wait_exit(10))

    script = "test -e flag && exit 88; exit 3"
    got = assert_same(("exitwhen",), (f"exit-when-script={script}", "exit-when-poll=1"),
                      client)
    assert got.extra == {"alive": True, "exit status": 0}
    assert "exit-when-script: command failed with exit code 3" in got.log


def test_exitwhen_process_exits_same_as_nbdkit() -> None:
    import subprocess

    obs = []
    for server in (NBDKIT, LUANBD):
        watched = subprocess.Popen(["sleep", "60"])
        try:
            def client(s: Session, watched: subprocess.Popen[bytes] = watched) -> None:
                s.record("alive", _alive(s, 1.0))
                watched.kill()
                watched.wait()
                s.record("exit status", s.wait_exit(10))

            obs.append(observe(server, "ramdisk.lua",
                               (f"size={SIZE}", f"exit-when-process-exits={watched.pid}",
                                "exit-when-poll=1"),
                               options=("--filter=exitwhen",), client=client))
        finally:
            watched.kill()
            watched.wait()
    assert obs[0] == obs[1], diff_observations(obs[0], obs[1])
    assert obs[1].extra == {"alive": True, "exit status": 0}


def test_blocksize_aligns_extents() -> None:
    """No oracle (nbdkit 1.32's Lua plugin has no extents): nbdkit_extents_aligned's rule,
    a block cut by an extent boundary has only the types all its pieces share."""
    from luanbd.filters.blocksize import _aligned_extents as aligned

    assert aligned([(0, 100, 3), (100, 900, 0), (1000, 3096, 3)], 0, 4096, 512) == [
        (0, 1024, 0), (1024, 3072, 3)]
    assert aligned([(0, 4096, 3)], 0, 4096, 512) == [(0, 4096, 3)]
    assert aligned([(0, 700, 3), (700, 300, 3), (1000, 100, 3)], 0, 1536, 512) == [
        (0, 1024, 3)]  # the partial last block is left for the next request
    assert aligned([(0, 100, 3)], 0, 512, 512) == [(0, 512, 0)]  # less than a block: data


def test_exitwhen_sees_a_closed_pipe() -> None:
    """No differential run: the test servers do not inherit a pipe."""
    import os

    from luanbd.filters.exitwhen import _FdClosed

    r, w = os.pipe()
    try:
        event = _FdClosed(r)
        assert not event.happened()
        os.close(w)
        assert event.happened()
    finally:
        os.close(r)
