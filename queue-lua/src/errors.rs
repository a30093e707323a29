//! Error values as Lua sees them, and the `errors` global.

use std::collections::BTreeMap;

use mlua::{
    Function, IntoLua, Lua, MetaMethod, Table, UserData, UserDataMethods, Value as LuaValue,
};
use queue_core::{Error, ErrorKind};

/// An error value in Lua: `err:kind()`, `err:retryable()`, `err:message()`,
/// `err:details()`, and `tostring(err)` ("Invalid: queue id is empty").
#[derive(Debug, Clone, PartialEq)]
pub struct LuaError {
    /// The portable kind.
    pub kind: ErrorKind,
    /// Whether trying again may succeed.
    pub retryable: bool,
    /// The message.
    pub message: String,
    /// Extra details.
    pub details: BTreeMap<String, String>,
}

/// The longest message an error value keeps, in bytes; a longer one is cut, saying so.
const MAX_MESSAGE_BYTES: usize = 4096;
/// How many details an error value keeps, and the longest key or value of one.
const MAX_DETAILS: usize = 16;
const MAX_DETAIL_BYTES: usize = 1024;

impl LuaError {
    /// An error value with its text cut to a bound: it lives on Rust's heap, outside
    /// Lua's memory limit (see [`Counted`]).
    fn bounded(
        kind: ErrorKind,
        retryable: bool,
        message: &str,
        details: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let cut = |text: &str| queue_core::truncate(text, MAX_DETAIL_BYTES);
        LuaError {
            kind,
            retryable,
            message: queue_core::truncate(message, MAX_MESSAGE_BYTES),
            details: details
                .into_iter()
                .take(MAX_DETAILS)
                .map(|(k, v)| (cut(&k), cut(&v)))
                .collect(),
        }
    }

    /// The bytes of text it holds.
    fn text_bytes(&self) -> usize {
        let details: usize = self.details.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.message.len() + details
    }
}

impl From<&Error> for LuaError {
    fn from(e: &Error) -> Self {
        let details = e.details().iter().map(|(k, v)| (k.clone(), v.clone()));
        LuaError::bounded(e.kind(), e.retryable(), e.message(), details)
    }
}

/// An error value on its way to Lua, weighed by Lua's memory limit: its text is on
/// Rust's heap, which the limit does not see, so a string as long is tied to the
/// userdata (as its user value) for the limit to count. Without it, a handler keeping
/// error values (`kept[i] = errors.new(big)`) grew the process without bound while
/// Lua counted a few bytes each (docs/security.md, "Limits").
pub(crate) struct Counted(pub(crate) LuaError);

impl IntoLua for Counted {
    fn into_lua(self, lua: &Lua) -> mlua::Result<LuaValue> {
        let weight = lua.create_string(vec![0u8; self.0.text_bytes()])?;
        let userdata = lua.create_userdata(self.0)?;
        userdata.set_user_value(weight)?;
        Ok(LuaValue::UserData(userdata))
    }
}

impl From<Error> for LuaError {
    fn from(e: Error) -> Self {
        LuaError::from(&e)
    }
}

impl std::fmt::Display for LuaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl UserData for LuaError {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("kind", |_, e, ()| Ok(e.kind.as_str()));
        methods.add_method("retryable", |_, e, ()| Ok(e.retryable));
        methods.add_method("message", |_, e, ()| Ok(e.message.clone()));
        methods.add_method("details", |lua, e, ()| {
            let t = lua.create_table()?;
            for (k, v) in &e.details {
                t.set(k.as_str(), v.as_str())?;
            }
            Ok(t)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, e, ()| Ok(e.to_string()));
        // Lua calls it for an error value and any other userdata, on either side: that
        // one is simply not equal.
        methods.add_meta_function(MetaMethod::Eq, |_, (a, b): (LuaValue, LuaValue)| {
            let (LuaValue::UserData(a), LuaValue::UserData(b)) = (a, b) else {
                return Ok(false);
            };
            Ok(match (a.borrow::<LuaError>(), b.borrow::<LuaError>()) {
                (Ok(a), Ok(b)) => *a == *b,
                _ => false,
            })
        });
    }
}

