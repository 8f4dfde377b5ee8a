"""The API 2 callbacks, seen through libnbd and compared with ``nbdkit python``.

Most tests run ``plugins/matrix.lua`` under luanbd and its twin ``plugins/matrix.py`` under
``nbdkit python`` with the same config keys, do the same thing with libnbd, and require the
same answer from both, and the answer written down in the test (so that a test fails when
both servers agree on something wrong).  The plugins record their callbacks into a file
(``log=``), so emulation (FUA by flush, zero by pwrite, cache by pread) is counted call
by call.
"""

from __future__ import annotations

import errno
import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apitest import (
    HAVE_NBDKIT_PYTHON,
    LUANBD,
    PLUGINS,
    Outcome,
    Servers,
    data_calls,
    needs_nbdkit_python,
    outcome,
    read_log,
)

nbd = pytest.importorskip("nbd")

MiB = 1024 * 1024
SERVERS = ("luanbd", "nbdkit") if HAVE_NBDKIT_PYTHON else ("luanbd",)
CAPS = ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
        "can_multi_conn", "can_cache", "is_rotational", "can_df")


def matrix(server: str) -> Path:
    return PLUGINS / ("matrix.lua" if server == "luanbd" else "matrix.py")


def observe(servers: Servers, server: str, params: tuple[str, ...],
            action: Callable[[Any], Any], **kw: Any) -> tuple[Any, list[str]]:
    """Connect to the matrix plugin of ``server`` and run ``action(handle)``;
    (its result, the plugin's data calls)."""
    log = servers.log_path(server)
    h = servers.connect(matrix(server), f"log={log}", *params, server=server, **kw)
    return action(h), data_calls(log)


def on_both(servers: Servers, params: tuple[str, ...], action: Callable[[Any], Any],
            **kw: Any) -> dict[str, tuple[Any, list[str]]]:
    return {s: observe(servers, s, params, action, **kw) for s in SERVERS}


def capabilities(h: Any) -> dict[str, Any]:
    caps: dict[str, Any] = {c: getattr(h, c)() for c in CAPS}
    caps["size"] = h.get_size()
    return caps


# --- capabilities and their defaults ----------------------------------------------------
DEFAULT_CAPS = dict(is_read_only=False, can_flush=True, can_fua=True, can_trim=True,
                    can_zero=True, can_fast_zero=False, can_multi_conn=False,
                    can_cache=True, is_rotational=False, can_df=True, size=MiB)
READ_ONLY = dict(is_read_only=True, can_trim=False, can_zero=False, can_fua=False,
                 can_fast_zero=False)

CAPABILITY_CASES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    # Every callback present, no can_*: the defaults nbdkit derives from which exist.
    "defaults": ((), {}),
    "size": (("size=3M",), dict(size=3 * MiB)),
    "no pwrite -> read-only": (("omit=pwrite",), READ_ONLY),
    "can_write false": (("can_write=false",), READ_ONLY),
    "no flush -> no flush, no fua": (("omit=flush",), dict(can_flush=False, can_fua=False)),
    "can_flush false keeps fua": (("can_flush=false",), dict(can_flush=False)),
    "no trim": (("omit=trim",), dict(can_trim=False)),
    "can_trim false": (("can_trim=false",), dict(can_trim=False)),
    "no zero -> emulated, fast zero refused": (("omit=zero",), dict(can_fast_zero=True)),
    "can_zero false": (("can_zero=false",), dict(can_fast_zero=True)),
    "can_fast_zero true": (("can_fast_zero=true",), dict(can_fast_zero=True)),
    "can_fua none": (("can_fua=none",), dict(can_fua=False)),
    "can_fua emulate": (("can_fua=emulate",), {}),
    "can_fua native": (("can_fua=native",), {}),
    "no cache": (("omit=cache",), dict(can_cache=False)),
    "can_cache none": (("can_cache=none",), dict(can_cache=False)),
    "can_cache emulate": (("can_cache=emulate", "omit=cache"), {}),
    "is_rotational": (("is_rotational=true",), dict(is_rotational=True)),
    "can_multi_conn": (("can_multi_conn=true",), dict(can_multi_conn=True)),
    "nothing optional": (("omit=pwrite,flush,trim,zero,cache,extents",),
                         {**READ_ONLY, "can_flush": False, "can_cache": False}),
}


@pytest.mark.parametrize("case", list(CAPABILITY_CASES))
def test_capabilities(servers: Servers, case: str) -> None:
    params, changes = CAPABILITY_CASES[case]
    expected = {**DEFAULT_CAPS, **changes}
    seen = on_both(servers, params, capabilities)
    for server, (caps, _) in seen.items():
        assert caps == expected, server


def test_capabilities_without_structured_replies(servers: Servers) -> None:
    seen = on_both(servers, (), capabilities, structured=False)
    for server, (caps, _) in seen.items():
        assert caps == {**DEFAULT_CAPS, "can_df": False}, server


