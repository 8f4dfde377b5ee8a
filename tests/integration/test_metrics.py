"""--metrics: what a scrape of the HTTP listener reports, checked against the requests real
clients made; the listener's own robustness (garbage, many and slow clients) while NBD
clients are served."""

from __future__ import annotations

import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest
from luanbd_procs import RawClient, StartServer, client_env, run_client, run_luanbd
from metrics_client import get, scrape, value

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

SIZE = 8 << 20
#: A RAM disk whose READs fail from FAIL_AT on, and whose WRITEs there fail with ENOSPC.
SCRIPT = """
local size, pages = 8 * 1048576, {}
local FAIL_AT = 4 * 1048576
function config(k, v) end
function open(ro) return {} end
function get_size(h) return size end
function can_trim(h) return true end
function pread(h, count, offset)
  if offset >= FAIL_AT then error("no data here") end
  local out = {}
  for i = 0, count - 1, 4096 do out[#out + 1] = pages[offset + i] or string.rep("\\0", 4096) end
  return table.concat(out):sub(1, count)
end
function pwrite(h, buf, offset)
  if offset >= FAIL_AT then nbdkit.set_error(28); error("full") end
  for i = 0, #buf - 1, 4096 do pages[offset + i] = buf:sub(i + 1, i + 4096) end
end
function trim(h, count, offset) end
function flush(h) end
"""


@pytest.fixture
def metered(workdir: Path) -> Path:
    path = workdir / "metered.lua"
    path.write_text(SCRIPT)
    return path


