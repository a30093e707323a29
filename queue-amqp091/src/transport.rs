//! The byte stream between the broker and lapin, read frame by frame so that what
//! another client's message puts in a frame reaches lapin's parser in a form it takes
//! ([`crate::frames`]): short strings made UTF-8, content headers fitted to
//! `frame_max`.
//!
//! [`connect`] opens the TCP (and TLS) connection itself and wraps it in
//! [`ParsableFrames`], so that the wrapper sits above TLS, where the frames are. lapin
//! names its stream's type after the runtime it is given: that runtime is tokio's with
//! a reactor of its own ([`FilteringReactor`]) whose only part is that type.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_rs::traits::Reactor;
use async_rs::util::RuntimeParts;
use async_rs::{Runtime, Tokio};
use futures_io::{AsyncRead, AsyncWrite};
use lapin::protocol::constants::FRAME_MIN_SIZE;
use lapin::tcp::{AMQPUriTcpExt, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{AsyncTcpStream, ConnectionProperties};
use queue_core::Throttle;

use crate::frames::{
    HEADER_FRAME, METHOD_FRAME, fit_content_header, make_short_strings_utf8, message_id,
    proposed_frame_max, returned_reply,
};
use crate::returns::ReturnLog;

/// Opens a lapin connection to `uri` whose incoming frames pass through
/// [`ParsableFrames`], over TLS when the URI is `amqps://`; the returns it reads go to
/// `returns`.
pub(crate) async fn connect(
    uri: AMQPUri,
    properties: ConnectionProperties,
    tls: OwnedTLSConfig,
    returns: Arc<ReturnLog>,
) -> lapin::Result<lapin::Connection> {
    let asked_frame_max = uri.query.frame_max.unwrap_or(0);
    let tokio = Tokio::current();
    let filtering = Runtime::new(RuntimeParts::new(
        tokio.clone(),
        FilteringReactor(tokio.clone()),
    ));
    let plain = Runtime::new(tokio);
    lapin::Connection::connector(
        uri,
        filtering,
        async move |uri, _filtering| {
            let stream = uri
                .connect_with_config_async(tls.as_ref(), &plain)
                .await
                // As lapin's own connector maps it (its `Error::io` is not public).
                .map_err(|e| {
                    if plain.is_runtime_shutdown_error(&e) {
                        lapin::ErrorKind::RuntimeShutdownError(Arc::new(e)).into()
                    } else {
                        lapin::Error::from(e)
                    }
                })?;
            Ok(AsyncTcpStream::Plain(ParsableFrames::new(
                stream,
                asked_frame_max,
                Arc::clone(&returns),
            )))
        },
        properties,
    )
    .await
}

/// The stream lapin reads: the connection (TCP, or TLS over it) as tokio's reactor
/// opens it, wrapped.
type Filtered = ParsableFrames<AsyncTcpStream<<Tokio as Reactor>::TcpStream>>;

/// tokio's reactor, whose TCP stream type is [`Filtered`].
#[derive(Clone, Debug)]
struct FilteringReactor(Tokio);

impl Reactor for FilteringReactor {
    type TcpStream = Filtered;
    type Sleep = <Tokio as Reactor>::Sleep;

    // async-rs's own bound (`AsSysFd`) is these two, under a name it does not export.
    fn register<H: io::Read + io::Write + AsFd + AsRawFd + Send + 'static>(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.0.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(
        &self,
        dur: Duration,
    ) -> impl futures_util::Stream<Item = Instant> + Send + 'static {
        self.0.interval(dur)
    }

    /// Never called: [`connect`] opens the connections itself, with tokio's reactor,
    /// so that TLS sits below [`ParsableFrames`]. A connection opened here would lack
    /// the `frame_max` lapin asks for.
    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "connect to {addr}: the AMQP 0-9-1 driver opens its connections through transport::connect"
            ),
        )))
    }
}

