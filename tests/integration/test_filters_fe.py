"""The log, stats, swab and protect filters against nbdkit's: the same client under both
servers, and the files the filters write compared line by line (timestamps and times
normalised)."""

from __future__ import annotations

import re
import time
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
SIZE = 1024 * KiB
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} ")


def _wait_for(path: str, s: Session, text: str, count: int = 1) -> str:
    deadline = time.monotonic() + 10
    file = s.tmp / path
    seen, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = file.read_text() if file.exists() else ""
        if now != seen:
            seen, since = now, time.monotonic()
        elif now.count(text) >= count and time.monotonic() - since > 0.3:
            break  # and unchanged for a while: the lines still on their way are in
        time.sleep(0.02)
    return seen or ""


def _log_lines(text: str) -> list[str]:
    lines = text.splitlines()
    for line in lines:
        assert _STAMP.match(line), line
    return [_STAMP.sub("", line) for line in lines]


def _requests(s: Session, h: nbd.NBD) -> None:
    s.write(h, 1, 4 * KiB, 0)
    s.write(h, 2, 512, 8 * KiB)
    s.read(h, 4 * KiB, 0)
    s.read(h, 1, SIZE - 1)
    s.op("write fua", h.pwrite, b"x" * 512, 4096, nbd.CMD_FLAG_FUA)
    if h.can_zero():
        s.op("zero", h.zero, 8192, 16 * KiB)
        s.op("zero may-trim", h.zero, 512, 0, nbd.CMD_FLAG_NO_HOLE)
    if h.can_trim():
        s.op("trim", h.trim, 4096, 64 * KiB)
    if h.can_flush():
        s.op("flush", h.flush)
    if h.can_cache():
        s.op("cache", h.cache, 4096, 0)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        s.block_status(h, SIZE, 0)
        s.block_status(h, 64 * KiB, 0, nbd.CMD_FLAG_REQ_ONE)


def both(args: tuple[str, ...], filters: tuple[str, ...], client: Callable[[Session], None],
         script: str = "ramdisk.lua") -> tuple[Observation, Observation]:
    options = tuple(f"--filter={f}" for f in filters)
    obs = [observe(server, script, args, options=options, client=client)
           for server in (NBDKIT, LUANBD)]
    return obs[0], obs[1]


# --- log -----------------------------------------------------------------------------------

def _log_client(s: Session) -> None:
    h = s.connect_and_probe()
    _requests(s, h)
    s.disconnect(h)
    h2 = s.connect_and_probe()
    s.read(h2, 512, 0)
    s.disconnect(h2)
    s.obs.extra["log"] = _log_lines(_wait_for("log.txt", s, "Disconnect", 2))


LOG_STACKS = [("log",), ("log", "offset"), ("offset", "log"), ("log", "truncate"),
              ("log", "nofilter")]


@pytest.mark.parametrize("filters", LOG_STACKS, ids=["+".join(f) for f in LOG_STACKS])
def test_log_file_as_nbdkit(filters: tuple[str, ...]) -> None:
    extra = {"offset": ("offset=4096",), "truncate": ("truncate=1536K",)}
    args = tuple(a for f in filters for a in extra.get(f, ()))
    expected, got = both((f"size={SIZE}", "logfile=log.txt", *args), filters, _log_client)
    assert expected.exit_code is None, expected.stderr
    assert expected == got, diff_observations(expected, got)
    log = got.extra["log"]
    assert log[0].startswith("Ready thread_model=")
    if "truncate" in filters:  # truncate answers extents: the list as nbdkit shows it
        assert 'connection=1 ...Extents id=10 extents=(0x0 0x100000 "") return=0' in log
    assert any(line.startswith("connection=1 Connect export=\"\"") for line in log)
    assert log[-1] == "connection=2 Disconnect transactions=1"


def _log_errors(s: Session) -> None:
    h = s.connect_and_probe()
    s.write(h, 1, 512, 0)          # past the truncated plugin: ENOSPC
    s.read(h, 512, 0)
    s.disconnect(h)
    s.obs.extra["log"] = _log_lines(_wait_for("log.txt", s, "Disconnect"))


def test_log_shows_errors_as_nbdkit() -> None:
    expected, got = both((f"size={SIZE}", "logfile=log.txt", "truncate=2M", "offset=1536K"),
                         ("log", "offset", "truncate"), _log_errors)
    assert expected == got, diff_observations(expected, got)
    assert any("return=-1 error=ENOSPC" in line for line in got.extra["log"])


