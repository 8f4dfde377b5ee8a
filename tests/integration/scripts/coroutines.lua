-- coroutines.lua: callbacks that use coroutines, properly and improperly (API 2).
-- Used by test_faults.py.  Written for every Lua runtime (no // or bit operators).
--
-- The disk is 1 MiB of 512-byte sectors; what a read returns depends on its sector:
--   sector 0     pread calls coroutine.yield() itself, outside any coroutine: an error
--   sector 1     a coroutine.wrap generator yields the bytes one by one: "gen-" repeated
--   sector 2     a coroutine kept between calls yields 1, 2, 3 ...: the next number
--                (as text, padded with spaces), so state survives across requests
--   sector 3     a coroutine yields from inside a pcall (Lua 5.2+; an error in 5.1)
--   elsewhere    zeroes
-- open() for the export named "yield" also calls coroutine.yield() outside a coroutine.

API_VERSION = 2

local SECTOR = 512

local counter = coroutine.create(function()
  local n = 0
  while true do
    n = n + 1
    coroutine.yield(n)
  end
end)

function open(readonly)
  if nbdkit.export_name() == "yield" then coroutine.yield("from open") end
  return {}
end

function get_size(h) return 1024 * 1024 end

local function generated(count)
  local text = "gen-"
  local gen = coroutine.wrap(function()
    for i = 1, count do
      local k = (i - 1) % #text + 1
      coroutine.yield(text:sub(k, k))
    end
  end)
  local parts = {}
  for i = 1, count do parts[i] = gen() end
  return table.concat(parts)
end

local function pad(text, count)
  return (text .. string.rep(" ", count)):sub(1, count)
end

function pread(h, count, offset, flags)
  local sector = math.floor(offset / SECTOR)
  if sector == 0 then
    coroutine.yield("from pread")
  elseif sector == 1 then
    return generated(count)
  elseif sector == 2 then
    local ok, n = coroutine.resume(counter)
    assert(ok, n)
    return pad(tostring(n), count)
  elseif sector == 3 then
    local co = coroutine.create(function()
      local ok, v = pcall(function() return coroutine.yield("p") end)
      if not ok then error(v, 0) end
      return v
    end)
    local _, a = coroutine.resume(co)
    local ok, b = coroutine.resume(co, "q")
    if not ok then error(b, 0) end
    return pad(a .. b, count)
  end
  return string.rep("\0", count)
end
