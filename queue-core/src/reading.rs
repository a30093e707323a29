//! How a delivered body is read, by its content type (docs/core-model.md, "Bodies
//! from other clients").
//!
//! This runtime's publishers always write a codec's content type. Other clients often
//! write none (pika without properties, RabbitMQ's management UI, a JMS `TextMessage`
//! over AMQP 1.0) or a text type, and such a message is not bad input: a handler gets
//! its JSON value, or its text, rather than a dead letter.

use crate::tape::Tape;
use crate::{Codec, Result};

/// The content type AMQP 1.0 gives a body that arrives without one (the Redis driver
/// too); the 0-9-1 driver reports a missing one as an empty string.
const UNTYPED: &str = "application/octet-stream";

/// How a body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// A codec's content type, `text/json`, or any `+json` type: the codec decodes
    /// it, or it is `INVALID`.
    Codec(Codec),
    /// Any other `text/*`: the text as a string (bytes if it is not UTF-8, whatever
    /// the charset).
    Text,
    /// No content type, or `application/octet-stream`: a JSON object or array when
    /// the body is one the JSON codec reads whole, else the body as [`Reading::Text`]
    /// reads it. A lone number or `null` stays text: an order number in a text
    /// message should not turn into an integer by the look of its digits.
    Untyped,
}

impl Reading {
    /// How to read a body of this content type; `None` when nothing reads it (another
    /// application's format, or a driver's marker for bytes it could not read).
    pub(crate) fn of(content_type: &str) -> Option<Reading> {
        if let Some(codec) = Codec::from_content_type(content_type) {
            return Some(Reading::Codec(codec));
        }
        let base = crate::codec::base_type(content_type);
        let structured_json = base.contains('/') && ends_ignoring_case(base, "+json");
        if base.eq_ignore_ascii_case("text/json") || structured_json {
            return Some(Reading::Codec(Codec::Json));
        }
        if base.is_empty() || base.eq_ignore_ascii_case(UNTYPED) {
            return Some(Reading::Untyped);
        }
        starts_ignoring_case(base, "text/").then_some(Reading::Text)
    }

    /// A short content type read as `content_type` is: for a copy whose own type is
    /// too long to publish again.
    pub(crate) fn short_type_like(content_type: &str) -> &'static str {
        match Reading::of(content_type) {
            Some(Reading::Codec(codec)) => codec.content_type(),
            Some(Reading::Text) => "text/plain",
            Some(Reading::Untyped) => UNTYPED,
            // Another application's format: no handler reads the copy either.
            None => "application/x-unreadable",
        }
    }

    /// Reads `bytes` onto `tape`, replacing what it held.
    pub(crate) fn decode_onto(self, bytes: &[u8], tape: &mut Tape) -> Result<()> {
        match self {
            Reading::Codec(codec) => codec.decode_onto(bytes, tape),
            Reading::Text => {
                tape.set_text(bytes);
                Ok(())
            }
            Reading::Untyped => {
                let opens = bytes.iter().find(|b| !b.is_ascii_whitespace());
                let looks_structured = matches!(opens, Some(b'{' | b'['));
                if !looks_structured || Codec::Json.decode_onto(bytes, tape).is_err() {
                    tape.set_text(bytes);
                }
                Ok(())
            }
        }
    }
}

fn starts_ignoring_case(text: &str, prefix: &str) -> bool {
    let start = text.as_bytes().get(..prefix.len());
    start.is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes()))
}

