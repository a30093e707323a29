//! Latency from publish to the start of the handler, at fixed offered rates of 2,000
//! and 10,000 msg/s, for three setups in the same run:
//!
//! - `runtime_memory`: the runtime on the memory driver, one consumer (concurrency 16,
//!   prefetch 100), whose no-op Lua handler first calls `bench_started(payload.sent)`,
//!   a Rust function embedded with `HostOptions::lua_setup` that records the latency;
//! - `runtime_rabbitmq`: the same consumer on RabbitMQ through the AMQP 0-9-1 driver
//!   (`queue.driver.amqp`, prefetch 1000), the messages published by raw lapin;
//! - `raw_lapin`: a raw lapin consumer (prefetch 1000, acking each delivery) fed the
//!   same way, recording publish -> delivery: what the broker and the client cost
//!   without the runtime.
//!
//! Open loop, so that a slow consumer cannot slow the publisher down and hide its own
//! latency (coordinated omission): a publisher thread sends on a precomputed schedule,
//! message `i` due at `start + i / rate`, without waiting for any consumer, and each
//! message carries its *scheduled* send time (`{"sent": NS}`, nanoseconds since an
//! `Instant` the whole process shares). Latency is measured from that scheduled time,
//! so a publisher that falls behind (a busy machine, a publish that blocks) shows up
//! as latency rather than as a lower offered rate. The publisher sleeps with the OS
//! timer, whose lateness (tens of µs on Linux, milliseconds now and then on a busy or
//! virtual machine) is counted in the figures too; each line also prints how late the
//! publisher itself was (`send lag`), the part of the latency that is not the
//! consumer's.
//!
//! Each run sends for 0.5 s of warm-up (delivered, not recorded), then records for 5 s
//! (1 s with `--quick`, or with `QUEUE_BENCH_QUICK=1`; also when run without cargo
//! bench's `--bench` argument, as `cargo test --benches` does). Latencies are recorded
//! in nanoseconds into an `hdrhistogram::Histogram<u64>` (3 significant digits) and
//! reported in µs. Output: one line per setup and rate (p50, p99, p99.9, max, count),
//! and `target/bench/latency.json`, an array of `{setup, rate, count, p50_us, p99_us,
//! p999_us, max_us}` that `cargo xtask bench` reads.
//!
//! The RabbitMQ setups use 127.0.0.1:5672 (guest/guest) and are skipped, with a line
//! saying so, when nothing answers there; the queues they create are deleted. Every
//! wait has a deadline that fails the bench with a message saying what did not happen.
//!
//! Run: `cargo bench -p queue-runtime --bench latency [-- --quick]`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use queue_core::{Headers, Message, QueueId};
use queue_runtime::host::{Host, HostOptions, LuaSetup};
use queue_runtime::registry::{self, DriverKinds};
use tokio::runtime::Runtime;

use queue_testkit::bench::target_dir;

/// The allocator the `queue-runtime` binary runs with, so the bench measures it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const RATES: [u64; 2] = [2_000, 10_000];
const WARM_UP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(5);
const MEASURE_QUICK: Duration = Duration::from_secs(1);
/// How long the last messages may take to arrive after the last scheduled send.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// One publish, connecting, declaring, starting or stopping the runtime.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The highest latency the histograms hold (higher values count as this).
const HIGHEST_NS: u64 = 120_000_000_000;

/// The clock every send time is measured on, shared by the publisher and the handlers.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("histogram bounds")
}

/// Where the receiving side (Lua handlers on every worker thread, or the raw lapin
/// consumer) records.
struct Recorder {
    /// Latencies in nanoseconds.
    histogram: Mutex<Histogram<u64>>,
    /// Messages scheduled before this (ns since [`EPOCH`]) are the warm-up: counted as
    /// received, not recorded. `u64::MAX` until the schedule is known.
    record_from: AtomicU64,
    received: AtomicU64,
}

