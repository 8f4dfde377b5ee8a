-- missing_pread.lua: the required callback pread is not defined.

function open (readonly) return 1 end
function get_size (h) return 512 end
