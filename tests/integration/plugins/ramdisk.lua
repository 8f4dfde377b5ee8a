-- ramdisk.lua: a sparse RAM disk for the differential tests (seed API).
--
-- Keys:  size=BYTES          disk size (default 1048576)
--        trace=1             write "trace: ..." lines to stderr for every call
--        fail=CALLBACK       make CALLBACK fail (config, config_complete, open,
--                            close, get_size, can_flush, pread, pwrite, flush,
--                            trim, zero)
--        how=MODE            how it fails: error (default), assert, assertmsg,
--                            error0, number, table, meta, nil, runtime
--        size_type=T         get_size returns: float, string, hexstring,
--                            word, nil, negative, table, boolean
--        pread_returns=T     pread returns: short, nil, table, number, long
--        handle=T            open returns: table (default), nil, string, number

local PAGE = 4096
local size = 1048576
local pages = {}           -- page index -> PAGE-byte string; missing = zeroes
local ZERO_PAGE = string.rep("\0", PAGE)
local opts = { how = "error", handle = "table" }
local tracing = false

local function trace(fmt, ...)
   if tracing then
      io.stderr:write("trace: " .. string.format(fmt, ...) .. "\n")
   end
end

-- Fail in the way selected by how=, if fail= names this callback.
local function fail_point(name)
   if opts.fail ~= name then return end
   local how = opts.how
   if how == "error" then
      error("injected failure in " .. name)
   elseif how == "assert" then
      assert(false)
   elseif how == "assertmsg" then
      assert(nil, "assertion in " .. name)
   elseif how == "error0" then
      error("no position for " .. name, 0)
   elseif how == "number" then
      error(42)
   elseif how == "table" then
      error({ code = 5 })
   elseif how == "meta" then
      error(setmetatable({}, { __tostring = function () return "meta" end }))
   elseif how == "nil" then
      error(nil)
   elseif how == "runtime" then
      local t = nil
      return t.field
   else
      error("unknown how=" .. how)
   end
end

local known = { size = true, trace = true, fail = true, how = true,
                size_type = true, pread_returns = true, handle = true }

function dump_plugin ()
   print("ramdisk_dump=yes")
   print("ramdisk_page=" .. PAGE)
end

function config (key, value)
   trace("config %s=%s (%s, %s)", key, value, type(key), type(value))
   if not known[key] then
      error("unknown parameter: " .. key)
   end
   opts[key] = value
   if key == "trace" then tracing = (value == "1") end
   if key == "size" then
      size = math.tointeger(tonumber(value))
      if size == nil or size < 0 then error("bad size: " .. value) end
   end
   if key == "fail" and value == "config" then fail_point("config") end
end

function config_complete ()
   trace("config_complete size=%d", size)
   fail_point("config_complete")
end

local handles = 0

function open (readonly)
   trace("open readonly=%s (%s)", tostring(readonly), type(readonly))
   fail_point("open")
   handles = handles + 1
   local h = opts.handle
   if h == "table" then return { id = handles } end
   if h == "string" then return "handle-string" end
   if h == "number" then return 1234 end
   if h == "nil" then return nil end
   error("unknown handle=" .. h)
end

-- Every data callback checks that it got back what open returned.
local function check_handle (h)
   local want = opts.handle
   if want == "table" then assert(type(h) == "table" and h.id >= 1, "bad handle")
   elseif want == "string" then assert(h == "handle-string", "bad handle")
   elseif want == "number" then assert(h == 1234, "bad handle")
   elseif want == "nil" then assert(h == nil, "bad handle")
   end
end

function close (h)
   check_handle(h)
   trace("close")
   fail_point("close")
end

function get_size (h)
   check_handle(h)
   trace("get_size")
   fail_point("get_size")
   local t = opts.size_type
   if t == nil then return size end
   if t == "float" then return size + 0.7 end
   if t == "string" then return tostring(size) end
   if t == "hexstring" then return string.format("0x%x", size) end
   if t == "word" then return "big" end
   if t == "nil" then return nil end
   if t == "negative" then return -5 end
   if t == "table" then return { size } end
   if t == "boolean" then return true end
   error("unknown size_type=" .. t)
end

function can_flush (h)
   check_handle(h)
   trace("can_flush")
   fail_point("can_flush")
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
      page = page:sub(1, o) .. buf:sub(pos, pos + n - 1) .. page:sub(o + n + 1)
      if page == ZERO_PAGE then page = nil end
      pages[i] = page
      pos, offset = pos + n, offset + n
   end
end

function pread (h, count, offset)
   check_handle(h)
   trace("pread count=%d offset=%d (%s, %s)", count, offset,
         math.type(count), math.type(offset))
   fail_point("pread")
   local r = opts.pread_returns
   if r == nil then return read_bytes(count, offset) end
   if r == "short" then return read_bytes(count - 1, offset) end
   if r == "long" then return read_bytes(count, offset) .. "EXTRA" end
   if r == "nil" then return nil end
   if r == "table" then return { read_bytes(count, offset) } end
   if r == "number" then return 1234567890 end
   error("unknown pread_returns=" .. r)
end

function pwrite (h, buf, offset)
   check_handle(h)
   trace("pwrite count=%d offset=%d zeroes=%s (%s)", #buf, offset,
         tostring(buf == string.rep("\0", #buf)), type(buf))
   fail_point("pwrite")
   write_bytes(buf, offset)
end

local flushes = 0

function flush (h)
   check_handle(h)
   flushes = flushes + 1
   trace("flush #%d", flushes)
   fail_point("flush")
end

function trim (h, count, offset)
   check_handle(h)
   trace("trim count=%d offset=%d", count, offset)
   fail_point("trim")
   write_bytes(string.rep("\0", count), offset)
end

function zero (h, count, offset, may_trim)
   check_handle(h)
   trace("zero count=%d offset=%d may_trim=%s (%s)", count, offset,
         tostring(may_trim), type(may_trim))
   fail_point("zero")
   write_bytes(string.rep("\0", count), offset)
end
