"""READ/WRITE/TRIM/ZERO/CACHE at the edges (issue 14): offsets and lengths around 2^63, an
offset + length that overflows 64 bits, the last byte of a disk larger than 4 GiB, and
block_size answers that are not powers of two or contradict each other.

libnbd (strict mode off, so it sends what it would refuse) speaks classic requests through
the compiled loop and through the Python one; a raw client speaks extended headers, whose
lengths are 64 bits.  Every request in range reaches the plugin with exactly its offset and
count; every other one is an error (ENOSPC for writes, EINVAL else) with one log line, and
never reaches the plugin.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from luanbd_procs import StartServer, client_env, script
from test_edges_block_status import EdgeClient, run_cases
from test_extended_headers import (
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_PAYLOAD_LEN,
    REPLY_FLAG_DONE,
    TYPE_ERROR,
)

SIZE = 8 * (1 << 30) + 1
EINVAL, ENOSPC, ENOMEM, EOVERFLOW = 22, 28, 12, 75
CMD_CACHE = 5
U64 = 1 << 64
OPS = ["pread", "pwrite", "trim", "zero", "cache"]
LOG_NAME = {"pread": "pread", "pwrite": "pwrite", "trim": "trim", "zero": "zero",
            "cache": "cache"}


def ranges(size: int) -> list[tuple[int, int]]:
    """(offset, count): the last byte, then everything that must fail."""
    return [(size - 1, 1), (size - 512, 512), (0, 1),
            (size - 1, 2), (size, 1), (size + 1, 1), ((1 << 63) - 1, 1), (1 << 63, 1),
            ((1 << 63) + 1, 512), (U64 - 1, 1), (U64 - 512, 1024), (U64 - 1, 0xFFFFFFFF)]


def out_of_range(offset: int, count: int, size: int) -> bool:
    return offset + count > size


@pytest.mark.parametrize(("fastpath", "options"), [("1", []), ("0", []),
                                                 ("1", ["--filter=blocksize"])],
                         ids=["fastpath", "python", "blocksize"])
def test_classic_ranges(start_server: StartServer, workdir: Path, fastpath: str,
                        options: list[str]) -> None:
    log = workdir / "calls.log"
    args = ["minblock=4096"] if options else []
    server = start_server(script("edges.lua"), f"log={log}", *args, options=options,
                          env=client_env(LUANBD_FASTPATH=fastpath))
    size = SIZE - 1 if options else SIZE  # blocksize rounds the size down to minblock
    rs = ranges(size)
    # (libnbd itself refuses a 4 GiB buffer: the last range is for the non-data calls)
    ops = [[op, o, c, 0] for op in OPS for o, c in rs if op in ("trim", "zero", "cache")
           or c < 1 << 31]
    # The last byte written reads back (a write of one byte at size-1 and its read).
    ops += [["pwrite", size - 1, 1, 0], ["pread", size - 1, 1, 0]]
    # Trim, zero and cache of 0xFFFFFFFF bytes ending at the last byte.
    ops += [[op, size - 0xFFFFFFFF, 0xFFFFFFFF, 0] for op in ("trim", "zero", "cache")]
    (res,) = run_cases(server, [{"export": "", "ops": ops}])
    assert len(res["ops"]) == len(ops), res["ops"][-1]  # the connection lived
    errors, expected_calls = 0, []
    for (op, o, c, _), r in zip(ops, res["ops"], strict=True):
        if out_of_range(o, c, size):
            want = ENOSPC if op in ("pwrite", "zero") else EINVAL
            assert r == {"err": want}, (op, o, c, r)
            errors += 1
        else:
            assert "ok" in r, (op, o, c, r)
            expected_calls.append(f"{LOG_NAME[op]} {c} {o}")
    assert res["ops"][-4] == {"ok": "a5"}
    calls = log.read_text().splitlines()
    if options:  # split and rounded by the filter: all inside the plugin's disk
        assert all(int(n) > 0 and int(o) + int(n) <= SIZE
                   for n, o in (line.split()[1:] for line in calls)), calls
    else:
        assert calls == expected_calls
    text = server.log()
    assert "AssertionError" not in text
    assert len(server.errors()) == errors, server.errors()


# --- extended headers: 64-bit lengths ---------------------------------------------------------

def ext_ranges(size: int) -> list[tuple[int, int]]:
    return [(size - 1, 1), (0, size), (size - 1, 2), (1, U64 - 1), (U64 - 1, U64 - 1),
            (1 << 63, 1 << 63), ((1 << 63) - 1, (1 << 63) + 1), (U64 - 512, 1024), (size, 1),
            (0, 1 << 63)]


def test_extended_ranges(start_server: StartServer, workdir: Path) -> None:
    log = workdir / "calls.log"
    server = start_server(script("edges.lua"), f"log={log}")
    errors, calls = 0, []
    with EdgeClient(str(server.sock)) as c:
        c.negotiate_export(b"")
        for cmd, name in ((CMD_TRIM, "trim"), (CMD_WRITE_ZEROES, "zero"), (CMD_CACHE, "cache"),
                          (CMD_READ, "pread")):
            for offset, length in ext_ranges(SIZE):
                c.request(cmd, offset, length, cookie=9)
                rflags, rtype, cookie, roffset, payload = c.chunk()
                assert (rflags & REPLY_FLAG_DONE, cookie, roffset) == (REPLY_FLAG_DONE, 9,
                                                                       offset)
                if offset + length > SIZE:
                    assert rtype == TYPE_ERROR, (name, offset, length)
                    want = ENOSPC if name == "zero" else EINVAL
                    assert struct.unpack_from(">I", payload)[0] == want, (name, offset, length)
                    errors += 1
                elif name == "pread" and length > 64 << 20:
                    # A READ larger than the 64 MiB maximum: refused, nothing allocated.
                    assert rtype == TYPE_ERROR
                    assert struct.unpack_from(">I", payload)[0] in (ENOMEM, EOVERFLOW, EINVAL)
                    errors += 1
                else:
                    assert rtype != TYPE_ERROR, (name, offset, length, payload)
                    calls.append(f"{name} {length} {offset}")
                    if name == "pread":
                        assert payload == struct.pack(">Q", offset) + bytes(length)
        # A WRITE whose header claims 2^63 bytes: refused; the server cannot skip 2^63 bytes
        # of payload, so it may close the connection, but must not try to read them.
        c.request(CMD_WRITE, SIZE - 1, 1 << 63, flags=FLAG_PAYLOAD_LEN, cookie=10)
        try:
            rflags, rtype, cookie, _, payload = c.chunk()
            assert (rtype, cookie) == (TYPE_ERROR, 10)
            assert struct.unpack_from(">I", payload)[0] == ENOSPC
            errors += 1
        except EOFError:
            errors += 1
    assert log.read_text().splitlines() == calls
    assert "AssertionError" not in server.log()
    assert len(server.errors()) >= errors


# --- block_size answers -----------------------------------------------------------------------

#: (min, preferred, max) -> refused?  Refused answers drop that connection (as nbdkit, which
#: asks block_size while it builds NBD_INFO_BLOCK_SIZE) with one log line; others connect.
BLOCK_SIZES = [
    ((512, 4096, 65536), False), ((1, 512, 0xFFFFFFFF), False), ((0, 0, 0), False),
    ((65536, 32 << 20, 0xFFFFFFFF), False),
    ((3, 4096, 65536), True),          # minimum not a power of two
    ((512, 3000, 65536), True),        # preferred not a power of two
    ((512, 4096, 1000), True),         # maximum below preferred, not a multiple of minimum
    ((4096, 512, 65536), True),        # minimum > preferred
    ((4096, 8192, 4096 * 3 + 1), True),  # maximum not a multiple of minimum
    ((512, 4096, 256), True),          # maximum < minimum
    ((0, 4096, 65536), True), ((512, 0, 65536), True), ((512, 4096, 0), True),
    ((0, 0, 65536), True),             # zeros mixed with non-zeros
    ((131072, 131072, 131072), True),  # minimum above 64 KiB
    ((512, 64 << 20, 64 << 20), True),  # preferred above 32 MiB
    ((-512, 4096, 65536), True), ((512, 4096, 1 << 33), True),
    ((512, 256, 65536), True),         # preferred below 512
]


def test_block_size_answers(start_server: StartServer) -> None:
    server = start_server(script("edges.lua"))
    names = [f"bs:{a},{b},{c}" for (a, b, c), _ in BLOCK_SIZES]
    cases = [{"export": n, "ops": [["pread", 0, 512, 0]]} for n in names]
    # A good export after all of them: the server still serves.
    cases.append({"export": "bs:512,4096,65536", "ops": [["pread", SIZE - 512, 512, 0]]})
    results = run_cases(server, cases)
    for ((bs, refused), res) in zip(BLOCK_SIZES, results, strict=False):
        if refused:
            assert res["connect"] is not None, (bs, res)
        else:
            assert res["connect"] is None and res["ops"] == [{"ok": "00" * 512}], (bs, res)
            assert res["block_size"] == ([0, 0, 0] if bs == (0, 0, 0) else list(bs)), res
    assert results[-1]["ops"] == [{"ok": "00" * 512}]
    errors = server.errors()
    assert len(errors) == sum(refused for _, refused in BLOCK_SIZES), errors
    assert all("block_size" in line for line in errors), "\n".join(errors)
    assert "AssertionError" not in server.log()
