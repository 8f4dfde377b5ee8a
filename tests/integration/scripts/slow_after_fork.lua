-- slow_after_fork.lua: an API 2 disk whose after_fork callback takes a while
-- (busy for secs= seconds, default 2).  By then the socket listens and the
-- pidfile is written, so a supervisor may already send SIGTERM.

API_VERSION = 2

local secs = 2

function config(key, value) secs = tonumber(value) end

function after_fork()
   local start = os.clock()
   while os.clock() - start < secs do end
end

function open(readonly) return {} end
function get_size(h) return 4096 end
function pread(h, count, offset, flags) return string.rep("\0", count) end
