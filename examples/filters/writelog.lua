-- writelog.lua: log every request that changes the disk (Write, Trim, Zero, Flush) to a
-- file, in the line format of nbdkit-log-filter(1), so tools that read that log read this
-- one.  Reads are counted, not logged, so request ids are the log filter's.
--   luanbd --filter=./writelog.lua disk.lua logfile=/tmp/writes.log
-- Lua's os.date has whole seconds: the microseconds of each timestamp are 000000.
config_help = [[
logfile=<FILE>               The file to place the log in (required).
logappend=<BOOL>             True to append to the log (default false).]]

thread_model = "parallel"     -- the log lines of each call are written whole

local logfile, append, out = nil, false, nil
local connections = 0
local NAMES = {[1] = "EPERM", [5] = "EIO", [12] = "ENOMEM", [22] = "EINVAL",
               [28] = "ENOSPC", [75] = "EOVERFLOW", [95] = "ENOTSUP", [108] = "ESHUTDOWN"}

function config(next, key, value)
  if key == "logfile" then logfile = value
  elseif key == "logappend" then append = nbdkit.parse_bool(value)
  else next(key, value) end
end

function config_complete(next)
  if logfile == nil then error("writelog: logfile parameter is required", 0) end
  next()
end

function get_ready(thread_model)
  out = assert(io.open(logfile, append and "a" or "w"))
end

local function emit(h, line)
  out:write(os.date("!%Y-%m-%d %H:%M:%S"), ".000000 connection=", h.connection, " ", line,
            "\n")
  out:flush()
end

function open(next, readonly, exportname, is_tls)
  next(readonly)
  connections = connections + 1
  return {connection = connections, id = 0}
end

-- Run one request: log it (if `act` is given) before and after.
local function logged(h, act, text, fn, ...)
  h.id = h.id + 1
  local id = h.id
  if act == nil then return fn(...) end
  emit(h, string.format("%s id=%d%s ...", act, id, text ~= "" and " " .. text or ""))
  local ok, err = pcall(fn, ...)
  if ok then
    emit(h, string.format("...%s id=%d return=0", act, id))
    return
  end
  local name = type(err) == "table" and NAMES[err.errno] or "EIO"
  emit(h, string.format("...%s id=%d return=-1 error=%s", act, id, name or "EINVAL"))
  error(err, 0)                 -- the same error goes on up, errno and all
end

local function fua(flags) return flags & nbdkit.FLAG_FUA ~= 0 and 1 or 0 end
local function bit(flags, f) return flags & f ~= 0 and 1 or 0 end

function pread(next, h, count, offset, flags)
  return logged(h, nil, nil, next.pread, next, count, offset, flags)
end

function extents(next, h, count, offset, flags)
  return logged(h, nil, nil, next.extents, next, count, offset, flags)
end

function cache(next, h, count, offset, flags)
  return logged(h, nil, nil, next.cache, next, count, offset, flags)
end

function pwrite(next, h, buf, offset, flags)
  logged(h, "Write", string.format("offset=0x%x count=0x%x fua=%d", offset, #buf, fua(flags)),
         next.pwrite, next, buf, offset, flags)
end

function trim(next, h, count, offset, flags)
  logged(h, "Trim", string.format("offset=0x%x count=0x%x fua=%d", offset, count, fua(flags)),
         next.trim, next, count, offset, flags)
end

function zero(next, h, count, offset, flags)
  logged(h, "Zero", string.format("offset=0x%x count=0x%x trim=%d fua=%d fast=%d", offset,
                                  count, bit(flags, nbdkit.FLAG_MAY_TRIM), fua(flags),
                                  bit(flags, nbdkit.FLAG_FAST_ZERO)),
         next.zero, next, count, offset, flags)
end

function flush(next, h, flags)
  logged(h, "Flush", "", next.flush, next, flags)
end
