//! The Lua scripts that keep each step atomic: Redis runs a script without
//! interleaving other commands, so a message is never both acknowledged and
//! missing from where it goes next, and counts are read at one instant.
//!
//! Invariant the scripts keep, and `info` relies on: every entry of a queue's stream
//! is either not yet delivered to the group, or pending (delivered, unsettled). An
//! ack removes the entry (`XACK` + `XDEL`); a release removes it and appends a copy
//! with the same fields, so the copy is undelivered. Hence ready = `XLEN` minus the
//! group's pending count.

use std::sync::LazyLock;

use redis::Script;

/// Moves every entry pending for one consumer back to the queue: appends a copy
/// (same fields: id, headers, body), then removes the original. Entries whose data is
/// gone (deleted by hand) are only dropped from the pending list. An entry that
/// cannot be copied (more fields than Redis's Lua passes to one command, about
/// 4,000; or Redis refuses the write: out of memory, read-only) stays as it is,
/// pending: removed first, it was lost.
const RETURN_PENDING: &str = r#"
-- true, or false and why not: 'TOO_WIDE' for an entry with more fields than one
-- command takes (it never will be copied), else Redis's refusal (it may be later).
local function copy_back(stream, fields)
  local copied, err = pcall(function() return redis.call('XADD', stream, '*', unpack(fields)) end)
  if copied then return true end
  if type(err) == 'string' and string.find(err, 'too many results to unpack', 1, true) then
    return false, 'TOO_WIDE'
  end
  if type(err) == 'table' and err.err then return false, err.err end
  return false, tostring(err)
end

-- Returns how many went back, how many could not be copied and stay pending (while
-- any does, the consumer is kept, as deleting it would delete their pending entries
-- with it and leave them in the stream, never delivered again), where it stopped
-- (the range to go on from), how many entries it looked at, and whether it looked at
-- them all: it stops once `most` (if given) were looked at. `after` is where to
-- begin ('-' for the first).
local function return_pending(stream, group, consumer, after, most)
  local returned, left, looked = 0, 0, 0
  after = after or '-'
  while true do
    if most and looked >= most then return returned, left, after, looked, false end
    local pending = redis.call('XPENDING', stream, group, after, '+', 100, consumer)
    if #pending == 0 then break end
    looked = looked + #pending
    for _, p in ipairs(pending) do
      local id = p[1]
      after = '(' .. id
      local entry = redis.call('XRANGE', stream, id, id)
      if #entry == 0 then
        redis.call('XACK', stream, group, id)
      elseif copy_back(stream, entry[1][2]) then
        redis.call('XACK', stream, group, id)
        redis.call('XDEL', stream, id)
        returned = returned + 1
      else
        left = left + 1
      end
    end
  end
  return returned, left, after, looked, true
end

local function consumer_names(stream, group)
  local names = {}
  local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, group)
  if consumers.err then return names end
  for _, c in ipairs(consumers) do
    for i = 1, #c, 2 do
      if c[i] == 'name' then table.insert(names, c[i + 1]) end
    end
  end
  return names
end
"#;

fn with_helpers(body: &str) -> Script {
    Script::new(&format!("{RETURN_PENDING}\n{body}"))
}

/// Creates the stream and its group unless they exist, and keeps the queue's
/// `max_length` in its meta hash: a second declare with another limit is refused. The
/// limit is kept only once the group is there: kept first, a declare that failed
/// (the key held by something else) left a limit for a queue that never was, and
/// refused the next declare with another (review).
/// KEYS: stream, meta. ARGV: group, max_length (`""` for none). Returns the
/// stored limit (`""` for none).
pub(crate) static DECLARE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local stored = redis.call('HGET', KEYS[2], 'max_length')
if stored and ARGV[2] ~= '' and stored ~= ARGV[2] then
  local was = stored
  if was == '' then was = 'no max_length' else was = 'max_length ' .. was end
  return redis.error_reply('QUEUE_CONFLICT the queue is already declared with ' .. was .. ', not max_length ' .. ARGV[2])
end
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(created) == 'table' and created.err and not string.find(created.err, 'BUSYGROUP') then
  return created
end
if not stored then
  redis.call('HSET', KEYS[2], 'max_length', ARGV[2])
  stored = ARGV[2]
end
return stored
"#,
    )
});

/// Appends a message unless the queue holds `max_length` ready messages.
/// KEYS: stream. ARGV: group, max_length, then the entry's fields. Returns the
/// entry's stream id.
pub(crate) static PUBLISH_LIMITED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('QUEUE_NOT_FOUND the queue has no stream')
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])[1]
local ready = redis.call('XLEN', KEYS[1]) - pending
if ready >= tonumber(ARGV[2]) then
  return redis.error_reply('QUEUE_FULL the queue holds its max_length of ' .. ARGV[2] .. ' ready messages')
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
"#,
    )
});

