//! Headers <-> AMQP 0-9-1 properties and header table (docs/core-model.md).
//!
//! The scheme, in one sentence: a well-known header goes into its native property
//! when the property carries the value exactly, and into the header table otherwise;
//! every other header goes into the header table with its type.
//!
//! | header | property | header table |
//! |---|---|---|
//! | (the message id) | `message_id` | `message_id` too, only if the publisher set it |
//! | `correlation_id`, `reply_to` (strings) | same name | only if not a string (or > 255 bytes) |
//! | `message_type` (string) | `type` | only if not a string |
//! | `priority` | `priority` (0..9) | only if it is not an integer (`"high"`) |
//! | `expiration` / `ttl` | `expiration` (ms) | always (keeps which name and type was used) |
//! | `timestamp` (integer >= 0) | `timestamp` | only if not a non-negative integer |
//! | `attempts` | — | always, as a long (`l`, i64) |
//! | `content_type` | — | always, as a plain header |
//! | `app_id` (string) | `app_id` | only if not a string (or > 255 bytes) |
//! | `user_id` | — | always (RabbitMQ refuses a `user_id` property other than the publishing connection's user) |
//!
//! The wire `content_type` property is always the codec's ([`Message::content_type`]);
//! a publisher's own `content_type` header lives only in the header table under its
//! own name, and the property is never turned into a header, so they cannot collide.
//!
//! Reading back, the header table wins, but over `user_id`, which the broker checked,
//! and where its entry is one no copy can carry (`priority: "urgent"` beside a
//! `priority` property): the entry is then named in [`names::X_DROPPED_HEADERS`];
//! a property whose header is absent (a message from another client) becomes that
//! header. Table values that are not scalars
//! (RabbitMQ's `x-death`, arrays, nested tables, byte arrays) and RabbitMQ's
//! dead-lettering bookkeeping (`x-first-death-*`, `x-last-death-*`) are not shown;
//! a table value of another client's that is not shown, so that no copy of the
//! message carries it, is named in [`names::X_DROPPED_HEADERS`] as the message arrives.
//!
//! [`X_DELIVERY_COUNT`] is the broker's, read-only: RabbitMQ's `x-delivery-count`
//! (set by quorum queues on redeliveries) becomes it on the way in, on a redelivery
//! only, and on the way out it is never sent, so a copy the runtime republishes (a
//! retry) does not carry the original's count. Another client can still set the
//! header itself; on a first delivery it is ignored (on a classic queue's redelivery
//! it would be read). A long string that is not UTF-8 (binary) is not shown either.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use queue_core::{Error, HeaderValue, Headers, Message, Result, names, new_message_id};

/// The header a consumer finds the broker's delivery count in (absent on a first
/// delivery and on classic queues).
pub use queue_core::names::X_DELIVERY_COUNT;

/// RabbitMQ's name for it.
const BROKER_DELIVERY_COUNT: &str = "x-delivery-count";

/// The header of the `app_id` property (the publishing application).
const APP_ID: &str = "app_id";

/// The header of the `user_id` property (the user the broker checked it against).
const USER_ID: &str = "user_id";

/// RabbitMQ's own headers: `CC` and `BCC` route a message to more queues, and the
/// broker closes the channel of a publish whose value is not a list of queue names.
pub(crate) const RESERVED_HEADERS: &[&str] = &["CC", "BCC"];

/// `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

