-- sparse2.lua: an API_VERSION = 2 RAM disk that reports extents (pages never
-- written are holes that read as zeroes) and advertises multi-conn, so that
-- several connections may share it.
--
--   size=BYTES   disk size (default 1 MiB)

API_VERSION = 2

local PAGE = 4096
local ZERO = string.rep("\0", PAGE)
local size = 1048576
local pages = {}

function config(key, value)
   if key == "size" then
      size = nbdkit.parse_size(value)
   else
      error("unknown parameter " .. key)
   end
end

function open(readonly) return {} end
function get_size(h) return size end
function can_write(h) return true end
function can_multi_conn(h) return true end
function can_extents(h) return true end

function pread(h, count, offset, flags)
   local parts = {}
   while count > 0 do
      local i, o = offset // PAGE, offset % PAGE
      local n = math.min(count, PAGE - o)
      parts[#parts + 1] = (pages[i] or ZERO):sub(o + 1, o + n)
      count, offset = count - n, offset + n
   end
   return table.concat(parts)
end

function pwrite(h, buf, offset, flags)
   local pos = 1
   while pos <= #buf do
      local i, o = offset // PAGE, offset % PAGE
      local n = math.min(#buf - pos + 1, PAGE - o)
      local p = pages[i] or ZERO
      pages[i] = p:sub(1, o) .. buf:sub(pos, pos + n - 1) .. p:sub(o + n + 1)
      pos, offset = pos + n, offset + n
   end
end

-- One extent per run of written (data) or unwritten (hole) pages.
function extents(h, count, offset, flags)
   local out = {}
   local pos, stop = offset - offset % PAGE, offset + count
   while pos < stop do
      local i = pos // PAGE
      local kind = pages[i] and 0 or (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
      local last = out[#out]
      if last and last[3] == kind then
         last[2] = last[2] + PAGE
      else
         out[#out + 1] = { pos, PAGE, kind }
      end
      pos = pos + PAGE
   end
   return out
end
