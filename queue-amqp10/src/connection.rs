//! The connection, sessions, and the reconnect policy.
//!
//! fe2o3-amqp has no recovery of its own, so the [`Connector`] keeps one connection
//! and hands every link its own session on it (a failing link — a RabbitMQ channel
//! error, say — then ends only its own session). When a link finds its session or
//! connection gone it asks the connector again: the connector opens a fresh connection
//! if the old one is closed, and callers back off between failed attempts with
//! [`Connector::backoff`]. The publish and consume tasks re-attach their links on it.
//!
//! With several URLs (the nodes of one cluster) the first connection goes to the
//! first node that answers, in list order; a reconnect starts with the node after
//! the one whose connection was lost and goes round the list once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::{BeginError, SessionHandle};
use fe2o3_amqp::types::definitions::SenderSettleMode;
use fe2o3_amqp::types::messaging::{Source, Target};
use fe2o3_amqp::types::sasl::SaslCode;
use fe2o3_amqp::{Connection, Session};
use queue_core::{Error, ErrorKind, Result};
use tokio::sync::{Mutex, watch};

use crate::config::{Amqp10Config, Endpoint};
use crate::guard::Guarded;

/// How long opening a TCP connection, SASL and the AMQP open may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long beginning a session and attaching a link may take.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean close (or a link's detach) may take before it is abandoned.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A link together with the session it owns and the connection generation it lives on.
pub(crate) struct Attached<L> {
    pub link: L,
    pub session: SessionHandle<()>,
}

impl<L> Attached<L> {
    /// Ends the link and its session without waiting for the broker's answer.
    ///
    /// Dropping the link sends its detach, and dropping the session's handle its
    /// `end`; fe2o3-amqp's session engine then waits for the broker's `end` by itself,
    /// parked, until it comes or the connection goes. Awaiting `SessionHandle::end`
    /// instead keeps the handle while the engine waits, and the engine then polls a
    /// closed channel in a loop until the answer comes (fe2o3-amqp 0.18): a core
    /// spent for as long as the broker takes, which a broker that never answers made
    /// the whole close timeout ([AMQP 1.0 driver](../../docs/drivers/amqp10.md),
    /// "Closing").
    pub fn end(self) {
        drop(self.link);
        drop(self.session);
    }
}

struct Live {
    generation: u64,
    connection: ConnectionHandle<()>,
    /// Which of the endpoints it is connected to.
    node: usize,
    /// The connection's socket, a second handle on it: see [`Live::close`].
    socket: std::net::TcpStream,
}

