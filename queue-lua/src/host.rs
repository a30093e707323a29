//! One Lua state with the `queue`, `errors` and `logger` globals, the sources loaded
//! into it, and handlers run as coroutines, all inside the sandbox.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use mlua::chunk::ChunkMode;
use mlua::{Function, IntoLuaMulti, Lua, MultiValue, Table, Thread, Value as LuaValue};
use queue_core::security::SecurityContext;
use queue_core::{Error, Message, Queues, Result, Tape, Value};

use crate::context::{Contexts, CoroutineContext, DeliveryContext, DeliveryState};
use crate::errors::{LuaError, describe};
use crate::sandbox::{OptIn, Sandbox};
use crate::slices::{Clock, Deadline, Sliced};
use crate::source::LuaSource;
use crate::value::{tape_to_lua, to_lua};

/// The limits of one Lua state (docs/security.md, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most memory the state may hold, in bytes. Past it, the allocation that
    /// would cross it fails with a Lua error ("not enough memory"), which fails the
    /// handler that asked for it; the process and the other handlers go on.
    pub memory_bytes: usize,
    /// How long a source file's top level may run when it is loaded: an endless loop
    /// there fails the load instead of hanging the worker (or `check`).
    pub load_time: Duration,
}

impl Limits {
    /// The default memory limit: 256 MiB per Lua state.
    pub const DEFAULT_MEMORY_BYTES: usize = 256 * 1024 * 1024;
    /// The least memory limit a state takes: 1 MiB. A state with its modules and
    /// sandbox holds a few hundred KiB before any handler runs, and mlua reads a
    /// limit of 0 as no limit at all.
    pub const MIN_MEMORY_BYTES: usize = 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: Limits::DEFAULT_MEMORY_BYTES,
            load_time: Duration::from_secs(5),
        }
    }
}

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

/// A handler's argument: a body already converted into a value of one host's Lua
/// state, by [`LuaHost::decode_payload`] or [`LuaHost::payload`]. Only that host can
/// run a handler with it.
#[derive(Debug, Clone)]
pub struct Payload {
    value: LuaValue,
    /// The clock of the host that made it: which Lua state the value lives in.
    made_by: *const Clock,
}

/// How a handler run ended (the settlement table of docs/lua-api.md, "Handlers").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Returned normally: acknowledge.
    Ack,
    /// Returned `false`, returned `nil, err`, or raised: reject, with the reason.
    Nack {
        /// The error the handler gave, or what it raised (with the Lua traceback).
        reason: String,
        /// Whether another attempt may succeed: false only for an error value whose
        /// `retryable()` is false (an `INVALID` error, say); anything else the handler
        /// gives or raises (a string, `false`, a timeout) is worth retrying.
        retryable: bool,
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
    sandbox: Sandbox,
    /// The environment `eval` chunks share.
    chunk_env: Table,
    limits: Limits,
    /// Slices and deadlines of the code running on the state.
    clock: Rc<Clock>,
    /// Calls a handler so that the error value it raises is noted (see [`GUARD`]).
    guard: Function,
    /// Every coroutine the host runs handlers and processes in (weak keys): the
    /// sandbox refuses to let Lua code resume or close them.
    handler_threads: Table,
    /// The contexts of the running coroutines, also in the state's app data for the
    /// module's functions: held here too so that a run does not look them up twice.
    contexts: Rc<Contexts>,
    /// Coroutines whose run returned, reset and kept for the next runs: creating one
    /// per delivery was a measurable share of a no-op handler's cost.
    idle_threads: RefCell<Vec<Thread>>,
    /// Every delivery's body is decoded onto this tape, then copied into Lua tables:
    /// decoding into a tree of values first allocated every node twice.
    tape: RefCell<Tape>,
    sources: RefCell<HashMap<(PathBuf, OptIn), Rc<LoadedSource>>>,
    /// Declared last: the tables above are released before the state closes.
    lua: Lua,
}

impl LuaHost {
    /// A Lua 5.4 state with `queue` (publishing through `queues`), `errors` and
    /// `logger` as globals and as `require`-able modules, and the default
    /// [`Limits`]. `chunk_security` is what [`LuaHost::eval`] chunks run as.
    pub fn new(queues: Queues, chunk_security: SecurityContext) -> Result<LuaHost> {
        LuaHost::with_limits(queues, chunk_security, Limits::default())
    }

