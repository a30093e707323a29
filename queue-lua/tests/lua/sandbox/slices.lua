-- Handlers for the time-slice and timeout tests.

function spin()
  while true do end
end

-- Spins inside pcall: the timeout must still end it.
function spin_catching()
  while true do
    pcall(function() local x = 0 for i = 1, 1e9 do x = x + i end end)
  end
end

-- Catches with xpcall, whose message handler spins too.
function spin_xpcall()
  while true do
    xpcall(function() while true do end end, function() while true do end end)
  end
end

-- Spins in the reader `load` calls from C: Lua's `load` catches the reader's errors,
-- the deadline's too, and returns them.
function spin_loading()
  while true do
    load(function() while true do end end)
  end
end

-- Spins in a __close handler that `coroutine.close` runs, which returns its error.
function spin_in_closed_coroutines()
  while true do
    local co = coroutine.create(function()
      local _ <close> = setmetatable({}, { __close = function() while true do end end })
      coroutine.yield()
    end)
    coroutine.resume(co)
    coroutine.close(co)
  end
end

-- Each spinning coroutine dies at the deadline; coroutine.resume reports it and the
-- handler would start another.
function spin_resuming()
  while true do
    coroutine.resume(coroutine.create(function() while true do end end))
  end
end

function quick()
  return true
end

-- Waits for a publish the test holds.
function wait_for_publish()
  assert(queue.publish("app:tasks", { n = 1 }))
end

-- The same wait, in a coroutine the handler made (and drops with itself).
function wait_for_publish_in_a_coroutine()
  local publish = coroutine.wrap(function() return queue.publish("app:tasks", { n = 1 }) end)
  assert(publish())
end

-- A coroutine of its own keeps its resume semantics while it computes for longer
-- than a slice.
function own_coroutine()
  local co = coroutine.create(function()
    local x = 0
    for i = 1, 3e7 do x = x + i end
    coroutine.yield("first")
    return "second"
  end)
  local _, a = coroutine.resume(co)
  local _, b = coroutine.resume(co)
  assert(a == "first" and b == "second", tostring(a) .. " " .. tostring(b))
end

-- Set by the __close handler of `looping_close` when it runs; read by
-- `close_ran_before`.
local close_ran = false

-- A value for a to-be-closed variable whose __close notes that it ran, then loops.
local function looping_close()
  close_ran = false
  return setmetatable({}, {
    __close = function()
      close_ran = true
      while true do end
    end,
  })
end

-- A to-be-closed variable whose __close loops too.
function spin_closing()
  local guard <close> = looping_close()
  while true do end
end

-- Waits for a publish the test holds, with a to-be-closed variable whose __close
-- loops.
function wait_closing()
  local guard <close> = looping_close()
  assert(queue.publish("app:tasks", { n = 1 }))
end

function close_ran_before()
  assert(close_ran, "the __close handler of the stopped run did not run")
end

-- Loops where Lua cannot yield (a comparator table.sort calls from C): the timeout
-- raises an error there instead.
function spin_in_sort()
  table.sort({ 3, 2, 1 }, function(a, b) while true do end end)
end

-- Keeps its own coroutine, for the next handler to try.
function keep_own_coroutine()
  kept = coroutine.running()
  return true
end

-- A later handler: the kept coroutine is reused for handler runs, so Lua code may
-- neither resume nor close it.
function resume_kept()
  local ok, err = pcall(coroutine.resume, kept)
  if ok then return nil, "coroutine.resume of a handler's coroutine was allowed" end
  local closed, close_err = pcall(coroutine.close, kept)
  if closed then return nil, "coroutine.close of a handler's coroutine was allowed" end
  -- Coroutines of one's own still work.
  local co = coroutine.create(function(a) return a + 1 end)
  local resumed, two = coroutine.resume(co, 1)
  assert(resumed and two == 2)
  return nil, tostring(err) .. " | " .. tostring(close_err)
end

-- A coroutine that died on the deadline's error (raised where Lua cannot yield, in a
-- sort comparator), closed by the handler's own __close: the dead coroutine's
-- __close loops, and must not run where no hook can stop it.
function close_dead_spinner()
  local co = coroutine.create(function()
    local _ <close> = setmetatable({}, { __close = function() while true do end end })
    table.sort({ 3, 2, 1 }, function() while true do end end)
  end)
  local _ <close> = setmetatable({}, { __close = function() coroutine.close(co) end })
  coroutine.resume(co)
end

-- What the ack in `acks_on_a_clean_close`'s __close answered: Lua closes a stopped
-- coroutine's variables with no error, as if the handler had returned.
close_ack = nil

-- A "commit on success" guard: acks in __close when no error is passing. Stopped at
-- its timeout (or by a shutdown) while it spins or waits, it must not ack.
local function ack_on_clean_close()
  local msg = queue.message()
  close_ack = nil
  return setmetatable({}, {
    __close = function(_, err)
      if err == nil then
        local ok, ack_err = msg:ack()
        close_ack = { ok = ok, err = ack_err and tostring(ack_err) }
      end
    end,
  })
end

function spin_acking_on_close()
  local guard <close> = ack_on_clean_close()
  while true do end
end

function wait_acking_on_close()
  local guard <close> = ack_on_clean_close()
  assert(queue.publish("app:tasks", { n = 1 }))
end

function close_ack_was_refused()
  assert(close_ack, "the __close handler did not try to ack")
  assert(close_ack.ok == false, "the ack in __close went through")
  assert(close_ack.err:find("released"), close_ack.err)
end

-- What the publish in `spin_publishing_on_close`'s __close answered.
close_publish = nil

