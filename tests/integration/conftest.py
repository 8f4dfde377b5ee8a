"""Fixtures of the integration tests (helpers are in luanbd_procs.py).

Every server a test starts is stopped in the fixture's teardown, which expects exit status
0 after SIGTERM and checks luanbd's stderr for a Python ``Traceback``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from luanbd_procs import Server, StartServer


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory (Unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lnbd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(workdir: Path) -> Iterator[StartServer]:
    """``start_server(script, *args, options=[...])`` -> a listening :class:`Server`.

    Teardown sends SIGTERM, expects exit status 0 and no Python traceback on stderr.
    """
    servers: list[Server] = []

    def start(script_path: str, *args: str, options: Sequence[str] = (),
              wait: bool = True, env: dict[str, str] | None = None) -> Server:
        sock = workdir / f"s{len(servers)}.sock"
        server = Server(workdir, ["-f", "-U", str(sock), *options, script_path, *args],
                        sock=sock, env=env)
        servers.append(server)
        if wait:
            server.wait_listening()
        return server

    yield start
    failures = []
    for server in servers:
        status = server.stop()
        log = server.log()
        if "Traceback" in log:
            failures.append(f"a Python traceback in luanbd's stderr:\n{log}")
        if server.expect_status is not None and status != server.expect_status:
            failures.append(f"luanbd exited {status}, expected {server.expect_status}:\n{log}")
    if failures:
        pytest.fail("\n".join(failures))


