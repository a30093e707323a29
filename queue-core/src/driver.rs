//! The driver contract: what every backend (memory, AMQP 0-9-1, AMQP 1.0) provides.
//!
//! The trait is small on purpose: declare, publish, consume, info, close. Retries,
//! `attempts` and dead letters belong to the runtime, which builds them from publish
//! and ack (docs/consumers.md), so every driver gets them without code of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, Message, QueueId, Result};

/// What a driver can do. Filled in honestly by each driver; the conformance suite
/// selects its tests by it and the runtime refuses configurations that need more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// `publish` returns only after the backend has taken responsibility for the message.
    pub confirms: bool,
    /// Honours `max_priority` on declare and the `priority` header.
    pub priority: bool,
    /// The highest `max_priority` a queue may declare (when `priority` is on).
    pub max_priority: u8,
    /// Honours the `delay` header (otherwise publishing with it is `INVALID`).
    pub delay: bool,
    /// Honours `max_length` on declare.
    pub max_length: bool,
    /// Honours `message_ttl` on declare and the `expiration`/`ttl` header.
    pub message_ttl: bool,
    /// Messages survive a restart of the backend (durable queues, persistent messages).
    pub persistent: bool,
    /// `info` reports ready messages.
    pub info_ready: bool,
    /// `info` reports unsettled (in-flight) messages.
    pub info_in_flight: bool,
    /// `info` reports the number of consumers.
    pub info_consumers: bool,
    /// Declares quorum queues ([`QueueType::Quorum`]): replicated over a cluster's
    /// nodes, and dead-lettering out of them at least once.
    pub quorum_queues: bool,
    /// The longest broker name (`queue_name`) a queue may have, where the driver takes
    /// fewer bytes than a queue id's 255 (AMQP 0-9-1 keeps room for the names of a
    /// queue's delay queues); `None` when it has no limit of its own.
    pub max_queue_name_bytes: Option<usize>,
    /// Beginnings of broker names the broker keeps for itself (RabbitMQ's `amq.`),
    /// which it refuses to declare: the runtime refuses such a `queue_name` when it
    /// plans, where the broker refused it only once the runtime ran.
    pub reserved_queue_name_prefixes: &'static [&'static str],
    /// Header names the broker acts on, which `publish` refuses (AMQP 0-9-1's `CC` and
    /// `BCC` route a message to more queues). Another client's message may carry them:
    /// the copies the runtime publishes to this driver leave them out, named in
    /// `x_dropped_headers` (docs/consumers.md, "Retries and dead letters").
    pub reserved_headers: &'static [&'static str],
    /// How long the broker lets a delivery stay unsettled before it takes it back and
    /// ends the consumer's channel (RabbitMQ's `consumer_timeout`, 30 minutes by
    /// default); `None` where it has no such limit. The message then comes back with
    /// its `attempts` unchanged: the runtime refuses a configuration that would hold a
    /// delivery that long (a handler's `timeout`; a backoff waited out holding the
    /// delivery, on a driver without `delay`), which would retry it for ever.
    pub max_unsettled: Option<Duration>,
}

/// What kind of queue to declare, where the broker has several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// The broker's plain queue (RabbitMQ's classic queue).
    #[default]
    Classic,
    /// A replicated queue (RabbitMQ's quorum queue): it survives the loss of a node
    /// of the cluster, and has no message priorities.
    Quorum,
}

impl QueueType {
    /// Its name in configuration (`classic`, `quorum`).
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// How a broker driver's connection has fared since the driver was created: for
/// readiness, for logs, and for tests that must prove a fault reached the driver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionReport {
    /// Connected right now.
    pub connected: bool,
    /// Connections opened since the driver was created (1 after the first connect;
    /// every reconnect adds one; a driver with more than one connection, like AMQP
    /// 0-9-1's for publishing and for consumers, counts each).
    pub connections_opened: u64,
    /// Links (consumers, senders) attached since the driver was created, re-attaches
    /// included.
    pub links_attached: u64,
    /// The node it is connected to, or was last, password redacted.
    pub node: String,
}

