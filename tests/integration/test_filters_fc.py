"""The partition, readonly and exportname filters against nbdkit's (as test_filters.py):
the same Lua script behind the same ``--filter`` under ``nbdkit`` and ``luanbd``, observed
through libnbd and compared whole; bad parameters give the same start-up error."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import (  # noqa: E402
    LUANBD,
    NBDKIT,
    Observation,
    Session,
    describe,
    diff_observations,
    errno_name,
    nbdkit_available,
    observe,
    pattern,
)
from test_filters import exercise  # noqa: E402

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

SECTOR = 512
#: The partitioned disks: 4 MiB.
DISK_SECTORS = 8192


# --- disks with partition tables, written byte by byte ----------------------------------------

def _mbr_entry(kind: int, start: int, count: int) -> bytes:
    return struct.pack("<B3sB3sII", 0, b"\0\0\0", kind, b"\0\0\0", start, count)


def _boot_sector(entries: list[bytes]) -> bytes:
    table = b"".join(entries).ljust(64, b"\0")
    return bytes(0x1BE) + table + b"\x55\xaa"


def _mark(disk: bytearray, sector: int, text: str) -> None:
    """Recognisable bytes at the start of a partition."""
    data = (text.encode() * 200)[:2 * SECTOR]
    disk[sector * SECTOR:sector * SECTOR + len(data)] = data


def mbr_disk() -> bytes:
    """Two primary partitions."""
    disk = bytearray(DISK_SECTORS * SECTOR)
    disk[:SECTOR] = _boot_sector([_mbr_entry(0x83, 2048, 2048), _mbr_entry(0x83, 4096, 2048)])
    _mark(disk, 2048, "one")
    _mark(disk, 4096, "two")
    return bytes(disk)


def extended_disk() -> bytes:
    """One primary partition, then an extended one holding two logical partitions (5, 6)."""
    disk = bytearray(DISK_SECTORS * SECTOR)
    disk[:SECTOR] = _boot_sector([_mbr_entry(0x83, 2048, 1024), _mbr_entry(0x05, 4096, 4096)])
    # EBRs: the first entry is relative to the EBR, the link relative to the extended one.
    disk[4096 * SECTOR:4097 * SECTOR] = _boot_sector([_mbr_entry(0x83, 64, 1024),
                                                      _mbr_entry(0x05, 2048, 1088)])
    disk[6144 * SECTOR:6145 * SECTOR] = _boot_sector([_mbr_entry(0x83, 64, 1000)])
    _mark(disk, 2048, "primary")
    _mark(disk, 4096 + 64, "logical5")
    _mark(disk, 6144 + 64, "logical6")
    return bytes(disk)


def gpt_disk() -> bytes:
    """A GPT (with its protective MBR) of 128 entries, partitions 1 and 2 used."""
    disk = bytearray(DISK_SECTORS * SECTOR)
    disk[:SECTOR] = _boot_sector([_mbr_entry(0xEE, 1, DISK_SECTORS - 1)])
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<II", header, 80, 128, 128)
    disk[SECTOR:SECTOR + len(header)] = header
    linux = bytes.fromhex("af3dc60f838472478e793d69d8477de4")
    for i, (first, last) in enumerate([(2048, 4095), (4096, 6143)]):
        entry = linux + bytes([i + 1] * 16) + struct.pack("<QQ", first, last)
        disk[2 * SECTOR + 128 * i:2 * SECTOR + 128 * i + len(entry)] = entry
        _mark(disk, first, f"gpt{i + 1}")
    return bytes(disk)


def bad_ebr_chain() -> bytes:
    """The second EBR links back to the first."""
    disk = bytearray(extended_disk())
    disk[6144 * SECTOR:6145 * SECTOR] = _boot_sector([_mbr_entry(0x83, 64, 1000),
                                                      _mbr_entry(0x05, 0, 100)])
    return bytes(disk)


def logical_too_big() -> bytes:
    """Logical partition 6 runs past the end of the extended partition."""
    disk = bytearray(extended_disk())
    disk[6144 * SECTOR:6145 * SECTOR] = _boot_sector([_mbr_entry(0x83, 64, 4000)])
    return bytes(disk)


def mbr_past_the_end() -> bytes:
    disk = bytearray(mbr_disk())
    disk[:SECTOR] = _boot_sector([_mbr_entry(0x83, 2048, 2048), _mbr_entry(0x83, 4096, 8192)])
    return bytes(disk)


def gpt_with(entries: int, entry_size: int, last: int = 4095) -> Callable[[], bytes]:
    def disk() -> bytes:
        d = bytearray(gpt_disk())
        struct.pack_into("<II", d, SECTOR + 80, entries, entry_size)
        struct.pack_into("<Q", d, 2 * SECTOR + 40, last)
        return bytes(d)
    return disk


DISKS: dict[str, Callable[[], bytes]] = {
    "bad-ebr-chain": bad_ebr_chain,
    "logical-too-big": logical_too_big,
    "mbr-past-the-end": mbr_past_the_end,
    "gpt-small-entries": gpt_with(128, 64),
    "gpt-huge-table": gpt_with(100000, 128),
    "gpt-past-the-end": gpt_with(128, 128, last=9000),
    "mbr": mbr_disk,
    "extended": extended_disk,
    "gpt": gpt_disk,
    "blank": lambda: bytes(DISK_SECTORS * SECTOR),
    "tiny": lambda: bytes(1000),
}


def on_disk(tmp: Path, disk: str, args: tuple[str, ...], filters: tuple[str, ...],
            client: Callable[[Session], None] = exercise) -> tuple[Observation, Observation]:
    """Each server gets its own copy of the disk (the client writes to it)."""
    image = DISKS[disk]()
    obs = []
    for server in (NBDKIT, LUANBD):
        path = tmp / f"{server.name}.img"
        path.write_bytes(image)
        obs.append(observe(server, "file.lua", (f"file={path}", *args),
                           options=tuple(f"--filter={f}" for f in filters), client=client))
        # The log names the file: the same name under both servers.
        shutil.move(path, tmp / "done.img")
    return obs[0], obs[1]


# --- partition --------------------------------------------------------------------------------

PARTITION_CASES = [
    ("mbr", "partition=1"),
    ("mbr", "partition=2"),
    ("extended", "partition=1"),
    ("extended", "partition=5"),
    ("extended", "partition=6"),
    ("gpt", "partition=1"),
    ("gpt", "partition=2"),
    ("gpt", "partition=0x2"),
    ("bad-ebr-chain", "partition=6"),  # found before the bad link is followed
]


@pytest.mark.parametrize(("disk", "arg"), PARTITION_CASES,
                         ids=[f"{d}:{a}" for d, a in PARTITION_CASES])
def test_partition_same_as_nbdkit(tmp_path: Path, disk: str, arg: str) -> None:
    expected, got = on_disk(tmp_path, disk, (arg,), ("partition",))
    assert not expected.timed_out and not got.timed_out
    assert expected == got, diff_observations(expected, got)
    assert got.size is not None and got.connect_error is None


STACKS = [(("offset", "partition"), ("partition=5", "offset=4K")),
          (("partition", "noextents"), ("partition=6",)),
          (("truncate", "partition"), ("partition=5", "truncate=3M")),
          (("nofilter", "partition", "nofilter"), ("partition=1",))]


@pytest.mark.parametrize(("filters", "args"), STACKS,
                         ids=["+".join(f) + ":" + ",".join(a) for f, a in STACKS])
def test_partition_in_a_stack(tmp_path: Path, filters: tuple[str, ...],
                              args: tuple[str, ...]) -> None:
    expected, got = on_disk(tmp_path, "extended", args, filters)
    assert expected == got, diff_observations(expected, got)
    assert got.connect_error is None and got.size


def test_partition_serves_the_partition(tmp_path: Path) -> None:
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.record("head", h.pread(16, 0))

    expected, got = on_disk(tmp_path, "extended", ("partition=6",), ("partition",), client)
    assert expected == got, diff_observations(expected, got)
    assert got.size == 1000 * SECTOR
    assert got.extra["head"] == b"logical6logical6"


#: A partition that is not there, or no partition table: the connection fails (at open).
MISSING = [
    ("mbr", "partition=3"),
    ("mbr", "partition=4"),
    ("mbr", "partition=5"),
    ("extended", "partition=2"),
    ("extended", "partition=9"),
    ("gpt", "partition=3"),
    ("gpt", "partition=129"),
    ("blank", "partition=1"),
    ("tiny", "partition=1"),
    ("bad-ebr-chain", "partition=7"),
    ("logical-too-big", "partition=6"),
    ("mbr-past-the-end", "partition=2"),
    ("gpt-small-entries", "partition=1"),
    ("gpt-huge-table", "partition=1"),
    ("gpt-past-the-end", "partition=1"),
]


@pytest.mark.parametrize(("disk", "arg"), MISSING, ids=[f"{d}:{a}" for d, a in MISSING])
def test_missing_partition_fails_as_nbdkit(tmp_path: Path, disk: str, arg: str) -> None:
    expected, got = on_disk(tmp_path, disk, (arg,), ("partition",))
    assert expected == got, diff_observations(expected, got)
    assert expected.connect_error is not None


def test_missing_partition_messages(tmp_path: Path) -> None:
    for disk, arg, message in [("extended", "partition=9", "MBR partition 9 not found"),
                               ("gpt", "partition=129", "GPT partition number out of range"),
                               ("blank", "partition=1", "disk does not contain MBR or GPT "
                                                        "partition table signature")]:
        expected, got = on_disk(tmp_path, disk, (arg,), ("partition",))
        assert expected == got, diff_observations(expected, got)
        assert message in got.log, got.log


PARTITION_BAD = ["partition=0", "partition=abc", "partition=", "partition=-1", "partition=3x",
                 "partition=4294967296", None]


@pytest.mark.parametrize("arg", PARTITION_BAD, ids=[str(a) for a in PARTITION_BAD])
def test_partition_bad_parameters_fail_as_nbdkit(tmp_path: Path, arg: str | None) -> None:
    expected, got = on_disk(tmp_path, "mbr", (arg,) if arg else (), ("partition",))
    assert expected == got, diff_observations(expected, got)
    assert expected.exit_code == 1


# --- readonly (nbdkit 1.38: no nbdkit here has it; luanbd alone, and against nbdkit -r) -------

def test_readonly_is_like_dash_r() -> None:
    """Without readonly-file the filter is nbdkit's -r: the same observation (the plugin's
    open is told readonly=true too, which ramdisk.lua's trace shows)."""
    args = ("size=1048576", "trace=1")
    expected = observe(NBDKIT, "ramdisk.lua", args, options=("-r",), client=exercise)
    got = observe(LUANBD, "ramdisk.lua", args, options=("--filter=readonly",), client=exercise)
    assert expected == got, diff_observations(expected, got)
    assert got.caps["is_read_only"]
    assert "trace: open readonly=true (boolean)" in got.log
    assert got.outcome("write#9 512@1048064") == "EPERM"


