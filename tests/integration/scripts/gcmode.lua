-- Reads return the Lua collector's mode ("incremental" or "generational"), padded with spaces.
function open(readonly) return 1 end
function get_size(h) return 512 end
function pread(h, count, offset)
   local mode = collectgarbage("incremental")  -- returns the previous mode
   collectgarbage(mode)
   return (mode .. string.rep(" ", count)):sub(1, count)
end
