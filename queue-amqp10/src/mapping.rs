//! Headers and bodies <-> AMQP 1.0 message sections (docs/core-model.md).
//!
//! Sending:
//! - body: one `data` section with the codec's bytes (an `amqp-value` would reach
//!   other protocols as AMQP-encoded bytes, not the payload);
//! - `properties`: `message-id` = [`Message::id`], `content-type` = the codec's
//!   [`Message::content_type`], `correlation-id`, `reply-to`, `subject` (from
//!   `message_type`), `creation-time` (from `timestamp`);
//! - `header`: `durable` (the queue's durability), `priority` (numeric level of the
//!   `priority` header), `ttl` (from `expiration`/`ttl`);
//! - `application-properties`: every other header, and every well-known header whose
//!   native field would not give back exactly what was published (`priority = "high"`,
//!   `ttl`, `timestamp`, a publisher's own `content_type`, ...). Integers travel as
//!   `long`, so `attempts` is a long as the runtime wrote it;
//! - `message-annotations`: `x-opt-delivery-delay` for `delay` on the Artemis profile.
//!
//! Receiving reverses it: application-properties first, then native fields for
//! well-known headers that are not there (messages from other publishers): the
//! header's `ttl` becomes `expiration`. Bodies are read by [`crate::body`], which
//! refuses none.

use std::time::Duration;

use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Header, Message as AmqpMessage, MessageAnnotations,
    MessageId, Priority, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use queue_core::{Error, HeaderValue, Headers, Message, Result, names};

use crate::Profile;
use crate::raw_value::RawValue;

/// What a sender link carries.
pub(crate) type Outgoing = AmqpMessage<Data>;
/// What a receiver link reads: any body section.
pub(crate) type Incoming = AmqpMessage<Body<RawValue>>;

/// The message annotation Artemis reads a delivery delay (milliseconds) from.
pub(crate) const DELIVERY_DELAY: &str = "x-opt-delivery-delay";

/// The header of the `user-id` property (the user the broker checked it against),
/// when it is text: it travels back as an application property, since a broker may
/// refuse a `user-id` other than the sending connection's.
const USER_ID: &str = "user_id";

/// Content type for bodies that arrive without one.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// Well-known headers carried only natively when their value is a string: the native
/// field gives back exactly that string.
const NATIVE_STRING_HEADERS: [&str; 3] =
    [names::CORRELATION_ID, names::REPLY_TO, names::MESSAGE_TYPE];

/// The bytes `message` takes as it travels (its sections encoded, before framing).
pub(crate) fn encoded_size(message: &Outgoing) -> Option<usize> {
    let message = fe2o3_amqp::types::messaging::message::__private::Serializable(message);
    serde_amqp::serialized_size(&message).ok()
}

/// At least the bytes `message` will take as it travels beyond its body and headers'
/// own bytes: more than its properties, each application property's encoding and
/// the sections' descriptors take.
pub(crate) fn most_overhead(message: &Message) -> usize {
    const SECTIONS: usize = 1024;
    // A name's and a value's constructors and sizes, and a number's 8 bytes.
    const PER_HEADER: usize = 24;
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, value)| name.len() + PER_HEADER + value.as_str().map_or(0, str::len))
        .sum();
    SECTIONS + message.id.len() + message.content_type.len() + headers
}

