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
    #: --tls-certificates as given: named in the URI when TLS is required (nbdkit 1.40), so
    #: that a libnbd client finds the CA certificate there.
    tls_certificates: str | None = None

    @property
    def uri(self) -> str:
        # nbdkit's uri_quote: RFC 3986 unreserved characters and '/' stay as they are.
        name = urllib.parse.quote(self.export_name, safe="/")
        # nbds when TLS is required (a client must use TLS), as nbdkit.
        s = "s" if self.tls is TlsMode.REQUIRE else ""
        if self.unix_socket is not None:
            path = f"/{name}" if name else ""
            socket = urllib.parse.quote(self.unix_socket, safe="/")
            uri = f"nbd{s}+unix://{path}?socket={socket}"
        else:
            host = "+vsock://1" if self.vsock else "://localhost"
            uri = f"nbd{s}{host}:{self.port}" + (f"/{name}" if name else "")
        if s and self.tls_certificates:
            uri += ("&" if "?" in uri else "?") + "tls-certificates=" + \
                urllib.parse.quote(self.tls_certificates, safe="/")
        return uri

    def print_uri(self) -> str:
        """What ``--print-uri`` prints (nbdkit 1.40's four lines)."""
        quoted = shell_quote(self.uri)
        return (f"{self.uri}\nShell-quoted URI: {quoted}\n"
                f"Command to query the NBD endpoint:\n  nbdinfo {quoted}\n")


_SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_=,:/")


def shell_quote(text: str) -> str:
    """nbdkit's shell_quote: as is when only safe characters, else in double quotes with
    ``$ ` \\ "`` escaped."""
    if text and set(text) <= _SHELL_SAFE:
        return text
    return '"' + "".join("\\" + c if c in '$`\\"' else c for c in text) + '"'


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
