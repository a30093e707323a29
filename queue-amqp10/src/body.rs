//! A received message's body sections as the bytes and content type of a
//! [`queue_core::Message`] (docs/drivers/amqp10.md, "Bodies from other clients").
//!
//! `data` sections are the bytes, as every driver and most clients send them. Other
//! AMQP 1.0 clients send structured bodies: Qpid Proton and rhea put a dictionary or a
//! list in an `amqp-value` section by default. Such a value becomes the JSON a handler
//! reads as a table (MessagePack when it holds raw bytes or a non-finite float, which
//! JSON cannot carry). The few values neither can carry (decimals, nesting past
//! [`MAX_DEPTH`]) keep their AMQP encoding under
//! [`AMQP_ENCODED`]: no handler decodes it, so the runtime dead-letters the message
//! with its bytes intact. No body is refused: a refused delivery is dropped by
//! RabbitMQ, which is losing a message.

use fe2o3_amqp::types::messaging::{AmqpSequence, AmqpValue, Body, Data};
use fe2o3_amqp::types::primitives::Value as Amqp;
use queue_core::{Codec, MAX_DEPTH, Value};

/// The content type of a body kept in its AMQP encoding (an `amqp-value` or
/// `amqp-sequence` section list, as [`serde_amqp`] writes it).
pub(crate) const AMQP_ENCODED: &str = "application/x-amqp-encoded";

/// The body's bytes, and the content type to read them with when the sections say
/// what it is (a structured value); `None` keeps the message's own.
pub(crate) fn body_bytes(body: Body<Amqp>) -> (Vec<u8>, Option<&'static str>) {
    match body {
        Body::Data(sections) => {
            let mut sections: Vec<Data> = sections.into();
            if sections.len() == 1
                && let Some(Data(bytes)) = sections.pop()
            {
                return (bytes.into_vec(), None);
            }
            let bytes = sections.into_iter().flat_map(|Data(b)| b.into_vec());
            (bytes.collect(), None)
        }
        Body::Empty => (Vec::new(), None),
        Body::Value(AmqpValue(Amqp::Binary(bytes))) => (bytes.into_vec(), None),
        Body::Value(AmqpValue(Amqp::String(text))) => (text.into_bytes(), None),
        Body::Value(AmqpValue(value)) => {
            let encoded = payload(&value, 0).and_then(|v| encoded(&v));
            encoded.unwrap_or_else(|| (amqp_encoded(&AmqpValue(value)), Some(AMQP_ENCODED)))
        }
        Body::Sequence(sections) => {
            let sections: Vec<AmqpSequence<Amqp>> = sections.into();
            // One list, as the sections are one sequence cut into parts.
            let items: Option<Vec<Value>> = sections
                .iter()
                .flat_map(|AmqpSequence(items)| items.iter().map(|item| payload(item, 1)))
                .collect();
            let encoded = items.and_then(|items| encoded(&Value::Array(items)));
            encoded.unwrap_or_else(|| (amqp_encoded(&sections), Some(AMQP_ENCODED)))
        }
    }
}

/// JSON when it can carry the value, else MessagePack.
fn encoded(value: &Value) -> Option<(Vec<u8>, Option<&'static str>)> {
    [Codec::Json, Codec::MsgPack]
        .into_iter()
        .find_map(|codec| Some((codec.encode(value).ok()?, Some(codec.content_type()))))
}

fn amqp_encoded<T: serde::Serialize>(sections: &T) -> Vec<u8> {
    // Encoding a value that was just decoded cannot fail; an empty body would still
    // reach the dead-letter queue, with the reason that it cannot be decoded.
    serde_amqp::to_vec(sections).unwrap_or_default()
}

