//! # queue-testkit
//!
//! What a driver crate dev-depends on to prove it keeps the [`queue_core::Driver`]
//! contract, on every broker it talks to:
//!
//! - [`conformance`]: the behaviour contracts, one function each, and the suite that
//!   runs each of them against each [`Backend`] as its own test, named
//!   `<backend>::<contract>`;
//! - [`faults`]: the fault contract (confirmed messages survive a cut connection, a
//!   broker stopped and started, a broker killed), run against anything that can
//!   inflict an [`Outage`], with evidence that the fault landed;
//! - [`finishes_within`], for a test whose regression would block or spin its
//!   thread (a Lua handler that is never stopped): it fails instead of hanging;
//! - [`thread_cpu`] and [`process_cpu`], for a test whose regression would spin a
//!   thread that should be idle;
//! - [`ControlledDriver`], a memory driver whose confirmations a test holds or
//!   refuses, and [`Tally`], end-to-end counts of numbered messages;
//! - [`bench`], for benches that measure setups in turns and hand their figures to
//!   `cargo xtask bench`.
//!
//! A driver's `tests/conformance.rs` (with `harness = false`) is a list of backends:
//!
//! ```no_run
//! use std::sync::Arc;
//! use queue_core::Driver;
//! use queue_core::memory::MemoryDriver;
//! use queue_testkit::{Backend, TestContext};
//!
//! fn main() {
//!     let memory = Backend::new("memory", MemoryDriver::new().capabilities(), || async {
//!         Ok(TestContext::new(Arc::new(MemoryDriver::new())))
//!     });
//!     queue_testkit::run(queue_testkit::conformance::trials(&[memory]));
//! }
//! ```
//!
//! A backend that cannot run here (its broker is not installed or not reachable) is
//! listed with its reason: outside CI its tests are *ignored*, with the reason shown,
//! and inside CI (`CI=true` or `CI=1`) they run and fail. A contract the backend's
//! capabilities rule out is ignored too, marked with the capability it lacks, so the
//! summary counts it instead of passing it.
#![warn(missing_docs)]

mod backend;
pub mod bench;
mod bounded;
pub mod conformance;
mod context;
mod controlled;
mod cpu;
pub mod faults;
mod tally;

pub use backend::{Backend, broker_test, in_ci, run};
pub use bounded::{async_finishes_within, finishes_within};
pub use context::{
    PATIENCE, TestContext, everything_said, message, next, number_of, numbered, within,
};
pub use controlled::{ControlledDriver, ControlledFactory};
pub use cpu::{process_cpu, thread_cpu};
pub use faults::{Fault, Outage};
pub use libtest_mimic::Trial;
pub use tally::{FaultCounts, Tally};

#[doc(hidden)]
pub use tokio; // for `broker_tests!`
