"""The Lua filter API (docs/lua-filters.md), through real clients: ``next`` objects, the
callbacks and their order, errors of the next layer and of the filter, wrong answers, and
the command line (--help, installed names, start-up errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import LUANBD, Session, observe  # noqa: E402

KiB = 1024
SIZE = 1024 * KiB

PLUGIN = """
API_VERSION = 2
local disk = {}
function open(readonly) return {} end
function get_size(h) return 1048576 end
function pread(h, count, offset, flags)
  if offset == 12288 then nbdkit.set_error(nbdkit.EPERM); error("plugin refuses") end
  return string.rep(disk[offset] or "\\0", count)
end
function pwrite(h, buf, offset, flags) disk[offset] = buf:sub(1, 1) end
function flush(h, flags) end
function list_exports(readonly, is_tls) return {"a", {name = "b", description = "bee"}} end
function default_export(readonly, is_tls) return "a" end
"""


def _write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def run(tmp: Path, filters: list[str], client: object, args: tuple[str, ...] = (),
        options: tuple[str, ...] = ()) -> object:
    files = [_write(tmp, "plugin.lua", PLUGIN)]
    names = []
    for i, text in enumerate(filters):
        files.append(_write(tmp, f"f{i}.lua", text))
        names.append(f"--filter=./f{i}.lua")
    return observe(LUANBD, "plugin.lua", args, options=(*options, *names),
                   client=client, files=files)  # type: ignore[arg-type]


def test_next_errors_keep_their_errno_and_message(tmp_path: Path) -> None:
    """A filter that does not catch the plugin's error: the client gets its errno and the
    log has the plugin's one line, as without the filter."""
    f = """
function pread(next, h, count, offset, flags) return next:pread(count, offset, flags) end
"""
    def client(s: Session) -> None:
        h = s.connect()
        s.read(h, 512, 12288)
        s.read(h, 512, 0)

    got = run(tmp_path, [f, f], client)
    assert [o for _, o in got.ops] == ["EPERM", "zeroes n=512"]
    assert got.errors() == ["pread: plugin.lua:7: plugin refuses"]


def test_filter_errors_are_one_line_in_the_plugin_shape(tmp_path: Path) -> None:
    f = """
function pread(next, h, count, offset, flags)
  if offset == 0 then error("no reads at 0") end
  local ok, e = pcall(next.pread, next, count, offset, flags)
  if not ok then
    nbdkit.set_error(nbdkit.ENOSPC)
    error("caught " .. tostring(e) .. " errno " .. e.errno)
  end
  return e
end
function pwrite(next, h, buf, offset, flags)
  return next:pwrite(buf, offset + 2 * 1048576, flags)   -- past the end
end
"""
    def client(s: Session) -> None:
        h = s.connect()
        s.read(h, 512, 0)
        s.read(h, 512, 12288)
        s.write(h, 1, 512, 0)
        s.read(h, 512, 4096)

    got = run(tmp_path, [f], client)
    assert [o for _, o in got.ops] == ["EIO", "ENOSPC", "EINVAL", "zeroes n=512"]
    assert got.errors() == [
        "pread: ./f0.lua:3: no reads at 0",
        "pread: ./f0.lua:7: caught plugin.lua:7: plugin refuses errno 1",
        "pwrite: next:pwrite: count 512 at offset 2097152 is outside the next layer "
        "(size 1048576)",
    ]


@pytest.mark.parametrize(("callback", "answer", "message"), [
    ("get_size", '"lots"', "get_size: cannot convert returned value to an integer"),
    ("can_write", "1", "can_write: return value is not a boolean"),
    ("can_zero", "7", "can_zero: return value is not a boolean or one of SERVER.ZERO_NONE, "
                      "_EMULATE or _NATIVE"),
    ("can_fua", '"yes"', "can_fua: return value is not one of SERVER.FUA_NONE, _EMULATE or "
                         "_NATIVE"),
])
def test_wrong_answers_refuse_the_connection_not_the_server(
        tmp_path: Path, callback: str, answer: str, message: str) -> None:
    f = f"function {callback}(next, h) return {answer} end\n"

    def client(s: Session) -> None:
        for _ in range(2):
            try:
                s.connect()
            except Exception:
                pass
        assert s.proc.poll() is None

    got = run(tmp_path, [f], client)
    assert got.connect_error is not None
    assert got.errors() == [message, message]


def test_wrong_data_answers_fail_the_request(tmp_path: Path) -> None:
    f = """
function pread(next, h, count, offset, flags)
  if offset == 0 then return "short" end
  if offset == 512 then return {} end
  return next:pread(count, offset, flags)
end
function can_extents(next, h) return true end
function extents(next, h, count, offset, flags) return 42 end
"""
    def client(s: Session) -> None:
        h = s.connect()
        s.read(h, 512, 0)
        s.read(h, 512, 512)
        s.block_status(h, 4096, 0)
        s.read(h, 512, 1024)

    got = run(tmp_path, [f], client)
    assert [o for _, o in got.ops] == ["EIO", "EIO", "EIO", "zeroes n=512"]
    assert got.errors() == ["pread: returned string length < count bytes",
                            "pread: return value is not a string",
                            "extents: return value is not a table"]


