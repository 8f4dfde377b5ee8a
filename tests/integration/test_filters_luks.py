"""The luks filter against nbdkit 1.32's, and against qemu's own LUKS driver; and the ext2
filter's refusal.

LUKS images are made by ``qemu-img create -f luks`` (PBKDF2 kept short with iter-time=10).
The same image, copied, is served through file.lua under nbdkit and luanbd with
``--filter=luks``: size, capabilities, block sizes, what reads return after writes and
zeroes, and the encrypted file left behind must be the same (one master key, so the same
ciphertext); qemu-img then decrypts that file itself and must read what the NBD client
wrote, and the other way round.  Broken disks and bad parameters give nbdkit's one-line
errors.  nbdkit 1.32 crashes (SIGSEGV) after a connection whose header it could not load,
so for those only its error line is compared; luanbd fails that connection and goes on.
"""

from __future__ import annotations

import hashlib
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import (  # noqa: E402
    LUANBD,
    NBDKIT,
    PLUGINS,
    Observation,
    Server,
    Session,
    diff_observations,
    nbdkit_available,
    observe,
    pattern,
)

pytestmark = pytest.mark.skipif(nbdkit_available() is not None or not shutil.which("qemu-img"),
                                reason=str(nbdkit_available() or "qemu-img is missing"))

KiB = 1024
MiB = 1024 * KiB
PASS = "PASS"
SECRET = f"secret,id=sec0,data={PASS}"
PAYLOAD = MiB


