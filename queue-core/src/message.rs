//! Messages and their headers, with the well-known header names.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::reading::Reading;
use crate::{Error, Result};

/// Well-known header names (docs/core-model.md).
pub mod names {
    /// Delivery attempt, written by the runtime only; absent means 1.
    pub const ATTEMPTS: &str = "attempts";
    /// Overrides the generated message id.
    pub const MESSAGE_ID: &str = "message_id";
    /// Correlates a reply with its request.
    pub const CORRELATION_ID: &str = "correlation_id";
    /// Where a reply should go.
    pub const REPLY_TO: &str = "reply_to";
    /// An application-defined type name.
    pub const MESSAGE_TYPE: &str = "message_type";
    /// How the body was encoded on top of its content type (`gzip`), as another
    /// client may say it.
    pub const CONTENT_ENCODING: &str = "content_encoding";
    /// `0..=9` or `"low"`, `"normal"`, `"high"`.
    pub const PRIORITY: &str = "priority";
    /// Per-message time to live in milliseconds.
    pub const EXPIRATION: &str = "expiration";
    /// Per-message time to live in milliseconds (alias of `expiration`).
    pub const TTL: &str = "ttl";
    /// Unix seconds, added at publish unless set.
    pub const TIMESTAMP: &str = "timestamp";
    /// Milliseconds to wait before delivery.
    pub const DELAY: &str = "delay";
    /// A publisher's own content type; travels as a plain header.
    pub const CONTENT_TYPE: &str = "content_type";
    /// On dead letters: the queue the message failed in.
    pub const X_ORIGINAL_QUEUE: &str = "x_original_queue";
    /// On dead letters: the last failure's message.
    pub const X_DEAD_LETTER_REASON: &str = "x_dead_letter_reason";
    /// On dead letters: when it was dead-lettered (RFC 3339 UTC).
    pub const X_DEAD_LETTER_TIME: &str = "x_dead_letter_time";
    /// On dead letters: the `attempts` it had when it was dead-lettered (its
    /// `attempts` start again at 1 in the dead-letter queue).
    pub const X_ORIGINAL_ATTEMPTS: &str = "x_original_attempts";
    /// On dead letters: the per-message time to live it had (a dead letter keeps no
    /// TTL, so it cannot expire out of its dead-letter queue).
    pub const X_ORIGINAL_EXPIRATION: &str = "x_original_expiration";
    /// On copies the runtime republished: the headers it had to drop (and why) to
    /// publish the message again, typically ones another client set that no driver
    /// accepts (`priority: "urgent"`).
    pub const X_DROPPED_HEADERS: &str = "x_dropped_headers";
    /// The prefix of ActiveMQ Artemis' own properties (`_AMQ_DUPL_ID`,
    /// `_AMQ_ORIG_ADDRESS`, ...): handlers are not shown them, and no copy carries
    /// them, since Artemis drops a copy whose duplicate-detection id it has seen, after
    /// its original was acked, whoever set it on the original (another client, often).
    pub const ARTEMIS_PROPERTIES: &str = "_AMQ_";
    /// On copies whose id was too long to publish again: the original id.
    pub const X_ORIGINAL_MESSAGE_ID: &str = "x_original_message_id";

    /// On deliveries from brokers that count them: how many times the message was
    /// delivered before (RabbitMQ's `x-delivery-count` on quorum queues, AMQP 1.0's
    /// header `delivery-count`; absent on a first delivery). Set by drivers, read by the
    /// runtime's crash-loop guard, never published: drivers do not send it, so a retry
    /// copy starts without it.
    pub const X_DELIVERY_COUNT: &str = "x_delivery_count";
}

/// The most bytes of headers any message carries on the wire, whoever wrote them, as
/// [`Headers::byte_size`] counts them: brokers close the whole connection on a header
/// frame past their limit (RabbitMQ's is 128 KiB), so the limit holds before anything
/// reaches them.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The room, within [`MAX_HEADER_BYTES`], kept for the headers the runtime adds to a
/// copy of a failed message it republishes: a dead-letter reason and the list of the
/// headers it dropped (each at most [`crate::retry::MAX_REASON_BYTES`]), the original
/// queue, a time, counts. [`Message::make_republishable`] leaves a message's own
/// headers the rest.
pub const RUNTIME_HEADER_ROOM: usize = 10 * 1024;

/// The most bytes of headers a publisher may send: what a copy keeps of a message's
/// own headers, less room for what the runtime adds on publish (`timestamp`, a trace
/// context), so that a retry or a dead letter of a published message never has to drop
/// one of its headers.
pub const MAX_PUBLISHED_HEADER_BYTES: usize = 48 * 1024;

/// The most headers a publisher may send. Bytes alone allowed about 5,000 tiny ones,
/// past what Redis's scripts unpack from a message's fields (about 8,000 values): a
/// retry copy of such a message failed every time, and a returned one stayed stuck.
pub const MAX_PUBLISHED_HEADERS: usize = 1024;

/// What [`Headers::byte_size`] counts for each header besides its name and value: the
/// bytes that encode an entry on the wire (AMQP 0-9-1 takes 6, AMQP 1.0 up to 7), so
/// that many small headers cannot pass the limit their encoding breaks.
pub const HEADER_ENTRY_BYTES: usize = 8;

/// The headers the runtime writes on the copies it republishes, with the longest value
/// it writes under each: a value longer than that came from another client, and counts
/// as the message's own.
const RUNTIME_RECORDS: [(&str, usize); 9] = [
    (names::X_DEAD_LETTER_REASON, crate::retry::MAX_REASON_BYTES),
    (names::X_DROPPED_HEADERS, crate::retry::MAX_REASON_BYTES),
    (names::X_ORIGINAL_MESSAGE_ID, ORIGINAL_ID_BYTES),
    (names::X_ORIGINAL_QUEUE, crate::QueueId::MAX_LEN),
    // An RFC 3339 time, `2026-12-05T07:30:00Z`.
    (names::X_DEAD_LETTER_TIME, 32),
    (names::X_ORIGINAL_ATTEMPTS, 8),
    // A moved `expiration`: an integer, or its digits.
    (names::X_ORIGINAL_EXPIRATION, 20),
    (names::ATTEMPTS, 8),
    (names::DELAY, 8),
];