def test_readonly_file_switches_writes_at_run_time(tmp_path: Path) -> None:
    flag = tmp_path / "ro"

    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.write(h, 1, 512, 0)
        flag.touch()
        h2 = s.connect()  # a connection opened while the file exists is writable too
        s.record("second_read_only", bool(h2.is_read_only()))
        s.write(h, 2, 512, 0)
        s.write(h2, 3, 512, 0)
        s.op("trim", h.trim, 4096, 0)
        s.op("zero", h.zero, 4096, 0)
        s.op("flush", h.flush)
        s.read(h, 512, 0)
        flag.unlink()
        s.write(h2, 4, 512, 0)
        s.read(h, 512, 0)

    got = observe(LUANBD, "ramdisk.lua", ("size=1048576", f"readonly-file={flag}"),
                  options=("--filter=readonly",), client=client)
    assert not got.caps["is_read_only"] and not got.extra["second_read_only"]
    outcomes = [v for _, v in got.ops]
    assert outcomes[0] == "ok"
    assert outcomes[1:5] == ["EPERM"] * 4
    assert outcomes[5] == "ok"  # flush is not refused
    assert outcomes[6] == describe(pattern(1, 512))  # nothing refused reached the disk
    assert outcomes[7] == "ok"
    assert outcomes[8] == describe(pattern(4, 512))
    for fn in ("pwrite", "trim", "zero"):
        assert f"{fn} operation rejected by readonly filter" in got.errors()