def _create(path: Path, opts: dict[str, str]) -> subprocess.Popen[str]:
    o = ",".join(["key-secret=sec0", "iter-time=10", *(f"{k.replace('_', '-')}={v}"
                                                       for k, v in opts.items())])
    return subprocess.Popen(["qemu-img", "create", "-q", "-f", "luks", "--object", SECRET,
                             "-o", o, str(path), str(PAYLOAD)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


#: The images made once for this file (qemu-img spends ~2 s measuring PBKDF2 for each).
VARIANTS = {
    "aes-256-xts-plain64-sha256": {},  # qemu's default
    "aes-128-xts-plain-sha1": {"cipher_alg": "aes-128", "ivgen_alg": "plain",
                               "hash_alg": "sha1"},
    "aes-256-cbc-plain64-sha512": {"cipher_mode": "cbc", "ivgen_alg": "plain64",
                                   "hash_alg": "sha512"},
    "aes-128-cbc-plain-ripemd160": {"cipher_alg": "aes-128", "cipher_mode": "cbc",
                                    "ivgen_alg": "plain", "hash_alg": "ripemd160"},
}
DEFAULT = "aes-256-xts-plain64-sha256"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LUKS images of PAYLOAD bytes, made in parallel."""
    tmp = tmp_path_factory.mktemp("luks")
    paths = {name: tmp / f"{name}.img" for name in VARIANTS}
    pending = dict(VARIANTS)
    for _ in range(5):  # iter-time=10 sometimes fails to measure ("accurate CPU usage")
        procs = {name: _create(paths[name], opts) for name, opts in pending.items()}
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=120)
            if proc.returncode == 0:
                del pending[name]
            else:
                print(out)
        if not pending:
            return paths
    raise AssertionError(f"qemu-img could not make {list(pending)}")


def qemu_read(path: Path) -> bytes:
    """The payload as qemu decrypts it."""
    out = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "--object", SECRET, "--image-opts",
                    f"driver=luks,key-secret=sec0,file.filename={path}", "-O", "raw",
                    str(out)], check=True, timeout=60, capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


def serve(server: Server, image: Path, tmp: Path, client: object, *args: str,
          filters: tuple[str, ...] = ("luks",)) -> tuple[Observation, bytes, Path]:
    """Observe ``server`` on a copy of ``image``; the observation, the copy's bytes after,
    and the copy."""
    path = tmp / f"{server.name}.img"
    shutil.copy(image, path)
    obs = observe(server, "file.lua", (f"file={path}", *args),
                  options=tuple(f"--filter={f}" for f in filters),
                  client=client)  # type: ignore[arg-type]
    return obs, path.read_bytes(), path


def patterns(s: Session) -> None:
    """Whole-sector writes (one with FUA), a zero, flush, cache, then reads aligned and not
    and the whole disk (its digest recorded for qemu).  nbdkit 1.32 corrupts the rest of a
    sector that a write covers only in part (it encrypts what it read without decrypting
    it first), so partial-sector writes are compared with qemu only (test below)."""
    h = s.connect_and_probe(strict=0)  # unaligned reads too: the block size is advice
    size = h.get_size()
    s.record("block_size", [h.get_block_size(c) for c in (nbd.SIZE_MINIMUM,
                                                          nbd.SIZE_PREFERRED,
                                                          nbd.SIZE_MAXIMUM)])
    for seed, (count, offset) in enumerate([(4 * KiB, 0), (512, 8 * KiB),
                                            (64 * KiB + 512, 70 * KiB - 512),
                                            (3 * KiB, size - 3 * KiB)], 1):
        s.write(h, seed, count, offset, nbd.CMD_FLAG_FUA if seed == 2 else 0)
    s.op("zero 10240@300032", h.zero, 10240, 300032)
    s.op("flush", h.flush)
    s.op("cache 64K@0", h.cache, 64 * KiB, 0)
    for count, offset in [(1, 0), (100, 10), (513, 511), (4 * KiB, 8 * KiB - 7),
                          (64 * KiB, 70 * KiB - 1), (12000, 299000), (1000, size - 1000)]:
        s.read(h, count, offset)
    s.block_status(h, 64 * KiB, 0)
    whole = h.pread(size, 0)
    s.record("sha", hashlib.sha256(whole).hexdigest())
    s.disconnect(h)


SAME = [name for name in VARIANTS if "ripemd160" not in name]


@pytest.mark.parametrize("name", SAME)
def test_luks_same_as_nbdkit_and_qemu_reads_it(tmp_path: Path, images: dict[str, Path],
                                               name: str) -> None:
    expected, enc_a, _ = serve(NBDKIT, images[name], tmp_path, patterns, f"passphrase={PASS}")
    got, enc_b, path = serve(LUANBD, images[name], tmp_path, patterns, f"passphrase={PASS}")
    assert not expected.timed_out and not got.timed_out
    assert expected == got, diff_observations(expected, got)
    assert got.size == PAYLOAD and got.connect_error is None
    assert got.extra["block_size"] == [512, 512, 0xFFFFFFFF]
    assert ("write#2 512@8192", "ok") in got.ops
    assert not got.caps["can_trim"] and got.caps["can_zero"] and not got.caps["can_fast_zero"]
    assert enc_a == enc_b  # the same ciphertext on the disk
    assert hashlib.sha256(qemu_read(path)).hexdigest() == got.extra["sha"]


#: (count, offset) of writes that cover sectors in part, and those in between.
PARTIAL = [(100, 10), (1000, 5000), (64 * KiB + 3, 70 * KiB - 1), (200, 9 * KiB + 300),
           (1, 511), (2, 1023), (513, 2047)]


@pytest.mark.parametrize("name", [DEFAULT, "aes-256-cbc-plain64-sha512"])
def test_partial_sector_writes_read_back_by_qemu(tmp_path: Path, images: dict[str, Path],
                                                 name: str) -> None:
    """luanbd reads the rest of a partly written sector first (FUA and an unaligned zero
    too); qemu then reads exactly what a plain disk would hold."""
    model = bytearray(qemu_read(images[name]))

    def client(s: Session) -> None:
        h = s.connect(strict=0)
        for seed, (count, offset) in enumerate(PARTIAL, 1):
            s.write(h, seed, count, offset, nbd.CMD_FLAG_FUA if seed % 2 else 0)
        s.op("zero 10000@300000", h.zero, 10000, 300000, nbd.CMD_FLAG_FUA)
        s.record("sha", hashlib.sha256(h.pread(PAYLOAD, 0)).hexdigest())
        s.disconnect(h)

    for seed, (count, offset) in enumerate(PARTIAL, 1):
        model[offset:offset + count] = pattern(seed, count)
    model[300000:310000] = bytes(10000)
    got, _, path = serve(LUANBD, images[name], tmp_path, client, f"passphrase={PASS}")
    assert all(outcome == "ok" for _, outcome in got.ops), got.ops
    assert got.extra["sha"] == hashlib.sha256(model).hexdigest()
    assert qemu_read(path) == model


def test_qemu_and_luanbd_read_each_others_writes(tmp_path: Path,
                                                 images: dict[str, Path]) -> None:
    """qemu-io writes the LUKS image itself; luanbd's decrypted export, read by qemu-img
    convert, has it.  qemu-io writes through luanbd's export; qemu decrypts it from the
    file."""
    image = tmp_path / "disk.img"
    shutil.copy(images[DEFAULT], image)
    subprocess.run(["qemu-io", "--object", SECRET, "--image-opts",
                    f"driver=luks,key-secret=sec0,file.filename={image}",
                    "-c", "write -P 0xab 4096 65536", "-c", "write -P 0x11 1000 7"],
                   check=True, timeout=60, capture_output=True)
    direct = qemu_read(image)

    def client(s: Session) -> None:
        out = tmp_path / "via-nbd.raw"
        r = s.run(["qemu-img", "convert", "-f", "raw", s.uri, "-O", "raw", str(out)])
        assert r.returncode == 0, r.stderr
        s.record("converted", out.read_bytes() == direct)
        r = s.run(["qemu-io", "-f", "raw", s.uri, "-c", "write -P 0x5a 100000 3000",
                   "-c", "write -P 0x77 0 512"])
        assert r.returncode == 0, r.stderr
        r = s.run(["qemu-io", "-f", "raw", s.uri, "-c", "read -P 0x5a 100000 3000",
                   "-c", "read -P 0xab 4096 65536", "-c", "read -P 0x11 1000 7"])
        s.record("read back", r.returncode == 0 and "Pattern verification failed"
                 not in r.stdout)

    got, _, path = serve(LUANBD, image, tmp_path, client, f"passphrase={PASS}")
    assert got.extra == {"converted": True, "read back": True}, got.log
    after = qemu_read(path)
    assert after[100000:103000] == b"\x5a" * 3000 and after[:512] == b"\x77" * 512
    assert after[4096:4096 + 65536] == b"\xab" * 65536


def _patch(data: bytearray, offset: int, fmt: str, value: int | bytes) -> None:
    struct.pack_into(fmt, data, offset, value)


#: Header fields to change (offset, struct format, value) for each broken disk.
CIPHER_NAME, CIPHER_MODE, KEY_LEN = 8, 40, 108
PATCHES: dict[str, list[tuple[int, str, int | bytes]]] = {
    "essiv": [(CIPHER_MODE, "32s", b"cbc-essiv:sha256"), (KEY_LEN, ">I", 32)],
    "ecb": [(CIPHER_MODE, "32s", b"ecb-plain64"), (KEY_LEN, ">I", 32)],
    "aes-192-xts": [(KEY_LEN, ">I", 48)],
    "twofish": [(CIPHER_NAME, "32s", b"twofish")],
    "bad-hash": [(72, "32s", b"whirlpool")],
    "no-ivgen": [(CIPHER_MODE, "32s", b"xts")],
    "version-2": [(6, ">H", 2)],
    "payload-offset": [(104, ">I", 1 << 30)],
    "key-too-long": [(KEY_LEN, ">I", 2048)],
    "mk-iterations": [(164, ">I", 0)],
    "slot-flag": [(208, ">I", 0x12345678)],
    "slot-stripes": [(252, ">I", 20000)],
}


def _broken(tmp: Path, images: dict[str, Path], case: str) -> tuple[Path, str]:
    """An image for ``case`` and the passphrase to try."""
    disk = tmp / "disk.img"
    if case == "not-luks":
        disk.write_bytes(pattern(3, MiB))
    elif case == "too-small":
        disk.write_bytes(bytes(8 * KiB))
    else:
        data = bytearray(images[DEFAULT].read_bytes())
        for patch in PATCHES.get(case, []):
            _patch(data, *patch)
        disk.write_bytes(data)
    return disk, "WRONG" if case == "wrong-passphrase" else PASS


BROKEN = {
    "wrong-passphrase": "LUKS passphrase is not correct, no key slot could be unlocked",
    "not-luks": "this disk does not contain a LUKS header",
    "too-small": "disk is too small to be LUKS-encrypted",
    "essiv": 'unknown IV generation algorithm: essiv (expecting "plain", "plain64" etc)',
    "ecb": "cipher algorithm aes-256 in mode ecb is not supported by GnuTLS",
    "aes-192-xts": "cipher algorithm aes-192 in mode xts is not supported by GnuTLS",
    "twofish": 'unknown cipher algorithm: twofish (expecting "aes", etc)',
    "bad-hash": 'unknown hash algorithm: whirlpool (expecting "md5", "sha1", "sha224", etc)',
    "no-ivgen": 'incorrect cipher_mode header, expecting mode-ivgenerator but got "xts"',
    "version-2": "this disk contains a LUKS version 2 header, but this filter only supports "
                 "LUKSv1",
    "payload-offset": "bad LUKSv1 header: payload offset points beyond the end of the disk",
    "key-too-long": "bad LUKSv1 header: master key is too long",
    "mk-iterations": "bad LUKSv1 header: master key iterations is 0",
    "slot-flag": "bad LUKSv1 header: key slot 0 has an invalid active flag",
    "slot-stripes": "bad LUKSv1 header: key slot 0 stripes too large",
}


def _twice(s: Session) -> None:
    """Two connections: under luanbd the second fails as the first (the server goes on)."""
    for _ in range(2):
        h = nbd.NBD()
        try:
            h.connect_unix(s.sock)
        except nbd.Error as e:
            s.obs.ops.append(("connect", str(e.string)))
        else:
            s.obs.ops.append(("connect", "ok"))
            h.shutdown()
        if s.proc is not None and s.proc.poll() is not None:
            break  # nbdkit 1.32 has crashed


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_disks_fail_as_nbdkit(tmp_path: Path, images: dict[str, Path],
                                     case: str) -> None:
    disk, word = _broken(tmp_path, images, case)
    expected, _, _ = serve(NBDKIT, disk, tmp_path, _twice, f"passphrase={word}")
    got, _, _ = serve(LUANBD, disk, tmp_path, _twice, f"passphrase={word}")
    assert expected.errors()[:1] == [BROKEN[case]], expected.log
    assert got.errors() == [BROKEN[case]] * 2, got.log
    assert got.ops == [("connect", "nbd_connect_unix: handshake: server has no export "
                                   "named '': No such file or directory")] * 2
    assert "Traceback" not in got.stderr


def test_ripemd160_works_where_nbdkit_gnutls_refuses(tmp_path: Path,
                                                     images: dict[str, Path]) -> None:
    """nbdkit 1.32 accepts the name ripemd160 but its GnuTLS refuses PBKDF2 with it; hashlib
    has it, so luanbd opens such a disk (and reads what qemu reads)."""
    image = images["aes-128-cbc-plain-ripemd160"]
    expected, _, _ = serve(NBDKIT, image, tmp_path, _twice, f"passphrase={PASS}")
    assert expected.errors()[:1] == ["gnutls_pbkdf2: The request is invalid."]
    got, _, path = serve(LUANBD, image, tmp_path, patterns, f"passphrase={PASS}")
    assert got.size == PAYLOAD and got.errors() == []
    assert hashlib.sha256(qemu_read(path)).hexdigest() == got.extra["sha"]


BAD_PARAMETERS = {
    "": 'LUKS "passphrase" parameter is missing',
    "passphrase=+nonexistent": "open nonexistent: No such file or directory",
    "passphrase=+/": "could not read password from /: Is a directory",
    "passphrase=-": "stdin is not a tty, cannot read password interactively",
    "passphrase=-0": "cannot use password -FD for stdin/stdout/stderr",
    "passphrase=-2": "cannot use password -FD for stdin/stdout/stderr",
    "passphrase=-x": "password file descriptor: empty string where we expected a number",
    "passphrase=-99": "fdopen 99: Bad file descriptor",
}


@pytest.mark.parametrize("arg", list(BAD_PARAMETERS))
def test_bad_parameters_fail_as_nbdkit(tmp_path: Path, arg: str) -> None:
    obs = [observe(server, "file.lua", ("file=/nonexistent", *([arg] if arg else [])),
                   options=("--filter=luks",)) for server in (NBDKIT, LUANBD)]
    assert obs[0] == obs[1], diff_observations(obs[0], obs[1])
    assert obs[1].exit_code == 1 and obs[1].startup_error == BAD_PARAMETERS[arg]


def _captive(server: Server, image: Path, arg: str,
             shell: str = "") -> subprocess.CompletedProcess[str]:
    """``server -U - --filter=luks --run 'nbdinfo --size; nbdcopy | sha256sum'``, started
    by ``sh -c`` after ``shell`` (redirections)."""
    argv = [*server.argv, "-U", "-", "--filter=luks", "--run",
            'nbdinfo --size "$uri" && nbdcopy "$uri" - | sha256sum',
            "lua", str(PLUGINS / "file.lua"), f"file={image}", arg]
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
    return subprocess.run(["sh", "-c", f"{shell} exec {quoted}"], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
                          check=False)


def test_passphrase_from_a_file_and_a_file_descriptor(tmp_path: Path,
                                                     images: dict[str, Path]) -> None:
    image = images[DEFAULT]
    (tmp_path / "pw").write_text(f"{PASS}\nnot this line\n")
    (tmp_path / "pw-no-newline").write_text(PASS)
    (tmp_path / "wrong").write_text(f"{PASS} \n")
    digest = hashlib.sha256(qemu_read(image)).hexdigest()
    for server in (NBDKIT, LUANBD):
        for arg, shell in [(f"passphrase=+{tmp_path}/pw", ""),
                           (f"passphrase=+{tmp_path}/pw-no-newline", ""),
                           ("passphrase=-5", f"exec 5<'{tmp_path}/pw';")]:
            r = _captive(server, image, arg, shell)
            assert r.returncode == 0 and r.stdout.split() == [str(PAYLOAD), digest, "-"], \
                (server.name, arg, r.stderr)
        r = _captive(server, image, f"passphrase=+{tmp_path}/wrong")
        assert r.returncode != 0
        assert "LUKS passphrase is not correct, no key slot could be unlocked" in r.stderr


def _on_a_tty(server: Server, image: Path, answer: bytes) -> tuple[int, str]:
    """``passphrase=-`` with stdin and stdout on a pseudo-terminal: the prompt is
    answered with ``answer``; the exit status and what the terminal showed."""
    master, slave = pty.openpty()
    argv = [*server.argv, "-U", "-", "--filter=luks", "--run", 'nbdinfo --size "$uri"',
            "lua", str(PLUGINS / "file.lua"), f"file={image}", "passphrase=-"]
    env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    shown = b""
    answered = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break  # the other side closed
                if not chunk:
                    break
                shown += chunk
            if not answered and b"password: " in shown:
                time.sleep(0.2)  # the echo is turned off after the prompt
                os.write(master, answer)
                answered = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(10), shown.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_passphrase_asked_on_a_tty(images: dict[str, Path]) -> None:
    image = images[DEFAULT]
    for server in (NBDKIT, LUANBD):
        code, shown = _on_a_tty(server, image, f"{PASS}\n".encode())
        assert code == 0 and str(PAYLOAD) in shown, (server.name, shown)
        assert PASS not in shown.replace("password", ""), (server.name, shown)  # no echo


def test_ext2_is_refused_with_the_reason() -> None:
    r = subprocess.run([sys.executable, "-m", "luanbd", "--filter=ext2", "-U", "-", "--run",
                        "true", str(PLUGINS / "file.lua"), "file=/dev/null",
                        "ext2file=/disk.img"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "libext2fs" in lines[0] and "Python" in lines[0], r.stderr
    assert lines[0].startswith("luanbd: error: --filter=ext2: ")


@pytest.mark.parametrize(("mode", "key_bytes"), [("xts", 64), ("xts", 32), ("cbc", 16),
                                                 ("cbc", 24), ("cbc", 32)])
def test_sector_cipher_is_the_cryptography_packages_xts_and_cbc(mode: str,
                                                                key_bytes: int) -> None:
    """luks_cipher.py does whole requests with AES-ECB and big-integer chaining; the same
    bytes as the package's own XTS/CBC a sector at a time, IVs wrapping at 2**32 (plain)
    and 2**64 (plain64), a short piece at the end included."""
    from luanbd.filters.luks_cipher import SectorCipher

    for ivgen in ("plain", "plain64"):
        cipher = SectorCipher(os.urandom(key_bytes), mode, ivgen)
        for size, sector in [(512, 0), (4096, 5), (512 * 37 + 256, (1 << 32) - 3),
                             (1024, (1 << 64) - 1), (256, 7)]:
            data = os.urandom(size)
            encrypted = cipher.encrypt(data, sector)
            assert encrypted == cipher.one_by_one(data, sector, False), (ivgen, size, sector)
            assert cipher.decrypt(encrypted, sector) == data
            assert cipher.one_by_one(encrypted, sector, True) == data


def test_a_changed_disk_is_unlocked_again(tmp_path: Path, images: dict[str, Path]) -> None:
    """luanbd remembers the master key of a disk it has unlocked, by the bytes of its header
    and key material: a connection to another LUKS disk at the same place gets that disk's
    key, and then the first disk's again."""
    other = "aes-128-xts-plain-sha1"
    digests = {name: hashlib.sha256(qemu_read(images[name])).hexdigest()
               for name in (DEFAULT, other)}
    path = tmp_path / "disk.img"
    shutil.copy(images[DEFAULT], path)

    def client(s: Session) -> None:
        for i, name in enumerate((DEFAULT, other, DEFAULT)):
            path.write_bytes(images[name].read_bytes())
            h = s.connect()
            s.record(str(i), hashlib.sha256(h.pread(PAYLOAD, 0)).hexdigest() == digests[name])
            s.disconnect(h)

    obs = observe(LUANBD, "file.lua", (f"file={path}", f"passphrase={PASS}"),
                  options=("--filter=luks",), client=client)
    assert obs.extra == {"0": True, "1": True, "2": True}, obs.log


def test_a_disk_ending_inside_a_sector(tmp_path: Path, images: dict[str, Path]) -> None:
    """The size is nbdkit's (the disk's less the payload offset), but the sector the disk
    cuts short cannot be decrypted: EIO with one log line, and nothing is written past the
    disk's end (nbdkit 1.32 reads past the plugin's end there and aborts)."""
    path = tmp_path / "disk.img"
    path.write_bytes(images[DEFAULT].read_bytes()[:-24])
    size = path.stat().st_size

    def client(s: Session) -> None:
        h = s.connect_and_probe(strict=0)
        s.read(h, 512, PAYLOAD - 1024)
        s.read(h, 100, PAYLOAD - 124)
        s.write(h, 1, 4, PAYLOAD - 30)
        s.disconnect(h)

    obs = observe(LUANBD, "file.lua", (f"file={path}", f"passphrase={PASS}"),
                  options=("--filter=luks",), client=client)
    assert obs.size == PAYLOAD - 24
    assert [outcome for _, outcome in obs.ops][1:] == ["EIO", "EIO"]
    assert obs.errors() == ["the disk ends inside this sector of the LUKS payload (its size "
                            "is not a multiple of 512)"] * 2
    assert path.stat().st_size == size
