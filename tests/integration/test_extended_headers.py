"""NBD_OPT_EXTENDED_HEADERS over a real luanbd socket.

The libnbd of this Debian predates extended headers, so the client here is our own: a raw
socket that negotiates EXTENDED_HEADERS and GO, then speaks 32-byte extended requests and
reads extended reply chunks (layouts from proto.md, written out below).  libnbd clients,
which never ask for extended headers, must see no change.
"""

from __future__ import annotations

import struct
from pathlib import Path

from luanbd_procs import REP_ACK, RawClient, StartServer, run_client

OPT_STRUCTURED_REPLY, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 10, 11
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_CACHE, CMD_BLOCK_STATUS = 5, 7
FLAG_PAYLOAD_LEN = 1 << 5
EXT_REQUEST_MAGIC = 0x21E41C71
EXT_REPLY_MAGIC = 0x6E8A278C
REPLY_FLAG_DONE = 1
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_BLOCK_STATUS_EXT, TYPE_ERROR = 0, 1, 6, 2**15 + 1
REP_META_CONTEXT = 4
EINVAL, ENOSPC = 22, 28
GIB = 1 << 30
SIZE = 16 * GIB

#: A 16 GiB disk: 1 MiB of RAM at the start, the rest a hole; zero requests are logged, so
#: a 64-bit WRITE_ZEROES shows up in the plugin with its full length.
PLUGIN = """
API_VERSION = 2
local SIZE = 16 * 1024 * 1024 * 1024
local RAM = 1024 * 1024
local ram = string.rep("\\0", RAM)
local log = nil
function config(key, value) if key == "log" then log = value end end
function open(readonly) return {} end
function get_size(h) return SIZE end
function can_write(h) return true end
function can_zero(h) return true end
function can_extents(h) return true end
function pread(h, count, offset, flags)
   if offset + count <= RAM then return ram:sub(offset + 1, offset + count) end
   return string.rep("\\0", count)
end
function pwrite(h, buf, offset, flags)
   if offset + #buf > RAM then error("write past the RAM part") end
   ram = ram:sub(1, offset) .. buf .. ram:sub(offset + #buf + 1)
end
function zero(h, count, offset, flags)
   local f = io.open(log, "a"); f:write(offset .. " " .. count .. "\\n"); f:close()
end
function extents(h, count, offset, flags)
   if offset < RAM then
      return { { 0, RAM, 0 }, { RAM, SIZE - RAM, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO } }
   end
   return { { offset, SIZE - offset, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO } }
end
"""


class ExtClient(RawClient):
    def negotiate(self, *, meta: bool = True) -> None:
        self.start()
        self.send_option(OPT_EXTENDED_HEADERS)
        assert self.option_reply() == (OPT_EXTENDED_HEADERS, REP_ACK, b"")
        if meta:
            query = b"base:allocation"
            self.send_option(OPT_SET_META, struct.pack(">II", 0, 1)
                             + struct.pack(">I", len(query)) + query)
            option, reply, data = self.option_reply()
            assert (option, reply, data[4:]) == (OPT_SET_META, REP_META_CONTEXT, query)
            self.context_id = struct.unpack_from(">I", data)[0]
            assert self.option_reply()[1] == REP_ACK
        assert self.go() == REP_ACK

    def request(self, cmd: int, offset: int, length: int, *, flags: int = 0, cookie: int = 1,
                data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, flags, cmd, cookie,
                                      offset, length) + data)

    def chunk(self) -> tuple[int, int, int, int, bytes]:
        """(flags, type, cookie, offset, payload) of one extended reply chunk."""
        magic, flags, rtype, cookie, offset, length = struct.unpack(
            ">IHHQQQ", self.recv_exact(32))
        assert magic == EXT_REPLY_MAGIC, hex(magic)
        return flags, rtype, cookie, offset, self.recv_exact(length)


