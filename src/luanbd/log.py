"""Log lines in nbdkit's shape: ``luanbd: error: pread: plugin.lua:12: message``.

Errors always go out; debug lines only with ``-v``.  Once the server has forked into the
background the lines go to syslog instead of stderr, as nbdkit's do.
"""

from __future__ import annotations

import enum
import sys
import threading
import time

PROGRAM = "luanbd"


class LogTo(enum.Enum):
    STDERR = "stderr"
    SYSLOG = "syslog"
    NULL = "null"


_lock = threading.Lock()
verbose = False
_destination = LogTo.STDERR


def set_destination(destination: LogTo) -> None:
    global _destination
    if destination is LogTo.SYSLOG:
        import syslog

        syslog.openlog(PROGRAM, syslog.LOG_PID, syslog.LOG_DAEMON)
    _destination = destination


def _emit(level: str, message: str) -> None:
    # One line per message: a multi-line plugin error would otherwise look like several.
    text = message.replace("\n", "\\n")
    if _destination is LogTo.NULL:
        return
    if _destination is LogTo.SYSLOG:
        import syslog

        syslog.syslog(syslog.LOG_ERR if level == "error" else syslog.LOG_DEBUG,
                      f"{level}: {text}")
        return
    _write_stderr(f"{PROGRAM}: {level}: {text}\n")


def _write_stderr(line: str) -> None:
    # A log that cannot be written (stderr closed, on a full disk, a vanished pipe) must not
    # stop the server: the line is lost, nothing else.
    with _lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass


class Throttle:
    """For events that can come in floods (refused connections, no file descriptors left):
    :meth:`ready` is true at most once every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -interval

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._last + self.interval:
            return False
        self._last = now
        return True


def usage_error(message: str) -> None:
    """A command-line mistake, in nbdkit's shape: ``luanbd: message`` (no ``error:``)."""
    _write_stderr(f"{PROGRAM}: {message}\n")


def error(message: str) -> None:
    _emit("error", message)


def debug(message: str) -> None:
    if verbose:
        _emit("debug", message)
