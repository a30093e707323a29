//! End to end through the runtime on the memory driver: messages published, handled
//! by a no-op Lua handler at concurrency 1, 16 and 256, and acked; next to a baseline in
//! the same run, the same messages through the memory driver with a no-op Rust
//! consumer. Also prints the process RSS with 1000 handlers suspended mid-publish.
//! Run: `cargo bench -p queue-runtime --bench end_to_end`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use queue_core::{ConsumeOptions, Driver, Message, QueueId};
use queue_runtime::host::{Host, HostOptions};
use queue_runtime::registry::{self, DriverKinds};
use queue_testkit::{ControlledDriver, ControlledFactory, numbered};

/// The allocator the `queue-runtime` binary runs with, so the bench measures it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 5000;

fn messages() -> Vec<Message> {
    (0..BATCH as i64).map(numbered).collect()
}

fn app(dir: &std::path::Path, concurrency: u32, driver: &str) -> std::path::PathBuf {
    let prefetch = (concurrency * 2).max(100);
    let yaml = format!(
        "namespace: bench\nentries:\n{driver}  - name: q\n    kind: queue.queue\n    max_length: 1000000\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: noop.lua\n    method: noop\n    concurrency: {concurrency}\n    prefetch: {prefetch}\n"
    );
    std::fs::write(dir.join("noop.lua"), "function noop(payload) end\n").expect("write");
    let path = dir.join(format!("app-{concurrency}.yaml"));
    std::fs::write(&path, yaml).expect("write");
    path
}

async fn start(path: &std::path::Path, kinds: &DriverKinds) -> Host {
    let config = queue_runtime::config::load(&[path.to_path_buf()]).expect("config");
    let plan = registry::plan(&config, kinds, false).expect("plan");
    Host::start(plan, kinds, HostOptions::default())
        .await
        .expect("start")
}

async fn wait_acked(driver: &Arc<dyn Driver>, q: &QueueId, target: u64) {
    while driver.acked_total(q).unwrap_or(0) < target {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Publishes `iters` batches into a consumer that is already running and returns the
/// time until all of them are acked. The next batch goes in while the one before is
/// still being consumed, so the consumer never idles while the bench waits on its
/// (millisecond) timer, and only the last wait of a sample can overshoot.
async fn drain(driver: &Arc<dyn Driver>, q: &QueueId, iters: u64) -> Duration {
    let acked_before = driver.acked_total(q).unwrap_or(0);
    let started = Instant::now();
    for i in 0..iters {
        driver.publish_batch(q, messages()).await.expect("publish");
        wait_acked(driver, q, acked_before + i * BATCH as u64).await;
    }
    wait_acked(driver, q, acked_before + iters * BATCH as u64).await;
    started.elapsed()
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// 1000 handlers suspended inside `queue.publish`, held by the controlled driver.
fn rss_with_suspended_handlers(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    let driver = Arc::new(ControlledDriver::new());
    let mut kinds = DriverKinds::builtin();
    kinds.register(Arc::new(ControlledFactory(driver.clone())));
    std::fs::write(
        dir.join("publish.lua"),
        "function noop(p) assert(queue.publish('bench:out', p)) end\n",
    )
    .expect("write");
    let yaml = "namespace: bench\nentries:\n  - name: held\n    kind: queue.driver.controlled\n  - name: q\n    kind: queue.queue\n  - name: out\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: publish.lua\n    method: noop\n    concurrency: 1000\n    prefetch: 1000\n";
    let path = dir.join("suspended.yaml");
    std::fs::write(&path, yaml).expect("write");
    rt.block_on(async {
        let before = rss_mib();
        let host = start(&path, &kinds).await;
        driver.hold_publishes();
        let q = QueueId::parse("bench:q").expect("id");
        for n in 0..1000 {
            driver.inner().publish(&q, numbered(n)).await.expect("publish");
        }
        driver.wait_for_held(1000).await;
        let during = rss_mib();
        println!(
            "rss_1000_suspended_handlers: {during:.1} MiB process RSS ({before:.1} MiB before the runtime started; {} Lua states)",
            host.lua_states()
        );
        driver.pass_publishes();
        host.shutdown().await;
    });
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("queue-runtime-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    rss_with_suspended_handlers(&rt, &dir);

    let kinds = DriverKinds::builtin();
    let q = QueueId::parse("bench:q").expect("id");
    let mut group = c.benchmark_group("end_to_end");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(6));

    // One consumer per setup, kept across samples: the bench measures a consumer that
    // is already running, not the start of a host (its Lua states, its runners' first
    // coroutines), which would weigh more in a short sample than in a long one.
    let (driver, consumer) = rt.block_on(async {
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
    });
    group.bench_function("baseline_rust_noop_consumer", |b| {
        b.iter_custom(|iters| rt.block_on(drain(&driver, &q, iters)))
    });
    rt.block_on(async {
        driver.close().await.expect("close");
        consumer.await.expect("consumer");
    });

    for concurrency in [1u32, 16, 256] {
        let path = app(&dir, concurrency, "");
        let host = rt.block_on(start(&path, &kinds));
        let driver = host.queues().get(&q).expect("declared").driver;
        group.bench_function(format!("lua_noop_concurrency_{concurrency}"), |b| {
            b.iter_custom(|iters| rt.block_on(drain(&driver, &q, iters)))
        });
        rt.block_on(host.shutdown());
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
