//! What must hold for the AMQP 1.0 driver's guard (`queue-amqp10/src/guard.rs`) on any
//! input: the fuzz target `amqp10_guard` runs it, and queue-amqp10's tests replay the
//! committed corpus through it.
//!
//! The input's first byte is the size of the transfer frames the message is split
//! into, its second the size of each read, the rest the message. The guard hands on
//! every byte, changes only the message's, at most one of them to 0xff and others
//! only from a compound's constructor to a binary's ([`read_as_binary`]) or in a
//! string made UTF-8 ([`mended_text`]), changes nothing more in what it handed on
//! up to a refused byte (a `?` mended where a constructor is read would be refused
//! there), never panics, and what fe2o3-amqp's decoder then makes of the message never nests deeper
//! than the guard allows, which a thread of 8 MiB holds (an overflow aborts the
//! fuzzer: a find), nor allocates 160 MiB or more at once (the guard refuses claims
//! from 128 MiB on; `cargo xtask fuzz` sets libFuzzer's malloc limit at that).

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use fe2o3_amqp_types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp_types::messaging::{Body, Message};
use fe2o3_amqp_types::primitives::SimpleValue;
use serde_amqp::Value;
use tokio::io::{AsyncRead, ReadBuf};

use crate::guard::{Guarded, MAX_DEPTH};
use crate::raw_value::RawValue;

/// The protocol header and the broker's `open` (container id "x"), after which frames
/// may be larger than 512 bytes.
pub const OPENED: &[u8] =
    b"AMQP\x00\x01\x00\x00\x00\x00\x00\x11\x02\x00\x00\x00\x00\x53\x10\xc0\x04\x01\xa1\x01x";

/// Checks one fuzz input.
pub fn check(data: &[u8]) {
    let [frame, step, message @ ..] = data else {
        return;
    };
    let (stream, places) = transfers(message, usize::from(*frame).max(1));
    let (out, read) = through_guard(&stream, usize::from(*step).max(1));
    read.expect("well-framed bytes read to their end");
    assert_eq!(out.len(), stream.len(), "every byte is handed on");
    let changed: Vec<usize> = (0..stream.len()).filter(|&i| out[i] != stream[i]).collect();
    let refused = changed.iter().filter(|&&at| out[at] == 0xff).count();
    assert!(refused <= 1, "at most one byte refused: {changed:?}");
    for &at in &changed {
        assert!(
            out[at] == 0xff
                || read_as_binary(stream[at], out[at])
                || mended_text(stream[at], out[at]),
            "{:#04x} became {:#04x}",
            stream[at],
            out[at]
        );
        assert!(
            places.iter().any(|p| p.contains(&at)),
            "only message bytes change"
        );
    }
    changes_no_more(&out, &changed, usize::from(*step).max(1));
    let payload: Vec<u8> = places
        .iter()
        .flat_map(|p| out[p.clone()].to_vec())
        .collect();
    // The decoder allocates what a size claims before it reads: the guard refuses any
    // claim of 128 MiB or more, so decoding what passed allocates less (`cargo xtask
    // fuzz` runs this target with a malloc limit that fails a larger allocation).
    if let Some(depth) = decoded_depth(payload, places.len() > 1) {
        // The map of a section is one level.
        assert!(
            depth <= MAX_DEPTH + 1,
            "the decoder went {depth} levels deep"
        );
    }
}

/// Checks that `out`, what the guard handed on with the bytes at `changed` changed,
/// read again `step` bytes at a time, changes no more up to a refused byte: a `?`
/// mended where a constructor is read would be refused there, and text mended twice
/// would change again. (The decoder stops at a refused byte, and the guard does not
/// read its own mark as the end.)
pub fn changes_no_more(out: &[u8], changed: &[usize], step: usize) {
    let (again, read) = through_guard(out, step);
    read.expect("what the guard handed on reads to its end");
    let decoded_up_to = changed
        .iter()
        .find(|&&at| out[at] == 0xff)
        .map_or(out.len(), |&at| at + 1);
    assert!(
        again[..decoded_up_to] == out[..decoded_up_to],
        "the guard changes what it handed on"
    );
}

/// Whether `to` is the constructor of a binary holding the same bytes as a value of
/// constructor `from`: a list's, a map's or an array's (the binary's size is theirs),
/// or a null's for an empty list.
pub fn read_as_binary(from: u8, to: u8) -> bool {
    matches!(
        (from, to),
        (0xc0 | 0xc1 | 0xe0, 0xa0) | (0xd0 | 0xd1 | 0xf0, 0xb0) | (0x45, 0x40)
    )
}