/// The payload a handler reads for an AMQP value `depth` levels down; `None` when it
/// has none.
fn payload(value: &Amqp, depth: usize) -> Option<Value> {
    if depth > MAX_DEPTH {
        return None;
    }
    let each = |items: &[Amqp]| -> Option<Vec<Value>> {
        items.iter().map(|item| payload(item, depth + 1)).collect()
    };
    Some(match value {
        Amqp::Null => Value::Nil,
        Amqp::Bool(b) => Value::Bool(*b),
        Amqp::Map(map) => {
            let table: std::collections::BTreeMap<String, Value> = map
                .iter()
                .map(|(key, value)| Some((map_key(key)?, payload(value, depth + 1)?)))
                .collect::<Option<_>>()?;
            // Keys that read alike (7 and "7") would keep only one of their values.
            if table.len() < map.len() {
                return None;
            }
            Value::Map(table)
        }
        Amqp::List(items) => Value::Array(each(items)?),
        Amqp::Array(items) => Value::Array(each(&items.0)?),
        Amqp::Binary(bytes) => Value::Bytes(bytes.to_vec()),
        // A described value's descriptor names its type for the sender's own code.
        Amqp::Described(described) => payload(&described.value, depth + 1)?,
        scalar => scalar_payload(scalar)?,
    })
}

fn scalar_payload(value: &Amqp) -> Option<Value> {
    Some(match value {
        Amqp::Ubyte(n) => Value::Int((*n).into()),
        Amqp::Ushort(n) => Value::Int((*n).into()),
        Amqp::Uint(n) => Value::Int((*n).into()),
        Amqp::Ulong(n) => match i64::try_from(*n) {
            Ok(n) => Value::Int(n),
            Err(_) => Value::String(n.to_string()),
        },
        Amqp::Byte(n) => Value::Int((*n).into()),
        Amqp::Short(n) => Value::Int((*n).into()),
        Amqp::Int(n) => Value::Int((*n).into()),
        Amqp::Long(n) => Value::Int(*n),
        Amqp::Float(x) => Value::Float(f64::from(x.0)),
        Amqp::Double(x) => Value::Float(x.0),
        Amqp::Char(c) => Value::String(c.to_string()),
        Amqp::Timestamp(t) => Value::Int(t.milliseconds()),
        Amqp::Uuid(u) => Value::String(crate::mapping::uuid_string(u.as_inner())),
        Amqp::String(s) => Value::String(s.clone()),
        Amqp::Symbol(s) => Value::String(s.0.clone()),
        _ => return None,
    })
}

