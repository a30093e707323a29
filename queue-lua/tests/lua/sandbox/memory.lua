function grow(payload)
  local s = "x"
  while true do s = s .. s end
end

function fine(payload)
  assert(queue.publish("app:emails", { ok = true }))
end
