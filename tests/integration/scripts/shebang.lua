#!/usr/bin/env -S luanbd lua
-- shebang.lua: run directly as an executable (the tests copy it and set the
-- mode).  The first line is skipped but counted, so the error below is
-- reported at line 12.  size= sets the disk size.

local size = 4096

function config(key, value) size = tonumber(value) end
function open(readonly) return 1 end
function get_size(h) return size end
function pread(h, count, offset)
   error("shebang pread failure")
end
