"""luanbd: an NBD server that runs nbdkit-style Lua plugin scripts."""

__version__ = "0.1.0"