/// What a Lua call returns: `value, err`.
pub(crate) type Answer = (LuaValue, Option<Counted>);

/// The failure of a call whose success is a value (`queue.message()`, `msg:id()`):
/// `nil, err`.
pub(crate) fn no_value(err: Error) -> mlua::Result<Answer> {
    Ok((LuaValue::Nil, Some(Counted(LuaError::from(err)))))
}

/// The failure of a call whose success is `true` (`queue.publish`, `msg:ack()`):
/// `false, err`, so that `ok` is a boolean either way, as the seed's `boolean, error`
/// says (docs/lua-api.md).
pub(crate) fn not_done(err: Error) -> mlua::Result<Answer> {
    Ok((LuaValue::Boolean(false), Some(Counted(LuaError::from(err)))))
}

/// Whether an error a handler gives as its failure (`return nil, err`,
/// `msg:nack(err)`) is worth another attempt: only an error value can say it is not.
pub(crate) fn retryable(error: &LuaValue) -> bool {
    match error {
        LuaValue::UserData(ud) => ud.borrow::<LuaError>().ok().is_none_or(|e| e.retryable),
        _ => true,
    }
}

/// A Lua string's text, cut to `max` bytes as it is read (see
/// [`queue_core::truncate_bytes`]).
fn cut_to(text: &mlua::LuaString, max: usize) -> String {
    queue_core::truncate_bytes(&text.as_bytes(), max)
}

/// A Lua string's text, cut as an error's message is.
pub(crate) fn cut_text(text: &mlua::LuaString) -> String {
    cut_to(text, MAX_MESSAGE_BYTES)
}

/// What a module function was given that it cannot take, quoted for its error and
/// cut short: an error's text lives on Rust's heap, outside the memory limit, for as
/// long as Lua keeps the error.
pub(crate) fn quoted(text: &[u8]) -> String {
    format!("{:?}", queue_core::truncate_bytes(text, 64))
}

/// An error that Lua code a module function ran raised (a `__tostring`, an
/// `__index`), cut as an error's message is: mlua copies its whole text to Rust's
/// heap, and 300 kept errors of 4 MB held 1.3 GB with 64 MiB allowed (review).
pub(crate) fn cut_error(error: mlua::Error) -> mlua::Error {
    let text = error.to_string();
    if text.len() <= MAX_MESSAGE_BYTES {
        return error;
    }
    mlua::Error::runtime(queue_core::truncate_bytes(
        text.as_bytes(),
        MAX_MESSAGE_BYTES,
    ))
}

/// The kind a Lua string names, if any.
fn kind_named(name: &mlua::LuaString) -> Option<ErrorKind> {
    ErrorKind::from_name(name.to_str().ok()?.as_ref())
}

/// Describes whatever a handler gave as its error (an error value, a string, anything)
/// for logs and dead-letter reasons.
pub fn describe(value: &LuaValue) -> String {
    match value {
        LuaValue::UserData(ud) => match ud.borrow::<LuaError>() {
            Ok(e) => e.to_string(),
            Err(_) => "a userdata error".to_string(),
        },
        LuaValue::String(s) => cut_text(s),
        LuaValue::Table(t) => match t.get::<mlua::LuaString>("message") {
            Ok(m) => cut_text(&m),
            Err(_) => "a table error".to_string(),
        },
        other => other
            .to_string()
            .unwrap_or_else(|_| other.type_name().to_string()),
    }
}

