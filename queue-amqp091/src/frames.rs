//! What lapin's parser would refuse in a frame from the broker, made acceptable before
//! it reads it (`docs/drivers/amqp091.md`, "Messages from other clients").
//!
//! lapin ends the whole connection on a frame it refuses; RabbitMQ then delivers the
//! same message again at once, and no consumer or publisher of the driver gets
//! anything done. Two kinds of frames that another client's message produces are
//! mended here:
//!
//! * **Short strings that are not UTF-8.** AMQP 0-9-1 says a short string (a header's
//!   name, `message_id`, `type`, a delivery's routing key, ...) is UTF-8, but RabbitMQ
//!   passes on whatever bytes a publisher wrote. Each byte of such a string that is not
//!   part of a valid UTF-8 sequence becomes `?`, in place: the frame keeps its length
//!   ([`make_short_strings_utf8`]). Only the frames a publisher's bytes can reach are
//!   read: content headers (the properties and the header table) and the methods that
//!   carry a routing key or a reason (`basic.deliver`, `basic.get-ok`, `basic.return`,
//!   `channel.close`, `connection.close`).
//! * **Content headers larger than `frame_max`**, which RabbitMQ sends whole whatever
//!   the consumer's `frame_max`: the largest entries of the header table are dropped
//!   and named ([`fit_content_header`]).
//!
//! A frame that does not read as its kind is left as it came, for lapin to refuse as
//! before.

use queue_core::names;

/// The frame types of AMQP 0-9-1 (section 4.2.3) that hold short strings.
pub(crate) const METHOD_FRAME: u8 = 1;
/// A content header: the message's properties and header table.
pub(crate) const HEADER_FRAME: u8 = 2;

/// Rewrites, in `payload` (a frame's bytes between its size and its end octet), the
/// bytes of its short strings that are not UTF-8 to `?`. Returns how many it
/// rewrote; a payload that does not read as its frame type is left alone. A content
/// header whose message id is `id-\xff` comes out with `id-?`, one byte rewritten.
pub(crate) fn make_short_strings_utf8(frame_type: u8, payload: &mut [u8]) -> usize {
    let mut frame = Frame::new(payload);
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
        return 0;
    }
    let not_utf8 = frame.not_utf8;
    not_utf8
        .into_iter()
        .map(|(start, end)| replace_invalid_utf8(&mut payload[start..end]))
        .sum()
}

/// The reply code and text of a `basic.return`, when `payload` (a method frame's,
/// made UTF-8 already) is one.
pub(crate) fn returned_reply(payload: &[u8]) -> Option<(u16, String)> {
    let mut frame = Frame::new(payload);
    if (frame.u16_at(0)?, frame.u16_at(2)?) != BASIC_RETURN {
        return None;
    }
    let reply_code = frame.u16_at(4)?;
    let end = frame.short_string(6)?;
    Some((
        reply_code,
        String::from_utf8_lossy(&payload[7..end]).into_owned(),
    ))
}

/// The message id of content header `payload` (made UTF-8 already); `None` when it
/// has none, or the header does not read.
pub(crate) fn message_id(payload: &[u8]) -> Option<String> {
    let mut frame = Frame::new(payload);
    frame.content_header()?;
    let (start, end) = frame.message_id?;
    Some(String::from_utf8_lossy(&payload[start..end]).into_owned())
}

/// The `frame_max` the broker proposes, when `payload` is its `connection.tune`
/// (channel-max, frame-max, heartbeat).
pub(crate) fn proposed_frame_max(payload: &[u8]) -> Option<u32> {
    // class 10 (connection), method 30 (tune)
    if payload.get(..4)? != [0, 10, 0, 30] {
        return None;
    }
    let size = payload.get(6..10)?;
    Some(u32::from_be_bytes([size[0], size[1], size[2], size[3]]))
}

/// A content header larger than the connection's `frame_max`, rebuilt to fit: the
/// largest entries of its header table dropped, and named in an entry of its own.
pub(crate) struct Fitted {
    /// The new payload.
    pub(crate) payload: Vec<u8>,
    /// What was dropped and why, as the `x_dropped_headers` entry says it.
    pub(crate) note: String,
}

/// The longest note [`fit_content_header`] writes.
const MAX_NOTE_BYTES: usize = 1024;