def _server(start_server: StartServer, workdir: Path) -> tuple[Path, Path]:
    plugin = workdir / "ext.lua"
    plugin.write_text(PLUGIN)
    log = workdir / "zero.log"
    server = start_server(str(plugin), f"log={log}")
    assert server.sock is not None
    return server.sock, log


def test_write_read_block_status_errors(start_server: StartServer, workdir: Path) -> None:
    sock, log = _server(start_server, workdir)
    with ExtClient(sock) as c:
        c.negotiate()
        assert c.size == SIZE
        # WRITE with and without NBD_CMD_FLAG_PAYLOAD_LEN: a NONE chunk with DONE.
        c.request(CMD_WRITE, 4096, 5, flags=FLAG_PAYLOAD_LEN, cookie=11, data=b"hello")
        assert c.chunk() == (REPLY_FLAG_DONE, TYPE_NONE, 11, 4096, b"")
        c.request(CMD_WRITE, 4101, 6, cookie=12, data=b" world")
        assert c.chunk() == (REPLY_FLAG_DONE, TYPE_NONE, 12, 4101, b"")
        # READ: one OFFSET_DATA chunk (u64 offset, data).
        c.request(CMD_READ, 4096, 11, cookie=13)
        assert c.chunk() == (REPLY_FLAG_DONE, TYPE_OFFSET_DATA, 13, 4096,
                             struct.pack(">Q", 4096) + b"hello world")
        # BLOCK_STATUS over more than 4 GiB: BLOCK_STATUS_EXT with 64-bit descriptors.
        c.request(CMD_BLOCK_STATUS, 0, 8 * GIB, cookie=14)
        flags, rtype, cookie, offset, payload = c.chunk()
        assert (flags, rtype, cookie, offset) == (REPLY_FLAG_DONE, TYPE_BLOCK_STATUS_EXT, 14, 0)
        context_id, count = struct.unpack_from(">II", payload)
        assert context_id == c.context_id and len(payload) == 8 + 16 * count
        descriptors = [struct.unpack_from(">QQ", payload, 8 + 16 * i) for i in range(count)]
        assert descriptors[0] == (1 << 20, 0)
        assert all(flags == 3 for _, flags in descriptors[1:])
        assert sum(length for length, _ in descriptors) >= 1 << 20
        # WRITE_ZEROES of 5 GiB at 6 GiB: the plugin sees the full 64-bit length.
        c.request(CMD_WRITE_ZEROES, 6 * GIB, 5 * GIB, cookie=15)
        assert c.chunk() == (REPLY_FLAG_DONE, TYPE_NONE, 15, 6 * GIB, b"")
        assert log.read_text().split() == [str(6 * GIB), str(5 * GIB)]
        # Errors are ERROR chunks, for every command (no simple replies).
        c.request(CMD_WRITE_ZEROES, SIZE - 512, 1024, cookie=16)
        flags, rtype, cookie, offset, payload = c.chunk()
        assert (flags, rtype, cookie, offset) == (REPLY_FLAG_DONE, TYPE_ERROR, 16, SIZE - 512)
        error, msg_len = struct.unpack_from(">IH", payload)
        assert (error, len(payload)) == (ENOSPC, 6 + msg_len)
        c.request(CMD_TRIM, 0, 4096, cookie=17)  # TRIM is not offered by this plugin
        assert c.chunk()[:3] == (REPLY_FLAG_DONE, TYPE_ERROR, 17)
        c.request(CMD_READ, 0, 512, flags=FLAG_PAYLOAD_LEN, cookie=18, data=bytes(512))
        flags, rtype, cookie, _, payload = c.chunk()
        assert (rtype, cookie, struct.unpack_from(">I", payload)[0]) == (TYPE_ERROR, 18, EINVAL)
        # The stream stayed in step after the refused payload.
        c.request(CMD_FLUSH, 0, 0, cookie=19)
        assert c.chunk()[1:3] in ((TYPE_NONE, 19), (TYPE_ERROR, 19))
        c.request(CMD_DISC, 0, 0, cookie=20)
        assert c.closed_by_server()


