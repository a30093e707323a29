//! The `logger` global: `logger:info(msg, fields)` and friends, over `tracing`.

use mlua::{Lua, Table, Value as LuaValue, Variadic};

use crate::value::from_lua_within;

/// The most a log line's `fields` may take (counted as a message body is): larger
/// fields are logged as the error that says so (docs/lua-api.md, "logger").
const MAX_FIELDS_BYTES: usize = 64 * 1024;

/// Creates the (read-only) `logger` table. Works with `logger:info(...)` and
/// `logger.info(...)`.
pub fn create_module(lua: &Lua) -> mlua::Result<Table> {
    let logger = lua.create_table()?;
    let proxy = crate::sandbox::read_only(lua, "logger", logger.clone())?;
    // The functions recognise `logger:info(...)` by the table's address: holding the
    // table itself would be a cycle through Rust that Lua's collector never frees.
    let me = proxy.to_pointer() as usize;
    for level in ["debug", "info", "warn", "error"] {
        let f = lua.create_function(move |_, args: Variadic<LuaValue>| {
            let mut args = args.into_iter().peekable();
            if matches!(args.peek(), Some(LuaValue::Table(t)) if t.to_pointer() as usize == me) {
                args.next();
            }
            let message = match args.next() {
                Some(LuaValue::String(s)) => s.to_string_lossy(),
                Some(LuaValue::Nil) | None => String::new(),
                Some(other) => other.to_string()?,
            };
            let fields = match args.next() {
                Some(v @ LuaValue::Table(_)) => {
                    match from_lua_within(&v, "fields", MAX_FIELDS_BYTES) {
                        Ok(value) => serde_json::to_string(&value).unwrap_or_default(),
                        Err(e) => format!("{{\"unloggable_fields\":{:?}}}", e.message()),
                    }
                }
                _ => String::new(),
            };
            emit(level, &message, &fields);
            Ok(())
        })?;
        logger.set(level, f)?;
    }
    Ok(proxy)
}

fn emit(level: &str, message: &str, fields: &str) {
    match level {
        "debug" => tracing::debug!(target: "lua", fields, "{message}"),
        "info" => tracing::info!(target: "lua", fields, "{message}"),
        "warn" => tracing::warn!(target: "lua", fields, "{message}"),
        _ => tracing::error!(target: "lua", fields, "{message}"),
    }
}
