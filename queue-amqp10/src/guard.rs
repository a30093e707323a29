//! A guard on the bytes the broker sends, in front of fe2o3-amqp (docs/drivers/amqp10.md,
//! "Bodies from other clients").
//!
//! fe2o3-amqp decodes a message's annotations, application properties and footer
//! whole, recursing once per level of nesting without a limit: a message of 750 KB,
//! an annotation nested 250,000 lists deep, overflowed even a 128 MiB stack and
//! aborted the process, at every start while the message waited in its queue. The
//! client library offers no hook before that decoding, so the guard sits under it, on
//! the connection's byte stream: it frames what the broker sends, follows each
//! transfer's message sections as they arrive, and where a value would open a level
//! deeper than [`MAX_DEPTH`] it overwrites that value's first byte with one no AMQP
//! type starts with. fe2o3-amqp's decoder then stops there with an error, and the
//! driver rejects the message as any it cannot decode (`consume.rs`).
//!
//! The guard reads the sections the way that decoder does, so the two agree on where
//! every value starts: compounds item by item, by their count; the `header` and
//! `properties` lists only as far as their fields go (a list with more items than
//! fields has its first item overwritten: the decoder would read the rest as further
//! sections); body sections by their sizes, as the driver takes them undecoded
//! (`body.rs` reads those with limits of its own). Frames are handed on whole as soon
//! as they are checked, never held back: every byte the guard overwrites is one it
//! decides on as it first reads it, in the frame at hand (a value's header split
//! between two frames is read on from a copy of its first bytes). Anything that is
//! not AMQP framing (a protocol header, SASL) passes as it is.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Levels of nesting (lists, maps, arrays, described values) a value in a message's
/// annotations, properties or footer may open, as in the body decoder.
pub(crate) const MAX_DEPTH: usize = 128;

/// A byte no AMQP encoding starts with.
const NO_TYPE: u8 = 0xff;

/// Frames larger than this are not AMQP (an HTTP answer read as a frame header is over
/// a gigabyte): the guard hands on everything from there as it is.
const MAX_FRAME: usize = 64 << 20;

/// How much the guard reads from the socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// fe2o3-amqp's decoder refuses arrays counting more (`serde_amqp::de::MAX_ARRAY_COUNT`).
const MAX_ARRAY_COUNT: u64 = 65_536;

/// The connection's stream with the guard on what it reads; writes pass as they are.
pub(crate) struct Guarded<S> {
    inner: S,
    /// What was read and not yet handed on; `buf[..end]` holds stream bytes from
    /// absolute offset `base`.
    buf: Vec<u8>,
    end: usize,
    base: u64,
    /// Stream offsets: handed on up to `released`, framed and checked up to `checked`
    /// (what is checked may be handed on).
    released: u64,
    checked: u64,
    /// Not AMQP framing any more: everything passes.
    passthrough: bool,
    eof: bool,
    /// The deliveries under way, by channel and link handle.
    deliveries: HashMap<(u16, u32), Sections>,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S) -> Self {
        Guarded {
            inner,
            buf: vec![0; READ_CHUNK],
            end: 0,
            base: 0,
            released: 0,
            checked: 0,
            passthrough: false,
            eof: false,
            deliveries: HashMap::new(),
        }
    }

    /// Frames and checks what has been read, as far as whole frames go.
    fn check(&mut self) {
        loop {
            let start = (self.checked - self.base) as usize;
            let available = &self.buf[start..self.end];
            if self.passthrough {
                self.checked = self.base + self.end as u64;
                return;
            }
            if available.len() < 8 {
                return;
            }
            if &available[..4] == b"AMQP" {
                self.checked += 8;
                continue;
            }
            let size = u32::from_be_bytes([available[0], available[1], available[2], available[3]])
                as usize;
            let body_offset = usize::from(available[4]) * 4;
            if !(8..=MAX_FRAME).contains(&size) || !(8..=size).contains(&body_offset) {
                self.passthrough = true;
                continue;
            }
            if available.len() < size {
                return;
            }
            let (kind, channel) = (
                available[5],
                u16::from_be_bytes([available[6], available[7]]),
            );
            if kind == 0 && size > body_offset {
                let body = start + body_offset..start + size;
                self.on_amqp_frame(channel, body);
            }
            self.checked += size as u64;
        }
    }

    fn on_amqp_frame(&mut self, channel: u16, body: std::ops::Range<usize>) {
        let Some(transfer) = Transfer::read(&self.buf[body.clone()]) else {
            return;
        };
        let key = (channel, transfer.handle);
        if transfer.aborted {
            self.deliveries.remove(&key);
            return;
        }
        let payload = &mut self.buf[body.start + transfer.payload_offset..body.end];
        match self.deliveries.get_mut(&key) {
            Some(sections) => {
                sections.feed(payload);
                if !transfer.more {
                    self.deliveries.remove(&key);
                }
            }
            // A message in one frame, the most common: nothing to keep afterwards.
            None if !transfer.more => Sections::default().feed(payload),
            None => {
                let mut sections = Sections::default();
                sections.feed(payload);
                self.deliveries.insert(key, sections);
            }
        }
    }

    /// Drops what was handed on from the front of the buffer, and makes room to read.
    fn make_room(&mut self) {
        let handed = (self.released - self.base) as usize;
        if handed > 0 && (handed == self.end || handed >= self.buf.len() / 2) {
            self.buf.copy_within(handed..self.end, 0);
            self.end -= handed;
            self.base = self.released;
        }
        if self.buf.len() - self.end < READ_CHUNK / 4 {
            let grown = (self.buf.len() * 2).max(self.end + READ_CHUNK);
            self.buf.resize(grown, 0);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.released < this.checked {
                let from = (this.released - this.base) as usize;
                let n = ((this.checked - this.released) as usize).min(out.remaining());
                out.put_slice(&this.buf[from..from + n]);
                this.released += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.make_room();
            let mut space = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut space))?;
            let read = space.filled().len();
            if read == 0 {
                // The connection ended: whatever is held goes to fe2o3-amqp as it is.
                this.eof = true;
                this.deliveries.clear();
                this.passthrough = true;
            }
            this.end += read;
            this.check();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S> std::fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("released", &self.released)
            .field("checked", &self.checked)
            .field("deliveries", &self.deliveries.len())
            .finish()
    }
}

