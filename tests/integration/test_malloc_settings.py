"""glibc malloc settings of the server (luanbd.server.lifecycle.tune_malloc).

Connection threads must share one malloc arena: with glibc's default (a new arena per
thread, up to 8 per core), each connection's big reply strings land in memory never touched
before, which costs a page fault per 4 KiB (bench/README.md).  Checked by asking glibc
itself (malloc_info) after several threads have allocated, in a fresh process with and
without the settings.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from luanbd_procs import not_sanitized

PROGRAM = r"""
import ctypes, sys, threading
from luanbd.config import ServerConfig
from luanbd.server.lifecycle import tune_malloc
applied = tune_malloc(ServerConfig(script=""))
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.fdopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fflush.argtypes = [ctypes.c_void_p]
start = threading.Barrier(4)
def work():
    start.wait()  # all four alive at once: none can inherit another's freed arena
    blocks = [libc.malloc(256 * 1024) for _ in range(8)]
    for b in blocks:
        libc.free(b)
    start.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.stdout.write(f"applied={applied}\n")
sys.stdout.flush()
out = libc.fdopen(1, b"w")
libc.malloc_info(0, out)
libc.fflush(out)
"""


def heaps(env_malloc: str | None) -> tuple[str, int]:
    env = dict(os.environ)
    env.pop("LUANBD_MALLOC", None)
    if env_malloc is not None:
        env["LUANBD_MALLOC"] = env_malloc
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    first, _, xml = out.partition("\n")
    if "<malloc" not in xml:
        pytest.skip("malloc_info gave nothing: not glibc")
    return first, xml.count("<heap nr=")


@not_sanitized("malloc is ASan's allocator, not glibc's")
def test_threads_share_one_arena() -> None:
    applied, count = heaps(None)
    assert applied == "applied=True"
    assert count == 1


@not_sanitized("malloc is ASan's allocator, not glibc's")
def test_luanbd_malloc_0_keeps_glibc_defaults() -> None:
    applied, count = heaps("0")
    assert applied == "applied=False"
    # The main arena plus one per thread that allocated while the others were alive.
    assert count >= 3
