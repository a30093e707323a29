//! The runtime on a private three-node RabbitMQ cluster (`PrivateCluster`: own ports
//! and data directories, always stopped and deleted), with the real binary.
//!
//! Failover (`rabbitmq-cluster::amqp091::*`): the runtime gets the three nodes' URLs
//! and two quorum queues, `load` and `done`. Four Lua processes publish 20,000
//! numbered messages to `load` (each publish retried until it is confirmed); a
//! consumer handles each by publishing its number to `done`. Once a tenth is done
//! the test strikes: (a) `stop_app` on the node the runtime is connected to, later
//! `start_app`; (b) `stop_app` on the node leading the quorum queues (not the
//! runtime's); (c) SIGKILL of the runtime's node, later a restart. It proves the fault
//! landed (the runtime's `/ready` names another node, or the queues another leader),
//! waits until every queue but `done` is empty, stops the runtime and drains `done`,
//! counting published / confirmed / consumed / duplicates / lost; lost must be 0.
//!
//! The crash-loop guard (`rabbitmq::amqp091::*`, one private node): a handler that
//! kills its own runtime (SIGKILL through `os.execute`) runs `max_attempts` times, once
//! per restart; the next delivery is dead-lettered with "redelivered too often"
//! without running it, and the runtime stays up.

mod support;

use std::time::{Duration, Instant};

use queue_amqp091::{Amqp091Config, Amqp091Driver};
use queue_core::{Driver, HeaderValue, QueueId, QueueSpec, QueueType, names};
use queue_fixtures::rabbitmq::{PrivateCluster, PrivateNode};
use queue_testkit::{Tally, broker_test};
use support::*;

/// Messages the Lua producers publish.
const LOAD: i64 = 20_000;
/// Producer processes (each publishes every PRODUCERS-th number).
const PRODUCERS: i64 = 4;
/// The fault strikes once this many are done.
const STRIKE_AT: u64 = 2_000;
/// The longest any wait may take.
const LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strike {
    ConnectedNodeStopped,
    LeaderStopped,
    ConnectedNodeKilled,
}

const HANDLER: &str = r#"
function handle(payload)
  local ok, err = queue.publish("app:done", { n = payload.n })
  if not ok then error(err) end
end
"#;

/// Four producers: `main_K` publishes K, K+4, K+8, ... each until it is confirmed.
fn producers() -> String {
    let mut lua = format!(
        r#"
local function produce(first)
  for n = first, {last}, {PRODUCERS} do
    while true do
      local ok, err = queue.publish("app:load", {{ n = n }})
      if ok then break end
      logger:warn("publish failed; again", {{ n = n, err = tostring(err) }})
    end
  end
  logger:info("produced", {{ first = first }})
end
"#,
        last = LOAD - 1
    );
    for k in 0..PRODUCERS {
        lua.push_str(&format!("function main_{k}() produce({k}) end\n"));
    }
    lua
}

fn app_yaml(urls: &[String]) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let mut yaml = format!(
        "namespace: app
entries:
  - name: rabbit
    kind: queue.driver.amqp
    url: [{}]
    connection_timeout: 2s
    reconnect_delay: 200ms
    reconnect_max_delay: 2s
    publish_timeout: 30s
  - name: load
    kind: queue.queue
    queue_name: load
    queue_type: quorum
  - name: done
    kind: queue.queue
    queue_name: done
    queue_type: quorum
  - kind: queue.consumer
    id: worker
    queue: load
    source: h.lua
    method: handle
    concurrency: 8
    prefetch: 50
",
        urls.join(", ")
    );
    for k in 0..PRODUCERS {
        yaml.push_str(&format!(
            "  - name: producer_{k}\n    kind: process.lua\n    source: producers.lua\n    method: main_{k}\n"
        ));
    }
    yaml
}

fn load_id() -> QueueId {
    QueueId::parse("app:load").expect("id")
}

fn done_id() -> QueueId {
    QueueId::parse("app:done").expect("id")
}

fn quorum(id: QueueId, name: &str) -> QueueSpec {
    QueueSpec::new(id)
        .with_name(name)
        .with_queue_type(QueueType::Quorum)
}

/// The node (index) a reported URL names, by its port.
fn node_of(cluster: &PrivateCluster, url: &str) -> usize {
    let port = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url:?}"));
    cluster
        .node_on_port(port)
        .unwrap_or_else(|| panic!("{url} is not a node of the cluster"))
}

/// Waits (bounded) until `done` holds at least `n` messages.
async fn wait_done(counter: &Amqp091Driver, n: u64, runtime: &Runtime) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let ready = counter
            .info(&done_id())
            .await
            .ok()
            .and_then(|i| i.ready)
            .unwrap_or(0);
        if ready >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} done:\n{}",
            runtime.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every producer reported and every queue but `done` is empty, counting
