"""All I/O and lifecycle: listening sockets, connections, captive mode, daemonising."""
