//! The connection: connect, watch for loss, reconnect with backoff, redeclare.
//!
//! The driver owns the reconnect loop (lapin's automatic recovery is off): one
//! supervisor task per driver holds the current [`Link`] and publishes it through a
//! `watch` channel; `None` there means "reconnecting". Publishers wait on that
//! channel (up to `publish_timeout`), consumers re-attach when a newer link appears.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connect, ConnectionProperties};
use queue_core::{Error, ErrorKind, QueueId, QueueSpec, Result};
use tokio::sync::{Notify, Semaphore, watch};

use crate::config::AmqpConfig;
use crate::consume::Settler;
use crate::error;

/// How often the supervisor looks at the connection's state besides its events.
const WATCHDOG: Duration = Duration::from_millis(250);
/// Unused delay queues disappear this long after their last declaration plus their delay.
pub(crate) const DELAY_QUEUE_EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// A delay queue is redeclared (which resets its expiry) when older than this.
const DELAY_QUEUE_REFRESH: Duration = Duration::from_secs(30);

/// One established connection and the confirm-mode channel publishes go through.
pub(crate) struct Link {
    pub(crate) connection: lapin::Connection,
    pub(crate) generation: u64,
    publisher: tokio::sync::Mutex<Option<Channel>>,
}

impl Link {
    pub(crate) fn is_alive(&self) -> bool {
        self.connection.status().connected()
    }

