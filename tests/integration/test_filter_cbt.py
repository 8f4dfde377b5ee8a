"""--filter=cbt, changed-block tracking served as qemu:dirty-bitmap:NAME (issue 16).

Real clients only: nbdinfo --map of the bitmap after writes, trims and zeroes at unaligned
offsets, libnbd with base:allocation and the bitmap together (REQ_ONE too), qemu-img map
with x-dirty-bitmap, persistence across a clean stop, SIGKILL and a damaged file, SIGUSR1's
new generation, and the README's incremental backup (examples/cbt-backup.sh) end to end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from luanbd_procs import LUANBD, StartServer, client_env, run_client

ROOT = Path(__file__).resolve().parents[2]
SPARSE = str(ROOT / "examples" / "sparse.lua")
K64 = 65536
CONTEXT = "qemu:dirty-bitmap:cbt"


def _dirty(uri: str, context: str = CONTEXT) -> list[tuple[int, int]]:
    out = run_client(["nbdinfo", "--json", f"--map={context}", uri], env=client_env()).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]


def _change(uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"x" * 10, K64 - 5)               # blocks 0 and 1
    h.trim(K64, 5 * K64 + 1)                   # blocks 5 and 6
    h.zero(100, 10 * K64)                      # block 10
    h.shutdown()


def test_changes_are_tracked(start_server: StartServer) -> None:
    server = start_server(SPARSE, "size=1M", options=["--filter=cbt"])
    assert _dirty(server.uri) == []
    _change(server.uri)
    assert _dirty(server.uri) == [(0, 2 * K64), (5 * K64, 2 * K64), (10 * K64, K64)]
    # Both contexts at once, and REQ_ONE.
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context(CONTEXT)
    h.connect_uri(server.uri)
    seen: dict[str, list[int]] = {}
    h.block_status(4 * K64, 4 * K64,
                   lambda ctx, off, entries, err: seen.__setitem__(ctx, entries) or 0)
    assert seen[CONTEXT] == [K64, 0, 2 * K64, 1, K64, 0]
    assert seen["base:allocation"][1::2][0] == 3  # block 4: a hole of sparse.lua
    seen.clear()
    h.block_status(4 * K64, 4 * K64,
                   lambda ctx, off, entries, err: seen.__setitem__(ctx, entries) or 0,
                   nbd.CMD_FLAG_REQ_ONE)
    assert seen[CONTEXT] == [K64, 0]
    h.shutdown()
    opts = f"driver=nbd,server.type=unix,server.path={server.sock},x-dirty-bitmap={CONTEXT}"
    out = json.loads(run_client(["qemu-img", "map", "--output=json", "--image-opts",
                                 opts]).stdout)
    assert [(e["start"], e["length"]) for e in out if not e["data"]] == _dirty(server.uri)
    # A new generation.
    server.proc.send_signal(signal.SIGUSR1)
    server.wait_log("bitmap cleared (SIGUSR1)")
    assert _dirty(server.uri) == []


def test_big_disk_and_block_size(start_server: StartServer) -> None:
    server = start_server(SPARSE, "size=9G", "cbt-blocksize=4K", "cbt-bitmap=b2",
                          options=["--filter=cbt"])
    h = nbd.NBD()
    h.connect_uri(server.uri)
    size = h.get_size()
    h.pwrite(b"y", size - 1)
    h.pwrite(b"y" * 8192, (1 << 32) - 4096)
    h.shutdown()
    assert _dirty(server.uri, "qemu:dirty-bitmap:b2") == [
        ((1 << 32) - 4096, 8192), (size - 4096, 4096)]


def _serve(workdir: Path, state: Path, *extra: str,
           procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    sock = workdir / "p.sock"
    sock.unlink(missing_ok=True)
    log = open(workdir / "p.log", "ab")  # noqa: SIM115 (the process owns it)
    proc = subprocess.Popen([LUANBD, "-f", "-U", str(sock), "--filter=cbt", SPARSE,
                             "size=1M", f"cbt-file={state}", *extra],
                            stdout=log, stderr=log, env=client_env())
    procs.append(proc)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, \
            (workdir / "p.log").read_text()
        time.sleep(0.05)
    time.sleep(0.2)
    return proc


def test_persistence(workdir: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _persistence(workdir, procs)
    finally:  # a failed check leaves no server behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _persistence(workdir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    state = workdir / "bitmap"
    uri = f"nbd+unix:///?socket={workdir / 'p.sock'}"
    logfile = workdir / "p.log"
    proc = _serve(workdir, state, procs=procs)
    _change(uri)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    # A clean stop keeps the bitmap.
    proc = _serve(workdir, state, procs=procs)
    assert _dirty(uri) == [(0, 2 * K64), (5 * K64, 2 * K64), (10 * K64, K64)]
    proc.kill()
    proc.wait()
    # After SIGKILL everything counts as changed, with one line saying why.
    proc = _serve(workdir, state, procs=procs)
    assert _dirty(uri) == [(0, 1 << 20)]
    assert logfile.read_text().count("every block counts as changed: the server did not "
                                     "stop cleanly") == 1
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert _dirty(uri) == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    # A damaged file: the same.
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    proc = _serve(workdir, state, procs=procs)
    assert _dirty(uri) == [(0, 1 << 20)]
    assert "is damaged" in logfile.read_text()
    # A clean stop while "everything changed" is still owed keeps owing it.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    proc = _serve(workdir, state, procs=procs)
    assert _dirty(uri) == [(0, 1 << 20)]
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    # Another block size than the saved one.
    proc = _serve(workdir, state, "cbt-blocksize=128K", procs=procs)
    assert _dirty(uri) == [(0, 1 << 20)]
    assert "another block size (65536)" in logfile.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


@pytest.mark.parametrize(("arg", "message"), [
    ("cbt-blocksize=1000", "cbt-blocksize is out of range (4096..1G) or not a power of 2"),
    ("cbt-blocksize=2G", "cbt-blocksize is out of range"),
    ("cbt-file=/nonexistent/dir/bitmap", "cbt-file: /nonexistent/dir/bitmap: No such file"),
])
def test_bad_parameters(arg: str, message: str) -> None:
    result = run_client([LUANBD, "-U", "-", "--filter=cbt", SPARSE, "size=1M", arg,
                         "--run", "true"], check=False, env=client_env())
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("luanbd: error: ") and message in lines[0], \
        result.stderr


def test_incremental_backup_example(workdir: Path) -> None:
    """The README's example, as it is there."""
    result = subprocess.run(["sh", "examples/cbt-backup.sh", str(workdir / "demo")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=client_env(), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert "copied 131072 bytes" in out and out[-1] == "backup equals the disk", result.stdout
    assert "Traceback" not in result.stderr