/// Builds the AMQP properties of a message. `expiration_override` replaces the
/// per-message TTL (the delay hop uses `delay + ttl` so a message never leaves its
/// delay queue early).
pub(crate) fn to_properties(
    message: &Message,
    expiration_override: Option<u64>,
) -> Result<BasicProperties> {
    let headers = &message.headers;
    let mut table = FieldTable::default();
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(short("content type", &message.content_type)?)
        .with_message_id(short("message id", &message.id)?);

    for (key, value) in headers.iter() {
        let in_table = match key.as_str() {
            X_DELIVERY_COUNT => false,
            routing if RESERVED_HEADERS.contains(&routing) => {
                return Err(Error::invalid(format!(
                    "header {routing:?} is RabbitMQ's own: it routes the message to more queues, and the broker closes the channel of a publish whose value is not a list of queue names; name the header otherwise"
                )));
            }
            names::CORRELATION_ID
            | names::REPLY_TO
            | names::MESSAGE_TYPE
            | names::CONTENT_ENCODING
            | APP_ID => match value.as_str().and_then(|s| ShortString::try_new(s).ok()) {
                Some(s) => {
                    props = match key.as_str() {
                        names::CORRELATION_ID => props.with_correlation_id(s),
                        names::REPLY_TO => props.with_reply_to(s),
                        names::CONTENT_ENCODING => props.with_content_encoding(s),
                        APP_ID => props.with_app_id(s),
                        _ => props.with_type(s),
                    };
                    false
                }
                None => true,
            },
            names::PRIORITY => !matches!(value, HeaderValue::Int(_)),
            names::TIMESTAMP => match value {
                HeaderValue::Int(t) if *t >= 0 => {
                    props = props.with_timestamp(*t as u64);
                    false
                }
                _ => true,
            },
            // `delay` is the driver's business; it is kept so a consumer sees it.
            _ => true,
        };
        if in_table {
            table.insert(short("header name", key)?, to_amqp(value));
        }
    }
    if let Some(level) = headers.priority_level()? {
        props = props.with_priority(level);
    }
    let ttl = match expiration_override {
        Some(ms) => Some(ms),
        None => headers.ttl()?.map(|d| d.as_millis() as u64),
    };
    if let Some(ms) = ttl {
        props = props.with_expiration(short("expiration", &ms.to_string())?);
    }
    Ok(props.with_headers(table))
}

fn short(what: &str, s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| {
        Error::invalid(format!(
            "{what} {:?}... is longer than AMQP's 255 bytes",
            s.chars().take(32).collect::<String>()
        ))
    })
}

fn to_amqp(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Float(x) => AMQPValue::Double(*x),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
    }
}

