//! Publish -> consume -> ack of a small message through the memory driver, next to a
//! baseline that builds the same `Message` and passes it through a bounded tokio
//! channel. Run: `cargo bench -p queue-core --bench memory`.

use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use queue_core::memory::MemoryDriver;
use queue_core::{
    Codec, ConsumeOptions, Driver, HeaderValue, Headers, Message, QueueId, QueueSpec, Value,
};

const BATCH: usize = 1000;

fn small_message() -> Message {
    let body = Value::map([
        ("action", Value::from("send_email")),
        ("user_id", Value::Int(456)),
    ]);
    let headers = Headers::from_pairs([("priority", HeaderValue::from("high"))]);
    Message::encode(&body, headers, Codec::Json).expect("encodes")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Elements(BATCH as u64));

    group.bench_function("raw_tokio_channel", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(BATCH);
                let started = Instant::now();
                for _ in 0..iters {
                    for _ in 0..BATCH {
                        tx.send(small_message()).await.expect("open");
                    }
                    for _ in 0..BATCH {
                        std::hint::black_box(rx.recv().await.expect("message"));
                    }
                }
                started.elapsed()
            })
        })
    });

    let driver = Arc::new(MemoryDriver::new());
    let id = QueueId::parse("bench:memory").expect("valid id");
    group.bench_function("memory_driver", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                driver
                    .declare(&QueueSpec::new(id.clone()))
                    .await
                    .expect("declare");
                let options = ConsumeOptions {
                    prefetch: BATCH as u32,
                };
                let mut sub = driver.consume(&id, options).await.expect("consume");
                let started = Instant::now();
                for _ in 0..iters {
                    for _ in 0..BATCH {
                        driver.publish(&id, small_message()).await.expect("publish");
                    }
                    for _ in 0..BATCH {
                        let d = sub.next().await.expect("open").expect("delivery");
                        d.ack().await.expect("ack");
                    }
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
