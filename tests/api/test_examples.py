"""The API 2 examples of ``examples/``, run as a user would (executable scripts, captive
``--run`` with nbdinfo/nbdsh/nbdcopy) and through libnbd."""

from __future__ import annotations

import errno
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
from apitest import EXAMPLES, LUANBD, Servers, outcome

nbd = pytest.importorskip("nbd")

MiB = 1024 * 1024
SPARSE = EXAMPLES / "sparse.lua"
FILEFUA = EXAMPLES / "filefua.lua"
EXPORTS = EXAMPLES / "exports.lua"
ERRORS = EXAMPLES / "errors.lua"
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


@pytest.mark.parametrize("script", [SPARSE, FILEFUA, EXPORTS, ERRORS])
def test_example_is_an_executable_api2_script(script: Path) -> None:
    assert os.access(script, os.X_OK)
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env -S luanbd lua"
    assert "API_VERSION = 2" in lines


@pytest.mark.parametrize("script,args", [(SPARSE, ["size=1M"]), (EXPORTS, []),
                                         (ERRORS, [])])
def test_example_runs_through_its_shebang(servers: Servers, script: Path,
                                          args: list[str]) -> None:
    r = servers.run([str(script), *args, "-U", "-", "--run", 'nbdinfo --json "$uri"'])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exports"][0]["export-size"] > 0


def block_status(h: Any, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    entries: list[int] = []
    h.block_status(count, offset, lambda m, o, e, err: entries.extend(e) or 0, flags)
    return list(zip(entries[::2], entries[1::2], strict=True))


# --- sparse.lua --------------------------------------------------------------------------
def test_sparse_map(servers: Servers) -> None:
    r = servers.run([str(SPARSE), "size=1M", "-U", "-", "--run",
                     'nbdsh -u "$uri" -c "h.pwrite(b\\"x\\" * 8192, 8192)" '
                     '-c "h.zero(4096, 20480, nbd.CMD_FLAG_NO_HOLE)" '
                     '-c "h.pwrite(b\\"y\\" * 4096, 32768)" -c "h.trim(4096, 32768)" && '
                     'nbdinfo --map --json "$uri"'])
    assert r.returncode == 0, r.stderr
    got = [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]
    assert got == [(0, 8192, 3), (8192, 8192, 0), (16384, 4096, 3), (20480, 4096, 2),
                   (24576, MiB - 24576, 3)]


def test_sparse_capabilities(servers: Servers) -> None:
    h = servers.connect(SPARSE, "size=64M")
    assert h.get_size() == 64 * MiB
    assert h.can_multi_conn() and h.can_fast_zero() and h.can_trim() and h.can_flush()
    assert [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                          nbd.SIZE_MAXIMUM)] == [1, 4096, 0xFFFFFFFF]


