-- A RAM disk with a deliberate bug, for `fuzz/run.py --inject-bug`: any TRIM throws the
-- whole disk away.  The server fuzzer must notice (the canary it wrote reads back as zeroes).
local size = 64 * 1024 * 1024
local pages = {}
local PAGE = 4096
local ZERO = string.rep("\0", PAGE)

function config(key, value)
   if key == "size" then size = tonumber(value) else error("unknown parameter " .. key) end
end

function open(readonly) return {} end
function get_size(h) return size end

function pread(h, count, offset)
   local parts = {}
   while count > 0 do
      local i, o = offset // PAGE, offset % PAGE
      local n = math.min(PAGE - o, count)
      parts[#parts + 1] = (pages[i] or ZERO):sub(o + 1, o + n)
      offset, count = offset + n, count - n
   end
   return table.concat(parts)
end

function pwrite(h, buf, offset)
   local done = 0
   while done < #buf do
      local i, o = offset // PAGE, offset % PAGE
      local n = math.min(PAGE - o, #buf - done)
      local page = pages[i] or ZERO
      pages[i] = page:sub(1, o) .. buf:sub(done + 1, done + n) .. page:sub(o + n + 1)
      offset, done = offset + n, done + n
   end
end

function trim(h, count, offset)
   pages = {}  -- the bug: should drop only the pages in [offset, offset + count)
end