    /// The publishing channel (in confirm mode), reopened if a channel error closed it.
    pub(crate) async fn publisher(&self) -> std::result::Result<Channel, lapin::Error> {
        let mut slot = self.publisher.lock().await;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.connection.create_channel().await?;
        ch.confirm_select(Default::default()).await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// A short-lived channel for declarations and counts (a refused declare closes it).
    pub(crate) async fn scratch_channel(&self, what: &str) -> Result<Channel> {
        self.connection
            .create_channel()
            .await
            .map_err(|e| error::map(format!("{what}: open channel"), e))
    }
}

/// A delay queue this driver declared.
#[derive(Debug, Clone)]
pub(crate) struct DelayQueue {
    pub(crate) target: QueueId,
    pub(crate) declared: Instant,
    pub(crate) generation: u64,
}

/// State shared by the driver, its supervisor, its publishers and its subscriptions.
pub(crate) struct Shared {
    pub(crate) config: AmqpConfig,
    uri: lapin::uri::AMQPUri,
    tls: lapin::tcp::OwnedTLSConfig,
    /// Every queue declared through this driver: what `publish` accepts and what a
    /// reconnect redeclares.
    pub(crate) registry: Mutex<HashMap<QueueId, QueueSpec>>,
    pub(crate) delay_queues: Mutex<HashMap<String, DelayQueue>>,
    pub(crate) link: watch::Sender<Option<Arc<Link>>>,
    pub(crate) closed: watch::Sender<bool>,
    /// Bounds the published-but-unconfirmed messages (`confirm_window`).
    pub(crate) window: Semaphore,
    /// Wakes the supervisor to look at the connection now (someone saw an I/O error).
    pub(crate) nudge: Arc<Notify>,
    /// Live subscriptions' ack batchers, drained on close.
    pub(crate) settlers: Mutex<HashMap<u64, Weak<Settler>>>,
    next_id: AtomicU64,
    generation: AtomicU64,
    /// Consumers attached (basic.consume), re-attaches after a reconnect included.
    pub(crate) consumers_attached: AtomicU64,
    /// The runtime the driver was created on, where its background tasks live. A
    /// subscription re-attaches inside `next()`, which may run on a caller's
    /// short-lived runtime (the queue runtime's workers each drive one of their own);
    /// a task spawned there would die with it and leave the subscription unable to
    /// drain its acks or close its channel.
    pub(crate) tasks: tokio::runtime::Handle,
}

/// Locks a std mutex; a panic elsewhere cannot leave these maps half-written.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Connects once (failing fast, with the URL redacted), then starts the supervisor.
    pub(crate) async fn connect(config: AmqpConfig) -> Result<Arc<Shared>> {
        config.validate()?;
        let uri = config.uri()?;
        let tls = config.tls_config()?;
        let (link, _) = watch::channel(None);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            window: Semaphore::new(config.confirm_window),
            config,
            uri,
            tls,
            registry: Mutex::new(HashMap::new()),
            delay_queues: Mutex::new(HashMap::new()),
            link,
            closed,
            nudge: Arc::new(Notify::new()),
            settlers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            consumers_attached: AtomicU64::new(0),
            tasks: tokio::runtime::Handle::current(),
        });
        let first = shared.establish().await?;
        shared.link.send_replace(Some(Arc::clone(&first)));
        shared
            .tasks
            .spawn(supervise(Arc::downgrade(&shared), first));
        Ok(shared)
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// The current link if one is up.
    pub(crate) fn current(&self) -> Option<Arc<Link>> {
        self.link.borrow().clone()
    }

    /// The current link, if it is alive and the driver is not closed: what
    /// [`Self::link_until`] returns at once in the common case, without subscribing.
    pub(crate) fn live_link(&self) -> Option<Arc<Link>> {
        if *self.closed.borrow() {
            return None;
        }
        self.link.borrow().clone().filter(|link| link.is_alive())
    }

    /// Waits for a live link until `deadline`; `what` names the operation in the error.
    pub(crate) async fn link_until(
        &self,
        what: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Link>> {
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        let mut rx = self.link.subscribe();
        let mut closed = self.closed.subscribe();
        let wait = async {
            loop {
                if *closed.borrow_and_update() {
                    return Err(closed_error(what));
                }
                let current = rx.borrow_and_update().clone();
                if let Some(link) = current
                    && link.is_alive()
                {
                    return Ok(link);
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return Err(closed_error(what)) },
                    _ = closed.changed() => {},
                    // A dead link not yet replaced: look again shortly.
                    _ = tokio::time::sleep(WATCHDOG) => {},
                }
            }
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(out) => out,
            Err(_) => Err(error::not_connected(
                what,
                &format!(
                    "no connection to {} within publish_timeout {:?}",
                    self.config.redacted_url(),
                    self.config.publish_timeout
                ),
            )),
        }
    }

    /// Opens a connection (bounded by `connection_timeout`).
    async fn establish(&self) -> Result<Arc<Link>> {
        let url = self.config.redacted_url();
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.config.connection_name {
            props = props.with_connection_name(LongString::from(name.as_bytes()));
        }
        let runtime = lapin::runtime::default_runtime().map_err(|e| {
            Error::internal(format!("connect to {url}: no async runtime")).with_source(e)
        })?;
        let attempt = self
            .uri
            .clone()
            .connect_with_config(props, self.tls.clone(), runtime);
        let connection = match tokio::time::timeout(self.config.connection_timeout, attempt).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(connect_error(&url, e)),
            Err(_) => {
                return Err(Error::internal(format!(
                    "connect to {url}: no answer within connection_timeout {:?}",
                    self.config.connection_timeout
                )));
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(url = %url, generation, "connected to the AMQP broker");
        Ok(Arc::new(Link {
            connection,
            generation,
            publisher: tokio::sync::Mutex::new(None),
        }))
    }

    /// Declares a queue on the broker (not the registry).
    pub(crate) async fn declare_on(&self, link: &Link, spec: &QueueSpec) -> Result<()> {
        let mut args = FieldTable::default();
        if let Some(max) = spec.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(clamp_i64(max)),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        if let Some(p) = spec.max_priority {
            args.insert(
                "x-max-priority".into(),
                AMQPValue::LongLongInt(i64::from(p)),
            );
        }
        if let Some(ttl) = spec.message_ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis(ttl)));
        }
        self.declare_raw(
            link,
            &spec.name,
            spec.durable,
            args,
            &format!("declare queue {}", spec.id),
        )
        .await
    }

    async fn declare_raw(
        &self,
        link: &Link,
        name: &str,
        durable: bool,
        args: FieldTable,
        what: &str,
    ) -> Result<()> {
        let name = queue_name(name)?;
        let channel = link.scratch_channel(what).await?;
        let options = QueueDeclareOptions {
            durable,
            ..QueueDeclareOptions::default()
        };
        let declared = channel.queue_declare(name.clone(), options, args).await;
        let _ = channel.close(200, "OK".into()).await;
        declared.map(|_| ()).map_err(|e| {
            if error::is_connection_level(&e) {
                self.nudge.notify_one();
            }
            let mapped = error::map(what, e);
            if mapped.is(ErrorKind::AlreadyExists) {
                Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{}: queue {:?} already exists on the broker with other settings; delete it or declare it as it is",
                        mapped.message(),
                        name.as_str()
                    ),
                )
            } else {
                mapped
            }
        })
    }

    /// Makes sure the delay queue for `delay_ms` in front of `spec` exists; returns its name.
    pub(crate) async fn delay_queue(
        &self,
        link: &Link,
        spec: &QueueSpec,
        delay_ms: u64,
    ) -> Result<String> {
        let name = format!("{}.delay.{delay_ms}", spec.name);
        let fresh = lock(&self.delay_queues).get(&name).is_some_and(|d| {
            d.generation == link.generation && d.declared.elapsed() < DELAY_QUEUE_REFRESH
        });
        if fresh {
            return Ok(name);
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(clamp_i64(delay_ms)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(spec.name.as_bytes().into()),
        );
        let expires = delay_ms.saturating_add(millis(DELAY_QUEUE_EXPIRY_MARGIN) as u64);
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(clamp_i64(expires)),
        );
        self.declare_raw(
            link,
            &name,
            spec.durable,
            args,
            &format!("declare delay queue of {}", spec.id),
        )
        .await?;
        lock(&self.delay_queues).insert(
            name.clone(),
            DelayQueue {
                target: spec.id.clone(),
                declared: Instant::now(),
                generation: link.generation,
            },
        );
        Ok(name)
    }

    /// Redeclares every registered queue on a new link.
    async fn redeclare(&self, link: &Link) {
        let specs: Vec<QueueSpec> = lock(&self.registry).values().cloned().collect();
        for spec in specs {
            if let Err(e) = self.declare_on(link, &spec).await {
                tracing::warn!(queue = %spec.id, error = %e, "redeclare after reconnect failed");
            }
        }
    }

    /// Flushes every subscription's pending acks, then closes the connection.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.closed.send_replace(true) {
            return Ok(());
        }
        let settlers: Vec<Arc<Settler>> = lock(&self.settlers)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for s in settlers {
            s.close_and_drain(queue_core::ErrorKind::Canceled, "the driver was closed")
                .await;
        }
        let link = self.link.send_replace(None);
        if let Some(link) = link
            && link.is_alive()
        {
            link.connection
                .close(200, "driver closed".into())
                .await
                .map_err(|e| error::map("close connection", e))?;
        }
        Ok(())
    }
}