    /// [`LuaHost::new`] with other limits; a memory limit below
    /// [`Limits::MIN_MEMORY_BYTES`] is `INVALID`.
    pub fn with_limits(
        queues: Queues,
        chunk_security: SecurityContext,
        limits: Limits,
    ) -> Result<LuaHost> {
        if limits.memory_bytes < Limits::MIN_MEMORY_BYTES {
            return Err(Error::invalid(format!(
                "a Lua state's memory limit must be at least {} bytes (1 MiB), not {}",
                Limits::MIN_MEMORY_BYTES,
                limits.memory_bytes
            )));
        }
        let lua = Lua::new();
        // First, so that every coroutine inherits the hook.
        let clock = Clock::install(&lua)
            .map_err(|e| Error::internal(format!("cannot set up the Lua state: {e}")))?;
        // Every handler call allocates short-lived objects (its coroutine, the payload
        // table): the generational collector frees them in cheap minor collections
        // instead of re-marking the whole heap.
        lua.gc_set_mode(mlua::state::GcMode::Generational(
            mlua::state::GcGenParams::default(),
        ));
        let contexts = Rc::new(Contexts::default());
        *contexts.chunk_security.borrow_mut() = chunk_security;
        let setup = || -> mlua::Result<(Sandbox, Table, Function, Table)> {
            let guard = guard(&lua, Rc::clone(&clock))?;
            let handler_threads = crate::context::weak_keyed(&lua)?;
            lua.set_app_data(Rc::clone(&contexts));
            crate::context::init_inherited(&lua)?;
            let modules = [
                ("queue", crate::module::create_module(&lua, queues)?),
                ("errors", crate::errors::create_module(&lua)?),
                ("logger", crate::logger::create_module(&lua)?),
            ];
            let sandbox = Sandbox::new(&lua, &modules, &clock, &handler_threads)?;
            let chunk_env = sandbox.environment(&lua, OptIn::default())?;
            Ok((sandbox, chunk_env, guard, handler_threads))
        };
        let (sandbox, chunk_env, guard, handler_threads) =
            setup().map_err(|e| Error::internal(format!("cannot set up the Lua state: {e}")))?;
        lua.set_memory_limit(limits.memory_bytes)
            .map_err(|e| Error::internal(format!("cannot limit the Lua state's memory: {e}")))?;
        Ok(LuaHost {
            sandbox,
            chunk_env,
            limits,
            clock,
            guard,
            handler_threads,
            contexts,
            idle_threads: RefCell::default(),
            tape: RefCell::default(),
            sources: RefCell::default(),
            lua,
        })
    }

    /// The Lua state, for embedding more modules.
    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// The globals every source file and chunk reads names from (Lua code cannot
    /// change them). A table set here is shared as it is, writable by every handler:
    /// embed modules with [`LuaHost::embed`].
    pub fn globals(&self) -> &Table {
        self.sandbox.shared()
    }

    /// Embeds `value` (a function, or a table of them: a module) for every source
    /// file and chunk, as the global `name` and as `require(name)`. A table is shared
    /// read-only, as `queue` and `logger` are: one handler cannot change it for the
    /// others, whose handlers would run the change with their own rights. The tables
    /// inside it are shared as they are, writable: keep a module's settings in Rust,
    /// or behind its functions. A file that requires it at its top level fails
    /// `check` (which runs without it): require it inside the handler.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use queue_lua::LuaHost;
    /// let host = LuaHost::new(queue_core::Queues::new(), Default::default()).unwrap();
    /// let http = host.lua().create_table().unwrap();
    /// http.set("get", host.lua().create_function(|_, url: String| Ok(url.len())).unwrap()).unwrap();
    /// host.embed("http", http).unwrap();
    /// let out = host.eval("return require('http').get('abc')").await.unwrap();
    /// assert_eq!(out, vec![queue_core::Value::Int(3)]);
    /// assert!(host.eval("http.get = nil").await.is_err());
    /// # });
    /// ```
    pub fn embed(&self, name: &str, value: impl mlua::IntoLua) -> Result<()> {
        value
            .into_lua(&self.lua)
            .and_then(|value| self.sandbox.embed(&self.lua, name, value))
            .map_err(|e| Error::internal(format!("cannot embed {name:?}: {e}")))
    }

    /// How many coroutines are running handlers or processes right now.
    pub fn running(&self) -> usize {
        self.contexts.running()
    }

    /// Says the state is about to be dropped with every run still on it (a worker
    /// stopping): a run dropped from now on frees what it waited in with the state,
    /// not with a full collection of its own, which made stopping N waiting runs cost
    /// N collections of a state holding N of them.
    pub fn closing(&self) {
        self.clock.closing.set(true);
    }