impl Live {
    /// Closes the connection, waiting up to [`CLOSE_TIMEOUT`] for the broker's
    /// `close`. Past that the socket is shut down, so that neither it nor fe2o3-amqp's
    /// engines, still waiting for the answer, outlive a close the broker never answered
    /// ([Closing](../../docs/drivers/amqp10.md#closing)).
    async fn close(mut self) {
        if tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close())
            .await
            .is_err()
        {
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Has the kernel fail the connection once what it wrote stays unacknowledged, or
/// the broker's receive window stays shut, for `limit` (`TCP_USER_TIMEOUT`; Linux
/// applies it to zero-window probes too). fe2o3-amqp checks its idle time-out only
/// while it reads: a broker that stops reading but still sends left every write
/// blocked, and the connection was never replaced
/// ([Connection loss](../../docs/drivers/amqp10.md#connection-loss)).
fn give_up_on_stalled_writes(stream: &tokio::net::TcpStream, limit: Duration) {
    #[cfg(target_os = "linux")]
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(limit)) {
        tracing::warn!(error = %e, "cannot limit how long a write may wait (TCP_USER_TIMEOUT): a broker that stops reading is noticed only when the kernel gives up");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, limit);
}

/// `stream` as fe2o3-amqp takes it, and a second handle on its socket.
fn second_handle(
    stream: tokio::net::TcpStream,
) -> std::io::Result<(tokio::net::TcpStream, std::net::TcpStream)> {
    let stream = stream.into_std()?;
    let socket = stream.try_clone()?;
    Ok((tokio::net::TcpStream::from_std(stream)?, socket))
}

/// Owns the connection to the broker and reopens it on demand.
pub(crate) struct Connector {
    /// The nodes, in the configured order (one for a single broker).
    endpoints: Vec<Endpoint>,
    /// The node of the latest connection (the first one before any).
    current: AtomicUsize,
    container_id: String,
    #[cfg(feature = "tls")]
    server_name: Option<String>,
    /// `idle_timeout` in milliseconds, when on.
    idle_timeout_ms: Option<u32>,
    /// TLS for `amqps://` nodes: the authorities of `tls.ca_file`, or Mozilla's roots.
    #[cfg(feature = "tls")]
    tls: tokio_rustls::TlsConnector,
    backoff: queue_core::Backoff,
    /// `max_message_size`, advertised on every receiver link.
    max_message_size: u64,
    live: Mutex<Option<Live>>,
    /// The latest failure to open a connection or begin a session (see `session`).
    last_failure: std::sync::Mutex<Option<Failure>>,
    generation: AtomicU64,
    /// Connections that opened (attempts that failed are not counted).
    opened: AtomicU64,
    /// Links that attached (first attaches and re-attaches).
    attached: AtomicU64,
    /// Set while a lost connection is being replaced (the connection's lock is held
    /// meanwhile, so [`Connector::is_connected`] cannot look at it).
    reopening: AtomicBool,
    link_seq: AtomicU64,
    /// The lowest `max-frame-size` of the brokers' `open`s: the largest frame the
    /// driver may send (`usize::MAX` before the first open, and when none set one).
    broker_max_frame: Arc<AtomicUsize>,
    closed: watch::Sender<bool>,
    /// The runtime the driver was connected on: connections and sessions are opened
    /// with it entered, so their engines' tasks run there, whoever asked
    /// ([`queue_core::on_runtime`]).
    tasks: tokio::runtime::Handle,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("urls", &self.endpoints)
            .field("container_id", &self.container_id)
            .finish()
    }
}

impl Connector {
    /// Connects once (failing fast if the broker is unreachable or refuses the login).
    pub async fn connect(config: &Amqp10Config) -> Result<Arc<Connector>> {
        let connector = Arc::new(Connector::unconnected(config)?);
        let mut live = connector.live.lock().await;
        *live = Some(connector.open(0).await?);
        drop(live);
        Ok(connector)
    }

    /// The connector for `config`, before its first connection: the configuration is
    /// checked and `tls.ca_file` read here. Called on the runtime the driver is to run
    /// on: it keeps that runtime for its connections and sessions (`tasks`).
    fn unconnected(config: &Amqp10Config) -> Result<Connector> {
        config.validate()?;
        let endpoints = config.endpoints()?;
        let container_id = config
            .container_id
            .clone()
            .unwrap_or_else(|| format!("queue-{}", queue_core::new_message_id()));
        let (closed, _) = watch::channel(false);
        Ok(Connector {
            tasks: tokio::runtime::Handle::current(),
            endpoints,
            current: AtomicUsize::new(0),
            container_id,
            #[cfg(feature = "tls")]
            server_name: config.tls.as_ref().and_then(|t| t.server_name.clone()),
            idle_timeout_ms: u32::try_from(config.idle_timeout.as_millis())
                .ok()
                .filter(|ms| *ms > 0),
            #[cfg(feature = "tls")]
            tls: match config.tls.as_ref().and_then(|t| t.ca_file.as_deref()) {
                Some(ca_file) => crate::tls::trusting(ca_file)?,
                None => crate::tls::trusting_mozilla_roots(),
            },
            backoff: config.reconnect_backoff(),
            max_message_size: config.max_message_size,
            live: Mutex::new(None),
            last_failure: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            attached: AtomicU64::new(0),
            reopening: AtomicBool::new(false),
            link_seq: AtomicU64::new(0),
            broker_max_frame: Arc::new(AtomicUsize::new(usize::MAX)),
            closed,
        })
    }

    /// The largest frame the brokers opened so far accept (see `broker_max_frame`).
    pub fn broker_max_frame(&self) -> usize {
        self.broker_max_frame.load(Ordering::Relaxed)
    }

    /// The runtime the driver was connected on, where its queues' and subscriptions'
    /// tasks run too: the caller's may be a short-lived one (a library user's), and
    /// they would end with it.
    pub(crate) fn tasks(&self) -> tokio::runtime::Handle {
        self.tasks.clone()
    }

