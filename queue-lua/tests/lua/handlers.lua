-- Handlers for the settlement table (docs/lua-api.md, "Handlers") and the delivery-context rules.
local M = {}

function M.returns_nothing(payload) end
function M.returns_true(payload) return true end
function M.returns_false(payload) return false end
function M.returns_nil_err(payload) return nil, errors.new({ message = "smtp down", kind = errors.UNAVAILABLE }) end
function M.returns_nil_string(payload) return nil, "plain failure" end
-- A slip for `return nil, err`: the error value alone.
function M.returns_an_error_alone(payload) return errors.new({ message = "smtp down", kind = errors.UNAVAILABLE }) end
function M.returns_invalid_alone(payload) return errors.new({ message = "bad input", kind = errors.INVALID }) end
function M.raises(payload) error("boom") end
local function innermost() local t = nil; return t.field end
local function middle() innermost(); return 1 end
function M.raises_deep_inside(payload) middle() end
-- The Lua idiom of an error table with a message, raised.
function M.raises_a_table(payload) error({ message = "card declined", code = 402 }) end
local function invalid(retryable)
  return errors.new({ message = "bad input", kind = errors.INVALID, retryable = retryable })
end
function M.returns_invalid(payload) return nil, invalid() end
function M.raises_invalid(payload) error(invalid()) end
function M.raises_invalid_marked_retryable(payload) error(invalid(true)) end
function M.raises_invalid_after_a_yield(payload)
  coroutine.yield()
  error(invalid())
end
function M.returns_a_looping_error(payload)
  return nil, setmetatable({}, { __index = function() while true do end end })
end
function M.raises_a_table_that_loops_when_told(payload)
  error(setmetatable({}, { __tostring = function() while true do end end }))
end
-- A `__close` reads the raised table's fields; it raises text saying what it saw.
function M.raises_a_table_a_close_reads(payload)
  local _ <close> = setmetatable({}, { __close = function(_, err)
    error("close saw " .. tostring(type(err) == "table" and err.code or type(err)), 0)
  end })
  error({ message = "conflict", code = "E409" })
end
function M.raises_a_table_with_a_number_message(payload) error({ message = 503 }) end
function M.raises_a_table_told_by_its_tostring(payload)
  error(setmetatable({}, { __tostring = function() return "HTTP 503" end }))
end
function M.raises_invalid_then_close_raises_text(payload)
  local _ <close> = setmetatable({}, { __close = function() error("db lost") end })
  error(invalid())
end
function M.compares_an_error_with_a_message(payload)
  local err, msg = errors.new("a"), queue.message()
  assert(not (err == msg), "an error equals a message")
  assert(not (msg == err), "a message equals an error")
  assert(err == errors.new("a"), "equal errors differ")
end
function M.catches_invalid_then_raises_text(payload)
  pcall(error, invalid())
  error("something else")
end
function M.acks_itself(payload)
  local msg = queue.message()
  assert(msg:ack())
  local ok, err = msg:ack()
  assert(ok == false and err:kind() == errors.INVALID and err:message():find("already settled"))
  return false -- the manual ack stands
end
function M.nacks_itself(payload)
  local msg = queue.message()
  assert(msg:nack("not today"))
  local ok, err = msg:nack()
  assert(ok == false and err:kind() == errors.INVALID)
end

local function read_context()
  local msg, err = queue.message()
  assert(msg, err)
  return msg:id(), msg:header("priority"), msg:headers()
end

function M.context_in_nested_function(payload)
  local id, priority, headers = read_context()
  -- publishing yields this coroutine; the context must survive it
  assert(queue.publish("app:tasks", { from = id }))
  local id2 = read_context()
  assert(id == id2)
  return { id = id, priority = priority, attempts = headers.attempts }
end

M.kept = nil
function M.keeps_message(payload)
  M.kept = queue.message()
end
function M.uses_kept_message(payload)
  local results = {}
  -- `ack` and `nack` succeed with `true`, so they fail with `false`; the others `nil`.
  local failed_with = { id = nil, headers = nil, ack = false, nack = false }
  for _, method in ipairs({ "id", "headers", "ack", "nack" }) do
    local value, err = M.kept[method](M.kept)
    assert(value == failed_with[method], method .. " gave " .. tostring(value))
    assert(err:kind() == errors.INVALID and err:message():find("message released"), tostring(err))
  end
  local value, err = M.kept:header("x")
  assert(value == nil and err:message():find("message released"))
end

-- Keeps its message where another run can find it, then waits in a publish.
function M.shares_message_and_waits(payload)
  M.shared = queue.message()
  assert(queue.publish("app:tasks", payload))
  -- Its own message still answers once the other run is done with it.
  assert(M.shared:id())
end
-- Another run tries the message of the run above while that one waits.
function M.uses_shared_message(payload)
  local failed_with = { id = nil, headers = nil, ack = false, nack = false }
  for _, method in ipairs({ "id", "headers", "ack", "nack" }) do
    local value, err = M.shared[method](M.shared)
    assert(value == failed_with[method], method .. " gave " .. tostring(value))
    assert(err:kind() == errors.INVALID and err:message():find("another run"), tostring(err))
  end
  local value, err = M.shared:header("x")
  assert(value == nil and err:message():find("another run"), tostring(err))
end

-- Starts a publish in a coroutine resumed where it cannot wait (inside a function C
-- calls): the call stays started inside the coroutine, which the handler keeps.
function M.keeps_a_started_publish(payload)
  M.started = coroutine.create(function()
    return queue.publish("app:tasks", payload)
  end)
  table.sort({ 1, 2 }, function()
    local resumed, err = coroutine.resume(M.started)
    assert(not resumed and err:find("cannot wait"), tostring(err))
    return false
  end)
end
-- Another run tries to finish it, with the first run's rights.
function M.finishes_a_kept_publish(payload)
  local ok, err = pcall(coroutine.resume, M.started)
  assert(not ok and tostring(err):find("started by a run that has ended"), tostring(err))
end

function M.echo(payload)
  assert(queue.publish("app:raw", payload))
end

function M.publish_and_report(payload)
  local ok, err = queue.publish("app:tasks", payload)
  if err then
    return nil, err
  end
  return ok
end

-- The `err` of a failed call as a nack's reason, and a header asked for by a name
-- that is not a string: both answer, neither raises.
function M.nack_with_an_error(payload)
  local msg = queue.message()
  local value, header_err = msg:header(nil)
  assert(value == nil and header_err and header_err:kind() == "Invalid", "msg:header(nil)")
  local _, err = queue.publish("", { a = 1 })
  local ok, nack_err = msg:nack(err)
  assert(ok == true and nack_err == nil, "msg:nack(err) gave " .. tostring(nack_err))
end

-- A header name that is not UTF-8 names no header: read lossily, "\xff" found the
-- header named U+FFFD.
function M.header_named_in_bytes(payload)
  local msg = queue.message()
  assert(msg:header("\xef\xbf\xbd") == "replacement", "the U+FFFD header")
  local value, err = msg:header("\xff")
  assert(value == nil and err == nil, "msg:header(\"\\xff\") gave " .. tostring(value))
end

return M
