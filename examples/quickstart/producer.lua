-- Runs once at start and publishes the work, in the seed's shapes.
local queue = require("queue")

local M = {}

function M.main()
  local signups = {
    { id = 1001, to = "ada@example.com" },
    { id = 1002, to = "grace@example.com" },
    { id = 1003, to = "flaky@example.com" },   -- the mail server times out once
    { id = 1004, to = "bounce@example.com" },  -- always bounces: ends in the dead-letter queue
  }
  for _, signup in ipairs(signups) do
    local ok, err = queue.publish("app:emails", {
      to = signup.to,
      template = "welcome",
      data = { order_id = signup.id },
    }, {
      priority = "high",
      correlation_id = "signup-" .. signup.id,
    })
    if err then
      error(err)
    end
  end
  logger:info("Published welcome emails", { count = #signups })
end

return M
