-- syntax_error.lua: line 2 is not valid Lua.
x = = 1
