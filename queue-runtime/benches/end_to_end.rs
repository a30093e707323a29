//! End to end through the runtime on the memory driver: messages published, handled
//! by a no-op Lua handler at concurrency 1, 16 and 256, and acked; next to a baseline in
//! the same run, the same messages through the memory driver with a no-op Rust
//! consumer. Also prints the process RSS with 1000 handlers suspended mid-publish.
//! Run: `cargo bench -p queue-runtime --bench end_to_end`.
//!
//! Criterion measures these setups one after the other, and this machine's speed
//! drifts between them by as much as they differ: the goals' ratios come from
//! `end_to_end_in_turns`, which measures the same setups in turns.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use queue_core::Driver;
use queue_runtime::registry::DriverKinds;
use queue_testkit::{ControlledDriver, ControlledFactory, numbered};

#[path = "support/memory_drain.rs"]
mod memory_drain;
use memory_drain::{BATCH, drain, noop_app, queue, rust_noop_consumer, start};

/// The allocator the `queue-runtime` binary runs with, so the bench measures it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        let q = queue();
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
    let q = queue();
    let mut group = c.benchmark_group("end_to_end");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(6));

    // One consumer per setup, kept across samples: the bench measures a consumer that
    // is already running, not the start of a host (its Lua states, its runners' first
    // coroutines), which would weigh more in a short sample than in a long one.
    let (driver, consumer) = rt.block_on(rust_noop_consumer());
    group.bench_function("baseline_rust_noop_consumer", |b| {
        b.iter_custom(|iters| rt.block_on(drain(&driver, &q, iters)))
    });
    rt.block_on(async {
        driver.close().await.expect("close");
        consumer.await.expect("consumer");
    });

    for concurrency in [1u32, 16, 256] {
        let path = noop_app(&dir, concurrency);
        let host = rt.block_on(start(&path, &kinds));
        let driver = host.queues().get(&q).expect("declared").driver.clone();
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
