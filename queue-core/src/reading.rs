//! How a delivered body is read, by its content type (docs/core-model.md, "Bodies
//! from other clients").
//!
//! This runtime's publishers always write a codec's content type. Other clients often
//! write none (pika without properties, RabbitMQ's management UI, a JMS `TextMessage`
//! over AMQP 1.0) or a text type, and such a message is not bad input: a handler gets
//! its JSON value, or its text, rather than a dead letter.

use crate::tape::Tape;
use crate::{Codec, Result};

/// The content type AMQP 1.0 gives a body that arrives without one; the drivers report
/// a missing content type as this, or as an empty string.
const UNTYPED: &str = "application/octet-stream";

/// How a body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// A codec's content type: the codec decodes it, or it is `INVALID`.
    Codec(Codec),
    /// `text/*`: the text as a string (bytes if it is not UTF-8, whatever the charset).
    Text,
    /// No content type, or `application/octet-stream`: the JSON value when the whole
    /// body is one, else the body as [`Reading::Text`] reads it.
    Untyped,
}

impl Reading {
    /// How to read a body of this content type; `None` when nothing reads it (another
    /// application's format, or a driver's marker for bytes it could not read).
    pub(crate) fn of(content_type: &str) -> Option<Reading> {
        if let Some(codec) = Codec::from_content_type(content_type) {
            return Some(Reading::Codec(codec));
        }
        let base = content_type.split(';').next().unwrap_or("").trim();
        if base.is_empty() || base.eq_ignore_ascii_case(UNTYPED) {
            return Some(Reading::Untyped);
        }
        let is_text = base
            .get(..5)
            .is_some_and(|kind| kind.eq_ignore_ascii_case("text/"));
        is_text.then_some(Reading::Text)
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
                if Codec::Json.decode_onto(bytes, tape).is_err() {
                    tape.set_text(bytes);
                }
                Ok(())
            }
        }
    }
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

    #[test]
    fn content_types_choose_the_reading() {
        for json in ["application/json", "Application/JSON; charset=utf-8"] {
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
        for text in ["text/plain", "TEXT/csv; charset=iso-8859-1", "text/xml"] {
            assert_eq!(Reading::of(text), Some(Reading::Text), "{text}");
        }
        for untyped in [
            "",
            " ",
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
    fn untyped_bodies_are_their_json_value_or_their_text() {
        let table = read("", br#"{"to": "a@b.c"}"#).unwrap().unwrap();
        assert_eq!(table, Value::map([("to", Value::from("a@b.c"))]));
        let number = read("application/octet-stream", b" 42 ").unwrap().unwrap();
        assert_eq!(number, Value::Int(42));
        for text in [&b"hello"[..], b"", b"{\"a\": 1} trailing", b"[1,"] {
            let got = read("", text).unwrap().unwrap();
            assert_eq!(got, Value::String(String::from_utf8_lossy(text).into()));
        }
        let binary = read("", b"\x00\xff").unwrap().unwrap();
        assert_eq!(binary, Value::Bytes(b"\x00\xff".to_vec()));
        // JSON deeper than the limit is not a JSON value here: it arrives as its text.
        let deep = "[".repeat(crate::MAX_DEPTH + 1) + &"]".repeat(crate::MAX_DEPTH + 1);
        let got = read("", deep.as_bytes()).unwrap().unwrap();
        assert_eq!(got, Value::String(deep));
    }

    #[test]
    fn a_codec_content_type_is_still_strict() {
        let err = read("application/json", b"hello").unwrap().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Invalid);
    }

    proptest! {
        /// Whatever the bytes, an untyped or text body is read, and nothing of it is
        /// lost: its JSON value, or exactly its bytes.
        #[test]
        fn untyped_and_text_bodies_always_read_and_keep_their_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let text = read("text/plain", &bytes).unwrap().unwrap();
            let expected = match String::from_utf8(bytes.clone()) {
                Ok(s) => Value::String(s),
                Err(_) => Value::Bytes(bytes.clone()),
            };
            prop_assert_eq!(&text, &expected);
            let untyped = read("", &bytes).unwrap().unwrap();
            match Codec::Json.decode(&bytes) {
                Ok(value) => prop_assert_eq!(untyped, value),
                Err(_) => prop_assert_eq!(untyped, expected),
            }
        }
    }
}
