"""The filters nocache, nozero, fua, error and delay against nbdkit's (as
test_filters.py): the same stack under both servers, observed through libnbd, with
``trace=1`` so that the calls reaching the plugin are compared too; bad parameters give the
same start-up error and exit status."""

from __future__ import annotations

import time

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import (  # noqa: E402
    LUANBD,
    NBDKIT,
    Observation,
    Server,
    Session,
    diff_observations,
    nbdkit_available,
    observe,
)
from test_filters import SIZE, exercise  # noqa: E402

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

KiB = 1024


def flagged(s: Session) -> None:
    """exercise, then the commands and flags these filters are about: FUA, fast zero,
    zero without trimming, cache, flush."""
    exercise(s)
    h = s.connect()
    h.set_strict_mode(0)  # send what the server did not advertise: its answer is compared
    s.write(h, 20, 4 * KiB, 8 * KiB, nbd.CMD_FLAG_FUA)
    s.read(h, 4 * KiB, 8 * KiB)
    s.op("zero fua 4096@16384", h.zero, 4 * KiB, 16 * KiB, nbd.CMD_FLAG_FUA)
    if h.can_fast_zero() or not h.can_zero():  # else nbdkit 1.32 asserts
        s.op("zero fast 4096@20480", h.zero, 4 * KiB, 20 * KiB, nbd.CMD_FLAG_FAST_ZERO)
    s.op("zero no-hole 4096@24576", h.zero, 4 * KiB, 24 * KiB, nbd.CMD_FLAG_NO_HOLE)
    s.read(h, 16 * KiB, 16 * KiB)
    s.op("trim fua 4096@32768", h.trim, 4 * KiB, 32 * KiB, nbd.CMD_FLAG_FUA)
    s.op("cache 8192@0", h.cache, 8 * KiB, 0)
    s.op("flush", h.flush)
    s.disconnect(h)


def both(filters: tuple[str, ...], args: tuple[str, ...], *, script: str = "ramdisk.lua",
         client=flagged, files: tuple[str, ...] = ()) -> tuple[Observation, Observation]:
    options = tuple(f"--filter={f}" for f in filters)
    obs = [observe(server, script, args, options=options, client=client, files=files)
           for server in (NBDKIT, LUANBD)]
    return obs[0], obs[1]


def assert_same(filters: tuple[str, ...], args: tuple[str, ...], **kw) -> Observation:
    expected, got = both(filters, args, **kw)
    assert not expected.timed_out and not got.timed_out
    assert expected == got, diff_observations(expected, got)
    return got


CASES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("nocache",), ()),
    (("nocache",), ("cachemode=none",)),
    (("nocache",), ("cachemode=emulate",)),
    (("nocache",), ("cachemode=nop",)),
    (("nocache",), ("cachemode=no-op",)),
    (("nozero",), ()),
    (("nozero",), ("zeromode=emulate",)),
    (("nozero",), ("zeromode=notrim",)),
    (("nozero",), ("zeromode=plugin",)),
    (("nozero",), ("zeromode=emulate", "fastzeromode=ignore")),
    (("nozero",), ("zeromode=emulate", "fastzeromode=none")),
    (("nozero",), ("zeromode=plugin", "fastzeromode=slow")),
    (("nozero",), ("zeromode=plugin", "fastzeromode=ignore")),
    (("nozero",), ("zeromode=notrim", "fastzeromode=default")),
    (("nozero", "fua"), ("zeromode=emulate", "fuamode=native")),
    (("fua",), ()),
    (("fua",), ("fuamode=emulate",)),
    (("fua",), ("fuamode=native",)),
    (("fua",), ("fuamode=force",)),
    (("fua",), ("fuamode=pass",)),
    (("fua",), ("fuamode=discard",)),
]


@pytest.mark.parametrize(("filters", "args"), CASES,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in CASES])
def test_same_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    got = assert_same(filters, (f"size={SIZE}", "trace=1", *args))
    assert got.size == SIZE and got.connect_error is None


