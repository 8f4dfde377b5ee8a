"""nbdkit's newer helpers in the ``nbdkit`` table: parse_probability (1.36), parse_delay
(1.40), parse_int & co (1.16), stdio_safe (1.20), nanosleep (1.16).

nbdkit 1.32.5's Python module has none of these, so the answers are checked three ways:
the vectors of nbdkit's own server/test-public.c (read by libnbd from a running luanbd),
nbdkit's C code re-run over this machine's glibc (sscanf, strtol... through ctypes) on
generated strings, and what the manual pages say.
"""

from __future__ import annotations

import ctypes
import errno
import math
import signal
import time
from pathlib import Path

import pytest
from apitest import LUANBD, PLUGINS, Servers, outcome
from hypothesis import given, settings
from hypothesis import strategies as st

from luanbd.backend import helpers

nbd = pytest.importorskip("nbd")

PROBE = PLUGINS / "probe.lua"
SECTOR = 512


def values(servers: Servers, *exprs: str, key: str = "expr", **kw: object) -> list[str]:
    h = servers.connect(PROBE, *(f"{key}={e}" for e in exprs), **kw)  # type: ignore[arg-type]
    n = h.get_size() // SECTOR
    return [bytes(h.pread(SECTOR, i * SECTOR)).decode().rstrip(" ") for i in range(n)]


def lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- nbdkit's server/test-public.c vectors, through a server ------------------------------
PROBABILITY_BAD = ["", "garbage", "0garbage", "1X", "1%%", "1:", "1:1:1", "1:0", "1/", "1/2/3",
                   "inf", "nan", "inf/nan", "nan/inf", "inf/inf", "nan/nan", "-1", "-0",
                   "1e200/1e-200", "-1/1"]
PROBABILITY_GOOD = {"0": 0, "1": 1, "2": 2, "0.1": 0.1, "0.5": 0.5, "0.9": 0.9, "1.0000": 1,
                    "1e-1": 0.1, "1e-8": 1e-8, "0%": 0, "50%": 0.5, "100%": 1, "90.25%": 0.9025,
                    "1:1000": 0.001, "1/1000": 0.001, "2:99": 2.0 / 99, "2/99": 2.0 / 99,
                    "0:1000000": 0}


def test_parse_probability_vectors(servers: Servers) -> None:
    good = list(PROBABILITY_GOOD)
    exprs = [f"string.format('%s %.17g', math.type(nbdkit.parse_probability('test', "
             f"{lua_string(s)})), nbdkit.parse_probability('test', {lua_string(s)}))"
             for s in good]
    # (in parentheses: not a tail call, so the error names the expression's line)
    exprs += [f"(nbdkit.parse_probability('test', {lua_string(s)}))" for s in PROBABILITY_BAD]
    got = values(servers, *exprs)
    for s, line in zip(good, got[:len(good)], strict=True):
        kind, number = line.split()[2:]
        assert kind == "float" and float(number) == PROBABILITY_GOOD[s], (s, line)
    for s, line in zip(PROBABILITY_BAD, got[len(good):], strict=True):
        assert line == f"err expr:1: test: could not parse '{s}' as a probability", (s, line)


DELAY_BAD = ["", "garbage", "0garbage", "s0", "0ss", "0ssss", "000ssss", "1X", "1%%", "1:",
             "1:1:1", "1?", "inf", "nan", "-1"]
DELAY_GOOD = {"0": (0, 0), "0s": (0, 0), "1": (1, 0), "1s": (1, 0), "1.234": (1, 234000000),
              "1.234s": (1, 234000000), "0ms": (0, 0), "1ms": (0, 1000000),
              "1.234ms": (0, 1234000), "0us": (0, 0), "0μs": (0, 0), "1us": (0, 1000),
              "1μs": (0, 1000), "1.234us": (0, 1234), "1.234μs": (0, 1234), "0ns": (0, 0),
              "1ns": (0, 1), "999999999ns": (0, 999999999), "1000000000ns": (1, 0),
              "1000000001ns": (1, 1), "2000000001ns": (2, 1)}


