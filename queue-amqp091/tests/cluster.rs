//! Failover on a private three-node RabbitMQ cluster (never the shared node; always
//! stopped and deleted): a driver given the three URLs rides out the node it is
//! connected to stopped and started again, the node leading its quorum queue
//! stopped, and the node it is connected to SIGKILLed, while confirmed publishes and
//! a consumer run on a quorum queue. Each case prints its counts and timings:
//! `cluster <case>: published N / confirmed N / consumed N / duplicates N / lost 0; ...`.
//! The workspace's fault contract runs on the cluster as well
//! (`rabbitmq-cluster::faults::*`); the failover cases are
//! `rabbitmq-cluster::failover::*`, so `cargo xtask test-brokers` shows them all as the
//! `rabbitmq-cluster` broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use queue_amqp091::{Amqp091Config, Amqp091Driver, CAPABILITIES};
use queue_core::{ConnectionReport, ConsumeOptions, Driver, QueueId, QueueSpec, QueueType};
use queue_fixtures::rabbitmq::{PrivateCluster, PrivateNode};
use queue_testkit::faults::FaultBackend;
use queue_testkit::{Fault, Outage, Tally, TestContext, broker_test, number_of, numbered};

/// Publishes in flight at once.
const WINDOW: usize = 64;
/// The fault strikes once this many publishes are confirmed...
const STRIKE_AT: usize = 1_000;
/// ...and this many more are published after the struck node is back.
const AFTER_FAULT: i64 = 1_000;
/// How far publishing and consuming must get after the fault to count as resumed.
const RESUMED: usize = 100;
/// The longest any step may take.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs a blocking cluster step without stalling the driver's tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strike {
    /// `stop_app` on the node the driver is connected to, `start_app` later.
    ConnectedNodeStopped,
    /// `stop_app` on the node leading the quorum queue (not the driver's), `start_app`
    /// later.
    LeaderStopped,
    /// SIGKILL to the node the driver is connected to, restarted later.
    ConnectedNodeKilled,
}

fn config(urls: Vec<String>) -> Amqp091Config {
    let mut c = Amqp091Config::cluster(urls);
    c.connection_name = Some("amqp091-cluster".into());
    c.reconnect_delay = Duration::from_millis(200);
    c.reconnect_max_delay = Duration::from_secs(2);
    c.publish_timeout = Duration::from_secs(10);
    c.connection_timeout = Duration::from_secs(5);
    c
}

/// The node (index) a report names, by its port.
fn node_of(cluster: &PrivateCluster, report: &ConnectionReport) -> Option<usize> {
    let port = report.node.rsplit(':').next()?.trim_end_matches('/');
    cluster.node_on_port(port.parse().ok()?)
}

/// Declares the quorum queue through a plain connection to `url`: RabbitMQ places a
/// quorum queue's first leader on the node it is declared on.
async fn declare_quorum_on(url: &str, name: &str) {
    // lapin reads the trailing `/` of the fixture's URLs as the vhost "": name "/".
    let url = format!("{url}%2f");
    let conn = lapin::Connection::connect(&url, Default::default())
        .await
        .expect("connect to the seed node");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare the quorum queue");
    let _ = conn.close(200, "OK".into()).await;
}

/// Keeps `WINDOW` publishes in flight until `total` are confirmed, each tried again
/// until it is (the outage fails some).
async fn publish_until(
    driver: Arc<Amqp091Driver>,
    queue: QueueId,
    tally: Arc<Tally>,
    total: Arc<AtomicI64>,
    sent: Arc<AtomicI64>,
    seen: Arc<Errors>,
) -> Result<(), String> {
    let mut pending = FuturesUnordered::new();
    let mut next = 0i64;
    loop {
        while pending.len() < WINDOW && next < total.load(Ordering::Relaxed) {
            let (driver, queue, tally, seen) = (
                Arc::clone(&driver),
                queue.clone(),
                Arc::clone(&tally),
                Arc::clone(&seen),
            );
            let n = next;
            tally.publishing(n);
            pending.push(async move {
                let deadline = Instant::now() + LIMIT;
                loop {
                    match driver.publish(&queue, numbered(n)).await {
                        Ok(()) => {
                            tally.confirmed(n);
                            return Ok(());
                        }
                        Err(e) if !e.retryable() => {
                            return Err(format!("publish {n} failed for good: {e}"));
                        }
                        Err(e) if Instant::now() > deadline => {
                            return Err(format!("publish {n} never succeeded: {e}"));
                        }
                        Err(e) => {
                            seen.saw(&e);
                            tally.publish_failed();
                        }
                    }
                }
            });
            next += 1;
            sent.store(next, Ordering::Relaxed);
        }
        match pending.next().await {
            None => return Ok(()),
            Some(result) => result?,
        }
    }
}

