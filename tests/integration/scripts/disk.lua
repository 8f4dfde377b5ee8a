-- disk.lua: a sparse RAM disk written against the seed API (no API_VERSION),
-- used by the integration tests.
--
--   size=BYTES      disk size (default 1 MiB, suffixes k/M/G accepted)
--   failonce=NAME   the first call of callback NAME (pread, pwrite, flush,
--                   trim or zero) raises error("NAME failed"); later calls work
--   fail=NAME       config or config_complete raises an error
--
-- Each injected error() is on its own line; the tests find the line number by
-- searching this file for the text 'error("NAME failed")'.

local PAGE = 4096
local ZERO = string.rep("\0", PAGE)
local size = 1048576
local pages = {}
local failonce = {}
local fail = nil

config_help = "size=<BYTES>  disk size\nfailonce=<CALLBACK>  fail one call"

local function parse_size(s)
   local n, unit = s:match("^(%d+)([kKmMgG]?)$")
   if n == nil then error("cannot parse size: " .. s) end
   local scale = { [""] = 1, k = 1024, m = 1048576, g = 1073741824 }
   return math.floor(tonumber(n) * scale[unit:lower()])
end

function dump_plugin()
   print("disk_dump_line=1")
   print("disk_page=" .. PAGE)
end

function config(key, value)
   if key == "size" then
      size = parse_size(value)
   elseif key == "failonce" then
      failonce[value] = true
   elseif key == "fail" then
      fail = value
      if fail == "config" then
         error("config failed")
      end
   else
      error("unknown parameter " .. key)
   end
end

function config_complete()
   if fail == "config_complete" then
      error("config_complete failed")
   end
end

local function maybe_fail(name)
   if failonce[name] then
      failonce[name] = nil
      if name == "pread" then error("pread failed") end
      if name == "pwrite" then error("pwrite failed") end
      if name == "flush" then error("flush failed") end
      if name == "trim" then error("trim failed") end
      if name == "zero" then error("zero failed") end
   end
end

function open(readonly)
   return {}
end

function get_size(h)
   return size
end

function can_write(h) return true end
function can_flush(h) return true end
function can_trim(h) return true end

local function read_bytes(count, offset)
   local parts = {}
   while count > 0 do
      local i = math.floor(offset / PAGE)
      local o = offset - i * PAGE
      local n = math.min(count, PAGE - o)
      local p = pages[i] or ZERO
      if n == PAGE then parts[#parts + 1] = p else parts[#parts + 1] = p:sub(o + 1, o + n) end
      count, offset = count - n, offset + n
   end
   return table.concat(parts)
end

local function write_bytes(buf, offset)
   local pos = 1
   while pos <= #buf do
      local i = math.floor(offset / PAGE)
      local o = offset - i * PAGE
      local n = math.min(#buf - pos + 1, PAGE - o)
      if n == PAGE then
         pages[i] = buf:sub(pos, pos + n - 1)
      else
         local p = pages[i] or ZERO
         pages[i] = p:sub(1, o) .. buf:sub(pos, pos + n - 1) .. p:sub(o + n + 1)
      end
      pos, offset = pos + n, offset + n
   end
end

local function clear(count, offset)
   while count > 0 do
      local i = math.floor(offset / PAGE)
      local o = offset - i * PAGE
      local n = math.min(count, PAGE - o)
      if n == PAGE then
         pages[i] = nil
      elseif pages[i] ~= nil then
         local p = pages[i]
         pages[i] = p:sub(1, o) .. ZERO:sub(1, n) .. p:sub(o + n + 1)
      end
      count, offset = count - n, offset + n
   end
end

function pread(h, count, offset)
   maybe_fail("pread")
   return read_bytes(count, offset)
end

function pwrite(h, buf, offset)
   maybe_fail("pwrite")
   write_bytes(buf, offset)
end

function flush(h)
   maybe_fail("flush")
end

function trim(h, count, offset)
   maybe_fail("trim")
   clear(count, offset)
end

function zero(h, count, offset, may_trim)
   maybe_fail("zero")
   clear(count, offset)
end
