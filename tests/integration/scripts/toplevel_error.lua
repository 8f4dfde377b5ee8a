-- toplevel_error.lua: a statement at the top level fails while loading.
function open(readonly) return 1 end
function get_size(h) return 512 end
function pread(h, count, offset) return string.rep("\0", count) end
error("top level failure")
