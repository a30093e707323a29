//! # queue-amqp091
//!
//! The AMQP 0-9-1 driver of the queue workspace: RabbitMQ through
//! [lapin](https://docs.rs/lapin). It implements [`queue_core::Driver`]:
//!
//! * publishes in confirm mode, pipelined through a bounded window
//!   (`confirm_window`), `mandatory` and persistent; `Ok` only after the broker's ack;
//! * maps headers to AMQP properties and the header table (see [`mapping`](crate#header-mapping));
//! * declares queues with `x-max-length` (+ `x-overflow: reject-publish`),
//!   `x-max-priority` and `x-message-ttl`; delays through per-delay TTL queues that
//!   dead-letter back, with no broker plugin;
//! * consumes with `basic.qos` = prefetch and batches acks with `multiple` where safe;
//! * reconnects with backoff, redeclares its queues and re-attaches its consumers.
//!
//! Public surface: [`AmqpDriver`], [`AmqpConfig`] (+ [`TlsConfig`]) and
//! [`AmqpDriverFactory`] (kind `queue.driver.amqp`).
//!
//! ```no_run
//! use queue_amqp091::{AmqpConfig, AmqpDriver};
//! use queue_core::{Codec, Driver, Headers, Message, QueueId, QueueSpec, Value};
//!
//! # async fn run() -> queue_core::Result<()> {
//! let driver = AmqpDriver::connect(AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")).await?;
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
//! table entry; the `content_type` property is always the codec's. Consumers read
//! back exactly what was published; non-scalar broker headers (`x-death`, ...) are
//! hidden. The full table is in `docs/drivers/amqp091.md`.
#![warn(missing_docs)]

mod config;
mod connection;
mod consume;
mod error;
mod mapping;
mod publish;

use std::sync::Arc;

use async_trait::async_trait;
use queue_core::{
    Capabilities, ConnectionReport, ConsumeOptions, Driver, DriverConfig, Error, Message, QueueId,
    QueueInfo, QueueSpec, Result, Subscription,
};

pub use config::{AmqpConfig, KIND, TlsConfig};

use connection::{Shared, lock, queue_name};

/// The AMQP 0-9-1 driver: one connection (reconnected on loss), one confirm-mode
/// publishing channel, one channel per subscription.
pub struct AmqpDriver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpDriver")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl AmqpDriver {
    /// Connects. The first connection must succeed (an unreachable broker or a
    /// refused login is an error here, with the URL's password removed); after
    /// that, a lost connection is re-established in the background.
    pub async fn connect(config: AmqpConfig) -> Result<AmqpDriver> {
        Ok(AmqpDriver {
            shared: Shared::connect(config).await?,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }
}

impl Drop for AmqpDriver {
    fn drop(&mut self) {
        // Stops the supervisor; the connection closes with the last handle on it.
        self.shared.closed.send_replace(true);
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
    quorum_queues: false,
};

#[async_trait]
impl Driver for AmqpDriver {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        queue_name(&spec.name)?;
        if spec.max_priority.is_some_and(|p| p == 0) {
            return Err(Error::invalid(format!(
                "queue {}: max_priority must be 1..=255",
                spec.id
            )));
        }
        let what = format!("declare queue {}", spec.id);
        let deadline = tokio::time::Instant::now() + self.shared.config.publish_timeout;
        let link = self.shared.link_until(&what, deadline).await?;
        self.shared.declare_on(&link, spec).await?;
        lock(&self.shared.registry).insert(spec.id.clone(), spec.clone());
        Ok(())
    }

    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        self.shared.publish_all(queue, vec![message]).await
    }

    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        self.shared.publish_all(queue, messages).await
    }

    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let sub = consume::AmqpSubscription::start(
            Arc::clone(&self.shared),
            queue.clone(),
            options.prefetch,
        )
        .await?;
        Ok(Box::new(sub))
    }

    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        self.shared.info(queue).await
    }

    fn connection(&self) -> Option<ConnectionReport> {
        let current = self.shared.current();
        Some(ConnectionReport {
            connected: current.as_ref().is_some_and(|l| l.is_alive()),
            connections_opened: current.map_or(0, |l| l.generation),
            links_attached: self
                .shared
                .consumers_attached
                .load(std::sync::atomic::Ordering::Relaxed),
            node: self.shared.config.redacted_url(),
        })
    }

    async fn close(&self) -> Result<()> {
        self.shared.close().await
    }
}

/// `queue.driver.amqp` entries build [`AmqpDriver`]s: register
/// `queue_core::Factory::<AmqpConfig>::new()`.
#[async_trait]
impl DriverConfig for AmqpConfig {
    const KIND: &'static str = KIND;

    fn validate(&self) -> Result<Capabilities> {
        AmqpConfig::validate(self).map(|()| CAPABILITIES)
    }

    async fn connect(self) -> Result<Arc<dyn Driver>> {
        Ok(Arc::new(AmqpDriver::connect(self).await?))
    }
}
