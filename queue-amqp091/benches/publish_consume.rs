//! Driver vs raw lapin, in one run, against RabbitMQ on 127.0.0.1:5672.
//!
//! * publish: 100,000 messages of 32 bytes with confirms, through
//!   `Driver::publish_batch` vs a hand-written lapin loop keeping the same window of
//!   unconfirmed messages (1000), both persistent and mandatory;
//! * consume + ack: 100,000 messages with prefetch 1000, through the driver's
//!   subscription (ack per delivery; the driver batches) vs lapin with one
//!   `ack(multiple)` every 100 deliveries.
//!
//! After criterion's groups, both pairs run again in turns (24 rounds of 20,000
//! messages a side, the side that goes first alternating), so that this machine's
//! drift between criterion's benchmarks does not decide their ratios; the figures go
//! to `target/bench/in_turns-amqp091.json`, from which `cargo xtask bench` takes its
//! AMQP 0-9-1 driver rows (docs/performance.md, "Measuring in turns"), with the CPU
//! time per message of each side of the publish pair. Only the pass:
//! `cargo bench -p queue-amqp091 --bench publish_consume -- in_turns`.
//!
//! Skips (printing why) when the broker is not reachable.

use std::cell::Cell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use queue_amqp091::{Amqp091Config, Amqp091Driver};
use queue_core::{Driver, Headers, Message, QueueId, QueueSpec};
use queue_testkit::bench::{InTurnsFigures, counting_cpu, in_turns, in_turns_wanted};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const N: usize = 100_000;
/// Where the pass in turns writes its figures, under `target/bench/`, for `cargo
/// xtask bench`.
const IN_TURNS_FILE: &str = "in_turns-amqp091.json";
/// Rounds of the pass in turns, and messages per side and round.
const ROUNDS_IN_TURNS: u32 = 24;
const N_IN_TURNS: usize = 20_000;
const WINDOW: usize = 1000;
const PREFETCH: u16 = 1000;
const BODY: &[u8] = b"{\"n\":1234567,\"pad\":\"xxxxxxxxxx\"}";

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|_| Message::from_bytes(BODY.to_vec(), Headers::new(), "application/json"))
        .collect()
}

async fn raw_channel(conn: &Connection, queue: &str) -> Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch
}

/// The careful hand-written publisher: pipelined confirms, `WINDOW` in flight.
async fn raw_publish(ch: &Channel, queue: &str, n: usize) {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    for _ in 0..n {
        if in_flight.len() == WINDOW {
            let confirm: lapin::PublisherConfirm = in_flight.pop_front().unwrap();
            assert!(confirm.await.unwrap().is_ack());
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                BODY,
                props.clone(),
            )
            .await
            .unwrap();
        in_flight.push_back(confirm);
    }
    for confirm in in_flight {
        assert!(confirm.await.unwrap().is_ack());
    }
}

