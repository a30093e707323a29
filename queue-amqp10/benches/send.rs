//! 50,000 confirmed sends through the driver vs raw fe2o3-amqp with the same window of
//! unsettled transfers, in one run, against RabbitMQ's AMQP 1.0 plugin on
//! 127.0.0.1:5672. Between samples (untimed) the driver drains the queue so the broker
//! does not grow. Skips (prints why) when RabbitMQ is not there.
//!
//! After criterion's group, the pair runs again in turns (16 rounds of 20,000 sends a
//! side, the side that goes first alternating), so that this machine's drift between
//! criterion's benchmarks does not decide its ratio; the figures go to
//! `target/bench/in_turns-amqp10-send.json`, from which `cargo xtask bench` takes its
//! AMQP 1.0 send row (docs/performance.md, "Measuring in turns"). Only the pass:
//! `cargo bench -p queue-amqp10 --bench send -- in_turns`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::types::messaging::{Message as AmqpMessage, MessageId, Properties};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Sendable, Sender, Session};
use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::{ConsumeOptions, Driver, Headers, Message, QueueId, QueueSpec};
use queue_testkit::bench::{InTurnsFigures, in_turns, in_turns_wanted};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672";
const SENDS: usize = 50_000;
/// Where the pass in turns writes its figures, under `target/bench/`, for `cargo
/// xtask bench`.
const IN_TURNS_FILE: &str = "in_turns-amqp10-send.json";
/// Rounds of the pass in turns, and sends per side and round.
const ROUNDS_IN_TURNS: u32 = 16;
const SENDS_IN_TURNS: usize = 20_000;
const WINDOW: u32 = 1000;
const BODY: &[u8] = b"{\"n\":12345,\"pad\":\"xxxxxxxxxxxx\"}";

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|_| Message::from_bytes(BODY.to_vec(), Headers::new(), "application/json"))
        .collect()
}

/// How long one sample's sends, or one drain, may take before the bench fails.
const LIMIT: Duration = Duration::from_secs(120);

/// Empties the queue through the driver (untimed). Not with a raw fe2o3 receiver on
/// automatic credit: against RabbitMQ 3.x's plugin, which overshoots credit, that is
/// what the driver manages credit by hand to avoid (docs/drivers/amqp10.md), and one
/// run of this bench with such a drain spun in fe2o3's session engine for twelve
/// minutes (2026-12-03).
async fn drain(driver: &Amqp10Driver, queue: &QueueId, count: usize) {
    let emptied = tokio::time::timeout(LIMIT, async {
        let mut sub = driver
            .consume(queue, ConsumeOptions { prefetch: WINDOW })
            .await
            .expect("consume");
        for _ in 0..count {
            let delivery = sub.next().await.expect("open").expect("delivery");
            delivery.ack().await.expect("ack");
        }
        sub.cancel().await.expect("cancel");
    })
    .await;
    emptied.expect("the drain between samples did not finish in time");
}