/// The longest `delay`, `expiration` or `ttl`, in milliseconds: 4,294,967,295 (about
/// 49.7 days), the most AMQP carries (RabbitMQ closes the channel of a publish whose
/// expiration is longer; an AMQP 1.0 time to live has 32 bits).
pub const MAX_MILLIS: u64 = u32::MAX as u64;

/// The most of an original message id a copy keeps in `x_original_message_id`.
const ORIGINAL_ID_BYTES: usize = 1024;

/// Whether this header is one the runtime writes on its copies.
fn is_runtime_record(name: &str, value: &HeaderValue) -> bool {
    RUNTIME_RECORDS
        .iter()
        .any(|(record, longest)| *record == name && value_bytes(value) <= *longest)
}

/// The most bytes the runtime's records take on a copy.
const RUNTIME_RECORD_BYTES: usize = {
    let mut total = 0;
    let mut i = 0;
    while i < RUNTIME_RECORDS.len() {
        total += RUNTIME_RECORDS[i].0.len() + RUNTIME_RECORDS[i].1 + HEADER_ENTRY_BYTES;
        i += 1;
    }
    total
};

/// The most publishing adds to a publisher's headers: `timestamp`, and a trace context
/// (`traceparent`, and a `tracestate` of at most 512 bytes).
const PUBLISH_ADDS: usize = names::TIMESTAMP.len()
    + 8
    + "traceparent".len()
    + 55
    + "tracestate".len()
    + 512
    + 3 * HEADER_ENTRY_BYTES;

const _: () = assert!(RUNTIME_RECORD_BYTES <= RUNTIME_HEADER_ROOM);
const _: () =
    assert!(MAX_PUBLISHED_HEADER_BYTES + PUBLISH_ADDS <= MAX_HEADER_BYTES - RUNTIME_HEADER_ROOM);

/// The longest header name, and the longest message id, any driver can carry
/// (AMQP 0-9-1's short strings).
pub const MAX_NAME_BYTES: usize = 255;

/// A header value: a scalar.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    /// A string.
    String(String),
    /// A 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl HeaderValue {
    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if it is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::String(s) => f.write_str(s),
            HeaderValue::Int(i) => write!(f, "{i}"),
            HeaderValue::Float(x) => write!(f, "{x}"),
            HeaderValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::String(s.to_string())
    }
}
impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::String(s)
    }
}
impl From<i64> for HeaderValue {
    fn from(i: i64) -> Self {
        HeaderValue::Int(i)
    }
}
impl From<f64> for HeaderValue {
    fn from(x: f64) -> Self {
        HeaderValue::Float(x)
    }
}
impl From<bool> for HeaderValue {
    fn from(b: bool) -> Self {
        HeaderValue::Bool(b)
    }
}