/// Builds the AMQP 1.0 message for a queue of the given durability.
pub(crate) fn to_amqp(message: Message, durable: bool, profile: Profile) -> Result<Outgoing> {
    let Message {
        id,
        headers,
        content_type,
        body,
    } = message;
    let priority = headers.priority_level()?;
    let delay = headers.delay()?.filter(|_| profile.delay_annotation());
    // The broker counts a ttl from when it takes the message, delayed or not: a
    // message delayed past its ttl (a retry copy whose backoff is longer) expired
    // unseen, confirmed and its original acked. Counted from the end of the delay
    // instead (docs/core-model.md); both fit in u32, their sum is capped.
    let waits = delay.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
    let ttl = headers
        .ttl()?
        .map(millis_u32)
        .transpose()?
        .map(|ttl| ttl.saturating_add(waits));

    let mut properties = Properties {
        message_id: Some(MessageId::String(id)),
        content_type: Some(Symbol::from(content_type)),
        ..Properties::default()
    };
    let mut application = OrderedMap::new();
    for (key, value) in headers {
        let native = match (key.as_str(), &value) {
            (names::CORRELATION_ID, HeaderValue::String(s)) => {
                properties.correlation_id = Some(MessageId::String(s.clone()));
                true
            }
            (names::REPLY_TO, HeaderValue::String(s)) => {
                properties.reply_to = Some(s.clone());
                true
            }
            (names::MESSAGE_TYPE, HeaderValue::String(s)) => {
                properties.subject = Some(s.clone());
                true
            }
            // A symbol is ASCII: anything else stays an application property.
            (names::CONTENT_ENCODING, HeaderValue::String(s)) if s.is_ascii() => {
                properties.content_encoding = Some(Symbol::from(s.as_str()));
                true
            }
            // The broker's count, never sent (a retry copy starts without one).
            (names::X_DELIVERY_COUNT, _) => continue,
            (names::TIMESTAMP, HeaderValue::Int(secs)) => {
                properties.creation_time =
                    Some(Timestamp::from_milliseconds(secs.saturating_mul(1000)));
                false
            }
            _ => false,
        };
        if !native {
            application.insert(key, simple_value(value));
        }
    }

    let header = Header {
        durable,
        priority: Priority(priority.unwrap_or(4)),
        ttl,
        first_acquirer: false,
        delivery_count: 0,
    };

    let message_annotations = match delay {
        Some(delay) => {
            let mut annotations = OrderedMap::new();
            let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            annotations.insert(Symbol::from(DELIVERY_DELAY).into(), Value::Long(ms));
            Some(MessageAnnotations(annotations))
        }
        _ => None,
    };

    Ok(AmqpMessage {
        header: Some(header),
        delivery_annotations: None,
        message_annotations,
        properties: Some(properties),
        application_properties: (!application.is_empty())
            .then_some(ApplicationProperties(application)),
        body: Data(Binary::from(body)),
        footer: None,
    })
}

fn millis_u32(d: Duration) -> Result<u32> {
    u32::try_from(d.as_millis()).map_err(|_| {
        Error::invalid("header \"ttl\"/\"expiration\" is above the AMQP 1.0 limit of 4294967295 ms")
    })
}

fn simple_value(value: HeaderValue) -> SimpleValue {
    match value {
        HeaderValue::String(s) => SimpleValue::String(s),
        HeaderValue::Int(i) => SimpleValue::Long(i),
        HeaderValue::Float(x) => SimpleValue::from(x),
        HeaderValue::Bool(b) => SimpleValue::Bool(b),
    }
}

/// What kind of application property `value` is, to name one a handler is not shown
/// (those [`header_value`] gives no header for).
fn unshown_kind(value: &SimpleValue) -> &'static str {
    match value {
        SimpleValue::Null => "null",
        SimpleValue::Binary(_) => "binary",
        SimpleValue::Decimal32(_) | SimpleValue::Decimal64(_) | SimpleValue::Decimal128(_) => {
            "a decimal"
        }
        _ => "a value of no header type",
    }
}

/// A header value from an application property; `None` for what is not a scalar the
/// workspace can carry (null, binaries, decimals).
fn header_value(value: SimpleValue) -> Option<HeaderValue> {
    Some(match value {
        SimpleValue::String(s) => HeaderValue::String(s),
        SimpleValue::Symbol(s) => HeaderValue::String(s.0),
        SimpleValue::Bool(b) => HeaderValue::Bool(b),
        SimpleValue::Long(i) => HeaderValue::Int(i),
        SimpleValue::Int(i) => HeaderValue::Int(i.into()),
        SimpleValue::Short(i) => HeaderValue::Int(i.into()),
        SimpleValue::Byte(i) => HeaderValue::Int(i.into()),
        SimpleValue::Ubyte(i) => HeaderValue::Int(i.into()),
        SimpleValue::Ushort(i) => HeaderValue::Int(i.into()),
        SimpleValue::Uint(i) => HeaderValue::Int(i.into()),
        SimpleValue::Ulong(i) => match i64::try_from(i) {
            Ok(i) => HeaderValue::Int(i),
            Err(_) => HeaderValue::String(i.to_string()),
        },
        SimpleValue::Double(x) => HeaderValue::Float(x.0),
        SimpleValue::Float(x) => HeaderValue::Float(f64::from(x.0)),
        SimpleValue::Timestamp(t) => HeaderValue::Int(t.milliseconds()),
        SimpleValue::Char(c) => HeaderValue::String(c.to_string()),
        SimpleValue::Uuid(u) => HeaderValue::String(uuid_string(u.as_inner())),
        _ => return None,
    })
}

