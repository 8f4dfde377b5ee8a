"""Start-up and shutdown in nbdkit's order.

load -> config... -> config_complete -> get_ready -> bind -> fork -> pidfile -> after_fork
-> serve (-> --run command) -> stop listening -> finish connections -> cleanup -> unload.
SIGHUP while serving: load -> config... -> config_complete -> get_ready -> after_fork of a new
generation for new connections; the old one is cleaned up and unloaded after its last
connection (server/generation.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from luanbd import gctrace, log
from luanbd.backend import current
from luanbd.backend.chain import Chain
from luanbd.backend.interface import Plugin, StartupError
from luanbd.backend.meta import chain_contexts
from luanbd.config import ServerConfig, UsageError
from luanbd.log import LogTo
from luanbd.protocol.handshake import TlsMode
from luanbd.server import captive, tls
from luanbd.server.listener import BindError
from luanbd.server.server import Server

_PR_SET_PDEATHSIG = 1


class PluginStartup(Protocol):
    """How the chain is made and started (lua/startup.py for a script and its filters)."""

    def load(self) -> Chain:
        """Loaded and configured (load, config...), not yet config_complete."""
        ...

    def ready(self, chain: Chain) -> None:
        """config_complete, then get_ready."""

    def after_fork(self, chain: Chain) -> None:
        """Once listening (and daemonised): after_fork; clients are served from now on."""

    def connection_plugin(self) -> Plugin:
        """A fresh, started plugin instance for one connection."""
        ...

    def dump_plugin(self, chain: Chain) -> None:
        """--dump-plugin's output."""


#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: What tune_malloc sets: one arena; blocks under 32 MiB from the heap; up to 64 MiB of
#: freed memory kept at the heap's top instead of given back to the kernel.
MALLOC_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20),
                   (_M_TRIM_THRESHOLD, 64 << 20))


def tune_malloc(config: ServerConfig) -> bool:
    """Keep glibc malloc from handing the server fresh (page-faulting) memory.

    Lua frees its garbage strings in bulk, in whichever thread runs the collector, and
    every connection is a new thread: with glibc's default of one arena per thread, a
    connection's reply strings kept landing in memory first touched and big blocks went to
    mmap/munmap (bench/README.md has the measurements).  Threads contend little for the one
    arena: the GIL and the request lock already serialize most allocation, and glibc's
    per-thread cache serves small blocks without it.  ``config.tune_malloc`` False
    (LUANBD_MALLOC=0) keeps glibc's defaults.  Returns True if applied.
    """
    if not config.tune_malloc:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    applied = [mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS]
    return all(applied)


def run(config: ServerConfig, startup: PluginStartup, *, dump_plugin: bool = False,
        reload: Callable[[], PluginStartup] | None = None) -> int:
    """Run the server (or ``--dump-plugin``) and return the exit status.  ``reload`` makes
    the startup of a new generation on SIGHUP (None: SIGHUP is ignored)."""
    tune_malloc(config)  # before the Lua state and any thread allocate
    gctrace.install_from_env()
    log.verbose = config.verbose or _debug_flags_enable_debug(config.debug_flags)
    if config.log_to is not None:
        try:
            log.set_destination(config.log_to, config.log_file)
        except OSError as err:
            log.usage_error(f"{config.log_file}: fopen: {err.strerror}")  # nbdkit's words
            return 1
    ssl_context = None
    try:
        if config.tls is not TlsMode.OFF and not dump_plugin:
            ssl_context = tls.server_context(config.tls_certificates, config.tls_verify_peer)
        current.set_stdio(listen_stdin=config.single, configured=False)
        chain = startup.load()
        if dump_plugin:
            # Output that cannot be written (a closed pipe, a full disk) is the command's
            # concern, for every informational option alike (luanbd/__main__.py).
            startup.dump_plugin(chain)
            return 0
        startup.ready(chain)
        # nbdkit sets `configured` after get_ready: stdio may be closed from now on.
        current.set_stdio(configured=True)
        meta_contexts = chain_contexts(chain)
    except UsageError as err:
        log.usage_error(str(err))
        return 1
    except StartupError as err:
        log.error(str(err))
        return 1
    server = Server(chain, config, ssl_context=ssl_context,
                    connection_plugin=startup.connection_plugin, meta_contexts=meta_contexts)
    if reload is not None and not config.single:
        server.service.on_reload = lambda: _reload(server, reload)
    return _serve(server, lambda: startup.after_fork(chain))


