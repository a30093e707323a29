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

/// Batches drained at a time, built before the clock starts.
const CHUNK: u64 = 10;

fn messages() -> Vec<Message> {
    (0..BATCH as i64).map(numbered).collect()
}

/// An app whose consumer of `bench:q` runs a no-op Lua handler at `concurrency`
/// (prefetch twice that, at least 100). Each app has its own source file: a running
/// host may still be reading its own when the next app is written.
pub fn noop_app(dir: &Path, concurrency: u32) -> PathBuf {
    let prefetch = (concurrency * 2).max(100);
    let source = format!("noop-{concurrency}.lua");
    let yaml = format!(
        "namespace: bench\nentries:\n  - name: q\n    kind: queue.queue\n    max_length: 1000000\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: {source}\n    method: noop\n    concurrency: {concurrency}\n    prefetch: {prefetch}\n"
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

/// Waits on tokio's timer until the driver counts `target` messages acked on `q`;
/// it can wake up to a millisecond late.
async fn wait_acked(driver: &Arc<dyn Driver>, q: &QueueId, target: u64) {
    while driver.acked_total(q).unwrap_or(0) < target {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Waits for `target` acks without tokio's millisecond granularity: a short sleep of
/// the bench's own thread between looks. For the wait that ends a timed drain, where
/// a millisecond late is 4% of the Rust baseline's chunk.
fn wait_acked_closely(driver: &Arc<dyn Driver>, q: &QueueId, target: u64) {
    while driver.acked_total(q).unwrap_or(0) < target {
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// Drains `batches` batches through a consumer that is already running and returns
/// the time it took: [`CHUNK`] batches at a time, each chunk built before its clock
/// starts (building takes about as long as the Rust baseline takes to consume, and
/// would otherwise be timed as the consumer's), published while the consumer works
/// (two batches stay queued ahead of the one being consumed, so it never idles while
/// the bench waits on its timer), and timed until its last ack.
pub async fn drain(driver: &Arc<dyn Driver>, q: &QueueId, batches: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = batches;
    while left > 0 {
        let chunk: Vec<Vec<Message>> = (0..left.min(CHUNK)).map(|_| messages()).collect();
        left -= chunk.len() as u64;
        let acked_before = driver.acked_total(q).unwrap_or(0);
        let count = chunk.len() as u64;
        let started = Instant::now();
        for (i, batch) in (0u64..).zip(chunk) {
            driver.publish_batch(q, batch).await.expect("publish");
            let consumed_before_this = i.saturating_sub(2);
            wait_acked(
                driver,
                q,
                acked_before + consumed_before_this * BATCH as u64,
            )
            .await;
        }
        wait_acked_closely(driver, q, acked_before + count * BATCH as u64);
        total += started.elapsed();
    }
    total
}
