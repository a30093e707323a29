//! The conformance suite against the memory driver.

use std::sync::Arc;

use queue_core::Driver;
use queue_core::memory::MemoryDriver;
use queue_testkit::{Backend, TestContext};

fn main() {
    let memory = Backend::new("memory", MemoryDriver::new().capabilities(), || async {
        Ok(TestContext::new(Arc::new(MemoryDriver::new())))
    });
    queue_testkit::run(queue_testkit::conformance::trials(&[memory]));
}
