"""Build of the one C extension; everything else is in pyproject.toml.

luanbd.server._fastpath (the compiled request loop for plain READ/WRITE) is optional:
without a C compiler the install still works and the Python loop serves every request.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("luanbd.server._fastpath", ["src/luanbd/server/_fastpath.c"],
                             optional=True, extra_compile_args=["-O2"])])
