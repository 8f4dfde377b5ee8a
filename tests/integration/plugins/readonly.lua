-- readonly.lua: open, get_size and pread only, and no config function.
-- Byte i of the 1 MiB disk is i % 251.

local block = {}
for i = 0, 250 do block[#block + 1] = string.char(i) end
block = table.concat(block)
local disk = string.rep(block, 1048576 // 251 + 1):sub(1, 1048576)

function open (readonly)
   return "ro"
end

function get_size (h)
   return #disk
end

function pread (h, count, offset)
   return disk:sub(offset + 1, offset + count)
end
