"""The next request received while a big WRITE runs (server/readahead.py).

What must hold: the next payload is taken off the socket while the plugin still works on
this WRITE (the client is not left blocked on a full socket); the replies and the data
are those of the plain loop, whatever the sizes that follow each other; nbdkit_disconnect
in a WRITE closes the connection without waiting for a next request; a bad request after
a big WRITE gets the WRITE's reply, then the usual one error line; no thread outlives its
connection; --metrics counts what it did (luanbd_read_aheads_total).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from pathlib import Path

from luanbd_procs import CMD_READ, CMD_WRITE, RawClient, StartServer, run_client
from metrics_client import scrape, value

MiB = 1024 * 1024

# Whole requests kept by offset (a read returns what the write at that offset wrote);
# the first WRITE at offset 0 works for a second first (os.clock: CPU time, busy), and
# WRITEs from 40 MiB on for 2 ms each.
SCRIPT = """
local data = {}
local slow = true
function open(readonly) return {} end
function get_size(h) return 64 * 1048576 end
function can_write(h) return true end
function pread(h, count, offset)
  local d = data[offset]
  if d ~= nil and #d == count then return d end
  return string.rep("\\0", count)
end
function pwrite(h, buf, offset)
  if offset == 0 and slow then
    slow = false
    local t = os.clock()
    while os.clock() - t < 1 do end
  end
  if offset == 32 * 1048576 then nbdkit.disconnect(false) end
  if offset >= 40 * 1048576 then  -- 2 ms of work per WRITE here
    local t = os.clock()
    while os.clock() - t < 0.002 do end
  end
  data[offset] = buf
end
"""


def plugin(tmp_path: Path) -> str:
    path = tmp_path / "kept.lua"
    path.write_text(SCRIPT)
    return str(path)


def request(cmd: int, offset: int, length: int, *, cookie: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie, offset, length)


def send_big_write(c: RawClient, offset: int, *, cookie: int) -> None:
    c.sock.sendall(request(CMD_WRITE, offset, MiB, cookie=cookie) + os.urandom(MiB))


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def test_the_next_payload_leaves_the_socket_while_a_write_runs(
        start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(plugin(tmp_path))
    assert server.sock is not None
    first, second = os.urandom(MiB), os.urandom(4 * MiB)
    with RawClient(server.sock, timeout=30) as c:
        c.connect_export()
        c.sock.sendall(request(CMD_WRITE, 0, len(first), cookie=1) + first)
        sent = threading.Event()

        def send_second() -> None:
            # 4 MiB is far more than a socket holds: this returns only once the server
            # has received most of it.
            with contextlib.suppress(OSError):  # the test failed and closed the socket
                c.sock.sendall(request(CMD_WRITE, 8 * MiB, len(second), cookie=2) + second)
                sent.set()

        sender = threading.Thread(target=send_second)
        sender.start()
        assert c.reply()[:2] == (0, 1)  # after the plugin's second of work
        # The second payload was taken while the first WRITE ran, not after its reply.
        assert sent.is_set()
        sender.join()
        assert c.reply()[:2] == (0, 2)
        assert c.read(0, len(first), cookie=3) == (0, first)
        assert c.read(8 * MiB, len(second), cookie=4) == (0, second)


def test_big_writes_of_any_sizes_in_a_row_land_intact(
        start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(plugin(tmp_path))
    sizes = [MiB, MiB, 300 * 1024, MiB, 64 * 1024, 2 * MiB + 5, 2 * MiB + 5, 65536, MiB]
    code = f"""
import os
sizes = {sizes!r}
offsets = [(i + 1) * 3 * 1048576 for i in range(len(sizes))]  # never 32 MiB
datas = [os.urandom(n) for n in sizes]
cookies = []
for i, (n, off, d) in enumerate(zip(sizes, offsets, datas)):
    flags = nbd.CMD_FLAG_FUA if i % 3 == 2 else 0
    cookies.append(h.aio_pwrite(d, off, flags=flags))
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
print(all(h.pread(n, off) == d for n, off, d in zip(sizes, offsets, datas)))
"""
    for _ in range(2):
        out = run_client(["nbdsh", "-u", server.uri, "-c", code])
        assert out.stdout == "True\n", out.stdout + out.stderr
    assert server.errors() == []


def test_disconnect_in_a_write_does_not_wait_for_a_next_request(
        start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(plugin(tmp_path))
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        send_big_write(c, 32 * MiB, cookie=7)
        assert c.reply()[:2] == (0, 7)
        # The client sends nothing more: the server closes the connection by itself.
        assert c.closed_by_server(timeout=10)
    assert server.alive()


def test_a_bad_request_after_a_big_write(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(plugin(tmp_path))
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        send_big_write(c, 4 * MiB, cookie=5)
        time.sleep(0.2)  # the WRITE runs; the next header comes while it does
        c.sock.sendall(b"\xde\xad" * 14)
        assert c.reply()[:2] == (0, 5)
        assert c.closed_by_server(timeout=10)
    server.wait_log("'magic' field is incorrect")
    assert len(server.errors()) == 1, server.log()
    out = run_client(["nbdsh", "-u", server.uri, "-c",
                      "print(h.pread(1048576, 4 * 1048576) == bytes(1048576))"])
    assert out.stdout == "False\n"  # the WRITE landed; the server goes on


def test_no_thread_outlives_its_connection(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(plugin(tmp_path))
    assert server.sock is not None
    # One request first, so that the threads a first connection starts once are there.
    run_client(["nbdsh", "-u", server.uri, "-c", "h.pwrite(b'a' * 1048576, 1048576)"])
    time.sleep(0.3)
    before = threads_of(server.proc.pid)
    for i in range(5):
        with RawClient(server.sock) as c:
            c.connect_export()
            for j in range(3):
                data = bytes([i * 3 + j]) * MiB
                assert c.write((10 + j) * MiB, data, cookie=j) == 0
            if i % 2:  # leave with a read-ahead waiting for a request that never comes
                continue
            c.sock.sendall(request(CMD_READ, 10 * MiB, 4096, cookie=99)[:10])
    deadline = time.monotonic() + 10
    while threads_of(server.proc.pid) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads_of(server.proc.pid) == before


def aheads(msock: Path) -> dict[str, float]:
    s = scrape(msock)
    return {o: value(s, "luanbd_read_aheads_total", outcome=o)
            for o in ("gained", "missed", "skipped")}


def test_it_backs_off_for_a_client_that_waits_for_each_reply(
        start_server: StartServer, tmp_path: Path) -> None:
    msock = tmp_path / "m.sock"
    server = start_server(plugin(tmp_path), options=[f"--metrics={msock}"])
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        for i in range(40):  # one at a time: each reply before the next request
            assert c.write((1 + i % 8) * MiB, bytes([i]) * (128 * 1024), cookie=i) == 0
    got = aheads(msock)
    # 2 misses, 8 skipped, 2 misses, 16 skipped, 2 misses, then skipping again.
    assert got["gained"] == 0, got
    assert got["missed"] == 6, got
    assert got["skipped"] == 34, got
    # A client that pipelines big WRITEs: the next one is on its way while each runs
    # (with a plugin as quick as this one's first 40 MiB nothing comes meanwhile).
    code = """
import os
data = os.urandom(1048576)
cookies = [h.aio_pwrite(data, (40 + i % 8) * 1048576) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
"""
    run_client(["nbdsh", "-u", server.uri, "-c", code])
    after = aheads(msock)
    assert after["gained"] >= 32, after