/// Message headers: string keys, scalar values.
///
/// ```
/// use queue_core::Headers;
/// let headers = Headers::from_pairs([("priority", "high".into()), ("correlation_id", "r-1".into())]);
/// assert_eq!(headers.priority_level().unwrap(), Some(8));
/// assert_eq!(headers.attempts(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Headers(BTreeMap<String, HeaderValue>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(BTreeMap::new())
    }

    /// Headers from pairs.
    pub fn from_pairs<K: Into<String>>(pairs: impl IntoIterator<Item = (K, HeaderValue)>) -> Self {
        Headers(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// One header.
    pub fn get(&self, key: &str) -> Option<&HeaderValue> {
        self.0.get(key)
    }

    /// Sets a header, returning the old value.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        value: impl Into<HeaderValue>,
    ) -> Option<HeaderValue> {
        self.0.insert(key.into(), value.into())
    }

    /// Removes a header.
    pub fn remove(&mut self, key: &str) -> Option<HeaderValue> {
        self.0.remove(key)
    }

    /// Whether a header is set.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Adds `note` to [`names::X_DROPPED_HEADERS`], after the note the headers carry
    /// already (an earlier copy's, or one a driver wrote as the message arrived), the
    /// whole cut to [`crate::retry::MAX_REASON_BYTES`]. Returns the new note.
    ///
    /// ```
    /// use queue_core::{Headers, names};
    /// let mut headers = Headers::new();
    /// headers.note_dropped("a");
    /// assert_eq!(headers.note_dropped("b"), "a; b");
    /// assert_eq!(headers.get(names::X_DROPPED_HEADERS).unwrap().as_str(), Some("a; b"));
    /// ```
    pub fn note_dropped(&mut self, note: &str) -> String {
        let note = match self.get(names::X_DROPPED_HEADERS) {
            Some(HeaderValue::String(earlier)) => format!("{earlier}; {note}"),
            _ => note.to_string(),
        };
        let note = truncate(&note, crate::retry::MAX_REASON_BYTES);
        self.insert(names::X_DROPPED_HEADERS, note.clone());
        note
    }

    /// All headers in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &HeaderValue)> {
        self.0.iter()
    }

    /// How many headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No headers at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many bytes the headers take, as [`MAX_HEADER_BYTES`] counts them: each
    /// name and value (numbers and booleans count 8 bytes), and [`HEADER_ENTRY_BYTES`]
    /// for each header.
    pub fn byte_size(&self) -> usize {
        self.0.iter().map(|(k, v)| Headers::entry_bytes(k, v)).sum()
    }

    /// What one header counts towards [`MAX_HEADER_BYTES`] (and [`Headers::byte_size`]).
    ///
    /// ```
    /// use queue_core::{HeaderValue, Headers};
    /// assert_eq!(Headers::entry_bytes("tenant", &HeaderValue::from("acme")), 6 + 4 + 8);
    /// ```
    pub fn entry_bytes(name: &str, value: &HeaderValue) -> usize {
        name.len() + value_bytes(value) + HEADER_ENTRY_BYTES
    }

    /// The delivery attempt: the `attempts` header, 1 when absent or unreadable.
    pub fn attempts(&self) -> u32 {
        match self.get(names::ATTEMPTS) {
            Some(HeaderValue::Int(n)) if *n >= 1 => u32::try_from(*n).unwrap_or(u32::MAX),
            _ => 1,
        }
    }

    /// The numeric priority 0..=9 of the `priority` header, if set. `"low"` is 2,
    /// `"normal"` 5 and `"high"` 8; anything else is `INVALID`.
    pub fn priority_level(&self) -> Result<Option<u8>> {
        match self.get(names::PRIORITY) {
            None => Ok(None),
            Some(value) => parse_priority(value).map(Some),
        }
    }

    /// The `delay` header as a duration, if set; a negative or non-integer value is
    /// `INVALID`.
    pub fn delay(&self) -> Result<Option<Duration>> {
        self.millis(names::DELAY, 0)
    }

    /// The per-message time to live (`expiration`, or its alias `ttl`), if set. It is
    /// at least 1 ms: with 0, the memory driver dropped the message unseen even with a
    /// consumer waiting, and each broker reads 0 its own way (docs/core-model.md).
    pub fn ttl(&self) -> Result<Option<Duration>> {
        match self.millis(names::EXPIRATION, 1)? {
            Some(d) => Ok(Some(d)),
            None => self.millis(names::TTL, 1),
        }
    }

    fn millis(&self, key: &str, least: u64) -> Result<Option<Duration>> {
        let ms = match self.get(key) {
            None => return Ok(None),
            Some(HeaderValue::Int(ms)) => u64::try_from(*ms).ok(),
            Some(HeaderValue::Float(ms)) => whole(*ms).and_then(|ms| u64::try_from(ms).ok()),
            Some(HeaderValue::String(s)) => s.parse::<u64>().ok(),
            Some(_) => None,
        };
        match ms {
            Some(ms) if (least..=MAX_MILLIS).contains(&ms) => Ok(Some(Duration::from_millis(ms))),
            _ => Err(Error::invalid(format!(
                "header {key:?} must be a whole number of milliseconds from {least} to {MAX_MILLIS} (about 49 days), got {}",
                self.get(key).map(HeaderValue::shown).unwrap_or_default()
            ))),
        }
    }

    /// Checks headers a publisher gave: reserved names (`attempts`, `x_*`) are refused,
    /// and `priority`, `delay`, `expiration`/`ttl` must be well formed. Errors name the key.
    pub fn validate_for_publish(&self) -> Result<()> {
        for key in self.0.keys() {
            if key.is_empty() {
                return Err(Error::invalid("header names must not be empty"));
            }
            if key == names::ATTEMPTS || key.starts_with("x_") {
                return Err(Error::invalid(format!(
                    "header {key:?} is reserved for the runtime and cannot be published"
                )));
            }
        }
        if self.len() > MAX_PUBLISHED_HEADERS {
            return Err(Error::invalid(format!(
                "{} headers: a published message carries at most {MAX_PUBLISHED_HEADERS} headers",
                self.len()
            )));
        }
        let size = self.byte_size();
        if size > MAX_PUBLISHED_HEADER_BYTES {
            return Err(Error::invalid(format!(
                "headers take {size} bytes, more than the {MAX_PUBLISHED_HEADER_BYTES} a published message may carry"
            )));
        }
        if let Some(long) = self.0.keys().find(|k| k.len() > MAX_NAME_BYTES) {
            return Err(Error::invalid(format!(
                "header name {}... is {} bytes, longer than {MAX_NAME_BYTES}",
                preview(long),
                long.len()
            )));
        }
        for (_, check) in self.well_known_checks() {
            check?;
        }
        Ok(())
    }

    /// The well-known headers a driver reads, each with whether its value is one a
    /// driver carries: publishing refuses the first that is not, and a republished
    /// copy drops each that is not, so a published message never loses one on a retry.
    fn well_known_checks(&self) -> [(&'static str, Result<()>); 5] {
        let id = match self.get(names::MESSAGE_ID) {
            Some(id) if !matches!(id.as_str(), Some(s) if !s.is_empty() && s.len() <= MAX_NAME_BYTES) => {
                Err(Error::invalid(format!(
                    "header \"message_id\" must be a non-empty string of at most {MAX_NAME_BYTES} bytes"
                )))
            }
            _ => Ok(()),
        };
        [
            (names::PRIORITY, self.priority_level().map(|_| ())),
            (names::DELAY, self.delay().map(|_| ())),
            (
                names::EXPIRATION,
                self.millis(names::EXPIRATION, 1).map(|_| ()),
            ),
            (names::TTL, self.millis(names::TTL, 1).map(|_| ())),
            (names::MESSAGE_ID, id),
        ]
    }
}

fn value_bytes(value: &HeaderValue) -> usize {
    match value {
        HeaderValue::String(s) => s.len(),
        _ => 8,
    }
}

/// One entry of an `x_dropped_headers` note: the header, its value (a long string cut),
/// and why it was dropped.
fn dropped_entry(key: &str, value: &HeaderValue, why: &str) -> String {
    format!("{}={}: {why}", preview(key), value.shown())
}

impl HeaderValue {
    /// The value as an error or a note shows it to a user: a string quoted (cut after
    /// 32 characters), a number or a boolean as it is, never Rust's names of types.
    ///
    /// ```
    /// use queue_core::HeaderValue;
    /// assert_eq!(HeaderValue::from("urgent").shown(), "\"urgent\"");
    /// assert_eq!(HeaderValue::Int(200).shown(), "200");
    /// ```
    pub fn shown(&self) -> String {
        match self {
            HeaderValue::String(s) if s.chars().nth(32).is_some() => {
                format!("{}...", preview(s))
            }
            HeaderValue::String(s) => format!("{s:?}"),
            other => other.to_string(),
        }
    }
}

/// The first characters of a long text, for messages that must not echo it whole.
fn preview(text: &str) -> String {
    format!("{:?}", text.chars().take(32).collect::<String>())
}

impl<K: Into<String>> FromIterator<(K, HeaderValue)> for Headers {
    fn from_iter<T: IntoIterator<Item = (K, HeaderValue)>>(iter: T) -> Self {
        Headers::from_pairs(iter)
    }
}