def test_readonly_file_twice_is_refused(tmp_path: Path) -> None:
    got = observe(LUANBD, "ramdisk.lua", ("readonly-file=a", "readonly-file=b"),
                  options=("--filter=readonly",))
    assert got.exit_code == 1
    assert got.startup_error == "readonly-file parameter appears multiple times"


# --- exportname -------------------------------------------------------------------------------

def names(s: Session) -> None:
    """``nbdinfo --list`` (which connects to each export listed), then connections by name:
    the canonical name and description the server gives, or the errno."""
    rc, out = s.nbdinfo("--list", "--json")
    s.record("list", json.loads(out) if rc == 0 else f"exit {rc}")
    for name in ["", "a", "b", "nosuch"]:
        h = nbd.NBD()
        h.set_export_name(name)
        h.set_full_info(True)
        try:
            h.connect_unix(s.sock)
        except nbd.Error as e:
            s.record(f"connect {name!r}", errno_name(e))
            continue
        s.record(f"connect {name!r}", (h.get_size(), h.get_canonical_export_name(),
                                       _description(h)))
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def _description(h: nbd.NBD) -> str | None:
    try:
        description: str = h.get_export_description()
    except nbd.Error:
        return None
    return description


EXPORTNAME_CASES = [
    (),
    ("default-export=a",),
    ("exportname-list=explicit", "exportname=a", "exportname=b"),
    ("exportname-list=explicit", "exportname=a", "exportname=b", "exportdesc=fixed:hello"),
    ("exportname-list=defaultonly", "default-export=b"),
    ("exportname-list=default-only",),
    ("exportname-list=defaultonly", "exportname-strict=true", "exportname=a"),
    ("exportname-list=empty",),
    ("exportname-list=error",),
    ("exportname-strict=true", "exportname=a", "exportname=b"),
    ("exportname-strict=true", "exportname=", "exportname=a", "default-export=a"),
    ("exportname-strict=1", "exportname=", "exportname-list=explicit"),
    ("exportname_list=explicit", "exportname=a", "exportdesc=none"),
    ("exportname-list=explicit", "exportname=a", "exportname=b",
     "exportdesc=script:echo \"<$name>\""),
    ("exportdesc=script:printf 'no newline %s' \"$name\"", "default-export=b"),
]


