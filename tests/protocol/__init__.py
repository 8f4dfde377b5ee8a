"""Byte-level tests of luanbd.protocol, written from the NBD spec (no sockets, no Lua)."""