/// The `errors` global: kind constants, `errors.new{...}` and `errors.is(err, kind)`.
pub fn create_module(lua: &Lua) -> mlua::Result<Table> {
    let errors = lua.create_table()?;
    for kind in ErrorKind::ALL {
        errors.set(kind.constant_name(), kind.as_str())?;
    }
    // A misspelt constant raises: read as nil, `errors.new{kind = errors.INVALD}` made
    // an INTERNAL error, retried to its last attempt instead of dead-lettered (review).
    let strict = lua.create_table()?;
    strict.raw_set(
        "__index",
        lua.create_function(|_, (_, name): (LuaValue, LuaValue)| -> mlua::Result<()> {
            let name = match name {
                LuaValue::String(s) => cut_text(&s),
                other => other.type_name().to_string(),
            };
            let kinds: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.constant_name()).collect();
            Err(mlua::Error::runtime(format!(
                "errors.{name} does not exist (the kinds are errors.{}; the functions errors.new and errors.is)",
                kinds.join(", errors.")
            )))
        })?,
    )?;
    errors.set_metatable(Some(strict))?;
    // The state's own, taken before any Lua runs: a value's text (its `__tostring`'s)
    // as a Lua string, cut as it is read like every other text here.
    let tostring: Function = lua.globals().raw_get("tostring")?;
    errors.set(
        "new",
        lua.create_function(move |_, spec: LuaValue| {
            // Every text is cut as it is read: read whole first, a string of Lua's
            // (one to Lua however many places hold it) was copied to Rust's heap once
            // for the message and once for each detail, outside the memory limit.
            let (message, kind, retryable, details) = match spec {
                LuaValue::String(s) => (cut_text(&s), None, None, BTreeMap::new()),
                LuaValue::Table(t) => {
                    let message: Option<mlua::LuaString> = t.get("message").map_err(cut_error)?;
                    let kind: Option<mlua::LuaString> = t.get("kind").map_err(cut_error)?;
                    // Not read as a Lua truth: `retryable = "false"` would be true.
                    let retryable = match t.get::<LuaValue>("retryable").map_err(cut_error)? {
                        LuaValue::Nil => None,
                        LuaValue::Boolean(b) => Some(b),
                        other => {
                            return Err(mlua::Error::runtime(format!(
                                "errors.new: retryable must be a boolean, got a {}",
                                other.type_name()
                            )));
                        }
                    };
                    let details: Option<Table> = t.get("details").map_err(cut_error)?;
                    let mut map = BTreeMap::new();
                    if let Some(details) = details {
                        // No more than an error value keeps: a table of a million
                        // details made a million strings outside the memory limit.
                        for pair in details
                            .pairs::<mlua::LuaString, LuaValue>()
                            .take(MAX_DETAILS)
                        {
                            let (k, v) = pair?;
                            let v = match v {
                                LuaValue::String(v) => cut_to(&v, MAX_DETAIL_BYTES),
                                other => cut_to(
                                    &tostring
                                        .call::<mlua::LuaString>(other)
                                        .map_err(cut_error)?,
                                    MAX_DETAIL_BYTES,
                                ),
                            };
                            map.insert(cut_to(&k, MAX_DETAIL_BYTES), v);
                        }
                    }
                    let message = message.map_or_else(String::new, |m| {
                        cut_text(&m)
                    });
                    (message, kind, retryable, map)
                }
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "errors.new takes a table {{message, kind, retryable, details}} or a string, got a {}",
                        other.type_name()
                    )));
                }
            };
            let kind = match kind {
                None => ErrorKind::Internal,
                Some(name) => kind_named(&name).ok_or_else(|| {
                    let name = quoted(&name.as_bytes());
                    mlua::Error::runtime(format!("errors.new: unknown kind {name}"))
                })?,
            };
            let base = Error::new(kind, message);
            let retryable = retryable.unwrap_or(base.retryable());
            Ok(Counted(LuaError::bounded(
                kind,
                retryable,
                base.message(),
                details,
            )))
        })?,
    )?;
    errors.set(
        "is",
        lua.create_function(|_, (err, kind): (LuaValue, mlua::LuaString)| {
            // As `errors.new` does: a misspelt kind would make every test false.
            let wanted = kind_named(&kind).ok_or_else(|| {
                let kind = quoted(&kind.as_bytes());
                mlua::Error::runtime(format!("errors.is: unknown kind {kind}"))
            })?;
            Ok(match err {
                LuaValue::UserData(ud) => ud
                    .borrow::<LuaError>()
                    .map(|e| e.kind == wanted)
                    .unwrap_or(false),
                _ => false,
            })
        })?,
    )?;
    Ok(errors)
}
