//! Body codecs: `json` (the default) and `msgpack`.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeSeed;

use crate::tape::{Tape, TapeWriter};
use crate::{Error, Result, Value};

/// How a body travels on the wire. The wire content type is always the codec's.
///
/// ```
/// use queue_core::{Codec, Value};
/// let body = Value::map([("n", Value::Int(5)), ("x", Value::Float(5.0))]);
/// for codec in [Codec::Json, Codec::MsgPack] {
///     let bytes = codec.encode(&body).unwrap();
///     assert_eq!(codec.decode(&bytes).unwrap(), body);
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// JSON (`application/json`): readable everywhere; no NaN, Infinity or raw bytes.
    #[default]
    Json,
    /// MessagePack (`application/msgpack`): compact; carries bytes and non-finite floats.
    MsgPack,
}

/// A content type without its parameters (`; charset=...`) and surrounding blanks.
pub(crate) fn base_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Values nested deeper than this are refused, on encode and on decode.
pub const MAX_DEPTH: usize = 128;

impl Codec {
    /// The content type written on the wire.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::MsgPack => "application/msgpack",
        }
    }

    /// The codec for a wire content type, its parameters and letter case aside (also
    /// accepts `application/x-msgpack` and `application/vnd.msgpack`).
    pub fn from_content_type(content_type: &str) -> Option<Codec> {
        // The types this crate writes, as it writes them: every delivery of its own
        // messages asks, and this skips the parse below (about 2% of a delivery's
        // dispatch to Lua, docs/performance.md "Lua module").
        match content_type {
            "application/json" => return Some(Codec::Json),
            "application/msgpack" => return Some(Codec::MsgPack),
            _ => {}
        }
        let base = base_type(content_type);
        let is = |name: &str| base.eq_ignore_ascii_case(name);
        if is("application/json") {
            Some(Codec::Json)
        } else if [
            "application/msgpack",
            "application/x-msgpack",
            "application/vnd.msgpack",
        ]
        .into_iter()
        .any(is)
        {
            Some(Codec::MsgPack)
        } else {
            None
        }
    }

    /// The configuration name (`json`, `msgpack`).
    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::MsgPack => "msgpack",
        }
    }

    /// Encodes a body. JSON refuses NaN, Infinity and bytes with `INVALID` (suggesting
    /// msgpack); both refuse nesting deeper than [`MAX_DEPTH`].
    pub fn encode(self, value: &Value) -> Result<Vec<u8>> {
        check_encodable(
            self,
            value,
            0,
            &mut String::from("data"),
            ": use codec msgpack",
            Some(&mut 0),
        )?;
        match self {
            Codec::Json => serde_json::to_vec(value)
                .map_err(|e| Error::invalid(format!("cannot encode body as json: {e}"))),
            Codec::MsgPack => rmp_serde::to_vec(value)
                .map_err(|e| Error::invalid(format!("cannot encode body as msgpack: {e}"))),
        }
    }

    /// Checks that `value` can be encoded, without encoding it: what cannot is named
    /// by its path from `root`, and the error gives no advice (for values that are
    /// not message bodies, such as a log line's fields).
    ///
    /// ```
    /// use queue_core::{Codec, Value};
    /// let err = Codec::Json.check(&Value::Float(f64::NAN), "fields").unwrap_err();
    /// assert_eq!(err.message(), "fields is NaN, which json cannot carry");
    /// ```
    pub fn check(self, value: &Value, root: &str) -> Result<()> {
        check_encodable(self, value, 0, &mut root.to_string(), "", None)
    }

    /// Decodes a body; malformed input is `INVALID` naming the codec.
    pub fn decode(self, bytes: &[u8]) -> Result<Value> {
        let mut tape = Tape::new();
        self.decode_onto(bytes, &mut tape)?;
        Ok(tape.value())
    }

    /// Decodes a body onto `tape`, replacing what it held: [`Codec::decode`] without
    /// building a tree, for a consumer that reuses one tape for every delivery.
    /// Malformed input is `INVALID` naming the codec, and leaves on the tape the part of
    /// the body read before the error, which the next decode replaces.
    pub fn decode_onto(self, bytes: &[u8], tape: &mut Tape) -> Result<()> {
        tape.clear();
        let mut writer = TapeWriter::new(tape);
        let decoded = match self {
            Codec::Json => {
                let mut deserializer = serde_json::Deserializer::from_slice(bytes);
                // The writer refuses nesting past MAX_DEPTH, which bounds the
                // recursion; serde_json's own limit would refuse MAX_DEPTH itself.
                deserializer.disable_recursion_limit();
                (&mut writer)
                    .deserialize(&mut deserializer)
                    .and_then(|()| deserializer.end())
                    .map_err(|e| e.to_string())
            }
            Codec::MsgPack => decode_whole_msgpack(bytes, &mut writer),
        };
        match decoded {
            Ok(()) => Ok(()),
            Err(_) if writer.too_deep => Err(Error::invalid(format!(
                "body is nested deeper than {MAX_DEPTH} levels"
            ))),
            Err(e) => Err(Error::invalid(format!("body is not valid {self}: {e}"))),
        }
    }
}