impl IntoIterator for Headers {
    type Item = (String, HeaderValue);
    type IntoIter = std::collections::btree_map::IntoIter<String, HeaderValue>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Parses a priority header value: `0..=9`, `"low"`, `"normal"` or `"high"`.
pub fn parse_priority(value: &HeaderValue) -> Result<u8> {
    match value {
        HeaderValue::Int(n) if (0..=9).contains(n) => Ok(*n as u8),
        HeaderValue::Float(f) => match whole(*f) {
            Some(n) if (0..=9).contains(&n) => Ok(n as u8),
            _ => Err(priority_error(value)),
        },
        HeaderValue::String(s) => match s.as_str() {
            "low" => Ok(2),
            "normal" => Ok(5),
            "high" => Ok(8),
            digits => match digits.parse::<u8>() {
                Ok(n) if n <= 9 => Ok(n),
                _ => Err(priority_error(value)),
            },
        },
        _ => Err(priority_error(value)),
    }
}

/// A float that is a whole number, as an integer: Lua's `/` and `^` give floats
/// (`2^3 * 100` is 800.0), and a header computed with them means the integer.
fn whole(f: f64) -> Option<i64> {
    // i64::MAX as f64 rounds up to 2^63, which is out of range itself.
    (f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64).then_some(f as i64)
}

fn priority_error(value: &HeaderValue) -> Error {
    Error::invalid(format!(
        "header \"priority\" must be 0..9, \"low\", \"normal\" or \"high\", got {}",
        value.shown()
    ))
}

/// A message as drivers carry it: the body is already encoded by the queue's codec.
///
/// ```
/// use queue_core::{Codec, Headers, Message, Value};
/// let msg = Message::encode(&Value::from("hi"), Headers::new(), Codec::Json).unwrap();
/// assert_eq!(msg.content_type, "application/json");
/// assert_eq!(msg.decode().unwrap(), Value::from("hi"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Unique id: the `message_id` header if the publisher set one, else a UUID v7.
    pub id: String,
    /// Scalar headers.
    pub headers: Headers,
    /// The wire content type: the codec's, on publish; on delivery, what the sender
    /// wrote (empty, or `application/octet-stream`, by driver, when it wrote none).
    pub content_type: String,
    /// The encoded body.
    pub body: Vec<u8>,
}

impl Message {
    /// Encodes a body with a codec into a message with a fresh id (or the `message_id`
    /// header's).
    pub fn encode(body: &crate::Value, headers: Headers, codec: crate::Codec) -> Result<Message> {
        let bytes = codec.encode(body)?;
        Ok(Message::from_bytes(bytes, headers, codec.content_type()))
    }

    /// A message around already encoded bytes.
    pub fn from_bytes(body: Vec<u8>, headers: Headers, content_type: &str) -> Message {
        let id = match headers.get(names::MESSAGE_ID) {
            Some(HeaderValue::String(id)) if !id.is_empty() => id.clone(),
            _ => new_message_id(),
        };
        Message {
            id,
            headers,
            content_type: content_type.to_string(),
            body,
        }
    }

    /// Makes a message that came from outside (another client, a broker) safe to
    /// publish again, whatever its headers: drops the well-known headers no driver
    /// accepts as they are (`priority: "urgent"`, `expiration: "soon"`, a priority of
    /// 200), the headers a broker acts on when the copy arrives (Artemis' `_AMQ_*`),
    /// names longer than any driver carries, and the largest headers while they
    /// take more than [`MAX_HEADER_BYTES`] less the [`RUNTIME_HEADER_ROOM`] the failure
    /// path's own headers need; replaces an id too long to carry. The runtime's own
    /// `x_` headers are kept (one larger than the runtime writes came from outside,
    /// and goes like any other). Returns what it dropped, with why, for
    /// [`names::X_DROPPED_HEADERS`].
    ///
    /// ```
    /// use queue_core::{HeaderValue, Headers, Message};
    /// let headers = Headers::from_pairs([("priority", HeaderValue::from("urgent")), ("k", HeaderValue::Int(1))]);
    /// let mut message = Message::from_bytes(b"1".to_vec(), headers, "application/json");
    /// let dropped = message.make_republishable();
    /// assert_eq!(dropped.len(), 1);
    /// assert!(!message.headers.contains("priority") && message.headers.contains("k"));
    /// ```
    pub fn make_republishable(&mut self) -> Vec<String> {
        let mut dropped = Vec::new();
        if self.id.is_empty() || self.id.len() > MAX_NAME_BYTES {
            let original = std::mem::replace(&mut self.id, new_message_id());
            self.headers.insert(
                names::X_ORIGINAL_MESSAGE_ID,
                truncate(&original, ORIGINAL_ID_BYTES),
            );
            dropped.push(format!(
                "message id {}...: empty or longer than {MAX_NAME_BYTES} bytes, replaced by {}",
                preview(&original),
                self.id
            ));
        }
        if self.content_type.len() > MAX_NAME_BYTES {
            // AMQP 0-9-1 carries at most 255 bytes: refused there, a copy bound for it
            // (a dead-letter queue on RabbitMQ of a Redis queue's message) never
            // moved, and its original went back and came again for ever (review).
            // The base type is what a handler's payload is decoded by; one too long
            // itself gives way to a type read the same way.
            let base = crate::codec::base_type(&self.content_type);
            let shorter = if !base.is_empty() && base.len() <= MAX_NAME_BYTES {
                base.to_string()
            } else {
                crate::reading::Reading::short_type_like(&self.content_type).to_string()
            };
            let original = std::mem::replace(&mut self.content_type, shorter.clone());
            dropped.push(format!(
                "content type {}...: longer than {MAX_NAME_BYTES} bytes, replaced by {shorter}",
                preview(&original)
            ));
        }
        let headers = &mut self.headers;
        let mut drop_header = |headers: &mut Headers, key: &str, why: String| {
            if let Some(value) = headers.remove(key) {
                dropped.push(dropped_entry(key, &value, &why));
            }
        };
        for (key, check) in headers.well_known_checks() {
            if let Err(e) = check {
                drop_header(headers, key, e.message().to_string());
            }
        }
        let artemis: Vec<String> = headers
            .0
            .keys()
            .filter(|k| k.starts_with(names::ARTEMIS_PROPERTIES))
            .cloned()
            .collect();
        for key in artemis {
            drop_header(
                headers,
                &key,
                "an ActiveMQ Artemis property: Artemis drops a copy whose duplicate-detection id (_AMQ_DUPL_ID) it has seen".to_string(),
            );
        }
        let long_names: Vec<String> = headers
            .0
            .keys()
            .filter(|k| k.is_empty() || k.len() > MAX_NAME_BYTES)
            .cloned()
            .collect();
        for key in long_names {
            drop_header(
                headers,
                &key,
                format!("a name must be 1..={MAX_NAME_BYTES} bytes"),
            );
        }
        // The runtime's records on the copy (kept from an earlier failure, or written
        // after this) take at most the room kept for them; the rest is the message's own.
        let keep_to = MAX_HEADER_BYTES - RUNTIME_HEADER_ROOM;
        // Sized once, dropped largest first: a message of many small headers costs one
        // sort, not a pass over all of them per header dropped.
        let mut own: Vec<(usize, String)> = headers
            .0
            .iter()
            .filter(|(k, v)| !is_runtime_record(k, v))
            .map(|(k, v)| (Headers::entry_bytes(k, v), k.clone()))
            .collect();
        let mut own_bytes: usize = own.iter().map(|(size, _)| size).sum();
        own.sort_unstable_by(|a, b| b.cmp(a));
        for (size, name) in own {
            if own_bytes <= keep_to {
                break;
            }
            own_bytes -= size;
            drop_header(
                headers,
                &name,
                format!(
                    "the headers took more than {keep_to} bytes, the most a copy keeps beside the runtime's own"
                ),
            );
        }
        dropped
    }