/// The `frame_max` lapin settles on, by its rule (`Channel::tune_connection_configuration`):
/// the broker's when it proposes one smaller than lapin's own (or lapin has none),
/// raised to amq-protocol's `FRAME_MIN_SIZE`; lapin's own otherwise; 0 standing for
/// none.
fn negotiated_frame_max(asked: u32, proposed: u32) -> usize {
    let frame_max = if proposed != 0 && (asked == 0 || proposed < asked) {
        proposed.max(FRAME_MIN_SIZE)
    } else {
        asked
    };
    match usize::try_from(frame_max) {
        Ok(0) | Err(_) => usize::MAX,
        Ok(n) => n,
    }
}

/// The octet that ends every frame.
const FRAME_END: u8 = 0xCE;

/// What one read from the connection asks for at least.
const READ_CHUNK: usize = 64 * 1024;

/// Method and content header frames up to this size are read whole and checked (a
/// content header can be as large as a message: RabbitMQ 3.x's default
/// `max_message_size`); a larger one passes as it came, so that a peer cannot make
/// this buffer grow without bound. The buffer goes back to [`READ_CHUNK`] once such a
/// frame has been handed on.
const MAX_CHECKED_FRAME: usize = 128 * 1024 * 1024;

/// A stream that hands its reader the frames of `S` as lapin's parser accepts them
/// ([`crate::frames`]): short strings made UTF-8, content headers larger than the
/// connection's `frame_max` fitted to it. Body and heartbeat frames pass as they
/// come, without being held whole; what it writes goes to `S` unchanged. Each
/// `basic.return` it reads goes to its channel's pairing, with its message id, before
/// lapin reads it ([`crate::returns`]).
pub(crate) struct ParsableFrames<S> {
    inner: S,
    /// The `frame_max` lapin asks for (0: the broker's).
    asked_frame_max: u32,
    /// The largest frame lapin takes, once the broker's `connection.tune` came.
    frame_max: usize,
    /// Bytes read from `inner`; `buf[..end]` hold data.
    buf: Vec<u8>,
    end: usize,
    /// Handed to the reader up to here.
    start: usize,
    /// Checked (or to pass as they are) up to here: what can be handed out.
    checked: usize,
    /// Bytes of the current frame past `checked` that pass without being read.
    passing: usize,
    /// The bytes from `checked` that the frame there needs whole.
    wanted: usize,
    /// Which mended frames are logged (one line every 10 s).
    mended: Throttle,
    returns: Arc<ReturnLog>,
    /// The channels whose `basic.return` was read, its content header not yet, and
    /// its reply.
    returns_begun: Vec<(u16, (u16, String))>,
    /// Whether the broker's first frame was read as an AMQP 0-9-1 frame ([`greeting`]).
    greeted: bool,
}

impl<S> ParsableFrames<S> {
    /// `inner`, for a lapin that asks for `asked_frame_max` (0: the broker's),
    /// handing the returns it reads to `returns`.
    pub(crate) fn new(inner: S, asked_frame_max: u32, returns: Arc<ReturnLog>) -> Self {
        ParsableFrames {
            inner,
            asked_frame_max,
            frame_max: usize::MAX,
            buf: vec![0; READ_CHUNK],
            end: 0,
            start: 0,
            checked: 0,
            passing: 0,
            wanted: 0,
            mended: Throttle::default(),
            returns,
            returns_begun: Vec::new(),
            greeted: false,
        }
    }