/// A scalar table value as a header value; `None` for what handlers never see.
fn from_amqp(value: &AMQPValue) -> Option<HeaderValue> {
    Some(match value {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Timestamp(t) => HeaderValue::Int(i64::try_from(*t).ok()?),
        AMQPValue::Float(x) => HeaderValue::Float(f64::from(*x)),
        AMQPValue::Double(x) => HeaderValue::Float(*x),
        // Signed on the wire (AMQP 0-9-1's decimal: a scale and a signed 32-bit value,
        // as pika and the Java client write it); amq-protocol holds it as a `u32`.
        AMQPValue::DecimalValue(d) => {
            HeaderValue::Float(f64::from(d.value.cast_signed()) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => HeaderValue::String(s.as_str().to_string()),
        // Binary (a .NET `byte[]`, an HMAC): not shown, as byte arrays are not, rather
        // than changed into other text.
        AMQPValue::LongString(s) => {
            HeaderValue::String(std::str::from_utf8(s.as_bytes()).ok()?.to_string())
        }
        AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => return None,
    })
}

/// What kind of table value `value` is, to name one a handler is not shown.
fn unshown_kind(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::FieldTable(_) => "a nested table",
        AMQPValue::FieldArray(_) => "an array",
        AMQPValue::ByteArray(_) => "a byte array",
        AMQPValue::Void => "void",
        AMQPValue::Timestamp(_) => "a timestamp past 64 bits signed",
        _ => "binary, not UTF-8",
    }
}

/// Broker bookkeeping a handler never sees, even when scalar.
fn is_broker_internal(key: &str) -> bool {
    key == BROKER_DELIVERY_COUNT || is_dead_letter_bookkeeping(key)
}

/// What RabbitMQ adds to a message it dead-letters (through a delay queue, too).
pub(crate) fn is_dead_letter_bookkeeping(key: &str) -> bool {
    key == "x-death" || key.starts_with("x-first-death-") || key.starts_with("x-last-death-")
}

/// Rebuilds a message from a delivery's properties and body; `counted_by_broker` says
/// whether its `x-delivery-count` is the broker's: only on a redelivery from a quorum
/// queue (a classic queue counts nothing, and a first delivery's count can only be a
/// publisher's).
pub(crate) fn from_delivery(
    props: &BasicProperties,
    body: Vec<u8>,
    counted_by_broker: bool,
) -> Message {
    let mut headers = Headers::new();
    // Named in `x_dropped_headers`: no copy of the message carries them.
    let mut unshown = Vec::new();
    if let Some(table) = props.headers() {
        for (key, value) in table.inner() {
            if is_broker_internal(key.as_str()) || key.as_str() == X_DELIVERY_COUNT {
                continue;
            }
            match from_amqp(value) {
                Some(v) => {
                    headers.insert(key.as_str(), v);
                }
                None => unshown.push(format!("{} ({})", key.as_str(), unshown_kind(value))),
            }
        }
        // Another client can set `x-delivery-count` like any header, and trusting it
        // would have the crash-loop guard dead-letter the message before its handler
        // ran: read only where the broker writes it.
        let count = table
            .inner()
            .get(BROKER_DELIVERY_COUNT)
            .filter(|_| counted_by_broker)
            .and_then(from_amqp)
            .filter(|v| matches!(v, HeaderValue::Int(_)));
        if let Some(count) = count {
            headers.insert(X_DELIVERY_COUNT, count);
        }
    }
    // A table entry no copy can carry (`priority: "urgent"`, `ttl: "soon"`) must not
    // hide the property it shadows: every retry copy lost both (review). Removes
    // `key`'s entry, saying what it was.
    let unusable = |headers: &mut Headers, key: &str| {
        headers.remove(key).map(|claimed| {
            format!(
                "{key} {} (the header table's, which no copy can carry",
                claimed.shown()
            )
        })
    };
    if let Some(priority) = props.priority()
        && headers.priority_level().is_err()
        && let Some(entry) = unusable(&mut headers, names::PRIORITY)
    {
        unshown.push(format!("{entry}; the priority {priority} property stands)"));
    }
    let expiration = props
        .expiration()
        .as_ref()
        .filter(|e| e.as_str().parse::<u64>().is_ok());
    if let Some(expiration) = expiration
        && headers.ttl().is_err()
    {
        let mut removed = Vec::new();
        for key in [names::EXPIRATION, names::TTL] {
            let alone = headers
                .get(key)
                .map(|v| Headers::from_pairs([(key, v.clone())]));
            if alone.is_some_and(|alone| alone.ttl().is_err()) {
                removed.extend(unusable(&mut headers, key));
            }
        }
        // A usable entry of the other name stands, or else the property does.
        let stands = match [names::EXPIRATION, names::TTL]
            .into_iter()
            .find(|key| headers.contains(key))
        {
            Some(key) => format!("its {key} stands"),
            None => format!("the expiration {expiration} property stands"),
        };
        unshown.extend(
            removed
                .into_iter()
                .map(|entry| format!("{entry}; {stands})")),
        );
    }
    let mut fill = |key: &str, value: Option<HeaderValue>| {
        if let Some(v) = value
            && !headers.contains(key)
        {
            headers.insert(key, v);
        }
    };
    let string = |s: &Option<ShortString>| s.as_ref().map(|s| HeaderValue::from(s.as_str()));
    fill(names::CORRELATION_ID, string(props.correlation_id()));
    fill(names::REPLY_TO, string(props.reply_to()));
    fill(names::MESSAGE_TYPE, string(props.kind()));
    fill(names::CONTENT_ENCODING, string(props.content_encoding()));
    fill(APP_ID, string(props.app_id()));
    fill(
        names::PRIORITY,
        props.priority().map(|p| HeaderValue::Int(i64::from(p))),
    );
    fill(
        names::TIMESTAMP,
        props
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .map(HeaderValue::Int),
    );
    if let Some(t) = props.timestamp().filter(|t| i64::try_from(*t).is_err())
        && !headers.contains(names::TIMESTAMP)
    {
        unshown.push(format!("timestamp property {t} (past 64 bits signed)"));
    }
    // The broker checks the `user_id` property against the publishing connection's
    // user; a header table entry of that name is the publisher's own word, and must
    // not hide it (review: a forged `user_id: admin` hid the checked `guest`).
    if let Some(user) = props.user_id() {
        let checked = HeaderValue::from(user.as_str());
        if let Some(claimed) = headers.insert(USER_ID, checked.clone())
            && claimed != checked
        {
            unshown.push(format!(
                "user_id {} (the header table's, not the broker-checked user_id property)",
                claimed.shown()
            ));
        }
    }
    let ms = props
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<i64>().ok());
    if let Some(ms) = ms
        && !headers.contains(names::EXPIRATION)
        && !headers.contains(names::TTL)
    {
        headers.insert(names::EXPIRATION, HeaderValue::Int(ms));
    }
    if !unshown.is_empty() {
        headers.note_dropped(&format!(
            "{}: AMQP 0-9-1 table values a handler is not shown, and no copy of the message carries",
            unshown.join(", ")
        ));
    }
    let id = props
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(new_message_id);
    let content_type = props
        .content_type()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_default();
    Message {
        id,
        headers,
        content_type,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(headers: Headers) -> (Message, BasicProperties) {
        let sent = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
        let props = to_properties(&sent, None).unwrap();
        (from_delivery(&props, sent.body.clone(), false), props)
    }

    /// RabbitMQ reads `CC` and `BCC` as more routing keys and closes the channel of a
    /// publish whose value is not an array: every publish in flight on the shared
    /// channel failed with it, retryably, and the one that carried it failed so at
    /// every try (review). Refused before the wire, saying why; the capabilities name
    /// them, so the runtime's copies of another client's message leave them out.
    #[test]
    fn cc_and_bcc_headers_are_refused_before_the_broker_sees_them() {
        assert_eq!(crate::CAPABILITIES.reserved_headers, ["CC", "BCC"]);
        for &name in crate::CAPABILITIES.reserved_headers {
            let headers = Headers::from_pairs([(name, HeaderValue::from("bob@example.com"))]);
            let sent = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
            let err = to_properties(&sent, None).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
            assert!(!err.retryable(), "{err}");
            assert!(err.message().contains(name), "{err}");
        }
        let lower = Headers::from_pairs([("cc", HeaderValue::from("bob@example.com"))]);
        let sent = Message::from_bytes(b"{}".to_vec(), lower, "application/json");
        to_properties(&sent, None).unwrap();
    }

    /// A body another client compressed (`content_encoding: gzip`) reached handlers
    /// as bytes with nothing to say so, and its retry and dead-letter copies lost the
    /// marker for good (review).
    #[test]
    fn content_encoding_is_a_header_carried_in_its_property() {
        let headers = Headers::from_pairs([("content_encoding", HeaderValue::from("gzip"))]);
        let (back, props) = round_trip(headers.clone());
        assert_eq!(
            props.content_encoding().as_ref().map(|s| s.as_str()),
            Some("gzip")
        );
        assert!(
            props
                .headers()
                .as_ref()
                .is_none_or(|t| !t.contains_key("content_encoding"))
        );
        assert_eq!(back.headers, headers);
        let from_pika = BasicProperties::default().with_content_encoding("gzip".into());
        assert_eq!(
            from_delivery(&from_pika, vec![], false).headers,
            Headers::from_pairs([("content_encoding", HeaderValue::from("gzip"))])
        );
    }

    #[test]
    fn well_known_headers_read_back_exactly() {
        let headers = Headers::from_pairs([
            ("correlation_id", HeaderValue::from("req-17")),
            ("reply_to", HeaderValue::from("app:replies")),
            ("content_type", HeaderValue::from("text/x-mine")),
            ("message_type", HeaderValue::from("order_shipped")),
            ("priority", HeaderValue::from("high")),
            ("timestamp", HeaderValue::Int(1_700_000_000)),
            ("attempts", HeaderValue::Int(3)),
            ("ttl", HeaderValue::Int(60_000)),
            ("ratio", HeaderValue::Float(0.25)),
            ("flag", HeaderValue::Bool(false)),
        ]);
        let (got, props) = round_trip(headers.clone());
        assert_eq!(got.headers, headers);
        assert_eq!(got.content_type, "application/json");
        assert_eq!(*props.priority(), Some(8));
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "order_shipped");
        assert_eq!(props.expiration().as_ref().unwrap().as_str(), "60000");
        let table = props.headers().as_ref().unwrap();
        assert!(!table.contains_key("correlation_id"), "carried natively");
        assert!(matches!(
            table.inner().get("attempts"),
            Some(AMQPValue::LongLongInt(3))
        ));
    }

    #[test]
    fn odd_typed_well_known_headers_survive_through_the_table() {
        let headers = Headers::from_pairs([
            ("correlation_id", HeaderValue::Int(17)),
            ("priority", HeaderValue::Int(4)),
            ("timestamp", HeaderValue::from("yesterday")),
            ("message_id", HeaderValue::from("mine")),
        ]);
        let (got, props) = round_trip(headers.clone());
        assert_eq!(got.headers, headers);
        assert_eq!(got.id, "mine");
        assert_eq!(*props.priority(), Some(4));
    }

    /// Another client may send no id, or an empty one: each such message gets an id of
    /// its own from the driver, never a shared or empty one.
    #[test]
    fn a_message_without_an_id_gets_a_unique_one() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..1000 {
            let props = match n % 2 {
                0 => BasicProperties::default(),
                _ => BasicProperties::default().with_message_id("".into()),
            };
            let got = from_delivery(&props, vec![], false);
            assert!(!got.id.is_empty());
            assert!(seen.insert(got.id.clone()), "id {} given twice", got.id);
        }
    }

    #[test]
    fn foreign_properties_become_headers_and_broker_tables_are_hidden() {
        let mut table = FieldTable::default();
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        table.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("q".into()),
        );
        table.insert("count".into(), AMQPValue::LongInt(7));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_correlation_id("c".into())
            .with_priority(3)
            .with_expiration("250".into());
        let got = from_delivery(&props, vec![], false);
        assert_eq!(
            got.headers,
            Headers::from_pairs([
                ("count", HeaderValue::Int(7)),
                ("correlation_id", HeaderValue::from("c")),
                ("priority", HeaderValue::Int(3)),
                ("expiration", HeaderValue::Int(250)),
            ])
        );
        assert!(!got.id.is_empty());
    }

    /// AMQP's decimal is a signed 32-bit value with a scale (pika and the Java client
    /// write `Decimal("-1.5")` so); amq-protocol holds it as a `u32`, and read as one
    /// -1.5 arrived as 429496728.1.
    #[test]
    fn a_negative_decimal_header_keeps_its_sign() {
        let mut table = FieldTable::default();
        let minus_one_and_a_half = lapin::types::DecimalValue {
            scale: 1,
            value: (-15i32).cast_unsigned(),
        };
        table.insert(
            "amount".into(),
            AMQPValue::DecimalValue(minus_one_and_a_half),
        );
        let props = BasicProperties::default().with_headers(table);
        let got = from_delivery(&props, vec![], false);
        assert_eq!(got.headers.get("amount"), Some(&HeaderValue::Float(-1.5)));
    }

    #[test]
    fn a_binary_long_string_is_not_shown_rather_than_changed() {
        let mut table = FieldTable::default();
        table.insert(
            "hmac".into(),
            AMQPValue::LongString(vec![0xff, 0x00, 0xfe].into()),
        );
        table.insert(
            "text".into(),
            AMQPValue::LongString(b"caf\xc3\xa9".to_vec().into()),
        );
        let got = from_delivery(
            &BasicProperties::default().with_headers(table),
            vec![],
            false,
        );
        assert_eq!(
            got.headers.get("text"),
            Some(&HeaderValue::from("caf\u{e9}"))
        );
        assert!(!got.headers.contains("hmac"));
    }

    /// Table values of another client's message that a handler is not shown (a nested
    /// table, an array, bytes, void, binary) are in none of its retry and dead-letter
    /// copies, and neither were its `app_id` and `user_id` properties: they went
    /// without a word (review). The message says what it lost in `x_dropped_headers`
    /// as it arrives, and the two properties are headers; the copy carries both, and
    /// reads back the same.
    #[test]
    fn what_a_handler_is_not_shown_is_named_and_app_and_user_ids_are_headers() {
        let mut table = FieldTable::default();
        table.insert("trace".into(), AMQPValue::FieldTable(FieldTable::default()));
        table.insert("tags".into(), AMQPValue::FieldArray(Default::default()));
        table.insert("raw".into(), AMQPValue::ByteArray(vec![1, 2].into()));
        table.insert("none".into(), AMQPValue::Void);
        table.insert("hmac".into(), AMQPValue::LongString(vec![0xff].into()));
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        table.insert("n".into(), AMQPValue::LongInt(1));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_app_id("billing".into())
            .with_user_id("guest".into());
        let got = from_delivery(&props, vec![], false);
        assert_eq!(got.headers.get("n"), Some(&HeaderValue::Int(1)));
        assert_eq!(got.headers.get(APP_ID), Some(&HeaderValue::from("billing")));
        assert_eq!(got.headers.get(USER_ID), Some(&HeaderValue::from("guest")));
        let note = got
            .headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str)
            .expect("the unshown values are named");
        for named in [
            "trace (a nested table)",
            "tags (an array)",
            "raw (a byte array)",
            "none (void)",
            "hmac (binary",
        ] {
            assert!(note.contains(named), "{named} in {note}");
        }
        assert!(!note.contains("x-death"), "{note}");

        let copy = to_properties(&got, None).unwrap();
        assert_eq!(copy.app_id().as_ref().map(|s| s.as_str()), Some("billing"));
        assert_eq!(copy.user_id(), &None, "RabbitMQ refuses another user's id");
        let again = from_delivery(&copy, vec![], false);
        assert_eq!(again.headers, got.headers, "the copy reads back the same");
    }

    /// RabbitMQ checks the `user_id` property against the publishing connection's
    /// user; a header table entry of that name is the publisher's own word. Read with
    /// "the table wins", a forged `user_id: admin` hid the checked `guest` (review).
    /// A `timestamp` property past i64 went without a word.
    #[test]
    fn the_broker_checked_user_id_wins_over_the_tables_and_a_huge_timestamp_is_named() {
        let mut table = FieldTable::default();
        table.insert(USER_ID.into(), AMQPValue::LongString("admin".into()));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_user_id("guest".into())
            .with_timestamp(u64::MAX);
        let got = from_delivery(&props, vec![], false);
        assert_eq!(got.headers.get(USER_ID), Some(&HeaderValue::from("guest")));
        assert_eq!(got.headers.get(names::TIMESTAMP), None);
        let note = got
            .headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str)
            .expect("the forged id and the timestamp are named");
        assert!(note.contains("\"admin\""), "{note}");
        assert!(note.contains(&u64::MAX.to_string()), "{note}");
        // Without the property, the table's entry is all there is.
        let mut table = FieldTable::default();
        table.insert(USER_ID.into(), AMQPValue::LongString("admin".into()));
        let got = from_delivery(
            &BasicProperties::default().with_headers(table),
            vec![],
            false,
        );
        assert_eq!(got.headers.get(USER_ID), Some(&HeaderValue::from("admin")));
        assert_eq!(got.headers.get(names::X_DROPPED_HEADERS), None);
    }

    /// Another client's `priority` and `expiration` properties, shadowed by table
    /// entries of those names that no copy can carry (`"urgent"`, `"soon"`): read with
    /// "the table wins", every retry copy lost the real priority and time to live with
    /// the entries it dropped (review). The properties stand; the entries are named.
    #[test]
    fn unusable_table_entries_do_not_hide_the_properties_they_shadow() {
        let mut table = FieldTable::default();
        table.insert(
            names::PRIORITY.into(),
            AMQPValue::LongString("urgent".into()),
        );
        table.insert(names::TTL.into(), AMQPValue::LongString("soon".into()));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_priority(7)
            .with_expiration("60000".into());
        let got = from_delivery(&props, vec![], false);
        assert_eq!(got.headers.get(names::PRIORITY), Some(&HeaderValue::Int(7)));
        assert_eq!(
            got.headers.ttl().unwrap(),
            Some(std::time::Duration::from_secs(60))
        );
        let note = got
            .headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str)
            .expect("the shadowing entries are named");
        assert!(
            note.contains("\"urgent\"") && note.contains("\"soon\""),
            "{note}"
        );
        let copy = to_properties(&got, None).unwrap();
        assert_eq!(copy.priority(), &Some(7));
        assert_eq!(
            copy.expiration().as_ref().map(|e| e.as_str()),
            Some("60000")
        );
        // Beside a usable `ttl`, the note says that one stands, not the property.
        let mut table = FieldTable::default();
        table.insert(
            names::EXPIRATION.into(),
            AMQPValue::LongString("soon".into()),
        );
        table.insert(names::TTL.into(), AMQPValue::LongInt(5000));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_expiration("60000".into());
        let got = from_delivery(&props, vec![], false);
        assert_eq!(got.headers.get(names::TTL), Some(&HeaderValue::Int(5000)));
        let note = got
            .headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str);
        let note = note.expect("the unusable entry is named");
        assert!(note.contains("its ttl stands"), "{note}");
        assert!(!note.contains("60000"), "{note}");
        // A usable entry still wins: this driver's own `"high"` reads back as it was.
        let mut table = FieldTable::default();
        table.insert(names::PRIORITY.into(), AMQPValue::LongString("high".into()));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_priority(8);
        let got = from_delivery(&props, vec![], false);
        assert_eq!(
            got.headers.get(names::PRIORITY),
            Some(&HeaderValue::from("high"))
        );
    }

    #[test]
    fn the_brokers_delivery_count_is_a_read_only_header() {
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        table.insert("x_delivery_count".into(), AMQPValue::LongLongInt(99));
        let props = BasicProperties::default().with_headers(table);
        // A first delivery's count is a publisher's, whatever it says.
        assert_eq!(from_delivery(&props, vec![], false).headers, Headers::new());
        let got = from_delivery(&props, vec![], true);
        assert_eq!(
            got.headers,
            Headers::from_pairs([(X_DELIVERY_COUNT, HeaderValue::Int(3))])
        );
        // A copy republished with the count does not carry it.
        let (again, props) = round_trip(got.headers.clone());
        assert!(!again.headers.contains(X_DELIVERY_COUNT));
        assert!(
            props
                .headers()
                .as_ref()
                .is_none_or(|t| t.inner().is_empty())
        );
    }

    #[test]
    fn over_long_names_are_invalid_not_a_panic() {
        let long = "k".repeat(300);
        let sent = Message::from_bytes(
            vec![],
            Headers::from_pairs([(long.as_str(), HeaderValue::Int(1))]),
            "application/json",
        );
        let err = to_properties(&sent, None).unwrap_err();
        assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
        // A long correlation id still travels, through the table.
        let (got, _) = round_trip(Headers::from_pairs([(
            "correlation_id",
            HeaderValue::from(long.as_str()),
        )]));
        assert_eq!(
            got.headers.get("correlation_id"),
            Some(&HeaderValue::from(long.as_str()))
        );
    }
}