def _reload(server: Server, make_startup: Callable[[], PluginStartup]) -> None:
    """SIGHUP, in the main thread: load, configure and start the script and its filters
    anew; new connections get them, open ones keep what they have.  A reload that fails
    logs one line and changes nothing."""
    service = server.service
    serving = service.generation.number
    chain: Chain | None = None
    started = False
    try:
        startup = make_startup()
        chain = startup.load()
        startup.ready(chain)
        started = True
        meta_contexts = chain_contexts(chain)
        startup.after_fork(chain)
    except Exception as err:  # whatever the new code did, the old one serves on
        reason = str(err) if isinstance(err, (UsageError, StartupError)) else repr(err)
        log.error(f"reload failed, still serving generation {serving}: {reason}")
        if service.stats is not None:
            service.stats.reload("failed")
        if chain is not None:
            _discard(chain, started)
        return
    generation = service.install(chain, startup.connection_plugin, meta_contexts)
    if service.stats is not None:
        service.stats.reload("ok")
    log.debug(f"reloaded: generation {generation.number} serves new connections")


def _discard(chain: Chain, started: bool) -> None:
    """What a failed reload had loaded goes (cleanup if get_ready ran, then unload)."""
    try:
        if started:
            chain.cleanup()
        chain.unload()
    except Exception as err:  # a bug of the failed code must not stop the server
        log.error(f"reload: unloading the failed generation: {err!r}")


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


def _serve(server: Server, after_fork: Callable[[], None]) -> int:
    config = server.config
    # Before anything a signal could interrupt: a SIGTERM sent as soon as the pidfile
    # exists must stop us cleanly, not kill us (nbdkit installs its handlers first too).
    _install_signals(server)
    # Daemonising changes directory to /: a relative pidfile means relative to here.
    pidfile = os.path.abspath(config.pidfile) if config.pidfile else None
    try:
        server.bind()
        _drop_privileges(config)
        if config.print_uri and server.endpoint is not None:
            print(server.endpoint.print_uri(), end="", flush=True)
        ready = _daemonize(config) if not config.foreground else None
        if pidfile:
            try:
                with open(pidfile, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as err:
                raise StartupError(f"{pidfile}: {err.strerror}") from None
        after_fork()
        if ready is not None:
            os.write(ready, b"r")  # the waiting parent may exit now: we serve
            os.close(ready)
    except (BindError, StartupError, OSError) as err:
        log.error(str(err))
        server.remove_private_dir()
        return 1

    if config.exit_with_parent:
        _exit_with_parent()
    captive_thread: threading.Thread | None = None
    result: list[int] = []
    try:
        if config.single:
            try:
                sock = socket.socket(fileno=os.dup(0))
            except OSError as err:
                log.error(f"-s: standard input is not a socket: {err.strerror}")
                return 1
            server.serve_socket(sock)
        else:
            server.start()
            if config.run is not None:
                endpoint = server.endpoint
                assert endpoint is not None

                def run_captive() -> None:
                    result.append(captive.run_command(config.run or "", endpoint))
                    server.request_shutdown()

                captive_thread = threading.Thread(target=run_captive, name="captive",
                                                  daemon=True)
                captive_thread.start()
            server.wait()
    finally:
        server.stop()
    if captive_thread is not None:
        # Stopped early (signal, nbdkit.shutdown()): the command still decides the status.
        captive_thread.join()
        return result[0] if result else 1
    return 0


def _install_signals(server: Server) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.debug(f"received signal {signal.Signals(signum).name}")
        server.request_shutdown()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        log.debug("received signal SIGHUP")
        server.service.request_reload()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, on_signal)
        # SIGHUP reloads; with -s (one connection, nothing new to serve) or without a way
        # to reload it is ignored rather than fatal.
        signal.signal(signal.SIGHUP, on_hangup if server.service.on_reload is not None
                      else signal.SIG_IGN)
        # The kernel may deliver a signal to any thread; the wake-up fd makes sure the main
        # thread, waiting in wait_for_stop(), notices it at once.
        signal.set_wakeup_fd(server.service.wakeup_fd)


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
