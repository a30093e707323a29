//! What Lua code run by a [`LuaHost`](crate::LuaHost) can reach (docs/security.md,
//! "The Lua sandbox").
//!
//! Every source file and chunk runs in an environment of its own whose missing names
//! are read from one shared table of safe globals: the base functions, `string`,
//! `table`, `math`, `utf8`, `coroutine`, `os.time/clock/date/difftime`, and the
//! project's `queue`, `errors` and `logger`. Those shared tables are read-only
//! proxies, so one handler cannot change what another one calls. `io`, the rest of
//! `os`, and `require` of Lua files are opt-ins ([`OptIn`]) given to one file's
//! environment only. Binary chunks are never loaded: Lua does not verify bytecode,
//! and one bad byte crashes the process.

use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Thread, Value as LuaValue};
use queue_core::{Error, Result};

use crate::slices::Clock;

/// Libraries beyond the safe set that an entry opts into with
/// `sandbox: { allow: [...] }` (docs/security.md).
///
/// ```
/// use queue_lua::OptIn;
/// let opt_in = OptIn::parse(["os", "io"]).unwrap();
/// assert!(opt_in.os && opt_in.io && !opt_in.require);
/// assert!(OptIn::parse(["debug"]).is_err());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct OptIn {
    /// The `io` library.
    pub io: bool,
    /// All of `os` (`execute`, `getenv`, `remove`, ...), except `os.exit`.
    pub os: bool,
    /// `require` of Lua files on `package.path`, `dofile` and `loadfile`.
    pub require: bool,
}