def test_parse_delay_vectors(servers: Servers) -> None:
    good = list(DELAY_GOOD)
    exprs = [f"string.format('%s %s %d %d', math.type((nbdkit.parse_delay('test', "
             f"{lua_string(s)}))), math.type(select(2, nbdkit.parse_delay('test', "
             f"{lua_string(s)}))), nbdkit.parse_delay('test', {lua_string(s)}))" for s in good]
    exprs += [f"(nbdkit.parse_delay('test', {lua_string(s)}))" for s in DELAY_BAD]
    got = values(servers, *exprs)
    for s, line in zip(good, got[:len(good)], strict=True):
        sec, nsec = DELAY_GOOD[s]
        assert line == f"ok string integer integer {sec} {nsec}", (s, line)
    for s, line in zip(DELAY_BAD, got[len(good):], strict=True):
        assert line == f'err expr:1: test: could not parse delay or sleep: "{s}"', (s, line)


def test_parse_delay_feeds_nanosleep(servers: Servers) -> None:
    assert values(servers, "nbdkit.nanosleep(nbdkit.parse_delay('d', '20ms'))") == \
        ["ok boolean true"]


def test_parse_delay_longer_than_an_unsigned_is_refused(servers: Servers) -> None:
    assert values(servers, "nbdkit.parse_delay('d', '4294967295.5')",
                  "(nbdkit.parse_delay('d', '4294967296'))") == \
        ["ok number 4294967295", 'err expr:1: d: could not parse delay or sleep: "4294967296"']


INT_OK = [("int", "0", 0), ("int", "   1", 1), ("int", "99", 99), ("int", "0x1", 1),
          ("int", "0Xff", 255), ("int", "07", 7), ("int", "010", 8), ("int", " +0", 0),
          ("int", "+0xf", 15), ("int", "+010", 8), ("int", "  -0", 0), ("int", "-99", -99),
          ("int", "-0XF", -15), ("int", "-010", -8), ("int", "2147483647", 2147483647),
          ("int", "-2147483648", -2147483648), ("unsigned", " 0", 0),
          ("unsigned", "0xff", 255), ("unsigned", "+010", 8),
          ("unsigned", "4294967295", 4294967295), ("int8_t", "0x7f", 127),
          ("int8_t", "-0x80", -128), ("uint8_t", "0xff", 255), ("int16_t", "-0x8000", -32768),
          ("uint16_t", "0xffff", 65535), ("int32_t", "-0x80000000", -2**31),
          ("uint32_t", "0xffffffff", 2**32 - 1), ("int64_t", "0x7fffffffffffffff", 2**63 - 1),
          ("int64_t", "-0x8000000000000000", -2**63)]
RANGE = "Numerical result out of range"
INT_BAD = [("int", "", "empty string where we expected a number"),
           ("int", "- 0", "empty string where we expected a number"),
           ("int", "++0", "empty string where we expected a number"),
           ("int", "garbage", "empty string where we expected a number"),
           ("int", "0x", 'could not parse number: "0x": trailing garbage'),
           ("int", "08", 'could not parse number: "08": trailing garbage'),
           ("int", "0x1p1", 'could not parse number: "0x1p1": trailing garbage'),
           ("int", "42e42", 'could not parse number: "42e42": trailing garbage'),
           ("int", "0.0", 'could not parse number: "0.0": trailing garbage'),
           ("int", "1,000", 'could not parse number: "1,000": trailing garbage'),
           ("int", "2147483648", f'could not parse number: "2147483648": {RANGE}'),
           ("int", "-2147483649", f'could not parse number: "-2147483649": {RANGE}'),
           ("int", "999999999999999999999999x",
            f'could not parse number: "999999999999999999999999x": {RANGE}'),
           ("unsigned", "-0", "negative numbers are not allowed"),
           ("unsigned", " -99", "negative numbers are not allowed"),
           # nbdkit goes past the spaces before it looks, and prints what is left
           ("unsigned", "  12x", 'could not parse number: "12x": trailing garbage'),
           ("int8_t", "0x80", f'could not parse number: "0x80": {RANGE}'),
           ("uint8_t", "0x100", f'could not parse number: "0x100": {RANGE}'),
           ("int16_t", "-0x8001", f'could not parse number: "-0x8001": {RANGE}'),
           ("uint16_t", "-1", "negative numbers are not allowed"),
           ("int32_t", "0x80000000", f'could not parse number: "0x80000000": {RANGE}'),
           ("uint32_t", "0x100000000", f'could not parse number: "0x100000000": {RANGE}'),
           ("int64_t", "-0x8000000000000001",
            f'could not parse number: "-0x8000000000000001": {RANGE}'),
           ("uint64_t", "0x10000000000000000",
            f'could not parse number: "0x10000000000000000": {RANGE}'),
           ("uint64_t", "-1", "negative numbers are not allowed")]


