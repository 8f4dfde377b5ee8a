-- cachelog.lua: a read-only disk of a fixed pattern, under the parallel thread model, whose
-- `cache` writes "trace: cache count=N offset=N" to stderr: what the readahead and scan
-- filters prefetch becomes visible (luanbd only: nbdkit lua 1.32 has no cache callback).
--
-- Keys:  size=BYTES          disk size (default 1048576)

API_VERSION = 2
thread_model = "parallel"

local size = 1048576

function config (key, value)
   if key == "size" then
      size = math.tointeger(tonumber(value))
   else
      error("unknown parameter: " .. key)
   end
end

function open (readonly)
   return {}
end

function get_size (h)
   return size
end

-- Byte i of the disk is i % 251.
local BLOCK = {}
for i = 0, 250 do BLOCK[#BLOCK + 1] = string.char(i) end
BLOCK = table.concat(BLOCK)
local LONG = string.rep(BLOCK, 300)     -- 75300 bytes

function pread (h, count, offset, flags)
   local parts = {}
   while count > 0 do
      local start = offset % 251
      local n = math.min(count, #LONG - start)
      parts[#parts + 1] = LONG:sub(start + 1, start + n)
      count, offset = count - n, offset + n
   end
   return table.concat(parts)
end

function cache (h, count, offset, flags)
   io.stderr:write(string.format("trace: cache count=%d offset=%d\n", count, offset))
end
