//! Lua values <-> message body values and headers (docs/core-model.md).

use std::collections::BTreeMap;
use std::ffi::c_int;

use mlua::{Lua, Table, Value as LuaValue, ffi};
use queue_core::{Error, HeaderValue, Headers, Item, MAX_DEPTH, Result, Tape, Value};

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
    match value {
        Value::Nil => Ok(LuaValue::Nil),
        Value::Bool(b) => Ok(LuaValue::Boolean(*b)),
        Value::Int(i) => Ok(LuaValue::Integer(*i)),
        Value::Float(f) => Ok(LuaValue::Number(*f)),
        Value::String(s) => Ok(LuaValue::String(lua.create_string(s)?)),
        Value::Bytes(b) => Ok(LuaValue::String(lua.create_string(b)?)),
        Value::Array(_) | Value::Map(_) => tape_to_lua(lua, &Tape::from(value)),
    }
}

/// Converts the value on a tape (a body decoded by [`queue_core::Codec::decode_onto`])
/// into a Lua value, with no tree in between.
///
/// Tables are built in one protected call into the Lua C API rather than one per
/// table, key and value through mlua's safe API: a handler's payload is converted for
/// every delivery, and the per-call protection was most of the conversion's cost
/// (docs/performance.md, "Where the time goes").
///
/// ```
/// use queue_core::{Codec, Tape};
/// let lua = mlua::Lua::new();
/// let mut tape = Tape::new();
/// Codec::Json.decode_onto(br#"{"user_id": 456}"#, &mut tape).unwrap();
/// let payload = queue_lua::value::tape_to_lua(&lua, &tape).unwrap();
/// let table = payload.as_table().unwrap();
/// assert_eq!(table.get::<i64>("user_id").unwrap(), 456);
/// ```
pub fn tape_to_lua(lua: &Lua, tape: &Tape) -> mlua::Result<LuaValue> {
    if tape.items().is_empty() {
        return Ok(LuaValue::Nil);
    }
    // SAFETY: `push` only pushes one value onto the stack `exec_raw` gives it,
    // checking the stack's room before each table; a Lua error it raises (out of
    // memory, a stack overflow) leaves it by `longjmp` inside `exec_raw`'s
    // protected call, through frames that own nothing to drop (only references and
    // integers).
    unsafe {
        lua.exec_raw::<LuaValue>((), |state| {
            let mut position = 0;
            push(state, tape, &mut position)
        })
    }
}

/// Pushes the value at `position` on the tape onto the Lua stack of `state`, and moves
/// `position` past it (see [`tape_to_lua`]).
unsafe fn push(state: *mut ffi::lua_State, tape: &Tape, position: &mut usize) {
    // SAFETY: the caller runs this inside a protected call on a valid state.
    unsafe {
        // Every container on a tape counts only the items written after it, even on
        // a tape left half-written by a failed decode, so this never runs past the end;
        // were it to, a panic here would unwind into C.
        let Some(&item) = tape.items().get(*position) else {
            return ffi::lua_pushnil(state);
        };
        *position += 1;
        match item {
            Item::Nil => ffi::lua_pushnil(state),
            Item::Bool(b) => ffi::lua_pushboolean(state, c_int::from(b)),
            Item::Int(i) => ffi::lua_pushinteger(state, i),
            Item::Float(f) => ffi::lua_pushnumber(state, f),
            Item::String(span) | Item::Bytes(span) => push_bytes(state, tape.text(span)),
            Item::Array(len) => {
                // The table, and an item being pushed into it.
                ffi::luaL_checkstack(state, 2, c"payload nested too deep".as_ptr());
                ffi::lua_createtable(state, size_hint(len), 0);
                for i in 1..=len {
                    push(state, tape, position);
                    ffi::lua_rawseti(state, -2, i as ffi::lua_Integer);
                }
            }
            Item::Map(len) => {
                // The table, a key and its value.
                ffi::luaL_checkstack(state, 3, c"payload nested too deep".as_ptr());
                ffi::lua_createtable(state, 0, size_hint(len));
                for _ in 0..len {
                    push(state, tape, position);
                    push(state, tape, position);
                    ffi::lua_rawset(state, -3);
                }
            }
        }
    }
}

unsafe fn push_bytes(state: *mut ffi::lua_State, bytes: &[u8]) {
    // SAFETY: the pointer and length come from one live slice.
    unsafe {
        ffi::lua_pushlstring(state, bytes.as_ptr().cast(), bytes.len());
    }
}

/// A table's preallocation hint: its size, or as much as an `int` holds.
fn size_hint(len: usize) -> c_int {
    c_int::try_from(len).unwrap_or(c_int::MAX)
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
