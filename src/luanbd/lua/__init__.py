"""The Lua binding (lupa): Lua scripts as nbdkit plugins.  Nothing about sockets here."""
