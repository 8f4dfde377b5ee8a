"""TLS (``--tls``, ``--tls-certificates``, ``--tls-verify-peer``) with real clients: nbdinfo,
the libnbd Python bindings and qemu-img, against certificates made at test time with openssl.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import nbd
import pytest
from luanbd_procs import RawClient, StartServer, error_lines, run_client, run_luanbd, script

DISK = script("disk.lua")
MiB = 1024 * 1024
OPT_STARTTLS = 5
REP_ACK = 1

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl (Debian package openssl) is not installed")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(pki: Path, who: str, ext: str) -> None:
    """<pki>/<who>/<who>-cert.pem and -key.pem, signed by the test CA, and the CA cert."""
    d = pki / who
    d.mkdir()
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}/{who}-key.pem",
             "-out", f"{who}.csr", "-subj", "/CN=localhost", cwd=pki)
    (pki / f"{who}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{who}/{who}-cert.pem", "-days", "2",
             "-extfile", f"{who}.ext", cwd=pki)
    shutil.copy(pki / "ca-cert.pem", d / "ca-cert.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA; server/ in nbdkit's layout (ca-cert, server-cert, server-key .pem); client/ in
    libnbd's and qemu's (ca-cert, client-cert, client-key .pem); noclient/ (the CA only);
    other/ a server certificate of another CA."""
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
             "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=luanbd test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)
    _signed(pki, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
    _signed(pki, "client", "extendedKeyUsage=clientAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n")
    (pki / "noclient").mkdir()
    shutil.copy(pki / "ca-cert.pem", pki / "noclient" / "ca-cert.pem")
    return pki


def tls_uri(sock: Path | None, certs: Path) -> str:
    assert sock is not None
    return f"nbds+unix:///?socket={sock}&tls-certificates={certs}"


@pytest.mark.timeout(60)
def test_tls_require_nbdinfo(start_server: StartServer, pki: Path) -> None:
    server = start_server(DISK, "size=1M",
                          options=["--tls=require", f"--tls-certificates={pki / 'server'}"])
    out = run_client(["nbdinfo", tls_uri(server.sock, pki / "client")]).stdout
    assert "newstyle-fixed with TLS" in out
    assert "export-size: 1048576" in out


@pytest.mark.timeout(60)
def test_tls_require_refuses_plaintext(start_server: StartServer, pki: Path) -> None:
    server = start_server(DISK, options=["--tls=require",
                                         f"--tls-certificates={pki / 'server'}"])
    result = run_client(["nbdinfo", server.uri], check=False)
    assert result.returncode != 0
    assert "with TLS" not in result.stdout
    # The server goes on serving TLS clients.
    assert server.alive()
    run_client(["nbdinfo", "--size", tls_uri(server.sock, pki / "client")])


@pytest.mark.timeout(60)
def test_tls_on_serves_plaintext_and_tls(start_server: StartServer, pki: Path) -> None:
    server = start_server(DISK, options=["--tls=on", f"--tls-certificates={pki / 'server'}"])
    assert "without TLS" in run_client(["nbdinfo", server.uri]).stdout
    out = run_client(["nbdinfo", tls_uri(server.sock, pki / "client")]).stdout
    assert "newstyle-fixed with TLS" in out


@pytest.mark.timeout(60)
def test_tls_libnbd_round_trip(start_server: StartServer, pki: Path) -> None:
    """Writes and reads of several sizes over TLS (replies are joined for SSLSocket)."""
    server = start_server(DISK, "size=8M",
                          options=["--tls=require", f"--tls-certificates={pki / 'server'}"])
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki / "client"))
    h.connect_unix(str(server.sock))
    try:
        assert h.get_tls_negotiated()
        assert h.get_size() == 8 * MiB
        for offset, size in ((0, 1), (4096, 65536), (MiB, 3 * MiB + 17)):
            data = bytes((offset + i) % 251 for i in range(size))
            h.pwrite(data, offset)
            assert h.pread(size, offset) == data
        h.flush()
    finally:
        h.shutdown()


@pytest.mark.timeout(60)
def test_tls_qemu_img_info(start_server: StartServer, pki: Path) -> None:
    server = start_server(DISK, "size=100M",
                          options=["--tls=require", f"--tls-certificates={pki / 'server'}"])
    out = run_client([
        "qemu-img", "info", "--output=json",
        "--object", f"tls-creds-x509,id=tls0,dir={pki / 'client'},endpoint=client",
        "--image-opts",
        f"driver=nbd,path={server.sock},tls-creds=tls0,tls-hostname=localhost",
    ]).stdout
    assert json.loads(out)["virtual-size"] == 100 * MiB


