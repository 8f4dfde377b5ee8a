#!/usr/bin/env -S luanbd lua
-- sparse.lua: a sparse RAM disk that tells clients where its holes are (API 2).
--
--   ./examples/sparse.lua size=1G -U - --run 'nbdinfo --map "$uri"'
--   luanbd -f -U /tmp/s.sock examples/sparse.lua size=64M
--
-- The disk is a table of 4 KiB pages.  A page never written (or trimmed, or zeroed with
-- the client's permission to punch holes) is a hole: it costs no memory, reads as zeroes,
-- and `extents` reports it as hole+zero.  A page zeroed while the client forbade holes
-- (NBD_CMD_FLAG_NO_HOLE) stays allocated and is reported as zero only.  Every connection
-- sees the same pages, so the plugin declares `can_multi_conn`.

API_VERSION = 2

name = "sparse"
version = "1.0"
longname = "sparse RAM disk with extents"
description = "A RAM disk that reports holes and zeroed areas to NBD clients."
config_help = "size=SIZE   (required) disk size, e.g. 64M or 1G"

local PAGE = 4096
local ZERO_PAGE = string.rep("\0", PAGE)
local ZEROED = true            -- an allocated page known to hold only zeroes
local size = nil
local pages = {}               -- page number -> 4 KiB string, or ZEROED; nil = hole

-- (nbdkit's load callback: runs once, before config.)
function load()
  nbdkit.debug("sparse: loaded")
end

function config(key, value)
  if key == "size" then
    size = nbdkit.parse_size(value)
  else
    error("unknown parameter " .. key .. "=" .. value)
  end
end

function config_complete()
  if size == nil then error("size parameter is required, e.g. size=64M") end
end

function open(readonly)
  return {}                    -- all connections share `pages`: the handle is unused
end

function get_size(h) return size end

-- Minimum 1 byte (any request is fine), preferred one page, maximum: no limit of ours.
function block_size(h) return 1, PAGE, 0xffffffff end

-- All connections see the same memory and flush has nothing to do: safe for multi-conn.
function can_multi_conn(h) return true end

-- Zeroing is always cheap here, so clients may ask for fast zeroes.
function can_fast_zero(h) return true end

-- Apply fn(page_number, offset_in_page, length, done) to each page piece of a range.
local function each_piece(count, offset, fn)
  local done = 0
  while done < count do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, count - done)
    fn(i, o, n, done)
    offset, done = offset + n, done + n
  end
end

local function page_text(i)
  local p = pages[i]
  if p == nil or p == ZEROED then return ZERO_PAGE end
  return p
end

function pread(h, count, offset, flags)
  local parts = {}
  each_piece(count, offset, function(i, o, n)
    parts[#parts + 1] = page_text(i):sub(o + 1, o + n)
  end)
  return table.concat(parts)
end

function pwrite(h, buf, offset, flags)
  each_piece(#buf, offset, function(i, o, n, done)
    local piece = buf:sub(done + 1, done + n)
    if n == PAGE then
      pages[i] = piece
    else
      local p = page_text(i)
      pages[i] = p:sub(1, o) .. piece .. p:sub(o + n + 1)
    end
  end)
end

-- Zero a range: whole pages become holes (may_trim) or ZEROED pages; partial pages
-- are overwritten with zeroes.
local function clear(count, offset, may_trim)
  each_piece(count, offset, function(i, o, n)
    if n == PAGE then
      pages[i] = (not may_trim) and ZEROED or nil
    elseif pages[i] ~= nil and pages[i] ~= ZEROED then
      local p = pages[i]
      pages[i] = p:sub(1, o) .. ZERO_PAGE:sub(1, n) .. p:sub(o + n + 1)
    end
  end)
end

function trim(h, count, offset, flags)
  clear(count, offset, true)
end

function zero(h, count, offset, flags)
  clear(count, offset, flags & nbdkit.FLAG_MAY_TRIM ~= 0)
end

function flush(h, flags)
  -- RAM is as durable as it gets.
end

-- One {offset, length, type} per run of pages of the same kind, starting with the page
-- that holds `offset`.  The server clips the list to the request and honours REQ_ONE.
function extents(h, count, offset, flags)
  local function kind(i)
    local p = pages[i]
    if p == nil then return nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO end
    if p == ZEROED then return nbdkit.EXTENT_ZERO end
    return 0                   -- data
  end
  local out = {}
  local last = (math.min(offset + count, size) - 1) // PAGE
  for i = offset // PAGE, last do
    local t = kind(i)
    local start = i * PAGE
    local len = math.min(PAGE, size - start)
    local prev = out[#out]
    if prev and prev[3] == t then
      prev[2] = prev[2] + len
    else
      out[#out + 1] = { start, len, t }
      if flags & nbdkit.FLAG_REQ_ONE ~= 0 and #out > 1 then
        out[#out] = nil        -- the client wants only the first extent
        break
      end
    end
  end
  return out
end
