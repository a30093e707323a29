//! Messages <-> stream entry fields.
//!
//! An entry carries one message as flat fields, readable with `redis-cli XRANGE`:
//!
//! | field | holds |
//! |---|---|
//! | `id` | [`Message::id`] |
//! | `content_type` | the codec's content type ([`Message::content_type`]) |
//! | `body` | the encoded body, raw bytes |
//! | `h:<name>` | one header; the value is typed by its prefix: `s:` string, `i:` integer, `f:` float, `b:` boolean (`b:1`, `b:0`) |
//!
//! Entries other clients add are read leniently, never refused: no `id` gives the
//! entry's stream id, no `content_type` gives `application/octet-stream`, no `body`
//! an empty one, a header value without a known prefix a string, and other fields
//! are ignored.

use queue_core::{HeaderValue, Headers, Message, names};
use redis::Value;

/// Content type for entries that arrive without one.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

const ID: &str = "id";
const CONTENT_TYPE: &str = "content_type";
const BODY: &str = "body";
const HEADER_PREFIX: &str = "h:";

/// The fields of an entry, in `XADD` order: `field value field value ...`.
pub(crate) fn to_fields(message: &Message) -> Vec<Vec<u8>> {
    let mut fields = Vec::with_capacity(6 + 2 * message.headers.len());
    fields.push(ID.as_bytes().to_vec());
    fields.push(message.id.as_bytes().to_vec());
    fields.push(CONTENT_TYPE.as_bytes().to_vec());
    fields.push(message.content_type.as_bytes().to_vec());
    for (name, value) in message.headers.iter() {
        if name == names::X_DELIVERY_COUNT {
            continue; // a broker's count, never carried (see `from_fields`)
        }
        fields.push(format!("{HEADER_PREFIX}{name}").into_bytes());
        fields.push(encode_header(value).into_bytes());
    }
    fields.push(BODY.as_bytes().to_vec());
    fields.push(message.body.clone());
    fields
}

fn encode_header(value: &HeaderValue) -> String {
    match value {
        HeaderValue::String(s) => format!("s:{s}"),
        HeaderValue::Int(i) => format!("i:{i}"),
        // Rust prints the shortest text that parses back to the same f64.
        HeaderValue::Float(x) => format!("f:{x}"),
        HeaderValue::Bool(b) => format!("b:{}", u8::from(*b)),
    }
}

fn decode_header(text: String) -> HeaderValue {
    let typed = text.split_once(':').and_then(|(tag, rest)| match tag {
        "s" => Some(HeaderValue::String(rest.to_string())),
        "i" => rest.parse().ok().map(HeaderValue::Int),
        "f" => rest.parse().ok().map(HeaderValue::Float),
        "b" => match rest {
            "1" | "true" => Some(HeaderValue::Bool(true)),
            "0" | "false" => Some(HeaderValue::Bool(false)),
            _ => None,
        },
        _ => None,
    });
    typed.unwrap_or(HeaderValue::String(text))
}

/// One entry as `XREADGROUP` or `XCLAIM` returns it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The stream id (`1700000000000-0`).
    pub stream_id: String,
    pub message: Message,
    /// How many times the group has delivered it, this delivery included (its
    /// pending entry's count): what tells this delivery from a later one of the same
    /// entry, whose settlement a late one of this delivery must not make.
    pub deliveries: u64,
}

/// Reads a message out of an entry's fields (`[field, value, ...]`).
pub(crate) fn from_fields(stream_id: &str, fields: &[Value]) -> Message {
    let mut id = None;
    let mut content_type = None;
    let mut body = Vec::new();
    let mut headers = Headers::new();
    for pair in fields.chunks(2) {
        let [field, value] = pair else { break };
        let Some(field) = bytes_of(field) else {
            continue;
        };
        let value = bytes_of(value).unwrap_or_default();
        let field = String::from_utf8_lossy(&field);
        match field.as_ref() {
            ID => id = Some(String::from_utf8_lossy(&value).into_owned()),
            CONTENT_TYPE => content_type = Some(String::from_utf8_lossy(&value).into_owned()),
            BODY => body = value,
            other => {
                // The broker's count of deliveries, which the runtime trusts to stop a
                // crash loop: Redis counts none, and another client may not set it.
                if let Some(name) = other.strip_prefix(HEADER_PREFIX)
                    && name != names::X_DELIVERY_COUNT
                {
                    let text = String::from_utf8_lossy(&value).into_owned();
                    headers.insert(name, decode_header(text));
                }
            }
        }
    }
    Message {
        id: id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| stream_id.to_string()),
        headers,
        content_type: content_type
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string()),
        body,
    }
}