def fn(ctype: str) -> str:
    return "nbdkit.parse_int" if ctype == "int" else f"nbdkit.parse_{ctype}"


def test_parse_int_family_vectors(servers: Servers) -> None:
    exprs = [f"{fn(t)}('test', {lua_string(s)})" for t, s, _ in INT_OK]
    exprs += [f"({fn(t)}('test', {lua_string(s)}))" for t, s, _ in INT_BAD]
    got = values(servers, *exprs)
    for (t, s, want), line in zip(INT_OK, got[:len(INT_OK)], strict=True):
        assert line == f"ok number {want}", (t, s, line)
    for (t, s, message), line in zip(INT_BAD, got[len(INT_OK):], strict=True):
        assert line == f"err expr:1: test: {message}", (t, s, line)


def test_parse_uint64_t_wraps_like_lua_hex_literals(servers: Servers) -> None:
    got = values(servers, "nbdkit.parse_uint64_t('n', '0xffffffffffffffff')",
                 "nbdkit.parse_uint64_t('n', '18446744073709551615') == 0xffffffffffffffff",
                 "math.ult(nbdkit.parse_uint64_t('n', '9223372036854775807'), "
                 "nbdkit.parse_uint64_t('n', '9223372036854775808'))",
                 "math.type(nbdkit.parse_int64_t('n', '1'))")
    assert got == ["ok number -1", "ok boolean true", "ok boolean true", "ok string integer"]


@pytest.mark.parametrize("call,arg,got", [
    ("nbdkit.parse_probability(1, '1')", 1, "number"),
    ("nbdkit.parse_probability('p')", 2, "nil"),
    ("nbdkit.parse_delay('d', 5)", 2, "number"),
    ("nbdkit.parse_int(nil, '1')", 1, "nil"),
    ("nbdkit.parse_uint16_t('n', {})", 2, "table"),
])
def test_parser_argument_types(servers: Servers, call: str, arg: int, got: str) -> None:
    name = call[:call.index("(")]
    assert values(servers, f"({call})") == [
        f"err expr:1: bad argument #{arg} to '{name}' (string expected, got {got})"]


# --- the same C code over glibc, on generated strings -------------------------------------
libc = ctypes.CDLL("libc.so.6", use_errno=True)
_ALPHABET = "0123456789abcdefxXpPeE.+-:/% \tsmunaiftyμ()"
_STRINGS = st.text(alphabet=_ALPHABET, max_size=14)


def c_parse_probability(s: str) -> float | None:
    """nbdkit_parse_probability's body, each step the same libc call."""
    raw = s.encode()
    d, d2, n = ctypes.c_double(), ctypes.c_double(), ctypes.c_int()
    sep = ctypes.create_string_buffer(len(raw) + 2)   # nbdkit's `char c` would overflow
    if libc.sscanf(raw, b"%lg%[:/]%lg%n", ctypes.byref(d), sep, ctypes.byref(d2),
                   ctypes.byref(n)) == 3 and raw[n.value:] == b"":
        if d.value == 0.0 and d2.value == 0.0:
            value = d.value
        elif d2.value == 0:
            return None
        else:
            value = d.value / d2.value
    elif libc.sscanf(raw, b"%lg%n", ctypes.byref(d), ctypes.byref(n)) == 1:
        value = d.value
        if raw[n.value:] == b"%":
            value /= 100.0
        elif raw[n.value:] != b"":
            return None
    else:
        return None
    if not math.isfinite(value) or math.copysign(1.0, value) < 0:
        return None
    return value


