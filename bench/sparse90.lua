-- bench/sparse90.lua: a 1 GiB disk of which every tenth MiB is data ("d"), the rest holes
-- that read as zeroes; extents say so.  For bench/sparse_reads.py.
API_VERSION = 2
local SIZE = 1024 * 1024 * 1024
local M = 1024 * 1024
local DATA = string.rep("d", M)
local ZERO = string.rep("\0", M)

local function is_data(mb) return mb % 10 == 0 end

function open(readonly) return 1 end
function get_size(h) return SIZE end

function pread(h, count, offset, flags)
  local parts, pos, stop = {}, offset, offset + count
  while pos < stop do
    local mb = pos // M
    local n = math.min((mb + 1) * M, stop) - pos
    parts[#parts + 1] = (is_data(mb) and DATA or ZERO):sub(1, n)
    pos = pos + n
  end
  return table.concat(parts)
end

function extents(h, count, offset, flags)
  local out, pos = {}, offset - offset % M
  while pos < offset + count do
    out[#out + 1] = { pos, M, is_data(pos // M) and 0 or 3 }
    pos = pos + M
  end
  return out
end
