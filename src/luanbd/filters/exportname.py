"""nbdkit-exportname-filter(1): change what the client is told about export names (the list,
the default export, descriptions) and which names it may connect to."""

from __future__ import annotations

import errno
import shlex
import subprocess
from collections.abc import Callable

from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError, StartupError
from luanbd.filters.params import bool_parameter

_LIST_MODES = {"keep": "keep", "error": "error", "empty": "empty", "defaultonly": "default",
               "default-only": "default", "explicit": "explicit"}
#: The longest NBD string: a script's longer answer is cut there.
_MAX_STRING = 4096


class Filter(Backend):
    name = "exportname"
    config_help = (
        'default-export=<NAME>     Canonical name for the "" default export.\n'
        "exportname-list=<MODE>    Which exports to advertise: keep (default), error,\n"
        "                          empty, defaultonly, explicit.\n"
        "exportname-strict=<BOOL>  Limit clients to explicit exports (default false).\n"
        "exportname=<NAME>         Add an explicit export name, may be repeated.\n"
        "exportdesc=<MODE>         Set descriptions according to mode: keep (default),\n"
        "                          none, fixed:STRING, script:SCRIPT.")

    def __init__(self) -> None:
        self.default: bytes | None = None
        self.list = "keep"
        self.strict = False
        self.exports: list[bytes] = []
        self.desc_mode = "keep"
        self.desc: str | None = None

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key in ("default-export", "default_export"):
            self.default = value.encode()
        elif key in ("exportname-list", "exportname_list"):
            if value not in _LIST_MODES:
                raise StartupError(f"unrecognized exportname-list mode: {value}")
            self.list = _LIST_MODES[value]
        elif key in ("exportname-strict", "exportname_strict"):
            self.strict = bool_parameter(value)
        elif key == "exportname":
            self.exports.append(value.encode())
        elif key == "exportdesc":
            if value == "keep":
                self.desc_mode, self.desc = "keep", None
            elif value == "none":
                self.desc_mode, self.desc = "none", None
            elif value.startswith("fixed:"):
                self.desc_mode, self.desc = "fixed", value[6:]
            elif value.startswith("script:"):
                self.desc_mode, self.desc = "script", value[7:]
            else:
                raise StartupError(f"unrecognized exportdesc mode: {value}")
        else:
            next(key, value)

    def _description(self, name: bytes, kept: bytes | None) -> bytes | None:
        if self.desc_mode == "keep":
            return kept
        if self.desc_mode != "script" or self.desc is None:
            return None if self.desc is None else self.desc.encode()
        # The script runs with $name set to the export's name; its output (one trailing
        # newline dropped) is the description.  A failure to run it: no description.
        quoted = shlex.quote(name.decode("utf-8", "surrogateescape"))
        command = f"export name; name={quoted}\n{self.desc}\n"
        try:
            out = subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, check=False).stdout
        except OSError:
            return None
        out = out[:_MAX_STRING]
        return out[:-1] if out.endswith(b"\n") else out

    def list_exports(self, next: Context, readonly: bool,
                     is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        if self.list == "error":
            raise PluginError("list_exports", "export list restricted by policy", bare=True)
        if self.list == "empty":
            return []
        if self.list == "default":
            # nbdkit_use_default_export: the one entry is the default export's name.
            name = self.default_export(next, readonly, is_tls)
            return [] if name is None else [(name, None)]
        source = next.list_exports(readonly, is_tls) if self.list == "keep" else \
            [(name, None) for name in self.exports]
        return [(name, self._description(name, desc)) for name, desc in source]

    def default_export(self, next: Context, readonly: bool, is_tls: bool) -> bytes | None:
        if self.strict:
            # Only if "" was named: the default export must be one of the explicit ones.
            if b"" in self.exports:
                return self.default if self.default is not None else b""
            return None
        if self.default is not None:
            return self.default
        return next.default_export(readonly, is_tls)

    def open(self, next: Context, readonly: bool) -> Handle:
        info = current.connection()
        name = info.export_name if info is not None and info.export_name is not None else b""
        if self.strict and name not in self.exports:
            # (sic: nbdkit's message has no closing quote)
            raise PluginError("open", f"export '{name.decode('utf-8', 'replace')} not found",
                              errno.ENOENT, bare=True)
        next.open(readonly)
        return name

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        kept = next.export_description() if self.desc_mode == "keep" else None
        return self._description(h, kept)