def test_sparse_data_and_extents(servers: Servers) -> None:
    h = servers.connect(SPARSE, "size=1M")
    data = os.urandom(10000)
    h.pwrite(data, 5000)
    assert bytes(h.pread(10000, 5000)) == data
    assert bytes(h.pread(100, 0)) == bytes(100)
    h.zero(4096, 8192)  # may trim: a hole again
    h.zero(4096, 12288, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    assert bytes(h.pread(8192, 8192)) == bytes(8192)
    # Pages: 0 never written, 1 data, 2 zeroed (hole), 3 zeroed with NO_HOLE, 4 never.
    assert block_status(h, 20480, 0) == [(4096, HOLE_ZERO), (4096, 0), (4096, HOLE_ZERO),
                                         (4096, nbd.STATE_ZERO), (4096, HOLE_ZERO)]
    assert block_status(h, 20480, 0, nbd.CMD_FLAG_REQ_ONE) == [(4096, HOLE_ZERO)]
    # The first extent starts at the offset, even in the middle of a page.
    first = block_status(h, 2000, 5000)[0]
    assert first[1] == 0 and first[0] >= 2000


def test_sparse_connections_share_the_disk(servers: Servers) -> None:
    """can_multi_conn is honest: what one connection writes, another reads."""
    sock = servers.listen(SPARSE, "size=1M")
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_unix(str(sock))
    b.connect_unix(str(sock))
    a.pwrite(b"shared", 4096)
    b.flush()
    assert bytes(b.pread(6, 4096)) == b"shared"
    a.shutdown()
    b.shutdown()


def test_sparse_needs_size(servers: Servers) -> None:
    r = servers.run([LUANBD, "-U", "-", str(SPARSE), "--run", "true"])
    assert r.returncode == 1
    assert "size parameter is required" in r.stderr


def test_sparse_metadata(servers: Servers) -> None:
    r = servers.run([LUANBD, str(SPARSE), "--dump-plugin"])
    lines = r.stdout.splitlines()
    assert {"name=sparse", "version=1.0", "api_version=2", "has_load=1", "has_extents=1",
            "has_block_size=1", "has_can_multi_conn=1"} <= set(lines)
    r = servers.run([LUANBD, str(SPARSE), "--help"])
    assert "size=SIZE   (required) disk size" in r.stdout


def test_sparse_load_runs_before_config(servers: Servers) -> None:
    r = servers.run([LUANBD, "-v", "-U", "-", str(SPARSE), "size=1M", "--run", "true"])
    assert r.returncode == 0
    assert "luanbd: debug: sparse: loaded" in r.stderr


# --- filefua.lua --------------------------------------------------------------------------
@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(i % 251 for i in range(MiB)))
    return path


def debug_lines(servers: Servers, prefix: str) -> list[str]:
    return [line for line in servers.stderr("luanbd").splitlines()
            if line.startswith(f"luanbd: debug: {prefix}")]


def test_filefua_capabilities(servers: Servers, disk: Path) -> None:
    h = servers.connect(FILEFUA, f"file={disk}")
    assert h.get_size() == MiB
    assert h.can_fua() and h.can_cache() and h.can_flush()
    assert not h.is_read_only()


def test_filefua_native_fua_needs_no_flush_call(servers: Servers, disk: Path) -> None:
    h = servers.connect(FILEFUA, f"file={disk}", options=("-v",))
    h.pwrite(b"F" * 4096, 0, nbd.CMD_FLAG_FUA)
    h.pwrite(b"P" * 4096, 4096)
    # FUA is native: the plugin flushed inside pwrite and the server called no flush.
    assert debug_lines(servers, "filefua: pwrite with FUA") == \
        ["luanbd: debug: filefua: pwrite with FUA"]
    assert debug_lines(servers, "filefua: flush") == []
    # The FUA write is in the file already, before any flush or disconnect.
    assert disk.read_bytes()[:4096] == b"F" * 4096
    h.flush()
    assert len(debug_lines(servers, "filefua: flush")) == 1
    assert disk.read_bytes()[4096:8192] == b"P" * 4096


def test_filefua_cache(servers: Servers, disk: Path) -> None:
    h = servers.connect(FILEFUA, f"file={disk}", options=("-v",))
    h.cache(65536, 4096)
    assert debug_lines(servers, "filefua: cache") == \
        ["luanbd: debug: filefua: cache 65536 bytes at 4096"]


def test_filefua_data(servers: Servers, disk: Path) -> None:
    before = disk.read_bytes()
    h = servers.connect(FILEFUA, f"file={disk}")
    assert bytes(h.pread(1000, 300)) == before[300:1300]
    h.pwrite(b"hello", MiB - 5)
    h.zero(1000, 2000)  # no zero callback: emulated with pwrite
    h.flush()
    after = disk.read_bytes()
    assert after[-5:] == b"hello"
    assert after[2000:3000] == bytes(1000)
    assert after[:2000] == before[:2000]


