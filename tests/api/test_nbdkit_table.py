"""The global ``nbdkit`` table, observed through a client.

``plugins/probe.lua`` evaluates the Lua given as config keys and serves each result as a
512-byte sector ("ok <type> <value>" or "err <message>"), so every answer here is read
by libnbd from a running server.  ``plugins/probe.py`` does the same under ``nbdkit
python`` for the functions nbdkit's Python module also has.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from apitest import HAVE_NBDKIT_PYTHON, LUANBD, PLUGINS, Servers, needs_nbdkit_python, outcome

nbd = pytest.importorskip("nbd")

PROBE = PLUGINS / "probe.lua"
PROBE_PY = PLUGINS / "probe.py"
SECTOR = 512

def probe(servers: Servers, *params: str, script: Path = PROBE, server: str = "luanbd",
          **kw: Any) -> list[str]:
    """Serve probe.lua (or probe.py) with ``params`` and read back every sector."""
    h = servers.connect(script, *params, server=server, **kw)
    n = h.get_size() // SECTOR
    return [bytes(h.pread(SECTOR, i * SECTOR)).decode().rstrip(" ") for i in range(n)]


def values(servers: Servers, *exprs: str, key: str = "expr", **kw: Any) -> list[str]:
    return probe(servers, *(f"{key}={e}" for e in exprs), **kw)


# --- constants ---------------------------------------------------------------------------
ERRNOS = ["EPERM", "ENOENT", "EIO", "ENOMEM", "EINVAL", "EFBIG", "ENOSPC", "EROFS",
          "EOVERFLOW", "ENOTSUP", "EOPNOTSUPP", "ESHUTDOWN"]


def test_errno_constants(servers: Servers) -> None:
    got = values(servers, *(f"nbdkit.{name}" for name in ERRNOS))
    assert got == [f"ok number {getattr(errno, name)}" for name in ERRNOS]


CONSTANTS = {
    "FLAG_MAY_TRIM": 1, "FLAG_FUA": 2, "FLAG_REQ_ONE": 4, "FLAG_FAST_ZERO": 8,
    "FUA_NONE": 0, "FUA_EMULATE": 1, "FUA_NATIVE": 2,
    "CACHE_NONE": 0, "CACHE_EMULATE": 1, "CACHE_NATIVE": 2,
    "EXTENT_HOLE": 1, "EXTENT_ZERO": 2,
}


def test_flag_mode_extent_constants(servers: Servers) -> None:
    names = list(CONSTANTS)
    got = values(servers, *(f"nbdkit.{n}" for n in names))
    assert got == [f"ok number {CONSTANTS[n]}" for n in names]
    if HAVE_NBDKIT_PYTHON:  # the same values as nbdkit's own Python module
        py = values(servers, *(f"nbdkit.{n}" for n in names), script=PROBE_PY,
                    server="nbdkit")
        assert [v.split()[-1] for v in py] == [v.split()[-1] for v in got]


def test_constants_are_integers(servers: Servers) -> None:
    got = values(servers, "math.type(nbdkit.ENOSPC)", "math.type(nbdkit.FLAG_FUA)")
    assert got == ["ok string integer", "ok string integer"]


# --- set_error -----------------------------------------------------------------------------
def read_sector(servers: Servers, *params: str, index: int = 0, **kw: Any) -> Any:
    h = servers.connect(kw.pop("script", PROBE), *params, **kw)
    return outcome(lambda: bytes(h.pread(SECTOR, index * SECTOR)).rstrip(b" "))


@pytest.mark.parametrize("name,client", [
    ("ENOSPC", errno.ENOSPC), ("EPERM", errno.EPERM), ("ENOMEM", errno.ENOMEM),
    ("ESHUTDOWN", errno.ESHUTDOWN), ("EROFS", errno.EPERM), ("EFBIG", errno.ENOSPC),
    ("EINVAL", errno.EINVAL), ("EOVERFLOW", errno.EINVAL), ("EIO", errno.EIO),
])
def test_set_error_then_error(servers: Servers, name: str, client: int) -> None:
    got = read_sector(servers, f'raise=nbdkit.set_error(nbdkit.{name}); error("failing")')
    assert got.errno == client
    if HAVE_NBDKIT_PYTHON:
        py = read_sector(servers, f"raise=nbdkit.set_error(errno.{name}); "
                                  f"raise RuntimeError('failing')",
                         script=PROBE_PY, server="nbdkit")
        assert py.errno == got.errno
    assert "luanbd: error: pread: " in servers.stderr("luanbd")
    assert "failing" in servers.stderr("luanbd")


def test_error_without_set_error_is_eio(servers: Servers) -> None:
    assert read_sector(servers, 'raise=error("plain")').errno == errno.EIO
    assert read_sector(servers, "raise=assert(false)").errno == errno.EIO
    assert read_sector(servers, "raise=local t = nil; return t.x").errno == errno.EIO
    log = servers.stderr("luanbd")
    assert "luanbd: error: pread: raise:1: plain" in log
    assert "luanbd: error: pread: raise:1: assertion failed!" in log
    assert "attempt to index a nil value" in log


def test_error_with_table_value(servers: Servers) -> None:
    assert read_sector(servers, "raise=nbdkit.set_error(nbdkit.EPERM); error({})").errno == \
        errno.EPERM
    assert "pread: (error object is a table value)" in servers.stderr("luanbd")


def test_set_error_alone_does_not_fail(servers: Servers) -> None:
    got = read_sector(servers, "raise=nbdkit.set_error(nbdkit.ENOSPC)")
    assert got.ok and got.value == b"ran"


def test_set_error_does_not_outlive_its_callback(servers: Servers) -> None:
    h = servers.connect(PROBE, "raise=nbdkit.set_error(nbdkit.ENOSPC)", 'raise=error("later")')
    assert bytes(h.pread(SECTOR, 0)).rstrip(b" ") == b"ran"
    assert outcome(lambda: h.pread(SECTOR, SECTOR)).errno == errno.EIO


def test_last_set_error_wins(servers: Servers) -> None:
    got = read_sector(servers, "raise=nbdkit.set_error(nbdkit.ENOSPC); "
                               'nbdkit.set_error(nbdkit.EPERM); error("x")')
    assert got.errno == errno.EPERM


def test_set_error_with_plain_number(servers: Servers) -> None:
    assert read_sector(servers, 'raise=nbdkit.set_error(28); error("x")').errno == errno.ENOSPC


# --- bad arguments raise Lua errors ----------------------------------------------------------
@pytest.mark.parametrize("call,want,got", [
    ('nbdkit.set_error("EIO")', "integer", "string"),
    ("nbdkit.set_error(1.5)", "integer", "number"),
    ("nbdkit.set_error()", "integer", "nil"),
    ("nbdkit.debug(42)", "string", "number"),
    ("nbdkit.parse_size(1024)", "string", "number"),
    ("nbdkit.parse_size()", "string", "nil"),
    ("nbdkit.parse_bool(true)", "string", "boolean"),
    ("nbdkit.read_password({})", "string", "table"),
    ("nbdkit.realpath(nil)", "string", "nil"),
    ("nbdkit.disconnect(1)", "boolean", "number"),
])
def test_bad_argument_types(servers: Servers, call: str, want: str, got: str) -> None:
    name = call[:call.index("(")]
    # In parentheses the call is not a tail call, so the error points at its caller.
    assert values(servers, f"({call})") == [
        f"err expr:1: bad argument #1 to '{name}' ({want} expected, got {got})"]


def test_debug_bad_format_argument_is_an_error(servers: Servers) -> None:
    (got,) = values(servers, 'nbdkit.debug("%d", "x")', options=("-v",))
    assert got.startswith("err ") and "bad argument #2 to 'format'" in got


# --- debug -------------------------------------------------------------------------------------
def test_debug_only_with_verbose(servers: Servers) -> None:
    assert values(servers, 'nbdkit.debug("quiet %s", "please")') == ["ok nil nil"]
    assert "quiet please" not in servers.stderr("luanbd")
    assert values(servers, 'nbdkit.debug("loud %d %s", 42, "x")', options=("-v",)) == \
        ["ok nil nil"]
    assert "luanbd: debug: loud 42 x\n" in servers.stderr("luanbd")


def test_debug_at_config_time(servers: Servers) -> None:
    r = servers.run([LUANBD, "-v", str(PROBE), 'cexpr=nbdkit.debug("in config %d", 7)',
                     "--dump-plugin"])
    assert r.returncode == 0
    assert "luanbd: debug: in config 7" in r.stderr


# --- parse_size / parse_bool ----------------------------------------------------------------
SIZES = {"0": 0, "512": 512, "1b": 1, "1k": 1024, "1K": 1024, "2M": 2 * 2**20,
         "3G": 3 * 2**30, "1T": 2**40, "1P": 2**50, "1E": 2**60, "10s": 5120, " 1k": 1024,
         "01": 1, "9223372036854775807": 2**63 - 1, "7E": 7 * 2**60}


def test_parse_size(servers: Servers) -> None:
    texts = list(SIZES)
    got = values(servers, *(f'nbdkit.parse_size("{t}")' for t in texts))
    assert got == [f"ok number {SIZES[t]}" for t in texts]
    if HAVE_NBDKIT_PYTHON:
        py = values(servers, *(f'nbdkit.parse_size("{t}")' for t in texts), script=PROBE_PY,
                    server="nbdkit")
        assert [v.split()[-1] for v in py] == [v.split()[-1] for v in got]


@needs_nbdkit_python
@pytest.mark.parametrize("text", [
    "1kb", "0x10", "8E", "9223372036854775808",
    "1 k", "1k ", "1 ", "+1",
])
def test_parse_size_edge_cases_like_nbdkit(servers: Servers, text: str) -> None:
    (lua,) = values(servers, f'nbdkit.parse_size("{text}")')
    (py,) = values(servers, f'nbdkit.parse_size("{text}")', script=PROBE_PY, server="nbdkit")
    accepted = lua.startswith("ok number ")
    assert accepted == py.startswith("ok int ")
    if accepted:
        assert lua.split()[-1] == py.split()[-1]


@pytest.mark.parametrize("text", ["1.5M", "-1", "0x10", "1KiB", "", "8E", "abc"])
def test_parse_size_rejects(servers: Servers, text: str) -> None:
    (got,) = values(servers, f'nbdkit.parse_size("{text}")')
    assert got.startswith("err ")
    if HAVE_NBDKIT_PYTHON:  # nbdkit rejects these too
        (py,) = values(servers, f'nbdkit.parse_size("{text}")', script=PROBE_PY,
                       server="nbdkit")
        assert py.startswith("err ")


BOOLS = {"1": True, "true": True, "TRUE": True, "t": True, "yes": True, "y": True,
         "on": True, "0": False, "false": False, "f": False, "No": False, "n": False,
         "off": False}


def test_parse_bool(servers: Servers) -> None:
    texts = list(BOOLS)
    got = values(servers, *(f'nbdkit.parse_bool("{t}")' for t in texts))
    assert got == [f"ok boolean {str(BOOLS[t]).lower()}" for t in texts]


@pytest.mark.parametrize("text", ["maybe", "", "2"])
def test_parse_bool_rejects(servers: Servers, text: str) -> None:
    (got,) = values(servers, f'nbdkit.parse_bool("{text}")')
    assert got.startswith("err ")


# --- read_password / realpath -----------------------------------------------------------------
def test_read_password_forms(servers: Servers, tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    read_end, write_end = os.pipe()
    os.write(write_end, b"from-fd\n")
    os.close(write_end)
    try:
        r = servers.run(
            [LUANBD, "-U", "-", str(PROBE),
             'cexpr=nbdkit.read_password("plain text")',
             f'cexpr=nbdkit.read_password("+{pw_file}")',
             f'cexpr=nbdkit.read_password("-{read_end}")',
             "--run", 'nbdsh -u "$uri" -c "print(h.pread(3 * 512, 0).decode())"'],
            pass_fds=(read_end,))
    finally:
        os.close(read_end)
    assert r.returncode == 0, r.stderr
    sectors = [r.stdout[i:i + SECTOR].rstrip() for i in range(0, 3 * SECTOR, SECTOR)]
    assert sectors == ["ok string plain text", "ok string from-file", "ok string from-fd"]


def test_read_password_missing_file(servers: Servers, tmp_path: Path) -> None:
    (got,) = values(servers, f'nbdkit.read_password("+{tmp_path}/none")', key="cexpr")
    assert got.startswith("err ")


def test_realpath(servers: Servers, tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "dir" / ".." / "file")
    got = values(servers, f'nbdkit.realpath("{tmp_path}/dir/../link")')
    assert got == [f"ok string {os.path.realpath(tmp_path / 'file')}"]


def test_realpath_relative(servers: Servers, tmp_path: Path) -> None:
    (tmp_path / "rel").write_text("x")
    r = servers.run([LUANBD, str(PROBE), 'cexpr=nbdkit.realpath("rel")', "--dump-plugin"],
                    cwd=tmp_path)
    assert f"slot1=ok string {os.path.realpath(tmp_path / 'rel')}" in r.stdout.splitlines()


def test_realpath_missing(servers: Servers) -> None:
    (got,) = values(servers, 'nbdkit.realpath("/no/such/file")')
    assert got.startswith("err ")


# --- connection facts -------------------------------------------------------------------------
def test_export_name(servers: Servers) -> None:
    assert values(servers, "nbdkit.export_name()", export="my export") == \
        ["ok string my export"]
    # (the padding is stripped, so an empty string reads "ok string")
    assert values(servers, "nbdkit.export_name()") == ["ok string"]
    if HAVE_NBDKIT_PYTHON:
        assert values(servers, "nbdkit.export_name()", export="my export", script=PROBE_PY,
                      server="nbdkit") == ["ok str my export"]


def test_export_name_utf8(servers: Servers) -> None:
    assert values(servers, "nbdkit.export_name()", export="テスト") == ["ok string テスト"]


def test_is_tls_and_peer_name(servers: Servers) -> None:
    # No TLS in luanbd yet; over a Unix socket or -s the peer has no address: "".
    assert values(servers, "nbdkit.is_tls()", "nbdkit.peer_name()") == \
        ["ok boolean false", "ok string"]


def test_version(servers: Servers) -> None:
    (got,) = values(servers, "nbdkit.version()")
    r = servers.run([LUANBD, "--version"])
    assert r.stdout.strip() == "luanbd " + got.split()[-1]
    assert re.fullmatch(r"ok string \d+\.\d+\.\d+\S*", got)


@pytest.mark.parametrize("fn", ["export_name", "is_tls", "peer_name"])
def test_connection_functions_outside_a_connection(servers: Servers, fn: str) -> None:
    (got,) = values(servers, f"nbdkit.{fn}()", key="cexpr")
    assert got.startswith("err ") and "connection" in got


def test_functions_exist_in_api1_and_api2(servers: Servers, tmp_path: Path) -> None:
    names = ["debug", "set_error", "parse_size", "parse_bool", "read_password", "realpath",
             "export_name", "is_tls", "peer_name", "shutdown", "disconnect", "version"]
    check = " and ".join(f'type(nbdkit.{n}) == "function"' for n in names)
    assert values(servers, check) == ["ok boolean true"]  # probe.lua is API 1
    script = tmp_path / "v2.lua"
    script.write_text("API_VERSION = 2\n" + PROBE.read_text().replace(
        "function pread(h, count, offset)", "function pread(h, count, offset, flags)"))
    assert values(servers, check, script=script) == ["ok boolean true"]


# --- shutdown / disconnect --------------------------------------------------------------------
def server_exits(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("server", ["luanbd", pytest.param("nbdkit", marks=needs_nbdkit_python)])
def test_shutdown(servers: Servers, server: str) -> None:
    script = PROBE if server == "luanbd" else PROBE_PY
    sock = servers.listen(script, "expr=nbdkit.shutdown()", server=server)
    proc = servers.procs[-1]
    h = nbd.NBD()
    h.connect_unix(str(sock))
    assert bytes(h.pread(SECTOR, 0)).startswith(b"ok ")  # the request itself succeeds
    assert server_exits(proc, 10) == 0
    assert not outcome(lambda: h.pread(SECTOR, 0)).ok


@pytest.mark.parametrize("force", ["false", "true", ""])
def test_disconnect(servers: Servers, force: str) -> None:
    """The request that calls disconnect gets its reply; the connection then closes, so
    the next request fails (ECONNRESET/ENOTCONN); the server goes on."""
    sock = servers.listen(PROBE, f"expr=nbdkit.disconnect({force})", "expr=1")
    h = nbd.NBD()
    h.connect_unix(str(sock))
    assert bytes(h.pread(SECTOR, 0)).rstrip(b" ") == b"ok nil nil"
    nxt = outcome(lambda: h.pread(SECTOR, SECTOR))
    assert nxt.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EPIPE)
    other = nbd.NBD()
    other.connect_unix(str(sock))
    assert bytes(other.pread(SECTOR, SECTOR)).rstrip(b" ") == b"ok number 1"


@pytest.mark.parametrize("force", ["false", "true"])
def test_disconnect_pipelined_requests_get_eshutdown(servers: Servers, force: str) -> None:
    h = servers.connect(PROBE, f"expr=nbdkit.disconnect({force})", "expr=1", "expr=2")
    cookies = [h.aio_pread(nbd.Buffer(SECTOR), i * SECTOR) for i in range(3)]
    results = []
    for c in cookies:
        def wait(c: int = c) -> None:
            deadline = time.monotonic() + 10
            while not h.aio_command_completed(c):
                assert time.monotonic() < deadline
                h.poll(1000)
        results.append(outcome(wait))
    if force == "true":
        # Forced: the read side is shut at once, so libnbd's next write can fail with EPIPE
        # before the first reply is read, which ends the whole handle (nbdkit's own
        # test-disconnect.sh expects ENOTCONN with force too).
        assert results[0].ok or results[0].errno == errno.ENOTCONN
    else:
        assert results[0].ok
    for r in results[1:]:
        assert r.errno in (errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET)


def test_shutdown_with_run_waits_for_the_command(servers: Servers, tmp_path: Path) -> None:
    marker = tmp_path / "command-finished"
    for server, script in [("luanbd", PROBE), *([("nbdkit", PROBE_PY)] if HAVE_NBDKIT_PYTHON
                                                 else [])]:
        marker.unlink(missing_ok=True)
        r = servers.captive(script, "expr=nbdkit.shutdown()", server=server, check=False,
                            run=f'nbdsh -u "$uri" -c "h.pread(512, 0)"; sleep 0.5; '
                                f'touch {marker}; exit 3')
        assert marker.exists(), server   # the server waited for the command
        assert r.returncode == 3, server
