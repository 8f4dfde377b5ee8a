-- minimal.lua: only the required callbacks plus pwrite (no config, no
-- can_*, flush, trim or zero).  The disk is one 64 KiB Lua string.
-- Every pwrite is reported on stderr, so the zero-to-pwrite fallback and
-- FUA emulation can be observed.

local disk = string.rep("\0", 65536)

function open (readonly)
   return {}
end

function get_size (h)
   return #disk
end

function pread (h, count, offset)
   return disk:sub(offset + 1, offset + count)
end

function pwrite (h, buf, offset)
   io.stderr:write(string.format("minimal: pwrite count=%d offset=%d zeroes=%s\n",
                                 #buf, offset, tostring(buf == string.rep("\0", #buf))))
   disk = disk:sub(1, offset) .. buf .. disk:sub(offset + #buf + 1)
end
