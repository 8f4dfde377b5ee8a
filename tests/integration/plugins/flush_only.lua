-- flush_only.lua: defines flush but not can_flush.  nbdkit 1.32 does not
-- advertise flush for this script (it looks up "plugin_flush" instead of
-- "flush"); luanbd does.  Each Lua flush call is reported on stderr.

local disk = string.rep("\0", 65536)

function open (readonly) return {} end
function get_size (h) return #disk end
function pread (h, count, offset) return disk:sub(offset + 1, offset + count) end

function pwrite (h, buf, offset)
   disk = disk:sub(1, offset) .. buf .. disk:sub(offset + #buf + 1)
end

function flush (h)
   io.stderr:write("flush_only: flush called\n")
end