/// A map key as the string a table key is: strings, symbols and scalars (a
/// dictionary keyed by numbers gets their decimal text, as JSON writes them).
fn map_key(key: &Amqp) -> Option<String> {
    match scalar_payload(key)? {
        Value::String(s) => Some(s),
        Value::Int(n) => Some(n.to_string()),
        Value::Float(x) => Some(x.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::primitives::{Array, Dec32, OrderedMap, Symbol, Timestamp};
    use proptest::prelude::*;
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;

    use super::*;

    fn map(entries: Vec<(Amqp, Amqp)>) -> Amqp {
        let mut map = OrderedMap::new();
        for (key, value) in entries {
            map.insert(key, value);
        }
        Amqp::Map(map)
    }

    fn read(body: Body<Amqp>) -> (Value, &'static str) {
        let (bytes, content_type) = body_bytes(body);
        let content_type = content_type.expect("a structured body says what it is");
        let codec = Codec::from_content_type(content_type).expect("one of the codecs");
        (codec.decode(&bytes).expect("decodes"), content_type)
    }

    #[test]
    fn a_dictionary_in_an_amqp_value_reads_as_a_json_table() {
        let body = Body::Value(AmqpValue(map(vec![
            (Amqp::String("n".into()), Amqp::Int(1)),
            (
                Amqp::Symbol(Symbol::from("when")),
                Amqp::Timestamp(Timestamp::from_milliseconds(5)),
            ),
            (
                Amqp::Long(7),
                Amqp::List(vec![Amqp::Bool(true), Amqp::Null]),
            ),
            (
                Amqp::String("x".into()),
                Amqp::Array(Array(vec![Amqp::Double(1.5.into())])),
            ),
        ])));
        let (value, content_type) = read(body);
        assert_eq!(content_type, "application/json");
        let expected = Value::map([
            ("n", Value::Int(1)),
            ("when", Value::Int(5)),
            ("7", Value::Array(vec![Value::Bool(true), Value::Nil])),
            ("x", Value::Array(vec![Value::Float(1.5)])),
        ]);
        assert_eq!(value, expected);
    }

    #[test]
    fn bytes_and_non_finite_floats_inside_a_value_go_as_msgpack() {
        for inner in [
            Amqp::Binary(vec![0, 255].into()),
            Amqp::Double(f64::NAN.into()),
        ] {
            let body = Body::Value(AmqpValue(Amqp::List(vec![inner])));
            assert_eq!(read(body).1, "application/msgpack");
        }
    }

    #[test]
    fn amqp_sequence_sections_read_as_one_list() {
        let body = Body::Sequence(
            vec![
                AmqpSequence(vec![Amqp::Int(1)]),
                AmqpSequence(vec![Amqp::String("two".into())]),
            ]
            .into(),
        );
        let expected = Value::Array(vec![Value::Int(1), Value::String("two".into())]);
        assert_eq!(read(body).0, expected);
    }

    #[test]
    fn a_value_no_codec_carries_keeps_its_amqp_encoding() {
        let value = map(vec![(
            Amqp::String("price".into()),
            Amqp::Decimal32(Dec32::from([1, 2, 3, 4])),
        )]);
        let (bytes, content_type) = body_bytes(Body::Value(AmqpValue(value.clone())));
        assert_eq!(content_type, Some(AMQP_ENCODED));
        let back: AmqpValue<Amqp> = serde_amqp::from_slice(&bytes).unwrap();
        assert_eq!(back.0, value);
        // Keys that read alike would lose a value: kept as they came.
        let alike = map(vec![
            (Amqp::Long(7), Amqp::Int(1)),
            (Amqp::String("7".into()), Amqp::Int(2)),
        ]);
        assert_eq!(
            body_bytes(Body::Value(AmqpValue(alike))).1,
            Some(AMQP_ENCODED)
        );
        // No codec reads it: the runtime's decoding refuses it, and dead-letters it.
        assert_eq!(Codec::from_content_type(AMQP_ENCODED), None);
    }

    #[test]
    fn strings_binaries_and_data_keep_the_message_s_own_content_type() {
        let text = Body::Value(AmqpValue(Amqp::String("{\"n\":1}".into())));
        assert_eq!(body_bytes(text), (b"{\"n\":1}".to_vec(), None));
        let data = Body::Data(vec![Data(vec![1u8].into()), Data(vec![2u8].into())].into());
        assert_eq!(body_bytes(data), (vec![1, 2], None));
        assert_eq!(body_bytes(Body::Empty), (vec![], None));
    }

    fn amqp_value() -> impl Strategy<Value = Amqp> {
        let leaf = prop_oneof![
            Just(Amqp::Null),
            any::<bool>().prop_map(Amqp::Bool),
            any::<i64>().prop_map(Amqp::Long),
            any::<u64>().prop_map(Amqp::Ulong),
            any::<f64>().prop_map(|x| Amqp::Double(x.into())),
            any::<f32>().prop_map(|x| Amqp::Float(x.into())),
            ".{0,8}".prop_map(Amqp::String),
            "[a-z]{0,4}".prop_map(|s| Amqp::Symbol(Symbol::from(s))),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| Amqp::Binary(b.into())),
            any::<[u8; 4]>().prop_map(|b| Amqp::Decimal32(Dec32::from(b))),
            any::<char>().prop_map(Amqp::Char),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Amqp::List),
                proptest::collection::vec((inner.clone(), inner.clone()), 0..4).prop_map(map),
                (any::<u64>(), inner).prop_map(|(code, value)| {
                    Amqp::Described(Box::new(Described {
                        descriptor: Descriptor::Code(code),
                        value,
                    }))
                }),
            ]
        })
    }

    proptest! {
        /// Whatever value another client sends, the body is readable with the content
        /// type it is given, or is its exact AMQP encoding: never refused, never lost.
        #[test]
        fn every_amqp_value_is_read_or_kept(value in amqp_value()) {
            let (bytes, content_type) = body_bytes(Body::Value(AmqpValue(value.clone())));
            match content_type {
                Some(AMQP_ENCODED) => {
                    let back: AmqpValue<Amqp> = serde_amqp::from_slice(&bytes).unwrap();
                    prop_assert_eq!(back.0, value);
                }
                Some(content_type) => {
                    let codec = Codec::from_content_type(content_type).unwrap();
                    prop_assert!(codec.decode(&bytes).is_ok());
                }
                None => prop_assert!(matches!(value, Amqp::String(_) | Amqp::Binary(_))),
            }
        }
    }
}
