#!/usr/sbin/nbdkit lua
-- shebang.lua: a first line starting with # is skipped, and line numbers
-- still count it.  Any pread fails.

function open (readonly) return 1 end
function get_size (h) return 4096 end
function pread (h, count, offset)
   error("shebang pread failure")
end
