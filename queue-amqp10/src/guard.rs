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
//! deeper than [`MAX_DEPTH`] it overwrites a byte the decoder reads there with one no
//! AMQP type starts with. fe2o3-amqp's decoder then stops there with an error, and the
//! driver rejects the message as any it cannot decode (`consume.rs`).
//!
//! The guard reads the sections the way that decoder does, so the two agree on where
//! every value starts: compounds item by item, by their count; the `header` and
//! `properties` lists only as far as their fields go; body sections by their sizes, as
//! the driver takes them undecoded (`body.rs` reads those with limits of its own).
//! Where the decoder's reading would part from the encoding's, the guard refuses the
//! value the same way rather than follow it: a `header` or `properties` list with more
//! items than fields (the decoder reads the rest as further sections), a map with an
//! odd count (the decoder's count wraps and it reads on past the map), a `header` or
//! `properties` field that is not a primitive (after a body's value it reads `user-id`
//! whole, whatever it is), a section that is not a described value with a section's
//! descriptor (it takes a bare descriptor, then the section), a section named by a
//! `sym32` (it reads ahead what the size claims). The
//! decoder also allocates what a value claims to hold before it reads it: in a message
//! that came in one frame, a claim past its end is refused, and in any message a claim
//! of [`MAX_CLAIM`] or more; and it makes a `Value` of every value in the maps, so
//! values past [`MAX_VALUES`] are refused. Arrays in the maps, and lists and maps that
//! are application properties, the guard does not follow: it rewrites their
//! constructor to a binary's of the same layout, which the decoder takes whole
//! ([`as_binary`]), so that it reads nothing inside them.
//! Strings and symbols the decoder reads it makes UTF-8 as they pass, each byte of a
//! sequence that is not becoming `?` (or the rest of a character a frame ended inside:
//! [`Sections::mend_text`]): the decoder refuses the whole message for one that is
//! not. Body sections are the driver's to read, and pass as they came.
//! Frames are handed on whole as soon as they are checked: every byte the guard
//! overwrites or rewrites is one it decides on as it first reads it, in the frame at
//! hand (a value's header split between two frames is read on from a copy of its first
//! bytes), but for a claim whose constructor ends a frame: that frame waits for the
//! size in the delivery's next one ([`Hold`]). The protocol headers pass as they are;
//! framing that is not AMQP before the first protocol header (another protocol's server)
//! passes too, for fe2o3-amqp to say what it is, and after it is an error.
//!
//! Every performative, SASL's too, is read as the decoder reads it, and a frame whose
//! performative the two would read apart ends the connection ([`Performative::read`]):
//! the decoder reads a list by its count, and the message of a transfer is whatever
//! follows what it read, so a performative laid out otherwise hid a message from the
//! guard. Frames are held to 512 bytes until the broker's `open`, to the driver's
//! `max-frame-size` after ([`MAX_FRAME`]).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use queue_core::Throttle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Levels of nesting (lists, maps, described values) a value in a message's
/// annotations, properties or footer may open, as in the body decoder.
pub(crate) const MAX_DEPTH: usize = 128;

/// What a value may claim to hold, exclusive. The decoder allocates a value's claim
/// before it reads it, and in a message of several frames the guard cannot tell a
/// claim past the message's end until its last frame, which comes after the frames
/// handed on: a claim of this much or more is refused wherever it is. A smaller claim
/// costs address space, not memory (the allocation is zeroed pages, written only as
/// bytes come); 4 GiB could fail to allocate on a small host, which aborts. 128 MiB is
/// RabbitMQ's default largest message. A multiple of 2^24, so that the first byte of a
/// 4-byte size decides.
pub(crate) const MAX_CLAIM: u64 = 128 << 20;
const _: () = assert!(MAX_CLAIM.is_multiple_of(1 << 24));

/// The most the guard holds back after a frame that ends in a value's constructor,
/// waiting for the size that the delivery's next frame starts with: past this (a
/// broker that left the delivery unfinished and goes on with others), the value is
/// refused and everything is handed on.
const MAX_HELD: u64 = 16 << 20;

/// The most values a message's annotations, application properties and footer may
/// hold together. The decoder makes each a `Value` of tens of bytes, also those that
/// take no byte on the wire: an array of 65,536 nulls is 10 bytes.
const MAX_VALUES: u64 = 1 << 16;

/// The most body sections and `amqp-sequence` items a message may hold together, as
/// many as the body decoder takes (`body.rs`). The decoder keeps each as an allocation
/// of its own, of tens of bytes, also for a null of one byte: 16 MiB of nulls in
/// sequences took over a gigabyte. (A number here, not `body.rs`'s: the fuzz target
/// builds this file alone; `body.rs` checks the two agree.)
pub(crate) const MAX_BODY_ITEMS: u64 = 1 << 20;

/// A byte no AMQP encoding starts with.
const NO_TYPE: u8 = 0xff;

/// The largest frame before the broker's `open`: AMQP 1.0's MIN-MAX-FRAME-SIZE, which
/// fe2o3-amqp holds the broker to as well. An HTTP answer read as a frame header is
/// over a gigabyte; a broker that claimed 64 MiB here had the guard buffer it before
/// any login.
const MAX_FRAME_BEFORE_OPEN: usize = 512;

/// The largest frame after it: the `max-frame-size` the driver's `open` offers,
/// fe2o3-amqp's default (`fe2o3_amqp::connection::DEFAULT_MAX_FRAME_SIZE`; a number
/// here, since the fuzz target builds this file alone: a test checks the two agree).
const MAX_FRAME: usize = 256 << 10;

/// How much the guard reads from the socket at a time.
const READ_CHUNK: usize = 64 << 10;

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
    /// A protocol header came: what follows is AMQP framing.
    framing: bool,
    /// The broker's `open` came: frames may be [`MAX_FRAME`] long.
    opened: bool,
    /// Not AMQP from the start (another protocol's server): everything passes.
    passthrough: bool,
    /// The broker broke the framing after its protocol header: the error to give once
    /// what came before is handed on.
    broken: Option<String>,
    eof: bool,
    /// The deliveries under way, by channel and link handle.
    deliveries: HashMap<(u16, u32), Sections>,
    /// Frames that end in a claim's constructor, held back until the claim's size comes.
    holds: Vec<Hold>,
    /// Which messages whose strings were mended are logged (one line every 10 s).
    mended: Throttle,
    /// Where to tell the `max-frame-size` of the broker's `open` (the largest frame
    /// the driver may send it), if anyone asks.
    broker_max_frame: Option<Arc<AtomicUsize>>,
}

/// A frame held back: its last byte is the constructor of a value with a 4-byte size,
/// which the delivery's next frame starts, and which may claim [`MAX_CLAIM`] or more.
/// Only the constructor can be refused so that the decoder stops before it allocates
/// the claim, so it and every frame after it wait for that size.
#[derive(Debug)]
struct Hold {
    delivery: (u16, u32),
    /// Stream offsets of the frame's start and of the constructor.
    frame: u64,
    constructor: u64,
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
            framing: false,
            opened: false,
            passthrough: false,
            broken: None,
            eof: false,
            deliveries: HashMap::new(),
            holds: Vec::new(),
            mended: Throttle::default(),
            broker_max_frame: None,
        }
    }

    /// The guard, telling `max_frame` the `max-frame-size` of the broker's `open`
    /// once it comes (keeping the lowest told there).
    pub(crate) fn telling_max_frame(mut self, max_frame: Arc<AtomicUsize>) -> Self {
        self.broker_max_frame = Some(max_frame);
        self
    }

    /// How far what is checked may be handed on: up to the first frame held back.
    fn releasable(&self) -> u64 {
        self.holds
            .iter()
            .map(|hold| hold.frame)
            .min()
            .unwrap_or(self.checked)
    }

    /// Frames and checks what has been read, as far as whole frames go.
    fn check(&mut self) {
        while self.broken.is_none() {
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
                self.framing = true;
                self.checked += 8;
                continue;
            }
            let size = u32::from_be_bytes([available[0], available[1], available[2], available[3]])
                as usize;
            let body_offset = usize::from(available[4]) * 4;
            let max_frame = if self.opened {
                MAX_FRAME
            } else {
                MAX_FRAME_BEFORE_OPEN
            };
            if !(8..=max_frame).contains(&size) || !(8..=size).contains(&body_offset) {
                if self.framing {
                    self.broken = Some(format!(
                        "the broker sent a frame AMQP 1.0 framing does not allow (size {size}, header {body_offset} bytes)"
                    ));
                } else {
                    self.passthrough = true;
                }
                continue;
            }
            if available.len() < size {
                return;
            }
            let (kind, channel) = (
                available[5],
                u16::from_be_bytes([available[6], available[7]]),
            );
            if size > body_offset {
                let body = start + body_offset..start + size;
                let read = Performative::read(&self.buf[body.clone()]).map(|p| p.summary());
                match (kind, read) {
                    (0, Ok(performative)) => self.on_amqp_frame(channel, performative, body),
                    // SASL's are only checked: nothing in them is followed.
                    (1, Ok(_)) => {}
                    (_, Err(why)) if self.framing => {
                        self.broken = Some(format!(
                            "the broker sent a frame the driver does not read as fe2o3-amqp would: {why}"
                        ));
                        continue;
                    }
                    // Not AMQP before its protocol header (another protocol's server).
                    (_, Err(_)) => {
                        self.passthrough = true;
                        continue;
                    }
                    // Another frame type: fe2o3-amqp refuses it.
                    _ => {}
                }
            }
            self.checked += size as u64;
            self.bound_holds();
        }
    }

    fn on_amqp_frame(&mut self, channel: u16, performative: Summary, body: std::ops::Range<usize>) {
        let Summary {
            code,
            handle,
            more,
            aborted,
            end: fields_end,
            max_frame,
        } = performative;
        if code == OPEN {
            self.opened = true;
            if let Some(told) = &self.broker_max_frame {
                // Absent, the field says "no limit".
                let max_frame = max_frame.map_or(usize::MAX, |n| n as usize);
                told.fetch_min(max_frame, Ordering::Relaxed);
            }
        }
        match (code, handle) {
            (TRANSFER, Some(handle)) if aborted => {
                // The delivery ends here, unfinished.
                self.deliveries.remove(&(channel, handle));
            }
            (TRANSFER, Some(handle)) => {
                let key = (channel, handle);
                let payload = &mut self.buf[body.start + fields_end..body.end];
                let (refused_held, undecided, mended) = match self.deliveries.get_mut(&key) {
                    Some(sections) => {
                        let mended_before = sections.mended;
                        let refused_held = sections.feed(payload);
                        let undecided = sections.claim_undecided;
                        let mended = sections.mended && !mended_before;
                        if !more {
                            self.deliveries.remove(&key);
                        }
                        (refused_held, undecided, mended)
                    }
                    // A message in one frame, the most common: nothing to keep.
                    None if !more => {
                        let mut sections = Sections {
                            whole_message: true,
                            ..Sections::default()
                        };
                        sections.feed(payload);
                        (false, false, sections.mended)
                    }
                    None => {
                        let mut sections = Sections::default();
                        sections.feed(payload);
                        let (undecided, mended) = (sections.claim_undecided, sections.mended);
                        self.deliveries.insert(key, sections);
                        (false, undecided, mended)
                    }
                };
                if mended && let Some(messages) = self.mended.tick() {
                    tracing::warn!(
                        channel,
                        handle,
                        messages,
                        "mended a message from the broker that fe2o3-amqp would refuse \
                         (another client's): bytes of its strings that were not UTF-8 now \
                         read as '?' (or, after a frame ended inside a character, as the \
                         rest of it); `messages` counts the messages since the last such \
                         line (one every 10 s at most)"
                    );
                }
                // Where this frame's claim, if it ends in one, is held.
                let here = Hold {
                    delivery: key,
                    frame: self.checked,
                    constructor: self.base + body.end as u64 - 1,
                };
                match self.holds.iter().position(|h| h.delivery == key) {
                    Some(i) => {
                        if refused_held {
                            let at = (self.holds[i].constructor - self.base) as usize;
                            self.buf[at] = NO_TYPE;
                        }
                        if !undecided {
                            self.holds.swap_remove(i);
                        } else if fields_end < body.len() {
                            // Decided, and this frame ends in another claim's constructor.
                            self.holds[i] = here;
                        }
                    }
                    None if undecided => self.holds.push(here),
                    None => {}
                }
            }
            // A link's or a session's deliveries under way end with it; its handle or
            // channel may carry others next.
            (ATTACH | DETACH, Some(handle)) => {
                self.deliveries.remove(&(channel, handle));
            }
            (BEGIN | END, _) => self.deliveries.retain(|(c, _), _| *c != channel),
            (CLOSE, _) => self.deliveries.clear(),
            _ => {}
        }
        // A delivery that ends unfinished is never decoded, and one whose last frame
        // leaves a claim's size out fails at it: what it held goes on as it is.
        let deliveries = &self.deliveries;
        self.holds.retain(|h| deliveries.contains_key(&h.delivery));
    }

    /// Refuses every claim held back on when too much waits behind them: a broker that
    /// never finishes a delivery must not stall the connection or fill the memory.
    fn bound_holds(&mut self) {
        if self.checked - self.releasable() <= MAX_HELD {
            return;
        }
        for hold in std::mem::take(&mut self.holds) {
            self.buf[(hold.constructor - self.base) as usize] = NO_TYPE;
            if let Some(sections) = self.deliveries.get_mut(&hold.delivery) {
                sections.done = true;
                sections.claim_undecided = false;
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
            let releasable = this.releasable();
            if this.released < releasable {
                let from = (this.released - this.base) as usize;
                let n = ((releasable - this.released) as usize).min(out.remaining());
                out.put_slice(&this.buf[from..from + n]);
                this.released += n as u64;
                return Poll::Ready(Ok(()));
            }
            if let Some(broken) = &this.broken {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    broken.clone(),
                )));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.make_room();
            let mut space = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut space))?;
            let read = space.filled().len();
            if read == 0 {
                // The connection ended: whatever is left goes to fe2o3-amqp as it is.
                this.eof = true;
                this.deliveries.clear();
                this.holds.clear();
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

const OPEN: u64 = 0x10;
const BEGIN: u64 = 0x11;
const ATTACH: u64 = 0x12;
const TRANSFER: u64 = 0x14;
const DETACH: u64 = 0x16;
const END: u64 = 0x17;
const CLOSE: u64 = 0x18;

/// The performatives AMQP 1.0 has (SASL's too): code, name, how many fields.
const PERFORMATIVES: [(u64, &[u8], usize); 14] = [
    (OPEN, b"amqp:open:list", 10),
    (BEGIN, b"amqp:begin:list", 8),
    (ATTACH, b"amqp:attach:list", 14),
    (0x13, b"amqp:flow:list", 11),
    (TRANSFER, b"amqp:transfer:list", 11),
    (0x15, b"amqp:disposition:list", 6),
    (DETACH, b"amqp:detach:list", 3),
    (END, b"amqp:end:list", 1),
    (CLOSE, b"amqp:close:list", 1),
    (0x40, b"amqp:sasl-mechanisms:list", 1),
    (0x41, b"amqp:sasl-init:list", 3),
    (0x42, b"amqp:sasl-challenge:list", 1),
    (0x43, b"amqp:sasl-response:list", 1),
    (0x44, b"amqp:sasl-outcome:list", 2),
];

/// A performative, which the broker writes: its descriptor code and its fields.
struct Performative<'a> {
    code: u64,
    body: &'a [u8],
    /// Where its fields start, how many there are and where they end (the message
    /// bytes of a transfer start there).
    fields: usize,
    count: usize,
    end: usize,
}