/// unacknowledged messages (from `rabbitmqctl` on a running node).
fn wait_finished(cluster: &PrivateCluster, runtime: &Runtime) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let produced = runtime.log().matches("\"produced\"").count() as i64;
        let node = (0..3)
            .map(|i| cluster.node(i))
            .find(|n| n.port_open())
            .expect("a running node");
        let queues = node.queue_messages();
        let busy: Vec<&(String, u64)> = queues
            .iter()
            .filter(|(name, count)| name != "done" && *count > 0)
            .collect();
        if produced == PRODUCERS && busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not finished after {LIMIT:?}: {produced} producers done, busy {busy:?}\n{}",
            runtime.log()
        );
        // Each rabbitmqctl call takes ~0.7 s; that is the polling pace.
    }
}

/// Waits (bounded) until the runtime's `/ready` names a node other than `old`.
fn wait_moved(runtime: &Runtime, old: &str, label: &str) -> DriverConnection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = runtime.connection("app:rabbit");
        if now.node != old && !now.node.is_empty() {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{label}: the runtime is still on {old} a minute after its node went:\n{}",
            runtime.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn failover(strike: Strike) {
    let label = format!("{strike:?} (amqp091 x RabbitMQ cluster)");
    let mut cluster = blocking(PrivateCluster::start).expect("a private cluster");
    let urls = cluster.urls();
    // The queues are declared on node 0, where their leaders start; the runtime is
    // given node 1 first, so that striking the leader (b) leaves its connection alone.
    let seed = Amqp091Driver::connect(Amqp091Config::new(urls[0].clone()))
        .await
        .expect("connect to node 0");
    seed.declare(&quorum(load_id(), "load"))
        .await
        .expect("load");
    seed.declare(&quorum(done_id(), "done"))
        .await
        .expect("done");
    let _ = seed.close().await;
    let counter = Amqp091Driver::connect(Amqp091Config::cluster(urls.clone()))
        .await
        .expect("the counter connects");
    counter
        .declare(&quorum(load_id(), "load"))
        .await
        .expect("load");
    counter
        .declare(&quorum(done_id(), "done"))
        .await
        .expect("done");

    let runtime_urls = [urls[1].clone(), urls[2].clone(), urls[0].clone()];
    let app_dir = app(&[
        ("app.yaml", &app_yaml(&runtime_urls)),
        ("h.lua", HANDLER),
        ("producers.lua", &producers()),
    ]);
    let runtime = Runtime::start(app_dir.path(), "run.log");
    wait_done(&counter, STRIKE_AT, &runtime).await;

    let before = blocking(|| runtime.connection("app:rabbit"));
    let connected = node_of(&cluster, &before.node);
    assert_eq!(
        connected, 1,
        "{label}: the runtime connects to its first URL"
    );
    match strike {
        Strike::ConnectedNodeStopped => {
            blocking(|| cluster.stop_app(connected)).expect("stop_app");
            let after = blocking(|| wait_moved(&runtime, &before.node, &label));
            assert!(after.connections_opened > before.connections_opened);
            blocking(|| cluster.start_app(connected)).expect("start_app");
        }
        Strike::LeaderStopped => {
            let leader = blocking(|| cluster.quorum_leader("load"))
                .expect("list_queues")
                .expect("load has a leader");
            assert_ne!(leader, connected, "{label}: the leader is another node");
            blocking(|| cluster.stop_app(leader)).expect("stop_app");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let now = blocking(|| cluster.quorum_leader("load")).expect("list_queues");
                if now.is_some_and(|n| n != leader) {
                    break;
                }
                assert!(Instant::now() < deadline, "{label}: no new leader in 60 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let after = blocking(|| runtime.connection("app:rabbit"));
            assert_eq!(
                after.node, before.node,
                "{label}: the runtime's connection was not touched"
            );
            blocking(|| cluster.start_app(leader)).expect("start_app");
        }
        Strike::ConnectedNodeKilled => {
            blocking(|| cluster.kill(connected));
            let after = blocking(|| wait_moved(&runtime, &before.node, &label));
            assert!(after.connections_opened > before.connections_opened);
            blocking(|| cluster.restart(connected)).expect("restart");
        }
    }
    let left = counter
        .info(&load_id())
        .await
        .ok()
        .and_then(|i| i.ready)
        .unwrap_or(0);
    let done_now = counter
        .info(&done_id())
        .await
        .ok()
        .and_then(|i| i.ready)
        .unwrap_or(0);
    assert!(
        left > 0 || done_now < LOAD as u64,
        "{label}: the fault came after the work was done"
    );

    blocking(|| wait_finished(&cluster, &runtime));
    let log = runtime.log();
    blocking(|| runtime.stop("TERM"));
    let tally = Tally::new();
    for n in 0..LOAD {
        tally.publishing(n);
        tally.confirmed(n);
    }
    drain_numbers(&counter, &done_id(), &tally).await;
    let counts = tally.counts();
    let retried = log.matches("publish failed; again").count();
    println!(
        "{label}: {counts} ({retried} Lua publishes failed across the fault and were retried)"
    );
    assert_eq!(counts.lost, 0, "{label}: lost {:?}", tally.missing());
    let _ = counter.close().await;
    drop(cluster);
}

async fn connected_node_stopped_and_started_loses_nothing() {
    failover(Strike::ConnectedNodeStopped).await;
}

async fn quorum_leader_stopped_loses_nothing() {
    failover(Strike::LeaderStopped).await;
}

async fn connected_node_killed_loses_nothing() {
    failover(Strike::ConnectedNodeKilled).await;
}

/// Kills the runtime it runs in: the shell `os.execute` starts is the runtime's child.
const KILLER: &str = r#"
function handle(payload)
  logger:warn("about to kill the runtime", { attempt = queue.message():header("attempts") })
  os.execute("kill -9 $PPID")
end
"#;

/// A handler that kills its runtime runs `max_attempts` times; the next delivery is
/// dead-lettered without running it.
async fn a_handler_that_kills_the_runtime_is_dead_lettered_after_max_attempts() {
    let node = blocking(PrivateNode::start).expect("a private node");
    let url = node.amqp091_url();
    let yaml = format!(
        "namespace: app
entries:
  - name: rabbit
    kind: queue.driver.amqp
    url: {url}
  - name: jobs
    kind: queue.queue
    queue_type: quorum
    retry:
      max_attempts: 3
  - kind: queue.consumer
    id: worker
    queue: jobs
    source: h.lua
    method: handle
    prefetch: 1
    sandbox:
      allow: [os]
"
    );
    let app_dir = app(&[("app.yaml", &yaml), ("h.lua", KILLER)]);
    let dir = app_dir.path();
    let publisher = Amqp091Driver::connect(Amqp091Config::new(url.clone()))
        .await
        .expect("connect");
    let jobs = QueueId::parse("app:jobs").expect("id");
    let dlq = QueueId::parse("app:jobs.dlq").expect("id");
    let spec = QueueSpec::new(jobs.clone())
        .with_name("app:jobs")
        .with_queue_type(QueueType::Quorum);
    publisher.declare(&spec).await.expect("declare");
    publisher
        .publish(&jobs, queue_testkit::numbered(1))
        .await
        .expect("publish");

    // Each run: the handler kills the runtime, or the runtime gives up on the message.
    let mut kills = 0;
    let mut gave_up = None;
    for run in 1..=6 {
        let mut runtime = Runtime::start(dir, &format!("run-{run}.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let outcome = loop {
            let log = runtime.log();
            if runtime.has_exited() {
                break "killed";
            }
            if log.contains("giving up on it without running its handler") {
                break "gave up";
            }
            assert!(
                Instant::now() < deadline,
                "run {run}: neither killed nor gave up:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        if outcome == "killed" {
            kills += 1;
            continue;
        }
        gave_up = Some(runtime.log());
        blocking(|| runtime.stop("TERM"));
        break;
    }
    let log = gave_up.expect("the runtime gave up on the message within 6 runs");
    assert_eq!(kills, 3, "the handler ran max_attempts times");
    assert!(!log.contains("about to kill the runtime"), "{log}");

    let dlq_spec = QueueSpec::new(dlq.clone())
        .with_name("app:jobs.dlq")
        .with_queue_type(QueueType::Quorum);
    publisher
        .declare(&dlq_spec)
        .await
        .expect("the dead-letter queue is a quorum queue like its source");
    let info = publisher.info(&dlq).await.expect("dlq info");
    assert_eq!(
        info.ready,
        Some(1),
        "the message is in the dead-letter queue"
    );
    let mut sub = publisher
        .consume(&dlq, queue_core::ConsumeOptions { prefetch: 1 })
        .await
        .expect("consume dlq");
    let dead = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a dead letter")
        .expect("open")
        .expect("delivery");
    let reason = dead.message().headers.get(names::X_DEAD_LETTER_REASON);
    assert!(
        matches!(reason, Some(HeaderValue::String(r)) if r.starts_with("redelivered too often")),
        "{reason:?}"
    );
    dead.ack().await.expect("ack");
    let _ = publisher.close().await;
    drop(node);
}

fn main() {
    let unavailable = PrivateCluster::unavailable();
    queue_testkit::run(vec![
        broker_test(
            "rabbitmq-cluster::amqp091::connected_node_stopped_and_started_loses_nothing",
            unavailable.clone(),
            connected_node_stopped_and_started_loses_nothing,
        ),
        broker_test(
            "rabbitmq-cluster::amqp091::quorum_leader_stopped_loses_nothing",
            unavailable.clone(),
            quorum_leader_stopped_loses_nothing,
        ),
        broker_test(
            "rabbitmq-cluster::amqp091::connected_node_killed_loses_nothing",
            unavailable.clone(),
            connected_node_killed_loses_nothing,
        ),
        broker_test(
            "rabbitmq::amqp091::a_handler_that_kills_the_runtime_is_dead_lettered_after_max_attempts",
            unavailable,
            a_handler_that_kills_the_runtime_is_dead_lettered_after_max_attempts,
        ),
    ]);
}
