"""nbdkit's deployment options: socket activation (LISTEN_FDS/LISTEN_PID, with libnbd's
``[ CMD ]`` and systemd-socket-activate), --print-uri, --dump-config, --keepalive,
-u/-g, -D; and installed plugins found by name in the plugin directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from luanbd_procs import (
    LUANBD,
    STOP_TIMEOUT,
    StartServer,
    client_env,
    free_tcp_port,
    run_client,
    run_luanbd,
    script,
    wait_path,
)

DISK = script("disk.lua")
REPO = Path(__file__).resolve().parents[2]


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, result
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert text in result.stderr, result.stderr


# --- socket activation ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_socket_activation_nbdinfo_square_brackets() -> None:
    """libnbd's connect_systemd_socket_activation: ``nbdinfo -- [ luanbd script ]``."""
    out = run_client(["nbdinfo", "--size", "--", "[", LUANBD, DISK, "size=3M", "]"]).stdout
    assert out.strip() == str(3 * 1024 * 1024)


@pytest.mark.timeout(60)
def test_socket_activation_nbdinfo_full(workdir: Path) -> None:
    out = run_client(["nbdinfo", "--", "[", LUANBD, "-r", DISK, "]"]).stdout
    assert "is_read_only: true" in out


def _socket_activate_tool() -> str:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate (Debian package systemd) is not installed")
    return tool


@pytest.mark.timeout(60)
def test_socket_activation_tcp_listener(workdir: Path) -> None:
    """A TCP socket passed by systemd is served (and --keepalive is accepted with it)."""
    port = free_tcp_port()
    proc = subprocess.Popen([_socket_activate_tool(), "-l", f"127.0.0.1:{port}", LUANBD,
                             "--keepalive", DISK, "size=5M"],
                            env=client_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            result = run_client(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], check=False)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert result.stdout.strip() == str(5 * 1024 * 1024), result
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    assert b"Traceback" not in err


