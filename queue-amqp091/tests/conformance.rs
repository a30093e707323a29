//! The conformance suite against RabbitMQ (the machine's shared node on
//! 127.0.0.1:5672): `rabbitmq::<contract>`.

use std::sync::Arc;

use queue_amqp091::{Amqp091Config, Amqp091Driver, CAPABILITIES};
use queue_fixtures::rabbitmq::{SHARED_AMQP091_URL, shared_unavailable};
use queue_testkit::{Backend, TestContext};

fn main() {
    let rabbitmq = Backend::new("rabbitmq", CAPABILITIES, || async {
        let driver = Amqp091Driver::connect(Amqp091Config::new(SHARED_AMQP091_URL))
            .await
            .map_err(|e| e.to_string())?;
        Ok(TestContext::new(Arc::new(driver)))
    })
    .unavailable_if(shared_unavailable());
    queue_testkit::run(queue_testkit::conformance::trials(&[rabbitmq]));
}