/// Rebuilds a content header `payload` larger than `max_payload` bytes (its frame's
/// `frame_max` less the frame's own 8) so that it fits: top-level entries of its
/// header table are dropped, largest first, and an entry `x_dropped_headers` names
/// them, as the runtime names what it drops from a copy. `None` when the payload
/// does not read as a content header or has no header table to shrink.
///
/// RabbitMQ sends a content header as one frame whatever the consumer's `frame_max`
/// (an AMQP 1.0 publisher's application properties become one header of any size,
/// dead-lettering adds `x-death`, and RabbitMQ takes frames of up to `frame_max` + 8
/// bytes from a publisher), and lapin ends the connection on a frame larger than its
/// `frame_max`: the message would come back at every reconnect.
pub(crate) fn fit_content_header(payload: &[u8], max_payload: usize) -> Option<Fitted> {
    let mut frame = Frame::new(payload);
    frame.entries = Some(Vec::new());
    frame.content_header()?;
    let (table_at, table_end) = frame.headers_table?;
    let starts = frame.entries.take().unwrap_or_default();
    let ends = starts.iter().skip(1).copied().chain([table_end]);
    let entries: Vec<(usize, usize)> = starts.iter().copied().zip(ends).collect();

    // The marker entry: its name, its tag, its size, then the note.
    let marker_room = 1 + names::X_DROPPED_HEADERS.len() + 1 + 4;
    let why = format!(
        ": the message's AMQP content header took {} bytes, more than the {} a frame of this connection may hold",
        payload.len() + 8,
        max_payload + 8
    );
    let name_at = |start: usize| {
        let len = usize::from(payload[start]);
        String::from_utf8_lossy(&payload[start + 1..start + 1 + len])
    };
    let mut dropped = vec![false; entries.len()];
    let mut said: Vec<String> = Vec::new();
    let mut size = payload.len();
    // The note's length before it is cut to MAX_NOTE_BYTES: each item and its ", ".
    let mut listed = 0;
    // A note the message carries already goes first in the new one, which replaces it.
    for (i, &(start, end)) in entries.iter().enumerate() {
        let value = &payload[start + 1 + usize::from(payload[start])..end];
        if name_at(start) == names::X_DROPPED_HEADERS && value.first() == Some(&b'S') {
            let earlier = String::from_utf8_lossy(&value[5..]).into_owned();
            dropped[i] = true;
            size -= end - start;
            listed += earlier.len() + 2;
            said.push(earlier);
        }
    }
    // RabbitMQ's dead-lettering bookkeeping goes first, unnamed: no handler is shown
    // it and no copy carries it (`crate::mapping`), and it grows at each hop through a
    // delay queue, which took the runtime's own retry copy past the frame and cost it
    // its largest header (review).
    for (i, &(start, end)) in entries.iter().enumerate() {
        if !dropped[i] && crate::mapping::is_dead_letter_bookkeeping(&name_at(start)) {
            dropped[i] = true;
            size -= end - start;
        }
    }
    if said.is_empty() && size <= max_payload {
        return Some(Fitted {
            payload: rebuilt(payload, &entries, &dropped, (table_at, table_end), None)?,
            note: String::new(),
        });
    }
    let fits = |size: usize, listed: usize| {
        size + marker_room + (listed + why.len()).min(MAX_NOTE_BYTES) <= max_payload
    };
    let mut by_size: Vec<usize> = (0..entries.len()).filter(|&i| !dropped[i]).collect();
    by_size.sort_by_key(|&i| std::cmp::Reverse(entries[i].1 - entries[i].0));
    for i in by_size {
        if fits(size, listed) {
            break;
        }
        let (start, end) = entries[i];
        let item = format!("{} ({} bytes)", name_at(start), end - start);
        dropped[i] = true;
        size -= end - start;
        listed += item.len() + 2;
        said.push(item);
    }
    if !fits(size, listed) {
        return None;
    }
    let note = queue_core::truncate(&format!("{}{why}", said.join(", ")), MAX_NOTE_BYTES);
    Some(Fitted {
        payload: rebuilt(
            payload,
            &entries,
            &dropped,
            (table_at, table_end),
            Some(&note),
        )?,
        note,
    })
}

