//! Lua values <-> message body values and headers (docs/core-model.md).

use std::collections::BTreeMap;
use std::ffi::c_int;

use mlua::{Lua, Table, Value as LuaValue, ffi};
use queue_core::{
    Error, HeaderValue, Headers, Item, MAX_DEPTH, MAX_PUBLISHED_HEADER_BYTES, Result, Tape, Value,
};

/// The most a value converted by [`from_lua`] may take, counted as
/// [`from_lua_within`] counts: 16 MiB.
pub const MAX_CONVERTED_BYTES: usize = 16 * 1024 * 1024;

/// The detail a conversion's error has when the value took more than its limit
/// ([`is_too_large`]).
const TOO_LARGE: &str = "limit_bytes";

/// Whether `err` says a value took more than its conversion's limit, not that it
/// cannot be converted at all.
pub fn is_too_large(err: &Error) -> bool {
    err.details().contains_key(TOO_LARGE)
}

/// What a list's hole (a missing key below its last) counts against the size limit:
/// the bytes of the `null` it is written as.
const HOLE_BYTES: usize = 4;

/// Converts a Lua value into a body value. Tables with keys exactly `1..n` are arrays,
/// tables with string keys maps, and an empty table an empty map; strings that are not
/// UTF-8 become bytes. Functions, userdata, threads, cycles, mixed keys and nesting
/// deeper than [`MAX_DEPTH`] are `INVALID`, naming the path (`data.items[3].cb`), and
/// so is a value larger than [`MAX_CONVERTED_BYTES`] ([`from_lua_within`]).
pub fn from_lua(value: &LuaValue, root: &str) -> Result<Value> {
    from_lua_within(value, root, MAX_CONVERTED_BYTES)
}

/// [`from_lua`] for a value that may take at most `max_bytes`: every string and key
/// counts its bytes, every value one more, so that no codec encodes a value in fewer
/// bytes than it counts. A table referred to twice counts twice, as it is converted
/// (and encoded) twice: without the bound, a few kilobytes of Lua (`t = {t, t}` forty
/// times) would ask for terabytes.
///
/// ```
/// let lua = mlua::Lua::new();
/// let shared: mlua::Value = lua
///     .load("local t = {'x'} for i = 1, 40 do t = {t, t} end return t")
///     .eval()
///     .unwrap();
/// let err = queue_lua::value::from_lua_within(&shared, "data", 1024).unwrap_err();
/// assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
/// ```
pub fn from_lua_within(value: &LuaValue, root: &str, max_bytes: usize) -> Result<Value> {
    let mut conversion = Conversion {
        path: root.to_string(),
        open: Vec::new(),
        left: max_bytes,
        max_bytes,
    };
    conversion.convert(value)
}

/// One conversion's state: where it is, the tables it is inside (for cycles), and the
/// bytes it may still take.
struct Conversion {
    path: String,
    open: Vec<*const std::ffi::c_void>,
    left: usize,
    max_bytes: usize,
}

