"""nbdkit's command line as luanbd serves it: argument forms, captive mode, pidfiles,
daemon mode, TCP, --dump-plugin/--help/-V, shebang scripts, Lua runtimes, usage errors.

Each test runs the real ``luanbd`` command and real clients (nbdinfo, nbdsh, nbdcopy).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbd
import pytest
from luanbd_procs import (
    LUANBD,
    SCRIPTS,
    StartServer,
    client_env,
    free_tcp_port,
    line_of,
    pid_running,
    run_client,
    run_luanbd,
    script,
    single_command,
    terminate_pid,
    wait_file,
    wait_gone,
    wait_path,
    where,
)

DISK = script("disk.lua")
RECORD = script("config_record.lua")

#: A --run command that prints the captive-mode variables, one per line.
PRINT_VARS = ('printf "%s\\n" "uri=$uri" "nbd=$nbd" "port=$port" "unixsocket=$unixsocket" '
              '"exportname=$exportname" "tls=${tls-unset}"; '
              'if test -S "$unixsocket"; then echo listening=yes; else echo listening=no; fi')


def parse_vars(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def nbdinfo_json(workdir: Path, *luanbd_args: str) -> dict[str, object]:
    """``luanbd ARGS -U - --run 'nbdinfo --json "$uri"'``: the export's JSON object."""
    out = workdir / f"info-{uuid.uuid4().hex}.json"
    result = run_luanbd(*luanbd_args, "-U", "-", "--run",
                        f'nbdinfo --json "$uri" > {shlex.quote(str(out))}')
    assert result.returncode == 0, result
    info = json.loads(out.read_text())
    (export,) = info["exports"]
    assert isinstance(export, dict)
    return export


def read_disk(workdir: Path, *luanbd_args: str, cwd: Path | None = None) -> bytes:
    """Copy the whole export to a file with nbdcopy (captive mode) and return its bytes."""
    out = workdir / f"disk-{uuid.uuid4().hex}.img"
    result = run_luanbd(*luanbd_args, "-U", "-", "--run",
                        f'nbdcopy "$uri" {shlex.quote(str(out))}', cwd=cwd)
    assert result.returncode == 0, result
    assert result.stderr == ""
    return out.read_bytes()


# --- argument forms ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_options_after_the_script_are_options(workdir: Path) -> None:
    # GNU getopt permutation: options may follow the script and its key=value pairs.
    export = nbdinfo_json(workdir, DISK, "-r", "size=2M")
    assert export["is_read_only"] is True
    assert export["export-size"] == 2 * 1024 * 1024
    assert export["can_trim"] is False


@pytest.mark.timeout(30)
def test_options_mixed_with_key_values(workdir: Path) -> None:
    text = read_disk(workdir, "lua", RECORD, "a=1", "-r", "b=2", "-e", "name", "c=3")
    assert text == (b"a=1 string string\nb=2 string string\nc=3 string string\n"
                    b"complete\n")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("form", [
    ["lua", DISK],
    [DISK],
    [f"script={DISK}"],
    ["lua", f"script={DISK}"],
])
def test_script_forms(workdir: Path, form: list[str]) -> None:
    export = nbdinfo_json(workdir, *form, "size=3M")
    assert export["export-size"] == 3 * 1024 * 1024


@pytest.mark.timeout(30)
def test_config_gets_every_key_value_in_order_as_strings(workdir: Path) -> None:
    text = read_disk(workdir, RECORD, "b=2", "a=1", "k.e-y_1=a=b", "empty=", "b=again",
                     "n=0x10", "sp=with space")
    assert text.decode().splitlines() == [
        "b=2 string string",
        "a=1 string string",
        "k.e-y_1=a=b string string",
        "empty= string string",
        "b=again string string",
        "n=0x10 string string",
        "sp=with space string string",
        "complete",
    ]


@pytest.mark.timeout(30)
def test_script_key_is_not_passed_to_config(workdir: Path) -> None:
    text = read_disk(workdir, f"script={RECORD}", "x=1")
    assert text == b"x=1 string string\ncomplete\n"