BAD = [
    (("nocache",), ("cachemode=passthrough",)),
    (("nozero",), ("zeromode=sometimes",)),
    (("nozero",), ("fastzeromode=fast",)),
    (("fua",), ("fuamode=none",)),
    (("fua",), ("fuamode=sometimes",)),
    (("error",), ("error-rate=x",)),
    (("error",), ("error-rate=150%",)),
    (("error",), ("error-rate=2",)),
    (("error",), ("error-rate=-1",)),
    (("error",), ("error-rate=inf",)),
    (("error",), ("error-rate=",)),
    (("error",), ("error-rate=50%x",)),
    (("error",), ("error=EFOO",)),
    (("error",), ("error-pread=EBADF",)),
    (("error",), ("error-cache-rate=1.5",)),
    (("error",), ("error-zero-rate=0.5.",)),
    (("error",), ("error-flush-rate=1",)),  # not the filter's: the script refuses it
    (("delay",), ("rdelay=x",)),
    (("delay",), ("rdelay=-1",)),
    (("delay",), ("rdelay=1x",)),
    (("delay",), ("rdelay=1.5",)),
    (("delay",), ("rdelay=99999999999",)),
    (("delay",), ("rdelay=4294968",)),
    (("delay",), ("rdelay=2147483648",)),
    (("delay",), ("rdelay=ms",)),
    (("delay",), ("rdelay=5MS",)),
    (("delay",), ("rdelay=",)),
    (("delay",), ("rdelay=09",)),
    (("delay",), ("delay-read=1h",)),
    (("delay",), ("delay-close=1.5.5",)),
    (("delay",), ("delay-open=abc",)),
    (("delay",), ("wdelay=xms",)),
    (("delay",), ("delay-cache=-2",)),
    (("delay",), ("delay-fast-zero=maybe",)),
    (("delay",), ("delay-flush=1",)),
]


@pytest.mark.parametrize(("filters", "args"), BAD,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in BAD])
def test_bad_parameters_fail_as_nbdkit(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    expected, got = both(filters, (f"size={SIZE}", *args))
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1 or expected.connect_error is not None


#: A plugin without flush, zero, trim: the modes that need them refuse to open (nbdkit's
#: .prepare), or do not (zero is emulated below, which is enough).
MINIMAL = [
    (("fua",), ("fuamode=emulate",)),
    (("fua",), ("fuamode=native",)),
    (("fua",), ("fuamode=force",)),
    (("fua",), ("fuamode=discard",)),
    (("nozero",), ("zeromode=notrim",)),
    (("nozero",), ("zeromode=emulate",)),
    (("nocache",), ("cachemode=emulate",)),
    # A zero reaches the filters as a zero, and the plugin layer emulates it (nbdkit).
    (("error",), ("error-zero-rate=1",)),
    (("error",), ("error-pwrite-rate=1",)),
    (("error", "offset"), ("error-zero-rate=1", "offset=4096")),
    (("truncate", "error"), ("truncate=600000", "error-pwrite-rate=100%")),
    (("delay",), ("delay-zero=1ms", "delay-fast-zero=0")),
]


@pytest.mark.parametrize(("filters", "args"), MINIMAL,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in MINIMAL])
def test_plugin_without_flush_or_zero(filters: tuple[str, ...], args: tuple[str, ...]) -> None:
    assert_same(filters, args, script="minimal.lua")


def test_read_only_connection_skips_the_checks() -> None:
    """With -r the plugin's flush and FUA are not needed (nbdkit's prepare returns early)."""
    expected, got = (observe(server, "minimal.lua", ("fuamode=force",),
                             options=("--filter=fua", "-r"), client=flagged)
                     for server in (NBDKIT, LUANBD))
    assert expected == got, diff_observations(expected, got)
    assert got.caps["is_read_only"] and got.connect_error is None