/// One msgpack value that takes every byte: bytes after it mean the body is something
/// else (JSON sent with the msgpack content type starts with a valid msgpack integer).
fn decode_whole_msgpack(bytes: &[u8], writer: &mut TapeWriter) -> std::result::Result<(), String> {
    let mut reader = bytes;
    let mut deserializer = rmp_serde::Deserializer::new(&mut reader);
    writer
        .deserialize(&mut deserializer)
        .map_err(|e| e.to_string())?;
    if !reader.is_empty() {
        return Err(format!("{} bytes follow the first value", reader.len()));
    }
    Ok(())
}

/// `level` counts the containers around `value`; the decoder refuses a container with
/// [`MAX_DEPTH`] around it, even an empty one, so encoding refuses the same. `counted`,
/// for a body, counts the values and map keys checked so far: the decoder refuses a body of more
/// than [`crate::tape::MAX_ITEMS`], so encoding does too (a body that passed a raised
/// `max_message_bytes` was published, and no consumer could decode it: review).
/// `advice` ends the message of what json cannot carry.
fn check_encodable(
    codec: Codec,
    value: &Value,
    level: usize,
    path: &mut String,
    advice: &str,
    mut counted: Option<&mut usize>,
) -> Result<()> {
    let is_container = matches!(value, Value::Array(_) | Value::Map(_));
    if is_container && level >= MAX_DEPTH {
        return Err(Error::invalid(format!(
            "{path} is nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let keys = match value {
        Value::Map(map) => map.len(),
        _ => 0,
    };
    if let Some(counted) = counted.as_deref_mut() {
        *counted += 1 + keys;
        if *counted > crate::tape::MAX_ITEMS {
            return Err(Error::invalid(format!(
                "{path} makes the body hold more than {} values (map keys counted), the most a body may: no consumer could decode it",
                crate::tape::MAX_ITEMS
            )));
        }
    }
    match value {
        Value::Float(f) if codec == Codec::Json && !f.is_finite() => Err(Error::invalid(format!(
            "{path} is {f}, which json cannot carry{advice}"
        ))),
        Value::Bytes(_) if codec == Codec::Json => Err(Error::invalid(format!(
            "{path} is not valid UTF-8, which json cannot carry{advice}"
        ))),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{}]", i + 1));
                check_encodable(codec, item, level + 1, path, advice, counted.as_deref_mut())?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Map(map) => {
            for (k, v) in map {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                check_encodable(codec, v, level + 1, path, advice, counted.as_deref_mut())?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Codec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "json" => Ok(Codec::Json),
            "msgpack" => Ok(Codec::MsgPack),
            other => Err(Error::invalid(format!(
                "unknown codec {other:?}: expected \"json\" or \"msgpack\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float),
            ".*".prop_map(Value::String),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(".*", inner, 0..8).prop_map(Value::Map),
            ]
        })
    }

    fn json_safe(value: &Value) -> bool {
        match value {
            Value::Float(f) => f.is_finite(),
            Value::Bytes(_) => false,
            Value::Array(items) => items.iter().all(json_safe),
            Value::Map(map) => map.values().all(json_safe),
            _ => true,
        }
    }

    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Float(x), Value::Float(y)) => {
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
            }
            (Value::Map(x), Value::Map(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((ka, a), (kb, b))| ka == kb && same(a, b))
            }
            _ => a == b,
        }
    }

    proptest! {
        #[test]
        fn msgpack_round_trips_every_value(value in arb_value()) {
            let bytes = Codec::MsgPack.encode(&value).unwrap();
            let back = Codec::MsgPack.decode(&bytes).unwrap();
            prop_assert!(same(&value, &back), "{value:?} came back as {back:?}");
        }

        #[test]
        fn json_round_trips_what_it_accepts_and_refuses_the_rest(value in arb_value()) {
            match Codec::Json.encode(&value) {
                Ok(bytes) => {
                    prop_assert!(json_safe(&value));
                    let back = Codec::Json.decode(&bytes).unwrap();
                    prop_assert!(same(&value, &back), "{value:?} came back as {back:?}");
                }
                Err(err) => {
                    prop_assert!(!json_safe(&value));
                    prop_assert_eq!(err.kind(), ErrorKind::Invalid);
                    prop_assert!(err.message().contains("msgpack"));
                }
            }
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            for codec in [Codec::Json, Codec::MsgPack] {
                if let Err(err) = codec.decode(&bytes) {
                    prop_assert_eq!(err.kind(), ErrorKind::Invalid);
                }
            }
        }
    }

    #[test]
    fn a_body_with_bytes_after_its_value_is_not_that_value() {
        // JSON sent with the msgpack content type: `123` is a valid msgpack integer
        // (0x31 = 49) followed by two more bytes.
        let err = Codec::MsgPack.decode(b"123").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.message().contains("2 bytes follow"), "{err}");
        let mut bytes = Codec::MsgPack.encode(&Value::Int(7)).unwrap();
        bytes.push(0xc0);
        assert!(Codec::MsgPack.decode(&bytes).is_err());
        assert!(Codec::Json.decode(b"123 456").is_err());
        assert_eq!(Codec::Json.decode(b" 123 ").unwrap(), Value::Int(123));
    }

    #[test]
    fn integer_and_float_stay_apart() {
        for codec in [Codec::Json, Codec::MsgPack] {
            let v = Value::Array(vec![Value::Int(5), Value::Float(5.0), Value::Float(-0.5)]);
            assert_eq!(codec.decode(&codec.encode(&v).unwrap()).unwrap(), v);
        }
    }

    #[test]
    fn json_names_the_path_of_what_it_cannot_carry() {
        let v = Value::map([(
            "items",
            Value::Array(vec![Value::Int(1), Value::Float(f64::NAN)]),
        )]);
        let err = Codec::Json.encode(&v).unwrap_err();
        assert!(err.message().contains("data.items[2]"), "{err}");
    }

    #[test]
    fn too_deep_is_invalid() {
        let mut v = Value::Int(1);
        for _ in 0..=MAX_DEPTH + 1 {
            v = Value::Array(vec![v]);
        }
        assert_eq!(
            Codec::MsgPack.encode(&v).unwrap_err().kind(),
            ErrorKind::Invalid
        );
    }

    #[test]
    fn decoding_too_deep_is_invalid_and_says_so() {
        let nested = |levels: usize| {
            let mut v = Value::Int(1);
            for _ in 0..levels {
                v = Value::Array(vec![v]);
            }
            v
        };
        // Encoding checks the depth too: write the msgpack by hand.
        let deep = rmp_serde::to_vec(&nested(MAX_DEPTH + 1)).unwrap();
        let err = Codec::MsgPack.decode(&deep).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(
            err.message()
                .contains(&format!("nested deeper than {MAX_DEPTH} levels")),
            "{err}"
        );
        // A flood of brackets stops at the limit, with the same words.
        let err = Codec::Json.decode(&[b'['; 1 << 20]).unwrap_err();
        assert!(
            err.message()
                .contains(&format!("nested deeper than {MAX_DEPTH} levels")),
            "{err}"
        );
        let deepest = rmp_serde::to_vec(&nested(MAX_DEPTH)).unwrap();
        assert_eq!(Codec::MsgPack.decode(&deepest).unwrap(), nested(MAX_DEPTH));
    }

    #[test]
    fn what_either_codec_encodes_at_the_deepest_nesting_it_decodes() {
        let mut value = Value::Int(1);
        for _ in 0..MAX_DEPTH {
            value = Value::Array(vec![value]);
        }
        for codec in [Codec::Json, Codec::MsgPack] {
            let bytes = codec.encode(&value).unwrap();
            assert_eq!(codec.decode(&bytes).unwrap(), value, "{codec}");
        }
    }

    #[test]
    fn what_either_codec_refuses_to_decode_it_refuses_to_encode() {
        // The decoder counts containers: an empty one at the bottom is a level too.
        for innermost in [Value::Array(vec![]), Value::Map(Default::default())] {
            let mut value = innermost;
            for _ in 0..MAX_DEPTH {
                value = Value::Array(vec![value]);
            }
            for codec in [Codec::Json, Codec::MsgPack] {
                let err = codec.encode(&value).unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Invalid, "{codec}");
                assert!(
                    err.message()
                        .contains(&format!("nested deeper than {MAX_DEPTH} levels")),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let body = Codec::Json.decode(br#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(
            body,
            Value::map([("a", Value::Int(3)), ("b", Value::Int(2))])
        );
    }

    #[test]
    fn a_reused_tape_holds_only_the_latest_body() {
        let mut tape = Tape::new();
        Codec::Json
            .decode_onto(br#"{"first": "a long string"}"#, &mut tape)
            .unwrap();
        let err = Codec::Json
            .decode_onto(br#"{"half": ["writ"#, &mut tape)
            .unwrap_err();
        assert!(err.message().starts_with("body is not valid json"), "{err}");
        Codec::MsgPack
            .decode_onto(
                &Codec::MsgPack.encode(&Value::from("b")).unwrap(),
                &mut tape,
            )
            .unwrap();
        assert_eq!(tape.value(), Value::from("b"));
        assert_eq!(tape.items().len(), 1);
    }

    #[test]
    fn integers_past_i64_and_keys_that_are_not_strings_are_invalid() {
        let err = Codec::Json.decode(b"18446744073709551615").unwrap_err();
        assert!(err.message().contains("does not fit"), "{err}");
        // A msgpack map {1: 2}.
        let err = Codec::MsgPack.decode(&[0x81, 0x01, 0x02]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.message().contains("expected a string"), "{err}");
    }

    /// Each value of a body takes an item on the tape (24 bytes), and a msgpack nil
    /// one byte of the body: a 128 MiB body of nils asked for 3 GiB outside Lua's
    /// memory limit, which nils do not reach. A body of more values than
    /// [`crate::tape::MAX_ITEMS`] is refused.
    #[test]
    fn a_body_of_more_values_than_a_tape_holds_is_invalid() {
        let nils = crate::tape::MAX_ITEMS + 1;
        let mut body = vec![0xdd];
        body.extend_from_slice(&u32::try_from(nils).unwrap().to_be_bytes());
        body.resize(body.len() + nils, 0xc0);
        let mut tape = Tape::new();
        let err = Codec::MsgPack.decode_onto(&body, &mut tape).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.message().contains("values"), "{err}");
        let json = format!("[{}0]", "0,".repeat(nils - 1));
        let err = Codec::Json
            .decode_onto(json.as_bytes(), &mut tape)
            .unwrap_err();
        assert!(err.message().contains("values"), "{err}");
    }

    /// What one encodes, it decodes: a body of more values than a tape holds is
    /// refused when it is encoded too. It was published (under a raised
    /// `max_message_bytes`) and dead-lettered at its first delivery, undecodable
    /// there too (review).
    #[test]
    fn a_body_of_more_values_than_a_tape_holds_is_not_encoded() {
        // The list's own item and its nils: as many items as a tape holds.
        let most = Value::Array(vec![Value::Nil; crate::tape::MAX_ITEMS - 1]);
        let bytes = Codec::MsgPack.encode(&most).expect("the most a body holds");
        assert!(Codec::MsgPack.decode(&bytes).is_ok());
        let one_more = Value::Array(vec![Value::Nil; crate::tape::MAX_ITEMS]);
        let err = Codec::MsgPack.encode(&one_more).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(
            err.message().contains("no consumer could decode it"),
            "{err}"
        );
        // Map keys count, as the tape holds them.
        let wide = Value::Map(
            (0..crate::tape::MAX_ITEMS / 2)
                .map(|i| (i.to_string(), Value::Nil))
                .collect(),
        );
        assert!(Codec::Json.encode(&wide).is_err());
    }

    #[test]
    fn content_types_map_back() {
        for codec in [Codec::Json, Codec::MsgPack] {
            assert_eq!(Codec::from_content_type(codec.content_type()), Some(codec));
            assert_eq!(codec.name().parse::<Codec>().unwrap(), codec);
        }
        assert_eq!(
            Codec::from_content_type("application/json; charset=utf-8"),
            Some(Codec::Json)
        );
        assert_eq!(Codec::from_content_type("text/plain"), None);
    }
}