impl Recorder {
    fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            histogram: Mutex::new(histogram()),
            record_from: AtomicU64::new(u64::MAX),
            received: AtomicU64::new(0),
        })
    }

    fn record(&self, sent_ns: u64) {
        let now = now_ns();
        if sent_ns >= self.record_from.load(Ordering::Acquire) {
            self.histogram
                .lock()
                .expect("histogram lock")
                .saturating_record(now.saturating_sub(sent_ns));
        }
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    /// Embeds `bench_started(sent_ns)` into every worker's Lua state.
    fn lua_setup(self: &Arc<Self>) -> LuaSetup {
        let recorder = Arc::clone(self);
        Arc::new(move |host: &queue_lua::LuaHost| {
            let recorder = Arc::clone(&recorder);
            let started = host
                .lua()
                .create_function(move |_, sent: i64| {
                    recorder.record(u64::try_from(sent).unwrap_or(0));
                    Ok(())
                })
                .map_err(|e| queue_core::Error::internal(e.to_string()))?;
            host.embed("bench_started", started)
        })
    }
}

fn body(sent_ns: u64) -> Vec<u8> {
    format!("{{\"sent\":{sent_ns}}}").into_bytes()
}

#[derive(serde::Deserialize)]
struct Sent {
    sent: u64,
}

/// One setup at one rate.
struct Outcome {
    setup: &'static str,
    rate: u64,
    latency: Histogram<u64>,
    /// How late the publisher sent, against its schedule, in ns.
    send_lag: Histogram<u64>,
}