pub(crate) fn uuid_string(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn message_id_string(id: MessageId) -> String {
    match id {
        MessageId::String(s) => s,
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid_string(u.as_inner()),
        MessageId::Binary(b) => b.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// Why a received message's body is not what its sender sent, when Artemis mangled
/// it: a core client's large message that was compressed (`_AMQ_LARGE_COMPRESSED`),
/// with bytes for a body (a JMS `BytesMessage`), reaches AMQP 1.0 consumers as many
/// bytes as its compressed form has, taken from the uncompressed ones (measured with
/// Artemis 2.40: the first 73 of 30,000 bytes that compress well; 30,016 for 30,000
/// random ones, 16 past the message's end). Such a message is rejected, so that
/// Artemis keeps it whole in its dead-letter address, where a core or JMS client can
/// read it (docs/drivers/amqp10.md, "What differs from RabbitMQ"). One whose size
/// matches came whole. Only a `BytesMessage` (`x-opt-jms-msg-type` 3) is told so: the
/// other JMS types arrive whole (an `ObjectMessage` of 30,007 bytes with a size of
/// 30,011, its core encoding's).
pub(crate) fn mangled_by_artemis(message: &Incoming) -> Option<String> {
    const JMS_BYTES_MESSAGE: i8 = 3;
    // The property first: a delivery without it costs a lookup, no allocation.
    let map = &message.application_properties.as_ref()?.0;
    if map.get("_AMQ_LARGE_COMPRESSED") != Some(&SimpleValue::Bool(true)) {
        return None;
    }
    let annotations = &message.message_annotations.as_ref()?.0;
    let jms_type = annotations.get(&OwnedKey::Symbol(Symbol::from("x-opt-jms-msg-type")));
    if jms_type != Some(&Value::Byte(JMS_BYTES_MESSAGE)) {
        return None;
    }
    let sent = match map.get("_AMQ_LARGE_SIZE")? {
        SimpleValue::Long(n) => u64::try_from(*n).ok()?,
        SimpleValue::Int(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let Body::Data(sections) = &message.body else {
        return None;
    };
    let came: u64 = sections.iter().map(|Data(bytes)| bytes.len() as u64).sum();
    (came != sent).then(|| {
        format!(
            "Artemis delivered {came} bytes for the {sent} of a compressed large message from a core client (as many as its compressed form has; read it with a core or JMS client, or send it uncompressed)"
        )
    })
}

/// Reads a received AMQP 1.0 message back into the workspace's message.
pub(crate) fn from_amqp(message: Incoming) -> Message {
    let AmqpMessage {
        header,
        properties,
        application_properties,
        body,
        ..
    } = message;

    let mut headers = Headers::new();
    // Named in `x_dropped_headers`: no copy of the message carries them.
    let mut unshown = Vec::new();
    if let Some(ApplicationProperties(map)) = application_properties {
        for (key, value) in map {
            // Only the broker says how often a message was delivered; Artemis' own
            // properties are its bookkeeping, and a copy carrying its duplicate-detection
            // id (`_AMQ_DUPL_ID`) is dropped as a duplicate once accepted.
            if key == names::X_DELIVERY_COUNT || key.starts_with(names::ARTEMIS_PROPERTIES) {
                continue;
            }
            let kind = unshown_kind(&value);
            match header_value(value) {
                Some(value) => {
                    headers.insert(key, value);
                }
                None => unshown.push(format!("{key} ({kind})")),
            }
        }
    }
    if !unshown.is_empty() {
        headers.note_dropped(&format!(
            "{}: AMQP 1.0 application properties a handler is not shown, and no copy of the message carries",
            unshown.join(", ")
        ));
    }
    // Deliveries before this one, as the broker counted them (Artemis counts a
    // delivery to a consumer that died; RabbitMQ 4 quorum queues count releases).
    if let Some(count) = header.as_ref().map(|h| h.delivery_count).filter(|c| *c > 0) {
        headers.insert(names::X_DELIVERY_COUNT, i64::from(count));
    }

    let properties = properties.unwrap_or_default();
    let fill = |headers: &mut Headers, key: &str, value: Option<String>| {
        if let Some(value) = value
            && !headers.contains(key)
        {
            headers.insert(key, value);
        }
    };
    fill(
        &mut headers,
        NATIVE_STRING_HEADERS[0],
        properties.correlation_id.map(message_id_string),
    );
    fill(&mut headers, NATIVE_STRING_HEADERS[1], properties.reply_to);
    fill(&mut headers, NATIVE_STRING_HEADERS[2], properties.subject);
    fill(
        &mut headers,
        names::CONTENT_ENCODING,
        properties.content_encoding.map(|s| s.0),
    );
    match properties
        .user_id
        .map(|id| String::from_utf8(id.into_vec()))
    {
        Some(Ok(id)) => fill(&mut headers, USER_ID, Some(id)),
        Some(Err(_)) => {
            headers.note_dropped(
                "user-id (binary, not UTF-8): an AMQP 1.0 property a handler is not shown, and no copy of the message carries",
            );
        }
        None => {}
    }
    if !headers.contains(names::PRIORITY) {
        // 4 is the AMQP default, which brokers fill in when nobody set one.
        if let Some(level) = header.as_ref().map(|h| h.priority.0).filter(|p| *p != 4) {
            headers.insert(names::PRIORITY, i64::from(level.min(9)));
        }
    }
    let header_ttl = header.as_ref().and_then(|h| h.ttl);
    if header_ttl.is_none() {
        // This driver sends a time to live in the header as well as its application
        // property: another client's property of that name alone is not one. Read as
        // one, it went onto every retry copy as a real time to live, and the copies
        // expired unseen (review: 19 messages of 20 lost to a `ttl: 1`).
        for key in [names::EXPIRATION, names::TTL] {
            if let Some(value) = headers.remove(key) {
                headers.note_dropped(&format!(
                    "{key} {}: an application property, not the message's time to live (its header has none), which no copy carries",
                    value.shown()
                ));
            }
        }
    }
    if !headers.contains(names::EXPIRATION)
        && !headers.contains(names::TTL)
        && let Some(ttl) = header_ttl
    {
        headers.insert(names::EXPIRATION, i64::from(ttl));
    }
    if !headers.contains(names::TIMESTAMP)
        && let Some(created) = properties.creation_time
    {
        headers.insert(names::TIMESTAMP, created.milliseconds() / 1000);
    }

    let id = properties
        .message_id
        .map(message_id_string)
        .filter(|id| !id.is_empty())
        .unwrap_or_else(queue_core::new_message_id);
    let (body, structured) = crate::body::body_bytes(body);
    let content_type = match structured {
        Some(content_type) => content_type.to_string(),
        None => properties
            .content_type
            .map(|s| s.0)
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string()),
    };
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

    /// `value` as the link hands an `amqp-value` body over: undecoded.
    fn value_body(value: Value) -> Body<RawValue> {
        let bytes = serde_amqp::to_vec(&value).unwrap();
        Body::Value(fe2o3_amqp::types::messaging::AmqpValue(
            serde_amqp::from_slice(&bytes).unwrap(),
        ))
    }

    /// A message as Artemis hands a JMS client's large `BytesMessage` over AMQP 1.0:
    /// its size and compression in application properties, `came` bytes of data.
    fn from_core_client(compressed: Option<bool>, size: SimpleValue, came: usize) -> Incoming {
        let mut properties = ApplicationProperties::builder().insert("_AMQ_LARGE_SIZE", size);
        if let Some(compressed) = compressed {
            properties = properties.insert("_AMQ_LARGE_COMPRESSED", compressed);
        }
        let mut annotations = OrderedMap::new();
        annotations.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-jms-msg-type")),
            Value::Byte(3),
        );
        AmqpMessage::builder()
            .message_annotations(MessageAnnotations(annotations))
            .application_properties(properties.build())
            .body(Body::Data(vec![Data(Binary::from(vec![1u8; came]))].into()))
            .build()
    }

    /// What Artemis mangled is told from what it did not: only a compressed message
    /// whose bytes are not as many as it had (Artemis 2.40 hands over 73 of 30,000,
    /// or 30,016 for 30,000 that do not compress).
    #[test]
    fn a_compressed_large_message_artemis_mangled_is_told_apart() {
        let why = mangled_by_artemis(&from_core_client(Some(true), SimpleValue::Long(30_000), 73));
        assert!(why.unwrap().contains("73 bytes for the 30000"));
        let padded = from_core_client(Some(true), SimpleValue::Long(30_000), 30_016);
        assert!(mangled_by_artemis(&padded).is_some());
        let int = from_core_client(Some(true), SimpleValue::Int(30_000), 73);
        assert!(mangled_by_artemis(&int).is_some());
        // Its bytes in two sections count together.
        let mut two = from_core_client(Some(true), SimpleValue::Long(30_000), 15_000);
        if let Body::Data(sections) = &mut two.body {
            sections.push(Data(Binary::from(vec![2u8; 15_000])));
        }
        assert_eq!(mangled_by_artemis(&two), None);
        for whole in [
            from_core_client(Some(true), SimpleValue::Long(30_000), 30_000),
            from_core_client(None, SimpleValue::Long(30_000), 73),
            from_core_client(Some(false), SimpleValue::Long(30_000), 73),
            from_core_client(Some(true), SimpleValue::from("30000"), 73),
        ] {
            assert_eq!(
                mangled_by_artemis(&whole),
                None,
                "{:?}",
                whole.application_properties
            );
        }
        // An `ObjectMessage` arrives whole, its size its core encoding's (measured).
        let mut object = from_core_client(Some(true), SimpleValue::Long(30_011), 30_007);
        let types = &mut object.message_annotations.as_mut().unwrap().0;
        types.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-jms-msg-type")),
            Value::Byte(1),
        );
        assert_eq!(mangled_by_artemis(&object), None);
        // A compressed `TextMessage` arrives whole, as an `amqp-value` string.
        let mut text = from_core_client(Some(true), SimpleValue::Long(60_037), 0);
        text.body = value_body(Value::from("x".repeat(30_016)));
        assert_eq!(mangled_by_artemis(&text), None);
    }

    fn round_trip(message: Message, profile: Profile) -> (Outgoing, Message) {
        let out = to_amqp(message, true, profile).unwrap();
        let incoming = AmqpMessage {
            header: out.header.clone(),
            delivery_annotations: None,
            message_annotations: out.message_annotations.clone(),
            properties: out.properties.clone(),
            application_properties: out.application_properties.clone(),
            body: Body::Data(vec![out.body.clone()].into()),
            footer: None,
        };
        let back = from_amqp(incoming);
        (out, back)
    }

    #[test]
    fn a_delayed_messages_ttl_counts_from_the_end_of_its_delay() {
        let headers = Headers::from_pairs([
            ("delay", HeaderValue::Int(u32::MAX.into())),
            ("ttl", HeaderValue::Int(200)),
        ]);
        let sent = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
        let (out, back) = round_trip(sent, Profile::Artemis);
        // Capped at the most AMQP carries, never wrapped round to a short ttl.
        assert_eq!(out.header.as_ref().unwrap().ttl, Some(u32::MAX));
        assert_eq!(back.headers.get("ttl"), Some(&HeaderValue::Int(200)));
        let headers = Headers::from_pairs([
            ("delay", HeaderValue::Int(1_000)),
            ("ttl", HeaderValue::Int(200)),
        ]);
        let sent = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
        let (out, _) = round_trip(sent, Profile::Artemis);
        assert_eq!(out.header.as_ref().unwrap().ttl, Some(1_200));
    }

    #[test]
    fn well_known_headers_go_native_and_read_back_as_published() {
        let headers = Headers::from_pairs([
            ("correlation_id", HeaderValue::from("req-17")),
            ("reply_to", HeaderValue::from("app:replies")),
            ("content_type", HeaderValue::from("text/x-mine")),
            ("message_type", HeaderValue::from("order_shipped")),
            ("content_encoding", HeaderValue::from("gzip")),
            ("priority", HeaderValue::from("high")),
            ("timestamp", HeaderValue::Int(1_700_000_000)),
            ("attempts", HeaderValue::Int(3)),
            ("ttl", HeaderValue::Int(60_000)),
            ("ratio", HeaderValue::Float(0.25)),
            ("urgent", HeaderValue::Bool(true)),
        ]);
        let sent = Message::from_bytes(b"{}".to_vec(), headers.clone(), "application/json");
        let (out, back) = round_trip(sent.clone(), Profile::RabbitmqV1);
        assert_eq!(
            out.properties.as_ref().unwrap().content_encoding,
            Some(Symbol::from("gzip"))
        );
        let props = out.properties.as_ref().unwrap();
        assert_eq!(props.message_id, Some(MessageId::String(sent.id.clone())));
        assert_eq!(
            props.correlation_id,
            Some(MessageId::String("req-17".into()))
        );
        assert_eq!(props.reply_to.as_deref(), Some("app:replies"));
        assert_eq!(props.subject.as_deref(), Some("order_shipped"));
        assert_eq!(props.content_type, Some(Symbol::from("application/json")));
        let header = out.header.as_ref().unwrap();
        assert_eq!(header.priority.0, 8);
        assert_eq!(header.ttl, Some(60_000));
        assert!(header.durable);
        let app = &out.application_properties.as_ref().unwrap().0;
        assert_eq!(app.get("attempts"), Some(&SimpleValue::Long(3)));
        assert_eq!(
            app.get("content_type"),
            Some(&SimpleValue::String("text/x-mine".into()))
        );
        assert!(app.get("correlation_id").is_none(), "carried natively");
        assert!(app.get("content_encoding").is_none(), "carried natively");
        assert_eq!(back.id, sent.id);
        assert_eq!(back.content_type, "application/json");
        assert_eq!(back.headers, headers);
        assert_eq!(back.body, b"{}");
    }

    #[test]
    fn delay_is_an_annotation_only_on_artemis() {
        let headers = Headers::from_pairs([("delay", HeaderValue::Int(400))]);
        let m = Message::from_bytes(vec![1], headers, "application/json");
        let (out, back) = round_trip(m.clone(), Profile::Artemis);
        let annotations = out.message_annotations.unwrap().0;
        assert_eq!(
            annotations.get(&OwnedKey::Symbol(Symbol::from(DELIVERY_DELAY))),
            Some(&Value::Long(400))
        );
        assert_eq!(back.headers.get("delay"), Some(&HeaderValue::Int(400)));
        let (out, _) = round_trip(m, Profile::Generic);
        assert!(out.message_annotations.is_none());
    }

    #[test]
    fn foreign_messages_read_native_fields() {
        let incoming = AmqpMessage {
            header: Some(Header {
                priority: Priority(7),
                ttl: Some(60_000),
                ..Header::default()
            }),
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(MessageId::Ulong(42)),
                correlation_id: Some(MessageId::Ulong(7)),
                subject: Some("kind".into()),
                ..Properties::default()
            }),
            application_properties: None,
            body: value_body(Value::String("hello".into())),
            footer: None,
        };
        let m = from_amqp(incoming);
        assert_eq!(m.id, "42");
        assert_eq!(
            m.headers.get("correlation_id"),
            Some(&HeaderValue::from("7"))
        );
        assert_eq!(
            m.headers.get("message_type"),
            Some(&HeaderValue::from("kind"))
        );
        assert_eq!(m.headers.get("priority"), Some(&HeaderValue::Int(7)));
        assert_eq!(m.headers.get("expiration"), Some(&HeaderValue::Int(60_000)));
        assert_eq!(m.body, b"hello");
        assert_eq!(m.content_type, DEFAULT_CONTENT_TYPE);
    }

    /// Application properties of another client's message that a handler is not shown
    /// (binary, null, a decimal) are in none of its retry and dead-letter copies, and
    /// neither was its `user-id`: they went without a word (review). The message says
    /// what it lost in `x_dropped_headers` as it arrives, and a text `user-id` is a
    /// header.
    #[test]
    fn what_a_handler_is_not_shown_is_named_and_the_user_id_is_a_header() {
        let mut map = OrderedMap::new();
        map.insert(
            "hmac".to_string(),
            SimpleValue::Binary(Binary::from(vec![0xff])),
        );
        map.insert("none".to_string(), SimpleValue::Null);
        map.insert("n".to_string(), SimpleValue::Long(1));
        let incoming = AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                user_id: Some(Binary::from(b"guest".to_vec())),
                ..Properties::default()
            }),
            application_properties: Some(ApplicationProperties(map)),
            body: value_body(Value::String("hello".into())),
            footer: None,
        };
        let m = from_amqp(incoming);
        assert_eq!(m.headers.get("n"), Some(&HeaderValue::Int(1)));
        assert_eq!(m.headers.get(USER_ID), Some(&HeaderValue::from("guest")));
        let note = m
            .headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str)
            .expect("the unshown values are named");
        assert!(note.contains("hmac (binary)"), "{note}");
        assert!(note.contains("none (null)"), "{note}");
    }

    /// Another client may send no id, or an empty one: each such message gets an id of
    /// its own from the driver, never a shared or empty one.
    #[test]
    fn a_message_without_an_id_gets_a_unique_one() {
        let without_id = |message_id: Option<MessageId>| AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: message_id.map(|id| Properties {
                message_id: Some(id),
                ..Properties::default()
            }),
            application_properties: None,
            body: value_body(Value::String("x".into())),
            footer: None,
        };
        let mut seen = std::collections::HashSet::new();
        for n in 0..1000 {
            let message_id = (n % 2 == 1).then(|| MessageId::String(String::new()));
            let m = from_amqp(without_id(message_id));
            assert!(!m.id.is_empty());
            assert!(seen.insert(m.id.clone()), "id {} given twice", m.id);
        }
    }

    /// Another client's application property `ttl: 1`, without a time to live in the
    /// message's header, is not one: read as this driver's own `ttl`, it went onto
    /// every retry copy as a real one, and 19 messages of 20 expired unseen (review).
    /// This driver writes both, so its own messages keep theirs.
    #[test]
    fn a_ttl_property_without_a_header_ttl_is_not_a_time_to_live() {
        let mut map = OrderedMap::new();
        map.insert("ttl".to_string(), SimpleValue::Long(1));
        map.insert("expiration".to_string(), SimpleValue::String("5".into()));
        let incoming = |header: Option<Header>| AmqpMessage {
            header,
            delivery_annotations: None,
            message_annotations: None,
            properties: None,
            application_properties: Some(ApplicationProperties(map.clone())),
            body: value_body(Value::String("x".into())),
            footer: None,
        };
        let m = from_amqp(incoming(None));
        assert_eq!(m.headers.ttl().unwrap(), None, "{:?}", m.headers);
        let note = m
            .headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str)
            .expect("the two properties are named");
        assert!(
            note.contains("ttl") && note.contains("expiration"),
            "{note}"
        );
        let (out, _) = round_trip(m, Profile::Artemis);
        assert_eq!(out.header.and_then(|h| h.ttl), None, "the copy has no TTL");
        // With a header TTL, as this driver sends one, they stand.
        let m = from_amqp(incoming(Some(Header {
            ttl: Some(60_000),
            ..Header::default()
        })));
        assert!(m.headers.contains("ttl"), "{:?}", m.headers);
    }

    #[test]
    fn the_delivery_count_comes_from_the_broker_only() {
        let mut properties = OrderedMap::new();
        properties.insert("x_delivery_count".to_string(), SimpleValue::Long(99));
        let incoming = |count: u32| AmqpMessage {
            header: Some(Header {
                delivery_count: count,
                ..Header::default()
            }),
            delivery_annotations: None,
            message_annotations: None,
            properties: None,
            application_properties: Some(ApplicationProperties(properties.clone())),
            body: value_body(Value::Binary(Binary::from(b"1".to_vec()))),
            footer: None,
        };
        let first = from_amqp(incoming(0));
        assert!(!first.headers.contains(names::X_DELIVERY_COUNT));
        let again = from_amqp(incoming(3));
        assert_eq!(
            again.headers.get(names::X_DELIVERY_COUNT),
            Some(&HeaderValue::Int(3))
        );
        // Never sent on: a republished copy starts uncounted.
        let (out, back) = round_trip(again, Profile::Artemis);
        assert_eq!(out.header.map(|h| h.delivery_count), Some(0));
        assert!(!back.headers.contains(names::X_DELIVERY_COUNT));
    }

    #[test]
    fn huge_ttl_is_invalid() {
        let headers = Headers::from_pairs([("ttl", HeaderValue::Int(i64::MAX))]);
        let m = Message::from_bytes(vec![], headers, "application/json");
        assert!(to_amqp(m, false, Profile::Generic).is_err());
    }
}
