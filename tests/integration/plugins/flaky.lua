-- flaky.lua: a RAM disk whose callbacks fail for a while and then recover, for the retry
-- and retry-request filters (seed API, so nbdkit lua runs it too).
--
-- Keys:  size=BYTES                 disk size (default 1048576)
--        fail=NAME[:SKIP[:COUNT]],...
--                                   after SKIP good calls of callback NAME (open, pread,
--                                   pwrite, flush, trim, zero), fail the next COUNT calls
--                                   (default: every call); counted over the whole run, so
--                                   across reopens
--        trigger=FILE               while FILE is missing the failures above happen; once
--                                   it exists every call succeeds
--
-- Every call writes a "trace: ..." line to stderr (open/close in the form the differential
-- tests' settle() waits for); a failure is also traced, before the error.

local PAGE = 4096
local size = 1048576
local pages = {}
local ZERO_PAGE = string.rep("\0", PAGE)
local plan = {}            -- name -> { skip = n, count = n or nil, calls = n }
local trigger = nil

local function trace(fmt, ...)
   io.stderr:write("trace: " .. string.format(fmt, ...) .. "\n")
end

local function triggered()
   if trigger == nil then return false end
   local f = io.open(trigger, "rb")
   if f == nil then return false end
   f:close()
   return true
end

local function maybe_fail(name)
   local p = plan[name]
   if p == nil then return end
   p.calls = p.calls + 1
   local n = p.calls - p.skip
   if n < 1 or (p.count ~= nil and n > p.count) or triggered() then return end
   trace("fail %s #%d", name, p.calls)
   error("flaky " .. name .. " failure #" .. n)
end

function config (key, value)
   if key == "size" then
      size = math.tointeger(tonumber(value))
      if size == nil or size < 0 then error("bad size: " .. value) end
   elseif key == "fail" then
      for item in string.gmatch(value, "[^,]+") do
         local name, skip, count = string.match(item, "^(%a+):?(%d*):?(%d*)$")
         if name == nil then error("bad fail item: " .. item) end
         plan[name] = { skip = tonumber(skip) or 0, count = tonumber(count), calls = 0 }
      end
   elseif key == "trigger" then
      trigger = value
   else
      error("unknown parameter: " .. key)
   end
end

function open (readonly)
   maybe_fail("open")     -- (a failed open has no "trace: open", which would want a close)
   trace("open readonly=%s", tostring(readonly))
   return { readonly = readonly }
end

function close (h)
   trace("close")
end

function get_size (h)
   return size
end

function can_flush (h)
   return true
end

function can_trim (h)
   return true
end

local function read_bytes (count, offset)
   local parts = {}
   while count > 0 do
      local i, o = offset // PAGE, offset % PAGE
      local n = math.min(count, PAGE - o)
      parts[#parts + 1] = (pages[i] or ZERO_PAGE):sub(o + 1, o + n)
      count, offset = count - n, offset + n
   end
   return table.concat(parts)
end

local function write_bytes (buf, offset)
   local pos = 1
   while pos <= #buf do
      local i, o = offset // PAGE, offset % PAGE
      local n = math.min(#buf - pos + 1, PAGE - o)
      local page = pages[i] or ZERO_PAGE
      pages[i] = page:sub(1, o) .. buf:sub(pos, pos + n - 1) .. page:sub(o + n + 1)
      pos, offset = pos + n, offset + n
   end
end

function pread (h, count, offset)
   trace("pread count=%d offset=%d", count, offset)
   maybe_fail("pread")
   return read_bytes(count, offset)
end

function pwrite (h, buf, offset)
   trace("pwrite count=%d offset=%d readonly=%s", #buf, offset, tostring(h.readonly))
   maybe_fail("pwrite")
   write_bytes(buf, offset)
end

function flush (h)
   trace("flush")
   maybe_fail("flush")
end

function trim (h, count, offset)
   trace("trim count=%d offset=%d", count, offset)
   maybe_fail("trim")
   write_bytes(string.rep("\0", count), offset)
end

function zero (h, count, offset, may_trim)
   trace("zero count=%d offset=%d", count, offset)
   maybe_fail("zero")
   write_bytes(string.rep("\0", count), offset)
end
