//! What travels with a coroutine: the security context it runs under and, inside a
//! consumer, the delivery it handles. Kept per coroutine (keyed by its Lua thread),
//! never in a global, so handlers sharing one Lua state never see each other's message.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use async_trait::async_trait;
use mlua::{Lua, Thread};
use queue_core::security::SecurityContext;
use queue_core::{Message, Result};

/// How the host settles a delivery when the handler calls `msg:ack()` / `msg:nack()`.
/// The runtime implements it: ack settles with the driver, nack runs the retry policy.
#[async_trait(?Send)]
pub trait Settle {
    /// The handler acknowledged the message.
    async fn ack(&self) -> Result<()>;
    /// The handler rejected the message, with a reason.
    async fn nack(&self, reason: &str) -> Result<()>;
}

/// The delivery a handler coroutine is running for.
#[derive(Clone)]
pub struct DeliveryContext {
    /// The message (id and headers are what `msg:id()` and `msg:headers()` show).
    pub message: Message,
    /// Settles it when the handler does so itself.
    pub settle: Rc<dyn Settle>,
}

/// The delivery as the coroutine sees it, with its single-use state.
pub(crate) struct DeliveryState {
    pub(crate) context: DeliveryContext,
    /// `msg:ack()` or `msg:nack()` was called.
    pub(crate) settled: Cell<bool>,
    /// The handler has returned: the message may no longer be used.
    pub(crate) released: Cell<bool>,
}

/// The context of one coroutine.
pub(crate) struct CoroutineContext {
    pub(crate) security: SecurityContext,
    pub(crate) delivery: Option<Rc<DeliveryState>>,
}

/// The contexts of the running coroutines of one Lua state (in its app data).
#[derive(Default)]
pub(crate) struct Contexts {
    by_thread: RefCell<HashMap<usize, Rc<CoroutineContext>>>,
    /// Used where no coroutine context is registered (plain chunks).
    pub(crate) fallback: RefCell<SecurityContext>,
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

    pub(crate) fn leave(&self, thread: &Thread) {
        self.by_thread.borrow_mut().remove(&key(thread));
    }

    pub(crate) fn current(&self, thread: &Thread) -> Option<Rc<CoroutineContext>> {
        self.by_thread.borrow().get(&key(thread)).cloned()
    }

    pub(crate) fn running(&self) -> usize {
        self.by_thread.borrow().len()
    }
}

/// The security context of the coroutine calling into Rust.
pub(crate) fn current_security(lua: &Lua) -> SecurityContext {
    let Some(contexts) = lua.app_data_ref::<Contexts>() else {
        return SecurityContext::default();
    };
    match contexts.current(&lua.current_thread()) {
        Some(ctx) => ctx.security.clone(),
        None => contexts.fallback.borrow().clone(),
    }
}

/// The delivery of the coroutine calling into Rust, if it is a handler.
pub(crate) fn current_delivery(lua: &Lua) -> Option<Rc<DeliveryState>> {
    let contexts = lua.app_data_ref::<Contexts>()?;
    contexts.current(&lua.current_thread())?.delivery.clone()
}
