#!/usr/bin/env -S luanbd lua
-- A RAM disk, written against the 2018 seed API, so it runs unchanged under
-- `nbdkit lua ramdisk.lua` and `luanbd ramdisk.lua`.
--
--   luanbd -f -U /tmp/s.sock examples/ramdisk.lua size=1G
--   ./examples/ramdisk.lua size=64M -U - --run 'nbdinfo "$uri"'
--
-- The disk is a sparse table of 4 KiB pages: pages never written read as zeroes and
-- cost no memory.

local PAGE = 4096
local ZERO = string.rep("\0", PAGE)
local size = 64 * 1024 * 1024
local pages = {}

local function parse_size(s)
   local n, unit = s:match("^(%d+)([kKmMgGtT]?)$")
   if not n then error("could not parse size: " .. s) end
   local scale = { [""] = 1, k = 2^10, m = 2^20, g = 2^30, t = 2^40 }
   return math.floor(tonumber(n) * scale[unit:lower()])
end

function config(key, value)
   if key == "size" then
      size = parse_size(value)
   else
      error("unknown parameter " .. key .. "=" .. value)
   end
end

function open(readonly)
   return {}
end

function get_size(h)
   return size
end

function can_flush(h)
   return true
end

-- Read `count` bytes at `offset`, page by page.
function pread(h, count, offset)
   local parts = {}
   while count > 0 do
      local i = offset // PAGE
      local o = offset % PAGE
      local n = math.min(PAGE - o, count)
      local page = pages[i] or ZERO
      parts[#parts + 1] = page:sub(o + 1, o + n)
      offset = offset + n
      count = count - n
   end
   return table.concat(parts)
end

function pwrite(h, buf, offset)
   local done = 0
   while done < #buf do
      local i = offset // PAGE
      local o = offset % PAGE
      local n = math.min(PAGE - o, #buf - done)
      local piece = buf:sub(done + 1, done + n)
      if n == PAGE then
         pages[i] = piece
      else
         local page = pages[i] or ZERO
         pages[i] = page:sub(1, o) .. piece .. page:sub(o + n + 1)
      end
      offset = offset + n
      done = done + n
   end
end

-- Zeroing whole pages frees them; partial pages are overwritten with zeroes.
local function clear(count, offset)
   while count > 0 do
      local i = offset // PAGE
      local o = offset % PAGE
      local n = math.min(PAGE - o, count)
      if n == PAGE then
         pages[i] = nil
      elseif pages[i] then
         pages[i] = pages[i]:sub(1, o) .. ZERO:sub(1, n) .. pages[i]:sub(o + n + 1)
      end
      offset = offset + n
      count = count - n
   end
end

function trim(h, count, offset)
   clear(count, offset)
end

function zero(h, count, offset, may_trim)
   clear(count, offset)
end

function flush(h)
   -- Nothing to do: RAM is as durable as it gets.
end
