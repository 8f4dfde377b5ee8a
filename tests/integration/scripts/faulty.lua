-- faulty.lua: an API 2 RAM disk that defines every callback, any of which fails on demand.
-- Used by test_faults.py (errors and wrong return types in each callback).
--
--   fail=NAME            callback NAME raises error("NAME failed on purpose")
--   bad=NAME             callback NAME returns a value of the wrong type (WRONG below)
--   when=always          (default) every call of NAME misbehaves
--   when=once            only the first call of NAME misbehaves; later calls work
--   when=bad-export      only calls made for the export named "bad" misbehave
--   error=tostring-raises   raise, instead of a message, an error object whose __tostring
--                        metamethod itself raises (give this key before fail=config)
--   size=SIZE            disk size (default 1M)
--   log=PATH             append the name of each lifecycle callback to PATH
--
-- `load` runs before `config`: the environment variable FAULTY_FAIL=NAME is a `fail=NAME`
-- that is known from the start.
--
-- Every injected error() is on the single line that contains 'failed on purpose', so the
-- tests can find its line number.

API_VERSION = 2

local SECTOR = 512
local ZERO = string.rep("\0", SECTOR)
local size = 1024 * 1024
local fails, bads = {}, {}
local when = "always"
local error_kind = "message"
local counts = {}
local log_path = nil
local sectors = {}

if os.getenv("FAULTY_FAIL") then fails[os.getenv("FAULTY_FAIL")] = true end

-- What bad=NAME returns instead of a proper answer.
local WRONG = {
  get_size = "lots",                 -- not a number
  block_size = 512,                  -- one value instead of three
  can_write = 1, can_flush = 1, can_trim = 1, can_zero = 1, can_fast_zero = 1,
  can_extents = 1, can_multi_conn = 1, is_rotational = 1,   -- not booleans
  can_fua = 7, can_cache = 7,        -- not a mode
  export_description = 42,           -- not a string
  default_export = 42,               -- not a string
  list_exports = "a,b",              -- not a table
  extents = 42,                      -- not a table
  thread_model = 42,                 -- not a model name
  pread = {},                        -- not a string
}

local function record(name)
  if log_path then
    local f = assert(io.open(log_path, "a"))
    f:write(name, "\n")
    f:close()
  end
end

local function trips(name)
  counts[name] = (counts[name] or 0) + 1
  if when == "once" then return counts[name] == 1 end
  if when == "bad-export" then return nbdkit.export_name() == "bad" end
  return true
end

-- Raise if NAME is to fail; true if NAME is to return its wrong value.
local function misbehaves(name)
  if fails[name] and trips(name) then
    if error_kind == "tostring-raises" then
      error(setmetatable({}, { __tostring = function()
        error("the __tostring of " .. name .. "'s error object fails too", 0)
      end }))
    end
    error(name .. " failed on purpose")
  end
  return bads[name] ~= nil and trips(name)
end

function load() misbehaves("load") end

function config(key, value)
  if key == "fail" then
    fails[value] = true
  elseif key == "bad" then
    assert(WRONG[value] ~= nil, "no wrong value for " .. value)
    bads[value] = true
  elseif key == "when" then
    when = value
  elseif key == "error" then
    error_kind = value
  elseif key == "size" then
    size = nbdkit.parse_size(value)
  elseif key == "log" then
    log_path = value
  else
    error("unknown parameter " .. key)
  end
  misbehaves("config")
end

function config_complete() misbehaves("config_complete") end

function thread_model()
  if misbehaves("thread_model") then return WRONG.thread_model end
  return "serialize_all_requests"
end

function get_ready() misbehaves("get_ready") end
function after_fork() misbehaves("after_fork") end
function dump_plugin()
  print("faulty_dump=1")
  misbehaves("dump_plugin")
end
function cleanup() record("cleanup"); misbehaves("cleanup") end
function unload() record("unload"); misbehaves("unload") end

function preconnect(readonly) misbehaves("preconnect") end

function list_exports(readonly, is_tls)
  if misbehaves("list_exports") then return WRONG.list_exports end
  return { "", { name = "bad", description = "the export that misbehaves" } }
end

function default_export(readonly, is_tls)
  if misbehaves("default_export") then return WRONG.default_export end
  return ""
end

function open(readonly)
  record("open")
  misbehaves("open")
  return { name = nbdkit.export_name() }
end

function close(h) record("close"); misbehaves("close") end

function export_description(h)
  if misbehaves("export_description") then return WRONG.export_description end
  return "faulty disk"
end

function get_size(h)
  if misbehaves("get_size") then return WRONG.get_size end
  return size
end

function block_size(h)
  if misbehaves("block_size") then return WRONG.block_size end
  return 1, 4096, 0xffffffff
end

local function capability(name, answer)
  _G[name] = function(h)
    if misbehaves(name) then return WRONG[name] end
    return answer
  end
end

capability("can_write", true)
capability("can_flush", true)
capability("can_trim", true)
capability("can_zero", true)
capability("can_fast_zero", false)
capability("can_extents", true)
capability("can_multi_conn", false)
capability("is_rotational", false)
capability("can_fua", nbdkit.FUA_EMULATE)
capability("can_cache", nbdkit.CACHE_NATIVE)

local function read_bytes(count, offset)
  local parts = {}
  local first = offset // SECTOR
  for i = first, (offset + count - 1) // SECTOR do parts[#parts + 1] = sectors[i] or ZERO end
  local skip = offset - first * SECTOR
  return table.concat(parts):sub(skip + 1, skip + count)
end

local function write_bytes(buf, offset)
  local done = 0
  while done < #buf do
    local i, o = offset // SECTOR, offset % SECTOR
    local n = math.min(SECTOR - o, #buf - done)
    local s = sectors[i] or ZERO
    sectors[i] = s:sub(1, o) .. buf:sub(done + 1, done + n) .. s:sub(o + n + 1)
    offset, done = offset + n, done + n
  end
end

function pread(h, count, offset, flags)
  if misbehaves("pread") then return WRONG.pread end
  return read_bytes(count, offset)
end

function pwrite(h, buf, offset, flags)
  misbehaves("pwrite")
  write_bytes(buf, offset)
end

function flush(h, flags) misbehaves("flush") end

function trim(h, count, offset, flags)
  misbehaves("trim")
  write_bytes(string.rep("\0", count), offset)
end

function zero(h, count, offset, flags)
  misbehaves("zero")
  write_bytes(string.rep("\0", count), offset)
end

function cache(h, count, offset, flags) misbehaves("cache") end

function extents(h, count, offset, flags)
  if misbehaves("extents") then return WRONG.extents end
  return { { offset, count, 0 } }
end
