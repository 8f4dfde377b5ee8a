#!/usr/bin/env -S luanbd lua
-- A disk backed by a file, written against the 2018 seed API (runs under nbdkit lua too).
--
--   truncate -s 1G disk.img
--   luanbd -f -U /tmp/s.sock examples/file.lua file=disk.img
--   luanbd -r ... examples/file.lua file=disk.img      (read-only)

local filename = nil
local fh = nil

function config(key, value)
   if key == "file" then
      filename = value
   else
      error("unknown parameter " .. key .. "=" .. value)
   end
end

function config_complete()
   if filename == nil then
      error("file parameter is required: file=disk.img")
   end
   -- Open once at start-up so a missing file is a start-up error, not a client's problem.
   local f, err = io.open(filename, "r+b")
   if not f then f, err = io.open(filename, "rb") end
   if not f then error("cannot open " .. filename .. ": " .. err) end
   fh = f
end

function open(readonly)
   return fh
end

function get_size(h)
   return h:seek("end")
end

function pread(h, count, offset)
   h:seek("set", offset)
   local data = h:read(count)
   if data == nil or #data < count then
      error("short read at offset " .. offset)
   end
   return data
end

function pwrite(h, buf, offset)
   h:seek("set", offset)
   local ok, err = h:write(buf)
   if not ok then error("write failed: " .. err) end
end

function flush(h)
   h:flush()
end

function zero(h, count, offset, may_trim)
   h:seek("set", offset)
   local chunk = string.rep("\0", math.min(count, 1024 * 1024))
   while count > 0 do
      local n = math.min(count, #chunk)
      h:write(n == #chunk and chunk or chunk:sub(1, n))
      count = count - n
   end
end
