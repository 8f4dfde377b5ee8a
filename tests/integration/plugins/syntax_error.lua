-- syntax_error.lua: does not compile.

function open (readonly)
   local x = = 1
   return x
end