/// The retryable publish failures seen, by kind of failure: what a failed case shows.
#[derive(Default)]
struct Errors(std::sync::Mutex<std::collections::BTreeMap<String, u64>>);

impl Errors {
    fn saw(&self, e: &queue_core::Error) {
        // Message ids make every text unique: keep the words around them only.
        let text: String = e
            .message()
            .split_whitespace()
            .filter(|w| w.len() != 36)
            .collect::<Vec<_>>()
            .join(" ");
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(text)
            .or_default() += 1;
    }

    fn report(&self) -> String {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter()
            .map(|(text, n)| format!("  {n} x {text}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Seconds since `t0` once `done` holds, polling; `None` after [`LIMIT`].
async fn time_until(t0: Instant, mut done: impl FnMut() -> bool) -> Option<f64> {
    while t0.elapsed() < LIMIT {
        if done() {
            return Some(t0.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn secs(t: Option<f64>) -> String {
    t.map_or("never".to_string(), |t| format!("{t:.1} s"))
}

async fn survive(strike: Strike, label: &str) {
    let mut cluster = blocking(PrivateCluster::start).expect("a private three-node cluster");
    let urls = cluster.urls();
    let name = format!("cluster-{label}");
    // For the leader case the queue is led by node 0 and the driver lists node 1
    // first, so stopping the leader leaves the driver's own connection alone.
    let order = match strike {
        Strike::LeaderStopped => {
            declare_quorum_on(&urls[0], &name).await;
            [1, 2, 0]
        }
        _ => [0, 1, 2],
    };
    let driver = Arc::new(
        Amqp091Driver::connect(config(order.iter().map(|i| urls[*i].clone()).collect()))
            .await
            .expect("connect to the cluster"),
    );
    let id = QueueId::new("cluster", &name).unwrap();
    driver
        .declare(
            &QueueSpec::new(id.clone())
                .with_name(&name)
                .with_queue_type(QueueType::Quorum),
        )
        .await
        .expect("declare the quorum queue");

    let tally = Arc::new(Tally::new());
    let mut sub = driver
        .consume(
            &id,
            ConsumeOptions {
                prefetch: WINDOW as u32,
            },
        )
        .await
        .expect("consume");
    let receiver = {
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            while let Some(delivery) = sub.next().await {
                let Ok(delivery) = delivery else { continue };
                tally.consumed(number_of(&delivery));
                // An ack lost with the connection: the message comes again.
                let _ = delivery.ack().await;
            }
        })
    };
    let total = Arc::new(AtomicI64::new(i64::MAX));
    let sent = Arc::new(AtomicI64::new(0));
    let seen = Arc::new(Errors::default());
    let publisher = tokio::spawn(publish_until(
        Arc::clone(&driver),
        id.clone(),
        Arc::clone(&tally),
        Arc::clone(&total),
        Arc::clone(&sent),
        Arc::clone(&seen),
    ));
    assert!(
        tally.wait_confirmed(STRIKE_AT, LIMIT).await,
        "{STRIKE_AT} publishes were not confirmed within {LIMIT:?}"
    );

    let before = driver.connection().expect("a connection report");
    let driver_node = node_of(&cluster, &before).expect("the driver's node is one of the three");
    let target = match strike {
        Strike::LeaderStopped => blocking(|| cluster.quorum_leader(&name))
            .expect("list_queues")
            .expect("the quorum queue has a leader"),
        _ => driver_node,
    };
    if strike == Strike::LeaderStopped {
        assert_ne!(target, driver_node, "the leader should be another node");
    }
    let (confirmed_at, consumed_at) = (tally.confirmed_count(), tally.consumed_count());
    let t0 = Instant::now();
    blocking(|| match strike {
        Strike::ConnectedNodeKilled => {
            cluster.kill(target);
            Ok(())
        }
        _ => cluster.stop_app(target),
    })
    .expect("strike the node");
    let struck = t0.elapsed().as_secs_f64();
    let moves = target == driver_node;
    let reconnected = if moves {
        time_until(t0, || {
            driver
                .connection()
                .is_some_and(|c| c.connected && c.node != before.node)
        })
        .await
    } else {
        None
    };
    let published_again =
        time_until(t0, || tally.confirmed_count() >= confirmed_at + RESUMED).await;
    let consumed_again = time_until(t0, || tally.consumed_count() >= consumed_at + RESUMED).await;
    let during = driver.connection().expect("a connection report");
    let leader_during = blocking(|| cluster.quorum_leader(&name)).ok().flatten();
    blocking(|| match strike {
        Strike::ConnectedNodeKilled => cluster.restart(target),
        _ => cluster.start_app(target),
    })
    .expect("bring the node back");

    let end = sent.load(Ordering::Relaxed) + AFTER_FAULT;
    total.store(end, Ordering::Relaxed);
    let published = tokio::time::timeout(Duration::from_secs(300), publisher)
        .await
        .expect("the publisher finishes")
        .expect("publisher task");
    let all_consumed = tally.wait_all_consumed(Duration::from_secs(180)).await;
    receiver.abort();
    let after = driver.connection().expect("a connection report");
    let counts = tally.counts();
    let leader_note = match leader_during {
        Some(l) if strike == Strike::LeaderStopped => format!(", new leader node {l}"),
        _ => String::new(),
    };
    println!(
        "cluster {label}: {counts}; struck node {target} (driver on node {driver_node}) in {struck:.1} s; \
         node {} -> {}{leader_note}; from the strike: reconnected {}, publishes confirmed again {}, \
         consumer resumed {}; connections opened {} -> {}, links attached {} -> {}",
        before.node,
        during.node,
        if moves {
            secs(reconnected)
        } else {
            "not needed".to_string()
        },
        secs(published_again),
        secs(consumed_again),
        before.connections_opened,
        after.connections_opened,
        before.links_attached,
        after.links_attached,
    );
    let status = || blocking(|| cluster.quorum_status(&name)).unwrap_or_else(|e| e);
    published.unwrap_or_else(|e| panic!("{e}\nfailures seen:\n{}\n{}", seen.report(), status()));
    assert!(
        all_consumed && counts.lost == 0,
        "confirmed messages lost, e.g. {:?}: {counts}\n{}",
        &tally.missing()[..tally.missing().len().min(10)],
        status()
    );
    assert_eq!(counts.confirmed, end as u64, "{counts}");
    assert!(
        published_again.is_some(),
        "publishing did not resume: {counts}"
    );
    assert!(
        consumed_again.is_some(),
        "the consumer did not resume by itself: {counts}\n{}",
        status()
    );
    if moves {
        assert!(reconnected.is_some(), "the driver never moved: {during:?}");
        assert_ne!(
            node_of(&cluster, &during),
            Some(target),
            "the driver reports the struck node: {during:?}"
        );
        assert!(after.connections_opened > before.connections_opened);
        assert!(
            after.links_attached > before.links_attached,
            "the consumer did not re-attach: {before:?} -> {after:?}"
        );
    } else {
        assert_eq!(
            during.node, before.node,
            "the driver's own node was not struck"
        );
    }
    tokio::time::timeout(Duration::from_secs(30), driver.close())
        .await
        .expect("close finishes")
        .expect("close");
    blocking(|| drop(cluster));
}

async fn survives_its_node_stopped_and_started() {
    survive(Strike::ConnectedNodeStopped, "connected_node_stop_start").await;
}

async fn survives_the_quorum_leader_stopped() {
    survive(Strike::LeaderStopped, "leader_stop_start").await;
}

async fn survives_its_node_killed() {
    survive(Strike::ConnectedNodeKilled, "connected_node_kill").await;
}

/// The workspace's fault contract on a cluster, its queues quorum queues: the
/// cluster strikes the node the driver is connected to (`PrivateCluster`'s `Outage`).
async fn start_for_the_fault_contract() -> Result<(TestContext, Box<dyn Outage>), String> {
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .map_err(|e| e.to_string())??;
    let driver = Amqp091Driver::connect(config(cluster.urls()))
        .await
        .map_err(|e| e.to_string())?;
    let ctx = TestContext::new(Arc::new(driver))
        .with_spec_hook(|spec| spec.with_queue_type(QueueType::Quorum));
    Ok((ctx, Box::new(cluster)))
}

fn main() {
    let unavailable = PrivateNode::unavailable();
    let mut trials = vec![
        broker_test(
            "rabbitmq-cluster::failover::survives_its_node_stopped_and_started",
            unavailable.clone(),
            survives_its_node_stopped_and_started,
        ),
        broker_test(
            "rabbitmq-cluster::failover::survives_the_quorum_leader_stopped",
            unavailable.clone(),
            survives_the_quorum_leader_stopped,
        ),
        broker_test(
            "rabbitmq-cluster::failover::survives_its_node_killed",
            unavailable.clone(),
            survives_its_node_killed,
        ),
    ];
    let cluster = FaultBackend::new(
        "rabbitmq-cluster",
        CAPABILITIES,
        &[Fault::CutConnections, Fault::StopStart, Fault::Kill],
        start_for_the_fault_contract,
    )
    .unavailable_if(unavailable);
    trials.extend(queue_testkit::faults::trials(&[cluster]));
    queue_testkit::run(trials);
}
