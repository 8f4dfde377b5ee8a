-- probe.lua: evaluates Lua code given on the command line and serves each result as one
-- 512-byte sector, so a client reads what the `nbdkit` table answered.  Twin: probe.py.
-- Written against API 1 on purpose: the `nbdkit` table is there for every script.
--
--   cexpr=EXPR   an expression evaluated at once, inside config (no connection yet)
--   expr=EXPR    an expression evaluated inside pread, when the client reads its sector
--   raise=CODE   statements run inside pread, unprotected: an error() in CODE fails the
--                read (the sector holds "ran" otherwise)
--
-- Sector i holds "ok <type> <value>" or "err <message>", padded with spaces; sectors are
-- in command-line order.  --dump-plugin prints the cexpr results, one per line.

local SECTOR = 512
local slots = {}   -- { text = "..." } (done), { expr = "..." } or { code = "..." }

local function evaluate(expr)
  local chunk, msg = load("return " .. expr, "=expr")
  if not chunk then return "err " .. msg end
  local ok, value = pcall(chunk)
  if not ok then return "err " .. tostring(value) end
  return "ok " .. type(value) .. " " .. tostring(value)
end

function config(key, value)
  if key == "cexpr" then
    slots[#slots + 1] = { text = evaluate(value) }
  elseif key == "expr" then
    slots[#slots + 1] = { expr = value }
  elseif key == "raise" then
    slots[#slots + 1] = { code = assert(load(value, "=raise")) }
  else
    error("unknown key " .. key)
  end
end

function dump_plugin()
  for i, slot in ipairs(slots) do
    if slot.text then print("slot" .. i .. "=" .. slot.text) end
  end
end

function open(readonly)
  return {}
end

function get_size(h)
  return math.max(#slots, 1) * SECTOR
end

local function run(slot)
  if slot == nil then return "" end
  if slot.text then return slot.text end
  if slot.expr then return evaluate(slot.expr) end
  slot.code()   -- errors propagate: the read fails
  return "ran"
end

function pread(h, count, offset)
  local out = {}
  local first = offset // SECTOR
  for i = first, (offset + count - 1) // SECTOR do
    local text = run(slots[i + 1]):sub(1, SECTOR)
    out[#out + 1] = text .. string.rep(" ", SECTOR - #text)
  end
  local data = table.concat(out)
  local skip = offset - first * SECTOR
  return data:sub(skip + 1, skip + count)
end
