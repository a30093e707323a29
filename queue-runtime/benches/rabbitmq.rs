//! The runtime on RabbitMQ next to raw lapin, in the same run:
//!
//! - consume: 20,000 messages waiting in a queue, drained by the runtime with a no-op
//!   Lua handler (concurrency 16, prefetch 1000), vs raw lapin consuming with the same
//!   prefetch and `ack(multiple)` every 100. The runtime's time includes starting it.
//! - publish: 10,000 confirmed publishes from Lua, a `process.lua` with 16 instances
//!   each awaiting its confirms, vs raw lapin with 16 publishers each awaiting theirs.
//!   The runtime's time includes starting it.
//!
//! Run: `cargo bench -p queue-runtime --bench rabbitmq` (skips without RabbitMQ).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use queue_runtime::host::{Host, HostOptions};
use queue_runtime::registry::{self, DriverKinds};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
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

async fn raw_consume(conn: &Connection, queue: &str, n: usize) {
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
    for i in 1..=n {
        let d = consumer.next().await.expect("open").expect("delivery");
        if i % 100 == 0 || i == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    ch.close(200, "OK".into()).await.expect("close");
}

async fn raw_publish(ch: &Channel, queue: &str) {
    let per = PUBLISH_N / IN_FLIGHT;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let publishers = (0..IN_FLIGHT).map(|p| {
        let props = props.clone();
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
            }
        }
    });
    futures_util::future::join_all(publishers).await;
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

async fn run_host(path: &std::path::Path) {
    let kinds = DriverKinds::builtin();
    let config = queue_runtime::config::load(&[path.to_path_buf()]).expect("config");
    let plan = registry::plan(&config, &kinds, false).expect("plan");
    let host = Host::start(plan, &kinds, HostOptions::default())
        .await
        .expect("start");
    host.wait_idle().await.expect("idle");
    host.shutdown().await;
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
    let mut round = 0;
    let mut fresh = |label: &str| {
        round += 1;
        format!("bench-{label}-{}-{round}", std::process::id())
    };
    let drop_queue = |ch: &Channel, q: &str| {
        rt.block_on(ch.queue_delete(q.into(), QueueDeleteOptions::default()))
            .expect("delete");
    };

    let mut group = c.benchmark_group("rabbitmq_consume");
    group.throughput(Throughput::Elements(CONSUME_N as u64));
    group.sample_size(10);
    group.bench_function("raw_lapin", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let q = fresh("raw-consume");
                let ch = rt.block_on(channel(&conn, &q));
                rt.block_on(fill(&ch, &q, CONSUME_N));
                let started = Instant::now();
                rt.block_on(raw_consume(&conn, &q, CONSUME_N));
                total += started.elapsed();
                drop_queue(&ch, &q);
            }
            total
        })
    });
    group.bench_function("runtime_noop_lua", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let q = fresh("runtime-consume");
                let ch = rt.block_on(channel(&conn, &q));
                rt.block_on(fill(&ch, &q, CONSUME_N));
                let path = app(&dir, &q, true);
                let started = Instant::now();
                rt.block_on(run_host(&path));
                total += started.elapsed();
                drop_queue(&ch, &q);
            }
            total
        })
    });
    group.finish();

    let mut group = c.benchmark_group("rabbitmq_publish");
    group.throughput(Throughput::Elements(PUBLISH_N as u64));
    group.sample_size(10);
    group.bench_function("raw_lapin_16_in_flight", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let q = fresh("raw-publish");
                let ch = rt.block_on(channel(&conn, &q));
                let started = Instant::now();
                rt.block_on(raw_publish(&ch, &q));
                total += started.elapsed();
                drop_queue(&ch, &q);
            }
            total
        })
    });
    group.bench_function("lua_publish_16_instances", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let q = fresh("lua-publish");
                let path = app(&dir, &q, false);
                let started = Instant::now();
                rt.block_on(run_host(&path));
                total += started.elapsed();
                let ch = rt.block_on(channel(&conn, &q));
                drop_queue(&ch, &q);
            }
            total
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
