#!/usr/bin/env -S luanbd lua
-- errors.lua: a disk that fails on purpose, with the errno you choose (API 2).
-- Handy for testing how a client copes with ENOSPC, EPERM, EIO ...
--
--   ./examples/errors.lua pwrite=ENOSPC -U - \
--       --run 'nbdsh -u "$uri" -c "h.pwrite(b\"x\" * 512, 0)"'      -> No space left on device
--   ./examples/errors.lua bad=1M-2M:EIO size=4M -U - --run 'nbdcopy "$uri" out.img'
--
--   size=SIZE                       disk size (default 16M); the disk reads as zeroes
--   CALLBACK=ERRNO                  CALLBACK (pread, pwrite, flush, trim, zero, cache,
--                                   extents or open) always fails with ERRNO, a name
--                                   such as ENOSPC (any nbdkit.E* constant)
--   bad=START-END:ERRNO             any pread, pwrite, trim, zero or cache touching the
--                                   bytes START..END-1 fails with ERRNO (repeatable)
--
-- Each failure is `nbdkit.set_error(errno)` followed by `error(message)`: the message goes
-- to the server's log, the errno to the client (mapped to an NBD error the way nbdkit
-- does it: EROFS becomes EPERM, EFBIG becomes ENOSPC, ENOTSUP and unknown ones EINVAL...).

API_VERSION = 2

name = "errors"
version = "1.0"
config_help = "size=SIZE  CALLBACK=ERRNO  bad=START-END:ERRNO   (see the script)"

local size = 16 * 1024 * 1024
local always = {}              -- callback name -> errno
local bad = {}                 -- { first=, last=, errno=, name= }
local written = {}             -- offset -> data of writes that succeeded (by 512-byte sector)

local CALLBACKS = {
  pread = true, pwrite = true, flush = true, trim = true, zero = true, cache = true,
  extents = true, open = true,
}

local function errno_of(text)
  local value = nbdkit[text]
  if not text:match("^E[A-Z]+$") or type(value) ~= "number" then
    error("unknown errno name " .. text .. " (try ENOSPC, EIO, EPERM ...)")
  end
  return value
end

function config(key, value)
  if key == "size" then
    size = nbdkit.parse_size(value)
  elseif CALLBACKS[key] then
    always[key] = errno_of(value)
  elseif key == "bad" then
    local first, last, name = value:match("^([^-]+)-([^:]+):(%u+)$")
    if not first then error("bad=START-END:ERRNO, not " .. value) end
    first, last = nbdkit.parse_size(first), nbdkit.parse_size(last)
    if last <= first then error("bad=" .. value .. ": END must be after START") end
    bad[#bad + 1] = { first = first, last = last, errno = errno_of(name), name = name }
  else
    error("unknown parameter " .. key .. "=" .. value)
  end
end

local function check(callback, count, offset)
  local err = always[callback]
  if err then
    nbdkit.set_error(err)
    error(callback .. " fails as configured")
  end
  if count then
    for _, b in ipairs(bad) do
      if offset < b.last and offset + count > b.first then
        nbdkit.set_error(b.errno)
        error(string.format("%s at %d touches bad range %d-%d (%s)",
                            callback, offset, b.first, b.last, b.name))
      end
    end
  end
end

function open(readonly)
  check("open")
  return {}
end

function get_size(h) return size end

function can_cache(h) return nbdkit.CACHE_NATIVE end

local SECTOR = 512
local ZERO = string.rep("\0", SECTOR)

function pread(h, count, offset, flags)
  check("pread", count, offset)
  local parts = {}
  local first = offset // SECTOR
  for i = first, (offset + count - 1) // SECTOR do parts[#parts + 1] = written[i] or ZERO end
  local s = table.concat(parts)
  local skip = offset - first * SECTOR
  return s:sub(skip + 1, skip + count)
end

function pwrite(h, buf, offset, flags)
  check("pwrite", #buf, offset)
  local done = 0
  while done < #buf do
    local i, o = offset // SECTOR, offset % SECTOR
    local n = math.min(SECTOR - o, #buf - done)
    local s = written[i] or ZERO
    written[i] = s:sub(1, o) .. buf:sub(done + 1, done + n) .. s:sub(o + n + 1)
    offset, done = offset + n, done + n
  end
end

function flush(h, flags) check("flush") end

local function clear(count, offset)
  for i = offset // SECTOR, (offset + count - 1) // SECTOR do
    local s = written[i]
    if s then
      local lo = math.max(offset, i * SECTOR) - i * SECTOR
      local hi = math.min(offset + count, (i + 1) * SECTOR) - i * SECTOR
      written[i] = s:sub(1, lo) .. ZERO:sub(1, hi - lo) .. s:sub(hi + 1)
    end
  end
end

function trim(h, count, offset, flags)
  check("trim", count, offset)
  clear(count, offset)
end

function zero(h, count, offset, flags)
  check("zero", count, offset)
  clear(count, offset)
end

function cache(h, count, offset, flags) check("cache", count, offset) end

function extents(h, count, offset, flags)
  check("extents")
  return { { offset, count, 0 } }
end
