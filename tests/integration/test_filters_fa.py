"""The filters nocache, nozero, fua, error and delay against nbdkit's (as
test_filters.py): the same stack under both servers, observed through libnbd, with
``trace=1`` so that the calls reaching the plugin are compared too; bad parameters give the
same start-up error and exit status."""

from __future__ import annotations

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
