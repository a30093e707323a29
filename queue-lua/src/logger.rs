//! The `logger` global: `logger:info(msg, fields)` and friends, over `tracing`.

use mlua::{Lua, Table, Value as LuaValue, Variadic};

use crate::value::from_lua_within;

/// The most a log line's `fields` may take (counted as a message body is): larger
/// fields are logged as the error that says so (docs/lua-api.md, "logger").
const MAX_FIELDS_BYTES: usize = 64 * 1024;

/// The most of a message a log line carries; the rest is counted, not copied.
const MAX_MESSAGE_BYTES: usize = 8 * 1024;

/// A message as one log line: control characters escaped, since a newline in the text
/// format started a line of the handler's making that read as the runtime's own (`ok\n
/// 2026-... ERROR queue_runtime: ...`), and cut at [`MAX_MESSAGE_BYTES`]: a message of
/// 200 MB was copied, outside the Lua memory limit, then formatted again.
fn one_line(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let kept = &bytes[..bytes.len().min(MAX_MESSAGE_BYTES)];
    let mut line = String::with_capacity(kept.len());
    let mut one = queue_core::OneLine::new(&mut line, MAX_MESSAGE_BYTES);
    // Writing into a String cannot fail.
    let _ = one.write_str(&String::from_utf8_lossy(kept));
    one.count_left_out(bytes.len() - kept.len());
    let _ = one.finish();
    line
}

/// Creates the (read-only) `logger` table. Works with `logger:info(...)` and
/// `logger.info(...)`.
pub fn create_module(lua: &Lua) -> mlua::Result<Table> {
    let logger = lua.create_table()?;
    // Lua's own, for a message that is not a string: it stays a Lua string (inside the
    // memory limit) until cut, where a `__tostring` of 200 MB was copied whole.
    let tostring: mlua::Function = lua.globals().raw_get("tostring")?;
    let proxy = crate::sandbox::read_only(lua, "logger", logger.clone())?;
    // The functions recognise `logger:info(...)` by the table's address: holding the
    // table itself would be a cycle through Rust that Lua's collector never frees.
    let me = proxy.to_pointer() as usize;
    for level in ["debug", "info", "warn", "error"] {
        let tostring = tostring.clone();
        let f = lua.create_function(move |_, args: Variadic<LuaValue>| {
            let mut args = args.into_iter().peekable();
            if matches!(args.peek(), Some(LuaValue::Table(t)) if t.to_pointer() as usize == me) {
                args.next();
            }
            let message = match args.next() {
                Some(LuaValue::String(s)) => one_line(&s.as_bytes()),
                Some(LuaValue::Nil) | None => String::new(),
                Some(other) => one_line(&tostring.call::<mlua::LuaString>(other)?.as_bytes()),
            };
            let fields = match args.next() {
                Some(v @ LuaValue::Table(_)) => fields_json(&v),
                _ => String::new(),
            };
            emit(level, &message, &fields);
            Ok(())
        })?;
        logger.set(level, f)?;
    }
    Ok(proxy)
}

/// The fields as one JSON object, or `{"unloggable_fields": "why"}`: checked as a
/// JSON body is, so that NaN, Infinity and bytes that are not UTF-8 are said to be
/// unloggable, where serde_json wrote `null` and an array of numbers for them.
fn fields_json(fields: &LuaValue) -> String {
    let checked = from_lua_within(fields, "fields", MAX_FIELDS_BYTES).and_then(|value| {
        queue_core::Codec::Json.check(&value, "fields")?;
        Ok(value)
    });
    match checked {
        Ok(value) => serde_json::to_string(&value).unwrap_or_default(),
        // As JSON: Rust's `{:?}` wrote a control character as `\u{1}`, which is not.
        Err(e) => serde_json::json!({ "unloggable_fields": e.message() }).to_string(),
    }
}

fn emit(level: &str, message: &str, fields: &str) {
    match level {
        "debug" => tracing::debug!(target: "lua", fields, "{message}"),
        "info" => tracing::info!(target: "lua", fields, "{message}"),
        "warn" => tracing::warn!(target: "lua", fields, "{message}"),
        _ => tracing::error!(target: "lua", fields, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_json_can_write_are_written_and_others_said_unloggable() {
        let lua = Lua::new();
        let fields = |code: &str| fields_json(&lua.load(code).eval::<LuaValue>().unwrap());
        assert_eq!(fields("{ n = 1, s = 'é' }"), r#"{"n":1,"s":"é"}"#);
        for (code, why) in [
            ("{ ratio = 0/0 }", "ratio"),
            ("{ big = math.huge }", "big"),
            ("{ raw = '\\255\\254' }", "raw"),
            ("{ ['a\\1'] = 0/0 }", "a"),
        ] {
            let said = fields(code);
            assert!(
                said.starts_with(r#"{"unloggable_fields":"fields."#),
                "{code}: {said}"
            );
            assert!(!said.contains("msgpack"), "{code}: {said}");
            assert!(
                serde_json::from_str::<serde_json::Value>(&said).is_ok(),
                "{code}: {said}"
            );
            assert!(said.contains(why), "{code}: {said}");
        }
    }

    #[test]
    fn a_message_is_one_line_of_bounded_length() {
        let forged = "ok\n2026-01-01T00:00:00Z ERROR queue_runtime::host: token rotated\r\x1b[2J";
        let line = one_line(forged.as_bytes());
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert_eq!(
            line,
            "ok\\n2026-01-01T00:00:00Z ERROR queue_runtime::host: token rotated\\r\\u{1b}[2J"
        );
        assert_eq!(one_line("Processing é".as_bytes()), "Processing é");
        let long = "x".repeat(MAX_MESSAGE_BYTES + 10);
        let line = one_line(long.as_bytes());
        assert!(line.starts_with(&"x".repeat(MAX_MESSAGE_BYTES)));
        assert!(
            line.ends_with("... (10 more bytes)"),
            "{}",
            &line[line.len() - 30..]
        );
        assert_eq!(one_line(b"\xff ok"), "\u{fffd} ok");
        assert_eq!(
            one_line("a\u{2028}b\u{202E}c".as_bytes()),
            "a\\u{2028}b\\u{202e}c"
        );
    }
}
