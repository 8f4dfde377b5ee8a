-- nozero.lua: decide how WRITE_ZEROES reaches the plugin, as nbdkit-nozero-filter(1) does.
--   luanbd --filter=./nozero.lua disk.lua zeromode=emulate fastzeromode=slow
config_help = [[
zeromode=<MODE>      One of 'none' (default), 'emulate', 'notrim', 'plugin'.
fastzeromode=<MODE>  One of 'default', 'none', 'slow', 'ignore'.]]

local ZEROMODES = {none = true, emulate = true, notrim = true, plugin = true}
local FASTZEROMODES = {default = true, none = true, slow = true, ignore = true}
local zeromode, fastzeromode = "none", "default"
local CHUNK = 1024 * 1024
local zeroes = string.rep("\0", CHUNK)

function config(next, key, value)
  if key == "zeromode" then
    if not ZEROMODES[value] then error("unknown zeromode '" .. value .. "'", 0) end
    zeromode = value
  elseif key == "fastzeromode" then
    if not FASTZEROMODES[value] then error("unknown fastzeromode '" .. value .. "'", 0) end
    fastzeromode = value
  else
    next(key, value)
  end
end

-- The modes that forward zero need one below (emulated by the plugin layer is enough).
function prepare(next, h, readonly)
  if not readonly and (zeromode == "notrim" or zeromode == "plugin")
     and next:can_zero() == nbdkit.ZERO_NONE then
    error("zeromode '" .. zeromode .. "' requires plugin zero support", 0)
  end
end

function can_zero(next, h)
  if zeromode == "none" then return nbdkit.ZERO_NONE end
  if zeromode == "emulate" then return nbdkit.ZERO_NATIVE end   -- our zero below
  return next:can_zero()
end

function can_fast_zero(next, h)
  if zeromode == "none" then return false end
  if zeromode ~= "emulate" and fastzeromode == "default" then return next:can_fast_zero() end
  return fastzeromode ~= "none"
end

local function refuse_fast_zero()
  nbdkit.set_error(nbdkit.ENOTSUP)    -- the refusal a fast zero asks for: not logged
  error("fast zero is not supported", 0)
end

function zero(next, h, count, offset, flags)
  if flags & nbdkit.FLAG_FAST_ZERO ~= 0 then
    if fastzeromode == "slow" or zeromode == "emulate" then refuse_fast_zero() end
    if fastzeromode == "ignore" then flags = flags & ~nbdkit.FLAG_FAST_ZERO end
  end
  if zeromode == "notrim" then flags = flags & ~nbdkit.FLAG_MAY_TRIM end
  if zeromode ~= "emulate" then return next:zero(count, offset, flags) end
  -- emulate: write zeroes, with FUA on the writes or one flush after
  local writeflags, need_flush = 0, false
  if flags & nbdkit.FLAG_FUA ~= 0 then
    if next:can_fua() == nbdkit.FUA_EMULATE then need_flush = true
    else writeflags = nbdkit.FLAG_FUA end
  end
  while count > 0 do
    local n = math.min(count, CHUNK)
    next:pwrite(n == CHUNK and zeroes or zeroes:sub(1, n), offset, writeflags)
    offset, count = offset + n, count - n
  end
  if need_flush then next:flush() end
end
