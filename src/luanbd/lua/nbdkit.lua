-- The Lua half of luanbd's binding, run in every plugin's Lua state before the script.
-- It builds the global `nbdkit` table and returns the function through which every callback
-- is called.  `py` holds the few primitives that must be done in Python (nbdkit_table.py).
local py = ...
local type, tostring, pcall, error, select = type, tostring, pcall, error, select
local getmetatable, format, floor, ipairs = getmetatable, string.format, math.floor, ipairs

local nbdkit = {
  -- errno values (Linux), as nbdkit plugins know them
  EPERM = 1, ENOENT = 2, EIO = 5, ENOMEM = 12, EINVAL = 22, EFBIG = 27, ENOSPC = 28,
  EROFS = 30, EOVERFLOW = 75, ENOTSUP = 95, EOPNOTSUPP = 95, ESHUTDOWN = 108,
  -- flags passed to data callbacks (nbdkit-plugin(3) NBDKIT_FLAG_*)
  FLAG_MAY_TRIM = 1, FLAG_FUA = 2, FLAG_REQ_ONE = 4, FLAG_FAST_ZERO = 8,
  -- can_fua / can_cache answers
  FUA_NONE = 0, FUA_EMULATE = 1, FUA_NATIVE = 2,
  CACHE_NONE = 0, CACHE_EMULATE = 1, CACHE_NATIVE = 2,
  -- extent types
  EXTENT_HOLE = 1, EXTENT_ZERO = 2,
}

local last_errno = 0

local function is_integer(v)
  return type(v) == "number" and v == floor(v)
end

local function check(name, i, v, want)
  local ok
  if want == "integer" then ok = is_integer(v) else ok = type(v) == want end
  if not ok then
    error(format("bad argument #%d to 'nbdkit.%s' (%s expected, got %s)",
                 i, name, want, type(v)), 3)
  end
end

-- Call a Python primitive that answers (value) or (nil, message); raise the message.
-- Every nbdkit.* function tail-calls prim, so level 2 is the script's line that called it.
local function prim(name, ...)
  local v, msg = py[name](...)
  if msg ~= nil then error(tostring(msg), 2) end
  return v
end

function nbdkit.set_error(err)
  check("set_error", 1, err, "integer")
  last_errno = err
end

function nbdkit.debug(fmt, ...)
  check("debug", 1, fmt, "string")
  if py.verbose() then py.debug(format(fmt, ...)) end
end

function nbdkit.parse_size(s) check("parse_size", 1, s, "string"); return prim("parse_size", s) end
function nbdkit.parse_bool(s) check("parse_bool", 1, s, "string"); return prim("parse_bool", s) end
function nbdkit.read_password(s)
  check("read_password", 1, s, "string"); return prim("read_password", s)
end
function nbdkit.realpath(s) check("realpath", 1, s, "string"); return prim("realpath", s) end
function nbdkit.absolute_path(s)
  check("absolute_path", 1, s, "string"); return prim("absolute_path", s)
end
-- nbdkit's newer parsers (nbdkit-plugin(3) "PARSING COMMAND LINE PARAMETERS"): `what`
-- names the setting in the error message, as in C.
function nbdkit.parse_probability(what, s)
  check("parse_probability", 1, what, "string"); check("parse_probability", 2, s, "string")
  return prim("parse_probability", what, s)
end
-- Two results, as nbdkit_parse_delay's two outputs: nbdkit.nanosleep(nbdkit.parse_delay(...))
function nbdkit.parse_delay(what, s)
  check("parse_delay", 1, what, "string"); check("parse_delay", 2, s, "string")
  local sec, msg, nsec = py.parse_delay(what, s)
  if msg ~= nil then error(tostring(msg), 2) end
  return sec, nsec
end
-- nbdkit_parse_int, _unsigned, _int8_t ... _uint64_t: one function per C type.
for _, ctype in ipairs({"int", "unsigned", "int8_t", "uint8_t", "int16_t", "uint16_t",
                        "int32_t", "uint32_t", "int64_t", "uint64_t"}) do
  local name = ctype == "int" and "parse_int" or "parse_" .. ctype
  nbdkit[name] = function(what, s)
    check(name, 1, what, "string"); check(name, 2, s, "string")
    return prim("parse_int", ctype, what, s)
  end
end
function nbdkit.stdio_safe() return py.stdio_safe() end

-- nbdkit_nanosleep: true after the whole sleep; an error (ESHUTDOWN) as soon as the
-- server begins to stop, or (EINVAL) for sec >= INT_MAX.
local UINT_MAX = 4294967295
function nbdkit.nanosleep(sec, nsec)
  local args = {sec, nsec or 0}
  for i = 1, 2 do
    local v = args[i]
    if not is_integer(v) or v < 0 or v > UINT_MAX then
      error(format("bad argument #%d to 'nbdkit.nanosleep' (integer from 0 to %d " ..
                   "expected, got %s)", i, UINT_MAX, type(v) == "number" and v or type(v)), 2)
    end
  end
  local ok, msg, err = py.nanosleep(sec, nsec or 0)
  if msg ~= nil then
    last_errno = err
    error(tostring(msg), 2)
  end
  return ok
