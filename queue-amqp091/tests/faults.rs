//! Fault tests: connection loss under load, against a PRIVATE RabbitMQ node this
//! harness starts on its own ports and data directory (never the shared 5672 node).
//!
//! The tests run one at a time (a process-wide lock), each with its own node, which
//! a guard stops and deletes even when the test fails.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use queue_amqp091::{AmqpConfig, AmqpDriver};
use queue_core::{Codec, Driver, ErrorKind, Headers, Message, QueueId, QueueSpec, Value};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// One fault test at a time: they start brokers and cut connections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NEXT_NODE: AtomicU64 = AtomicU64::new(0);

/// A RabbitMQ node of our own: loopback listener on a free port, fresh data dir.
struct PrivateNode {
    name: String,
    port: u16,
    dir: PathBuf,
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PrivateNode {
    /// Starts a node and waits until it accepts connections; `None` (after printing
    /// why) when RabbitMQ is not installed outside CI.
    async fn start() -> Option<PrivateNode> {
        if !std::path::Path::new(SERVER).exists() {
            if common::in_ci() {
                panic!("RabbitMQ ({SERVER}) is required in CI");
            }
            println!("skipped: RabbitMQ is not installed ({SERVER} missing)");
            return None;
        }
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let name = format!("amqp091faults{}x{n}@localhost", std::process::id());
        let port = free_port();
        let dist_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let dir = std::env::temp_dir().join(format!("amqp091-faults-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("node dir");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n"),
        )
        .expect("config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("env file");
        let log = std::fs::File::create(dir.join("server.out")).expect("log");
        let mut cmd = Command::new(SERVER);
        Self::env(&mut cmd, &name, &dir, port, dist_port);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server starts");
        let mut node = PrivateNode {
            name,
            port,
            dir,
            child,
        };
        node.wait_ready().await;
        Some(node)
    }

    fn env(cmd: &mut Command, name: &str, dir: &std::path::Path, port: u16, dist_port: u16) {
        let d = |f: &str| dir.join(f);
        cmd.env("HOME", dir) // a private Erlang cookie, shared with our rabbitmqctl calls
            .env("RABBITMQ_NODENAME", name)
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d("node.pid"))
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            );
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn port_open(&self) -> bool {
        tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_ok()
    }

    /// Polls the listener (`rabbitmq-diagnostics ping` passes before it is open).
    async fn wait_ready(&mut self) {
        let started = std::time::Instant::now();
        while !self.port_open().await {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("rabbitmq-server exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "private RabbitMQ did not open 127.0.0.1:{} within 120s:\n{}",
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `rabbitmqctl -n <node> args...` against this node only.
    async fn ctl(&self, args: &[&str]) {
        let mut cmd = Command::new(CTL);
        Self::env(&mut cmd, &self.name, &self.dir, self.port, 0);
        cmd.arg("-n").arg(&self.name).args(args);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("rabbitmqctl task")
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn stop_app_then_start(&mut self, outage: Duration) {
        self.ctl(&["stop_app"]).await;
        assert!(!self.port_open().await, "stop_app left the listener open");
        // The outage itself: the driver has to ride it out.
        tokio::time::sleep(outage).await;
        self.ctl(&["start_app"]).await;
        self.wait_ready().await;
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let mut cmd = Command::new(CTL);
        Self::env(&mut cmd, &self.name, &self.dir, self.port, 0);
        let _ = cmd
            .arg("-n")
            .arg(&self.name)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(node: &PrivateNode) -> AmqpConfig {
    let mut c = AmqpConfig::new(node.url());
    c.connection_name = Some("amqp091-faults".into());
    c.reconnect_delay = Duration::from_millis(200);
    c.reconnect_max_delay = Duration::from_secs(2);
    c.publish_timeout = Duration::from_secs(10);
    c.confirm_window = 500;
    c
}

fn numbered(n: i64) -> Message {
    Message::encode(
        &Value::map([("n", Value::Int(n))]),
        Headers::new(),
        Codec::Json,
    )
    .unwrap()
}

fn number_of(d: &queue_core::Delivery) -> i64 {
    match d.message().decode().unwrap().get("n") {
        Some(Value::Int(n)) => *n,
        other => panic!("not a numbered message: {other:?}"),
    }
}

#[derive(Default)]
struct Tally {
    confirmed: Mutex<HashSet<i64>>,
    seen: Mutex<HashMap<i64, u32>>,
    publish_retries: AtomicU64,
    ack_failures: AtomicU64,
}

const TOTAL: i64 = 20_000;
const PUBLISHERS: i64 = 16;

/// 20,000 confirmed publishes and a running consumer; `fault` strikes once 1,000
/// are confirmed. Every publish that returned Ok must be consumed at least once.
#[derive(Debug, Clone, Copy)]
enum Fault {
    CloseAllConnections,
    StopAppStartApp,
}

async fn survive(label: &str, node: &mut PrivateNode, fault: Fault) {
    let driver = Arc::new(AmqpDriver::connect(config(node)).await.expect("connect"));
    let id = QueueId::new("faults", label).unwrap();
    // Durable queue, persistent messages: they survive stop_app / start_app.
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let tally = Arc::new(Tally::default());
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);

    let mut sub = driver
        .consume(&id, queue_core::ConsumeOptions { prefetch: 200 })
        .await
        .unwrap();
    let consumer = {
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            while let Some(next) = sub.next().await {
                let Ok(d) = next else { continue };
                let n = number_of(&d);
                let distinct = {
                    let mut seen = tally.seen.lock().unwrap();
                    *seen.entry(n).or_default() += 1;
                    seen.len()
                };
                if d.ack().await.is_err() {
                    tally.ack_failures.fetch_add(1, Ordering::Relaxed);
                }
                progress_tx.send_replace(distinct);
            }
        })
    };

    let (confirmed_tx, mut confirmed_rx) = tokio::sync::watch::channel(0usize);
    let confirmed_tx = Arc::new(confirmed_tx);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (driver, id, tally, confirmed_tx) = (
            Arc::clone(&driver),
            id.clone(),
            Arc::clone(&tally),
            Arc::clone(&confirmed_tx),
        );
        publishers.push(tokio::spawn(async move {
            let mut n = p;
            while n < TOTAL {
                match driver.publish(&id, numbered(n)).await {
                    Ok(()) => {
                        let count = {
                            let mut c = tally.confirmed.lock().unwrap();
                            c.insert(n);
                            c.len()
                        };
                        confirmed_tx.send_replace(count);
                        n += PUBLISHERS;
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
                        assert!(e.retryable(), "{e}");
                        tally.publish_retries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    confirmed_rx.wait_for(|c| *c >= 1_000).await.unwrap();
    let generation_before = driver.connection_generation();
    match fault {
        Fault::CloseAllConnections => node.ctl(&["close_all_connections", "fault test"]).await,
        Fault::StopAppStartApp => node.stop_app_then_start(Duration::from_secs(2)).await,
    }
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(300), p)
            .await
            .expect("publishers finish")
            .expect("publisher task");
    }
    let generation_after_publishing = driver.connection_generation();
    assert!(
        generation_after_publishing > generation_before,
        "{label}: the fault did not strike while publishing (generation {generation_before} -> {generation_after_publishing})"
    );

    let confirmed: HashSet<i64> = tally.confirmed.lock().unwrap().clone();
    assert_eq!(confirmed.len(), TOTAL as usize);
    let all_seen = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            {
                let seen = tally.seen.lock().unwrap();
                if confirmed.iter().all(|n| seen.contains_key(n)) {
                    return;
                }
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let seen = tally.seen.lock().unwrap().clone();
    let missing: Vec<i64> = confirmed
        .iter()
        .filter(|n| !seen.contains_key(n))
        .copied()
        .collect();
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    println!(
        "{label}: {} confirmed, {} consumed distinct, {duplicates} duplicate deliveries, {} publish retries, {} failed acks, {} connections",
        confirmed.len(),
        seen.len(),
        tally.publish_retries.load(Ordering::Relaxed),
        tally.ack_failures.load(Ordering::Relaxed),
        driver.connection_generation(),
    );
    assert!(
        all_seen.is_ok() && missing.is_empty(),
        "{label}: {} confirmed messages never consumed, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    consumer.abort();
    driver.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_all_connections_under_load_loses_no_confirmed_message() {
    let _serial = SERIAL.lock().await;
    let Some(mut node) = PrivateNode::start().await else {
        return;
    };
    survive("close-all", &mut node, Fault::CloseAllConnections).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_app_start_app_under_load_loses_no_confirmed_message() {
    let _serial = SERIAL.lock().await;
    let Some(mut node) = PrivateNode::start().await else {
        return;
    };
    survive("stop-start", &mut node, Fault::StopAppStartApp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_by_itself_after_both_faults() {
    let _serial = SERIAL.lock().await;
    let Some(mut node) = PrivateNode::start().await else {
        return;
    };
    let mut c = config(&node);
    c.publish_timeout = Duration::from_secs(1);
    let driver = AmqpDriver::connect(c).await.expect("connect");
    let id = QueueId::new("faults", "resume").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();

    let mut next_n = 0;
    let mut round = |label: &'static str| {
        let first = next_n;
        next_n += 50;
        (label, first..first + 50)
    };
    async fn publish_until_ok(driver: &AmqpDriver, id: &QueueId, n: i64) {
        // Right after a fault the reconnect may still be under way.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match driver.publish(id, numbered(n)).await {
                Ok(()) => return,
                Err(e) if e.retryable() && tokio::time::Instant::now() < deadline => continue,
                Err(e) => panic!("publish {n}: {e}"),
            }
        }
    }
    async fn consume_all(
        sub: &mut Box<dyn queue_core::Subscription>,
        range: std::ops::Range<i64>,
        label: &str,
    ) {
        let mut want: HashSet<i64> = range.collect();
        while !want.is_empty() {
            let d = tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("{label}: the consumer did not resume; still missing {want:?}")
                })
                .expect("subscription open")
                .expect("delivery");
            want.remove(&number_of(&d));
            let _ = d.ack().await;
        }
    }

    let (label, range) = round("before any fault");
    for n in range.clone() {
        publish_until_ok(&driver, &id, n).await;
    }
    consume_all(&mut sub, range, label).await;

    node.ctl(&["close_all_connections", "fault test"]).await;
    let (label, range) = round("after close_all_connections");
    for n in range.clone() {
        publish_until_ok(&driver, &id, n).await;
    }
    consume_all(&mut sub, range, label).await;

    node.ctl(&["stop_app"]).await;
    // While the broker is down, a publish waits publish_timeout, then fails retryable.
    let err = driver.publish(&id, numbered(-1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.retryable(), "{err}");
    assert!(!err.to_string().contains("guest:guest"), "{err}");
    node.ctl(&["start_app"]).await;
    node.wait_ready().await;
    let (label, range) = round("after stop_app/start_app");
    for n in range.clone() {
        publish_until_ok(&driver, &id, n).await;
    }
    consume_all(&mut sub, range, label).await;
    assert!(
        driver.connection_generation() >= 3,
        "two reconnects expected"
    );
    sub.cancel().await.unwrap();
    driver.close().await.unwrap();
}
