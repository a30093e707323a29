//! Short strings that are not UTF-8, made UTF-8 before lapin parses them.
//!
//! AMQP 0-9-1 says a short string (a header's name, `message_id`, `type`, a
//! delivery's routing key, ...) is UTF-8, but RabbitMQ passes on whatever bytes a
//! publisher wrote, and lapin's parser refuses a frame holding other bytes by closing
//! the whole connection. The message comes back at once, closes the connection again,
//! and no consumer or publisher of the driver gets anything done
//! (`docs/drivers/amqp091.md`, "Short strings that are not UTF-8"). Here each byte of
//! such a string that is not part of a valid UTF-8 sequence becomes `?`, in place: the
//! frame keeps its length, so nothing around it moves.
//!
//! Only the frames a publisher's bytes can reach are read: content headers (the
//! properties and the header table) and the methods that carry a routing key or a
//! reason (`basic.deliver`, `basic.get-ok`, `basic.return`, `channel.close`,
//! `connection.close`). A frame that does not read as its kind is left as it came, for
//! lapin to refuse as before.

/// The frame types of AMQP 0-9-1 (section 4.2.3) that hold short strings.
pub(crate) const METHOD_FRAME: u8 = 1;
/// A content header: the message's properties and header table.
pub(crate) const HEADER_FRAME: u8 = 2;

/// Rewrites, in `payload` (a frame's bytes between its size and its end octet), the
/// bytes of its short strings that are not UTF-8 to `?`. Returns how many it
/// rewrote; a payload that does not read as its frame type is left alone. A content
/// header whose message id is `id-\xff` comes out with `id-?`, one byte rewritten.
pub(crate) fn make_short_strings_utf8(frame_type: u8, payload: &mut [u8]) -> usize {
    let mut frame = Frame {
        bytes: payload,
        rewritten: 0,
    };
    let read = match frame_type {
        METHOD_FRAME => frame.method(),
        HEADER_FRAME => frame.content_header(),
        _ => Some(()),
    };
    if read.is_none() {
        tracing::debug!(
            frame_type,
            "a frame that does not read as its type; lapin will refuse it"
        );
    }
    frame.rewritten
}

/// A frame's payload being read from the start; each reader returns the offset after
/// what it read, or `None` when the payload ends first or holds what its type cannot.
struct Frame<'a> {
    bytes: &'a mut [u8],
    rewritten: usize,
}

/// (class, method) ids of the methods read here.
const CONNECTION_CLOSE: (u16, u16) = (10, 50);
const CHANNEL_CLOSE: (u16, u16) = (20, 40);
const BASIC_RETURN: (u16, u16) = (60, 50);
const BASIC_DELIVER: (u16, u16) = (60, 60);
const BASIC_GET_OK: (u16, u16) = (60, 71);

/// Content header property flags (bit 15 first), in the order the properties follow.
enum Property {
    ShortString,
    Table,
    Octet,
    Timestamp,
}

/// The basic class's properties, bit 15 down to bit 2 (section 1.8.1 of the spec).
const BASIC_PROPERTIES: [Property; 14] = [
    Property::ShortString, // content-type
    Property::ShortString, // content-encoding
    Property::Table,       // headers
    Property::Octet,       // delivery-mode
    Property::Octet,       // priority
    Property::ShortString, // correlation-id
    Property::ShortString, // reply-to
    Property::ShortString, // expiration
    Property::ShortString, // message-id
    Property::Timestamp,   // timestamp
    Property::ShortString, // type
    Property::ShortString, // user-id
    Property::ShortString, // app-id
    Property::ShortString, // cluster-id
];