fn closed_error(what: &str) -> Error {
    Error::new(ErrorKind::Canceled, format!("{what}: the driver is closed"))
}

fn connect_error(url: &str, e: lapin::Error) -> Error {
    let refused_login = matches!(error::reply_code(&e), Some(403) | Some(530));
    let base = error::map(format!("connect to {url}"), e);
    if refused_login {
        Error::new(
            ErrorKind::PermissionDenied,
            format!("{} (check the user, password and vhost)", base.message()),
        )
    } else {
        base
    }
}

/// A queue name as AMQP carries it (at most 255 bytes).
pub(crate) fn queue_name(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        Error::invalid(format!(
            "queue name {:?}... is longer than AMQP's 255 bytes",
            name.chars().take(40).collect::<String>()
        ))
    })
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Watches the link; on loss, reconnects with backoff, redeclares and publishes the
/// new link. Holds the driver's state only weakly: dropping the driver ends it.
async fn supervise(weak: Weak<Shared>, mut link: Arc<Link>) {
    loop {
        let (closed, nudge, backoff) = match weak.upgrade() {
            Some(s) => (
                s.closed.subscribe(),
                Arc::clone(&s.nudge),
                s.config.reconnect_backoff(),
            ),
            None => return,
        };
        if !wait_for_loss(&weak, &link, closed.clone(), &nudge).await {
            return;
        }
        let Some(shared) = weak.upgrade() else { return };
        if shared.is_closed() {
            return;
        }
        shared.link.send_replace(None);
        tracing::warn!(url = %shared.config.redacted_url(), "connection to the AMQP broker lost; reconnecting");
        drop(shared);
        drop(link);
        let mut attempt = 1;
        link = loop {
            let mut closed = closed.clone();
            let delay = backoff.delay(attempt);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            let Some(shared) = weak.upgrade() else { return };
            if shared.is_closed() {
                return;
            }
            match shared.establish().await {
                Ok(new) => {
                    shared.redeclare(&new).await;
                    if !new.is_alive() {
                        continue;
                    }
                    shared.link.send_replace(Some(Arc::clone(&new)));
                    tracing::info!(
                        generation = new.generation,
                        "reconnected; queues redeclared"
                    );
                    break new;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, retry_in = ?backoff.delay(attempt), "reconnect failed");
                }
            }
        };
    }
}