@pytest.mark.timeout(60)
def test_systemd_socket_activate(workdir: Path) -> None:
    tool = _socket_activate_tool()
    sock = workdir / "act.sock"
    proc = subprocess.Popen([tool, "-l", str(sock), LUANBD, DISK, "size=2M"],
                            env=client_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_path(sock)
        out = run_client(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"]).stdout
        assert out.strip() == str(2 * 1024 * 1024)
        # Served by one long-running luanbd: a second client works too.
        run_client(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"])
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    assert b"Traceback" not in err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("option", [["-U", "x.sock"], ["-p", "10809"], ["-i", "127.0.0.1"],
                                    ["-s"], ["--run", "true"]],
                         ids=["-U", "-p", "-i", "-s", "--run"])
def test_socket_activation_refuses_listen_options(option: list[str]) -> None:
    result = subprocess.run(
        ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", LUANBD, *option, DISK],
        capture_output=True, text=True, env=client_env(), stdin=subprocess.DEVNULL,
        timeout=30, check=False)
    one_line_error(result, "socket activation")


@pytest.mark.timeout(30)
def test_listen_pid_of_another_process_is_ignored(workdir: Path) -> None:
    """LISTEN_FDS meant for another pid is not ours: -U is then fine."""
    env = client_env(LISTEN_PID="1", LISTEN_FDS="1")
    result = run_luanbd("-U", "-", "--run", 'nbdinfo --size "$uri"', DISK, env=env)
    assert result.returncode == 0, result.stderr


def test_example_systemd_units_exist() -> None:
    socket_unit = (REPO / "examples" / "systemd" / "luanbd.socket").read_text()
    service_unit = (REPO / "examples" / "systemd" / "luanbd.service").read_text()
    assert "ListenStream=" in socket_unit
    assert "ExecStart=" in service_unit and "luanbd" in service_unit
    exec_start = next(line for line in service_unit.splitlines() if line.startswith("ExecStart="))
    for forbidden in (" -U", " -p", " -s", " --run", " -i"):
        assert forbidden not in exec_start


# --- --print-uri, --dump-config ---------------------------------------------------------------

@pytest.mark.timeout(30)
def test_print_uri_unix(start_server: StartServer) -> None:
    server = start_server(DISK, options=["--print-uri"])
    log = server.wait_log("nbd+unix://")
    assert f"nbd+unix://?socket={server.sock}" in log.splitlines()  # as nbdkit


@pytest.mark.timeout(30)
def test_print_uri_tcp_with_exportname() -> None:
    port = free_tcp_port()
    result = run_luanbd("-p", str(port), "-i", "127.0.0.1", "-e", "foo", "--print-uri",
                        "--run", "true", DISK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"nbd://localhost:{port}/foo"


@pytest.mark.timeout(30)
def test_dump_config() -> None:
    result = run_luanbd("--dump-config")
    assert result.returncode == 0, result.stderr
    config = dict(line.split("=", 1) for line in result.stdout.splitlines())
    for key in ("binary", "version", "version_major", "version_minor", "lua_versions",
                "plugindir"):
        assert config[key], key
    assert config["tls"] == "yes"
    assert config["exit_with_parent"] == "yes"
    # The compiled request loop is built wherever a C compiler was there at install
    # (scripts/setup.sh installs gcc), and LUANBD_FASTPATH=0 turns it off.
    assert config["fastpath"] == ("yes" if shutil.which("gcc") else "no")
    off = run_luanbd("--dump-config", env=client_env(LUANBD_FASTPATH="0")).stdout
    assert f"fastpath={'off' if shutil.which('gcc') else 'no'}" in off.splitlines()
    # The same compiler builds the compiled table.concat: without this check a failed build
    # would only show as tests/lua/test_lualib.py skipping.
    assert config["lualib"] == ("yes" if shutil.which("gcc") else "no")
    assert "5.4" in config["lua_versions"].split(",")
    assert config["version"].startswith(f"{config['version_major']}.{config['version_minor']}")
    v = run_luanbd("--version").stdout.split()[-1]
    assert config["version"] == v


@pytest.mark.timeout(30)
def test_dump_config_plugindir_from_environment(workdir: Path) -> None:
    result = run_luanbd("--dump-config", env=client_env(LUANBD_PLUGINDIR=str(workdir)))
    assert f"plugindir={workdir}" in result.stdout.splitlines()


# --- installed plugins ------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_installed_plugin_by_name(workdir: Path) -> None:
    plugins = workdir / "plugins"
    plugins.mkdir()
    shutil.copy(DISK, plugins / "mydisk.lua")
    env = client_env(LUANBD_PLUGINDIR=str(plugins))
    result = run_luanbd("-U", "-", "--run", 'nbdinfo --size "$uri"', "mydisk", "size=7M",
                        env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(7 * 1024 * 1024)
    # also after the optional word "lua"
    result = run_luanbd("-U", "-", "--run", 'nbdinfo --size "$uri"', "lua", "mydisk",
                        env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(30)
def test_installed_plugin_unknown_name(workdir: Path) -> None:
    env = client_env(LUANBD_PLUGINDIR=str(workdir))
    result = run_luanbd("-U", "-", "nosuchplugin", env=env, cwd=workdir)
    assert result.returncode == 1
    assert "nosuchplugin" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


# --- -u / -g, -D, --keepalive ----------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize(("option", "text"), [
    (["-u", "no-such-user-luanbd"], "user no-such-user-luanbd not found"),
    (["-g", "no-such-group-luanbd"], "group no-such-group-luanbd not found"),
    (["-D", "nodot=1"], "NAME.FLAG=N"),
    (["-D", "lua.flag=x"], "NAME.FLAG=N"),
])
def test_option_errors_are_one_line(option: list[str], text: str) -> None:
    one_line_error(run_luanbd("-U", "-", *option, DISK), text)


@pytest.mark.timeout(60)
def test_user_group_drop_privileges(start_server: StartServer) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    server = start_server(DISK, options=["-u", "nobody", "-g", "nogroup"])
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    assert set(uids) == {"65534"} and set(gids) == {"65534"}
    run_client(["nbdinfo", "--size", server.uri])


@pytest.mark.timeout(30)
def test_debug_flags() -> None:
    quiet = run_luanbd("-U", "-", "-D", "nbdkit.backend.datapath=0", "--run", "true", DISK)
    assert quiet.returncode == 0, quiet.stderr
    assert "debug:" not in quiet.stderr
    loud = run_luanbd("-U", "-", "-D", "luanbd.conn=1", "--run", 'nbdinfo --size "$uri"', DISK)
    assert loud.returncode == 0, loud.stderr
    assert "luanbd: debug:" in loud.stderr


@pytest.mark.timeout(60)
def test_keepalive_sets_so_keepalive(workdir: Path) -> None:
    """With --keepalive the server's end of a TCP connection has a keepalive timer."""
    if shutil.which("ss") is None:
        pytest.skip("ss (Debian package iproute2) is not installed")
    port = free_tcp_port()
    proc = subprocess.Popen([LUANBD, "-f", "-p", str(port), "-i", "127.0.0.1", "--keepalive",
                             DISK], env=client_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        conn = None
        while conn is None:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with conn:
            assert conn.recv(8) == b"NBDMAGIC"
            time.sleep(0.2)
            out = subprocess.run(["ss", "-tno", "state", "established",
                                  f"( sport = :{port} )"], capture_output=True, text=True,
                                 check=True).stdout
            assert "keepalive" in out, out
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    assert b"Traceback" not in err


def test_verbose_shows_each_connections_handshake_summary() -> None:
    result = run_luanbd("-v", "-U", "-", "-e", "dü", "--run",
                        'nbdsh -u "$uri" -c "h.get_size()"', DISK)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if ": export '" in line]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    # The export name (not a Python bytes repr; its UTF-8 bytes escaped as nbdkit >= 1.36
    # escapes debug lines), its flags and what was negotiated.
    assert "export 'd\\xc3\\xbc' size " in line, line
    assert "flags 0x" in line and "SEND_FLUSH" in line, line
    assert "structured replies on" in line and "extended headers off" in line, line
    assert "TLS off" in line, line


SLOW_PREAD = """
function open(readonly) return 1 end
function get_size(h) return 4096 end
function pread(h, count, offset)
  if offset > 0 then
    local t = os.clock() + 1.2
    while os.clock() < t do end
  end
  return string.rep("x", count)
end
"""


@pytest.mark.timeout(60)
def test_verbose_logs_slow_requests_with_timing(workdir: Path) -> None:
    slow = workdir / "slow.lua"
    slow.write_text(SLOW_PREAD)
    result = run_luanbd("-v", "-U", "-", "--run",
                        'nbdsh -u "$uri" -c "h.pread(512, 0)" -c "h.pread(512, 512)"', str(slow))
    assert result.returncode == 0, result.stderr
    timed = [line for line in result.stderr.splitlines() if " took " in line]
    # Only the slow read (offset 512) is reported, with its timing.
    assert len(timed) == 1, result.stderr
    assert "NBD_CMD_READ offset=512 count=512 took 1." in timed[0], timed