    /// Loads a source once per path and opt-in into its own environment (later calls
    /// reuse it, whatever text they bring: one state runs one version of a file). Its
    /// top level runs within [`Limits::load_time`].
    fn load(
        &self,
        path: &Path,
        opt_in: OptIn,
        read: impl FnOnce() -> Result<LuaSource>,
    ) -> Result<Rc<LoadedSource>> {
        let key = (path.to_path_buf(), opt_in);
        if let Some(loaded) = self.sources.borrow().get(&key) {
            return Ok(Rc::clone(loaded));
        }
        let source = read()?;
        let load = || -> mlua::Result<LoadedSource> {
            let env = self.sandbox.environment(&self.lua, opt_in)?;
            let function = self
                .lua
                .load(source.code())
                .set_name(format!("@{}", path.display()))
                .set_mode(ChunkMode::Text)
                .set_environment(env.clone())
                .into_function()?;
            let exports = self.within_load_time(|| function.call::<LuaValue>(()))?;
            Ok(LoadedSource { env, exports })
        };
        let loaded = Rc::new(load().map_err(|e| {
            Error::invalid(format!("cannot load Lua source {}: {e}", path.display()))
        })?);
        self.sources.borrow_mut().insert(key, Rc::clone(&loaded));
        Ok(loaded)
    }

    /// Runs `f` (a top level) with a deadline: past [`Limits::load_time`], the Lua code
    /// it runs raises an error.
    fn within_load_time<R>(&self, f: impl FnOnce() -> mlua::Result<R>) -> mlua::Result<R> {
        let limit = self.limits.load_time;
        let deadline = Deadline::after(
            limit,
            format!(
                "the top level ran longer than {limit:?}: loading a file must not loop or block"
            ),
        );
        // Seen by the watchdog, whose signal makes the hook look at the deadline at
        // the next instruction rather than 10,000 slow ones later.
        let running = self.lua.current_thread();
        let _polling = crate::preempt::Polling::start(running.to_pointer());
        self.clock.within(deadline, f)
    }

    /// Finds `method` in a source run in the default sandbox: a field of the table the
    /// file returns, or else a global the file defines. The file is read as
    /// [`LuaSource::read`] reads one, the first time this state loads it.
    pub fn handler(&self, path: &Path, method: &str) -> Result<Handler> {
        self.handler_with(path, method, OptIn::default())
    }

    /// [`LuaHost::handler`] for an entry that opts into more of the standard library.
    pub fn handler_with(&self, path: &Path, method: &str, opt_in: OptIn) -> Result<Handler> {
        let loaded = self.load(path, opt_in, || LuaSource::read(path))?;
        find_handler(&loaded, path, method)
    }

    /// [`LuaHost::handler_with`] on a source already read: the state runs exactly the
    /// text given (unless it loaded that path before), never what the file holds now.
    ///
    /// ```
    /// use queue_core::{Queues, security::SecurityContext};
    /// use queue_lua::{LuaHost, LuaSource, OptIn};
    ///
    /// let host = LuaHost::new(Queues::new(), SecurityContext::default()).unwrap();
    /// // No file by that name: the text is all the host needs.
    /// let source = LuaSource::from_code("/nowhere/h.lua", b"function handle() end".to_vec());
    /// assert!(host.handler_in(&source, "handle", OptIn::default()).is_ok());
    /// ```
    pub fn handler_in(&self, source: &LuaSource, method: &str, opt_in: OptIn) -> Result<Handler> {
        let loaded = self.load(source.path(), opt_in, || Ok(source.clone()))?;
        find_handler(&loaded, source.path(), method)
    }

    /// Decodes a delivery's body by its content type ([`Message::decode`]) straight
    /// into Lua values, with no tree of values in between (docs/performance.md, "Lua
    /// module").
    ///
    /// A body that cannot be decoded is `INVALID`, naming the codec and what is wrong,
    /// or the content type nothing reads (it never will decode: do not retry it); a
    /// Lua state out of memory is `INTERNAL`.
    ///
    /// ```
    /// use queue_core::{Codec, Headers, Message, Queues, Value, security::SecurityContext};
    /// use queue_lua::LuaHost;
    ///
    /// let host = LuaHost::new(Queues::new(), SecurityContext::default()).unwrap();
    /// let message = Message::encode(&Value::from("hi"), Headers::new(), Codec::Json).unwrap();
    /// assert!(host.decode_payload(&message).is_ok());
    /// let mut broken = message.clone();
    /// broken.body = b"{".to_vec();
    /// let err = host.decode_payload(&broken).unwrap_err();
    /// assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
    /// ```
    pub fn decode_payload(&self, message: &Message) -> Result<Payload> {
        let mut tape = self.tape.borrow_mut();
        let decoded = message
            .decode_onto(&mut tape)
            .map(|()| tape_to_lua(&self.lua, &tape));
        if tape.heap_bytes() > KEPT_TAPE_BYTES {
            // One large body, decoded or refused partway, should not hold its memory
            // for the rest of the run: a refused one kept up to 96 MiB (review).
            *tape = Tape::new();
        }
        self.made_here(decoded?)
    }

