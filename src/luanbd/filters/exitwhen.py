"""nbdkit-exitwhen-filter(1): the server exits once an event happens (a file is created
or deleted, a pipe or fd closes, a process exits, a script exits 88).  Checked before
serving (already happened: exit 0 at once), by a thread every ``exit-when-poll`` seconds
while no client is connected, when a client connects (then refused) and when one leaves
(the last one out shuts the server down)."""

from __future__ import annotations

import errno
import os
import re
import select
import subprocess
import threading
import time
from collections.abc import Callable

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError, StartupError

_NUMBER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)(.*)\Z", re.S)


def parse_int(what: str, value: str, *, bits: int, signed: bool) -> int:
    """nbdkit_parse_int / _unsigned / _uint64_t (strtol, base 0) in nbdkit's words."""
    if not signed and value.lstrip().startswith("-"):
        raise StartupError(f"{what}: negative numbers are not allowed")
    m = _NUMBER.match(value)
    if not m:
        raise StartupError(f"{what}: empty string where we expected a number")
    if m.group(3):
        raise StartupError(f'{what}: could not parse number: "{value}": trailing garbage')
    n = int(m.group(2), 0)
    if m.group(1) == "-":
        n = -n
    top = 1 << (bits - 1 if signed else bits)
    if n >= top or (signed and n < -top):
        raise StartupError(f'{what}: could not parse number: "{value}": '
                           f"Numerical result out of range")
    return n


class _Event:
    """One condition; ``happened()`` may log (as nbdkit's checks do) and goes on."""

    def happened(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _File(_Event):
    def __init__(self, path: str, created: bool) -> None:
        self.path = os.path.abspath(path)
        self.created = created

    def happened(self) -> bool:
        try:
            readable = os.access(self.path, os.R_OK)
        except OSError:
            readable = False
        if self.created:
            return readable
        if readable:
            return False
        try:
            os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError as err:
            log.error(f"exit-when-file-deleted: access: {self.path}: {err.strerror}")
            return False
        log.error(f"exit-when-file-deleted: access: {self.path}: Permission denied")
        return False


class _FdClosed(_Event):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def happened(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, 0)
        try:
            ready = poller.poll(0)
        except OSError as err:
            log.error(f"exit-when-pipe-closed: poll: {err.strerror}")
            return False
        for _, revents in ready:
            if revents & select.POLLHUP:
                return True
            if revents & select.POLLNVAL:
                log.error("exit-when-pipe-closed: invalid file descriptor")
                return True
        return False


class _ProcessExits(_Event):
    def __init__(self, pid: int) -> None:
        path = f"/proc/{pid}/stat"
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise StartupError(f"exit-when-process-exits: {path}: {err.strerror}") from None

    def happened(self) -> bool:
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.read(self.fd, 1)
        except OSError as err:
            if err.errno == errno.ESRCH:
                return True
            log.error(f"exit-when-process-exits: read: {err.strerror}")
        return False

    def close(self) -> None:
        os.close(self.fd)


class _Script(_Event):
    def __init__(self, command: str) -> None:
        self.command = command

    def happened(self) -> bool:
        try:
            status = subprocess.run(["/bin/sh", "-c", self.command], check=False).returncode
        except OSError as err:
            log.error(f"exit-when-script: {err.strerror}")
            return False
        if status == 0:
            return False
        if status == 88:
            return True
        if status < 0:
            log.error(f"exit-when-script: command was killed by signal {-status}")
        else:
            log.error(f"exit-when-script: command failed with exit code {status}")
        return False


class Filter(Backend):
    name = "exitwhen"
    config_help = ("exit-when-file-created=<FILE>   Exit when FILE exists.\n"
                   "exit-when-file-deleted=<FILE>   Exit when FILE is gone.\n"
                   "exit-when-pipe-closed=<FD>      Exit when the pipe or socket FD closes.\n"
                   "exit-when-process-exits=<PID>   Exit when process PID exits.\n"
                   "exit-when-script=<SCRIPT>       Exit when SCRIPT exits with status 88.\n"
                   "exit-when-poll=<SECS>           Seconds between checks (default 60).")

    def __init__(self) -> None:
        self.events: list[_Event] = []
        self.pollsecs = 60
        self._lock = threading.Lock()
        self.connections = 0
        self.exiting = False

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key in ("exit-when-file-created", "exit-when-file-deleted"):
            self.events.append(_File(value, key.endswith("created")))
        elif key in ("exit-when-pipe-closed", "exit-when-fd-closed"):
            fd = parse_int("exit-when-pipe-closed", value, bits=32, signed=True)
            self.events.append(_FdClosed(fd))
        elif key in ("exit-when-process-exits", "exit-when-pid-exits"):
            pid = parse_int("exit-when-process-exits", value, bits=64, signed=False)
            self.events.append(_ProcessExits(pid))
        elif key == "exit-when-script":
            self.events.append(_Script(value))
        elif key == "exit-when-poll":
            self.pollsecs = parse_int("exit-when-poll", value, bits=32, signed=False)
        else:
            next(key, value)

    def _check(self) -> bool:
        """Any event happened (once one has, it stays so).  Called with the lock held."""
        if not self.exiting:
            for event in self.events:
                if event.happened():
                    self.exiting = True
        return self.exiting

    def get_ready(self) -> None:
        with self._lock:
            if self._check():
                raise SystemExit(0)  # nbdkit: exit (EXIT_SUCCESS) before serving

    def after_fork(self) -> None:
        threading.Thread(target=self._poll, name="exitwhen", daemon=True).start()

    def _poll(self) -> None:
        while True:
            with self._lock:
                # nbdkit pauses this thread while clients are connected.
                if self.connections == 0 and self._check():
                    log.debug("exitwhen: shutdown from polling thread")
                    current.request_shutdown()
            time.sleep(self.pollsecs)

    def preconnect(self, next: Context, readonly: bool) -> None:
        with self._lock:
            if self._check():
                raise PluginError("preconnect", "exitwhen: nbdkit is exiting: rejecting "
                                                "new connection", bare=True)
        next.preconnect(readonly)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        with self._lock:
            self.connections += 1
        return None

    def close(self, next: Context, h: Handle) -> None:
        with self._lock:
            self._check()
            self.connections -= 1
            if self.connections == 0 and self.exiting:
                log.debug("exitwhen: exiting on last client connection")
                current.request_shutdown()
        next.close()

    def unload(self) -> None:
        for event in self.events:
            event.close()