    /// A link name unique within this container.
    pub fn link_name(&self, role: &str, queue: &str) -> String {
        let n = self.link_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}/{role}/{queue}/{n}", self.container_id)
    }

    /// The wait before reconnect attempt `failures` (1-based): doubling from
    /// `reconnect_delay` up to `reconnect_max_delay`.
    pub fn backoff(&self, failures: u32) -> Duration {
        self.backoff.delay(failures)
    }

    /// How many connections have opened so far: 1 after connecting, +1 per reconnect.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// How many links have attached so far, re-attaches included.
    pub fn links_attached(&self) -> u64 {
        self.attached.load(Ordering::Relaxed)
    }

    /// Whether a connection is open now. While someone holds the connection (beginning
    /// a session), the answer is whether one ever opened and none is being replaced.
    pub fn is_connected(&self) -> bool {
        match self.live.try_lock() {
            Ok(live) => live.as_ref().is_some_and(|l| !l.connection.is_closed()),
            Err(_) => !self.reopening.load(Ordering::Relaxed) && self.connections_opened() > 0,
        }
    }

    /// The URL of the node connected to (or last connected to; after a session its broker
    /// never began, the node the next connection tries), password redacted.
    pub fn node(&self) -> &str {
        &self.endpoints[self.current.load(Ordering::Relaxed)].redacted
    }

    /// Resolves once the driver is closed.
    pub fn closed_signal(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Whether [`Connector::close`] was called.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Opens a connection to the first node that answers, trying each once from
    /// `first` on, round the list.
    async fn open(&self, first: usize) -> Result<Live> {
        let count = self.endpoints.len();
        let mut errors = Vec::new();
        for node in (0..count).map(|i| (first + i) % count) {
            match self.open_node(node).await {
                Ok(live) => {
                    self.current.store(node, Ordering::Relaxed);
                    return Ok(live);
                }
                Err(e) => {
                    if count > 1 {
                        tracing::warn!(url = %self.endpoints[node].redacted, error = %e, "amqp10 node did not answer; trying the next");
                    }
                    errors.push(e);
                }
            }
        }
        Err(none_answered(errors))
    }

    async fn open_node(&self, node: usize) -> Result<Live> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let e = &self.endpoints[node];
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((e.host.as_str(), e.port)),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Internal,
                format!("connecting to {} timed out", e.redacted),
            )
        })?
        .map_err(|io| {
            Error::internal(format!("cannot connect to {}: {io}", e.redacted)).with_source(io)
        })?;
        let _ = stream.set_nodelay(true);
        if let Some(ms) = self.idle_timeout_ms {
            give_up_on_stalled_writes(&stream, Duration::from_millis(u64::from(ms)));
        }
        let (stream, socket) = second_handle(stream).map_err(|io| {
            Error::internal(format!("connecting to {}: {io}", e.redacted)).with_source(io)
        })?;
        let profile = match &e.username {
            Some(user) => SaslProfile::Plain {
                username: user.clone(),
                password: e.password.clone().unwrap_or_default(),
            },
            None => SaslProfile::Anonymous,
        };
        // Every link has a session of its own, and so a channel: fe2o3-amqp's
        // default (255) capped a connection at 256 links; the broker lowers this to
        // what it allows.
        let mut builder = Connection::builder().channel_max(u16::MAX);
        if let Some(ms) = self.idle_timeout_ms {
            // fe2o3 fails the connection when nothing arrives for `ms`, and asks the
            // broker for a frame every `ms / 2`.
            builder = builder.idle_time_out(ms);
        }
        // TLS is the driver's, under the guard on what the broker sends (guard.rs), so
        // fe2o3-amqp itself always speaks plain AMQP on the stream it is given.
        let hostname = e.open_hostname();
        let builder = builder
            .container_id(self.container_id.clone())
            .hostname(hostname.as_str())
            .scheme("amqp")
            .sasl_profile(profile);
        let opening = async {
            if e.tls {
                #[cfg(feature = "tls")]
                {
                    let domain = self.server_name.as_deref().unwrap_or(e.host.as_str());
                    let tls = crate::tls::handshake(&self.tls, domain, stream).await?;
                    return builder
                        .open_with_stream(
                            Guarded::new(tls).telling_max_frame(Arc::clone(&self.broker_max_frame)),
                        )
                        .await;
                }
                #[cfg(not(feature = "tls"))]
                return Err(OpenError::TlsConnectorNotFound);
            }
            builder
                .open_with_stream(
                    Guarded::new(stream).telling_max_frame(Arc::clone(&self.broker_max_frame)),
                )
                .await
        };
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, opening)
            .await
            .map_err(|_| Error::internal(format!("opening {} timed out", e.redacted)))?
            .map_err(|err| open_error(e, err))?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(url = %e.redacted, generation, "amqp10 connection open");
        Ok(Live {
            generation,
            connection,
            node,
            socket,
        })
    }
}

