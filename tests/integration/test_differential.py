"""Differential tests: the same Lua scripts under ``nbdkit lua`` and luanbd.

Every scenario is run twice:

* ``test_nbdkit_oracle[NAME]`` runs it under nbdkit 1.32 and checks the
  behaviour we verified (so the harness and the expectations stay honest);
* ``test_luanbd_matches[NAME]`` runs it under luanbd and requires the same
  :class:`Observation` as nbdkit's (nbdkit's is computed once and cached).

Run only the oracle side with ``pytest tests/integration -k nbdkit`` and
only the comparison with ``-k luanbd``.

The one intended difference is nbdkit's can_flush bug (a script with
``flush`` but no ``can_flush`` does not advertise flush under nbdkit 1.32;
luanbd advertises it).  Scenarios marked ``flush_quirk`` check that nbdkit
says false, luanbd says true and that a FLUSH works under luanbd, and
compare everything else.  The second one: a non-string Lua error value is
logged as ``(error object is a table value)`` instead of nbdkit's ``(null)``
(``normalise_error_objects``).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import (  # noqa: E402
    LUANBD,
    NBDKIT,
    PLUGINS,
    Observation,
    Server,
    Session,
    describe,
    diff_observations,
    nbdkit_available,
    observe,
    observe_captive,
    observe_single,
    pattern,
    run_plain,
)

_NBDKIT_MISSING = nbdkit_available()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_NBDKIT_MISSING is not None, reason=str(_NBDKIT_MISSING)),
]

MiB = 1048576
ZEROES = "zeroes n={}".format
NOT_BOOLEAN = "return value is not a boolean"
GO_FAILED = "ENOENT"  # NBD_REP_ERR_UNKNOWN as libnbd reports it

Runner = Callable[[Server], Observation]
Check = Callable[[Observation], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Runner
    expect: Check
    #: The scenario exercises the documented can_flush difference.
    flush_quirk: bool = False


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, run: Runner, *, flush_quirk: bool = False) -> Callable[[Check], Check]:
    """Register the decorated function as the nbdkit expectation of ``name``."""
    assert "nbdkit" not in name and "luanbd" not in name, "would break -k selection"

    def deco(expect: Check) -> Check:
        assert name not in SCENARIOS, name
        SCENARIOS[name] = Scenario(name, run, expect, flush_quirk)
        return expect

    return deco


def serve(
    script: str | None,
    *args: str,
    options: tuple[str, ...] = (),
    client: Callable[[Session], None] | None = None,
    files: tuple[str, ...] = (),
) -> Runner:
    return lambda server: observe(server, script, args, options=options, client=client, files=files)


def at(script: str, marker: str) -> str:
    """``script:LINE`` for the first line of plugins/SCRIPT containing
    ``marker``: the position Lua puts in front of an error message."""
    for n, line in enumerate((PLUGINS / script).read_text().splitlines(), 1):
        if marker in line:
            return f"{script}:{n}"
    raise AssertionError(f"{marker!r} not in {script}")


def data(seed: int, n: int) -> str:
    """The outcome recorded for reading back pattern(seed, n)."""
    return describe(pattern(seed, n))


def startup_failed(o: Observation, message: str) -> None:
    assert o.exit_code == 1, o
    assert o.startup_error == message, o.stderr
    assert o.connect_error is None and o.size is None


def go_failed(o: Observation, message: str) -> None:
    """open/get_size/can_* failed: libnbd's GO gets ERR_UNKNOWN."""
    assert o.exit_code is None and o.startup_error is None
    assert o.connect_error == GO_FAILED, o
    assert o.size is None
    assert o.errors() == [message], o.log


def no_errors(o: Observation) -> None:
    assert o.exit_code is None and o.connect_error is None, o
    assert o.errors() == [], o.log
    assert not o.timed_out


# ===========================================================================
# Data round trips


def roundtrip_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.read(h, 4096, 0)
    s.write(h, 1, 4096, 0)
    s.write(h, 2, 512, MiB - 512)
    s.write(h, 3, 10000, 5000)  # unaligned, crosses pages
    s.write(h, 4, 65536, 131072)
    s.read(h, 4096, 0)
    s.read(h, 512, MiB - 512)
    s.read(h, 10000, 5000)
    s.read(h, 20000, 1000)
    s.read(h, 65536, 131072)
    s.read(h, MiB, 0)
    s.op("flush", h.flush)
    # A second connection sees the same disk: one interpreter per process.
    h2 = s.connect()
    s.op("conn2 read 10000@5000", h2.pread, 10000, 5000)
    s.op("conn2 read all", h2.pread, MiB, 0)


@scenario("roundtrip", serve("ramdisk.lua", "size=1048576", client=roundtrip_client))
def _roundtrip(o: Observation) -> None:
    no_errors(o)
    p1 = pattern(1, 4096)
    assert o.size == MiB
    assert o.protocol == "newstyle-fixed"
    assert o.outcome("read 4096@0") == ZEROES(4096)
    assert [v for k, v in o.ops if k.startswith("write")] == ["ok"] * 4
    assert o.ops[5:10] == [
        ("read 4096@0", data(1, 4096)),
        ("read 512@1048064", data(2, 512)),
        ("read 10000@5000", data(3, 10000)),
        ("read 20000@1000", describe(p1[1000:] + bytes(904) + pattern(3, 10000) + bytes(6000))),
        ("read 65536@131072", data(4, 65536)),
    ]
    assert o.outcome("conn2 read 10000@5000") == data(3, 10000)
    assert o.outcome("conn2 read all") == o.outcome("read 1048576@0")
    assert o.outcome("flush") == "ok"


