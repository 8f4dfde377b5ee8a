"""Built-in filters against nbdkit's: the same Lua script behind the same ``--filter`` stack
under ``nbdkit`` and ``luanbd``, observed through libnbd (size, capabilities, data after
writes, errno of failing requests, extents) and compared whole; bad parameters give the same
start-up error and exit status."""

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

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

KiB = 1024
MiB = 1024 * KiB
#: ramdisk.lua's disk in these tests.
SIZE = MiB


def exercise(s: Session) -> None:
    """Reads, writes and the other commands across the whole (filtered) disk, its last
    bytes and past its end."""
    h = s.connect_and_probe()
    size = h.get_size()
    for seed, (count, offset) in enumerate([(4 * KiB, 0), (512, 4096 + 100),
                                            (64 * KiB, 128 * KiB)], 1):
        if offset + count <= size:
            s.write(h, seed, count, offset)
    for count, offset in [(4 * KiB, 0), (8 * KiB, 0), (512, 4196), (64 * KiB, 128 * KiB),
                          (4 * KiB, size - 4 * KiB), (1, size - 1), (512, size - 256),
                          (4 * KiB, size)]:
        s.read(h, count, offset)
    s.write(h, 9, 512, max(size - 512, 0))
    s.read(h, 512, max(size - 512, 0))
    if h.can_zero():
        s.op(f"zero 8192@{size // 2}", h.zero, 8192, size // 2)
        s.read(h, 8192, size // 2)
    if h.can_trim():
        s.op("trim 4096@0", h.trim, 4096, 0)
    if h.can_flush():
        s.op("flush", h.flush)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        for count, offset in [(size, 0), (min(size, 64 * KiB), size - min(size, 64 * KiB))]:
            s.block_status(h, count, offset)
    s.disconnect(h)


def both(args: tuple[str, ...], filters: tuple[str, ...],
         client: Callable[[Session], None] = exercise) -> tuple[Observation, Observation]:
    options = tuple(f"--filter={f}" for f in filters)
    obs = [observe(server, "ramdisk.lua", args, options=options, client=client)
           for server in (NBDKIT, LUANBD)]
    return obs[0], obs[1]


def assert_same(filters: tuple[str, ...], args: tuple[str, ...]) -> Observation:
    expected, got = both(args, filters)
    assert not expected.timed_out and not got.timed_out
    assert expected == got, diff_observations(expected, got)
    return got


CASES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("nofilter",), ()),
    (("noextents",), ()),
    (("noparallel",), ("serialize=connections",)),
    (("noparallel",), ("serialize=all-requests",)),
    (("offset",), ("offset=4096",)),
    (("offset",), ("offset=64K", "range=256K")),
    (("offset",), ("range=1000",)),
    (("truncate",), ("truncate=600000",)),
    (("truncate",), ("truncate=3M",)),
    (("truncate",), ("truncate=1000", "round-up=512")),
    (("truncate",), ("truncate=1000001", "round-down=4K")),
    # Stacks, both orders: the first filter is nearest the client.
    (("offset", "truncate"), ("offset=4K", "truncate=2M")),
    (("truncate", "offset"), ("offset=4K", "truncate=2M")),
    (("noextents", "truncate", "offset", "nofilter"), ("offset=1000", "truncate=300K")),
]


@pytest.mark.parametrize(("filters", "args"), CASES,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in CASES])
def test_same_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    got = assert_same(filters, (f"size={SIZE}", *args))
    assert got.size is not None and got.connect_error is None


def test_the_filters_do_their_job() -> None:
    """Beyond agreeing with nbdkit: the figures themselves."""
    got = assert_same(("offset", "truncate"), (f"size={SIZE}", "offset=4K", "truncate=2M"))
    assert got.size == 2 * MiB - 4 * KiB  # truncate sees the plugin; offset sees truncate
    got = assert_same(("truncate",), (f"size={SIZE}", "truncate=1000", "round-up=512"))
    assert got.size == 1024
    # Past the plugin's end the disk takes only zeroes: ENOSPC, as nbdkit.
    got = assert_same(("truncate",), (f"size={SIZE}", "truncate=3M"))
    assert got.outcome(f"write#9 512@{3 * MiB - 512}") == "ENOSPC"


BAD = [
    (("offset",), ("offset=2M",)),
    (("offset",), ("offset=1M", "range=1")),
    (("offset",), ("offset=lots",)),
    (("truncate",), ("round-up=3",)),
    (("truncate",), ("round-down=0",)),
    (("noparallel",), ("serialize=sometimes",)),
]


@pytest.mark.parametrize(("filters", "args"), BAD,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in BAD])
def test_bad_parameters_fail_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), filters)
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1 or expected.connect_error is not None


def test_help_lists_the_filters_and_their_parameters() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "luanbd", "--filter=offset", "--help"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("Filters (--filter=NAME): ", 1)[1].split("\n", 1)[0]
    names = listed.split(", ")
    assert names == sorted(names)
    assert {"limit", "noextents", "nofilter", "noparallel", "offset"} <= set(names)
    assert "filter: offset\noffset=<OFFSET>" in out.stdout


def test_only_pass_through_filters_keep_the_compiled_loop() -> None:
    from differential import PLUGINS

    from luanbd.backend.chain import Chain
    from luanbd.filters import create
    from luanbd.lua.plugin import LuaPlugin

    plugin = LuaPlugin(str(PLUGINS / "ramdisk.lua"))
    assert Chain(plugin, [create("nofilter"), create("noparallel")]).compiled_calls() is plugin
    assert Chain(plugin, [create("nofilter"), create("offset")]).compiled_calls() is None
    assert Chain(plugin, [create("truncate")]).compiled_calls() is None
