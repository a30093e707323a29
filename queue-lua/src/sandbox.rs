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

/// Built from trusted code once per state: `pcall`, `xpcall` and `coroutine.resume`
/// that raise the running code's deadline error again once it has passed
/// (crate::slices), so catching errors in a loop does not outlive a deadline; and
/// `coroutine.resume` and `coroutine.close` that refuse the coroutines the host runs
/// handlers in (`handler_threads`, weak keys): those are reused for later handler
/// runs, so a handle a handler kept (`coroutine.running()`) must not reach another
/// run. Written in Lua so that they stay yieldable.
const CATCHING_FUNCTIONS: &str = r##"
local raw_pcall, raw_xpcall, raw_resume, raw_close, handler_threads, overdue, error, pack, unpack, pending, yield, isyieldable, begin_resume, end_resume, pass_slice_yield_on, foreign_resume = ...
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
      begin_resume(co)
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
    return raw_close(co)
  end
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
    error("require(" .. tostring(name) .. "): loading Lua files is off in the sandbox; "
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
    /// Read-only `os` with everything but `exit`, for environments that opt in.
    full_os: Table,
    /// Read-only `io`, for environments that opt in.
    full_io: Table,
    /// Gives an environment its own `load`, `require`, `dofile`, `loadfile`.
    equip: Function,
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
                    clock.begin_resume(co.to_pointer());
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
        let (pcall, xpcall, resume, close): (Function, Function, Function, Function) =
            lua.load(CATCHING_FUNCTIONS).set_name("=sandbox").call((
                real.raw_get::<Function>("pcall")?,
                real.raw_get::<Function>("xpcall")?,
                real_coroutine.raw_get::<Function>("resume")?,
                real_coroutine.raw_get::<Function>("close")?,
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
        let share = |name: &str, table: Table| -> mlua::Result<()> {
            let proxy = if is_read_only(&table) {
                table
            } else {
                read_only(lua, name, table)?
            };
            shared.raw_set(name, &proxy)?;
            builtin.raw_set(name, proxy)
        };
        // No bytecode leaves or enters a state: `load` is text-only, so `dump` has
        // no use, and it is reachable through every string's metatable.
        real.raw_get::<Table>("string")?
            .raw_set("dump", LuaValue::Nil)?;
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
            real.raw_get::<Function>("load")?,
            real.raw_get::<Function>("loadfile")?,
            real.raw_get::<Function>("require")?,
            builtin,
            real.raw_get::<Function>("select")?,
            real.raw_get::<Function>("error")?,
            real.raw_get::<Function>("tostring")?,
        ))?;
        Ok(Sandbox {
            shared,
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

fn is_read_only(table: &Table) -> bool {
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
    (option, _): (Option<String>, MultiValue),
) -> mlua::Result<LuaValue> {
    match option.as_deref().unwrap_or("collect") {
        "collect" => {
            lua.gc_collect()?;
            Ok(LuaValue::Integer(0))
        }
        "count" => Ok(LuaValue::Number(lua.used_memory() as f64 / 1024.0)),
        "step" => Ok(LuaValue::Boolean(lua.gc_step()?)),
        "isrunning" => Ok(LuaValue::Boolean(lua.gc_is_running())),
        other => Err(mlua::Error::runtime(format!(
            "collectgarbage({other:?}) is not available in the sandbox: the collector is shared by every handler"
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
