"""nbdkit_parse_int and nbdkit_read_password (nbdkit-plugin(3)), with nbdkit 1.32's
messages: shared by filters (luks' passphrase=, stats) and the ``nbdkit`` table of Lua
scripts.  Each raises StartupError with nbdkit's message."""

from __future__ import annotations

import os
import re
import stat
import sys
import termios

from luanbd.backend.interface import StartupError

_INT = re.compile(r"\s*([-+]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*))")


def parse_int(what: str, value: str) -> int:
    """nbdkit_parse_int (strtol, base 0) and its messages."""
    m = _INT.match(value)
    if m is None:
        raise StartupError(f"{what}: empty string where we expected a number")
    if m.end() != len(value):
        raise StartupError(f'{what}: could not parse number: "{value}": trailing garbage')
    n = int(m.group(1), 16 if "x" in m.group(1).lower() else 8 if
            m.group(1).lstrip("+-").startswith("0") else 10)
    if not -(1 << 31) <= n < 1 << 31:
        raise StartupError(f'{what}: could not parse number: "{value}": '
                           "Numerical result out of range")
    return n


def _first_line(what: str, fd: int) -> bytes:
    """getline(3) on ``fd``, then closed: the first line without its newline, up to a NUL
    (a C string); nothing at all is the empty passphrase."""
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            line = f.readline()
    except OSError as err:
        raise StartupError(f"could not read password from {what}: {err.strerror}") from None
    if line.endswith(b"\n"):
        line = line[:-1]
    return line.split(b"\0", 1)[0]


def _interactive() -> bytes:
    """``passphrase=-``: "password: " on stdout, a line from the terminal without echo."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        mode = 0
    if stat.S_ISSOCK(mode):  # -s: stdin is the client's connection
        raise StartupError("stdin is not available for reading password")
    if not os.isatty(0):
        raise StartupError("stdin is not a tty, cannot read password interactively")
    sys.stdout.write("password: ")
    sys.stdout.flush()
    saved = termios.tcgetattr(0)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(0, termios.TCSAFLUSH, quiet)
    try:
        line = os.read(0, 4096)
        while line and not line.endswith(b"\n"):
            more = os.read(0, 4096)
            if not more:
                break
            line += more
    except OSError as err:
        raise StartupError(f"could not read password from stdin: {err.strerror}") from None
    finally:
        termios.tcsetattr(0, termios.TCSAFLUSH, saved)
        sys.stdout.write("\n")
        sys.stdout.flush()
    line = line.split(b"\n", 1)[0]
    return line.split(b"\0", 1)[0]


def read_password(value: str) -> bytes:
    """nbdkit_read_password: ``-``, ``-FD``, ``+FILE`` or the passphrase itself."""
    if value == "-":
        return _interactive()
    if value.startswith("-"):
        fd = parse_int("password file descriptor", value[1:])
        if fd in (0, 1, 2):
            raise StartupError("cannot use password -FD for stdin/stdout/stderr")
        try:
            os.fstat(fd)
        except OSError as err:
            raise StartupError(f"fdopen {value[1:]}: {err.strerror}") from None
        return _first_line(value[1:], fd)
    if value.startswith("+"):
        try:
            fd = os.open(value[1:], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise StartupError(f"open {value[1:]}: {err.strerror}") from None
        return _first_line(value[1:], fd)
    return os.fsencode(value)


