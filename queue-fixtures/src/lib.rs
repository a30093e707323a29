//! # queue-fixtures
//!
//! The brokers the workspace's tests, benches, `cargo xtask` and `.ci/start-brokers`
//! use, in one place: each knows how to find or install its broker, start it on
//! 127.0.0.1 (on its own ports and data directory when a test strikes it), tell
//! whether it can run here and why not, and stop it.
//!
//! - [`rabbitmq`]: the machine's shared node on 5672, and private nodes (with TLS
//!   listeners) that fault tests cut, stop and kill;
//! - [`certs`]: a private CA and certificates (openssl), and a TLS endpoint no trust
//!   store accepts;
//! - [`artemis`]: ActiveMQ Artemis from Maven Central, a shared instance on 6672 and
//!   private ones that fault tests cut, stop and kill;
//! - [`process`]: commands run to their end within a limit, killed with what they
//!   started past it;
//! - [`proton`]: a small AMQP 1.0 broker on Qpid Proton, a protocol-level smoke test;
//! - [`proxy`]: a proxy in front of a broker that withholds what the broker says (all
//!   of it, or AMQP 1.0's `end` or `close`): a broker that never answers;
//! - [`raw_amqp10`]: a raw fe2o3-amqp connection set up as the AMQP 1.0 driver sets
//!   up its own, for the benches' baselines;
//! - [`redis`]: private `redis-server`s (AOF on) that the Redis driver's tests start,
//!   cut, stop and kill.
//!
//! Whether a missing broker fails or skips is one rule for all:
//! [`queue_testkit::in_ci`].

pub mod artemis;
pub mod certs;
mod net;
pub mod process;
pub mod proton;
pub mod proxy;
pub mod rabbitmq;
pub mod raw_amqp10;
pub mod redis;

pub use net::{free_port, port_open, wait_for_port};
pub use queue_testkit::in_ci;
