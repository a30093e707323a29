//! `cargo xtask brokers up|down`: the shared brokers the tests use, through
//! `queue-fixtures` (the same code the tests start their private brokers with).
//! `.ci/start-brokers` runs `cargo xtask brokers up`, which also installs
//! `redis-server` for the Redis tests (they start servers of their own).

use crate::Broker;

/// Installs what is missing and starts the brokers, waiting until each answers.
pub fn up(only: Option<Broker>) -> Result<bool, String> {
    if only.is_none_or(|b| b == Broker::Rabbitmq) {
        queue_fixtures::rabbitmq::ensure_shared()?;
        println!("RabbitMQ ready on 127.0.0.1:5672 (AMQP 0-9-1 and 1.0)");
    }
    if only.is_none_or(|b| b == Broker::Artemis) {
        queue_fixtures::artemis::ensure_shared()?;
        println!(
            "ActiveMQ Artemis {} ready on 127.0.0.1:{} (AMQP 1.0)",
            queue_fixtures::artemis::VERSION,
            queue_fixtures::artemis::SHARED_AMQP_PORT
        );
    }
    if only.is_none() {
        // No shared server: the Redis tests start their own, they need it installed.
        queue_fixtures::redis::ensure_installed()?;
        println!("redis-server installed (the Redis tests start their own)");
    }
    Ok(true)
}

/// Stops the brokers `up` started.
pub fn down(only: Option<Broker>) -> Result<bool, String> {
    if only.is_none_or(|b| b == Broker::Artemis) {
        queue_fixtures::artemis::stop_shared()?;
        println!("ActiveMQ Artemis stopped");
    }
    if only.is_none_or(|b| b == Broker::Rabbitmq) {
        queue_fixtures::rabbitmq::stop_shared()?;
        println!("RabbitMQ stopped");
    }
    Ok(true)
}