def trace_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.write(h, 7, 1000, 4000)
    s.read(h, 1000, 4000)
    s.read(h, 3, 65533)


@scenario("trace-arguments", serve("ramdisk.lua", "trace=1", "size=65536", client=trace_client))
def _trace_arguments(o: Observation) -> None:
    no_errors(o)
    assert o.outcome("read 1000@4000") == data(7, 1000)
    assert o.log == [
        "trace: config size=65536 (string, string)",
        "trace: config_complete size=65536",
        "trace: open readonly=false (boolean)",
        "trace: get_size",
        "trace: can_flush",
        "trace: pwrite count=1000 offset=4000 zeroes=false (string)",
        "trace: pread count=1000 offset=4000 (integer, integer)",
        "trace: pread count=3 offset=65533 (integer, integer)",
        "trace: close",
    ]


@scenario(
    "config-strings-in-order",
    serve("ramdisk.lua", "trace=1", "how=x=y", "size=8192", "handle=table"),
)
def _config_strings(o: Observation) -> None:
    no_errors(o)
    assert o.size == 8192
    # (trace=1 itself comes before tracing is on)
    assert o.log[:3] == [
        "trace: config how=x=y (string, string)",
        "trace: config size=8192 (string, string)",
        "trace: config handle=table (string, string)",
    ]


@scenario(
    "explicit-script-key", serve(None, "script=ramdisk.lua", "size=4096", files=("ramdisk.lua",))
)
def _explicit_script(o: Observation) -> None:
    no_errors(o)
    assert o.size == 4096


def small_roundtrip(s: Session) -> None:
    h = s.connect_and_probe()
    s.write(h, 5, 512, 512)
    s.read(h, 1024, 0)


for _handle in ("nil", "string", "number"):

    @scenario(
        f"handle-{_handle}",
        serve("ramdisk.lua", f"handle={_handle}", "size=65536", client=small_roundtrip),
    )
    def _handle_kind(o: Observation) -> None:
        # Every callback asserts that it got back exactly what open returned.
        no_errors(o)
        assert o.outcome("read 1024@0") == describe(bytes(512) + pattern(5, 512))


def two_connections(s: Session) -> None:
    a = s.connect_and_probe(strict=0)
    b = s.connect(strict=0)
    s.op("A write", a.pwrite, pattern(9, 4096), 8192)
    s.op("B read", b.pread, 4096, 8192)
    s.op("B write", b.pwrite, pattern(10, 512), 8192)
    s.op("A read", a.pread, 512, 8192)
    s.op("B read past end", b.pread, 512, 65536 * 2)


@scenario(
    "two-connections-share-state",
    serve("ramdisk.lua", "size=65536", "trace=1", client=two_connections),
)
def _two_connections(o: Observation) -> None:
    assert o.outcome("B read") == data(9, 4096)
    assert o.outcome("A read") == data(10, 512)
    assert o.outcome("B read past end") == "EINVAL"
    assert o.log.count("trace: open readonly=false (boolean)") == 2
    assert o.log.count("trace: close") == 2


# ===========================================================================
# Capabilities


def caps(o: Observation, *true: str) -> None:
    """Exactly the capabilities ``true`` (besides base:allocation) are set."""
    got = {k for k, v in o.caps.items() if v and k != "base_allocation"}
    assert got == set(true), o.caps
    assert o.caps["base_allocation"] is True


WRITABLE = ("can_fua", "can_zero", "can_fast_zero", "can_df")


def caps_client(s: Session) -> None:
    """Probe, then try every command with strict mode off."""
    h = s.connect_and_probe(strict=0)
    s.read(h, 512, 0)
    s.write(h, 1, 512, 0)
    s.op("flush", h.flush)
    s.op("trim", h.trim, 512, 0)
    s.op("zero", h.zero, 512, 0)
    s.op("cache", h.cache, 512, 0)


def caps_scenario(
    name: str, script: str, *args: str, options: tuple[str, ...] = ()
) -> Callable[[Check], Check]:
    return scenario(name, serve(script, *args, options=options, client=caps_client))


@caps_scenario("caps-ramdisk", "ramdisk.lua")
def _caps_ramdisk(o: Observation) -> None:
    # pwrite, trim, zero, flush and can_flush defined; no can_write/can_trim.
    caps(o, *WRITABLE, "can_flush", "can_trim")
    assert [v for _, v in o.ops] == ["zeroes n=512", "ok", "ok", "ok", "ok", "EINVAL"]
    assert o.errors() == ["invalid request: NBD_CMD_CACHE: cache operation not supported"]


