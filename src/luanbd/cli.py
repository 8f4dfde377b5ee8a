"""The ``luanbd`` command line: nbdkit(1)'s options and aliases, for Lua scripts.

``luanbd [OPTIONS] [lua] SCRIPT.lua [script=SCRIPT.lua] [key=value ...]``.  Options may come
after the script (GNU permutation, as nbdkit's getopt does).  Usage errors print one line
and exit 1, as nbdkit does (argparse would exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn

from luanbd import __version__, log
from luanbd.backend.interface import StartupError
from luanbd.cli_values import (
    connection_limit,
    delay_option,
    group_id,
    parse_debug_flag,
    parse_log,
    parse_tls,
    size_option,
    socket_activation_fds,
    user_id,
)
from luanbd.config import DEFAULT_HANDSHAKE_TIMEOUT, OptionError, ServerConfig, UsageError
from luanbd.protocol.constants import HandshakeFlag
from luanbd.protocol.handshake import TlsMode

#: nbdkit's is_config_key: a letter, then letters, digits, '.', '-' or '_'.
_CONFIG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")

SYNOPSIS = """\
luanbd [-4|--ipv4-only] [-6|--ipv6-only] [-e|--exportname EXPORTNAME]
       [--exit-with-parent] [-f|--foreground] [-i|--ipaddr IPADDR]
       [--log=stderr|syslog|null|default|/path]
       [--lua=5.4|5.1|5.2|5.3|5.5|luajit]
       [--mask-handshake=MASK] [-n|--newstyle] [--no-sr] [--no-mc] [-o|--oldstyle]
       [-P|--pidfile PIDFILE] [-p|--port PORT] [-r|--readonly]
       [--run 'COMMAND ARGS ...'] [-s|--single] [-t|--threads THREADS]
       [--tls=off|on|require] [--tls-certificates /path/to/certificates]
       [--tls-psk /path/to/pskfile] [--tls-verify-peer]
       [-D|--debug NAME.FLAG=N] [--keepalive] [--print-uri]
       [--timeout=DELAY] [--limit=N] [--request-timeout=DELAY]
       [--lua-memory-limit=SIZE] [--lua-gc=incremental|generational]
       [-u|--user USER] [-g|--group GROUP]
       [-U|--unix SOCKET|-] [-v|--verbose] [--vsock]
       [lua] SCRIPT.lua [script=SCRIPT.lua] [KEY=VALUE ...]

luanbd [lua] SCRIPT.lua --dump-plugin
luanbd [lua] [SCRIPT.lua] --help
luanbd [-V|--version]
luanbd --dump-config
"""

#: What follows the synopsis in --help.
OPTIONS_HELP = """\
Basic options:
  -f, --foreground, --no-fork      do not go to the background
  -r, --readonly, --read-only      read-only export
  -e, --exportname NAME            export name used in $uri and $exportname of --run

Listening options:
  -U, --unix SOCKET|-              listen on a Unix socket (- for a private one)
  -p, --port PORT                  TCP port (default 10809)
  -i, --ipaddr IPADDR              listen on this address only
  -4, --ipv4-only / -6, --ipv6-only
  -s, --single, --stdin            serve one connection on stdin
  --vsock                          listen on AF_VSOCK (virtual machines), port -p
  --keepalive                      SO_KEEPALIVE on TCP connections
  --print-uri                      print the URI of the server once listening
  -n, --newstyle / -o, --oldstyle  handshake flavour (newstyle by default)
  --no-structured-replies / --no-meta-contexts
  --no-sr, --no-mc                 refuse structured replies / meta contexts
  --sparse-reads                   answer the zero ranges of READs with holes (luanbd)
  --mask-handshake=MASK            mask the handshake's global flags
  --timeout=DELAY                  time to finish the handshake (default 60s; 0: none)
  --limit=N                        concurrent connections (default 4096; 0: none);
                                   nbdkit's --filter=limit [limit=N] also works

TLS options:
  --tls=off|on|require             STARTTLS policy (default off)
  --tls-certificates DIR           ca-cert.pem, server-cert.pem, server-key.pem
  --tls-verify-peer                require a client certificate
  --tls-psk FILE                   refused: Python 3.11's ssl has no PSK server support