@pytest.mark.timeout(30)
def test_relative_script_path(workdir: Path) -> None:
    text = read_disk(workdir, "config_record.lua", "k=v", cwd=SCRIPTS)
    assert text == b"k=v string string\ncomplete\n"


# --- captive mode -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_private_socket_is_removed_at_exit(workdir: Path) -> None:
    tmpdir = workdir / "tmp"
    tmpdir.mkdir()
    result = run_luanbd(DISK, "-U", "-", "--run", PRINT_VARS,
                        env=client_env(TMPDIR=str(tmpdir)))
    assert result.returncode == 0, result
    variables = parse_vars(result.stdout)
    sock = Path(variables["unixsocket"])
    assert sock.name == "socket"
    assert sock.parent.parent == tmpdir
    assert variables["listening"] == "yes"
    assert not sock.exists()
    assert not sock.parent.exists()
    assert list(tmpdir.iterdir()) == []


@pytest.mark.timeout(30)
def test_run_variables_private_socket() -> None:
    result = run_luanbd(DISK, "-U", "-", "--run", PRINT_VARS)
    assert result.returncode == 0, result
    v = parse_vars(result.stdout)
    sock = v["unixsocket"]
    assert os.path.isabs(sock)
    assert v == {
        "uri": f"nbd+unix://?socket={sock}",
        "nbd": f"nbd+unix://?socket={sock}",
        "port": "",
        "unixsocket": sock,
        "exportname": "",
        "tls": "unset",
        "listening": "yes",
    }


@pytest.mark.timeout(30)
def test_run_variables_with_export_name() -> None:
    result = run_luanbd(DISK, "-U", "-", "-e", "foo", "--run", PRINT_VARS)
    assert result.returncode == 0, result
    v = parse_vars(result.stdout)
    sock = v["unixsocket"]
    assert v["uri"] == f"nbd+unix:///foo?socket={sock}"
    assert v["nbd"] == v["uri"]
    assert v["exportname"] == "foo"
    assert v["port"] == ""


@pytest.mark.timeout(30)
def test_run_variables_relative_socket_made_absolute(workdir: Path) -> None:
    result = run_luanbd(DISK, "-U", "rel.sock", "--run", PRINT_VARS, cwd=workdir)
    assert result.returncode == 0, result
    v = parse_vars(result.stdout)
    assert v["unixsocket"] == str(workdir / "rel.sock")
    assert v["uri"] == f"nbd+unix://?socket={workdir}/rel.sock"
    assert v["listening"] == "yes"
    # A socket the user named is not ours to delete (nbdkit leaves it too).
    assert (workdir / "rel.sock").is_socket()


@pytest.mark.timeout(30)
def test_run_variables_tcp_and_nbdinfo_over_tcp() -> None:
    port = free_tcp_port()
    command = PRINT_VARS + '; nbdinfo --size "nbd://127.0.0.1:$port"'
    result = run_luanbd("-p", str(port), "-i", "127.0.0.1", DISK, "size=5M", "--run", command)
    assert result.returncode == 0, result
    v = parse_vars(result.stdout)
    assert v["uri"] == f"nbd://localhost:{port}"
    assert v["nbd"] == v["uri"]
    assert v["port"] == str(port)
    assert v["unixsocket"] == ""
    assert result.stdout.splitlines()[-1] == str(5 * 1024 * 1024)


@pytest.mark.timeout(30)
def test_tcp_ipaddr_listens_only_there() -> None:
    port = free_tcp_port()
    command = (f'nbdinfo --size "nbd://127.0.0.1:{port}"; '
               f'if nbdinfo --size "nbd://127.0.0.2:{port}" 2>/dev/null; '
               'then echo other=yes; else echo other=no; fi')
    result = run_luanbd("-p", str(port), "-i", "127.0.0.1", DISK, "--run", command)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["1048576", "other=no"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("command", "status"), [
    ("exit 3", 3),
    ("exit 0", 0),
    ("kill -USR1 $$", 128 + signal.SIGUSR1),
])
def test_run_exit_status(command: str, status: int) -> None:
    result = run_luanbd(DISK, "-U", "-", "--run", command)
    assert result.returncode == status, result