def test_readonly_server_does_not_ask_can_write(servers: Servers) -> None:
    for server in SERVERS:
        log = servers.log_path(server)
        h = servers.connect(matrix(server), f"log={log}", "can_write=true", server=server,
                            readonly=True)
        assert h.is_read_only()
        assert not h.can_fua() and not h.can_trim() and not h.can_zero()
        calls = read_log(log)
        assert "open true " in calls, (server, calls)
        assert "can_write" not in calls, server
        err = outcome(lambda h=h: h.pwrite(b"x" * 512, 0))
        assert err.errno == errno.EPERM, server


def test_capabilities_are_asked_once_per_connection(servers: Servers) -> None:
    log = servers.log_path()
    h = servers.connect(matrix("luanbd"), f"log={log}", "can_fua=native", "can_cache=native",
                        "is_rotational=false")
    for _ in range(3):
        h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_FUA)
        h.cache(512, 0)
    calls = read_log(log)
    assert calls.count("can_fua") == 1
    assert calls.count("can_cache") == 1
    assert calls.count("is_rotational") == 1


def test_multi_conn_hidden_under_serialize_connections(servers: Servers) -> None:
    seen = on_both(servers, ("can_multi_conn=true", "thread_model=serialize_connections"),
                   lambda h: h.can_multi_conn())
    for server, (multi_conn, _) in seen.items():
        assert multi_conn is False, server


# --- data calls: flags, emulation, call counts ------------------------------------------
FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO
ENOTSUP = errno.ENOTSUP