/// A queue as a driver declares it.
///
/// ```
/// use queue_core::{QueueId, QueueSpec};
/// let spec = QueueSpec::new(QueueId::parse("app:tasks").unwrap()).with_max_priority(9);
/// assert_eq!(spec.name, "app:tasks");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// The queue id the application uses.
    pub id: QueueId,
    /// The broker's name for it (default: the full id).
    pub name: String,
    /// Survives a broker restart (default true).
    pub durable: bool,
    /// At most this many ready messages.
    pub max_length: Option<u64>,
    /// Enables priorities 0..=max_priority.
    pub max_priority: Option<u8>,
    /// Messages older than this are discarded.
    pub message_ttl: Option<Duration>,
    /// Classic (the default) or quorum.
    pub queue_type: QueueType,
}

impl QueueSpec {
    /// A durable queue named like its id, with no limits.
    pub fn new(id: QueueId) -> Self {
        QueueSpec {
            name: id.as_str().to_string(),
            id,
            durable: true,
            max_length: None,
            max_priority: None,
            message_ttl: None,
            queue_type: QueueType::Classic,
        }
    }

    /// Sets the queue type.
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets the broker name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets durability.
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Sets `max_length`.
    pub fn with_max_length(mut self, max_length: u64) -> Self {
        self.max_length = Some(max_length);
        self
    }

    /// Sets `max_priority`.
    pub fn with_max_priority(mut self, max_priority: u8) -> Self {
        self.max_priority = Some(max_priority);
        self
    }

    /// Sets `message_ttl`.
    pub fn with_message_ttl(mut self, ttl: Duration) -> Self {
        self.message_ttl = Some(ttl);
        self
    }

    /// Refuses options no driver declares as written (a quorum queue that is not
    /// durable, `max_priority: 0`, `max_length: 0`, a `message_ttl` a broker cannot
    /// carry) and options the driver's capabilities do not cover,
    /// naming the driver; the error's `field` detail names the option.
    pub fn check_supported(&self, driver: &str, caps: &Capabilities) -> Result<()> {
        let refuse = |field: &str, why: String| -> Result<()> {
            Err(Error::invalid(format!("queue {}: {why}", self.id)).with_detail("field", field))
        };
        if self.queue_type == QueueType::Quorum && !self.durable {
            return refuse(
                "durable",
                "a quorum queue is always durable: drop durable: false or use queue_type classic"
                    .into(),
            );
        }
        if self.max_length == Some(0) {
            // Every publish would wait for room and fail.
            return refuse(
                "max_length",
                "max_length must be at least 1 (leave it out for no limit)".into(),
            );
        }
        // Brokers take whole milliseconds, in 32 bits: under one, every message would
        // expire as it arrived, dropped unseen even with a consumer waiting.
        if self.message_ttl.is_some_and(|ttl| {
            ttl < std::time::Duration::from_millis(1)
                || ttl.as_millis() > u128::from(crate::MAX_MILLIS)
        }) {
            return refuse(
                "message_ttl",
                "message_ttl must be 1ms to 4294967295ms (about 49 days; leave it out for no expiry)".into(),
            );
        }
        if self.max_priority == Some(0) {
            return refuse(
                "max_priority",
                "max_priority must be at least 1 (leave it out for a queue without priorities)"
                    .into(),
            );
        }
        if self.queue_type == QueueType::Quorum {
            if !caps.quorum_queues {
                return refuse(
                    "queue_type",
                    format!("the {driver} driver does not declare quorum queues"),
                );
            }
            if self.max_priority.is_some() {
                return refuse(
                    "max_priority",
                    "a quorum queue has no message priorities (RabbitMQ 3.x): drop max_priority or use queue_type classic".into(),
                );
            }
        }
        if let Some(p) = self.max_priority
            && caps.priority
            && p > caps.max_priority
        {
            return refuse(
                "max_priority",
                format!(
                    "max_priority {p} is more than the {driver} driver allows ({})",
                    caps.max_priority
                ),
            );
        }
        let unsupported = [
            (
                self.max_priority.is_some() && !caps.priority,
                "max_priority",
            ),
            (self.max_length.is_some() && !caps.max_length, "max_length"),
            (
                self.message_ttl.is_some() && !caps.message_ttl,
                "message_ttl",
            ),
        ];
        match unsupported.iter().find(|(bad, _)| *bad) {
            Some((_, option)) => refuse(
                option,
                format!("the {driver} driver does not support {option}"),
            ),
            None => Ok(()),
        }
    }
}

