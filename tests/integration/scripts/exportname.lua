-- exportname.lua: the disk is the export name the client asked for (API 2,
-- nbdkit.export_name()), so a client can read back the name the server saw.

API_VERSION = 2

function open(readonly)
   return { name = nbdkit.export_name() }
end

function get_size(h) return #h.name end

function pread(h, count, offset, flags)
   return h.name:sub(offset + 1, offset + count)
end