def _requests(uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(5):
        h.pwrite(b"x" * 4096, i * 4096)
    for _ in range(3):
        h.pread(4096, 0)
    h.pread(1 << 20, 0)
    h.pread(2 << 20, 1 << 20)
    h.flush()
    h.trim(65536, 0)
    for offset in (4 << 20, 5 << 20):
        with pytest.raises(nbd.Error):
            h.pread(4096, offset)
    with pytest.raises(nbd.Error):
        h.pwrite(b"y" * 512, 6 << 20)
    h.shutdown()


@pytest.mark.parametrize("fastpath", ["1", "0"], ids=["compiled", "python"])
def test_counts_match_what_the_client_did(start_server: StartServer, workdir: Path,
                                          metered: Path, fastpath: str) -> None:
    """Counts, bytes, errors by errno and the histogram, the same whichever loop served
    (LUANBD_FASTPATH=0 turns the compiled one off)."""
    msock = workdir / "metrics.sock"
    server = start_server(str(metered), options=[f"--metrics={msock}"],
                          env=client_env(LUANBD_FASTPATH=fastpath))
    _requests(server.uri)
    s = scrape(msock)
    read, write = "NBD_CMD_READ", "NBD_CMD_WRITE"
    assert value(s, "luanbd_requests_total", command=read) == 7
    assert value(s, "luanbd_requests_total", command=write) == 6
    assert value(s, "luanbd_requests_total", command="NBD_CMD_FLUSH") == 1
    assert value(s, "luanbd_requests_total", command="NBD_CMD_TRIM") == 1
    assert value(s, "luanbd_request_bytes_total", command=read) == 3 * 4096 + (3 << 20) + 8192
    assert value(s, "luanbd_request_bytes_total", command=write) == 5 * 4096 + 512
    assert value(s, "luanbd_request_errors_total", command=read, errno="EIO") == 2
    assert value(s, "luanbd_request_errors_total", command=write, errno="ENOSPC") == 1
    assert value(s, "luanbd_request_errors_total") == 3
    compiled = value(s, "luanbd_requests_total", command=read, loop="compiled")
    if fastpath == "0":
        assert compiled == 0
    else:  # the 4k ones (the big ones are the Python loop's)
        assert compiled >= 3
    # The histogram: every request in some bucket; +Inf holds them all.
    assert value(s, "luanbd_request_duration_seconds_count", command=read) == 7
    assert value(s, "luanbd_request_duration_seconds_bucket", command=read, le="+Inf") == 7
    assert 0 < value(s, "luanbd_request_duration_seconds_sum", command=read) < 10
    plugin = value(s, "luanbd_plugin_call_seconds_total", command=read)
    assert 0 < plugin <= value(s, "luanbd_request_duration_seconds_sum", command=read)
    assert value(s, "luanbd_connections_total") == 2  # wait_listening's probe and ours
    assert value(s, "luanbd_handshakes_total", outcome="ok") == 1
    assert value(s, "luanbd_lua_memory_bytes", state="server") > 10_000
    (build,) = [ls for (n, ls), _ in s.items() if n == "luanbd_build_info"]
    assert dict(build)["lua_runtime"] == "5.4"
    assert dict(build)["fastpath"] == ("yes" if fastpath == "1" else "no")


def test_exports_and_connection_states(start_server: StartServer, workdir: Path,
                                       metered: Path) -> None:
    """Requests by export name; a parallel script's per-connection Lua states appear while
    their connections are open, and what they counted stays after they close."""
    path = workdir / "parallel.lua"
    path.write_text('API_VERSION = 2\nthread_model = "parallel"\n' + SCRIPT.replace(
        "function pread(h, count, offset)", "function pread(h, count, offset, flags)"))
    msock = workdir / "metrics.sock"
    server = start_server(str(path), options=[f"--metrics={msock}"])
    handles = []
    for name in ("one", "two"):
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_unix(str(server.sock))
        h.pread(4096, 0)
        handles.append(h)
    s = scrape(msock)
    assert value(s, "luanbd_requests_total", command="NBD_CMD_READ", export="one") == 1
    assert value(s, "luanbd_requests_total", command="NBD_CMD_READ", export="two") == 1
    assert value(s, "luanbd_connections_open") == 2
    states = [dict(ls)["state"] for (n, ls), v in s.items() if n == "luanbd_lua_memory_bytes"]
    assert len([st for st in states if st.startswith("connection-")]) == 2
    for h in handles:
        h.shutdown()
    deadline = time.monotonic() + 10
    while value(s := scrape(msock), "luanbd_connections_open") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value(s, "luanbd_connections_open") == 0
    assert value(s, "luanbd_requests_total", command="NBD_CMD_READ") == 2
    assert not [st for (n, ls), v in s.items() if n == "luanbd_lua_memory_bytes"
                for st in [dict(ls)["state"]] if st != "server"]


def test_handshake_outcomes_and_refusals(start_server: StartServer, workdir: Path,
                                         metered: Path) -> None:
    msock = workdir / "metrics.sock"
    server = start_server(str(metered), options=[f"--metrics={msock}", "--timeout=1",
                                                 "--limit=3"])
    assert server.sock is not None
    with RawClient(server.sock) as raw:
        raw.start()
        raw.send_option(2)  # NBD_OPT_ABORT
        raw.option_reply()
        assert raw.closed_by_server()
    with socket.socket(socket.AF_UNIX) as bad:
        bad.connect(str(server.sock))
        bad.recv(18)
        bad.sendall(b"\0\0\0\3" + b"garbage" * 10)
        bad.recv(100)
    silent = [socket.socket(socket.AF_UNIX) for _ in range(4)]
    for s in silent:
        s.connect(str(server.sock))
    time.sleep(2)  # the three admitted time out; the fourth was over --limit
    for s in silent:
        s.close()
    s = scrape(msock)
    assert value(s, "luanbd_handshakes_total", outcome="aborted") == 1
    assert value(s, "luanbd_handshakes_total", outcome="client_gone") >= 1  # the probe
    assert value(s, "luanbd_handshakes_total", outcome="protocol_error") == 1
    assert value(s, "luanbd_handshakes_total", outcome="timeout") >= 2
    assert value(s, "luanbd_connections_refused_total", reason="timeout") >= 2
    assert value(s, "luanbd_connections_refused_total", reason="limit") >= 1
    server.expect_status = 0


def test_tcp_listener_and_openmetrics(start_server: StartServer, metered: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(str(metered), options=[f"--metrics=127.0.0.1:{port}"])
    run_client(["nbdsh", "-u", server.uri, "-c", "h.pread(4096, 0)"])
    status, text = get(("127.0.0.1", port),
                       headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert text.endswith("# EOF\n")
    assert 'luanbd_requests_total{command="NBD_CMD_READ",export="",loop=' in text


def test_garbage_and_many_metrics_clients_never_disturb_nbd(start_server: StartServer,
                                                            workdir: Path,
                                                            metered: Path) -> None:
    """1,000 connections to the metrics listener (most of them closed at once: it serves
    64 at a time), one that trickles half a request, and garbage: NBD clients are served
    meanwhile, and a scrape works once they are gone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    msock = workdir / "metrics.sock"
    server = start_server(str(metered), options=[f"--metrics={msock}"])
    with socket.socket(socket.AF_UNIX) as junk:
        junk.connect(str(msock))
        junk.sendall(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        assert b"400" in junk.recv(200).split(b"\r\n")[0]
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(msock))
    slow.sendall(b"GET /met")
    crowd = []
    for _ in range(1000):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(msock))
        crowd.append(c)
    started = time.monotonic()
    run_client(["nbdsh", "-u", server.uri, "-c",
                "for i in range(200): h.pwrite(b'z' * 4096, i * 4096)\n"
                "assert h.pread(4096, 4096) == b'z' * 4096"])
    assert time.monotonic() - started < 20
    for c in crowd:
        c.close()
    slow.close()
    s = scrape(msock)
    assert value(s, "luanbd_requests_total", command="NBD_CMD_WRITE") == 200
    assert not server.errors()


def test_bad_address_is_one_line(workdir: Path, metered: Path) -> None:
    for address, text in (("nowhere:http", "expecting [HOST]:PORT"),
                          ("127.0.0.1:99999", "expecting [HOST]:PORT"),
                          (f"{workdir}/no/such/dir/m.sock", "No such file or directory")):
        result = run_luanbd("-f", "-U", str(workdir / "s.sock"), f"--metrics={address}",
                            str(metered))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], result.stderr


def test_metrics_port_in_use(workdir: Path, metered: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_luanbd("-f", "-U", str(workdir / "s.sock"),
                            f"--metrics=127.0.0.1:{port}", str(metered))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"luanbd: error: --metrics=127.0.0.1:{port}: "
                                     f"Address already in use")


def test_off_by_default(start_server: StartServer, metered: Path) -> None:
    """Without --metrics no listener is opened: only the NBD socket is the server's."""
    server = start_server(str(metered))
    out = subprocess.run(["ss", "-xlpn"], capture_output=True, text=True, check=False).stdout
    ours = [line for line in out.splitlines() if f"pid={server.proc.pid}," in line]
    assert len(ours) == 1 and str(server.sock) in ours[0]
    tcp = subprocess.run(["ss", "-tlpn"], capture_output=True, text=True, check=False).stdout
    assert f"pid={server.proc.pid}," not in tcp
