//! The queue-core conformance suite against RabbitMQ on 127.0.0.1:5672.

mod common;

use std::sync::Arc;

use queue_core::testkit::TestContext;

async fn rabbit() -> Option<TestContext> {
    let driver = common::rabbit().await?;
    Some(TestContext::new(Arc::new(driver)))
}

queue_core::conformance_suite!(rabbit);