@caps_scenario("caps-minimal", "minimal.lua")
def _caps_minimal(o: Observation) -> None:
    # No flush/trim/zero/can_*: zero is still advertised (pwrite fallback).
    caps(o, *WRITABLE)
    assert [v for _, v in o.ops] == ["zeroes n=512", "ok", "EINVAL", "EINVAL", "ok", "EINVAL"]
    assert o.errors() == [
        "invalid request: NBD_CMD_FLUSH: flush operation not supported",
        "invalid request: NBD_CMD_TRIM: trim operation not supported",
        "invalid request: NBD_CMD_CACHE: cache operation not supported",
    ]


READONLY_ERRORS = [
    "invalid request: NBD_CMD_WRITE: write request on readonly connection",
    "invalid request: NBD_CMD_TRIM: write request on readonly connection",
    "invalid request: NBD_CMD_WRITE_ZEROES: write request on readonly connection",
]


@caps_scenario("caps-script-without-pwrite", "readonly.lua")
def _caps_readonly_script(o: Observation) -> None:
    caps(o, "is_read_only", "can_df")
    assert o.outcome("read 512@0") == describe(
        bytes(range(251)) + bytes(range(251)) + bytes(range(10))
    )
    assert [v for _, v in o.ops[1:]] == ["EPERM", "EINVAL", "EPERM", "EPERM", "EINVAL"]
    assert o.errors() == [
        READONLY_ERRORS[0],
        "invalid request: NBD_CMD_FLUSH: flush operation not supported",
        *READONLY_ERRORS[1:],
        "invalid request: NBD_CMD_CACHE: cache operation not supported",
    ]


@caps_scenario("caps-all-true", "caps.lua")
def _caps_all_true(o: Observation) -> None:
    caps(o, *WRITABLE, "can_flush", "can_trim", "is_rotational")
    assert [v for _, v in o.ops] == ["zeroes n=512", "ok", "ok", "ok", "ok", "EINVAL"]


@caps_scenario(
    "caps-all-false",
    "caps.lua",
    "can_write=false",
    "can_flush=false",
    "can_trim=false",
    "is_rotational=false",
)
def _caps_all_false(o: Observation) -> None:
    caps(o, "is_read_only", "can_df")
    assert [v for _, v in o.ops] == ["zeroes n=512", "EPERM", "EINVAL", "EPERM", "EPERM", "EINVAL"]


@caps_scenario("caps-trim-false-with-trim", "caps.lua", "can_trim=false", "can_flush=false")
def _caps_trim_false(o: Observation) -> None:
    # can_trim=false wins over a defined trim.
    caps(o, *WRITABLE, "is_rotational")
    assert o.outcome("trim") == "EINVAL"
    assert o.outcome("flush") == "EINVAL"


@caps_scenario("caps-is_rotational-true", "caps.lua", "is_rotational=true", "can_write=true")
def _caps_rotational(o: Observation) -> None:
    assert o.caps["is_rotational"] is True
    assert o.caps["is_read_only"] is False


@caps_scenario("readonly-option", "ramdisk.lua", "trace=1", options=("-r",))
def _readonly_option(o: Observation) -> None:
    # -r: read-only, trim/zero/fua/fast_zero off; flush stays (can_flush).
    caps(o, "is_read_only", "can_df", "can_flush")
    assert [v for _, v in o.ops] == ["zeroes n=512", "EPERM", "ok", "EPERM", "EPERM", "EINVAL"]
    assert "trace: open readonly=true (boolean)" in o.log
    assert o.errors() == [
        *READONLY_ERRORS,
        "invalid request: NBD_CMD_CACHE: cache operation not supported",
    ]


@caps_scenario("readonly-option-skips-can_write", "caps.lua", "can_write=error", options=("-r",))
def _readonly_skips_can_write(o: Observation) -> None:
    # can_write would fail if it were called: with -r it is not.
    assert o.connect_error is None
    caps(o, "is_read_only", "can_df", "can_flush", "is_rotational")


@caps_scenario("can_write-false", "caps.lua", "can_write=false")
def _can_write_false(o: Observation) -> None:
    caps(o, "is_read_only", "can_df", "can_flush", "is_rotational")
    assert o.outcome("write#1 512@0") == "EPERM"


# --- the documented exception: flush without can_flush ----------------------


def flush_quirk_client(s: Session) -> None:
    h = s.connect_and_probe()  # default strict mode: libnbd checks can_flush
    s.write(h, 3, 512, 0)
    s.op("flush(quirk)", h.flush)
    s.read(h, 512, 0)


@scenario(
    "flush-without-can_flush",
    serve("flush_only.lua", client=flush_quirk_client),
    flush_quirk=True,
)
def _flush_quirk(o: Observation) -> None:
    assert o.caps["can_flush"] is False  # nbdkit 1.32 bug
    assert o.outcome("flush(quirk)") == "EINVAL"  # refused by libnbd itself
    assert o.outcome("read 512@0") == data(3, 512)
    assert o.log == []


def fua_flush_quirk_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.write(h, 4, 512, 0, nbd.CMD_FLAG_FUA)
    s.op("flush(quirk)", h.flush)


@scenario(
    "fua-calls-flush-without-can_flush",
    serve("flush_only.lua", client=fua_flush_quirk_client),
    flush_quirk=True,
)
def _fua_flush_quirk(o: Observation) -> None:
    # FUA is emulated with the Lua flush even though can_flush is false.
    assert o.caps["can_fua"] is True
    assert o.outcome("write#4 512@0") == "ok"
    assert o.log == ["flush_only: flush called"]


