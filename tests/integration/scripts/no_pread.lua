-- no_pread.lua: get_size and open but no pread (a required callback).
function open(readonly) return 1 end
function get_size(h) return 512 end