def test_log_append() -> None:
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.disconnect(h)
        s.obs.extra["log"] = _log_lines(_wait_for("log.txt", s, "Disconnect"))

    for append in ("true", "false", "yes"):
        expected, got = both((f"size={SIZE}", "logfile=log.txt", f"logappend={append}"),
                             ("log",), client)
        assert expected == got, diff_observations(expected, got)
        assert got.extra["log"][0].startswith("Ready")


def test_log_script_as_nbdkit() -> None:
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.read(h, 512, 0)
        s.disconnect(h)
        # nbdkit's script runs may finish out of order: compare the lines, not the order.
        s.obs.extra["script"] = sorted(_wait_for("script.txt", s, "Disconnect").splitlines())

    expected, got = both(
        (f"size={SIZE}", "logscript=echo $type $act $connection $id $offset $return >> script.txt"),
        ("log",), client)
    assert expected == got, diff_observations(expected, got)
    assert "ENTER Read 1 1 0x0" in got.extra["script"]


def test_log_script_failing_as_nbdkit() -> None:
    """The script's exit status changes nothing, and is not logged."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.read(h, 512, 0)
        s.disconnect(h)
        s.settle()

    expected, got = both((f"size={SIZE}", "logscript=test $act != Read || exit 3"), ("log",),
                         client)
    assert expected == got, diff_observations(expected, got)
    assert got.ops == [("read 512@0", "zeroes n=512")], got.ops


BAD_LOG = [("logappend=maybe",), ("logfile=no/such/dir/log.txt",)]


@pytest.mark.parametrize("args", BAD_LOG, ids=[a[0] for a in BAD_LOG])
def test_log_bad_parameters_as_nbdkit(args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), ("log",), lambda s: None)
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1


# --- stats ---------------------------------------------------------------------------------

_TIME = re.compile(r"\d+\.\d{6} s")
_RATE = re.compile(r"(?:\d+(?:\.\d\d)? (?:bytes|KiB|MiB|GiB)|\(n/a\))/s")


def _stats_lines(text: str) -> list[str]:
    """The statistics with the times and rates (which differ from run to run) as T and R."""
    return [_RATE.sub("R/s", _TIME.sub("T s", line)) for line in text.splitlines()]


def _stats_client(s: Session) -> None:
    import signal

    h = s.connect_and_probe()
    # Bucket sizes with distinct counts (nbdkit shows one bucket per count).
    for i in range(6):
        s.read(h, 4 * KiB, i * 4 * KiB)
    for i in range(3):
        s.read(h, 512, 512 * i + 3 * 512)
    s.read(h, 64 * KiB, 128 * KiB)
    for i in range(4):
        s.write(h, i, 512, 1024 * i)
    s.write(h, 9, 8 * KiB, 24 * KiB)
    s.op("write tiny", h.pwrite, b"abc", 7)
    s.op("write fua", h.pwrite, bytes(1024), 2048, nbd.CMD_FLAG_FUA)
    if h.can_zero():
        s.op("zero fua", h.zero, 1024, 4096, nbd.CMD_FLAG_FUA)
        s.op("zero", h.zero, 8192, 16 * KiB)
    if h.can_trim():
        s.op("trim", h.trim, 4096, 64 * KiB)
        s.op("trim", h.trim, 4096, 72 * KiB)
    if h.can_flush():
        s.op("flush", h.flush)
    if h.can_cache():
        s.op("cache", h.cache, 4096, 0)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        s.block_status(h, 64 * KiB, 0)
        s.block_status(h, 4 * KiB, 8 * KiB)
    s.read(h, 512, SIZE * 4)  # refused by the server: not counted
    s.disconnect(h)
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)  # the statistics are written at exit
    s.proc.wait(10)
    path = s.tmp / "stats.txt"
    s.obs.extra["stats"] = _stats_lines(path.read_text() if path.exists() else "")


STATS = [(), ("statsthreshold=0",), ("statsthreshold=100",), ("statsthreshold=50",),
         ("statsappend=true",)]


@pytest.mark.parametrize("args", STATS, ids=[",".join(a) or "default" for a in STATS])
def test_stats_file_as_nbdkit(args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", "statsfile=stats.txt", *args), ("stats",),
                         _stats_client)
    assert expected.exit_code is None, expected.stderr
    assert expected == got, diff_observations(expected, got)
    stats = got.extra["stats"]
    assert stats[0].startswith("total: ")
    assert any(line.startswith("read: 10 ops, T s, 89.50 KiB") for line in stats), stats


@pytest.mark.parametrize("script", ["caps.lua", "minimal.lua"])
def test_stats_with_emulated_fua_and_zero_as_nbdkit(script: str) -> None:
    """nbdkit emulates below its filters: the emulation's flushes and writes are not
    counted."""
    expected, got = both(("statsfile=stats.txt",), ("stats",), _stats_client, script=script)
    assert expected.exit_code is None, expected.stderr
    assert expected == got, diff_observations(expected, got)


STATS_STACKS = [(("offset", "stats"), ("offset=1000",)),
                (("stats", "truncate"), ("truncate=2M",)),
                (("stats", "swab", "truncate"), ("truncate=1048580", "swab-bits=32"))]


@pytest.mark.parametrize(("filters", "args"), STATS_STACKS,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in STATS_STACKS])
def test_stats_in_stacks_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", "statsfile=stats.txt", *args), filters,
                         _stats_client)
    assert expected == got, diff_observations(expected, got)
    if "truncate" in filters:
        assert any(line.startswith("extents: 2 ops") for line in got.extra["stats"])


BAD_STATS = [(), ("statsfile=stats.txt", "statsthreshold=101"),
             ("statsfile=stats.txt", "statsthreshold=x"),
             ("statsfile=stats.txt", "statsthreshold=5x"),
             ("statsfile=stats.txt", "statsthreshold=-1"),
             ("statsfile=stats.txt", "statsappend=x")]


@pytest.mark.parametrize("args", BAD_STATS, ids=[",".join(a) or "none" for a in BAD_STATS])
def test_stats_bad_parameters_as_nbdkit(args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), ("stats",), lambda s: None)
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1


# --- swab ----------------------------------------------------------------------------------

def _swab_client(s: Session) -> None:
    from test_filters import exercise

    exercise(s)
    h = s.connect(strict=0)
    size = h.get_size()
    s.obs.extra["block_size"] = [h.get_block_size(k) for k in
                                 (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
    s.op("write words", h.pwrite, bytes(range(64)), 64)
    s.read(h, 64, 64)
    for count, offset in [(3, 0), (2, 1), (4, 2), (8, 4), (16, 8)]:
        s.read(h, count, offset)
        s.op(f"write {count}@{offset}", h.pwrite, b"\1" * count, offset)
        s.op(f"zero {count}@{offset}", h.zero, count, offset)
    s.block_status(h, size, 0)
    s.block_status(h, min(size, 8192), size - min(size, 8192))
    s.disconnect(h)


# (Not swab-bits=8: nbdkit 1.32 then writes a buffer it never filled.)
SWAB = [(("swab",), ()), (("swab",), ("swab-bits=16",)),
        (("swab",), ("swab-bits=32",)), (("swab",), ("swab-bits=64",)),
        (("swab", "truncate"), ("swab-bits=64", "truncate=1000004", "round-up=4096")),
        (("swab", "truncate"), ("swab-bits=32", "truncate=1000001")),
        (("truncate", "swab"), ("swab-bits=64", "truncate=1000004")),
        (("swab", "swab"), ("swab-bits=32",))]


@pytest.mark.parametrize(("filters", "args"), SWAB,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in SWAB])
def test_swab_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), filters, _swab_client)
    assert expected.exit_code is None, expected.stderr
    assert expected == got, diff_observations(expected, got)


BAD_SWAB = [("swab-bits=12",), ("swab-bits=x",), ("swab-bits=0",)]


@pytest.mark.parametrize("args", BAD_SWAB, ids=[a[0] for a in BAD_SWAB])
def test_swab_bad_parameters_as_nbdkit(args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), ("swab",), lambda s: None)
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1


# --- protect -------------------------------------------------------------------------------

def _protect_client(s: Session) -> None:
    from test_filters import exercise

    exercise(s)
    h = s.connect_and_probe()
    for offset in (0, 100, 512, 4096, 8192, 8292, SIZE - 512):
        s.op(f"zeroes again @{offset}", h.pwrite, bytes(512), offset)  # unchanged: allowed
        s.op(f"ones @{offset}", h.pwrite, b"\1" * 512, offset)
        s.read(h, 512, offset)
        s.op(f"same ones @{offset}", h.pwrite, b"\1" * 512, offset)
        s.op(f"zero @{offset}", h.zero, 512, offset)
        s.op(f"trim @{offset}", h.trim, 512, offset)
    s.disconnect(h)


# (Not overlapping ranges such as 100-200 and 150-300: nbdkit 1.32 then crashes.)
PROTECT = [("protect=0-0x1ff",), ("protect=~4096-8191",), ("protect=4096-",), ("protect=-4095",),
           ("protect=0-99", "protect=100-8191"),
           ("protect=0-8191", "protect=100-200"), ("protect=8192-9000", "protect=0-511"),
           ("protect=0-0",), ("protect=~0-",)]


@pytest.mark.parametrize("args", PROTECT, ids=[",".join(a) for a in PROTECT])
def test_protect_as_nbdkit(args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), ("protect",), _protect_client)
    assert expected.exit_code is None, expected.stderr
    assert expected == got, diff_observations(expected, got)


def test_protect_stacked_as_nbdkit() -> None:
    expected, got = both((f"size={SIZE}", "protect=0-1023", "offset=512"),
                         ("offset", "protect", "log"), _protect_client)
    assert expected == got, diff_observations(expected, got)
    assert got.outcome("ones @0") == "EPERM"


BAD_PROTECT = [("protect=100",), ("protect=200-100",), ("protect=x-100",),
               ("protect=-1-5",), ("protect=1-2x",), ("protect=~5",)]


@pytest.mark.parametrize("args", BAD_PROTECT, ids=[a[0] for a in BAD_PROTECT])
def test_protect_bad_parameters_as_nbdkit(args: tuple[str, ...]) -> None:
    expected, got = both((f"size={SIZE}", *args), ("protect",), lambda s: None)
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1


# --- log, more -----------------------------------------------------------------------------

def _log_more_client(s: Session) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(s.sock)
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    s.obs.extra["exports"] = names
    h = s.connect_and_probe()
    if not h.is_read_only():
        s.write(h, 1, 512, 0)
        s.op("zeroes", h.pwrite, bytes(512), 512)
        s.op("zero", h.zero, 512, 0)
    s.read(h, 512, 0)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        size = h.get_size()
        s.block_status(h, size, 0)
        s.block_status(h, 8192, size - 8192)
    s.disconnect(h)
    s.obs.extra["log"] = _log_lines(_wait_for("log.txt", s, "Disconnect"))


LOG_MORE = [("ramdisk.lua", ("log", "protect"), (f"size={SIZE}", "protect=0-511")),
            ("ramdisk.lua", ("log", "truncate"), (f"size={SIZE}", "truncate=1056768")),
            ("ramdisk.lua", ("log", "offset", "truncate"),
             (f"size={SIZE}", "truncate=1048580", "offset=1000")),
            ("caps.lua", ("log",), ()),
            ("caps.lua", ("log",), ("can_write=false",)),
            ("minimal.lua", ("log",), ())]


@pytest.mark.parametrize(("script", "filters", "args"), LOG_MORE,
                         ids=[f"{sc}:{'+'.join(f)}:{','.join(a)}" for sc, f, a in LOG_MORE])
def test_log_more_as_nbdkit(script: str, filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    expected, got = both(("logfile=log.txt", *args), filters, _log_more_client, script=script)
    assert expected.exit_code is None, expected.stderr
    assert expected == got, diff_observations(expected, got)
    assert any(line.startswith("...ListExports id=1 exports=(") for line in got.extra["log"])


def test_log_read_only_as_nbdkit() -> None:
    obs = [observe(server, "ramdisk.lua", (f"size={SIZE}", "logfile=log.txt"),
                   options=("-r", "--filter=log"), client=_log_more_client)
           for server in (NBDKIT, LUANBD)]
    assert obs[0] == obs[1], diff_observations(obs[0], obs[1])
    assert any(" write=0 " in line for line in obs[1].extra["log"])


def test_log_quotes_export_names_as_nbdkit() -> None:
    def client(s: Session) -> None:
        for name in ("disk-1.img", 'a b$c"d`e\\f', "x=y,z:/w"):
            h = nbd.NBD()
            h.set_export_name(name)
            try:
                h.connect_unix(s.sock)
            except nbd.Error as e:
                s.obs.extra.setdefault("errors", []).append(str(e))
                continue
            h.shutdown()
        s.obs.extra["log"] = [line for line in
                              _log_lines(_wait_for("log.txt", s, "Disconnect", 3))
                              if " Connect " in line]

    expected, got = both((f"size={SIZE}", "logfile=log.txt"), ("log",), client)
    assert expected == got, diff_observations(expected, got)
    assert any('export="a b\\$c\\"d\\`e\\\\f"' in line for line in got.extra["log"])
