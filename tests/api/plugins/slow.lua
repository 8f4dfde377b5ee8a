-- slow.lua: every pread takes a while (a `sleep` subprocess) and records when it starts
-- and ends into log=PATH, tagged with the export name, so a test can see whether calls
-- of two connections ever overlapped.  Twin: slow.py.
--   thread_model=MODEL   the thread_model global (default: unset)
--   delay=SECONDS        how long each pread takes (default 0.3)
API_VERSION = 2

local log_path = nil
local delay = "0.3"

function config(key, value)
  if key == "log" then log_path = value
  elseif key == "thread_model" then thread_model = value
  elseif key == "delay" then delay = value
  else error("unknown key " .. key) end
end

local function record(what)
  local f = assert(io.open(log_path, "a"))
  f:write(what, "\n")
  f:close()
end

function open(readonly) return { name = nbdkit.export_name() } end

function get_size(h) return 1024 * 1024 end

function pread(h, count, offset, flags)
  record("enter " .. h.name)
  os.execute("sleep " .. delay)
  record("leave " .. h.name)
  return string.rep("\0", count)
end
