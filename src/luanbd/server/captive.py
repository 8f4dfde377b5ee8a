"""Captive mode (``--run``): run a command with ``$uri`` & co. set, exit with its status."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.parse
from dataclasses import dataclass

from luanbd.protocol.handshake import TlsMode


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the server listens, as a client would be told."""

    unix_socket: str | None = None
    port: int | None = None
    export_name: str = ""
    tls: TlsMode = TlsMode.OFF
    #: --vsock: ``port`` is a vsock port (the URI names CID 1, as nbdkit's does).
    vsock: bool = False

    @property
    def uri(self) -> str:
        name = urllib.parse.quote(self.export_name, safe="")
        # nbds when TLS is required (a client must use TLS), as nbdkit.
        s = "s" if self.tls is TlsMode.REQUIRE else ""
        if self.unix_socket is not None:
            path = f"/{name}" if name else ""
            socket = urllib.parse.quote(self.unix_socket, safe="/")
            return f"nbd{s}+unix://{path}?socket={socket}"
        host = "+vsock://1" if self.vsock else "://localhost"
        return f"nbd{s}{host}:{self.port}" + (f"/{name}" if name else "")


def environment(endpoint: Endpoint) -> dict[str, str]:
    env = dict(os.environ)
    uri = endpoint.uri
    env.update(uri=uri, nbd=uri, exportname=endpoint.export_name,
               port="" if endpoint.port is None else str(endpoint.port),
               unixsocket=endpoint.unix_socket or "")
    # $tls: unset while TLS is off, 1 for --tls=on, 2 for --tls=require, as nbdkit.
    tls = {TlsMode.ON: "1", TlsMode.REQUIRE: "2"}.get(endpoint.tls)
    if tls is None:
        env.pop("tls", None)
    else:
        env["tls"] = tls
    return env


def run_command(command: str, endpoint: Endpoint) -> int:
    """Run ``command`` under /bin/sh; its exit status, or 128+N if killed by signal N."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=environment(endpoint))
    status = proc.wait()
    if status < 0:
        return 128 + (-status if -status in signal.Signals._value2member_map_ else 0)
    return status