/// What the guard follows of a performative, apart from the frame's bytes.
#[derive(Debug, Clone, Copy)]
struct Summary {
    code: u64,
    /// A transfer's, attach's or detach's link handle.
    handle: Option<u32>,
    /// A transfer's `more` and `aborted`.
    more: bool,
    aborted: bool,
    /// Where its fields end in the frame's body.
    end: usize,
    /// An `open`'s `max-frame-size`.
    max_frame: Option<u32>,
}

impl<'a> Performative<'a> {
    /// Reads the performative at the front of a frame's body as fe2o3-amqp's decoder
    /// does, or says why not. Where the two would part (a list whose items end
    /// elsewhere than its size says, more items than the performative has fields, a
    /// `sym32` descriptor, which the decoder reads ahead by what its size claims), the
    /// decoder would read what the guard did not check: a message's sections hidden in
    /// the performative, values nested past any stack, a 4 GiB claim. The frame is
    /// refused then, as are values nested past [`MAX_DEPTH`], claims past the frame and
    /// more than [`MAX_VALUES`] values.
    fn read(body: &'a [u8]) -> Result<Performative<'a>, &'static str> {
        let (list, constructor, descriptor) = constructor(body)
            .ok_or("a performative that is not described by a ulong or a short symbol")?;
        let code = descriptor
            .filter(|d| PERFORMATIVES.iter().any(|(known, _, _)| known == d))
            .ok_or("a performative AMQP 1.0 does not have")?;
        if !matches!(list, 0x45 | 0xc0 | 0xd0) {
            return Err("a performative that is not a list");
        }
        let at = constructor - 1;
        let (count, fields) = compound_header(&body[at..]).ok_or("a performative cut short")?;
        // Read as any described list of the decoder's types: its items by their
        // count, no more than the performative's fields, each field as its type is.
        let mut values = 0;
        let end = strict_len(body, 0, &mut values).ok_or(
            "a performative with more items than fields, or a field encoded otherwise than its type is read, or items that do not end where a size says, claim past the frame, nest too deep or hold too many values",
        )?;
        Ok(Performative {
            code,
            body,
            fields: at + fields,
            count,
            end,
        })
    }

    /// What the guard follows of it.
    fn summary(&self) -> Summary {
        Summary {
            code: self.code,
            handle: self.uint(if self.code == ATTACH { 1 } else { 0 }),
            more: self.flag(5),
            aborted: self.flag(9),
            end: self.end,
            max_frame: if self.code == OPEN {
                self.uint(2)
            } else {
                None
            },
        }
    }

    /// The encoding of field `index`, if the list has it.
    fn field(&self, index: usize) -> Option<&'a [u8]> {
        if index >= self.count {
            return None;
        }
        let mut at = self.fields;
        for _ in 0..index {
            at += encoded_len(self.body.get(at..self.end)?)?;
        }
        self.body.get(at..self.end)
    }

    /// Field `index` as a `uint`, in any of its encodings.
    fn uint(&self, index: usize) -> Option<u32> {
        match self.field(index)? {
            [0x43, ..] => Some(0),
            [0x52, h, ..] => Some(u32::from(*h)),
            [0x70, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    fn flag(&self, index: usize) -> bool {
        matches!(self.field(index), Some([0x41, ..] | [0x56, 1, ..]))
    }
}

/// The whole length of the value at the front of `bytes`, read by its sizes; `None`
/// when `bytes` ends first or it is not a value (a described value's descriptor and
/// value must not be described again).
fn encoded_len(bytes: &[u8]) -> Option<usize> {
    let primitive = |bytes: &[u8]| -> Option<usize> {
        match Shape::of(*bytes.first()?)? {
            Shape::Described => None,
            Shape::Fixed(width) => Some(1 + width),
            Shape::Sized(1) => Some(2 + usize::from(*bytes.get(1)?)),
            Shape::Sized(_) => {
                let size = bytes.get(1..5)?;
                Some(5 + u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize)
            }
        }
    };
    if bytes.first() != Some(&0x00) {
        return primitive(bytes);
    }
    let descriptor = primitive(bytes.get(1..)?)?;
    Some(1 + descriptor + primitive(bytes.get(1 + descriptor..)?)?)
}

/// The whole length of the value at the front of `bytes` as fe2o3-amqp's decoder reads
/// a performative's: compounds item by item, by their count. `None` where that reading
/// would part from the encoding's (a list, map or array whose items end elsewhere
/// than its size says, a map with an odd count, a value described twice or by what is
/// not a ulong or a short symbol, a described list the decoder reads into a type with
/// fewer fields than it has items, an array of compounds or of described values) and
/// for what the guard refuses in a performative: a claim past `bytes`, a level deeper
/// than [`MAX_DEPTH`] (`depth` counts those around the value; a described value is one
/// of its own), more than [`MAX_VALUES`] values (`values` counts them).
fn strict_len(bytes: &[u8], depth: usize, values: &mut u64) -> Option<usize> {
    *values += 1;
    if *values > MAX_VALUES {
        return None;
    }
    let (code, constructor, descriptor) = constructor(bytes)?;
    let depth = if descriptor.is_some() {
        depth + 1
    } else {
        depth
    };
    if depth > MAX_DEPTH {
        return None;
    }
    let value = bytes.get(constructor..)?;
    // The decoder reads these described lists into types of so many fields and leaves
    // further items unread, where the next field is then read from.
    if let Some(fields) = descriptor.and_then(struct_fields) {
        if !matches!(code, 0x45 | 0xc0 | 0xd0) {
            return None;
        }
        let (count, _) = compound_header(&bytes[constructor - 1..])?;
        if count > fields {
            return None;
        }
    }
    let len = strict_body(code, value, depth, values)?;
    // The described value from its own constructor on.
    if let Some(descriptor) = descriptor
        && !fields_read_as_written(descriptor, &bytes[constructor - 1..])
    {
        return None;
    }
    Some(constructor + len)
}

/// A value's constructor: its code, its length (a descriptor's included) and the
/// descriptor's code, if it is described (a symbol's by its name; `u64::MAX` for one
/// AMQP does not name).
fn constructor(bytes: &[u8]) -> Option<(u8, usize, Option<u64>)> {
    if *bytes.first()? != 0x00 {
        return Some((bytes[0], 1, None));
    }
    let (descriptor, len) = match *bytes.get(1)? {
        0x44 => (0, 1),
        0x53 => (u64::from(*bytes.get(2)?), 2),
        0x80 => (u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?), 9),
        0xa3 => {
            let n = usize::from(*bytes.get(2)?);
            (code_named(bytes.get(3..3 + n)?), 2 + n)
        }
        // A `sym32` the decoder reads ahead by what its size claims.
        _ => return None,
    };
    match *bytes.get(1 + len)? {
        0x00 => None,
        code => Some((code, 2 + len, Some(descriptor))),
    }
}

/// The described lists fe2o3-amqp reads into types of a fixed number of fields, by
/// descriptor code and name, with that number.
const STRUCTS: [(u64, &[u8], usize); 16] = [
    (0x1d, b"amqp:error:list", 3),
    (0x23, b"amqp:received:list", 2),
    (0x24, b"amqp:accepted:list", 0),
    (0x25, b"amqp:rejected:list", 1),
    (0x26, b"amqp:released:list", 0),
    (0x27, b"amqp:modified:list", 3),
    (0x28, b"amqp:source:list", 11),
    (0x29, b"amqp:target:list", 7),
    (0x2b, b"amqp:delete-on-close:list", 0),
    (0x2c, b"amqp:delete-on-no-links:list", 0),
    (0x2d, b"amqp:delete-on-no-messages:list", 0),
    (0x2e, b"amqp:delete-on-no-links-or-messages:list", 0),
    (0x30, b"amqp:coordinator:list", 1),
    (0x33, b"amqp:declared:list", 1),
    (0x34, b"amqp:transactional-state:list", 2),
    (0x32, b"amqp:discharge:list", 2),
];

/// How the decoder reads a field of a performative or of a type in [`STRUCTS`], where
/// another encoding would be read otherwise than by its size.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    /// A delivery state, an outcome, a terminus, an error: an enum or a struct of
    /// the decoder's, which reads a list or map given for it item by item as the
    /// enum's name and value (or the struct's fields) and a bare name with the next
    /// field as its value. Only a described value, or null, reads as written.
    Described,
    /// A map whose values are [`Field::Described`]'s (`attach`'s `unsettled`).
    MapOfDescribed,
    /// A terminus' durability, a unit enum the decoder reads from a uint: any other
    /// value, a list above all, it reads apart.
    Uint,
}

/// The fields of [`Field`]'s kinds, by performative or type code and index.
const FIELDS: [(u64, usize, Field); 13] = [
    (ATTACH, 5, Field::Described),
    (ATTACH, 6, Field::Described),
    (ATTACH, 7, Field::MapOfDescribed),
    (TRANSFER, 7, Field::Described),
    (0x15, 4, Field::Described),
    (DETACH, 2, Field::Described),
    (END, 0, Field::Described),
    (CLOSE, 0, Field::Described),
    (0x25, 0, Field::Described),
    (0x28, 1, Field::Uint),
    (0x28, 8, Field::Described),
    (0x29, 1, Field::Uint),
    (0x34, 1, Field::Described),
];

/// Whether each item of the list at the front of `list` (its sizes already checked),
/// the fields of `code`, is encoded as the decoder reads its kind ([`FIELDS`]).
fn fields_read_as_written(code: u64, list: &[u8]) -> bool {
    let rules = || FIELDS.iter().filter(move |(c, _, _)| *c == code);
    if rules().next().is_none() {
        return true;
    }
    each_item(list, |index, item| {
        let kind = rules()
            .find(|(_, i, _)| *i == index)
            .map(|(_, _, kind)| *kind);
        match (kind, item) {
            (None, _) | (Some(_), [0x40, ..]) => true,
            (Some(Field::Described), [0x00, ..]) => true,
            (Some(Field::Uint), [0x43 | 0x52 | 0x70, ..]) => true,
            (Some(Field::MapOfDescribed), [0xc1 | 0xd1, ..]) => {
                // Its values, every second item, described or null.
                each_item(item, |index, entry| {
                    index % 2 == 0 || matches!(entry.first(), Some(0x00 | 0x40))
                })
            }
            _ => false,
        }
    })
}

