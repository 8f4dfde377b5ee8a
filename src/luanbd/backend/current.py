"""What a plugin may ask about the connection it is serving (nbdkit_export_name & co).

Each connection thread registers its :class:`ConnectionInfo`; helpers called from plugin
code read the one of the calling thread.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from luanbd.backend.interface import PluginError


@dataclass(slots=True)
class ConnectionInfo:
    export_name: bytes | None = None
    is_tls: bool = False
    peer_name: str = ""
    #: The client's socket (nbdkit_peer_name, nbdkit_peer_uid...: the ip filter); None
    #: when there is none.
    peer_socket: socket.socket | None = None
    #: Ask the connection to close: False = after in-flight requests, True = at once.
    disconnect: Callable[[bool], None] = field(default=lambda force: None)


_local = threading.local()

_shutdown: Callable[[], None] | None = None
#: nbdkit_stdio_safe's two facts: -s (stdin and stdout are the client's socket), and
#: whether the plugin is configured (from after get_ready on, when stdio may be closed).
_listen_stdin = False
_configured = False
#: Set while the server stops: sleeps in plugins and filters end early (nbdkit_nanosleep).
_stopping = threading.Event()


def set_stopping(stopping: bool) -> None:
    """The server starts (False) or begins to stop (True)."""
    if stopping:
        _stopping.set()
    else:
        _stopping.clear()


#: nbdkit_nanosleep's messages.
SLEEP_ABORTED = "aborting sleep because of server shut down"
SLEEP_TOO_LONG = "sleep request is too long"
_INT_MAX = (1 << 31) - 1


def nanosleep(seconds: float, call: str) -> None:
    """nbdkit_nanosleep: sleep ``seconds``; a server that begins to stop meanwhile ends the
    sleep, and ``call`` fails with ESHUTDOWN and nbdkit's line."""
    if _stopping.wait(seconds):
        raise PluginError(call, SLEEP_ABORTED, errno.ESHUTDOWN, bare=True)


def sleep_for(sec: int, nsec: int) -> tuple[str, int] | None:
    """nbdkit_nanosleep(sec, nsec) for scripts: None after the whole sleep, else nbdkit's
    message and errno (EINVAL for sec >= INT_MAX, ESHUTDOWN when the server stops)."""
    if sec >= _INT_MAX - nsec // 1000000000:
        return SLEEP_TOO_LONG, errno.EINVAL
    if _stopping.wait(sec + nsec / 1e9):
        return SLEEP_ABORTED, errno.ESHUTDOWN
    return None


def set_stdio(*, listen_stdin: bool | None = None, configured: bool | None = None) -> None:
    """The server tells what nbdkit_stdio_safe depends on: -s, and the plugin configured."""
    global _listen_stdin, _configured
    if listen_stdin is not None:
        _listen_stdin = listen_stdin
    if configured is not None:
        _configured = configured


def stdio_safe() -> bool:
    """nbdkit_stdio_safe: may the plugin read stdin / write stdout (password=-, script=-)?"""
    return not _listen_stdin and not _configured


def set_shutdown_handler(handler: Callable[[], None] | None) -> None:
    """The running server registers how it is asked to stop (None: it stopped)."""
    global _shutdown
    _shutdown = handler


def request_shutdown() -> None:
    """nbdkit_shutdown: ask the whole server to shut down (nothing when none runs)."""
    handler = _shutdown
    if handler is not None:
        handler()


def set_connection(info: ConnectionInfo | None) -> None:
    _local.info = info


def connection() -> ConnectionInfo | None:
    info: ConnectionInfo | None = getattr(_local, "info", None)
    return info
