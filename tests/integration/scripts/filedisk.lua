-- filedisk.lua: a disk backed by a file, like examples/file.lua but written against API 2
-- so that an I/O error reaches the client with its own errno, and with its lifecycle
-- callbacks recorded.  Used by test_faults.py.
--
--   file=PATH     the backing file (required); opened unbuffered, read-write unless readonly=1
--   size=SIZE     export size (default: the file's size; /dev/full and /proc/self/mem
--                 have none)
--   readonly=1    open the file read-only; can_write is false
--   closed=1      close the file before serving: every data call then raises Lua's
--                 "attempt to use a closed file" (an error without an errno)
--   log=PATH      append one line per open, close, cleanup and unload callback
--
-- Lua's io functions return nil, message, errno on failure; each such failure becomes
-- nbdkit.set_error(errno) then error("CALL at OFFSET: message"), so a full disk (ENOSPC)
-- or a failing device (EIO) reaches the client as itself.

API_VERSION = 2

local filename, size, readonly, closed, log_path = nil, nil, false, false, nil
local fh = nil

function config(key, value)
  if key == "file" then
    filename = value
  elseif key == "size" then
    size = nbdkit.parse_size(value)
  elseif key == "readonly" then
    readonly = nbdkit.parse_bool(value)
  elseif key == "closed" then
    closed = nbdkit.parse_bool(value)
  elseif key == "log" then
    log_path = value
  else
    error("unknown parameter " .. key .. "=" .. value)
  end
end

local function record(line)
  if log_path then
    local f = assert(io.open(log_path, "a"))
    f:write(line, "\n")
    f:close()
  end
end

function config_complete()
  if filename == nil then error("file parameter is required: file=disk.img") end
  local f, msg = io.open(filename, readonly and "rb" or "r+b")
  if not f then error("cannot open " .. msg) end
  -- Unbuffered: a write that returns has reached the kernel, and a failing write fails
  -- in pwrite, not in some later flush.
  f:setvbuf("no")
  if size == nil then size = f:seek("end") end
  fh = f
end

function get_ready()
  if closed then fh:close() end
end

-- An io call failed with (message, errno): send the errno to the client.
local function failed(call, offset, msg, errno)
  if errno then nbdkit.set_error(errno) end
  error(string.format("%s at %d: %s", call, offset, tostring(msg)), 0)
end

function open(ro)
  record("open")
  return {}
end

function close(h) record("close") end

function cleanup() record("cleanup") end

function unload()
  record("unload")
  if io.type(fh) == "file" then fh:close() end
end

function get_size(h) return size end

function can_write(h) return not readonly end

function pread(h, count, offset, flags)
  local ok, msg, errno = fh:seek("set", offset)  -- pread
  if not ok then failed("seek", offset, msg, errno) end
  local data
  data, msg, errno = fh:read(count)
  if data == nil and msg == nil then
    data = ""                                        -- end of file
  elseif data == nil then
    failed("read", offset, msg, errno)
  end
  if #data < count then
    nbdkit.set_error(nbdkit.EIO)
    error(string.format("short read at %d: %d of %d bytes", offset, #data, count), 0)
  end
  return data
end

function pwrite(h, buf, offset, flags)
  local ok, msg, errno = fh:seek("set", offset)
  if not ok then failed("seek", offset, msg, errno) end
  ok, msg, errno = fh:write(buf)
  if not ok then failed("write", offset, msg, errno) end
end

function flush(h, flags)
  local ok, msg, errno = fh:flush()
  if not ok then failed("flush", 0, msg, errno) end
end
