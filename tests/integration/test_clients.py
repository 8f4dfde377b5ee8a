"""Real NBD clients against luanbd: nbdinfo, nbdsh, nbdcopy, qemu-img, qemu-io and fio,
plus the handshake variants (oldstyle, plain newstyle, no structured replies) and export
names.  Every client is a separate process; data written is always read back and compared.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import struct
from pathlib import Path

import nbd
import pytest
from luanbd_procs import (
    OPT_GO,
    REP_ACK,
    REP_ERR_INVALID,
    RawClient,
    StartServer,
    client_env,
    run_client,
    run_luanbd,
    script,
    single_command,
)

DISK = script("disk.lua")
SPARSE2 = script("sparse2.lua")
EXPORTNAME = script("exportname.lua")

MiB = 1024 * 1024


def pattern(seed: int, n: int) -> bytes:
    """n bytes that differ from one seed (and one offset) to the next."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def map_lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


# --- nbdinfo ----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_nbdinfo_plain(start_server: StartServer) -> None:
    server = start_server(DISK, "size=2M")
    out = run_client(["nbdinfo", server.uri]).stdout
    assert out == (
        "protocol: newstyle-fixed without TLS, using structured packets\n"
        'export="":\n'
        "\texport-size: 2097152 (2M)\n"
        "\tcontent: data\n"
        f"\turi: nbd+unix:///?socket={server.sock}\n"
        "\tcontexts:\n"
        "\t\tbase:allocation\n"
        "\tis_rotational: false\n"
        "\tis_read_only: false\n"
        "\tcan_cache: false\n"
        "\tcan_df: true\n"
        "\tcan_fast_zero: true\n"
        "\tcan_flush: true\n"
        "\tcan_fua: true\n"
        "\tcan_multi_conn: false\n"
        "\tcan_trim: true\n"
        "\tcan_zero: true\n"
    )


