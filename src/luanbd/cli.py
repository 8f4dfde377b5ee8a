"""The ``luanbd`` command line: nbdkit(1)'s options and aliases, for Lua scripts.

``luanbd [OPTIONS] [lua] SCRIPT.lua [script=SCRIPT.lua] [key=value ...]``.  Options may come
after the script (GNU permutation, as nbdkit's getopt does).  Usage errors print one line
and exit 1, as nbdkit does (argparse would exit 2).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from luanbd import __version__, log
from luanbd.backend.interface import StartupError
from luanbd.config import ServerConfig, UsageError
from luanbd.log import LogTo
from luanbd.protocol.constants import HandshakeFlag
from luanbd.protocol.handshake import TlsMode

#: nbdkit's is_config_key: a letter, then letters, digits, '.', '-' or '_'.
_CONFIG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")

USAGE = """\
luanbd [-4|--ipv4-only] [-6|--ipv6-only] [-e|--exportname EXPORTNAME]
       [--exit-with-parent] [-f|--foreground] [-i|--ipaddr IPADDR]
       [--log=stderr|syslog|null] [--lua=5.4|5.1|5.2|5.3|5.5|luajit]
       [--mask-handshake=MASK] [-n|--newstyle] [--no-sr] [--no-mc] [-o|--oldstyle]
       [-P|--pidfile PIDFILE] [-p|--port PORT] [-r|--readonly]
       [--run 'COMMAND ARGS ...'] [-s|--single] [-t|--threads THREADS]
       [--tls=off] [-U|--unix SOCKET|-] [-v|--verbose]
       [lua] SCRIPT.lua [script=SCRIPT.lua] [KEY=VALUE ...]

luanbd [lua] SCRIPT.lua --dump-plugin
luanbd [lua] [SCRIPT.lua] --help
luanbd [-V|--version]
"""

SCRIPT_HELP = """\
script=<FILENAME>     (required) The Lua script to run.
[other arguments may be used by the plugin that you load]"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message = f"unrecognized option '{message[len(prefix):].split(maxsplit=1)[0]}'"
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="luanbd", usage=USAGE, add_help=False, allow_abbrev=True)
    a = p.add_argument
    a("-4", "--ipv4-only", dest="ip_family", action="store_const", const=4, default=0)
    a("-6", "--ipv6-only", dest="ip_family", action="store_const", const=6)
    a("-D", "--debug", action="append", default=[])
    a("-e", "--exportname", "--export-name", "--export", default="")
    a("--exit-with-parent", action="store_true")
    a("-f", "--foreground", "--no-fork", action="store_true")
    a("--filter", action="append", default=[])
    a("-h", "--help", action="store_true")
    a("-i", "--ipaddr", "--ip-addr")
    a("--log", choices=[m.value for m in LogTo])
    a("--lua", default="5.4")
    a("--mask-handshake", type=lambda s: int(s, 0))
    a("-n", "--newstyle", action="store_true")
    a("--no-sr", "--no-structured-replies", action="store_true")
    a("--no-mc", "--no-meta-contexts", action="store_true")
    a("-o", "--oldstyle", action="store_true")
    a("-P", "--pidfile", "--pid-file")
    a("-p", "--port")
    a("-r", "--readonly", "--read-only", action="store_true")
    a("--run")
    a("-s", "--single", "--stdin", action="store_true")
    a("-t", "--threads", type=int)
    a("--tls", default="off")
    a("-U", "--unix")
    a("-v", "--verbose", action="store_true")
    a("-V", "--version", action="store_true")
    a("--dump-plugin", action="store_true")
    a("args", nargs="*")
    return p


class Command:
    """What the command line asks for."""

    def __init__(self) -> None:
        self.config: ServerConfig | None = None
        self.help = False
        self.version = False
        self.dump_plugin = False
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


def parse_args(argv: list[str]) -> Command:
    ns = _parser().parse_intermixed_args(argv)
    cmd = Command()
    cmd.help, cmd.version, cmd.dump_plugin = ns.help, ns.version, ns.dump_plugin
    script, params = split_params(ns.args)
    cmd.script = script
    if cmd.help or cmd.version:
        return cmd
    if script is None:
        if params:
            raise StartupError("the first parameter must be script=/path/to/script.lua")
        raise UsageError("no Lua script given (try: luanbd SCRIPT.lua, or luanbd --help)")
    if ns.filter:
        raise UsageError("--filter: filters are not supported by luanbd")
    if ns.tls not in ("off", "false", "no", "0"):
        raise UsageError(f"--tls={ns.tls}: TLS is not supported yet (only --tls=off)")
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
        foreground=ns.foreground or ns.run is not None or ns.exit_with_parent or ns.single,
        unix_socket=None if ns.unix in (None, "-") else ns.unix,
        private_socket=ns.unix == "-",
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
        handshake_flags=flags,
        tls=TlsMode.OFF,
        log_to=LogTo(ns.log) if ns.log else None,
        debug_flags=tuple(ns.debug),
    )
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``luanbd`` command."""
    from luanbd.server import lifecycle

    argv = sys.argv[1:] if argv is None else argv
    try:
        cmd = parse_args(argv)
    except UsageError as err:
        print(f"luanbd: {err}", file=sys.stderr)
        return 1
    except StartupError as err:
        log.error(str(err))
        return 1
    if cmd.version:
        print(f"luanbd {__version__}")
        return 0
    if cmd.help:
        return lifecycle.print_help(cmd.script, USAGE, SCRIPT_HELP)
    assert cmd.config is not None
    return lifecycle.run(cmd.config, dump_plugin=cmd.dump_plugin)