@pytest.mark.timeout(30)
def test_run_sees_data_written_by_an_earlier_client(workdir: Path) -> None:
    data = workdir / "in.img"
    data.write_bytes(os.urandom(65536))
    command = (f'nbdcopy {shlex.quote(str(data))} "$uri" && '
               f'nbdcopy "$uri" {shlex.quote(str(workdir / "out.img"))}')
    result = run_luanbd(DISK, "size=64k", "-U", "-", "--run", command)
    assert result.returncode == 0, result
    assert (workdir / "out.img").read_bytes() == data.read_bytes()


# --- pidfile, signals, daemon -----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_pidfile_and_sigterm(start_server: StartServer, workdir: Path) -> None:
    pidfile = workdir / "luanbd.pid"
    server = start_server(DISK, options=["-P", str(pidfile)])
    assert wait_file(pidfile) == f"{server.proc.pid}\n"
    info = run_client(["nbdinfo", "--size", server.uri])
    assert info.stdout == "1048576\n"
    assert server.stop(signal.SIGTERM) == 0
    assert pidfile.exists()  # nbdkit does not delete it either


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_other_stop_signals_exit_0(start_server: StartServer, sig: int) -> None:
    server = start_server(DISK)
    assert server.stop(sig) == 0


@pytest.mark.timeout(60)
def test_sigterm_with_a_client_connected(start_server: StartServer) -> None:
    # After SIGTERM, requests on an open connection get ESHUTDOWN (as with nbdkit), and
    # luanbd exits 0 once the client has gone.
    server = start_server(DISK)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"x" * 512, 0)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2
    with pytest.raises(nbd.Error) as failure:
        while time.monotonic() < deadline:
            h.pread(512, 0)
            time.sleep(0.01)
    assert failure.value.errno == "ESHUTDOWN"
    del h  # nbd_close: the connection goes away
    assert server.proc.wait(10) == 0
    assert server.errors() == []


def _tgkill(pid: int, tid: int, sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, sig) != 0:  # SYS_tgkill on x86_64
        raise OSError(ctypes.get_errno(), "tgkill")


