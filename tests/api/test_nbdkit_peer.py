"""nbdkit.peer_pid/uid/gid (nbdkit 1.24), peer_security_context (1.36), peer_tls_dn and
peer_tls_issuer_dn (1.40), read by real clients from a running luanbd.

The pid, uid and gid are those of a client process the test starts (its pid is known),
and nbdkit 1.32.5 (which has nbdkit_peer_pid in C only) is shown to see the same pid
through its ip filter.  The DNs are compared with the manual page's example and with
GnuTLS's own gnutls_x509_crt_get_dn3, the call nbdkit makes, run on the same certificate.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from apitest import LUANBD, NBDKIT, PLUGINS, Servers

nbd = pytest.importorskip("nbd")

PROBE = PLUGINS / "probe.lua"
SECTOR = 512
PEER = ("nbdkit.peer_pid()", "nbdkit.peer_uid()", "nbdkit.peer_gid()")
#: A client in a process of its own: prints the sectors it read, one per line.
CLIENT = """
import sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
n = h.get_size() // 512
for i in range(n):
    print(bytes(h.pread(512, i * 512)).decode().rstrip(" "))
"""


def client_process(sock: Path) -> tuple[int, list[str]]:
    """Run CLIENT (Debian's python3, which has libnbd): its pid and the lines it read."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", CLIENT, str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return proc.pid, out.splitlines()


def sectors(h: object) -> list[str]:
    n = h.get_size() // SECTOR  # type: ignore[attr-defined]
    return [bytes(h.pread(SECTOR, i * SECTOR)).decode().rstrip(" ")  # type: ignore[attr-defined]
            for i in range(n)]


# --- pid, uid, gid ------------------------------------------------------------------------
def test_peer_credentials_of_a_unix_socket_client(servers: Servers) -> None:
    sock = servers.listen(PROBE, *(f"expr={e}" for e in PEER),
                          "expr=math.type(nbdkit.peer_pid())")
    pid, got = client_process(sock)
    assert got == [f"ok number {pid}", f"ok number {os.getuid()}", f"ok number {os.getgid()}",
                   "ok string integer"]


def test_peer_credentials_under_connect_command(servers: Servers) -> None:
    """-s: libnbd made the socketpair in this process, so the peer is this process."""
    h = servers.connect(PROBE, *(f"expr={e}" for e in PEER))
    assert sectors(h) == [f"ok number {os.getpid()}", f"ok number {os.getuid()}",
                          f"ok number {os.getgid()}"]


@pytest.mark.skipif(NBDKIT is None, reason="nbdkit is not installed")
def test_nbdkit_sees_the_same_pid(servers: Servers, tmp_path: Path) -> None:
    """nbdkit 1.32.5's ip filter decides with nbdkit_peer_pid: the client process's pid is
    let in and another is not, so nbdkit's answer is the pid luanbd gives the script."""
    script = tmp_path / "client.py"
    script.write_text("import os, sys, nbd\nprint(os.getpid(), flush=True)\nsys.stdin.readline()\n"
                      "h = nbd.NBD()\nh.connect_unix(sys.argv[1])\nprint(h.get_size())\n")
    for offset, admitted in ((0, True), (1, False)):
        client = subprocess.Popen(["/usr/bin/python3", str(script), str(tmp_path / "n.sock")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdin is not None
        pid = int(client.stdout.readline())
        (tmp_path / "n.sock").unlink(missing_ok=True)
        server = subprocess.Popen([NBDKIT, "-f", "-U", str(tmp_path / "n.sock"), "--filter=ip",
                                   "memory", "1M", f"allow=pid:{pid + offset}", "deny=all"],
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not (tmp_path / "n.sock").exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.2)
            out, _ = client.communicate("go\n", timeout=30)
            assert (client.returncode == 0 and out.split()[-1] == "1048576") == admitted
        finally:
            server.terminate()
            server.wait(10)
    sock = servers.listen(PROBE, "expr=nbdkit.peer_pid()")
    pid, got = client_process(sock)
    assert got == [f"ok number {pid}"]


def test_peer_credentials_over_tcp(servers: Servers, tmp_path: Path) -> None:
    """Linux answers SO_PEERCRED on TCP with pid 0 and (uid_t) -1: nbdkit_peer_pid fails,
    nbdkit_peer_uid/gid return 4294967295, and so does luanbd."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [LUANBD, "-f", "-i", "127.0.0.1", "-p", str(port), str(PROBE),
            *(f"expr=({e})" for e in PEER), "expr=nbdkit.peer_name()"]
    err = tmp_path / "tcp.stderr"
    with err.open("w") as f:
        proc = subprocess.Popen(argv, stderr=f)
    servers.procs.append(proc)
    h = nbd.NBD()
    deadline = time.monotonic() + 15
    while True:
        try:
            h.connect_tcp("127.0.0.1", str(port))
            break
        except nbd.Error:
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
            h = nbd.NBD()
    got = sectors(h)
    assert got[:3] == ["err expr:1: Unable to get client pid", "ok number 4294967295",
                       "ok number 4294967295"]
    assert got[3].startswith("ok string 127.0.0.1")


@pytest.mark.parametrize("fn", ["peer_pid", "peer_uid", "peer_gid", "peer_security_context",
                                "peer_tls_dn", "peer_tls_issuer_dn"])
def test_peer_functions_outside_a_connection(servers: Servers, fn: str) -> None:
    h = servers.connect(PROBE, f"cexpr=(nbdkit.{fn}())")
    assert sectors(h) == [
        "err expr:1: this function can only be called from a connection callback"]


# --- security context -----------------------------------------------------------------------
def test_peer_security_context(servers: Servers) -> None:
    """What SO_PEERSEC gives for a Unix socket on this machine (a label, or no LSM to ask:
    ENOPROTOOPT), the same answer as for a socketpair of the test's own."""
    a, b = socket.socketpair()
    with a, b:
        try:
            label = a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERSEC, 1024)
            want = "ok string " + label.split(b"\0", 1)[0].decode()
        except OSError as err:
            want = f"err expr:1: getsockopt: SO_PEERSEC: {os.strerror(err.errno or 0)}"
            assert err.errno == errno.ENOPROTOOPT
    sock = servers.listen(PROBE, "expr=(nbdkit.peer_security_context())")
    assert client_process(sock)[1] == [want.rstrip()]


# --- TLS distinguished names ----------------------------------------------------------------
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl (Debian package openssl) is not installed")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(root: Path, client_subject: str, ca_subject: str = "/CN=BigCo") -> Path:
    """root/server (nbdkit's layout) and root/client (libnbd's), one CA."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
            "-out", "ca-cert.pem", "-days", "2", "-subj", ca_subject, "-utf8",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=root)
    for who, subject, ext in [
            ("server", "/CN=localhost", "subjectAltName=DNS:localhost\n"
             "extendedKeyUsage=serverAuth\n"),
            ("client", client_subject, "extendedKeyUsage=clientAuth\n")]:
        (root / who).mkdir()
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}/{who}-key.pem",
                "-out", f"{who}.csr", "-subj", subject, "-utf8", cwd=root)
        (root / f"{who}.ext").write_text(ext + "keyUsage=critical,digitalSignature,"
                                               "keyEncipherment\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
                "ca-key.pem", "-CAcreateserial", "-out", f"{who}/{who}-cert.pem", "-days", "2",
                "-extfile", f"{who}.ext", cwd=root)
        shutil.copy(root / "ca-cert.pem", root / who / "ca-cert.pem")
    return root


def gnutls_dns(cert: Path) -> tuple[str, str] | None:
    """(subject DN, issuer DN) of ``cert`` as GnuTLS's gnutls_x509_crt_get_dn3 and
    _get_issuer_dn3 (flags 0) print them: nbdkit's nbdkit_peer_tls_dn and _issuer_dn."""
    try:
        gnutls = ctypes.CDLL("libgnutls.so.30")
    except OSError:
        return None

    class Datum(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint)]

    pem = cert.read_bytes()
    crt = ctypes.c_void_p()
    assert gnutls.gnutls_x509_crt_init(ctypes.byref(crt)) == 0
    buf = ctypes.create_string_buffer(pem, len(pem))
    datum = Datum(ctypes.cast(buf, ctypes.c_void_p), len(pem))
    assert gnutls.gnutls_x509_crt_import(crt, ctypes.byref(datum), 1) == 0  # X509_FMT_PEM
    names = []
    for fn in (gnutls.gnutls_x509_crt_get_dn3, gnutls.gnutls_x509_crt_get_issuer_dn3):
        out = Datum()
        assert fn(crt, ctypes.byref(out), 0) == 0
        names.append(ctypes.string_at(out.data, out.size).decode())
    gnutls.gnutls_x509_crt_deinit(crt)
    return names[0], names[1]


DN_EXPRS = ("expr=nbdkit.peer_tls_dn()", "expr=nbdkit.peer_tls_issuer_dn()",
            "expr=nbdkit.is_tls()")


def tls_sectors(servers: Servers, pki: Path, *options: str) -> list[str]:
    sock = servers.listen(PROBE, *DN_EXPRS, options=("--tls=require",
                                                     f"--tls-certificates={pki / 'server'}",
                                                     *options))
    h = nbd.NBD()
    servers.handles.append(h)
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki / "client"))
    h.connect_unix(str(sock))
    return sectors(h)


