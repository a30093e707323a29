-- A handler always reads `attempts` as a number: 1 on the first delivery.
function check(payload)
  local msg = queue.message()
  local attempts = msg:header("attempts")
  assert(math.type(attempts) == "integer", "attempts is " .. type(attempts))
  assert(msg:headers().attempts == attempts)
  return attempts == payload.expected
end
