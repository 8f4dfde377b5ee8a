"""The nbdkit plugin API as Python: the interface, per-connection contexts, thread-model locks."""
