//! The `Message` userdata that `queue.message()` returns.

use std::cell::Ref;
use std::rc::Rc;

use mlua::{Lua, UserData, UserDataMethods, Value as LuaValue};
use queue_core::Error;

use crate::context::{DeliveryContext, DeliveryState, Settle, current_delivery, in_call};
use crate::errors::{no_value, not_done};
use crate::value::header_to_lua;

/// A handle on the delivery of the running handler. Every method returns
/// `value, err`; once the handler has returned, every method is `INVALID`
/// ("message released"), and so it is, meanwhile, for any other run.
pub(crate) struct LuaMessage(pub(crate) Rc<DeliveryState>);

impl LuaMessage {
    /// The delivery, while its handler runs, to that run only (and the coroutines it
    /// made): a handle another run found (kept in a global while its own run waits)
    /// settled a message that was not its to settle, and its own run's failure was
    /// then ignored.
    fn usable(&self, lua: &Lua) -> Result<Ref<'_, DeliveryContext>, Error> {
        let context = self.0.context().ok_or_else(|| {
            Error::invalid("message released: a message can only be used while its handler runs (not once it returned, ran past its timeout or was stopped)")
        })?;
        let own = current_delivery(lua).is_some_and(|current| Rc::ptr_eq(&current, &self.0));
        if !own {
            return Err(Error::invalid(
                "this message belongs to another run: a message can only be used by the handler it was delivered to (and the coroutines it creates)",
            ));
        }
        Ok(context)
    }

    /// Marks it settled (once) and hands back what settles it.
    fn begin_settle(&self, lua: &Lua) -> Result<Rc<dyn Settle>, Error> {
        let context = self.usable(lua)?;
        if self.0.settled.replace(true) {
            return Err(Error::invalid(format!(
                "message {} is already settled",
                context.message.id
            )));
        }
        Ok(Rc::clone(&context.settle))
    }
}

/// The delivery attempt as a handler reads it: a number >= 1, whatever another
/// client put in the header (or 1 when there is none).
fn attempts(headers: &queue_core::Headers) -> LuaValue {
    LuaValue::Integer(i64::from(headers.attempts()))
}

impl UserData for LuaMessage {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("id", |lua, m, ()| match m.usable(lua) {
            Ok(context) => Ok((
                LuaValue::String(lua.create_string(&context.message.id)?),
                None,
            )),
            Err(e) => no_value(e),
        });
        methods.add_method("header", |lua, m, key: LuaValue| match m.usable(lua) {
            Ok(context) => {
                // Any value, so that a wrong one is an `err`, as the contract says of
                // every method, and not a raised "bad argument".
                let LuaValue::String(key) = key else {
                    return no_value(Error::invalid(format!(
                        "msg:header(name) takes a string, got a {}",
                        key.type_name()
                    )));
                };
                // Header names are UTF-8: one that is not names none (read lossily,
                // "\xff" found the header named U+FFFD: review).
                let Ok(key) = key.to_str() else {
                    return Ok((LuaValue::Nil, None));
                };
                let key = key.to_string();
                let headers = &context.message.headers;
                let value = if key == queue_core::names::ATTEMPTS {
                    attempts(headers)
                } else {
                    match headers.get(&key) {
                        Some(v) => header_to_lua(lua, v)?,
                        None => LuaValue::Nil,
                    }
                };
                Ok((value, None))
            }
            Err(e) => no_value(e),
        });
        methods.add_method("headers", |lua, m, ()| match m.usable(lua) {
            Ok(context) => {
                let headers = &context.message.headers;
                let t = lua.create_table()?;
                for (k, v) in headers.iter() {
                    t.set(k.as_str(), header_to_lua(lua, v)?)?;
                }
                t.set(queue_core::names::ATTEMPTS, attempts(headers))?;
                Ok((LuaValue::Table(t), None))
            }
            Err(e) => no_value(e),
        });
        methods.add_async_method("ack", |lua, m, ()| async move {
            let _in_call = in_call(&lua);
            let settle = match m.begin_settle(&lua) {
                Ok(settle) => settle,
                Err(e) => return not_done(e),
            };
            match settle.ack().await {
                Ok(()) => Ok((LuaValue::Boolean(true), None)),
                Err(e) => not_done(e),
            }
        });
        // Any reason: a string, or the `err` of a failed call (`msg:nack(err)`), which
        // says its kind and message, and whether it is worth another attempt, as a
        // handler returning it would.
        methods.add_async_method("nack", |lua, m, reason: LuaValue| async move {
            let _in_call = in_call(&lua);
            let settle = match m.begin_settle(&lua) {
                Ok(settle) => settle,
                Err(e) => return not_done(e),
            };
            let retryable = crate::errors::retryable(&reason);
            let reason = match &reason {
                LuaValue::Nil => "nacked by the handler".to_string(),
                other => crate::errors::describe(other),
            };
            match settle.nack(&reason, retryable).await {
                Ok(()) => Ok((LuaValue::Boolean(true), None)),
                Err(e) => not_done(e),
            }
        });
    }
}
