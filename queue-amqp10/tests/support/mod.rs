//! What the broker tests share: a driver on the machine's shared RabbitMQ.
#![allow(dead_code)]

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};

/// The shared RabbitMQ's AMQP 1.0 endpoint.
pub const RABBIT_URL: &str = queue_fixtures::rabbitmq::SHARED_AMQP10_URL;

/// A driver on the shared node (its availability is checked before any test runs).
pub async fn rabbit_driver(profile: Profile) -> Amqp10Driver {
    let mut config = Amqp10Config::new(RABBIT_URL, profile);
    config.container_id = Some(format!("queue-amqp10-tests-{}", std::process::id()));
    Amqp10Driver::connect(config)
        .await
        .expect("the shared RabbitMQ's AMQP 1.0 endpoint")
}