    /// A body value as a handler's argument. A Lua state out of memory is `INTERNAL`.
    pub fn payload(&self, value: &Value) -> Result<Payload> {
        self.made_here(to_lua(&self.lua, value))
    }

    fn made_here(&self, value: mlua::Result<LuaValue>) -> Result<Payload> {
        match value {
            Ok(value) => Ok(Payload {
                value,
                made_by: Rc::as_ptr(&self.clock),
            }),
            Err(e) => Err(Error::internal(format!("cannot give the body to Lua: {e}"))),
        }
    }

    /// Runs a handler for one delivery as a coroutine, with the consumer's security,
    /// and maps how it ended to an [`Outcome`].
    pub async fn run_handler(
        &self,
        handler: &Handler,
        payload: Payload,
        delivery: DeliveryContext,
        security: SecurityContext,
    ) -> Outcome {
        self.run_handler_within(handler, payload, delivery, security, None)
            .await
    }

    /// [`LuaHost::run_handler`] with a time limit: past `timeout` the handler fails
    /// (retryably) with "ran longer than its timeout", whether it computes or waits.
    pub async fn run_handler_within(
        &self,
        handler: &Handler,
        payload: Payload,
        delivery: DeliveryContext,
        security: SecurityContext,
        timeout: Option<Duration>,
    ) -> Outcome {
        let deadline = timeout.map(|limit| {
            Deadline::after(
                limit,
                format!("the handler ran longer than its timeout of {limit:?}"),
            )
        });
        let deadline_at = deadline.as_ref().map(|d| d.at);
        let state = Rc::new(DeliveryState::new(delivery));
        let context = CoroutineContext::new(security, Some(Rc::clone(&state)));
        let result = if payload.made_by == Rc::as_ptr(&self.clock) {
            self.run(context, &handler.function, payload.value, deadline)
                .await
        } else {
            Err(mlua::Error::runtime(
                "the payload was made by another Lua host, whose values this one cannot read",
            ))
        };
        state.release();
        let raised_message = state.raised_message.borrow_mut().take();
        let outcome = match result {
            Err(e) => Outcome::Nack {
                reason: match raised_message {
                    Some(message) => format!("{} raised: {message}", handler.name),
                    None => format!("{} raised: {}", handler.name, raised_text(&e)),
                },
                // A run that ended at its deadline timed out, whatever error it was
                // raising then.
                retryable: timed_out(deadline_at) || state.raised_retryable.get().unwrap_or(true),
            },
            Ok(values) => match self.returned_failure(&handler.name, &values) {
                Some((reason, retryable)) => Outcome::Nack { reason, retryable },
                None => Outcome::Ack,
            },
        };
        if state.settled.get() {
            // The handler's own `msg:ack()` or `msg:nack()` stands (docs/consumers.md);
            // a failure after it would otherwise leave no trace.
            if let Outcome::Nack { reason, .. } = &outcome {
                tracing::warn!(handler = %handler.name, error = %reason, "the handler failed after it settled its message itself; that settlement stands");
            }
            return Outcome::Settled;
        }
        outcome
    }

    /// Whether what a handler or a process returned says it failed, and why: `nil,
    /// err` (or `false, err`), `false` alone, or an error value alone (a slip for `return
    /// nil, err`); with whether the error is worth another attempt.
    fn returned_failure(&self, name: &str, values: &MultiValue) -> Option<(String, bool)> {
        let first = values.front().cloned().unwrap_or(LuaValue::Nil);
        let second = values.get(1).cloned().unwrap_or(LuaValue::Nil);
        let error_alone = second.is_nil()
            && matches!(&first, LuaValue::UserData(ud) if ud.is::<crate::errors::LuaError>());
        let second = if error_alone { first.clone() } else { second };
        if !second.is_nil() {
            // The error's `__index` or `__tostring` is Lua, run here after the
            // coroutine ended: under a deadline of its own.
            let reason = self.clock.within(
                Deadline::after(
                    DESCRIBE_TIME,
                    "describing the handler's error took too long".to_string(),
                ),
                || describe(&second),
            );
            return Some((reason, crate::errors::retryable(&second)));
        }
        (first == LuaValue::Boolean(false)).then(|| (format!("{name} returned false"), true))
    }

