#!/usr/bin/env -S luanbd lua
-- metadata.lua: a RAM disk that serves metadata contexts of its own (API 2, luanbd only).
--
--   luanbd -U - examples/metadata.lua size=64M --run '
--       nbdinfo --list "$uri"                            # lists the contexts
--       nbdinfo --map=example:written "$uri"'
--
-- Besides base:allocation, which every NBD server has, a script may declare contexts with
-- `meta_contexts` and answer block status for each with `meta_extents`.  Here:
--
--   example:written            1 where a page was written since the server started
--   qemu:dirty-bitmap:written  the same as a dirty bitmap, for qemu's x-dirty-bitmap
--   example:generation         the number of times each page was written (a counter)
--
-- `meta_extents(h, context, count, offset, flags)` answers like `extents`: a list of
-- {offset, length, flags} covering the range from `offset`, where flags is any 32-bit value
-- of that context's meaning.  The server clips, merges and honours REQ_ONE as for extents.

API_VERSION = 2

local PAGE = 4096
local size = nil
local pages = {}               -- page number -> 4 KiB string; nil = never written
local writes = {}              -- page number -> how many writes touched it

function config(key, value)
  if key == "size" then
    size = nbdkit.parse_size(value)
  else
    error("unknown parameter " .. key)
  end
end

function config_complete()
  if size == nil then error("size parameter is required, e.g. size=64M") end
end

function meta_contexts()
  return { "example:written", "qemu:dirty-bitmap:written", "example:generation" }
end

function open(readonly) return {} end
function get_size(h) return size end
function can_multi_conn(h) return true end

local function page_text(i)
  return pages[i] or string.rep("\0", PAGE)
end

function pread(h, count, offset, flags)
  local parts, pos = {}, offset
  while pos < offset + count do
    local i, o = pos // PAGE, pos % PAGE
    local n = math.min(PAGE - o, offset + count - pos)
    parts[#parts + 1] = page_text(i):sub(o + 1, o + n)
    pos = pos + n
  end
  return table.concat(parts)
end

function pwrite(h, buf, offset, flags)
  local pos = offset
  while pos < offset + #buf do
    local i, o = pos // PAGE, pos % PAGE
    local n = math.min(PAGE - o, offset + #buf - pos)
    local p = page_text(i)
    pages[i] = p:sub(1, o) .. buf:sub(pos - offset + 1, pos - offset + n) .. p:sub(o + n + 1)
    writes[i] = (writes[i] or 0) + 1
    pos = pos + n
  end
end

function extents(h, count, offset, flags)
  return meta_extents(h, "base", count, offset, flags)
end

-- One extent per run of pages with the same value of the context.
function meta_extents(h, context, count, offset, flags)
  local function value(i)
    if context == "base" then          -- base:allocation: never written = hole + zero
      return pages[i] and 0 or (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    elseif context == "example:generation" then
      return writes[i] or 0
    else                               -- example:written, qemu:dirty-bitmap:written
      return writes[i] and 1 or 0
    end
  end
  local out = {}
  local first, last = offset // PAGE, (math.min(offset + count, size) - 1) // PAGE
  for i = first, last do
    local v, start = value(i), i * PAGE
    local len = math.min(PAGE, size - start)
    local prev = out[#out]
    if prev and prev[3] == v then
      prev[2] = prev[2] + len
    elseif prev and flags & nbdkit.FLAG_REQ_ONE ~= 0 then
      break                            -- the client wants only the first extent
    else
      out[#out + 1] = { start, len, v }
    end
  end
  return out
end