def test_filefua_readonly(servers: Servers, disk: Path) -> None:
    before = disk.read_bytes()
    h = servers.connect(FILEFUA, f"file={disk}", readonly=True, options=("-v",))
    assert h.is_read_only() and not h.can_fua()
    assert outcome(lambda: h.pwrite(b"x", 0)).errno == errno.EPERM
    assert disk.read_bytes() == before
    assert debug_lines(servers, "filefua: open") == \
        ["luanbd: debug: filefua: open readonly=true"]


def test_filefua_needs_file(servers: Servers) -> None:
    r = servers.run([LUANBD, "-U", "-", str(FILEFUA), "--run", "true"])
    assert r.returncode == 1
    assert "file parameter is required" in r.stderr


def test_filefua_missing_file(servers: Servers, tmp_path: Path) -> None:
    r = servers.run([LUANBD, "-U", "-", str(FILEFUA), f"file={tmp_path}/none.img",
                     "--run", "true"])
    assert r.returncode == 1
    assert "No such file or directory" in r.stderr


# --- exports.lua --------------------------------------------------------------------------
def test_exports_list(servers: Servers) -> None:
    r = servers.run([str(EXPORTS), "-U", "-", "--run", 'nbdinfo --list --json "$uri"'])
    assert r.returncode == 0, r.stderr
    got = [(e["export-name"], e.get("description"), e["export-size"])
           for e in json.loads(r.stdout)["exports"]]
    assert got == [("alpha", "the first disk", MiB), ("beta", None, 2 * MiB)]


def test_exports_configured(servers: Servers) -> None:
    r = servers.run([LUANBD, "-U", "-", str(EXPORTS), "export=db:16M:database",
                     "export=logs:1M", "default=logs", "--run",
                     'nbdinfo --list --json "$uri" && echo ==== && nbdinfo --json "$uri"'])
    assert r.returncode == 0, r.stderr
    listing, default = (json.loads(part) for part in r.stdout.split("====\n"))
    assert [(e["export-name"], e.get("description")) for e in listing["exports"]] == \
        [("db", "database"), ("logs", None)]
    (export,) = default["exports"]
    assert export["export-name"] == "logs"
    assert export["description"] == "logs, 1048576 bytes"


def test_exports_default_export_and_description(servers: Servers) -> None:
    h = servers.connect(EXPORTS, full_info=True)
    assert h.get_canonical_export_name() == "alpha"
    assert h.get_export_description() == "the first disk"
    assert h.get_size() == MiB
    assert bytes(h.pread(10, 0)) == b"alphaalpha"


def test_exports_choose_by_name(servers: Servers) -> None:
    h = servers.connect(EXPORTS, export="beta", full_info=True)
    assert h.get_canonical_export_name() == "beta"
    assert h.get_export_description() == "beta, 2097152 bytes"
    assert h.get_size() == 2 * MiB
    assert bytes(h.pread(8, 512)) == b"betabeta"
    h.pwrite(b"written", 100)
    assert bytes(h.pread(11, 98)) == b"tawrittenab"


def test_exports_unknown_name(servers: Servers) -> None:
    with pytest.raises(nbd.Error) as err:
        servers.connect(EXPORTS, export="nope")
    assert err.value.errnum == errno.ENOENT
    assert "no export named 'nope'" in servers.stderr("luanbd")


def test_exports_bad_config(servers: Servers) -> None:
    r = servers.run([LUANBD, "-U", "-", str(EXPORTS), "default=zeta", "--run", "true"])
    assert r.returncode == 1
    assert "default=zeta: no such export" in r.stderr


