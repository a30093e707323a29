//! What the broker tests share: the shared node's address, and unique queue names.
#![allow(dead_code)]

use queue_amqp091::{Amqp091Config, Amqp091Driver};

/// The machine's shared RabbitMQ (never anything but loopback).
pub const URL: &str = queue_fixtures::rabbitmq::SHARED_AMQP091_URL;

/// A driver on the shared node (its availability is checked before any test runs).
pub async fn rabbit() -> Amqp091Driver {
    Amqp091Driver::connect(Amqp091Config::new(URL))
        .await
        .expect("the shared RabbitMQ on 127.0.0.1:5672")
}

/// A unique broker-side name for one test.
pub fn unique(label: &str) -> String {
    let id = queue_core::new_message_id().replace('-', "");
    format!("amqp091-test-{label}-{}", &id[id.len() - 12..])
}
