-- A table of standard library calls, run the same way by a stock Lua interpreter
-- (`lua5.4 probe.lua`) and by luanbd (as a plugin whose config_complete runs them).
-- Every result goes to $PROBE_OUT as "key<TAB>value" lines; tests/lua/test_stdlib.py
-- compares the two files.  It must parse in every Lua from 5.1 on: newer syntax goes
-- through load().

local out = {}
local VERSION = _VERSION:match("%d+%.%d+")
local IS_JIT = type(jit) == "table"
local MULTIARCH = os.getenv("PROBE_MULTIARCH") or "x86_64-linux-gnu"
local TMP = os.getenv("PROBE_TMP") or "/tmp"
local loadstr = loadstring or load

local function show(v)
  local t = type(v)
  if t == "string" then return string.format("%q", v) end
  if t == "number" or t == "boolean" or t == "nil" then return tostring(v) end
  if t == "userdata" and io.type(v) then return io.type(v) end
  return t
end

local function put(key, ...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = show((select(i, ...))) end
  out[#out + 1] = key .. "\t" .. table.concat(parts, ", ")
end

-- pcall, and the results (or the error message) of a call
local function try(key, f, ...)
  put(key, pcall(f, ...))
end

local function keys(t)
  local names = {}
  for k, v in pairs(t) do
    if type(k) == "string" then names[#names + 1] = k .. ":" .. type(v) end
  end
  table.sort(names)
  return table.concat(names, " ")
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function probe()
  -- What each standard library has.
  local libs = { "string", "table", "math", "io", "os", "coroutine", "debug", "package",
                 "utf8", "bit32", "bit", "jit" }
  for _, name in ipairs(libs) do
    local lib = _G[name]
    put("lib." .. name, type(lib) == "table" and keys(lib) or type(lib))
  end
  local globals = {}
  for k, v in pairs(_G) do
    if type(v) == "function" then
      globals[#globals + 1] = k
    end
  end
  table.sort(globals)
  put("globals.functions", table.concat(globals, " "))
  put("file.methods", keys(getmetatable(io.stdout).__index))
  put("file.meta", keys(getmetatable(io.stdout)))
  put("tostring(io.stdout)", (tostring(io.stdout):gsub("0x%x+", "ADDR")))

  -- io.popen, read and write
  local p = io.popen("echo hi")
  put("popen.type", io.type(p))
  put("popen.read", p:read("*l"))
  put("popen.close", p:close())
  put("popen.closed", io.type(p))
  p = io.popen("exit 3")
  put("popen.exit3", p:read("*a"), p:close())
  p = io.popen("kill -9 $$")
  put("popen.killed", p:read("*a"), p:close())
  p = io.popen("printf 'a\\nb\\n'")
  local lines = {}
  for l in p:lines() do lines[#lines + 1] = l end
  put("popen.lines", table.concat(lines, "|"), p:close())
  p = io.popen("printf xyz")
  put("popen.seek", p:seek("cur"))
  put("popen.all", p:read("*a"), p:read("*a"), p:read("*l"))
  p:close()
  local target = TMP .. "/popen-write.txt"
  p = io.popen("cat > " .. target, "w")
  put("popen.write", p:write("data", 1, "\n") == p)
  put("popen.wclose", p:close())
  put("popen.written", read_file(target))
  os.remove(target)
  try("popen.badmode", io.popen, "true", "rw")
  try("popen.noarg", io.popen)

  -- os.execute and friends
  put("execute.none", os.execute())
  put("execute.0", os.execute("exit 0"))
  put("execute.3", os.execute("exit 3"))
  put("execute.killed", os.execute("kill -9 $$"))
  put("getenv", os.getenv("PROBE_VAR"), os.getenv("PROBE_UNSET_VARIABLE"))
  local name = os.tmpname()
  put("tmpname.shape", name:match("^/tmp/lua_%w%w%w%w%w%w$") ~= nil)
  put("tmpname.exists", io.open(name, "r") ~= nil)
  os.remove(name)
  put("remove.missing", os.remove(TMP .. "/no-such-file"))
  put("rename.missing", os.rename(TMP .. "/no-such-file", TMP .. "/other"))
  local a, b = TMP .. "/rename-a", TMP .. "/rename-b"
  local f = io.open(a, "w"); f:write("moved"); f:close()
  put("rename", os.rename(a, b), read_file(b), io.open(a) == nil)
  put("remove", os.remove(b), io.open(b) == nil)
  put("date.utc", os.date("!%Y-%m-%d %H:%M:%S", 0))
  put("date.c", os.date("!%c", 0))
  put("date.c99", os.date("!%F %T %j %u %V %G", 86400 * 40))
  local t = os.date("!*t", 90061)
  put("date.table", t.year, t.month, t.day, t.hour, t.min, t.sec, t.wday, t.yday, t.isdst)
  try("date.bad", os.date, "%Ez %Q")
  put("time.table", os.time({ year = 2000, month = 1, day = 1, hour = 12 }))
  put("time.type", type(os.time()), type(os.clock()), os.clock() >= 0)
  put("difftime", os.difftime(10, 5))
  put("setlocale", os.setlocale(), os.setlocale(nil, "numeric"))

  -- io on files
  f = io.tmpfile()
  put("tmpfile.type", io.type(f))
  put("tmpfile.write", f:write("12 3.5 text\nline2\n") == f)
  put("tmpfile.seek", f:seek("set"), f:seek("end"), f:seek("set", 0))
  put("tmpfile.read", f:read("*n", "*n", "*l", "*l", "*l"))
  put("tmpfile.setvbuf", f:setvbuf("full", 1024))
  f:close()
  try("closed.read", f.read, f)
  local path = TMP .. "/lines.txt"
  f = io.open(path, "w"); f:write("one\ntwo\n\nfour"); f:close()
  lines = {}
  for l in io.lines(path) do lines[#lines + 1] = l end
  put("io.lines", table.concat(lines, "|"))
  put("open.missing", io.open(TMP .. "/no-such-file"))
  try("open.badmode", io.open, path, "rw+x")
  try("lines.missing", io.lines, TMP .. "/no-such-file")
  os.remove(path)

  -- require and package
  put("package.path", package.path)
  put("package.cpath", package.cpath)
  put("package.config", package.config)
  try("require.beside", function() return require("stdlib_helper").answer end)
  put("require.env", pcall(function() return require("viaenv").name end))
  try("require.missing", require, "no_such_module_anywhere")
  local cdir = "/usr/lib/" .. MULTIARCH .. "/lua/" .. (IS_JIT and "5.1" or VERSION) .. "/"
  local open = package.loadlib(cdir .. "cjson.so", "luaopen_cjson")
  put("loadlib.cjson", type(open))
  put("loadlib.star", package.loadlib(cdir .. "cjson.so", "*"))
  local r1, r2, r3 = package.loadlib("/no/such/lib.so", "luaopen_x")
  put("loadlib.missing", r1, r2 ~= nil, r3)
  local ok, cjson = pcall(require, "cjson")
  put("cjson", ok and cjson.encode({ 1, 2, "three" }), ok and cjson.decode('{"a":[1,2]}').a[2])
  if IS_JIT then try("require.jit.v", function() return type(require("jit.v").on) end) end
  local pok, unistd = pcall(require, "posix.unistd")
  put("posix", pok, pok and type(unistd.getpid()))

  -- strings, numbers, utf8, coroutines, debug
  local pack = string.pack
  if pack then
    put("string.pack", (pack(">I2i4s1", 258, -1, "ab"):gsub(".", function(c)
      return string.format("%02x", c:byte())
    end)))
    put("string.unpack", string.unpack("<i2 z", "\255\255hi\0"))
    put("string.packsize", string.packsize("i4 i8 d"))
  end
  if utf8 then
    put("utf8.char", utf8.char(72, 228, 8364, 128512))
    put("utf8.len", utf8.len("h\195\164\226\130\172"), utf8.len("\255"))
    put("utf8.codepoint", utf8.codepoint("h\195\164", 1, -1))
    put("utf8.charpattern", utf8.charpattern)
  end
  put("format", string.format("%5.2f|%d|%s|%x|%g", math.pi, 42, "s", 255, 1e300))
  try("format.a", string.format, "%a", 1)
  try("format.q", string.format, "%q", 1 / 3)
  put("tostring.numbers", tostring(1e15), tostring(2 ^ 53), tostring(-0.0), tostring(1 / 0),
    tostring(3 / 2))
  try("intdiv", loadstr("return 7 // 2, 7.0 // 2, 3 & 5, 1 << 62"))
  put("math", math.floor(-0.5), math.fmod(7, 3), math.huge, math.maxinteger,
    math.tointeger and math.tointeger(3.0), math.type and math.type(1))
  put("string.rep", string.rep("ab", 3, ","))
  put("frontier", string.find("THE (quick) fox", "%f[%a]%a+", 5))
  put("gsub", string.gsub("hello world", "(o)", "[%1]"))
  local co = coroutine.create(function(x, y)
    local z = coroutine.yield(x + y)
    return z * 2
  end)
  put("coroutine", coroutine.resume(co, 1, 2))
  put("coroutine.2", coroutine.resume(co, 10), coroutine.status(co))
  put("coroutine.dead", coroutine.resume(co))
  local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
  put("coroutine.wrap", gen(), gen(), gen())
  put("coroutine.isyieldable", coroutine.isyieldable and coroutine.isyieldable())
  local function inner() return debug.traceback("msg", 1) end
  local function outer() return inner() end
  local tb = {}
  for l in (outer() .. "\n"):gmatch("(.-)\n") do tb[#tb + 1] = l end
  put("traceback", tb[1], tb[2], tb[3])
  local info = debug.getinfo(1, "Sl")
  put("getinfo", info.short_src, info.what)
  put("select", select("#", nil, nil), select(-1, 1, 2, 3))
  local unpack = table.unpack or unpack
  put("unpack", unpack({ 1, 2, 3 }, 2))
  put("collectgarbage", type(collectgarbage("count")), type(collectgarbage("step")))
  try("error.level", function() error("boom", 2) end)
  try("error.table", error, { code = 1 })
  try("arith.error", function() return {} + 1 end)
  try("concat.error", function() return "a" .. {} end)
  try("call.error", function() local x; x() end)
  put("pcall.ok", pcall(function() return 1, 2 end))
end

-- luanbd calls this before serving; a stock interpreter runs it at the end of this file.
function config_complete()
  probe()
  local f = assert(io.open(assert(os.getenv("PROBE_OUT")), "w"))
  f:write(table.concat(out, "\n"), "\n")
  f:close()
end

function open() return 1 end
function get_size() return 0 end
function pread(h, count, offset) return string.rep("\0", count) end

if not nbdkit then config_complete() end
