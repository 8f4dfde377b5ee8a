-- pandoc filter for scripts/build_man.py: turns a docs/*.md manual into a man page.
-- The Markdown stays readable on the web; what only makes sense there is dropped here.
local refs = {}        -- "lua-plugins.md" -> "luanbd-lua-plugin(3)"
local name_line = nil  -- "luanbd-lua-plugin - ..." for pages without a NAME section

local function meta(doc)
  -- "lua-plugins.md=luanbd-lua-plugin(3) ...", from scripts/build_man.py
  local text = doc.meta["man-refs"] and pandoc.utils.stringify(doc.meta["man-refs"]) or ""
  for k, v in text:gmatch("(%S+)=(%S+)") do refs[k] = v end
  if doc.meta["man-name"] then name_line = pandoc.utils.stringify(doc.meta["man-name"]) end
end

-- "luanbd - serve ..." -> "luanbd \- serve ...": the dash whatis and man -k look for.
local function name_para(text)
  local name, desc = text:match("^(%S+) %- (.*)$")
  assert(name, "NAME line must be 'name - description': " .. text)
  return pandoc.Para({pandoc.Str(name), pandoc.Space(), pandoc.RawInline("man", "\\-"),
                      pandoc.Space(), pandoc.Str(desc)})
end

local function link(el)
  local target = el.target
  if target:match("^#") then return el.content end            -- anchors within the page
  local file = target:match("([^/#]+%.md)")
  if file and refs[file] and not target:match("^%a+://") then
    return pandoc.Str(refs[file])
  end
  if not target:match("^%a+://") then return el.content end   -- a file of the source tree
  return el
end

-- pandoc gives a wide table 70 columns; inside a definition's indent that overflows an
-- 80-column terminal.
local function table_(el)
  for i, spec in ipairs(el.colspecs) do
    if type(spec[2]) == "number" then el.colspecs[i] = {spec[1], spec[2] * 0.8} end
  end
  return el
end

function Pandoc(doc)
  meta(doc)
  local blocks = {}
  local dropped_title, has_name, after_name = false, false, false
  for _, b in ipairs(doc.blocks) do
    if b.t == "Header" and b.level == 1 and not dropped_title then
      dropped_title = true                                  -- the page's title: .TH has it
    elseif b.t == "Para" and pandoc.utils.stringify(b):match("^Contents:") then
      -- the web page's table of contents
    else
      if b.t == "Header" then
        b.level = math.max(b.level - 1, 1)
        after_name = pandoc.utils.stringify(b) == "NAME"
        has_name = has_name or after_name
      elseif after_name and b.t == "Para" then
        b = name_para(pandoc.utils.stringify(b))
        after_name = false
      end
      table.insert(blocks, b)
    end
  end
  if not has_name then
    assert(name_line, "no NAME section and no man-name")
    table.insert(blocks, 1, pandoc.Header(1, "NAME"))
    table.insert(blocks, 2, name_para(name_line))
    -- The rest starts with a description that has no heading of its own.
    table.insert(blocks, 3, pandoc.Header(1, "DESCRIPTION"))
  end
  doc.blocks = pandoc.walk_block(pandoc.Div(blocks), {Link = link, Table = table_}).content
  return doc
end
