"""nbdkit's filters, built in: ``--filter=NAME`` puts the layer of ``luanbd.filters.NAME``
between the server and the plugin (backend/chain.py).  Each module defines ``Filter``, a
:class:`~luanbd.backend.chain.Backend` with nbdkit's name, parameters and behaviour
(nbdkit-NAME-filter(1)).
"""

from __future__ import annotations

import importlib

from luanbd.backend.chain import Backend
from luanbd.backend.interface import StartupError

#: Every built-in filter, by nbdkit's name -> module of this package.
BUILTIN = {
    "blocksize": "blocksize",
    "blocksize-policy": "blocksize_policy",
    "cache": "cache",
    "cacheextents": "cacheextents",
    "cbt": "cbt",
    "checkwrite": "checkwrite",
    "count": "count",
    "cow": "cow",
    "ddrescue": "ddrescue",
    "delay": "delay",
    "error": "error",
    "evil": "evil",
    "exitlast": "exitlast",
    "exitwhen": "exitwhen",
    "exportname": "exportname",
    "ext2": "ext2",
    "extentlist": "extentlist",
    "fua": "fua",
    "gzip": "gzip",
    "ip": "ip",
    "log": "log",
    "luks": "luks",
    "multi-conn": "multi_conn",
    "nocache": "nocache",
    "noextents": "noextents",
    "nofilter": "nofilter",
    "noparallel": "noparallel",
    "nozero": "nozero",
    "offset": "offset",
    "openonce": "openonce",
    "partition": "partition",
    "pause": "pause",
    "protect": "protect",
    "rate": "rate",
    "readahead": "readahead",
    "readonly": "readonly",
    "retry": "retry",
    "retry-request": "retry_request",
    "scan": "scan",
    "stats": "stats",
    "swab": "swab",
    "tar": "tar",
    "time-limit": "time_limit",
    "tls-fallback": "tls_fallback",
    "truncate": "truncate",
    "xz": "xz",
}


def create(name: str) -> Backend:
    """A new instance of the built-in filter ``name``; StartupError for an unknown one."""
    module = BUILTIN.get(name)
    if module is None:
        raise StartupError(f"--filter={name}: luanbd has no such filter (its filters: "
                           f"{', '.join(sorted([*BUILTIN, 'limit']))})")
    layer: Backend = importlib.import_module(f"{__name__}.{module}").Filter()
    return layer


def help_text(names: list[str]) -> str:
    """For --help: the built-in filters, then the parameters of each one named."""
    lines = ["Filters (--filter=NAME): " + ", ".join(sorted([*BUILTIN, "limit"]))]
    for name in names:
        layer = create(name)
        lines += ["", f"filter: {name}", layer.config_help or "(no parameters)"]
    return "\n".join(lines)