# --- can_* returning something that is not a boolean ------------------------

for _cb, _value in [
    ("can_write", "1"),
    ("can_write", "0"),
    ("can_flush", "nil"),
    ("can_trim", "string"),
    ("is_rotational", "table"),
]:

    @caps_scenario(f"{_cb}-returns-{_value}", "caps.lua", f"{_cb}={_value}")
    def _can_wrong_type(o: Observation, _cb: str = _cb) -> None:
        go_failed(o, f"{_cb}: {NOT_BOOLEAN}")


for _cb in ("can_write", "is_rotational"):

    @caps_scenario(f"{_cb}-raises", "caps.lua", f"{_cb}=error")
    def _can_raises(o: Observation, _cb: str = _cb) -> None:
        go_failed(o, f"{_cb}: {at('caps.lua', 'refused')}: {_cb} refused")


# ===========================================================================
# Errors raised by callbacks


def after_error_client(s: Session) -> None:
    """Hit every data callback twice: the connection survives errors."""
    h = s.connect_and_probe()
    for seed in (1, 2):
        s.op(f"pwrite #{seed}", h.pwrite, pattern(seed, 512), 512 * seed)
        s.op(f"pread #{seed}", h.pread, 1024, 0)
        s.op(f"flush #{seed}", h.flush)
        s.op(f"trim #{seed}", h.trim, 512, 4096)
        s.op(f"zero #{seed}", h.zero, 512, 8192)


def injected(cb: str) -> str:
    pos = at("ramdisk.lua", 'error("injected failure')
    return f"{cb}: {pos}: injected failure in {cb}"


for _cb in ("pread", "pwrite", "flush", "trim", "zero"):

    @scenario(f"error-in-{_cb}", serve("ramdisk.lua", f"fail={_cb}", client=after_error_client))
    def _error_in(o: Observation, _cb: str = _cb) -> None:
        # Exactly the calls of the failing callback get EIO; all the others
        # work, on the same connection.
        failed = [k for k, v in o.ops if v == "EIO"]
        assert failed == [f"{_cb} #1", f"{_cb} #2"], o.ops
        assert not [v for v in dict(o.ops).values() if v.startswith("E") and v != "EIO"]
        assert o.errors() == [injected(_cb)] * 2


def in_ramdisk(marker: str) -> str:
    return at("ramdisk.lua", marker) + ": "


HOW = {
    "assert": in_ramdisk("assert(false)") + "assertion failed!",
    "assertmsg": in_ramdisk('"assertion in "') + "assertion in pread",
    "error0": "no position for pread",
    "number": "42",
    "table": "(null)",
    "meta": "(null)",  # __tostring is not used
    "nil": "(null)",
    "runtime": in_ramdisk("return t.field") + "attempt to index a nil value (local 't')",
}

for _how, _msg in HOW.items():

    @scenario(
        f"pread-fails-{_how}",
        serve("ramdisk.lua", f"how={_how}", "fail=pread", client=after_error_client),
    )
    def _pread_fails_how(o: Observation, _msg: str = _msg) -> None:
        assert [k for k, v in o.ops if v == "EIO"] == ["pread #1", "pread #2"]
        assert o.errors() == [f"pread: {_msg}"] * 2


for _cb in ("open", "get_size", "can_flush"):

    @scenario(f"error-in-{_cb}", serve("ramdisk.lua", f"fail={_cb}", client=after_error_client))
    def _error_in_open(o: Observation, _cb: str = _cb) -> None:
        go_failed(o, injected(_cb))
        assert o.extra["connect_message"].startswith("handshake: server has no export named ''")


def close_error_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.read(h, 512, 0)
    s.disconnect(h)
    s.record("close logged", s.wait_log("close: "))
    h2 = s.connect()  # the server is still there
    s.op("read after close error", h2.pread, 512, 0)
    s.disconnect(h2)
    s.record("second close logged", s.wait_log("close: ", count=2))


@scenario("error-in-close", serve("ramdisk.lua", "fail=close", client=close_error_client))
def _error_in_close(o: Observation) -> None:
    # The client cannot see it; it is only logged.
    assert o.extra == {
        "structured_replies": True,
        "close logged": True,
        "second close logged": True,
    }
    assert o.outcome("read after close error") == ZEROES(512)
    assert o.errors() == [injected("close")] * 2


def read_once(s: Session) -> None:
    h = s.connect_and_probe()
    s.read(h, 512, 0)


@scenario("error-line-after-shebang", serve("shebang.lua", client=read_once))
def _shebang(o: Observation) -> None:
    # The "#!" line is skipped but still counted.
    assert o.outcome("read 512@0") == "EIO"
    assert o.errors() == [f"pread: {at('shebang.lua', 'error(')}: shebang pread failure"]


# ===========================================================================
# Wrong return types

SIZE_OK = {"float": MiB, "string": MiB, "hexstring": MiB}
SIZE_BAD = {
    "word": "get_size: cannot convert returned value to an integer",
    "nil": "get_size: cannot convert returned value to an integer",
    "table": "get_size: cannot convert returned value to an integer",
    "boolean": "get_size: cannot convert returned value to an integer",
    "negative": ".get_size function returned invalid value (-5)",
}

