-- Another consumer on the same Lua state: it must still publish for real.
function publish_for_real(payload)
  assert(queue.publish("app:tasks", { from = "other" }))
end