fn open_error(endpoint: &Endpoint, err: OpenError) -> Error {
    let url = &endpoint.redacted;
    match &err {
        OpenError::SaslError {
            code: SaslCode::Auth,
            ..
        } => Error::permission_denied(format!(
            "{url}: the broker refused the login (SASL authentication failed)"
        )),
        OpenError::ProtocolHeaderMismatch(found) => {
            Error::internal(format!("{url}: {}", other_protocol(found)))
        }
        _ => Error::internal(format!(
            "{url}: opening the AMQP 1.0 connection failed: {err}"
        )),
    }
    .with_source(err)
}

/// What a server that answered the AMQP 1.0 protocol header with another one speaks.
fn other_protocol(found: &[u8]) -> String {
    match found {
        [b'A', b'M', b'Q', b'P', 0, 0, 9, 1] => "the server speaks AMQP 0-9-1, not AMQP 1.0: use the driver kind queue.driver.amqp for it (or, on RabbitMQ 3.x, enable its rabbitmq_amqp1_0 plugin)".to_string(),
        _ => format!(
            "the server does not speak AMQP 1.0 as asked: it answered with the protocol header {:?}",
            String::from_utf8_lossy(found)
        ),
    }
}

/// The error when no node answered: the only one's as it is; for several, one that
/// names each (a refused login wins the kind: retrying would not help).
fn none_answered(mut errors: Vec<Error>) -> Error {
    if errors.len() == 1 {
        return errors.remove(0);
    }
    let kind = if errors.iter().any(|e| e.is(ErrorKind::PermissionDenied)) {
        ErrorKind::PermissionDenied
    } else {
        ErrorKind::Internal
    };
    let each: Vec<String> = errors.iter().map(|e| e.message().to_string()).collect();
    Error::new(
        kind,
        format!(
            "none of the {} nodes answered: {}",
            errors.len(),
            each.join("; ")
        ),
    )
}

impl Connector {
    /// A fresh session on the live connection, reconnecting first if the connection is
    /// gone. A connection that turns out to be gone only when the session is begun (the
    /// broker dropped it a moment ago) is replaced once at once; past that, callers back
    /// off and call again.
    ///
    /// A close ends the wait at once, for the lock as for the broker. A caller that
    /// waited for the lock while another's attempt failed gets that failure instead
    /// of waiting out a time limit of its own on the same broker: K callers behind a
    /// hung broker waited K limits, one after the other, and a close waited for them
    /// all (docs/drivers/amqp10.md, "Connection loss").
    async fn session(&self) -> Result<(SessionHandle<()>, u64)> {
        let arrived = std::time::Instant::now();
        let mut closed = self.closed_signal();
        let attempt = async {
            let mut live = self.live.lock().await;
            if self.is_closed() {
                return Err(crate::error::closed("attach"));
            }
            if let Some(failure) = self.failed_since(arrived) {
                return Err(failure);
            }
            // A handler's `queue.info` on a Lua worker can be the first to need a
            // session after a loss: its engine (and a new connection's) must not run
            // on that worker's runtime, held up by its handlers and ended with it.
            let result = queue_core::on_runtime(&self.tasks, self.session_on(&mut live)).await;
            if let Err(err) = &result {
                *lock_failure(&self.last_failure) = Some(Failure::of(err));
            }
            result
        };
        tokio::select! {
            result = attempt => result,
            _ = closed.wait_for(|closed| *closed) => Err(crate::error::closed("attach")),
        }
    }

