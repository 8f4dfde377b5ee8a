-- offset.lua: serve the byte range [offset, offset+range) of the plugin, as
-- nbdkit-offset-filter(1) does.
--   luanbd --filter=./offset.lua disk.lua offset=1M range=10M
config_help = [[
offset=<OFFSET>      The start offset to serve (default 0).
range=<LENGTH>       The total size to serve (default: rest of file).]]

local offset, range = 0, nil

function config(next, key, value)
  if key == "offset" then
    offset = nbdkit.parse_size(value)
  elseif key == "range" then
    range = nbdkit.parse_size(value)
  else
    next(key, value)              -- not ours: the next filter or the plugin takes it
  end
end

function get_size(next, h)
  local real = next:get_size()
  if range ~= nil then
    if offset > real - range then
      error(string.format("offset+range (%d+%d) is larger than the real size (%d) " ..
                          "of the underlying file or device", offset, range, real), 0)
    end
    return range
  end
  if offset > real then
    error(string.format("offset (%d) is larger than the real size (%d) of the " ..
                        "underlying file or device", offset, real), 0)
  end
  return real - offset
end

function pread(next, h, count, off, flags) return next:pread(count, off + offset, flags) end
function pwrite(next, h, buf, off, flags) return next:pwrite(buf, off + offset, flags) end
function trim(next, h, count, off, flags) return next:trim(count, off + offset, flags) end
function zero(next, h, count, off, flags) return next:zero(count, off + offset, flags) end
function cache(next, h, count, off, flags) return next:cache(count, off + offset, flags) end

function extents(next, h, count, off, flags)
  local out = {}
  for _, e in ipairs(next:extents(count, off + offset, flags)) do
    local start = e.offset - offset
    local cut = math.max(0, -start)          -- an extent that begins before our window
    if e.length > cut then
      out[#out + 1] = {offset = start + cut, length = e.length - cut, type = e.type}
    end
  end
  return out
end
