-- config_record.lua: the disk is a record of every config() call, one line
-- per call: "key=value type(key) type(value)", then "complete" once
-- config_complete ran.  A client reads the record back from offset 0.

local record = {}

function config(key, value)
   record[#record + 1] = key .. "=" .. value .. " " .. type(key) .. " " .. type(value)
end

function config_complete()
   record[#record + 1] = "complete"
end

local text

function open(readonly)
   text = table.concat(record, "\n") .. "\n"
   return text
end

function get_size(h) return #h end

function pread(h, count, offset)
   return h:sub(offset + 1, offset + count)
end