impl OptIn {
    /// The names `allow:` accepts.
    pub const NAMES: [&'static str; 3] = ["io", "os", "require"];

    /// Reads a list of names; an unknown one is `INVALID`, naming the known ones.
    pub fn parse<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<OptIn> {
        let mut opt_in = OptIn::default();
        for name in names {
            match name.as_ref() {
                "io" => opt_in.io = true,
                "os" => opt_in.os = true,
                "require" => opt_in.require = true,
                other => {
                    return Err(Error::invalid(format!(
                        "{other:?} cannot be allowed: the sandbox opts into {}",
                        OptIn::NAMES.join(", ")
                    )));
                }
            }
        }
        Ok(opt_in)
    }
}

/// The metatable field that marks a read-only proxy (seen from Rust only: Lua code
/// gets the `__metatable` value instead of the metatable).
const READ_ONLY_MARK: &str = "__queue_read_only";

/// Base functions every environment gets as they are.
const SAFE_BASE: [&str; 14] = [
    "assert",
    "error",
    "getmetatable",
    "ipairs",
    "next",
    "pairs",
    "print",
    "rawequal",
    "rawget",
    "rawlen",
    "select",
    "tonumber",
    "tostring",
    "type",
];

/// Built from trusted code once per state: `pcall`, `xpcall`, `coroutine.resume`,
/// `coroutine.close` and `load` (whose reader function Lua calls in a protected call)
/// that raise the running code's deadline error again once it has passed
/// (crate::slices), so catching errors in a loop does not outlive a deadline; and
/// `coroutine.resume` and `coroutine.close` that refuse the coroutines the host runs
/// handlers in (`handler_threads`, weak keys): those are reused for later handler
/// runs, so a handle a handler kept (`coroutine.running()`) must not reach another
/// run. Written in Lua so that they stay yieldable.
const CATCHING_FUNCTIONS: &str = r##"
local raw, handler_threads, overdue, error, pack, unpack, pending, yield, isyieldable, begin_resume, end_resume, pass_slice_yield_on, foreign_resume = ...
local raw_pcall, raw_xpcall, raw_resume, raw_close, raw_load = raw.pcall, raw.xpcall, raw.resume, raw.close, raw.load
local type = type -- the state's own, taken before any handler's code runs
local function not_a_handler(co)
  if handler_threads[co] then
    error("a handler's or process's own coroutine cannot be resumed or closed from Lua", 3)
  end
end
local function not_foreign(co)
  local why = foreign_resume(co)
  if why then error(why, 3) end
end
local function unless_overdue(results)
  local message = overdue()
  if message then error(message, 0) end
  return unpack(results, 1, results.n)
end
-- Lua runs a message handler with hooks off when the error came from a hook (the
-- deadline's): past the deadline the message handler is skipped, or one that loops
-- would never end.
local function xpcall(f, handler, ...)
  local function handle(e)
    if overdue() then return e end
    return handler(e)
  end
  return unless_overdue(pack(raw_xpcall(f, handle, ...)))
end
-- Coroutines that died on a deadline's error: one raised by the hook, where the
-- coroutine could not yield, leaves Lua's hooks off in it for good, so closing it
-- would run its __close handlers where no time limit reaches.
local stopped = setmetatable({}, { __mode = "k" })
return function(...) return unless_overdue(pack(raw_pcall(...))) end,
  xpcall,
  function(co, ...)
    -- Lua's own error for what is not a coroutine.
    if type(co) ~= "thread" then return raw_resume(co, ...) end
    not_a_handler(co)
    local why = begin_resume(co)
    if why then error(why, 2) end
    local results = pack(raw_resume(co, ...))
    local sliced = end_resume(co)
    while results[1] do
      if results.n == 2 and results[2] == pending then
        -- An asynchronous call waiting inside `co` (queue.publish, msg:ack) yields
        -- mlua's pending marker. Handed to the caller, it looked like the call's result
        -- and the call was never finished: wait with it instead, by yielding it on to
        -- the handler's own poller, then resume `co` so the call looks again.
        if not isyieldable() then
          results = pack(false, "an asynchronous call (queue.publish, msg:ack, msg:nack) "
            .. "cannot wait where this coroutine was resumed (inside a function Lua calls from C): "
            .. "the call has started, and goes on when the coroutine is resumed again")
          break
        end
        yield(pending)
      elseif results.n == 1 and sliced then
        -- `co` yielded at its slice's end (crate::slices): so does this coroutine,
        -- up to the handler's, whose poller lets the other handlers run; then `co`
        -- goes on. Where this one cannot yield, `co` goes on at once.
        if isyieldable() then
          pass_slice_yield_on()
          yield()
        end
      else
        break
      end
      -- Checked again: this coroutine may be resumed by another run than the one
      -- that left it here (its run ended while `co` waited in a call).
      why = begin_resume(co)
      if why then error(why, 2) end
      results = pack(raw_resume(co))
      sliced = end_resume(co)
    end
    if not results[1] and overdue() then stopped[co] = true end
    return unless_overdue(results)
  end,
  function(co)
    if type(co) ~= "thread" then return raw_close(co) end
    not_a_handler(co)
    not_foreign(co)
    if stopped[co] then
      -- As closing a coroutine that died on an error says: false and an error, which
      -- does not replace the deadline's error on its way out of the handler.
      return false, "this coroutine was stopped at its deadline: its __close handlers "
        .. "do not run (Lua would run them with no time limit)"
    end
    -- A __close handler that `co` runs here may catch the deadline's error too.
    return unless_overdue(pack(raw_close(co)))
  end,
  -- Lua's `load` returns the errors of its reader function: the deadline's among them.
  function(...) return unless_overdue(pack(raw_load(...))) end
"##;

/// Built from trusted code once per state: `setmetatable` refusing a metatable with a
/// `__gc` field (any value marks the table for finalization, and a function can be put
/// there later). Lua runs finalizers with hooks off, so no time limit stops one that
/// loops, and on whichever coroutine the collector interrupts: another handler's, whose
/// message and rights it would use.
const GUARDED_SETMETATABLE: &str = r##"
local raw_setmetatable, rawget, type, error = ...
return function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc finalizers are not available in the sandbox "
      .. "(they would run outside any time limit, inside another handler's run)", 2)
  end
  return raw_setmetatable(t, mt)
end
"##;

/// Built from trusted code once per state: the loops of the `string` and `table`
/// libraries that run in C and allocate nothing, made so that they end. Such a loop
/// runs no Lua instruction, so neither the slices nor a `timeout` stop it (the hook
/// counts instructions), and the memory limit never trips: `string.rep("", 2^62)`,
/// `table.move({}, 1, math.maxinteger, 1, {})`, `table.insert(t, 1, v)` on a table
/// whose `#t` is 2^62 (by `__len`, or a plain table's border), a sort with a C
/// comparator, a concat through a C `__index` held their thread for ever. An empty
/// repeat is made at once; a long move is made in pieces from a Lua loop, which the
/// hook sees, and long inserts and removes move through it; a sort compares through
/// a Lua function where the comparator is in C or the elements come through a
/// metatable; a concat through a metatable joins from a Lua loop. Short work goes to
/// the C functions whole. Results, and the reads and writes metamethods see, are the
/// C functions'; errors too, but for the differences docs/consumers.md lists.
const BOUNDED_LOOPS: &str = r##"
local string, table, math, select, type, getmetatable, rawlen, rawequal, pcall, error,
      ipairs, tonumber, is_c = ...
local rep, find, gsub = string.rep, string.find, string.gsub
local move, insert, remove, sort, concat =
  table.move, table.insert, table.remove, table.sort, table.concat
local pack, unpack = table.pack, table.unpack
local tointeger, ult, maxinteger = math.tointeger, math.ult, math.maxinteger
-- Elements a piece moves: a few microseconds of C between two Lua instructions.
local PIECE = 256
-- Where an error of this file's own code says it happened.
local HERE = "^sandbox:%d+: "
-- What the C functions say when they refuse their arguments, which Lua prefixes
-- with the line that called them.
local REFUSALS = {
  "^bad argument #%d+ to ",
  "^wrong number of arguments to 'insert'$",
  "^invalid order function for sorting$",
  "^resulting string too large$",
  "^object length is not an integer$",
  "^invalid value %(%a+%) at index %-?%d+ in table for 'concat'$",
}

-- Calls the C function `name` with arguments it may refuse, and says its refusal as
-- it would have: called from here (through `pcall`), it names neither the function
-- nor a line, so the refusal is raised again at `level` (2 from a tail call, for the
-- code that called the library function). An error of this file's own code (a
-- comparison in `less`) loses its line, which the C function's would not have had;
-- any other error (a metamethod's, the time limit's) passes unchanged.
local function relay(level, name, f, ...)
  local results = pack(pcall(f, ...))
  if results[1] then
    return unpack(results, 2, results.n)
  end
  local err = results[2]
  if type(err) == "string" then
    for _, refusal in ipairs(REFUSALS) do
      if find(err, refusal) then
        error((gsub(err, "^(bad argument #%d+ to )'%?'", "%1'" .. name .. "'")), level)
      end
    end
    if find(err, HERE) then
      error((gsub(err, HERE, "")), 0)
    end
  end
  error(err, 0)
end

-- Why `v` is no integer position, as the C functions say it (without a `__name`).
local function not_an_integer(v)
  if tonumber(v) ~= nil then
    return "number has no integer representation"
  end
  return "number expected, got " .. type(v)
end

-- `#t` as the C functions read it: an integer, whatever `__len` returns.
local function length(t)
  local n = tointeger(#t)
  if n == nil then
    error("object length is not an integer", 3)
  end
  return n
end

local function bounded_rep(s, n, sep)
  local count = tointeger(n)
  if count then
    if s == "" and (sep == nil or sep == "") then
      return ""
    end
    -- What the C function takes without a word: a string or a number to repeat,
    -- few enough times that the result's length cannot overflow (it runs out of
    -- memory long before).
    local ts, tsep = type(s), type(sep)
    if count <= 0x7fffffff and (ts == "string" or ts == "number")
        and (sep == nil or tsep == "string" or tsep == "number") then
      return rep(s, n, sep)
    end
  end
  return relay(2, "rep", rep, s, n, sep)
