"""Metadata contexts from a Lua script (``meta_contexts`` / ``meta_extents``, issue 16).

examples/metadata.lua serves example:written, qemu:dirty-bitmap:written and
example:generation beside base:allocation.  Real clients list and select them: nbdinfo
(--list, --map=CONTEXT), libnbd with several contexts at once (one callback per context,
REQ_ONE per context), qemu-img map with x-dirty-bitmap, and our raw extended-headers client
(one BLOCK_STATUS_EXT chunk per context, DONE on the last).  A script's bad declarations end
the start-up with one line; bad answers fail the request with one line and the server goes on.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nbd
import pytest
from luanbd_procs import REP_ACK, StartServer, client_env, run_client
from test_extended_headers import (
    CMD_BLOCK_STATUS,
    OPT_EXTENDED_HEADERS,
    OPT_SET_META,
    REP_META_CONTEXT,
    REPLY_FLAG_DONE,
    TYPE_BLOCK_STATUS_EXT,
    ExtClient,
)

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "metadata.lua")
PAGE = 4096
SIZE = 1 << 20
WRITTEN, BITMAP, GENERATION = b"example:written", b"qemu:dirty-bitmap:written", \
    b"example:generation"
CONTEXTS = ["base:allocation", WRITTEN.decode(), BITMAP.decode(), GENERATION.decode()]


def _write_pattern(uri: str) -> None:
    """Pages 2-3 written once, page 2 twice more; page 10 once."""
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"a" * 2 * PAGE, 2 * PAGE)
    h.pwrite(b"b" * 10, 2 * PAGE + 100)
    h.pwrite(b"c" * 10, 2 * PAGE + 200)
    h.pwrite(b"d" * PAGE, 10 * PAGE)
    h.shutdown()


def _map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = run_client(["nbdinfo", "--json", f"--map={context}", uri], env=client_env()).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def _selected_client(sock: Path, queries: list[bytes]) -> tuple[ExtClient, dict[bytes, int]]:
    c = ExtClient(sock)
    c.start()
    c.send_option(OPT_EXTENDED_HEADERS)
    assert c.option_reply()[1] == REP_ACK
    c.send_option(OPT_SET_META, struct.pack(">II", 0, len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q for q in queries))
    ids = {}
    while True:
        _, reply, data = c.option_reply()
        if reply == REP_ACK:
            break
        assert reply == REP_META_CONTEXT
        ids[data[4:]] = struct.unpack_from(">I", data)[0]
    assert c.go() == REP_ACK
    return c, ids


def test_listed_and_mapped_by_nbdinfo(start_server: StartServer) -> None:
    server = start_server(EXAMPLE, f"size={SIZE}")
    info = json.loads(run_client(["nbdinfo", "--json", server.uri], env=client_env()).stdout)
    assert info["exports"][0]["contexts"] == CONTEXTS
    _write_pattern(server.uri)
    assert _map(server.uri, "example:written") == [
        (0, 2 * PAGE, 0), (2 * PAGE, 2 * PAGE, 1), (4 * PAGE, 6 * PAGE, 0),
        (10 * PAGE, PAGE, 1), (11 * PAGE, SIZE - 11 * PAGE, 0)]
    assert _map(server.uri, "example:generation") == [
        (0, 2 * PAGE, 0), (2 * PAGE, PAGE, 3), (3 * PAGE, PAGE, 1), (4 * PAGE, 6 * PAGE, 0),
        (10 * PAGE, PAGE, 1), (11 * PAGE, SIZE - 11 * PAGE, 0)]
    assert server.errors() == []


def test_several_contexts_at_once_with_libnbd(start_server: StartServer) -> None:
    server = start_server(EXAMPLE, f"size={SIZE}")
    _write_pattern(server.uri)
    h = nbd.NBD()
    for name in (WRITTEN, GENERATION, b"base:allocation", b"nosuch:context"):
        h.add_meta_context(name.decode())
    h.connect_uri(server.uri)
    assert [h.can_meta_context(c) for c in (CONTEXTS[0], CONTEXTS[1], CONTEXTS[3])] == \
        [True, True, True]
    assert not h.can_meta_context(BITMAP.decode())  # not asked for: not selected
    seen: dict[str, list[int]] = {}

    def callback(context: str, offset: int, entries: list[int], err: int) -> int:
        assert offset == 2 * PAGE
        seen[context] = entries
        return 0

    h.block_status(4 * PAGE, 2 * PAGE, callback)
    assert seen == {
        "base:allocation": [2 * PAGE, 0, 2 * PAGE, 3],
        "example:written": [2 * PAGE, 1, 2 * PAGE, 0],
        "example:generation": [PAGE, 3, PAGE, 1, 2 * PAGE, 0],
    }
    seen.clear()
    h.block_status(4 * PAGE, 2 * PAGE, callback, nbd.CMD_FLAG_REQ_ONE)
    assert seen == {"base:allocation": [2 * PAGE, 0], "example:written": [2 * PAGE, 1],
                    "example:generation": [PAGE, 3]}
    h.shutdown()


def test_qemu_img_map_with_dirty_bitmap(start_server: StartServer) -> None:
    server = start_server(EXAMPLE, f"size={SIZE}")
    _write_pattern(server.uri)
    opts = (f"driver=nbd,server.type=unix,server.path={server.sock},"
            f"x-dirty-bitmap={BITMAP.decode()}")
    out = run_client(["qemu-img", "map", "--output=json", "--image-opts", opts]).stdout
    # qemu reads the bitmap's dirty bit as base:allocation's HOLE bit: "data": false.
    dirty = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
    assert dirty == [(2 * PAGE, 2 * PAGE), (10 * PAGE, PAGE)]


def test_extended_headers_one_chunk_per_context(start_server: StartServer) -> None:
    server = start_server(EXAMPLE, f"size={SIZE}")
    _write_pattern(server.uri)
    assert server.sock is not None
    c, ids = _selected_client(server.sock, [GENERATION, b"base:allocation", GENERATION,
                                            b"example:"])
    with c:
        # Exact names select (once each); the namespace query "example:" selects nothing.
        assert list(ids) == [GENERATION, b"base:allocation"]
        c.request(CMD_BLOCK_STATUS, 2 * PAGE, 3 * PAGE, cookie=7)
        chunks = [c.chunk() for _ in range(2)]
    by_id = {}
    for i, (flags, rtype, cookie, offset, payload) in enumerate(chunks):
        assert (rtype, cookie, offset) == (TYPE_BLOCK_STATUS_EXT, 7, 2 * PAGE)
        assert flags & REPLY_FLAG_DONE == (REPLY_FLAG_DONE if i == 1 else 0)
        cid, count = struct.unpack_from(">II", payload)
        by_id[cid] = list(struct.unpack_from(f">{2 * count}Q", payload, 8))
    assert by_id == {ids[GENERATION]: [PAGE, 3, PAGE, 1, PAGE, 0],
                     ids[b"base:allocation"]: [2 * PAGE, 0, PAGE, 3]}


def test_list_queries(start_server: StartServer) -> None:
    server = start_server(EXAMPLE, f"size={SIZE}")
    code = (
        "h.set_opt_mode(True)\n"
        "h.connect_uri(uri)\n"
        "for q in ([], ['example:'], ['qemu:dirty-bitmap:'], ['qemu:'], ['base:'],\n"
        "          ['example:written', 'nosuch:x']):\n"
        "    got = []\n"
        "    h.clear_meta_contexts()\n"
        "    for name in q:\n"
        "        h.add_meta_context(name)\n"
        "    h.opt_list_meta_context(lambda name: got.append(name) or 0)\n"
        "    print(q, sorted(got))\n"
    )
    out = run_client(["nbdsh", "-c", f"uri = {server.uri!r}", "-c", code],
                     env=client_env()).stdout.splitlines()
    assert out == [
        "[] " + str(sorted(CONTEXTS)),
        "['example:'] ['example:generation', 'example:written']",
        "['qemu:dirty-bitmap:'] ['qemu:dirty-bitmap:written']",
        "['qemu:'] ['qemu:dirty-bitmap:written']",
        "['base:'] ['base:allocation']",
        "['example:written', 'nosuch:x'] ['example:written']",
    ]


def test_filters_pass_or_hide_contexts(start_server: StartServer) -> None:
    # readonly leaves extents alone: the script's contexts reach the client; offset moves
    # offsets, so only base:allocation (which it translates) is served through it.
    through = start_server(EXAMPLE, f"size={SIZE}", options=["--filter=readonly"])
    info = json.loads(run_client(["nbdinfo", "--json", through.uri], env=client_env()).stdout)
    assert info["exports"][0]["contexts"] == CONTEXTS
    hidden = start_server(EXAMPLE, f"size={SIZE}", "offset=4096",
                          options=["--filter=offset"])
    info = json.loads(run_client(["nbdinfo", "--json", hidden.uri], env=client_env()).stdout)
    assert info["exports"][0]["contexts"] == ["base:allocation"]


BAD_DECLARATIONS = {
    "not_a_table": ('return "example:x"', "meta_contexts: return value is not a table"),
    "not_strings": ("return { 1 }", "meta_contexts: item 1 is not a string"),
    "no_namespace": ('return { "plain" }', "is not namespace:name"),
    "base_namespace": ('return { "base:other" }', "the base: namespace is the server's"),
    "twice": ('return { "a:b", "a:b" }', "declared twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_DECLARATIONS))
def test_bad_declarations_stop_the_start(workdir: Path, case: str) -> None:
    body, message = BAD_DECLARATIONS[case]
    plugin = workdir / "bad.lua"
    plugin.write_text(
        "API_VERSION = 2\n"
        f"function meta_contexts() {body} end\n"
        "function meta_extents(h, c, count, offset, flags) return {} end\n"
        "function open(ro) return 1 end\n"
        "function get_size(h) return 4096 end\n"
        "function pread(h, count, offset, flags) return string.rep('\\0', count) end\n")
    result = run_client(["luanbd", "-U", "-", str(plugin), "--run", "true"], check=False,
                        env=client_env())
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("luanbd: error: ") and message in lines[0], \
        result.stderr
    assert "Traceback" not in result.stderr


def test_meta_contexts_without_meta_extents(workdir: Path) -> None:
    plugin = workdir / "half.lua"
    plugin.write_text(
        "API_VERSION = 2\n"
        "function meta_contexts() return { 'a:b' } end\n"
        "function open(ro) return 1 end\n"
        "function get_size(h) return 4096 end\n"
        "function pread(h, count, offset, flags) return string.rep('\\0', count) end\n")
    result = run_client(["luanbd", "-U", "-", str(plugin), "--run", "true"], check=False,
                        env=client_env())
    assert result.returncode == 1
    assert result.stderr == f"luanbd: error: {plugin}: meta_contexts needs a meta_extents " \
                            f"callback\n"


#: meta_extents answers that are a bug: the request fails (EIO) with one log line.
BAD_ANSWERS = {
    "flags_too_big": ("return { { offset, count, 4294967296 } }", "do not fit in 32 bits"),
    "flags_negative": ("return { { offset, count, -1 } }", "do not fit in 32 bits"),
    "flags_string": ("return { { offset, count, 'x' } }", "with integers"),
    "empty": ("return {}", "no extent covering the offset"),
    "not_a_table": ("return 7", "return value is not a table"),
    "error": ("error('no status today')", "no status today"),
}


def test_bad_answers_fail_the_request(start_server: StartServer, workdir: Path) -> None:
    plugin = workdir / "answers.lua"
    branches = "\n".join(
        f"  {'if' if i == 0 else 'elseif'} context == 'bad:{name}' then {body}"
        for i, (name, (body, _)) in enumerate(sorted(BAD_ANSWERS.items())))
    names = ", ".join(f"'bad:{name}'" for name in sorted(BAD_ANSWERS))
    plugin.write_text(
        "API_VERSION = 2\n"
        f"function meta_contexts() return {{ {names}, 'good:one' }} end\n"
        "function meta_extents(h, context, count, offset, flags)\n"
        f"{branches}\n"
        "  end\n"
        "  return { { offset, count, 4294967295 } }\n"
        "end\n"
        "function open(ro) return 1 end\n"
        "function get_size(h) return 65536 end\n"
        "function pread(h, count, offset, flags) return string.rep('\\0', count) end\n")
    server = start_server(str(plugin))
    for name, (_, message) in sorted(BAD_ANSWERS.items()):
        h = nbd.NBD()
        h.add_meta_context(f"bad:{name}")
        h.connect_uri(server.uri)
        before = len(server.errors())
        with pytest.raises(nbd.Error) as err:
            h.block_status(4096, 0, lambda *args: 0)
        assert err.value.errno == "EIO", name
        new = server.errors()[before:]
        assert len(new) == 1 and "meta_extents" in new[0] and message in new[0], (name, new)
        h.shutdown()
    h = nbd.NBD()
    h.add_meta_context("good:one")
    h.connect_uri(server.uri)
    got: list[list[int]] = []
    h.block_status(4096, 0, lambda ctx, off, entries, err: got.append(entries) or 0)
    assert got == [[4096, 0xFFFFFFFF]]
    h.shutdown()


FLAG_PAYLOAD_LEN, FLAG_BLOCK_STAT_PAYLOAD, TYPE_ERROR = 1 << 5, 1 << 12, 2**15 + 1


def test_block_status_payload_picks_contexts(start_server: StartServer) -> None:
    server = start_server(EXAMPLE, f"size={SIZE}")
    _write_pattern(server.uri)
    assert server.sock is not None
    c, ids = _selected_client(server.sock, [b"base:allocation", WRITTEN, GENERATION])
    with c:
        assert c.eflags & FLAG_BLOCK_STAT_PAYLOAD
        # Only example:written, over 3 pages from page 2: the header's length is the
        # payload's, the payload's own u64 is the range asked about.
        payload = struct.pack(">QI", 3 * PAGE, ids[WRITTEN])
        c.request(CMD_BLOCK_STATUS, 2 * PAGE, len(payload), flags=FLAG_PAYLOAD_LEN,
                  cookie=3, data=payload)
        flags, rtype, cookie, offset, body = c.chunk()
        assert (flags, rtype, cookie, offset) == (REPLY_FLAG_DONE, TYPE_BLOCK_STATUS_EXT, 3,
                                                  2 * PAGE)
        cid, count = struct.unpack_from(">II", body)
        assert cid == ids[WRITTEN]
        assert list(struct.unpack_from(f">{2 * count}Q", body, 8)) == [2 * PAGE, 1, PAGE, 0]
        # Two of three, in the client's order of asking or not: both answered, DONE last.
        payload = struct.pack(">QII", PAGE, ids[GENERATION], ids[b"base:allocation"])
        c.request(CMD_BLOCK_STATUS, 2 * PAGE, len(payload), flags=FLAG_PAYLOAD_LEN,
                  cookie=4, data=payload)
        chunks = [c.chunk(), c.chunk()]
        assert [ch[0] for ch in chunks] == [0, REPLY_FLAG_DONE]
        assert {struct.unpack_from(">I", ch[4])[0] for ch in chunks} == \
            {ids[GENERATION], ids[b"base:allocation"]}
        # Bad payloads: EINVAL, and the stream stays in step (the next request works).
        unselected = max(ids.values()) + 1
        for cookie, bad in enumerate([
                b"\0" * 4,                                            # too short
                struct.pack(">Q", PAGE),                              # no id
                struct.pack(">QI", PAGE, unselected),                 # not selected
                struct.pack(">QII", PAGE, ids[WRITTEN], ids[WRITTEN]),  # twice
                struct.pack(">QI", 0, ids[WRITTEN]),                  # empty range
                struct.pack(">QI", SIZE, ids[WRITTEN]) + b"\0\0",     # odd length
                struct.pack(">QI", SIZE, ids[WRITTEN]),               # past the end
        ], 10):
            c.request(CMD_BLOCK_STATUS, PAGE, len(bad), flags=FLAG_PAYLOAD_LEN, cookie=cookie,
                      data=bad)
            flags, rtype, got, _, body = c.chunk()
            assert (flags, rtype, got) == (REPLY_FLAG_DONE, TYPE_ERROR, cookie), bad
            assert struct.unpack_from(">I", body)[0] == 22, bad  # EINVAL
        payload = struct.pack(">QI", PAGE, ids[WRITTEN])
        c.request(CMD_BLOCK_STATUS, 0, len(payload), flags=FLAG_PAYLOAD_LEN, cookie=99,
                  data=payload)
        assert c.chunk()[1:3] == (TYPE_BLOCK_STATUS_EXT, 99)
    assert len(server.errors()) == 7


def test_cow_serves_allocation_depth(start_server: StartServer) -> None:
    """cow: qemu:allocation-depth is 1 in the overlay (written, trimmed), 2 below; the
    plugin's own contexts are not passed up (they would not see the overlay's writes)."""
    server = start_server(EXAMPLE, f"size={SIZE}", options=["--filter=cow"])
    info = json.loads(run_client(["nbdinfo", "--json", server.uri], env=client_env()).stdout)
    assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    h = nbd.NBD()
    h.connect_uri(server.uri)
    block = 65536  # cow's default block size
    h.pwrite(b"x" * 100, block + 10)           # block 1 copied up and written
    h.trim(2 * block, 5 * block)               # blocks 5-6 trimmed in the overlay
    h.shutdown()
    assert _map(server.uri, "qemu:allocation-depth") == [
        (0, block, 2), (block, block, 1), (2 * block, 3 * block, 2), (5 * block, 2 * block, 1),
        (7 * block, SIZE - 7 * block, 2)]
    opts = (f"driver=nbd,server.type=unix,server.path={server.sock},"
            f"x-dirty-bitmap=qemu:allocation-depth")
    out = json.loads(run_client(["qemu-img", "map", "--output=json", "--image-opts",
                                 opts]).stdout)
    # qemu reads depth 1 (bit 0) as its HOLE bit: the overlay's blocks show as "data": false.
    assert [(e["start"], e["length"]) for e in out if not e["data"]] == [
        (block, block), (5 * block, 2 * block)]