/// Whether `to` is what the guard makes of byte `from` of a string that is not UTF-8:
/// `?` for a byte of a sequence that is not, or the lowest continuation byte a
/// character begun in an earlier frame can take (a string's bytes are otherwise left
/// as they are).
pub fn mended_text(from: u8, to: u8) -> bool {
    (to == b'?' && from >= 0x80) || (matches!(to, 0x80 | 0x90 | 0xa0) && from != to)
}

/// The protocol header, then `message` in transfer frames of `frame` bytes on channel
/// 0, handle 1; with where each frame's part of the message lies.
fn transfers(message: &[u8], frame: usize) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
    let mut stream = OPENED.to_vec();
    let mut places = Vec::new();
    let chunks: Vec<&[u8]> = message.chunks(frame).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let more = if i + 1 < chunks.len() { 0x41 } else { 0x42 };
        let performative = [
            0x00, 0x53, 0x14, 0xc0, 0x0b, 0x06, 0x52, 0x01, 0x52, 0x07, 0xa0, 0x01, 0x09, 0x43,
            0x42, more,
        ];
        let size = 8 + performative.len() + chunk.len();
        stream.extend_from_slice(&(size as u32).to_be_bytes());
        stream.extend_from_slice(&[2, 0, 0, 0]);
        stream.extend_from_slice(&performative);
        places.push(stream.len()..stream.len() + chunk.len());
        stream.extend_from_slice(chunk);
    }
    (stream, places)
}

/// What comes out of the guard when `stream` arrives `step` bytes at a time, and how
/// the reading ended.
pub fn through_guard(stream: &[u8], step: usize) -> (Vec<u8>, std::io::Result<()>) {
    struct Trickle<'a>(&'a [u8], usize);
    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.1.min(self.0.len()).min(out.remaining());
            out.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Poll::Ready(Ok(()))
        }
    }
    let mut guard = Guarded::new(Trickle(stream, step));
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return (out, Ok(())),
            Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
            Poll::Ready(Err(error)) => return (out, Err(error)),
            Poll::Pending => panic!("the guard waits on bytes that are all there"),
        }
    }
}

/// How deep the values of the message's annotations, application properties and
/// footer nest, as fe2o3-amqp decodes it, on a thread of 8 MiB; `None` when it does
/// not decode. fe2o3-amqp reads a message of several frames with an `IoReader`, whose
/// reads ahead write the memory they claim, and one of a single frame from a slice.
fn decoded_depth(payload: Vec<u8>, several_frames: bool) -> Option<usize> {
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            let message: Message<Body<RawValue>> = if several_frames {
                let reader = serde_amqp::read::IoReader::new(std::io::Cursor::new(&payload));
                <Body<RawValue> as DecodeIntoMessage>::decode_message_from_reader(reader).ok()?
            } else {
                let reader = serde_amqp::read::SliceReader::new(&payload);
                <Body<RawValue> as DecodeIntoMessage>::decode_message_from_reader(reader).ok()?
            };
            let maps = [
                message.delivery_annotations.as_ref().map(|a| &a.0),
                message.message_annotations.as_ref().map(|a| &a.0),
                message.footer.as_ref().map(|a| &a.0),
            ];
            // Application properties are scalars, but for described values.
            let properties = message.application_properties.iter().flat_map(|p| {
                p.0.values().map(|value| match value {
                    SimpleValue::Described(described) => depth(&described.value) + 1,
                    _ => 0,
                })
            });
            let deepest = maps
                .into_iter()
                .flatten()
                .flat_map(|map| map.iter().map(|(_, value)| depth(value)))
                .chain(properties)
                .max();
            Some(deepest.unwrap_or(0) + 1)
        })
        .expect("a thread")
        .join()
        // A panic in the decoder (a debug build's overflow checks) is no abort.
        .unwrap_or(None)
}

/// Levels of nesting in a value, counted without recursion.
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut open = vec![(value, 0)];
    while let Some((value, level)) = open.pop() {
        deepest = deepest.max(level);
        match value {
            Value::List(items) => open.extend(items.iter().map(|v| (v, level + 1))),
            Value::Array(items) => open.extend(items.iter().map(|v| (v, level + 1))),
            Value::Map(map) => open.extend(
                map.iter()
                    .flat_map(|(k, v)| [(k, level + 1), (v, level + 1)]),
            ),
            Value::Described(described) => open.push((&described.value, level + 1)),
            _ => {}
        }
    }
    deepest
}
