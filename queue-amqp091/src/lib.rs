//! # queue-amqp091
//!
//! The AMQP 0-9-1 driver of the queue workspace: RabbitMQ through
//! [lapin](https://docs.rs/lapin). It implements [`queue_core::Driver`]:
//!
//! * publishes in confirm mode, pipelined through a bounded window
//!   (`confirm_window`), `mandatory` and persistent; `Ok` only after the broker's ack;
//! * maps headers to AMQP properties and the header table (see [`mapping`](crate#header-mapping));
//! * declares classic or quorum queues with `x-max-length` (+ `x-overflow:
//!   reject-publish`), `x-max-priority` and `x-message-ttl`; delays through per-delay
//!   TTL queues that dead-letter back, with no broker plugin;
//! * consumes with `basic.qos` = prefetch and batches acks with `multiple` where safe;
//!   a quorum queue's redelivery count reaches handlers as [`X_DELIVERY_COUNT`];
//! * connects to one node or to the first live node of a cluster (`url` is a URL or
//!   a list), reconnects with backoff (to the next live node), redeclares its queues
//!   and re-attaches its consumers.
//!
//! Public surface: [`Amqp091Driver`], [`Amqp091Config`] (+ [`TlsConfig`]); a
//! `queue.driver.amqp` entry builds a driver through `queue_core::Factory::<Amqp091Config>`.
//!
//! ```no_run
//! use queue_amqp091::{Amqp091Config, Amqp091Driver};
//! use queue_core::{Codec, Driver, Headers, Message, QueueId, QueueSpec, Value};
//!
//! # async fn run() -> queue_core::Result<()> {
//! let driver = Amqp091Driver::connect(Amqp091Config::new("amqp://guest:guest@127.0.0.1:5672/%2f")).await?;
//! let tasks = QueueId::parse("app:tasks")?;
//! driver.declare(&QueueSpec::new(tasks.clone()).with_max_priority(9)).await?;
//! let message = Message::encode(&Value::from("hello"), Headers::new(), Codec::Json)?;
//! driver.publish(&tasks, message).await?; // returns once RabbitMQ confirmed it
//! let mut sub = driver.consume(&tasks, Default::default()).await?;
//! if let Some(Ok(delivery)) = sub.next().await {
//!     delivery.ack().await?;
//! }
//! driver.close().await
//! # }
//! ```
//!
//! # Header mapping
//!
//! A well-known header goes into its native AMQP property when the property carries
//! its value exactly, into the header table otherwise; everything else goes into the
//! header table with its type (strings as long strings, integers as longs (`l`),
//! floats as doubles, booleans). The publisher's `content_type` header is a plain
//! table entry; the `content_type` property is always the codec's, and a consumer
//! reads the property as it came (empty when another client sent none). Consumers
//! read back exactly what was published; non-scalar broker headers (`x-death`, ...) are
//! hidden. The full table is in `docs/drivers/amqp091.md`.
#![warn(missing_docs)]

/// The `queue.driver.amqp` configuration.
mod config;
/// The link to the broker and its supervisor (reconnects); knows nothing above it.
mod connection;
/// Subscriptions: a channel per consumer, re-attached after reconnects.
mod consume;
/// lapin errors -> the workspace's errors.
mod error;
/// What lapin would refuse in a broker's frame (short strings that are not UTF-8, a
/// content header past `frame_max`), mended before it reads the frame.
mod frames;
/// Headers <-> AMQP properties and header table.
mod mapping;
/// The confirm-mode publisher and its window.
mod publish;
/// Returns paired with their publishes by message id as the connection's reader
/// reads them, not by what lapin attaches to confirms.
mod returns;
/// Batched acks and releases of one consumer channel.
mod settle;
/// Declared queues, delay queues, passive declares for `info`.
mod topology;
/// The stream between the broker and lapin, which applies `frames` to what comes in
/// and hands each return to `returns`.
mod transport;

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use queue_core::{
    Capabilities, ConnectionReport, ConsumeOptions, Driver, DriverConfig, Message, QueueId,
    QueueInfo, QueueSpec, Result, Subscription,
};

pub use config::{Amqp091Config, KIND, TlsConfig};
pub use mapping::X_DELIVERY_COUNT;

use connection::{CLOSE_TIMEOUT, Connection, OnReconnect, Purpose};
use consume::Consumers;
use publish::Publisher;
use topology::Topology;

/// The former name of [`Amqp091Driver`].
#[deprecated(note = "renamed to Amqp091Driver")]
pub type AmqpDriver = Amqp091Driver;

/// The former name of [`Amqp091Config`].
#[deprecated(note = "renamed to Amqp091Config")]
pub type AmqpConfig = Amqp091Config;

/// The AMQP 0-9-1 driver: a connection to one node of the configured ones for
/// publishing and declaring, and another for consumers (each reconnected on loss, to
/// the next live node); one confirm-mode publishing channel, one channel per
/// subscription.
pub struct Amqp091Driver {
    conn: Arc<Connection>,
    topology: Arc<Topology>,
    publisher: Publisher,
    /// The consumers, on a connection of their own.
    consumers: Arc<Consumers>,
}

impl std::fmt::Debug for Amqp091Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp091Driver")
            .field("config", self.conn.config())
            .finish()
    }
}