/// How to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// At most this many unsettled deliveries at once (at least 1).
    pub prefetch: u32,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions { prefetch: 10 }
    }
}

/// Queue counts; `None` where the driver cannot tell (see [`Capabilities`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueInfo {
    /// Messages waiting to be delivered.
    pub ready: Option<u64>,
    /// Delivered, not yet settled.
    pub in_flight: Option<u64>,
    /// Published with a delay that has not passed yet.
    pub delayed: Option<u64>,
    /// Attached consumers.
    pub consumers: Option<u64>,
}

impl QueueInfo {
    /// Ready + in flight + delayed, counting what is known (a lower bound when one of
    /// them is unknown); `None` when none of them is (RabbitMQ 3.x tells an AMQP 1.0
    /// client no counts), not a count of 0.
    ///
    /// ```
    /// use queue_core::QueueInfo;
    ///
    /// let counted = QueueInfo { ready: Some(2), delayed: Some(1), ..QueueInfo::default() };
    /// assert_eq!(counted.message_count(), Some(3));
    /// assert_eq!(QueueInfo::default().message_count(), None);
    /// ```
    pub fn message_count(&self) -> Option<u64> {
        let counts = [self.ready, self.in_flight, self.delayed];
        counts
            .iter()
            .any(Option::is_some)
            .then(|| counts.iter().flatten().sum())
    }
}

/// Settles one delivery with its backend. Used once: the methods take it by value.
/// A caller may drop the future of `ack` or `release` before it ends: one that awaits
/// the broker runs its settlement as a task of its own, so that it ends all the same
/// (docs/drivers/writing.md).
#[async_trait]
pub trait Acker: Send + 'static {
    /// Done with it: remove it from the queue.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Put it back unchanged (not a failure: no attempt is counted).
    async fn release(self: Box<Self>) -> Result<()>;
    /// Put it back without waiting; called when an unsettled delivery is dropped.
    fn release_on_drop(self: Box<Self>);
    /// Whether the broker has taken the delivery back already (the link or connection
    /// it came on is gone), so that it will deliver it again whatever is done with
    /// this one. A driver that cannot tell says `false`.
    fn is_lost(&self) -> bool {
        false
    }
}

/// A message handed to a consumer, settled exactly once: [`Delivery::ack`] or
/// [`Delivery::release`]; dropping it unsettled releases it. A second settlement is
/// `INVALID` ("already settled"), never a double settle.
pub struct Delivery {
    /// Shared, so that a handler can read it without a copy of its body and headers.
    message: Arc<Message>,
    acker: Mutex<Option<Box<dyn Acker>>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("settled", &self.is_settled())
            .finish()
    }
}

impl Delivery {
    /// Wraps a message and its acker.
    pub fn new(message: Message, acker: Box<dyn Acker>) -> Self {
        Delivery::shared(Arc::new(message), acker)
    }

