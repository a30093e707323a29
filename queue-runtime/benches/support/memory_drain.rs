//! Draining batches through a consumer on the memory driver: what the end-to-end
//! benches measure, the runtime's no-op Lua consumer and the no-op Rust baseline alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_core::{ConsumeOptions, Driver, Message, QueueId};
use queue_runtime::host::{Host, HostOptions};
use queue_runtime::registry::{self, DriverKinds};
use queue_testkit::numbered;

/// Messages per published batch.
pub const BATCH: usize = 5000;

/// The queue every setup consumes.
pub fn queue() -> QueueId {
    QueueId::parse("bench:q").expect("id")
}

fn messages() -> Vec<Message> {
    (0..BATCH as i64).map(numbered).collect()
}

/// An app whose consumer of `bench:q` runs a no-op Lua handler at `concurrency`
/// (prefetch twice that, at least 100); `driver` is YAML for extra entries. Each app
/// has its own source file: a running host may still be reading its own when the
/// next app is written.
pub fn noop_app(dir: &Path, concurrency: u32, driver: &str) -> PathBuf {
    let prefetch = (concurrency * 2).max(100);
    let source = format!("noop-{concurrency}.lua");
    let yaml = format!(
        "namespace: bench\nentries:\n{driver}  - name: q\n    kind: queue.queue\n    max_length: 1000000\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: {source}\n    method: noop\n    concurrency: {concurrency}\n    prefetch: {prefetch}\n"
    );
    std::fs::write(dir.join(source), "function noop(payload) end\n").expect("write");
    let path = dir.join(format!("app-{concurrency}.yaml"));
    std::fs::write(&path, yaml).expect("write");
    path
}

/// Starts the runtime on an app.
pub async fn start(path: &Path, kinds: &DriverKinds) -> Host {
    let config = queue_runtime::config::load(&[path.to_path_buf()]).expect("config");
    let plan = registry::plan(&config, kinds, false).expect("plan");
    Host::start(plan, kinds, HostOptions::default())
        .await
        .expect("start")
}

/// The baseline: a memory driver whose queue a Rust task consumes, acking each
/// delivery (prefetch 100). Close the driver to end the task.
pub async fn rust_noop_consumer() -> (Arc<dyn Driver>, tokio::task::JoinHandle<()>) {
    let q = queue();
    let driver: Arc<dyn Driver> = Arc::new(queue_core::memory::MemoryDriver::new());
    driver
        .declare(&queue_core::QueueSpec::new(q.clone()).with_max_length(1_000_000))
        .await
        .expect("declare");
    let mut sub = driver
        .consume(&q, ConsumeOptions { prefetch: 100 })
        .await
        .expect("consume");
    let consumer = tokio::spawn(async move {
        while let Some(Ok(d)) = sub.next().await {
            d.ack().await.expect("ack");
        }
    });
    (driver, consumer)
}

/// Waits until the driver counts `target` messages acked on `q`.
pub async fn wait_acked(driver: &Arc<dyn Driver>, q: &QueueId, target: u64) {
    while driver.acked_total(q).unwrap_or(0) < target {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Publishes `batches` batches into a consumer that is already running and returns
/// the time until all of them are acked. Two batches stay queued ahead of the one
/// being consumed, so the consumer never idles while the bench waits on its
/// (millisecond) timer, even at the Rust baseline's 2 ms a batch; only the last wait
/// can overshoot.
pub async fn drain(driver: &Arc<dyn Driver>, q: &QueueId, batches: u64) -> Duration {
    let acked_before = driver.acked_total(q).unwrap_or(0);
    let started = Instant::now();
    for i in 0..batches {
        driver.publish_batch(q, messages()).await.expect("publish");
        let consumed_before_this = i.saturating_sub(2);
        wait_acked(
            driver,
            q,
            acked_before + consumed_before_this * BATCH as u64,
        )
        .await;
    }
    wait_acked(driver, q, acked_before + batches * BATCH as u64).await;
    started.elapsed()
}
