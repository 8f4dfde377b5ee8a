"""Build of the C extensions; everything else is in pyproject.toml.

Both are optional: without a C compiler the install still works.
- luanbd.server._fastpath, the compiled request loop for plain READ/WRITE (without it the
  Python loop serves every request);
- luanbd.lua._lualib, a faster table.concat for Lua 5.4 (without it, Lua's own).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("luanbd.server._fastpath",
              ["src/luanbd/server/_fastpath.c", "src/luanbd/server/_fastpath_config.c"],
              depends=["src/luanbd/server/_fastpath.h"], optional=True,
              extra_compile_args=["-O2"]),
    Extension("luanbd.lua._lualib", ["src/luanbd/lua/_lualib.c"],
              optional=True, extra_compile_args=["-O2"]),
])
