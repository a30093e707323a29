//! # queue-core
//!
//! The shared model of the queue workspace: queue ids, message bodies and headers,
//! errors, security policies, codecs, the [`Driver`] trait every backend implements,
//! the publishing facade [`Queues`], and the embedded [`memory`] driver.
//!
//! Drivers (`queue-amqp091`, `queue-amqp10`) depend on this crate and nothing else of
//! the workspace; the Lua module and the runtime publish through [`Queues`], so the
//! permission and input checks live in one place.
//!
//! ```
//! use std::sync::Arc;
//! use queue_core::{Driver, Headers, PublishSettings, QueueId, QueueSpec, Queues, Value};
//! use queue_core::memory::MemoryDriver;
//! use queue_core::security::SecurityContext;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let driver = Arc::new(MemoryDriver::new());
//! let queues = Queues::new();
//! let tasks = QueueId::parse("app:tasks").unwrap();
//! queues.declare(QueueSpec::new(tasks.clone()), PublishSettings::default(), driver.clone()).await.unwrap();
//!
//! let body = Value::map([("action", Value::from("send_email")), ("user_id", Value::Int(456))]);
//! queues.publish(&SecurityContext::default(), "app:tasks", body.clone(), Headers::new()).await.unwrap();
//!
//! let mut consumer = driver.consume(&tasks, Default::default()).await.unwrap();
//! let delivery = consumer.next().await.unwrap().unwrap();
//! assert_eq!(delivery.message().decode().unwrap(), body);
//! delivery.ack().await.unwrap();
//! # });
//! ```
#![warn(missing_docs)]

mod backoff;
mod codec;
pub mod config;
mod driver;
mod error;
mod id;
pub mod memory;
mod message;
mod queues;
pub mod retry;
pub mod security;
mod value;

pub use backoff::Backoff;
pub use codec::{Codec, MAX_DEPTH};
pub use driver::{
    Acker, Capabilities, ConnectionReport, ConsumeOptions, Delivery, Driver, QueueInfo, QueueSpec,
    Subscription, refuse_unsupported_headers,
};
pub use error::{Error, ErrorKind, Result, redact_url};
pub use id::QueueId;
pub use message::{
    HeaderValue, Headers, MAX_HEADER_BYTES, MAX_NAME_BYTES, Message, names, new_message_id,
    parse_priority, truncate,
};
pub use queues::{
    DEFAULT_MAX_MESSAGE_BYTES, PublishRequest, PublishSettings, Queues, RegisteredQueue, unix_now,
};
pub use value::Value;

/// A driver factory: builds a driver from the YAML entry of its kind. The runtime
/// keeps one per `queue.driver.<name>` kind; adding a driver is one new crate that
/// exports a factory, and one line registering it.
#[async_trait::async_trait]
pub trait DriverFactory: Send + Sync {
    /// The entry kind this factory serves, e.g. `queue.driver.amqp`.
    fn kind(&self) -> &'static str;
    /// Checks the entry's fields without connecting (used by `check`), and tells
    /// what a driver built from them will be able to do, so that `check` refuses
    /// queues that need more.
    fn validate(&self, config: &serde_json::Value) -> Result<Capabilities>;
    /// Builds (and connects) the driver.
    async fn create(&self, config: serde_json::Value) -> Result<std::sync::Arc<dyn Driver>>;
}

/// The factory of the embedded memory driver (`queue.driver.memory`).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryDriverFactory;

#[async_trait::async_trait]
impl DriverFactory for MemoryDriverFactory {
    fn kind(&self) -> &'static str {
        "queue.driver.memory"
    }

    fn validate(&self, config: &serde_json::Value) -> Result<Capabilities> {
        config::from_value::<memory::MemoryConfig>(self.kind(), config.clone())
            .map(|_| memory::CAPABILITIES)
    }

    async fn create(&self, config: serde_json::Value) -> Result<std::sync::Arc<dyn Driver>> {
        let config: memory::MemoryConfig = config::from_value(self.kind(), config)?;
        Ok(std::sync::Arc::new(memory::MemoryDriver::with_config(
            config,
        )))
    }
}