for _t, _size in SIZE_OK.items():

    @scenario(
        f"get_size-returns-{_t}", serve("ramdisk.lua", f"size_type={_t}", client=small_roundtrip)
    )
    def _size_ok(o: Observation, _size: int = _size) -> None:
        no_errors(o)
        assert o.size == _size  # 1048576.7 is truncated


for _t, _msg in SIZE_BAD.items():

    @scenario(
        f"get_size-returns-{_t}", serve("ramdisk.lua", f"size_type={_t}", client=small_roundtrip)
    )
    def _size_bad(o: Observation, _msg: str = _msg) -> None:
        go_failed(o, _msg)


def pread_types_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.read(h, 4, 0)
    s.read(h, 512, 0)
    s.write(h, 1, 512, 0)


PREAD_RETURNS = {
    "short": ["EIO", "EIO"],
    "nil": ["EIO", "EIO"],
    "table": ["EIO", "EIO"],
    "number": [describe(b"1234"), "EIO"],  # 1234567890 as text, cut to count
    "long": [ZEROES(4), ZEROES(512)],  # the extra bytes are ignored
}
PREAD_MESSAGE = {
    "short": "pread: returned string length < count bytes",
    "nil": "pread: return value is not a string",
    "table": "pread: return value is not a string",
    "number": "pread: returned string length < count bytes",
}

for _r, _outcomes in PREAD_RETURNS.items():

    @scenario(
        f"pread-returns-{_r}",
        serve("ramdisk.lua", f"pread_returns={_r}", client=pread_types_client),
    )
    def _pread_returns(o: Observation, _r: str = _r, _outcomes: list[str] = _outcomes) -> None:
        assert [v for _, v in o.ops] == [*_outcomes, "ok"]
        msgs = [PREAD_MESSAGE[_r]] * _outcomes.count("EIO") if _r in PREAD_MESSAGE else []
        assert o.errors() == msgs


# ===========================================================================
# Start-up errors (exit status 1 and one message)

STARTUP = {
    "startup-missing-script": (
        "nope.lua",
        (),
        "could not parse Lua script cannot open nope.lua: No such file or directory",
    ),
    "startup-syntax-error": (
        "syntax_error.lua",
        (),
        f"could not parse Lua script {at('syntax_error.lua', '= =')}: unexpected symbol near '='",
    ),
    "startup-top-level-error": (
        "toplevel_error.lua",
        (),
        f"could not run Lua script: {at('toplevel_error.lua', 'settings.size')}: "
        "attempt to index a nil value (local 'settings')",
    ),
    "startup-missing-pread": (
        "missing_pread.lua",
        (),
        "missing_pread.lua: one of the required callbacks 'open', 'get_size' or 'pread' "
        "is not defined by this Lua script.  SERVER requires these callbacks.",
    ),
    "startup-no-config-function": (
        "readonly.lua",
        ("size=1",),
        "readonly.lua: this plugin does not need command line configuration",
    ),
    "startup-config-error": ("ramdisk.lua", ("fail=config",), injected("config")),
    "startup-config-error-table": ("ramdisk.lua", ("how=table", "fail=config"), "config: (null)"),
    "startup-config-unknown-key": (
        "ramdisk.lua",
        ("size=4096", "colour=blue"),
        f"config: {at('ramdisk.lua', 'unknown parameter')}: unknown parameter: colour",
    ),
    "startup-config-bad-value": (
        "ramdisk.lua",
        ("size=big",),
        f"config: {at('ramdisk.lua', 'bad size')}: bad size: big",
    ),
    "startup-config_complete-error": (
        "ramdisk.lua",
        ("fail=config_complete",),
        injected("config_complete"),
    ),
    "startup-config_complete-runtime-error": (
        "ramdisk.lua",
        ("how=runtime", "fail=config_complete"),
        "config_complete: " + HOW["runtime"],
    ),
    "startup-invalid-key": (
        "ramdisk.lua",
        ("1size=4096",),
        "expecting key=value on the command line but got: 1size=4096",
    ),
    "startup-second-bare-argument": (
        "ramdisk.lua",
        ("size=4096", "extra"),
        "expecting key=value on the command line but got: extra",
    ),
    "startup-first-argument-not-script": (
        None,
        ("size=4096",),
        "the first parameter must be script=/path/to/script.lua",
    ),
}

for _name, (_script, _args, _message) in STARTUP.items():

    @scenario(_name, serve(_script, *_args))
    def _startup(o: Observation, _message: str = _message) -> None:
        startup_failed(o, _message)


# ===========================================================================
# Protocol edges (libnbd strict mode off so bad requests reach the server)


def out_of_range_client(s: Session) -> None:
    h = s.connect_and_probe(strict=0)
    size = 65536
    s.read(h, 512, size)
    s.read(h, 1024, size - 512)
    s.write(h, 1, 512, size)
    s.op("zero past end", h.zero, 512, size)
    s.op("trim past end", h.trim, 512, size)
    s.op("block_status past end", h.block_status, 512, size, lambda *a: 0)
    s.read(h, 512, size - 512)  # the connection still works


