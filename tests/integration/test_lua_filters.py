"""Lua filters (``--filter=./f.lua``): the examples in examples/filters/ against nbdkit's C
filters of the same purpose, through the same client, and stacks mixing them.

nbdkit runs ``--filter=offset``, luanbd ``--filter=./offset.lua`` (the example copied next
to the plugin).  Everything the client sees must be equal.  The servers' logs differ in one
way by design: a Lua filter's error is logged in the plugin's shape, with the callback's
name first (``get_size: offset+range ...``), so log lines are compared with that name
removed from luanbd's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

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

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILTERS = EXAMPLES / "filters"
KiB = 1024
SIZE = 1024 * KiB
# A Lua filter's error line names its callback and, for an nbdkit.* helper's error, the
# script's line (file.lua:N:), which a C filter's cannot: both are taken off to compare.
_CALLBACK = re.compile(r"^(?:(?:get_size|open|prepare|pread|pwrite|trim|zero|flush|cache|"
                       r"extents|config|config_complete|block_size): )?(?:\./\w+\.lua:\d+: )?")


def _luanbd_option(f: str) -> str:
    return f"--filter=./{f}.lua" if (FILTERS / f"{f}.lua").exists() else f"--filter={f}"


def both(args: tuple[str, ...], lua: tuple[str, ...], client: Callable[[Session], None],
         *, builtin: tuple[str, ...] | None = None,
         script: str = "ramdisk.lua") -> tuple[Observation, Observation]:
    """nbdkit with the C filters ``builtin`` (default: the same names), luanbd with the Lua
    examples named in ``lua`` (names without an example are built-in filters)."""
    files = [str(FILTERS / f"{f}.lua") for f in lua if (FILTERS / f"{f}.lua").exists()]
    expected = observe(NBDKIT, script, args, client=client, files=files,
                       options=tuple(f"--filter={f}" for f in (builtin or lua)))
    got = observe(LUANBD, script, args, client=client, files=files,
                  options=tuple(_luanbd_option(f) for f in lua))
    got.log = [_CALLBACK.sub("", line) for line in got.log]
    if got.startup_error:
        got.startup_error = "\n".join(_CALLBACK.sub("", line)
                                      for line in got.startup_error.splitlines())
    return expected, got


def assert_same(expected: Observation, got: Observation) -> None:
    assert not expected.timed_out and not got.timed_out
    assert expected == got, diff_observations(expected, got)


def _everything(s: Session) -> None:
    """Every kind of request, in and at the edges of the export."""
    h = s.connect_and_probe()
    size = h.get_size()
    s.write(h, 1, 8 * KiB, 0)
    s.write(h, 2, 512, size - 512)
    s.read(h, 16 * KiB, 0)
    s.read(h, 4 * KiB, size - 4 * KiB)
    s.op("write fua", h.pwrite, b"y" * 4096, 4096, nbd.CMD_FLAG_FUA)
    s.read(h, 4096, 4096)
    if h.can_zero():
        s.op("zero", h.zero, 4096, 0)
        s.op("zero no-hole", h.zero, 4096, 8192, nbd.CMD_FLAG_NO_HOLE)
        s.op("zero fua", h.zero, 512, 16 * KiB, nbd.CMD_FLAG_FUA)
        if h.can_fast_zero():
            s.op("zero fast", h.zero, 4096, 32 * KiB, nbd.CMD_FLAG_FAST_ZERO)
        s.read(h, 40 * KiB, 0)
    if h.can_trim():
        s.op("trim", h.trim, 8192, 64 * KiB)
    if h.can_flush():
        s.op("flush", h.flush)
    if h.can_cache():
        s.op("cache", h.cache, 4096, 0)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        s.block_status(h, size, 0)
        s.block_status(h, min(size, 64 * KiB), max(0, size - 64 * KiB))
        s.block_status(h, 64 * KiB, 0, nbd.CMD_FLAG_REQ_ONE)
    s.disconnect(h)


# --- offset ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [("offset=4096",), ("offset=64K", "range=256K"),
                                    ("range=512K",), ("offset=1M",)],
                         ids=["offset", "offset+range", "range", "empty"])
def test_offset_example_as_nbdkit(params: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *params), ("offset",), _everything)
    assert_same(expected, got)
    assert expected.size is not None


@pytest.mark.parametrize("params", [("offset=2M",), ("offset=512K", "range=768K"),
                                    ("offset=banana",)], ids=["past", "range-past", "bad"])
def test_offset_example_errors_as_nbdkit(params: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *params), ("offset",), _everything)
    assert_same(expected, got)
    assert expected.connect_error is not None or expected.exit_code == 1


# --- truncate -------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [("truncate=1536K",), ("truncate=256K",),
                                    ("truncate=1000001", "round-up=64K"),
                                    ("round-down=256K", "truncate=1000000"),
                                    ("truncate=1M",)],
                         ids=["grow", "shrink", "round-up", "round-down", "same"])
def test_truncate_example_as_nbdkit(params: tuple[str, ...]) -> None:
    def client(s: Session) -> None:
        _everything(s)
        h = s.connect_and_probe()
        if h.get_size() > SIZE:  # past the plugin: zeroes read, only zeroes written
            s.read(h, 8192, SIZE - 4096)
            s.op("zeroes past end", h.pwrite, bytes(4096), SIZE)
            s.write(h, 9, 4096, SIZE)
            s.op("zero past end", h.zero, 4096, SIZE + 8192)
            s.op("trim past end", h.trim, 4096, SIZE + 8192)
            s.block_status(h, 8192, SIZE)
        s.disconnect(h)

    expected, got = both((f"size={SIZE}", *params), ("truncate",), client)
    assert_same(expected, got)


@pytest.mark.parametrize("params", [("round-up=3",), ("round-down=0",), ("round-up=8G",)])
def test_truncate_example_errors_as_nbdkit(params: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *params), ("truncate",), _everything)
    assert expected.exit_code == 1
    assert_same(expected, got)


# --- nozero ---------------------------------------------------------------------------------

NOZERO = [(), ("zeromode=emulate",), ("zeromode=notrim",), ("zeromode=plugin",),
          ("zeromode=plugin", "fastzeromode=none"), ("zeromode=notrim", "fastzeromode=slow"),
          ("zeromode=plugin", "fastzeromode=ignore"), ("zeromode=emulate", "fastzeromode=ignore")]


@pytest.mark.parametrize("params", NOZERO, ids=["-".join(p) or "default" for p in NOZERO])
def test_nozero_example_as_nbdkit(params: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *params), ("nozero",), _everything)
    assert_same(expected, got)


def test_nozero_example_bad_mode_as_nbdkit() -> None:
    expected, got = both(("zeromode=bogus",), ("nozero",), _everything)
    assert expected.exit_code == 1
    assert_same(expected, got)


def test_nozero_example_prepare_refuses_without_zero() -> None:
    """zeromode=notrim over a layer without zero (the built-in nozero, whose default is
    none): prepare refuses the connection with nbdkit's message, and the server stays up.
    (nbdkit cannot show this with a Lua plugin, whose zero always exists.)"""
    def client(s: Session) -> None:
        for _ in range(2):
            try:
                s.connect()
            except Exception:
                pass
        assert s.proc.poll() is None

    got = observe(LUANBD, "ramdisk.lua", (f"size={SIZE}", "zeromode=notrim"),
                  options=("--filter=./nozero.lua", "--filter=nozero"), client=client,
                  files=[str(FILTERS / "nozero.lua")])
    assert got.connect_error is not None
    assert got.errors() == ["prepare: zeromode 'notrim' requires plugin zero support"] * 2


# --- error ----------------------------------------------------------------------------------

ERROR = [("error=ENOSPC", "error-rate=100%"), ("error-pread-rate=1", "error-pread=EPERM"),
         ("error-pwrite-rate=1", "error-zero-rate=1", "error=ESHUTDOWN"),
         ("error-extents-rate=100%",), ("error-rate=0",), ("error-trim-rate=1",)]


@pytest.mark.parametrize("params", ERROR, ids=["-".join(p) for p in ERROR])
def test_error_example_as_nbdkit(params: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *params), ("error",), _everything)
    assert_same(expected, got)


def test_error_example_trigger_file_as_nbdkit() -> None:
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.read(h, 512, 0)
        (s.tmp / "inject").write_text("")
        s.read(h, 512, 0)
        s.write(h, 3, 512, 0)
        (s.tmp / "inject").unlink()
        s.read(h, 512, 0)
        s.disconnect(h)

    expected, got = both((f"size={SIZE}", "error-rate=1", "error-file=inject",
                          "error-pwrite-rate=0"), ("error",), client)
    assert_same(expected, got)
    outcomes = [o for _, o in got.ops]
    assert outcomes[:3] == ["zeroes n=512", "EIO", "ok"] and outcomes[3].startswith("data")


@pytest.mark.parametrize("params", [("error=EBADF",), ("error-rate=2",), ("error-rate=x%",)])
def test_error_example_bad_parameters_as_nbdkit(params: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *params), ("error",), _everything)
    assert expected.exit_code == 1
    assert_same(expected, got)


# --- writelog against nbdkit's log filter ---------------------------------------------------

_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} ")
_WRITES = re.compile(r"^connection=\d+ (?:\.\.\.)?(?:Write|Trim|Zero|Flush) ")


def test_writelog_example_logs_writes_as_nbdkit_log() -> None:
    def client(s: Session) -> None:
        _everything(s)
        h = s.connect_and_probe()
        s.write(h, 5, 512, 0)
        s.op("flush 2", h.flush)
        s.disconnect(h)
        s.settle()
        lines = (s.tmp / "log.txt").read_text().splitlines()
        assert all(_STAMP.match(line) for line in lines), lines
        s.record("writes", [line for line in (_STAMP.sub("", x) for x in lines)
                            if _WRITES.match(line)])

    expected, got = both((f"size={SIZE}", "logfile=log.txt"), ("writelog",), client,
                         builtin=("log",))
    assert_same(expected, got)
    writes = got.extra["writes"]
    assert "connection=1 Write id=1 offset=0x0 count=0x2000 fua=0 ..." in writes
    assert writes[-1] == "connection=2 ...Flush id=2 return=0"


def test_writelog_example_logs_errors_as_nbdkit_log() -> None:
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.write(h, 1, 512, 0)            # past the truncated plugin: ENOSPC
        s.op("zeroes", h.pwrite, bytes(512), 4096)   # zeroes there are fine
        s.disconnect(h)
        s.settle()
        lines = (s.tmp / "log.txt").read_text().splitlines()
        s.record("writes", [x for x in (_STAMP.sub("", x) for x in lines) if _WRITES.match(x)])

    expected, got = both((f"size={SIZE}", "logfile=log.txt", "truncate=2M", "offset=1536K"),
                         ("writelog", "offset", "truncate"), client,
                         builtin=("log", "offset", "truncate"))
    assert_same(expected, got)
    assert got.extra["writes"][1:] == ["connection=1 ...Write id=1 return=-1 error=ENOSPC",
                                       "connection=1 Write id=2 offset=0x1000 count=0x200 "
                                       "fua=0 ...", "connection=1 ...Write id=2 return=0"]


# --- stacks: Lua examples with each other and with built-in filters -------------------------

STACKS = [("offset", "truncate"), ("truncate", "offset"), ("nozero", "offset"),
          ("offset", "nozero"), ("error", "truncate", "offset"),
          ("offset", "cow", "truncate"), ("truncate", "blocksize", "nozero", "offset")]


@pytest.mark.parametrize("stack", STACKS, ids=["+".join(s) for s in STACKS])
def test_stack_as_nbdkit(stack: tuple[str, ...]) -> None:
    params = {"offset": "offset=64K", "truncate": "truncate=1536K",
              "nozero": "zeromode=emulate", "error": "error-trim-rate=1",
              "blocksize": "minblock=4K"}
    args = tuple(params[f] for f in stack if f in params)
    expected, got = both((f"size={SIZE}", *args), stack, _everything)
    assert_same(expected, got)
