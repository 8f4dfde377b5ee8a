-- api2_minimal.lua: the smallest API_VERSION = 2 script.  It defines no
-- load callback, so Lua's built-in load() must not be taken for one.

API_VERSION = 2

function open(readonly) return {} end
function get_size(h) return 512 end
function pread(h, count, offset, flags) return string.rep("A", count) end
