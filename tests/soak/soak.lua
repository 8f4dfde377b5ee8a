-- soak.lua: file-backed exports for the soak run (tests/soak/soak.py), parallel.
--
-- Keys:  dir=DIR     export NAME is the file DIR/NAME.img ("" is DIR/main.img); it must exist
--
-- The export "flaky" fails 1 % of its requests at random, with EIO, ENOSPC or ENOMEM.

API_VERSION = 2
thread_model = "parallel"

local dir = nil
local ERRNOS = { 5, 28, 12 }  -- EIO, ENOSPC, ENOMEM

function config (key, value)
   if key == "dir" then dir = value else error("unknown parameter: " .. key) end
end

function config_complete ()
   if dir == nil then error("dir parameter is required") end
   math.randomseed(os.time())
end

function open (readonly)
   local name = nbdkit.export_name()
   if name == "" then name = "main" end
   if not name:match("^%w+$") then error("no export " .. name) end
   local f, err = io.open(dir .. "/" .. name .. ".img", readonly and "rb" or "r+b")
   if f == nil then error(err) end
   return { f = f, flaky = name == "flaky" }
end

function close (h) h.f:close() end

function get_size (h) return h.f:seek("end") end

local function maybe_fail (h, what)
   if h.flaky and math.random(100) == 1 then
      nbdkit.set_error(ERRNOS[math.random(#ERRNOS)])
      error(what .. " failed at random")
   end
end

function pread (h, count, offset, flags)
   maybe_fail(h, "pread")
   h.f:seek("set", offset)
   local data = h.f:read(count) or ""
   if #data < count then data = data .. string.rep("\0", count - #data) end
   return data
end

function pwrite (h, buf, offset, flags)
   maybe_fail(h, "pwrite")
   h.f:seek("set", offset)
   h.f:write(buf)
end

function flush (h, flags)
   maybe_fail(h, "flush")
   h.f:flush()
end

function can_flush (h) return true end
