"""Captive mode (``--run``): run a command with ``$uri`` & co. set, exit with its status."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the server listens, as a client would be told."""

    unix_socket: str | None = None
    port: int | None = None
    export_name: str = ""

    @property
    def uri(self) -> str:
        name = urllib.parse.quote(self.export_name, safe="")
        if self.unix_socket is not None:
            path = f"/{name}" if name else ""
            return f"nbd+unix://{path}?socket={urllib.parse.quote(self.unix_socket, safe='/')}"
        return f"nbd://localhost:{self.port}" + (f"/{name}" if name else "")


def environment(endpoint: Endpoint) -> dict[str, str]:
    env = dict(os.environ)
    uri = endpoint.uri
    env.update(uri=uri, nbd=uri, exportname=endpoint.export_name,
               port="" if endpoint.port is None else str(endpoint.port),
               unixsocket=endpoint.unix_socket or "")
    env.pop("tls", None)  # unset while TLS is off, as nbdkit
    return env


def run_command(command: str, endpoint: Endpoint) -> int:
    """Run ``command`` under /bin/sh; its exit status, or 128+N if killed by signal N."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=environment(endpoint))
    status = proc.wait()
    if status < 0:
        return 128 + (-status if -status in signal.Signals._value2member_map_ else 0)
    return status