Running options:
  --run 'COMMAND ARGS ...'         run COMMAND with $uri set, then exit with its status
  --exit-with-parent               exit when the parent process exits
  --metrics=[HOST]:PORT|PATH       serve Prometheus metrics over HTTP there (luanbd)
  -P, --pidfile PIDFILE            write the process ID once ready
  -u, --user USER / -g, --group GROUP
                                   drop privileges once the sockets are bound
  -t, --threads THREADS            threads per connection (default 16)

Plugin options:
  --lua=5.4|5.1|5.2|5.3|5.5|luajit the Lua runtime (default 5.4)
  --filter FILTER                  a built-in filter, or a Lua filter script (./f.lua), in
                                   front of the script (repeatable, the first nearest the
                                   client; the list of built-in filters is below)
  --request-timeout=DELAY          a Lua callback running longer fails (EIO)
  --lua-memory-limit=SIZE          Lua allocations past SIZE fail (ENOMEM)
  --lua-gc=incremental|generational
                                   Lua 5.4's garbage collector mode

Debug and logging options:
  -v, --verbose                    debug messages
  -D, --debug NAME.FLAG=N          debug flags (lua.* and luanbd.* turn on debug messages)
  --log=stderr|syslog|null|default|/path
                                   where error messages go (/path: appended to the
                                   file; debug messages stay on stderr)

