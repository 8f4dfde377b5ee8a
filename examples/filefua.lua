#!/usr/bin/env -S luanbd lua
-- filefua.lua: a disk backed by a file, with native FUA, cache and flush (API 2).
--
--   truncate -s 64M disk.img
--   ./examples/filefua.lua file=disk.img -U - --run 'nbdinfo "$uri"'
--   luanbd -f -v -U /tmp/s.sock examples/filefua.lua file=disk.img   (-v shows each call)
--
-- Each connection opens the file itself (read-only with luanbd -r).  Writes carrying the
-- client's FUA flag are flushed before the reply (`can_fua` says FUA_NATIVE, so the server
-- passes nbdkit.FLAG_FUA instead of calling `flush` after the write), and NBD_CMD_CACHE
-- reads the range ahead (`can_cache` says CACHE_NATIVE).
--
-- Lua's standard library has no fsync: `file:flush()` hands the data to the kernel, which
-- survives a crash of the server but not of the machine.  A plugin that needs more can
-- run `sync --data FILE` (coreutils) from flush.

API_VERSION = 2

name = "filefua"
version = "1.0"
config_help = "file=FILENAME   (required) the disk image to serve"

local filename = nil
local CHUNK = 1024 * 1024

function config(key, value)
  if key == "file" then
    filename = nbdkit.realpath(value)   -- an error if the file does not exist
  else
    error("unknown parameter " .. key .. "=" .. value)
  end
end

function config_complete()
  if filename == nil then error("file parameter is required: file=disk.img") end
  local f, err = io.open(filename, "rb")   -- fail now, not when a client connects
  if not f then error(err) end
  f:close()
end

function open(readonly)
  local f, err = io.open(filename, readonly and "rb" or "r+b")
  if not f then
    nbdkit.set_error(nbdkit.EPERM)
    error("cannot open " .. filename .. ": " .. err)
  end
  nbdkit.debug("filefua: open readonly=%s", tostring(readonly))
  return { f = f }
end

function close(h)
  h.f:close()
end

function get_size(h)
  return h.f:seek("end")
end

function can_flush(h) return true end
function can_fua(h) return nbdkit.FUA_NATIVE end
function can_cache(h) return nbdkit.CACHE_NATIVE end

function pread(h, count, offset, flags)
  h.f:seek("set", offset)
  local data = h.f:read(count)
  if data == nil or #data < count then
    nbdkit.set_error(nbdkit.EIO)
    error("short read at offset " .. offset)
  end
  return data
end

local function sync(h)
  local ok, err = h.f:flush()
  if not ok then
    nbdkit.set_error(nbdkit.EIO)
    error("flush failed: " .. tostring(err))
  end
end

function pwrite(h, buf, offset, flags)
  h.f:seek("set", offset)
  local ok, err = h.f:write(buf)
  if not ok then
    nbdkit.set_error(nbdkit.ENOSPC)
    error("write failed: " .. tostring(err))
  end
  if flags & nbdkit.FLAG_FUA ~= 0 then
    nbdkit.debug("filefua: pwrite with FUA")
    sync(h)
  end
end

function flush(h, flags)
  nbdkit.debug("filefua: flush")
  sync(h)
end

-- Read the range and throw it away: the kernel keeps it in its page cache.
function cache(h, count, offset, flags)
  nbdkit.debug("filefua: cache %d bytes at %d", count, offset)
  h.f:seek("set", offset)
  while count > 0 do
    local n = math.min(count, CHUNK)
    if h.f:read(n) == nil then break end
    count = count - n
  end
end
