//! What travels with a coroutine: the security context it runs under and, inside a
//! consumer, the delivery it handles. Kept per coroutine (keyed by its Lua thread),
//! never in a global, so handlers sharing one Lua state never see each other's message.
//! A coroutine that Lua code creates inherits its creator's context; code with no
//! context at all (a file's top level, a coroutine made there) may not publish.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use async_trait::async_trait;
use mlua::{AnyUserData, Lua, Table, Thread};
use queue_core::security::SecurityContext;
use queue_core::{Error, Message, Result};

/// How the host settles a delivery when the handler calls `msg:ack()` / `msg:nack()`.
/// The runtime implements it: ack settles with the driver, nack runs the retry policy.
#[async_trait(?Send)]
pub trait Settle {
    /// The handler acknowledged the message.
    async fn ack(&self) -> Result<()>;
    /// The handler rejected the message, with a reason; `retryable` is `false` when
    /// the reason is an error value that says another attempt cannot succeed
    /// (`msg:nack(err)` with an `INVALID` error), which the runtime dead-letters at once.
    async fn nack(&self, reason: &str, retryable: bool) -> Result<()>;
}

/// The delivery a handler coroutine is running for.
#[derive(Clone)]
pub struct DeliveryContext {
    /// The message (id and headers are what `msg:id()` and `msg:headers()` show),
    /// shared with the delivery rather than copied per handler run.
    pub message: Arc<Message>,
    /// Settles it when the handler does so itself.
    pub settle: Rc<dyn Settle>,
}

/// The delivery as the coroutine sees it, with its single-use state.
pub(crate) struct DeliveryState {
    /// The delivery while the handler runs; taken when it returns, so that a message
    /// a handler keeps (`seen[#seen + 1] = queue.message()`) holds nothing of it, where
    /// it held the whole message outside the Lua memory limit.
    context: RefCell<Option<DeliveryContext>>,
    /// `msg:ack()` or `msg:nack()` was called.
    pub(crate) settled: Cell<bool>,
    /// The handler raised an error value (`error(err)`): whether it was retryable.
    /// Lua turns a raised value into text on its way out, so it is noted on the way.
    pub(crate) raised_retryable: Cell<Option<bool>>,
    /// The handler raised a table with a `message` (`error({ message = ... })`): that
    /// message, which Lua's text of the table (its address) would lose.
    pub(crate) raised_message: RefCell<Option<String>>,
}

impl DeliveryState {
    pub(crate) fn new(context: DeliveryContext) -> Self {
        DeliveryState {
            context: RefCell::new(Some(context)),
            settled: Cell::new(false),
            raised_retryable: Cell::new(None),
            raised_message: RefCell::new(None),
        }
    }

    /// The delivery, while the handler runs. Never held across an await: `release`
    /// takes it.
    pub(crate) fn context(&self) -> Option<std::cell::Ref<'_, DeliveryContext>> {
        std::cell::Ref::filter_map(self.context.borrow(), Option::as_ref).ok()
    }

    /// The handler has returned: the message may no longer be used, and what it held
    /// is let go.
    pub(crate) fn release(&self) {
        // Taken, then dropped once the borrow ends: dropping it may run code of its own.
        // No borrow is ever held here (none outlives a method call): a broken rule
        // panics rather than leave the message usable.
        let taken = self.context.borrow_mut().take();
        drop(taken);
    }

    pub(crate) fn is_released(&self) -> bool {
        self.context().is_none()
    }
}

/// The context of one coroutine.
pub(crate) struct CoroutineContext {
    pub(crate) security: SecurityContext,
    pub(crate) delivery: Option<Rc<DeliveryState>>,
    /// The run (a handler's, a process's, a chunk's) that this context was made for
    /// has ended: coroutines that inherited it and outlived it may not publish.
    pub(crate) ended: Cell<bool>,
    /// The run was stopped unfinished (at its timeout, or by a shutdown): the
    /// `__close` handlers Lua runs then see no error, as if it had returned, and may
    /// not act on that (publish, read counts; a message's ack is refused anyway).
    stopped: Cell<bool>,
    /// The coroutines of this context (by address) inside an asynchronous call they
    /// started (`queue.publish`, `queue.info`, `msg:ack`), for as long as the call
    /// lasts: see [`foreign_resume`]. Counted, since an address is reused: a
    /// collected coroutine's call ends (its future dropped) after a new coroutine may
    /// have started one at the same address.
    in_call: RefCell<rustc_hash::FxHashMap<usize, u32>>,
}