impl Conversion {
    /// Takes `bytes` of what the value may take, or says it is too large.
    fn take(&mut self, bytes: usize) -> Result<()> {
        match self.left.checked_sub(bytes.saturating_add(1)) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(self.too_large()),
        }
    }

    fn too_large(&self) -> Error {
        Error::invalid(format!(
            "{} takes more than {} bytes (every string and value counted, a table once \
             for each place that refers to it)",
            self.path, self.max_bytes
        ))
        .with_detail(TOO_LARGE, self.max_bytes.to_string())
    }

    fn convert(&mut self, value: &LuaValue) -> Result<Value> {
        match value {
            LuaValue::Nil => Ok(Value::Nil),
            LuaValue::Boolean(b) => {
                self.take(0)?;
                Ok(Value::Bool(*b))
            }
            LuaValue::Integer(i) => {
                self.take(0)?;
                Ok(Value::Int(*i))
            }
            LuaValue::Number(n) => {
                self.take(0)?;
                Ok(Value::Float(*n))
            }
            LuaValue::String(s) => {
                let bytes = s.as_bytes();
                self.take(bytes.len())?;
                Ok(match std::str::from_utf8(&bytes) {
                    Ok(text) => Value::String(text.to_string()),
                    Err(_) => Value::Bytes(bytes.to_vec()),
                })
            }
            LuaValue::Table(t) => {
                self.take(0)?;
                self.table(t)
            }
            other => Err(Error::invalid(format!(
                "{} is a {}, which cannot be sent in a message",
                self.path,
                other.type_name()
            ))),
        }
    }

    fn table(&mut self, t: &Table) -> Result<Value> {
        // Read raw, as every table is, the sandbox's read-only stand-in for `math`,
        // `string`, `queue`... is empty: `{m = math}` was sent as `{m = {}}` (review).
        if crate::sandbox::is_read_only(t) {
            return Err(Error::invalid(format!(
                "{} is one of the sandbox's shared library tables (math, string, queue...): functions, not data",
                self.path
            )));
        }
        let ptr = t.to_pointer();
        if self.open.contains(&ptr) {
            return Err(Error::invalid(format!(
                "{} refers back to a table that contains it (a cycle)",
                self.path
            )));
        }
        if self.open.len() >= MAX_DEPTH {
            return Err(Error::invalid(format!(
                "{} is nested deeper than {MAX_DEPTH} levels",
                self.path
            )));
        }
        let path = &self.path;
        let mut ints: Vec<(i64, LuaValue)> = Vec::new();
        let mut strings: Vec<(String, LuaValue)> = Vec::new();
        // What the entries collected so far will take at the least (each value one
        // byte, each name its bytes): past what is left, the table is refused now,
        // before a million entries are collected for a bound of a few kilobytes.
        let mut least = 0usize;
        for pair in t.pairs::<LuaValue, LuaValue>() {
            let (key, value) = pair.map_err(|e| match e {
                // Each value collected holds a slot of mlua's reference stack, a table's
                // until it is converted, its parents' meanwhile: about a million at once.
                // The error said "out of Lua stack, too many arguments..." (review).
                mlua::Error::StackError => Error::invalid(format!(
                    "{path}: the value holds more than about a million values at once (nested tables' values counted together), more than can be converted: send it in parts"
                )),
                other => Error::invalid(format!("{path}: {other}")),
            })?;
            least = least.saturating_add(
                1 + match &key {
                    LuaValue::String(s) => s.as_bytes().len(),
                    _ => 0,
                },
            );
            if least > self.left {
                return Err(self.too_large());
            }
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
        if strings.is_empty() && !ints.is_empty() {
            ints.sort_by_key(|(i, _)| *i);
            let count = i64::try_from(ints.len()).unwrap_or(i64::MAX);
            let (first, last) = (ints[0].0, ints[ints.len() - 1].0);
            // A list's holes are written as null: a JSON list with nulls arrives with
            // holes (nil), and a handler forwarding what it got was refused INVALID,
            // dead-lettered at once (review). Each hole counts as the 4 bytes of its
            // `null` against the size limit, so `{[1e9] = 1}` is refused, not a
            // billion nulls.
            if first < 1 {
                return Err(Error::invalid(format!(
                    "{path} has integer keys that do not make a list: a list's keys run from 1 (table keys must be strings, or 1..n for a list)"
                )));
            }
            let holes = usize::try_from(last.saturating_sub(count)).unwrap_or(usize::MAX);
            if holes.saturating_mul(HOLE_BYTES) > self.left {
                return Err(Error::invalid(format!(
                    "{path} has integer keys up to {last} for {count} values: as a list, its holes written as null, it takes more than {} bytes",
                    self.max_bytes
                ))
                .with_detail(TOO_LARGE, self.max_bytes.to_string()));
            }
        }
        self.open.push(ptr);
        let converted = self.entries(ints, strings);
        self.open.pop();
        converted
    }

    /// Converts a table's entries, all list entries or all named ones (checked).
    fn entries(
        &mut self,
        ints: Vec<(i64, LuaValue)>,
        strings: Vec<(String, LuaValue)>,
    ) -> Result<Value> {
        if strings.is_empty() && !ints.is_empty() {
            let mut items = Vec::with_capacity(ints.len());
            for (i, v) in &ints {
                // The holes before it, each counted as its `null`.
                while i64::try_from(items.len()).unwrap_or(i64::MAX) < i - 1 {
                    self.take(HOLE_BYTES - 1)?;
                    items.push(Value::Nil);
                }
                let len = self.path.len();
                self.path.push_str(&format!("[{i}]"));
                let item = self.convert(v);
                self.path.truncate(len);
                items.push(item?);
            }
            return Ok(Value::Array(items));
        }
        let mut map = BTreeMap::new();
        for (k, v) in strings {
            let len = self.path.len();
            self.path.push('.');
            self.path.push_str(&k);
            let value = self.take(k.len()).and_then(|()| self.convert(&v));
            self.path.truncate(len);
            map.insert(k, value?);
        }
        Ok(Value::Map(map))
    }
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
    // Counted as they come: the bound is refused before every header is converted.
    let mut size = 0usize;
    for pair in t.pairs::<LuaValue, LuaValue>() {
        let (key, value) = pair.map_err(|e| Error::invalid(format!("headers: {e}")))?;
        let key = match &key {
            LuaValue::String(s) => s
                .to_str()
                .map(|k| k.to_string())
                .map_err(|_| Error::invalid("header names must be UTF-8"))?,
            other => {
                return Err(Error::invalid(format!(
                    "header names must be strings, got a key of type {}",
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
        size = size.saturating_add(Headers::entry_bytes(&key, &value));
        if size > MAX_PUBLISHED_HEADER_BYTES {
            return Err(Error::invalid(format!(
                "headers take more than the {MAX_PUBLISHED_HEADER_BYTES} bytes a published message may carry"
            )));
        }
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