end

-- Moves a1[fi..ei] to to[ti..] in pieces of PIECE elements, in the order the C
-- function moves them one by one: upwards from the end when the ranges overlap.
local function move_pieces(a1, fi, ei, ti, a2)
  if not (fi > 0 or ei < maxinteger + fi) then
    error("too many elements to move", 3)
  end
  local last, to = ei - fi, a2 == nil and a1 or a2
  -- The same table, given twice, is compared once, not once per piece.
  local pass = not rawequal(a1, a2) and a2 or nil
  if ti > fi and ti <= ei and (a2 == nil or a1 == a2) then
    local shift = ti - fi
    -- A piece shorter than the shift goes up from its start in C, which only a
    -- metamethod would see: then its elements are moved one by one.
    local seen = getmetatable(a1) ~= nil or getmetatable(to) ~= nil
    local hi = last
    while hi >= 0 do
      local lo = hi >= PIECE and hi - PIECE + 1 or 0
      if seen and hi - lo < shift then
        for i = hi, lo, -1 do
          to[ti + i] = a1[fi + i]
        end
      else
        move(a1, fi + lo, fi + hi, ti + lo, pass)
      end
      hi = lo - 1
    end
  else
    local lo = 0
    while lo <= last do
      local hi = last - lo < PIECE and last or lo + PIECE - 1
      move(a1, fi + lo, fi + hi, ti + lo, pass)
      lo = hi + 1
    end
  end
  return to
end

local function bounded_move(a1, f, e, t, a2)
  local fi, ei, ti = tointeger(f), tointeger(e), tointeger(t)
  if not (fi and ei and ti) or (ei >= fi and not (fi > 0 or ei < maxinteger + fi))
      or (ei >= fi and ti > maxinteger - (ei - fi)) then
    return relay(2, "move", move, a1, f, e, t, a2)
  end
  if type(a1) ~= "table" or (a2 ~= nil and type(a2) ~= "table") then
    -- Refused unless metamethods make it read or write as a table (a string reads
    -- through its metatable): then it is moved as one, in pieces.
    relay(3, "move", move, a1, 1, 0, 1, a2)
  end
  if ei < fi or ei - fi < PIECE then
    return move(a1, f, e, t, a2)
  end
  return move_pieces(a1, fi, ei, ti, a2)
end

