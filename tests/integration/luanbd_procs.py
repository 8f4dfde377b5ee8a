"""Processes and clients for the integration tests: start luanbd as a real process, talk
to it with real clients (libnbd tools, qemu, fio) or with a raw NBD socket.

Nothing here is a mock: each helper runs the installed ``luanbd`` command of the virtualenv
that runs pytest.  The fixtures that use these helpers are in conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

#: The luanbd command of the virtualenv running the tests.
VENV_BIN = Path(sys.executable).parent
LUANBD = str(VENV_BIN / "luanbd")
#: This directory's own Lua scripts.
SCRIPTS = Path(__file__).resolve().parent / "scripts"

#: Seconds to wait for a server to listen.
START_TIMEOUT = 15.0
#: Seconds a server gets to exit after SIGTERM.
STOP_TIMEOUT = 20.0
#: Seconds any client process may take (fio and qemu included).
CLIENT_TIMEOUT = 60.0


#: scripts/sanitize.sh runs the suite with ASan, whose allocator, shadow memory and quarantine
#: stand in for glibc malloc's and count in RSS.
SANITIZED = bool(os.environ.get("LUANBD_SANITIZED"))


def not_sanitized(why: str) -> pytest.MarkDecorator:
    """Skip a test that measures what ASan replaces."""
    return pytest.mark.skipif(SANITIZED, reason=f"under ASan, {why}")


def script(name: str) -> str:
    """Absolute path of one of this directory's Lua scripts."""
    path = SCRIPTS / name
    assert path.is_file(), path
    return str(path)


def line_of(script_path: str, text: str) -> int:
    """The 1-based number of the only line of ``script_path`` that contains ``text``."""
    lines = [i for i, line in enumerate(Path(script_path).read_text().splitlines(), 1)
             if text in line and not line.lstrip().startswith("--")]
    assert len(lines) == 1, (script_path, text, lines)
    return lines[0]


def where(script_path: str, line: int, lua: str = "5.4") -> str:
    """``SOURCE:LINE`` as Lua puts it in front of an error raised at ``line`` of a script.

    Lua names a script loaded from a file by its path, but keeps at most LUA_IDSIZE (60)
    bytes of the name: a longer path keeps its tail behind "..." (luaO_chunkid; Lua 5.1
    cuts at a different length).  nbdkit's luaL_loadfile does the same,
    so a test must not assume that the whole path shows.
    """
    if lua == "5.1":  # "..." and the last 52 bytes once the path is over 52
        name = script_path if len(script_path) <= 52 else "..." + script_path[-52:]
    else:  # 5.2 to 5.5 and LuaJIT: "..." and the last 56 bytes once it is over 59
        name = script_path if len(script_path) <= 59 else "..." + script_path[-56:]
    return f"{name}:{line}"


def client_env(**extra: str) -> dict[str, str]:
    """The environment for luanbd and its clients.

    /usr/bin comes first so that nbdsh finds the python3 that has the nbd module; the
    virtualenv's bin follows so that ``luanbd`` (and ``env -S luanbd``) resolve.
    """
    env = dict(os.environ)
    env["PATH"] = f"/usr/bin:/bin:{VENV_BIN}:{env.get('PATH', '')}"
    env.pop("tls", None)
    env.update(extra)
    return env


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, f"a Python traceback was printed:\n{text}"


