-- noconfig.lua: the required callbacks only; no config function.
function open(readonly) return 1 end
function get_size(h) return 512 end
function pread(h, count, offset) return string.rep("\0", count) end
