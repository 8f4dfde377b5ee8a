-- multiconn.lua: a RAM disk shared by all connections that can say it is multi-conn
-- consistent (API 2, luanbd only: nbdkit lua 1.32 has no can_multi_conn); each flush
-- writes "trace: flush" to stderr.
--
-- Keys:  multi=true|false    what can_multi_conn answers (default true)

API_VERSION = 2

local multi = true
local disk = string.rep("\0", 65536)

function config (key, value)
   if key == "multi" then
      multi = value == "true"
   else
      error("unknown parameter: " .. key)
   end
end

function open (readonly) return {} end
function get_size (h) return #disk end
function can_multi_conn (h) return multi end
function can_flush (h) return true end

function pread (h, count, offset, flags)
   return disk:sub(offset + 1, offset + count)
end

function pwrite (h, buf, offset, flags)
   disk = disk:sub(1, offset) .. buf .. disk:sub(offset + #buf + 1)
end

function flush (h, flags)
   io.stderr:write("trace: flush\n")
end
