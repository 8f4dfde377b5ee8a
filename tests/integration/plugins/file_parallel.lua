-- file_parallel.lua: file.lua under the parallel thread model (each connection has its
-- own Lua state; their callbacks run at the same time), for filters' thread-safety tests.
--
-- Keys:  file=PATH           the file to serve (required); it is opened read-write
--
-- API 2: luanbd reads `thread_model` only there (API 1 scripts are serialize_all_requests,
-- as under nbdkit lua 1.32); the data callbacks take the extra flags argument and ignore it.

API_VERSION = 2
thread_model = "parallel"

local path = nil

function config (key, value)
   if key == "file" then
      path = value
   else
      error("unknown parameter: " .. key)
   end
end

function config_complete ()
   if path == nil then error("file parameter is required") end
end

function open (readonly)
   local f, err = io.open(path, readonly and "rb" or "r+b")
   if f == nil then error(err) end
   return { f = f }
end

function close (h)
   h.f:close()
end

function get_size (h)
   return h.f:seek("end")
end

function pread (h, count, offset)
   h.f:seek("set", offset)
   local data = h.f:read(count) or ""
   if #data < count then data = data .. string.rep("\0", count - #data) end
   return data
end

function pwrite (h, buf, offset)
   h.f:seek("set", offset)
   h.f:write(buf)
end

function flush (h)
   h.f:flush()
end

function can_flush (h)
   return true
end
