"""The NBD protocol, sans-IO: bytes in, typed events out; typed replies in, bytes out.

Nothing in this package touches sockets, threads, clocks or Lua.
"""
