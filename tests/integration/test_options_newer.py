"""Server options from nbdkit 1.34-1.45's manual: --log=/path and --log=default (1.44),
--print-uri's lines and TLS parameters (1.40), --no-meta-contexts (1.38).  Real servers,
real clients (nbdinfo, libnbd)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from luanbd_procs import (
    LUANBD,
    StartServer,
    free_tcp_port,
    run_client,
    run_luanbd,
    script,
    terminate_pid,
    wait_file,
)

DISK = script("disk.lua")

#: A script whose config fails with fail=config and whose reads fail with "boom".
FAILING = """
function config(k, v) if v == "config" then error("config refused") end end
function open(ro) return {} end
function get_size(h) return 1024 end
function pread(h, count, offset) nbdkit.debug("reading %d", offset); error("boom") end
"""


@pytest.fixture
def failing(tmp_path: Path) -> str:
    path = tmp_path / "failing.lua"
    path.write_text(FAILING)
    return str(path)


# --- --log ---------------------------------------------------------------------------------
def test_log_file_gets_the_error_lines_appended(tmp_path: Path, failing: str) -> None:
    log = tmp_path / "errors.log"
    log.write_text("earlier line\n")
    result = run_luanbd(f"--log={log}", "-v", "-U", "-", failing,
                        "--run", 'nbdsh -u "$uri" -c "h.pread(512, 0)"')
    assert result.returncode != 0
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier line"                # appended, as fopen(path, "a")
    assert any(line.startswith("luanbd: error: pread: ") and line.endswith("boom")
               for line in lines[1:]), lines
    assert all(line.startswith("luanbd: error: ") for line in lines[1:]), lines
    # Debug lines stay on stderr, as nbdkit's (they never go to the log file).
    assert "luanbd: debug: reading 0" in result.stderr
    assert "luanbd: error:" not in result.stderr


def test_log_file_gets_startup_errors(tmp_path: Path, failing: str) -> None:
    log = tmp_path / "errors.log"
    result = run_luanbd(f"--log={log}", failing, "k=config", "-U", "-", "--run", "true")
    assert result.returncode == 1
    assert "config refused" in log.read_text()
    assert result.stderr == ""


def test_log_file_is_kept_in_the_background(tmp_path: Path, failing: str) -> None:
    """Opened before luanbd forks (and changes directory to /): the daemon still writes
    its errors there."""
    log, sock, pidfile = tmp_path / "bg.log", tmp_path / "bg.sock", tmp_path / "bg.pid"
    result = run_luanbd(f"--log={log}", "-U", str(sock), "-P", str(pidfile), failing)
    assert result.returncode == 0, result.stderr
    pid = int(wait_file(pidfile))
    try:
        h = nbd.NBD()
        h.connect_unix(str(sock))
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
        h.shutdown()
        deadline = time.monotonic() + 10
        while "boom" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "no error line in the log file"
            time.sleep(0.05)
    finally:
        assert terminate_pid(pid)


@pytest.mark.parametrize("value", ["relative.log", "file", "", "Stderr"])
def test_log_needs_a_keyword_or_an_absolute_path(value: str) -> None:
    result = run_luanbd(f"--log={value}", DISK, "--dump-plugin")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'luanbd: --log must be "stderr", "syslog", "null", or an absolute path']


def test_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "x.log"
    result = run_luanbd(f"--log={path}", DISK, "--dump-plugin")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"luanbd: {path}: fopen: No such file or directory"]
    assert result.stdout == ""


def test_log_default_is_stderr_in_the_foreground(failing: str) -> None:
    result = run_luanbd("--log=default", failing, "k=config", "-U", "-", "--run", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("luanbd: error: ") and "config refused" in result.stderr


# --- --print-uri ---------------------------------------------------------------------------
def test_print_uri_four_lines(start_server: StartServer) -> None:
    server = start_server(DISK, options=["--print-uri"])
    uri = f"nbd+unix://?socket={server.sock}"
    log = server.wait_log("nbdinfo ")
    quoted = f'"{uri}"'   # '?' is not one of nbdkit's shell-safe characters
    assert [uri, f"Shell-quoted URI: {quoted}", "Command to query the NBD endpoint:",
            f"  nbdinfo {quoted}"] == log.splitlines()[:4]


def test_print_uri_command_runs(tmp_path: Path) -> None:
    """The printed command is one a shell runs as is, even for an awkward socket path."""
    odd = tmp_path / 'a b$c"d'
    odd.mkdir()
    sock = odd / "sock"
    proc = subprocess.Popen([LUANBD, "-f", "-U", str(sock), "--print-uri", DISK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().rstrip("\n") for _ in range(4)]
        assert lines[0].startswith("nbd+unix://?socket=") and "%20" in lines[0]
        out = run_client(["sh", "-c", lines[3].strip()]).stdout
        assert "export-size: " in out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_uri_keeps_slashes_of_the_export_name_as_nbdkit(tmp_path: Path) -> None:
    run = 'echo "$uri"'
    ours = run_luanbd("-U", "-", "-e", "a/b c", DISK, "--run", run)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.startswith("nbd+unix:///a/b%20c?socket=")
    if shutil.which("nbdkit"):
        theirs = subprocess.run(["nbdkit", "-U", "-", "-e", "a/b c", "null", "--run", run],
                                capture_output=True, text=True, timeout=30, check=True)
        assert theirs.stdout.split("?")[0] == ours.stdout.split("?")[0]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def server_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for localhost, in nbdkit's layout."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl (Debian package openssl) is not installed")
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
             "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem",
             "-out", "server.csr", "-subj", "/CN=localhost", cwd=pki)
    (pki / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                    "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", "server-cert.pem", "-days", "2",
             "-extfile", "server.ext", cwd=pki)
    return pki


@pytest.mark.parametrize("tls,listen", [("require", "unix"), ("require", "tcp"),
                                         ("on", "unix")])
def test_print_uri_with_tls(server_pki: Path, tls: str, listen: str) -> None:
    """nbdkit 1.40: with TLS required, the URI names --tls-certificates, and a libnbd
    client (nbdinfo) connects with nothing else given: it finds ca-cert.pem there."""
    where = ["-U", "-"] if listen == "unix" else ["-i", "127.0.0.1", "-p",
                                                   str(free_tcp_port())]
    result = run_luanbd(*where, f"--tls={tls}", f"--tls-certificates={server_pki}",
                        "--print-uri", DISK, "--run", 'echo "run: $uri"; nbdinfo "$uri"')
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()[0]
    assert f"run: {printed}" in result.stdout.splitlines()
    if tls == "require":
        sep = "&" if listen == "unix" else "?"
        assert printed.startswith("nbds")
        assert printed.endswith(f"{sep}tls-certificates={server_pki}")
        assert "with TLS" in result.stdout
    else:
        assert "tls-certificates" not in printed and printed.startswith("nbd+unix")


# --- --no-meta-contexts ---------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--no-mc", "--no-meta-contexts"])
def test_no_meta_contexts(start_server: StartServer, option: str) -> None:
    server = start_server(DISK, options=[option])
    server.wait_listening()
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(str(server.sock))
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) is False
    h.shutdown()


def test_help_names_the_long_options() -> None:
    out = run_luanbd("--help").stdout
    for name in ("--no-meta-contexts", "--no-structured-replies", "--log=stderr|syslog|null|"
                 "default|/path", "--print-uri"):
        assert name in out, name



# --- --run's default socket, --dump-config, debug escaping ------------------------------------
def test_run_alone_serves_a_private_unix_socket() -> None:
    """nbdkit 1.36: --run implies -U - unless -p or --vsock is given."""
    run = 'echo "$uri|$port|$unixsocket"; nbdinfo --size "$uri"'
    result = run_luanbd(DISK, "size=1M", "--run", run)
    assert result.returncode == 0, result.stderr
    uri, port, sock = result.stdout.splitlines()[0].split("|")
    assert uri == f"nbd+unix://?socket={sock}" and port == "" and sock.endswith("/socket")
    assert result.stdout.splitlines()[1] == "1048576"
    assert not Path(sock).exists()  # the private socket is removed at exit
    port_number = free_tcp_port()
    tcp = run_luanbd("-i", "127.0.0.1", "-p", str(port_number), DISK, "--run", 'echo "$uri"')
    assert tcp.stdout.strip() == f"nbd://localhost:{port_number}"


def test_dump_config_has_nbdkits_newer_keys() -> None:
    config = dict(line.split("=", 1) for line in run_luanbd("--dump-config").stdout.splitlines())
    assert config["run_default_socket"] == "Unix"     # nbdkit 1.36
    assert config["max_api_version"] == "2"           # 1.38
    assert config["timeout_option"] == "yes"          # 1.42
    assert config["vsock_option"] == "yes"            # 1.42
    assert config["exit_with_parent"] == "yes"        # 1.34


def test_debug_lines_are_escaped_as_nbdkit_136(tmp_path: Path) -> None:
    """Control characters, backslashes and non-ASCII bytes of a debug message come out
    C-escaped (nbdkit's c_string_quote); error lines keep their text."""
    path = tmp_path / "debug.lua"
    path.write_text(FAILING.replace('nbdkit.debug("reading %d", offset)',
                                    'nbdkit.debug("tab\\there\\\\ d\\u{fc} bell\\a")'))
    result = run_luanbd("-v", "-U", "-", str(path), "--run", 'nbdsh -u "$uri" -c "h.pread(1, 0)"')
    assert "luanbd: debug: tab\\there\\\\ d\\xc3\\xbc bell\\a\n" in result.stderr
