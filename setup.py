"""Build of the C extensions; everything else is in pyproject.toml.

Both are optional: without a C compiler the install still works.
- luanbd.server._fastpath, the compiled request loop for plain READ/WRITE (without it the
  Python loop serves every request);
- luanbd.lua._lualib, a faster table.concat for Lua 5.4 (without it, Lua's own).
scripts/sanitize.sh builds both with ASan and UBSan elsewhere and runs the tests on them.
"""

import os

from setuptools import Extension, setup

#: The optimisation flags; scripts/sanitize.sh builds with LUANBD_OPT="-O1 -g" (and the
#: sanitizers in CFLAGS/LDFLAGS) in a copy of the tree.
OPT = os.environ.get("LUANBD_OPT", "-O2").split()

setup(ext_modules=[
    Extension("luanbd.server._fastpath",
              ["src/luanbd/server/_fastpath.c", "src/luanbd/server/_fastpath_config.c",
               "src/luanbd/server/_fastpath_poll.c"],
              depends=["src/luanbd/server/_fastpath.h"], optional=True,
              extra_compile_args=OPT),
    Extension("luanbd.lua._lualib", ["src/luanbd/lua/_lualib.c"],
              optional=True, extra_compile_args=OPT),
])
