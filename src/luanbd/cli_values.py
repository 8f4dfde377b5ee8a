"""The values of the ``luanbd`` options (cli.py): each parsed as nbdkit parses it, with
its messages (a UsageError)."""

from __future__ import annotations

import grp
import os
import pwd

from luanbd.backend.helpers import delay_seconds, parse_size
from luanbd.config import DEFAULT_CONNECTION_LIMIT, UsageError
from luanbd.log import LogTo
from luanbd.protocol.handshake import TlsMode

_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def parse_tls(value: str) -> TlsMode:
    """nbdkit's --tls: require/required/force, or any boolean (on/off, yes/no, 1/0...)."""
    v = value.lower()
    if v in ("require", "required", "force"):
        return TlsMode.REQUIRE
    if v in _TRUE:
        return TlsMode.ON
    if v in _FALSE:
        return TlsMode.OFF
    raise UsageError(f"--tls: could not decode the --tls option: {value}")


def parse_debug_flag(flag: str) -> tuple[str, str, int]:
    """``-D NAME.FLAG=N`` -> (NAME, FLAG, N), as nbdkit (N accepts 0x and 0 prefixes)."""
    name_flag, eq, value = flag.partition("=")
    name, dot, flagname = name_flag.partition(".")
    try:
        number = int(value, 0) if eq else None
    except ValueError:
        number = None
    if not (name and dot and flagname) or number is None:
        raise UsageError(f"-D (Debug Flag) must have the format NAME.FLAG=N: {flag}")
    return name, flagname, number


def user_id(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        if name.isdigit():
            return int(name)
    raise UsageError(f"-u option: user {name} not found")


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
    raise UsageError(f"-g option: group {name} not found")


def socket_activation_fds() -> int:
    """systemd socket activation: the number of listening fds (from 3 on) passed to us,
    0 if LISTEN_PID is not our pid.  The variables are removed from our environment, so
    that the script's children do not see them."""
    pid, fds = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if not pid or not fds:
        return 0
    if not pid.isdigit() or int(pid) != os.getpid():
        return 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not fds.isdigit() or int(fds) < 1:
        raise UsageError(f"socket activation: LISTEN_FDS={fds}: not a positive number")
    return int(fds)


def delay_option(option: str, value: str | None, default: float | None) -> float | None:
    """A delay option in nbdkit_parse_delay's format; 0 means no limit."""
    if value is None:
        return default
    try:
        seconds = delay_seconds(option, value)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return seconds or None


def size_option(option: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None


def connection_limit(limit: str | None, filters: list[str],
                      params: list[tuple[str | None, str]]) -> int:
    """``--limit=N``, or nbdkit's ``--filter=limit [limit=N]`` (default 1, as
    nbdkit-limit-filter(1)); the filter's ``limit=`` is its own, not the script's."""
    value = limit
    if "limit" in filters:
        own = [p for p in params if p[0] == "limit"]
        for item in own:
            params.remove(item)
        if value is None:
            value = own[-1][1] if own else "1"
    if value is None:
        return DEFAULT_CONNECTION_LIMIT
    if not value.isdigit():
        raise UsageError(f"--limit: {value}: not a number of connections")
    return int(value)


def parse_log(value: str | None) -> tuple[LogTo | None, str | None]:
    """nbdkit 1.44's --log: stderr, syslog, null, an absolute path (errors are appended to
    that file) or default (as no --log) -> (destination, file)."""
    if value is None or value == "default":
        return None, None
    if value in ("stderr", "syslog", "null"):
        return LogTo(value), None
    if value.startswith("/"):
        return LogTo.FILE, value
    raise UsageError('--log must be "stderr", "syslog", "null", or an absolute path')