/// What the guard needs of a `transfer` performative, which the broker writes.
struct Transfer {
    handle: u32,
    more: bool,
    aborted: bool,
    /// Where the message bytes start in the frame body.
    payload_offset: usize,
}

impl Transfer {
    /// The transfer in a frame body, or `None` for any other performative.
    fn read(body: &[u8]) -> Option<Transfer> {
        let mut at = match body {
            [0x00, 0x53, 0x14, ..] => 3,
            [0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x14, ..] => 10,
            [0x00, 0xa3, 18, rest @ ..] if rest.starts_with(b"amqp:transfer:list") => 21,
            _ => return None,
        };
        let (count, end) = match body.get(at..)? {
            [0xc0, size, count, ..] => {
                at += 3;
                (usize::from(*count), at - 1 + usize::from(*size))
            }
            [0xd0, s0, s1, s2, s3, c0, c1, c2, c3, ..] => {
                at += 9;
                let size = u32::from_be_bytes([*s0, *s1, *s2, *s3]) as usize;
                (
                    u32::from_be_bytes([*c0, *c1, *c2, *c3]) as usize,
                    at - 4 + size,
                )
            }
            _ => return None,
        };
        let mut transfer = Transfer {
            handle: 0,
            more: false,
            aborted: false,
            payload_offset: end,
        };
        let mut handle = None;
        for field in 0..count.min(10) {
            let value = body.get(at..end)?;
            match field {
                0 => {
                    handle = match value {
                        [0x43, ..] => Some(0),
                        [0x52, h, ..] => Some(u32::from(*h)),
                        [0x70, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
                        _ => return None,
                    }
                }
                5 => transfer.more = is_true(value),
                9 => transfer.aborted = is_true(value),
                _ => {}
            }
            at += encoded_len(value)?;
        }
        transfer.handle = handle?;
        (end <= body.len()).then_some(transfer)
    }
}

fn is_true(value: &[u8]) -> bool {
    matches!(value, [0x41, ..] | [0x56, 1, ..])
}

/// The whole length of the value at the front of `bytes`, read by its sizes; `None`
/// when `bytes` ends first or it is not a value.
fn encoded_len(bytes: &[u8]) -> Option<usize> {
    match Shape::of(*bytes.first()?)? {
        Shape::Described => {
            let descriptor = encoded_len(&bytes[1..])?;
            Some(1 + descriptor + encoded_len(bytes.get(1 + descriptor..)?)?)
        }
        Shape::Fixed(width) => Some(1 + width),
        Shape::Sized(1) => Some(2 + usize::from(*bytes.get(1)?)),
        Shape::Sized(_) => {
            let size = bytes.get(1..5)?;
            Some(5 + u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize)
        }
    }
}

/// How a constructor's value is laid out, by the constructor's high nibble.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Described,
    /// Fixed width after the constructor.
    Fixed(usize),
    /// A size of this many bytes, then that many bytes (variable-width values,
    /// compounds and arrays alike).
    Sized(usize),
}