fn send(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let reachable = rt.block_on(async {
        tokio::net::TcpStream::connect(("127.0.0.1", 5672))
            .await
            .is_ok()
    });
    if !reachable {
        println!("skipped: RabbitMQ is not reachable on 127.0.0.1:5672");
        return;
    }
    let queue_name = format!("bench-amqp10-send-{}", std::process::id());
    let address = format!("/queue/{queue_name}");
    let (driver, queue) = rt.block_on(async {
        let mut config = Amqp10Config::new(URL, Profile::RabbitmqV1);
        config.confirm_window = WINDOW;
        config.publish_timeout = Duration::from_secs(60);
        let driver = Amqp10Driver::connect(config).await.expect("driver");
        let queue = QueueId::new("bench", &queue_name).expect("id");
        driver
            .declare(
                &QueueSpec::new(queue.clone())
                    .with_name(queue_name.clone())
                    .with_durable(false),
            )
            .await
            .expect("declare");
        (driver, queue)
    });

    // One timed run of each side, for `n` sends; the queue is drained after it,
    // untimed.
    let driver_sends = |n: usize| {
        rt.block_on(async {
            let batch = messages(n);
            let start = Instant::now();
            tokio::time::timeout(LIMIT, driver.publish_batch(&queue, batch))
                .await
                .expect("the driver's sends did not finish in time")
                .expect("publish");
            let time = start.elapsed();
            drain(&driver, &queue, n).await;
            time
        })
    };
    let mut raw = rt.block_on(RawSender::attach(&address));
    let raw_sends = |raw: &mut RawSender, n: usize| {
        rt.block_on(async {
            let batch = messages(n);
            let start = Instant::now();
            tokio::time::timeout(LIMIT, raw.send_all(batch))
                .await
                .expect("raw fe2o3-amqp's sends did not finish in time");
            let time = start.elapsed();
            drain(&driver, &queue, n).await;
            time
        })
    };

    let mut group = c.benchmark_group("amqp10_send_50k");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(criterion::Throughput::Elements(SENDS as u64));
    group.bench_function("driver", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| driver_sends(SENDS)).sum())
    });
    group.bench_function("raw_fe2o3", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| raw_sends(&mut raw, SENDS)).sum())
    });
    group.finish();

    // The goal's ratio: the pair in turns, a run of each side per round, the side
    // that goes first alternating, so that this machine's drift between criterion's
    // benchmarks does not decide it.
    if in_turns_wanted(&std::env::args().skip(1).collect::<Vec<_>>()) {
        let mut figures = InTurnsFigures::new(IN_TURNS_FILE, ROUNDS_IN_TURNS);
        let messages = u64::from(ROUNDS_IN_TURNS) * SENDS_IN_TURNS as u64;
        let (driver_time, raw_time) = in_turns(
            ROUNDS_IN_TURNS,
            || driver_sends(SENDS_IN_TURNS),
            || raw_sends(&mut raw, SENDS_IN_TURNS),
        );
        figures.record("amqp10_send_in_turns/driver", messages, driver_time);
        figures.record("amqp10_send_in_turns/raw_fe2o3", messages, raw_time);
        figures.write();
    }
    rt.block_on(async {
        raw.close().await;
        driver.close().await.expect("close");
    });
}

/// The careful hand-written sender: one connection, session and link, kept across
/// runs as the driver keeps its own.
struct RawSender {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    sender: Sender,
}

impl RawSender {
    async fn attach(address: &str) -> RawSender {
        // TCP_NODELAY, as the driver's connection has it.
        let mut connection = queue_fixtures::raw_amqp10::open(
            "bench-raw",
            queue_fixtures::rabbitmq::SHARED_AMQP10_URL,
        )
        .await
        .expect("connect");
        let mut session = Session::begin(&mut connection).await.expect("session");
        let sender = Sender::attach(&mut session, "bench-raw", address)
            .await
            .expect("sender");
        RawSender {
            connection,
            session,
            sender,
        }
    }

    /// The same work per message as the driver: build the AMQP message (id, content
    /// type, data section), send with the same window of unsettled transfers.
    async fn send_all(&mut self, batch: Vec<Message>) {
        let mut pending: VecDeque<DeliveryFut<Result<Outcome, SendError>>> =
            VecDeque::with_capacity(WINDOW as usize);
        for m in batch {
            let amqp = AmqpMessage::builder()
                .properties(Properties {
                    message_id: Some(MessageId::String(m.id)),
                    content_type: Some(m.content_type.into()),
                    ..Properties::default()
                })
                .data(Binary::from(m.body))
                .build();
            if pending.len() == WINDOW as usize
                && let Some(fut) = pending.pop_front()
            {
                fut.await.expect("accepted");
            }
            let fut = self
                .sender
                .send_batchable(Sendable::from(amqp))
                .await
                .expect("send");
            pending.push_back(fut);
        }
        for fut in pending {
            fut.await.expect("accepted");
        }
    }

    async fn close(self) {
        let RawSender {
            mut connection,
            session,
            sender,
        } = self;
        let _ = sender.detach().await;
        // Dropped, not `end().await`ed: fe2o3's session engine spins until the
        // broker's end comes back while the handle is held (docs/drivers/amqp10.md,
        // "Closing"); dropping it sends the end all the same.
        drop(session);
        let _ = connection.close().await;
    }
}

criterion_group!(benches, send);
criterion_main!(benches);
