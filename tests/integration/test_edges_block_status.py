"""BLOCK_STATUS at the edges, over every path that builds its reply (issue 14).

The plugin (scripts/edges.lua) is a sparse 8 GiB + 1 disk whose ``extents`` answer is picked
by the export name: honest, empty, overlapping, unsorted, with gaps, starting before the
request, ending past the disk, lengths of 2^32 and more, floats, strings, nil, tables, 10^5
tiny extents...  Each is asked at offsets around 2^32 and at the end of the disk with
length 0xFFFFFFFF, with and without REQ_ONE, by libnbd (structured replies) and by a raw
extended-headers client, through no filter, the offset, truncate and cacheextents filters
and a Lua filter, with the compiled request loop on and off.

Every reply is either what proto.md allows (at least one descriptor, none empty, only the
last one reaching past the request, with REQ_ONE exactly one of at most the request's
length, nothing past the export's end) or an error with exactly one log line; never a
traceback, an AssertionError, a hang or a dead server.
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from luanbd_procs import (
    REP_ACK,
    Server,
    StartServer,
    client_env,
    run_client,
    script,
    wait_path,
)
from test_extended_headers import (
    CMD_BLOCK_STATUS,
    OPT_EXTENDED_HEADERS,
    OPT_SET_META,
    REP_META_CONTEXT,
    REPLY_FLAG_DONE,
    TYPE_BLOCK_STATUS_EXT,
    TYPE_ERROR,
    ExtClient,
)

G = 1 << 32
M = 0xFFFFFFFF
SIZE = 8 * (1 << 30) + 1
REQ_ONE = 8
EINVAL, EIO = 22, 5
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLIENT = str(Path(__file__).resolve().parent / "scripts" / "edges_client.py")

#: extents answers that are a plugin bug wherever they are asked: each request fails.
BAD = ["empty", "zerolen", "unsorted", "after", "outside", "negative", "mininteger",
       "bigfloat", "nan", "inf", "string", "nil_", "tbl", "notable", "noitem", "bool",
       "error"]
#: answers that are fine somewhere (past, huge: everywhere; overlap, gap: at the disk's end,
#: where the bad part lies past the export).
GOOD = ["normal", "past", "huge", "big32", "before", "hugeint", "float", "intfloat",
        "numstring", "niltype", "named", "oddtype", "overlap", "gap"]


def points(size: int) -> list[tuple[int, int, int]]:
    """(offset, count, flags): around 2^32, at the end, REQ_ONE, and out of range."""
    return [(0, M, 0), (G - 1, M, 0), (G, M, 0), (G + 1, M, 0), (size - M, M, 0),
            (size - 1, 1, 0), (size - 1, 1, REQ_ONE), (0, M, REQ_ONE), (G, M, REQ_ONE),
            (size - M, M, REQ_ONE),
            # out of range: EINVAL (offset+count past the end, or past 2^64)
            (size - 1, 2, 0), (size, 1, 0), (1 << 63, M, 0), ((1 << 64) - 1, M, 0)]


def in_range(offset: int, count: int, size: int) -> bool:
    return offset + count <= size


def check_descriptors(d: list[tuple[int, int]], offset: int, count: int, flags: int, *,
                      size: int, max_len: int, any_flags: bool = False) -> None:
    """What proto.md allows in a successful block status reply (flags of base:allocation's,
    or with ``any_flags`` any 32-bit value)."""
    assert d, "no descriptor"
    flag_ok = (lambda k: 0 <= k <= M) if any_flags else (lambda k: k in (0, 1, 2, 3))
    assert all(0 < length <= max_len and flag_ok(kind) for length, kind in d), d[:5]
    assert offset + sum(length for length, _ in d) <= size, ("past the end", offset, d[-3:])
    assert sum(length for length, _ in d[:-1]) < count, "only the last may pass the request"
    if flags & REQ_ONE:
        assert len(d) == 1 and d[0][0] <= count, d[:3]


def run_cases(server: Server, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert server.sock is not None
    out = run_client(["/usr/bin/python3", CLIENT, str(server.sock), json.dumps(cases)],
                     timeout=120).stdout
    result: list[dict[str, Any]] = json.loads(out)
    return result


def log_errors(server: Server) -> list[str]:
    log = server.log()
    assert "AssertionError" not in log and "Traceback" not in log, log[-3000:]
    return server.errors()


#: name -> (luanbd options, plugin args, export size)
CONFIGS: dict[str, tuple[list[str], list[str], int]] = {
    "plain": ([], [], SIZE),
    "offset": (["--filter=offset"], ["offset=1"], SIZE - 1),
    "truncate": (["--filter=truncate"], ["truncate=12884901889"], 12884901889),
    "lua-offset": ([f"--filter={EXAMPLES / 'filters' / 'offset.lua'}"], ["offset=4097"],
                   SIZE - 4097),
    "cacheextents": (["--filter=cacheextents"], [], SIZE),
    # nbdkit's CVE-2025-47712 was here: a length rounded up to minblock near 2^32
    "blocksize": (["--filter=blocksize"], ["minblock=4096"], SIZE - 1),
}


# The compiled loop hands BLOCK_STATUS to Python: with it off, two configs suffice.
@pytest.mark.parametrize(("config", "fastpath"),
                         [(c, "1") for c in CONFIGS] + [("plain", "0"), ("offset", "0")])
def test_block_status_modes(start_server: StartServer, config: str, fastpath: str) -> None:
    options, args, size = CONFIGS[config]
    server = start_server(script("edges.lua"), *args, options=options,
                          env=client_env(LUANBD_FASTPATH=fastpath))
    pts = points(size)
    modes = BAD + GOOD
    cases = [{"export": m, "ops": [["bs", o, c, f] for o, c, f in pts]} for m in modes]
    results = run_cases(server, cases)
    errors = 0
    got: dict[tuple[str, int, int, int], Any] = {}
    for mode, res in zip(modes, results, strict=True):
        assert res["connect"] is None and res["size"] == size, (mode, res)
        assert len(res["ops"]) == len(pts), (mode, res["ops"][-1])  # the connection lived
        for (o, c, f), op in zip(pts, res["ops"], strict=True):
            if "err" in op:
                errors += 1
                assert op["err"] == (EIO if in_range(o, c, size) else EINVAL), (mode, o, c, op)
                got[mode, o, c, f] = op["err"]
                continue
            assert in_range(o, c, size), ("out-of-range request answered", mode, o, c)
            d = [tuple(x) for x in op["ok"]]
            check_descriptors(d, o, c, f, size=size, max_len=M)
            got[mode, o, c, f] = d
            # truncate answers past the plugin's end itself (a hole), without asking it
            assert mode in GOOD or (config == "truncate" and o >= SIZE), (mode, o, c, d)
    # Each error: exactly one log line.
    assert len(log_errors(server)) == errors
    for mode in GOOD[:6]:  # these are fine at every point, through every filter
        assert all(not isinstance(got[mode, o, c, f], int)
                   for o, c, f in pts if in_range(o, c, size)), mode
    if config == "plain":  # (cacheextents' one cache is shared by the exports/modes here)
        e = size - 1
        # The honest answer: 0xFFFFF000 keeps 4 KiB alignment in 32 bits.
        assert got["normal", G - 1, M, 0] == [(1, 0), (0xFFFFF000, 3)]
        assert got["normal", 0, M, REQ_ONE] == [(M, 0)]
        assert got["normal", size - M, M, 0] == [(0xFFFFF000, 3)]
        # Regression: an extent reaching past the disk, followed by more past the disk,
        # used to fail with "extents must be contiguous" at the last byte.
        assert got["huge", e, 1, 0] == got["huge", e, 1, REQ_ONE] == [(1, 0)]
        assert got["before", e, 1, 0] == [(1, 3)]
        assert got["overlap", e, 1, 0] == got["gap", e, 1, 0] == [(1, 0)]
        assert got["overlap", 0, M, 0] == got["gap", 0, M, 0] == EIO
        assert got["past", G, M, REQ_ONE] == [(M, 3)]
        assert got["oddtype", 0, M, 0] == [(4096, 3), (8192, 0)]


@pytest.mark.parametrize("options", [[], ["--filter=readonly"]], ids=["plain", "readonly"])
def test_meta_extents_modes(start_server: StartServer, options: list[str]) -> None:
    """The same hostile answers from meta_extents (another context, edges:mirror): each is
    a valid reply or one error line, as for base:allocation, except that the flags are the
    context's own (oddtype's -1 and 2^40 are errors, 4 is kept)."""
    server = start_server(script("edges.lua"), options=options)
    pts = points(SIZE)
    modes = BAD + GOOD
    cases = [{"export": m, "context": "edges:mirror",
              "ops": [["bs", o, c, f] for o, c, f in pts]} for m in modes]
    errors = 0
    got: dict[tuple[str, int, int, int], Any] = {}
    for mode, res in zip(modes, run_cases(server, cases), strict=True):
        assert res["connect"] is None and len(res["ops"]) == len(pts), (mode, res)
        for (o, c, f), op in zip(pts, res["ops"], strict=True):
            if "err" in op:
                errors += 1
                assert op["err"] == (EIO if in_range(o, c, SIZE) else EINVAL), (mode, o, c, op)
                got[mode, o, c, f] = op["err"]
                continue
            assert in_range(o, c, SIZE) and mode in GOOD, (mode, o, c)
            d = [tuple(x) for x in op["ok"]]
            check_descriptors(d, o, c, f, size=SIZE, max_len=M, any_flags=True)
            got[mode, o, c, f] = d
    assert len(log_errors(server)) == errors
    assert got["normal", G - 1, M, 0] == [(1, 0), (0xFFFFF000, 3)]
    assert got["oddtype", 0, M, 0] == EIO
    assert got["named", 0, M, 0] == [(4096, 3)]


def test_tiny_extents(start_server: StartServer) -> None:
    """10^5 alternating 1-byte extents: all of them come back, then the merged tail."""
    server = start_server(script("edges.lua"))
    ops = [["bs", G, M, 0], ["bs", SIZE - M, M, 0], ["bs", 0, M, REQ_ONE]]
    (res,) = run_cases(server, [{"export": "tiny", "ops": ops}])
    a, b, c = (op["ok"] for op in res["ops"])
    assert len(a) == len(b) == 100000 and a[:2] == [[1, 0], [1, 3]]
    check_descriptors([tuple(x) for x in a], G, M, 0, size=SIZE, max_len=M)
    check_descriptors([tuple(x) for x in b], SIZE - M, M, 0, size=SIZE, max_len=M)
    assert b[-1] == [SIZE - (SIZE - M) - 99999, 3]  # the tail stops at the disk's end
    assert c == [[1, 0]]
    assert log_errors(server) == []


def test_nbdinfo_map_at_the_end(start_server: StartServer) -> None:
    """nbdinfo --map over the whole 8 GiB + 1 (4 GiB steps) ends exactly at the end."""
    server = start_server(script("edges.lua"), "mode=huge")
    lines = run_client(["nbdinfo", "--map", server.uri]).stdout.splitlines()
    spans = [(int(line.split()[0]), int(line.split()[1])) for line in lines]
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == SIZE, lines
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans)), lines


# --- extended headers: our own client ---------------------------------------------------------

class EdgeClient(ExtClient):
    def negotiate_export(self, name: bytes) -> None:
        self.start()
        self.send_option(OPT_EXTENDED_HEADERS)
        assert self.option_reply()[1] == REP_ACK
        query = b"base:allocation"
        self.send_option(OPT_SET_META, struct.pack(">I", len(name)) + name
                         + struct.pack(">II", 1, len(query)) + query)
        _, reply, data = self.option_reply()
        assert reply == REP_META_CONTEXT
        self.context_id = struct.unpack_from(">I", data)[0]
        assert self.option_reply()[1] == REP_ACK
        assert self.go(name) == REP_ACK

    def block_status(self, offset: int, length: int, flags: int = 0) -> Any:
        """The descriptors, or the errno of an ERROR chunk."""
        self.request(CMD_BLOCK_STATUS, offset, length, flags=flags, cookie=7)
        rflags, rtype, cookie, roffset, payload = self.chunk()
        assert (rflags, cookie, roffset) == (REPLY_FLAG_DONE, 7, offset)
        if rtype == TYPE_ERROR:
            return struct.unpack_from(">I", payload)[0]
        assert rtype == TYPE_BLOCK_STATUS_EXT
        context_id, n = struct.unpack_from(">II", payload)
        assert context_id == self.context_id and len(payload) == 8 + 16 * n
        return [struct.unpack_from(">QQ", payload, 8 + 16 * i) for i in range(n)]


EXT_POINTS = [(0, SIZE, 0), (G - 1, M, 0), (G, G, 0), (1, SIZE - 1, 0), (SIZE - 1, 1, 0),
              (0, SIZE, REQ_ONE), (SIZE - 1, 1, REQ_ONE), (G - 1, M + 2, REQ_ONE),
              (SIZE - 1, 2, 0), (SIZE, 1, 0), (1 << 63, 1 << 63, 0), (1, (1 << 64) - 1, 0),
              ((1 << 64) - 1, 1, 0), ((1 << 64) - 1, (1 << 64) - 1, 0)]


@pytest.mark.parametrize("options", [[], ["--filter=offset"]], ids=["plain", "offset"])
def test_extended_headers_modes(start_server: StartServer, workdir: Path,
                                options: list[str]) -> None:
    args = ["offset=0"] if options else []
    server = start_server(script("edges.lua"), *args, options=options)
    errors = 0
    got = {}
    for mode in ["normal", "huge", "past", "before", "overlap", "empty", "string", "unsorted"]:
        with EdgeClient(str(server.sock)) as c:
            c.negotiate_export(mode.encode())
            assert c.size == SIZE
            for o, n, f in EXT_POINTS:
                r = c.block_status(o, n, f)
                if isinstance(r, int):
                    errors += 1
                    assert r == (EIO if o + n <= SIZE else EINVAL), (mode, o, n, r)
                else:
                    assert o + n <= SIZE, (mode, o, n)
                    check_descriptors(r, o, n, f, size=SIZE, max_len=(1 << 64) - 1)
                got[mode, o, n, f] = r
    assert len(log_errors(server)) == errors
    # 64-bit descriptors: not cut at 32 bits.
    assert got["normal", 0, SIZE, 0] == [(G, 0), (SIZE - G, 3)]
    assert got["huge", 0, SIZE, 0] == [(G, 0), (G + 1, 3)]  # the third is past the end
    assert got["past", 0, SIZE, REQ_ONE] == [(SIZE, 3)]
    assert got["huge", SIZE - 1, 1, 0] == [(1, 0)]
    assert got["before", SIZE - 1, 1, REQ_ONE] == [(1, 3)]
    assert got["normal", G - 1, M + 2, REQ_ONE] == [(1, 0)]


# --- nbdkit beside us ------------------------------------------------------------------------

NBDKIT_SH = """#!/bin/sh
case "$1" in
  get_size) echo 8589934593 ;;
  can_extents|can_write) exit 0 ;;
  pread) head -c "$3" /dev/zero ;;
  extents) if [ "$4" -lt 4294967296 ]; then echo "0 4294967296 0"; fi
           echo "4294967296 4294967297 hole,zero" ;;
  *) exit 2 ;;
