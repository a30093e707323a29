//! Shared helpers of the integration tests: where the brokers are, and how to skip.
#![allow(dead_code)]

use std::time::Duration;

pub mod proton;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};

/// The main RabbitMQ node (AMQP 1.0 plugin) the CI starts.
pub const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672";

/// Whether the tests run in CI, where an unreachable RabbitMQ is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether something listens on 127.0.0.1:port.
pub async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// A driver on the main RabbitMQ node, or `None` (after printing the skip) when it is
/// not there outside CI.
pub async fn rabbit_driver(profile: Profile) -> Option<Amqp10Driver> {
    if !port_open(5672).await {
        let reason = "RabbitMQ is not reachable on 127.0.0.1:5672";
        assert!(!in_ci(), "{reason} (CI=true)");
        println!("skipped: {reason}");
        return None;
    }
    let mut config = Amqp10Config::new(RABBIT_URL, profile);
    config.container_id = Some(format!("queue-amqp10-tests-{}", std::process::id()));
    match Amqp10Driver::connect(config).await {
        Ok(driver) => Some(driver),
        Err(e) => {
            assert!(!in_ci(), "RabbitMQ AMQP 1.0 connect failed: {e}");
            println!("skipped: RabbitMQ's AMQP 1.0 endpoint refused us: {e}");
            None
        }
    }
}