DATA_CASES: dict[str, tuple[tuple[str, ...], Callable[[Any], Any], int | None, list[str]]] = {
    # name: (config, client action, expected errno or None, expected plugin data calls)
    "pread flags 0": ((), lambda h: h.pread(100, 5000), None, ["pread 100 5000 0"]),
    "pwrite": ((), lambda h: h.pwrite(b"x" * 4096, 0), None, ["pwrite 4096 0 0"]),
    "flush": ((), lambda h: h.flush(), None, ["flush 0"]),
    "pwrite FUA emulated by one flush": (
        (), lambda h: h.pwrite(b"x" * 4096, 0, FUA), None, ["pwrite 4096 0 0", "flush 0"]),
    "pwrite FUA emulated even if can_flush false": (
        ("can_flush=false",), lambda h: h.pwrite(b"x", 0, FUA), None,
        ["pwrite 1 0 0", "flush 0"]),
    "pwrite FUA native": (
        ("can_fua=native",), lambda h: h.pwrite(b"x" * 4096, 0, FUA), None,
        ["pwrite 4096 0 2"]),
    "trim": ((), lambda h: h.trim(4096, 0), None, ["trim 4096 0 0"]),
    "trim FUA emulated": (
        (), lambda h: h.trim(4096, 0, FUA), None, ["trim 4096 0 0", "flush 0"]),
    "trim FUA native": (
        ("can_fua=native",), lambda h: h.trim(4096, 0, FUA), None, ["trim 4096 0 2"]),
    "zero may_trim": ((), lambda h: h.zero(4096, 0), None, ["zero 4096 0 1"]),
    "zero NO_HOLE": ((), lambda h: h.zero(4096, 0, NO_HOLE), None, ["zero 4096 0 0"]),
    "zero FUA emulated": (
        (), lambda h: h.zero(4096, 0, FUA), None, ["zero 4096 0 1", "flush 0"]),
    "zero FUA native": (
        ("can_fua=native",), lambda h: h.zero(4096, 0, FUA), None, ["zero 4096 0 3"]),
    "zero FAST_ZERO passed on": (
        ("can_fast_zero=true",), lambda h: h.zero(4096, 0, FAST_ZERO), None,
        ["zero 4096 0 9"]),
    "zero without zero callback: pwrite": (
        ("omit=zero",), lambda h: h.zero(8192, 4096), None, ["pwrite 8192 4096 0"]),
    "zero with can_zero false: pwrite then flush for FUA": (
        ("can_zero=false",), lambda h: h.zero(8192, 4096, FUA), None,
        ["pwrite 8192 4096 0", "flush 0"]),
    "fast zero without zero callback fails at once": (
        ("omit=zero",), lambda h: h.zero(4096, 0, FAST_ZERO), ENOTSUP, []),
    "zero failing ENOTSUP falls back to pwrite": (
        ("fail=zero:95",), lambda h: h.zero(8192, 4096), None,
        ["zero 8192 4096 1", "pwrite 8192 4096 0"]),
    "fast zero failing ENOTSUP does not fall back": (
        ("fail=zero:95", "can_fast_zero=true"), lambda h: h.zero(8192, 4096, FAST_ZERO),
        ENOTSUP, ["zero 8192 4096 9"]),
    "zero fallback reports the pwrite errno": (
        ("fail=zero:95", "fail=pwrite:28"), lambda h: h.zero(8192, 4096), errno.ENOSPC,
        ["zero 8192 4096 1", "pwrite 8192 4096 0"]),
    "zero failing EIO does not fall back": (
        ("fail=zero:5",), lambda h: h.zero(4096, 0), errno.EIO, ["zero 4096 0 1"]),
    "cache native": ((), lambda h: h.cache(8192, 4096), None, ["cache 8192 4096 0"]),
    "cache emulated by pread": (
        ("can_cache=emulate",), lambda h: h.cache(8192, 4096), None, ["pread 8192 4096 0"]),
    "extents flags 0": (
        (), lambda h: h.block_status(4096, 0, lambda *a: 0), None, ["extents 4096 0 0"]),
    "extents REQ_ONE": (
        (), lambda h: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE), None,
        ["extents 4096 0 4"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_calls(servers: Servers, case: str) -> None:
    params, action, want_errno, want_calls = DATA_CASES[case]
    seen = on_both(servers, params, lambda h: outcome(lambda: action(h)))
    for server, (result, calls) in seen.items():
        assert result.errno == want_errno, (server, result)
        assert calls == want_calls, server


def test_data_round_trip(servers: Servers) -> None:
    def action(h: Any) -> list[bytes]:
        h.pwrite(b"A" * 6000, 1000)
        h.zero(2000, 3000)
        h.trim(4096, 8192)
        h.pwrite(b"B" * 10, MiB - 10, FUA)
        return [bytes(h.pread(7000, 0)), bytes(h.pread(10, MiB - 10))]

    seen = on_both(servers, (), action)
    want = [b"\0" * 1000 + b"A" * 2000 + b"\0" * 2000 + b"A" * 2000, b"B" * 10]
    for server, (data, _) in seen.items():
        assert data == want, server


def test_zero_emulation_writes_zeroes_in_chunks(servers: Servers) -> None:
    """luanbd emulates a big zero with pwrites of at most 1 MiB (nbdkit: up to 64 MiB per
    pwrite); they are contiguous, in order, and the data reads back as zeroes."""
    log = servers.log_path()
    h = servers.connect(matrix("luanbd"), f"log={log}", "omit=zero", "size=4M")
    h.pwrite(b"\xff" * (4 * MiB), 0)
    h.zero(3 * MiB, 4096)
    writes = [line.split() for line in data_calls(log)[1:]]
    assert all(w[0] == "pwrite" and int(w[1]) <= MiB and w[3] == "0" for w in writes)
    assert sum(int(w[1]) for w in writes) == 3 * MiB
    offsets = [int(w[2]) for w in writes]
    assert offsets[0] == 4096
    assert all(int(a[2]) + int(a[1]) == int(b[2]) for a, b in itertools.pairwise(writes))
    assert bytes(h.pread(3 * MiB + 2, 4095)) == b"\xff" + bytes(3 * MiB) + b"\xff"


def test_cache_native_without_cache_callback_succeeds(servers: Servers) -> None:
    """CACHE_NATIVE with no `cache` function: nothing to call, success (nbdkit's plugin
    layer does the same; nbdkit's *Python* plugin fails with "cache not implemented")."""
    (result, calls) = observe(servers, "luanbd", ("can_cache=native", "omit=cache"),
                              lambda h: outcome(lambda: h.cache(4096, 0)))
    assert result.ok
    assert calls == []


def test_fua_emulated_without_flush_callback_succeeds(servers: Servers) -> None:
    """can_fua returning FUA_EMULATE with no `flush`: the emulating flush is a no-op."""
    (result, calls) = observe(servers, "luanbd", ("can_fua=emulate", "omit=flush"),
                              lambda h: outcome(lambda: h.pwrite(b"x", 0, FUA)))
    assert result.ok
    assert calls == ["pwrite 1 0 0"]


# --- errors and errno ---------------------------------------------------------------------
# errno the plugin sets -> errno the client sees (nbdkit's mapping to NBD errors).
ERRNO_MAP = {
    0: errno.EIO,            # error() without set_error
    errno.EPERM: errno.EPERM,
    errno.ENOENT: errno.EINVAL,
    errno.EIO: errno.EIO,
    errno.ENOMEM: errno.ENOMEM,
    errno.EINVAL: errno.EINVAL,
    errno.EFBIG: errno.ENOSPC,
    errno.ENOSPC: errno.ENOSPC,
    errno.EROFS: errno.EPERM,
    errno.EOVERFLOW: errno.EINVAL,
    errno.ENOTSUP: errno.EINVAL,
    errno.ESHUTDOWN: errno.ESHUTDOWN,
    errno.E2BIG: errno.EINVAL,   # anything else
}


@pytest.mark.parametrize("plugin_errno", list(ERRNO_MAP))
def test_pread_errno_reaches_client(servers: Servers, plugin_errno: int) -> None:
    seen = on_both(servers, (f"fail=pread:{plugin_errno}",),
                   lambda h: outcome(lambda: h.pread(512, 0)))
    for server, (result, calls) in seen.items():
        assert result.errno == ERRNO_MAP[plugin_errno], server
        assert calls == ["pread 512 0 0"]


@pytest.mark.parametrize("callback,action", [
    ("pwrite", lambda h: h.pwrite(b"x" * 512, 0)),
    ("flush", lambda h: h.flush()),
    ("trim", lambda h: h.trim(512, 0)),
    ("zero", lambda h: h.zero(512, 0)),
    ("cache", lambda h: h.cache(512, 0)),
])
def test_each_data_callback_sets_errno(servers: Servers, callback: str,
                                       action: Callable[[Any], Any]) -> None:
    seen = on_both(servers, (f"fail={callback}:{errno.ENOSPC}",),
                   lambda h: outcome(lambda: action(h)))
    for server, (result, _) in seen.items():
        assert result.errno == errno.ENOSPC, server
    log = servers.stderr("luanbd")
    assert f"luanbd: error: {callback}: " in log
    assert "matrix.lua:" in log and f"injected failure in {callback}" in log


def test_failed_request_leaves_connection_usable(servers: Servers) -> None:
    log = servers.log_path()
    h = servers.connect(matrix("luanbd"), f"log={log}", "fail=flush:5")
    assert outcome(h.flush).errno == errno.EIO
    h.pwrite(b"still here", 0)
    assert bytes(h.pread(10, 0)) == b"still here"


@pytest.mark.parametrize("callback", ["open", "get_size"])
def test_open_failure_refuses_the_export(servers: Servers, callback: str) -> None:
    for server in SERVERS:
        with pytest.raises(nbd.Error) as err:
            servers.connect(matrix(server), f"fail={callback}:{errno.EPERM}", server=server)
        # NBD_REP_ERR_UNKNOWN, whatever the errno: libnbd says ENOENT.
        assert err.value.errnum == errno.ENOENT, server
    assert f"luanbd: error: {callback}: " in servers.stderr("luanbd")


def test_extents_failure(servers: Servers) -> None:
    seen = on_both(servers, (f"fail=extents:{errno.ENOSPC}",),
                   lambda h: outcome(lambda: h.block_status(4096, 0, lambda *a: 0)))
    for server, (result, _) in seen.items():
        assert result.errno == errno.ENOSPC, server


# --- extents -----------------------------------------------------------------------------
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


def block_status(h: Any, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    entries: list[int] = []

    def cb(meta: str, off: int, ents: list[int], err: Any) -> int:
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        assert off == offset
        entries.extend(ents)
        return 0

    h.block_status(count, offset, cb, flags)
    return list(zip(entries[::2], entries[1::2], strict=True))


def extents_queries(h: Any) -> dict[str, list[tuple[int, int]]]:
    h.pwrite(b"d" * 4096, 8192)
    h.pwrite(b"d" * 100, 20000)
    return {
        "whole": block_status(h, 65536, 0),
        "middle": block_status(h, 10000, 100),
        "inside one extent": block_status(h, 3000, 5000),
        "req_one": block_status(h, 65536, 0, nbd.CMD_FLAG_REQ_ONE),
        "req_one inside data": block_status(h, 100, 8202, nbd.CMD_FLAG_REQ_ONE),
        "end of disk": block_status(h, 4101, MiB - 4101),
    }


def covers(ext: list[tuple[int, int]], count: int) -> bool:
    return sum(length for length, _ in ext) >= count and \
        sum(length for length, _ in ext[:-1]) < count


def test_extents_hole_zero_and_data(servers: Servers) -> None:
    """Holes are HOLE|ZERO, written pages data; the first extent starts at the offset,
    neighbours of one type are merged, the reply covers the request, REQ_ONE gives one
    extent no longer than asked."""
    seen = on_both(servers, (), extents_queries)
    for server, (q, _) in seen.items():
        assert q["whole"][:4] == [(8192, HOLE_ZERO), (4096, 0), (4096, HOLE_ZERO),
                                  (4096, 0)], server
        assert q["whole"][4][1] == HOLE_ZERO and covers(q["whole"], 65536)
        assert q["middle"][0] == (8092, HOLE_ZERO) and q["middle"][1][1] == 0
        assert covers(q["middle"], 10000)
        assert len(q["inside one extent"]) == 1 and q["inside one extent"][0][1] == HOLE_ZERO
        assert q["inside one extent"][0][0] >= 3000
        assert q["req_one"] == [(8192, HOLE_ZERO)], server
        assert q["req_one inside data"] == [(100, 0)], server
        assert q["end of disk"] == [(4101, HOLE_ZERO)], server


@needs_nbdkit_python
def test_extents_exactly_as_nbdkit(servers: Servers) -> None:
    seen = on_both(servers, (), extents_queries)
    assert seen["luanbd"][0] == seen["nbdkit"][0]


@pytest.mark.parametrize("params", [("omit=extents",), ("can_extents=false",)])
def test_no_extents_means_all_data(servers: Servers, params: tuple[str, ...]) -> None:
    seen = on_both(servers, params, lambda h: (block_status(h, 65536, 0),
                                               block_status(h, 100, 5)))
    for server, ((whole, small), calls) in seen.items():
        assert whole == [(65536, 0)] and small == [(100, 0)], server
        assert calls == [], server


def test_nbdinfo_map(servers: Servers) -> None:
    out = {}
    for server in SERVERS:
        r = servers.captive(matrix(server), "size=64K", server=server, run=(
            'nbdsh -u "$uri" -c "h.pwrite(b\\"x\\" * 4096, 16384)" && '
            'nbdinfo --map --json "$uri"'))
        out[server] = [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]
    assert out["luanbd"] == [(0, 16384, 3), (16384, 4096, 0), (20480, 45056, 3)]
    if "nbdkit" in out:
        assert out["nbdkit"] == out["luanbd"]


# --- block size, names, descriptions, export lists ------------------------------------------
def block_sizes(h: Any) -> list[int]:
    return [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                          nbd.SIZE_MAXIMUM)]


@pytest.mark.parametrize("value,want", [
    (None, [0, 0, 0]),
    ("512,4096,4294967295", [512, 4096, 4294967295]),
    ("1,512,65536", [1, 512, 65536]),
    ("4096,65536,33554432", [4096, 65536, 33554432]),
    ("0,0,0", [0, 0, 0]),
    ("512,4096,-1", [512, 4096, 4294967295]),  # nbdkit's (uint32_t)-1
])
def test_block_size(servers: Servers, value: str | None, want: list[int]) -> None:
    params = () if value is None else (f"block_size={value}",)
    seen = on_both(servers, params, block_sizes)
    for server, (sizes, _) in seen.items():
        assert sizes == want, server


#: Each breaks one of nbdkit's rules (server/plugins.c checks them in this order), and a few
#: break two, where the first one named is the one reported.
BAD_BLOCK_SIZES = [
    "0,4096,65536", "131072,131072,131072", "0,0,65536",   # minimum between 1 and 64K
    "3,512,1024",                                          # minimum a power of 2
    "512,3000,65536", "512,0,65536",                       # preferred a power of 2
    "512,256,65536", "512,67108864,67108864",              # preferred between 512 and 32M
    "512,4096,1000", "4096,8192,12289", "512,4096,256",    # maximum -1 or a multiple
    "4096,512,65536", "512,4096,0",                        # minimum <= preferred <= maximum
]


@pytest.mark.parametrize("value", BAD_BLOCK_SIZES)
def test_bad_block_size_refuses_the_export(servers: Servers, value: str) -> None:
    """Refused by both, with the same words for the rule that was broken."""
    for server in SERVERS:
        with pytest.raises(nbd.Error):
            servers.connect(matrix(server), f"block_size={value}", server=server)
    ours = [line for line in servers.stderr("luanbd").splitlines() if "block_size" in line]
    assert len(ours) == 1, ours
    minimum, preferred, maximum = value.split(",")
    assert ours[0].endswith(f"(minimum={minimum} preferred={preferred} maximum={maximum})")
    if "nbdkit" in SERVERS:
        theirs = [line.split("error: ", 1)[1] for line in servers.stderr("nbdkit").splitlines()
                  if "plugin must set" in line]
        assert len(theirs) == 1, servers.stderr("nbdkit")
        assert f"block_size: {theirs[0]} (" in ours[0], (ours, theirs)


def names(h: Any) -> list[Any]:
    return [outcome(h.get_canonical_export_name), outcome(h.get_export_description)]


@pytest.mark.parametrize("params,kw,want", [
    # Without set_full_info libnbd does not ask for the name or the description.
    ((), {}, [Outcome(errno=ENOTSUP), Outcome(errno=ENOTSUP)]),
    (("description=hello world",), {"full_info": True},
     [Outcome(value=""), Outcome(value="hello world")]),
    (("default_export=dflt", "description=d"), {"full_info": True},
     [Outcome(value="dflt"), Outcome(value="d")]),
    (("default_export=dflt",), {"full_info": True, "export": "other"},
     [Outcome(value="other"), Outcome(errno=ENOTSUP)]),
    ((), {"full_info": True}, [Outcome(value=""), Outcome(errno=ENOTSUP)]),
])
def test_canonical_name_and_description(servers: Servers, params: tuple[str, ...],
                                        kw: dict[str, Any], want: list[Outcome]) -> None:
    seen = on_both(servers, params, names, **kw)
    for server, (got, _) in seen.items():
        assert got == want, server


def test_open_sees_canonical_export_name(servers: Servers) -> None:
    for server in SERVERS:
        log = servers.log_path(server)
        servers.connect(matrix(server), f"log={log}", "default_export=the-default",
                        server=server)
        calls = read_log(log)
        assert "default_export false false" in calls, server
        assert "open false the-default" in calls, server


def test_list_exports_nbdinfo(servers: Servers) -> None:
    out = {}
    for server in SERVERS:
        r = servers.captive(matrix(server), "exports=a,b:the b,c:", "description=D",
                            server=server, run='nbdinfo --list --json "$uri"')
        out[server] = [(e["export-name"], e.get("description"), e["export-size"])
                       for e in json.loads(r.stdout)["exports"]]
    # An empty description is no description.
    assert out["luanbd"] == [("a", None, MiB), ("b", "the b", MiB), ("c", None, MiB)]
    if "nbdkit" in out:
        assert out["nbdkit"] == out["luanbd"]


def test_list_exports_default_is_the_default_export(servers: Servers) -> None:
    out = {}
    for server in SERVERS:
        r = servers.captive(matrix(server), "default_export=dflt", "description=D",
                            server=server, run='nbdinfo --list --json "$uri"')
        out[server] = [(e["export-name"], e.get("description"))
                       for e in json.loads(r.stdout)["exports"]]
    # The list has no description: nbdinfo --list shows none (export_description is for
    # NBD_OPT_INFO/GO, not NBD_OPT_LIST).
    assert out["luanbd"] == [("dflt", None)]
    if "nbdkit" in out:
        assert out["nbdkit"] == out["luanbd"]


def test_nbdinfo_shows_default_export_and_description(servers: Servers) -> None:
    for server in SERVERS:
        r = servers.captive(matrix(server), "default_export=dflt", "description=my disk",
                            server=server, run='nbdinfo --json "$uri"')
        (export,) = json.loads(r.stdout)["exports"]
        assert export["export-name"] == "dflt", server
        assert export["description"] == "my disk", server


def test_list_exports_opt_mode(servers: Servers) -> None:
    for server in SERVERS:
        h = servers.connect(matrix(server), "exports=x:ex,y", opt_mode=True, server=server)
        got: list[tuple[str, str]] = []
        assert h.opt_list(lambda name, desc, got=got: got.append((name, desc)) or 0) == 2
        assert got == [("x", "ex"), ("y", "")], server
        h.opt_abort()


# --- lifecycle ---------------------------------------------------------------------------
LIFECYCLE = ["config_complete", "get_ready", "after_fork", "preconnect false",
             "list_exports false false", "open false a", "close", "cleanup"]


def test_lifecycle_order(servers: Servers) -> None:
    logs = {}
    for server in SERVERS:
        log = servers.log_path(server)
        servers.captive(matrix(server), f"log={log}", "exports=a", server=server,
                        run='nbdinfo --list "$uri" >/dev/null')
        logs[server] = [c for c in read_log(log) if not c.startswith(("config ", "export_"))]
    # nbdinfo --list: LIST, then INFO on "a" (open/close).  luanbd also has load/unload.
    assert logs["luanbd"] == ["load", *LIFECYCLE, "unload"]
    if "nbdkit" in logs:
        assert logs["nbdkit"] == LIFECYCLE


def test_preconnect_gets_readonly_and_can_refuse(servers: Servers) -> None:
    log = servers.log_path()
    servers.connect(matrix("luanbd"), f"log={log}", readonly=True)
    assert "preconnect true" in read_log(log)
    for server in SERVERS:
        log = servers.log_path(server)
        with pytest.raises(nbd.Error):
            servers.connect(matrix(server), f"log={log}", "fail=preconnect:1", server=server)
        assert not any(c.startswith("open") for c in read_log(log)), server


def test_get_ready_failure_stops_the_server(servers: Servers) -> None:
    r = servers.run([LUANBD, "-U", "-", str(matrix("luanbd")), "fail=get_ready:5",
                     "--run", "true"])
    assert r.returncode == 1
    assert "get_ready: " in r.stderr and "injected failure in get_ready" in r.stderr


# --- thread models -----------------------------------------------------------------------
def two_clients_read(sock: Path) -> None:
    """Clients "one" and "two" each do one slow pread, at the same time."""
    errors: list[BaseException] = []

    def client(name: str) -> None:
        try:
            h = nbd.NBD()
            h.set_export_name(name)
            h.connect_unix(str(sock))
            h.pread(512, 0)
            h.shutdown()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors


def overlapped(calls: list[str]) -> bool:
    depth = 0
    for line in calls:
        depth += 1 if line.startswith("enter") else -1
        if depth > 1:
            return True
    return False


def slow(server: str) -> Path:
    return PLUGINS / ("slow.lua" if server == "luanbd" else "slow.py")


@pytest.mark.parametrize("model,overlap", [
    ("serialize_all_requests", False),
    ("serialize_requests", True),
    ("parallel", True),
])
def test_thread_model_concurrency(servers: Servers, model: str, overlap: bool) -> None:
    """Under serialize_all_requests no two callbacks ever run at once; under
    serialize_requests/parallel two connections run Lua at the same time."""
    for server in SERVERS:
        log = servers.log_path(server)
        sock = servers.listen(slow(server), f"log={log}", f"thread_model={model}",
                              server=server)
        two_clients_read(sock)
        calls = read_log(log)
        assert sorted(calls) == ["enter one", "enter two", "leave one", "leave two"]
        assert overlapped(calls) is overlap, (server, calls)


def test_serialize_connections_makes_the_second_client_wait(servers: Servers) -> None:
    for server in SERVERS:
        sock = servers.listen(matrix(server), "thread_model=serialize_connections",
                              server=server)
        first = nbd.NBD()
        first.connect_unix(str(sock))
        done = threading.Event()

        def second(sock: Path = sock, done: threading.Event = done) -> None:
            h = nbd.NBD()
            h.connect_unix(str(sock))
            h.pread(512, 0)
            done.set()

        t = threading.Thread(target=second, daemon=True)
        t.start()
        assert not done.wait(0.7), f"{server}: second client served while the first is open"
        first.shutdown()
        del first
        assert done.wait(10), server
        t.join(10)


def test_parallel_gives_each_connection_its_own_lua_state(servers: Servers) -> None:
    """luanbd runs a serialize_requests/parallel script once per connection (load, config,
    config_complete, get_ready, after_fork ... cleanup, unload), so globals, and the data
    of this RAM disk, are not shared between connections."""
    log = servers.log_path()
    sock = servers.listen(matrix("luanbd"), f"log={log}", "thread_model=parallel")
    a = nbd.NBD()
    a.connect_unix(str(sock))
    a.pwrite(b"only in a", 0)
    b = nbd.NBD()
    b.connect_unix(str(sock))
    assert bytes(b.pread(9, 0)) == bytes(9)
    assert bytes(a.pread(9, 0)) == b"only in a"
    b.shutdown()
    a.shutdown()
    del a, b
    deadline = time.monotonic() + 10
    while read_log(log).count("unload") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    calls = read_log(log)
    # One start-up for the server, one per connection.
    assert calls.count("load") == 3
    assert calls.count("config_complete") == 3
    assert calls.count("get_ready") == 3
    assert calls.count("unload") == 2  # the two connections' states are gone


# --- API 1 and API 2, metadata, --dump-plugin ---------------------------------------------
def write_script(tmp: Path, name: str, body: str) -> Path:
    path = tmp / name
    path.write_text(body)
    return path


SIGNATURES = """
local log_path
function config(k, v) log_path = v end
local function record(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  local f = assert(io.open(log_path, "a"))
  f:write(table.concat(parts, " "), "\\n")
  f:close()
end
function open(readonly) return {} end
function get_size(h) return 65536 end
function pread(h, ...) record("pread", ...) return string.rep("x", 512) end
function pwrite(h, buf, ...) record("pwrite", #buf, ...) end
function flush(h, ...) record("flush", ...) end
function trim(h, ...) record("trim", ...) end
function zero(h, ...) record("zero", ...) end
function can_fua(h) return nbdkit.FUA_NATIVE end
function can_cache(h) return nbdkit.CACHE_NATIVE end
function cache(h, ...) record("cache", ...) end
function extents(h, count, offset) return {{offset, count, nbdkit.EXTENT_HOLE}} end
"""


@pytest.mark.parametrize("api", [1, 2])
def test_callback_signatures(servers: Servers, tmp_path: Path, api: int) -> None:
    """API 1: pread(h,count,offset) pwrite(h,buf,offset) flush(h) trim(h,count,offset)
    zero(h,count,offset,may_trim); API 2: the same plus `flags` last, zero's being flags.
    API 1 scripts get no can_fua/can_cache/cache/extents (they are ignored)."""
    header = "API_VERSION = 2\n" if api == 2 else ""
    script = write_script(tmp_path, f"sig{api}.lua", header + SIGNATURES)
    log = tmp_path / f"sig{api}.log"
    h = servers.connect(script, f"log={log}")
    h.pread(512, 0)
    h.pwrite(b"w" * 512, 512, nbd.CMD_FLAG_FUA)
    h.flush()
    h.trim(512, 0)
    h.zero(512, 0)
    h.zero(512, 0, nbd.CMD_FLAG_NO_HOLE)
    calls = read_log(log)
    if api == 1:
        # The FUA write is emulated: a flush (with no argument) follows the pwrite.
        assert calls == ["pread 512 0", "pwrite 512 512", "flush", "flush", "trim 512 0",
                         "zero 512 0 true", "zero 512 0 false"]
        assert not h.can_cache()
        assert block_status(h, 512, 0) == [(512, 0)]  # extents ignored: all data
        # Fast zero is advertised, and refused at once without calling zero.
        assert h.can_fast_zero()
        assert outcome(lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)).errno == errno.ENOTSUP
        assert len(read_log(log)) == len(calls)
    else:
        assert calls == ["pread 512 0 0", "pwrite 512 512 2", "flush 0", "trim 512 0 0",
                         "zero 512 0 1", "zero 512 0 0"]
        assert h.can_cache()
        h.cache(512, 0)
        assert read_log(log)[-1] == "cache 512 0 0"
        assert block_status(h, 512, 0) == [(512, nbd.STATE_HOLE)]


MINIMAL = """
function open(readonly) return 1 end
function get_size(h) return 512 end
function pread(h, count, offset, flags) return string.rep("\\0", count) end
"""


def test_api2_script_may_leave_load_undefined(servers: Servers, tmp_path: Path) -> None:
    """Lua's own global `load` is not taken for the `load` callback."""
    script = write_script(tmp_path, "noload.lua", "API_VERSION = 2\n" + MINIMAL)
    h = servers.connect(script)
    assert h.get_size() == 512
    r = servers.run([LUANBD, str(script), "--dump-plugin"])
    assert r.returncode == 0
    assert "has_load=1" not in r.stdout.splitlines()


@pytest.mark.parametrize("value", ["3", "0", "'2'", "2.5", "true"])
def test_bad_api_version_is_a_startup_error(servers: Servers, tmp_path: Path,
                                            value: str) -> None:
    script = write_script(tmp_path, "badapi.lua", f"API_VERSION = {value}\n" + MINIMAL)
    r = servers.run([LUANBD, "-U", "-", str(script), "--run", "true"])
    assert r.returncode == 1
    assert "API_VERSION must be 1 or 2" in r.stderr


DUMP = """
API_VERSION = 2
name = "dumpy"
version = "4.5.6"
thread_model = %s
function dump_plugin() print("dumpy_extra=yes") end
""" + MINIMAL + """
function can_fua(h) return nbdkit.FUA_NATIVE end
function extents(h, c, o, f) return {} end
"""


@pytest.mark.parametrize("model,has_fn", [('"parallel"', False),
                                          ('function() return "serialize_requests" end', True),
                                          ("nil", False)])
def test_dump_plugin(servers: Servers, tmp_path: Path, model: str, has_fn: bool) -> None:
    script = write_script(tmp_path, "dumpy.lua", DUMP % model)
    r = servers.run([LUANBD, str(script), "--dump-plugin"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    want_model = {"nil": "serialize_all_requests", '"parallel"': "parallel"}.get(
        model, "serialize_requests")
    assert lines[:7] == [f"path={script}", "name=dumpy", "version=4.5.6", "api_version=2",
                         f"thread_model={want_model}", lines[5], "lua_runtime=Lua 5.4"]
    assert lines[5].startswith("lua_version=5.4.")
    has = [line for line in lines if line.startswith("has_")]
    want = ["has_dump_plugin=1", *(["has_thread_model=1"] if has_fn else []), "has_open=1",
            "has_get_size=1", "has_can_fua=1", "has_pread=1", "has_extents=1"]
    assert has == want
    assert lines[-1] == "dumpy_extra=yes"
    assert lines.index("dumpy_extra=yes") > lines.index(has[-1])


def test_dump_plugin_api1_lists_only_seed_callbacks(servers: Servers, tmp_path: Path) -> None:
    script = write_script(tmp_path, "v1.lua", MINIMAL + "function can_fua(h) return 2 end\n"
                          "function trim(h, c, o) end\nthread_model = 'parallel'\n")
    r = servers.run([LUANBD, str(script), "--dump-plugin"])
    lines = r.stdout.splitlines()
    assert "api_version=1" in lines
    assert "thread_model=serialize_all_requests" in lines  # API 1 cannot choose
    assert "has_trim=1" in lines
    assert "has_can_fua=1" not in lines
    assert "name=lua" in lines


@pytest.mark.parametrize("lua,want", [
    ("5.4", "Lua 5.4"),
    ("5.3", "Lua 5.3"),
    ("5.2", "Lua 5.2"),
    ("5.5", "Lua 5.5"),
    ("luajit", "LuaJIT 2.1"),
    ("5.1", "Lua 5.1"),
])
def test_lua_runtime_choice(servers: Servers, tmp_path: Path, lua: str, want: str) -> None:
    script = write_script(tmp_path, "rt.lua", "API_VERSION = 2\n" + MINIMAL)
    r = servers.run([LUANBD, f"--lua={lua}", str(script), "--dump-plugin"])
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("lua_runtime=")]
    assert line.startswith(f"lua_runtime={want}")
    # ... and it serves.
    h = servers.connect(script, options=(f"--lua={lua}",))
    assert h.get_size() == 512


MAGIC = """
API_VERSION = 2
magic_config_key = "file"
config_help = "file=FILE   the file to serve\\nmode=MODE   how"
local got = {}
function config(k, v) got[#got + 1] = k .. "=" .. v end
function dump_plugin() print("got=" .. table.concat(got, ";")) end
""" + MINIMAL


def test_magic_config_key(servers: Servers, tmp_path: Path) -> None:
    script = write_script(tmp_path, "magic.lua", MAGIC)
    r = servers.run([LUANBD, str(script), "bare1", "--dump-plugin"])
    assert r.returncode == 0, r.stderr
    assert "got=file=bare1" in r.stdout.splitlines()
    # Without magic_config_key a bare argument is an error.
    plain = write_script(tmp_path, "plain.lua", "function config(k, v) end\n" + MINIMAL)
    r = servers.run([LUANBD, "-U", "-", str(plain), "bare1", "--run", "true"])
    assert r.returncode == 1
    assert "expecting key=value on the command line but got: bare1" in r.stderr


def test_magic_config_key_keeps_command_line_order(servers: Servers, tmp_path: Path) -> None:
    script = write_script(tmp_path, "magic.lua", MAGIC)
    r = servers.run([LUANBD, str(script), "a", "k=v", "b", "--dump-plugin"])
    assert "got=file=a;k=v;file=b" in r.stdout.splitlines()


def test_config_help_in_help(servers: Servers, tmp_path: Path) -> None:
    script = write_script(tmp_path, "magic.lua", MAGIC)
    r = servers.run([LUANBD, str(script), "--help"])
    assert r.returncode == 0
    assert r.stdout.rstrip().endswith("file=FILE   the file to serve\nmode=MODE   how")


def test_dump_plugin_runs_config_not_config_complete(servers: Servers) -> None:
    r = servers.run([LUANBD, str(matrix("luanbd")), "can_fua=native", "--dump-plugin"])
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert "has_config=1" in lines
    # matrix.lua defines can_fua in config_complete, which --dump-plugin does not run.
    assert "has_can_fua=1" not in lines
