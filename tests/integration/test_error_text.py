"""A failed callback's message reaches the client in the structured error chunk (issue 16),
as nbdkit >= 1.42 sends it: libnbd shows it (its debug output names the server's message),
and the raw extended-headers client checks the bytes: the log line's text, valid UTF-8, at
most MAX_ERROR_TEXT bytes cut at a character boundary.  Simple replies have no room for it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from luanbd_procs import REP_ACK, StartServer, client_env, run_client
from test_extended_headers import (
    CMD_READ,
    CMD_WRITE,
    OPT_EXTENDED_HEADERS,
    REPLY_FLAG_DONE,
    TYPE_ERROR,
    ExtClient,
)

from luanbd.server.requests import MAX_ERROR_TEXT

PLUGIN = """
API_VERSION = 2
function open(ro) return 1 end
function get_size(h) return 1048576 end
function can_write(h) return true end
function pread(h, count, offset, flags)
  if offset == 0 then error("bad sector at " .. offset) end
  if offset == 4096 then error(string.rep("\\u{e9}", 2000)) end   -- 4000 bytes of UTF-8
  if offset == 8192 then error("not utf-8: \\xff\\xfe") end
  return string.rep("\\0", count)
end
function pwrite(h, buf, offset, flags)
  nbdkit.set_error(nbdkit.ENOSPC)
  error("disk full")
end
"""


def _server(start_server: StartServer, workdir: Path) -> tuple[str, Path]:
    plugin = workdir / "failing.lua"
    plugin.write_text(PLUGIN)
    server = start_server(str(plugin))
    assert server.sock is not None
    return str(plugin), server.sock


def test_libnbd_sees_the_message(start_server: StartServer, workdir: Path) -> None:
    plugin, sock = _server(start_server, workdir)
    code = ("try:\n    h.pread(512, 0)\nexcept nbd.Error as e:\n    print('errno', e.errno)\n")
    result = run_client(["nbdsh", "-u", f"nbd+unix:///?socket={sock}", "-c", code],
                        env=client_env(LIBNBD_DEBUG="1"))
    assert "errno EIO" in result.stdout
    assert f"structured error server message: pread: {plugin}:7: bad sector at 0" \
        in result.stderr


def _error_chunk(c: ExtClient, cmd: int, offset: int, data: bytes = b"") -> tuple[int, bytes]:
    c.request(cmd, offset, len(data) or 512, cookie=5, data=data)
    flags, rtype, cookie, got_offset, payload = c.chunk()
    assert (flags, rtype, cookie, got_offset) == (REPLY_FLAG_DONE, TYPE_ERROR, 5, offset)
    error, length = struct.unpack_from(">IH", payload)
    assert len(payload) == 6 + length
    return error, payload[6:]


def test_message_bytes_under_extended_headers(start_server: StartServer,
                                              workdir: Path) -> None:
    plugin, sock = _server(start_server, workdir)
    with ExtClient(sock) as c:
        c.start()
        c.send_option(OPT_EXTENDED_HEADERS)
        assert c.option_reply()[1] == REP_ACK
        assert c.go() == REP_ACK
        assert _error_chunk(c, CMD_READ, 0) == (5, f"pread: {plugin}:7: bad sector at 0".encode())
        # Every command's error is a structured chunk here: a WRITE's too, with its errno.
        assert _error_chunk(c, CMD_WRITE, 0, b"x" * 512) == (28, f"pwrite: {plugin}:14: "
                                                                 f"disk full".encode())
        error, text = _error_chunk(c, CMD_READ, 4096)
        assert error == 5 and len(text) <= MAX_ERROR_TEXT
        decoded = text.decode("utf-8")  # whole characters only
        assert decoded.startswith(f"pread: {plugin}:8: \u00e9") and decoded.endswith("\u00e9")
        assert len(text) > MAX_ERROR_TEXT - 2
        error, text = _error_chunk(c, CMD_READ, 8192)
        assert error == 5 and text.decode("utf-8").startswith(f"pread: {plugin}:9: not utf-8: ")