@pytest.mark.timeout(60)
def test_nbdinfo_json(start_server: StartServer) -> None:
    server = start_server(DISK, "size=3M", options=["-r"])
    info = json.loads(run_client(["nbdinfo", "--json", server.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == ""
    assert export["export-size"] == 3 * MiB
    assert export["export-size-str"] == "3M"
    assert export["uri"] == f"nbd+unix:///?socket={server.sock}"
    assert export["contexts"] == ["base:allocation"]
    assert {k: v for k, v in export.items() if k.startswith(("can_", "is_"))} == {
        "is_rotational": False,
        "is_read_only": True,
        "can_cache": False,
        "can_df": True,
        "can_fast_zero": False,
        "can_flush": True,
        "can_fua": False,
        "can_multi_conn": False,
        "can_trim": False,
        "can_zero": False,
    }


@pytest.mark.timeout(60)
def test_nbdinfo_list(start_server: StartServer) -> None:
    server = start_server(DISK)
    out = run_client(["nbdinfo", "--list", server.uri]).stdout
    assert out.splitlines()[0] == "protocol: newstyle-fixed without TLS, using structured packets"
    assert [line for line in out.splitlines() if line.startswith("export=")] == ['export="":']
    assert "\texport-size: 1048576 (1M)" in out.splitlines()
    info = json.loads(run_client(["nbdinfo", "--list", "--json", server.uri]).stdout)
    assert [(e["export-name"], e["export-size"]) for e in info["exports"]] == [("", MiB)]


@pytest.mark.timeout(60)
def test_nbdinfo_map_without_extents(start_server: StartServer) -> None:
    # disk.lua has no extents callback: the whole disk is one allocated data extent,
    # whatever was written.
    server = start_server(DISK, "size=2M")
    run_client(["nbdsh", "-u", server.uri, "-c", "h.pwrite(b'x' * 4096, 8192)"])
    out = run_client(["nbdinfo", "--map", server.uri]).stdout
    assert map_lines(out) == [["0", "2097152", "0", "data"]]


@pytest.mark.timeout(60)
def test_nbdinfo_map_with_extents(start_server: StartServer) -> None:
    server = start_server(SPARSE2, "size=1M")
    assert map_lines(run_client(["nbdinfo", "--map", server.uri]).stdout) == [
        ["0", "1048576", "3", "hole,zero"]]
    run_client(["nbdsh", "-u", server.uri, "-c", "h.pwrite(b'a' * 5000, 8192)"])
    assert map_lines(run_client(["nbdinfo", "--map", server.uri]).stdout) == [
        ["0", "8192", "3", "hole,zero"],
        ["8192", "8192", "0", "data"],
        ["16384", "1032192", "3", "hole,zero"],
    ]
    totals = run_client(["nbdinfo", "--map", "--totals", server.uri]).stdout
    assert map_lines(totals) == [["8192", "0.8%", "0", "data"],
                                 ["1040384", "99.2%", "3", "hole,zero"]]


# --- nbdsh ------------------------------------------------------------------------------------

NBDSH_WRITE = """
import hashlib
def pattern(seed, n):
    out = bytearray(); c = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{c}".encode()).digest(); c += 1
    return bytes(out[:n])
size = h.get_size()
cases = [(0, 511), (511, 1), (4095, 2), (4097, 10000), (65536, 65536),
         (size // 2 - 3, 7), (size - 512, 511), (size - 1, 1)]
for seed, (offset, count) in enumerate(cases):
    h.pwrite(pattern(seed, count), offset)
for seed, (offset, count) in enumerate(cases):
    assert h.pread(count, offset) == pattern(seed, count), (offset, count)
print("written", len(cases))
"""

NBDSH_READ = """
import hashlib
def pattern(seed, n):
    out = bytearray(); c = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{c}".encode()).digest(); c += 1
    return bytes(out[:n])
size = h.get_size()
cases = [(0, 511), (511, 1), (4095, 2), (4097, 10000), (65536, 65536),
         (size // 2 - 3, 7), (size - 512, 511), (size - 1, 1)]
for seed, (offset, count) in enumerate(cases):
    assert h.pread(count, offset) == pattern(seed, count), (offset, count)
assert h.pread(1024, 200000) == bytes(1024)
print("verified", len(cases))
"""


@pytest.mark.timeout(60)
def test_nbdsh_round_trip_at_several_offsets(start_server: StartServer) -> None:
    server = start_server(DISK, "size=1M")
    out = run_client(["nbdsh", "-u", server.uri, "-c", NBDSH_WRITE]).stdout
    assert out == "written 8\n"
    # A second client process sees what the first one wrote.
    out = run_client(["nbdsh", "-u", server.uri, "-c", NBDSH_READ]).stdout
    assert out == "verified 8\n"


@pytest.mark.timeout(60)
def test_nbdsh_flush_trim_zero(start_server: StartServer) -> None:
    server = start_server(DISK, "size=1M")
    code = """
h.pwrite(b"\\xff" * 65536, 0)
h.flush()
h.trim(8192, 4096)
h.zero(4096, 32768)
h.pwrite(b"z" * 100, 40000, nbd.CMD_FLAG_FUA)
data = h.pread(65536, 0)
assert data[:4096] == b"\\xff" * 4096
assert data[4096:12288] == bytes(8192)
assert data[12288:32768] == b"\\xff" * 20480
assert data[32768:36864] == bytes(4096)
assert data[36864:40000] == b"\\xff" * 3136
assert data[40000:40100] == b"z" * 100
assert data[40100:] == b"\\xff" * (65536 - 40100)
print("ok")
"""
    assert run_client(["nbdsh", "-u", server.uri, "-c", code]).stdout == "ok\n"


# --- nbdcopy ----------------------------------------------------------------------------------

def _sample_image(path: Path, size: int) -> bytes:
    data = bytearray(pattern(7, size))
    data[size // 4: size // 2] = bytes(size // 4)  # a zero run in the middle
    path.write_bytes(data)
    return bytes(data)


@pytest.mark.timeout(60)
def test_nbdcopy_round_trip(start_server: StartServer, workdir: Path) -> None:
    server = start_server(DISK, "size=4M")
    src, dst = workdir / "src.img", workdir / "dst.img"
    data = _sample_image(src, 4 * MiB)
    run_client(["nbdcopy", str(src), server.uri])
    run_client(["nbdcopy", server.uri, str(dst)])
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(60)
def test_nbdcopy_four_connections(start_server: StartServer, workdir: Path) -> None:
    # sparse2.lua advertises multi-conn, so nbdcopy really opens 4 connections.
    server = start_server(SPARSE2, "size=4M", options=["-v"])
    src, dst = workdir / "src.img", workdir / "dst.img"
    data = _sample_image(src, 4 * MiB)
    before = server.log().count(": accepted connection")
    run_client(["nbdcopy", "--threads=4", "--connections=4", str(src), server.uri])
    after = server.log().count(": accepted connection")
    assert after - before == 4
    run_client(["nbdcopy", "--threads=4", "--connections=4", server.uri, str(dst)])
    assert server.log().count(": accepted connection") - after == 4
    assert dst.read_bytes() == data
    assert server.errors() == []


@pytest.mark.timeout(60)
def test_nbdcopy_four_connections_without_multi_conn(start_server: StartServer,
                                                     workdir: Path) -> None:
    server = start_server(DISK, "size=4M")
    src, dst = workdir / "src.img", workdir / "dst.img"
    data = _sample_image(src, 4 * MiB)
    run_client(["nbdcopy", "--connections=4", str(src), server.uri])
    run_client(["nbdcopy", "--connections=4", server.uri, str(dst)])
    assert dst.read_bytes() == data


# --- qemu -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(60)
def test_qemu_img_info(start_server: StartServer) -> None:
    server = start_server(DISK, "size=100M")
    info = json.loads(run_client(["qemu-img", "info", "--output=json", server.uri]).stdout)
    assert info["virtual-size"] == 100 * MiB
    assert info["format"] == "raw"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_qemu_img_convert_to_raw(start_server: StartServer, workdir: Path) -> None:
    server = start_server(DISK, "size=4M")
    src, dst = workdir / "src.img", workdir / "dst.raw"
    _sample_image(src, 4 * MiB)
    run_client(["nbdcopy", str(src), server.uri])
    run_client(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(dst)])
    run_client(["cmp", str(src), str(dst)])
    assert dst.stat().st_size == 4 * MiB


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_qemu_io_write_read_zero_discard(start_server: StartServer) -> None:
    server = start_server(DISK, "size=8M")
    commands = [
        "write -P 0xab 4096 65536",
        "read -P 0xab 4096 65536",
        "write -z 8192 4096",
        "read -P 0 8192 4096",
        "read -P 0xab 4096 4096",
        "read -P 0xab 12288 57344",
        "discard 20480 8192",
        "read -P 0 20480 8192",
        "write -P 0x5a 7340032 1048576",
        "read -P 0x5a 7340032 1048576",
        "read -P 0 0 4096",
    ]
    argv = ["qemu-io", "-f", "raw", server.uri]
    for command in commands:
        argv += ["-c", command]
    result = run_client(argv)
    assert "verification failed" not in result.stdout + result.stderr
    assert result.stdout.count("bytes at offset") == len(commands)
    # A pattern that is not there makes qemu-io fail: the checks above can fail.
    bad = run_client(["qemu-io", "-f", "raw", server.uri, "-c", "read -P 0xcd 4096 512"],
                     check=False)
    assert bad.returncode != 0
    assert "Pattern verification failed at offset 4096" in bad.stdout + bad.stderr


# --- fio --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fio_randrw_verify(start_server: StartServer) -> None:
    server = start_server(DISK, "size=64M")
    result = run_client([
        "fio", "--name=luanbd", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randrw",
        "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c", "--verify_fatal=1",
        "--output-format=json",
    ], timeout=100)
    report = json.loads(result.stdout[result.stdout.index("{"):])
    (job,) = report["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0
    # Every block written is read back and checked after the mixed phase, so reads cover
    # more than the random reads alone.
    assert job["read"]["io_bytes"] >= 16 * MiB
    assert server.errors() == []


# --- handshake variants -----------------------------------------------------------------------

NBDSH_PROTOCOL = ("print(h.get_protocol(), h.get_structured_replies_negotiated(), "
                  "h.can_df(), h.get_size()); h.pwrite(b'p' * 512, 1024); "
                  "assert h.pread(512, 1024) == b'p' * 512")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("options", "expected"), [
    ([], "newstyle-fixed True True 1048576"),
    (["-o"], "oldstyle False False 1048576"),
    (["--mask-handshake=0"], "newstyle False False 1048576"),
    (["--no-sr"], "newstyle-fixed False False 1048576"),
    (["-n"], "newstyle-fixed True True 1048576"),
])
def test_handshake_variants(start_server: StartServer, options: list[str],
                            expected: str) -> None:
    server = start_server(DISK, options=options)
    out = run_client(["nbdsh", "-u", server.uri, "-c", NBDSH_PROTOCOL]).stdout
    assert out == expected + "\n"


@pytest.mark.timeout(60)
def test_nbdinfo_no_sr_uses_simple_packets(start_server: StartServer) -> None:
    server = start_server(DISK, options=["--no-sr"])
    lines = run_client(["nbdinfo", server.uri]).stdout.splitlines()
    assert lines[0] == "protocol: newstyle-fixed without TLS, using simple packets"
    assert "\tcan_df: false" in lines


@pytest.mark.timeout(60)
def test_nbdinfo_oldstyle(start_server: StartServer) -> None:
    server = start_server(DISK, options=["-o"])
    lines = run_client(["nbdinfo", server.uri]).stdout.splitlines()
    assert lines[0] == "protocol: oldstyle without TLS, using simple packets"
    assert "\texport-size: 1048576 (1M)" in lines


@pytest.mark.timeout(30)
def test_oldstyle_single_connection(workdir: Path) -> None:
    # As upstream's test-oldstyle.c: libnbd connect_command with -s --exit-with-parent.
    log = workdir / "single.log"
    h = nbd.NBD()
    h.connect_command(single_command(log, DISK, options=["-o"]))
    assert h.get_protocol() == "oldstyle"
    assert h.get_size() == MiB
    h.pwrite(b"old" * 10, 0)
    assert h.pread(30, 0) == b"old" * 10
    h.shutdown()
    del h
    assert log.read_text() == ""


# --- export names -----------------------------------------------------------------------------

NAMES = ["test", "/", "//", " ", "?", "テスト", "-n", "\\", "\n", "%%", "x" * 80,
         "é" * 2048, "a" * 4096, "ünïcödé/名前?x=1&y"]

NBDSH_NAMES = """
import json, os
sock = os.environ["SOCK"]
for name in json.loads(os.environ["NAMES"]):
    c = nbd.NBD()
    c.set_export_name(name)
    c.connect_unix(sock)
    size = c.get_size()
    assert size == len(name.encode()), (name, size)
    assert c.pread(size, 0).decode() == name, name
    c.shutdown()
print("names ok")
"""


@pytest.mark.timeout(60)
def test_export_names(start_server: StartServer) -> None:
    # exportname.lua serves the name the client asked for as the disk's content.
    assert len("é" * 2048) != len(("é" * 2048).encode()) == 4096
    server = start_server(EXPORTNAME)
    env_names = json.dumps(NAMES)
    result = run_client(["nbdsh", "-c", NBDSH_NAMES],
                        env=client_env(SOCK=str(server.sock), NAMES=env_names))
    assert result.stdout == "names ok\n"
    assert server.errors() == []


@pytest.mark.timeout(60)
def test_export_name_in_uri_with_run() -> None:
    name = "テスト disk"
    result = run_luanbd(EXPORTNAME, "-U", "-", "-e", name, "--run",
                        'nbdsh -u "$uri" -c "print(h.pread(h.get_size(), 0).decode())"')
    assert result.returncode == 0, result
    assert result.stdout == name + "\n"


@pytest.mark.timeout(60)
def test_export_name_4096_accepted_4097_rejected(start_server: StartServer) -> None:
    # libnbd and qemu refuse a 4097-byte name before sending it, so a raw client does.
    server = start_server(EXPORTNAME)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.start()
        assert c.go(b"y" * 4097) == REP_ERR_INVALID
        # The connection stays usable: the same client may try another name.
        assert c.go(b"y" * 4096) == REP_ACK
        assert c.size == 4096
        error, data = c.read(4090, 6)
        assert (error, data) == (0, b"yyyyyy")
    assert server.errors() == []


@pytest.mark.timeout(60)
def test_export_name_with_nul_rejected(start_server: StartServer) -> None:
    server = start_server(EXPORTNAME)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.start()
        name = b"bad\0name"
        c.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        option, reply, _ = c.option_reply()
        assert (option, reply) == (OPT_GO, REP_ERR_INVALID)
        assert c.go(b"good") == REP_ACK
        assert c.read(0, 4) == (0, b"good")


@pytest.mark.timeout(60)
def test_nbdsh_connect_command_round_trip(workdir: Path) -> None:
    log = workdir / "single.log"
    argv = " ".join(shlex.quote(a) for a in single_command(log, DISK, "size=2M"))
    code = (f"h.connect_command(shlex.split({argv!r})); "
            "h.pwrite(b'cmd' * 100, 777); assert h.pread(300, 777) == b'cmd' * 100; "
            "print(h.get_size())")
    out = run_client(["nbdsh", "-c", "import shlex", "-c", code]).stdout
    assert out == "2097152\n"
    assert log.read_text() == ""
