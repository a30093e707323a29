//! A decoded body laid flat: what every codec decodes into (docs/performance.md,
//! "Lua module").

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::{MAX_DEPTH, Value};

/// A body value held in two flat buffers instead of a tree: its [`Item`]s in document
/// order, and the bytes of all its strings.
///
/// A consumer that decodes every delivery into one reused tape allocates nothing per
/// message once the buffers have grown, and can build its own representation (a Lua
/// table) straight from the items. [`Tape::value`] builds a [`Value`].
///
/// ```
/// use queue_core::{Codec, Item, Tape, Value};
/// let mut tape = Tape::new();
/// Codec::Json.decode_onto(br#"{"n": [1, "two"]}"#, &mut tape).unwrap();
/// assert!(matches!(tape.items()[0], Item::Map(1)));
/// assert_eq!(tape.value(), Value::map([("n", Value::Array(vec![Value::Int(1), Value::from("two")]))]));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tape {
    items: Vec<Item>,
    text: Vec<u8>,
}

/// One value on a [`Tape`]. A container's contents follow it: an array's values, or a
/// map's entries as a key (always an [`Item::String`]) then its value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Item {
    /// No value (JSON `null`, msgpack `nil`).
    Nil,
    /// A boolean.
    Bool(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A UTF-8 string, whose bytes are [`Tape::text`] of this span.
    String(Span),
    /// Bytes that are not a string (msgpack `bin`), [`Tape::text`] of this span.
    Bytes(Span),
    /// A list of this many values.
    Array(usize),
    /// A map of this many entries. A key may repeat; its last value counts.
    Map(usize),
}

/// Where a string's bytes are in a [`Tape`]'s text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: usize,
    end: usize,
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Tape {
        Tape::default()
    }

    /// The items, in document order: the first is the body's root value. Empty on a
    /// new or cleared tape.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The bytes of a string or byte string on this tape (none for a span of another
    /// tape that runs past this one's text).
    pub fn text(&self, span: Span) -> &[u8] {
        // Never a panic: a Lua host reads spans inside a call into C.
        self.text.get(span.start..span.end).unwrap_or_default()
    }

    /// The bytes the tape's buffers hold on the heap, used or not: a consumer that
    /// keeps a tape between bodies can drop one that a large body grew.
    pub fn heap_bytes(&self) -> usize {
        self.items.capacity() * std::mem::size_of::<Item>() + self.text.capacity()
    }

    /// Empties the tape, keeping its buffers for the next body.
    pub fn clear(&mut self) {
        self.items.clear();
        self.text.clear();
    }

    /// Replaces what the tape held with one string of these bytes ([`Item::Bytes`] when
    /// they are not UTF-8).
    pub(crate) fn set_text(&mut self, bytes: &[u8]) {
        self.clear();
        let span = self.push_text(bytes);
        self.items.push(match std::str::from_utf8(bytes) {
            Ok(_) => Item::String(span),
            Err(_) => Item::Bytes(span),
        });
    }

    /// The root value as a [`Value`] tree (`Nil` for an empty tape).
    pub fn value(&self) -> Value {
        if self.items.is_empty() {
            return Value::Nil;
        }
        self.build(&mut 0)
    }

    fn build(&self, position: &mut usize) -> Value {
        let item = self.items[*position];
        *position += 1;
        match item {
            Item::Nil => Value::Nil,
            Item::Bool(b) => Value::Bool(b),
            Item::Int(i) => Value::Int(i),
            Item::Float(f) => Value::Float(f),
            Item::String(span) => Value::String(self.string(span)),
            Item::Bytes(span) => Value::Bytes(self.text(span).to_vec()),
            Item::Array(len) => Value::Array((0..len).map(|_| self.build(position)).collect()),
            Item::Map(len) => {
                let mut map = BTreeMap::new();
                for _ in 0..len {
                    let key = match self.build(position) {
                        Value::String(key) => key,
                        // Only the decoder and `From<&Value>` write tapes, and both
                        // write string keys.
                        other => unreachable!("a map key on a tape is a string, not {other:?}"),
                    };
                    map.insert(key, self.build(position));
                }
                Value::Map(map)
            }
        }
    }

    fn string(&self, span: Span) -> String {
        // Strings go on the tape from `&str`s only.
        String::from_utf8_lossy(self.text(span)).into_owned()
    }

    fn push_text(&mut self, bytes: &[u8]) -> Span {
        let start = self.text.len();
        self.text.extend_from_slice(bytes);
        Span {
            start,
            end: self.text.len(),
        }
    }

    fn write_value(&mut self, value: &Value) {
        match value {
            Value::Nil => self.items.push(Item::Nil),
            Value::Bool(b) => self.items.push(Item::Bool(*b)),
            Value::Int(i) => self.items.push(Item::Int(*i)),
            Value::Float(f) => self.items.push(Item::Float(*f)),
            Value::String(s) => {
                let span = self.push_text(s.as_bytes());
                self.items.push(Item::String(span));
            }
            Value::Bytes(b) => {
                let span = self.push_text(b);
                self.items.push(Item::Bytes(span));
            }
            Value::Array(values) => {
                self.items.push(Item::Array(values.len()));
                values.iter().for_each(|v| self.write_value(v));
            }
            Value::Map(map) => {
                self.items.push(Item::Map(map.len()));
                for (key, v) in map {
                    let span = self.push_text(key.as_bytes());
                    self.items.push(Item::String(span));
                    self.write_value(v);
                }
            }
        }
    }
}

