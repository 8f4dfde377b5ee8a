-- The Lua half of a Lua filter's `next` (luanbd.lua.filter), run in the filter's own Lua
-- state after nbdkit.lua and before the script.  `py` holds the Python primitives, each
-- called with the next layer's context first and answering (true, results...) or
-- (false, message, errno).  A failure of the next layer is raised in the filter as an
-- error object: {message=..., errno=...}, whose tostring is the message, with nbdkit's
-- errno already set, so a filter that does not catch it fails with the same errno.
local py = ...
local type, error, setmetatable, floor = type, error, setmetatable, math.floor
local format = string.format
local nbdkit = nbdkit

-- can_zero answers of the layer below (nbdkit-filter(3) NBDKIT_ZERO_*).
nbdkit.ZERO_NONE, nbdkit.ZERO_EMULATE, nbdkit.ZERO_NATIVE = 0, 1, 2

local NextError = {}
NextError.__index = NextError
NextError.__tostring = function(e) return e.message end

local function fail(ok, ...)
  if ok then return ... end
  local message, errno = ...
  nbdkit.set_error(errno)
  error(setmetatable({message = message, errno = errno}, NextError), 0)
end

local function check(name, i, v, want)
  local ok
  if want == "integer" then ok = type(v) == "number" and v == floor(v)
  else ok = type(v) == want end
  if not ok then
    error(format("bad argument #%d to 'next:%s' (%s expected, got %s)",
                 i, name, want, type(v)), 3)
  end
end

local function flags_of(name, i, flags)
  if flags == nil then return 0 end
  check(name, i, flags, "integer")
  return flags
end

local Next = {}
Next.__index = Next

local function query(name)
  local prim = py[name]
  Next[name] = function(self) return fail(prim(self.ctx)) end
end
for _, name in ipairs({"get_size", "export_description", "can_write", "can_flush",
                       "is_rotational", "can_trim", "can_zero", "can_fast_zero",
                       "can_extents", "can_fua", "can_multi_conn", "can_cache"}) do
  query(name)
end

-- next(readonly) in open: open the layer below (luanbd does it after open if the filter
-- did not).
Next.__call = function(self, readonly)
  check("open", 1, readonly, "boolean")
  return fail(py.open(self.ctx, readonly))
end

function Next:block_size()
  return fail(py.block_size(self.ctx))
end

local function ranged(name)
  local prim = py[name]
  Next[name] = function(self, count, offset, flags)
    check(name, 1, count, "integer")
    check(name, 2, offset, "integer")
    return fail(prim(self.ctx, count, offset, flags_of(name, 3, flags)))
  end
end
for _, name in ipairs({"pread", "trim", "zero", "cache"}) do ranged(name) end

function Next:pwrite(buf, offset, flags)
  check("pwrite", 1, buf, "string")
  check("pwrite", 2, offset, "integer")
  return fail(py.pwrite(self.ctx, buf, offset, flags_of("pwrite", 3, flags)))
end

function Next:flush(flags)
  return fail(py.flush(self.ctx, flags_of("flush", 1, flags)))
end

-- extents come back as the plugin callback returns them: {{offset=, length=, type=}, ...}
local function extent_list(flat)
  local out, n = {}, 0
  for i = 1, #flat, 3 do
    n = n + 1
    out[n] = {offset = flat[i], length = flat[i + 1], type = flat[i + 2]}
  end
  return out
end

function Next:extents(count, offset, flags)
  check("extents", 1, count, "integer")
  check("extents", 2, offset, "integer")
  return extent_list(fail(py.extents(self.ctx, count, offset, flags_of("extents", 3, flags))))
end

local control = {}

-- The next layer of one connection, as its filter callbacks see it.
function control.new_next(ctx)
  return setmetatable({ctx = ctx}, Next)
end

-- The functions passed as `next` before a connection has a handle (nbdkit's
-- next_config, next_preconnect, ...): each wraps one Python callable.
function control.next_function(f)
  return function(...)
    return fail(f(...))
  end
end

return control
