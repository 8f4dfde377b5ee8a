"""Start-up and shutdown in nbdkit's order.

load -> config... -> config_complete -> get_ready -> bind -> fork -> pidfile -> after_fork
-> serve (-> --run command) -> stop listening -> finish connections -> cleanup -> unload.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
from types import FrameType

from luanbd import __version__, log
from luanbd.backend import current
from luanbd.backend.interface import StartupError
from luanbd.config import DEFAULT_PORT, ServerConfig, UsageError
from luanbd.log import LogTo
from luanbd.lua.plugin import CALLBACKS, LuaPlugin
from luanbd.protocol.handshake import TlsMode
from luanbd.server import captive, tls
from luanbd.server.listener import (
    BindError,
    Listener,
    activated_sockets,
    bind_tcp,
    bind_unix,
    bind_vsock,
)
from luanbd.server.service import Service

#: How long connections get to finish their in-flight request when the server stops.
SHUTDOWN_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def load_plugin(config: ServerConfig) -> LuaPlugin:
    """Load the script and pass it the configuration (not config_complete)."""
    plugin = LuaPlugin(config.script, lua=config.lua, memory_limit=config.lua_memory_limit,
                       gc=config.lua_gc)
    plugin.load()
    magic = plugin.string_global("magic_config_key")
    for key, value in config.params:
        name = magic if key is None else key
        if name is None:
            raise UsageError(f"expecting key=value on the command line but got: {value}")
        plugin.config(name, value)
    return plugin


def print_plugin_facts(plugin: LuaPlugin) -> None:
    """nbdkit-style ``key=value`` lines, then the script's own dump_plugin output."""
    lines = [
        f"path={os.path.abspath(plugin.script)}",
        f"name={plugin.string_global('name') or 'lua'}",
        f"version={plugin.string_global('version') or __version__}",
        f"api_version={plugin.api_version}",
        f"thread_model={plugin.thread_model}",
        f"lua_version={plugin.lua_release}",
        f"lua_runtime={plugin.lua_version}",
    ]
    lines += [f"has_{name}=1" for name in CALLBACKS if plugin.has(name)]
    print("\n".join(lines), flush=True)
    plugin.dump_plugin()


def print_help(script: str | None, usage: str, script_help: str) -> int:
    print(usage)
    print(script_help)
    if script is not None:
        try:
            plugin = LuaPlugin(script)
        except StartupError as err:
            log.error(str(err))
            return 1
        text = plugin.string_global("config_help")
        if text:
            print(text)
    return 0


#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: What tune_malloc sets: one arena; blocks under 32 MiB from the heap; up to 64 MiB of
#: freed memory kept at the heap's top instead of given back to the kernel.
MALLOC_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20),
                   (_M_TRIM_THRESHOLD, 64 << 20))