def test_callback_order_and_arguments(tmp_path: Path) -> None:
    """open gets the export name and TLS; prepare follows the opens, finalize and close
    end the connection; config takes its own keys; next(...) reaches the plugin."""
    trace_file = tmp_path / "trace.txt"
    f = """
local out = assert(io.open("TRACE", "a"))
local function t(...) out:write(table.concat({...}, " "), "\\n"); out:flush() end
local mine
function config(next, key, value)
  if key == "mine" then mine = value; t("config", key, value) else next(key, value) end
end
function config_complete(next) t("config_complete", mine); next() end
function get_ready(model) t("get_ready", model) end
function preconnect(next, readonly) t("preconnect", tostring(readonly)); next(readonly) end
function open(next, readonly, exportname, is_tls)
  t("open", tostring(readonly), exportname, tostring(is_tls))
  next(readonly)
  return {name = exportname}
end
function prepare(next, h, readonly) t("prepare", h.name, next:get_size()) end
function finalize(next, h) t("finalize", h.name) end
function close(h) t("close", h.name) end
function list_exports(next, readonly, is_tls)
  local l = next(readonly, is_tls)
  l[#l + 1] = {name = "extra", description = "from the filter"}
  return l
end
function default_export(next, readonly, is_tls) return "b" end
function export_description(next, h) return "described " .. h.name end
""".replace("TRACE", str(trace_file))

    def client(s: Session) -> None:
        h = nbd.NBD()
        h.set_export_name("b")
        h.set_full_info(True)
        h.connect_unix(s.sock)
        s.record("description", h.get_export_description())
        h.shutdown()
        code, out = s.nbdinfo("--list", "--json")
        s.record("list", code)
        s.record("names", [line.strip() for line in out.splitlines()
                           if '"export-name"' in line])
        s.settle()

    got = run(tmp_path, [f], client, args=("mine=yes",))
    assert got.extra["description"] == "described b"
    assert got.extra["names"][:3] == ['"export-name": "a",', '"export-name": "b",',
                                      '"export-name": "extra",']
    trace = trace_file.read_text().splitlines()
    assert trace[:8] == ["config mine yes", "config_complete yes",
                         "get_ready serialize_all_requests", "preconnect false",
                         "open false b false", "prepare b 1048576",
                         "finalize b", "close b"], trace
    assert got.errors() == []


def test_config_keys_and_thread_model(tmp_path: Path) -> None:
    f = """
thread_model = "serialize_connections"
local seen = {}
function config(next, key, value)
  if key == "mine" then seen[#seen + 1] = value else next(key, value) end
end
function get_size(next, h) return next:get_size() - 4096 * #seen end
"""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.record("size", h.get_size())

    got = run(tmp_path, [f], client, args=("mine=1", "mine=2"))
    assert got.extra["size"] == SIZE - 8192
    # serialize_connections hides multi-conn (the plugin does not offer it anyway) and the
    # plugin never saw mine=: it has no config callback, so it would have refused it.
    assert got.exit_code is None and got.errors() == []


def test_start_up_errors_are_one_line_exit_1(tmp_path: Path) -> None:
    plugin = _write(tmp_path, "plugin.lua", PLUGIN)
    cases = {
        "syntax.lua": ("function pread(next, h\n",
                       "luanbd: error: could not parse Lua script ./syntax.lua:2: ')' "
                       "expected near <eof>"),
        "config.lua": ('function config(next, k, v) error("bad key " .. k) end\n',
                       "luanbd: error: config: ./config.lua:1: bad key x"),
        "model.lua": ('thread_model = "sideways"\n',
                      "luanbd: error: thread_model: unknown thread model 'sideways'"),
    }
    for name, (text, line) in cases.items():
        _write(tmp_path, name, text)
        r = subprocess.run([sys.executable, "-m", "luanbd", f"--filter=./{name}", plugin,
                            "x=1", "--run", "true"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=30, check=False)
        assert r.returncode == 1, r.stderr
        assert r.stderr.splitlines() == [line]
    r = subprocess.run([sys.executable, "-m", "luanbd", "--filter=./missing.lua", plugin],
                       cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("luanbd: error: could not parse Lua script cannot open "
                               "./missing.lua")
    assert len(r.stderr.splitlines()) == 1


def test_help_and_installed_names(tmp_path: Path) -> None:
    plugin = _write(tmp_path, "plugin.lua", PLUGIN)
    installed = tmp_path / "installed"
    installed.mkdir()
    (installed / "shift.lua").write_text(
        'config_help = "shift=<N>  bytes to hide"\n'
        "function get_size(next, h) return next:get_size() - 512 end\n")
    env = dict(os.environ, LUANBD_PLUGINDIR=str(installed),
               PATH="/usr/bin:" + os.environ["PATH"])
    r = subprocess.run([sys.executable, "-m", "luanbd", "--filter=shift", "--help"],
                       capture_output=True, text=True, timeout=30, check=False, env=env)
    assert r.returncode == 0
    assert "filter: shift\nshift=<N>  bytes to hide" in r.stdout
    assert "Filters (--filter=NAME): blocksize" in r.stdout
    r = subprocess.run([sys.executable, "-m", "luanbd", "--filter=shift", plugin, "--run",
                        'nbdinfo --size "$uri"'], capture_output=True, text=True, timeout=30,
                       check=False, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(SIZE - 512)