    /// Runs a function (a `process.lua`) as a coroutine with these arguments and
    /// security; a raised error comes back `INTERNAL` with the Lua traceback, and so
    /// does one it returns as a handler would (`nil, err`, `false`, an error value):
    /// such a process ended as a success, and `--exit-when-idle` exited 0 (review).
    /// The reason is cut to [`queue_core::retry::MAX_REASON_BYTES`], as a handler's
    /// is: a raise of 5 MB logged 160 KB per instance.
    pub async fn run_process(
        &self,
        handler: &Handler,
        args: Vec<Value>,
        security: SecurityContext,
    ) -> Result<()> {
        let args = args
            .iter()
            .map(|v| to_lua(&self.lua, v))
            .collect::<mlua::Result<MultiValue>>()
            .map_err(|e| Error::internal(e.to_string()))?;
        let context = CoroutineContext::new(security, None);
        let reason = match self.run(context, &handler.function, args, None).await {
            Ok(values) => match self.returned_failure(&handler.name, &values) {
                Some((reason, _)) => reason,
                None => return Ok(()),
            },
            Err(e) => raised_text(&e),
        };
        let reason = queue_core::truncate(&reason, queue_core::retry::MAX_REASON_BYTES);
        Err(Error::internal(format!("{} failed: {reason}", handler.name)).retryable_if(false))
    }

    /// Runs a chunk of Lua as a coroutine (so it may publish) and returns what it
    /// returns; for tests, docs examples and one-off scripts.
    pub async fn eval(&self, code: &str) -> Result<Vec<Value>> {
        let function = self
            .lua
            .load(code)
            .set_name("=chunk")
            .set_mode(ChunkMode::Text)
            .set_environment(self.chunk_env.clone())
            .into_function()
            .map_err(|e| Error::invalid(format!("cannot load chunk: {e}")))?;
        let security = self.contexts.chunk_security.borrow().clone();
        let values = self
            .run(CoroutineContext::new(security, None), &function, (), None)
            .await
            .map_err(|e| Error::internal(e.to_string()).retryable_if(false))?;
        values
            .iter()
            .map(|v| crate::value::from_lua(v, "result"))
            .collect()
    }

    /// Runs `function` with `args` as a coroutine in slices ([`crate::slices`]), with
    /// a deadline. The coroutine's body is the guard, which takes the function first;
    /// both go onto its stack as one tuple, without an intermediate list.
    async fn run(
        &self,
        context: CoroutineContext,
        function: &Function,
        args: impl IntoLuaMulti,
        deadline: Option<Deadline>,
    ) -> mlua::Result<MultiValue> {
        let thread = self.handler_thread()?;
        let delivery = context.delivery.clone();
        self.contexts.enter(&thread, context);
        // Left when the run ends, or when its future is dropped mid-run (a shutdown past
        // `stop_timeout`): a context left behind would let a coroutine the run kept go
        // on publishing with its rights.
        let entered = Entered {
            contexts: &self.contexts,
            thread: &thread,
        };
        let result = match thread
            .clone()
            .into_async::<MultiValue>((function.clone(), args))
        {
            Ok(running) => {
                let clock = Rc::clone(&self.clock);
                Sliced::new(
                    running,
                    clock,
                    thread.clone(),
                    &self.guard,
                    deadline,
                    delivery,
                )
                .await
            }
            Err(e) => Err(e),
        };
        drop(entered);
        self.keep_if_finished(thread);
        if result.as_ref().is_err_and(ran_out_of_memory) {
            self.collect_if_nearly_full();
        }
        result
    }

    /// After a run that ran out of memory: a state still close to its memory limit is
    /// collected in full, twice. The collection Lua makes when an allocation fails at
    /// the limit runs no finalizers, so the failed run's userdata (error values,
    /// messages) and what they hold stayed; the first full collection runs their
    /// finalizers, the second frees them. Left to the incremental collector, the next
    /// handlers on the state failed at the limit too. Only then: two full collections
    /// of a large state after every failure (a broker outage) would stall its handlers.
    fn collect_if_nearly_full(&self) {
        if self.lua.used_memory() > self.limits.memory_bytes / 4 * 3 {
            // Its errors (a finalizer's) have no one to go to.
            let _ = self.lua.gc_collect();
            let _ = self.lua.gc_collect();
        }
    }

    /// A coroutine to run a handler in: a kept one, or a new one.
    fn handler_thread(&self) -> mlua::Result<Thread> {
        if let Some(thread) = self.idle_threads.borrow_mut().pop() {
            return Ok(thread);
        }
        let thread = self.lua.create_thread(self.guard.clone())?;
        self.handler_threads.raw_set(&thread, true)?;
        self.clock.unhook(&thread);
        Ok(thread)
    }