@needs_openssl
def test_peer_tls_dn_the_manual_example(servers: Servers, tmp_path: Path) -> None:
    """nbdkit_peer_tls_dn(3)'s example certificate and the DNs it gives."""
    pki = make_pki(tmp_path, "/C=US/ST=New York/L=New York/O=BigCo/CN=client.example.com")
    got = tls_sectors(servers, pki, "--tls-verify-peer")
    assert got == ["ok string CN=client.example.com,O=BigCo,L=New York,ST=New York,C=US",
                   "ok string CN=BigCo", "ok boolean true"]
    oracle = gnutls_dns(pki / "client" / "client-cert.pem")
    if oracle is not None:
        assert oracle == ("CN=client.example.com,O=BigCo,L=New York,ST=New York,C=US",
                          "CN=BigCo")


# Escapes (RFC 4514 2.4), a multi-valued RDN, UTF-8 and the names GnuTLS spells its way.
TRICKY_SUBJECT = ("/C=DE/ST=Bayern/L=M\u00fcnchen/O=Big\\, Co+OU=R&D/DC=example/UID=joe"
                  "/street=1 Main St/SN=Smith/GN=Joe/title=Dr/serialNumber=42"
                  "/emailAddress=joe@example.com/CN= #lead;trail <x> \"q\" \\+\\\\ ")