/// Acknowledges one entry a consumer holds and deletes it. KEYS: stream. ARGV: group,
/// consumer, entry id, the delivery's count. Returns 1, or 0 when that consumer does
/// not hold it (already settled or returned, or another consumer's now) or holds it
/// for a later delivery: a settlement that arrives late must not settle the delivery
/// that came after it, which a handler is running. The count alone did not tell a
/// group made again (its counts start over) from the same delivery (review).
pub(crate) static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #held == 0 or held[1][4] ~= tonumber(ARGV[4]) then return 0 end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
if acked == 1 then redis.call('XDEL', KEYS[1], ARGV[3]) end
return acked
"#,
    )
});

/// Returns one entry a consumer holds to the queue (a copy at the tail).
/// KEYS: stream. ARGV: group, consumer, entry id, the delivery's count. Returns 1, or
/// 0 when that consumer did not hold it for this delivery (see [`ACK`]); an entry
/// that cannot be copied back stays pending, and the release fails saying so.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r#"
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #held == 0 or held[1][4] ~= tonumber(ARGV[4]) then return 0 end
local entry = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if #entry == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return 0
end
local copied, why = copy_back(KEYS[1], entry[1][2])
if not copied then
  if why == 'TOO_WIDE' then
    return redis.error_reply('TOO_WIDE the entry has more fields than a script can copy back; it stays pending')
  end
  -- Refused for now (out of memory, read-only): pending still, and looked for again.
  return redis.error_reply('COPY_REFUSED the copy back was refused (' .. why .. '); it stays pending')
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"#,
    )
});

/// Registers a consumer with its lease. KEYS: stream. ARGV: group, consumer, lease
/// key, lease in ms.
pub(crate) static ATTACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('QUEUE_NOT_FOUND the queue has no stream')
end
redis.call('SET', ARGV[3], '1', 'PX', ARGV[4])
redis.call('XGROUP', 'CREATECONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"#,
    )
});

/// Returns what one consumer holds to the queue, a page at a time (up to
/// [`DETACH_PAGE`] entries looked at per call, so that a consumer holding thousands of
/// large entries does not stall Redis for the whole of them), and at the last page
/// removes the consumer (unless an entry that cannot be copied stays with it) and its
/// lease. KEYS: stream. ARGV: group, consumer, lease key, where to go on from (`-`
/// for the first call), how many entries a call looks at. Returns `[went back, where
/// to go on from]`, the second `""` once all were looked at.
pub(crate) static DETACH: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r#"
-- At the first page: a cancel cut short leaves no lease, so a live consumer's reap
-- returns the rest at once rather than after consumer_timeout.
redis.call('DEL', ARGV[3])
local group = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if group.err then return {0, ''} end
local returned, _, after, _, done = return_pending(KEYS[1], ARGV[1], ARGV[2], ARGV[4], tonumber(ARGV[5]))
if not done then return {returned, after} end
local still = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #still == 0 then redis.pcall('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return {returned, ''}
"#,
    )
});

/// How many entries one call of [`DETACH`] looks at.
pub(crate) const DETACH_PAGE: usize = 500;

/// Returns what consumers whose lease ran out (their process died) still hold, and
/// removes them, a page at a time as [`DETACH`] does: up to [`DETACH_PAGE`] entries
/// looked at per call, over all of them. KEYS: stream. ARGV: group, lease key prefix,
/// the consumer to go on with and where in its entries (`""` and `-` for the first
/// call), how many entries a call looks at. Returns `[went back, the consumer to go
/// on with, where]`, the consumer `""` once every dead consumer was seen to.
pub(crate) static REAP: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r#"
local returned = 0
local resume, from = ARGV[3], ARGV[4]
local budget = tonumber(ARGV[5])
-- The consumers come sorted by name: one deleted since the last call (by another
-- reaper) is gone on, not waited for.
local started = resume == ''
for _, name in ipairs(consumer_names(KEYS[1], ARGV[1])) do
  if name >= resume then started = true end
  if started and redis.call('EXISTS', ARGV[2] .. name) == 0 then
    local after = '-'
    if name == resume then after = from end
    local back, _, at, looked, done = return_pending(KEYS[1], ARGV[1], name, after, budget)
    returned = returned + back
    budget = budget - looked
    if not done then return {returned, name, at} end
    local still = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, name)
    if #still == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name) end
    -- The call's allowance is for all the dead consumers it sees to, not each.
    if budget <= 0 then return {returned, name, at} end
  end
end
return {returned, '', ''}
"#,
    )
});

/// Counts at one instant: entries, pending entries, consumers with a live lease.
/// KEYS: stream. ARGV: group, lease key prefix.
pub(crate) static INFO: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('QUEUE_NOT_FOUND the queue has no stream')
end
local length = redis.call('XLEN', KEYS[1])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])[1]
local live = 0
for _, name in ipairs(consumer_names(KEYS[1], ARGV[1])) do
  if redis.call('EXISTS', ARGV[2] .. name) == 1 then live = live + 1 end
end
return {length, pending, live}
"#,
    )
});