    /// Keeps a coroutine whose run returned for the next run. One that raised, or was
    /// abandoned mid-run (its `__close` handlers ran when its future was dropped,
    /// [`Sliced`]), is left to the collector.
    fn keep_if_finished(&self, thread: Thread) {
        let mut idle = self.idle_threads.borrow_mut();
        if idle.len() < MAX_IDLE_THREADS
            && thread.status() == mlua::thread::ThreadStatus::Finished
            && thread.reset(self.guard.clone()).is_ok()
        {
            self.clock.unhook(&thread);
            idle.push(thread);
        }
    }
}

/// Whether a run ended because the state ran out of memory: Lua's memory error, or its
/// message raised again as text (the guard re-raises what it caught).
fn ran_out_of_memory(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            ran_out_of_memory(cause)
        }
        mlua::Error::RuntimeError(message) => message.contains("not enough memory"),
        _ => false,
    }
}

/// A run's context, entered for its coroutine: left when this is dropped, after the
/// run's `Sliced` future (declared later, dropped first) ran its `__close` handlers.
struct Entered<'a> {
    contexts: &'a Contexts,
    thread: &'a Thread,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.contexts.leave(self.thread);
    }
}

/// How many finished coroutines a state keeps for reuse: enough for a worker's
/// handlers at a high concurrency, without holding on to a burst's worth for ever.
const MAX_IDLE_THREADS: usize = 1024;

/// How much memory the host's decoding tape keeps between deliveries: bodies up to
/// about this size decode without allocating.
const KEPT_TAPE_BYTES: usize = 1024 * 1024;

/// Trusted Lua, built once per state: calls a handler under `xpcall` whose message
/// handler notes whether a raised error value is retryable, then raises it again, a
/// table as its text (`told`, once the handler's `__close`s have seen the table).
/// Without it, the error value would reach Rust only as text. Written in Lua so that
/// the handler stays yieldable.
const GUARD: &str = r##"
local xpcall, error, note, told = ...
local function rethrow(ok, ...)
  if ok then return ... end
  error(told((...)), 0)
end
return function(handler, ...)
  return rethrow(xpcall(handler, note, ...))
end
"##;

fn guard(lua: &Lua, clock: Rc<Clock>) -> mlua::Result<Function> {
    let globals = lua.globals();
    let note = lua.create_function(|lua, raised: LuaValue| {
        if let Some(delivery) = crate::context::current_delivery(lua) {
            // The last value raised is the one that leaves the handler: a `__close`
            // raising text on the way out replaces an error value raised before it.
            let retryable = match &raised {
                LuaValue::UserData(ud) => ud.borrow::<LuaError>().ok().map(|e| e.retryable),
                _ => None,
            };
            delivery.raised_retryable.set(retryable);
            delivery.raised_message.borrow_mut().take();
        }
        // Text leaves with the traceback of where it was raised, through the
        // handler's own functions: raised again by the guard, it had only the
        // guard's. A table or an error value leaves as it is (`told`).
        if let LuaValue::String(text) = &raised
            && let Ok(traced) = lua.traceback(Some(&text.to_string_lossy()), 1)
        {
            return Ok(LuaValue::String(
                lua.create_string(without_guard_frames(&traced.to_string_lossy()))?,
            ));
        }
        Ok(raised)
    })?;
    // The state's own, taken before any Lua runs.
    let tostring: Function = globals.raw_get("tostring")?;
    let told = lua.create_function(move |lua, raised: LuaValue| {
        // A table leaves as its text: mlua tells a raised value by its `__tostring`
        // once the coroutine has ended, where no time limit holds, and one that loops
        // held the worker's thread for good. Told here: by its `message`, read raw (no
        // Lua of the table's runs, past a deadline perhaps), or else by `tostring`
        // within a limit of its own.
        let LuaValue::Table(table) = &raised else {
            return Ok(raised);
        };
        let text = match table.raw_get::<LuaValue>("message") {
            Ok(LuaValue::String(m)) => crate::errors::cut_text(&m),
            // As `describe` tells `return nil, {message = 503}`.
            Ok(number @ (LuaValue::Integer(_) | LuaValue::Number(_))) => number.to_string()?,
            _ => clock
                .within(
                    Deadline::after(
                        DESCRIBE_TIME,
                        "describing the raised error took too long".to_string(),
                    ),
                    || tostring.call::<mlua::LuaString>(&raised),
                )
                .map(|text| crate::errors::cut_text(&text))
                .unwrap_or_else(|_| "a table error".to_string()),
        };
        if let Some(delivery) = crate::context::current_delivery(lua) {
            *delivery.raised_message.borrow_mut() = Some(text.clone());
        }
        Ok(LuaValue::String(lua.create_string(&text)?))
    })?;
    lua.load(GUARD).set_name("=guard").call((
        globals.raw_get::<Function>("xpcall")?,
        globals.raw_get::<Function>("error")?,
        note,
        told,
    ))
}