def tune_malloc() -> bool:
    """Keep glibc malloc from handing the server fresh (page-faulting) memory.

    Lua frees its garbage strings in bulk, in whichever thread runs the collector, and
    every connection is a new thread: with glibc's default of one arena per thread, a
    connection's reply strings kept landing in memory first touched (3-8 us per 4 KiB page
    here) and big blocks went to mmap/munmap.  One arena and fixed thresholds: nbdcopy
    against ram.lua has no page faults after warm-up, and together with the compiled
    table.concat takes 20 % less server CPU per request (bench/README.md).  Threads contend
    little for the one arena: the GIL and the request lock already serialize most
    allocation, and glibc's per-thread cache serves small blocks without it.
    LUANBD_MALLOC=0 keeps glibc's defaults.  Returns True if applied.
    """
    if os.environ.get("LUANBD_MALLOC", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    applied = [mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS]
    return all(applied)


def run(config: ServerConfig, *, dump_plugin: bool = False) -> int:
    """Run the server (or ``--dump-plugin``) and return the exit status."""
    tune_malloc()  # before the Lua state and any thread allocate
    log.verbose = config.verbose or _debug_flags_enable_debug(config.debug_flags)
    if config.log_to is not None:
        log.set_destination(config.log_to)
    ssl_context = None
    try:
        if config.tls is not TlsMode.OFF and not dump_plugin:
            ssl_context = tls.server_context(config.tls_certificates, config.tls_verify_peer)
        plugin = load_plugin(config)
        if dump_plugin:
            # Output that cannot be written (a closed pipe, a full disk) is the command's
            # concern, for every informational option alike (luanbd/__main__.py).
            print_plugin_facts(plugin)
            return 0
        plugin.config_complete()
        plugin.get_ready()
    except UsageError as err:
        log.usage_error(str(err))
        return 1
    except StartupError as err:
        log.error(str(err))
        return 1
    return _serve(plugin, config, ssl_context)


def _debug_flags_enable_debug(flags: tuple[str, ...]) -> bool:
    """``-D luanbd.X=N`` / ``-D lua.X=N`` with N != 0 turn on debug messages; other
    names (nbdkit's own ``nbdkit.*``, a plugin's) are accepted and have no effect."""
    for flag in flags:
        name_flag, _, value = flag.partition("=")
        if name_flag.split(".", 1)[0] in ("luanbd", "lua"):
            try:
                if int(value, 0):
                    return True
            except ValueError:
                pass
    return False


def connection_plugin_factory(config: ServerConfig) -> LuaPlugin:
    """A fresh Lua state for one connection of a serialize_requests/parallel script: the
    script is loaded and configured again, so its globals are its own (docs/lua-plugins.md)."""
    plugin = load_plugin(config)
    plugin.config_complete()
    plugin.get_ready()
    plugin.after_fork()
    plugin.serving(config.request_timeout)
    return plugin


def _serve(plugin: LuaPlugin, config: ServerConfig,
           ssl_context: ssl.SSLContext | None = None) -> int:
    service = Service(plugin, config, lambda: connection_plugin_factory(config))
    service.ssl_context = ssl_context
    current.request_shutdown = service.request_shutdown
    private_dir: str | None = None
    listener: Listener | None = None
    endpoint: captive.Endpoint | None = None
    # Before anything a signal could interrupt: a SIGTERM sent as soon as the pidfile
    # exists must stop us cleanly, not kill us (nbdkit installs its handlers first too).
    _install_signals(service)
    # Daemonising changes directory to /: a relative pidfile means relative to here.
    pidfile = os.path.abspath(config.pidfile) if config.pidfile else None
    try:
        if config.listen_fds:
            listener = Listener(activated_sockets(config.listen_fds))
        elif not config.single:
            if config.private_socket or config.unix_socket:
                if config.private_socket:
                    private_dir = tempfile.mkdtemp(prefix="luanbd")
                    path = os.path.join(private_dir, "socket")
                else:
                    assert config.unix_socket is not None
                    path = os.path.abspath(config.unix_socket)
                listener = Listener([bind_unix(path)])
                endpoint = captive.Endpoint(unix_socket=path, export_name=config.export_name,
                                            tls=config.tls)
            elif config.vsock:
                port = config.port or DEFAULT_PORT
                listener = Listener([bind_vsock(port)])
                endpoint = captive.Endpoint(port=port, export_name=config.export_name,
                                            tls=config.tls, vsock=True)
            else:
                port = config.port or DEFAULT_PORT
                listener = Listener(bind_tcp(config.ipaddr, port, config.ip_family))
                endpoint = captive.Endpoint(port=port, export_name=config.export_name,
                                            tls=config.tls)
        _drop_privileges(config)
        if config.print_uri and endpoint is not None:
            print(endpoint.uri, flush=True)
        ready = _daemonize(config) if not config.foreground else None
        if pidfile:
            try:
                with open(pidfile, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as err:
                raise StartupError(f"{pidfile}: {err.strerror}") from None
        plugin.after_fork()
        plugin.serving(config.request_timeout)
        if ready is not None:
            os.write(ready, b"r")  # the waiting parent may exit now: we serve
            os.close(ready)
    except (BindError, StartupError, OSError) as err:
        log.error(str(err))
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
        return 1

    if config.exit_with_parent:
        _exit_with_parent()
    status = 0
    captive_thread: threading.Thread | None = None
    result: list[int] = []
    try:
        if config.single:
            try:
                sock = socket.socket(fileno=os.dup(0))
            except OSError as err:
                log.error(f"-s: standard input is not a socket: {err.strerror}")
                return 1
            service.serve_here(sock)
        else:
            assert listener is not None
            listener.start(service.handle)
            if config.run is not None:
                assert endpoint is not None

                def run_captive() -> None:
                    assert endpoint is not None
                    result.append(captive.run_command(config.run or "", endpoint))
                    service.request_shutdown()

                captive_thread = threading.Thread(target=run_captive, name="captive",
                                                  daemon=True)
                captive_thread.start()
            service.wait_for_stop()
    finally:
        if listener is not None:
            listener.close()
        finished = service.shutdown_connections(SHUTDOWN_TIMEOUT)
        if finished:
            plugin.cleanup()
            plugin.unload()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
    if captive_thread is not None:
        # Stopped early (signal, nbdkit.shutdown()): the command still decides the status.
        captive_thread.join()
        status = result[0] if result else 1
    return status


def _install_signals(service: Service) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.debug(f"received signal {signal.Signals(signum).name}")
        service.request_shutdown()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, on_signal)
        # The kernel may deliver a signal to any thread; the wake-up fd makes sure the main
        # thread, waiting in wait_for_stop(), notices it at once.
        signal.set_wakeup_fd(service.wakeup_fd)


def _drop_privileges(config: ServerConfig) -> None:
    """-g / -u: give up root once the sockets are bound, as nbdkit (group first)."""
    if config.gid is not None:
        try:
            os.setgroups([config.gid])
            os.setgid(config.gid)
        except OSError as err:
            raise StartupError(f"-g: setgid: {err.strerror}") from None
    if config.uid is not None:
        try:
            os.setuid(config.uid)
        except OSError as err:
            raise StartupError(f"-u: setuid: {err.strerror}") from None


def _exit_with_parent() -> None:
    """Ask Linux to send us SIGTERM when the parent process dies (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        log.error("--exit-with-parent is not supported on this platform")
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def _daemonize(config: ServerConfig) -> int:
    """Go to the background once the sockets listen, as nbdkit does without -f.

    The foreground process exits only when the daemon has written its pidfile and run
    after_fork, so a script may use the pidfile as soon as ``luanbd`` returns.  Returns
    the pipe end to write to when ready.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        ok = os.read(read_end, 1)
        os._exit(0 if ok else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    if config.log_to is None:
        log.set_destination(LogTo.SYSLOG)
    return write_end
