-- Another consumer on the same Lua state: it must still publish for real.
function publish_for_real(payload)
  assert(queue.publish("app:tasks", { from = "other" }))
end

-- The sandbox's library tables as data: each must be refused, not sent empty.
function publish_libraries(payload)
  local said = {}
  for name, data in pairs({ math = { m = math }, string = string, queue = { q = { queue } } }) do
    local ok, err = queue.publish("app:tasks", data)
    said[name] = ok and "sent" or (err:kind() .. ": " .. err:message())
  end
  assert(queue.publish("app:emails", said))
end