/// A traceback without the frames of the runtime's own guard (`xpcall` and the
/// trusted chunk around it), which tell a user nothing. Only the frames are looked
/// at: the message above them is the user's, whatever its lines say.
fn without_guard_frames(traceback: &str) -> String {
    const FRAMES: &str = "\nstack traceback:\n";
    let Some(at) = traceback.rfind(FRAMES) else {
        return traceback.to_string();
    };
    let (message, frames) = traceback.split_at(at + FRAMES.len());
    let mut kept: Vec<&str> = frames
        .lines()
        .filter(|line| {
            let frame = line.trim_start();
            !frame.starts_with("guard:") && frame != "[C]: in function 'xpcall'"
        })
        .collect();
    if kept
        .last()
        .is_some_and(|last| last.trim_start() == "(...tail calls...)")
    {
        kept.pop();
    }
    format!("{message}{}", kept.join("\n"))
}

/// The text of an error raised again by the guard, without the traceback mlua adds
/// where the guard raised it (the raise point's is in the text already: `note`).
fn raised_text(error: &mlua::Error) -> String {
    let text = error.to_string();
    match text.rfind("\nstack traceback:\n\t[C]: in function 'error'\n\tguard:") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// How long the Lua of a returned error value (its `__index`, `__tostring`) may take
/// to describe it.
const DESCRIBE_TIME: Duration = Duration::from_secs(1);

fn timed_out(deadline: Option<std::time::Instant>) -> bool {
    deadline.is_some_and(|at| std::time::Instant::now() >= at)
}

/// `method` in a loaded source: a field of the table the file returns, or else a
/// global the file defines.
fn find_handler(source: &LoadedSource, path: &Path, method: &str) -> Result<Handler> {
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

/// What `check` learned of a source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceCheck {
    /// It loads in the sandbox and defines the method.
    Defines,
    /// It compiles, but its top level needs what its entry opts into, which `check`
    /// does not run: whether it defines the method is known only when it runs.
    NotRun {
        /// Why loading stopped.
        reason: String,
    },
}

/// Checks a source file for `check`, in a scratch state with the `limits` the
/// runtime's states have: compiles it (syntax errors name file and line), runs its top
/// level in the default sandbox (no `io`, no `os.execute`, no file `require`,
/// whatever the entry opts into: `check` has no side effects), and finds `method`.
pub fn check_source(
    source: &LuaSource,
    method: &str,
    opt_in: OptIn,
    limits: Limits,
) -> Result<SourceCheck> {
    Lua::new()
        .load(source.code())
        .set_name(format!("@{}", source.path().display()))
        .set_mode(ChunkMode::Text)
        .into_function()
        .map_err(|e| Error::invalid(format!("Lua syntax error: {e}")))?;
    let host = LuaHost::with_limits(Queues::new(), SecurityContext::default(), limits)?;
    match host.handler_in(source, method, OptIn::default()) {
        Ok(_) => Ok(SourceCheck::Defines),
        Err(e) if opt_in != OptIn::default() && e.message().starts_with("cannot load") => {
            Ok(SourceCheck::NotRun {
                reason: e.message().to_string(),
            })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_core::{Codec, Headers};

    #[test]
    fn the_decoding_tape_keeps_a_small_body_s_room_and_drops_a_large_one_s() {
        let host = LuaHost::new(Queues::new(), SecurityContext::default()).unwrap();
        let body = |text: String| Message::encode(&Value::from(text), Headers::new(), Codec::Json);
        host.decode_payload(&body("small".into()).unwrap()).unwrap();
        let kept = host.tape.borrow().heap_bytes();
        assert!(kept > 0 && kept <= KEPT_TAPE_BYTES, "{kept}");
        host.decode_payload(&body("x".repeat(2 * KEPT_TAPE_BYTES)).unwrap())
            .unwrap();
        assert_eq!(host.tape.borrow().heap_bytes(), 0);
        // Refused partway, after a large string: dropped all the same.
        let mut refused = body("x".repeat(2 * KEPT_TAPE_BYTES)).unwrap();
        refused.body.extend_from_slice(b" trailing");
        assert!(host.decode_payload(&refused).is_err());
        assert_eq!(host.tape.borrow().heap_bytes(), 0);
    }

    /// Handlers for the hook tests: `long` computes for several slices, then returns.
    const TIMED: &str = r#"
        function quick() return true end
        function long() local x = 0 for i = 1, 1e8 do x = x + i end return true end
        function spin() while true do end end
    "#;

    fn timed_handlers(host: &LuaHost) -> (tempfile::TempDir, [Handler; 3]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timed.lua");
        std::fs::write(&path, TIMED).unwrap();
        let handlers = ["quick", "long", "spin"].map(|method| host.handler(&path, method).unwrap());
        (dir, handlers)
    }

    async fn run_timed(host: &LuaHost, handler: &Handler, timeout: Option<Duration>) -> Outcome {
        struct Unused;
        #[async_trait::async_trait(?Send)]
        impl crate::Settle for Unused {
            async fn ack(&self) -> Result<()> {
                Ok(())
            }
            async fn nack(&self, _: &str, _: bool) -> Result<()> {
                Ok(())
            }
        }
        let message = Message::encode(&Value::Nil, Headers::new(), Codec::Json).unwrap();
        let payload = host.decode_payload(&message).unwrap();
        let delivery = DeliveryContext {
            message: std::sync::Arc::new(message),
            settle: Rc::new(Unused),
        };
        host.run_handler_within(
            handler,
            payload,
            delivery,
            SecurityContext::default(),
            timeout,
        )
        .await
    }

    fn hooked(thread: &Thread) -> bool {
        // SAFETY: the thread is alive (held) and not running.
        unsafe {
            mlua::ffi::lua_gethook(thread.to_pointer() as *mut mlua::ffi::lua_State).is_some()
        }
    }

    /// Runs `test` on a current-thread runtime of its own thread: a regression that
    /// leaves Lua spinning fails the test after a minute instead of hanging it.
    fn spinning_stops<F: Future<Output = ()> + 'static>(test: fn() -> F) {
        let promise = "every spinning handler was stopped";
        queue_testkit::async_finishes_within(Duration::from_secs(60), promise, test)
    }

    /// The kept coroutines run without the hook; one that computed past its slice got
    /// it (it let another handler finish first) and lost it again when it returned.
    #[cfg(unix)]
    #[test]
    fn a_handler_coroutine_has_the_hook_only_while_it_overruns_its_slice() {
        spinning_stops(|| async {
            let host = LuaHost::new(Queues::new(), SecurityContext::default()).unwrap();
            assert!(
                host.clock.preempts.get(),
                "the slice signal's handler is installed"
            );
            let (_dir, [quick, long, _]) = timed_handlers(&host);
            assert_eq!(run_timed(&host, &quick, None).await, Outcome::Ack);
            assert!(!hooked(&host.idle_threads.borrow()[0]));

            let long_run = run_timed(&host, &long, None);
            let quick_after = async {
                tokio::task::yield_now().await;
                run_timed(&host, &quick, None).await
            };
            tokio::pin!(long_run);
            tokio::select! {
                biased;
                _ = &mut long_run => panic!("the long handler never yielded: no hook was set"),
                outcome = quick_after => assert_eq!(outcome, Outcome::Ack),
            }
            assert_eq!(long_run.await, Outcome::Ack);
            let idle = host.idle_threads.borrow();
            assert_eq!(idle.len(), 2);
            assert!(idle.iter().all(|thread| !hooked(thread)));
        });
    }

    /// The watchdog parks once nothing has polled for a while; the next long poll
    /// wakes it, and a spinning handler still ends at its timeout.
    #[cfg(unix)]
    #[test]
    fn a_parked_watchdog_wakes_for_the_next_spinning_handler() {
        spinning_stops(|| async {
            let host = LuaHost::new(Queues::new(), SecurityContext::default()).unwrap();
            let (_dir, [quick, _, spin]) = timed_handlers(&host);
            assert_eq!(run_timed(&host, &quick, None).await, Outcome::Ack);
            // Blocks this test's thread: nothing on it needs to run meanwhile.
            assert!(
                crate::preempt::wait_until_watchdog_parks(Duration::from_secs(30)),
                "the watchdog did not park within 30 s of polls ending"
            );
            match run_timed(&host, &spin, Some(Duration::from_millis(200))).await {
                Outcome::Nack { reason, .. } => assert!(reason.contains("timeout"), "{reason}"),
                other => panic!("expected a timeout, got {other:?}"),
            }
        });
    }

    /// Only the frames lose the guard's lines: a message of the user's that has such
    /// a line keeps it.
    #[test]
    fn only_the_guards_frames_are_left_out() {
        let traced = "bad\nguard: x\n[C]: in function 'xpcall'\nstack traceback:\n\th.lua:3: in function 'f'\n\t[C]: in function 'xpcall'\n\tguard:7: in function <guard:6>\n\t(...tail calls...)";
        assert_eq!(
            without_guard_frames(traced),
            "bad\nguard: x\n[C]: in function 'xpcall'\nstack traceback:\n\th.lua:3: in function 'f'"
        );
    }
}