def run_luanbd(
    *args: str,
    timeout: float = CLIENT_TIMEOUT,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    argv0: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``luanbd ARGS`` to completion; stdout and stderr are captured as text."""
    result = subprocess.run(
        [argv0 or LUANBD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env or client_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert_no_traceback(result.stdout, result.stderr)
    return result


def run_client(
    argv: Sequence[str], *, timeout: float = CLIENT_TIMEOUT, check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client program; with ``check``, a failure shows its output."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout,
        env=env or client_env(), stdin=subprocess.DEVNULL, check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{argv[0]} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                    f"stderr:\n{result.stderr}")
    return result


def error_lines(text: str) -> list[str]:
    """The lines luanbd logged as errors."""
    return [line for line in text.splitlines() if line.startswith("luanbd: error: ")]


# --- a luanbd server in the foreground -------------------------------------------------------

class Server:
    """``luanbd -f -U SOCK [OPTIONS] SCRIPT [ARGS]`` running in the background of a test."""

    def __init__(self, workdir: Path, argv: Sequence[str], *, sock: Path | None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.sock = sock
        self.argv = [LUANBD, *argv]
        self.log_path = workdir / f"luanbd-{id(self)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=env or client_env(), cwd=workdir,
        )
        self.returncode: int | None = None
        #: The exit status teardown expects (None: any).
        self.expect_status: int | None = 0

    @property
    def uri(self) -> str:
        assert self.sock is not None
        return f"nbd+unix:///?socket={self.sock}"

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def errors(self) -> list[str]:
        return error_lines(self.log())

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the server answers a connection with its greeting.

        A greeting, not just a listening socket: luanbd binds its socket (and writes its
        pidfile) before it installs its signal handlers, so a SIGTERM sent as soon as
        connect() works can kill it outright (test_cli.py::test_stop_signal_once_ready).
        Connections are served only once the handlers are in place.
        """
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"luanbd exited {self.proc.returncode} before listening:\n"
                            f"{self.log()}")
            if self.sock.exists():
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    s.connect(str(self.sock))
                    if s.recv(8) == NBDMAGIC:
                        # Closed at once: luanbd logs no error for that.
                        return
            time.sleep(0.02)
        pytest.fail(f"luanbd did not listen on {self.sock} within {timeout} s:\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the log; return the whole log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} did not appear in luanbd's log within {timeout} s:\n{log}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server, wait for it (SIGKILL after STOP_TIMEOUT) and return its status."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                pytest.fail(f"luanbd did not exit within {STOP_TIMEOUT} s of "
                            f"{signal.Signals(sig).name}:\n{self.log()}")
        self._log.close()
        self.returncode = self.proc.returncode
        return self.returncode


#: The type of the ``start_server`` fixture.
StartServer = Callable[..., Server]


def single_command(log: Path, script_path: str, *args: str,
                   options: Sequence[str] = ()) -> list[str]:
    """argv for libnbd's connect_command: ``luanbd -s --exit-with-parent``, stderr to ``log``."""
    return ["/bin/sh", "-c", 'log=$1; shift; exec "$@" 2>>"$log"', "sh", str(log),
            LUANBD, "-s", "--exit-with-parent", *options, script_path, *args]


# --- a raw NBD client ------------------------------------------------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_INVALID = 0x80000003
NBD_INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3


class RawClient:
    """Speaks NBD byte by byte over a Unix socket, to send what libnbd refuses to."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.size = 0
        self.eflags = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise EOFError("the server closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (EOF) within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    # handshake
    def greeting(self) -> int:
        magic, opt, gflags = struct.unpack(">8sQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, (magic, opt)
        return int(gflags)

    def start(self, client_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", client_flags))

    def send_option(self, option: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return option, reply, self.recv_exact(length)

    def go(self, name: bytes = b"") -> int:
        """NBD_OPT_GO; returns the final reply type (REP_ACK on success)."""
        self.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            option, reply, data = self.option_reply()
            assert option == OPT_GO
            if reply == REP_INFO:
                (info,) = struct.unpack_from(">H", data)
                if info == NBD_INFO_EXPORT:
                    self.size, self.eflags = struct.unpack_from(">QH", data, 2)
                continue
            return reply

    def connect_export(self) -> None:
        self.start()
        reply = self.go()
        assert reply == REP_ACK, hex(reply)

    # transmission (simple replies only: structured replies are never negotiated here)
    def send_request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                     cookie: int = 1, magic: int = REQUEST_MAGIC, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
                          + data)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data) of one simple reply; data only for a successful READ."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, cookie, data

    def read(self, offset: int, length: int, cookie: int = 1) -> tuple[int, bytes]:
        self.send_request(CMD_READ, offset, length, cookie=cookie)
        error, got_cookie, data = self.reply(length)
        assert got_cookie == cookie
        return error, data

    def write(self, offset: int, data: bytes, cookie: int = 1) -> int:
        self.send_request(CMD_WRITE, offset, len(data), cookie=cookie, data=data)
        error, got_cookie, _ = self.reply()
        assert got_cookie == cookie
        return error


# --- processes that are not our children -----------------------------------------------------

def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Wait until ``pid`` is no longer running; False on timeout."""
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def terminate_pid(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM ``pid`` (not our child) and wait until it is gone; False on timeout."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return wait_gone(pid, timeout)


def wait_path(path: Path, timeout: float = START_TIMEOUT) -> None:
    """Wait for ``path`` (a socket, say) to exist."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def wait_file(path: Path, timeout: float = START_TIMEOUT) -> str:
    """Wait for the text file ``path`` to exist and end with a newline; its text."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if text.endswith("\n"):
                return text
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
