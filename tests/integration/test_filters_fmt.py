"""The format filters (xz, gzip, tar, extentlist, ddrescue) against nbdkit's: file.lua serves
a prepared file (an ``xz --block-size`` image, a gzip image, a tar made with tarfile, ...)
behind the same ``--filter`` under ``nbdkit`` and ``luanbd``; what libnbd sees (data digests,
size, capabilities, errors, extents, the log) is compared whole, and for tar, what the
writes did to the tar file."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
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
    nbdkit_available,
    observe,
    pattern,
)

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

KiB = 1024
MiB = 1024 * KiB
#: The disk image the compressed files hold: data that does not compress, data that does,
#: a run of zeroes, odd-sized.
IMAGE = (b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(400 * KiB // 32))
         + pattern(1, 300 * KiB) + bytes(300 * KiB) + pattern(2, 24 * KiB + 100))


def reader(s: Session) -> None:
    """Reads across the disk (block boundaries, its end, past its end), the extents, a
    cache request, a write, a second connection."""
    h = s.connect_and_probe()
    size = h.get_size()
    s.record("description", _description(h))
    for count, offset in [(4 * KiB, 0), (64 * KiB, 60 * KiB), (200 * KiB, 100 * KiB + 7),
                          (1, size - 1), (4 * KiB, size - 4 * KiB), (512, size - 256),
                          (4 * KiB, size), (size, 0)]:
        s.read(h, count, offset)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        s.block_status(h, size, 0)
        s.block_status(h, min(size, 64 * KiB), size // 2, nbd.CMD_FLAG_REQ_ONE)
    if h.can_cache():
        s.op("cache 100K@0", h.cache, 100 * KiB, 0)
    s.write(h, 3, 512, 0)
    h2 = s.connect()
    s.read(h2, min(size, 32 * KiB), 0)
    s.disconnect(h2)
    s.disconnect(h)


def _description(h: nbd.NBD) -> str | None:
    try:
        return str(h.get_export_description())
    except nbd.Error:
        return None


def both(tmp: Path, files: dict[str, bytes], args: tuple[str, ...], filters: tuple[str, ...],
         *, client: Callable[[Session], None] = reader, options: tuple[str, ...] = (),
         ) -> tuple[Observation, Observation, list[dict[str, bytes]]]:
    """Each server on fresh copies of ``files`` (in ``tmp``, the same paths for both, as
    the log may name them); ``{path}`` in args is ``tmp``.  Returns the observations and
    the files after each run."""
    obs, after = [], []
    for server in (NBDKIT, LUANBD):
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        argv = tuple(a.replace("{path}", str(tmp)) for a in args)
        obs.append(observe(server, "file.lua", argv, client=client,
                           options=(*options, *(f"--filter={f}" for f in filters))))
        after.append({name: (tmp / name).read_bytes() for name in files})
    return obs[0], obs[1], after


def same(expected: Observation, got: Observation) -> None:
    assert not expected.timed_out and not got.timed_out
    # The log's program names become SERVER in the lines with a prefix only; nbdkit's
    # multi-line messages have lines without one, luanbd's do not.
    got.log = [line.replace("SERVER-xz-filter(1)", "nbdkit-xz-filter(1)") for line in got.log]
    assert expected == got, diff_observations(expected, got)


# --- xz -------------------------------------------------------------------------------

def xz(data: bytes, *options: str) -> bytes:
    if shutil.which("xz") is None:
        pytest.skip("xz is not installed")
    return subprocess.run(["xz", "-c", *options], input=data, capture_output=True,
                          check=True).stdout


def _xz_files() -> dict[str, Callable[[], bytes]]:
    return {
        "64K": lambda: xz(IMAGE, "--block-size=65536"),
        "100000-crc32": lambda: xz(IMAGE, "--block-size=100000", "--check=crc32"),
        "sha256": lambda: xz(IMAGE, "--block-size=262144", "--check=sha256"),
        "none": lambda: xz(IMAGE, "--block-size=262144", "--check=none"),
        # Two streams with stream padding between, then the second's own blocks.
        "streams": lambda: (xz(IMAGE[:300 * KiB], "--block-size=65536") + bytes(8)
                            + xz(IMAGE[300 * KiB:], "--block-size=200000")),
        "one-block": lambda: lzma.compress(IMAGE),
        "x86+delta": lambda: xz(IMAGE, "--x86", "--delta=dist=4", "--lzma2=preset=1",
                                "--block-size=131072"),
        "empty": lambda: xz(b""),
    }


XZ_CASES = [("64K", ()), ("100000-crc32", ()), ("sha256", ("xz-max-depth=1",)),
            ("none", ("xz-max-block=256K",)), ("streams", ("xz-max-depth=2",)),
            ("one-block", ()), ("x86+delta", ()), ("empty", ())]


@pytest.mark.parametrize(("kind", "args"), XZ_CASES,
                         ids=[f"{k}:{','.join(a)}" for k, a in XZ_CASES])
def test_xz_same_as_nbdkit(tmp_path: Path, kind: str, args: tuple[str, ...]) -> None:
    files = {"disk.xz": _xz_files()[kind]()}
    expected, got, _ = both(tmp_path, files, ("file={path}/disk.xz", *args), ("xz",))
    same(expected, got)
    assert got.caps["is_read_only"]
    if kind != "empty":
        assert got.size == len(IMAGE) and got.outcome(f"read {len(IMAGE)}@0") == describe(IMAGE)


XZ_BAD = [
    ("plain", ()),  # not an xz file
    ("one-block", ("xz-max-block=1M",)),  # a block larger than xz-max-block
    ("truncated", ()),
    ("short", ()),  # shorter than the magic
    ("lzma-alone", ()),  # the other lzma format
    ("64K", ("xz-max-depth=0",)),
    ("64K", ("xz-max-block=lots",)),
    ("64K", ("xz-max-depth=-1",)),
]


@pytest.mark.parametrize(("kind", "args"), XZ_BAD, ids=[f"{k}:{','.join(a)}" for k, a in XZ_BAD])
def test_xz_errors_as_nbdkit(tmp_path: Path, kind: str, args: tuple[str, ...]) -> None:
    if kind == "plain":
        data = IMAGE
    elif kind == "truncated":
        data = _xz_files()["64K"]()[:-64]
    elif kind == "short":
        data = b"\xfd7z"
    elif kind == "lzma-alone":
        data = lzma.compress(IMAGE, format=lzma.FORMAT_ALONE)
    else:
        data = _xz_files()[kind]()
    expected, got, _ = both(tmp_path, {"disk.xz": data}, ("file={path}/disk.xz", *args),
                            ("xz",))
    same(expected, got)
    assert got.exit_code == 1 or got.connect_error is not None


def test_xz_corrupt_block_fails_the_read(tmp_path: Path) -> None:
    """A difference: a block whose data does not decode fails the reads that need it with
    EIO, and the others succeed; nbdkit 1.32 aborts on an assertion (backend_pread: *err)."""
    data = _xz_files()["64K"]()
    data = data[:5000] + bytes(100) + data[5100:]
    (tmp_path / "disk.xz").write_bytes(data)
    got = observe(LUANBD, "file.lua", (f"file={tmp_path}/disk.xz",), options=("--filter=xz",),
                  client=reader)
    assert got.outcome("read 4096@0") == "EIO"
    assert got.outcome("read 1@1048675") == describe(IMAGE[-1:])
    assert "could not parse block data (error 9)" in got.log


# --- gzip -----------------------------------------------------------------------------

def _tmpdir_listing(s: Session) -> None:
    """The reader, then what the server left in its $TMPDIR (the decompressed copy must not
    be there: it is unlinked as soon as it is made)."""
    reader(s)
    s.record("tmpdir", sorted(p for p in os.listdir(s.tmp) if p not in ("nbd.sock",)))


def test_gzip_same_as_nbdkit(tmp_path: Path) -> None:
    files = {"disk.gz": gzip.compress(IMAGE, 6)}
    expected, got, after = both(tmp_path, files, ("file={path}/disk.gz",), ("gzip",),
                                client=_tmpdir_listing)
    same(expected, got)
    assert got.size == len(IMAGE) and got.extra["tmpdir"] == ["file.lua", "stderr.txt"]
    assert after[0] == after[1] == files


def test_gzip_first_member_only(tmp_path: Path) -> None:
    """Two gzip members: inflate stops at the end of the first (nbdkit serves that)."""
    files = {"disk.gz": gzip.compress(IMAGE[:100 * KiB]) + gzip.compress(IMAGE)}
    expected, got, _ = both(tmp_path, files, ("file={path}/disk.gz",), ("gzip",))
    same(expected, got)
    assert got.size == 100 * KiB


GZIPPED = gzip.compress(IMAGE)
GZIP_BAD = {"plain": IMAGE[:8 * KiB], "truncated": GZIPPED[:200 * KiB], "empty": b"",
            "corrupt": GZIPPED[:400 * KiB] + bytes(64) + GZIPPED[400 * KiB + 64:]}


@pytest.mark.parametrize("kind", list(GZIP_BAD))
def test_gzip_errors_as_nbdkit(tmp_path: Path, kind: str) -> None:
    expected, got, _ = both(tmp_path, {"disk.gz": GZIP_BAD[kind]}, ("file={path}/disk.gz",),
                            ("gzip",))
    same(expected, got)
    assert got.connect_error is not None and any("gzip: inflate:" in line for line in got.log)


# --- tar ------------------------------------------------------------------------------

def make_tar(members: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


TAR = make_tar({"README": b"hello\n" * 100, "images/disk.img": IMAGE,
                "last.bin": pattern(5, 5000)})


def writer(s: Session) -> None:
    """Writes inside the member, at its end and past it, then reads."""
    h = s.connect_and_probe()
    size = h.get_size()
    s.record("description", _description(h))
    s.write(h, 1, 4 * KiB, 8 * KiB)
    s.write(h, 2, 100, size - 100)
    s.write(h, 3, 512, size - 256)
    s.op("flush", h.flush)
    for count, offset in [(16 * KiB, 0), (200, size - 200), (size, 0)]:
        s.read(h, count, offset)
    s.block_status(h, size, 0)
    s.disconnect(h)


TAR_CASES = [("images/disk.img", (), writer), ("README", ("-r",), reader),
             ("last.bin", (), writer), ("images/disk.img", ("-r",), reader)]


@pytest.mark.parametrize(("entry", "options", "client"), TAR_CASES,
                         ids=[f"{e}{''.join(o)}" for e, o, _ in TAR_CASES])
def test_tar_same_as_nbdkit(tmp_path: Path, entry: str, options: tuple[str, ...],
                            client: Callable[[Session], None]) -> None:
    expected, got, after = both(tmp_path, {"a.tar": TAR}, ("file={path}/a.tar",
                                                           f"tar-entry={entry}"),
                                ("tar",), client=client, options=options)
    same(expected, got)
    assert after[0] == after[1]  # the same bytes of the tar file changed (or none with -r)
    with tarfile.open(fileobj=io.BytesIO(after[1][ "a.tar"])) as tar:
        assert [m.name for m in tar] == ["README", "images/disk.img", "last.bin"]


@pytest.mark.parametrize("compress", ["gzip", "xz"])
def test_tar_over_compressed_same_as_nbdkit(tmp_path: Path, compress: str) -> None:
    tar = make_tar({"x": b"x" * 1000, "disk.img": IMAGE}, tarfile.USTAR_FORMAT)
    data = gzip.compress(tar) if compress == "gzip" else xz(tar, "--block-size=100000")
    expected, got, _ = both(tmp_path, {"a.tar.z": data},
                            ("file={path}/a.tar.z", "tar-entry=disk.img"), ("tar", compress))
    same(expected, got)
    assert got.size == len(IMAGE) and got.caps["is_read_only"]


LONG = "d/" + "x" * 120 + ".img"
#: Names as GNU tar matches them: exactly, without wildcards, "./" kept, a directory's name
#: for the first member under it; a long name in a pax header.
TAR_NAMES = [
    ({"./disk.img": IMAGE[:5000]}, "./disk.img", tarfile.GNU_FORMAT),
    ({"dir/a": b"1" * 10, "dir/b": IMAGE[:5000]}, "dir", tarfile.GNU_FORMAT),
    ({"dir/a": b"1" * 10, "dir/b": IMAGE[:5000]}, "dir/", tarfile.GNU_FORMAT),
    ({"a*": b"1" * 10, "ab": IMAGE[:5000]}, "a*", tarfile.GNU_FORMAT),
    ({"ab": b"1" * 10, "a*": IMAGE[:5000]}, "a*", tarfile.GNU_FORMAT),
    ({"a": b"1", LONG: IMAGE[:5000]}, LONG, tarfile.PAX_FORMAT),
]


@pytest.mark.parametrize(("members", "entry", "fmt"), TAR_NAMES,
                         ids=[f"{i}:{e[:12]}" for i, (_, e, _) in enumerate(TAR_NAMES)])
def test_tar_names_as_nbdkit(tmp_path: Path, members: dict[str, bytes], entry: str,
                             fmt: int) -> None:
    expected, got, _ = both(tmp_path, {"a.tar": make_tar(members, fmt)},
                            ("file={path}/a.tar", f"tar-entry={entry}"), ("tar",),
                            options=("-r",))
    same(expected, got)
    assert got.connect_error is None


def test_tar_gnu_long_name_is_served_from_its_data(tmp_path: Path) -> None:
    """A difference: for a GNU long name nbdkit 1.32 serves the bytes from the long name's
    block on (GNU tar's block number is the ././@LongLink header's); luanbd serves the
    member."""
    data = make_tar({"a": b"1", LONG: IMAGE[:5000]}, tarfile.GNU_FORMAT)
    expected, got, _ = both(tmp_path, {"a.tar": data}, ("file={path}/a.tar", f"tar-entry={LONG}"),
                            ("tar",), options=("-r",))
    assert expected.size == got.size == 5000
    assert got.outcome("read 4096@0") == describe(IMAGE[:4096])
    assert expected.outcome("read 4096@0") != describe(IMAGE[:4096])


TAR_BAD = [
    ({"a.tar": TAR}, ("tar-entry=nosuch.img",)),  # not in the tar file
    ({"a.tar": TAR}, ("tar-entry=disk.img",)),  # only a suffix of a member's name
    ({"a.tar": IMAGE[:64 * KiB]}, ("tar-entry=disk.img",)),  # not a tar file
    ({"a.tar": TAR}, ()),  # no tar-entry
    ({"a.tar": TAR}, ("tar-entry=README", "tar-entry=last.bin")),
    ({"a.tar": TAR}, ("tar-entry=README", "tar-limit=1M")),  # nbdkit 1.32: the plugin's key
]


@pytest.mark.parametrize(("files", "args"), TAR_BAD, ids=[",".join(a) or "none" + str(i)
                                                          for i, (_, a) in enumerate(TAR_BAD)])
def test_tar_errors_as_nbdkit(tmp_path: Path, files: dict[str, bytes],
                              args: tuple[str, ...]) -> None:
    expected, got, _ = both(tmp_path, files, ("file={path}/a.tar", *args), ("tar",))
    same(expected, got)
    assert got.exit_code == 1 or got.connect_error is not None


# --- extentlist -----------------------------------------------------------------------

def extents_client(s: Session) -> None:
    """The extents over the whole disk, from inside extents, with REQ_ONE, and reads."""
    h = s.connect_and_probe()
    size = h.get_size()
    for count, offset in [(size, 0), (100 * KiB, 5000), (size - 300 * KiB, 300 * KiB - 1),
                          (4 * KiB, size - 4 * KiB)]:
        s.block_status(h, count, offset)
        s.block_status(h, count, offset, nbd.CMD_FLAG_REQ_ONE)
    s.read(h, 64 * KiB, 0)
    s.write(h, 1, 4 * KiB, 0)
    s.disconnect(h)


EXTENTLIST_CASES = {
    # Unsorted, all the ways to write the type, gaps, a zero-length extent, odd spacing.
    "mixed": ("64K 64K hole\n0 64K\n\t200K  100K zero\n1M 0 hole\n400K 1K 3\n"
              "500K 100K hole,zero\n700K 4096 2\n"),
    "sizes": "0 1s\n1024 1K 1\n2k 1M 0\n",
    "one": "0 1M",  # no newline at the end; the rest is a hole
    "empty": "",
    "past-end": "512K 10M\n",
}


@pytest.mark.parametrize("kind", list(EXTENTLIST_CASES))
def test_extentlist_same_as_nbdkit(tmp_path: Path, kind: str) -> None:
    files = {"disk.img": IMAGE, "extents": EXTENTLIST_CASES[kind].encode()}
    expected, got, after = both(tmp_path, files, ("file={path}/disk.img",
                                                  "extentlist={path}/extents"),
                                ("extentlist",), client=extents_client)
    same(expected, got)
    assert got.caps["base_allocation"] and after[0] == after[1]


EXTENTLIST_BAD = [
    ("0 1M\n  100\n", ()),  # a line without a length
    ("0 1M\n\n", ()),  # an empty line
    ("abc 5\n", ()),  # not a size
    ("0 1x\n", ()),  # a bad suffix: nbdkit 1.32's message
    ("0 1M\n512K 1M\n", ()),  # overlapping
    ("0 1M\n", ("extentlist=/nonexistent",)),  # twice
    (None, ()),  # no such file
    ("", ("-",)),  # no extentlist= at all
]


@pytest.mark.parametrize(("text", "more"), EXTENTLIST_BAD,
                         ids=[f"bad{i}" for i in range(len(EXTENTLIST_BAD))])
def test_extentlist_errors_as_nbdkit(tmp_path: Path, text: str | None,
                                     more: tuple[str, ...]) -> None:
    files = {"disk.img": IMAGE[:64 * KiB]}
    if text is not None:
        files["extents"] = text.encode()
    args = ("file={path}/disk.img",) if more == ("-",) else (
        "file={path}/disk.img", "extentlist={path}/extents", *more)
    expected, got, _ = both(tmp_path, files, args, ("extentlist",))
    same(expected, got)
    assert got.exit_code == 1 and got.startup_error


# --- ddrescue -------------------------------------------------------------------------

MAPFILE = """# Mapfile. Created by GNU ddrescue version 1.27
# Command line: ddrescue /dev/sdb disk.img disk.map
# Start time:   2026-12-01 10:00:00
# current_pos  current_status  current_pass
0x000F0000     +               1
#      pos        size  status
0x00000000  0x00010000  +
0x00010000  0x00001000  -
0x00011000  0x0000F000  +
0x00020000  0x00020000  +
0x00040000  0x00008000  ?
0x00048000  0x00008000  *
0x00050000  0x00008000  /
0x00058000  0x000A8000  +
"""

# The same in decimal and octal, tabs, and a line that does not parse.
MAPFILE_DEC = ("0 ? 1\n0\t65536\t+\n65536 4096 -\n0226000 061000 +\n"
               "not a block\n358400 100000 +\n")


def rescue_client(s: Session) -> None:
    """Reads inside finished blocks, across two adjacent ones, in bad ones; a write and a
    cache request (refused)."""
    h = s.connect_and_probe()
    size = h.get_size()
    for count, offset in [(4 * KiB, 0), (64 * KiB, 0), (1, 65535), (2, 65535),
                          (4 * KiB, 64 * KiB), (512, 68 * KiB), (60 * KiB, 68 * KiB),
                          (64 * KiB, 68 * KiB), (4 * KiB, 128 * KiB), (128 * KiB, 128 * KiB),
                          (4 * KiB, 256 * KiB), (4 * KiB, 288 * KiB), (4 * KiB, 320 * KiB),
                          (4 * KiB, 352 * KiB), (4 * KiB, size - 4 * KiB), (size, 0)]:
        if offset + count <= size:
            s.read(h, count, offset)
    s.write(h, 1, 512, 0)
    s.block_status(h, size, 0)
    s.disconnect(h)


@pytest.mark.parametrize(("mapfile", "options"), [(MAPFILE, ()), (MAPFILE_DEC, ()),
                                                   (MAPFILE, ("-r",))],
                         ids=["hex", "decimal", "readonly"])
def test_ddrescue_same_as_nbdkit(tmp_path: Path, mapfile: str,
                                 options: tuple[str, ...]) -> None:
    files = {"disk.img": IMAGE, "disk.map": mapfile.encode()}
    expected, got, after = both(tmp_path, files, ("file={path}/disk.img",
                                                  "ddrescue-mapfile={path}/disk.map"),
                                ("ddrescue",), client=rescue_client, options=options)
    same(expected, got)
    assert got.caps["is_read_only"] and not got.caps["can_cache"]
    assert got.outcome("read 4096@0") != "EIO" and got.outcome("read 2@65535") == "EIO"
    assert after[0] == after[1] == files


DDRESCUE_BAD = [None, "0 + 1\n-512 1024 +\n", "0 + 1\n0 -1 -\n"]


@pytest.mark.parametrize("mapfile", DDRESCUE_BAD, ids=["missing", "negative-pos",
                                                       "negative-size"])
def test_ddrescue_errors_as_nbdkit(tmp_path: Path, mapfile: str | None) -> None:
    files = {"disk.img": IMAGE[:64 * KiB]}
    if mapfile is not None:
        files["disk.map"] = mapfile.encode()
    expected, got, _ = both(tmp_path, files, ("file={path}/disk.img",
                                              "ddrescue-mapfile={path}/disk.map"),
                            ("ddrescue",))
    same(expected, got)
    assert got.exit_code == 1 and got.startup_error