local function bounded_insert(t, ...)
  local count = select("#", ...)
  if type(t) == "table" and getmetatable(t) == nil then
    -- A plain table: appending moves nothing, and a short move goes to C whole.
    -- (Even a plain table's `#t` can be 2^62: keys 2, 4, ..., 2^62, then 1.)
    if count == 1 then
      return insert(t, ...)
    end
    if count == 2 then
      local pos = tointeger((...))
      local e = rawlen(t) + 1
      if pos and ult(pos - 1, e) and e - pos < PIECE then
        return insert(t, ...)
      end
    end
  end
  if type(t) ~= "table" or count < 1 or count > 2 then
    return relay(2, "insert", insert, t, ...)
  end
  -- `#t` read once, what follows `pos` moved in pieces.
  local e = length(t) + 1
  local p, value = e, select(count, ...)
  if count == 2 then
    p = tointeger((...))
    if p == nil then
      error("bad argument #2 to 'insert' (" .. not_an_integer((...)) .. ")", 2)
    end
    if not ult(p - 1, e) then
      error("bad argument #2 to 'insert' (position out of bounds)", 2)
    end
    if e > p then
      move_pieces(t, p, e - 1, p + 1)
    end
  end
  t[p] = value
end

local function bounded_remove(t, pos)
  if type(t) ~= "table" then
    return relay(2, "remove", remove, t, pos)
  end
  local plain = getmetatable(t) == nil
  if plain and pos == nil then
    return remove(t)
  end
  local size = plain and rawlen(t) or length(t)
  local p = size
  if pos ~= nil then
    p = tointeger(pos)
    if p == nil then
      error("bad argument #2 to 'remove' (" .. not_an_integer(pos) .. ")", 2)
    end
  end
  if p ~= size and not (ult(p - 1, size) or p - 1 == size) then
    error("bad argument #2 to 'remove' (position out of bounds)", 2)
  end
  if plain and size - p < PIECE then
    return remove(t, pos)
  end
  local result = t[p]
  if p < size then
    move_pieces(t, p + 1, size, p)
    p = size
  end
  t[p] = nil
  return result
end

-- An optional integer argument as the C functions read it (`luaL_optinteger`).
local function optional_integer(v, default, n, name)
  if v == nil then
    return default
  end
  local i = tointeger(v)
  if i == nil then
    error("bad argument #" .. n .. " to '" .. name .. "' (" .. not_an_integer(v) .. ")", 3)
  end
  return i
end

-- A table with a metatable, whose elements a C `__index` may read without end (`""`
-- for every index of `1, math.maxinteger`), is joined from a Lua loop: its parts
-- take memory, which the limit counts, and its instructions the hook sees.
local function bounded_concat(t, sep, i, j)
  if type(t) ~= "table" or getmetatable(t) == nil then
    return relay(2, "concat", concat, t, sep, i, j)
  end
  local last = length(t)
  local tsep = type(sep)
  if not (sep == nil or tsep == "string" or tsep == "number") then
    error("bad argument #2 to 'concat' (string expected, got " .. tsep .. ")", 2)
  end
  local first = optional_integer(i, 1, 3, "concat")
  last = optional_integer(j, last, 4, "concat")
  local parts, n = {}, 0
  while first <= last do
    local v = t[first]
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" then
      error("invalid value (" .. tv .. ") at index " .. first .. " in table for 'concat'", 2)
    end
    n = n + 1
    parts[n] = v
    if first == last then
      break
    end
    first = first + 1
  end
  return concat(parts, sep)
end

local function less(a, b)
  return a < b
end

-- Sorts with a comparator that runs Lua instructions: one in C (`getmetatable`) ran
-- none, nor did the default comparison of elements read through a C `__index`.
local function bounded_sort(t, comp)
  if type(t) == "table" then
    if type(comp) == "function" and is_c(comp) then
      local in_c = comp
      comp = function(a, b)
        return in_c(a, b)
      end
    elseif comp == nil and getmetatable(t) ~= nil then
      comp = less
    end
  end
  return relay(2, "sort", sort, t, comp)
end

return bounded_rep, bounded_move, bounded_insert, bounded_remove, bounded_sort,
  bounded_concat, relay
"##;

/// Run once per state, before the sandbox is built from its standard library: the
/// real `load`, `loadfile` and `dofile`, which modules loaded with `require` run
/// with, and the searcher `require` finds Lua files with, take text only. Lua does
/// not verify bytecode: a corrupted chunk crashes the process, and the searcher and
/// the real `load` took it (review). A missing path is refused rather than read as
/// standard input.
const TEXT_ONLY_LOADING: &str = r##"
local real, package, select, error, format = ...
local raw_load, raw_loadfile, searchpath = real.load, real.loadfile, package.searchpath
local function loadfile(path, mode, ...)
  if path == nil then error("loadfile: no file named (standard input is not read)", 2) end
  if select("#", ...) > 0 then return raw_loadfile(path, "t", (...)) end
  return raw_loadfile(path, "t")
end
real.load = function(chunk, name, mode, ...)
  if select("#", ...) > 0 then return raw_load(chunk, name, "t", (...)) end
  return raw_load(chunk, name, "t")
end
real.loadfile = loadfile
real.dofile = function(path)
  local chunk, err = loadfile(path)
  if not chunk then error(err, 2) end
  return chunk()
end
package.searchers[2] = function(name)
  local path, err = searchpath(name, package.path)
  if not path then return err end
  local chunk, why = loadfile(path)
  if not chunk then
    error(format("error loading module '%s' from file '%s':\n\t%s", name, path, why), 0)
  end
  return chunk, path
end
"##;

/// Built from trusted code once per state: given an environment, the `load`,
/// `require`, `dofile` and `loadfile` that belong to it. Written in Lua so the
/// closures hold their environment as an upvalue, which the collector can see
/// (a Rust closure holding it would keep it alive forever).
const ENVIRONMENT_FUNCTIONS: &str = r##"
local raw_load, raw_loadfile, raw_require, builtin, select, error, tostring = ...
-- What `package.loaded` holds from the start: the real libraries, which Lua's
-- `require` would hand out by name (`_G` with the unguarded `load`, `io` without the
-- opt-in). A name the sandbox does not give is refused, never looked up there.
local standard = {}
for _, name in ipairs({"_G", "package", "coroutine", "table", "io", "os", "string", "math", "utf8", "debug"}) do
  standard[name] = true
end
return function(env, full_os, full_io, files)
  local function load(chunk, name, mode, ...)
    if select("#", ...) > 0 then return raw_load(chunk, name, "t", (...)) end
    return raw_load(chunk, name, "t", env)
  end
  local own = { os = full_os, io = full_io }
  local function require(name)
    local module = own[name]
    if module == nil then module = builtin[name] end
    if module ~= nil then return module end
    if standard[name] then
      error("require(" .. tostring(name) .. "): not available in the sandbox"
        .. (name == "io" and " (the entry can allow it with `sandbox: { allow: [io] }`)" or ""), 2)
    end
    if files then return raw_require(name) end
    error("require(" .. tostring(name) .. "): not a built-in module, and loading Lua files is off in the sandbox; "
      .. "the entry can allow it with `sandbox: { allow: [require] }`", 2)
  end
  env.load, env.require, env._G = load, require, env
  if full_os then env.os = full_os end
  if full_io then env.io = full_io end
  if files then
    local function loadfile(path, mode, ...)
      if select("#", ...) > 0 then return raw_loadfile(path, "t", (...)) end
      return raw_loadfile(path, "t", env)
    end
    env.loadfile = loadfile
    env.dofile = function(path)
      local chunk, err = loadfile(path)
      if not chunk then error(err, 2) end
      return chunk()
    end
  end
  return env
end
"##;

/// The safe globals of one Lua state and what opted-in environments add.
pub(crate) struct Sandbox {
    /// What every environment reads missing names from.
    shared: Table,
    /// The shared modules `require` gives by name.
    builtin: Table,
    /// Read-only `os` with everything but `exit`, for environments that opt in.
    full_os: Table,
    /// Read-only `io`, for environments that opt in.
    full_io: Table,
    /// Gives an environment its own `load`, `require`, `dofile`, `loadfile`.
    equip: Function,
}

/// Replaces the library loops that no limit could stop ([`BOUNDED_LOOPS`], and the
/// pattern matching of [`crate::patterns`]) in the real `string` and `table` tables,
/// which every string's metatable reaches too.
fn bound_library_loops(lua: &Lua, real: &Table, clock: &Rc<Clock>) -> mlua::Result<()> {
    let string: Table = real.raw_get("string")?;
    let table: Table = real.raw_get("table")?;
    #[allow(clippy::type_complexity)]
    let (rep, move_, insert, remove, sort, concat, relay): (
        Function,
        Function,
        Function,
        Function,
        Function,
        Function,
        Function,
    ) = lua.load(BOUNDED_LOOPS).set_name("=sandbox").call((
        &string,
        &table,
        real.raw_get::<Table>("math")?,
        real.raw_get::<Function>("select")?,
        real.raw_get::<Function>("type")?,
        real.raw_get::<Function>("getmetatable")?,
        real.raw_get::<Function>("rawlen")?,
        real.raw_get::<Function>("rawequal")?,
        real.raw_get::<Function>("pcall")?,
        real.raw_get::<Function>("error")?,
        real.raw_get::<Function>("ipairs")?,
        real.raw_get::<Function>("tonumber")?,
        lua.create_function(|_, f: Function| Ok(f.info().what == "C"))?,
    ))?;
    crate::patterns::install(lua, real, relay, clock)?;
    string.raw_set("rep", rep)?;
    table.raw_set("move", move_)?;
    table.raw_set("insert", insert)?;
    table.raw_set("remove", remove)?;
    table.raw_set("sort", sort)?;
    table.raw_set("concat", concat)
}

impl Sandbox {
    /// Builds the safe globals from the state's standard library, with `modules`
    /// (`queue`, `errors`, `logger`) made read-only and error catching that ends at
    /// the `clock`'s deadlines. Lua code may not resume or close the coroutines in
    /// `handler_threads`.
    pub(crate) fn new(
        lua: &Lua,
        modules: &[(&str, Table)],
        clock: &Rc<Clock>,
        handler_threads: &Table,
    ) -> mlua::Result<Sandbox> {
        let real = lua.globals();
        lua.load(TEXT_ONLY_LOADING)
            .set_name("=sandbox")
            .call::<()>((
                &real,
                real.raw_get::<Table>("package")?,
                real.raw_get::<Function>("select")?,
                real.raw_get::<Function>("error")?,
                real.raw_get::<Table>("string")?
                    .raw_get::<Function>("format")?,
            ))?;
        let shared = lua.create_table()?;
        for name in SAFE_BASE {
            shared.raw_set(name, real.raw_get::<LuaValue>(name)?)?;
        }
        let table: Table = real.raw_get("table")?;
        let real_coroutine: Table = real.raw_get("coroutine")?;
        let overdue = {
            let clock = Rc::clone(clock);
            lua.create_function(move |_, ()| Ok(clock.overdue()))?
        };
        // Checks that this run may resume `co` (why not, if it may not), and marks it
        // as being resumed by the sandbox (see `Clock::begin_resume`).
        let begin_resume = {
            let clock = Rc::clone(clock);
            lua.create_function(move |lua, co: Thread| {
                let why = crate::context::foreign_resume(lua, &co);
                if why.is_none() {
                    clock.begin_resume(co);
                }
                Ok(why)
            })?
        };
        let end_resume = {
            let clock = Rc::clone(clock);
            lua.create_function(move |_, co: Thread| Ok(clock.end_resume(co.to_pointer())))?
        };
        let foreign_resume =
            lua.create_function(|lua, co: Thread| Ok(crate::context::foreign_resume(lua, &co)))?;
        let pass_slice_yield_on = {
            let clock = Rc::clone(clock);
            lua.create_function(move |lua, ()| {
                clock.pass_slice_yield_on(lua.current_thread().to_pointer());
                Ok(())
            })?
        };
        let (pcall, xpcall, resume, close, load): (
            Function,
            Function,
            Function,
            Function,
            Function,
        ) = lua.load(CATCHING_FUNCTIONS).set_name("=sandbox").call((
            lua.create_table_from([
                ("pcall", real.raw_get::<Function>("pcall")?),
                ("xpcall", real.raw_get::<Function>("xpcall")?),
                ("resume", real_coroutine.raw_get::<Function>("resume")?),
                ("close", real_coroutine.raw_get::<Function>("close")?),
                ("load", real.raw_get::<Function>("load")?),
            ])?,
            handler_threads,
            overdue,
            real.raw_get::<Function>("error")?,
            table.raw_get::<Function>("pack")?,
            table.raw_get::<Function>("unpack")?,
            Lua::poll_pending(),
            real_coroutine.raw_get::<Function>("yield")?,
            real_coroutine.raw_get::<Function>("isyieldable")?,
            begin_resume,
            end_resume,
            pass_slice_yield_on,
            foreign_resume,
        ))?;
        shared.raw_set("pcall", pcall)?;
        shared.raw_set("xpcall", xpcall)?;
        shared.raw_set("_VERSION", real.raw_get::<LuaValue>("_VERSION")?)?;
        shared.raw_set("rawset", lua.create_function(guarded_rawset)?)?;
        let setmetatable: Function = lua.load(GUARDED_SETMETATABLE).set_name("=sandbox").call((
            real.raw_get::<Function>("setmetatable")?,
            real.raw_get::<Function>("rawget")?,
            real.raw_get::<Function>("type")?,
            real.raw_get::<Function>("error")?,
        ))?;
        shared.raw_set("setmetatable", setmetatable)?;
        shared.raw_set(
            "collectgarbage",
            lua.create_function(limited_collectgarbage)?,
        )?;

        let builtin = lua.create_table()?;
        let share =
            |name: &str, table: Table| share(lua, &shared, &builtin, name, LuaValue::Table(table));
        // No bytecode leaves or enters a state: `load` is text-only, so `dump` has
        // no use, and it is reachable through every string's metatable.
        real.raw_get::<Table>("string")?
            .raw_set("dump", LuaValue::Nil)?;
        bound_library_loops(lua, &real, clock)?;
        for name in ["string", "table", "math", "utf8"] {
            share(name, real.raw_get(name)?)?;
        }
        share(
            "coroutine",
            coroutine_library(lua, &real_coroutine, resume, close)?,
        )?;
        let real_os: Table = real.raw_get("os")?;
        let safe_os = lua.create_table()?;
        for name in ["time", "clock", "date", "difftime"] {
            safe_os.raw_set(name, real_os.raw_get::<LuaValue>(name)?)?;
        }
        share("os", safe_os)?;
        for (name, module) in modules {
            share(name, module.clone())?;
        }
        // `getmetatable("").__index` would hand out the real string library.
        lua.load(r#"getmetatable("").__metatable = false"#)
            .set_name("=sandbox")
            .exec()?;

        let full_os = lua.create_table()?;
        for pair in real_os.pairs::<LuaValue, LuaValue>() {
            let (name, value) = pair?;
            full_os.raw_set(name, value)?;
        }
        // Exiting from a handler skips shutdown: nothing settled, nothing flushed.
        full_os.raw_set(
            "exit",
            lua.create_function(|_, ()| -> mlua::Result<()> {
                Err(mlua::Error::runtime(
                    "os.exit is not available: a handler cannot end the runtime (stop it with a signal)",
                ))
            })?,
        )?;
        let full_os = read_only(lua, "os", full_os)?;
        let full_io = read_only(lua, "io", real.raw_get("io")?)?;
        let equip: Function = lua.load(ENVIRONMENT_FUNCTIONS).set_name("=sandbox").call((
            load,
            real.raw_get::<Function>("loadfile")?,
            real.raw_get::<Function>("require")?,
            &builtin,
            real.raw_get::<Function>("select")?,
            real.raw_get::<Function>("error")?,
            real.raw_get::<Function>("tostring")?,
        ))?;
        Ok(Sandbox {
            shared,
            builtin,
            full_os,
            full_io,
            equip,
        })
    }

    /// A fresh environment: its own globals, reading missing names from the shared
    /// safe globals, with what `opt_in` allows.
    pub(crate) fn environment(&self, lua: &Lua, opt_in: OptIn) -> mlua::Result<Table> {
        let env = lua.create_table()?;
        let meta = lua.create_table()?;
        meta.raw_set("__index", &self.shared)?;
        // Hides the shared table: `getmetatable(_ENV).__index` would reach it.
        meta.raw_set("__metatable", false)?;
        env.set_metatable(Some(meta))?;
        self.equip.call::<Table>((
            env,
            opt_in.os.then(|| self.full_os.clone()),
            opt_in.io.then(|| self.full_io.clone()),
            opt_in.require,
        ))
    }

    /// The shared safe globals, for embedders adding their own modules from Rust.
    pub(crate) fn shared(&self) -> &Table {
        &self.shared
    }

    /// Shares `value` with every environment as the global `name`, and as
    /// `require(name)`: see [`share`].
    pub(crate) fn embed(&self, lua: &Lua, name: &str, value: LuaValue) -> mlua::Result<()> {
        share(lua, &self.shared, &self.builtin, name, value)
    }
}

/// Sets `value` in `shared` and `builtin` as `name`; a table behind a read-only proxy,
/// so that no handler can change it for the others (`http.get = ...` in one consumer's
/// handler ran in every other's, with their rights).
fn share(
    lua: &Lua,
    shared: &Table,
    builtin: &Table,
    name: &str,
    value: LuaValue,
) -> mlua::Result<()> {
    let value = match value {
        LuaValue::Table(table) if !is_read_only(&table) => {
            LuaValue::Table(read_only(lua, name, table)?)
        }
        other => other,
    };
    shared.raw_set(name, &value)?;
    builtin.raw_set(name, value)
}

/// A proxy that reads through to `table` and refuses every write.
pub(crate) fn read_only(lua: &Lua, name: &str, table: Table) -> mlua::Result<Table> {
    let proxy = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.raw_set("__index", &table)?;
    let message = format!("{name} is read-only: it is shared by every handler on this Lua state");
    meta.raw_set(
        "__newindex",
        lua.create_function(move |_, _: MultiValue| -> mlua::Result<()> {
            Err(mlua::Error::runtime(message.clone()))
        })?,
    )?;
    // The iterator closes over the table: `pairs` returns its state to the caller,
    // so a state of `t` would hand out the writable table behind the proxy.
    let pairs = lua
        .load(
            "local next, t = ... \
             local function step(_, key) return next(t, key) end \
             return function() return step, nil, nil end",
        )
        .set_name("=sandbox")
        .call::<Function>((lua.globals().raw_get::<Function>("next")?, &table))?;
    meta.raw_set("__pairs", pairs)?;
    let len = lua
        .load("local t = ... return function() return #t end")
        .set_name("=sandbox")
        .call::<Function>(&table)?;
    meta.raw_set("__len", len)?;
    meta.raw_set("__metatable", format!("read-only {name}"))?;
    meta.raw_set(READ_ONLY_MARK, true)?;
    proxy.set_metatable(Some(meta))?;
    Ok(proxy)
}

pub(crate) fn is_read_only(table: &Table) -> bool {
    table
        .metatable()
        .and_then(|m| m.raw_get::<bool>(READ_ONLY_MARK).ok())
        .unwrap_or(false)
}

/// `rawset`, except on the read-only proxies (a raw write would shadow what they
/// read through to, for every handler).
fn guarded_rawset(
    _: &Lua,
    (table, key, value): (Table, LuaValue, LuaValue),
) -> mlua::Result<Table> {
    if is_read_only(&table) {
        return Err(mlua::Error::runtime(
            "rawset on a read-only library table: it is shared by every handler",
        ));
    }
    table.raw_set(key, value)?;
    Ok(table)
}

/// `collectgarbage` with the options that read or help the collector; stopping it or
/// changing its mode would change it for every handler on the state.
fn limited_collectgarbage(
    lua: &Lua,
    (option, _): (Option<mlua::LuaString>, MultiValue),
) -> mlua::Result<LuaValue> {
    let option = option.map(|o| o.as_bytes().to_vec());
    match option.as_deref().unwrap_or(b"collect") {
        b"collect" => {
            lua.gc_collect()?;
            Ok(LuaValue::Integer(0))
        }
        b"count" => Ok(LuaValue::Number(lua.used_memory() as f64 / 1024.0)),
        b"step" => Ok(LuaValue::Boolean(lua.gc_step()?)),
        b"isrunning" => Ok(LuaValue::Boolean(lua.gc_is_running())),
        other => Err(mlua::Error::runtime(format!(
            "collectgarbage({}) is not available in the sandbox: the collector is shared by every handler",
            crate::errors::quoted(other)
        ))),
    }
}

/// `coroutine` whose `create` and `wrap` make coroutines that run under their
/// creator's context (its actor, policies and delivery): a coroutine is not a way
/// around a policy; `resume` and `close` are the sandbox's (deadlines, and no
/// handler's coroutine).
fn coroutine_library(
    lua: &Lua,
    real: &Table,
    resume: Function,
    close: Function,
) -> mlua::Result<Table> {
    let library = lua.create_table()?;
    for pair in real.pairs::<LuaValue, LuaValue>() {
        let (name, value) = pair?;
        library.raw_set(name, value)?;
    }
    let create = lua.create_function(|lua, function: Function| {
        let thread = lua.create_thread(function)?;
        crate::context::inherit(lua, &thread)?;
        Ok(thread)
    })?;
    let wrap: Function = lua
        .load(
            r#"
            local create, resume, close, error, pack, unpack = ...
            return function(f)
              local co = create(f)
              return function(...)
                local results = pack(resume(co, ...))
                if results[1] then return unpack(results, 2, results.n) end
                close(co)
                error(results[2], 0)
              end
            end
            "#,
        )
        .set_name("=sandbox")
        .call((
            create.clone(),
            resume.clone(),
            // The sandbox's: it leaves alone a coroutine stopped at its deadline.
            close.clone(),
            lua.globals().raw_get::<Function>("error")?,
            lua.globals()
                .raw_get::<Table>("table")?
                .raw_get::<Function>("pack")?,
            lua.globals()
                .raw_get::<Table>("table")?
                .raw_get::<Function>("unpack")?,
        ))?;
    library.raw_set("create", create)?;
    library.raw_set("wrap", wrap)?;
    library.raw_set("resume", resume)?;
    library.raw_set("close", close)?;
    Ok(library)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounded library functions give what the C functions give: the same tables,
    /// the same reads and writes in the same order through metamethods, the same
    /// results and the same errors, on short spans and on spans moved in pieces.
    #[test]
    fn bounded_library_loops_behave_as_the_c_functions() {
        let lua = Lua::new();
        let real = lua.globals();
        let string: Table = real.raw_get("string").unwrap();
        let table: Table = real.raw_get("table").unwrap();
        let originals = lua.create_table().unwrap();
        for (name, from) in [
            ("rep", &string),
            ("move", &table),
            ("insert", &table),
            ("remove", &table),
            ("sort", &table),
            ("concat", &table),
        ] {
            originals
                .raw_set(name, from.raw_get::<Function>(name).unwrap())
                .unwrap();
        }
        bound_library_loops(&lua, &real, &Rc::new(Clock::default())).unwrap();
        lua.load(EQUIVALENCE)
            .set_name("=equivalence")
            .call::<()>(originals)
            .unwrap();
    }

    const EQUIVALENCE: &str = r##"
local c = ...
local bounded = { rep = string.rep, move = table.move, insert = table.insert,
                  remove = table.remove, sort = table.sort, concat = table.concat }
assert(bounded.move ~= c.move, "not replaced")

-- A table that logs every read and write, with a length of its own.
local function logged(n, log)
  local store = {}
  for i = 1, n do store[i] = i * 10 end
  return setmetatable({}, {
    __index = function(_, k) log[#log + 1] = "r" .. tostring(k); return store[k] end,
    __newindex = function(_, k, v) log[#log + 1] = "w" .. tostring(k) .. "=" .. tostring(v); store[k] = v end,
    __len = function() log[#log + 1] = "n" return n end,
  }), store
end

-- Runs `f(fns, ...)` with the C functions and with the bounded ones on fresh state made by
-- `make`, and compares what each returned (or raised), the log and the table.
local function compare(what, make, f, unordered)
  local results = {}
  for _, fns in ipairs({ c, bounded }) do
    local log = {}
    local t, store = make(log)
    local ok, a, b = pcall(f, fns, t)
    if rawequal(a, t) then a = "the table" end
    local contents = {}
    for i = -2, 1100 do contents[#contents + 1] = tostring((store or t)[i]) end
    results[#results + 1] = { ok = tostring(ok), a = tostring(a), b = tostring(b),
      log = table.concat(log, ","), contents = table.concat(contents, ",") }
  end
  -- Lua picks a sort's pivots at random on long spans: a sort's reads and writes
  -- differ from one run to the next, its result does not.
  for _, k in ipairs(unordered and { "ok", "a", "b", "contents" } or { "ok", "a", "b", "log", "contents" }) do
    assert(results[1][k] == results[2][k],
      what .. ": " .. k .. " differs:\n  C:       " .. results[1][k]:sub(1, 300)
        .. "\n  bounded: " .. results[2][k]:sub(1, 300))
  end
end

local function plain(n)
  return function() local t = {} for i = 1, n do t[i] = i end return t end
end

for _, n in ipairs({ 0, 1, 5, 600, 1000 }) do
  for _, args in ipairs({
    { 1, n, 1 }, { 1, n, 2 }, { 2, n, 1 }, { 1, n, 300 }, { 300, n, 1 },
    { 1, n - 1, 0 }, { 5, 3, 1 }, { 1, n, -5 }, { 1, n, 101 }, { 1, n, 257 }, { 5, n, 400 },
  }) do
    local f, e, t = table.unpack(args)
    local what = ("move(%d, %d, %d) of %d"):format(f, e, t, n)
    compare(what, plain(n), function(fns, tt) local r = fns.move(tt, f, e, t) return r end)
    compare(what .. " to another", plain(n), function(fns, tt) local d = {} local r = fns.move(tt, f, e, t, d) return r == d, d[t] end)
    compare(what .. " logged", function(log) return logged(n, log) end,
      function(fns, tt) local r = fns.move(tt, f, e, t) return r == tt end)
  end
  for _, pos in ipairs({ 1, 2, n, n + 1, n + 2, 0, -1, "2", 1.5, "x", "2.5", true }) do
    local what = ("insert at %s of %d"):format(tostring(pos), n)
    compare(what, function(log) return logged(n, log) end, function(fns, tt) local r = fns.insert(tt, pos, "x") return r end)
    compare(what .. " plain", plain(n), function(fns, tt) local r = fns.insert(tt, pos, "x") return r end)
    what = ("remove at %s of %d"):format(tostring(pos), n)
    compare(what, function(log) return logged(n, log) end, function(fns, tt) local r = fns.remove(tt, pos) return r end)
    compare(what .. " plain", plain(n), function(fns, tt) local r = fns.remove(tt, pos) return r end)
  end
  compare("insert at the end of " .. n, function(log) return logged(n, log) end, function(fns, tt) local r = fns.insert(tt, "x") return r end)
  compare("remove the last of " .. n, function(log) return logged(n, log) end, function(fns, tt) local r = fns.remove(tt) return r end)
  compare("insert, too many arguments", function(log) return logged(n, log) end, function(fns, tt) local r = fns.insert(tt, 1, 2, 3) return r end)
end
compare("a length that is no integer", function()
  return setmetatable({}, { __len = function() return 1.5 end })
end, function(fns, tt) local r = fns.insert(tt, 1, "x") return r end)
compare("a length that is no integer, remove", function()
  return setmetatable({}, { __len = function() return "x" end })
end, function(fns, tt) local r = fns.remove(tt, 1) return r end)
compare("move wrapping round", plain(3), function(fns, tt) local r = fns.move(tt, 1, 1000, math.maxinteger - 10) return r end)
compare("move of too many", plain(3), function(fns, tt) local r = fns.move(tt, -10, math.maxinteger, 1) return r end)
for _, call in ipairs({
  function(fns) local r = fns.insert(nil, "x") return r end,
  function(fns) local r = fns.insert(setmetatable({}, {}), 1, 2, 3) return r end,
  function(fns) local r = fns.insert({}, 5, "x") return r end,
  function(fns) local r = fns.remove(nil) return r end,
  function(fns) local r = fns.remove({}, "x") return r end,
  function(fns) local r = fns.remove(setmetatable({}, {}), 1.5) return r end,
  function(fns) local r = fns.sort(nil) return r end,
  function(fns) local r = fns.sort({ 3, 1 }, "x") return r end,
  function(fns) local r = fns.sort({ 3, {}, 1 }) return r end,
  function(fns) local r = fns.sort({ 3, 2, 1 }, function(a, b) error("mine") end) return r end,
  function(fns) local r = fns.move({}, 1, 2, 1, 7) return r end,
  function(fns) local r = fns.rep("x", 2^62) return r end,
  function(fns) local r = fns.rep("", 2^62, "x") return r end,
  function(fns) local r = fns.sort(setmetatable({ 3, {}, 1 }, {})) return r end,
  function(fns) local d = {} local r = fns.move("abc", 1, 3, 1, d) return r == d, #d end,
  function(fns) local r = fns.move("abc", 1, 3, 1) return r end,
  function(fns) local t = { 3, 1, 2 } fns.sort(t, math.ult) return table.concat(t, ",") end,
  function(fns) return select("#", fns.sort({ 2, 1 })), select("#", fns.insert({}, 1)),
    select("#", fns.remove({ 1 })), select("#", fns.move({}, 1, 0, 1)) end,
}) do
  compare("refusals", plain(0), call)
end
compare("move of no table", plain(3), function(fns, tt) local r = fns.move(5, 1, 1000, 1) return r end)

for _, cmp in ipairs({ false, function(a, b) return a > b end }) do
  compare("sort with a metatable", function(log)
    local t = logged(700, log)
    return t
  end, function(fns, tt) local r = fns.sort(tt, cmp or nil) return r end, true)
  compare("sort plain", plain(700), function(fns, tt) local r = fns.sort(tt, cmp or nil) return r end, true)
  compare("sort, short", function(log) return logged(50, log) end,
    function(fns, tt) local r = fns.sort(tt, cmp or nil) return r end)
end

bounded.concat = table.concat
c.concat = c.concat
for _, args in ipairs({ {}, { ", " }, { ",", 2 }, { ",", 2, 3 }, { ",", 3, 2 }, { 7, 1, 1 },
    { {} }, { ",", "x" }, { ",", 1.5 }, { ",", 1, 4 }, { nil, -1, 2 } }) do
  local sep, i, j = args[1], args[2], args[3]
  compare("concat " .. tostring(sep) .. " " .. tostring(i) .. " " .. tostring(j),
    function(log) return logged(3, log) end,
    function(fns, tt) local r = fns.concat(tt, sep, i, j) return r end)
  compare("concat plain " .. tostring(sep) .. " " .. tostring(i) .. " " .. tostring(j), plain(3),
    function(fns, tt) local r = fns.concat(tt, sep, i, j) return r end)
end
compare("concat of no table", plain(0), function(fns) local r = fns.concat(nil) return r end)
compare("concat of a bad value", function()
  return setmetatable({}, { __index = function(_, k) return k == 2 and true or "x" end, __len = function() return 3 end })
end, function(fns, tt) local r = fns.concat(tt) return r end)

for _, args in ipairs({ { "", 5 }, { "", 0 }, { "", -3 }, { "ab", 3, "," }, { "", 3, "," },
    { "", 3, "" }, { "", 2.0 }, { "", "4" }, { 12, 2 } }) do
  local s, n, sep = table.unpack(args)
  assert(c.rep(s, n, sep) == bounded.rep(s, n, sep), "rep")
end
for _, args in ipairs({ { "", 1.5 }, { "", {} }, { {}, 3 }, { "", "x" } }) do
  local s, n, sep = table.unpack(args)
  local function call(fns) local r = fns.rep(s, n, sep) return r end
  local _, e1 = pcall(call, c)
  local _, e2 = pcall(call, bounded)
  assert(e1 == e2, tostring(e1) .. " and " .. tostring(e2))
end
"##;
}