def c_parse_delay(s: str) -> tuple[int, int] | None:
    raw = s.encode()
    d, n = ctypes.c_double(), ctypes.c_int()
    if libc.sscanf(raw, b"%lg%n", ctypes.byref(d), ctypes.byref(n)) != 1:
        return None
    value, rest = d.value, raw[n.value:]
    divisors = {b"": 1, b"s": 1, b"ms": 1000, b"us": 1000000, "μs".encode(): 1000000,
                b"ns": 1000000000}
    if rest not in divisors:
        return None
    if divisors[rest] != 1:
        value /= divisors[rest]
    if not math.isfinite(value) or math.copysign(1.0, value) < 0:
        return None
    if value >= 2**32:
        return None   # luanbd refuses what C's `unsigned` cannot hold (undefined there)
    sec = int(value)
    return sec, int((value - sec) * 1000000000.0)


def c_parse_int(s: str, ctype: str) -> int | str:
    """nbdkit_parse_<ctype>: the value, or the message after "what: "."""
    lo, hi = helpers.INT_TYPES[ctype]
    raw = s.encode()
    if lo == 0:
        raw = raw.lstrip(b" \t\n\v\f\r")
        if raw.startswith(b"-"):
            return "negative numbers are not allowed"
    fn = libc.strtoll if lo < 0 else libc.strtoull
    fn.restype = ctypes.c_longlong if lo < 0 else ctypes.c_ulonglong
    buf = ctypes.create_string_buffer(raw)
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    r = fn(buf, ctypes.byref(end), 0)
    err = ctypes.get_errno()
    if not lo <= r <= hi:
        err = errno.ERANGE
    shown = raw.decode()
    consumed = ctypes.cast(end, ctypes.c_void_p).value - ctypes.addressof(buf)  # type: ignore[operator]
    if err:
        return f'could not parse number: "{shown}": {RANGE}'
    if consumed == 0:
        return "empty string where we expected a number"
    if consumed != len(raw):
        return f'could not parse number: "{shown}": trailing garbage'
    return int(r)


def ours(parse: object, *args: str) -> object:
    try:
        return parse(*args)  # type: ignore[operator]
    except ValueError as err:
        return str(err)


@settings(max_examples=3000, deadline=None)
@given(_STRINGS)
def test_parse_probability_is_nbdkits_over_glibc(s: str) -> None:
    want = c_parse_probability(s)
    got = ours(helpers.parse_probability, "w", s)
    assert got == (f"w: could not parse '{s}' as a probability" if want is None else want)


@settings(max_examples=3000, deadline=None)
@given(_STRINGS)
def test_parse_delay_is_nbdkits_over_glibc(s: str) -> None:
    want = c_parse_delay(s)
    got = ours(helpers.parse_delay, "w", s)
    assert got == (f'w: could not parse delay or sleep: "{s}"' if want is None else want)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX+- \t8g", max_size=24),
       st.sampled_from(sorted(helpers.INT_TYPES)))
def test_parse_int_is_nbdkits_over_glibc(s: str, ctype: str) -> None:
    want = c_parse_int(s, ctype)
    got = ours(helpers.parse_int, "w", s, ctype)
    assert got == (want if isinstance(want, int) else f"w: {want}")


# --- stdio_safe ------------------------------------------------------------------------------
STDIO_SCRIPT = """
API_VERSION = 2  -- (API 1 scripts have no get_ready)
local at = {}
at.load = nbdkit.stdio_safe()
function config(k, v) at.config = nbdkit.stdio_safe() end
function config_complete() at.config_complete = nbdkit.stdio_safe() end
function get_ready() at.get_ready = nbdkit.stdio_safe() end
function dump_plugin() print("config=" .. tostring(at.config)) end
function open(ro) at.open = nbdkit.stdio_safe(); return {} end
function get_size(h) return 512 end
function pread(h, count, offset, flags)
  local s = string.format("load=%s config=%s config_complete=%s get_ready=%s open=%s",
    at.load, at.config, at.config_complete, at.get_ready, at.open)
  return s .. string.rep(" ", count - #s)
end
"""