def test_the_filters_do_their_job() -> None:
    """Beyond agreeing with nbdkit: what reaches the plugin."""
    # emulate: the client may zero, the plugin's zero is never called (pwrite instead).
    got = assert_same(("nozero",), (f"size={SIZE}", "trace=1", "zeromode=emulate"))
    assert got.caps["can_zero"] and not any(line.startswith("trace: zero") for line in got.log)
    assert "trace: pwrite count=8192 offset=524288 zeroes=true (string)" in got.log
    # none: WRITE_ZEROES is not even advertised.
    got = assert_same(("nozero",), (f"size={SIZE}", "trace=1"))
    assert not got.caps["can_zero"]
    # notrim: the plugin's zero never may trim.
    got = assert_same(("nozero",), (f"size={SIZE}", "trace=1", "zeromode=notrim"))
    assert not any("may_trim=true" in line for line in got.log)
    # discard: flushes never reach the plugin; force: each write is followed by one
    # (the plugin's FUA is emulated by flush).
    got = assert_same(("fua",), (f"size={SIZE}", "trace=1", "fuamode=discard"))
    assert got.caps["can_fua"] and not any("flush" in line for line in got.log)
    # nop: cache is accepted and nothing reaches the plugin.
    got = assert_same(("nocache",), (f"size={SIZE}", "trace=1", "cachemode=nop"))
    assert got.outcome("cache 8192@0") == "ok"


# --- error ---------------------------------------------------------------------------------

ERROR_CASES: list[tuple[str, ...]] = [
    ("error-rate=100%",),
    ("error-rate=1", "error=ENOSPC"),
    ("error-rate=0",),
    ("error-rate=0%", "error-pread-rate=100%", "error-pread=EPERM"),
    ("error=ENOSPC", "error-pwrite-rate=100%", "error-zero-rate=1"),
    ("error-trim-rate=1", "error-trim=ESHUTDOWN", "error=EINVAL"),
    ("error-zero-rate=1.0", "error-zero=ENOMEM"),
    ("error-cache-rate=1", "error-extents-rate=1"),
    ("error-rate=nan",),  # nbdkit's comparisons: nan always injects
    ("error-rate=0x1",),
    ("error-rate=1", "error-file=absent"),
    ("error-rate=1", "error-pread-file=absent"),
    ("error-rate=1", "error-file=absent", "error-zero-file="),  # logged; zero: no trigger
]


@pytest.mark.parametrize("args", ERROR_CASES, ids=[",".join(a) for a in ERROR_CASES])
def test_error_same_as_nbdkit(args: tuple[str, ...]) -> None:
    got = assert_same(("error",), (f"size={SIZE}", "trace=1", *args))
    assert got.size == SIZE and got.connect_error is None


def test_error_injects_what_it_is_told() -> None:
    got = assert_same(("error",), (f"size={SIZE}", "error-rate=100%"))
    assert got.outcome("read 4096@0") == "EIO"
    assert "injecting EIO error into pread" in got.errors()
    got = assert_same(("error",), (f"size={SIZE}", "error=ENOSPC", "error-pwrite-rate=100%"))
    assert got.outcome("write#1 4096@0") == "ENOSPC"
    assert got.outcome("read 4096@0") == "zeroes n=4096"  # reads are untouched
    got = assert_same(("error",), (f"size={SIZE}", "error-rate=1", "error-file=absent"))
    assert all(v != "EIO" for _, v in got.ops)


def trigger_file(s: Session) -> None:
    """Errors only while the trigger file exists (the server's working directory is
    s.tmp, where the relative error-file= points)."""
    h = s.connect_and_probe()
    s.read(h, 512, 0)
    (s.tmp / "inject").touch()
    s.read(h, 512, 0)
    s.write(h, 1, 512, 0)
    (s.tmp / "inject").unlink()
    s.read(h, 512, 0)
    s.write(h, 2, 512, 0)
    s.disconnect(h)


