//! # queue-redis
//!
//! An experimental driver of the queue workspace on Redis Streams, through the
//! [redis] crate (tokio, a reconnecting connection manager).
//!
//! - A queue is one stream, `queue:{<broker name>}`, with one consumer group
//!   (`queue`); its `max_length`, if any, lives in the hash `queue:{<name>}:meta`.
//! - Publishing is `XADD`; Redis' reply (the entry id) is the confirmation.
//! - Each subscription is a consumer of the group reading with `XREADGROUP`, never
//!   holding more than `prefetch` unsettled entries. Ack is `XACK` + `XDEL`; a
//!   release moves the entry to the back of the stream (same fields, so the same id
//!   and headers). See `consume` for cancel, reconnects and dead consumers.
//! - [`RedisDriver`] implements [`queue_core::Driver`]; `queue_core::Factory::<RedisConfig>` builds
//!   it from a `queue.driver.redis` YAML entry ([`RedisConfig`]).
//!
//! ```no_run
//! use queue_redis::{RedisConfig, RedisDriver};
//! use queue_core::{Codec, Driver, Headers, Message, QueueId, QueueSpec, Value};
//!
//! # async fn demo() -> queue_core::Result<()> {
//! let driver = RedisDriver::connect(RedisConfig::new("redis://127.0.0.1:6379/0")).await?;
//! let tasks = QueueId::parse("app:tasks")?;
//! driver.declare(&QueueSpec::new(tasks.clone())).await?;
//! let message = Message::encode(&Value::from("hello"), Headers::new(), Codec::Json)?;
//! driver.publish(&tasks, message).await?; // returns once Redis replied to XADD
//!
//! let mut consumer = driver.consume(&tasks, Default::default()).await?;
//! if let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("{:?}", delivery.message().decode()?);
//!     delivery.ack().await?;
//! }
//! consumer.cancel().await?;
//! driver.close().await
//! # }
//! ```
//!
//! [redis]: https://docs.rs/redis
#![warn(missing_docs)]

mod config;
mod connection;
mod consume;
mod error;
mod mapping;
mod publish;
mod scripts;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use async_trait::async_trait;
use queue_core::{
    Capabilities, ConnectionReport, ConsumeOptions, Driver, DriverConfig, Error, Message, QueueId,
    QueueInfo, QueueSpec, Result, Subscription,
};

pub use config::{KIND, RedisConfig};

use connection::Link;
use consume::RedisSubscription;

/// The driver's short name, used in messages (`the redis driver cannot ...`).
pub const NAME: &str = "redis";

/// The consumer group every queue's stream has.
pub(crate) const GROUP: &str = "queue";

/// What the Redis driver can do. `persistent` holds when the server runs with
/// `appendonly yes` and `appendfsync always` (the driver warns at connect when it
/// does not); priorities, delays and TTLs are not implemented.
pub const CAPABILITIES: Capabilities = Capabilities {
    confirms: true,
    priority: false,
    max_priority: 0,
    delay: false,
    max_length: true,
    message_ttl: false,
    persistent: true,
    info_ready: true,
    info_in_flight: true,
    info_consumers: true,
    quorum_queues: false,
    max_queue_name_bytes: None,
    reserved_queue_name_prefixes: &[],
    reserved_headers: &[],
    max_unsettled: None,
};

/// The Redis keys of one queue. The `{name}` hash tag keeps them in one cluster
/// slot, which the scripts that touch several of them need.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub stream: String,
    pub meta: String,
    /// Followed by a consumer's name: the key whose expiry says the consumer died.
    pub lease_prefix: String,
}

impl Keys {
    fn of(name: &str) -> Keys {
        let tag = format!("queue:{{{name}}}");
        Keys {
            meta: format!("{tag}:meta"),
            lease_prefix: format!("{tag}:lease:"),
            stream: tag,
        }
    }
}