impl Shape {
    fn of(code: u8) -> Option<Shape> {
        Some(match code >> 4 {
            0x0 if code == 0 => Shape::Described,
            0x4 => Shape::Fixed(0),
            0x5 => Shape::Fixed(1),
            0x6 => Shape::Fixed(2),
            0x7 => Shape::Fixed(4),
            0x8 => Shape::Fixed(8),
            0x9 => Shape::Fixed(16),
            0xa | 0xc | 0xe => Shape::Sized(1),
            0xb | 0xd | 0xf => Shape::Sized(4),
            _ => return None,
        })
    }
}

/// The sections of one message as fe2o3-amqp's decoder reads them.
#[derive(Debug, Default)]
struct Sections {
    /// The open levels of the section being read, outermost first; empty between
    /// sections.
    levels: Vec<Level>,
    /// Bytes still to pass over (inside a string, a body, ...).
    skip: u64,
    /// The first bytes of a value header an earlier frame ended in the middle of.
    carry: Vec<u8>,
    /// The next value read is overwritten (the first item of a list with too many).
    refuse_next: bool,
    /// Nothing more to check: the decoder will stop before the rest.
    done: bool,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Items still to read.
    remaining: u64,
    how: Items,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Items {
    /// The first item of a section: its value.
    Section(Section),
    /// Values, each with its constructor.
    Values,
    /// Array elements, sharing this constructor.
    Elements(u8),
    /// Taken whole by their sizes (body sections; a described one at most once).
    Whole { described: bool },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Section {
    /// `header` or `properties`: a list of at most this many fields.
    Fields(u64),
    /// Annotations, application properties, footer: maps of values.
    Map,
    /// `data` and `amqp-value`: taken whole.
    Whole,
    /// `amqp-sequence`: a list whose items are taken whole.
    Sequence,
}

/// What reading one step of the message gave.
enum Step {
    /// These many bytes were read.
    Read(usize),
    /// The next step needs bytes that have not arrived.
    NeedMore,
    /// Overwrite this byte (an offset into what is being read) and stop.
    Refuse(usize),
    /// The decoder cannot read on from here; nothing more to check.
    Stop,
}

impl Sections {
    /// Reads `payload`, the next bytes of the message, overwriting the first byte of
    /// any value that opens a level too deep.
    fn feed(&mut self, payload: &mut [u8]) {
        if self.done {
            return;
        }
        if self.carry.is_empty() {
            let (read, refused) = self.read(payload);
            if let Some(offset) = refused {
                payload[offset] = NO_TYPE;
            } else if read < payload.len() {
                self.carry = payload[read..].to_vec();
            }
            return;
        }
        // A value's first bytes came in an earlier frame: read on from a copy of them.
        let carried = self.carry.len();
        let mut input = std::mem::take(&mut self.carry);
        input.extend_from_slice(payload);
        let (read, refused) = self.read(&input);
        match refused {
            // Every refusal is of the byte that completes what was read, or of one
            // after it: never of what an earlier frame, handed on, carried.
            Some(offset) if offset >= carried => payload[offset - carried] = NO_TYPE,
            Some(_) => debug_assert!(false, "a refusal reached back into a frame handed on"),
            None if read < input.len() => self.carry = input.split_off(read),
            None => {}
        }
    }

    /// Reads as much of `input` as can be read: how much, and the offset of a byte to
    /// overwrite if a value opens a level too deep (nothing is read after it).
    fn read(&mut self, input: &[u8]) -> (usize, Option<usize>) {
        let mut read = 0;
        while read < input.len() && !self.done {
            if self.skip > 0 {
                let n = self.skip.min((input.len() - read) as u64);
                self.skip -= n;
                read += n as usize;
                continue;
            }
            match self.step(&input[read..]) {
                Step::Read(n) => read += n,
                Step::NeedMore => break,
                Step::Refuse(offset) => {
                    self.done = true;
                    return (read + offset, Some(read + offset));
                }
                Step::Stop => self.done = true,
            }
        }
        (read, None)
    }

    /// Reads the next section header or the next value of the current section.
    fn step(&mut self, bytes: &[u8]) -> Step {
        let Some(level) = self.levels.last_mut() else {
            return self.section_header(bytes);
        };
        if level.remaining == 0 {
            self.levels.pop();
            return Step::Read(0);
        }
        level.remaining -= 1;
        let how = level.how;
        let step = match how {
            Items::Section(section) => self.section_value(section, bytes),
            Items::Values => self.value(bytes),
            Items::Elements(code) => self.elements(code, bytes),
            Items::Whole { described } => self.whole(described, bytes),
        };
        if matches!(step, Step::NeedMore)
            && let Some(level) = self.levels.last_mut()
        {
            // Read again, whole, when more has come.
            level.remaining += 1;
        }
        step
    }

    fn section_header(&mut self, bytes: &[u8]) -> Step {
        let (code, len) = match bytes {
            [0x00, 0x53, code, ..] => (u64::from(*code), 3),
            [0x00, 0x80, rest @ ..] if rest.len() >= 8 => {
                let code = u64::from_be_bytes(rest[..8].try_into().unwrap_or_default());
                (code, 10)
            }
            // The decoder takes a section's name as a `sym8` or a `sym32`.
            [0x00, 0xa3, n, rest @ ..] if rest.len() >= usize::from(*n) => {
                match section_by_name(&rest[..usize::from(*n)]) {
                    Some(code) => (code, 3 + usize::from(*n)),
                    None => return Step::Stop,
                }
            }
            [0x00, 0xb3, n0, n1, n2, n3, rest @ ..] => {
                let n = u32::from_be_bytes([*n0, *n1, *n2, *n3]) as usize;
                match rest.get(..n) {
                    Some(name) => match section_by_name(name) {
                        Some(code) => (code, 6 + n),
                        None => return Step::Stop,
                    },
                    // No section's name is this long.
                    None if n > 64 => return Step::Stop,
                    None => return Step::NeedMore,
                }
            }
            [] | [0x00] | [0x00, 0x53] | [0x00, 0x80, ..] | [0x00, 0xa3, ..] | [0x00, 0xb3, ..] => {
                return Step::NeedMore;
            }
            _ => return Step::Stop,
        };
        let section = match code {
            0x70 => Section::Fields(5),
            0x73 => Section::Fields(13),
            0x71 | 0x72 | 0x74 | 0x78 => Section::Map,
            0x75 | 0x77 => Section::Whole,
            0x76 => Section::Sequence,
            _ => return Step::Stop,
        };
        self.levels.push(Level {
            remaining: 1,
            how: Items::Section(section),
        });
        Step::Read(len)
    }

    fn section_value(&mut self, section: Section, bytes: &[u8]) -> Step {
        match section {
            Section::Map => self.value(bytes),
            Section::Whole => self.whole(false, bytes),
            Section::Fields(fields) => match list_header(bytes) {
                Header::Complete { count, .. } => {
                    let step = self.value(bytes);
                    self.refuse_next = count > fields;
                    step
                }
                Header::NeedMore => Step::NeedMore,
                Header::Other => Step::Stop,
            },
            Section::Sequence => match list_header(bytes) {
                Header::Complete { count, len } => {
                    self.levels.push(Level {
                        remaining: count,
                        how: Items::Whole { described: false },
                    });
                    Step::Read(len)
                }
                Header::NeedMore => Step::NeedMore,
                // An array, or anything else: not what a sequence is.
                Header::Other if matches!(bytes.first(), Some(0xe0 | 0xf0)) => Step::Refuse(0),
                Header::Other => Step::Stop,
            },
        }
    }

    /// A value with its constructor.
    fn value(&mut self, bytes: &[u8]) -> Step {
        let Some(&code) = bytes.first() else {
            return Step::NeedMore;
        };
        let opens = matches!(code, 0x00 | 0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0);
        if self.refuse_next || (opens && self.depth() + 1 > MAX_DEPTH) {
            return Step::Refuse(0);
        }
        match code {
            0x00 => self.open(2, Items::Values, 1),
            0xc0 | 0xc1 | 0xd0 | 0xd1 => match list_header(bytes) {
                Header::Complete { count, len } => self.open(count, Items::Values, len),
                Header::NeedMore => Step::NeedMore,
                Header::Other => Step::Stop,
            },
            0xe0 | 0xf0 => match array_header(&bytes[1..], code) {
                Header::NeedMore => Step::NeedMore,
                Header::Other => Step::Stop,
                Header::Complete { count: 0, len } => Step::Read(1 + len),
                Header::Complete { count, len } => match bytes.get(1 + len) {
                    None => Step::NeedMore,
                    // fe2o3-amqp reads each element's descriptor where the encoding has
                    // it once: the two would part ways. The element constructor is
                    // overwritten (the decoder reads it as such).
                    Some(0x00) => Step::Refuse(1 + len),
                    Some(&element) => self.open(count, Items::Elements(element), 2 + len),
                },
            },
            _ => self.primitive(code, &bytes[1..], 1),
        }
    }

    /// An array element, without a constructor.
    fn elements(&mut self, code: u8, bytes: &[u8]) -> Step {
        match code {
            0xc0 | 0xc1 | 0xd0 | 0xd1 => {
                let width = if code < 0xd0 { 1 } else { 4 };
                match sized(bytes, width, true) {
                    Some((_, count)) => self.open(count, Items::Values, 2 * width),
                    None => Step::NeedMore,
                }
            }
            0xe0 | 0xf0 => match array_header(bytes, code) {
                Header::NeedMore => Step::NeedMore,
                Header::Other => Step::Stop,
                Header::Complete { count: 0, len } => Step::Read(len),
                Header::Complete { count, len } => match bytes.get(len) {
                    None => Step::NeedMore,
                    Some(&element) if element == 0x00 || self.depth() + 1 > MAX_DEPTH => {
                        Step::Refuse(len)
                    }
                    Some(&element) => self.open(count, Items::Elements(element), len + 1),
                },
            },
            _ => match Shape::of(code) {
                Some(Shape::Fixed(width)) => {
                    // All the rest of the array at once: a billion zero-width elements
                    // cost nothing to pass over.
                    if let Some(level) = self.levels.last_mut() {
                        self.skip = (level.remaining + 1) * width as u64;
                        level.remaining = 0;
                    }
                    Step::Read(0)
                }
                _ => self.primitive(code, bytes, 0),
            },
        }
    }

    /// A value taken whole by its sizes, as fe2o3-amqp takes a body's values.
    fn whole(&mut self, described: bool, bytes: &[u8]) -> Step {
        let Some(&code) = bytes.first() else {
            return Step::NeedMore;
        };
        if code == 0x00 {
            if described {
                return Step::Stop;
            }
            return self.open(2, Items::Whole { described: true }, 1);
        }
        self.primitive(code, &bytes[1..], 1)
    }

    /// A value with no levels inside it that matter (or taken whole): passed over by
    /// its size. `header` bytes of it were already read.
    fn primitive(&mut self, code: u8, bytes: &[u8], header: usize) -> Step {
        match Shape::of(code) {
            Some(Shape::Fixed(width)) => {
                self.skip = width as u64;
                Step::Read(header)
            }
            Some(Shape::Sized(width)) => match sized(bytes, width, false) {
                Some((size, _)) => {
                    self.skip = size;
                    Step::Read(header + width)
                }
                None => Step::NeedMore,
            },
            Some(Shape::Described) | None => Step::Stop,
        }
    }

    fn open(&mut self, count: u64, how: Items, len: usize) -> Step {
        self.levels.push(Level {
            remaining: count,
            how,
        });
        Step::Read(len)
    }

    /// Levels open inside the current section's value.
    fn depth(&self) -> usize {
        self.levels.len().saturating_sub(1)
    }
}

fn section_by_name(name: &[u8]) -> Option<u64> {
    Some(match name {
        b"amqp:header:list" => 0x70,
        b"amqp:delivery-annotations:map" => 0x71,
        b"amqp:message-annotations:map" => 0x72,
        b"amqp:properties:list" => 0x73,
        b"amqp:application-properties:map" => 0x74,
        b"amqp:data:binary" => 0x75,
        b"amqp:amqp-sequence:list" => 0x76,
        b"amqp:amqp-value:*" => 0x77,
        b"amqp:footer:map" => 0x78,
        _ => return None,
    })
}

enum Header {
    /// `count` items follow the `len` bytes of the header.
    Complete {
        count: u64,
        len: usize,
    },
    NeedMore,
    Other,
}

/// The header of a list or a map (constructor, size, count).
fn list_header(bytes: &[u8]) -> Header {
    let width = match bytes.first() {
        None => return Header::NeedMore,
        Some(0x45) => return Header::Complete { count: 0, len: 1 },
        Some(0xc0 | 0xc1) => 1,
        Some(0xd0 | 0xd1) => 4,
        Some(_) => return Header::Other,
    };
    match sized(&bytes[1..], width, true) {
        Some((_, count)) => Header::Complete {
            count,
            len: 1 + 2 * width,
        },
        None => Header::NeedMore,
    }
}

/// An array's size and count (after its constructor), refused where fe2o3-amqp's
/// decoder refuses them.
fn array_header(bytes: &[u8], code: u8) -> Header {
    let width = if code == 0xe0 { 1 } else { 4 };
    match sized(bytes, width, true) {
        None => Header::NeedMore,
        Some((size, count)) if count > MAX_ARRAY_COUNT || count > size => Header::Other,
        Some((_, count)) => Header::Complete {
            count,
            len: 2 * width,
        },
    }
}

/// A size (and with `counted`, the count after it) of `width` bytes each.
fn sized(bytes: &[u8], width: usize, counted: bool) -> Option<(u64, u64)> {
    let read = |at: usize| -> Option<u64> {
        let field = bytes.get(at..at + width)?;
        Some(field.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
    };
    let size = read(0)?;
    let count = if counted { read(width)? } else { 0 };
    Some((size, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
    use fe2o3_amqp::types::messaging::{
        ApplicationProperties, Body, Data, DeliveryAnnotations, Footer, Header, Message,
        MessageAnnotations, Properties,
    };
    use fe2o3_amqp::types::primitives::{Binary, OrderedMap, Symbol, Value};
    use proptest::prelude::*;
    use serde_amqp::lazy::LazyValue;
    use tokio::io::AsyncReadExt;

    /// What the broker sends, a few bytes at a time.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self
                .step
                .min(self.bytes.len() - self.at)
                .min(out.remaining());
            let at = self.at;
            out.put_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// What fe2o3-amqp reads through the guard when the broker sends `bytes`, `step`
    /// bytes at a time.
    fn guarded(bytes: &[u8], step: usize) -> Vec<u8> {
        let mut guard = Guarded::new(Trickle {
            bytes: bytes.to_vec(),
            at: 0,
            step,
        });
        let mut out = Vec::new();
        futures_lite_read_to_end(&mut guard, &mut out);
        out
    }

    fn futures_lite_read_to_end(guard: &mut Guarded<Trickle>, out: &mut Vec<u8>) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(guard.read_to_end(out))
            .unwrap();
    }

    /// A stream: the protocol header, then each payload in a transfer frame of its own
    /// on `(channel, handle)`, `more` on all but the last of each delivery. Returns the
    /// stream and where each payload sits in it.
    fn stream(transfers: &[(u16, u32, bool, &[u8])]) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        let mut places = Vec::new();
        for (channel, handle, more, payload) in transfers {
            let items = [
                vec![0x70],
                handle.to_be_bytes().to_vec(),
                vec![
                    0x52,
                    7,
                    0xa0,
                    1,
                    9,
                    0x43,
                    0x42,
                    if *more { 0x41 } else { 0x42 },
                ],
            ]
            .concat();
            let mut performative = vec![0x00, 0x53, 0x14, 0xc0, items.len() as u8 + 1, 6];
            performative.extend_from_slice(&items);
            let size = 8 + performative.len() + payload.len();
            bytes.extend_from_slice(&(size as u32).to_be_bytes());
            bytes.extend_from_slice(&[2, 0]);
            bytes.extend_from_slice(&channel.to_be_bytes());
            bytes.extend_from_slice(&performative);
            places.push(bytes.len()..bytes.len() + payload.len());
            bytes.extend_from_slice(payload);
        }
        (bytes, places)
    }

    /// One delivery's payload in frames of at most `frame` bytes, with a frame of
    /// another link between each two.
    fn in_frames(payload: &[u8], frame: usize) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
        let other: &[u8] = &[0x00, 0x53, 0x75, 0xa0, 0x01, 0x2a];
        let chunks: Vec<&[u8]> = payload.chunks(frame.max(1)).collect();
        let mut transfers = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            transfers.push((0, 1, i + 1 < chunks.len(), *chunk));
            transfers.push((1, 1, false, other));
        }
        let (bytes, places) = stream(&transfers);
        (bytes, places.into_iter().step_by(2).collect())
    }

    fn payload_of(bytes: &[u8], places: &[std::ops::Range<usize>]) -> Vec<u8> {
        places
            .iter()
            .flat_map(|p| bytes[p.clone()].to_vec())
            .collect()
    }

    fn encode(message: Message<Body<Value>>) -> Vec<u8> {
        let message = fe2o3_amqp::types::messaging::message::__private::Serializable(message);
        serde_amqp::to_vec(&message).unwrap()
    }

    fn nested_lists(depth: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(depth * 3 + 1);
        // A size of 1 (what a reader by sizes would take); fe2o3-amqp reads lists by
        // their count.
        for _ in 0..depth {
            bytes.extend_from_slice(&[0xc0, 0x01, 0x01]);
        }
        bytes.push(0x40);
        bytes
    }

    /// A section of `code` holding the map `{"k": value}` (`value` encoded).
    fn map_section(code: u8, value: &[u8]) -> Vec<u8> {
        let mut map = vec![0xa3, 0x01, b'k'];
        map.extend_from_slice(value);
        let mut section = vec![0x00, 0x53, code, 0xd1];
        section.extend_from_slice(&(map.len() as u32 + 4).to_be_bytes());
        section.extend_from_slice(&2u32.to_be_bytes());
        section.extend_from_slice(&map);
        section
    }

    const DATA: &[u8] = &[0x00, 0x53, 0x75, 0xa0, 0x02, b'{', b'}'];

    /// What fe2o3-amqp makes of a payload, on a thread with a small stack: a decoder
    /// that went as deep as the payload would overflow it.
    fn decodes(payload: Vec<u8>) -> bool {
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || {
                let reader = serde_amqp::read::SliceReader::new(&payload);
                <Body<LazyValue> as DecodeIntoMessage>::decode_message_from_reader(reader).is_ok()
            })
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn ordinary_messages_pass_unchanged() {
        let mut annotations = OrderedMap::new();
        let nested = Value::List(vec![Value::Map(OrderedMap::from_iter([(
            Value::from("a"),
            Value::List(vec![
                Value::from(1),
                Value::Array(vec![Value::from(2)].into()),
            ]),
        )]))]);
        annotations.insert(Symbol::from("x-opt-nested").into(), nested);
        annotations.insert(
            Symbol::from("x-opt-text").into(),
            Value::from("t".repeat(300)),
        );
        let message = Message::builder()
            .header(Header::builder().durable(true).priority(5u8).build())
            .delivery_annotations(DeliveryAnnotations(annotations.clone()))
            .message_annotations(MessageAnnotations(annotations.clone()))
            .properties(
                Properties::builder()
                    .message_id("id-1".to_string())
                    .content_type(Symbol::from("application/json"))
                    .subject("s")
                    .build(),
            )
            .application_properties(
                ApplicationProperties::builder()
                    .insert("tenant", "acme")
                    .insert("n", 3)
                    .build(),
            )
            .body(Body::Data(vec![Data(Binary::from(vec![7u8; 5000]))].into()))
            .footer(Footer(annotations))
            .build();
        let payload = encode(message);
        assert!(decodes(payload.clone()));
        for frame in [1, 2, 3, 7, 64, 1000, payload.len()] {
            let (bytes, _) = in_frames(&payload, frame);
            for step in [1, 5, 4096] {
                assert!(
                    guarded(&bytes, step) == bytes,
                    "frames of {frame}, reads of {step}"
                );
            }
        }
    }

    #[test]
    fn a_body_nested_deep_is_left_to_the_body_decoder() {
        let mut payload = vec![0x00, 0x53, 0x77];
        payload.extend_from_slice(&nested_lists(1000));
        let (bytes, _) = in_frames(&payload, 100);
        assert!(guarded(&bytes, 333) == bytes);
    }

    #[test]
    fn a_value_opening_a_level_too_deep_is_overwritten_where_the_decoder_reaches_it() {
        let deep = nested_lists(1_000_000);
        let mut sequence_of_arrays = vec![0xc0, 0x01, 0x01];
        for _ in 0..300 {
            // An array of one list, holding the next array.
            sequence_of_arrays.extend_from_slice(&[0xe0, 0x06, 0x01, 0xc0, 0x01, 0x01]);
        }
        sequence_of_arrays.push(0x40);
        let mut described = Vec::new();
        for _ in 0..300 {
            described.extend_from_slice(&[0x00, 0x53, 0x01]);
        }
        described.push(0x40);
        let mut maps = Vec::new();
        for _ in 0..300 {
            maps.extend_from_slice(&[0xc1, 0x01, 0x02, 0x40]);
        }
        maps.push(0x40);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "message annotations",
                [map_section(0x72, &deep), DATA.to_vec()].concat(),
            ),
            (
                "delivery annotations",
                [map_section(0x71, &deep), DATA.to_vec()].concat(),
            ),
            (
                "application properties",
                [map_section(0x74, &deep), DATA.to_vec()].concat(),
            ),
            ("footer", [DATA.to_vec(), map_section(0x78, &deep)].concat()),
            (
                "arrays of lists",
                [map_section(0x72, &sequence_of_arrays), DATA.to_vec()].concat(),
            ),
            (
                "described values",
                [map_section(0x72, &described), DATA.to_vec()].concat(),
            ),
            (
                "maps as keys",
                [map_section(0x72, &maps), DATA.to_vec()].concat(),
            ),
        ];
        for (what, payload) in cases {
            let (bytes, places) = in_frames(&payload, 64 << 10);
            let out = guarded(&bytes, 8192);
            let changed: Vec<usize> = (0..bytes.len()).filter(|&i| out[i] != bytes[i]).collect();
            assert_eq!(changed.len(), 1, "{what}");
            assert_eq!(out[changed[0]], NO_TYPE, "{what}");
            assert!(!decodes(payload_of(&out, &places)), "{what}");
        }
    }

    #[test]
    fn a_section_named_by_a_long_symbol_is_read_all_the_same() {
        let named = |depth| {
            let name = b"amqp:message-annotations:map";
            let mut section = vec![0x00, 0xb3];
            section.extend_from_slice(&(name.len() as u32).to_be_bytes());
            section.extend_from_slice(name);
            section.extend_from_slice(&map_section(0x72, &nested_lists(depth))[3..]);
            [section, DATA.to_vec()].concat()
        };
        assert!(decodes(named(5)), "fe2o3-amqp reads such a section");
        let payload = named(300);
        for frame in [3, 64, 5000] {
            let (bytes, places) = in_frames(&payload, frame);
            let out = payload_of(&guarded(&bytes, 11), &places);
            assert_eq!(out.iter().filter(|b| **b == NO_TYPE).count(), 1);
            assert!(!decodes(out));
        }
    }

    #[test]
    fn a_value_at_the_deepest_level_allowed_is_left_alone() {
        let payload = [
            map_section(0x72, &nested_lists(MAX_DEPTH - 1)),
            DATA.to_vec(),
        ]
        .concat();
        let (bytes, _) = in_frames(&payload, 50);
        assert!(guarded(&bytes, 17) == bytes);
        let payload = [map_section(0x72, &nested_lists(MAX_DEPTH)), DATA.to_vec()].concat();
        let (bytes, _) = in_frames(&payload, 50);
        assert!(guarded(&bytes, 17) != bytes, "the map is the first level");
    }

    #[test]
    fn a_header_with_more_items_than_fields_is_refused() {
        // fe2o3-amqp reads five fields and the rest as sections: the sixth item, an
        // `amqp-value` section whose size hides a deep footer from a reader by sizes.
        let mut header = vec![
            0x00, 0x53, 0x70, 0xc0, 0x00, 0x06, 0x40, 0x40, 0x40, 0x40, 0x40,
        ];
        header.extend_from_slice(&[0x00, 0x53, 0x77, 0x40]);
        header[4] = (header.len() - 5) as u8;
        let payload = [header, DATA.to_vec()].concat();
        for frame in 1..payload.len() {
            let (bytes, places) = in_frames(&payload, frame);
            let out = payload_of(&guarded(&bytes, 7), &places);
            // Its first field is overwritten, however the frames split it.
            assert_eq!(out[6], NO_TYPE, "frames of {frame}");
            assert_eq!(out.iter().filter(|b| **b == NO_TYPE).count(), 1);
            assert!(!decodes(out));
        }
    }

    #[test]
    fn an_array_of_described_values_in_an_annotation_is_refused_at_its_element_constructor() {
        // An array of two values described by the symbol "d", each a ubyte.
        let array = [0xe0, 0x08, 0x02, 0x00, 0xa3, 0x01, b'd', 0x50, 0x01, 0x02];
        let payload = [map_section(0x72, &array), DATA.to_vec()].concat();
        let at = payload.windows(2).position(|w| w == [0x02, 0x00]).unwrap() + 1;
        for frame in 1..payload.len() {
            let (bytes, places) = in_frames(&payload, frame);
            let out = payload_of(&guarded(&bytes, 5), &places);
            assert_eq!(out[at], NO_TYPE, "frames of {frame}");
            assert!(!decodes(out));
        }
    }

    #[test]
    fn what_is_not_a_transfer_passes_as_it_is() {
        let mut bytes = b"AMQP\x03\x01\x00\x00".to_vec();
        // A SASL frame, an empty frame, then an HTTP answer: not AMQP.
        bytes.extend_from_slice(&[0, 0, 0, 12, 2, 1, 0, 0, 0x00, 0x53, 0x44, 0x45]);
        bytes.extend_from_slice(&[0, 0, 0, 8, 2, 0, 0, 0]);
        bytes.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        assert_eq!(guarded(&bytes, 3), bytes);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes as a message, or as the whole stream: the guard never panics, and
        /// hands on every byte, at most one of a message changed.
        #[test]
        fn any_bytes(
            payload in prop::collection::vec(any::<u8>(), 0..600),
            frame in 1usize..100,
            step in 1usize..100,
        ) {
            let (bytes, places) = in_frames(&payload, frame);
            let out = guarded(&bytes, step);
            prop_assert_eq!(out.len(), bytes.len());
            let changed: Vec<usize> = (0..bytes.len()).filter(|&i| out[i] != bytes[i]).collect();
            prop_assert!(changed.len() <= 1);
            for at in changed {
                prop_assert_eq!(out[at], NO_TYPE);
                prop_assert!(places.iter().any(|p| p.contains(&at)));
            }
            prop_assert_eq!(guarded(&payload, step), payload);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However the broker splits it, a message the decoder reads without going too
        /// deep arrives as it was sent; one too deep arrives with one byte changed.
        #[test]
        fn frames_and_reads_of_any_size(
            depth in 0usize..300,
            section in prop::sample::select(vec![0x71u8, 0x72, 0x74, 0x78]),
            frame in 1usize..200,
            step in 1usize..300,
        ) {
            let value = nested_lists(depth);
            let payload = if section == 0x78 {
                [DATA.to_vec(), map_section(section, &value)].concat()
            } else {
                [map_section(section, &value), DATA.to_vec()].concat()
            };
            let (bytes, places) = in_frames(&payload, frame);
            let out = guarded(&bytes, step);
            let changed = (0..bytes.len()).filter(|&i| out[i] != bytes[i]).count();
            // The map is a level of its own.
            prop_assert_eq!(changed, usize::from(depth + 1 > MAX_DEPTH));
            // Application properties hold no lists: fe2o3-amqp refuses them at any depth.
            if section != 0x74 {
                prop_assert_eq!(decodes(payload_of(&out, &places)), depth < MAX_DEPTH);
            }
        }
    }
}
