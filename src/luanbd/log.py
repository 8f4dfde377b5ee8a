"""Log lines in nbdkit's shape: ``luanbd: error: pread: plugin.lua:12: message``.

Errors always go out; debug lines only with ``-v``.  Once the server has forked into the
background the lines go to syslog instead of stderr, as nbdkit's do.
"""

from __future__ import annotations

import enum
import sys
import threading
import time
from typing import TextIO

PROGRAM = "luanbd"


class LogTo(enum.Enum):
    STDERR = "stderr"
    SYSLOG = "syslog"
    NULL = "null"
    #: --log=/path (nbdkit 1.44): error lines appended to a file; debug lines stay on stderr.
    FILE = "file"


_lock = threading.Lock()
verbose = False
_destination = LogTo.STDERR
_file: TextIO | None = None


def set_destination(destination: LogTo, path: str | None = None) -> None:
    """Where lines go from now on.  LogTo.FILE opens ``path`` for appending, as nbdkit's
    fopen(path, "a") before the plugin loads; OSError if it cannot be opened."""
    global _destination, _file
    if destination is LogTo.SYSLOG:
        import syslog

        syslog.openlog(PROGRAM, syslog.LOG_PID, syslog.LOG_DAEMON)
    if destination is LogTo.FILE:
        assert path is not None
        # Line-buffered: each line is written whole (under _lock) as it comes.
        _file = open(path, "a", buffering=1, encoding="utf-8",  # noqa: SIM115
                     errors="backslashreplace")
    _destination = destination


_C_ESCAPES = {ord("\\"): "\\\\", 7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r",
              9: "\\t", 11: "\\v"}


def c_string_quote(message: str) -> str:
    """nbdkit 1.36's escaping of debug lines (common/utils/quote.c): C escapes for
    backslash and the control characters, \\xNN for every other byte outside printable
    ASCII (so each byte of a UTF-8 character)."""
    if message.isascii() and message.isprintable() and "\\" not in message:
        return message
    out = []
    for byte in message.encode("utf-8", "surrogateescape"):
        if byte in _C_ESCAPES:
            out.append(_C_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def _emit(level: str, message: str) -> None:
    # One line per message: a multi-line plugin error would otherwise look like several.
    text = c_string_quote(message) if level == "debug" else message.replace("\n", "\\n")
    if _destination is LogTo.NULL:
        return
    if _destination is LogTo.SYSLOG:
        import syslog

        syslog.syslog(syslog.LOG_ERR if level == "error" else syslog.LOG_DEBUG,
                      f"{level}: {text}")
        return
    if _destination is LogTo.FILE and level == "error":
        _write(_file, f"{PROGRAM}: {level}: {text}\n")
        return
    _write_stderr(f"{PROGRAM}: {level}: {text}\n")


def _write_stderr(line: str) -> None:
    _write(sys.stderr, line)


def _write(stream: TextIO | None, line: str) -> None:
    # A log that cannot be written (stderr closed, on a full disk, a vanished pipe) must not
    # stop the server: the line is lost, nothing else.
    with _lock:
        try:
            stream.write(line)  # type: ignore[union-attr]
            stream.flush()  # type: ignore[union-attr]
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
