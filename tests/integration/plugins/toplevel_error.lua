-- toplevel_error.lua: a top-level statement fails while the script loads.

function open (readonly) return 1 end
function get_size (h) return 512 end
function pread (h, count, offset) return string.rep("\0", count) end

local settings = nil
local wanted = settings.size