def test_compact_request_after_extended_headers_closes(start_server: StartServer,
                                                       workdir: Path) -> None:
    sock, _ = _server(start_server, workdir)
    with ExtClient(sock) as c:
        c.negotiate(meta=False)
        c.send_request(CMD_READ, 0, 512)  # a 28-byte header: a protocol violation
        c.sock.sendall(bytes(4))
        assert c.closed_by_server()


def test_libnbd_clients_unaffected(start_server: StartServer, workdir: Path) -> None:
    plugin = workdir / "ext.lua"
    plugin.write_text(PLUGIN)
    server = start_server(str(plugin), f"log={workdir / 'zero.log'}")
    out = run_client(["nbdinfo", "--map", server.uri]).stdout
    assert "hole,zero" in out and "data" in out
    run_client(["nbdinfo", server.uri])


#: An API 2 script that records the count each ranged callback gets.
COUNTS_PLUGIN = """
API_VERSION = 2
local SIZE = 16 * 1024 * 1024 * 1024
local log = nil
local function note(name, count, offset)
   local f = io.open(log, "a"); f:write(name .. " " .. offset .. " " .. count .. "\\n"); f:close()
end
function config(key, value) if key == "log" then log = value end end
function open(readonly) return {} end
function get_size(h) return SIZE end
function can_write(h) return true end
function can_trim(h) return true end
function can_zero(h) return true end
function can_cache(h) return nbdkit.CACHE_NATIVE end
function pread(h, count, offset, flags) return string.rep("\\0", count) end
function pwrite(h, buf, offset, flags) end
function trim(h, count, offset, flags) note("trim", count, offset) end
function zero(h, count, offset, flags) note("zero", count, offset) end
function cache(h, count, offset, flags) note("cache", count, offset) end
function extents(h, count, offset, flags)
   note("extents", count, offset)
   return { { offset, count, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO } }
end
function meta_contexts() return { "x:count" } end
function meta_extents(h, context, count, offset, flags)
   note("meta_extents", count, offset)
   return { { offset, count, 7 } }
end
"""


def test_64_bit_lengths_reach_the_script_whole(start_server: StartServer,
                                               workdir: Path) -> None:
    """Under extended headers TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS of more than 4 GiB
    reach an API 2 script as one call with the client's count, and block status answers
    the whole range in one 64-bit descriptor per context."""
    plugin = workdir / "counts.lua"
    plugin.write_text(COUNTS_PLUGIN)
    log = workdir / "counts.log"
    server = start_server(str(plugin), f"log={log}")
    assert server.sock is not None
    big, off = 9 * GIB + 12345, GIB + 1
    with ExtClient(server.sock) as c:
        c.start()
        c.send_option(OPT_EXTENDED_HEADERS)
        assert c.option_reply()[1] == REP_ACK
        queries = [b"base:allocation", b"x:count"]
        c.send_option(OPT_SET_META, struct.pack(">II", 0, 2) + b"".join(
            struct.pack(">I", len(q)) + q for q in queries))
        ids = []
        while (reply := c.option_reply())[1] != REP_ACK:
            ids.append(struct.unpack_from(">I", reply[2])[0])
        assert c.go() == REP_ACK
        for cookie, cmd in enumerate((CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE), 1):
            c.request(cmd, off, big, cookie=cookie)
            assert c.chunk()[:3] == (REPLY_FLAG_DONE, TYPE_NONE, cookie)
        c.request(CMD_BLOCK_STATUS, off, big, cookie=9)
        chunks = [c.chunk(), c.chunk()]
    got = {}
    for _, rtype, _, _, payload in chunks:
        assert rtype == TYPE_BLOCK_STATUS_EXT
        cid, count = struct.unpack_from(">II", payload)
        got[cid] = list(struct.unpack_from(f">{2 * count}Q", payload, 8))
    assert got == {ids[0]: [big, 3], ids[1]: [big, 7]}
    assert log.read_text().splitlines() == [
        f"{name} {off} {big}" for name in ("trim", "zero", "cache", "extents", "meta_extents")]
