"""Helpers of the API 2 / ``nbdkit`` table / examples tests: real servers, real clients.
(A module of its own, not conftest.py, so that ``import`` finds it whatever other
conftest.py files pytest has loaded.)

Every server is started per test, either as a single-connection server under libnbd's
``connect_command`` (``luanbd -s --exit-with-parent ...``) or in captive mode
(``luanbd -U - ... --run '...'``).  Each server's stderr goes to a file of the test's
``tmp_path``; at teardown no server may have printed a Python ``Traceback``.

``nbdkit python`` runs the twin plugins (``plugins/*.py``) so that tests can compare what
libnbd sees from luanbd with what it sees from nbdkit's own Python plugin.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

HERE = Path(__file__).resolve().parent
PLUGINS = HERE / "plugins"
EXAMPLES = HERE.parent.parent / "examples"
VENV_BIN = Path(sys.executable).parent

# nbdinfo/nbdsh/nbdkit from Debian first (nbdsh needs the Python that has `nbd`), then luanbd.
os.environ["PATH"] = os.pathsep.join(["/usr/bin", str(VENV_BIN), os.environ.get("PATH", "")])

LUANBD = shutil.which("luanbd") or str(VENV_BIN / "luanbd")
NBDKIT = shutil.which("nbdkit")

#: Seconds any subprocess (a captive server and its client) may take.
RUN_TIMEOUT = 30
#: Default per-test timeout (pytest-timeout) for tests of this folder.
TEST_TIMEOUT = 60


def nbdkit_python_available() -> bool:
    if NBDKIT is None:
        return False
    try:
        r = subprocess.run([NBDKIT, "python", "--version"], capture_output=True, timeout=10,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


HAVE_NBDKIT_PYTHON = nbdkit_python_available()
needs_nbdkit_python = pytest.mark.skipif(not HAVE_NBDKIT_PYTHON,
                                         reason="nbdkit and nbdkit-plugin-python are needed")



def _accepting(sock: Path) -> bool:
    """The socket file exists once bound, before listen(): wait for the LISTEN state
    (/proc/net/unix flag __SO_ACCEPTCON), or a client may get ECONNREFUSED."""
    if not sock.exists():
        return False
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f]
    return any(len(r) >= 8 and r[7] == str(sock) and int(r[3], 16) & 0x10000 for r in rows[1:])

@dataclass
class Outcome:
    """What a client call gave: a value, or the errno of an nbd.Error."""

    value: Any = None
    errno: int | None = None

    @property
    def ok(self) -> bool:
        return self.errno is None


def outcome(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(value=fn())
    except nbd.Error as err:
        return Outcome(errno=err.errnum if err.errnum is not None else -1)


class Servers:
    """Starts servers for one test and checks their stderr at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.handles: list[Any] = []
        self.stderr_files: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def _next(self, what: str) -> Path:
        self._n += 1
        path = self.tmp / f"{what}-{self._n}.stderr"
        path.touch()
        self.stderr_files.append(path)
        return path

    def log_path(self, server: str = "luanbd") -> Path:
        """A fresh file for a plugin's ``log=`` key."""
        self._n += 1
        return self.tmp / f"{server}-{self._n}.calls"

    @staticmethod
    def argv(script: str | Path, params: tuple[str, ...], server: str,
             options: tuple[str, ...]) -> list[str]:
        if server == "luanbd":
            return [LUANBD, *options, str(script), *params]
        assert server == "nbdkit" and NBDKIT is not None
        return [NBDKIT, *options, "python", str(script), *params]

    def connect(self, script: str | Path, *params: str, server: str = "luanbd",
                readonly: bool = False, export: str | None = None, full_info: bool = False,
                opt_mode: bool = False, options: tuple[str, ...] = (),
                structured: bool = True, meta: bool = True) -> Any:
        """A libnbd handle connected to a new ``-s`` server (``connect_command``)."""
        stderr = self._next(server)
        opts = ("-s", "--exit-with-parent", *(("-r",) if readonly else ()), *options)
        argv = self.argv(script, params, server, opts)
        h = nbd.NBD()
        self.handles.append(h)
        if export is not None:
            h.set_export_name(export)
        if full_info:
            h.set_full_info(True)
        if opt_mode:
            h.set_opt_mode(True)
        if not structured:
            h.set_request_structured_replies(False)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_command(["sh", "-c", 'exec "$@" 2>>"$0"', str(stderr), *argv])
        return h

    def captive(self, script: str | Path, *params: str, run: str, server: str = "luanbd",
                options: tuple[str, ...] = (), check: bool = True,
                timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``SERVER -U - [options] SCRIPT params --run RUN``; stderr is kept for teardown."""
        argv = self.argv(script, params, server, ("-U", "-", *options, "--run", run))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        self._next(server).write_text(r.stderr)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} exited {r.returncode}\nstdout: {r.stdout}\n"
                                 f"stderr: {r.stderr}")
        return r

    def run(self, argv: list[str], *, timeout: float = RUN_TIMEOUT,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Any command (``luanbd --dump-plugin`` ...); its stderr is checked at teardown."""
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                           **kwargs)
        self._next("cmd").write_text(r.stderr)
        return r

    def listen(self, script: str | Path, *params: str, server: str = "luanbd",
               options: tuple[str, ...] = ()) -> Path:
        """Start ``SERVER -f -U SOCK ...`` in the background; its socket path.  Stopped at
        teardown (SIGTERM, then SIGKILL after 5 s)."""
        self._n += 1
        sock = self.tmp / f"s{self._n}.sock"
        stderr = self._next(server)
        argv = self.argv(script, params, server, ("-f", "-U", str(sock), *options))
        with stderr.open("w") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while not _accepting(sock):
            if proc.poll() is not None:
                raise AssertionError(f"{argv} exited {proc.returncode}: {stderr.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv} did not listen in time")
            time.sleep(0.02)
        return sock

    def close_all(self) -> None:
        for h in self.handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        # Dropping the last reference closes the handle, which waits for its -s server.
        self.handles.clear()
        gc.collect()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def stderr(self, server: str | None = None) -> str:
        """What the servers of this test printed on stderr so far (only luanbd's, or only
        nbdkit's, when ``server`` is given)."""
        return "".join(p.read_text(errors="replace") for p in self.stderr_files
                       if server is None or p.name.startswith(server + "-"))


def read_log(path: Path) -> list[str]:
    """The call lines a test plugin wrote into ``log=PATH`` (empty if it wrote none)."""
    return path.read_text().splitlines() if path.exists() else []


DATA_CALLS = ("pread", "pwrite", "flush", "trim", "zero", "cache", "extents")


def data_calls(path: Path) -> list[str]:
    """Only the data callbacks of a call log (those whose order both servers agree on)."""
    return [line for line in read_log(path) if line.split(" ", 1)[0] in DATA_CALLS]