/// The entries of a reply: `[[id, [field, value, ...]], ...]`. Entries whose data is
/// gone (`[id, nil]`, from a claim of a deleted entry) are returned as ids alone.
pub(crate) fn entries(reply: &Value) -> (Vec<Entry>, Vec<String>) {
    let mut found = Vec::new();
    let mut gone = Vec::new();
    let Value::Array(items) = reply else {
        return (found, gone);
    };
    for item in items {
        let Value::Array(parts) = item else { continue };
        let Some(stream_id) = parts.first().and_then(text_of) else {
            continue;
        };
        match parts.get(1) {
            Some(Value::Array(fields)) => found.push(Entry {
                message: from_fields(&stream_id, fields),
                stream_id,
                // A first delivery: a claim sets what it knows (`consume::rescan`).
                deliveries: 1,
            }),
            _ => gone.push(stream_id),
        }
    }
    (found, gone)
}

/// The entries of an `XREADGROUP` reply for one stream: `[[key, entries]]`, or nil
/// when the block timed out.
pub(crate) fn read_reply(reply: &Value) -> (Vec<Entry>, Vec<String>) {
    let streams = match reply {
        Value::Array(streams) => streams.as_slice(),
        Value::Map(pairs) => {
            return pairs
                .first()
                .map(|(_, entries_of)| entries(entries_of))
                .unwrap_or_default();
        }
        _ => return (Vec::new(), Vec::new()),
    };
    match streams.first() {
        Some(Value::Array(stream)) => stream.get(1).map(entries).unwrap_or_default(),
        _ => (Vec::new(), Vec::new()),
    }
}

fn bytes_of(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// A reply value as text (ids, names).
pub(crate) fn text_of(value: &Value) -> Option<String> {
    bytes_of(value).map(|b| String::from_utf8_lossy(&b).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_values(fields: Vec<Vec<u8>>) -> Vec<Value> {
        fields.into_iter().map(Value::BulkString).collect()
    }

    #[test]
    fn every_header_type_round_trips() {
        let headers = Headers::from_pairs([
            ("s", HeaderValue::from("a:b:c")),
            ("empty", HeaderValue::from("")),
            ("i", HeaderValue::Int(i64::MIN)),
            ("f", HeaderValue::Float(0.1 + 0.2)),
            ("big", HeaderValue::Float(-1.5e300)),
            ("whole", HeaderValue::Float(5.0)),
            ("t", HeaderValue::Bool(true)),
            ("n", HeaderValue::Bool(false)),
            ("attempts", HeaderValue::Int(3)),
        ]);
        let sent = Message::from_bytes(vec![0, 255, 10], headers, "application/msgpack");
        let got = from_fields("1-0", &as_values(to_fields(&sent)));
        assert_eq!(got, sent);
    }

    #[test]
    fn foreign_entries_are_read_leniently() {
        let fields = as_values(vec![
            b"h:k".to_vec(),
            b"plain".to_vec(),
            b"other".to_vec(),
            b"x".to_vec(),
            b"h:n".to_vec(),
            b"i:notanumber".to_vec(),
        ]);
        let got = from_fields("17-3", &fields);
        assert_eq!(got.id, "17-3");
        assert_eq!(got.content_type, DEFAULT_CONTENT_TYPE);
        assert!(got.body.is_empty());
        assert_eq!(got.headers.get("k"), Some(&HeaderValue::from("plain")));
        assert_eq!(
            got.headers.get("n"),
            Some(&HeaderValue::from("i:notanumber"))
        );
        assert_eq!(got.headers.len(), 2);
    }

    /// `x_delivery_count` is the broker's count of deliveries, which the runtime's
    /// crash-loop guard trusts: Redis counts none, so an entry another client wrote
    /// with `h:x_delivery_count i:10` had its message dead-lettered (or dropped)
    /// without its handler ever running. It is neither read nor written.
    #[test]
    fn a_delivery_count_another_client_wrote_is_not_read() {
        let fields = as_values(vec![
            b"h:x_delivery_count".to_vec(),
            b"i:10".to_vec(),
            b"body".to_vec(),
            b"{}".to_vec(),
        ]);
        let got = from_fields("1-0", &fields);
        assert!(!got.headers.contains(queue_core::names::X_DELIVERY_COUNT));
        let mut message = got;
        message
            .headers
            .insert(queue_core::names::X_DELIVERY_COUNT, 3);
        let written = to_fields(&message);
        assert!(
            !written
                .iter()
                .any(|f| f.as_slice() == b"h:x_delivery_count")
        );
    }

    #[test]
    fn replies_with_deleted_entries_name_them() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                Value::Array(as_values(vec![b"id".to_vec(), b"m1".to_vec()])),
            ]),
            Value::Array(vec![Value::BulkString(b"2-0".to_vec()), Value::Nil]),
        ]);
        let (found, gone) = entries(&reply);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].message.id, "m1");
        assert_eq!(gone, vec!["2-0".to_string()]);
        let read = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"queue:{a:b}".to_vec()),
            reply,
        ])]);
        assert_eq!(read_reply(&read).0.len(), 1);
        assert!(read_reply(&Value::Nil).0.is_empty());
    }
}
