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
mod checked;
mod codec;
pub mod config;
mod deadline;
mod driver;
mod error;
mod factory;
mod id;
mod log_line;
pub mod memory;
mod message;
mod on_runtime;
mod queues;
mod reading;
pub mod retry;
pub mod security;
mod tape;
mod throttle;
mod value;

pub use backoff::Backoff;
pub use checked::Checked;
pub use codec::{Codec, MAX_DEPTH};
pub use deadline::deadline_after;
pub use driver::{
    Acker, Capabilities, ConnectionReport, ConsumeOptions, Delivery, Driver, QueueInfo, QueueSpec,
    QueueType, Subscription, refuse_unsupported_headers,
};
pub use error::{Error, ErrorKind, Result, credentials_cut_short, redact_url};
pub use factory::{DriverConfig, DriverFactory, Factory};
pub use id::QueueId;
pub use log_line::{OneLine, escaped_in_a_log_line};
pub use message::{
    HEADER_ENTRY_BYTES, HeaderValue, Headers, MAX_HEADER_BYTES, MAX_MILLIS, MAX_NAME_BYTES,
    MAX_PUBLISHED_HEADER_BYTES, MAX_PUBLISHED_HEADERS, Message, RUNTIME_HEADER_ROOM, names,
    new_message_id, parse_priority, truncate, truncate_bytes,
};
pub use on_runtime::on_runtime;
pub use queues::{
    DEFAULT_MAX_MESSAGE_BYTES, PublishRequest, PublishSettings, Queues, RegisteredQueue, unix_now,
};
pub use tape::{Item, Span, Tape};
pub use throttle::Throttle;
pub use value::Value;