impl From<&Value> for Tape {
    fn from(value: &Value) -> Tape {
        let mut tape = Tape::new();
        tape.write_value(value);
        tape
    }
}

/// The most values a body may hold: each takes an item on the tape (24 bytes) where
/// a msgpack nil takes one byte of the body, and a nil nothing of Lua's memory, so a
/// 128 MiB body of nils asked for 3 GiB outside any limit. 4 Mi values (96 MiB of
/// tape) is more than a Lua state's default 256 MiB could hold as a table.
pub(crate) const MAX_ITEMS: usize = 1 << 22;

/// Writes one value onto a tape as a deserializer visits it: the one decoder behind
/// every codec and behind `Value`'s `Deserialize`.
pub(crate) struct TapeWriter<'t> {
    tape: &'t mut Tape,
    /// Containers open around the value being visited.
    depth: usize,
    /// Set when a value was refused for nesting deeper than [`MAX_DEPTH`], so the
    /// error can say so whatever the deserializer wraps it in.
    pub(crate) too_deep: bool,
}

/// Why a body was refused for holding more than [`MAX_ITEMS`] values.
fn too_many<E: de::Error>() -> E {
    E::custom(format!("the body holds more than {MAX_ITEMS} values"))
}

impl<'t> TapeWriter<'t> {
    pub(crate) fn new(tape: &'t mut Tape) -> TapeWriter<'t> {
        TapeWriter {
            tape,
            depth: 0,
            too_deep: false,
        }
    }

    /// Puts a container's item on the tape and returns where, or refuses a container
    /// nested too deep.
    fn open<E: de::Error>(&mut self, item: Item) -> Result<usize, E> {
        if self.depth >= MAX_DEPTH {
            self.too_deep = true;
            return Err(E::custom(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        self.depth += 1;
        self.push(item)?;
        Ok(self.tape.items.len() - 1)
    }

    /// Puts a value's item on the tape, or refuses a body past [`MAX_ITEMS`] values.
    fn push<E: de::Error>(&mut self, item: Item) -> Result<(), E> {
        if self.tape.items.len() >= MAX_ITEMS {
            return Err(too_many());
        }
        self.tape.items.push(item);
        Ok(())
    }

    fn close(&mut self, at: usize, len: usize) {
        self.depth -= 1;
        self.tape.items[at] = match self.tape.items[at] {
            Item::Array(_) => Item::Array(len),
            _ => Item::Map(len),
        };
    }
}

impl<'de> DeserializeSeed<'de> for &mut TapeWriter<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &mut TapeWriter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message body value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.push(Item::Nil)
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.push(Item::Nil)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<(), E> {
        self.push(Item::Bool(b))
    }
    fn visit_i64<E: de::Error>(self, i: i64) -> Result<(), E> {
        self.push(Item::Int(i))
    }
    fn visit_u64<E: de::Error>(self, u: u64) -> Result<(), E> {
        let i = i64::try_from(u).map_err(|_| {
            E::custom(format!(
                "integer {u} does not fit in a signed 64-bit integer"
            ))
        })?;
        self.visit_i64(i)
    }
    fn visit_f64<E: de::Error>(self, f: f64) -> Result<(), E> {
        self.push(Item::Float(f))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        let span = self.tape.push_text(s.as_bytes());
        self.push(Item::String(span))
    }
    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<(), E> {
        let span = self.tape.push_text(b);
        self.push(Item::Bytes(span))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let at = self.open(Item::Array(0))?;
        let mut len = 0;
        while seq.next_element_seed(&mut *self)?.is_some() {
            len += 1;
        }
        self.close(at, len);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        let at = self.open(Item::Map(0))?;
        let mut len = 0;
        while access.next_key_seed(KeyWriter(&mut *self.tape))?.is_some() {
            access.next_value_seed(&mut *self)?;
            len += 1;
        }
        self.close(at, len);
        Ok(())
    }
}

/// Writes a map key, which must be a string.
struct KeyWriter<'t>(&'t mut Tape);

impl<'de> DeserializeSeed<'de> for KeyWriter<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for KeyWriter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        if self.0.items.len() >= MAX_ITEMS {
            return Err(too_many());
        }
        let span = self.0.push_text(s.as_bytes());
        self.0.items.push(Item::String(span));
        Ok(())
    }
    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<(), E> {
        match std::str::from_utf8(b) {
            Ok(s) => self.visit_str(s),
            Err(_) => Err(E::invalid_value(de::Unexpected::Bytes(b), &self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_written_onto_a_tape_comes_back() {
        let value = Value::map([
            ("list", Value::Array(vec![Value::Nil, Value::Float(1.5)])),
            ("bytes", Value::Bytes(vec![0xff, 0])),
            ("empty", Value::map::<&str>([])),
            ("yes", Value::Bool(true)),
        ]);
        let tape = Tape::from(&value);
        assert_eq!(tape.value(), value);
        assert_eq!(tape.items().len(), 11);
    }

    #[test]
    fn an_empty_tape_is_nil() {
        assert_eq!(Tape::new().value(), Value::Nil);
    }
}
