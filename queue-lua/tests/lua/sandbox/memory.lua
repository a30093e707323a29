function grow(payload)
  local s = "x"
  while true do s = s .. s end
end

function fine(payload)
  assert(queue.publish("app:emails", { ok = true }))
end

-- Error values whose text lived outside Lua's memory: 20,000 of them held 2.5 GB
-- of the process's memory while Lua counted a few MB.
function grow_with_errors(payload)
  local big, kept = string.rep("x", 64 * 1024), {}
  for i = 1, 20000 do
    kept[i] = errors.new({ message = big, details = { [big] = big } })
  end
end

-- An error value keeps a bounded text, saying it was cut.
function errors_are_cut()
  local big = string.rep("x", 64 * 1024)
  local err = errors.new({ message = big, details = { k = big } })
  assert(#err:message() <= 4096, #err:message())
  assert(err:message():find("truncated from 65536 bytes"), err:message())
  assert(#err:details().k <= 1024, #err:details().k)
end
