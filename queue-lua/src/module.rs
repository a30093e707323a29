//! The `queue` module: `publish`, `message`, `info`.

use mlua::{Lua, Table, Value as LuaValue};
use queue_core::{Error, Queues, Result};

use crate::context::{current_delivery, current_security, in_call};
use crate::errors::{no_value, not_done};
use crate::message::LuaMessage;
use crate::value::{from_lua_within, headers_from_lua};

/// Creates the `queue` table publishing through `queues`.
pub fn create_module(lua: &Lua, queues: Queues) -> mlua::Result<Table> {
    let queue = lua.create_table()?;

    let publishing = queues.clone();
    queue.set(
        "publish",
        lua.create_async_function(
            move |lua, (queue_id, data, headers): (LuaValue, LuaValue, LuaValue)| {
                // Every check that needs the Lua values runs now, before the first await,
                // in the order docs/lua-api.md gives; only the driver's confirmation is awaited.
                let prepared = prepare_publish(&lua, &publishing, &queue_id, &data, &headers);
                let in_call = in_call(&lua);
                async move {
                    let _in_call = in_call;
                    let (request, body, headers) = match prepared {
                        Ok(p) => p,
                        Err(e) => return not_done(e),
                    };
                    match request.send(body, headers).await {
                        Ok(_) => Ok((LuaValue::Boolean(true), None)),
                        Err(e) => not_done(e),
                    }
                }
            },
        )?,
    )?;

    queue.set(
        "message",
        lua.create_function(|lua, ()| match current_delivery(lua) {
            Some(state) if !state.is_released() => Ok((
                LuaValue::UserData(lua.create_userdata(LuaMessage(state))?),
                None,
            )),
            _ => no_value(Error::invalid(
                "no delivery context: queue.message() works only inside a queue consumer's handler",
            )),
        })?,
    )?;

    queue.set(
        "info",
        lua.create_async_function(move |lua, queue_id: LuaValue| {
            let queues = queues.clone();
            // Read before the first await, as for a publish: the run's own rights.
            let checked = current_security(&lua)
                .and_then(|security| Ok(((*security).clone(), queue_id_text(&queue_id)?)));
            let in_call = in_call(&lua);
            async move {
                let _in_call = in_call;
                let (security, id) = match checked {
                    Ok(checked) => checked,
                    Err(e) => return no_value(e),
                };
                match queues.info_as(&security, &id).await {
                    Ok(info) => {
                        let t = lua.create_table()?;
                        t.set("message_count", info.message_count())?;
                        t.set("ready", info.ready)?;
                        t.set("in_flight", info.in_flight)?;
                        t.set("delayed", info.delayed)?;
                        t.set("consumer_count", info.consumers)?;
                        Ok((LuaValue::Table(t), None))
                    }
                    Err(e) => no_value(e),
                }
            }
        })?,
    )?;

    Ok(queue)
}

fn queue_id_text(value: &LuaValue) -> Result<String> {
    match value {
        // Not read lossily: `app:t\xff` would name `app:t\u{FFFD}`, another queue.
        LuaValue::String(s) => s
            .to_str()
            .map(|id| id.to_string())
            .map_err(|_| Error::invalid("queue id must be UTF-8 text")),
        LuaValue::Nil => Ok(String::new()),
        other => Err(Error::invalid(format!(
            "queue id must be a string \"namespace:name\", got a {}",
            other.type_name()
        ))),
    }
}

type Prepared = (
    queue_core::PublishRequest,
    queue_core::Value,
    queue_core::Headers,
);

fn prepare_publish(
    lua: &Lua,
    queues: &Queues,
    queue_id: &LuaValue,
    data: &LuaValue,
    headers: &LuaValue,
) -> Result<Prepared> {
    let security = current_security(lua)?;
    let request = match queue_id_text(queue_id) {
        Ok(text) => queues.begin_publish(&security, &text)?,
        Err(not_a_string) => {
            // The general permission is still checked first.
            security.check(queue_core::security::ACTION_PUBLISH, None)?;
            return Err(not_a_string);
        }
    };
    let body = from_lua_within(data, "data", request.max_message_bytes())?;
    request.check_body(&body)?;
    let headers = headers_from_lua(headers)?;
    Ok((request, body, headers))
}