def test_stdio_safe(servers: Servers, tmp_path: Path) -> None:
    """True until nbdkit's `configured` (after get_ready), and never with -s."""
    script = tmp_path / "stdio.lua"
    script.write_text(STDIO_SCRIPT)
    r = servers.captive(script, "k=v", run='nbdsh -u "$uri" -c "print(h.pread(512, 0).decode())"')
    assert r.stdout.split() == ["load=true", "config=true", "config_complete=true",
                                "get_ready=true", "open=false"]
    h = servers.connect(script, "k=v")   # -s: stdin and stdout are the client
    assert bytes(h.pread(SECTOR, 0)).decode().split() == [
        "load=false", "config=false", "config_complete=false", "get_ready=false",
        "open=false"]
    dump = servers.run([LUANBD, str(script), "k=v", "--dump-plugin"])
    assert "config=true" in dump.stdout.splitlines()


# --- nanosleep --------------------------------------------------------------------------------
def test_nanosleep_sleeps(servers: Servers) -> None:
    # (integral floats are integers, as for every integer argument of the table)
    h = servers.connect(PROBE, "expr=nbdkit.nanosleep(0, 300000000)",
                        "expr=nbdkit.nanosleep(0.0, 3e8)", "expr=1")
    for i in (0, 1):
        start = time.monotonic()
        assert bytes(h.pread(SECTOR, i * SECTOR)).rstrip(b" ") == b"ok boolean true"
        assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    h.pread(SECTOR, 2 * SECTOR)
    assert time.monotonic() - start < 0.3


def test_nanosleep_errors(servers: Servers) -> None:
    got = values(servers, "(nbdkit.nanosleep(2147483647, 0))",
                 "(nbdkit.nanosleep(2147483646, 1000000000))",
                 "(nbdkit.nanosleep(-1, 0))", "(nbdkit.nanosleep(0, 0.5))",
                 "(nbdkit.nanosleep('1', 0))", "(nbdkit.nanosleep(0, 4294967296))",
                 "nbdkit.nanosleep(0)")
    bad = "bad argument #%d to 'nbdkit.nanosleep' (integer from 0 to 4294967295 expected, got %s)"
    assert got == ["err expr:1: sleep request is too long", "err expr:1: sleep request is too long",
                   "err expr:1: " + bad % (1, "-1"), "err expr:1: " + bad % (2, "0.5"),
                   "err expr:1: " + bad % (1, "string"),
                   "err expr:1: " + bad % (2, "4294967296"), "ok boolean true"]


def test_nanosleep_too_long_is_einval(servers: Servers) -> None:
    h = servers.connect(PROBE, "raise=nbdkit.nanosleep(2147483647, 0)")
    assert outcome(lambda: h.pread(SECTOR, 0)).errno == errno.EINVAL


def test_nanosleep_ends_when_the_server_stops(servers: Servers) -> None:
    """SIGTERM during a 60 s sleep: the read fails at once with ESHUTDOWN, with nbdkit's
    message, and the server exits."""
    sock = servers.listen(PROBE, "raise=nbdkit.nanosleep(60, 0)")
    proc = servers.procs[-1]
    h = nbd.NBD()
    h.connect_unix(str(sock))
    cookie = h.aio_pread(nbd.Buffer(SECTOR), 0)
    time.sleep(0.5)                       # the callback is asleep
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    def wait() -> None:
        while not h.aio_command_completed(cookie):
            assert time.monotonic() - start < 10
            h.poll(1000)
    result = outcome(wait)
    assert time.monotonic() - start < 10
    assert result.errno == errno.ESHUTDOWN
    assert proc.wait(10) == 0
    assert "aborting sleep because of server shut down" in servers.stderr("luanbd")