/// A content header `payload` whose header table (`table_at..table_end`, its entries
/// at `entries`) keeps the entries not `dropped`, and ends with an
/// `x_dropped_headers` entry of `note` when there is one.
fn rebuilt(
    payload: &[u8],
    entries: &[(usize, usize)],
    dropped: &[bool],
    (table_at, table_end): (usize, usize),
    note: Option<&str>,
) -> Option<Vec<u8>> {
    let mut table = Vec::with_capacity(payload.len());
    for (i, &(start, end)) in entries.iter().enumerate() {
        if !dropped[i] {
            table.extend_from_slice(&payload[start..end]);
        }
    }
    if let Some(note) = note {
        let name = names::X_DROPPED_HEADERS.as_bytes();
        table.push(u8::try_from(name.len()).ok()?);
        table.extend_from_slice(name);
        table.push(b'S');
        table.extend_from_slice(&u32::try_from(note.len()).ok()?.to_be_bytes());
        table.extend_from_slice(note.as_bytes());
    }
    let mut fitted = Vec::with_capacity(payload.len());
    fitted.extend_from_slice(&payload[..table_at]);
    fitted.extend_from_slice(&u32::try_from(table.len()).ok()?.to_be_bytes());
    fitted.extend_from_slice(&table);
    fitted.extend_from_slice(&payload[table_end..]);
    Some(fitted)
}

/// A frame's payload being read from the start; each reader returns the offset after
/// what it read, or `None` when the payload ends first or holds what its type cannot.
struct Frame<'a> {
    bytes: &'a [u8],
    /// The short strings read that are not UTF-8 (their bytes' range).
    not_utf8: Vec<(usize, usize)>,
    /// Where a content header's table is (its size's offset, and its end).
    headers_table: Option<(usize, usize)>,
    /// Where each top-level entry of that table starts, when asked for (only fitting
    /// a header needs them: not the read of every delivery).
    entries: Option<Vec<usize>>,
    /// Where a content header's message id is (its bytes' range).
    message_id: Option<(usize, usize)>,
}

/// (class, method) ids of the methods read here.
const CONNECTION_CLOSE: (u16, u16) = (10, 50);
const CHANNEL_CLOSE: (u16, u16) = (20, 40);
const BASIC_RETURN: (u16, u16) = (60, 50);
const BASIC_DELIVER: (u16, u16) = (60, 60);
const BASIC_GET_OK: (u16, u16) = (60, 71);

/// What a content header's property is, to read past it.
enum Property {
    ShortString,
    Table,
    Octet,
    Timestamp,
}

/// The property flag bit of the message id.
const MESSAGE_ID_BIT: u32 = 7;

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

