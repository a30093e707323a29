-- Every row of the seed's Errors table, as a script.
local queue = require("queue")
local errors = require("errors")

-- A failed publish answers `false, err` (the seed's `boolean, error`); a failed
-- queue.message() `nil, err`.
local function expect(kind, retryable, ok, err)
  assert(ok == false or ok == nil, "expected false or nil first value, got " .. tostring(ok))
  assert(err, "expected an error")
  assert(err:kind() == kind, "expected " .. kind .. ", got " .. tostring(err))
  assert(err:retryable() == retryable, "retryable should be " .. tostring(retryable))
  assert(errors.is(err, kind))
  return err
end

local function expect_publish(kind, retryable, ok, err)
  assert(ok == false, "a failed publish should answer false first, got " .. tostring(ok))
  return expect(kind, retryable, ok, err)
end

-- Queue ID empty
expect_publish(errors.INVALID, false, queue.publish("", { a = 1 }))
expect_publish(errors.INVALID, false, queue.publish(nil, { a = 1 }))
expect_publish(errors.INVALID, false, queue.publish("no_namespace", { a = 1 }))
-- Message data empty
expect_publish(errors.INVALID, false, queue.publish("app:tasks", nil))
expect_publish(errors.INVALID, false, queue.publish("app:tasks", ""))
expect_publish(errors.INVALID, false, queue.publish("app:tasks", {}))
-- No delivery context
local msg, err = queue.message()
assert(msg == nil)
expect(errors.INVALID, false, msg, err)
assert(err:message():find("no delivery context"), err:message())
-- Queue not declared (docs/lua-api.md)
expect_publish(errors.NOT_FOUND, false, queue.publish("app:missing", { a = 1 }))
-- tostring and message
local _, e = queue.publish("", { a = 1 })
assert(tostring(e) == "Invalid: queue id is empty", tostring(e))
return "ok"