def _blocks(pid: int, tid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    mask = int(status.split("SigBlk:")[1].split()[0], 16)
    return bool(mask & (1 << (sig - 1)))


@pytest.mark.timeout(60)
def test_stop_signal_handled_by_another_thread(start_server: StartServer) -> None:
    # Regression (fixed in 9b3be3c): a SIGTERM that the kernel handed to a worker thread
    # was lost, because the main thread slept in Event.wait() and was never woken.
    # POSIX lets a process-directed signal go to any thread that does not block it.
    # If luanbd's other threads do not block SIGTERM, deliver it to one of them, as the
    # kernel may; if they do block it, the kernel can only pick the main thread.
    server = start_server(DISK)
    pid = server.proc.pid
    workers = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert workers, "luanbd runs an accept thread besides the main thread"
    tid = workers[0]
    if _blocks(pid, tid, signal.SIGTERM):
        os.kill(pid, signal.SIGTERM)
    else:
        _tgkill(pid, tid, signal.SIGTERM)
    try:
        status = server.proc.wait(5)
    except subprocess.TimeoutExpired:
        status = None
    assert status == 0, "luanbd was still running 5 s after SIGTERM"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_once_ready(workdir: Path, sig: int) -> None:
    # A supervisor waits for the pidfile, then may stop the server at any time.
    # slow_after_fork.lua keeps luanbd in after_fork() for 2 s after the pidfile appears.
    tmpdir = workdir / "tmp"
    tmpdir.mkdir()
    pidfile = workdir / "ready.pid"
    proc = subprocess.Popen(
        [LUANBD, "-f", "-U", "-", "-P", str(pidfile), script("slow_after_fork.lua")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=client_env(TMPDIR=str(tmpdir)))
    try:
        wait_file(pidfile)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in err
    assert proc.returncode == 0
    assert list(tmpdir.iterdir()) == []  # the private socket directory is removed


def _kill_daemon(pidfile: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pidfile.read_text())
        if not terminate_pid(pid, 10):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_daemon_mode(workdir: Path) -> None:
    pidfile = workdir / "daemon.pid"
    sock = workdir / "daemon.sock"
    try:
        result = run_luanbd("-P", str(pidfile), "-U", str(sock), DISK, "size=2M", timeout=20)
        assert result.returncode == 0, result
        assert (result.stdout, result.stderr) == ("", "")
        pid = int(wait_file(pidfile))
        assert pid_running(pid)
        info = run_client(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"])
        assert info.stdout == "2097152\n"
        # The daemon is in a session of its own, detached from ours.
        assert os.getsid(pid) != os.getsid(0)
        assert terminate_pid(pid, 15)
    finally:
        _kill_daemon(pidfile)


@pytest.mark.timeout(60)
def test_daemon_mode_relative_pidfile(workdir: Path) -> None:
    name = f"luanbd-test-{uuid.uuid4().hex}.pid"
    sock = workdir / "daemon.sock"
    try:
        result = run_luanbd("-P", name, "-U", str(sock), DISK, cwd=workdir, timeout=20)
        assert result.returncode == 0, result
        pid = int(wait_file(workdir / name, timeout=3))
        assert pid_running(pid)
    finally:
        # The daemon writes its pidfile in one of two places: wait for it, stop it.
        places = (workdir / name, Path("/") / name)
        deadline = time.monotonic() + 5
        while not any(p.exists() for p in places) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # let the writer finish the line
        for place in places:
            _kill_daemon(place)
            with contextlib.suppress(FileNotFoundError):
                place.unlink()


@pytest.mark.timeout(60)
def test_exit_with_parent(workdir: Path) -> None:
    sock = workdir / "ewp.sock"
    parent_code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen(sys.argv[1:])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = workdir / "ewp.log"
    with open(log, "wb") as stderr:  # luanbd inherits it from its parent
        parent = subprocess.Popen(
            [sys.executable, "-c", parent_code, LUANBD, "--exit-with-parent", "-U", str(sock),
             DISK],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=client_env())
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        wait_path(sock)
        info = run_client(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"])
        assert info.stdout == "1048576\n"
        assert pid_running(child)
        parent.kill()
        parent.wait()
        assert wait_gone(child, 15), "luanbd outlived its parent"
        assert log.read_text() == ""
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.timeout(30)
def test_single_connection_on_stdin(workdir: Path) -> None:
    log = workdir / "single.log"
    h = nbd.NBD()
    h.connect_command(single_command(log, DISK, "size=2M"))
    assert h.get_protocol() == "newstyle-fixed"
    assert h.get_size() == 2 * 1024 * 1024
    h.pwrite(b"single" * 100, 4000)
    assert h.pread(600, 4000) == b"single" * 100
    h.shutdown()
    del h
    assert log.read_text() == ""


# --- information options ----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_dump_plugin() -> None:
    result = run_luanbd(DISK, "--dump-plugin")
    assert result.returncode == 0, result
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    fields = dict(line.split("=", 1) for line in lines)
    assert lines[0] == f"path={DISK}"
    assert fields["name"] == "lua"
    assert fields["api_version"] == "1"
    assert fields["thread_model"] == "serialize_all_requests"
    assert fields["lua_version"].split()[-1].startswith("5.4")
    has = {line.removesuffix("=1") for line in lines if line.startswith("has_")}
    assert has == {f"has_{name}" for name in (
        "dump_plugin", "config", "config_complete", "open", "get_size", "can_write",
        "can_flush", "can_trim", "pread", "pwrite", "flush", "trim", "zero")}
    # The script's own dump_plugin output comes last.
    assert lines[-2:] == ["disk_dump_line=1", "disk_page=4096"]


@pytest.mark.timeout(30)
def test_dump_plugin_runs_config_but_not_config_complete() -> None:
    result = run_luanbd(DISK, "fail=config_complete", "--dump-plugin")
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[-1] == "disk_page=4096"
    failed = run_luanbd("--dump-plugin", DISK, "fail=config")
    assert failed.returncode == 1
    line = line_of(DISK, 'error("config failed")')
    assert failed.stderr.splitlines() == [
        f"luanbd: error: config: {where(DISK, line)}: config failed"]


@pytest.mark.timeout(30)
def test_dump_plugin_lua_version_names_the_runtime() -> None:
    # Issue 11: lua_version is a release number in nbdkit's shape (nbdkit 1.32 with Debian's
    # Lua prints lua_version=5.3.6); lua_runtime keeps issue 3's name of the runtime in use.
    result = run_luanbd(DISK, "--dump-plugin")
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert re.fullmatch(r"5\.4\.\d+", fields["lua_version"]), fields["lua_version"]
    assert fields["lua_runtime"] == "Lua 5.4", fields["lua_runtime"]
    nbdkit = subprocess.run(["nbdkit", "lua", DISK, "--dump-plugin"], capture_output=True,
                            text=True, timeout=30, check=False)
    theirs = dict(line.split("=", 1) for line in nbdkit.stdout.splitlines() if "=" in line)
    assert re.fullmatch(r"\d+\.\d+\.\d+", theirs["lua_version"]), theirs


@pytest.mark.timeout(30)
@pytest.mark.parametrize("order", ["help-first", "help-last"])
def test_help_shows_script_and_config_help(order: str) -> None:
    args = ["--help", DISK] if order == "help-first" else [DISK, "--help"]
    result = run_luanbd(*args)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert "script=<FILENAME>     (required) The Lua script to run." in lines
    # config_help comes after the script= text.
    i = lines.index("script=<FILENAME>     (required) The Lua script to run.")
    assert lines[i + 2:i + 4] == ["size=<BYTES>  disk size", "failonce=<CALLBACK>  fail one call"]


@pytest.mark.timeout(30)
def test_help_without_script() -> None:
    result = run_luanbd("--help")
    assert result.returncode == 0, result
    assert "script=<FILENAME>     (required) The Lua script to run." in result.stdout
    assert "--run" in result.stdout


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    result = run_luanbd(flag)
    assert result.returncode == 0, result
    assert result.stdout == f"luanbd {importlib.metadata.version('luanbd')}\n"
    assert result.stderr == ""


# --- shebang scripts --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_shebang_script_runs_directly(workdir: Path) -> None:
    she = workdir / "she.lua"
    shutil.copy(script("shebang.lua"), she)
    she.chmod(0o755)
    command = ('nbdinfo --size "$uri"; nbdsh -u "$uri" -c "h.pread(1, 0)" 2>/dev/null; '
               'echo "nbdsh=$?"')
    result = run_luanbd("size=8192", "-U", "-", "--run", command, argv0="./she.lua",
                        cwd=workdir)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["8192", "nbdsh=1"]
    line = line_of(str(she), 'error("shebang pread failure")')
    assert line == 12  # the shebang line counts
    assert result.stderr.splitlines() == [
        f"luanbd: error: pread: ./she.lua:{line}: shebang pread failure"]


@pytest.mark.timeout(60)
def test_shebang_script_foreground_with_pidfile(start_server: StartServer,
                                               workdir: Path) -> None:
    she = workdir / "she.lua"
    shutil.copy(script("shebang.lua"), she)
    she.chmod(0o755)
    sock = workdir / "she.sock"
    pidfile = workdir / "she.pid"
    proc = subprocess.Popen(
        [str(she), "-f", "-P", str(pidfile), "-U", str(sock), "size=1024"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env())
    try:
        assert int(wait_file(pidfile)) == proc.pid
        info = run_client(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"])
        assert info.stdout == "1024\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert (out, err) == ("", "")
    finally:
        proc.kill()
        proc.wait()


# --- Lua runtimes -----------------------------------------------------------------------------

RUNTIMES = {"5.4": "lupa.lua54", "5.3": "lupa.lua53", "5.1": "lupa.lua51",
            "luajit": "lupa.luajit21"}


def _runtime_param(name: str) -> object:
    marks = [pytest.mark.skipif(importlib.util.find_spec(RUNTIMES[name]) is None,
                                reason=f"lupa has no {RUNTIMES[name]} here")]
    # 5.1 is a regression test: it crashed with a traceback before 9b3be3c (luanbd passed a
    # string to Lua 5.1's load(), which only takes a function).
    return pytest.param(name, marks=marks)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", [_runtime_param(n) for n in RUNTIMES])
def test_lua_runtime(workdir: Path, runtime: str) -> None:
    dump = subprocess.run([LUANBD, f"--lua={runtime}", DISK, "--dump-plugin"],
                          capture_output=True, text=True, timeout=30, env=client_env(),
                          check=False)
    assert "Traceback" not in dump.stderr, dump.stderr
    assert dump.returncode == 0, dump
    fields = dict(line.split("=", 1) for line in dump.stdout.splitlines())
    expected = "LuaJIT" if runtime == "luajit" else runtime
    assert expected in fields["lua_runtime"]
    assert fields["lua_version"].startswith("5.1." if runtime == "luajit" else f"{runtime}.")
    check = ("h.pwrite(b'lua' * 1000, 12345); "
             "assert h.pread(3000, 12345) == b'lua' * 1000; "
             "assert h.pread(5, 12340) == bytes(5); print('ok')")
    result = run_luanbd(f"--lua={runtime}", DISK, "-U", "-", "--run",
                        f'nbdsh -u "$uri" -c {shlex.quote(check)}')
    assert result.returncode == 0, result
    assert result.stdout == "ok\n"


# --- API_VERSION = 2 --------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_api2_script_without_load_callback_starts() -> None:
    # Lua's built-in load() is not the plugin's load callback (a bug fixed in 08f2540).
    result = run_luanbd(script("api2_minimal.lua"), "-U", "-", "--run",
                        'nbdsh -u "$uri" -c "print(h.get_size(), h.pread(4, 0))"')
    assert result.stderr == ""
    assert result.returncode == 0
    assert result.stdout == "512 bytearray(b'AAAA')\n"


@pytest.mark.timeout(30)
def test_api2_dump_plugin_lists_only_defined_callbacks() -> None:
    result = run_luanbd(script("sparse2.lua"), "--dump-plugin")
    assert result.returncode == 0, result
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert fields["api_version"] == "2"
    has = {k for k in fields if k.startswith("has_")}
    assert has == {f"has_{name}" for name in (
        "config", "open", "get_size", "can_write", "can_extents", "can_multi_conn",
        "pread", "pwrite", "extents")}


# --- usage errors -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize(("args", "expected"), [
    (["--bogus", DISK], "luanbd: unrecognized option '--bogus'"),
    ([DISK, "-Z"], "luanbd: unrecognized option '-Z'"),
    ([DISK, "-U"], "luanbd: argument -U/--unix: expected one argument"),
    ([DISK, "-U", "x.sock", "-p", "10809"], "luanbd: -p and -U options cannot be used together"),
    ([DISK, "-s", "--run", "true"], "luanbd: -s cannot be used with -U, -p or --run"),
    ([DISK, "-s", "--dump-plugin"], "luanbd: -s and --dump-plugin cannot be used together"),
    ([DISK, "-o", "-n"], "luanbd: cannot use -n and -o together"),
    ([DISK, "-p", "0"], "luanbd: -p 0: invalid port number"),
    ([DISK, "-t", "0"], "luanbd: -t: number of threads must be at least 1"),
])
def test_usage_error_is_one_line_and_exit_1(args: list[str], expected: str) -> None:
    result = run_luanbd(*args)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [expected]
    if ("option" in expected and "together" not in expected) or "argument" in expected:
        # An option the parser cannot take: then the short usage, as nbdkit (issue 11).
        from luanbd.cli import SHORT_USAGE_END, SYNOPSIS

        assert result.stdout == f"{SYNOPSIS}\n{SHORT_USAGE_END}\n"
        nbdkit = subprocess.run(["nbdkit", *(a if a != DISK else "null" for a in args)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert nbdkit.returncode == 1, nbdkit
        assert len(nbdkit.stderr.splitlines()) == 1, nbdkit
        assert nbdkit.stdout.startswith("nbdkit [") and nbdkit.stdout.endswith(
            "for full usage.\n"), nbdkit
    else:
        assert result.stdout == ""
