-- Every row of the seed's Errors table, as a script.
local queue = require("queue")
local errors = require("errors")

local function expect(kind, retryable, ok, err)
  assert(ok == nil, "expected nil first value, got " .. tostring(ok))
  assert(err, "expected an error")
  assert(err:kind() == kind, "expected " .. kind .. ", got " .. tostring(err))
  assert(err:retryable() == retryable, "retryable should be " .. tostring(retryable))
  assert(errors.is(err, kind))
  return err
end

-- Queue ID empty
expect(errors.INVALID, false, queue.publish("", { a = 1 }))
expect(errors.INVALID, false, queue.publish(nil, { a = 1 }))
expect(errors.INVALID, false, queue.publish("no_namespace", { a = 1 }))
-- Message data empty
expect(errors.INVALID, false, queue.publish("app:tasks", nil))
expect(errors.INVALID, false, queue.publish("app:tasks", ""))
expect(errors.INVALID, false, queue.publish("app:tasks", {}))
-- No delivery context
local msg, err = queue.message()
assert(msg == nil)
expect(errors.INVALID, false, msg, err)
assert(err:message():find("no delivery context"), err:message())
-- Queue not declared (SPEC §3)
expect(errors.NOT_FOUND, false, queue.publish("app:missing", { a = 1 }))
-- tostring and message
local _, e = queue.publish("", { a = 1 })
assert(tostring(e) == "Invalid: queue id is empty", tostring(e))
return "ok"
