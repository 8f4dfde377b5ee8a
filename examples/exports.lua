#!/usr/bin/env -S luanbd lua
-- exports.lua: several RAM disks behind one server, chosen by export name (API 2).
--
--   ./examples/exports.lua -U - --run 'nbdinfo --list "$uri"'
--   ./examples/exports.lua export=db:16M:database export=logs:1M -U - \
--       --run 'nbdsh -u "nbd+unix:///logs?socket=$unixsocket" -c "print(h.get_size())"'
--
--   export=NAME:SIZE[:DESCRIPTION]   add an export (repeatable); without any, the exports
--                                    "alpha" (1M, described) and "beta" (2M) are served
--   default=NAME                     the export a client gets when it asks for ""
--                                    (default: the first one)
--
-- Unwritten bytes of an export read as its name repeated, so a client can tell which
-- export it is looking at.  All connections to one export share its data.

API_VERSION = 2

name = "exports"
version = "1.0"
config_help = "export=NAME:SIZE[:DESCRIPTION]  (repeatable) an export\n" ..
              "default=NAME                    the default export"

local exports = {}             -- in order: { name=, size=, description=, data={} }
local by_name = {}
local default_name = nil

local function add(name, size, description)
  if by_name[name] then error("export " .. name .. " given twice") end
  local e = { name = name, size = size, description = description, data = {} }
  exports[#exports + 1] = e
  by_name[name] = e
end

function config(key, value)
  if key == "export" then
    local name, size, description = value:match("^([^:]+):([^:]+):?(.*)$")
    if not name then error("export=NAME:SIZE[:DESCRIPTION], not " .. value) end
    add(name, nbdkit.parse_size(size), description ~= "" and description or nil)
  elseif key == "default" then
    default_name = value
  else
    error("unknown parameter " .. key .. "=" .. value)
  end
end

function config_complete()
  if #exports == 0 then
    add("alpha", 1024 * 1024, "the first disk")
    add("beta", 2 * 1024 * 1024, nil)
  end
  default_name = default_name or exports[1].name
  if not by_name[default_name] then error("default=" .. default_name .. ": no such export") end
end

-- NBD_OPT_LIST: a bare name, or a table when there is a description to show.
function list_exports(readonly, is_tls)
  local out = {}
  for _, e in ipairs(exports) do
    if e.description then
      out[#out + 1] = { name = e.name, description = e.description }
    else
      out[#out + 1] = e.name
    end
  end
  return out
end

-- The canonical name of the export "" (what nbdinfo shows as export="...").
function default_export(readonly, is_tls)
  return default_name
end

function open(readonly)
  local wanted = nbdkit.export_name()  -- already the default's name if the client sent ""
  local e = by_name[wanted]
  if not e then
    nbdkit.set_error(nbdkit.ENOENT)
    error("no export named '" .. wanted .. "'")
  end
  nbdkit.debug("exports: open %s readonly=%s", wanted, tostring(readonly))
  return e
end

function export_description(h)
  return h.description or string.format("%s, %d bytes", h.name, h.size)
end

function get_size(h) return h.size end

local SECTOR = 512

local function sector(h, i)
  local s = h.data[i]
  if s then return s end
  local pattern = string.rep(h.name, SECTOR // #h.name + 2)
  local start = (i * SECTOR) % #h.name
  return pattern:sub(start + 1, start + SECTOR)
end

function pread(h, count, offset, flags)
  local parts = {}
  local first, last = offset // SECTOR, (offset + count - 1) // SECTOR
  for i = first, last do parts[#parts + 1] = sector(h, i) end
  local s = table.concat(parts)
  local skip = offset - first * SECTOR
  return s:sub(skip + 1, skip + count)
end

function pwrite(h, buf, offset, flags)
  local done = 0
  while done < #buf do
    local i, o = offset // SECTOR, offset % SECTOR
    local n = math.min(SECTOR - o, #buf - done)
    local s = sector(h, i)
    h.data[i] = s:sub(1, o) .. buf:sub(done + 1, done + n) .. s:sub(o + n + 1)
    offset, done = offset + n, done + n
  end
end

function can_multi_conn(h) return true end