impl Frame<'_> {
    fn method(&mut self) -> Option<()> {
        let id = (self.u16_at(0)?, self.u16_at(2)?);
        let at = 4;
        match id {
            // reply-code, reply-text, then ids (class, method) of the cause
            CONNECTION_CLOSE | CHANNEL_CLOSE => self.short_string(at + 2).map(drop),
            // reply-code, reply-text, exchange, routing-key
            BASIC_RETURN => {
                let at = self.short_string(at + 2)?;
                let at = self.short_string(at)?;
                self.short_string(at).map(drop)
            }
            // consumer-tag, delivery-tag, redelivered, exchange, routing-key
            BASIC_DELIVER => {
                let at = self.short_string(at)?;
                let at = self.short_string(at + 9)?;
                self.short_string(at).map(drop)
            }
            // delivery-tag, redelivered, exchange, routing-key, message-count
            BASIC_GET_OK => {
                let at = self.short_string(at + 9)?;
                self.short_string(at).map(drop)
            }
            _ => Some(()),
        }
    }

    /// class-id, weight, body size, property flags, then the properties they name.
    fn content_header(&mut self) -> Option<()> {
        let flags = self.u16_at(12)?;
        let mut at = 14;
        for (bit, property) in (2..16).rev().zip(BASIC_PROPERTIES.iter()) {
            if flags & (1 << bit) == 0 {
                continue;
            }
            at = match property {
                Property::ShortString => self.short_string(at)?,
                Property::Table => self.table(at)?,
                Property::Octet => at + 1,
                Property::Timestamp => at + 8,
            };
        }
        (at <= self.bytes.len()).then_some(())
    }

    /// A field table at `at`, its nested tables and arrays included, read without
    /// recursion: another client can nest them as deep as a frame allows.
    fn table(&mut self, at: usize) -> Option<usize> {
        // The end of each table or array being read, and whether it is a table (whose
        // entries start with a name).
        let mut open: Vec<(usize, bool)> = Vec::new();
        let mut at = self.container(at, true, &mut open)?;
        while let Some(&(end, is_table)) = open.last() {
            if at == end {
                open.pop();
                continue;
            }
            if is_table {
                at = self.short_string(at)?;
            }
            let tag = *self.bytes.get(at)?;
            at += 1;
            at = match tag {
                b'V' => at,
                b't' | b'b' | b'B' => at + 1,
                b's' | b'U' | b'u' => at + 2,
                b'I' | b'i' | b'f' => at + 4,
                b'D' => at + 5,
                b'L' | b'l' | b'd' | b'T' => at + 8,
                b'S' | b'x' => at + 4 + self.u32_at(at)?,
                b'F' => self.container(at, true, &mut open)?,
                b'A' => self.container(at, false, &mut open)?,
                _ => return None,
            };
            if at > end {
                return None;
            }
        }
        Some(at)
    }

    /// Opens the table or array whose size is at `at`: returns where its items start.
    fn container(
        &mut self,
        at: usize,
        is_table: bool,
        open: &mut Vec<(usize, bool)>,
    ) -> Option<usize> {
        let start = at + 4;
        let end = start.checked_add(self.u32_at(at)?)?;
        let within = open.last().map_or(self.bytes.len(), |&(outer, _)| outer);
        if end > within {
            return None;
        }
        open.push((end, is_table));
        Some(start)
    }

    /// The short string at `at` (a length octet, then its bytes), made UTF-8; returns
    /// the offset after it.
    fn short_string(&mut self, at: usize) -> Option<usize> {
        let len = usize::from(*self.bytes.get(at)?);
        let text = self.bytes.get_mut(at + 1..at + 1 + len)?;
        self.rewritten += replace_invalid_utf8(text);
        Some(at + 1 + len)
    }

    fn u16_at(&self, at: usize) -> Option<u16> {
        let bytes = self.bytes.get(at..at + 2)?;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32_at(&self, at: usize) -> Option<usize> {
        let bytes = self.bytes.get(at..at + 4)?;
        let size = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        usize::try_from(size).ok()
    }
}

/// Rewrites each byte of `text` that is not part of a valid UTF-8 sequence to `?`;
/// returns how many it rewrote.
fn replace_invalid_utf8(text: &mut [u8]) -> usize {
    let mut rewritten = 0;
    let mut at = 0;
    while let Err(e) = std::str::from_utf8(&text[at..]) {
        let bad_from = at + e.valid_up_to();
        let bad_to = e.error_len().map_or(text.len(), |n| bad_from + n);
        text[bad_from..bad_to].fill(b'?');
        rewritten += bad_to - bad_from;
        at = bad_to;
    }
    rewritten
}