@scenario("out-of-range", serve("ramdisk.lua", "size=65536", client=out_of_range_client))
def _out_of_range(o: Observation) -> None:
    assert [v for _, v in o.ops] == [
        "EINVAL",
        "EINVAL",
        "ENOSPC",
        "ENOSPC",
        "EINVAL",
        "EINVAL",
        ZEROES(512),
    ]
    rng = "offset and count are out of range: offset={} count={}".format
    assert o.errors() == [
        "invalid request: NBD_CMD_READ: " + rng(65536, 512),
        "invalid request: NBD_CMD_READ: " + rng(65024, 1024),
        "invalid request: NBD_CMD_WRITE: " + rng(65536, 512),
        "invalid request: NBD_CMD_WRITE_ZEROES: " + rng(65536, 512),
        "invalid request: NBD_CMD_TRIM: " + rng(65536, 512),
        "invalid request: NBD_CMD_BLOCK_STATUS: " + rng(65536, 512),
    ]


def zero_length_client(s: Session) -> None:
    h = s.connect_and_probe(strict=0)
    s.read(h, 0, 0)
    s.op("write 0@0", h.pwrite, b"", 0)
    s.op("zero 0@0", h.zero, 0, 0)
    s.op("trim 0@0", h.trim, 0, 0)
    s.read(h, 512, 0)


@scenario("zero-length-requests", serve("ramdisk.lua", "size=65536", client=zero_length_client))
def _zero_length(o: Observation) -> None:
    assert [v for _, v in o.ops] == ["EINVAL", "ENOSPC", "ENOSPC", "EINVAL", ZEROES(512)]
    assert len(o.errors()) == 4
    assert all("offset=0 count=0" in m for m in o.errors())


def zero_fallback_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.write(h, 1, 16384, 0)
    s.op("zero 8192@4096", h.zero, 8192, 4096)
    s.read(h, 16384, 0)
    s.op("zero no-hole 512@0", h.zero, 512, 0, nbd.CMD_FLAG_NO_HOLE)
    s.read(h, 1024, 0)


@scenario("zero-falls-back-to-pwrite", serve("minimal.lua", client=zero_fallback_client))
def _zero_fallback(o: Observation) -> None:
    p = pattern(1, 16384)
    assert o.outcome("zero 8192@4096") == "ok"
    assert o.outcome("read 16384@0") == describe(p[:4096] + bytes(8192) + p[12288:])
    assert o.outcome("read 1024@0") == describe(bytes(512) + p[512:1024])
    assert o.log == [
        "minimal: pwrite count=16384 offset=0 zeroes=false",
        "minimal: pwrite count=8192 offset=4096 zeroes=true",
        "minimal: pwrite count=512 offset=0 zeroes=true",
    ]


def zero_flags_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.op("zero", h.zero, 512, 0)
    s.op("zero no-hole", h.zero, 512, 512, nbd.CMD_FLAG_NO_HOLE)
    s.op("zero fua", h.zero, 512, 1024, nbd.CMD_FLAG_FUA)
    s.op("fast zero", h.zero, 512, 0, nbd.CMD_FLAG_FAST_ZERO)
    s.op("fast zero no-hole", h.zero, 512, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)


@scenario("zero-may_trim-fua-fast", serve("ramdisk.lua", "trace=1", client=zero_flags_client))
def _zero_flags(o: Observation) -> None:
    assert [v for _, v in o.ops] == ["ok", "ok", "ok", "ENOTSUP", "ENOTSUP"]
    # Fast zeroes fail at once and never reach Lua.
    assert [x for x in o.log if x.startswith(("trace: zero", "trace: flush"))] == [
        "trace: zero count=512 offset=0 may_trim=true (boolean)",
        "trace: zero count=512 offset=512 may_trim=false (boolean)",
        "trace: zero count=512 offset=1024 may_trim=true (boolean)",
        "trace: flush #1",
    ]
    assert o.errors() == []


@scenario(
    "fast-zero-without-lua-zero",
    serve("minimal.lua", client=zero_flags_client),
)
def _fast_zero_minimal(o: Observation) -> None:
    assert [v for _, v in o.ops] == ["ok", "ok", "ok", "ENOTSUP", "ENOTSUP"]
    assert o.log == [
        "minimal: pwrite count=512 offset=0 zeroes=true",
        "minimal: pwrite count=512 offset=512 zeroes=true",
        "minimal: pwrite count=512 offset=1024 zeroes=true",
    ]


def fua_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.write(h, 1, 512, 0, nbd.CMD_FLAG_FUA)
    s.op("trim fua", h.trim, 512, 4096, nbd.CMD_FLAG_FUA)
    s.write(h, 2, 512, 0)
    s.read(h, 512, 0)


@scenario("fua-emulated-with-flush", serve("ramdisk.lua", "trace=1", client=fua_client))
def _fua(o: Observation) -> None:
    assert [v for _, v in o.ops] == ["ok", "ok", "ok", data(2, 512)]
    assert o.log == [
        "trace: config_complete size=1048576",
        "trace: open readonly=false (boolean)",
        "trace: get_size",
        "trace: can_flush",
        "trace: pwrite count=512 offset=0 zeroes=false (string)",
        "trace: flush #1",
        "trace: trim count=512 offset=4096",
        "trace: flush #2",
        "trace: pwrite count=512 offset=0 zeroes=false (string)",
        "trace: pread count=512 offset=0 (integer, integer)",
        "trace: close",
    ]


