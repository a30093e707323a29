//! Driver vs raw lapin, in one run, against RabbitMQ on 127.0.0.1:5672.
//!
//! * publish: 100,000 messages of 32 bytes with confirms, through
//!   `Driver::publish_batch` vs a hand-written lapin loop keeping the same window of
//!   unconfirmed messages (1000), both persistent and mandatory;
//! * consume + ack: 100,000 messages with prefetch 1000, through the driver's
//!   subscription (ack per delivery; the driver batches) vs lapin with one
//!   `ack(multiple)` every 100 deliveries.
//!
//! Skips (printing why) when the broker is not reachable.

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

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const N: usize = 100_000;
const WINDOW: usize = 1000;
const PREFETCH: u16 = 1000;
const BODY: &[u8] = b"{\"n\":1234567,\"pad\":\"xxxxxxxxxx\"}";

fn messages() -> Vec<Message> {
    (0..N)
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

    let mut group = c.benchmark_group("amqp091");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(N as u64));

    group.bench_function("publish_100k/driver", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batch = messages();
                let start = Instant::now();
                rt.block_on(driver.publish_batch(&id, batch)).unwrap();
                total += start.elapsed();
                purge(&driver_q);
            }
            total
        })
    });
    group.bench_function("publish_100k/raw_lapin", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                rt.block_on(raw_publish(&raw_ch, &raw_q, N));
                total += start.elapsed();
                purge(&raw_q);
            }
            total
        })
    });
    group.bench_function("consume_ack_100k/driver", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(raw_publish(&raw_ch, &driver_q, N));
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
                    for _ in 0..N {
                        let d = sub.next().await.unwrap().unwrap();
                        d.ack().await.unwrap();
                    }
                    sub.cancel().await.unwrap();
                });
                total += start.elapsed();
                purge(&driver_q);
            }
            total
        })
    });
    group.bench_function("consume_ack_100k/raw_lapin", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(raw_publish(&raw_ch, &raw_q, N));
                let start = Instant::now();
                rt.block_on(raw_consume(&conn, &raw_q, N));
                total += start.elapsed();
                purge(&raw_q);
            }
            total
        })
    });
    group.finish();

    // The machine is shared: load changes between the groups above. Paired rounds,
    // driver and raw back to back (alternating which goes first), give ratios that
    // the load affects far less.
    let mut publish_ratios = Vec::new();
    let mut consume_ratios = Vec::new();
    for round in 0..5 {
        let driver_publish = || {
            let batch = messages();
            let start = Instant::now();
            rt.block_on(driver.publish_batch(&id, batch)).unwrap();
            let t = start.elapsed();
            purge(&driver_q);
            t
        };
        let raw_publish_once = || {
            let start = Instant::now();
            rt.block_on(raw_publish(&raw_ch, &raw_q, N));
            let t = start.elapsed();
            purge(&raw_q);
            t
        };
        let (d, r) = if round % 2 == 0 {
            let d = driver_publish();
            (d, raw_publish_once())
        } else {
            let r = raw_publish_once();
            (driver_publish(), r)
        };
        publish_ratios.push(r.as_secs_f64() / d.as_secs_f64());

        let driver_consume = || {
            rt.block_on(raw_publish(&raw_ch, &driver_q, N));
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
                for _ in 0..N {
                    let d = sub.next().await.unwrap().unwrap();
                    d.ack().await.unwrap();
                }
                sub.cancel().await.unwrap();
            });
            let t = start.elapsed();
            purge(&driver_q);
            t
        };
        let raw_consume_once = || {
            rt.block_on(raw_publish(&raw_ch, &raw_q, N));
            let start = Instant::now();
            rt.block_on(raw_consume(&conn, &raw_q, N));
            let t = start.elapsed();
            purge(&raw_q);
            t
        };
        let (d, r) = if round % 2 == 0 {
            let d = driver_consume();
            (d, raw_consume_once())
        } else {
            let r = raw_consume_once();
            (driver_consume(), r)
        };
        consume_ratios.push(r.as_secs_f64() / d.as_secs_f64());
        println!(
            "paired round {round}: publish driver/raw throughput {:.2}, consume+ack driver/raw throughput {:.2}",
            publish_ratios[round], consume_ratios[round]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "paired median (5 rounds of {N}): publish driver/raw = {:.2}x, consume+ack driver/raw = {:.2}x",
        median(&mut publish_ratios),
        median(&mut consume_ratios)
    );

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
