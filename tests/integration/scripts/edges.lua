-- A sparse disk for the edge tests (tests/integration/test_edges_*.py): no memory whatever
-- its size.  size=N (default 8 GiB + 1).  The export name (else mode=NAME) picks what extents
-- returns; an export named "bs:MIN,PREF,MAX" (else bs=MIN,PREF,MAX) picks what block_size
-- answers.  Writes are kept per (offset, length) and read back only at the
-- same place; every data call is appended to log=FILE when given.
API_VERSION = 2
local SIZE = 8 * 1024 * 1024 * 1024 + 1
local MODE = "normal"
local BS = nil
local LOG = nil
local written = {}
local G = 2 ^ 32 // 1

function config(key, value)
   if key == "size" then SIZE = math.tointeger(tonumber(value))
   elseif key == "mode" then MODE = value
   elseif key == "bs" then BS = value
   elseif key == "log" then LOG = value
   else error("unknown parameter " .. key) end
end

local function log(what, count, offset)
   if LOG then
      local f = io.open(LOG, "a"); f:write(what, " ", count, " ", offset, "\n"); f:close()
   end
end

function open(readonly)
   local name = nbdkit.export_name()
   if name == "" then return { mode = MODE, bs = BS } end
   local bs = name:match("^bs:(.*)$")
   if bs then return { mode = "normal", bs = bs } end
   return { mode = name, bs = BS }
end
function get_size(h) return SIZE end
function can_write(h) return true end
function can_trim(h) return true end
function can_zero(h) return true end
function can_cache(h) return nbdkit.CACHE_NATIVE end
function can_extents(h) return true end

function block_size(h)
   if h.bs == nil then return 0, 0, 0 end
   local a, b, c = h.bs:match("^(-?%d+),(-?%d+),(-?%d+)$")
   return math.tointeger(tonumber(a)), math.tointeger(tonumber(b)), math.tointeger(tonumber(c))
end

function pread(h, count, offset, flags)
   log("pread", count, offset)
   local w = written[offset]
   if w and #w == count then return w end
   return string.rep("\0", count)
end

function pwrite(h, buf, offset, flags)
   log("pwrite", #buf, offset)
   written[offset] = buf
end

function trim(h, count, offset, flags) log("trim", count, offset) end
function zero(h, count, offset, flags) log("zero", count, offset) end
function cache(h, count, offset, flags) log("cache", count, offset) end

local HZ = 3  -- nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO

local modes = {}
-- data below 4 GiB, a hole above: the honest answer
function modes.normal(count, offset)
   if offset < G then return { { 0, G, 0 }, { G, SIZE - G, HZ } } end
   return { { G, SIZE - G, HZ } }
end
function modes.empty(count, offset) return {} end
function modes.zerolen(count, offset) return { { offset, 0, 0 } } end
function modes.overlap(count, offset)
   return { { offset, 8192, 0 }, { offset + 4096, 8192, HZ } }
end
function modes.unsorted(count, offset)
   return { { offset + 4096, 4096, HZ }, { offset, 4096, 0 } }
end
function modes.gap(count, offset)
   return { { offset, 4096, 0 }, { offset + 8192, 4096, HZ } }
end
function modes.after(count, offset) return { { offset + 1, 4096, 0 } } end
-- starts before the request and ends past the disk
function modes.before(count, offset)
   return { { 0, offset + 512, HZ }, { offset + 512, 2 * SIZE, 0 } }
end
function modes.past(count, offset) return { { offset, SIZE * 4, HZ } } end
-- beyond the disk's end only: nothing covers the offset
function modes.outside(count, offset) return { { SIZE, 4096, 0 } } end
-- lengths of 2^32 and more, alternating types
function modes.huge(count, offset)
   return { { offset, G, 0 }, { offset + G, G + 1, HZ }, { offset + 2 * G + 1, 3 * G, 0 } }
end
function modes.big32(count, offset) return { { offset, G - 1, 0 }, { offset + G - 1, G, HZ } } end
function modes.negative(count, offset) return { { offset, -4096, 0 } } end
function modes.hugeint(count, offset) return { { offset, math.maxinteger, 0 } } end
function modes.mininteger(count, offset) return { { math.mininteger, math.maxinteger, 0 } } end
function modes.float(count, offset) return { { offset + 0.5, 4096.25, 0 } } end
function modes.intfloat(count, offset) return { { offset + 0.0, 4096.0, 0 } } end
function modes.bigfloat(count, offset) return { { offset, 1e300, 0 } } end
function modes.nan(count, offset) return { { offset, 0 / 0, 0 } } end
function modes.inf(count, offset) return { { offset, math.huge, 0 } } end
function modes.string(count, offset) return { { "x", 4096, 0 } } end
function modes.numstring(count, offset) return { { tostring(offset), "4096", "3" } } end
function modes.nil_(count, offset) return { { nil, 4096, 0 } } end
function modes.niltype(count, offset) return { { offset, 4096 } } end
function modes.tbl(count, offset) return { { {}, 4096, 0 } } end
function modes.notable(count, offset) return 42 end
function modes.noitem(count, offset) return { 42 } end
function modes.bool(count, offset) return { { offset, true, 0 } } end
function modes.named(count, offset) return { { offset = offset, length = 4096, type = HZ } } end
function modes.oddtype(count, offset)
   return { { offset, 4096, -1 }, { offset + 4096, 4096, 2 ^ 40 // 1 }, { offset + 8192, 4096, 4 } }
end
-- TINY alternating 1-byte extents from the offset, then the rest of the disk as data
local TINY = 100000
function modes.tiny(count, offset)
   local t = {}
   for i = 0, TINY - 1 do t[i + 1] = { offset + i, 1, (i % 2) * HZ } end
   t[TINY + 1] = { offset + TINY, SIZE - offset - TINY, HZ }
   return t
end
function modes.error(count, offset) error("extents failed on purpose") end

function extents(h, count, offset, flags)
   log("extents", count, offset)
   local f = modes[h.mode]
   if f == nil then error("no mode " .. h.mode) end
   return f(count, offset)
end

-- The same answers as another metadata context, whose flags are not masked to HOLE|ZERO.
function meta_contexts() return { "edges:mirror" } end
function meta_extents(h, context, count, offset, flags) return extents(h, count, offset, flags) end
