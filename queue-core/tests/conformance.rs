//! The conformance suite against the memory driver.

use std::sync::Arc;

use queue_core::memory::MemoryDriver;
use queue_core::testkit::TestContext;

async fn memory() -> Option<TestContext> {
    Some(TestContext::new(Arc::new(MemoryDriver::new())))
}

queue_core::conformance_suite!(memory);
