//! One Lua state with the `queue`, `errors` and `logger` globals, the sources loaded
//! into it, and handlers run as coroutines.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};
use queue_core::security::SecurityContext;
use queue_core::{Error, Queues, Result, Value};

use crate::context::{Contexts, CoroutineContext, DeliveryContext, DeliveryState};
use crate::errors::describe;
use crate::value::to_lua;

/// A handler function found in a source file.
#[derive(Clone, Debug)]
pub struct Handler {
    function: Function,
    name: String,
}

impl Handler {
    /// `path:method`, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// How a handler run ended (SPEC §5 settlement table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Returned normally: acknowledge.
    Ack,
    /// Returned `false`, returned `nil, err`, or raised: reject, with the reason.
    Nack {
        /// The error the handler gave, or what it raised (with the Lua traceback).
        reason: String,
    },
    /// The handler called `msg:ack()` or `msg:nack()` itself; that call stands.
    Settled,
}

struct LoadedSource {
    env: Table,
    exports: LuaValue,
}

/// One Lua state. Not `Send`: the runtime keeps one per thread and runs many handler
/// coroutines on each.
///
/// ```
/// use queue_core::Queues;
/// use queue_core::security::SecurityContext;
/// use queue_lua::LuaHost;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let host = LuaHost::new(Queues::new(), SecurityContext::default()).unwrap();
/// let out = host.eval("local ok, err = queue.publish('', 'x'); return err:kind()").await.unwrap();
/// assert_eq!(out, vec![queue_core::Value::from("Invalid")]);
/// # });
/// ```
pub struct LuaHost {
    lua: Lua,
    sources: RefCell<HashMap<PathBuf, Rc<LoadedSource>>>,
}

impl LuaHost {
    /// A Lua 5.4 state with `queue` (publishing through `queues`), `errors` and
    /// `logger` as globals and as `require`-able modules. `default_security` applies to
    /// code that runs outside a handler or process context.
    pub fn new(queues: Queues, default_security: SecurityContext) -> Result<LuaHost> {
        let lua = Lua::new();
        // Every handler call allocates short-lived objects (its coroutine, the payload
        // table): the generational collector frees them in cheap minor collections
        // instead of re-marking the whole heap.
        lua.gc_set_mode(mlua::state::GcMode::Generational(
            mlua::state::GcGenParams::default(),
        ));
        let setup = || -> mlua::Result<()> {
            let contexts = Contexts::default();
            *contexts.fallback.borrow_mut() = default_security;
            lua.set_app_data(contexts);
            let globals = lua.globals();
            let loaded: Table = globals.get::<Table>("package")?.get("loaded")?;
            let modules = [
                ("queue", crate::module::create_module(&lua, queues)?),
                ("errors", crate::errors::create_module(&lua)?),
                ("logger", crate::logger::create_module(&lua)?),
            ];
            for (name, module) in modules {
                globals.set(name, module.clone())?;
                loaded.set(name, module)?;
            }
            Ok(())
        };
        setup().map_err(|e| Error::internal(format!("cannot set up the Lua state: {e}")))?;
        Ok(LuaHost {
            lua,
            sources: RefCell::default(),
        })
    }

    /// The Lua state, for embedding more modules.
    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// How many coroutines are running handlers or processes right now.
    pub fn running(&self) -> usize {
        self.lua
            .app_data_ref::<Contexts>()
            .map_or(0, |c| c.running())
    }

    /// Loads a source file once into its own environment (later calls reuse it).
    fn load(&self, path: &Path) -> Result<Rc<LoadedSource>> {
        if let Some(loaded) = self.sources.borrow().get(path) {
            return Ok(Rc::clone(loaded));
        }
        let code = std::fs::read(path).map_err(|e| {
            Error::invalid(format!("cannot read Lua source {}: {e}", path.display()))
        })?;
        let load = || -> mlua::Result<LoadedSource> {
            let env = self.lua.create_table()?;
            let meta = self.lua.create_table()?;
            meta.set("__index", self.lua.globals())?;
            env.set_metatable(Some(meta))?;
            let exports = self
                .lua
                .load(code)
                .set_name(format!("@{}", path.display()))
                .set_environment(env.clone())
                .eval::<LuaValue>()?;
            Ok(LoadedSource { env, exports })
        };
        let loaded = Rc::new(load().map_err(|e| {
            Error::invalid(format!("cannot load Lua source {}: {e}", path.display()))
        })?);
        self.sources
            .borrow_mut()
            .insert(path.to_path_buf(), Rc::clone(&loaded));
        Ok(loaded)
    }

