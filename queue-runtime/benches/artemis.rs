//! The runtime on ActiveMQ Artemis (AMQP 1.0, profile `artemis`) next to raw
//! fe2o3-amqp, in turns: 20,000 messages waiting in an anycast queue, drained by the
//! runtime on `queue.driver.amqp10` (no-op Lua handler, concurrency 16, prefetch 1000)
//! and by a raw fe2o3-amqp receiver with automatic link credit of 1000 accepting every
//! 100 deliveries in one disposition, the side that goes first alternating.
//!
//! Why beside `rabbitmq.rs`'s AMQP 1.0 pair: RabbitMQ 3.x's AMQP 1.0 plugin overshoots
//! link credit, so on it the driver grants credit only once all it granted has arrived,
//! and the raw receiver, which tops credit up while transfers are in flight, breaks
//! that rule (docs/performance.md). Artemis counts credit as the specification says,
//! and there the driver tops credit up as the raw receiver does: this pair compares
//! the two with the same rule.
//!
//! A drain is timed from the first delivery to the last settlement on both sides (the
//! runtime's as its metrics count them, see `support/host_runs.rs`). Between drains the
//! same queue is filled again through the driver (untimed) and checked empty after each.
//!
//! Output: a line per side and `target/bench/in_turns-artemis.json`, `{"rounds": N,
//! "rates": {"artemis_in_turns/<side>": msg/s}}`, which `cargo xtask bench` reads.
//! Run without cargo bench's `--bench` argument (as `cargo test --benches` does): one
//! round and no file. Skips (prints why) when Artemis is not on 127.0.0.1:6672 (`cargo
//! xtask brokers up` or `.ci/start-brokers` starts it).
//!
//! Run: `cargo bench -p queue-runtime --bench artemis`.

use std::time::Duration;

use fe2o3_amqp::types::messaging::{DistributionMode, Source};
use fe2o3_amqp::types::primitives::Symbol;
use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::{Driver, Headers, Message, QueueId, QueueSpec};

#[path = "support/host_runs.rs"]
mod host_runs;
use host_runs::{CREDIT, DRAIN_TIMEOUT, Until, assert_drained, raw_fe2o3_receive, run_host_until};
use queue_testkit::bench::{InTurnsFigures, in_turns, in_turns_wanted};

/// The allocator the `queue-runtime` binary runs with, so the bench measures it (the
/// raw clients beside it run on it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where the in-turns figures go, under `target/bench/`, for `cargo xtask bench`.
const IN_TURNS_FILE: &str = "in_turns-artemis.json";
const CONSUME_N: usize = 20_000;
/// Rounds of the pass: each drains the queue once with each side.
const ROUNDS: u32 = 16;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let recorded = in_turns_wanted(&args);
    let rounds = if recorded { ROUNDS } else { 1 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let url = queue_fixtures::artemis::shared_url();
    if let Some(why) = queue_fixtures::artemis::shared_unavailable() {
        println!("skipped: {why}");
        return;
    }
    let queue_name = format!("bench-artemis-{}", std::process::id());
    let queue = QueueId::new("bench", &queue_name).expect("queue id");
    let filler = rt.block_on(async {
        let mut config = Amqp10Config::new(&url, Profile::Artemis);
        config.confirm_window = CREDIT;
        config.publish_timeout = DRAIN_TIMEOUT;
        let driver = Amqp10Driver::connect(config)
            .await
            .expect("connect to Artemis");
        let spec = QueueSpec::new(queue.clone())
            .with_name(queue_name.clone())
            .with_durable(false);
        driver.declare(&spec).await.expect("declare");
        driver
    });
    let dir = std::env::temp_dir().join(format!("queue-artemis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let app = app(&dir, &url, &queue_name);

    // One drain by one side: the queue filled with CONSUME_N messages, drained (timed
    // as the module says), then checked empty.
    let filled_drain = |drain: &mut dyn FnMut() -> Duration| {
        rt.block_on(fill(&filler, &queue));
        let time = drain();
        rt.block_on(assert_empty(&filler, &queue));
        time
    };
    let mut connection = rt
        .block_on(queue_fixtures::raw_amqp10::open("bench-raw-fe2o3", &url))
        .expect("connect to Artemis over AMQP 1.0");
    let mut raw_drain = || {
        filled_drain(&mut || {
            let receive = raw_fe2o3_receive(&mut connection, source(&queue_name), CONSUME_N);
            // The timer is made inside the runtime: block_on's caller is not in it.
            rt.block_on(async { tokio::time::timeout(DRAIN_TIMEOUT, receive).await })
                .expect("raw fe2o3-amqp did not receive every message in time")
        })
    };
    let runtime_drain =
        || filled_drain(&mut || rt.block_on(run_host_until(&app, Until::Acked, CONSUME_N)));
    let (raw, runtime) = in_turns(rounds, &mut raw_drain, runtime_drain);
    let _ = rt.block_on(connection.close());
    let _ = rt.block_on(filler.close());
    let _ = std::fs::remove_dir_all(&dir);

    let messages = u64::from(rounds) * CONSUME_N as u64;
    let mut figures = InTurnsFigures::new(IN_TURNS_FILE, rounds);
    let raw = figures.record("artemis_in_turns/raw_fe2o3", messages, raw);
    let runtime = figures.record("artemis_in_turns/runtime_noop_lua", messages, runtime);
    println!(
        "in turns: the runtime at {:.2}x raw fe2o3-amqp",
        runtime / raw
    );
    if recorded {
        figures.write();
    }
}

/// The queue as the driver's `artemis` profile attaches to it: anycast (capability
/// `queue`), messages taken, not browsed.
fn source(queue_name: &str) -> Source {
    Source::builder()
        .address(queue_name.to_string())
        .capabilities(vec![Symbol::from("queue")])
        .distribution_mode(DistributionMode::Move)
        .build()
}

fn app(dir: &std::path::Path, url: &str, queue_name: &str) -> std::path::PathBuf {
    let yaml = format!(
        "namespace: bench\nentries:\n  - name: artemis\n    kind: queue.driver.amqp10\n    url: {url}\n    profile: artemis\n  - name: q\n    kind: queue.queue\n    queue_name: {queue_name}\n    durable: false\n    dead_letter: false\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: h.lua\n    method: noop\n    concurrency: 16\n    prefetch: {CREDIT}\n"
    );
    std::fs::write(dir.join("h.lua"), "function noop(p) end\n").expect("write");
    let path = dir.join("artemis.yaml");
    std::fs::write(&path, yaml).expect("write");
    path
}

/// Fills the queue with CONSUME_N small JSON messages through the driver, 1000
/// unsettled at a time (untimed).
async fn fill(driver: &Amqp10Driver, queue: &QueueId) {
    let messages = (0..CONSUME_N)
        .map(|n| {
            let body = format!("{{\"n\":{n}}}").into_bytes();
            Message::from_bytes(body, Headers::new(), "application/json")
        })
        .collect();
    tokio::time::timeout(DRAIN_TIMEOUT, driver.publish_batch(queue, messages))
        .await
        .expect("filling the queue timed out")
        .expect("fill");
}

/// Fails the bench if the queue keeps messages after a drain.
async fn assert_empty(driver: &Amqp10Driver, queue: &QueueId) {
    let name = queue.to_string();
    assert_drained(&name, || async {
        driver
            .info(queue)
            .await
            .expect("queue info")
            .message_count()
            .expect("Artemis counts its queues")
    })
    .await;
}
