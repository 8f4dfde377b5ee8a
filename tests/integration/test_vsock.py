"""--vsock (AF_VSOCK, for virtual machines).  This machine has the vsock module but no
loopback transport (connect to CID 1 times out), so a client test runs only where a local
vsock connection works; the listening side is checked through the kernel: a second bind of the
same port fails while luanbd holds it."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from luanbd_procs import LUANBD, client_env, run_client, run_luanbd, script

DISK = script("disk.lua")
HAS_VSOCK = hasattr(socket, "AF_VSOCK")
pytestmark = pytest.mark.skipif(not HAS_VSOCK, reason="no AF_VSOCK in this Python")


def vsock_port() -> int:
    """A vsock port nobody listens on (vsock ports are 32-bit; pick high, then check)."""
    for port in range(40000 + int(time.time()) % 10000, 60000):
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
            try:
                s.bind((socket.VMADDR_CID_ANY, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free vsock port")


def vsock_available() -> bool:
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
            s.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
    except OSError:
        return False
    return True


@pytest.fixture
def vsock_server():  # type: ignore[no-untyped-def]
    if not vsock_available():
        pytest.skip("AF_VSOCK sockets cannot be bound here")
    port = vsock_port()
    proc = subprocess.Popen([LUANBD, "-f", "--vsock", "-p", str(port), "--print-uri", DISK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=client_env())
    assert proc.stdout is not None
    uri = proc.stdout.readline().strip()
    yield port, uri, proc
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_vsock_listens_and_prints_its_uri(vsock_server) -> None:  # type: ignore[no-untyped-def]
    port, uri, _ = vsock_server
    assert uri == f"nbd+vsock://1:{port}"
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s, \
            pytest.raises(OSError) as err:
        s.bind((socket.VMADDR_CID_ANY, port))
    assert err.value.errno == 98  # EADDRINUSE: luanbd holds the port


def test_vsock_port_in_use_is_a_startup_error(vsock_server) -> None:  # type: ignore[no-untyped-def]
    port, _, _ = vsock_server
    result = run_luanbd("-f", "--vsock", "-p", str(port), DISK)
    assert result.returncode == 1
    assert result.stderr == f"luanbd: error: bind: vsock port {port}: Address already in use\n"


def test_vsock_client_round_trip(vsock_server) -> None:  # type: ignore[no-untyped-def]
    port, uri, _ = vsock_server
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect((1, port))
        except OSError as err:
            pytest.skip(f"no vsock loopback on this machine ({err})")
        assert s.recv(8) == b"NBDMAGIC"
    out = run_client(["nbdinfo", "--size", uri]).stdout
    assert out.strip() == str(1024 * 1024)


def test_vsock_run_variables() -> None:
    if not vsock_available():
        pytest.skip("AF_VSOCK sockets cannot be bound here")
    port = vsock_port()
    result = run_luanbd("--vsock", "-p", str(port), "--run", 'echo "$uri|$port|$unixsocket"',
                        DISK)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"nbd+vsock://1:{port}|{port}|\n"


@pytest.mark.parametrize("other", [["-U", "/tmp/x.sock"], ["-s"]])
def test_vsock_with_unix_or_single_is_refused(other: list[str]) -> None:
    result = run_luanbd("--vsock", *other, DISK)
    assert result.returncode == 1
    assert result.stderr == "luanbd: --vsock cannot be used with -U or -s\n"
