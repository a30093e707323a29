-- The seed's consumer pattern, with a stand-in for a real email module.
local email = {}

function email.send(to, template, data)
  local attempt = queue.message():header("attempts")
  if to == "bounce@example.com" then
    return nil, errors.new({ message = "mailbox unavailable", kind = errors.UNAVAILABLE })
  end
  if to == "flaky@example.com" and attempt == 1 then
    return nil, errors.new({ message = "smtp timeout", kind = errors.TIMEOUT })
  end
  return true
end

function handle_email(payload)
  local msg = queue.message()

  logger:info("Processing", {
    message_id = msg:id(),
    to = payload.to,
    attempt = msg:header("attempts"),
    correlation_id = msg:header("correlation_id"),
  })

  local ok, err = email.send(payload.to, payload.template, payload.data)
  if err then
    return nil, err -- Message will be requeued or dead-lettered
  end
  logger:info("Sent", { to = payload.to })
end

function handle_dead_letter(payload)
  local msg = queue.message()
  logger:warn("Dead letter", {
    to = payload.to,
    from = msg:header("x_original_queue"),
    reason = msg:header("x_dead_letter_reason"),
    attempts = msg:header("x_original_attempts"),
  })
end
