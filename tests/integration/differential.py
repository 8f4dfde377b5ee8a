"""Run one Lua plugin script under a server and record what libnbd sees.

The differential tests start the same script, with the same arguments, under
``nbdkit lua`` (the oracle) and under ``luanbd``, drive both with the same
client code and compare the two :class:`Observation` objects.

Everything a server prints on stderr is kept, with its program prefix
stripped (``nbdkit: lua[1]: error: `` and ``luanbd: error: `` both become
nothing), so log messages can be compared too.  The name of the program inside
a message (``... nbdkit requires these callbacks``) is replaced by ``SERVER``.

Each server runs in its own temporary directory, which is also its working
directory and ``$TMPDIR``; the script is copied there and passed by its bare
file name, so Lua error positions read ``ramdisk.lua:42:`` under both servers.
Every wait has a timeout, a watchdog kills a server that hangs a client, and
servers are always stopped in ``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import pprint
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import nbd

PLUGINS = Path(__file__).resolve().parent / "plugins"

#: Seconds a whole observation (start-up, client code, stop) may take.
DEFAULT_TIMEOUT = 30.0
#: Seconds to wait for a server to listen (or to exit with a start-up error).
START_TIMEOUT = 15.0
#: Seconds to wait for a server to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0
#: Seconds any client subprocess (nbdinfo, ...) may run.
CLIENT_TIMEOUT = 20.0

CAPABILITIES = (
    "is_read_only",
    "can_flush",
    "can_fua",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "can_multi_conn",
    "can_cache",
    "can_df",
    "is_rotational",
)


@dataclass(frozen=True)
class Server:
    """How to run one server: ``argv`` is everything before the options."""

    name: str
    argv: tuple[str, ...]


NBDKIT = Server("nbdkit", ("nbdkit",))
LUANBD = Server("luanbd", (sys.executable, "-m", "luanbd"))
SERVERS = {s.name: s for s in (NBDKIT, LUANBD)}


def nbdkit_available() -> str | None:
    """None if ``nbdkit lua`` works here, else the reason why not."""
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed"
    try:
        r = subprocess.run(
            ["nbdkit", "lua", "--dump-plugin"],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nbdkit lua --dump-plugin failed: {e}"
    if r.returncode != 0 or "lua_version=" not in r.stdout:
        return "the nbdkit Lua plugin is not installed"
    return None


# ---------------------------------------------------------------------------
# What a client observed


@dataclass
class Observation:
    """What a client saw of one server run.  Equality ignores ``server``,
    ``stop_code`` and the raw ``stderr``."""

    server: str = field(compare=False)
    #: Exit status if the server exited by itself (start-up failure, --run).
    exit_code: int | None = None
    #: The server's own messages (prefix stripped) when it failed to start.
    startup_error: str | None = None
    #: errno name when libnbd failed to connect (e.g. ENOENT for ERR_UNKNOWN).
    connect_error: str | None = None
    size: int | None = None
    caps: dict[str, bool] = field(default_factory=dict)
    protocol: str | None = None
    #: (label, outcome) for each operation: "ok", an errno name such as
    #: "EIO", or a description of the data read.
    ops: list[tuple[str, str]] = field(default_factory=list)
    #: Anything else a scenario records (nbdinfo output, ...).
    extra: dict[str, Any] = field(default_factory=dict)
    #: Every stderr line, prefix stripped, in order.
    log: list[str] = field(default_factory=list)
    #: True if the watchdog had to kill the server.
    timed_out: bool = False
    #: Exit status after our SIGTERM (not compared; see the lifecycle test).
    stop_code: int | None = field(default=None, compare=False)
    stderr: str = field(default="", compare=False, repr=False)

    def comparable(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    def outcome(self, label: str) -> str:
        """The outcome of the (first) operation called ``label``."""
        for k, v in self.ops:
            if k == label:
                return v
        raise KeyError(f"no operation {label!r} in {self.ops}")

    def errors(self) -> list[str]:
        """Log lines that came from the server itself (not Lua io.stderr)."""
        return [line for line in self.log if not line.startswith(TRACE_PREFIXES)]


#: Lines the test scripts write themselves with io.stderr:write.
TRACE_PREFIXES = ("trace: ", "minimal: ", "flush_only: ")

_PREFIX = re.compile(r"^(?:nbdkit|luanbd)(?:: [\w.-]+\[\d+\])?: (?:error: )?")
_PROGNAME = re.compile(r"\b(?:nbdkit|luanbd)\b")


def strip_prefix(line: str) -> tuple[str, bool]:
    """Strip ``nbdkit: lua[1]: error: `` etc.; say whether there was one."""
    m = _PREFIX.match(line)
    if m is None:
        return line, False
    return _PROGNAME.sub("SERVER", line[m.end() :]), True


def errno_name(e: BaseException) -> str:
    code = getattr(e, "errno", None)
    if code is None:
        return f"error({getattr(e, 'string', e)})"
    if code == errno.ENOTSUP:  # same number as EOPNOTSUPP on Linux
        return "ENOTSUP"
    return errno.errorcode.get(code, str(code))


def describe(data: bytes) -> str:
    """A short, comparable description of a buffer."""
    if not data.strip(b"\0"):
        return f"zeroes n={len(data)}"
    return f"data n={len(data)} sha={hashlib.sha256(data).hexdigest()[:16]}"


def pattern(seed: int, n: int) -> bytes:
    """Deterministic non-zero test data."""
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (n // len(block) + 1))[:n]


# ---------------------------------------------------------------------------
# Running a server


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["LC_ALL"] = "C"
    # nbdsh in --run commands needs the Debian python3 (which has nbd).
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    return env


def _listening(path: str) -> bool:
    """Is some process listening on the Unix socket ``path``?  Reads
    /proc/net/unix so that no connection is made (a probe connection would
    show up in the server's log)."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
    except OSError:
        return os.path.exists(path)
    return False


def _parse_stderr(text: str, obs: Observation) -> list[str]:
    """Fill obs.log; return the lines that carried a server prefix."""
    own = []
    for raw in text.splitlines():
        line, prefixed = strip_prefix(raw)
        obs.log.append(line)
        if prefixed:
            own.append(line)
    return own


def _prepare(tmp: Path, script: str | None, files: Sequence[str]) -> None:
    """Copy the script and ``files`` (names in plugins/, or absolute paths: copied under
    their own name) into the server's directory."""
    for name in [script, *files]:
        if name and os.path.isabs(name):
            shutil.copy(name, tmp / os.path.basename(name))
        elif name and (PLUGINS / name).exists():
            shutil.copy(PLUGINS / name, tmp / name)


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
    # Children (a --run command) of a server we started, if any are left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


class Watchdog:
    """Kill a process if the test takes longer than ``seconds``; a blocked
    libnbd call then fails instead of hanging the test run."""

    def __init__(self, kill: Callable[[], None], seconds: float) -> None:
        self.fired = False
        self._kill = kill
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(Exception):
            self._kill()

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class ConnectFailed(Exception):
    """Raised by Session.connect after recording ``connect_error``; ends the
    client code quietly (``observe`` catches it)."""


class Session:
    """What a scenario's client code gets: the server's socket, and helpers
    that connect, probe and record into the observation."""

    def __init__(
        self,
        obs: Observation,
        tmp: Path,
        sock: str,
        stderr_path: Path,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.obs = obs
        self.proc = proc
        self.tmp = tmp
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self._stderr_path = stderr_path
        self._handles: list[nbd.NBD] = []

    # -- connections -----------------------------------------------------

    def connect(self, *, strict: int | None = None, meta: bool = True) -> nbd.NBD:
        """Connect with libnbd.  On failure record ``connect_error`` (the
        errno name) and raise ConnectFailed, which ends the client code.
        ``strict`` sets libnbd's strict mode (0 lets the client send
        requests that the server must reject)."""
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_unix(self.sock)
        except nbd.Error as e:
            self.obs.connect_error = errno_name(e)
            self.obs.extra.setdefault("connect_message", _connect_message(e))
            raise ConnectFailed(self.obs.connect_error) from e
        if strict is not None:
            h.set_strict_mode(strict)
        self._handles.append(h)
        return h

    def probe(self, h: nbd.NBD) -> None:
        """Record size, capabilities and protocol."""
        self.obs.size = h.get_size()
        self.obs.caps = {c: bool(getattr(h, c)()) for c in CAPABILITIES}
        self.obs.caps["base_allocation"] = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        self.obs.protocol = h.get_protocol()
        self.obs.extra["structured_replies"] = bool(h.get_structured_replies_negotiated())

    def connect_and_probe(self, **kw: Any) -> nbd.NBD:
        h = self.connect(**kw)
        self.probe(h)
        return h

    def disconnect(self, h: nbd.NBD) -> None:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        if h in self._handles:
            self._handles.remove(h)
        del h

    def close_all(self) -> None:
        for h in list(self._handles):
            self.disconnect(h)

    # -- operations ------------------------------------------------------

    def op(self, label: str, fn: Callable[..., Any], *args: Any) -> str:
        """Run one libnbd call and record its outcome under ``label``."""
        try:
            r = fn(*args)
        except nbd.Error as e:
            outcome = errno_name(e)
        else:
            if isinstance(r, (bytes, bytearray)):
                outcome = describe(bytes(r))
            elif r is None or r == 0:
                outcome = "ok"
            else:
                outcome = repr(r)
        self.obs.ops.append((label, outcome))
        return outcome

    def read(self, h: nbd.NBD, count: int, offset: int, flags: int = 0) -> str:
        return self.op(f"read {count}@{offset}", h.pread, count, offset, flags)

    def write(self, h: nbd.NBD, seed: int, count: int, offset: int, flags: int = 0) -> str:
        buf = pattern(seed, count)
        return self.op(f"write#{seed} {count}@{offset}", h.pwrite, buf, offset, flags)

    def block_status(self, h: nbd.NBD, count: int, offset: int, flags: int = 0) -> str:
        """Record the extents the server returns for base:allocation."""
        got: list[tuple[int, int]] = []

        def cb(metacontext: str, off: int, entries: list[int], err: int) -> int:
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        out = self.op(
            f"block_status {count}@{offset} flags={flags}", h.block_status, count, offset, cb, flags
        )
        if out == "ok":
            self.obs.ops[-1] = (self.obs.ops[-1][0], f"extents {got}")
        return self.obs.ops[-1][1]

    def record(self, key: str, value: Any) -> None:
        self.obs.extra[key] = value

    # -- other clients ---------------------------------------------------

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run a client program (nbdinfo, ...) with a timeout."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            env=_env(self.tmp),
            cwd=self.tmp,
            check=False,
        )

    def nbdinfo(self, *args: str) -> tuple[int, str]:
        """Run ``nbdinfo ARGS URI``; the socket path in the output becomes
        ``<SOCK>``.  Returns (exit status, stdout)."""
        r = self.run(["nbdinfo", *args, self.uri])
        return r.returncode, r.stdout.replace(self.sock, "<SOCK>")

    def nbdinfo_json(self, *args: str) -> Any:
        rc, out = self.nbdinfo("--json", *args)
        return json.loads(out) if rc == 0 else {"exit": rc}

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send a signal to the server."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait for the server to exit; its exit status, or None."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # -- the log ---------------------------------------------------------

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until every traced open has its traced close.  A server may
        call the plugin's close after it has closed the socket, so the
        client cannot tell when that has happened; ramdisk.lua's
        ``trace=1`` lines make it visible.  Scripts without tracing return
        at once."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self._stderr_path.read_text(errors="replace").splitlines()
            opens = sum(1 for x in lines if x.startswith("trace: open "))
            closes = sum(1 for x in lines if x == "trace: close")
            if closes >= opens or time.monotonic() > deadline:
                return closes >= opens
            time.sleep(0.01)

    def wait_log(self, text: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``text`` appears ``count`` times on the server's
        stderr (for messages logged after the client has gone, such as
        errors in close)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._stderr_path.read_text(errors="replace").count(text) >= count:
                return True
            time.sleep(0.02)
        return False


def server_argv(
    server: Server, sock: str, script: str | None, args: Sequence[str], options: Sequence[str]
) -> list[str]:
    argv = [*server.argv, "-f", *options, "-U", sock, "lua"]
    if script is not None:
        argv.append(script)
    return argv + list(args)


def observe(
    server: Server,
    script: str | None,
    args: Sequence[str] = (),
    *,
    options: Sequence[str] = (),
    client: Callable[[Session], None] | None = None,
    files: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> Observation:
    """Start ``server -f [options] -U SOCK lua SCRIPT ARGS`` in a fresh
    temporary directory, wait until it listens, run ``client`` (by default:
    connect and probe) and stop it.  If the server exits before listening,
    the observation holds its exit code and stripped messages instead."""
    obs = Observation(server=server.name)
    with tempfile.TemporaryDirectory(prefix="luanbd-diff-") as d:
        tmp = Path(d)
        _prepare(tmp, script, files)
        sock = str(tmp / "nbd.sock")
        stderr_path = tmp / "stderr.txt"
        argv = server_argv(server, sock, script, args, options)
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=tmp,
                env=_env(tmp),
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and not _listening(sock):
                if time.monotonic() > deadline:
                    obs.timed_out = True
                    break
                time.sleep(0.01)
            if proc.poll() is not None:
                # Exited before serving: a start-up error.
                obs.exit_code = proc.returncode
            elif not obs.timed_out:
                session = Session(obs, tmp, sock, stderr_path, proc)
                with Watchdog(proc.kill, timeout) as dog:
                    try:
                        (client or _default_client)(session)
                    except ConnectFailed:
                        pass
                    finally:
                        session.close_all()
                        session.settle()
                obs.timed_out = dog.fired
        finally:
            obs.stop_code = _stop(proc)
            obs.stderr = stderr_path.read_text(errors="replace")
        own = _parse_stderr(obs.stderr, obs)
        if obs.exit_code is not None:
            obs.startup_error = "\n".join(own)
    return obs


def _default_client(s: Session) -> None:
    s.connect_and_probe()


def _connect_message(e: nbd.Error) -> str:
    # "nbd_connect_unix: handshake: server has no export named ''" etc.; the
    # function name prefix depends on how we connected, so drop it.
    return re.sub(r"^nbd_\w+: ", "", str(getattr(e, "string", e)))


# ---------------------------------------------------------------------------
# Captive (--run) and single-connection (-s) modes


def observe_captive(
    server: Server,
    script: str,
    args: Sequence[str],
    run: str,
    *,
    options: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> Observation:
    """Run ``server -U - [options] --run RUN lua SCRIPT ARGS`` to completion.
    Records the exit code, the command's stdout (``extra['stdout']``; the
    value of ``$unixsocket`` in it is replaced by ``<SOCK>`` when the command
    prints it on the first line as ``sock=...``), whether the private socket
    was removed afterwards, and the log."""
    obs = Observation(server=server.name)
    with tempfile.TemporaryDirectory(prefix="luanbd-diff-") as d:
        tmp = Path(d)
        _prepare(tmp, script, ())
        argv = [*server.argv, "-U", "-", *options, "--run", run, "lua", script, *args]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp,
            env=_env(tmp),
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            obs.timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=STOP_TIMEOUT)
        finally:
            _stop(proc)
        obs.exit_code = proc.returncode
        text = out.decode(errors="replace")
        first = text.split("\n", 1)[0]
        if first.startswith("sock="):
            sockpath = first[len("sock=") :]
            if sockpath:
                obs.extra["socket_removed"] = not os.path.exists(sockpath)
                text = text.replace(sockpath, "<SOCK>")
        obs.extra["stdout"] = text
        obs.stderr = err.decode(errors="replace")
        _parse_stderr(obs.stderr, obs)
    return obs


def observe_single(
    server: Server,
    script: str,
    args: Sequence[str],
    client: Callable[[Session, nbd.NBD], None],
    *,
    options: Sequence[str] = ("-s", "--exit-with-parent"),
    timeout: float = DEFAULT_TIMEOUT,
) -> Observation:
    """Let libnbd start the server itself (``connect_command``) in
    single-connection mode, then run ``client`` on that handle.  The server's
    stderr goes to a file through ``sh -c 'exec ... 2>FILE'``."""
    obs = Observation(server=server.name)
    with tempfile.TemporaryDirectory(prefix="luanbd-diff-") as d:
        tmp = Path(d)
        _prepare(tmp, script, ())
        stderr_path = tmp / "stderr.txt"
        stderr_path.touch()
        pidfile = tmp / "shell.pid"
        argv = [*server.argv, *options, "lua", script, *args]
        quoted = " ".join(_shquote(a) for a in argv)
        command = f"cd {_shquote(str(tmp))} && echo $$ > shell.pid && exec {quoted} 2>stderr.txt"
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        session = Session(obs, tmp, "", stderr_path)

        def kill() -> None:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)

        with Watchdog(kill, timeout) as dog:
            try:
                h.connect_command(["sh", "-c", command])
            except nbd.Error as e:
                obs.connect_error = errno_name(e)
            else:
                session.probe(h)
                client(session, h)
            finally:
                with contextlib.suppress(nbd.Error):
                    h.shutdown()
                pid = None
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pidfile.read_text())
                # In -s mode the server must exit once its connection ends.
                obs.extra["server_exited"] = _wait_gone(pid, STOP_TIMEOUT)
                if not obs.extra["server_exited"]:
                    kill()
                del h  # closes the handle; libnbd reaps the child
        obs.timed_out = dog.fired
        obs.stderr = stderr_path.read_text(errors="replace")
        _parse_stderr(obs.stderr, obs)
    return obs


def _wait_gone(pid: int | None, timeout: float) -> bool:
    if pid is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie still answers kill(0); check its state.
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        time.sleep(0.02)
    return False


def _shquote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def run_plain(
    server: Server, argv_tail: Sequence[str], script: str | None = None, timeout: float = 20.0
) -> Observation:
    """Run ``server ARGV_TAIL`` to completion (e.g. ``--dump-plugin``) in a
    temporary directory holding ``script``; record exit code, stdout lines
    in ``extra['stdout']`` and the stripped stderr."""
    obs = Observation(server=server.name)
    with tempfile.TemporaryDirectory(prefix="luanbd-diff-") as d:
        tmp = Path(d)
        _prepare(tmp, script, ())
        try:
            r = subprocess.run(
                [*server.argv, *argv_tail],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=tmp,
                env=_env(tmp),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            obs.timed_out = True
            return obs
        obs.exit_code = r.returncode
        obs.extra["stdout"] = r.stdout.splitlines()
        obs.stderr = r.stderr
        own = _parse_stderr(r.stderr, obs)
        if r.returncode != 0:
            obs.startup_error = "\n".join(own)
    return obs


def diff_observations(expected: Observation, got: Observation) -> str:
    """A readable account of how two observations differ."""
    a, b = expected.comparable(), got.comparable()
    out = []
    for key in a:
        if a[key] == b[key]:
            continue
        if isinstance(a[key], list) and isinstance(b[key], list):
            lines = difflib.unified_diff(
                [str(x) for x in a[key]],
                [str(x) for x in b[key]],
                f"{expected.server}.{key}",
                f"{got.server}.{key}",
                lineterm="",
            )
            out.append("\n".join(lines))
        else:
            out.append(
                f"{key}:\n  {expected.server}: {pprint.pformat(a[key])}\n"
                f"  {got.server}: {pprint.pformat(b[key])}"
            )
    if got.stderr and got.log != expected.log:
        out.append(f"{got.server} raw stderr:\n{got.stderr[-3000:]}")
    return "\n".join(out)