    /// [`Message::make_republishable`], with what it dropped noted on the message in
    /// [`names::X_DROPPED_HEADERS`] (after the note the message carried already, if
    /// any; cut to [`crate::retry::MAX_REASON_BYTES`]), as every copy the runtime
    /// publishes again carries it. Returns the note, if any.
    ///
    /// ```
    /// use queue_core::{HeaderValue, Headers, Message, names};
    /// let headers = Headers::from_pairs([("priority", HeaderValue::from("urgent"))]);
    /// let mut message = Message::from_bytes(b"1".to_vec(), headers, "application/json");
    /// let note = message.make_republishable_noting().expect("priority was dropped");
    /// assert!(note.contains("must be 0..9"), "{note}");
    /// assert!(message.headers.contains(names::X_DROPPED_HEADERS));
    /// ```
    pub fn make_republishable_noting(&mut self) -> Option<String> {
        let dropped = self.make_republishable();
        if dropped.is_empty() {
            return None;
        }
        Some(self.headers.note_dropped(&dropped.join("; ")))
    }

    /// Leaves the headers `names` out of a copy (a driver's
    /// [`crate::Capabilities::reserved_headers`]), each noted in
    /// [`names::X_DROPPED_HEADERS`] with `why`. Returns the note, if anything was left
    /// out.
    ///
    /// ```
    /// use queue_core::{HeaderValue, Headers, Message};
    /// let headers = Headers::from_pairs([("CC", HeaderValue::from("boss@example.com"))]);
    /// let mut copy = Message::from_bytes(b"1".to_vec(), headers, "application/json");
    /// let note = copy.leave_out_noting(&["CC", "BCC"], "RabbitMQ routes by it").unwrap();
    /// assert!(note.starts_with(r#""CC"="boss@example.com": "#), "{note}");
    /// assert!(!copy.headers.contains("CC"));
    /// ```
    pub fn leave_out_noting(&mut self, names: &[&str], why: &str) -> Option<String> {
        let dropped: Vec<String> = names
            .iter()
            .filter_map(|key| {
                let value = self.headers.remove(key)?;
                Some(dropped_entry(key, &value, why))
            })
            .collect();
        if dropped.is_empty() {
            return None;
        }
        Some(self.headers.note_dropped(&dropped.join("; ")))
    }

    /// Decodes the body by its content type: a codec's (or any JSON type) strictly,
    /// malformed bytes being `INVALID`; `text/*` as a string; no content type, or
    /// `application/octet-stream`, as a JSON object or array when it is one, else as a
    /// string. Any other content type is `INVALID` (docs/core-model.md, "Bodies from
    /// other clients").
    ///
    /// ```
    /// use queue_core::{Headers, Message, Value};
    /// let from_pika = Message::from_bytes(br#"{"n": 1}"#.to_vec(), Headers::new(), "");
    /// assert_eq!(from_pika.decode().unwrap(), Value::map([("n", Value::Int(1))]));
    /// let text = Message::from_bytes(b"hello".to_vec(), Headers::new(), "text/plain");
    /// assert_eq!(text.decode().unwrap(), Value::from("hello"));
    /// let java = Message::from_bytes(vec![0xac, 0xed], Headers::new(), "application/x-java-serialized-object");
    /// assert!(java.decode().is_err());
    /// ```
    pub fn decode(&self) -> Result<crate::Value> {
        let mut tape = crate::Tape::new();
        self.decode_onto(&mut tape)?;
        Ok(tape.value())
    }