    /// The failure of an attempt that ended after `arrived`, for a caller that waited
    /// for the lock meanwhile.
    pub(crate) fn failed_since(&self, arrived: std::time::Instant) -> Option<Error> {
        let last = lock_failure(&self.last_failure);
        let failure = last.as_ref().filter(|f| f.at > arrived)?;
        Some(
            Error::new(
                failure.kind,
                format!(
                    "{} (found by an attempt that ended a moment ago)",
                    failure.message
                ),
            )
            .retryable_if(failure.retryable),
        )
    }

    /// [`Connector::session`] with the connection's lock held.
    async fn session_on(&self, live: &mut Option<Live>) -> Result<(SessionHandle<()>, u64)> {
        let mut last_error = None;
        for _ in 0..2 {
            if live.as_ref().is_none_or(|l| l.connection.is_closed()) {
                // After a loss, the next node first: the lost one may be down.
                let next = self.current.load(Ordering::Relaxed) + usize::from(live.is_some());
                if let Some(old) = live.take() {
                    self.tasks.spawn(old.close());
                }
                let opened = {
                    let _reopening = Reopening::mark(&self.reopening);
                    self.open(next % self.endpoints.len()).await
                };
                *live = Some(opened?);
            }
            let Some(current) = live.as_mut() else {
                return Err(Error::internal("no connection"));
            };
            let (generation, url) = (current.generation, &self.endpoints[current.node].redacted);
            let begun =
                tokio::time::timeout(ATTACH_TIMEOUT, Session::begin(&mut current.connection)).await;
            let error = match begun {
                Ok(Ok(session)) => return Ok((session, generation)),
                // The connection is fine, only full: reopening it would drop every
                // link on it, and attaching them again would fill it again.
                Ok(Err(err @ BeginError::LocalChannelMaxReached)) => {
                    return Err(Error::internal(format!(
                        "{url}: no session left on the connection: every channel the broker allows (its channel-max) holds a link; each declared queue takes one, and each consumer's share another"
                    ))
                    .with_source(err));
                }
                Ok(Err(err)) => {
                    Error::internal(format!("{url}: beginning a session failed: {err}"))
                        .with_source(err)
                }
                Err(_) => {
                    // A broker that does not answer would not answer a new connection
                    // either: the caller gets one time limit, not one per attempt. The
                    // next call opens a new connection, to the next node.
                    if let Some(old) = live.take() {
                        let next = (old.node + 1) % self.endpoints.len();
                        self.current.store(next, Ordering::Relaxed);
                        self.tasks.spawn(old.close());
                    }
                    return Err(Error::internal(format!(
                        "{url}: beginning a session timed out"
                    )));
                }
            };
            // A connection that cannot begin a session is no good: reopen it.
            if let Some(old) = live.take() {
                self.tasks.spawn(old.close());
            }
            last_error = Some(error);
        }
        Err(last_error.unwrap_or_else(|| Error::internal("no session")))
    }

    /// Attaches a sender on its own session.
    pub async fn attach_sender(&self, name: String, target: Target) -> Result<Attached<Sender>> {
        let (mut session, generation) = self.session().await?;
        tracing::debug!(generation, "attaching a link");
        let attach = Sender::builder()
            .name(name)
            .target(target)
            .attach(&mut session);
        match tokio::time::timeout(ATTACH_TIMEOUT, attach).await {
            Ok(Ok(link)) => {
                self.attached.fetch_add(1, Ordering::Relaxed);
                Ok(Attached { link, session })
            }
            Ok(Err(err)) => {
                drop(session); // sends its end: see `Attached::end`
                Err(crate::error::sender_attach(err))
            }
            Err(_) => {
                drop(session); // sends its end: see `Attached::end`
                Err(Error::internal("attaching a sender timed out"))
            }
        }
    }

