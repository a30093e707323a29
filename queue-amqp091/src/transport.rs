//! The byte stream between the broker and lapin, read frame by frame so that short
//! strings that are not UTF-8 reach lapin's parser as UTF-8 ([`crate::frames`]).
//!
//! lapin takes its socket from the runtime it is given: [`runtime`] is tokio's, with a
//! reactor whose connections are wrapped in [`Utf8ShortStrings`], and [`connect`]
//! opens the TCP (and TLS) connection itself so that the wrapper sits above TLS, where
//! the frames are.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_rs::traits::Reactor;
use async_rs::util::RuntimeParts;
use async_rs::{Runtime, Tokio};
use futures_io::{AsyncRead, AsyncWrite};
use lapin::tcp::{AMQPUriTcpExt, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{AsyncTcpStream, ConnectionProperties};

use crate::frames::{HEADER_FRAME, METHOD_FRAME, make_short_strings_utf8};

/// Opens a lapin connection to `uri` whose incoming frames pass through
/// [`Utf8ShortStrings`], over TLS when the URI is `amqps://`.
pub(crate) async fn connect(
    uri: AMQPUri,
    properties: ConnectionProperties,
    tls: OwnedTLSConfig,
) -> lapin::Result<lapin::Connection> {
    let tokio = Tokio::current();
    let guarded = Runtime::new(RuntimeParts::new(
        tokio.clone(),
        GuardedReactor(tokio.clone()),
    ));
    let plain = Runtime::new(tokio);
    lapin::Connection::connector(
        uri,
        guarded,
        async move |uri, _guarded| {
            let stream = uri.connect_with_config_async(tls.as_ref(), &plain).await?;
            Ok(AsyncTcpStream::Plain(Utf8ShortStrings::new(stream)))
        },
        properties,
    )
    .await
}

/// The stream lapin reads: the connection (TCP, or TLS over it) as tokio's reactor
/// opens it, wrapped.
type Guarded = Utf8ShortStrings<AsyncTcpStream<<Tokio as Reactor>::TcpStream>>;

/// tokio's reactor, whose TCP streams are [`Guarded`].
#[derive(Clone, Debug)]
struct GuardedReactor(Tokio);

impl Reactor for GuardedReactor {
    type TcpStream = Guarded;
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

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let connecting = self.0.tcp_connect_addr(addr);
        async move {
            Ok(Utf8ShortStrings::new(AsyncTcpStream::Plain(
                connecting.await?,
            )))
        }
    }
}

/// What one read from the connection asks for at least.
const READ_CHUNK: usize = 64 * 1024;

/// Method and content header frames up to this size are read whole and checked; a
/// larger one passes as it came (no broker's `frame_max` reaches it, so lapin refuses
/// it anyway), so that a peer cannot make this buffer grow without bound.
const MAX_CHECKED_FRAME: usize = 8 * 1024 * 1024;

/// A stream that hands its reader the frames of `S` with their short strings made
/// UTF-8 ([`make_short_strings_utf8`]). Body and heartbeat frames pass as they come,
/// without being held whole; what it writes goes to `S` unchanged.
pub(crate) struct Utf8ShortStrings<S> {
    inner: S,
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
}

impl<S> Utf8ShortStrings<S> {
    pub(crate) fn new(inner: S) -> Self {
        Utf8ShortStrings {
            inner,
            buf: vec![0; READ_CHUNK],
            end: 0,
            start: 0,
            checked: 0,
            passing: 0,
            wanted: 0,
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
        // A protocol header (the broker refusing our version) rather than a frame:
        // everything after it passes as it is, for lapin to read.
        if available > 0 && self.buf[self.checked] == b'A' {
            self.passing = usize::MAX;
            return true;
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
        if !matches!(frame_type, METHOD_FRAME | HEADER_FRAME) || size > MAX_CHECKED_FRAME {
            self.passing = whole;
            return true;
        }
        if available < whole {
            self.wanted = whole;
            return false;
        }
        let rewritten = make_short_strings_utf8(frame_type, &mut self.buf[at + 7..at + 7 + size]);
        if rewritten > 0 {
            tracing::warn!(
                rewritten,
                channel = u16::from_be_bytes([self.buf[at + 1], self.buf[at + 2]]),
                "a frame from the broker held short strings that are not UTF-8 (a header name, \
                 a message id, a routing key... another client wrote them as bytes); each byte \
                 that is not UTF-8 now reads as '?'"
            );
        }
        self.checked += whole;
        true
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
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Utf8ShortStrings<S> {
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
            if this.start < this.checked {
                let n = out.len().min(this.checked - this.start);
                out[..n].copy_from_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                return Poll::Ready(Ok(n));
            }
            if this.check_next() {
                continue;
            }
            this.make_room();
            let end = this.end;
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.buf[end..]) {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Utf8ShortStrings<S> {
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

    use futures_util::io::{AsyncReadExt, Cursor};
    use proptest::prelude::*;

    /// Hands out `bytes` in reads of the given sizes (then the rest at once).
    struct Chunked {
        bytes: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let size = if self.sizes.is_empty() {
                usize::MAX
            } else {
                self.sizes.remove(0).max(1)
            };
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
        let mut payload = vec![
            0,
            60,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            3,
            0b0000_0000,
            0b1000_0000,
        ];
        payload.push(u8::try_from(id.len()).unwrap());
        payload.extend_from_slice(id);
        frame(HEADER_FRAME, &payload)
    }

    fn read_all(bytes: Vec<u8>, sizes: Vec<usize>) -> Vec<u8> {
        let inner = Chunked {
            bytes,
            at: 0,
            sizes,
        };
        let mut out = Vec::new();
        block_on(Utf8ShortStrings::new(inner).read_to_end(&mut out)).expect("reads");
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

    /// A body frame larger than the buffer passes without being held whole.
    #[test]
    fn large_body_frames_pass_in_pieces() {
        let body = frame(3, &vec![0xff; 5 * READ_CHUNK]);
        let mut stream = body.clone();
        stream.extend_from_slice(&header_with_id(b"\xff"));
        let mut expected = body;
        expected.extend_from_slice(&header_with_id(b"?"));
        let mut reader = Utf8ShortStrings::new(Cursor::new(stream));
        let mut out = Vec::new();
        block_on(reader.read_to_end(&mut out)).expect("reads");
        assert_eq!(out, expected);
        assert!(reader.buf.len() <= 2 * READ_CHUNK, "{}", reader.buf.len());
    }

    /// A connection that ends inside a frame hands what came of it to lapin.
    #[test]
    fn a_frame_cut_short_is_handed_on_as_it_is() {
        let mut stream = header_with_id(b"\xff");
        stream.truncate(9);
        assert_eq!(read_all(stream.clone(), vec![]), stream);
    }

    /// The broker's answer to a protocol version it does not speak.
    #[test]
    fn a_protocol_header_passes() {
        let stream = b"AMQP\x00\x00\x09\x01".to_vec();
        assert_eq!(read_all(stream.clone(), vec![3]), stream);
    }

    proptest! {
        /// However the connection splits the bytes into reads, the reader gets the
        /// same stream.
        #[test]
        fn reads_of_any_sizes_give_the_same_stream(
            sizes in proptest::collection::vec(1usize..40, 0..60),
            ids in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 1..6),
        ) {
            let mut stream = Vec::new();
            for id in &ids {
                stream.extend_from_slice(&header_with_id(id));
                stream.extend_from_slice(&frame(3, id));
            }
            let whole = read_all(stream.clone(), vec![]);
            prop_assert_eq!(read_all(stream, sizes), whole);
        }
    }
}
