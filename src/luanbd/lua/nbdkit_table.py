"""The ``nbdkit`` table a script sees (nbdkit-lua-plugin(3); docs/lua-plugins.md "The nbdkit
table").

``nbdkit.lua`` builds the table in Lua (constants, argument checks, ``set_error``) and also
returns the wrapper every callback is called through and a ``control`` table (serving
limits, pinned reads).  What only Python can do (the log, connection facts, nbdkit's
parsing helpers, shutdown) it gets from the primitives here, each answering ``value`` or
``(nil, message)``, which nbdkit.lua raises as a Lua error in the script.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from luanbd import __version__
from luanbd.backend import current, helpers, password, peer
from luanbd.log import debug
from luanbd.lua.results import text


def install(runtime: Any, load_string: Any) -> tuple[Any, Any]:
    """Run nbdkit.lua in ``runtime`` (setting the global ``nbdkit``): (call, control)."""
    source = resources.files("luanbd.lua").joinpath("nbdkit.lua").read_bytes()
    chunk = load_string(source, b"=nbdkit.lua")
    table = runtime.table_from({name.encode(): fn for name, fn in primitives().items()})
    call, control = chunk(table)
    return call, control


def primitives() -> dict[str, Callable[..., Any]]:
    """nbdkit.lua's ``py`` table, by name."""
    def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as err:  # any failure is a Lua error in the script
                return None, str(err).encode()
        return wrapped

    def conn() -> current.ConnectionInfo:
        info = current.connection()
        if info is None:
            raise ValueError("this function can only be called from a connection callback")
        return info

    def export_name() -> Any:
        name = conn().export_name
        if name is None:
            raise ValueError("export name is not known yet")
        return name

    def disconnect(force: bool) -> None:
        conn().disconnect(bool(force))

    def sock() -> Any:
        return conn().peer_socket

    def parse_int(ctype: bytes, what: bytes, s: bytes) -> int:
        n = helpers.parse_int(text(what), text(s), text(ctype))
        # Lua integers are int64: a uint64_t above 2^63-1 wraps, as Lua's own hex
        # literals do (0xffffffffffffffff == -1); math.ult compares such values.
        return n - (1 << 64) if n > helpers.INT_TYPES["int64_t"][1] else n

    def parse_delay(what: bytes, s: bytes) -> tuple[int, None, int]:
        # Two results: the middle place is the message's of every primitive (nil here).
        sec, nsec = helpers.parse_delay(text(what), text(s))
        return sec, None, nsec

    def nanosleep(sec: int, nsec: int) -> Any:
        failed = current.sleep_for(int(sec), int(nsec))
        return True if failed is None else (None, failed[0].encode(), failed[1])

    return {
        "verbose": debug_enabled,
        "debug": lambda msg: debug(text(msg)),
        "parse_size": guard(lambda s: helpers.parse_size(text(s))),
        "parse_bool": guard(lambda s: helpers.parse_bool(text(s))),
        "parse_probability": guard(lambda w, s: helpers.parse_probability(text(w), text(s))),
        "parse_delay": guard(parse_delay),
        "parse_int": guard(parse_int),
        "stdio_safe": current.stdio_safe,
        "nanosleep": nanosleep,
        "peer_pid": guard(lambda: peer.pid(sock())),
        "peer_uid": guard(lambda: peer.uid(sock())),
        "peer_gid": guard(lambda: peer.gid(sock())),
        "peer_security_context": guard(lambda: peer.security_context(sock()).encode()),
        "peer_tls_dn": guard(lambda: peer.tls_dn(sock()).encode()),
        "peer_tls_issuer_dn": guard(lambda: peer.tls_issuer_dn(sock()).encode()),
        "read_password": guard(lambda s: password.read_password(text(s))),
        "realpath": guard(lambda s: helpers.realpath(os.fsdecode(s)).encode()),
        "absolute_path": guard(lambda s: os.fsencode(helpers.absolute_path(os.fsdecode(s)))),
        "export_name": guard(export_name),
        "is_tls": guard(lambda: conn().is_tls),
        "peer_name": guard(lambda: conn().peer_name.encode()),  # noqa: PLW0108
        "shutdown": guard(lambda: current.request_shutdown()),  # noqa: PLW0108 (late binding)
        "disconnect": guard(disconnect),
        "version": __version__.encode,
        "monotonic": time.monotonic,
    }


def debug_enabled() -> bool:
    """Whether nbdkit.debug logs (-v): log.verbose read at each call, not imported, as its
    value may change after the script is loaded."""
    from luanbd import log

    return log.verbose