/// Returns true when the link is lost, false when the driver is closed or gone.
async fn wait_for_loss(
    weak: &Weak<Shared>,
    link: &Link,
    mut closed: watch::Receiver<bool>,
    nudge: &Notify,
) -> bool {
    let mut events = Box::pin(link.connection.events_listener());
    let mut events_open = true;
    let mut tick = tokio::time::interval(WATCHDOG);
    loop {
        tokio::select! {
            _ = closed.wait_for(|c| *c) => return false,
            ev = events.next(), if events_open => events_open = ev.is_some(),
            _ = tick.tick() => {}
            _ = nudge.notified() => {}
        }
        if weak.strong_count() == 0 {
            return false;
        }
        if !link.is_alive() {
            return true;
        }
    }
}

impl Shared {
    /// Counts: ready and consumers from a passive declare; delayed from the delay
    /// queues this driver declared for the queue.
    pub(crate) async fn info(&self, queue: &QueueId) -> Result<queue_core::QueueInfo> {
        let spec = self.spec_of(queue, "info of")?;
        let what = format!("info of {queue}");
        let deadline = tokio::time::Instant::now() + self.config.publish_timeout;
        let link = self.link_until(&what, deadline).await?;
        let (ready, consumers) = match self.passive(&link, &spec.name, &what).await? {
            Some(counts) => counts,
            None => {
                return Err(Error::not_found(format!(
                    "{what}: queue {:?} does not exist on the broker (deleted?); declare it again",
                    spec.name
                )));
            }
        };
        let delay_queues: Vec<String> = lock(&self.delay_queues)
            .iter()
            .filter(|(_, d)| &d.target == queue)
            .map(|(name, _)| name.clone())
            .collect();
        let mut delayed = 0u64;
        for name in delay_queues {
            match self.passive(&link, &name, &what).await? {
                Some((n, _)) => delayed += n,
                // Expired: it held nothing any more.
                None => {
                    lock(&self.delay_queues).remove(&name);
                }
            }
        }
        Ok(queue_core::QueueInfo {
            ready: Some(ready),
            in_flight: None,
            delayed: Some(delayed),
            consumers: Some(consumers),
        })
    }

    /// (ready, consumers) of a queue, `None` if it does not exist.
    async fn passive(&self, link: &Link, name: &str, what: &str) -> Result<Option<(u64, u64)>> {
        let name = queue_name(name)?;
        let channel = link.scratch_channel(what).await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let out = channel
            .queue_declare(name, options, FieldTable::default())
            .await;
        match out {
            Ok(q) => {
                let _ = channel.close(200, "OK".into()).await;
                Ok(Some((
                    u64::from(q.message_count()),
                    u64::from(q.consumer_count()),
                )))
            }
            Err(e) if error::reply_code(&e) == Some(404) => Ok(None),
            Err(e) => {
                if error::is_connection_level(&e) {
                    self.nudge.notify_one();
                }
                Err(error::map(what, e))
            }
        }
    }
}
