"""luanbd as a library (``luanbd.api.serve``): the README's example, a Python plugin object,
start-up and shutdown in nbdkit's order, each in a fresh interpreter talking to libnbd."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(program: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(program)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_the_readme_example_serves_the_ramdisk() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(from luanbd.api import serve\n.*?)```", readme, re.S)
    assert block is not None, "README has no luanbd.api example"
    # The example's last statements run inside its `with`: append the checks there.
    program = block.group(1).rstrip() + "\n    print(bytes(h.pread(5, 0)), h.get_size())\n"
    out = _run(program, ROOT)
    assert out.split() == ["b'hello'", str(16 * 1024 * 1024)]


def test_a_script_starts_and_stops_in_nbdkits_order(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    script = tmp_path / "disk.lua"
    script.write_text(textwrap.dedent(f"""\
        API_VERSION = 2
        local log = assert(io.open("{log}", "a"))
        local function note(s) log:write(s, "\\n"); log:flush() end
        local data = string.rep("\\0", 4096)
        function load() note("load") end
        function config(k, v) note("config " .. k .. "=" .. v) end
        function config_complete() note("config_complete") end
        function get_ready() note("get_ready") end
        function after_fork() note("after_fork") end
        function open(ro) note("open"); return 1 end
        function close(h) note("close") end
        function cleanup() note("cleanup") end
        function unload() note("unload") end
        function get_size(h) return #data end
        function pread(h, count, offset, flags)
           return data:sub(offset + 1, offset + count)
        end
        function pwrite(h, buf, offset, flags)
           data = data:sub(1, offset) .. buf .. data:sub(offset + #buf + 1)
        end
        """))
    out = _run(f"""
        import nbd
        from luanbd.api import serve
        server = serve({str(script)!r}, params=[("a", "1"), ("b", "2")])
        h = nbd.NBD()
        h.connect_uri(server.uri)
        h.pwrite(b"xyz", 100)
        print(bytes(h.pread(3, 100)))
        h.shutdown()
        del h
        server.close()
        server.close()  # a second close does nothing
        """, tmp_path)
    assert out.split() == ["b'xyz'"]
    assert log.read_text().split("\n")[:-1] == [
        "load", "config a=1", "config b=2", "config_complete", "get_ready", "after_fork",
        "open", "close", "cleanup", "unload"]


def test_a_python_plugin_object_is_served_readonly(tmp_path: Path) -> None:
    out = _run("""
        import nbd
        from luanbd.api import serve
        from luanbd.backend.interface import CacheMode, FuaMode, PluginError, ThreadModel

        class Zeroes:
            thread_model = ThreadModel.PARALLEL
            def __getattr__(self, name):  # every capability a plain disk has not
                if name.startswith(("can_", "is_")):
                    return lambda h: False
                raise AttributeError(name)
            def cleanup(self): print("cleanup")
            def unload(self): print("unload")
            def preconnect(self, readonly): pass
            def list_exports(self, readonly, is_tls): return [(b"", None)]
            def default_export(self, readonly, is_tls): return b""
            def open(self, readonly): return object()
            def close(self, h): pass
            def get_size(self, h): return 1 << 20
            def block_size(self, h): return None
            def export_description(self, h): return None
            def can_fua(self, h): return FuaMode.NONE
            def can_cache(self, h): return CacheMode.NONE
            def pread(self, h, count, offset, flags):
                if offset >= 4096:
                    raise PluginError("pread", "only the first page")
                return bytes([7]) * count

        with serve(Zeroes(), readonly=True) as server:
            h = nbd.NBD()
            h.connect_uri(server.uri)
            print(h.is_read_only(), bytes(h.pread(4, 0)))
            try:
                h.pread(4, 8192)
            except nbd.Error as err:
                print("errno", err.errno)
            try:
                h.pwrite(b"x", 0)
            except nbd.Error as err:
                print("errno", err.errno)
            h.shutdown()
        """, tmp_path)
    # libnbd's Error.errno is the name of the errno the server replied with.
    assert out.split("\n")[:-1] == ["True b'\\x07\\x07\\x07\\x07'", "errno EIO",
                                    "errno EPERM", "cleanup", "unload"]