impl Outcome {
    fn us(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn line(&self) -> String {
        format!(
            "latency {:<17} {:>6} msg/s: p50 {:>9.1} µs  p99 {:>9.1} µs  p99.9 {:>9.1} µs  max {:>9.1} µs  count {:>6}  (send lag p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs)",
            self.setup,
            self.rate,
            self.us(0.5),
            self.us(0.99),
            self.us(0.999),
            self.latency.max() as f64 / 1000.0,
            self.latency.len(),
            self.send_lag.value_at_quantile(0.5) as f64 / 1000.0,
            self.send_lag.value_at_quantile(0.99) as f64 / 1000.0,
            self.send_lag.max() as f64 / 1000.0,
        )
    }

    fn json(&self) -> serde_json::Value {
        let round = |v: f64| (v * 10.0).round() / 10.0;
        serde_json::json!({
            "setup": self.setup,
            "rate": self.rate,
            "count": self.latency.len(),
            "p50_us": round(self.us(0.5)),
            "p99_us": round(self.us(0.99)),
            "p999_us": round(self.us(0.999)),
            "max_us": round(self.latency.max() as f64 / 1000.0),
        })
    }
}

/// Sends `rate` messages per second for the warm-up and `measure`, from a thread of
/// its own, with `send(scheduled_ns)` (which must return once the message is handed
/// over), then waits until `recorder` received them all.
fn drive(
    setup: &'static str,
    recorder: &Recorder,
    rate: u64,
    measure: Duration,
    send: impl FnMut(u64) + Send,
) -> Outcome {
    let total = WARM_UP + measure;
    let count = (total.as_nanos() as u64 * rate) / 1_000_000_000;
    let period_ns = 1_000_000_000 / rate;
    // A little ahead, so that the first message is not late already.
    let start_ns = now_ns() + 5_000_000;
    recorder
        .record_from
        .store(start_ns + WARM_UP.as_nanos() as u64, Ordering::Release);
    let send_lag = std::thread::scope(|scope| {
        let publisher = scope.spawn(move || {
            let mut send = send;
            let mut lag = histogram();
            for i in 0..count {
                let due = start_ns + i * period_ns;
                let now = now_ns();
                if due > now {
                    std::thread::sleep(Duration::from_nanos(due - now));
                }
                lag.saturating_record(now_ns().saturating_sub(due).max(1));
                send(due);
            }
            lag
        });
        publisher.join().expect("the publisher thread panicked")
    });
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while recorder.received.load(Ordering::Acquire) < count {
        assert!(
            Instant::now() < deadline,
            "{setup} at {rate} msg/s: {} of {count} messages were received within {DRAIN_TIMEOUT:?} of the last send",
            recorder.received.load(Ordering::Acquire)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let latency = recorder.histogram.lock().expect("histogram lock").clone();
    Outcome {
        setup,
        rate,
        latency,
        send_lag,
    }
}

/// Runs `future` on `rt`, failing the bench if it takes longer than [`STEP_TIMEOUT`].
fn bounded<F: Future>(rt: &tokio::runtime::Handle, what: &str, future: F) -> F::Output {
    // The timer is created inside the runtime: the publisher thread is not in one.
    rt.block_on(async { tokio::time::timeout(STEP_TIMEOUT, future).await })
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP_TIMEOUT:?}"))
}

/// Deletes a RabbitMQ setup's queue and closes the channel that declared it.
fn delete_and_close(handle: &tokio::runtime::Handle, ch: &Channel, queue: &str) {
    bounded(
        handle,
        "deleting the queue",
        ch.queue_delete(queue.into(), QueueDeleteOptions::default()),
    )
    .expect("delete the queue");
    bounded(handle, "closing the channel", ch.close(200, "OK".into())).expect("close");
}

/// Writes the app: `driver` (YAML entries, empty for the embedded memory driver), a
/// queue and a consumer of it with concurrency 16.
fn app(dir: &Path, name: &str, driver: &str, queue: &str, prefetch: u32) -> PathBuf {
    std::fs::write(
        dir.join("latency.lua"),
        "function handle(payload)\n  bench_started(payload.sent)\nend\n",
    )
    .expect("write the handler");
    let yaml = format!(
        "namespace: bench\nentries:\n{driver}  - name: q\n    kind: queue.queue\n{queue}  - name: w\n    kind: queue.consumer\n    queue: q\n    source: latency.lua\n    method: handle\n    concurrency: 16\n    prefetch: {prefetch}\n"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).expect("write the app");
    path
}

async fn start(path: &Path, recorder: &Arc<Recorder>) -> Host {
    let kinds = DriverKinds::builtin();
    let config = queue_runtime::config::load(&[path.to_path_buf()]).expect("config");
    let plan = registry::plan(&config, &kinds, false).expect("plan");
    let options = HostOptions {
        lua_setup: Some(recorder.lua_setup()),
        ..HostOptions::default()
    };
    Host::start(plan, &kinds, options)
        .await
        .expect("start the runtime")
}

fn runtime_memory(rt: &Runtime, dir: &Path, rate: u64, measure: Duration) -> Outcome {
    let recorder = Recorder::new();
    let path = app(
        dir,
        &format!("memory-{rate}"),
        "",
        "    max_length: 1000000\n",
        100,
    );
    let handle = rt.handle();
    let host = bounded(handle, "starting the runtime", start(&path, &recorder));
    let q = QueueId::parse("bench:q").expect("id");
    let driver = host.queues().get(&q).expect("declared").driver.clone();
    let outcome = drive("runtime_memory", &recorder, rate, measure, |due| {
        let message = Message::from_bytes(body(due), Headers::new(), "application/json");
        bounded(handle, "a memory publish", driver.publish(&q, message)).expect("publish");
    });
    bounded(handle, "stopping the runtime", host.shutdown());
    outcome
}

/// A raw lapin publisher: `send` for [`drive`] publishing to `queue` without confirms.
///
/// Each publish runs as a task of its own, so the publisher thread only hands it over:
/// awaiting each `basic_publish` in turn (it returns once lapin's I/O loop took the
/// frames) costs a thread round trip per message and could not keep 10,000 msg/s on
/// schedule here. A failed publish panics its task; the message then never arrives
/// and [`drive`] fails at its deadline.
fn lapin_sender<'a>(
    rt: &'a tokio::runtime::Handle,
    ch: &'a Channel,
    queue: &'a str,
) -> impl FnMut(u64) + Send + 'a {
    let props = BasicProperties::default().with_content_type("application/json".into());
    move |due| {
        let (ch, queue, props) = (ch.clone(), queue.to_string(), props.clone());
        rt.spawn(async move {
            // Without confirm_select the returned confirmation is `NotRequested`.
            let body = body(due);
            let publish = ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            );
            tokio::time::timeout(STEP_TIMEOUT, publish)
                .await
                .expect("a lapin publish did not finish in time")
                .expect("publish");
        });
    }
}

fn runtime_rabbitmq(
    rt: &Runtime,
    publisher: &Connection,
    dir: &Path,
    rate: u64,
    measure: Duration,
) -> Outcome {
    let recorder = Recorder::new();
    let queue = format!("bench-latency-runtime-{}-{rate}", std::process::id());
    let path = app(
        dir,
        &format!("rabbitmq-{rate}"),
        &format!("  - name: rabbit\n    kind: queue.driver.amqp\n    url: {URL}\n"),
        &format!("    queue_name: {queue}\n    durable: false\n    dead_letter: false\n"),
        1000,
    );
    let handle = rt.handle();
    // The runtime declares the queue.
    let host = bounded(handle, "starting the runtime", start(&path, &recorder));
    let ch = bounded(handle, "opening a channel", publisher.create_channel()).expect("channel");
    let outcome = drive(
        "runtime_rabbitmq",
        &recorder,
        rate,
        measure,
        lapin_sender(handle, &ch, &queue),
    );
    bounded(handle, "stopping the runtime", host.shutdown());
    delete_and_close(handle, &ch, &queue);
    outcome
}

