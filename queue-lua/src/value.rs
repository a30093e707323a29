//! Lua values <-> message body values and headers (docs/core-model.md).

use std::collections::BTreeMap;

use mlua::{Lua, Table, Value as LuaValue};
use queue_core::{Error, HeaderValue, Headers, MAX_DEPTH, Result, Value};

/// Converts a Lua value into a body value. Tables with keys exactly `1..n` are arrays,
/// tables with string keys maps, and an empty table an empty map; strings that are not
/// UTF-8 become bytes. Functions, userdata, threads, cycles, mixed keys and nesting
/// deeper than [`MAX_DEPTH`] are `INVALID`, naming the path (`data.items[3].cb`).
pub fn from_lua(value: &LuaValue, root: &str) -> Result<Value> {
    let mut path = root.to_string();
    let mut open_tables = Vec::new();
    convert(value, &mut path, &mut open_tables)
}

fn convert(
    value: &LuaValue,
    path: &mut String,
    open: &mut Vec<*const std::ffi::c_void>,
) -> Result<Value> {
    match value {
        LuaValue::Nil => Ok(Value::Nil),
        LuaValue::Boolean(b) => Ok(Value::Bool(*b)),
        LuaValue::Integer(i) => Ok(Value::Int(*i)),
        LuaValue::Number(n) => Ok(Value::Float(*n)),
        LuaValue::String(s) => Ok(match s.to_str() {
            Ok(text) => Value::String(text.to_string()),
            Err(_) => Value::Bytes(s.as_bytes().to_vec()),
        }),
        LuaValue::Table(t) => table(t, path, open),
        other => Err(Error::invalid(format!(
            "{path} is a {}, which cannot be sent in a message",
            other.type_name()
        ))),
    }
}

fn table(t: &Table, path: &mut String, open: &mut Vec<*const std::ffi::c_void>) -> Result<Value> {
    let ptr = t.to_pointer();
    if open.contains(&ptr) {
        return Err(Error::invalid(format!(
            "{path} refers back to a table that contains it (a cycle)"
        )));
    }
    if open.len() >= MAX_DEPTH {
        return Err(Error::invalid(format!(
            "{path} is nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let mut ints: Vec<(i64, LuaValue)> = Vec::new();
    let mut strings: Vec<(String, LuaValue)> = Vec::new();
    for pair in t.pairs::<LuaValue, LuaValue>() {
        let (key, value) = pair.map_err(|e| Error::invalid(format!("{path}: {e}")))?;
        match key {
            LuaValue::Integer(i) => ints.push((i, value)),
            LuaValue::String(s) => match s.to_str() {
                Ok(k) => strings.push((k.to_string(), value)),
                Err(_) => {
                    return Err(Error::invalid(format!(
                        "{path} has a key that is not UTF-8"
                    )));
                }
            },
            other => {
                return Err(Error::invalid(format!(
                    "{path} has a {} key: table keys must be strings, or exactly 1..n for a list",
                    other.type_name()
                )));
            }
        }
    }
    if !ints.is_empty() && !strings.is_empty() {
        return Err(Error::invalid(format!(
            "{path} mixes list entries and named keys: use one or the other"
        )));
    }
    open.push(ptr);
    let result = if strings.is_empty() && !ints.is_empty() {
        ints.sort_by_key(|(i, _)| *i);
        let is_sequence = ints
            .iter()
            .enumerate()
            .all(|(pos, (i, _))| *i == pos as i64 + 1);
        if !is_sequence {
            open.pop();
            return Err(Error::invalid(format!(
                "{path} has integer keys that are not exactly 1..n: a list cannot have holes"
            )));
        }
        let mut items = Vec::with_capacity(ints.len());
        for (i, v) in &ints {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            items.push(convert(v, path, open)?);
            path.truncate(len);
        }
        Value::Array(items)
    } else {
        let mut map = BTreeMap::new();
        for (k, v) in &strings {
            let len = path.len();
            path.push('.');
            path.push_str(k);
            map.insert(k.clone(), convert(v, path, open)?);
            path.truncate(len);
        }
        Value::Map(map)
    };
    open.pop();
    Ok(result)
}

/// Converts a body value into a Lua value.
pub fn to_lua(lua: &Lua, value: &Value) -> mlua::Result<LuaValue> {
    Ok(match value {
        Value::Nil => LuaValue::Nil,
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Int(i) => LuaValue::Integer(*i),
        Value::Float(f) => LuaValue::Number(*f),
        Value::String(s) => LuaValue::String(lua.create_string(s)?),
        Value::Bytes(b) => LuaValue::String(lua.create_string(b)?),
        Value::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
        Value::Map(map) => {
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, v) in map {
                t.raw_set(k.as_str(), to_lua(lua, v)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

/// Converts a Lua headers table: string keys, scalar values. Anything else is
/// `INVALID` naming the key. `nil` means no headers.
pub fn headers_from_lua(value: &LuaValue) -> Result<Headers> {
    let t = match value {
        LuaValue::Nil => return Ok(Headers::new()),
        LuaValue::Table(t) => t,
        other => {
            return Err(Error::invalid(format!(
                "headers must be a table, got a {}",
                other.type_name()
            )));
        }
    };
    let mut headers = Headers::new();
    for pair in t.pairs::<LuaValue, LuaValue>() {
        let (key, value) = pair.map_err(|e| Error::invalid(format!("headers: {e}")))?;
        let key = match &key {
            LuaValue::String(s) => s
                .to_str()
                .map(|k| k.to_string())
                .map_err(|_| Error::invalid("header names must be UTF-8"))?,
            other => {
                return Err(Error::invalid(format!(
                    "header names must be strings, got a {} key",
                    other.type_name()
                )));
            }
        };
        let value = match value {
            LuaValue::String(s) => match s.to_str() {
                Ok(text) => HeaderValue::String(text.to_string()),
                Err(_) => return Err(Error::invalid(format!("header {key:?} is not UTF-8"))),
            },
            LuaValue::Integer(i) => HeaderValue::Int(i),
            LuaValue::Number(n) => HeaderValue::Float(n),
            LuaValue::Boolean(b) => HeaderValue::Bool(b),
            other => {
                return Err(Error::invalid(format!(
                    "header {key:?} is a {}: header values must be strings, numbers or booleans",
                    other.type_name()
                )));
            }
        };
        headers.insert(key, value);
    }
    Ok(headers)
}

/// Converts one header value into a Lua value.
pub fn header_to_lua(lua: &Lua, value: &HeaderValue) -> mlua::Result<LuaValue> {
    Ok(match value {
        HeaderValue::String(s) => LuaValue::String(lua.create_string(s)?),
        HeaderValue::Int(i) => LuaValue::Integer(*i),
        HeaderValue::Float(f) => LuaValue::Number(*f),
        HeaderValue::Bool(b) => LuaValue::Boolean(*b),
    })
}