TRICKY_CA = "/O=Test CA/OU=Unit\\, One/CN=Issuer=1"


@needs_openssl
def test_peer_tls_dn_is_gnutls_dn(servers: Servers, tmp_path: Path) -> None:
    pki = make_pki(tmp_path, TRICKY_SUBJECT, TRICKY_CA)
    oracle = gnutls_dns(pki / "client" / "client-cert.pem")
    if oracle is None:
        pytest.skip("libgnutls.so.30 (nbdkit's TLS library) is not installed")
    got = tls_sectors(servers, pki, "--tls-verify-peer")
    assert got == [f"ok string {oracle[0]}".rstrip(), f"ok string {oracle[1]}",
                   "ok boolean true"]


@needs_openssl
def test_peer_tls_dn_empty_without_verified_certificate(servers: Servers,
                                                        tmp_path: Path) -> None:
    """Without --tls-verify-peer no client certificate is asked for: "" (not an error), as
    without TLS at all."""
    pki = make_pki(tmp_path, "/CN=client")
    assert tls_sectors(servers, pki) == ["ok string", "ok string", "ok boolean true"]
    h = servers.connect(PROBE, *DN_EXPRS)
    assert sectors(h) == ["ok string", "ok string", "ok boolean false"]


def test_new_functions_exist_in_api1_and_api2(servers: Servers, tmp_path: Path) -> None:
    names = ["parse_probability", "parse_delay", "parse_int", "parse_unsigned", "parse_int8_t",
             "parse_uint8_t", "parse_int16_t", "parse_uint16_t", "parse_int32_t",
             "parse_uint32_t", "parse_int64_t", "parse_uint64_t", "stdio_safe", "nanosleep",
             "peer_pid", "peer_uid", "peer_gid", "peer_security_context", "peer_tls_dn",
             "peer_tls_issuer_dn"]
    check = " and ".join(f'type(nbdkit.{n}) == "function"' for n in names)
    assert sectors(servers.connect(PROBE, f"expr={check}")) == ["ok boolean true"]
    script = tmp_path / "v2.lua"
    script.write_text("API_VERSION = 2\n" + PROBE.read_text().replace(
        "function pread(h, count, offset)", "function pread(h, count, offset, flags)"))
    assert sectors(servers.connect(script, f"expr={check}")) == ["ok boolean true"]