@scenario("fua-without-lua-flush", serve("minimal.lua", client=fua_client))
def _fua_minimal(o: Observation) -> None:
    # FUA is advertised and succeeds although nothing can flush.
    assert o.caps["can_fua"] is True
    assert o.outcome("write#1 512@0") == "ok"
    assert o.outcome("trim fua") == "EINVAL"  # trim itself is not supported


def block_status_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.block_status(h, 65536, 0)
    s.write(h, 1, 512, 4096)
    s.block_status(h, 10000, 1000)
    s.block_status(h, 10000, 1000, nbd.CMD_FLAG_REQ_ONE)
    s.block_status(h, 512, 65536 - 512)


@scenario("block-status", serve("ramdisk.lua", "size=65536", client=block_status_client))
def _block_status(o: Observation) -> None:
    # Lua has no extents: one "allocated data" extent for the request.
    assert [v for _, v in o.ops if _.startswith("block")] == [
        "extents [(65536, 0)]",
        "extents [(10000, 0)]",
        "extents [(10000, 0)]",
        "extents [(512, 0)]",
    ]


# ===========================================================================
# nbdinfo as a separate process


def nbdinfo_client(s: Session) -> None:
    s.record("json", s.nbdinfo_json())
    s.record("map", s.nbdinfo("--map"))
    s.record("list", s.nbdinfo_json("--list"))


@scenario("nbdinfo-ramdisk", serve("ramdisk.lua", "size=65536", client=nbdinfo_client))
def _nbdinfo_ramdisk(o: Observation) -> None:
    j = o.extra["json"]
    assert j["protocol"] == "newstyle-fixed" and j["structured"] is True
    (e,) = j["exports"]
    assert e["export-size"] == 65536 and e["export-name"] == ""
    assert e["can_flush"] is True and e["can_trim"] is True and e["is_read_only"] is False
    assert e["contexts"] == ["base:allocation"]
    assert o.extra["map"] == (0, "         0       65536    0  data\n")
    assert [x["export-name"] for x in o.extra["list"]["exports"]] == [""]


@scenario(
    "nbdinfo-readonly-option",
    serve("ramdisk.lua", "size=65536", options=("-r",), client=nbdinfo_client),
)
def _nbdinfo_readonly(o: Observation) -> None:
    (e,) = o.extra["json"]["exports"]
    assert e["is_read_only"] is True
    assert e["can_trim"] is False and e["can_zero"] is False and e["can_fua"] is False


@scenario(
    "nbdinfo-trace",
    serve(
        "ramdisk.lua", "size=65536", "trace=1", client=lambda s: s.record("json", s.nbdinfo_json())
    ),
)
def _nbdinfo_trace(o: Observation) -> None:
    # nbdinfo sends NBD_OPT_INFO and then NBD_OPT_GO: the export is opened twice.
    assert o.log.count("trace: open readonly=false (boolean)") == 2
    assert o.log.count("trace: close") == 2


@scenario(
    "nbdinfo-open-fails",
    serve("ramdisk.lua", "fail=get_size", client=lambda s: s.record("rc", s.nbdinfo("--size")[0])),
)
def _nbdinfo_open_fails(o: Observation) -> None:
    assert o.extra["rc"] == 1
    assert o.errors() and set(o.errors()) == {injected("get_size")}


# ===========================================================================
# Other modes: --run, -s, --dump-plugin, SIGTERM

RUN_VARS = (
    'echo "sock=$unixsocket"; echo "uri=$uri"; echo "nbd=$nbd"; echo "port=$port"; '
    'echo "exportname=$exportname"; echo "tls=${tls-unset}"; nbdinfo --size "$uri"; exit 3'
)


@scenario(
    "captive-run", lambda server: observe_captive(server, "ramdisk.lua", ["size=65536"], RUN_VARS)
)
def _captive(o: Observation) -> None:
    assert o.exit_code == 3  # the command's status
    assert o.extra["stdout"] == (
        "sock=<SOCK>\nuri=nbd+unix://?socket=<SOCK>\nnbd=nbd+unix://?socket=<SOCK>\n"
        "port=\nexportname=\ntls=unset\n65536\n"
    )
    assert o.extra["socket_removed"] is True
    assert o.log == []


@scenario(
    "captive-run-error",
    lambda server: observe_captive(
        server,
        "ramdisk.lua",
        ["fail=pread"],
        'echo "sock=$unixsocket"; nbdsh -u "$uri" -c "h.pread(512, 0)"',
    ),
)
def _captive_error(o: Observation) -> None:
    assert o.exit_code == 1
    assert o.log == [
        injected("pread"),
        "nbdsh: command line script failed: nbd_pread: read: command failed: Input/output error",
    ]


def single_client(s: Session, h: nbd.NBD) -> None:
    s.write(h, 1, 512, 0)
    s.read(h, 1024, 0)


