//! # queue-lua
//!
//! The Lua `queue` module, with the `errors` and `logger` globals it uses, on mlua with
//! a vendored Lua 5.4:
//!
//! ```lua
//! local queue = require("queue")
//! local ok, err = queue.publish("app:tasks", { action = "send_email", user_id = 456 })
//! local msg, err = queue.message()          -- inside a consumer's handler
//! local info, err = queue.info("app:tasks") -- {message_count, ready, in_flight, consumer_count}
//! ```
//!
//! This crate knows no driver: it publishes through [`queue_core::Queues`], which does
//! every permission and input check. A [`LuaHost`] is one Lua state; the runtime keeps
//! one per thread and runs many handlers on it as coroutines. A handler waiting for a
//! publish confirmation yields its coroutine, not the thread.
//!
//! ```
//! use std::sync::Arc;
//! use queue_core::{PublishSettings, QueueId, QueueSpec, Queues};
//! use queue_core::memory::MemoryDriver;
//! use queue_core::security::SecurityContext;
//! use queue_lua::LuaHost;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let queues = Queues::new();
//! let id = QueueId::parse("app:tasks").unwrap();
//! queues.declare(QueueSpec::new(id), PublishSettings::default(), Arc::new(MemoryDriver::new())).await.unwrap();
//! let host = LuaHost::new(queues.clone(), SecurityContext::default()).unwrap();
//! host.eval(r#"assert(queue.publish("app:tasks", { action = "send_email" }))"#).await.unwrap();
//! assert_eq!(queues.info("app:tasks").await.unwrap().ready, Some(1));
//! # });
//! ```
#![warn(missing_docs)]

mod context;
mod errors;
pub mod examples;
mod host;
mod logger;
mod message;
mod module;
mod patterns;
mod preempt;
mod sandbox;
mod slices;
mod source;
pub mod value;

pub use context::{DeliveryContext, Settle};
pub use errors::LuaError;
pub use host::{Handler, Limits, LuaHost, Outcome, Payload, SourceCheck, check_source};
pub use sandbox::OptIn;
pub use source::LuaSource;