-- Publishes "done" in __close when no error is passing. Stopped at its timeout, it
-- must not: the message is retried, and each attempt would publish it again.
function spin_publishing_on_close()
  close_publish = nil
  local guard <close> = setmetatable({}, {
    __close = function(_, err)
      if err == nil then
        local called, id, publish_err = pcall(queue.publish, "app:tasks", { done = true })
        close_publish = { id = called and id or nil, err = tostring(called and publish_err or id) }
      end
    end,
  })
  while true do end
end

function close_publish_was_refused()
  assert(close_publish, "the __close handler did not try to publish")
  assert(close_publish.id == nil, "the publish in __close went through")
  assert(close_publish.err:find("stopped"), close_publish.err)
end

-- Spins inside a coroutine of its own, which only the handler's coroutine used to
-- yield for: the whole state waited for it.
function spin_in_own_coroutine()
  coroutine.wrap(function() while true do end end)()
end

-- Computes past several slices between its yields, some of which carry no value:
-- its resumer sees exactly what it yields, no more, no less.
function long_generator()
  local co = coroutine.create(function(first)
    assert(first == "go", tostring(first))
    for i = 1, 3 do
      for _ = 1, 3e6 do end
      local back = coroutine.yield(i)
      assert(back == "more" .. i, tostring(back))
      for _ = 1, 3e6 do end
      coroutine.yield()
    end
    return "done"
  end)
  local seen, send = {}, "go"
  while true do
    local ok, v = coroutine.resume(co, send)
    assert(ok, v)
    if coroutine.status(co) == "dead" then
      assert(v == "done", tostring(v))
      break
    end
    seen[#seen + 1] = v == nil and "nil" or tostring(v)
    send = v and ("more" .. v) or nil
  end
  local got = table.concat(seen, ",")
  assert(got == "1,nil,2,nil,3,nil", got)
end

-- Closes a suspended coroutine whose __close computes past a slice: the close runs it
-- to its end (a yield there would be thrown as an error and cut it short).
function close_a_long_closer()
  local finished = false
  local co = coroutine.create(function()
    local _ <close> = setmetatable({}, {
      __close = function()
        for _ = 1, 3e6 do end
        finished = true
      end,
    })
    coroutine.yield()
  end)
  coroutine.resume(co)
  local ok, err = coroutine.close(co)
  assert(ok, tostring(err))
  assert(finished, "the __close handler was cut short")
  -- Not a coroutine: Lua's own error, not a conversion error.
  local resumed, why = pcall(coroutine.resume, nil)
  assert(not resumed and tostring(why):find("thread expected"), tostring(why))
end

-- Loops of the standard library that run in C, allocate nothing and, unbounded, ran
-- for ever: no Lua instruction for the hook, no memory for the limit.
function rep_of_nothing()
  assert(string.rep("", math.maxinteger) == "")
  assert(("").rep("", math.maxinteger, "") == "")
  assert(string.rep("", 2^62) == "")
  assert(string.rep("ab", 3, ",") == "ab,ab,ab")
end
function move_forever()
  table.move({}, 1, math.maxinteger, 1, {})
end
function move_back_forever()
  table.move({}, 1, math.maxinteger - 1, 2)
end
local huge = { __len = function() return math.maxinteger - 1 end }
function insert_forever()
  table.insert(setmetatable({}, huge), 1, "x")
end
function remove_forever()
  table.remove(setmetatable({}, huge), 1)
end
function sort_forever()
  -- Every element reads as 0 (rawlen of the table), so no comparison fails.
  table.sort(setmetatable({}, { __len = function() return (1 << 31) - 2 end, __index = rawlen }))
end
-- A plain table whose border is 2^62: keys 2, 4, ..., 2^62, then 1 (set first, 1, 2
-- and 4 would go to the array part, whose border is 4).
local function far_border(bits)
  local t = {}
  for i = 1, bits do
    t[1 << i] = true
  end
  t[1] = true
  assert(#t == 1 << bits, "#t is " .. #t)
  return t
end
function insert_forever_plain()
  local t = far_border(62)
  table.insert(t, 1, "x")
end
function remove_forever_plain()
  local t = far_border(62)
  table.remove(t, 1)
end
-- A comparator in C runs no instruction either (getmetatable of anything here is nil).
function sort_forever_plain()
  local t = far_border(30)
  table.sort(t, getmetatable)
end
-- A string reads as a table through its metatable's __index.
function move_forever_from_a_string()
  table.move("", 1, math.maxinteger, 1, {})
end
-- Every element read through a C __index (concat of an empty table gives "").
function concat_forever()
  local t = setmetatable({}, { __index = table.concat })
  table.concat(t, "", 1, math.maxinteger)
end

-- A coroutine (outer) that resumed one (inner) waiting in a publish, kept when the run
-- ends at its timeout: resuming outer from another run must not finish inner's call.
function outer_keeps_a_waiting_publish()
  inner = coroutine.create(function() return queue.publish("app:tasks", { n = 1 }) end)
  outer = coroutine.create(function() return coroutine.resume(inner) end)
  coroutine.resume(outer)
end
function finishes_through_the_outer()
  local resumed, err = coroutine.resume(outer)
  assert(not resumed and tostring(err):find("started by a run that has ended"), tostring(err))
end

-- Instructions that each take milliseconds: the hook, called every 10,000 of them,
-- came 10,000 slow instructions after the slice or the timeout was over.
local function slow_instructions()
  local text = string.rep("a", 40 * 1024 * 1024)
  while true do utf8.len(text) end
end

function slow_instructions_in_the_handler()
  slow_instructions()
end

function slow_instructions_in_its_coroutine()
  coroutine.resume(coroutine.create(slow_instructions))
end