def test_error_file_switches_errors_on_and_off() -> None:
    got = assert_same(("error",), (f"size={SIZE}", "error-rate=100%", "error-file=inject",
                                   "error=EPERM"), client=trigger_file)
    assert [v for _, v in got.ops] == ["zeroes n=512", "EPERM", "EPERM", "zeroes n=512", "ok"]
    assert got.errors() == ["injecting EPERM error into pread",
                            "injecting EPERM error into pwrite"]


def test_error_rate_between_0_and_1_injects_some() -> None:
    """50%: of 200 reads, some fail and some do not (nbdkit's is random too)."""

    def reads(s: Session) -> None:
        h = s.connect_and_probe()
        for _ in range(200):
            s.read(h, 512, 0)
        s.disconnect(h)

    got = observe(LUANBD, "ramdisk.lua", (f"size={SIZE}", "error-rate=50%"),
                  options=("--filter=error",), client=reads)
    outcomes = [v for _, v in got.ops]
    assert 20 < outcomes.count("EIO") < 180, outcomes.count("EIO")


# --- delay ---------------------------------------------------------------------------------

DELAY_CASES: list[tuple[str, ...]] = [
    ("rdelay=10ms",),
    ("delay-read=0", "wdelay=5ms"),
    ("delay-write=1ms", "delay-zero=2ms", "delay-trim=3ms", "delay-extents=1ms",
     "delay-cache=1ms"),
    ("delay-zero=5ms", "delay-fast-zero=false"),  # fast zero advertised, refused at once
    ("delay-zero=5ms", "delay-fast-zero=true"),
    ("delay-fast-zero=no",),  # no zero delay: nothing to refuse
    ("delay-reads=0x0", "delay-writes=00", "delay-discard=0", "delay-extent=+0"),
    ("delay-open=20ms", "delay-close=20ms"),
]


@pytest.mark.parametrize("args", DELAY_CASES, ids=[",".join(a) for a in DELAY_CASES])
def test_delay_same_as_nbdkit(args: tuple[str, ...]) -> None:
    got = assert_same(("delay",), (f"size={SIZE}", "trace=1", *args))
    assert got.size == SIZE and got.connect_error is None


def test_delay_fast_zero_false_refuses_fast_zeroes() -> None:
    got = assert_same(("delay",), (f"size={SIZE}", "delay-zero=5ms", "delay-fast-zero=false"))
    assert got.caps["can_fast_zero"]
    assert got.outcome("zero fast 4096@20480") == "ENOTSUP"


def timed(s: Session) -> None:
    """How long a connection, a read, a write and a zero take."""
    t0 = time.monotonic()
    h = s.connect()
    t1 = time.monotonic()
    s.read(h, 512, 0)
    t2 = time.monotonic()
    s.write(h, 1, 512, 0)
    t3 = time.monotonic()
    s.op("zero 512@0", h.zero, 512, 0)
    t4 = time.monotonic()
    s.disconnect(h)
    s.record("times", [t1 - t0, t2 - t1, t3 - t2, t4 - t3])


@pytest.mark.parametrize("server", [LUANBD, NBDKIT], ids=lambda s: s.name)
def test_delay_delays(server: Server) -> None:
    got = observe(server, "ramdisk.lua", (f"size={SIZE}", "delay-open=200ms", "rdelay=300ms",
                                          "delay-write=1", "delay-zero=100ms"),
                  options=("--filter=delay",), client=timed)
    assert [v for _, v in got.ops] == ["zeroes n=512", "ok", "ok"]
    opened, read, wrote, zeroed = got.extra["times"]
    assert opened >= 0.2 and read >= 0.3 and wrote >= 1.0 and zeroed >= 0.1, got.extra


def test_wdelay_sets_the_write_delays() -> None:
    got = observe(LUANBD, "ramdisk.lua", (f"size={SIZE}", "wdelay=200ms"),
                  options=("--filter=delay",), client=timed)
    _, read, wrote, zeroed = got.extra["times"]
    assert read < 0.2 <= min(wrote, zeroed), got.extra