    /// Moves `checked` forward over what is buffered; false when it needs more bytes.
    fn check_next(&mut self) -> bool {
        let available = self.end - self.checked;
        self.wanted = 0;
        if self.passing > 0 {
            let n = available.min(self.passing);
            self.checked += n;
            self.passing -= n;
            return n > 0;
        }
        if available < 7 {
            self.wanted = 7;
            return false;
        }
        let at = self.checked;
        let frame_type = self.buf[at];
        let size = u32::from_be_bytes([
            self.buf[at + 3],
            self.buf[at + 4],
            self.buf[at + 5],
            self.buf[at + 6],
        ]);
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let whole = size.saturating_add(8);
        let channel = u16::from_be_bytes([self.buf[at + 1], self.buf[at + 2]]);
        if !matches!(frame_type, METHOD_FRAME | HEADER_FRAME) || size > MAX_CHECKED_FRAME {
            if frame_type == HEADER_FRAME {
                self.return_read(channel, None);
            }
            self.passing = whole;
            return true;
        }
        if available < whole {
            self.wanted = whole;
            return false;
        }
        // A frame without its end octet is none lapin reads: it passes as it came.
        if self.buf[at + whole - 1] != FRAME_END {
            if frame_type == HEADER_FRAME {
                self.return_read(channel, None);
            }
            self.checked += whole;
            return true;
        }
        let payload = &mut self.buf[at + 7..at + 7 + size];
        let rewritten = make_short_strings_utf8(frame_type, payload);
        if frame_type == METHOD_FRAME {
            let reply = returned_reply(payload);
            if let Some(proposed) = proposed_frame_max(payload) {
                self.frame_max = negotiated_frame_max(self.asked_frame_max, proposed);
            }
            // A method before a begun return's content header (which AMQP does not
            // allow): that return's message id is not to be read.
            if !self.returns_begun.is_empty() {
                self.return_read(channel, None);
            }
            if let Some(reply) = reply {
                self.returns_begun.push((channel, reply));
            }
        } else if !self.returns_begun.is_empty() {
            let id = message_id(payload);
            self.return_read(channel, id.as_deref());
        }
        // Fitted by dropping only the broker's dead-lettering bookkeeping (no note),
        // it lost nothing a handler sees: not worth a line.
        let dropped = if frame_type == HEADER_FRAME && whole > self.frame_max {
            self.fit_header_at(at, whole)
                .filter(|note| !note.is_empty())
        } else {
            self.checked += whole;
            None
        };
        if (rewritten > 0 || dropped.is_some())
            && let Some(mended) = self.mended.tick()
        {
            tracing::warn!(
                channel,
                rewritten,
                dropped = dropped.as_deref().unwrap_or_default(),
                mended,
                "mended a frame from the broker that lapin would refuse (another client's \
                 message): `rewritten` bytes of short strings that were not UTF-8 now read as \
                 '?'; `dropped` names the headers taken out of a content header larger than \
                 frame_max, as its x_dropped_headers does; `mended` counts the frames since \
                 the last such line (one every 10 s at most)"
            );
        }
        true
    }

    /// The content header read on `channel`, with message id `id` (`None`: none could
    /// be read): if a return began on that channel, it is whole.
    fn return_read(&mut self, channel: u16, id: Option<&str>) {
        if let Some(at) = self.returns_begun.iter().position(|(c, _)| *c == channel) {
            let (_, reply) = self.returns_begun.swap_remove(at);
            self.returns.returned(channel, id, reply);
        }
    }

    /// Replaces the content header frame of `whole` bytes at `at` with one that fits
    /// `frame_max` ([`fit_content_header`]); returns what it dropped. One that cannot
    /// be fitted passes as it came, for lapin to refuse.
    fn fit_header_at(&mut self, at: usize, whole: usize) -> Option<String> {
        let payload = &self.buf[at + 7..at + whole - 1];
        let Some(fitted) = fit_content_header(payload, self.frame_max - 8) else {
            tracing::error!(
                bytes = whole,
                frame_max = self.frame_max,
                channel = u16::from_be_bytes([self.buf[at + 1], self.buf[at + 2]]),
                "a message's AMQP content header is larger than frame_max and cannot be fitted to it; lapin will end the connection"
            );
            self.checked += whole;
            return None;
        };
        let size = u32::try_from(fitted.payload.len()).unwrap_or(u32::MAX);
        let mut frame = Vec::with_capacity(fitted.payload.len() + 8);
        frame.extend_from_slice(&self.buf[at..at + 3]);
        frame.extend_from_slice(&size.to_be_bytes());
        frame.extend_from_slice(&fitted.payload);
        frame.push(FRAME_END);
        // The new frame is smaller: it goes where the old one started, and what came
        // after it moves up.
        self.buf[at..at + frame.len()].copy_from_slice(&frame);
        self.buf.copy_within(at + whole..self.end, at + frame.len());
        self.end -= whole - frame.len();
        self.checked += frame.len();
        Some(fitted.note)
    }

