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
                Some(other) => {
                    let text = tostring.call::<mlua::LuaString>(other);
                    one_line(&text.map_err(crate::errors::cut_error)?.as_bytes())
                }
            };
            let fields = match args.next() {
                Some(v @ LuaValue::Table(_)) => fields_json(&v, &tostring),
                _ => String::new(),
            };
            emit(level, &message, &fields);
            Ok(())
        })?;
        logger.set(level, f)?;
    }
    Ok(proxy)
}

/// The fields as one JSON object: checked as a JSON body is, so that NaN, Infinity
/// and bytes that are not UTF-8 are said to be unloggable, where serde_json wrote
/// `null` and an array of numbers for them. When some field cannot be written, the
/// others still are, each such field as its text (`tostring`: an error value's
/// `Kind: message`), and `unloggable_fields` says why; one error value among the
/// fields lost them all (review). `{"unloggable_fields": "why"}` alone when the
/// fields are no map of names, or too large.
fn fields_json(fields: &LuaValue, tostring: &mlua::Function) -> String {
    // As JSON: Rust's `{:?}` wrote a control character as `\u{1}`, which is not.
    let unloggable = |why: &str| serde_json::json!({ "unloggable_fields": why }).to_string();
    let why = match checked_json(fields, "fields", MAX_FIELDS_BYTES) {
        Ok(json) => return json.to_string(),
        Err(e) if crate::value::is_too_large(&e) => return unloggable(e.message()),
        Err(e) => e.message().to_string(),
    };
    let LuaValue::Table(table) = fields else {
        return unloggable(&why);
    };
    let mut written = serde_json::Map::new();
    let mut left = MAX_FIELDS_BYTES;
    let mut first_why = None;
    for pair in table.pairs::<LuaValue, LuaValue>() {
        let Ok((LuaValue::String(name), value)) = pair else {
            return unloggable(&why);
        };
        let name = String::from_utf8_lossy(&name.as_bytes()).into_owned();
        let path = format!("fields.{name}");
        let json = match checked_json(&value, &path, left) {
            Ok(json) => json,
            Err(e) if crate::value::is_too_large(&e) => return unloggable(e.message()),
            Err(e) => {
                first_why.get_or_insert_with(|| e.message().to_string());
                let text = match tostring.call::<mlua::LuaString>(value) {
                    Ok(text) => {
                        one_line(&text.as_bytes()[..text.as_bytes().len().min(MAX_FIELD_TEXT)])
                    }
                    Err(_) => "?".to_string(),
                };
                serde_json::Value::String(text)
            }
        };
        let size = name.len() + json.to_string().len();
        let Some(rest) = left.checked_sub(size) else {
            return unloggable(&why);
        };
        left = rest;
        written.insert(name, json);
    }
    written.insert(
        "unloggable_fields".to_string(),
        serde_json::Value::String(first_why.unwrap_or(why)),
    );
    serde_json::Value::Object(written).to_string()
}

/// The most of an unloggable field's text a line carries.
const MAX_FIELD_TEXT: usize = 1024;

/// `value` as JSON, checked as a JSON body is, within `max_bytes`.
fn checked_json(
    value: &LuaValue,
    path: &str,
    max_bytes: usize,
) -> queue_core::Result<serde_json::Value> {
    let value = from_lua_within(value, path, max_bytes)?;
    queue_core::Codec::Json.check(&value, path)?;
    serde_json::to_value(&value).map_err(|e| queue_core::Error::invalid(format!("{path}: {e}")))
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
        let errors = crate::errors::create_module(&lua).unwrap();
        lua.globals().set("errors", errors).unwrap();
        let tostring: mlua::Function = lua.globals().get("tostring").unwrap();
        let fields =
            |code: &str| fields_json(&lua.load(code).eval::<LuaValue>().unwrap(), &tostring);
        assert_eq!(fields("{ n = 1, s = 'é' }"), r#"{"n":1,"s":"é"}"#);
        // One field that cannot be written leaves the others: it is its text, and
        // why it could not be written is said.
        let said: serde_json::Value = serde_json::from_str(&fields(
            "{ queue = 'app:out', err = errors.new('smtp down'), f = print }",
        ))
        .unwrap();
        assert_eq!(said["queue"], "app:out", "{said}");
        assert!(
            said["err"].as_str().unwrap().contains("smtp down"),
            "{said}"
        );
        assert!(
            said["f"].as_str().unwrap().starts_with("function"),
            "{said}"
        );
        // Fields too large are said to be, alone: not half of them logged.
        let said: serde_json::Value = serde_json::from_str(&fields(
            "{ a = ('x'):rep(40000), b = ('y'):rep(40000), f = print }",
        ))
        .unwrap();
        assert_eq!(said.as_object().map(|o| o.len()), Some(1), "{said}");
        assert!(
            said["unloggable_fields"]
                .as_str()
                .unwrap()
                .contains("takes more than")
        );
        let said: serde_json::Value = serde_json::from_str(&fields(
            "{ queue = 'app:out', err = errors.new('smtp down'), f = print }",
        ))
        .unwrap();
        let why = said["unloggable_fields"].as_str().unwrap();
        assert!(
            why.starts_with("fields.err ") || why.starts_with("fields.f "),
            "{said}"
        );
        for (code, why) in [
            ("{ ratio = 0/0 }", "ratio"),
            ("{ big = math.huge }", "big"),
            ("{ raw = '\\255\\254' }", "raw"),
            ("{ ['a\\1'] = 0/0 }", "a"),
        ] {
            let said = fields(code);
            let parsed: serde_json::Value = serde_json::from_str(&said).unwrap();
            assert!(
                parsed["unloggable_fields"]
                    .as_str()
                    .is_some_and(|why| why.starts_with("fields.")),
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