esac
"""
#: Where nbdkit 1.32.5 answers: a request of 0xFFFFFFFF bytes whose extent is longer makes
#: it abort (protocol.c:506 "Assertion `e.length <= length' failed", CVE-2025-47711), so
#: the lengths here stay below 2^31 except for REQ_ONE and the last byte.
NBDKIT_POINTS = [(G - 1, 1 << 31, 0), (G, 1 << 31, 0), (G - 4096, 1 << 31, 0),
                 (SIZE - (1 << 31), 1 << 31, 0), (SIZE - 1, 1, 0), (SIZE - 1, 1, REQ_ONE),
                 (G - 1, 1 << 31, REQ_ONE), (SIZE - 1, 2, 0), (SIZE, 1, 0), (1 << 63, 1, 0)]


def clipped(op: dict[str, Any], count: int) -> Any:
    if "ok" not in op:
        return op
    out, left = [], count
    for length, kind in op["ok"]:
        out.append((min(length, left), kind))
        left -= out[-1][0]
        if not left:
            break
    return out


def test_like_nbdkit_sh(start_server: StartServer, workdir: Path) -> None:
    """The honest answer from nbdkit's sh plugin and from ours: the same replies."""
    if shutil.which("nbdkit") is None:
        pytest.skip("no nbdkit")
    sh = workdir / "normal.sh"
    sh.write_text(NBDKIT_SH)
    sh.chmod(0o755)
    nsock = workdir / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(nsock), "sh", str(sh)],
                            stderr=subprocess.DEVNULL, env=client_env())
    try:
        ours = start_server(script("edges.lua"), "mode=normal")
        cases = [{"export": "", "ops": [["bs", o, c, f] for o, c, f in NBDKIT_POINTS]}]
        wait_path(nsock)
        theirs = run_client(["/usr/bin/python3", CLIENT, str(nsock), json.dumps(cases)])
        mine = run_cases(ours, cases)[0]["ops"]
        # The last descriptor may reach past the request (nbdkit stops at 2^32 - 1, we at
        # 0xFFFFF000 to keep 4 KiB alignment): compare what lies inside the request.
        assert [clipped(op, c) for op, (_, c, _) in zip(json.loads(theirs.stdout)[0]["ops"],
                                                         NBDKIT_POINTS, strict=True)] == \
            [clipped(op, c) for op, (_, c, _) in zip(mine, NBDKIT_POINTS, strict=True)]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# --- a Lua filter's own extents answer --------------------------------------------------------

#: fmode -> fine (else every request in range is one error)
FILTER_MODES = {"pass": True, "huge": True, "before": True, "empty": False, "string": False,
                "unsorted": False, "notable": False, "toobig": False}


@pytest.mark.parametrize("fmode", list(FILTER_MODES))
def test_lua_filter_extents(start_server: StartServer, fmode: str) -> None:
    server = start_server(script("edges.lua"), f"fmode={fmode}", "mode=huge",
                          options=[f"--filter={script('edges_filter.lua')}"])
    pts = points(SIZE)
    (res,) = run_cases(server, [{"export": "", "ops": [["bs", o, c, f] for o, c, f in pts]}])
    errors = 0
    for (o, c, f), op in zip(pts, res["ops"], strict=True):
        if not in_range(o, c, SIZE) or not FILTER_MODES[fmode]:
            assert op == {"err": EIO if in_range(o, c, SIZE) else EINVAL}, (o, c, op)
            errors += 1
        else:
            check_descriptors([tuple(x) for x in op["ok"]], o, c, f, size=SIZE, max_len=M)
    assert len(log_errors(server)) == errors
    if fmode == "before":
        assert res["ops"][5] == {"ok": [[1, 3]]}  # the last byte