@pytest.mark.timeout(60)
def test_tls_verify_peer_accepts_client_certificate(start_server: StartServer,
                                                     pki: Path) -> None:
    server = start_server(DISK, options=["--tls=require", "--tls-verify-peer",
                                         f"--tls-certificates={pki / 'server'}"])
    out = run_client(["nbdinfo", tls_uri(server.sock, pki / "client")]).stdout
    assert "with TLS" in out


@pytest.mark.timeout(60)
def test_tls_verify_peer_refuses_client_without_certificate(start_server: StartServer,
                                                             pki: Path) -> None:
    server = start_server(DISK, options=["--tls=require", "--tls-verify-peer",
                                         f"--tls-certificates={pki / 'server'}"])
    result = run_client(["nbdinfo", tls_uri(server.sock, pki / "noclient")], check=False)
    assert result.returncode != 0
    assert server.alive()
    # Without --tls-verify-peer the same client is served.
    plain = start_server(DISK, options=["--tls=require", f"--tls-certificates={pki / 'server'}"])
    run_client(["nbdinfo", "--size", tls_uri(plain.sock, pki / "noclient")])


@pytest.mark.timeout(60)
def test_tls_plaintext_pipelined_after_starttls_is_not_read(start_server: StartServer,
                                                            pki: Path) -> None:
    """STARTTLS and a GO in one packet: the ACK comes, then the server closes."""
    server = start_server(DISK, options=["--tls=require",
                                         f"--tls-certificates={pki / 'server'}"])
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.start()
        starttls = struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0)
        go = struct.pack(">QII", 0x49484156454F5054, 7, 6) + b"\0\0\0\0\0\0"
        c.sock.sendall(starttls + go)
        option, reply, _ = c.option_reply()
        assert (option, reply) == (OPT_STARTTLS, REP_ACK)
        assert c.closed_by_server()
    assert any("plaintext after NBD_OPT_STARTTLS" in line for line in server.errors())


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("value", "expected"), [
    ("on", "1"), ("yes", "1"), ("true", "1"), ("1", "1"),
    ("require", "2"), ("required", "2"), ("force", "2"),
    ("off", "unset"), ("no", "unset"), ("false", "unset"),
])
def test_tls_run_variable(pki: Path, value: str, expected: str) -> None:
    result = run_luanbd("-U", "-", f"--tls={value}", f"--tls-certificates={pki / 'server'}",
                        "--run", 'echo "tls=${tls-unset} uri=$uri"', DISK)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"tls={expected} ")
    assert line.split("uri=")[1].startswith("nbds+unix://" if expected == "2" else "nbd+unix://")


@pytest.mark.timeout(60)
def test_tls_run_nbdinfo_uri(pki: Path) -> None:
    """nbdkit's test-captive-tls: the command sees $tls=2 and connects with TLS to $uri."""
    result = run_luanbd(
        "-U", "-", "--tls=require", f"--tls-certificates={pki / 'server'}",
        "--run", f'nbdinfo "$uri&tls-certificates={pki / "client"}"', DISK)
    assert result.returncode == 0, result.stderr
    assert "newstyle-fixed with TLS" in result.stdout


@pytest.mark.timeout(30)
def test_tls_psk_is_refused_with_the_reason() -> None:
    result = run_luanbd("-U", "-", "--tls=require", "--tls-psk=/nonexistent.psk", DISK)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "--tls-psk" in lines[0] and "Python" in lines[0]


@pytest.mark.timeout(30)
def test_tls_missing_certificates_is_one_line(tmp_path: Path) -> None:
    result = run_luanbd("-U", "-", "--tls=on", f"--tls-certificates={tmp_path}", DISK)
    assert result.returncode == 1
    assert len(error_lines(result.stderr)) == 1, result.stderr
    assert "server-cert.pem" in result.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("args", "message"), [
    (["--tls=maybe"], "--tls"),
    (["--tls=require", "-o"], "oldstyle"),
])
def test_tls_usage_errors(args: list[str], message: str) -> None:
    result = run_luanbd("-U", "-", *args, DISK)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr
