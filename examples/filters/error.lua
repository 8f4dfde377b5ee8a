-- error.lua: inject errors into requests, as nbdkit-error-filter(1) does.
--   luanbd --filter=./error.lua disk.lua error=ENOSPC error-rate=10% error-file=/tmp/inject
--   (error-pread=, error-pread-rate=, error-pread-file= ... for one kind of request)
config_help = [[
error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN
                               The error indication to return.
error-rate=0%..100%|0..1       Rate of errors to generate.
error-file=TRIGGER             Set trigger filename.
error-pread*, error-pwrite*, error-trim*, error-zero*, error-extents*
                               Apply settings only to read/write/etc]]

local ERRORS = {EPERM = 1, EIO = 5, ENOMEM = 12, EINVAL = 22, ENOSPC = 28, ESHUTDOWN = 108}
local CALLS = {"pread", "pwrite", "trim", "zero", "extents", "cache"}
local settings = {}
for _, call in ipairs(CALLS) do settings[call] = {error = "EIO", rate = 0, file = nil} end

local function parse_rate(key, value)
  local number, percent = value:match("^%s*([^%%]+)(%%?)$")
  local d = tonumber(number or "")
  if d == nil then error(key .. ": could not parse rate '" .. value .. "'", 0) end
  if percent == "%" then d = d / 100 end
  if d < 0 or d > 1 then
    error(string.format("%s: rate out of range: '%s' parsed as %g", key, value, d), 0)
  end
  return d
end

function config(next, key, value)
  -- error[-CALL][-rate|-file]
  local rest = key:match("^error(.*)$")
  if rest == nil then return next(key, value) end
  local calls = CALLS
  local call, what = rest:match("^%-(%a+)(.*)$")
  if call ~= nil and settings[call] ~= nil then
    calls, rest = {call}, what
  end
  local set
  if rest == "" then
    if ERRORS[value] == nil then error(key .. ": unknown error name '" .. value .. "'", 0) end
    set = function(s) s.error = value end
  elseif rest == "-rate" then
    local rate = parse_rate(key, value)
    set = function(s) s.rate = rate end
  elseif rest == "-file" then
    local path = nbdkit.absolute_path(value)
    set = function(s) s.file = path end
  else
    return next(key, value)
  end
  for _, c in ipairs(calls) do set(settings[c]) end
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

local function inject(call)
  local s = settings[call]
  if s.rate <= 0 then return end
  if s.file ~= nil and not exists(s.file) then return end
  if s.rate < 1 and math.random() >= s.rate then return end
  nbdkit.set_error(ERRORS[s.error])
  error("injecting " .. s.error .. " error into " .. call, 0)
end

function pread(next, h, count, offset, flags)
  inject("pread"); return next:pread(count, offset, flags)
end
function pwrite(next, h, buf, offset, flags)
  inject("pwrite"); return next:pwrite(buf, offset, flags)
end
function trim(next, h, count, offset, flags)
  inject("trim"); return next:trim(count, offset, flags)
end
function zero(next, h, count, offset, flags)
  inject("zero"); return next:zero(count, offset, flags)
end
function extents(next, h, count, offset, flags)
  inject("extents"); return next:extents(count, offset, flags)
end
function cache(next, h, count, offset, flags)
  inject("cache"); return next:cache(count, offset, flags)
end
