//! The end-to-end setups of `end_to_end` (the no-op Rust consumer on the memory driver,
//! and the runtime's no-op Lua handler at concurrency 1, 16 and 256), measured in turns
//! instead of one after the other: every setup runs at once, idle but for the one being
//! fed, and each round feeds each of them the same batches, in an order that rotates
//! from round to round.
//!
//! Why: this machine's speed drifts by 10–40% over seconds (docs/performance.md,
//! "Runtime end to end"), which is as much as the difference between two setups that
//! criterion measures one after the other. Turns of a few tens of milliseconds put each
//! setup through the same drift, so their ratios hold from run to run.
//!
//! Output: a line per setup (msg/s over all its turns, and against the Rust
//! baseline), and `target/bench/in_turns-end_to_end.json`,
//! `{"rounds": N, "rates": {"end_to_end_in_turns/<setup>": msg/s}}`, which
//! `cargo xtask bench` reads. 80 rounds of 50,000 messages per setup after one round of
//! warm-up; when run without cargo bench's `--bench` argument, as `cargo test
//! --benches` does, two rounds and no file.
//!
//! Run: `cargo bench -p queue-runtime --bench end_to_end_in_turns`.

use std::sync::Arc;
use std::time::Duration;

use queue_core::Driver;
use queue_runtime::host::Host;
use queue_runtime::registry::DriverKinds;

#[path = "support/memory_drain.rs"]
mod memory_drain;
use memory_drain::{BATCH, drain, noop_app, queue, rust_noop_consumer, start};
use queue_testkit::bench::{InTurnsFigures, in_turns_wanted};

/// The allocator the `queue-runtime` binary runs with, so the bench measures it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Batches per setup per round: 50,000 messages, 25–120 ms of each setup's time.
const TURN: u64 = 10;
/// Rounds under `cargo bench` (about 25 s in all); two otherwise, as in `cargo test
/// --benches`, which only checks that the bench runs.
const ROUNDS: u32 = 80;
const ROUNDS_TEST: u32 = 2;

/// One setup being measured: where its messages go, and its time so far.
struct Setup {
    name: String,
    driver: Arc<dyn Driver>,
    time: Duration,
    messages: u64,
}

impl Setup {
    fn new(name: String, driver: Arc<dyn Driver>) -> Setup {
        Setup {
            name,
            driver,
            time: Duration::ZERO,
            messages: 0,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let measuring = in_turns_wanted(&args);
    if !measuring && args.iter().any(|a| a == "--bench") {
        // Criterion's options for other benchmarks (a filter, `--list`, a profile).
        return;
    }
    let rounds = if measuring { ROUNDS } else { ROUNDS_TEST };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("queue-in-turns-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kinds = DriverKinds::builtin();
    let q = queue();

    let (rust_driver, rust_consumer) = rt.block_on(rust_noop_consumer());
    let mut setups = vec![Setup::new(
        "baseline_rust_noop_consumer".into(),
        rust_driver.clone(),
    )];
    let mut hosts: Vec<Host> = Vec::new();
    for concurrency in [1u32, 16, 256] {
        let host = rt.block_on(start(&noop_app(&dir, concurrency), &kinds));
        setups.push(Setup::new(
            format!("lua_noop_concurrency_{concurrency}"),
            host.queues().get(&q).expect("declared").driver.clone(),
        ));
        hosts.push(host);
    }

    println!(
        "end_to_end_in_turns: {rounds} rounds of {} messages per setup, after one round of warm-up",
        TURN * BATCH as u64
    );
    rt.block_on(async {
        for setup in &setups {
            drain(&setup.driver, &q, TURN).await;
        }
        let n = setups.len();
        for round in 0..rounds as usize {
            // Each setup goes first, second... equally often, and follows each of
            // the others, not always the same one: forward, then backward.
            let start = round / 2 % n;
            for turn in 0..n {
                let at = if round % 2 == 0 {
                    (start + turn) % n
                } else {
                    (start + n - turn) % n
                };
                let setup = &mut setups[at];
                setup.time += drain(&setup.driver, &q, TURN).await;
                setup.messages += TURN * BATCH as u64;
            }
        }
    });

    let mut figures = InTurnsFigures::new("in_turns-end_to_end.json", rounds);
    let rates: Vec<f64> = setups
        .iter()
        .map(|setup| {
            let id = format!("end_to_end_in_turns/{}", setup.name);
            figures.record(&id, setup.messages, setup.time)
        })
        .collect();
    for (setup, rate) in setups.iter().zip(&rates) {
        println!(
            "{:<30} {:.2}x the Rust baseline",
            setup.name,
            rate / rates[0]
        );
    }
    // Every message was acked once and nothing is left: a handler that failed would
    // have its message retried (a copy waiting in the queue, or acked again), and
    // the figures would not be a no-op handler's.
    let given = (u64::from(rounds) + 1) * TURN * BATCH as u64;
    for setup in &setups {
        let acked = setup.driver.acked_total(&q).unwrap_or(0);
        assert_eq!(
            acked, given,
            "{}: acked {acked} of {given} messages",
            setup.name
        );
    }
    rt.block_on(async {
        for host in hosts {
            for summary in host.shutdown().await {
                assert_eq!(
                    (summary.ready, summary.in_flight),
                    (Some(0), Some(0)),
                    "messages left after the run: {summary}"
                );
            }
        }
        rust_driver.close().await.expect("close");
        rust_consumer.await.expect("consumer");
    });
    let _ = std::fs::remove_dir_all(&dir);
    if !measuring {
        // A check that the bench runs must not pass for a measurement.
        return;
    }
    figures.write();
}