/// A list's or map's count and where its first item starts.
fn compound_header(bytes: &[u8]) -> Option<(usize, usize)> {
    match bytes {
        [0x45, ..] => Some((0, 1)),
        [0xc0 | 0xc1, _, count, ..] => Some((usize::from(*count), 3)),
        [0xd0 | 0xd1, _, _, _, _, c0, c1, c2, c3, ..] => {
            Some((u32::from_be_bytes([*c0, *c1, *c2, *c3]) as usize, 9))
        }
        _ => None,
    }
}

/// Whether `check` holds for each item of the list or map at the front of `compound`
/// (its sizes already checked), given its index; `false` for what is not one.
fn each_item(compound: &[u8], mut check: impl FnMut(usize, &[u8]) -> bool) -> bool {
    let Some((count, mut at)) = compound_header(compound) else {
        return false;
    };
    for index in 0..count {
        let Some(item) = compound.get(at..) else {
            return false;
        };
        let Some(len) = encoded_len(item) else {
            return false;
        };
        if !check(index, item) {
            return false;
        }
        at += len;
    }
    true
}

/// How many fields the decoder reads a described list of `descriptor` into, for the
/// performatives and the types in [`STRUCTS`].
fn struct_fields(descriptor: u64) -> Option<usize> {
    PERFORMATIVES
        .iter()
        .chain(STRUCTS.iter())
        .find(|(code, _, _)| *code == descriptor)
        .map(|(_, _, fields)| *fields)
}

/// The code of a descriptor given by its name: a performative's or a type's that the
/// decoder reads into a struct; `u64::MAX` for another.
fn code_named(name: &[u8]) -> u64 {
    PERFORMATIVES
        .iter()
        .chain(STRUCTS.iter())
        .find(|(_, known, _)| *known == name)
        .map_or(u64::MAX, |(code, _, _)| *code)
}

/// The length of a value's encoding after its constructor `code`: an array's items
/// are only that.
fn strict_body(code: u8, bytes: &[u8], depth: usize, values: &mut u64) -> Option<usize> {
    match code {
        0xc0 | 0xc1 | 0xe0 => compound_body(code, 1, bytes, depth, values),
        0xd0 | 0xd1 | 0xf0 => compound_body(code, 4, bytes, depth, values),
        _ => {
            let len = match Shape::of(code)? {
                Shape::Described => return None,
                Shape::Fixed(width) => width,
                Shape::Sized(width) => width.checked_add(read_size(bytes, width)?)?,
            };
            (len <= bytes.len()).then_some(len)
        }
    }
}

/// A size or count of `width` (1 or 4) bytes.
fn read_size(bytes: &[u8], width: usize) -> Option<usize> {
    match width {
        1 => Some(usize::from(*bytes.first()?)),
        _ => {
            let b = bytes.get(..4)?;
            Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        }
    }
}

