-- A Lua filter whose own extents answer is hostile (tests/integration/test_edges_*.py):
-- fmode=NAME picks it; "pass" hands on the plugin's answer.
local FMODE = "pass"
local G = 1 << 32

function config(next, key, value)
  if key == "fmode" then FMODE = value else next(key, value) end
end

local modes = {}
function modes.pass(next, count, off, flags) return next:extents(count, off, flags) end
function modes.huge(next, count, off, flags)
  return { { off, 2 * G, 0 }, { off + 2 * G, 2 * G, 3 } }
end
function modes.empty() return {} end
function modes.string(next, count, off) return { { off, "lots", 0 } } end
function modes.unsorted(next, count, off) return { { off + 1, 1, 3 }, { off, 1, 0 } } end
function modes.notable() return "no" end
function modes.before(next, count, off)
  return { { 0, off + 1, 3 }, { off + 1, math.maxinteger - off - 1, 0 } }
end
function modes.toobig(next, count, off) return { { off, 2.0 ^ 64, 0 } } end  -- a float

function extents(next, h, count, off, flags) return modes[FMODE](next, count, off, flags) end