    /// Wraps a message the driver keeps a handle on too (to put it back on a
    /// release), without copying it.
    pub fn shared(message: Arc<Message>, acker: Box<dyn Acker>) -> Self {
        Delivery {
            message,
            acker: Mutex::new(Some(acker)),
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message, shared: for code that keeps it beyond a borrow of the delivery
    /// (a handler's context) without copying it.
    pub fn shared_message(&self) -> Arc<Message> {
        Arc::clone(&self.message)
    }

    /// Whether it was acked or released already.
    pub fn is_settled(&self) -> bool {
        self.lock().is_none()
    }

    /// Whether the broker has taken it back unsettled (its connection or link was
    /// lost): it will be delivered again, so a retry copy of it would be a duplicate.
    pub fn is_lost(&self) -> bool {
        self.lock().as_ref().is_some_and(|acker| acker.is_lost())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Acker>>> {
        // A panic while holding this lock cannot leave the Option half-written.
        self.acker
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn take(&self) -> Result<Box<dyn Acker>> {
        self.lock().take().ok_or_else(|| {
            Error::invalid(format!("message {} is already settled", self.message.id))
        })
    }

    /// Acknowledges: the message leaves the queue.
    pub async fn ack(&self) -> Result<()> {
        self.take()?.ack().await
    }

    /// Returns the message to its queue unchanged.
    pub async fn release(&self) -> Result<()> {
        self.take()?.release().await
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(acker) = self.lock().take() {
            acker.release_on_drop();
        }
    }
}

/// A stream of deliveries from one queue.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; waits while `prefetch` deliveries are unsettled. `None` once
    /// the subscription or its driver is closed.
    async fn next(&mut self) -> Option<Result<Delivery>>;
    /// Stops delivery and returns every delivery of this subscription that is not
    /// settled yet to the queue; settling one of them afterwards is an error.
    async fn cancel(self: Box<Self>) -> Result<()>;
}

/// A queue backend. Object-safe: the runtime holds `Arc<dyn Driver>`.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// A short name for messages (`memory`, `amqp`, `amqp10`).
    fn name(&self) -> &str;
    /// What the driver can do.
    fn capabilities(&self) -> Capabilities;
    /// Declares a queue; declaring the same queue twice is fine.
    async fn declare(&self, spec: &QueueSpec) -> Result<()>;
    /// Publishes one message; `Ok` only once the backend has it. A queue that was
    /// never declared is `NOT_FOUND`.
    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()>;
    /// Publishes several messages, pipelined; `Ok` only once all are confirmed. An
    /// error after some were confirmed says how many ([`Error::in_batch`]).
    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let total = messages.len();
        let sends = messages.into_iter().map(|m| self.publish(queue, m));
        let outcomes = futures_util::future::join_all(sends).await;
        let confirmed = outcomes.iter().filter(|o| o.is_ok()).count();
        match outcomes.into_iter().find_map(Result::err) {
            Some(e) => Err(e.in_batch(confirmed, total)),
            None => Ok(()),
        }
    }
    /// Starts consuming a declared queue.
    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>>;
    /// Counts of a declared queue.
    async fn info(&self, queue: &QueueId) -> Result<QueueInfo>;
    /// Messages of this queue this driver instance saw acknowledged, where it counts
    /// them (the memory driver does; brokers keep no such count). The runtime's exit
    /// summary reports it next to `info`.
    fn acked_total(&self, _queue: &QueueId) -> Option<u64> {
        None
    }
    /// How its connection has fared; `None` for drivers without one (memory).
    fn connection(&self) -> Option<ConnectionReport> {
        None
    }
    /// Closes connections; unsettled deliveries go back to their queues.
    async fn close(&self) -> Result<()>;
}

/// Refuses a `delay` header where the driver has no `delay` capability, and ignores a
/// priority where it has no `priority` ([`crate::Checked`] applies it; a driver may
/// too, for its users who call it without that layer).
///
/// ```
/// use queue_core::{Capabilities, HeaderValue, Message, refuse_unsupported_headers};
/// let mut message = Message::from_bytes(b"x".to_vec(), Default::default(), "text/plain");
/// message.headers.insert("delay", HeaderValue::Int(1000));
/// let caps = Capabilities { delay: false, ..queue_core::memory::CAPABILITIES };
/// assert!(refuse_unsupported_headers("redis", &caps, &message).is_err());
/// ```
pub fn refuse_unsupported_headers(
    driver: &str,
    caps: &Capabilities,
    message: &Message,
) -> Result<()> {
    if !caps.delay && message.headers.delay()?.is_some() {
        return Err(Error::invalid(format!(
            "the {driver} driver cannot delay messages: remove the \"delay\" header or use a driver with the delay capability"
        )));
    }
    if !caps.priority && message.headers.priority_level()?.is_some_and(|p| p > 0) {
        tracing::debug!(driver, "priority header ignored: driver has no priorities");
    }
    Ok(())
}