/// A list's, map's or array's encoding after its constructor: its size and count,
/// `width` bytes each, then its items by their count, which must end where its size
/// says.
fn compound_body(
    code: u8,
    width: usize,
    bytes: &[u8],
    depth: usize,
    values: &mut u64,
) -> Option<usize> {
    if depth >= MAX_DEPTH {
        return None;
    }
    let end = width.checked_add(read_size(bytes, width)?)?;
    let items = bytes.get(..end)?;
    let count = read_size(items.get(width..)?, width)?;
    let mut at = 2 * width;
    if at > end {
        return None;
    }
    match code {
        0xc1 | 0xd1 if count % 2 == 1 => return None,
        // The decoder reads no constructor for an empty array: one there would be
        // read as the next value.
        0xe0 | 0xf0 if count == 0 => {}
        0xe0 | 0xf0 => {
            // One constructor for all the items, which have none of their own. The
            // decoder forgets it inside a compound item (it reads a list's second
            // item's size as a constructor, and a map's keys as maps, again and again,
            // nesting without end): none in a performative, nor described items.
            let (element, constructor, descriptor) = constructor(items.get(at..)?)?;
            if descriptor.is_some() || matches!(element, 0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0) {
                return None;
            }
            at += constructor;
            match Shape::of(element)? {
                Shape::Fixed(width) => {
                    // The decoder makes a value of each, also of those that take no
                    // byte: counted, not read one by one.
                    *values = values.saturating_add(count as u64);
                    if *values > MAX_VALUES || count.checked_mul(width)? != end - at {
                        return None;
                    }
                    at = end;
                }
                _ => {
                    for _ in 0..count {
                        *values += 1;
                        if *values > MAX_VALUES {
                            return None;
                        }
                        at += strict_body(element, items.get(at..)?, depth + 1, values)?;
                    }
                }
            }
        }
        _ => {
            for _ in 0..count {
                at += strict_len(items.get(at..)?, depth + 1, values)?;
            }
        }
    }
    (at == end).then_some(end)
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
    /// The bytes passed over are a string's or a symbol's the decoder reads as UTF-8:
    /// they are mended on the way ([`Sections::mend_text`]).
    text: bool,
    /// A character an earlier frame ended inside: the continuation bytes it still
    /// needs.
    owed: u8,
    /// The range the next of those continuation bytes must be in (narrower than
    /// `0x80..=0xbf` after some first bytes, as UTF-8 rules out overlong forms,
    /// surrogates and code points past U+10FFFF).
    next_in: (u8, u8),
    /// The first bytes of a value header an earlier frame ended in the middle of.
    carry: Vec<u8>,
    /// The next value read is overwritten (the first item of a list or a map the
    /// decoder would read otherwise than it is written).
    refuse_next: bool,
    /// A byte was overwritten: the decoder stops there, nothing more to check.
    done: bool,
    /// A string's bytes were made UTF-8 ([`Sections::mend_text`]).
    mended: bool,
    /// The whole message is in the bytes being read (it came in one frame).
    whole_message: bool,
    /// What was read ends in the constructor of a value with a 4-byte size: whether
    /// its claim is refused, at that byte, is decided by the first byte of the next
    /// frame.
    claim_undecided: bool,
    /// Values of the message's maps (annotations, properties, footer) counted so far.
    values: u64,
    /// Body sections and `amqp-sequence` items counted so far.
    body_items: u64,
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
    /// The fields of a `header` or `properties` list: primitives only (after a body's
    /// value the decoder reads a binary field as whole whatever value it is).
    Fields,
    /// The entries of the application properties: keys and values, each with its
    /// constructor, compounds read as binaries (see [`as_binary`]).
    Properties,
    /// Taken whole by their sizes (body sections; a described one at most once).
    Whole { described: bool },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Section {
    /// `header` or `properties`: a list of at most this many fields.
    Fields(u64),
    /// Annotations, footer: maps of values.
    Map,
    /// A map of values whose entries' compounds are read as binaries.
    ApplicationProperties,
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
    /// Overwrite this byte (an offset into what is being read) and stop: always the
    /// last byte the step read, or the first, when that one decided it, or a claim's
    /// constructor, decided by the byte after it (held when a frame ends between them:
    /// [`Hold`]).
    Refuse(usize),
}

impl Sections {
    /// Reads `payload`, the next bytes of the message, overwriting a byte where a value
    /// opens a level too deep or would be read otherwise than it is written, and
    /// mending strings that are not UTF-8 ([`Sections::mend_text`]).
    /// Returns whether the byte to overwrite is the constructor an earlier frame ended
    /// in ([`Sections::claim_undecided`]), which the caller holds.
    fn feed(&mut self, payload: &mut [u8]) -> bool {
        if self.done {
            return false;
        }
        if self.carry.is_empty() {
            let (read, refused) = self.read(payload);
            if let Some(offset) = refused {
                payload[offset] = NO_TYPE;
            } else if read < payload.len() {
                self.carry = payload[read..].to_vec();
            }
            return false;
        }
        // A value's first bytes came in an earlier frame: read on from a copy of them.
        let carried = self.carry.len();
        let mut input = std::mem::take(&mut self.carry);
        input.extend_from_slice(payload);
        #[cfg(debug_assertions)]
        let before = input[..carried].to_vec();
        let (read, refused) = self.read(&mut input);
        // A constructor read as another is rewritten where it is first read, so in
        // this frame: what was carried went on as it is read now.
        #[cfg(debug_assertions)]
        debug_assert_eq!(input[..carried], before[..], "nothing carried is rewritten");
        payload.copy_from_slice(&input[carried..]);
        match refused {
            // A step that waited for more bytes decides on the last one it reads,
            // which is in this frame, but for a claim's size: on its constructor,
            // which the frame before ended in and is held.
            Some(offset) if offset >= carried => payload[offset - carried] = NO_TYPE,
            Some(offset) => {
                debug_assert_eq!(offset + 1, carried, "only the held byte, last of the carry");
                return true;
            }
            None if read < input.len() => self.carry = input.split_off(read),
            None => {}
        }
        false
    }

    /// Reads as much of `input` as can be read, rewriting the constructors read as
    /// others (see [`Sections::value`]) and mending strings: how much, and the offset
    /// of a byte to overwrite (nothing is read after it).
    fn read(&mut self, input: &mut [u8]) -> (usize, Option<usize>) {
        self.claim_undecided = false;
        let mut read = 0;
        while read < input.len() {
            if self.skip > 0 {
                let n = self.skip.min((input.len() - read) as u64);
                self.skip -= n;
                if self.text {
                    self.mend_text(&mut input[read..read + n as usize]);
                }
                read += n as usize;
                continue;
            }
            match self.step(&mut input[read..]) {
                Step::Read(n) => read += n,
                Step::NeedMore => break,
                Step::Refuse(offset) => {
                    self.done = true;
                    return (read + offset, Some(read + offset));
                }
            }
        }
        (read, None)
    }

    /// Reads the next section header or the next value of the current section.
    fn step(&mut self, bytes: &mut [u8]) -> Step {
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
            Items::Values => self.value(bytes, Compounds::Arrays),
            Items::Properties => self.value(bytes, Compounds::All),
            Items::Fields => match bytes.first() {
                None => Step::NeedMore,
                Some(0x00 | 0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0) => Step::Refuse(0),
                Some(_) => self.value(bytes, Compounds::Arrays),
            },
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

    /// A section's descriptor: anything but one of a known section is refused (the
    /// decoder also takes a bare descriptor, with no `0x00` before it, and then reads
    /// a section).
    fn section_header(&mut self, bytes: &[u8]) -> Step {
        let Some(&first) = bytes.first() else {
            return Step::NeedMore;
        };
        if first != 0x00 {
            return Step::Refuse(0);
        }
        let Some(&form) = bytes.get(1) else {
            return Step::NeedMore;
        };
        let (code, len) = match form {
            0x53 => match bytes.get(2) {
                Some(&code) => (u64::from(code), 3),
                None => return Step::NeedMore,
            },
            0x80 => match bytes.get(2..10) {
                Some(code) => (code.iter().fold(0, |n, b| (n << 8) | u64::from(*b)), 10),
                None => return Step::NeedMore,
            },
            // A name as a `sym32`, which no encoder picks for a name this short: the
            // decoder reads ahead what its size claims, writing as much memory (128
            // MiB for `07 ff ff ff`), before it can fail, so it is refused at its form.
            0xb3 => return Step::Refuse(1),
            // The decoder takes a section's name as a `sym8` too.
            0xa3 => {
                let Some(&n) = bytes.get(2) else {
                    return Step::NeedMore;
                };
                let start = 3;
                if n > 64 {
                    // No section's name is this long (a read ahead of 255 bytes at most).
                    return Step::Refuse(start - 1);
                }
                match bytes.get(start..start + usize::from(n)) {
                    Some(name) => (section_by_name(name).unwrap_or(0), start + usize::from(n)),
                    None => return Step::NeedMore,
                }
            }
            _ => return Step::Refuse(1),
        };
        let section = match code {
            0x70 => Section::Fields(5),
            0x73 => Section::Fields(13),
            0x71 | 0x72 | 0x78 => Section::Map,
            0x74 => Section::ApplicationProperties,
            0x75 | 0x77 => Section::Whole,
            0x76 => Section::Sequence,
            // An empty name's last byte is its size: the decoder then reads a longer
            // one, which no section has either.
            _ => return Step::Refuse(len - 1),
        };
        // The decoder keeps every body section, however many come.
        if matches!(section, Section::Whole | Section::Sequence) && self.past_max_body_items(1) {
            return Step::Refuse(len - 1);
        }
        self.open(1, Items::Section(section), len)
    }

    fn section_value(&mut self, section: Section, bytes: &mut [u8]) -> Step {
        match section {
            Section::Map => self.value(bytes, Compounds::Arrays),
            Section::ApplicationProperties => {
                let map = matches!(bytes.first(), Some(0xc1 | 0xd1));
                let step = self.value(bytes, Compounds::Arrays);
                if let (true, Step::Read(_), Some(level)) = (map, &step, self.levels.last_mut()) {
                    // The map's entries, which value() opened.
                    level.how = Items::Properties;
                }
                step
            }
            Section::Whole => self.whole(false, bytes),
            Section::Fields(fields) => match list_header(bytes) {
                Header::Complete { count, len } => {
                    self.refuse_next = count > fields;
                    self.open(count, Items::Fields, len)
                }
                Header::NeedMore => Step::NeedMore,
                Header::Other => Step::Refuse(0),
            },
            Section::Sequence => match list_header(bytes) {
                Header::Complete { count, len } => {
                    // Each item its own allocation, a null's one byte too: past the
                    // limit the first item is refused.
                    self.refuse_next = self.past_max_body_items(count);
                    self.open(count, Items::Whole { described: false }, len)
                }
                Header::NeedMore => Step::NeedMore,
                Header::Other => Step::Refuse(0),
            },
        }
    }

    /// A value with its constructor. The compounds `read_as_binary` names (arrays, or
    /// all of them for the entries of the application properties) are read as
    /// binaries: the constructor is rewritten at once, so that the decoder too takes
    /// their bytes whole ([`as_binary`]).
    fn value(&mut self, bytes: &mut [u8], read_as_binary: Compounds) -> Step {
        let Some(first) = bytes.first_mut() else {
            return Step::NeedMore;
        };
        *first = as_binary(*first, read_as_binary);
        let code = *first;
        if Shape::of(code).is_none() {
            return Step::Refuse(0);
        }
        let opens = matches!(code, 0x00 | 0xc0 | 0xc1 | 0xd0 | 0xd1);
        if self.refuse_next || (opens && self.depth() + 1 > MAX_DEPTH) {
            return Step::Refuse(0);
        }
        match code {
            0x00 if self.past_max_values(2) => Step::Refuse(0),
            0x00 => self.open(2, Items::Values, 1),
            0xc0 | 0xc1 | 0xd0 | 0xd1 => match list_header(bytes) {
                Header::Complete { count, len } => {
                    // An odd count: the decoder's count of a map's entries wraps, and it
                    // reads on past the map. Its first key is refused, as is the first
                    // item of a list past the values a message may hold.
                    self.refuse_next =
                        (code & 1 == 1 && count % 2 == 1) || self.past_max_values(count);
                    self.open(count, Items::Values, len)
                }
                Header::NeedMore => Step::NeedMore,
                Header::Other => Step::Refuse(0),
            },
            _ => self.primitive(code, &bytes[1..], 1, true),
        }
    }

    /// A value taken whole by its sizes, as fe2o3-amqp takes a body's values.
    fn whole(&mut self, described: bool, bytes: &[u8]) -> Step {
        let Some(&code) = bytes.first() else {
            return Step::NeedMore;
        };
        if self.refuse_next {
            return Step::Refuse(0);
        }
        match Shape::of(code) {
            // The decoder refuses a described value described again.
            None => Step::Refuse(0),
            Some(Shape::Described) if described => Step::Refuse(0),
            Some(Shape::Described) => self.open(2, Items::Whole { described: true }, 1),
            Some(_) => self.primitive(code, &bytes[1..], 1, false),
        }
    }

    /// A value passed over by its size, whose constructor, `header` bytes, is read
    /// already; a string or a symbol the decoder reads (`decoded`: not a body's, which
    /// the driver reads) is mended on the way.
    fn primitive(&mut self, code: u8, bytes: &[u8], header: usize, decoded: bool) -> Step {
        self.text = decoded && matches!(code, 0xa1 | 0xb1 | 0xa3 | 0xb3);
        match Shape::of(code) {
            Some(Shape::Fixed(width)) => {
                self.skip = width as u64;
                Step::Read(header)
            }
            // A claim's first byte decides whether it reaches MAX_CLAIM, on its own.
            Some(Shape::Sized(4))
                if bytes
                    .first()
                    .is_some_and(|b| u64::from(*b) << 24 >= MAX_CLAIM) =>
            {
                Step::Refuse(0)
            }
            Some(Shape::Sized(4)) if bytes.is_empty() && header == 1 => {
                self.claim_undecided = true;
                Step::NeedMore
            }
            Some(Shape::Sized(width)) => match sized(bytes, width, false) {
                // The decoder allocates what a value claims before it reads it: a claim
                // past the message's end (4 GiB in a message of 100 bytes), when that
                // is known, is refused at the value's constructor.
                Some((size, _)) if self.whole_message && size > (bytes.len() - width) as u64 => {
                    Step::Refuse(0)
                }
                Some((size, _)) => {
                    self.skip = size;
                    Step::Read(header + width)
                }
                None => Step::NeedMore,
            },
            // Not reached: constructors are checked before.
            Some(Shape::Described) | None => Step::Refuse(0),
        }
    }

    /// Makes the next `bytes` of a string UTF-8 in place, since the decoder refuses the
    /// whole message for one string that is not: each byte of a sequence that is not
    /// UTF-8 becomes `?`. A character that the frame ends inside, which the rest of the
    /// string has room to finish, is taken as it starts: frames are handed on as they
    /// are checked, so what comes next is made to finish it, its bytes that are not
    /// the continuation the character needs made the lowest one that is. Text that is
    /// UTF-8 is left as it is however the frames split it.
    fn mend_text(&mut self, bytes: &mut [u8]) {
        let mut at = 0;
        while self.owed > 0 && at < bytes.len() {
            let (low, high) = self.next_in;
            if !(low..=high).contains(&bytes[at]) {
                bytes[at] = low;
                self.mended = true;
            }
            self.owed -= 1;
            self.next_in = (0x80, 0xbf);
            at += 1;
        }
        while at < bytes.len() {
            let Err(error) = std::str::from_utf8(&bytes[at..]) else {
                return;
            };
            at += error.valid_up_to();
            if let Some(len) = error.error_len() {
                self.mended = true;
                bytes[at..at + len].fill(b'?');
                at += len;
                continue;
            }
            // The bytes end inside a character, whose first bytes are valid so far.
            let started = &bytes[at..];
            let width = match started[0] {
                0xc2..=0xdf => 2,
                0xe0..=0xef => 3,
                _ => 4,
            };
            let owed = width - started.len();
            if owed as u64 > self.skip {
                // The string ends before the character could.
                self.mended = true;
                bytes[at..].fill(b'?');
                return;
            }
            self.owed = owed as u8;
            self.next_in = match (started, started[0]) {
                ([_], 0xe0) => (0xa0, 0xbf),
                ([_], 0xed) => (0x80, 0x9f),
                ([_], 0xf0) => (0x90, 0xbf),
                ([_], 0xf4) => (0x80, 0x8f),
                _ => (0x80, 0xbf),
            };
            return;
        }
    }

    /// Counts `count` more values the decoder makes of the message's maps: whether that
    /// passes [`MAX_VALUES`].
    fn past_max_values(&mut self, count: u64) -> bool {
        self.values = self.values.saturating_add(count);
        self.values > MAX_VALUES
    }

    /// Counts `count` more body sections or `amqp-sequence` items, which the decoder
    /// keeps each as an allocation of its own: whether that passes [`MAX_BODY_ITEMS`].
    fn past_max_body_items(&mut self, count: u64) -> bool {
        self.body_items = self.body_items.saturating_add(count);
        self.body_items > MAX_BODY_ITEMS
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

/// Which compounds [`as_binary`] rewrites.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Compounds {
    Arrays,
    All,
}

/// The constructor of a binary that holds the same bytes as a compound's, for the
/// compounds fe2o3-amqp's decoder cannot be trusted with or cannot take where they
/// are; any other constructor as it is.
///
/// A compound's size counts the bytes after it, as a binary's does, so the decoder
/// takes the compound whole as bytes and reads nothing inside it. Arrays, everywhere
/// in the maps: the decoder reads an array of compounds or described values with or
/// without constructors where the encoding has the other, and allocates what a string
/// element claims before it can be refused; the driver reads no annotation. Every
/// compound that is a key or a value of the application properties, where the
/// decoder takes scalars and described values only: a list, a map or an array there
/// made the whole message undecodable, where as a binary it is a header the driver
/// leaves out (`mapping.rs`); an empty list (`list0`, one byte) becomes a null.
fn as_binary(code: u8, compounds: Compounds) -> u8 {
    match (code, compounds) {
        (0xe0, _) | (0xc0 | 0xc1, Compounds::All) => 0xa0,
        (0xf0, _) | (0xd0 | 0xd1, Compounds::All) => 0xb0,
        (0x45, Compounds::All) => 0x40,
        _ => code,
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

/// The fuzz target's harness, which the tests replay the committed corpus through.
#[cfg(test)]
#[path = "../../fuzz/amqp10_guard.rs"]
mod fuzz_harness;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw_value::RawValue;
    use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
    use fe2o3_amqp::types::messaging::{
        ApplicationProperties, Body, Data, DeliveryAnnotations, Footer, Header, Message,
        MessageAnnotations, Properties,
    };
    use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value};
    use proptest::prelude::*;

    /// What fe2o3-amqp reads through the guard when the broker sends `bytes`, `step`
    /// bytes at a time (with the fuzz target's reader).
    fn guarded(bytes: &[u8], step: usize) -> Vec<u8> {
        let (out, read) = super::fuzz_harness::through_guard(bytes, step);
        read.expect("read to the end");
        out
    }

    /// A stream: the protocol header and the broker's `open`, then each payload in a
    /// transfer frame of its own on `(channel, handle)`, `more` on all but the last of
    /// each delivery. Returns the stream and where each payload sits in it.
    fn stream(transfers: &[(u16, u32, bool, &[u8])]) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
        let mut bytes = super::fuzz_harness::OPENED.to_vec();
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

    /// Application properties holding `{"k": value}`: keyed by a string, as the
    /// decoder requires there (it refuses the symbol key of [`map_section`]).
    fn properties_section(value: &[u8]) -> Vec<u8> {
        let mut section = map_section(0x74, value);
        section[12] = 0xa1;
        section
    }

    const DATA: &[u8] = &[0x00, 0x53, 0x75, 0xa0, 0x02, b'{', b'}'];

    /// What fe2o3-amqp makes of a payload, on a thread with a small stack: a decoder
    /// that went as deep as the payload would overflow it (and abort the test run). A
    /// panic counts as not decoding: in a debug build serde_amqp's count of a map's
    /// entries overflows on an odd count before it reads the refused key (a release
    /// build wraps it, then stops at that key).
    fn decodes(payload: Vec<u8>) -> bool {
        decoded(payload).is_some()
    }

    /// The message fe2o3-amqp makes of a payload, as [`decodes`] reads it.
    fn decoded(payload: Vec<u8>) -> Option<Message<Body<RawValue>>> {
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || {
                let reader = serde_amqp::read::SliceReader::new(&payload);
                <Body<RawValue> as DecodeIntoMessage>::decode_message_from_reader(reader).ok()
            })
            .unwrap()
            .join()
            .ok()
            .flatten()
    }

    fn from_hex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ordinary_messages_pass_unchanged() {
        let mut annotations = OrderedMap::new();
        let nested = Value::List(vec![Value::Map(OrderedMap::from_iter([(
            Value::from("a"),
            Value::List(vec![Value::from(1), Value::from("two")]),
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
        // Sizes that hold (a reader by sizes takes the value whole).
        let mut value = vec![0x40];
        for _ in 0..1000 {
            let mut list = vec![0xd0];
            list.extend_from_slice(&(value.len() as u32 + 4).to_be_bytes());
            list.extend_from_slice(&1u32.to_be_bytes());
            list.extend_from_slice(&value);
            value = list;
        }
        let payload = [vec![0x00, 0x53, 0x77], value, DATA.to_vec()].concat();
        let (bytes, _) = in_frames(&payload, 100);
        assert!(guarded(&bytes, 333) == bytes);
    }

    #[test]
    fn a_value_opening_a_level_too_deep_is_overwritten_where_the_decoder_reaches_it() {
        let deep = nested_lists(1_000_000);
        // A compound in the application properties is read as a binary, but for the
        // value of a described one.
        let described_deep = [&[0x00, 0x53, 0x01][..], &deep].concat();
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
                [properties_section(&described_deep), DATA.to_vec()].concat(),
            ),
            ("footer", [DATA.to_vec(), map_section(0x78, &deep)].concat()),
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
    fn a_section_named_by_a_symbol_is_read_all_the_same() {
        let named = |depth| {
            let name = b"amqp:message-annotations:map";
            let mut section = vec![0x00, 0xa3, name.len() as u8];
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
        // As a `sym32`, the name's size is read ahead before it can fail (128 MiB
        // written for `07 ff ff ff`): refused at its form, whatever it claims.
        let name = b"amqp:message-annotations:map";
        let mut section = vec![0x00, 0xb3];
        section.extend_from_slice(&(name.len() as u32).to_be_bytes());
        section.extend_from_slice(name);
        section.extend_from_slice(&map_section(0x72, &nested_lists(5))[3..]);
        let payload = [section, DATA.to_vec()].concat();
        assert!(decodes(payload.clone()), "fe2o3-amqp reads such a section");
        for frame in [1, 2, 3, 64] {
            let (bytes, places) = in_frames(&payload, frame);
            let out = payload_of(&guarded(&bytes, 11), &places);
            assert_eq!(out[1], NO_TYPE, "frames of {frame}");
        }
    }

    /// The decoder makes a `Value` of tens of bytes of every value in the message's
    /// maps, also of one that takes a byte. Past [`MAX_VALUES`] in a message, the
    /// list's first item is refused. (An array of 65,536 nulls, in 10 bytes, is read
    /// as a binary: `arrays_and_compound_properties_are_read_as_binaries`.)
    #[test]
    fn values_past_the_limit_are_refused() {
        // A list of 70,000 nulls: its first item.
        let mut long = vec![0xd0];
        long.extend_from_slice(&70_004u32.to_be_bytes());
        long.extend_from_slice(&70_000u32.to_be_bytes());
        long.extend(std::iter::repeat_n(0x40, 70_000));
        let payload = [map_section(0x72, &long), DATA.to_vec()].concat();
        let first_item = payload.iter().position(|b| *b == 0xd0).unwrap() + 9;
        for frame in [100, 1 << 17] {
            let (bytes, places) = in_frames(&payload, frame);
            let out = payload_of(&guarded(&bytes, 1000), &places);
            assert_eq!(out[first_item], NO_TYPE, "frames of {frame}");
        }
        // Within the limit, left alone.
        let mut fine = vec![0xd0];
        fine.extend_from_slice(&60_004u32.to_be_bytes());
        fine.extend_from_slice(&60_000u32.to_be_bytes());
        fine.extend(std::iter::repeat_n(0x40, 60_000));
        let payload = [map_section(0x72, &fine), DATA.to_vec()].concat();
        let (bytes, _) = in_frames(&payload, 100);
        assert_eq!(guarded(&bytes, 1000), bytes);
    }

    /// Layouts fe2o3-amqp's decoder reads otherwise than they are written, each hiding
    /// lists nested 300,000 deep from a reader that follows the encoding (found by a
    /// review of this module against serde_amqp's decoder).
    #[test]
    fn layouts_the_decoder_reads_otherwise_are_refused() {
        let deep = nested_lists(300_000);
        let annotations = |value: &[u8]| map_section(0x72, value);
        // A bare descriptor before a section, which the decoder takes.
        let bare = [vec![0x53, 0x72], annotations(&deep)].concat();
        // Maps of one item: the decoder's count wraps, each next one a level deeper.
        let mut odd_maps = vec![0xd0];
        odd_maps.extend_from_slice(&(65_536u32 * 4 + 4).to_be_bytes());
        odd_maps.extend_from_slice(&65_536u32.to_be_bytes());
        for _ in 0..65_536 {
            odd_maps.extend_from_slice(&[0xc1, 0x03, 0x01, 0x40]);
        }
        // After a body's value the decoder reads `user-id` whole, whatever value it
        // is: here an empty list, by its size, where its count makes it one byte; the
        // next field a string of 4 GiB to a reader by counts.
        let user_id = [
            vec![0x00, 0x53, 0x77, 0x40],
            vec![0x00, 0x53, 0x73, 0xc0, 0x0b, 0x03, 0x40],
            vec![0xc0, 0x06, 0x00, 0xb1, 0xff, 0xff, 0xff, 0xff, 0x40],
            annotations(&deep),
        ]
        .concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a user-id after a value", user_id),
            ("a bare descriptor", [bare, DATA.to_vec()].concat()),
            (
                "maps of one item",
                [annotations(&odd_maps), DATA.to_vec()].concat(),
            ),
        ];
        for (what, payload) in cases {
            for frame in [7, 64 << 10] {
                let (bytes, places) = in_frames(&payload, frame);
                let out = payload_of(&guarded(&bytes, 4096), &places);
                assert_eq!(
                    out.iter().zip(&payload).filter(|(a, b)| a != b).count(),
                    1,
                    "{what}"
                );
                assert!(!decodes(out), "{what}");
            }
        }
    }

    /// RabbitMQ 4 annotates a message its own dead-lettering moved with `x-opt-deaths`,
    /// an array of maps (the bytes below are Qpid Proton's encoding of one), and other
    /// clients put lists and maps in application properties, where the decoder takes
    /// scalars only: it refused the whole message, and the driver rejected it. Each such
    /// constructor is now rewritten to a binary's of the same layout, wherever the
    /// frames split it, and the message decodes, those values as bytes.
    #[test]
    fn arrays_and_compound_properties_are_read_as_binaries() {
        let deaths = from_hex(concat!(
            "f00000003b00000002d10000001700000004a3057175657565a10171a305636f756e7455",
            "010000001700000004a3057175657565a10172a305636f756e745502"
        ));
        let annotations = map_section(0x72, &deaths);
        let mut rewritten = vec![(annotations.len() - deaths.len(), 0xb0)];
        let properties: [(&str, &[u8], Option<u8>); 5] = [
            (
                "list",
                &[0xc0, 0x08, 0x02, 0x54, 0x01, 0xa1, 0x03, b't', b'w', b'o'],
                Some(0xa0),
            ),
            (
                "map",
                &[0xc1, 0x06, 0x02, 0xa1, 0x01, b'a', 0x54, 0x01],
                Some(0xa0),
            ),
            ("ints", &[0xe0, 0x04, 0x02, 0x54, 0x01, 0x02], Some(0xa0)),
            ("empty", &[0x45], Some(0x40)),
            ("n", &[0x54, 0x03], None),
        ];
        let mut entries = Vec::new();
        let start = annotations.len() + 12;
        for (key, value, rewrite) in properties {
            entries.extend_from_slice(&[0xa1, key.len() as u8]);
            entries.extend_from_slice(key.as_bytes());
            if let Some(code) = rewrite {
                rewritten.push((start + entries.len(), code));
            }
            entries.extend_from_slice(value);
        }
        let mut application = vec![0x00, 0x53, 0x74, 0xd1];
        application.extend_from_slice(&(entries.len() as u32 + 4).to_be_bytes());
        application.extend_from_slice(&10u32.to_be_bytes());
        application.extend_from_slice(&entries);
        let payload = [annotations, application, DATA.to_vec()].concat();
        let mut expected = payload.clone();
        for (at, code) in &rewritten {
            expected[*at] = *code;
        }
        assert!(
            !decodes(payload.clone()),
            "fe2o3-amqp refuses the message as sent"
        );
        for frame in [1, 2, 3, 7, 64, payload.len()] {
            let (bytes, _) = in_frames(&payload, frame);
            let (want, _) = in_frames(&expected, frame);
            for step in [1, 5, 4096] {
                assert!(
                    guarded(&bytes, step) == want,
                    "frames of {frame}, reads of {step}"
                );
            }
        }
        let message = decoded(expected).expect("the message decodes");
        let annotation = message.message_annotations.unwrap().0.into_values().next();
        assert_eq!(
            annotation,
            Some(Value::Binary(Binary::from(deaths[5..].to_vec())))
        );
        let application = message.application_properties.unwrap().0;
        let bytes = |value: &[u8]| SimpleValue::Binary(Binary::from(value.to_vec()));
        assert_eq!(application.get("list"), Some(&bytes(&properties[0].1[2..])));
        assert_eq!(application.get("map"), Some(&bytes(&properties[1].1[2..])));
        assert_eq!(application.get("ints"), Some(&bytes(&properties[2].1[2..])));
        assert_eq!(application.get("empty"), Some(&SimpleValue::Null));
        assert_eq!(application.get("n"), Some(&SimpleValue::Int(3)));
    }

    /// Arrays the decoder reads otherwise than they are written, found by a review of
    /// this module against serde_amqp's decoder when arrays were followed: each hid
    /// values nested deep, or 65,536 values in 10 bytes, from a reader that follows
    /// the encoding. As binaries, the decoder reads nothing inside them.
    #[test]
    fn arrays_the_decoder_would_misread_are_bytes_to_it() {
        let deep = nested_lists(300_000);
        // An array of maps: the decoder read every key and value of the map as another
        // map without a constructor.
        let mut array_of_maps = vec![0xe0, 0xff, 0x01, 0xc1];
        for _ in 0..300_000 {
            array_of_maps.extend_from_slice(&[0xff, 0x02]);
        }
        // An array of two lists: the decoder read the second with a constructor.
        let array_of_lists = [
            &[0xe0, 0xff, 0x02, 0xc0, 0x01, 0x00, 0xc0, 0x01, 0xb0][..],
            &deep,
        ]
        .concat();
        // Arrays of one list each holding the next array.
        let mut nested_arrays = vec![0xc0, 0x01, 0x01];
        for _ in 0..300 {
            nested_arrays.extend_from_slice(&[0xe0, 0x06, 0x01, 0xc0, 0x01, 0x01]);
        }
        nested_arrays.push(0x40);
        // Values described by the symbol "d", each a ubyte.
        let described = [0xe0, 0x08, 0x02, 0x00, 0xa3, 0x01, b'd', 0x50, 0x01, 0x02];
        // 65,536 nulls: a `Value` of tens of bytes each.
        let nulls = [0xf0, 0x00, 0x00, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x40];
        // After an `amqp-value` body the decoder read an array's binaries as whole
        // values: here the size of the first as a `list0`, then a section of its own.
        let binaries = [
            vec![0x00, 0x53, 0x77, 0xa1, 0x02, b'h', b'i'],
            vec![
                0x00, 0x53, 0x78, 0xc1, 0x10, 0x02, 0x53, 0x01, 0xe0, 0xff, 0x01, 0xb0,
            ],
            vec![0x45, 0x00, 0x53, 0x72],
            map_section(0x72, &deep)[3..].to_vec(),
        ]
        .concat();
        let in_annotations = |array: &[u8]| [map_section(0x72, array), DATA.to_vec()].concat();
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("an array of maps", in_annotations(&array_of_maps), false),
            ("an array of lists", in_annotations(&array_of_lists), false),
            ("nested arrays", in_annotations(&nested_arrays), false),
            ("described values", in_annotations(&described), true),
            ("nulls", in_annotations(&nulls), true),
            ("binaries after a value", binaries, false),
        ];
        for (what, payload, whole) in cases {
            let at = payload
                .iter()
                .position(|b| matches!(b, 0xe0 | 0xf0))
                .unwrap();
            for frame in [7, 64 << 10] {
                let (bytes, places) = in_frames(&payload, frame);
                let out = payload_of(&guarded(&bytes, 4096), &places);
                assert!(
                    super::fuzz_harness::read_as_binary(payload[at], out[at]),
                    "{what}"
                );
                let changed: Vec<usize> = (0..payload.len())
                    .filter(|&i| out[i] != payload[i])
                    .collect();
                // Those whose sizes were lies end in bytes that are not a section.
                assert_eq!(changed.len(), if whole { 1 } else { 2 }, "{what}");
                // On a thread of 8 MiB: reading 300,000 levels deep would abort.
                assert_eq!(decodes(out), whole, "{what}");
            }
        }
    }

    /// The decoder allocates what a value's size claims before it reads the value: in
    /// a message that came whole, a claim past its end is refused at its constructor.
    #[test]
    fn a_size_claimed_past_the_end_of_the_message_is_refused() {
        let string = [0xb1, 0xff, 0xff, 0xff, 0xf0, b'x'];
        let claims = [
            [map_section(0x72, &string), DATA.to_vec()].concat(),
            vec![0x00, 0x53, 0x75, 0xb0, 0xff, 0xff, 0xff, 0xff, b'x'],
            vec![
                0x00, 0x53, 0x77, 0xd0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0x40,
            ],
        ];
        for payload in claims {
            let (bytes, places) = in_frames(&payload, 1 << 16);
            let out = payload_of(&guarded(&bytes, 100), &places);
            let at = payload
                .iter()
                .rposition(|b| [0xb1, 0xb0, 0xd0].contains(b))
                .unwrap();
            assert_eq!(out[at], NO_TYPE, "{payload:x?}");
        }
        // An array of strings could claim as much in an element, past its constructor.
        let strings = [0xe0, 0x06, 0x01, 0xa1, 0x02, b'h', b'i'];
        let (bytes, _) = in_frames(
            &[map_section(0x72, &strings), DATA.to_vec()].concat(),
            1 << 16,
        );
        assert!(guarded(&bytes, 100) != bytes);
    }

    /// A message whose string claims `size` bytes, with 100 after its size.
    fn claiming(size: u64) -> Vec<u8> {
        let mut string = vec![0xb1];
        string.extend_from_slice(&u32::try_from(size).unwrap().to_be_bytes());
        string.extend_from_slice(&[b'x'; 100]);
        [map_section(0x72, &string), DATA.to_vec()].concat()
    }

    /// In a message of several frames the guard cannot know the end before the last
    /// frame, and hands each frame on as it comes: a claim of [`MAX_CLAIM`] or more is
    /// refused whatever follows; one below it is left to the decoder, which allocates
    /// it and fails at the end of what came. Split at every place, the constructor
    /// last in its frame among them.
    #[test]
    fn a_size_claimed_past_the_limit_is_refused_in_a_message_of_many_frames() {
        for size in [u64::from(u32::MAX), MAX_CLAIM] {
            // A section named by a `sym32`, claiming the same, before its name.
            let mut named = vec![0x00, 0xb3];
            named.extend_from_slice(&u32::try_from(size).unwrap().to_be_bytes());
            named.extend_from_slice(&[b'x'; 100]);
            for (payload, constructor) in [(claiming(size), 0xb1), (named, 0xb3)] {
                let at = payload.iter().position(|b| *b == constructor).unwrap();
                for frame in 1..at + 8 {
                    let (bytes, places) = in_frames(&payload, frame);
                    assert!(places.len() > 1, "in several frames");
                    let out = payload_of(&guarded(&bytes, 7), &places);
                    assert_eq!(
                        out[at], NO_TYPE,
                        "a claim of {size} bytes, frames of {frame}"
                    );
                    let changed = out.iter().zip(&payload).filter(|(a, b)| a != b).count();
                    assert_eq!(changed, 1, "only the constructor");
                    assert!(!decodes(out));
                }
            }
        }
        for frame in [1, 16, 17] {
            let (bytes, _) = in_frames(&claiming(100), frame);
            assert_eq!(guarded(&bytes, 7), bytes, "left to the decoder");
            // Not refused: what follows the string is read as its bytes, mended as text.
            let (bytes, _) = in_frames(&claiming(MAX_CLAIM - 1), frame);
            let out = guarded(&bytes, 7);
            assert!(
                out.iter()
                    .zip(&bytes)
                    .all(|(o, b)| o == b || super::fuzz_harness::mended_text(*b, *o)),
                "left to the decoder"
            );
        }
    }

    /// Where a frame ends in a claim's constructor, nothing from it on is handed on
    /// until the claim's size comes: the guard could not refuse it otherwise.
    #[test]
    fn a_frame_ending_in_a_claims_constructor_is_held_until_its_size_comes() {
        let payload = claiming(u64::from(u32::MAX));
        let at = payload.iter().position(|b| *b == 0xb1).unwrap();
        let (first, second) = payload.split_at(at + 1);
        let other = [0x00, 0x53, 0x75, 0xa0, 0x01, 0x2a];
        let (bytes, places) = stream(&[
            (1, 1, false, &other),
            (0, 1, true, first),
            (1, 1, false, &other),
            (0, 1, true, &[]),
            (0, 1, false, second),
        ]);
        // A transfer frame's header and performative, before its payload.
        let before_payload = places[0].start - super::fuzz_harness::OPENED.len();
        // The broker's bytes come in two reads: up to the frame with the size, then it.
        let split = places[4].start - before_payload;
        let mut guard = Guarded::new(tokio::io::AsyncReadExt::chain(
            &bytes[..split],
            &bytes[split..],
        ));
        let mut out = Vec::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 1 << 16];
            let n = guard.read(&mut chunk).await.unwrap();
            out.extend_from_slice(&chunk[..n]);
            let held_frame = places[1].start - before_payload;
            assert_eq!(
                out.len(),
                held_frame,
                "everything up to the held frame, no more"
            );
            guard.read_to_end(&mut out).await.unwrap();
        });
        assert_eq!(out.len(), bytes.len());
        assert_eq!(out[places[1].end - 1], NO_TYPE, "the held constructor");
    }

    /// A delivery that ends unfinished releases what it held unchanged, and a broker
    /// that goes on with other deliveries past [`MAX_HELD`] gets the held claim refused
    /// rather than a stalled connection.
    #[test]
    fn a_hold_ends_with_its_delivery_or_past_its_limit() {
        let payload = claiming(u64::from(u32::MAX));
        let at = payload.iter().position(|b| *b == 0xb1).unwrap();
        let first = &payload[..at + 1];
        let (cut, places) = stream(&[(0, 1, true, first), (0, 1, false, &[])]);
        let out = guarded(&cut, 100);
        assert_eq!(
            out, cut,
            "a last frame without the size: the decoder stops at it"
        );
        assert!(!decodes(payload_of(&out, &places)));

        let big = [
            &[0x00, 0x53, 0x75, 0xb0][..],
            &(1u32 << 20).to_be_bytes(),
            &vec![0; 1 << 20],
        ]
        .concat();
        let mut transfers = vec![(0, 1, true, first)];
        // Seventeen deliveries of 1 MiB on another link, in frames the size the
        // driver's `open` allows.
        let chunks: Vec<&[u8]> = big.chunks(MAX_FRAME - 64).collect();
        for _ in 0..17 {
            for (i, chunk) in chunks.iter().enumerate() {
                transfers.push((1, 1, i + 1 < chunks.len(), *chunk));
            }
        }
        let (bytes, places) = stream(&transfers);
        let out = guarded(&bytes, 1 << 16);
        assert_eq!(
            out[places[0].end - 1],
            NO_TYPE,
            "refused once 16 MiB wait behind it"
        );

        // The delivery then goes on, ending a frame in another constructor: it is
        // refused already, so nothing more is held or changed.
        let more: &[u8] = &[0x00, 0x00, 0x00, 0x01, b'x', 0xb1];
        let other: &[u8] = &[0x00, 0x53, 0x75, 0xa0, 0x01, 0x2a];
        transfers.push((0, 1, true, more));
        transfers.push((1, 1, false, other));
        let (bytes, places) = stream(&transfers);
        let mut guard = Guarded::new(ThenPending(&bytes));
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break,
            }
        }
        assert!(guard.holds.is_empty());
        assert_eq!(
            out.len(),
            bytes.len(),
            "everything handed on, the delivery unfinished"
        );
        let changed = (0..bytes.len()).filter(|&i| out[i] != bytes[i]).count();
        assert_eq!(changed, 1);
        assert_eq!(out[places[0].end - 1], NO_TYPE);
    }

    /// The decoder keeps every body section, and every `amqp-sequence` item, as an
    /// allocation of its own, a null's one byte too: past [`MAX_BODY_ITEMS`] in a
    /// message, the sequence's first item or the section's descriptor is refused.
    #[test]
    fn body_items_past_the_limit_are_refused() {
        let mut sequence = vec![0x00, 0x53, 0x76, 0xd0, 0x00, 0x01, 0x00, 0x04];
        sequence.extend_from_slice(&65_536u32.to_be_bytes());
        sequence.extend(std::iter::repeat_n(0x40, 65_536));
        // 16 sections of 65,537 items (each section counts) pass 1 Mi.
        let within = sequence.repeat(15);
        let (bytes, _) = in_frames(&within, 1 << 16);
        assert_eq!(guarded(&bytes, 1 << 16), bytes);
        let past = sequence.repeat(16);
        let (bytes, places) = in_frames(&past, 1 << 16);
        let out = payload_of(&guarded(&bytes, 1 << 16), &places);
        let first_item = 15 * sequence.len() + 12;
        assert_eq!(out[first_item], NO_TYPE);
        let changed = out.iter().zip(&past).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 1);

        let data: &[u8] = &[0x00, 0x53, 0x75, 0xa0, 0x00];
        let sections = data.repeat(MAX_BODY_ITEMS as usize + 1);
        let (bytes, places) = in_frames(&sections, 1 << 16);
        let out = payload_of(&guarded(&bytes, 1 << 16), &places);
        let last_code = sections.len() - 3;
        assert_eq!(out[last_code], NO_TYPE, "the section past the limit");
        assert!(!decodes(out));
    }

    /// A frame that decides a held claim and ends in another constructor moves the hold
    /// there: the later claim is the one refused, the earlier left alone.
    #[test]
    fn a_hold_moves_to_the_next_claim() {
        let map = [
            &[
                0xc1, 0x00, 0x04, 0xa3, 0x01, b'a', 0xb1, 0x00, 0x00, 0x00, 0x01, b'x',
            ][..],
            &[0xa3, 0x01, b'b', 0xb1, 0xff, 0xff, 0xff, 0xff, b'x'],
        ]
        .concat();
        let mut section = vec![0x00, 0x53, 0x72];
        section.extend_from_slice(&map);
        section[4] = (map.len() - 2) as u8;
        let payload = [section, DATA.to_vec()].concat();
        let first = payload.iter().position(|b| *b == 0xb1).unwrap();
        let second = payload.iter().rposition(|b| *b == 0xb1).unwrap();
        let (bytes, places) = stream(&[
            (0, 1, true, &payload[..=first]),
            (0, 1, true, &payload[first + 1..=second]),
            (0, 1, false, &payload[second + 1..]),
        ]);
        let out = payload_of(&guarded(&bytes, 5), &places);
        assert_eq!(out[first], 0xb1, "the first claim, one byte, passes");
        assert_eq!(out[second], NO_TYPE, "the second, 4 GiB, is refused");
        assert!(!decodes(out));
    }

    /// Gives its bytes, then waits for ever, as a broker with nothing more to send.
    struct ThenPending<'a>(&'a [u8]);

    impl AsyncRead for ThenPending<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.0.is_empty() {
                return Poll::Pending;
            }
            let n = self.0.len().min(out.remaining());
            out.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Poll::Ready(Ok(()))
        }
    }

    /// A link detached in the middle of a delivery, and a new one on its handle: the
    /// new delivery is read from its start.
    #[test]
    fn a_delivery_cut_by_a_detach_is_forgotten() {
        let deep = [map_section(0x72, &nested_lists(1000)), DATA.to_vec()].concat();
        // The first delivery stops inside a string, whose rest would hide the deep one.
        let cut = [
            vec![0x00, 0x53, 0x77, 0xb1, 0x00, 0x01, 0x00, 0x00],
            vec![b'x'; 10],
        ]
        .concat();
        let (mut bytes, _) = stream(&[(0, 1, true, &cut[..])]);
        // A detach of handle 1 on channel 0.
        bytes.extend_from_slice(&[0, 0, 0, 16, 2, 0, 0, 0]);
        bytes.extend_from_slice(&[0x00, 0x53, 0x16, 0xc0, 0x03, 0x01, 0x52, 0x01]);
        let (next, places) = stream(&[(0, 1, false, &deep[..])]);
        let start = bytes.len();
        bytes.extend_from_slice(&next[8..]);
        let out = guarded(&bytes, 100);
        let place = places[0].start - 8 + start..places[0].end - 8 + start;
        assert!(!decodes(out[place].to_vec()));
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
    fn what_is_not_a_transfer_passes_as_it_is() {
        let mut bytes = b"AMQP\x03\x01\x00\x00".to_vec();
        // A SASL frame, an empty frame.
        bytes.extend_from_slice(&[0, 0, 0, 12, 2, 1, 0, 0, 0x00, 0x53, 0x44, 0x45]);
        bytes.extend_from_slice(&[0, 0, 0, 8, 2, 0, 0, 0]);
        assert_eq!(guarded(&bytes, 3), bytes);
        // Another protocol's server, for fe2o3-amqp to say what it is.
        let http = b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec();
        assert_eq!(guarded(&http, 3), http);
    }

    #[test]
    fn framing_broken_after_the_protocol_header_is_an_error_after_what_came_before() {
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 8, 2, 0, 0, 0]);
        let good = bytes.len();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0]);
        let (out, read) = super::fuzz_harness::through_guard(&bytes, 5);
        let error = read.expect_err("a frame of 4 GiB");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("size 4294967295"), "{error}");
        assert_eq!(out, bytes[..good]);
    }

    /// A frame of `body` on channel 0, of `kind` (0 AMQP, 1 SASL).
    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let size = u32::try_from(8 + body.len()).unwrap();
        [&size.to_be_bytes()[..], &[2, kind, 0, 0], body].concat()
    }

    /// Whether the guard ends the stream with an error after `good` bytes, handing on
    /// those and nothing after them.
    fn refused_after(bytes: &[u8], good: usize) -> String {
        for step in [1, 7, 4096] {
            let (out, read) = super::fuzz_harness::through_guard(bytes, step);
            let error = read.expect_err("the guard refuses the frame");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData);
            assert_eq!(out, bytes[..good], "read {step} bytes at a time");
            if step == 4096 {
                return error.to_string();
            }
        }
        unreachable!()
    }

    /// A list32 (or map32, with `0xd1`) of `items`, each encoded, its size right.
    fn compound32(code: u8, items: &[&[u8]]) -> Vec<u8> {
        let body = items.concat();
        [
            &[code][..],
            &u32::try_from(body.len() + 4).unwrap().to_be_bytes(),
            &u32::try_from(items.len()).unwrap().to_be_bytes(),
            &body,
        ]
        .concat()
    }

    /// `value` described by the small ulong `code`.
    fn described(code: u8, value: &[u8]) -> Vec<u8> {
        [&[0x00, 0x53, code][..], value].concat()
    }

    /// Lists nested `depth` deep around a null, every size right.
    fn nested_right(depth: usize) -> Vec<u8> {
        (0..depth).fold(vec![0x40], |inner, _| compound32(0xd0, &[&inner]))
    }

    /// A transfer on handle 0 whose `state` field is `state`, then `resume` and
    /// `aborted` false.
    fn transfer_with_state(state: &[u8]) -> Vec<u8> {
        let fields: [&[u8]; 10] = [
            &[0x43],
            &[0x43],
            &[0xa0, 1, 1],
            &[0x43],
            &[0x42],
            &[0x42],
            &[0x40],
            state,
            &[0x42],
            &[0x42],
        ];
        described(0x14, &compound32(0xd0, &fields))
    }

    /// A `close` whose error's `info` is `{"k": value}`.
    fn close_with_info(value: &[u8]) -> Vec<u8> {
        let info = compound32(0xd1, &[&[0xa3, 1, b'k'], value]);
        let error = described(0x1d, &compound32(0xd0, &[&[0xa3, 1, b'x'], &[0x40], &info]));
        described(0x18, &compound32(0xd0, &[&error]))
    }

    /// Performatives fe2o3-amqp's decoder reads otherwise than their sizes say hid a
    /// message from the guard (two reviews, 2026-12-06): a list size past the frame,
    /// which the guard took for no performative and passed unchecked; more items than
    /// a transfer has fields; a `state` whose list holds more than its items, or more
    /// items than its type has fields (the decoder reads the transfer's next fields
    /// from them, which moved `aborted` under the guard); a `sym32` descriptor. Each
    /// ends the connection now, where the decoder went on to a message nested 80,000
    /// deep.
    #[test]
    fn performatives_the_decoder_reads_otherwise_are_refused() {
        let deep = [
            &[
                0x00, 0x53, 0x72, 0xd1, 0, 0, 0, 0, 0, 0, 0, 2, 0xa3, 1, b'k',
            ][..],
            &[0xc0, 1, 1].repeat(300),
            &[0x40],
        ]
        .concat();
        let twelve: Vec<&[u8]> = std::iter::repeat_n(&[0x40u8][..], 12).collect();
        for (what, performative) in [
            (
                "a list size past the frame",
                vec![
                    0x00, 0x53, 0x14, 0xd0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 6, 0x43, 0x43, 0xa0,
                    1, 1, 0x43, 0x42, 0x42,
                ],
            ),
            (
                "more items than fields",
                described(0x14, &compound32(0xd0, &twelve)),
            ),
            (
                "a state list holding more than its items",
                transfer_with_state(&[0x00, 0x53, 0x24, 0xc0, 0x02, 0x00, 0x42]),
            ),
            (
                "a state with more items than its type has fields",
                transfer_with_state(&[0x00, 0x53, 0x24, 0xc0, 0x02, 0x01, 0x42]),
            ),
            (
                "a state in a list, its first item described",
                transfer_with_state(&[0xc0, 0x06, 0x02, 0x00, 0x53, 0x24, 0x45, 0x42]),
            ),
            (
                "a state by its bare code",
                transfer_with_state(&[0x52, 0x24]),
            ),
            (
                "an empty array with a constructor the decoder does not read",
                close_with_info(&compound32(0xd0, &[&[0xe0, 0x02, 0x00, 0xa0], &[0x40]])),
            ),
            (
                "a sym32 descriptor",
                [
                    &[0x00, 0xb3, 0, 0, 0, 18][..],
                    b"amqp:transfer:list",
                    &[0xc0, 0x01, 0x00],
                ]
                .concat(),
            ),
        ] {
            let good = super::fuzz_harness::OPENED.len();
            let bytes = [
                super::fuzz_harness::OPENED,
                &frame(0, &[&performative[..], &deep].concat()),
            ]
            .concat();
            let error = refused_after(&bytes, good);
            assert!(
                error.contains("does not read as fe2o3-amqp would"),
                "{what}: {error}"
            );
        }
        // The same transfer with a state as it is written passes.
        let fine = transfer_with_state(&[0x00, 0x53, 0x24, 0x45]);
        let bytes = [super::fuzz_harness::OPENED, &frame(0, &fine)].concat();
        assert_eq!(guarded(&bytes, 7), bytes);
    }

    /// Seeds for [`performatives_the_guard_takes_are_read_alike`]: performatives as
    /// brokers write them, with the compounds the decoder reads into types.
    fn performative_seeds() -> Vec<Vec<u8>> {
        let sym = |s: &str| [&[0xa3, s.len() as u8][..], s.as_bytes()].concat();
        let str8 = |s: &str| [&[0xa1, s.len() as u8][..], s.as_bytes()].concat();
        let symbols = {
            let items = [sym("a"), sym("bc")].map(|s| s[1..].to_vec()).concat();
            [
                &[0xf0][..],
                &u32::try_from(5 + items.len()).unwrap().to_be_bytes(),
                &[0, 0, 0, 2, 0xa3],
                &items,
            ]
            .concat()
        };
        let map = compound32(0xd1, &[&sym("k"), &str8("v"), &sym("n"), &nested_right(3)]);
        let modified = described(0x27, &compound32(0xd0, &[&[0x42], &[0x41], &map]));
        let error = described(
            0x1d,
            &compound32(0xd0, &[&sym("amqp:x"), &str8("why"), &map]),
        );
        let rejected = described(0x25, &compound32(0xd0, &[&error]));
        let filter = compound32(
            0xd1,
            &[
                &sym("f"),
                &[&[0x00, 0xa3, 3][..], b"sel", &str8("a = 1")].concat(),
            ],
        );
        let source = described(
            0x28,
            &compound32(
                0xd0,
                &[
                    &str8("/q"),
                    &[0x43],
                    &sym("session-end"),
                    &[0x43],
                    &[0x42],
                    &[0x40],
                    &sym("move"),
                    &filter,
                    &rejected,
                    &[0x40],
                    &symbols,
                ],
            ),
        );
        let attach = described(
            0x12,
            &compound32(
                0xd0,
                &[
                    &str8("link"),
                    &[0x43],
                    &[0x41],
                    &[0x50, 2],
                    &[0x50, 0],
                    &source,
                    &described(0x29, &compound32(0xd0, &[&str8("/q")])),
                    &[0x40],
                    &[0x42],
                    &[0x43],
                    &[0x40],
                    &symbols,
                    &symbols,
                    &map,
                ],
            ),
        );
        vec![
            [transfer_with_state(&modified), DATA.to_vec()].concat(),
            [transfer_with_state(&rejected), DATA.to_vec()].concat(),
            [
                transfer_with_state(&[0x00, 0x53, 0x24, 0x45]),
                DATA.to_vec(),
            ]
            .concat(),
            attach,
            close_with_info(&map),
            described(
                0x15,
                &compound32(0xd0, &[&[0x41], &[0x43], &[0x43], &[0x41], &rejected]),
            ),
            described(0x40, &compound32(0xd0, &[&symbols])),
        ]
    }

    /// What fe2o3-amqp's decoder makes of a performative, as it reads a frame's body,
    /// and where it stopped reading; on a thread of 8 MiB, which it must not overflow.
    fn performative_decoded(
        body: &[u8],
    ) -> Option<(fe2o3_amqp::types::performatives::Performative, usize)> {
        let body = body.to_vec();
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || {
                use serde::Deserialize;
                let mut cursor = std::io::Cursor::new(&body[..]);
                let reader = serde_amqp::read::IoReader::new(&mut cursor);
                let mut decoder = serde_amqp::de::Deserializer::new(reader);
                let read =
                    fe2o3_amqp::types::performatives::Performative::deserialize(&mut decoder);
                read.ok().map(|p| (p, cursor.position() as usize))
            })
            .unwrap()
            .join()
            .expect("the decoder did not overflow its stack")
    }

    #[test]
    fn the_seeds_are_taken_and_read_alike() {
        for (i, seed) in performative_seeds().iter().enumerate() {
            let taken = Performative::read(seed).unwrap_or_else(|why| panic!("seed {i}: {why}"));
            let summary = taken.summary();
            if seed[2] == 0x40 {
                continue; // SASL's, which fe2o3-amqp reads as another type
            }
            let (_, read_to) =
                performative_decoded(seed).unwrap_or_else(|| panic!("seed {i} decodes"));
            if summary.code == TRANSFER {
                assert_eq!(read_to, summary.end, "seed {i}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8192))]

        /// A performative the guard takes is read by fe2o3-amqp's decoder as the guard
        /// reads it: a transfer's handle, `more` and `aborted` alike, its message
        /// starting where the guard's checks begin, and the decoder never deeper than
        /// an 8 MiB thread holds. Performatives as brokers write them, with bytes
        /// changed, added or taken away.
        #[test]
        fn performatives_the_guard_takes_are_read_alike(
            seed in any::<prop::sample::Index>(),
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), any::<u8>(), 0u8..3),
                1..4,
            ),
        ) {
            let seeds = performative_seeds();
            let mut bytes = seeds[seed.index(seeds.len())].clone();
            for (at, byte, how) in edits {
                let at = at.index(bytes.len());
                match how {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => {
                        bytes.remove(at);
                    }
                }
                if bytes.is_empty() {
                    return Ok(());
                }
            }
            let Ok(performative) = Performative::read(&bytes) else {
                return Ok(());
            };
            let summary = performative.summary();
            if let Some((fe2o3_amqp::types::performatives::Performative::Transfer(t), read_to)) =
                performative_decoded(&bytes)
            {
                prop_assert_eq!(summary.code, TRANSFER);
                prop_assert_eq!(Some(t.handle.0), summary.handle);
                prop_assert_eq!(t.more, summary.more);
                prop_assert_eq!(t.aborted, summary.aborted);
                prop_assert_eq!(read_to, summary.end, "where the message starts");
            }
        }
    }

    /// What the broker says outside messages is checked as well (two reviews,
    /// 2026-12-06): a SASL frame with a `sym32` descriptor claiming 4 GiB, which the
    /// decoder allocated and zeroed before any login; a `close` whose error info nests
    /// deeper than [`MAX_DEPTH`], which overflowed the stack of an application on
    /// tokio's default; an array of maps there, which the decoder reads as maps inside
    /// maps for as long as the frame goes (it forgets an array's constructor inside a
    /// list, never inside a map).
    #[test]
    fn performatives_claiming_or_nesting_past_the_limits_are_refused() {
        let sasl = [
            &b"AMQP\x03\x01\x00\x00"[..],
            &frame(1, &[0x00, 0xb3, 0xff, 0xff, 0xff, 0xff]),
        ]
        .concat();
        refused_after(&sasl, 8);
        let good = super::fuzz_harness::OPENED.len();
        // An array of one map of four binaries by their sizes, which the decoder
        // reads as a map whose keys are maps, each 8 bytes deeper.
        let map = [
            &[0xd1, 0, 0, 0, 36, 0, 0, 0, 4][..],
            &[0xa0, 6, 0, 0, 0, 0, 0, 2].repeat(4),
        ]
        .concat();
        let maps = [
            &[0xf0][..],
            &u32::try_from(4 + map.len()).unwrap().to_be_bytes(),
            &[0, 0, 0, 1],
            &map,
        ]
        .concat();
        for info in [nested_right(MAX_DEPTH), maps] {
            let bytes = [
                super::fuzz_harness::OPENED,
                &frame(0, &close_with_info(&info)),
            ]
            .concat();
            refused_after(&bytes, good);
        }
        // Nested well within the limit, it passes.
        let bytes = [
            super::fuzz_harness::OPENED,
            &frame(0, &close_with_info(&nested_right(MAX_DEPTH / 2))),
        ]
        .concat();
        assert_eq!(guarded(&bytes, 7), bytes);
    }

    /// Frames past what the connection allows end it at their header, not once they
    /// are buffered: 512 bytes before the broker's `open` (64 MiB were buffered before
    /// any login), the driver's `max-frame-size` after.
    #[test]
    fn frames_past_the_size_allowed_end_the_connection_at_their_header() {
        assert_eq!(
            MAX_FRAME,
            fe2o3_amqp::connection::DEFAULT_MAX_FRAME_SIZE as usize
        );
        let mut before_open = b"AMQP\x03\x01\x00\x00".to_vec();
        before_open.extend_from_slice(&[0x04, 0, 0, 0, 2, 1, 0, 0]);
        let error = refused_after(&before_open, 8);
        assert!(error.contains("size 67108864"), "{error}");
        let good = super::fuzz_harness::OPENED.len();
        let mut after_open = super::fuzz_harness::OPENED.to_vec();
        after_open.extend_from_slice(&u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes());
        after_open.extend_from_slice(&[2, 0, 0, 0]);
        refused_after(&after_open, good);
    }

    /// Replays the committed corpus of the fuzz target `amqp10_guard`: a find stays
    /// fixed.
    #[test]
    fn the_fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/amqp10_guard");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
            let path = entry.expect("an entry").path();
            super::fuzz_harness::check(&std::fs::read(&path).expect("read"));
            replayed += 1;
        }
        assert!(replayed >= 8, "the corpus has {replayed} inputs");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes as a message, or as the whole stream: the guard never panics, and
        /// hands on every byte, changing only a message's: at most one refused, any
        /// other a compound's constructor read as a binary's or a string's byte mended.
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
            prop_assert!(changed.iter().filter(|&&at| out[at] == NO_TYPE).count() <= 1);
            super::fuzz_harness::changes_no_more(&out, &changed, step);
            for at in changed {
                prop_assert!(
                    out[at] == NO_TYPE
                        || super::fuzz_harness::read_as_binary(bytes[at], out[at])
                        || super::fuzz_harness::mended_text(bytes[at], out[at])
                );
                prop_assert!(places.iter().any(|p| p.contains(&at)));
            }
            prop_assert_eq!(guarded(&payload, step), payload);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes as a frame's body, AMQP or SASL, behind a well-formed
        /// performative's first bytes or not: the guard never panics, and either ends
        /// the connection after what came before or hands on every byte.
        #[test]
        fn any_performative(
            body in prop::collection::vec(any::<u8>(), 0..300),
            described in any::<bool>(),
            kind in 0u8..2,
            step in 1usize..64,
        ) {
            let body = if described {
                [&[0x00, 0x53, 0x10 + body.first().copied().unwrap_or(0) % 9][..], &body].concat()
            } else {
                body
            };
            let good = super::fuzz_harness::OPENED.len();
            let bytes = [super::fuzz_harness::OPENED, &frame(kind, &body)].concat();
            let (out, read) = super::fuzz_harness::through_guard(&bytes, step);
            match read {
                Ok(()) => prop_assert_eq!(out.len(), bytes.len()),
                Err(e) => {
                    prop_assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    prop_assert_eq!(&out[..], &bytes[..good]);
                }
            }
        }
    }

    /// A message whose strings are the placeholders' of `patches` (each unique in the
    /// encoding), encoded, with each placeholder's bytes replaced by its bytes.
    fn patched(message: Message<Body<Value>>, patches: &[(&str, &[u8])]) -> Vec<u8> {
        let mut payload = encode(message);
        for (placeholder, bytes) in patches {
            assert_eq!(placeholder.len(), bytes.len());
            let at = payload
                .windows(placeholder.len())
                .position(|w| w == placeholder.as_bytes())
                .expect("the placeholder is in the encoding");
            payload[at..at + bytes.len()].copy_from_slice(bytes);
        }
        payload
    }

    /// Strings another client wrote as bytes that are not UTF-8 (RabbitMQ hands AMQP
    /// 0-9-1 header names and message ids over as such): fe2o3-amqp's decoder refused
    /// the whole message, which the driver then rejected, and RabbitMQ dropped. Now each
    /// such byte reads as `?`, in every section the decoder reads, strings and symbols,
    /// short and long, however the frames split the message; text that is UTF-8 is left
    /// as it is, a character split between two frames too.
    #[test]
    fn strings_that_are_not_utf8_are_mended_however_the_frames_split_them() {
        let valid = "caf\u{e9} \u{1f600} \u{20ac}";
        let long = "f".repeat(300);
        let annotations = |key: &str, value: Value| {
            let mut map = OrderedMap::new();
            map.insert(Symbol::from(key).into(), value);
            map
        };
        let message = Message::builder()
            .delivery_annotations(DeliveryAnnotations(annotations("x-opt-%", Value::from(1))))
            .message_annotations(MessageAnnotations(annotations(
                "x-opt-end",
                Value::from("e#"),
            )))
            .properties(
                Properties::builder()
                    .message_id("id-##".to_string())
                    .subject(valid)
                    .content_type(Symbol::from("text/@"))
                    .build(),
            )
            .application_properties(
                ApplicationProperties::builder()
                    .insert("k%", 1)
                    .insert("v", "a&&&b")
                    .insert("fine", valid)
                    .insert("long", format!("{long}^^"))
                    .build(),
            )
            .body(Body::Data(vec![Data(Binary::from(b"{}".to_vec()))].into()))
            .footer(Footer(annotations(
                "x-opt-f",
                Value::from(format!("{long}~~")),
            )))
            .build();
        let payload = patched(
            message,
            &[
                ("id-##", b"id-\xff\xfe"),
                // A symbol, as a key of the delivery annotations.
                ("x-opt-%", b"x-opt-\xff"),
                ("text/@", b"text/\xc0"),
                ("k%", b"k\xe9"),
                // A surrogate's encoding, which UTF-8 does not allow.
                ("a&&&b", b"a\xed\xa0\x80b"),
                // A character the string ends inside.
                ("e#", b"e\xc3"),
                // Strings of more than 255 bytes, `str32`.
                ("^^", b"\xc3("),
                ("~~", b"\xe9\xe9"),
            ],
        );
        assert!(!decodes(payload.clone()), "the decoder refuses it as it is");
        for frame in 1..=payload.len() {
            let (bytes, places) = in_frames(&payload, frame);
            for step in [1, 7, 4096] {
                let out = guarded(&bytes, step);
                let context = format!("frames of {frame}, reads of {step}");
                let message = decoded(payload_of(&out, &places)).expect(&context);
                let properties = message.properties.expect(&context);
                assert_eq!(properties.subject.as_deref(), Some(valid), "{context}");
                let id = properties.message_id.map(|id| format!("{id:?}"));
                assert_eq!(id.as_deref(), Some("String(\"id-??\")"), "{context}");
                let content_type = properties.content_type.map(|t| t.0);
                assert_eq!(content_type.as_deref(), Some("text/?"), "{context}");
                let application = message.application_properties.expect(&context).0;
                assert_eq!(
                    application.get("k?"),
                    Some(&SimpleValue::Int(1)),
                    "{context}"
                );
                assert_eq!(
                    application.get("fine"),
                    Some(&SimpleValue::from(valid)),
                    "{context}"
                );
                let key = |k: &str| {
                    fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(Symbol::from(k))
                };
                let delivery = message.delivery_annotations.expect(&context).0;
                assert_eq!(
                    delivery.get(&key("x-opt-?")),
                    Some(&Value::from(1)),
                    "{context}"
                );
                let annotations = message.message_annotations.expect(&context).0;
                let end = annotations.get(&key("x-opt-end"));
                assert_eq!(end, Some(&Value::from("e?")), "{context}");
                let footer = message.footer.expect(&context).0;
                let f = footer.get(&key("x-opt-f"));
                assert_eq!(f, Some(&Value::from(format!("{long}??"))), "{context}");
                // Split after a character's first byte, the next is made the lowest
                // continuation that byte allows (a frame is handed on once checked).
                let (surrogate, bad_lead) = (application.get("v"), application.get("long"));
                let one_frame = ("a???b".to_string(), format!("{long}?("));
                let split = ("a\u{d000}b".to_string(), format!("{long}\u{c0}"));
                let got = |v: Option<&SimpleValue>| match v {
                    Some(SimpleValue::String(s)) => s.clone(),
                    other => panic!("{context}: {other:?}"),
                };
                let (surrogate, bad_lead) = (got(surrogate), got(bad_lead));
                if places.len() == 1 {
                    assert_eq!((&surrogate, &bad_lead), (&one_frame.0, &one_frame.1));
                } else {
                    assert!([&one_frame.0, &split.0].contains(&&surrogate), "{context}");
                    assert!([&one_frame.1, &split.1].contains(&&bad_lead), "{context}");
                }
            }
        }
    }

    /// Strings in a body are the driver's to read (`body.rs` hands on bytes that are
    /// not UTF-8 as they came): the guard leaves them as they are, however split.
    #[test]
    fn strings_in_bodies_are_not_mended() {
        let sequence = [0x00, 0x53, 0x76, 0xc0, 0x05, 0x01, 0xa1, 0x02, 0xc3, 0x28];
        for body in [&[0x00, 0x53, 0x77, 0xa1, 0x02, 0xff, 0xfe][..], &sequence] {
            for frame in 1..=body.len() {
                let (bytes, _) = in_frames(body, frame);
                for step in [1, 3, 4096] {
                    assert_eq!(guarded(&bytes, step), bytes, "frames of {frame}");
                }
            }
        }
    }

    /// A message counts as mended, and is logged so, only when a byte changed: text
    /// that is UTF-8, split inside a character, is not.
    #[test]
    fn only_a_changed_byte_counts_as_mended() {
        let mended = |value: &[u8], split: usize| {
            let payload = text_sections(b"k", value, b"s");
            let at = payload
                .windows(value.len())
                .rposition(|w| w == value)
                .unwrap()
                + split;
            let (mut first, mut second) = (payload[..at].to_vec(), payload[at..].to_vec());
            let mut sections = Sections::default();
            sections.feed(&mut first);
            sections.feed(&mut second);
            sections.mended
        };
        for split in 0..=2 {
            assert!(!mended("\u{e9}".as_bytes(), split), "split at {split}");
            assert!(mended(b"\xe9", split.min(1)), "split at {split}");
        }
        assert!(
            mended(b"\xc3(", 1),
            "a character the next frame cannot finish"
        );
    }

    /// A section of application properties `{key: value}`, both strings of any bytes,
    /// and a `properties` section whose subject is `subject`.
    fn text_sections(key: &[u8], value: &[u8], subject: &[u8]) -> Vec<u8> {
        let string = |bytes: &[u8]| [&[0xa1, bytes.len() as u8][..], bytes].concat();
        let map = [string(key), string(value)].concat();
        let fields = [&[0x40, 0x40, 0x40][..], &string(subject)].concat();
        [
            &[0x00, 0x53, 0x73, 0xc0, fields.len() as u8 + 1, 4][..],
            &fields,
            &[0x00, 0x53, 0x74, 0xc1, map.len() as u8 + 1, 2],
            &map,
            DATA,
        ]
        .concat()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Strings of any bytes, split anywhere: the message decodes, each string keeps
        /// its length, and one that is UTF-8 comes out as it went in. In one frame,
        /// every byte below 0x80 is kept too.
        #[test]
        fn strings_of_any_bytes_decode(
            strings in prop::collection::vec(
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..40),
                    any::<String>().prop_map(|s| s.into_bytes().into_iter().take(60).collect()),
                ],
                3,
            ),
            frame in 1usize..80,
            step in 1usize..80,
        ) {
            let (key, value, subject) = (&strings[0], &strings[1], &strings[2]);
            let payload = text_sections(key, value, subject);
            let (bytes, places) = in_frames(&payload, frame);
            let out = payload_of(&guarded(&bytes, step), &places);
            let message = decoded(out.clone());
            prop_assert!(message.is_some(), "{:02x?}", out);
            let message = message.unwrap();
            let subject_out = message.properties.unwrap().subject.unwrap();
            let (key_out, value_out) = message.application_properties.unwrap().0.into_iter().next().unwrap();
            let SimpleValue::String(value_out) = value_out else {
                panic!("a string: {value_out:?}")
            };
            for (sent, got) in [(key, key_out), (value, value_out), (subject, subject_out)] {
                prop_assert_eq!(got.len(), sent.len());
                if std::str::from_utf8(sent).is_ok() {
                    prop_assert_eq!(got.as_bytes(), &sent[..]);
                }
                if places.len() == 1 {
                    for (g, s) in got.bytes().zip(sent.iter()) {
                        prop_assert!(*s >= 0x80 || g == *s);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Text that is UTF-8 passes unchanged in every place the decoder reads strings
        /// and symbols, short and long, however the frames split it.
        #[test]
        fn text_that_is_utf8_passes_unchanged(
            texts in prop::collection::vec(any::<String>(), 6),
            long in "\\PC{100,200}",
            frame in 1usize..200,
            step in 1usize..300,
        ) {
            let map = |key: &str, value: &str| {
                let mut map = OrderedMap::new();
                map.insert(Symbol::from(key).into(), Value::from(value));
                map
            };
            let message = Message::builder()
                .delivery_annotations(DeliveryAnnotations(map(&texts[0], &texts[1])))
                .message_annotations(MessageAnnotations(map(&texts[1], &long)))
                .properties(
                    Properties::builder()
                        .message_id(texts[2].clone())
                        .subject(texts[3].clone())
                        .content_type(Symbol::from(texts[4].as_str()))
                        .build(),
                )
                .application_properties(
                    ApplicationProperties::builder()
                        .insert(texts[5].clone(), long.clone())
                        .build(),
                )
                .body(Body::Data(vec![Data(Binary::from(b"{}".to_vec()))].into()))
                .footer(Footer(map(&texts[3], &texts[0])))
                .build();
            let payload = encode(message);
            let (bytes, _) = in_frames(&payload, frame);
            prop_assert!(guarded(&bytes, step) == bytes);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However the broker splits it, a message the decoder reads without going too
        /// deep arrives as it was sent; one too deep arrives with one byte changed.
        #[test]
        fn frames_and_reads_of_any_size(
            depth in 0usize..300,
            // (A list in the application properties is read as a binary.)
            section in prop::sample::select(vec![0x71u8, 0x72, 0x78]),
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
            prop_assert_eq!(decodes(payload_of(&out, &places)), depth < MAX_DEPTH);
        }
    }
}
