//! The runtime on RabbitMQ next to raw lapin, in the same run:
//!
//! - consume: 20,000 messages waiting in a queue, drained by the runtime with a no-op
//!   Lua handler (concurrency 16, prefetch 1000), vs raw lapin consuming with the same
//!   prefetch and `ack(multiple)` every 100.
//! - publish: 10,000 confirmed publishes from Lua, a `process.lua` with 16 instances
//!   each awaiting its confirms, vs raw lapin with 16 publishers each awaiting theirs.
//! - amqp10_consume: the same 20,000 waiting messages (filled by lapin into the same
//!   kind of classic queue), drained over RabbitMQ's AMQP 1.0 plugin (address
//!   `/queue/NAME`, the `rabbitmq-v1` profile: the broker here is RabbitMQ 3.10) by the
//!   runtime on `queue.driver.amqp10` (no-op Lua handler, concurrency 16, prefetch
//!   1000) vs a raw fe2o3-amqp receiver with link credit 1000 accepting every 100
//!   deliveries in one disposition.
//!
//! A drain is timed from the first delivery to the last ack, and publishing from the
//! first confirm to the last, on both sides: the runtime's as it counts them in its
//! metrics (a recorder of the bench's own reads `queue_delivered_total`,
//! `queue_acked_total` and `queue_published_total`), so starting the runtime is not
//! timed, as opening the raw clients' connections is not. Stopping the runtime is not
//! timed either. The queue is checked empty after a drain.
//!
//! After criterion's groups, the two drain pairs and the publish pair run again in
//! turns (24 rounds, the side that goes first alternating), so that this machine's
//! drift between criterion's groups does not decide their ratios; the figures go to
//! `target/bench/in_turns-rabbitmq.json`, from which `cargo xtask bench` takes its
//! RabbitMQ rows. The publish pair also records the process CPU each side used per
//! message (starting and stopping the runtime included, as every round does).
//!
//! Run: `cargo bench -p queue-runtime --bench rabbitmq` (skips without RabbitMQ; only
//! the AMQP 1.0 pair: `-- amqp10`; only the pass in turns: `-- in_turns`; one pair of
//! it, for a quick look that leaves the recorded figures alone: `-- publish_in_turns`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

#[path = "support/host_runs.rs"]
mod host_runs;
use host_runs::{CREDIT, DRAIN_TIMEOUT, Until, assert_drained, raw_fe2o3_receive, run_host_until};
use queue_testkit::bench::{
    InTurnsFigures, counting_cpu, in_turns, in_turns_pair_wanted, in_turns_wanted,
    in_turns_whole_pass,
};

/// The allocator the `queue-runtime` binary runs with, so the bench measures it (the
/// raw clients beside it run on it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where the in-turns figures go, under `target/bench/`, for `cargo xtask bench`.
const IN_TURNS_FILE: &str = "in_turns-rabbitmq.json";

/// The shared RabbitMQ, over AMQP 0-9-1 and over its AMQP 1.0 plugin on the same port.
const URL: &str = queue_fixtures::rabbitmq::SHARED_AMQP091_URL;
const URL_AMQP10: &str = queue_fixtures::rabbitmq::SHARED_AMQP10_URL;
const CONSUME_N: usize = 20_000;
const PUBLISH_N: usize = 10_000;
const IN_FLIGHT: usize = 16;

fn body(n: usize) -> Vec<u8> {
    format!("{{\"n\":{n}}}").into_bytes()
}

async fn channel(conn: &Connection, queue: &str) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch
}

/// Fills a queue with `n` persistent JSON messages, 1000 confirms in flight (untimed).
async fn fill(ch: &Channel, queue: &str, n: usize) {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        if pending.len() == 1000 {
            let confirm: lapin::PublisherConfirm = pending.pop_front().expect("pending");
            confirm.await.expect("confirm");
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(i),
                props.clone(),
            )
            .await
            .expect("publish");
        pending.push_back(confirm);
    }
    for confirm in pending {
        confirm.await.expect("confirm");
    }
}

