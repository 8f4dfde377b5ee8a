"""scripts/sanitize.sh puts this directory on PYTHONPATH: every Python process (pytest, the
luanbd servers the tests start, child pythons) runs with AddressSanitizer's runtime, and no
other program does.

libasan must be preloaded when the process starts, so a python started without it
re-executes itself at once with ``LD_PRELOAD=$LUANBD_ASAN_RUNTIME``; a python that has it
drops LD_PRELOAD from its environment, so that the real clients and oracles the tests run
(nbdkit, qemu-img, nbdinfo, fio) are the distribution's own programs, unsanitized: nbdkit
hangs at exit with libasan preloaded.
"""

import ctypes
import os
import sys


def _sanitized() -> bool:
    try:
        ctypes.CDLL(None)["__asan_init"]
    except AttributeError:
        return False
    return True


_runtime = os.environ.get("LUANBD_ASAN_RUNTIME")
if _runtime:
    if _sanitized():
        os.environ.pop("LD_PRELOAD", None)
    else:
        os.execve(sys.executable, sys.orig_argv,
                  dict(os.environ, LD_PRELOAD=_runtime))