/// The careful hand-written consumer: prefetch, one `ack(multiple)` per 100.
async fn raw_consume(conn: &Connection, queue: &str, n: usize) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "raw-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 1..=n {
        let d = consumer.next().await.unwrap().unwrap();
        if i % 100 == 0 || i == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    ch.close(200, "OK".into()).await.unwrap();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let setup = rt.block_on(async {
        let mut config = Amqp091Config::new(URL);
        config.confirm_window = WINDOW;
        config.publish_timeout = Duration::from_secs(60);
        let driver = match Amqp091Driver::connect(config).await {
            Ok(d) => d,
            Err(e) => {
                println!("skipped: RabbitMQ at 127.0.0.1:5672 is not reachable: {e}");
                return None;
            }
        };
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        Some((driver, conn))
    });
    let Some((driver, conn)) = setup else { return };
    let driver_q = format!("amqp091-bench-driver-{}", std::process::id());
    let raw_q = format!("amqp091-bench-raw-{}", std::process::id());
    let id = QueueId::new("bench", &driver_q).unwrap();
    let (raw_ch, purge_ch) = rt.block_on(async {
        driver
            .declare(
                &QueueSpec::new(id.clone())
                    .with_name(&driver_q)
                    .with_durable(false),
            )
            .await
            .unwrap();
        let raw_ch = raw_channel(&conn, &raw_q).await;
        raw_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        (raw_ch, conn.create_channel().await.unwrap())
    });
    let purge = |q: &str| {
        rt.block_on(purge_ch.queue_purge(q.into(), QueuePurgeOptions::default()))
            .unwrap();
    };

    // One timed run of each side, for `n` messages; each leaves its queue empty.
    let driver_publish = |n: usize| {
        let batch = messages(n);
        let start = Instant::now();
        rt.block_on(driver.publish_batch(&id, batch)).unwrap();
        let time = start.elapsed();
        purge(&driver_q);
        time
    };
    let raw_publish_once = |n: usize| {
        let start = Instant::now();
        rt.block_on(raw_publish(&raw_ch, &raw_q, n));
        let time = start.elapsed();
        purge(&raw_q);
        time
    };
    let driver_consume = |n: usize| {
        rt.block_on(raw_publish(&raw_ch, &driver_q, n));
        let start = Instant::now();
        rt.block_on(async {
            let mut sub = driver
                .consume(
                    &id,
                    queue_core::ConsumeOptions {
                        prefetch: u32::from(PREFETCH),
                    },
                )
                .await
                .unwrap();
            for _ in 0..n {
                let d = sub.next().await.unwrap().unwrap();
                d.ack().await.unwrap();
            }
            sub.cancel().await.unwrap();
        });
        let time = start.elapsed();
        purge(&driver_q);
        time
    };
    let raw_consume_once = |n: usize| {
        rt.block_on(raw_publish(&raw_ch, &raw_q, n));
        let start = Instant::now();
        rt.block_on(raw_consume(&conn, &raw_q, n));
        let time = start.elapsed();
        purge(&raw_q);
        time
    };
    let samples = |iters: u64, run: &dyn Fn(usize) -> Duration| -> Duration {
        (0..iters).map(|_| run(N)).sum()
    };

    let mut group = c.benchmark_group("amqp091");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("publish_100k/driver", |b| {
        b.iter_custom(|iters| samples(iters, &driver_publish))
    });
    group.bench_function("publish_100k/raw_lapin", |b| {
        b.iter_custom(|iters| samples(iters, &raw_publish_once))
    });
    group.bench_function("consume_ack_100k/driver", |b| {
        b.iter_custom(|iters| samples(iters, &driver_consume))
    });
    group.bench_function("consume_ack_100k/raw_lapin", |b| {
        b.iter_custom(|iters| samples(iters, &raw_consume_once))
    });
    group.finish();

    // The goals' ratios: each pair in turns, a run of each side per round, the side
    // that goes first alternating, so that this machine's drift between criterion's
    // benchmarks does not decide them.
    if in_turns_wanted(&std::env::args().skip(1).collect::<Vec<_>>()) {
        let mut figures = InTurnsFigures::new(IN_TURNS_FILE, ROUNDS_IN_TURNS);
        let messages = u64::from(ROUNDS_IN_TURNS) * N_IN_TURNS as u64;
        // With the CPU each side's rounds cost the whole process, which shows a change
        // of a microsecond per message that the pair's throughput, bound by the
        // broker's round trips, hides.
        let (driver_cpu, raw_cpu) = (Cell::new(Duration::ZERO), Cell::new(Duration::ZERO));
        let (driver, raw) = in_turns(
            ROUNDS_IN_TURNS,
            counting_cpu(&driver_cpu, || driver_publish(N_IN_TURNS)),
            counting_cpu(&raw_cpu, || raw_publish_once(N_IN_TURNS)),
        );
        let (driver_id, raw_id) = (
            "amqp091_in_turns/publish/driver",
            "amqp091_in_turns/publish/raw_lapin",
        );
        figures.record(driver_id, messages, driver);
        figures.record(raw_id, messages, raw);
        figures.record_cpu(driver_id, messages, driver_cpu.get());
        figures.record_cpu(raw_id, messages, raw_cpu.get());
        let (driver, raw) = in_turns(
            ROUNDS_IN_TURNS,
            || driver_consume(N_IN_TURNS),
            || raw_consume_once(N_IN_TURNS),
        );
        figures.record("amqp091_in_turns/consume_ack/driver", messages, driver);
        figures.record("amqp091_in_turns/consume_ack/raw_lapin", messages, raw);
        figures.write();
    }

    rt.block_on(async {
        for q in [&driver_q, &raw_q] {
            let _ = purge_ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = driver.close().await;
        let _ = conn.close(200, "OK".into()).await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
