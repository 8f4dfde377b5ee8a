-- truncate.lua: change the plugin's size, as nbdkit-truncate-filter(1) does.  Past the
-- plugin's end the disk reads as zeroes and takes only zeroes.
--   luanbd --filter=./truncate.lua disk.lua truncate=1G      (or round-up=4K, round-down=4K)
config_help = [[
truncate=<SIZE>                The new size.
round-up=<N>                   Round up to next multiple of N.
round-down=<N>                 Round down to multiple of N.]]

local truncate, round_up, round_down = nil, 0, 0

local function power_of_two(key, value)
  local n = nbdkit.parse_size(value)
  if n == 0 then error("if set, the " .. key .. " parameter must be > 0", 0) end
  if n > 0xffffffff then error("the " .. key .. " parameter is too large", 0) end
  if n & (n - 1) ~= 0 then error("the " .. key .. " parameter must be a power of 2", 0) end
  return n
end

function config(next, key, value)
  if key == "truncate" then truncate = nbdkit.parse_size(value)
  elseif key == "round-up" then round_up = power_of_two(key, value)
  elseif key == "round-down" then round_down = power_of_two(key, value)
  else next(key, value) end
end

-- The handle keeps both sizes, fixed at open for the whole connection.
function open(next, readonly, exportname, is_tls)
  next(readonly)
  local real = next:get_size()
  local size = truncate or real
  if round_up > 0 then
    local rounded = (size + round_up - 1) // round_up * round_up
    if rounded < size then
      error(string.format("cannot round size %d up to next boundary of %d", size, round_up), 0)
    end
    size = rounded
  end
  if round_down > 0 then size = size - size % round_down end
  return {real = real, size = size}
end

function get_size(next, h) return h.size end

function can_extents(next, h)
  next:can_extents()        -- asked, as nbdkit's filter does, though the answer is ours
  return true
end

function can_fast_zero(next, h)
  next:can_fast_zero()
  return true               -- zeroing past the plugin's end costs nothing
end

-- How many of the bytes [offset, offset+count) the plugin has.
local function inside(h, count, offset)
  if offset >= h.real then return 0 end
  return math.min(count, h.real - offset)
end

function pread(next, h, count, offset, flags)
  local n = inside(h, count, offset)
  if n == count then return next:pread(count, offset, flags) end
  local head = n > 0 and next:pread(n, offset, flags) or ""
  return head .. string.rep("\0", count - n)
end

function pwrite(next, h, buf, offset, flags)
  local n = inside(h, #buf, offset)
  if n > 0 then next:pwrite(n == #buf and buf or buf:sub(1, n), offset, flags) end
  if n < #buf and buf:find("[^%z]", n + 1) then
    nbdkit.set_error(nbdkit.ENOSPC)
    error("truncate: write beyond end of underlying device", 0)
  end
end

function trim(next, h, count, offset, flags)
  local n = inside(h, count, offset)
  if n > 0 then next:trim(n, offset, flags) end
end

function zero(next, h, count, offset, flags)
  local n = inside(h, count, offset)
  if n > 0 then
    if flags & nbdkit.FLAG_FAST_ZERO ~= 0 and not next:can_fast_zero() then
      nbdkit.set_error(nbdkit.ENOTSUP)   -- the refusal a fast zero asks for: not logged
      error("fast zero is not supported", 0)
    end
    next:zero(n, offset, flags)
  end
end

function cache(next, h, count, offset, flags)
  local n = inside(h, count, offset)
  if n > 0 then next:cache(n, offset, flags) end
end

function extents(next, h, count, offset, flags)
  if offset >= h.real then
    return {{offset = h.real, length = h.size - h.real,
             type = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO}}
  end
  local out = {}
  for _, e in ipairs(next:extents(inside(h, count, offset), offset, flags)) do
    local kept = math.min(e.offset + e.length, h.real) - e.offset
    if kept > 0 then out[#out + 1] = {offset = e.offset, length = kept, type = e.type} end
  end
  return out
end
