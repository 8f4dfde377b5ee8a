"""``--dump-config``: the build facts, as ``nbdkit --dump-config`` prints them."""

from __future__ import annotations

import os
import sys

from luanbd import __version__


def fastpath_state() -> str:
    """yes: the compiled request loop serves plain READ/WRITE; no: not built (no C compiler
    at install); off: LUANBD_FASTPATH=0."""
    from luanbd.config import ServerConfig
    from luanbd.server import compiled

    if not compiled.FASTPATH_BUILT:
        return "no"
    return "yes" if ServerConfig(script="").fastpath else "off"


def dump_config() -> str:
    """``key=value`` build facts, as ``nbdkit --dump-config``."""
    from luanbd.config import ServerConfig, plugin_dir
    from luanbd.lua import lualib, runtime

    installed = runtime.installed()
    incomplete = [lua for lua in installed
                  if not runtime.stdlib_complete(runtime.import_module(lua))]
    major, minor = __version__.split(".")[:2]
    binary = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "luanbd"
    lines = [
        f"binary={binary}",
        "exit_with_parent=yes",
        f"fastpath={fastpath_state()}",
        f"lua_incomplete={','.join(incomplete)}",
        f"lua_versions={','.join(installed)}",
        f"lualib={lualib.state(ServerConfig(script='').lualib)}",
        "max_api_version=2",  # of Lua scripts (API_VERSION), as nbdkit 1.38 prints its own
        f"plugindir={plugin_dir()}",
        "run_default_socket=Unix",  # --run alone serves a private Unix socket (nbdkit 1.36)
        "timeout_option=yes",  # nbdkit 1.42's key
        "tls=yes",
        "tls_psk=no",
        f"version={__version__}",
        f"version_major={major}",
        f"version_minor={minor}",
        "vsock_option=yes",
    ]
    return "\n".join(lines)
