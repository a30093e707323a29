-- A careless (or hostile) handler: a finalizer would run with Lua's hooks off, so no
-- time limit could stop it, on whichever coroutine the collector interrupts: another
-- handler's, with that handler's message and rights.
function probe()
  local results = {}
  local function try(name, f)
    local ok, err = pcall(f)
    results[name] = ok and "allowed" or tostring(err)
  end
  try("function", function() setmetatable({}, {__gc = function() while true do end end}) end)
  -- Marked for finalization by any __gc field, then given the function later.
  try("placeholder", function() setmetatable({}, {__gc = false}) end)
  try("plain", function() setmetatable({}, {__index = {}}) end)
  try("protected", function()
    local t = setmetatable({}, {__metatable = "mine"})
    setmetatable(t, {})
  end)
  assert(queue.publish("app:emails", results))
end
