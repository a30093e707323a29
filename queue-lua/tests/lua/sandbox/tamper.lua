-- A careless (or hostile) handler: it tries to replace what every handler shares.
function tamper()
  local results = {}
  local function try(name, f)
    local ok = pcall(f)
    results[name] = ok and "changed" or "refused"
  end
  try("queue.publish", function() queue.publish = function() return true end end)
  try("rawset queue", function() rawset(queue, "publish", function() return true end) end)
  try("errors.new", function() errors.new = nil end)
  try("logger.info", function() logger.info = nil end)
  try("string.format", function() string.format = nil end)
  try("string metatable", function() getmetatable("").__index.upper = nil end)
  try("setmetatable queue", function() setmetatable(queue, nil) end)
  try("environment metatable", function() getmetatable(_ENV).__index.queue = {} end)
  try("coroutine.create", function() coroutine.create = nil end)
  -- `pairs` must not hand out the table behind the read-only proxy.
  try("pairs queue", function() local _, q = pairs(queue); q.publish = function() return true end end)
  try("pairs string", function() local _, s = pairs(string); s.format = nil end)
  return results
end

function report(payload)
  local listed = 0
  for name, f in pairs(string) do
    assert(type(name) == "string" and f ~= nil)
    listed = listed + 1
  end
  assert(listed >= 10, "pairs(string) lists the string library")
  assert(queue.publish("app:emails", tamper()))
end