impl Amqp091Driver {
    /// Connects. The first connection must succeed (an unreachable broker or a
    /// refused login is an error here, with the URL's password removed); after
    /// that, a lost connection is re-established in the background.
    pub async fn connect(config: Amqp091Config) -> Result<Amqp091Driver> {
        config.validate()?;
        let topology = Arc::new(Topology::default());
        // Both now, on the caller's runtime, where their supervisors live; opened by the
        // first consume instead, the consumers' connection lived on whichever runtime
        // consumed first, and a broker away at that moment failed the consume.
        let conn = Connection::connect(
            config.clone(),
            Purpose::Publishing,
            redeclare_on_reconnect(&topology),
        )
        .await?;
        let consuming = Connection::connect(
            config,
            Purpose::Consuming,
            redeclare_on_reconnect(&topology),
        )
        .await;
        let consuming = match consuming {
            Ok(consuming) => consuming,
            Err(e) => {
                conn.mark_closed();
                let _ = conn.shutdown().await;
                return Err(e);
            }
        };
        Ok(Amqp091Driver {
            publisher: Publisher::new(Arc::clone(&conn), Arc::clone(&topology)),
            consumers: Consumers::new(consuming, Arc::clone(&topology)),
            conn,
            topology,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &Amqp091Config {
        self.conn.config()
    }

    /// Waits for a live link until `publish_timeout`.
    async fn link(&self, what: &str) -> Result<Arc<connection::Link>> {
        let deadline = queue_core::deadline_after(self.conn.config().publish_timeout);
        self.conn.link_until(what, deadline).await
    }
}

/// A new link gets every declared queue before anyone publishes or consumes on it.
fn redeclare_on_reconnect(topology: &Arc<Topology>) -> OnReconnect {
    let topology = Arc::clone(topology);
    Box::new(move |link| {
        let topology = Arc::clone(&topology);
        Box::pin(async move { topology.redeclare(&link).await })
    })
}

impl Drop for Amqp091Driver {
    fn drop(&mut self) {
        // Stops the supervisors; a connection closes with the last handle on it.
        self.conn.mark_closed();
        self.consumers.connection().mark_closed();
    }
}

const NAME: &str = "amqp";

/// What the driver can do on RabbitMQ.
pub const CAPABILITIES: Capabilities = Capabilities {
    confirms: true,
    priority: true,
    max_priority: 255,
    delay: true,
    max_length: true,
    message_ttl: true,
    persistent: true,
    info_ready: true,
    // RabbitMQ's queue.declare-ok counts ready messages only.
    info_in_flight: false,
    info_consumers: true,
    quorum_queues: true,
    max_queue_name_bytes: Some(topology::MAX_QUEUE_NAME_BYTES),
    // RabbitMQ refuses to declare them (ACCESS_REFUSED).
    reserved_queue_name_prefixes: &["amq."],
    reserved_headers: mapping::RESERVED_HEADERS,
    // The broker's `consumer_timeout` as RabbitMQ ships it; a configuration says
    // another (`Amqp091Config::capabilities`).
    max_unsettled: Some(config::RABBITMQ_CONSUMER_TIMEOUT),
};

#[async_trait]
impl Driver for Amqp091Driver {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        self.conn.config().capabilities()
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        // The runtime checks this too; a Rust user may call the driver directly.
        spec.check_supported(self.name(), &CAPABILITIES)?;
        Topology::check(spec)?;
        let link = self.link(&format!("declare queue {}", spec.id)).await?;
        self.topology.declare(&link, spec).await
    }

    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        self.publisher.publish_one(queue, message).await
    }

    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        self.publisher.publish_all(queue, messages).await
    }

    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let sub = self
            .consumers
            .subscribe(queue.clone(), options.prefetch)
            .await?;
        Ok(Box::new(sub))
    }

    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        self.topology.spec_of(queue, "info of")?;
        let link = self.link(&format!("info of {queue}")).await?;
        self.topology.info(&link, queue).await
    }

    fn connection(&self) -> Option<ConnectionReport> {
        // The node before the count: a connection counts itself before it names its
        // node, so a report never shows a new node with the old count. Not the current
        // link's generation: between a reconnect and the redeclare on the new node
        // there is no current link.
        let node = self.conn.node();
        let alive = |conn: &Connection| conn.current().is_some_and(|l| l.is_alive());
        let consuming = self.consumers.connection();
        Some(ConnectionReport {
            connected: alive(&self.conn) && alive(consuming),
            connections_opened: self.conn.connections_opened() + consuming.connections_opened(),
            links_attached: self.consumers.attached(),
            node,
        })
    }

    /// Flushes every subscription's pending acks, then closes the connections.
    async fn close(&self) -> Result<()> {
        if !self.conn.mark_closed() {
            return Ok(());
        }
        let consuming = self.consumers.connection();
        consuming.mark_closed();
        self.publisher.settle_sent(CLOSE_TIMEOUT).await;
        self.consumers.close().await;
        // Side by side: each waits at most CLOSE_TIMEOUT for a broker that hangs.
        let (publishing, consuming) =
            futures_util::future::join(self.conn.shutdown(), consuming.shutdown()).await;
        publishing.and(consuming)
    }
}

/// `queue.driver.amqp` entries build [`Amqp091Driver`]s: register
/// `queue_core::Factory::<Amqp091Config>::new()`.
#[async_trait]
impl DriverConfig for Amqp091Config {
    const KIND: &'static str = KIND;

    fn validate(&self) -> Result<Capabilities> {
        Amqp091Config::validate(self).map(|()| self.capabilities())
    }

    async fn connect(self) -> Result<Arc<dyn Driver>> {
        Ok(Arc::new(Amqp091Driver::connect(self).await?))
    }
}

/// Locks a std mutex; a panic elsewhere cannot leave the driver's maps half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