    /// Finds `method` in a source: a field of the table the file returns, or else a
    /// global the file defines.
    pub fn handler(&self, path: &Path, method: &str) -> Result<Handler> {
        let source = self.load(path)?;
        let from_exports = match &source.exports {
            LuaValue::Table(t) => t.raw_get::<Option<Function>>(method).ok().flatten(),
            _ => None,
        };
        let function = match from_exports {
            Some(f) => f,
            None => source.env.raw_get::<Option<Function>>(method).ok().flatten().ok_or_else(|| {
                Error::invalid(format!(
                    "{} defines no function {method:?} (neither a field of the table it returns nor a global)",
                    path.display()
                ))
            })?,
        };
        Ok(Handler {
            function,
            name: format!("{}:{method}", path.display()),
        })
    }

    /// Runs a handler for one delivery as a coroutine, with the consumer's security,
    /// and maps how it ended to an [`Outcome`].
    pub async fn run_handler(
        &self,
        handler: &Handler,
        payload: &Value,
        delivery: DeliveryContext,
        security: SecurityContext,
    ) -> Outcome {
        let state = Rc::new(DeliveryState {
            context: delivery,
            settled: Default::default(),
            released: Default::default(),
        });
        let context = CoroutineContext {
            security,
            delivery: Some(Rc::clone(&state)),
        };
        let result = match to_lua(&self.lua, payload) {
            Ok(arg) => {
                self.run(handler, context, MultiValue::from_vec(vec![arg]))
                    .await
            }
            Err(e) => Err(e),
        };
        state.released.set(true);
        if state.settled.get() {
            return Outcome::Settled;
        }
        match result {
            Err(e) => Outcome::Nack {
                reason: format!("{} raised: {e}", handler.name),
            },
            Ok(values) => {
                let first = values.front().cloned().unwrap_or(LuaValue::Nil);
                let second = values.get(1).cloned().unwrap_or(LuaValue::Nil);
                if !second.is_nil() {
                    Outcome::Nack {
                        reason: describe(&second),
                    }
                } else if first == LuaValue::Boolean(false) {
                    Outcome::Nack {
                        reason: format!("{} returned false", handler.name),
                    }
                } else {
                    Outcome::Ack
                }
            }
        }
    }

    /// Runs a function (a `process.lua`) as a coroutine with these arguments and
    /// security; a raised error comes back `INTERNAL` with the Lua traceback.
    pub async fn run_process(
        &self,
        handler: &Handler,
        args: Vec<Value>,
        security: SecurityContext,
    ) -> Result<()> {
        let args = args
            .iter()
            .map(|v| to_lua(&self.lua, v))
            .collect::<mlua::Result<Vec<_>>>()
            .map_err(|e| Error::internal(e.to_string()))?;
        let context = CoroutineContext {
            security,
            delivery: None,
        };
        self.run(handler, context, MultiValue::from_vec(args))
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::internal(format!("{} failed: {e}", handler.name)).retryable_if(false)
            })
    }

    /// Runs a chunk of Lua as a coroutine (so it may publish) and returns what it
    /// returns; for tests, docs examples and one-off scripts.
    pub async fn eval(&self, code: &str) -> Result<Vec<Value>> {
        let function = self
            .lua
            .load(code)
            .set_name("=chunk")
            .into_function()
            .map_err(|e| Error::invalid(format!("cannot load chunk: {e}")))?;
        let handler = Handler {
            function,
            name: "chunk".to_string(),
        };
        let security = self
            .lua
            .app_data_ref::<Contexts>()
            .map(|c| c.fallback.borrow().clone())
            .unwrap_or_default();
        let values = self
            .run(
                &handler,
                CoroutineContext {
                    security,
                    delivery: None,
                },
                MultiValue::new(),
            )
            .await
            .map_err(|e| Error::internal(e.to_string()).retryable_if(false))?;
        values
            .iter()
            .map(|v| crate::value::from_lua(v, "result"))
            .collect()
    }

    async fn run(
        &self,
        handler: &Handler,
        context: CoroutineContext,
        args: MultiValue,
    ) -> mlua::Result<MultiValue> {
        let thread = self.lua.create_thread(handler.function.clone())?;
        let contexts = self
            .lua
            .app_data_ref::<Contexts>()
            .ok_or_else(|| mlua::Error::runtime("Lua state has no queue contexts"))?;
        contexts.enter(&thread, context);
        drop(contexts);
        let result = match thread.clone().into_async::<MultiValue>(args) {
            Ok(running) => running.await,
            Err(e) => Err(e),
        };
        if let Some(contexts) = self.lua.app_data_ref::<Contexts>() {
            contexts.leave(&thread);
        }
        result
    }
}

/// Compiles a Lua source without running it: syntax errors come back `INVALID` with
/// the file and line. Used by `check`.
pub fn check_syntax(path: &Path) -> Result<()> {
    let code = std::fs::read(path)
        .map_err(|e| Error::invalid(format!("cannot read Lua source {}: {e}", path.display())))?;
    Lua::new()
        .load(code)
        .set_name(format!("@{}", path.display()))
        .into_function()
        .map(|_| ())
        .map_err(|e| Error::invalid(format!("Lua syntax error: {e}")))
}
