-- pattern.lua: a read-only disk whose first half holds bytes 0..255 repeated and whose
-- second half is zeroes (for the checkwrite filter's tests).
local size = 1048576
local BLOCK = ""
for i = 0, 255 do BLOCK = BLOCK .. string.char(i) end

function config(key, value)
   if key == "size" then size = tonumber(value) else error("unknown parameter " .. key) end
end

function open(readonly) return {} end

function get_size(h) return size end

function pread(h, count, offset)
   local half = size // 2
   local out = {}
   local pos = offset
   local stop = offset + count
   while pos < stop do
      if pos < half then
         local n = math.min(stop, half) - pos
         local first = pos % 256
         local s = string.sub(BLOCK, first + 1) .. string.rep(BLOCK, (n + first) // 256 + 1)
         out[#out + 1] = string.sub(s, 1, n)
         pos = pos + n
      else
         out[#out + 1] = string.rep("\0", stop - pos)
         pos = stop
      end
   end
   return table.concat(out)
end
