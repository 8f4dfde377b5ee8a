-- parallel_ram.lua: a small RAM disk that declares thread_model = "parallel", so luanbd
-- gives each connection a Lua state of its own (docs/lua-plugins.md, "Thread model").
-- The pages live in that state: each connection sees its own disk, which is all the
-- many-clients tests need (they measure what a connection costs, not sharing).
--   size=N   disk size in bytes (default 64 MiB)
API_VERSION = 2
thread_model = "parallel"

local PAGE = 4096
local ZERO = string.rep("\0", PAGE)
local size = 64 * 1024 * 1024
local pages = {}

function config(key, value)
  if key == "size" then size = nbdkit.parse_size(value)
  else error("unknown parameter " .. key) end
end

function open(readonly) return {} end

function get_size(h) return size end

function pread(h, count, offset, flags)
  local parts = {}
  while count > 0 do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, count)
    parts[#parts + 1] = (pages[i] or ZERO):sub(o + 1, o + n)
    offset, count = offset + n, count - n
  end
  return table.concat(parts)
end

function pwrite(h, buf, offset, flags)
  local done = 0
  while done < #buf do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, #buf - done)
    local page = pages[i] or ZERO
    pages[i] = page:sub(1, o) .. buf:sub(done + 1, done + n) .. page:sub(o + n + 1)
    offset, done = offset + n, done + n
  end
end
