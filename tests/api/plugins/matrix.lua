-- matrix.lua: an API 2 test plugin whose optional callbacks are switched on and off by
-- config keys, and which records every callback it runs into the file log=PATH.
-- Its twin matrix.py does the same under `nbdkit python`, so both can be compared.
--
--   size=SIZE                 disk size (nbdkit.parse_size), default 1M
--   log=PATH                  append one line per callback: "name arg arg ..."
--   omit=a,b,...              remove these callbacks (pwrite, flush, trim, zero, cache,
--                             extents, ...)
--   can_write=BOOL ...        define can_write returning BOOL (also can_flush, is_rotational,
--                             can_trim, can_zero, can_fast_zero, can_extents,
--                             can_multi_conn)
--   can_fua=none|emulate|native, can_cache=none|emulate|native
--   block_size=MIN,PREF,MAX   define block_size
--   description=TEXT          define export_description returning TEXT
--   default_export=NAME       define default_export returning NAME
--   exports=a,b:desc,...      define list_exports (name or name:description)
--   thread_model=MODEL        set the thread_model global
--   fail=CALLBACK:ERRNO       CALLBACK calls nbdkit.set_error(ERRNO) then error()
--                             (ERRNO 0: error() without set_error)
API_VERSION = 2

local PAGE = 4096
local ZERO_PAGE = string.rep("\0", PAGE)
local size = 1024 * 1024
local pages = {}            -- page index -> 4096-byte string; nil is a hole
local log_path = nil
local pending = {}          -- lines recorded before log= was seen
local omit = {}
local bools = {}
local modes = {}
local fails = {}
local block = nil
local description = nil
local default_name = nil
local exports = nil

local function record(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  local line = table.concat(parts, " ")
  if not log_path then
    pending[#pending + 1] = line
    return
  end
  local f = assert(io.open(log_path, "a"))
  f:write(line, "\n")
  f:close()
end

local function maybe_fail(name)
  local err = fails[name]
  if err then
    if err ~= 0 then nbdkit.set_error(err) end
    error("injected failure in " .. name)
  end
end

local function split(text, sep)
  local out = {}
  for item in string.gmatch(text, "[^" .. sep .. "]+") do out[#out + 1] = item end
  return out
end

local MODES = { none = 0, emulate = 1, native = 2 }
local BOOL_CAPS = {
  can_write = true, can_flush = true, is_rotational = true, can_trim = true,
  can_zero = true, can_fast_zero = true, can_extents = true, can_multi_conn = true,
}

function load() record("load") end
function unload() record("unload") end

function config(key, value)
  record("config", key, value)
  if key == "size" then
    size = nbdkit.parse_size(value)
  elseif key == "log" then
    log_path = value
    local lines = pending
    pending = {}
    for _, line in ipairs(lines) do record(line) end
  elseif key == "omit" then
    for _, name in ipairs(split(value, ",")) do omit[name] = true end
  elseif BOOL_CAPS[key] then
    bools[key] = nbdkit.parse_bool(value)
  elseif key == "can_fua" or key == "can_cache" then
    modes[key] = assert(MODES[value], "bad mode " .. value)
  elseif key == "block_size" then
    block = split(value, ",")
  elseif key == "description" then
    description = value
  elseif key == "default_export" then
    default_name = value
  elseif key == "exports" then
    exports = {}
    for _, item in ipairs(split(value, ",")) do
      local n, d = string.match(item, "^([^:]*):(.*)$")
      if n then exports[#exports + 1] = { name = n, description = d }
      else exports[#exports + 1] = item end
    end
  elseif key == "thread_model" then
    thread_model = value
  elseif key == "fail" then
    local name, err = string.match(value, "^([%w_]+):(%d+)$")
    fails[assert(name, "fail=CALLBACK:ERRNO")] = tonumber(err)
  else
    error("unknown key " .. key)
  end
end

function config_complete()
  record("config_complete")
  for name, value in pairs(bools) do
    _G[name] = function(h) record(name); return value end
  end
  for name, value in pairs(modes) do
    _G[name] = function(h) record(name); return value end
  end
  if block then
    _G.block_size = function(h)
      record("block_size")
      return tonumber(block[1]), tonumber(block[2]), tonumber(block[3])
    end
  end
  if description then
    _G.export_description = function(h) record("export_description"); return description end
  end
  if default_name then
    _G.default_export = function(readonly, is_tls)
      record("default_export", readonly, is_tls)
      return default_name
    end
  end
  if exports then
    _G.list_exports = function(readonly, is_tls)
      record("list_exports", readonly, is_tls)
      return exports
    end
  end
  for name in pairs(omit) do _G[name] = nil end
end

function get_ready()
  record("get_ready")
  maybe_fail("get_ready")
end
function after_fork() record("after_fork") end
function cleanup() record("cleanup") end
function preconnect(readonly)
  record("preconnect", readonly)
  maybe_fail("preconnect")
end

function open(readonly)
  record("open", readonly, nbdkit.export_name())
  maybe_fail("open")
  return { readonly = readonly }
end

function close(h) record("close") end

function get_size(h)
  maybe_fail("get_size")
  return size
end

-- The disk: pages of PAGE bytes, nil = never written (a hole reading as zeroes).
local function read_bytes(count, offset)
  local parts = {}
  while count > 0 do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, count)
    parts[#parts + 1] = (pages[i] or ZERO_PAGE):sub(o + 1, o + n)
    offset, count = offset + n, count - n
  end
  return table.concat(parts)
end

local function write_bytes(buf, offset)
  local done = 0
  while done < #buf do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, #buf - done)
    local page = pages[i] or ZERO_PAGE
    pages[i] = page:sub(1, o) .. buf:sub(done + 1, done + n) .. page:sub(o + n + 1)
    offset, done = offset + n, done + n
  end
end

local function punch(count, offset)
  while count > 0 do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, count)
    if n == PAGE then pages[i] = nil
    elseif pages[i] then
      pages[i] = pages[i]:sub(1, o) .. ZERO_PAGE:sub(1, n) .. pages[i]:sub(o + n + 1)
    end
    offset, count = offset + n, count - n
  end
end

function pread(h, count, offset, flags)
  record("pread", count, offset, flags)
  maybe_fail("pread")
  return read_bytes(count, offset)
end

function pwrite(h, buf, offset, flags)
  record("pwrite", #buf, offset, flags)
  maybe_fail("pwrite")
  write_bytes(buf, offset)
end

function flush(h, flags)
  record("flush", flags)
  maybe_fail("flush")
end

function trim(h, count, offset, flags)
  record("trim", count, offset, flags)
  maybe_fail("trim")
  punch(count, offset)
end

function zero(h, count, offset, flags)
  record("zero", count, offset, flags)
  maybe_fail("zero")
  punch(count, offset)
end

function cache(h, count, offset, flags)
  record("cache", count, offset, flags)
  maybe_fail("cache")
end

-- One extent per page, starting at the page holding `offset` (so the first one may begin
-- before it) and going one page past the request (so the last may end after it): the
-- server must clip them.
function extents(h, count, offset, flags)
  record("extents", count, offset, flags)
  maybe_fail("extents")
  local out = {}
  local first = offset // PAGE
  local last = math.min((offset + count) // PAGE + 1, (size - 1) // PAGE)
  for i = first, last do
    local kind = pages[i] and 0 or (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    local len = math.min(PAGE, size - i * PAGE)
    out[#out + 1] = { i * PAGE, len, kind }
  end
  return out
end
