"""ServerConfig: everything the command line decides, and the only place defaults live."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from luanbd.log import LogTo
from luanbd.protocol.constants import HandshakeFlag
from luanbd.protocol.handshake import TlsMode

#: nbdkit's (and IANA's) NBD port.
DEFAULT_PORT = 10809
#: nbdkit's default number of worker threads per connection for parallel plugins.
DEFAULT_THREADS = 16


#: nbdkit's --timeout: seconds a client gets from connecting to the end of the handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
#: Concurrent connections served; more are closed at once (one log line).  A connection
#: costs a thread and a few hundred KiB, so this keeps a flood from exhausting the host
#: while staying far above what real NBD use needs.
DEFAULT_CONNECTION_LIMIT = 4096


#: Environment variable that overrides the installed plugins' directory.
PLUGINDIR_ENV = "LUANBD_PLUGINDIR"


def plugin_dir() -> str:
    """Where installed scripts live: ``$LUANBD_PLUGINDIR``, else ``<prefix>/lib/luanbd/plugins``
    (``prefix`` is the installation's: the virtualenv or /usr/local...)."""
    return os.environ.get(PLUGINDIR_ENV) or os.path.join(sys.prefix, "lib", "luanbd", "plugins")


def _switch(variable: str) -> bool:
    """An on/off switch whose source is the environment: ``VARIABLE=0`` turns it off (to
    compare, or to rule it out), anything else or unset leaves it on."""
    return os.environ.get(variable, "1") != "0"


def _fastpath_from_env() -> bool:
    return _switch("LUANBD_FASTPATH")


def _lualib_from_env() -> bool:
    return _switch("LUANBD_LUALIB")


def _malloc_from_env() -> bool:
    return _switch("LUANBD_MALLOC")


#: How long the compiled loop polls for a connection's next request before it sleeps.
DEFAULT_POLL_US = 50


def _poll_us_from_env() -> int:
    """LUANBD_POLL_US: microseconds (0 to 1000000; 0 never polls), else DEFAULT_POLL_US."""
    try:
        value = int(os.environ.get("LUANBD_POLL_US", DEFAULT_POLL_US))
    except ValueError:
        return DEFAULT_POLL_US
    return min(max(value, 0), 1_000_000)


class UsageError(Exception):
    """A command-line mistake: ``luanbd: <message>`` (no ``error:``, as nbdkit), exit 1."""


class OptionError(UsageError):
    """An option the parser cannot take (unknown, or missing its argument): as nbdkit,
    the message is followed by the short usage on standard output."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    script: str
    #: key=value pairs for the plugin's config(), in command-line order; a key of None is a
    #: bare argument after the script: config(magic_config_key, arg) or an error.
    params: tuple[tuple[str | None, str], ...] = ()
    lua: str = "5.4"
    foreground: bool = False
    unix_socket: str | None = None
    #: ``-U -``: a private socket in a temporary directory, removed at exit.
    private_socket: bool = False
    port: int | None = None
    ipaddr: str | None = None
    ip_family: int = 0  # 0 = any; 4 or 6 with -4/-6
    pidfile: str | None = None
    readonly: bool = False
    export_name: str = ""
    oldstyle: bool = False
    run: str | None = None
    single: bool = False
    exit_with_parent: bool = False
    threads: int = DEFAULT_THREADS
    verbose: bool = False
    structured_replies: bool = True
    meta_contexts: bool = True
    #: --sparse-reads: zero ranges of a READ as NBD_REPLY_TYPE_OFFSET_HOLE chunks.
    sparse_reads: bool = False
    #: --metrics=ADDR: serve Prometheus metrics over HTTP at host:port or a Unix socket.
    metrics: str | None = None
    handshake_flags: HandshakeFlag = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    tls: TlsMode = TlsMode.OFF
    log_to: LogTo | None = None
    #: --log=/path (LogTo.FILE): errors are appended to this file.
    log_file: str | None = None
    debug_flags: tuple[str, ...] = field(default=())
    #: --tls-certificates: nbdkit's layout (server-cert.pem, server-key.pem, ca-cert.pem).
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    #: SO_KEEPALIVE on accepted TCP connections.
    keepalive: bool = False
    #: Print the URI to stdout once listening.
    print_uri: bool = False
    #: -u / -g, resolved to ids: privileges dropped once the sockets are bound.
    uid: int | None = None
    gid: int | None = None
    #: Socket activation: this many listening sockets from fd 3 on (LISTEN_FDS).
    listen_fds: int = 0
    #: --timeout: seconds to finish the handshake (None: no limit).
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT
    #: --filter=NAME in command-line order (the first nearest the client), limit aside.
    filters: tuple[str, ...] = ()
    #: --limit (or --filter=limit limit=N): concurrent connections; 0 = no limit.
    connection_limit: int = DEFAULT_CONNECTION_LIMIT
    #: --request-timeout: seconds a Lua callback may run once serving (None: no limit).
    request_timeout: float | None = None
    #: --lua-memory-limit: bytes the Lua state may allocate (None: no limit).
    lua_memory_limit: int | None = None
    #: --vsock: listen on AF_VSOCK (port: ``port``) instead of TCP.
    vsock: bool = False
    #: --lua-gc: the Lua 5.4 collector mode (None: Lua's default, incremental).
    lua_gc: str | None = None
    #: Serve plain small READ/WRITE with the compiled request loop where it is built.
    fastpath: bool = field(default_factory=_fastpath_from_env)
    #: Compiled Lua library functions (lua/lualib.py) in Lua 5.4 states (LUANBD_LUALIB).
    lualib: bool = field(default_factory=_lualib_from_env)
    #: glibc malloc settings for a server process (server/lifecycle.py, LUANBD_MALLOC).
    tune_malloc: bool = field(default_factory=_malloc_from_env)
    #: The compiled loop polls this long for the next request before sleeping in recv
    #: (server/_fastpath_poll.c, LUANBD_POLL_US).
    poll_us: int = field(default_factory=_poll_us_from_env)