@pytest.mark.parametrize("args", EXPORTNAME_CASES, ids=[",".join(a) for a in EXPORTNAME_CASES])
def test_exportname_same_as_nbdkit(args: tuple[str, ...]) -> None:
    obs = [observe(server, "ramdisk.lua", args, options=("--filter=exportname",), client=names)
           for server in (NBDKIT, LUANBD)]
    assert not obs[0].timed_out and not obs[1].timed_out
    assert obs[0] == obs[1], diff_observations(obs[0], obs[1])
    assert obs[1].extra


def test_exportname_strict_refuses_other_names() -> None:
    got = observe(LUANBD, "ramdisk.lua", ("exportname-strict=true", "exportname=a"),
                  options=("--filter=exportname",), client=names)
    assert got.extra["connect 'a'"][1] == "a"
    assert got.extra["connect 'b'"] == "ENOENT"
    assert "export 'b not found" in got.errors()


EXPORTNAME_BAD = [("exportname-list=some",), ("exportname-strict=maybe",),
                  ("exportdesc=other",)]


@pytest.mark.parametrize("args", EXPORTNAME_BAD, ids=[",".join(a) for a in EXPORTNAME_BAD])
def test_exportname_bad_parameters_fail_as_nbdkit(args: tuple[str, ...]) -> None:
    obs = [observe(server, "ramdisk.lua", args, options=("--filter=exportname",))
           for server in (NBDKIT, LUANBD)]
    assert obs[0] == obs[1], diff_observations(obs[0], obs[1])
    assert obs[0].exit_code == 1


LISTING = """\
API_VERSION = 2
function list_exports (readonly, is_tls)
   return { "a", { name = "b", description = "the second" } }
end
function default_export (readonly, is_tls) return "a" end
function export_description (h) return "from the plugin" end
function open (readonly) return {} end
function get_size (h) return 512 end
function pread (h, count, offset, flags) return string.rep("x", count) end
"""


def test_exportname_keeps_or_rewrites_a_plugins_list(tmp_path: Path) -> None:
    """nbdkit's Lua plugin has no list_exports (luanbd's has): luanbd alone."""
    script = tmp_path / "listing.lua"
    script.write_text(LISTING)

    def listed(*args: str) -> Observation:
        # (script None: observe would copy a script given by its absolute path onto itself)
        return observe(LUANBD, None, (str(script), *args), options=("--filter=exportname",),
                       client=names)

    def exports(obs: Observation) -> list[tuple[str, str | None]]:
        return [(e["export-name"], e.get("description")) for e in obs.extra["list"]["exports"]]

    kept = listed()
    assert exports(kept) == [("a", None), ("b", "the second")]
    assert kept.extra["connect ''"] == (512, "a", "from the plugin")
    scripted = listed("exportdesc=script:echo \"[$name]\"", "default-export=b")
    assert exports(scripted) == [("a", "[a]"), ("b", "[b]")]
    assert scripted.extra["connect ''"] == (512, "b", "[b]")
    assert exports(listed("exportname-list=defaultonly")) == [("a", None)]