Information options:
  -h, --help                       this text (and the script's config_help)
  -V, --version                    print the version
  --dump-plugin                    facts about the script, as key=value lines
  --dump-config                    build facts, as key=value lines

See luanbd(1), luanbd-filters(1), luanbd-lua-plugin(3) and luanbd-lua-filter(3)
(docs/ in the source tree).
"""

#: After the synopsis when an option is wrong, as nbdkit's short usage ends.
SHORT_USAGE_END = "Please read the luanbd(1) manual page (man luanbd) for full usage."

SCRIPT_HELP = """\
script=<FILENAME>     (required) The Lua script to run.
[other arguments may be used by the plugin that you load]"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message = f"unrecognized option '{message[len(prefix):].split(maxsplit=1)[0]}'"
        raise OptionError(message)


def _parser() -> _Parser:
    p = _Parser(prog="luanbd", usage=SYNOPSIS, add_help=False, allow_abbrev=True)
    a = p.add_argument
    a("-4", "--ipv4-only", dest="ip_family", action="store_const", const=4, default=0)
    a("-6", "--ipv6-only", dest="ip_family", action="store_const", const=6)
    a("-D", "--debug", action="append", default=[])
    a("-e", "--exportname", "--export-name", "--export", default="")
    a("--exit-with-parent", action="store_true")
    a("-f", "--foreground", "--no-fork", action="store_true")
    a("-g", "--group")
    a("--filter", action="append", default=[])
    a("-h", "--help", action="store_true")
    a("-i", "--ipaddr", "--ip-addr")
    a("--log")
    a("--lua", default="5.4")
    a("--mask-handshake", type=lambda s: int(s, 0))
    a("--metrics")
    a("-n", "--newstyle", action="store_true")
    a("--no-sr", "--no-structured-replies", action="store_true")
    a("--no-mc", "--no-meta-contexts", action="store_true")
    a("--sparse-reads", action="store_true")
    a("-o", "--oldstyle", action="store_true")
    a("-P", "--pidfile", "--pid-file")
    a("-p", "--port")
    a("-r", "--readonly", "--read-only", action="store_true")
    a("--run")
    a("-s", "--single", "--stdin", action="store_true")
    a("-t", "--threads", type=int)
    a("--tls", default="off")
    a("--tls-certificates")
    a("--tls-psk")
    a("--tls-verify-peer", action="store_true")
    a("--keepalive", action="store_true")
    a("--timeout")
    a("--limit")
    a("--request-timeout")
    a("--lua-memory-limit")
    a("--lua-gc")
    a("--vsock", action="store_true")
    a("--print-uri", action="store_true")
    a("-u", "--user")
    a("-U", "--unix")
    a("-v", "--verbose", action="store_true")
    a("-V", "--version", action="store_true")
    a("--dump-plugin", action="store_true")
    a("--dump-config", action="store_true")
    # Hidden, for the bash completion (completion/luanbd), as nbdkit's.
    a("--long-options", action="store_true")
    a("--short-options", action="store_true")
    a("args", nargs="*")
    return p


class Command:
    """What the command line asks for."""

    def __init__(self) -> None:
        self.config: ServerConfig | None = None
        self.help = False
        #: --filter names (limit aside), known before a script is: --help shows theirs.
        self.filters: list[str] = []
        self.version = False
        self.dump_plugin = False
        self.dump_config = False
        #: --long-options / --short-options: "--" or "-", the kind of option to list.
        self.list_options = ""
        self.script: str | None = None


def split_params(args: list[str]) -> tuple[str | None, list[tuple[str | None, str]]]:
    """Split positionals into the script and the parameters, in command-line order, as
    nbdkit does: ``key=value`` gives (key, value), a later bare argument (None, arg)."""
    args = list(args)
    if args and args[0] == "lua":
        args.pop(0)  # nbdkit's plugin name; luanbd only serves Lua, so it is optional
    script: str | None = None
    params: list[tuple[str | None, str]] = []
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if eq and _CONFIG_KEY.match(key):
            if key == "script" and script is None and not params:
                script = value
            else:
                params.append((key, value))
        elif i == 0:
            script = arg
        else:
            params.append((None, arg))
    return script, params


def resolve_script(name: str) -> str:
    """An installed plugin: ``NAME`` (no ``/``, no ``.lua``, not a file here) runs
    ``NAME.lua`` from the plugin directory (``--dump-config`` prints it)."""
    if "/" in name or name.endswith(".lua") or os.path.exists(name):
        return name
    from luanbd.config import plugin_dir

    path = os.path.join(plugin_dir(), f"{name}.lua")
    if os.path.isfile(path):
        return path
    raise UsageError(f"{name}: no such file, and no {name}.lua in the plugin directory "
                     f"{plugin_dir()}")


def parse_args(argv: list[str]) -> Command:
    ns = _parser().parse_intermixed_args(argv)
    cmd = Command()
    cmd.help, cmd.version, cmd.dump_plugin = ns.help, ns.version, ns.dump_plugin
    cmd.filters = [f for f in ns.filter if f != "limit"]
    cmd.dump_config = ns.dump_config
    if ns.long_options or ns.short_options:
        cmd.list_options = "--" if ns.long_options else "-"
        return cmd
    script, params = split_params(ns.args)
    if script is not None:
        script = resolve_script(script)
    cmd.script = script
    if cmd.help or cmd.version or cmd.dump_config:
        return cmd
    if script is None:
        if params:
            raise StartupError("the first parameter must be script=/path/to/script.lua")
        raise UsageError("no Lua script given (try: luanbd SCRIPT.lua, or luanbd --help)")
    limit = connection_limit(ns.limit, ns.filter, params)
    log_to, log_file = parse_log(ns.log)
    tls = parse_tls(ns.tls)
    if ns.tls_psk is not None:
        from luanbd.server.tls import psk_unsupported_message

        raise UsageError(psk_unsupported_message())
    if tls is TlsMode.REQUIRE and ns.oldstyle:
        raise UsageError("cannot use --tls=require and oldstyle (-o) together")
    debug_flags = tuple(ns.debug)
    for flag in debug_flags:
        parse_debug_flag(flag)
    uid = user_id(ns.user) if ns.user is not None else None
    gid = group_id(ns.group) if ns.group is not None else None
    listen_fds = socket_activation_fds()
    if listen_fds and (ns.ipaddr or ns.port or ns.unix or ns.single or ns.run is not None):
        raise UsageError("cannot use socket activation with -i, -p, -s, -U or --run options")
    if ns.vsock and (ns.unix or ns.single):
        raise UsageError("--vsock cannot be used with -U or -s")
    if ns.unix and ns.port:
        raise UsageError("-p and -U options cannot be used together")
    if ns.single and (ns.unix or ns.port or ns.run):
        raise UsageError("-s cannot be used with -U, -p or --run")
    if ns.single and ns.dump_plugin:
        raise UsageError("-s and --dump-plugin cannot be used together")
    if ns.oldstyle and ns.newstyle:
        raise UsageError("cannot use -n and -o together")
    port = None
    if ns.port is not None:
        if not ns.port.isdigit() or not 0 < int(ns.port) < 65536:
            raise UsageError(f"-p {ns.port}: invalid port number")
        port = int(ns.port)
    threads = ns.threads if ns.threads is not None else 16
    if threads < 1:
        raise UsageError("-t: number of threads must be at least 1")
    flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    if ns.mask_handshake is not None:
        flags &= ns.mask_handshake
    cmd.config = ServerConfig(
        script=script,
        params=tuple(params),
        lua=ns.lua,
        foreground=(ns.foreground or ns.run is not None or ns.exit_with_parent or ns.single
                    or bool(listen_fds)),
        unix_socket=None if ns.unix in (None, "-") else ns.unix,
        # Since nbdkit 1.36 --run implies -U - unless -p or --vsock names the endpoint.
        private_socket=ns.unix == "-" or (ns.run is not None and ns.unix is None
                                          and port is None and not ns.vsock),
        port=port,
        ipaddr=ns.ipaddr,
        ip_family=ns.ip_family,
        pidfile=ns.pidfile,
        readonly=ns.readonly,
        export_name=ns.exportname,
        oldstyle=ns.oldstyle,
        run=ns.run,
        single=ns.single,
        exit_with_parent=ns.exit_with_parent,
        threads=threads,
        verbose=ns.verbose,
        structured_replies=not ns.no_sr,
        meta_contexts=not ns.no_mc,
        sparse_reads=ns.sparse_reads,
        metrics=ns.metrics,
        handshake_flags=flags,
        tls=tls,
        log_to=log_to,
        log_file=log_file,
        debug_flags=debug_flags,
        tls_certificates=ns.tls_certificates,
        tls_verify_peer=ns.tls_verify_peer,
        keepalive=ns.keepalive,
        print_uri=ns.print_uri,
        uid=uid,
        gid=gid,
        listen_fds=listen_fds,
        handshake_timeout=delay_option("--timeout", ns.timeout, DEFAULT_HANDSHAKE_TIMEOUT),
        connection_limit=limit,
        filters=tuple(f for f in ns.filter if f != "limit"),
        request_timeout=delay_option("--request-timeout", ns.request_timeout, None),
        lua_memory_limit=(size_option("--lua-memory-limit", ns.lua_memory_limit)
                          if ns.lua_memory_limit is not None else None),
        lua_gc=ns.lua_gc,
        vsock=ns.vsock,
    )
    return cmd


def option_names(kind: str) -> list[str]:
    """The options, one per alias: long ones (``kind`` "--") or short ones ("-"), as
    nbdkit's --long-options and --short-options print them (the two themselves left out)."""
    names = [name for action in _parser()._actions for name in action.option_strings
             if name.startswith(kind) and (kind == "--" or not name.startswith("--"))]
    return sorted(set(names) - {"--long-options", "--short-options"})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``luanbd`` command."""
    from luanbd import filter_loader
    from luanbd.lua import startup
    from luanbd.server import lifecycle

    argv = sys.argv[1:] if argv is None else argv
    try:
        cmd = parse_args(argv)
    except OptionError as err:
        log.usage_error(str(err))
        print(f"{SYNOPSIS}\n{SHORT_USAGE_END}", flush=True)
        return 1
    except UsageError as err:
        log.usage_error(str(err))
        return 1
    except StartupError as err:
        log.error(str(err))
        return 1
    if cmd.list_options:
        print("\n".join(option_names(cmd.list_options)), flush=True)
        return 0
    if cmd.version:
        print(f"luanbd {__version__}", flush=True)
        return 0
    if cmd.dump_config:
        from luanbd.dump_config import dump_config

        print(dump_config(), flush=True)
        return 0
    if cmd.help:
        try:
            text = filter_loader.help_text(cmd.filters)
        except (StartupError, UsageError) as err:
            log.error(str(err))
            return 1
        return startup.print_help(cmd.script, f"{SYNOPSIS}\n{OPTIONS_HELP}\n{text}",
                                  SCRIPT_HELP)
    config = cmd.config
    assert config is not None

    def make_startup() -> startup.LuaStartup:
        """The script and its filters, made anew (at start and on each reload)."""
        layers = [filter_loader.make(name, config) for name in config.filters]
        return startup.LuaStartup(config, layers)

    try:
        first = make_startup()
    except StartupError as err:
        log.error(str(err))
        return 1
    return lifecycle.run(config, first, dump_plugin=cmd.dump_plugin, reload=make_startup)