impl<'a> Frame<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Frame {
            bytes,
            not_utf8: Vec::new(),
            headers_table: None,
            entries: None,
            message_id: None,
        }
    }

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
                Property::ShortString if bit == MESSAGE_ID_BIT => {
                    let end = self.short_string(at)?;
                    self.message_id = Some((at + 1, end));
                    end
                }
                Property::ShortString => self.short_string(at)?,
                Property::Table => {
                    let end = self.table(at)?;
                    self.headers_table = Some((at, end));
                    end
                }
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
                if open.len() == 1
                    && let Some(entries) = &mut self.entries
                {
                    entries.push(at);
                }
                at = self.short_string_within(at, end)?;
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
                b'S' | b'x' => at.checked_add(4)?.checked_add(self.u32_at(at)?)?,
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

    /// The short string at `at` (a length octet, then its bytes), which must end by
    /// `limit`: noted when it is not UTF-8. Returns the offset after it.
    fn short_string_within(&mut self, at: usize, limit: usize) -> Option<usize> {
        let len = usize::from(*self.bytes.get(at)?);
        let after = at + 1 + len;
        if after > limit {
            return None;
        }
        if std::str::from_utf8(self.bytes.get(at + 1..after)?).is_err() {
            self.not_utf8.push((at + 1, after));
        }
        Some(after)
    }

    /// [`Frame::short_string_within`] the payload.
    fn short_string(&mut self, at: usize) -> Option<usize> {
        self.short_string_within(at, self.bytes.len())
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
    use amq_protocol::types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    };
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

    /// An encoded frame's payload.
    fn payload(bytes: &[u8]) -> &[u8] {
        &bytes[7..bytes.len() - 1]
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
        // A table {"n\x80": true} inside 100,000 arrays [void, <the one inside>],
        // written outside in: each array's size is what it holds.
        let inner = sized(b'F', b"\x02n\x80t\x01");
        let depth = 100_000;
        let mut value = Vec::with_capacity(depth * 6 + inner.len());
        for level in (1..=depth).rev() {
            value.push(b'A');
            let holds = 1 + 6 * (level - 1) + inner.len();
            value.extend_from_slice(&u32::try_from(holds).unwrap().to_be_bytes());
            value.push(b'V');
        }
        value.extend_from_slice(&inner);
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

    fn method(class: AMQPClass) -> AMQPFrame {
        AMQPFrame::Method(1, class)
    }

    /// The other methods whose strings another client's bytes reach.
    #[test]
    fn get_ok_return_and_closes_are_made_utf8() {
        use amq_protocol::protocol::{channel, connection};
        let get_ok = method(AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: 3,
            redelivered: false,
            exchange: "EXC".into(),
            routing_key: "RKEY".into(),
            message_count: 9,
        })));
        let returned = method(AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
            reply_code: 312,
            reply_text: "TEXT".into(),
            exchange: "EXC".into(),
            routing_key: "RKEY".into(),
        })));
        let channel_close = method(AMQPClass::Channel(channel::AMQPMethod::Close(
            channel::Close {
                reply_code: 404,
                reply_text: "TEXT".into(),
                class_id: 50,
                method_id: 10,
            },
        )));
        let connection_close = method(AMQPClass::Connection(connection::AMQPMethod::Close(
            connection::Close {
                reply_code: 320,
                reply_text: "TEXT".into(),
                class_id: 0,
                method_id: 0,
            },
        )));
        for (frame, markers) in [
            (get_ok, &["EXC", "RKEY"][..]),
            (returned, &["TEXT", "EXC", "RKEY"][..]),
            (channel_close, &["TEXT"][..]),
            (connection_close, &["TEXT"][..]),
        ] {
            let mut bytes = encode(&frame);
            for marker in markers {
                let mut odd = marker.as_bytes().to_vec();
                odd[0] = 0xff;
                overwrite(&mut bytes, marker, &odd);
            }
            assert_eq!(rewrite(&mut bytes), markers.len(), "{frame:?}");
            let mut expected = encode(&frame);
            for marker in markers {
                overwrite(
                    &mut expected,
                    marker,
                    format!("?{}", &marker[1..]).as_bytes(),
                );
            }
            assert_eq!(bytes, expected, "{frame:?}");
            parse(&bytes);
        }
    }

    #[test]
    fn only_a_return_has_a_reply_and_a_header_without_an_id_has_none() {
        let get_ok = method(AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: 3,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
            message_count: 9,
        })));
        assert_eq!(returned_reply(payload(&encode(&get_ok))), None);
        let no_id = basic::AMQPProperties::default().with_content_type("text/plain".into());
        assert_eq!(message_id(payload(&encode(&header(no_id)))), None);
        let with_id = basic::AMQPProperties::default().with_message_id("m-1".into());
        let bytes = encode(&header(with_id));
        assert_eq!(message_id(payload(&bytes)).as_deref(), Some("m-1"));
        // Cut short inside its properties: no id is read from it.
        assert_eq!(message_id(&payload(&bytes)[..16]), None);
    }

    /// A name that reaches past the table holding it: the frame does not read, and
    /// nothing of it is rewritten, not even the strings before it.
    #[test]
    fn a_frame_that_does_not_read_is_not_rewritten_at_all() {
        let mut nested = FieldTable::default();
        nested.insert("ab".into(), AMQPValue::Boolean(true));
        let mut table = FieldTable::default();
        table.insert("kX".into(), AMQPValue::FieldTable(nested));
        let mut bytes = encode(&header(
            basic::AMQPProperties::default()
                .with_headers(table)
                .with_content_type("MIME".into()),
        ));
        overwrite(&mut bytes, "MIME", b"MIM\xff");
        overwrite(&mut bytes, "kX", b"k\xe9");
        // "ab"'s length octet says 200: past its table and the frame.
        let at = bytes.windows(2).position(|w| w == b"ab").unwrap() - 1;
        bytes[at] = 200;
        let before = bytes.clone();
        assert_eq!(rewrite(&mut bytes), 0);
        assert_eq!(bytes, before);
    }

    /// RabbitMQ's `x-death` on a retry copy back from its delay queue took the
    /// runtime's own copy past a 4096-byte frame, and its largest header (3,800
    /// bytes) was dropped in its place (review). The bookkeeping goes first, unnamed.
    #[test]
    fn dead_letter_bookkeeping_goes_before_any_header_and_unnamed() {
        let mut table = FieldTable::default();
        table.insert(
            "pad".into(),
            AMQPValue::LongString(LongString::from(vec![b'p'; 3800])),
        );
        let mut death = FieldTable::default();
        death.insert(
            "queue".into(),
            AMQPValue::LongString(LongString::from(vec![b'q'; 200])),
        );
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        table.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString(LongString::from(vec![b'q'; 100])),
        );
        let properties = basic::AMQPProperties::default().with_headers(table);
        let bytes = encode(&header(properties));
        let payload = &bytes[7..bytes.len() - 1];
        assert!(payload.len() > 4096 - 8);
        let fitted = fit_content_header(payload, 4096 - 8).expect("fits");
        assert_eq!(fitted.note, "", "nothing a handler sees was dropped");
        let (rest, header) =
            amq_protocol::frame::parsing::parse_content_header(fitted.payload.as_slice())
                .expect("reads");
        assert!(rest.is_empty());
        let headers = header.properties.headers().clone().expect("headers");
        let headers = headers.inner();
        assert!(headers.contains_key("pad"), "{headers:?}");
        assert!(!headers.contains_key("x-death"));
        assert!(!headers.contains_key("x-first-death-queue"));
        assert!(!headers.contains_key(names::X_DROPPED_HEADERS));
    }

    /// The measured case: Qpid Proton's 200 KB of application properties, which
    /// RabbitMQ hands 0-9-1 consumers as one header in one frame.
    #[test]
    fn a_content_header_past_frame_max_drops_its_largest_headers() {
        let mut table = FieldTable::default();
        table.insert(
            "x-amqp-1.0-app-properties".into(),
            AMQPValue::LongString(LongString::from(vec![0xa1; 200_000])),
        );
        table.insert("kept".into(), AMQPValue::LongInt(7));
        table.insert(
            "second".into(),
            AMQPValue::LongString(LongString::from(vec![b'y'; 1000])),
        );
        let properties = basic::AMQPProperties::default()
            .with_headers(table)
            .with_message_id("the-id".into())
            .with_delivery_mode(2);
        let bytes = encode(&header(properties));
        let payload = &bytes[7..bytes.len() - 1];
        let fitted = fit_content_header(payload, 131_072 - 8).expect("fits");
        assert!(fitted.payload.len() <= 131_072 - 8);
        assert!(
            fitted
                .note
                .starts_with("x-amqp-1.0-app-properties (200031 bytes): "),
            "{}",
            fitted.note
        );
        assert!(
            fitted.note.contains("more than the 131072"),
            "{}",
            fitted.note
        );
        let (rest, header) =
            amq_protocol::frame::parsing::parse_content_header(fitted.payload.as_slice())
                .expect("reads");
        assert!(rest.is_empty());
        let props = header.properties;
        let headers = props.headers().clone().expect("headers");
        let headers = headers.inner();
        assert_eq!(headers.get("kept"), Some(&AMQPValue::LongInt(7)));
        assert!(headers.contains_key("second"), "only as many as needed go");
        assert!(!headers.contains_key("x-amqp-1.0-app-properties"));
        assert_eq!(
            headers.get(names::X_DROPPED_HEADERS),
            Some(&AMQPValue::LongString(LongString::from(
                fitted.note.as_bytes()
            )))
        );
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some("the-id")
        );
        assert_eq!((header.class_id, header.body_size), (60, 5));
    }

    /// A content header of `entries` headers of `each` bytes (name and value
    /// included), and the payload amq-protocol writes for it.
    fn header_of(entries: usize, each: usize, extra: Option<&str>) -> Vec<u8> {
        let mut table = FieldTable::default();
        for i in 0..entries {
            let name = format!("h{i:05}");
            // name's length octet and bytes, the tag, the value's size
            let value = vec![b'v'; each - (1 + name.len() + 1 + 4)];
            table.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        if let Some(note) = extra {
            table.insert(
                names::X_DROPPED_HEADERS.into(),
                AMQPValue::LongString(LongString::from(note.as_bytes())),
            );
        }
        let bytes = encode(&header(
            basic::AMQPProperties::default().with_headers(table),
        ));
        bytes[7..bytes.len() - 1].to_vec()
    }

    fn fitted_headers(fitted: &Fitted) -> FieldTable {
        let (_, header) =
            amq_protocol::frame::parsing::parse_content_header(fitted.payload.as_slice())
                .expect("reads");
        header.properties.headers().clone().expect("headers")
    }

    /// Ten bytes over takes one 500-byte header away, not three.
    #[test]
    fn only_as_many_headers_go_as_it_takes() {
        let payload = header_of(20, 500, None);
        let fitted = fit_content_header(&payload, payload.len() - 10).expect("fits");
        assert_eq!(
            fitted_headers(&fitted).inner().len(),
            20,
            "19 kept and the note"
        );
    }

    /// A note the message carries already (a copy the runtime made, say) is not lost:
    /// the new one starts with it.
    #[test]
    fn an_earlier_note_leads_the_new_one() {
        let payload = header_of(20, 500, Some("priority: must be 0..9"));
        let fitted = fit_content_header(&payload, payload.len() - 10).expect("fits");
        assert!(
            fitted.note.starts_with("priority: must be 0..9, h"),
            "{}",
            fitted.note
        );
        let headers = fitted_headers(&fitted);
        assert_eq!(
            headers.inner().get(names::X_DROPPED_HEADERS),
            Some(&AMQPValue::LongString(LongString::from(
                fitted.note.as_bytes()
            )))
        );
    }

    /// Thousands of small headers dropped: the note is cut to its limit, and the header
    /// still fits the smallest frame AMQP allows.
    #[test]
    fn a_long_note_is_cut_and_still_fits() {
        let payload = header_of(3000, 40, None);
        let fitted = fit_content_header(&payload, 4096 - 8).expect("fits");
        assert!(fitted.payload.len() <= 4096 - 8);
        assert!(fitted.note.len() <= MAX_NOTE_BYTES);
        assert!(fitted.note.contains("(truncated from "), "{}", fitted.note);
        fitted_headers(&fitted);
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
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
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
            let returned = method(AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: 312,
                reply_text: key.as_str().into(),
                exchange: exchange.as_str().into(),
                routing_key: key.as_str().into(),
            })));
            for frame in [header(props.clone()), deliver(&exchange, &key), returned] {
                let mut bytes = encode(&frame);
                let before = bytes.clone();
                prop_assert_eq!(rewrite(&mut bytes), 0);
                prop_assert_eq!(bytes, before);
            }
        }

        /// The message id read from any content header is the one it was written
        /// with, and a return's reply is read as written.
        #[test]
        fn a_headers_message_id_and_a_returns_reply_read_as_written(props in properties(), text in short_string()) {
            let id = props.message_id().as_ref().map(|id| id.to_string());
            prop_assert_eq!(message_id(payload(&encode(&header(props)))), id);
            let returned = method(AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: 312,
                reply_text: text.as_str().into(),
                exchange: "".into(),
                routing_key: "q".into(),
            })));
            prop_assert_eq!(returned_reply(payload(&encode(&returned))), Some((312, text)));
        }

        /// A content header fitted to any `frame_max` reads, within it, with every
        /// header it kept as it was and the dropped ones named.
        #[test]
        fn a_fitted_content_header_reads_within_its_frame_max(
            props in properties(),
            filler in proptest::collection::vec(1usize..8000, 1..6),
            room in 0.0f64..1.0,
        ) {
            let mut props = props;
            let mut table = props.headers().clone().unwrap_or_default();
            for (i, size) in filler.iter().enumerate() {
                table.insert(format!("fill{i}").into(), AMQPValue::LongString(LongString::from(vec![b'f'; *size])));
            }
            props = props.with_headers(table.clone());
            let bytes = encode(&header(props.clone()));
            let payload = &bytes[7..bytes.len() - 1];
            prop_assume!(payload.len() + 8 > 4096);
            // Anywhere from AMQP's smallest frame_max to just under this frame.
            let frame_max = 4096 + ((payload.len() + 8 - 4096) as f64 * room) as usize;
            prop_assume!(payload.len() > frame_max - 8);
            let fitted = fit_content_header(payload, frame_max - 8).expect("fits");
            prop_assert!(fitted.payload.len() <= frame_max - 8);
            let (rest, fitted_header) = amq_protocol::frame::parsing::parse_content_header(fitted.payload.as_slice()).expect("reads");
            prop_assert!(rest.is_empty());
            let kept = fitted_header.properties.headers().clone().expect("headers");
            for (name, value) in kept.inner() {
                if name.as_str() == names::X_DROPPED_HEADERS {
                    continue;
                }
                prop_assert_eq!(table.inner().get(name), Some(value));
            }
            let named = |name: &str| {
                fitted.note.starts_with(&format!("{name} ("))
                    || fitted.note.contains(&format!(", {name} ("))
                    || fitted.note.contains("(truncated from ")
            };
            for name in table.inner().keys() {
                prop_assert!(kept.inner().contains_key(name) || named(name.as_str()), "{} lost without a word: {}", name, fitted.note);
            }
            // Every other property as it was.
            let unheaded = |p: &basic::AMQPProperties| p.clone().with_headers(FieldTable::default());
            prop_assert_eq!(unheaded(&fitted_header.properties), unheaded(&props));
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
