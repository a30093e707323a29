//! A value section's bytes as they came, for messages of any number of frames
//! (docs/drivers/amqp10.md, "Bodies from other clients").
//!
//! The link hands `amqp-value` and `amqp-sequence` bodies over undecoded, for `body.rs`
//! to read with its own limits. fe2o3-amqp's `LazyValue` does that only for a message
//! that came in one frame: fe2o3-amqp decodes a message of several frames through
//! serde_amqp's `IoReader`, which hands the value's bytes to the visitor borrowed, and
//! `LazyValue`'s visitor takes them only owned (serde_amqp 0.18). Every structured body
//! longer than a frame failed to decode, and the driver rejected the message: RabbitMQ
//! dropped it (Qpid Proton's dictionary of 300 KB, a JMS `TextMessage` of 300 KB
//! through Artemis).

use std::fmt;

use serde::de::{Deserialize, Deserializer, Visitor};

/// The encoded bytes of one AMQP value, constructor included.
#[derive(Debug)]
pub(crate) struct RawValue(Vec<u8>);

impl RawValue {
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

/// The name serde_amqp's deserializer reads as "hand over this value's bytes" (its
/// `LazyValue`'s, which it keeps crate-private).
const BYTES_OF_THE_VALUE: &str = "__LAZY_VALUE";

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_newtype_struct(BYTES_OF_THE_VALUE, RawValueVisitor)
    }
}

struct RawValueVisitor;

impl Visitor<'_> for RawValueVisitor {
    type Value = RawValue;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an AMQP value's encoded bytes")
    }

    // From a message of several frames (`IoReader`).
    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<RawValue, E> {
        Ok(RawValue(bytes.to_vec()))
    }

    // From a message of one frame (`SliceReader`).
    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<RawValue, E> {
        Ok(RawValue(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
    use fe2o3_amqp::types::messaging::{AmqpValue, Body, Message};
    use fe2o3_amqp::types::primitives::Value;

    fn encoded(body: Body<Value>) -> Vec<u8> {
        let message = Message::builder().body(body).build();
        let message = fe2o3_amqp::types::messaging::message::__private::Serializable(message);
        serde_amqp::to_vec(&message).unwrap()
    }

    /// A value body read as fe2o3-amqp reads a message of one frame and one of several
    /// gives its bytes either way: `LazyValue` fails the second. (A sequence's items are
    /// read the same way, each as a value.)
    #[test]
    fn a_value_body_reads_from_one_frame_and_from_several() {
        let values = [
            Value::from("x".repeat(300_000)),
            Value::from(7),
            Value::List(vec![Value::from("a")]),
        ];
        for value in values {
            let expected = serde_amqp::to_vec(&value).unwrap();
            let bytes = encoded(Body::Value(AmqpValue(value)));
            let one = serde_amqp::read::SliceReader::new(&bytes);
            let several = serde_amqp::read::IoReader::new(std::io::Cursor::new(&bytes));
            for message in [
                <Body<RawValue> as DecodeIntoMessage>::decode_message_from_reader(one),
                <Body<RawValue> as DecodeIntoMessage>::decode_message_from_reader(several),
            ] {
                let body = message.expect("decodes").body;
                let Body::Value(AmqpValue(raw)) = body else {
                    panic!("a value body: {body:?}")
                };
                assert_eq!(raw.as_slice(), &expected[..]);
            }
        }
        // Why this type exists: when this fails, serde_amqp reads `LazyValue` from
        // several frames too, and the driver could take it again.
        let bytes = encoded(Body::Value(AmqpValue(Value::from("x".repeat(300_000)))));
        let several = serde_amqp::read::IoReader::new(std::io::Cursor::new(&bytes));
        let lazy = <Body<fe2o3_amqp::types::primitives::LazyValue> as DecodeIntoMessage>::decode_message_from_reader(several);
        assert!(
            lazy.is_err(),
            "LazyValue reads a value of several frames now"
        );
    }
}
