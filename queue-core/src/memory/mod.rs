//! The embedded in-memory driver: the default when a configuration declares none.
//!
//! FIFO per priority level, competing consumers, `max_length` with a bounded publish
//! wait, delays on timers, and unsettled deliveries that always find their way back to
//! the front of their queue. Messages live in this process only: they are gone when it
//! exits (see `docs/drivers/memory.md`).

mod queue;
mod subscription;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Capabilities, ConsumeOptions, Driver, Error, Message, QueueId, QueueInfo, QueueSpec, Result,
    Subscription,
};
use queue::MemQueue;

/// Settings of the memory driver.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// How long a publish to a full queue waits for room before failing (5s).
    #[serde(with = "crate::config::duration")]
    pub publish_timeout: Duration,
    /// `max_length` of queues that do not set one (10,000).
    pub default_max_length: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            publish_timeout: Duration::from_secs(5),
            default_max_length: 10_000,
        }
    }
}

/// The entry kind of the memory driver.
pub const KIND: &str = "queue.driver.memory";

#[async_trait::async_trait]
impl crate::DriverConfig for MemoryConfig {
    const KIND: &'static str = KIND;

    /// `default_max_length: 0` would refuse every publish to a queue without its own
    /// `max_length` (a queue's own 0 is refused too), and `publish_timeout: 0s` every
    /// publish to a full queue at once.
    ///
    /// ```
    /// use queue_core::{DriverFactory, Factory};
    /// use queue_core::memory::MemoryConfig;
    /// let factory = Factory::<MemoryConfig>::new();
    /// let refused = factory.validate(&serde_json::json!({"default_max_length": 0})).unwrap_err();
    /// assert_eq!(refused.details().get("field").map(String::as_str), Some("default_max_length"));
    /// assert!(factory.validate(&serde_json::json!({"publish_timeout": "0s"})).is_err());
    /// ```
    fn validate(&self) -> Result<Capabilities> {
        if self.default_max_length == 0 {
            return Err(crate::config::field_error(
                KIND,
                "default_max_length",
                "must be at least 1",
            ));
        }
        if self.publish_timeout.is_zero() {
            return Err(crate::config::field_error(
                KIND,
                "publish_timeout",
                "must be longer than 0s",
            ));
        }
        Ok(CAPABILITIES)
    }

    async fn connect(self) -> Result<std::sync::Arc<dyn Driver>> {
        Ok(std::sync::Arc::new(MemoryDriver::with_config(self)))
    }
}

/// The in-memory driver. Cheap to clone; clones share the queues.
///
/// ```
/// use queue_core::{Codec, Driver, Headers, Message, QueueId, QueueSpec, Value};
/// use queue_core::memory::MemoryDriver;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let driver = MemoryDriver::new();
/// let id = QueueId::parse("app:tasks").unwrap();
/// driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
/// let msg = Message::encode(&Value::from("hello"), Headers::new(), Codec::Json).unwrap();
/// driver.publish(&id, msg).await.unwrap();
/// let mut sub = driver.consume(&id, Default::default()).await.unwrap();
/// let delivery = sub.next().await.unwrap().unwrap();
/// assert_eq!(delivery.message().decode().unwrap(), Value::from("hello"));
/// delivery.ack().await.unwrap();
/// # });
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryDriver {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    config: MemoryConfig,
    queues: RwLock<HashMap<QueueId, Arc<MemQueue>>>,
    closed: AtomicBool,
}

/// What the memory driver can do.
pub const CAPABILITIES: Capabilities = Capabilities {
    confirms: true,
    priority: true,
    max_priority: 9,
    delay: true,
    max_length: true,
    message_ttl: true,
    persistent: false,
    info_ready: true,
    info_in_flight: true,
    info_consumers: true,
    quorum_queues: false,
    max_queue_name_bytes: None,
    reserved_queue_name_prefixes: &[],
    reserved_headers: &[],
    max_unsettled: None,
};

impl MemoryDriver {
    /// A driver with default settings.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A driver with these settings.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryDriver {
            shared: Arc::new(Shared {
                config,
                queues: RwLock::default(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// `CANCELED` once the driver is closed: every call refuses then.
    fn refuse_if_closed(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                crate::ErrorKind::Canceled,
                "the memory driver is closed",
            ));
        }
        Ok(())
    }

    fn queue(&self, id: &QueueId) -> Result<Arc<MemQueue>> {
        self.refuse_if_closed()?;
        self.shared
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!("queue {id} is not declared on the memory driver"))
            })
    }
}

#[async_trait]
impl Driver for MemoryDriver {
    fn name(&self) -> &str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        let mut queues = self
            .shared
            .queues
            .write()
            .unwrap_or_else(|p| p.into_inner());
        // As every other call: a queue declared now could never be reached (review).
        self.refuse_if_closed()?;
        if let Some(existing) = queues.get(&spec.id) {
            return existing.check_same(spec);
        }
        let max_length = spec
            .max_length
            .unwrap_or(self.shared.config.default_max_length);
        queues.insert(
            spec.id.clone(),
            Arc::new(MemQueue::new(spec.clone(), max_length)),
        );
        Ok(())
    }

    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        let q = self.queue(queue)?;
        q.publish(message, self.shared.config.publish_timeout).await
    }

    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let q = self.queue(queue)?;
        q.publish_batch(messages, self.shared.config.publish_timeout)
            .await
    }

    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let q = self.queue(queue)?;
        Ok(Box::new(subscription::MemSubscription::attach(
            q,
            options.prefetch,
        )))
    }

    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        Ok(self.queue(queue)?.info())
    }

    fn acked_total(&self, queue: &QueueId) -> Option<u64> {
        let queues = self.shared.queues.read().unwrap_or_else(|p| p.into_inner());
        queues.get(queue).map(|q| q.acked())
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        for q in self
            .shared
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            q.close();
        }
        Ok(())
    }
}
