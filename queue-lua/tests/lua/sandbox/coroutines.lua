-- A handler whose policies allow app:emails only, trying the other queues from
-- coroutines it creates; it reports what happened to app:emails.
function sneak(payload)
  local report = {}
  local ok, err = coroutine.wrap(function()
    return queue.publish("app:tasks", { via = "wrap" })
  end)()
  report.wrap = err and err:kind() or tostring(ok)
  local co = coroutine.create(function()
    return queue.publish("app:tasks", { via = "create" })
  end)
  local _, ok2, err2 = coroutine.resume(co)
  report.create = err2 and err2:kind() or tostring(ok2)
  local nested = coroutine.wrap(function()
    return coroutine.wrap(function()
      local msg = queue.message()
      return msg:id()
    end)()
  end)()
  report.message_id = nested
  assert(queue.publish("app:emails", report))
end

-- Top level: no handler is running, so there is no context to publish under.
local ok, err = queue.publish("app:tasks", { from = "top level" })
top_level = err and err:kind() or tostring(ok)
local made_here = coroutine.create(function()
  return queue.publish("app:tasks", { from = "a coroutine made at the top level" })
end)

function report_top_level()
  local _, ok2, err2 = coroutine.resume(made_here)
  assert(queue.publish("app:emails", {
    top_level = top_level,
    coroutine = err2 and err2:kind() or tostring(ok2),
  }))
end

-- A coroutine that outlives the handler run that made it, kept in a global that
-- another consumer's handler on the same file can reach.
function keep_a_publisher(payload)
  kept_publisher = coroutine.create(function()
    return queue.publish("app:tasks", { via = "a kept coroutine" })
  end)
end

function resume_the_kept_publisher(payload)
  local _, ok, err = coroutine.resume(kept_publisher)
  assert(queue.publish("app:emails", { kept = err and err:kind() or tostring(ok) }))
end

-- Keeps a coroutine that publishes with this run's rights, then waits in a publish
-- (the test holds it): the run goes on while another handler finds the coroutine.
function stash_a_publisher_and_wait(payload)
  stashed_publisher = coroutine.create(function()
    return queue.publish("app:tasks", { via = "another run's coroutine" })
  end)
  assert(queue.publish("app:emails", { waiting = true }))
end

function resume_the_stashed_publisher(payload)
  local _, ok, err = coroutine.resume(stashed_publisher)
  return ok, err
end