impl CoroutineContext {
    pub(crate) fn new(security: SecurityContext, delivery: Option<Rc<DeliveryState>>) -> Self {
        CoroutineContext {
            security,
            delivery,
            ended: Cell::new(false),
            stopped: Cell::new(false),
            in_call: RefCell::new(Default::default()),
        }
    }
}

/// The calling coroutine is inside an asynchronous call, until this is dropped with
/// the call's future (when it ends, or is dropped unfinished).
pub(crate) struct InCall {
    context: Rc<CoroutineContext>,
    thread: usize,
}

/// Marks the calling coroutine as inside an asynchronous call; made before the
/// call's future and moved into it. `None` where no run's context is (the call is
/// refused then anyway).
pub(crate) fn in_call(lua: &Lua) -> Option<InCall> {
    let thread = lua.current_thread();
    let context = context_of(lua, &thread)?;
    let thread = key(&thread);
    *context.in_call.borrow_mut().entry(thread).or_insert(0) += 1;
    Some(InCall { context, thread })
}

impl Drop for InCall {
    fn drop(&mut self) {
        let mut calls = self.context.in_call.borrow_mut();
        if let Some(count) = calls.get_mut(&self.thread) {
            *count -= 1;
            if *count == 0 {
                calls.remove(&self.thread);
            }
        }
    }
}

/// The contexts of the running coroutines of one Lua state (in its app data).
#[derive(Default)]
pub(crate) struct Contexts {
    /// The coroutines the host runs, by thread address: each is registered while it
    /// runs and removed when it ends, so an address is never read stale. Hashed with
    /// FxHash: the keys are addresses the allocator picks, not input, and SipHash was
    /// a visible part of each handler run's cost (docs/performance.md).
    by_thread: RefCell<rustc_hash::FxHashMap<usize, Rc<CoroutineContext>>>,
    /// What `eval` chunks run as.
    pub(crate) chunk_security: RefCell<SecurityContext>,
}

/// The registry key of the table (weak keys) that maps a coroutine created by Lua
/// code to its inherited context: the collector drops an entry with its coroutine.
const INHERITED: &str = "queue.inherited_contexts";

/// A context held by a coroutine that Lua code created.
struct Inherited(Rc<CoroutineContext>);

impl mlua::UserData for Inherited {}

/// Creates the table of inherited contexts in a new state.
pub(crate) fn init_inherited(lua: &Lua) -> mlua::Result<()> {
    lua.set_named_registry_value(INHERITED, weak_keyed(lua)?)
}

/// A table whose keys the collector may take (with their entries).
pub(crate) fn weak_keyed(lua: &Lua) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.raw_set("__mode", "k")?;
    table.set_metatable(Some(meta))?;
    Ok(table)
}

/// Gives `thread`, just created by Lua code, the context of the coroutine creating
/// it, if that has one.
pub(crate) fn inherit(lua: &Lua, thread: &Thread) -> mlua::Result<()> {
    let Some(context) = context_of(lua, &lua.current_thread()) else {
        return Ok(());
    };
    let table: Table = lua.named_registry_value(INHERITED)?;
    table.raw_set(thread, lua.create_userdata(Inherited(context))?)
}

fn context_of(lua: &Lua, thread: &Thread) -> Option<Rc<CoroutineContext>> {
    if let Some(context) = lua
        .app_data_ref::<Rc<Contexts>>()
        .and_then(|contexts| contexts.current(thread))
    {
        return Some(context);
    }
    let table: Table = lua.named_registry_value(INHERITED).ok()?;
    let holder: AnyUserData = table.raw_get(thread).ok()?;
    let inherited = holder.borrow::<Inherited>().ok()?;
    Some(Rc::clone(&inherited.0))
}

/// Whether a coroutine of `thread`'s run (it, or one it made) waits in an
/// asynchronous call ([`in_call`]).
pub(crate) fn waits_in_a_call(lua: &Lua, thread: &Thread) -> bool {
    context_of(lua, thread).is_some_and(|context| !context.in_call.borrow().is_empty())
}