#[cfg(test)]
mod tests {
    use super::*;

    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, gen_frame, parse_frame};
    use amq_protocol::protocol::{AMQPClass, basic};
    use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
    use proptest::prelude::*;

    /// The frame as amq-protocol writes it; its payload is between the 7-byte frame
    /// header and the end octet.
    fn encode(frame: &AMQPFrame) -> Vec<u8> {
        let (bytes, _) = cookie_factory::r#gen(gen_frame(frame), Vec::new()).expect("encodes");
        bytes
    }

    /// Runs the rewrite over an encoded frame's payload; returns how many bytes it
    /// rewrote.
    fn rewrite(bytes: &mut [u8]) -> usize {
        let end = bytes.len() - 1;
        make_short_strings_utf8(bytes[0], &mut bytes[7..end])
    }

    fn parse(bytes: &[u8]) -> AMQPFrame {
        let (rest, frame) = parse_frame(bytes).expect("lapin's parser reads the frame");
        assert!(rest.is_empty());
        frame
    }

    /// Replaces each occurrence of `marker` (an ASCII placeholder written by
    /// amq-protocol) in the encoded frame with `bytes` of the same length.
    fn overwrite(frame: &mut [u8], marker: &str, bytes: &[u8]) {
        assert_eq!(marker.len(), bytes.len());
        let at = frame
            .windows(marker.len())
            .position(|w| w == marker.as_bytes())
            .expect("the marker is in the frame");
        frame[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn header(properties: basic::AMQPProperties) -> AMQPFrame {
        AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 5,
                properties,
            },
        )
    }

    fn deliver(exchange: &str, routing_key: &str) -> AMQPFrame {
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 7,
                redelivered: true,
                exchange: exchange.into(),
                routing_key: routing_key.into(),
            })),
        )
    }

    /// The measured case of `docs/drivers/amqp091.md`: a header name pika wrote as
    /// bytes (`{b'k\xe9': 1}`), beside a message id and a type that are not UTF-8.
    #[test]
    fn a_content_header_with_bytes_for_names_and_ids_reads_with_question_marks() {
        let mut table = FieldTable::default();
        table.insert("kX".into(), AMQPValue::LongInt(1));
        table.insert("ok".into(), AMQPValue::LongString(LongString::from("v")));
        let properties = basic::AMQPProperties::default()
            .with_headers(table)
            .with_message_id(ShortString::from("MID"))
            .with_type(ShortString::from("TYPE"))
            .with_priority(3);
        let mut bytes = encode(&header(properties));
        overwrite(&mut bytes, "kX", b"k\xe9");
        overwrite(&mut bytes, "MID", b"\xff\xfeA");
        overwrite(&mut bytes, "TYPE", b"ab\xe2\x82"); // a sequence cut short
        assert!(
            parse_frame(bytes.as_slice()).is_err(),
            "lapin refuses it as it came"
        );

        assert_eq!(rewrite(&mut bytes), 5);
        let AMQPFrame::Header(_, header) = parse(&bytes) else {
            panic!("a content header")
        };
        let props = &header.properties;
        let headers = props.headers().as_ref().expect("headers");
        assert_eq!(headers.inner().get("k?"), Some(&AMQPValue::LongInt(1)));
        assert!(headers.inner().contains_key("ok"));
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("??A"));
        assert_eq!(props.kind().as_ref().map(|s| s.as_str()), Some("ab??"));
        assert_eq!(*props.priority(), Some(3));
    }

    /// Names inside nested tables and tables inside arrays are read too, at any depth
    /// (amq-protocol, which recurses, could neither write nor read this one).
    #[test]
    fn names_nested_in_tables_and_arrays_are_made_utf8_at_any_depth() {
        let sized = |tag: u8, items: &[u8]| {
            let mut bytes = vec![tag];
            bytes.extend_from_slice(&u32::try_from(items.len()).unwrap().to_be_bytes());
            bytes.extend_from_slice(items);
            bytes
        };
        // A table {"n\x80": true}, then 100,000 arrays [void, <the one inside>].
        let mut value = sized(b'F', b"\x02n\x80t\x01");
        for _ in 0..100_000 {
            value = sized(b'A', &[b"V".as_slice(), &value].concat());
        }
        let table = sized(0, &[b"\x04deep".as_slice(), &value].concat());
        let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0b0010_0000, 0];
        payload.extend_from_slice(&table[1..]);
        assert_eq!(make_short_strings_utf8(HEADER_FRAME, &mut payload), 1);
        assert!(payload.windows(2).any(|w| w == b"n?"));
    }

    #[test]
    fn a_deliverys_exchange_and_routing_key_are_made_utf8() {
        let mut bytes = encode(&deliver("exQ", "rk-Z"));
        overwrite(&mut bytes, "exQ", b"ex\xc0");
        overwrite(&mut bytes, "rk-Z", b"rk-\xff");
        assert_eq!(rewrite(&mut bytes), 2);
        let AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) = parse(&bytes)
        else {
            panic!("a basic.deliver")
        };
        assert_eq!(
            (d.exchange.as_str(), d.routing_key.as_str()),
            ("ex?", "rk-?")
        );
        assert_eq!((d.delivery_tag, d.redelivered), (7, true));
    }

    /// A frame that does not read as its type is left as it came (lapin refuses it).
    #[test]
    fn a_table_whose_size_reaches_past_the_frame_is_left_alone() {
        let mut table = FieldTable::default();
        table.insert("kX".into(), AMQPValue::LongInt(1));
        let mut bytes = encode(&header(
            basic::AMQPProperties::default().with_headers(table),
        ));
        overwrite(&mut bytes, "kX", b"k\xe9");
        let size_at = 7 + 14;
        bytes[size_at..size_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let before = bytes.clone();
        assert_eq!(rewrite(&mut bytes), 0);
        assert_eq!(bytes, before);
    }

    fn short_string() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..20)
            .prop_map(|chars| chars.into_iter().collect::<String>())
            .prop_filter("fits a short string", |s| s.len() <= 255)
    }

    fn field_value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                proptest::collection::btree_map(short_string(), inner, 0..4).prop_map(|m| {
                    let mut table = FieldTable::default();
                    for (k, v) in m {
                        table.insert(k.into(), v);
                    }
                    AMQPValue::FieldTable(table)
                }),
            ]
        })
    }

    fn properties() -> impl Strategy<Value = basic::AMQPProperties> {
        (
            proptest::option::of(short_string()),
            proptest::option::of(field_value()),
            proptest::option::of(any::<u8>()),
            proptest::option::of(short_string()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(short_string()),
        )
            .prop_map(|(content_type, headers, priority, id, timestamp, app)| {
                let mut p = basic::AMQPProperties::default();
                if let Some(s) = content_type {
                    p = p.with_content_type(s.into());
                }
                if let Some(AMQPValue::FieldTable(t)) = headers {
                    p = p.with_headers(t);
                }
                if let Some(n) = priority {
                    p = p.with_priority(n).with_delivery_mode(2);
                }
                if let Some(s) = id {
                    p = p.with_message_id(s.into()).with_correlation_id("c".into());
                }
                if let Some(t) = timestamp {
                    p = p.with_timestamp(t);
                }
                if let Some(s) = app {
                    p = p.with_app_id(s.into()).with_expiration("60000".into());
                }
                p
            })
    }

    proptest! {
        /// A frame whose strings are UTF-8, as every client that follows the spec
        /// writes them, passes untouched.
        #[test]
        fn frames_of_utf8_strings_pass_unchanged(props in properties(), exchange in short_string(), key in short_string()) {
            for frame in [header(props.clone()), deliver(&exchange, &key)] {
                let mut bytes = encode(&frame);
                let before = bytes.clone();
                prop_assert_eq!(rewrite(&mut bytes), 0);
                prop_assert_eq!(bytes, before);
            }
        }

        /// Whatever bytes stand in a message id and a header's name, the frame then
        /// reads, and reads as the bytes with `?` for each one that is not UTF-8.
        #[test]
        fn any_bytes_in_short_strings_read_after_the_rewrite(
            id in proptest::collection::vec(any::<u8>(), 8),
            name in proptest::collection::vec(any::<u8>(), 6),
        ) {
            let mut table = FieldTable::default();
            table.insert("NNNNNN".into(), AMQPValue::LongInt(1));
            let props = basic::AMQPProperties::default()
                .with_headers(table)
                .with_message_id("IIIIIIII".into());
            let mut bytes = encode(&header(props));
            overwrite(&mut bytes, "IIIIIIII", &id);
            overwrite(&mut bytes, "NNNNNN", &name);
            rewrite(&mut bytes);
            let AMQPFrame::Header(_, header) = parse(&bytes) else { panic!("a content header") };
            let lossy = |b: &[u8]| { let mut b = b.to_vec(); replace_invalid_utf8(&mut b); String::from_utf8(b).expect("UTF-8") };
            prop_assert_eq!(header.properties.message_id().as_ref().map(|s| s.to_string()), Some(lossy(&id)));
            let headers = header.properties.headers().clone().expect("headers");
            prop_assert!(headers.inner().contains_key(lossy(&name).as_str()));
        }
    }
}