fn raw_lapin(
    rt: &Runtime,
    publisher: &Connection,
    consumer: &Connection,
    rate: u64,
    measure: Duration,
) -> Outcome {
    let recorder = Recorder::new();
    let queue = format!("bench-latency-raw-{}-{rate}", std::process::id());
    let handle = rt.handle();
    let sub = bounded(handle, "opening a channel", consumer.create_channel()).expect("channel");
    bounded(
        handle,
        "declaring the queue",
        sub.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .expect("declare");
    bounded(
        handle,
        "basic.qos",
        sub.basic_qos(1000, BasicQosOptions::default()),
    )
    .expect("qos");
    let mut deliveries = bounded(
        handle,
        "basic.consume",
        sub.basic_consume(
            queue.as_str().into(),
            "bench-latency".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .expect("consume");
    let receiving = Arc::clone(&recorder);
    // Ends when the channel closes.
    let task = rt.spawn(async move {
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery.expect("delivery");
            let sent: Sent = serde_json::from_slice(&delivery.data).expect("a {\"sent\": ns} body");
            receiving.record(sent.sent);
            // Each ack in a task of its own: awaiting it here (it returns once lapin's
            // I/O loop took the frame, a thread round trip) before taking the next
            // delivery held this consumer below 10,000 msg/s on this machine.
            tokio::spawn(async move {
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            });
        }
    });
    let ch = bounded(handle, "opening a channel", publisher.create_channel()).expect("channel");
    let outcome = drive(
        "raw_lapin",
        &recorder,
        rate,
        measure,
        lapin_sender(handle, &ch, &queue),
    );
    bounded(
        handle,
        "closing the consumer's channel",
        sub.close(200, "OK".into()),
    )
    .expect("close");
    bounded(handle, "the consumer task", task).expect("the consumer task panicked");
    delete_and_close(handle, &ch, &queue);
    outcome
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("QUEUE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
        || !args.iter().any(|a| a == "--bench");
    let measure = if quick { MEASURE_QUICK } else { MEASURE };
    LazyLock::force(&EPOCH);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("queue-latency-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    println!(
        "latency: publish -> handler start, open loop, {:?} warm-up + {measure:?} recorded per run",
        WARM_UP
    );

    let mut outcomes = Vec::new();
    for rate in RATES {
        let outcome = runtime_memory(&rt, &dir, rate, measure);
        println!("{}", outcome.line());
        outcomes.push(outcome);
    }

    let reachable = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], 5672)),
        Duration::from_secs(2),
    )
    .is_ok();
    if reachable {
        let connect = || {
            bounded(
                rt.handle(),
                "connecting to RabbitMQ",
                Connection::connect(URL, ConnectionProperties::default()),
            )
            .expect("connect to RabbitMQ")
        };
        let (publisher, consumer) = (connect(), connect());
        for rate in RATES {
            let outcome = runtime_rabbitmq(&rt, &publisher, &dir, rate, measure);
            println!("{}", outcome.line());
            outcomes.push(outcome);
            let outcome = raw_lapin(&rt, &publisher, &consumer, rate, measure);
            println!("{}", outcome.line());
            outcomes.push(outcome);
        }
        for conn in [publisher, consumer] {
            bounded(
                rt.handle(),
                "closing the connection",
                conn.close(200, "OK".into()),
            )
            .expect("close the connection");
        }
    } else {
        println!(
            "skipped: RabbitMQ is not reachable on 127.0.0.1:5672 (runtime_rabbitmq, raw_lapin)"
        );
    }

    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    let json: Vec<serde_json::Value> = outcomes.iter().map(Outcome::json).collect();
    let path = out.join("latency.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json"))
        .expect("write latency.json");
    println!("wrote {}", path.display());
    let _ = std::fs::remove_dir_all(&dir);
}
