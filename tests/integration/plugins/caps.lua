-- caps.lua: defines can_write, can_flush, can_trim and is_rotational, each
-- returning the value given by the key of the same name:
--   true, false, nil, 1, 0, string ("true"), table, error
-- A key that is not given makes the callback return true.
-- pwrite, flush and trim exist and do nothing; reads return zeroes.

local answers = {}

function config (key, value)
   answers[key] = value
end

local function answer (name)
   local v = answers[name]
   if v == nil or v == "true" then return true end
   if v == "false" then return false end
   if v == "nil" then return nil end
   if v == "1" then return 1 end
   if v == "0" then return 0 end
   if v == "string" then return "true" end
   if v == "table" then return {} end
   if v == "error" then error(name .. " refused") end
   error("unknown value " .. v .. " for " .. name)
end

function open (readonly) return 1 end
function get_size (h) return 65536 end
function pread (h, count, offset) return string.rep("\0", count) end
function pwrite (h, buf, offset) end
function flush (h) end
function trim (h, count, offset) end

function can_write (h) return answer("can_write") end
function can_flush (h) return answer("can_flush") end
function can_trim (h) return answer("can_trim") end
function is_rotational (h) return answer("is_rotational") end