    /// Attaches a receiver (manual credit) on its own session.
    pub async fn attach_receiver(
        &self,
        name: String,
        source: Source,
    ) -> Result<Attached<Receiver>> {
        let (mut session, generation) = self.session().await?;
        tracing::debug!(generation, "attaching a link");
        let attach = Receiver::builder()
            .name(name)
            .source(source)
            .credit_mode(fe2o3_amqp::link::CreditMode::Manual)
            .auto_accept(false)
            // At-least-once: fe2o3-amqp's default (`mixed`) lets the broker send a
            // delivery settled, gone from the queue before its handler ran; the driver
            // cannot tell one (fe2o3-amqp does not say), and its ack or release would
            // do nothing.
            .sender_settle_mode(SenderSettleMode::Unsettled)
            .max_message_size(self.max_message_size)
            .attach(&mut session);
        match tokio::time::timeout(ATTACH_TIMEOUT, attach).await {
            Ok(Ok(link)) => {
                self.attached.fetch_add(1, Ordering::Relaxed);
                Ok(Attached { link, session })
            }
            Ok(Err(err)) => {
                drop(session); // sends its end: see `Attached::end`
                Err(crate::error::receiver_attach(err))
            }
            Err(_) => {
                drop(session); // sends its end: see `Attached::end`
                Err(Error::internal("attaching a receiver timed out"))
            }
        }
    }

    /// Signals every task to stop, then closes the connection. The tasks waiting for
    /// the connection give up at once ([`Connector::session`]), so the lock comes free.
    pub async fn close(&self) {
        self.closed.send_replace(true);
        let live = self.live.lock().await.take();
        if let Some(live) = live {
            live.close().await;
        }
    }
}

/// Marks a connection being replaced for as long as it lives, so that the mark goes
/// even when the caller opening it gives up (a dropped future).
struct Reopening<'a>(&'a AtomicBool);

impl<'a> Reopening<'a> {
    fn mark(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Reopening(flag)
    }
}

impl Drop for Reopening<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// A failure to get a session, as the callers that waited meanwhile are told it.
struct Failure {
    at: std::time::Instant,
    kind: ErrorKind,
    retryable: bool,
    message: String,
}

impl Failure {
    fn of(err: &Error) -> Failure {
        Failure {
            at: std::time::Instant::now(),
            kind: err.kind(),
            retryable: err.retryable(),
            message: err.message().to_string(),
        }
    }
}

fn lock_failure(
    failure: &std::sync::Mutex<Option<Failure>>,
) -> std::sync::MutexGuard<'_, Option<Failure>> {
    failure.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An opening given up (its future dropped at a time limit, as a caller's timeout
    /// does) takes its mark with it: `is_connected` would otherwise answer `false`
    /// for as long as someone holds the connection afterwards.
    #[tokio::test]
    async fn a_reopening_given_up_leaves_no_mark() {
        let reopening = AtomicBool::new(false);
        let opening = async {
            let _reopening = Reopening::mark(&reopening);
            std::future::pending::<()>().await
        };
        let mut opening = Box::pin(opening);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), opening.as_mut())
                .await
                .is_err()
        );
        assert!(reopening.load(Ordering::Relaxed), "marked while it opens");
        drop(opening);
        assert!(!reopening.load(Ordering::Relaxed), "the mark goes with it");
    }

    #[tokio::test]
    async fn backoff_doubles_up_to_the_maximum() {
        let mut config = Amqp10Config::new("amqp://127.0.0.1:1", crate::Profile::Generic);
        config.reconnect_delay = Duration::from_millis(100);
        config.reconnect_max_delay = Duration::from_millis(700);
        // A refused port: the first connect fails, and says where without a password.
        let err = Connector::connect(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(err.retryable());
        let connector = Connector::unconnected(&config).unwrap();
        let waits: Vec<u128> = (1..=5).map(|n| connector.backoff(n).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 700, 700]);
        assert_eq!(connector.backoff(u32::MAX).as_millis(), 700);
    }

    /// A server that speaks only AMQP 0-9-1 (RabbitMQ 3.x without its AMQP 1.0
    /// plugin) answers with its own protocol header: fe2o3-amqp said only `Protocol
    /// header mismatch. Found b"AMQP\0\0\t\x01"` (outsider attack).
    #[tokio::test]
    async fn a_server_that_speaks_amqp_0_9_1_is_named() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut asked = [0u8; 8];
                let _ = socket.read_exact(&mut asked).await;
                let _ = socket.write_all(b"AMQP\x00\x00\x09\x01").await;
            }
        });
        let config = Amqp10Config::new(format!("amqp://127.0.0.1:{port}"), crate::Profile::Generic);
        let err = Connector::connect(&config).await.unwrap_err();
        assert!(err.message().contains("speaks AMQP 0-9-1"), "{err}");
        assert!(err.message().contains("queue.driver.amqp "), "{err}");
    }
}
