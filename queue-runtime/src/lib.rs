//! # queue-runtime
//!
//! The consumer host: reads YAML configuration, creates drivers, declares queues (and
//! their dead-letter queues), runs Lua handlers for consumers on a small pool of Lua
//! states, retries failures with backoff, dead-letters what keeps failing, and shuts
//! down without losing a message. The `queue-runtime` binary is its command line.
//!
//! ```no_run
//! use queue_runtime::{config, host::{Host, HostOptions}, registry::{self, DriverKinds}};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = config::load(&["examples/quickstart/app.yaml".into()])?;
//! let kinds = DriverKinds::builtin();
//! let plan = registry::plan(&config, &kinds, false)?;
//! let host = Host::start(plan, &kinds, HostOptions::default()).await?;
//! host.wait_idle().await?;
//! for queue in host.shutdown().await {
//!     println!("{queue}");
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod by_id;
pub mod config;
pub mod health;
pub mod host;
pub mod metrics;
pub mod registry;
pub mod telemetry;
pub mod tools;
pub mod workers;