/// Consumes and acks `n` messages; returns the time from the first delivery to the
/// last ack.
async fn raw_consume(conn: &Connection, queue: &str, n: usize) -> Duration {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut first = None;
    for i in 1..=n {
        let d = consumer.next().await.expect("open").expect("delivery");
        first.get_or_insert_with(Instant::now);
        if i % 100 == 0 || i == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    let drained = first.expect("n > 0").elapsed();
    ch.close(200, "OK".into()).await.expect("close");
    drained
}

/// Publishes with 16 publishers each awaiting its confirms; returns the time from
/// the first confirm to the last.
async fn raw_publish(ch: &Channel, queue: &str) -> Duration {
    let per = PUBLISH_N / IN_FLIGHT;
    let first = std::sync::OnceLock::new();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let publishers = (0..IN_FLIGHT).map(|p| {
        let (props, first) = (props.clone(), &first);
        async move {
            for i in 0..per {
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(p * per + i),
                    props.clone(),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
                first.get_or_init(Instant::now);
            }
        }
    });
    futures_util::future::join_all(publishers).await;
    first.get().expect("PUBLISH_N > 0").elapsed()
}

fn app(dir: &std::path::Path, queue: &str, consumer: bool) -> std::path::PathBuf {
    let mut yaml = format!(
        "namespace: bench\nentries:\n  - name: rabbit\n    kind: queue.driver.amqp\n    url: {URL}\n  - name: q\n    kind: queue.queue\n    queue_name: {queue}\n    durable: false\n    dead_letter: false\n"
    );
    if consumer {
        yaml.push_str("  - name: w\n    kind: queue.consumer\n    queue: q\n    source: h.lua\n    method: noop\n    concurrency: 16\n    prefetch: 1000\n");
    } else {
        yaml.push_str(&format!(
            "  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n    instances: {IN_FLIGHT}\n"
        ));
    }
    let per = PUBLISH_N / IN_FLIGHT;
    std::fs::write(
        dir.join("h.lua"),
        format!(
            "function noop(p) end\nfunction produce(instance)\n  for i = 1, {per} do\n    local ok, err = queue.publish('bench:q', {{ n = i }})\n    if err then error(err) end\n  end\nend\n"
        ),
    )
    .expect("write");
    let path = dir.join(format!("{queue}.yaml"));
    std::fs::write(&path, yaml).expect("write");
    path
}

fn app_amqp10(dir: &std::path::Path, queue: &str) -> std::path::PathBuf {
    let yaml = format!(
        "namespace: bench\nentries:\n  - name: rabbit\n    kind: queue.driver.amqp10\n    url: {URL_AMQP10}\n    profile: rabbitmq-v1\n  - name: q\n    kind: queue.queue\n    queue_name: {queue}\n    durable: false\n    dead_letter: false\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: h10.lua\n    method: noop\n    concurrency: 16\n    prefetch: {CREDIT}\n"
    );
    std::fs::write(dir.join("h10.lua"), "function noop(p) end\n").expect("write");
    let path = dir.join(format!("{queue}.yaml"));
    std::fs::write(&path, yaml).expect("write");
    path
}

/// Fails the bench if `queue` keeps ready messages after a drain.
async fn assert_empty(ch: &Channel, queue: &str) {
    assert_drained(queue, || async {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare")
        .message_count()
        .into()
    })
    .await;
}

/// Rounds of the in-turns pass: each runs each side of a pair once (a drain of one
/// queue, or one run of publishes).
const ROUNDS_IN_TURNS: u32 = 24;

/// The time `iters` runs of `drain` took in all: a criterion sample.
fn drains(iters: u64, mut drain: impl FnMut() -> Duration) -> Duration {
    (0..iters).map(|_| drain()).sum()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let Ok(conn) = rt.block_on(Connection::connect(URL, ConnectionProperties::default())) else {
        println!("skipped: RabbitMQ is not reachable on 127.0.0.1:5672");
        return;
    };
    let dir = std::env::temp_dir().join(format!("queue-rabbit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let round = std::cell::Cell::new(0);
    let fresh = |label: &str| {
        round.set(round.get() + 1);
        format!("bench-{label}-{}-{}", std::process::id(), round.get())
    };
    let drop_queue = |ch: &Channel, q: &str| {
        rt.block_on(ch.queue_delete(q.into(), QueueDeleteOptions::default()))
            .expect("delete");
    };
    // One drain by each side: a fresh queue filled with CONSUME_N messages, drained
    // (timed as the module says), checked empty and deleted.
    let filled_drain = |label: &str, drain: &mut dyn FnMut(&str) -> Duration| {
        let q = fresh(label);
        let ch = rt.block_on(channel(&conn, &q));
        rt.block_on(fill(&ch, &q, CONSUME_N));
        let time = drain(&q);
        rt.block_on(assert_empty(&ch, &q));
        drop_queue(&ch, &q);
        time
    };
    let runtime_drain_of =
        |path: std::path::PathBuf| rt.block_on(run_host_until(&path, Until::Acked, CONSUME_N));
    let raw_lapin_drain = || {
        filled_drain("raw-consume", &mut |q| {
            rt.block_on(raw_consume(&conn, q, CONSUME_N))
        })
    };
    let runtime_drain = || {
        filled_drain("runtime-consume", &mut |q| {
            runtime_drain_of(app(&dir, q, true))
        })
    };
    // One connection for many drains, as raw_lapin shares one; each drain opens its
    // own session and receiver, as raw_lapin opens a channel.
    let open_amqp10 = || {
        let open = queue_fixtures::raw_amqp10::open("bench-raw-fe2o3", URL_AMQP10);
        rt.block_on(async { tokio::time::timeout(DRAIN_TIMEOUT, open).await })
            .expect("connecting over AMQP 1.0 timed out")
            .expect("connect over AMQP 1.0 (is the rabbitmq_amqp1_0 plugin on?)")
    };
    let raw_fe2o3_drain = |connection: &mut fe2o3_amqp::connection::ConnectionHandle<()>| {
        filled_drain("raw-fe2o3", &mut |q| {
            let address = format!("/queue/{q}");
            let receive = raw_fe2o3_receive(connection, address.as_str().into(), CONSUME_N);
            // The timer is made inside the runtime: block_on's caller is not in it.
            rt.block_on(async { tokio::time::timeout(DRAIN_TIMEOUT, receive).await })
                .expect("raw fe2o3-amqp did not receive every message in time")
        })
    };
    let runtime_amqp10_drain = || {
        filled_drain("runtime-amqp10", &mut |q| {
            runtime_drain_of(app_amqp10(&dir, q))
        })
    };

    // One run of PUBLISH_N confirmed publishes by each side, into a fresh queue
    // deleted after it.
    let raw_lapin_publish = || {
        let q = fresh("raw-publish");
        let ch = rt.block_on(channel(&conn, &q));
        let time = rt.block_on(raw_publish(&ch, &q));
        drop_queue(&ch, &q);
        time
    };
    let lua_publish = || {
        let q = fresh("lua-publish");
        let time = rt.block_on(run_host_until(
            &app(&dir, &q, false),
            Until::Published,
            PUBLISH_N,
        ));
        let ch = rt.block_on(channel(&conn, &q));
        drop_queue(&ch, &q);
        time
    };

    let mut group = c.benchmark_group("rabbitmq_consume");
    group.throughput(Throughput::Elements(CONSUME_N as u64));
    group.sample_size(10);
    group.bench_function("raw_lapin", |b| {
        b.iter_custom(|iters| drains(iters, &raw_lapin_drain))
    });
    group.bench_function("runtime_noop_lua", |b| {
        b.iter_custom(|iters| drains(iters, &runtime_drain))
    });
    group.finish();
    let mut group = c.benchmark_group("rabbitmq_publish");
    group.throughput(Throughput::Elements(PUBLISH_N as u64));
    group.sample_size(10);
    group.bench_function("raw_lapin_16_in_flight", |b| {
        b.iter_custom(|iters| drains(iters, &raw_lapin_publish))
    });
    group.bench_function("lua_publish_16_instances", |b| {
        b.iter_custom(|iters| drains(iters, &lua_publish))
    });
    group.finish();

    let mut group = c.benchmark_group("amqp10_consume");
    group.throughput(Throughput::Elements(CONSUME_N as u64));
    group.sample_size(10);
    group.bench_function("raw_fe2o3", |b| {
        b.iter_custom(|iters| {
            let mut connection = open_amqp10();
            let total = drains(iters, || raw_fe2o3_drain(&mut connection));
            rt.block_on(connection.close())
                .expect("close the AMQP 1.0 connection");
            total
        })
    });
    group.bench_function("runtime_noop_lua", |b| {
        b.iter_custom(|iters| drains(iters, &runtime_amqp10_drain))
    });
    group.finish();

    // The goals' ratios: the same drains and publishes in turns.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if in_turns_wanted(&args) {
        let mut figures = InTurnsFigures::new(IN_TURNS_FILE, ROUNDS_IN_TURNS);
        let wanted = |pair: &str| in_turns_pair_wanted(&args, pair);
        let messages = u64::from(ROUNDS_IN_TURNS) * CONSUME_N as u64;
        if wanted("rabbitmq_in_turns") {
            let (raw, runtime) = in_turns(ROUNDS_IN_TURNS, &raw_lapin_drain, &runtime_drain);
            figures.record("rabbitmq_in_turns/raw_lapin", messages, raw);
            figures.record("rabbitmq_in_turns/runtime_noop_lua", messages, runtime);
        }
        if wanted("amqp10_in_turns") {
            let mut connection = open_amqp10();
            let (raw, runtime) = in_turns(
                ROUNDS_IN_TURNS,
                || raw_fe2o3_drain(&mut connection),
                &runtime_amqp10_drain,
            );
            rt.block_on(connection.close())
                .expect("close the AMQP 1.0 connection");
            figures.record("amqp10_in_turns/raw_fe2o3", messages, raw);
            figures.record("amqp10_in_turns/runtime_noop_lua", messages, runtime);
        }
        if wanted("rabbitmq_publish_in_turns") {
            let published = u64::from(ROUNDS_IN_TURNS) * PUBLISH_N as u64;
            let (raw_cpu, lua_cpu) = (Cell::new(Duration::ZERO), Cell::new(Duration::ZERO));
            let (raw, lua) = in_turns(
                ROUNDS_IN_TURNS,
                counting_cpu(&raw_cpu, &raw_lapin_publish),
                counting_cpu(&lua_cpu, &lua_publish),
            );
            let raw_id = "rabbitmq_publish_in_turns/raw_lapin_16_in_flight";
            let lua_id = "rabbitmq_publish_in_turns/lua_publish_16_instances";
            figures.record(raw_id, published, raw);
            figures.record(lua_id, published, lua);
            figures.record_cpu(raw_id, published, raw_cpu.get());
            figures.record_cpu(lua_id, published, lua_cpu.get());
        }
        // A pass of some pairs only is for a quick look: it must not replace the
        // figures of a whole one, which `cargo xtask bench` reads.
        if in_turns_whole_pass(&args) {
            figures.write();
        } else {
            println!("in turns: some pairs only, {IN_TURNS_FILE} left as it was");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