impl Keys {
    /// Creates the queue's stream, group and meta hash where they are missing, and
    /// returns the `max_length` Redis keeps for it (`wanted` is adopted when it keeps
    /// none; another is `ALREADY_EXISTS`).
    pub(crate) async fn declare(
        &self,
        link: &Link,
        wanted: Option<u64>,
        what: &str,
    ) -> Result<Option<u64>> {
        let wanted = wanted.map(|m| m.to_string()).unwrap_or_default();
        let (stream, meta, wanted) = (&self.stream, &self.meta, &wanted);
        let stored: String = link
            .run_idempotent(what, |mut c| async move {
                let mut invocation = scripts::DECLARE.key(stream);
                invocation.key(meta).arg(GROUP).arg(wanted);
                invocation.invoke_async(&mut c).await
            })
            .await?;
        match stored.as_str() {
            "" => Ok(None),
            n => n.parse::<u64>().map(Some).map_err(|_| {
                Error::internal(format!(
                    "{what}: Redis holds max_length {n:?} for it, which is not a number"
                ))
            }),
        }
    }
}

/// A declared queue.
pub(crate) struct Declared {
    pub spec: QueueSpec,
    pub keys: Keys,
    /// The limit Redis keeps for the queue (which a declare without one adopts).
    pub max_length: Option<u64>,
}

/// The Redis Streams driver: one shared connection for commands, one more per
/// subscription for its blocking reads.
pub struct RedisDriver {
    config: RedisConfig,
    link: Arc<Link>,
    queues: RwLock<HashMap<QueueId, Arc<Declared>>>,
    subscriptions: Mutex<Vec<Weak<consume::Shared>>>,
}

impl std::fmt::Debug for RedisDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDriver")
            .field("config", &self.config)
            .finish()
    }
}

impl RedisDriver {
    /// Connects (failing fast when Redis is unreachable or refuses the login).
    /// Errors show the URL without its password.
    pub async fn connect(config: RedisConfig) -> Result<RedisDriver> {
        let link = Link::connect(&config).await?;
        Ok(RedisDriver {
            config,
            link,
            queues: RwLock::new(HashMap::new()),
            subscriptions: Mutex::new(Vec::new()),
        })
    }

    /// Declares again a queue whose stream Redis lost behind the driver's back (a
    /// `FLUSHALL`, a restart without persistence, a `DEL`): what it held is gone, but
    /// the queue works again, as a broker's queues are declared again after it
    /// restarted (docs/drivers/redis.md, "When Redis loses a queue").
    async fn declare_again(&self, declared: &Declared) -> Result<()> {
        let what = format!("declare {} again", declared.spec.id);
        declared
            .keys
            .declare(&self.link, declared.max_length, &what)
            .await?;
        tracing::warn!(queue = %declared.spec.id, "redis: the queue's stream was gone (FLUSHALL, a restart without persistence, or DEL): declared it again; what it held is lost");
        Ok(())
    }

    /// Declares `declared` again ([`Self::declare_again`]) and runs `again`, the
    /// publish that found its stream gone, within what is left of the
    /// `publish_timeout` that began at `started`: a publish never waits past it.
    async fn declared_again_within(
        &self,
        declared: &Declared,
        started: tokio::time::Instant,
        again: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let limit = self.config.publish_timeout;
        let retried = async {
            self.declare_again(declared).await?;
            again.await
        };
        match tokio::time::timeout_at(started + limit, retried).await {
            Ok(result) => result,
            Err(_) => Err(Error::internal(format!(
                "publish to {}: its stream was gone, and declaring it again and publishing once more went past publish_timeout {limit:?}; the message may have been added, so a retry may deliver it twice",
                declared.spec.id
            ))),
        }
    }

    fn declared(&self, queue: &QueueId) -> Result<Arc<Declared>> {
        if self.link.is_closed() {
            return Err(error::closed(format!("queue {queue}")));
        }
        let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
        queues.get(queue).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "queue {queue} is not declared on the {NAME} driver"
            ))
        })
    }
}