    /// Decodes the body as [`Message::decode`] does, onto a reused tape
    /// ([`crate::Codec::decode_onto`]).
    pub fn decode_onto(&self, tape: &mut crate::Tape) -> Result<()> {
        let reading = Reading::of(&self.content_type).ok_or_else(|| {
            Error::invalid(format!(
                "message {} has content type {:?}, which no codec reads",
                self.id, self.content_type
            ))
        })?;
        reading.decode_onto(&self.body, tape)
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), saying how long it
/// was when it had to be cut.
///
/// ```
/// assert_eq!(queue_core::truncate("short", 10), "short");
/// assert!(queue_core::truncate(&"x".repeat(100), 40).ends_with("(truncated from 100 bytes)"));
/// ```
pub fn truncate(text: &str, max: usize) -> String {
    truncate_bytes(text.as_bytes(), max)
}

/// [`truncate`] for bytes that need not be UTF-8 (what is not reads as U+FFFD), reading
/// no more of them than it keeps: a long input is never copied whole.
///
/// ```
/// assert_eq!(queue_core::truncate_bytes(b"caf\xc3\xa9", 10), "café");
/// let cut = queue_core::truncate_bytes(&[b'x'; 100], 40);
/// assert!(cut.len() <= 40 && cut.ends_with("(truncated from 100 bytes)"));
/// ```
pub fn truncate_bytes(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        let text = String::from_utf8_lossy(bytes);
        if text.len() <= max {
            return text.into_owned();
        }
        // Invalid bytes read as U+FFFD (three bytes each) made it longer: cut that.
        return truncate_bytes(text.as_bytes(), max);
    }
    let note = format!("... (truncated from {} bytes)", bytes.len());
    let budget = max.saturating_sub(note.len());
    let mut kept = &bytes[..budget];
    // A character the cut split in two is left out, not shown as U+FFFD.
    if let Err(e) = std::str::from_utf8(kept)
        && e.error_len().is_none()
    {
        kept = &kept[..e.valid_up_to()];
    }
    let text = String::from_utf8_lossy(kept);
    let mut end = text.len().min(budget);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

/// A new unique message id (UUID v7: time-ordered to the millisecond, and in the
/// order a thread made them).
///
/// ```
/// let (a, b) = (queue_core::new_message_id(), queue_core::new_message_id());
/// assert!(a < b);
/// ```
pub fn new_message_id() -> String {
    // One context per thread: `Uuid::now_v7` orders every id of the process under
    // one lock, which every publishing thread took in turn.
    thread_local! {
        static CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    let id = CONTEXT.with(|context| uuid::Uuid::new_v7(uuid::Timestamp::now(context)));
    id.hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn times_past_what_amqp_carries_are_refused_at_publish_and_dropped_from_copies() {
        for (key, value) in [
            (names::TTL, HeaderValue::Int(5_000_000_000)),
            (names::EXPIRATION, HeaderValue::from("4294967296")),
            (names::DELAY, HeaderValue::Int(i64::MAX)),
        ] {
            let headers = Headers::from_pairs([(key, value.clone())]);
            let err = headers.validate_for_publish().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{key}: {err}");
            assert!(err.message().contains("4294967295"), "{err}");
            let mut copy = Message::from_bytes(b"1".to_vec(), headers, "application/json");
            copy.make_republishable();
            assert!(!copy.headers.contains(key), "{key} kept on a copy");
        }
        let longest = Headers::from_pairs([(names::TTL, HeaderValue::Int(4_294_967_295))]);
        assert_eq!(
            longest.ttl().unwrap(),
            Some(Duration::from_millis(MAX_MILLIS))
        );
    }

    /// A time to live of 0 expired unseen on the memory driver even with a consumer
    /// waiting, and each broker reads it its own way: it is refused at publish, and a
    /// copy of a message another client sent with it lives on without it.
    #[test]
    fn a_time_to_live_of_0_is_refused_at_publish_and_dropped_from_copies() {
        for (key, value) in [
            (names::TTL, HeaderValue::Int(0)),
            (names::EXPIRATION, HeaderValue::from("0")),
            (names::EXPIRATION, HeaderValue::Float(0.0)),
        ] {
            let headers = Headers::from_pairs([(key, value.clone())]);
            let err = headers.validate_for_publish().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{key}: {err}");
            assert!(err.message().contains("from 1 to"), "{err}");
            let mut copy = Message::from_bytes(b"1".to_vec(), headers, "application/json");
            copy.make_republishable();
            assert!(!copy.headers.contains(key), "{key} kept on a copy");
        }
        let no_delay = Headers::from_pairs([(names::DELAY, HeaderValue::Int(0))]);
        no_delay.validate_for_publish().unwrap();
        let shortest = Headers::from_pairs([(names::TTL, HeaderValue::Int(1))]);
        assert_eq!(shortest.ttl().unwrap(), Some(Duration::from_millis(1)));
    }

    #[test]
    fn whole_floats_are_the_integers_they_are_others_are_refused() {
        let headers = Headers::from_pairs([
            (names::DELAY, HeaderValue::Float(800.0)),
            (names::TTL, HeaderValue::Float(1e3)),
            (names::PRIORITY, HeaderValue::Float(5.0)),
        ]);
        headers.validate_for_publish().unwrap();
        assert_eq!(headers.delay().unwrap(), Some(Duration::from_millis(800)));
        assert_eq!(headers.ttl().unwrap(), Some(Duration::from_millis(1000)));
        assert_eq!(headers.priority_level().unwrap(), Some(5));
        for (key, bad) in [
            (names::DELAY, 0.5),
            (names::DELAY, f64::NAN),
            (names::DELAY, f64::INFINITY),
            (names::DELAY, -1.0),
            (names::DELAY, 1e300),
            (names::PRIORITY, 9.5),
            (names::PRIORITY, 10.0),
        ] {
            let headers = Headers::from_pairs([(key, HeaderValue::Float(bad))]);
            let err = headers.validate_for_publish().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{key}={bad}");
        }
    }

    #[test]
    fn priority_words_and_numbers() {
        for (v, n) in [("low", 2), ("normal", 5), ("high", 8), ("7", 7)] {
            assert_eq!(parse_priority(&v.into()).unwrap(), n);
        }
        assert_eq!(parse_priority(&HeaderValue::Int(0)).unwrap(), 0);
        for bad in [
            HeaderValue::Int(10),
            HeaderValue::Int(-1),
            "urgent".into(),
            HeaderValue::Bool(true),
        ] {
            assert_eq!(parse_priority(&bad).unwrap_err().kind(), ErrorKind::Invalid);
        }
    }

    /// A Lua user or the CLI's caller reads these: Rust's `String("urgent")` and
    /// `Some(String("soon"))` named nothing they wrote (outsider attack).
    #[test]
    fn a_bad_header_value_is_shown_as_it_was_given() {
        let said = |key: &str, value: HeaderValue| {
            let headers = Headers::from_pairs([(key, value)]);
            headers.validate_for_publish().unwrap_err().to_string()
        };
        let priority = said("priority", "urgent".into());
        assert!(priority.ends_with(r#"got "urgent""#), "{priority}");
        let expiration = said("expiration", "soon".into());
        assert!(expiration.ends_with(r#"got "soon""#), "{expiration}");
        let delay = said("delay", HeaderValue::Float(1.5));
        assert!(delay.ends_with("got 1.5"), "{delay}");
        let long = said("ttl", "x".repeat(1000).into());
        assert!(
            long.ends_with(&format!(r#"got "{}"..."#, "x".repeat(32))),
            "{long}"
        );
    }

    #[test]
    fn reserved_headers_are_refused_by_name() {
        for key in ["attempts", "x_original_queue", "x_anything"] {
            let h = Headers::from_pairs([(key, HeaderValue::Int(1))]);
            let err = h.validate_for_publish().unwrap_err();
            assert!(err.message().contains(key), "{err}");
        }
        let ok =
            Headers::from_pairs([("priority", "high".into()), ("delay", HeaderValue::Int(10))]);
        ok.validate_for_publish().unwrap();
        let bad_delay = Headers::from_pairs([("delay", HeaderValue::Int(-5))]);
        assert!(
            bad_delay
                .validate_for_publish()
                .unwrap_err()
                .message()
                .contains("delay")
        );
    }

    #[test]
    fn headers_past_the_size_limit_or_with_long_names_are_refused() {
        let big = Headers::from_pairs([("note", HeaderValue::from("x".repeat(MAX_HEADER_BYTES)))]);
        let err = big.validate_for_publish().unwrap_err();
        assert!(err.message().contains("more than the 49152"), "{err}");
        let long = "k".repeat(300);
        let named = Headers::from_pairs([(long.as_str(), HeaderValue::Int(1))]);
        let err = named.validate_for_publish().unwrap_err();
        assert!(err.message().contains("longer than 255"), "{err}");
        assert!(err.message().len() < 200, "the name is echoed whole: {err}");
        // Thousands of tiny headers fit the bytes, not Redis's scripts, which unpack a
        // message's fields (about 8,000 at most): a retry copy failed for ever.
        let many = Headers::from_pairs(
            (0..=MAX_PUBLISHED_HEADERS).map(|n| (format!("h{n}"), HeaderValue::Bool(true))),
        );
        let err = many.validate_for_publish().unwrap_err();
        assert!(err.message().contains("1024 headers"), "{err}");
        let enough = Headers::from_pairs(
            (1..=MAX_PUBLISHED_HEADERS).map(|n| (format!("h{n}"), HeaderValue::Bool(true))),
        );
        enough.validate_for_publish().unwrap();
    }

    #[test]
    fn a_content_type_no_amqp_091_broker_carries_is_shortened_to_its_base_type() {
        let long = format!("text/plain; x={}", "p".repeat(300));
        let mut message = Message::from_bytes(b"{}".to_vec(), Headers::new(), &long);
        let dropped = message.make_republishable();
        assert_eq!(message.content_type, "text/plain");
        assert!(dropped[0].contains("content type"), "{dropped:?}");
        // A base type too long itself: one read the same way.
        for (long, short) in [
            (
                format!("application/{}+json", "v".repeat(300)),
                "application/json",
            ),
            (format!("text/{}", "t".repeat(300)), "text/plain"),
            (
                format!("; x={}", "p".repeat(300)),
                "application/octet-stream",
            ),
            (
                format!("image/{}", "p".repeat(300)),
                "application/x-unreadable",
            ),
        ] {
            let mut message = Message::from_bytes(b"{}".to_vec(), Headers::new(), &long);
            message.make_republishable();
            assert_eq!(message.content_type, short);
            assert_eq!(
                crate::reading::Reading::of(short).map(|r| std::mem::discriminant(&r)),
                crate::reading::Reading::of(&long).map(|r| std::mem::discriminant(&r))
            );
        }
        let mut fine = Message::from_bytes(
            b"{}".to_vec(),
            Headers::new(),
            "application/json; charset=utf-8",
        );
        assert!(fine.make_republishable().is_empty());
        assert_eq!(fine.content_type, "application/json; charset=utf-8");
    }

    #[test]
    fn outside_headers_no_driver_accepts_are_dropped_with_why() {
        let headers = Headers::from_pairs([
            ("priority", HeaderValue::Int(200)),
            ("expiration", HeaderValue::from("soon")),
            ("delay", HeaderValue::Int(-1)),
            ("message_id", HeaderValue::Int(5)),
            ("", HeaderValue::Int(1)),
            ("huge", HeaderValue::from("y".repeat(MAX_HEADER_BYTES))),
            ("keep", HeaderValue::from("me")),
            ("ttl", HeaderValue::Int(500)),
        ]);
        let mut message = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
        message.id = "i".repeat(1000);
        let dropped = message.make_republishable();
        assert_eq!(dropped.len(), 7, "{dropped:#?}");
        assert_eq!(
            message
                .headers
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            vec!["keep", "ttl", "x_original_message_id"]
        );
        assert_eq!(message.id.len(), 36);
        message.headers.validate_for_publish().unwrap_err(); // x_ is reserved for publishers
        assert!(message.headers.byte_size() <= MAX_HEADER_BYTES);
        // What is already fine is left alone.
        let mut fine = Message::from_bytes(
            vec![],
            Headers::from_pairs([("priority", "high".into())]),
            "application/json",
        );
        assert!(fine.make_republishable().is_empty());
    }

    /// Found by the `outside_message` fuzz target: another client's 112 KB
    /// `x_dead_letter_reason` made every retry copy too large to publish.
    #[test]
    fn an_outside_x_header_past_the_size_limit_is_dropped_too() {
        let headers = Headers::from_pairs([
            (
                "x_dead_letter_reason",
                HeaderValue::from("v".repeat(112_800)),
            ),
            ("x_original_queue", HeaderValue::from("app:q")),
            ("ttl", HeaderValue::Int(500)),
        ]);
        let mut message = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
        let dropped = message.make_republishable();
        assert_eq!(dropped.len(), 1, "{dropped:#?}");
        assert!(
            dropped[0].starts_with("\"x_dead_letter_reason\"="),
            "{dropped:#?}"
        );
        assert!(message.headers.byte_size() <= MAX_HEADER_BYTES);
        assert!(message.headers.contains("x_original_queue"));
    }

    /// A copy that drops a header keeps the note the message came with, first.
    #[test]
    fn an_earlier_note_leads_a_copys_note() {
        let headers = Headers::from_pairs([
            ("priority", HeaderValue::from("urgent")),
            (
                names::X_DROPPED_HEADERS,
                HeaderValue::from("big (200000 bytes): too large for a frame"),
            ),
        ]);
        let mut message = Message::from_bytes(b"1".to_vec(), headers, "application/json");
        let note = message
            .make_republishable_noting()
            .expect("priority dropped");
        assert!(
            note.starts_with("big (200000 bytes): too large for a frame; \"priority\"="),
            "{note}"
        );
        assert_eq!(
            message.headers.get(names::X_DROPPED_HEADERS),
            Some(&HeaderValue::from(note.as_str()))
        );
    }

    /// Every header the failure path (`retry.rs`) writes on a copy after
    /// `make_republishable`, each as large as it can be.
    fn with_the_runtimes_records(mut message: Message) -> Message {
        let reason = "r".repeat(crate::retry::MAX_REASON_BYTES);
        let headers = &mut message.headers;
        headers.insert(names::X_DROPPED_HEADERS, reason.clone());
        headers.insert(names::X_DEAD_LETTER_REASON, reason);
        headers.insert(names::X_ORIGINAL_QUEUE, "q".repeat(crate::QueueId::MAX_LEN));
        headers.insert(names::X_DEAD_LETTER_TIME, "2026-12-05T07:30:00Z");
        headers.insert(names::X_ORIGINAL_ATTEMPTS, HeaderValue::Int(10));
        headers.insert(names::X_ORIGINAL_EXPIRATION, HeaderValue::Int(60_000));
        headers.insert(names::ATTEMPTS, HeaderValue::Int(2));
        headers.insert(names::DELAY, HeaderValue::Int(1000));
        message
    }

    /// Found by the `outside_message` fuzz target: a copy kept another client's headers
    /// up to the wire limit, and the runtime's own headers then took it past it; and
    /// outside `x_` headers under 4 KiB were kept as if the runtime had written them.
    #[test]
    fn a_copy_keeps_room_for_the_runtimes_own_headers() {
        let crowded = [
            Headers::from_pairs([
                (
                    "correlation_id",
                    HeaderValue::from("v".repeat(MAX_HEADER_BYTES - 200)),
                ),
                ("priority", HeaderValue::from("urgent")),
            ]),
            // Names the runtime does not write, each under the reason's limit.
            Headers::from_pairs((0..40).map(|i| {
                (
                    format!("x_from_outside_{i}"),
                    HeaderValue::from("w".repeat(4000)),
                )
            })),
            // Many small headers, whose encoding takes more than their bytes.
            Headers::from_pairs((0..16_384).map(|i| (format!("{i:04x}"), HeaderValue::from("")))),
        ];
        for headers in crowded {
            let mut message = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
            message.id = String::new();
            assert!(!message.make_republishable().is_empty());
            assert!(message.headers.contains(names::X_ORIGINAL_MESSAGE_ID));
            let mut copy = with_the_runtimes_records(message);
            let size = copy.headers.byte_size();
            assert!(size <= MAX_HEADER_BYTES, "{size} bytes");
            // Failing again in its dead-letter queue, it keeps all it has.
            assert_eq!(copy.make_republishable(), Vec::<String>::new());
        }
    }

    /// What a publisher may send, with what publishing and then a dead letter add,
    /// loses nothing and stays within the wire limit; the encoding of many small
    /// headers counts against the publisher's limit.
    #[test]
    fn a_published_message_at_its_limit_keeps_every_header_on_a_copy() {
        let overhead = Headers::from_pairs([("note", HeaderValue::from(""))]).byte_size();
        let mut published = Headers::from_pairs([(
            "note",
            HeaderValue::from("p".repeat(MAX_PUBLISHED_HEADER_BYTES - overhead)),
        )]);
        published.validate_for_publish().unwrap();
        published.insert(names::TIMESTAMP, HeaderValue::Int(1));
        published.insert("traceparent", HeaderValue::from("t".repeat(55)));
        published.insert("tracestate", HeaderValue::from("s".repeat(512)));
        let mut message = Message::from_bytes(b"{}".to_vec(), published, "application/json");
        assert_eq!(message.make_republishable(), Vec::<String>::new());
        let copy = with_the_runtimes_records(message);
        assert!(copy.headers.byte_size() <= MAX_HEADER_BYTES);

        // 1,024 headers of 44 bytes each: 45,056 bytes of names and values, past the
        // limit only with the 8 bytes of each header's encoding.
        let small = Headers::from_pairs(
            (0..MAX_PUBLISHED_HEADERS)
                .map(|i| (format!("{i:04x}"), HeaderValue::from("v".repeat(40)))),
        );
        let err = small.validate_for_publish().unwrap_err();
        assert!(err.message().contains("more than the 49152"), "{err}");
        // A message id a driver cannot carry is refused on publish, not dropped later.
        let long_id = Headers::from_pairs([("message_id", HeaderValue::from("i".repeat(300)))]);
        assert!(long_id.validate_for_publish().is_err());
    }

    proptest::proptest! {
        /// Bytes are cut as their text would be: within the bound, saying how long
        /// they were, and a valid text that fits comes out as it went in.
        #[test]
        fn bytes_are_cut_within_the_bound(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            max in 40usize..200,
        ) {
            let cut = truncate_bytes(&bytes, max);
            proptest::prop_assert!(cut.len() <= max, "{} bytes: {cut:?}", cut.len());
            if bytes.len() > max {
                let note = format!("(truncated from {} bytes)", bytes.len());
                proptest::prop_assert!(cut.ends_with(&note), "{cut:?}");
            } else if let Ok(text) = std::str::from_utf8(&bytes) {
                proptest::prop_assert_eq!(&cut, text);
            }
        }
    }

    #[test]
    fn bytes_cut_inside_a_character_leave_it_out() {
        let cut = truncate_bytes("é".repeat(100).as_bytes(), 61);
        assert!(!cut.contains('\u{fffd}'), "{cut}");
        assert!(cut.starts_with("éé"), "{cut}");
        assert_eq!(truncate_bytes(b"a\xffb", 10), "a\u{fffd}b");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        let text = "é".repeat(100);
        let cut = truncate(&text, 60);
        assert!(cut.len() <= 60, "{cut}");
        assert!(cut.contains("truncated from 200 bytes"), "{cut}");
    }

    #[test]
    fn attempts_default_to_one() {
        assert_eq!(Headers::new().attempts(), 1);
        let h = Headers::from_pairs([("attempts", HeaderValue::Int(3))]);
        assert_eq!(h.attempts(), 3);
    }

    #[test]
    fn message_id_header_wins() {
        let h = Headers::from_pairs([("message_id", "mine".into())]);
        let m = Message::from_bytes(vec![], h, "application/json");
        assert_eq!(m.id, "mine");
        let a = Message::from_bytes(vec![], Headers::new(), "application/json");
        let b = Message::from_bytes(vec![], Headers::new(), "application/json");
        assert_ne!(a.id, b.id);
    }
}