fn ends_ignoring_case(text: &str, suffix: &str) -> bool {
    let from = text.len().checked_sub(suffix.len());
    let end = from.and_then(|from| text.as_bytes().get(from..));
    end.is_some_and(|end| end.eq_ignore_ascii_case(suffix.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;
    use proptest::prelude::*;

    fn read(content_type: &str, bytes: &[u8]) -> Option<Result<Value>> {
        let reading = Reading::of(content_type)?;
        let mut tape = Tape::new();
        Some(reading.decode_onto(bytes, &mut tape).map(|()| tape.value()))
    }

    fn text(bytes: &[u8]) -> Value {
        match String::from_utf8(bytes.to_vec()) {
            Ok(s) => Value::String(s),
            Err(_) => Value::Bytes(bytes.to_vec()),
        }
    }

    #[test]
    fn content_types_choose_the_reading() {
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "text/json",
            "application/vnd.masstransit+json",
            "application/cloudevents+JSON; charset=utf-8",
        ] {
            assert_eq!(
                Reading::of(json),
                Some(Reading::Codec(Codec::Json)),
                "{json}"
            );
        }
        assert_eq!(
            Reading::of("application/x-msgpack"),
            Some(Reading::Codec(Codec::MsgPack))
        );
        for text in [
            "text/plain",
            "TEXT/PLAIN",
            "text/csv; charset=iso-8859-1",
            "text/",
        ] {
            assert_eq!(Reading::of(text), Some(Reading::Text), "{text}");
        }
        for untyped in [
            "",
            " ",
            ";charset=utf-8",
            "application/octet-stream",
            "application/OCTET-STREAM; x=1",
        ] {
            assert_eq!(Reading::of(untyped), Some(Reading::Untyped), "{untyped:?}");
        }
        for unread in [
            "application/x-amqp-encoded",
            "application/x-java-serialized-object",
            "application/xml",
            "text",
            "tex",
            "+json",
            "é",
            "tëxt/plain",
            "text\u{301}/plain",
        ] {
            assert_eq!(Reading::of(unread), None, "{unread}");
        }
    }

    #[test]
    fn text_is_a_string_and_never_json() {
        let got = read("text/plain", br#"{"a": 1}"#).unwrap().unwrap();
        assert_eq!(got, Value::from(r#"{"a": 1}"#));
        let latin1 = read("text/plain; charset=iso-8859-1", b"caf\xe9").unwrap();
        assert_eq!(latin1.unwrap(), Value::Bytes(b"caf\xe9".to_vec()));
    }

    #[test]
    fn untyped_objects_and_arrays_are_json_and_the_rest_is_text() {
        let table = read("", br#" {"to": "a@b.c"}"#).unwrap().unwrap();
        assert_eq!(table, Value::map([("to", Value::from("a@b.c"))]));
        let list = read("application/octet-stream", b"\n[1, 2.5]")
            .unwrap()
            .unwrap();
        assert_eq!(list, Value::Array(vec![Value::Int(1), Value::Float(2.5)]));
        let deep = "[".repeat(crate::MAX_DEPTH + 1) + &"]".repeat(crate::MAX_DEPTH + 1);
        for kept in [
            &b"hello"[..],
            b"",
            b"  ",
            b"42",
            b"null",
            b"true",
            br#""quoted""#,
            b"{\"a\": 1} trailing",
            b"[1,",
            // Valid JSON the codec does not read: past i64, past the depth limit, a BOM.
            br#"{"id": 18446744073709551615}"#,
            b"[1e400]",
            deep.as_bytes(),
            b"\xef\xbb\xbf{}",
            b"\x00\xff",
        ] {
            let got = read("", kept).unwrap().unwrap();
            assert_eq!(got, text(kept), "{:?}", String::from_utf8_lossy(kept));
        }
    }

    #[test]
    fn a_json_content_type_is_still_strict() {
        for json in ["application/json", "text/json", "application/x+json"] {
            let err = read(json, b"hello").unwrap().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Invalid, "{json}");
        }
    }

    fn arb_body() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            "[a-z0-9 ]{0,8}".prop_map(Value::from),
        ];
        let tree = leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,4}", inner, 0..6).prop_map(Value::Map),
            ]
        });
        prop_oneof![
            proptest::collection::vec(tree.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,4}", tree, 0..6).prop_map(Value::Map),
        ]
    }

    proptest! {
        /// An object or array another client wrote as JSON, with no content type,
        /// reaches the handler as the value it wrote, whatever whitespace is around it.
        #[test]
        fn untyped_json_objects_and_arrays_read_as_what_was_written(
            body in arb_body(),
            before in "[ \t\r\n]{0,3}",
            after in "[ \t\r\n]{0,3}",
        ) {
            let mut bytes = before.into_bytes();
            bytes.extend(serde_json::to_vec(&body).unwrap());
            bytes.extend(after.into_bytes());
            prop_assert_eq!(read("", &bytes).unwrap().unwrap(), body);
        }

        /// Whatever the bytes, an untyped or text body is read: as exactly its bytes,
        /// unless it is a JSON object or array.
        #[test]
        fn untyped_and_text_bodies_always_read(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assert_eq!(read("text/plain", &bytes).unwrap().unwrap(), text(&bytes));
            let untyped = read("", &bytes).unwrap().unwrap();
            let structured = matches!(untyped, Value::Array(_) | Value::Map(_));
            prop_assert!(structured || untyped == text(&bytes), "{:?}", untyped);
        }
    }
}