#[async_trait]
impl Driver for RedisDriver {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        let keys = Keys::of(&spec.name);
        let what = format!("declare {}", spec.id);
        let max_length = keys.declare(&self.link, spec.max_length, &what).await?;
        let declared = Arc::new(Declared {
            spec: spec.clone(),
            keys,
            max_length,
        });
        self.queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id.clone(), declared);
        Ok(())
    }

    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        let declared = self.declared(queue)?;
        // A `delay` is refused here too: used without `queue_core::Checked` in front,
        // the driver delivered such a message at once (review).
        queue_core::refuse_unsupported_headers(NAME, &CAPABILITIES, &message)?;
        let started = tokio::time::Instant::now();
        match publish::publish(&self.link, &declared, &message).await {
            Err(err) if publish::is_stream_gone(&err) => {
                let again = publish::publish(&self.link, &declared, &message);
                self.declared_again_within(&declared, started, again).await
            }
            published => published,
        }
    }

    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let declared = self.declared(queue)?;
        for message in &messages {
            queue_core::refuse_unsupported_headers(NAME, &CAPABILITIES, message)
                .map_err(|e| e.in_batch(0, messages.len()))?;
        }
        let started = tokio::time::Instant::now();
        match publish::publish_batch(&self.link, &declared, &messages).await {
            // Again only when none was added: the others would be added twice.
            Err(err)
                if publish::is_stream_gone(&err)
                    && err.details().get("confirmed").is_none_or(|c| c == "0") =>
            {
                let again = publish::publish_batch(&self.link, &declared, &messages);
                self.declared_again_within(&declared, started, again)
                    .await
                    .map_err(|e| e.in_batch(0, messages.len()))
            }
            published => published,
        }
    }

    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let declared = self.declared(queue)?;
        let subscription = RedisSubscription::start(
            Arc::clone(&self.link),
            queue.to_string(),
            declared.keys.clone(),
            declared.max_length,
            options.prefetch.max(1),
        )
        .await?;
        let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        subscriptions.retain(|s| s.strong_count() > 0);
        subscriptions.push(Arc::downgrade(subscription.shared()));
        Ok(Box::new(subscription))
    }

    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        let declared = self.declared(queue)?;
        let (stream, prefix) = (&declared.keys.stream, &declared.keys.lease_prefix);
        let (length, pending, consumers): (u64, u64, u64) = self
            .link
            .run_idempotent(&format!("info of {queue}"), |mut c| async move {
                let mut invocation = scripts::INFO.key(stream);
                invocation.arg(GROUP).arg(prefix);
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(QueueInfo {
            // Every entry is undelivered or pending (see the scripts module).
            ready: Some(length.saturating_sub(pending)),
            in_flight: Some(pending),
            delayed: None,
            consumers: Some(consumers),
        })
    }

    fn connection(&self) -> Option<ConnectionReport> {
        Some(ConnectionReport {
            connected: self.link.is_connected(),
            connections_opened: self.link.connections_opened(),
            links_attached: self.link.links_attached(),
            node: self.link.node().to_string(),
        })
    }

    async fn close(&self) -> Result<()> {
        let subscriptions: Vec<Arc<consume::Shared>> = self
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .filter_map(|s| s.upgrade())
            .collect();
        // Side by side: each is bounded, and together they take no longer than one.
        let shutdowns = subscriptions.iter().map(|s| s.shutdown());
        let first_error = futures_util::future::join_all(shutdowns)
            .await
            .into_iter()
            .find_map(Result::err);
        self.link.close();
        first_error.map_or(Ok(()), Err)
    }
}

/// `queue.driver.redis` entries build [`RedisDriver`]s: register
/// `queue_core::Factory::<RedisConfig>::new()`.
///
/// ```
/// use queue_core::{DriverFactory, Factory};
/// let factory = Factory::<queue_redis::RedisConfig>::new();
/// assert_eq!(factory.kind(), "queue.driver.redis");
/// let caps = factory.validate(&serde_json::json!({"url": "redis://127.0.0.1:6379/0"})).unwrap();
/// assert!(caps.max_length && !caps.delay);
/// assert!(factory.validate(&serde_json::json!({"url": "redis://h", "prefetch": 5})).is_err());
/// ```
#[async_trait]
impl DriverConfig for RedisConfig {
    const KIND: &'static str = KIND;

    fn validate(&self) -> Result<Capabilities> {
        RedisConfig::validate(self).map(|()| CAPABILITIES)
    }

    async fn connect(self) -> Result<Arc<dyn Driver>> {
        Ok(Arc::new(RedisDriver::connect(self).await?))
    }
}
