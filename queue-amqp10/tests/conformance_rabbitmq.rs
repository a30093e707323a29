//! The driver conformance suite against RabbitMQ 3.x's AMQP 1.0 plugin on
//! 127.0.0.1:5672, with the `rabbitmq-v1` profile.

mod support;

use std::sync::Arc;

use queue_amqp10::Profile;
use queue_core::testkit::TestContext;

async fn rabbit() -> Option<TestContext> {
    let driver = support::rabbit_driver(Profile::RabbitmqV1).await?;
    Some(TestContext::new(Arc::new(driver)))
}

queue_core::conformance_suite!(rabbit);
