// ANCHOR: example
//! A publisher and a consumer in plain Rust, without Lua or the runtime: the memory
//! driver here; any other driver crate works the same way through `Arc<dyn Driver>`.
//! Run: `cargo run -p queue-core --example publisher_consumer`.

use std::sync::Arc;

use queue_core::memory::MemoryDriver;
use queue_core::security::SecurityContext;
use queue_core::{
    ConsumeOptions, Driver, HeaderValue, Headers, PublishSettings, QueueId, QueueSpec, Queues,
    Value,
};

#[tokio::main]
async fn main() -> queue_core::Result<()> {
    // A driver, and the registry that publishes through it with every check.
    let driver: Arc<dyn Driver> = Arc::new(MemoryDriver::new());
    let queues = Queues::new();
    let tasks = QueueId::parse("app:tasks")?;
    queues
        .declare(
            QueueSpec::new(tasks.clone()),
            PublishSettings::default(),
            Arc::clone(&driver),
        )
        .await?;

    // Publish: returns the message id once the driver has the message.
    let body = Value::map([
        ("action", Value::from("send_email")),
        ("user_id", Value::Int(456)),
    ]);
    let headers = Headers::from_pairs([("priority", HeaderValue::from("high"))]);
    let id = queues
        .publish(&SecurityContext::default(), "app:tasks", body, headers)
        .await?;
    println!("published {id}");

    // Consume: at most 10 unsettled deliveries; ack each one (or release it).
    let mut consumer = driver
        .consume(&tasks, ConsumeOptions { prefetch: 10 })
        .await?;
    let delivery = consumer.next().await.expect("the message just published")?;
    let payload = delivery.message().decode()?;
    println!(
        "received {} with {:?}",
        delivery.message().id,
        payload.get("action")
    );
    delivery.ack().await?;
    consumer.cancel().await?;
    driver.close().await
}
// ANCHOR_END: example

// `test = true` in Cargo.toml: `cargo test` runs the example, not only builds it, so
// the code the manual shows (docs/rust.md) is known to work.
#[cfg(test)]
mod tests {
    #[test]
    fn the_example_publishes_and_consumes_one_message() {
        super::main().expect("the example runs");
    }
}
