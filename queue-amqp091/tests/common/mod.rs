//! What the broker tests share: the broker address and the CI-or-skip rule.
#![allow(dead_code)]

use queue_amqp091::{AmqpConfig, AmqpDriver};

/// The shared RabbitMQ of the machine (never anything but loopback).
pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// True when running in CI, where a missing broker is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Connects to the shared broker; outside CI, prints `skipped: <reason>` and
/// returns `None` when it is unreachable.
pub async fn connect(config: AmqpConfig) -> Option<AmqpDriver> {
    match AmqpDriver::connect(config).await {
        Ok(d) => Some(d),
        Err(e) if in_ci() => panic!("RabbitMQ at 127.0.0.1:5672 is required in CI: {e}"),
        Err(e) => {
            println!("skipped: RabbitMQ at 127.0.0.1:5672 is not reachable: {e}");
            None
        }
    }
}

/// The shared broker with default settings.
pub async fn rabbit() -> Option<AmqpDriver> {
    connect(AmqpConfig::new(URL)).await
}

/// A unique broker-side name for one test.
pub fn unique(label: &str) -> String {
    let id = queue_core::new_message_id().replace('-', "");
    format!("amqp091-test-{label}-{}", &id[id.len() - 12..])
}