    /// Room after `end` for the next read, and for the whole frame being checked.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.checked -= self.start;
            self.start = 0;
        }
        let needed = (self.checked + self.wanted).max(self.end + READ_CHUNK / 4);
        if needed > self.buf.len() {
            self.buf.resize(needed.max(self.end + READ_CHUNK), 0);
        } else if self.buf.len() > 2 * READ_CHUNK && needed <= READ_CHUNK {
            // A large frame has been handed on: its room goes back.
            let mut smaller = vec![0; READ_CHUNK];
            smaller[..self.end].copy_from_slice(&self.buf[..self.end]);
            self.buf = smaller;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ParsableFrames<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if !this.greeted {
                match greeting(&this.buf[..this.end]) {
                    None => {}
                    Some(Ok(())) => this.greeted = true,
                    Some(Err(why)) => return Poll::Ready(Err(not_amqp091(why))),
                }
            }
            if this.greeted {
                // Check as much as is buffered, so that one read hands out several
                // frames.
                while this.checked - this.start < out.len() && this.check_next() {}
                if this.start < this.checked {
                    let n = out.len().min(this.checked - this.start);
                    out[..n].copy_from_slice(&this.buf[this.start..this.start + n]);
                    this.start += n;
                    return Poll::Ready(Ok(n));
                }
                // A frame passing as it comes, with nothing of it buffered: straight
                // into `out`, copied once (a body is most of the bytes).
                if this.passing > 0 && this.checked == this.end {
                    let n = out.len().min(this.passing);
                    let read = Pin::new(&mut this.inner).poll_read(cx, &mut out[..n]);
                    if let Poll::Ready(Ok(n)) = read {
                        this.passing -= n;
                    }
                    return read;
                }
            }
            this.make_room();
            let end = this.end;
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.buf[end..]) {
                Poll::Ready(Ok(0)) if !this.greeted && this.end > 0 => {
                    return Poll::Ready(Err(not_amqp091(first_bytes(&this.buf[..this.end]))));
                }
                Poll::Ready(Ok(0)) if this.checked == this.end => return Poll::Ready(Ok(0)),
                // The connection ended inside a frame: what came of it goes to lapin,
                // which says so.
                Poll::Ready(Ok(0)) => this.checked = this.end,
                Poll::Ready(Ok(n)) => this.end += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The bytes that show what a server speaks: AMQP's protocol header.
const PROTOCOL_HEADER_BYTES: usize = 8;

/// Whether the first bytes `first` a server sent are an AMQP 0-9-1 broker's (a frame:
/// method, content header, body or heartbeat; `connection.start` comes first): `None`
/// while too few came to tell, else what they are. A server that speaks another
/// protocol answered with bytes lapin's parser only called a "Parsing Error:
/// ParserErrors { error: Nom(Tag) }".
fn greeting(first: &[u8]) -> Option<Result<(), String>> {
    const BODY_FRAME: u8 = 3;
    const HEARTBEAT_FRAME: u8 = 8;
    match first.first()? {
        &(METHOD_FRAME | HEADER_FRAME | BODY_FRAME | HEARTBEAT_FRAME) => Some(Ok(())),
        _ if first.len() < PROTOCOL_HEADER_BYTES => None,
        _ => Some(Err(first_bytes(first))),
    }
}

/// What a server that is no AMQP 0-9-1 broker said, from its first bytes.
fn first_bytes(first: &[u8]) -> String {
    match first {
        // AMQP 1.0, its TLS and its SASL layer (the AMQP 1.0 spec, 2.2).
        [b'A', b'M', b'Q', b'P', 0..=3, 1, 0, 0, ..] => {
            "it answered with the protocol header of AMQP 1.0 (ActiveMQ Artemis, Qpid, Azure \
             Service Bus...): use the driver kind queue.driver.amqp10 for it"
                .to_string()
        }
        // Other versions lay their header out their own ways: shown as it came.
        [b'A', b'M', b'Q', b'P', ..] => format!(
            "it answered with another AMQP version's protocol header, \"{}\"",
            escaped(first)
        ),
        [b'H', b'T', b'T', b'P', b'/', ..] => {
            "it speaks HTTP (a management or web port?)".to_string()
        }
        _ => format!("its first bytes were \"{}\"", escaped(first)),
    }
}

/// The first bytes of `first`, printable.
fn escaped(first: &[u8]) -> String {
    first
        .iter()
        .take(PROTOCOL_HEADER_BYTES)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

fn not_amqp091(what_it_said: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the server does not speak AMQP 0-9-1: {what_it_said}"),
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ParsableFrames<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, bytes)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::returns::Paired;

    use futures_util::io::{AsyncReadExt, Cursor};
    use lapin::types::AMQPValue;
    use proptest::prelude::*;

    /// Hands out `bytes` in reads of the given sizes (then the rest at once), a read
    /// of size 0 standing for a moment with nothing to read (`Pending`, woken at once).
    struct Chunked {
        bytes: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let size = if self.sizes.is_empty() {
                usize::MAX
            } else {
                self.sizes.remove(0)
            };
            if size == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = size.min(out.len()).min(self.bytes.len() - self.at);
            let at = self.at;
            out[..n].copy_from_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    fn block_on<T>(reading: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(reading)
    }

    fn frame(frame_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![frame_type, 0, 1];
        bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes.push(0xCE);
        bytes
    }

    /// A content header with a message id and nothing else.
    fn header_with_id(id: &[u8]) -> Vec<u8> {
        // class 60, weight, body size 3, the flag of message-id
        let mut payload = [[0, 60, 0, 0].as_slice(), &3u64.to_be_bytes(), &[0, 0x80]].concat();
        payload.push(u8::try_from(id.len()).unwrap());
        payload.extend_from_slice(id);
        frame(HEADER_FRAME, &payload)
    }

    /// A content header whose header table holds `big`'s bytes under `big`, and a
    /// message id.
    fn header_with_big_header(big: usize) -> Vec<u8> {
        // class 60, weight, body size 3, the flags of headers and message-id
        let mut payload = [[0, 60, 0, 0].as_slice(), &3u64.to_be_bytes(), &[0x20, 0x80]].concat();
        let entry = [
            b"\x03bigS".as_slice(),
            &u32::try_from(big).unwrap().to_be_bytes(),
            &vec![b'b'; big],
        ]
        .concat();
        payload.extend_from_slice(&u32::try_from(entry.len()).unwrap().to_be_bytes());
        payload.extend_from_slice(&entry);
        payload.extend_from_slice(b"\x02id");
        frame(HEADER_FRAME, &payload)
    }

    /// The broker's `connection.tune`: channel-max 2047, `frame_max`, heartbeat 60.
    fn tune(frame_max: u32) -> Vec<u8> {
        let payload = [
            [0, 10, 0, 30, 0x07, 0xff].as_slice(),
            &frame_max.to_be_bytes(),
            &[0, 60],
        ]
        .concat();
        let mut bytes = frame(METHOD_FRAME, &payload);
        bytes[1..3].copy_from_slice(&[0, 0]);
        bytes
    }

    fn read_all(bytes: Vec<u8>, sizes: Vec<usize>) -> Vec<u8> {
        let inner = Chunked {
            bytes,
            at: 0,
            sizes,
        };
        let mut out = Vec::new();
        block_on(ParsableFrames::new(inner, 0, Arc::default()).read_to_end(&mut out))
            .expect("reads");
        out
    }

    #[test]
    fn a_header_frame_is_checked_and_every_other_frame_passes_as_it_came() {
        let body = frame(3, b"\xff\xfe body bytes are the message's own");
        let mut stream = header_with_id(b"id\xff");
        stream.extend_from_slice(&body);
        stream.extend_from_slice(&frame(8, b""));
        let mut expected = header_with_id(b"id?");
        expected.extend_from_slice(&body);
        expected.extend_from_slice(&frame(8, b""));
        assert_eq!(read_all(stream, vec![]), expected);
    }

    /// RabbitMQ's `basic.return` on channel 1, for a message to queue `q`.
    fn basic_return() -> Vec<u8> {
        frame(
            METHOD_FRAME,
            b"\x00\x3c\x00\x32\x01\x38\x08NO_ROUTE\x00\x01q",
        )
    }

    /// Each return goes to its channel's pairing with its message id (made UTF-8 as
    /// lapin reads it), however the reads split its frames; the frames pass as before.
    #[test]
    fn a_return_is_handed_to_its_channels_pairing_with_its_message_id() {
        for sizes in [vec![], vec![1; 64], vec![9, 3, 40]] {
            let log = Arc::new(ReturnLog::default());
            let pairing = log.pairing_for(1);
            let (mine, other) = (pairing.expect("m-?"), pairing.expect("m-2"));
            let mut stream = basic_return();
            stream.extend_from_slice(&header_with_id(b"m-\xff"));
            stream.extend_from_slice(&frame(3, b"abc"));
            let inner = Chunked {
                bytes: stream,
                at: 0,
                sizes,
            };
            let mut out = Vec::new();
            block_on(ParsableFrames::new(inner, 0, Arc::clone(&log)).read_to_end(&mut out))
                .expect("reads");
            assert!(out.starts_with(&basic_return()));
            assert_eq!(other.acked(), Paired::Stored);
            assert_eq!(
                mine.acked(),
                Paired::Returned {
                    reply_code: 312,
                    reply_text: "NO_ROUTE".into()
                }
            );
        }
    }

    /// A return whose content header passes unread (past the size read whole) leaves
    /// the channel's acks uncertain: it may be any publish's.
    #[test]
    fn a_return_whose_header_is_not_read_leaves_its_channels_acks_uncertain() {
        let log = Arc::new(ReturnLog::default());
        let pairing = log.pairing_for(1);
        let publish = pairing.expect("m-1");
        let mut stream = basic_return();
        // A header frame saying it is larger than is read whole, cut off.
        stream.extend_from_slice(&[HEADER_FRAME, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 60]);
        let mut out = Vec::new();
        block_on(ParsableFrames::new(Cursor::new(stream), 0, log).read_to_end(&mut out))
            .expect("reads");
        assert!(pairing.needs_replacing());
        assert_eq!(publish.acked(), Paired::Uncertain);
    }

    /// A body frame larger than the buffer passes without being held whole.
    #[test]
    fn large_body_frames_pass_in_pieces() {
        let body = frame(3, &vec![0xff; 5 * READ_CHUNK]);
        let mut stream = body.clone();
        stream.extend_from_slice(&header_with_id(b"\xff"));
        let mut expected = body;
        expected.extend_from_slice(&header_with_id(b"?"));
        let mut reader = ParsableFrames::new(Cursor::new(stream), 0, Arc::default());
        let mut out = Vec::new();
        block_on(reader.read_to_end(&mut out)).expect("reads");
        assert_eq!(out, expected);
        assert!(reader.buf.len() <= 2 * READ_CHUNK, "{}", reader.buf.len());
    }

    /// After the broker's `connection.tune`, a content header larger than the
    /// `frame_max` lapin settles on (the smaller of the two) is fitted to it; the
    /// frames around it pass as they came.
    #[test]
    fn a_content_header_past_the_negotiated_frame_max_is_fitted() {
        let body = frame(3, b"abc");
        let mut stream = tune(131_072);
        stream.extend_from_slice(&header_with_big_header(10_000));
        stream.extend_from_slice(&body);
        let inner = Chunked {
            bytes: stream,
            at: 0,
            sizes: vec![5, 0, 3000, 0, 1],
        };
        let mut out = Vec::new();
        block_on(ParsableFrames::new(inner, 8192, Arc::default()).read_to_end(&mut out))
            .expect("reads");

        assert_eq!(out[..tune(0).len()], tune(131_072)[..]);
        let header = &out[tune(0).len()..out.len() - body.len()];
        assert!(header.len() <= 8192, "{}", header.len());
        let (rest, frame) = amq_protocol::frame::parse_frame(header).expect("lapin reads it");
        assert!(rest.is_empty());
        let amq_protocol::frame::AMQPFrame::Header(1, header) = frame else {
            panic!("{frame:?}")
        };
        let headers = header.properties.headers().clone().expect("headers");
        let Some(AMQPValue::LongString(note)) =
            headers.inner().get(queue_core::names::X_DROPPED_HEADERS)
        else {
            panic!("{headers:?}")
        };
        let note = String::from_utf8_lossy(note.as_bytes());
        assert!(note.starts_with("big (10009 bytes): "), "{note}");
        assert!(note.contains("more than the 8192"), "{note}");
        assert_eq!(
            header.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("id")
        );
        assert_eq!(out[out.len() - body.len()..], body[..]);
    }

    /// The broker's `frame_max` when it is the smaller counts; a header held whole
    /// (300 KB) gives its room back once handed on.
    #[test]
    fn the_brokers_smaller_frame_max_counts_and_a_large_buffer_shrinks_back() {
        let big = header_with_big_header(300_000);
        let after = [frame(3, b"abc"), header_with_id(b"x")].concat();
        let stream = [tune(8192), big.clone(), after.clone()].concat();
        // The tune alone, then the rest in reads as large as the buffer takes.
        let sizes = vec![tune(0).len()];
        let inner = Chunked {
            bytes: stream,
            at: 0,
            sizes,
        };
        let mut reader = ParsableFrames::new(inner, 131_072, Arc::default());
        let mut out = vec![0; 1 << 20];
        let mut got = Vec::new();
        for _ in 0..2 {
            let n = block_on(reader.read(&mut out)).expect("reads");
            got.extend_from_slice(&out[..n]);
        }
        assert!(reader.buf.len() > 300_000, "the header was held whole");
        block_on(reader.read_to_end(&mut got)).expect("reads");
        assert!(reader.buf.len() <= READ_CHUNK, "{}", reader.buf.len());

        let fitted = &got[tune(0).len()..];
        let (rest, _) = amq_protocol::frame::parse_frame(fitted).expect("reads");
        assert!(fitted.len() - rest.len() <= 8192);
        assert_eq!(rest, after.as_slice());
    }

    /// A buffer grown for a large frame shrinks back though every read since ended
    /// inside a frame (steady traffic), keeping the bytes it holds.
    #[test]
    fn a_grown_buffer_shrinks_back_with_a_frame_begun_in_it() {
        let next = header_with_id(b"x");
        let mut reader = ParsableFrames::new(Cursor::new(next[5..].to_vec()), 0, Arc::default());
        // As left by a 1 MiB frame handed on, with 5 bytes of the next one read.
        reader.buf = vec![0; 1 << 20];
        reader.buf[..5].copy_from_slice(&next[..5]);
        reader.end = 5;
        let mut out = vec![0; 64];
        let n = block_on(reader.read(&mut out)).expect("reads");
        assert_eq!(out[..n], next[..]);
        assert!(reader.buf.len() <= READ_CHUNK, "{}", reader.buf.len());
    }

    /// The `frame_max` lapin settles on, case by case, as its tune handling decides it.
    #[test]
    fn the_frame_max_is_lapins() {
        assert_eq!(negotiated_frame_max(0, 131_072), 131_072);
        assert_eq!(negotiated_frame_max(131_072, 0), 131_072);
        assert_eq!(negotiated_frame_max(0, 0), usize::MAX);
        assert_eq!(negotiated_frame_max(131_072, 8192), 8192);
        // lapin raises a broker's smaller value to FRAME_MIN_SIZE, not its own.
        assert_eq!(negotiated_frame_max(131_072, 4096), 8192);
        assert_eq!(negotiated_frame_max(5000, 131_072), 5000);
    }

    /// At the `frame_max`, a header passes as it came; one byte over, it is fitted.
    #[test]
    fn a_content_header_within_frame_max_passes() {
        let at_the_limit = header_with_big_header(131_072 - 38);
        assert_eq!(at_the_limit.len(), 131_072);
        let stream = [tune(131_072), at_the_limit].concat();
        assert_eq!(read_all(stream.clone(), vec![]), stream);
        let one_over = [tune(131_072), header_with_big_header(131_072 - 37)].concat();
        assert!(read_all(one_over.clone(), vec![]).len() < one_over.len());
    }

    /// A connection that ends inside a frame hands what came of it to lapin.
    #[test]
    fn a_frame_cut_short_is_handed_on_as_it_is() {
        let mut stream = header_with_id(b"\xff");
        stream.truncate(9);
        assert_eq!(read_all(stream.clone(), vec![]), stream);
    }

    /// A server that speaks another protocol answers the driver's protocol header
    /// with its own, or with whatever it speaks, then closes: lapin said only
    /// "Parsing Error: ParserErrors { error: Nom(Tag), errors: None }" (outsider
    /// attack: the driver pointed at ActiveMQ Artemis' AMQP 1.0 port). Read in any
    /// pieces, the error says what the server speaks.
    #[test]
    fn a_server_that_speaks_another_protocol_is_named() {
        let said = |stream: &[u8], sizes: Vec<usize>| {
            let inner = Chunked {
                bytes: stream.to_vec(),
                at: 0,
                sizes,
            };
            let mut out = Vec::new();
            let mut frames = ParsableFrames::new(inner, 0, Arc::default());
            let err = block_on(frames.read_to_end(&mut out)).expect_err("not AMQP 0-9-1");
            assert!(out.is_empty(), "nothing reaches lapin: {out:?}");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            err.to_string()
        };
        for (stream, expected) in [
            (&b"AMQP\x00\x01\x00\x00"[..], "queue.driver.amqp10"),
            (b"AMQP\x03\x01\x00\x00", "queue.driver.amqp10"),
            (
                b"AMQP\x01\x01\x00\x0a",
                r#"protocol header, "AMQP\x01\x01\x00\n""#,
            ),
            (b"HTTP/1.1 400 Bad Request\r\n", "HTTP"),
            (b"\x16\x03\x01\x00\xa5", r#""\x16\x03\x01\x00\xa5""#),
        ] {
            for sizes in [vec![], vec![1, 0, 2, 0, 3]] {
                let err = said(stream, sizes);
                assert!(err.contains("does not speak AMQP 0-9-1"), "{err}");
                assert!(err.contains(expected), "{err}");
            }
        }
    }

    proptest! {
        /// However the connection splits the bytes into reads, the reader gets the
        /// same stream.
        #[test]
        fn reads_of_any_sizes_give_the_same_stream(
            sizes in proptest::collection::vec(0usize..40, 0..60),
            ids in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 1..6),
        ) {
            let mut stream = tune(8192);
            for id in &ids {
                // basic.deliver: consumer tag "c", delivery tag, redelivered, exchange "", routing key `id`
                let deliver = [[0, 60, 0, 60, 1, b'c'].as_slice(), &[0; 8], &[0, 0], &[u8::try_from(id.len()).unwrap()], id].concat();
                stream.extend_from_slice(&frame(METHOD_FRAME, &deliver));
                stream.extend_from_slice(&header_with_id(id));
                stream.extend_from_slice(&header_with_big_header(10_000));
                stream.extend_from_slice(&frame(3, id));
            }
            let whole = read_all(stream.clone(), vec![]);
            // Every frame of it reads, within the frame_max of 8192.
            let mut rest = whole.as_slice();
            while !rest.is_empty() {
                let (after, _) = amq_protocol::frame::parse_frame(rest).expect("lapin reads every frame");
                prop_assert!(rest.len() - after.len() <= 8192);
                rest = after;
            }
            prop_assert_eq!(read_all(stream, sizes), whole);
        }
    }
}