end

function nbdkit.export_name() return prim("export_name") end
function nbdkit.is_tls() return prim("is_tls") end
function nbdkit.peer_name() return prim("peer_name") end
function nbdkit.peer_pid() return prim("peer_pid") end
function nbdkit.peer_uid() return prim("peer_uid") end
function nbdkit.peer_gid() return prim("peer_gid") end
function nbdkit.peer_security_context() return prim("peer_security_context") end
function nbdkit.peer_tls_dn() return prim("peer_tls_dn") end
function nbdkit.peer_tls_issuer_dn() return prim("peer_tls_issuer_dn") end
function nbdkit.shutdown() return prim("shutdown") end
function nbdkit.disconnect(force)
  if force ~= nil then check("disconnect", 1, force, "boolean") end
  return prim("disconnect", force == true)
end
function nbdkit.version() return prim("version") end

_G.nbdkit = nbdkit

-- Turn any error value into a message as lua.c's message handler does, so that
-- error({}) logs something readable instead of nbdkit's "(null)".
local function finish(ok, ...)
  if ok then return true, ... end
  local e = ...
  local t = type(e)
  local msg
  if t == "string" or t == "number" then
    msg = tostring(e)
    -- Lua's own allocation failure (LUA_ERRMEM, or --lua-memory-limit reached).
    if e == "not enough memory" and last_errno == 0 then last_errno = nbdkit.ENOMEM end
  else
    local mt = getmetatable(e)
    local named = false
    if mt and mt.__tostring then
      -- A __tostring that fails (or returns no string) must not escape the wrapper.
      named, msg = pcall(tostring, e)
      named = named and type(msg) == "string"
    end
    if not named then msg = "(error object is a " .. t .. " value)" end
  end
  return false, msg, last_errno
end

-- Limits that apply once the server is serving (control.serving below).
local deadline, time_limit = nil, nil
local monotonic = py.monotonic
local sethook = debug and debug.sethook

-- Checked every HOOK_COUNT VM instructions while a limit is set: a callback stuck in a
-- Lua loop fails with an error instead of holding its connection (and lock) forever.
local HOOK_COUNT = 100000
local function time_hook()
  if deadline ~= nil and monotonic() > deadline then
    last_errno = nbdkit.EIO  -- a stuck backend, to the client
    error(format("callback still running after %g seconds (--request-timeout)", time_limit), 2)
  end
end

-- call(f, ...) -> true, results... | false, message, errno
local function call(f, ...)
  last_errno = 0
  if time_limit ~= nil then
    deadline = monotonic() + time_limit
    return (function(...) deadline = nil; return ... end)(finish(pcall(f, ...)))
  end
  return finish(pcall(f, ...))
end

local control = {}

-- Once serving: os.exit in a callback would stop the server under every client, so it
-- becomes an error of that callback; an optional time limit on each callback.
function control.serving(limit)
  if type(os) == "table" then
    os.exit = function()
      error("os.exit is not allowed while serving clients " ..
            "(use nbdkit.shutdown() to stop the server)", 2)
    end
  end
  if limit ~= nil and limit > 0 and sethook then
    time_limit = limit
    sethook(time_hook, "", HOOK_COUNT)
  end
end

-- Large pread results are "pinned": kept alive in `pinned` while Python sends them
-- straight from Lua's memory (see LuaPlugin.pread: one 256 KiB copy less per read).
-- Python learns where the string lives from %p and gives the slot back with unpin.
local pinned, last_slot = {}, 0

local function pin(count, ok, s, ...)
  if ok == true and type(s) == "string" and #s == count then
    last_slot = last_slot + 1
    pinned[last_slot] = s
    return last_slot, format("%p", s)
  end
  return false, ok, s, ...
end

function control.pread_pinned(count, f, ...)
  return pin(count, call(f, ...))
end

-- A big WRITE payload is received straight into a new string pinned here (payload) and
-- handed to the script by pwrite_pinned: lupa's copy of the bytes into a Lua string is
-- saved, and only one copy of the payload exists.  It stays pinned while Python holds a
-- view of it (unpin then, as for reads).  control.blank (set from Python when luanbd's C
-- helpers are loaded) makes a string of n bytes.
function control.payload(count)
  local s = control.blank(count)
  last_slot = last_slot + 1
  pinned[last_slot] = s
  return last_slot, format("%p", s)
end

function control.pwrite_pinned(slot, f, h, ...)
  return call(f, h, pinned[slot], ...)
end

function control.unpin(...)
  for i = 1, select("#", ...) do pinned[(select(i, ...))] = nil end
end

function control.pin_probe(s)
  return pin(#s, true, s)
end

return call, control