# --- errors.lua ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,client", [
    ("ENOSPC", errno.ENOSPC), ("EPERM", errno.EPERM), ("EROFS", errno.EPERM),
    ("ENOMEM", errno.ENOMEM), ("ESHUTDOWN", errno.ESHUTDOWN), ("EFBIG", errno.ENOSPC),
    ("EIO", errno.EIO), ("EINVAL", errno.EINVAL),
])
def test_errors_pwrite(servers: Servers, name: str, client: int) -> None:
    h = servers.connect(ERRORS, f"pwrite={name}")
    assert outcome(lambda: h.pwrite(b"x" * 512, 0)).errno == client
    assert bytes(h.pread(512, 0)) == bytes(512)  # reads still work
    assert "luanbd: error: pwrite: " in servers.stderr("luanbd")
    assert "pwrite fails as configured" in servers.stderr("luanbd")


def test_errors_by_offset(servers: Servers) -> None:
    h = servers.connect(ERRORS, "size=4M", "bad=1M-2M:EIO", "bad=3M-3M+512:ENOSPC".replace(
        "3M+512", str(3 * MiB + 512)))
    assert bytes(h.pread(4096, MiB - 4096)) == bytes(4096)
    assert outcome(lambda: h.pread(1, MiB)).errno == errno.EIO
    assert outcome(lambda: h.pread(4096, MiB - 100)).errno == errno.EIO
    assert outcome(lambda: h.pwrite(b"x" * 512, 3 * MiB)).errno == errno.ENOSPC
    assert outcome(lambda: h.zero(512, 3 * MiB)).errno == errno.ENOSPC
    h.pwrite(b"ok", 3 * MiB + 512)
    assert bytes(h.pread(2, 3 * MiB + 512)) == b"ok"


def test_errors_nbdcopy_reports_the_error(servers: Servers, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    r = servers.run([str(ERRORS), "size=4M", "bad=1M-2M:EIO", "-U", "-", "--run",
                     f"nbdcopy \"$uri\" {shlex.quote(str(out))}"])
    assert r.returncode != 0
    assert "Input/output error" in r.stderr
    assert "touches bad range 1048576-2097152 (EIO)" in r.stderr


def test_errors_nbdsh_message(servers: Servers) -> None:
    r = servers.run([str(ERRORS), "flush=ENOSPC", "-U", "-", "--run",
                     'nbdsh -u "$uri" -c "h.flush()"'])
    assert r.returncode != 0
    assert "No space left on device" in r.stderr


def test_errors_zero_enotsup_falls_back_to_pwrite(servers: Servers) -> None:
    h = servers.connect(ERRORS, "zero=ENOTSUP")
    h.pwrite(b"\xff" * 1024, 0)
    h.zero(1024, 0)  # the plugin's zero fails with ENOTSUP: the server writes zeroes
    assert bytes(h.pread(1024, 0)) == bytes(1024)
    # A plugin with a zero callback does not offer fast zero unless can_fast_zero says so.
    assert not h.can_fast_zero()


def test_errors_open(servers: Servers) -> None:
    with pytest.raises(nbd.Error) as err:
        servers.connect(ERRORS, "open=EPERM")
    assert err.value.errnum == errno.ENOENT  # NBD_REP_ERR_UNKNOWN, whatever the errno
    assert "luanbd: error: open: " in servers.stderr("luanbd")


@pytest.mark.parametrize("callback,action,client", [
    ("cache", lambda h: h.cache(512, 0), errno.EPERM),
    ("trim", lambda h: h.trim(512, 0), errno.EPERM),
    ("extents", lambda h: h.block_status(512, 0, lambda *a: 0), errno.EPERM),
])
def test_errors_other_callbacks(servers: Servers, callback: str, action: Any,
                                client: int) -> None:
    h = servers.connect(ERRORS, f"{callback}=EPERM")
    assert outcome(lambda: action(h)).errno == client


def test_errors_unknown_errno_name(servers: Servers) -> None:
    r = servers.run([LUANBD, "-U", "-", str(ERRORS), "pwrite=EWHATEVER", "--run", "true"])
    assert r.returncode == 1
    assert "unknown errno name EWHATEVER" in r.stderr