@scenario(
    "single-connection",
    lambda server: observe_single(server, "ramdisk.lua", ["size=65536", "trace=1"], single_client),
)
def _single(o: Observation) -> None:
    assert o.connect_error is None and o.size == 65536
    assert o.outcome("read 1024@0") == describe(pattern(1, 512) + bytes(512))
    assert o.extra["server_exited"] is True
    assert o.log[-1] == "trace: close"


def dump_plugin(server: Server) -> Observation:
    o = run_plain(
        server, ["--dump-plugin", "lua", "ramdisk.lua", "trace=1", "size=4096"], "ramdisk.lua"
    )
    lines: list[str] = o.extra.pop("stdout", [])
    # Only the script's own output is compared (it must come last, after a
    # lua_version= line); the other lines describe the server itself.
    script = [i for i, x in enumerate(lines) if x.startswith("ramdisk_")]
    o.extra["script_lines"] = [lines[i] for i in script]
    o.extra["script_lines_last"] = bool(script) and script[0] == len(lines) - len(script)
    o.extra["has_lua_version"] = any(x.startswith("lua_version=") for x in lines)
    return o


@scenario("dump-plugin", dump_plugin)
def _dump_plugin(o: Observation) -> None:
    assert o.exit_code == 0
    assert o.extra == {
        "script_lines": ["ramdisk_dump=yes", "ramdisk_page=4096"],
        "script_lines_last": True,
        "has_lua_version": True,
    }
    # config runs (size=4096 is traced), config_complete does not.
    assert o.log == ["trace: config size=4096 (string, string)"]


def sigterm_client(s: Session) -> None:
    h = s.connect_and_probe()
    s.read(h, 512, 0)
    s.kill(signal.SIGTERM)
    time.sleep(0.3)  # let the server see the signal
    s.read(h, 512, 0)
    s.disconnect(h)
    s.record("exit status", s.wait_exit())


@scenario("sigterm-with-client", serve("ramdisk.lua", client=sigterm_client))
def _sigterm(o: Observation) -> None:
    # After SIGTERM, requests get ESHUTDOWN; the server exits 0 (nbdkit
    # waits for the client to go away).
    assert [v for _, v in o.ops] == [ZEROES(512), "ESHUTDOWN"]
    assert o.extra["exit status"] == 0
    assert o.log == []


# ===========================================================================
# The tests

_nbdkit_cache: dict[str, Observation] = {}


def nbdkit_observation(sc: Scenario) -> Observation:
    if sc.name not in _nbdkit_cache:
        _nbdkit_cache[sc.name] = sc.run(NBDKIT)
    return _nbdkit_cache[sc.name]


NAMES = list(SCENARIOS)


@pytest.mark.parametrize("name", NAMES)
def test_nbdkit_oracle(name: str) -> None:
    sc = SCENARIOS[name]
    o = nbdkit_observation(sc)
    assert not o.timed_out, o.stderr
    sc.expect(o)


def normalise_flush_quirk(expected: Observation, got: Observation) -> Observation:
    """Check the documented can_flush difference and return ``got`` with it
    taken out: nbdkit says can_flush=false and refuses FLUSH, luanbd says
    true and its FLUSH reaches the Lua flush and succeeds."""
    assert expected.caps.get("can_flush") is False, "nbdkit should not advertise flush here"
    assert got.caps.get("can_flush") is True, "luanbd must advertise flush when flush is defined"
    ops = []
    log = list(got.log)
    for (label, outcome), (_, want) in zip(got.ops, expected.ops, strict=False):
        if label == "flush(quirk)":
            assert outcome == "ok", f"FLUSH must work on luanbd, got {outcome}"
            assert "flush_only: flush called" in log, "FLUSH must call the Lua flush"
            log.remove("flush_only: flush called")
            ops.append((label, want))
        else:
            ops.append((label, outcome))
    ops.extend(got.ops[len(ops) :])
    return replace(got, caps={**got.caps, "can_flush": False}, ops=ops, log=log)


ERROR_OBJECT = re.compile(r"\(error object is a \w+ value\)")
#: What luanbd logs for an error value with a __tostring metamethod (ramdisk.lua how=meta).
TOSTRING_ERROR = re.compile(r"(?<=: )meta$")


def normalise_error_objects(got: Observation) -> Observation:
    """The second documented difference: a non-string Lua error value is logged as
    ``(error object is a table value)`` (as lua.c does), or through its __tostring
    metamethod, where nbdkit logs ``(null)``."""

    def fix(text: str | None) -> str | None:
        if text is None:
            return None
        return TOSTRING_ERROR.sub("(null)", ERROR_OBJECT.sub("(null)", text))

    return replace(got, log=[fix(line) or "" for line in got.log],
                   startup_error=fix(got.startup_error))


@pytest.mark.parametrize("name", NAMES)
def test_luanbd_matches(name: str) -> None:
    sc = SCENARIOS[name]
    expected = nbdkit_observation(sc)
    got = sc.run(LUANBD)
    if sc.flush_quirk:
        got = normalise_flush_quirk(expected, got)
    got = normalise_error_objects(got)
    assert got.comparable() == expected.comparable(), diff_observations(expected, got)


def test_scenario_count() -> None:
    assert len(SCENARIOS) >= 20