fn key(thread: &Thread) -> usize {
    thread.to_pointer() as usize
}

impl Contexts {
    pub(crate) fn enter(&self, thread: &Thread, context: CoroutineContext) -> Rc<CoroutineContext> {
        let context = Rc::new(context);
        self.by_thread
            .borrow_mut()
            .insert(key(thread), Rc::clone(&context));
        context
    }

    /// The run on `thread` is over: its context ends, for the coroutines that
    /// inherited it too.
    pub(crate) fn leave(&self, thread: &Thread) {
        if let Some(context) = self.by_thread.borrow_mut().remove(&key(thread)) {
            context.ended.set(true);
        }
    }

    pub(crate) fn current(&self, thread: &Thread) -> Option<Rc<CoroutineContext>> {
        self.by_thread.borrow().get(&key(thread)).cloned()
    }

    pub(crate) fn running(&self) -> usize {
        self.by_thread.borrow().len()
    }
}

/// Why the running coroutine may not resume `co`, if it may not: `co` was made by
/// a run (a handler's, a process's) that still goes on, and the running coroutine
/// belongs to another run. Resumed there, `co` would publish with the first run's
/// rights and settle its message for a handler of another consumer sharing the
/// file's globals. A coroutine of a run that ended may be resumed (it can no longer
/// publish: [`current_security`]), unless it is inside a call it started then
/// ([`in_call`]; resumed where it could not wait, or left so by a time limit): the
/// resume would finish that call, made with the ended run's rights, for another run.
/// One made where no run was (a file's top level) may be resumed too.
pub(crate) fn foreign_resume(lua: &Lua, co: &Thread) -> Option<&'static str> {
    let theirs = context_of(lua, co)?;
    if theirs.ended.get() {
        let waiting = theirs.in_call.borrow().contains_key(&key(co));
        return waiting.then_some(
            "this coroutine waits in a call (queue.publish, queue.info, msg:ack) started by a run that has ended: no other run may finish it with that run's rights",
        );
    }
    match context_of(lua, &lua.current_thread()) {
        Some(ours) if Rc::ptr_eq(&ours, &theirs) => None,
        _ => Some(
            "this coroutine was made by another run (of a handler or process) that still goes on: only that run may resume it",
        ),
    }
}

/// The run on `thread` is being stopped unfinished: see [`CoroutineContext::stopped`].
pub(crate) fn stop(lua: &Lua, thread: &Thread) {
    if let Some(context) = context_of(lua, thread) {
        context.stopped.set(true);
    }
}

/// The security context of the coroutine calling into Rust. Code that runs under no
/// context is denied, never let through, and so is a coroutine that outlived the
/// run (a handler's, a process's) it inherited its context from: kept in a global, it
/// would publish with that run's rights for whichever handler resumed it later.
pub(crate) fn current_security(lua: &Lua) -> Result<CurrentSecurity> {
    match context_of(lua, &lua.current_thread()) {
        Some(context) if context.stopped.get() => Err(Error::permission_denied(
            "this run was stopped (at its timeout, or by a shutdown): its __close handlers see no error but may not publish or read a queue's counts",
        )),
        Some(context) if context.ended.get() => Err(Error::permission_denied(
            "this coroutine outlived the run (of a handler or process) that created it, whose rights it had: a kept coroutine cannot publish or read a queue's counts",
        )),
        Some(context) => Ok(CurrentSecurity(context)),
        None => Err(Error::permission_denied(
            "no security context: only handlers, processes and the coroutines they create may publish or read a queue's counts (not a file's top level)",
        )),
    }
}

/// The security context of a run, read in place: a clone of it cost every publish
/// its actor's strings and its list of policies.
pub(crate) struct CurrentSecurity(Rc<CoroutineContext>);

impl std::ops::Deref for CurrentSecurity {
    type Target = SecurityContext;

    fn deref(&self) -> &SecurityContext {
        &self.0.security
    }
}

/// The delivery of the coroutine calling into Rust, if it is a handler (or a
/// coroutine a handler created).
pub(crate) fn current_delivery(lua: &Lua) -> Option<Rc<DeliveryState>> {
    context_of(lua, &lua.current_thread())?.delivery.clone()
}
