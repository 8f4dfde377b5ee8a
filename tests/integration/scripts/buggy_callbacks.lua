-- Callbacks that misbehave on purpose, chosen by the read offset (tests/integration/test_limits.py).
API_VERSION = 2
thread_model = "parallel"

local size = 1024 * 1024
local disk = {}
local spin = 0

function config(key, value)
   if key == "spin" then spin = tonumber(value)
   else error("unknown parameter " .. key) end
end

function open(readonly) return {} end
function get_size(h) return size end

function pread(h, count, offset, flags)
   if offset == 0 and not disk[0] then
      os.exit(3)
   elseif offset == 4096 then
      while true do end
   elseif offset == 8192 then
      local t = {}
      for i = 1, 1e9 do t[i] = string.rep("x", 100) .. i end
   elseif offset == 12288 then
      coroutine.yield()
   elseif offset == 20480 then
      local start = os.clock()
      while os.clock() - start < spin do end
   end
   return disk[offset] or string.rep("\0", count)
end

function pwrite(h, buf, offset, flags)
   disk[offset] = buf
end
