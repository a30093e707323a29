//! The runtime under faults, per driver x broker pair, counted end to end by the test.
//!
//! Each case runs the real `queue-runtime` binary on a PRIVATE RabbitMQ node
//! (`queue_fixtures::rabbitmq::PrivateNode`: its own port and data directory,
//! always stopped, one at a time), with a consumer that handles each message of a
//! `load` queue by publishing its number to a `done` queue. The test itself publishes
//! the load through the pair's driver (counting what was confirmed), strikes the fault
//! under load, waits until every queue but `done` is empty (ready and unacknowledged,
//! from `rabbitmqctl`), stops the runtime with SIGTERM, and drains `done` through the
//! AMQP 0-9-1 driver, counting each number. It prints
//! `published / confirmed / consumed / duplicates / lost` and asserts lost == 0.
//!
//! After each fault it also proves the fault landed: load was still waiting in the
//! broker right after it, and (for the broker faults) the runtime's driver reconnected
//! or re-attached a link, read from the runtime's own `/ready` before and after.
//!
//! The `done` queue is declared by the AMQP 0-9-1 driver and used by the runtime
//! through the pair's driver, and the `load` queue the other way round: for the amqp10
//! pair that proves both protocols declare a queue with compatible arguments (a
//! mismatch fails the declare with PRECONDITION_FAILED / AlreadyExists).
//!
//! The Artemis cells are in `artemis.rs`, the cluster's in `cluster.rs`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_amqp091::{Amqp091Config, Amqp091Driver};
use queue_core::{Driver, QueueId, QueueSpec};
use queue_fixtures::free_port as free_loopback_port;
use queue_fixtures::rabbitmq::PrivateNode;
use queue_testkit::{Tally, numbered};

use support::*;

/// Messages of load per case: enough that a fault lands while most are still queued.
const LOAD: i64 = 5000;
/// The fault strikes once this many are done.
const STRIKE_AT: u64 = 300;
/// How long the runtime gets to finish the load after the fault.
const FINISH_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pair {
    Amqp091,
    Amqp10,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGTERM of the runtime under load, then a restart.
    SigTerm,
    /// SIGKILL of the runtime under load, then a restart.
    SigKill,
    /// `rabbitmqctl close_all_connections` under load.
    CloseAllConnections,
    /// `rabbitmqctl stop_app`, 2 s down, `start_app`, under load.
    StopAppStartApp,
    /// The broker is down when the runtime starts and comes up later.
    BrokerDownAtStart,
}

impl Pair {
    fn name(self) -> &'static str {
        match self {
            Pair::Amqp091 => "amqp091",
            Pair::Amqp10 => "amqp10",
        }
    }

    /// The driver entry of the runtime's configuration. Short reconnect delays keep the
    /// test quick; a long publish timeout lets a handler's publish wait out a 2 s outage.
    fn driver_yaml(self, node_port: u16) -> String {
        let common =
            "    reconnect_delay: 200ms\n    reconnect_max_delay: 2s\n    publish_timeout: 30s\n";
        match self {
            Pair::Amqp091 => format!(
                "  - name: rabbit\n    kind: queue.driver.amqp\n    url: amqp://guest:guest@127.0.0.1:{node_port}/%2f\n    connection_timeout: 2s\n{common}"
            ),
            Pair::Amqp10 => format!(
                "  - name: rabbit\n    kind: queue.driver.amqp10\n    url: amqp://guest:guest@127.0.0.1:{node_port}\n    profile: rabbitmq-v1\n{common}"
            ),
        }
    }

    /// The pair's own driver, which publishes the load as an application would.
    async fn driver(self, node: &PrivateNode) -> Arc<dyn Driver> {
        match self {
            Pair::Amqp091 => Arc::new(amqp091(node).await),
            Pair::Amqp10 => Arc::new(
                Amqp10Driver::connect(Amqp10Config::new(node.amqp10_url(), Profile::RabbitmqV1))
                    .await
                    .expect("amqp10 connects to the private node"),
            ),
        }
    }
}

async fn amqp091(node: &PrivateNode) -> Amqp091Driver {
    Amqp091Driver::connect(Amqp091Config::new(node.amqp091_url()))
        .await
        .expect("amqp091 connects to the private node")
}

/// The handler does a little work, then passes the number on; an error (a publish that
/// failed across a fault) makes the runtime retry the message.
const HANDLER: &str = r#"
function handle(payload)
  local x = 0
  for i = 1, 20000 do x = x + i end
  local ok, err = queue.publish("app:done", { n = payload.n })
  if not ok then error(err) end
end
"#;

fn app_yaml(pair: Pair, node_port: u16) -> String {
    format!(
        "namespace: app\nentries:\n{}  - name: load\n    kind: queue.queue\n    queue_name: load\n    retry:\n      max_attempts: 50\n      backoff: {{ initial: 200ms, multiplier: 2, max: 2s }}\n  - name: done\n    kind: queue.queue\n    queue_name: done\n  - name: w\n    kind: queue.consumer\n    queue: load\n    source: h.lua\n    method: handle\n    concurrency: 8\n    prefetch: 50\n",
        pair.driver_yaml(node_port)
    )
}

fn load_id() -> QueueId {
    QueueId::parse("app:load").expect("id")
}

fn done_id() -> QueueId {
    QueueId::parse("app:done").expect("id")
}

fn spec(id: QueueId, name: &str) -> QueueSpec {
    QueueSpec::new(id).with_name(name)
}

/// Publishes LOAD numbered messages from 8 tasks, retrying what fails.
async fn publish_load(driver: Arc<dyn Driver>, tally: Arc<Tally>) {
    let mut tasks = Vec::new();
    for first in 0..8 {
        let (driver, tally) = (Arc::clone(&driver), Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            let mut n = first;
            while n < LOAD {
                tally.publishing(n);
                match driver.publish(&load_id(), numbered(n)).await {
                    Ok(()) => {
                        tally.confirmed(n);
                        n += 8;
                    }
                    Err(e) => {
                        assert!(e.retryable(), "publish {n}: {e}");
                        tally.publish_failed();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("the load is published within 120 s")
            .expect("publisher task");
    }
}

/// Messages waiting in `load`, read over a fresh connection the moment it is asked
/// (`rabbitmqctl` takes a second or more, in which the runtime can finish the load).
async fn load_waiting(node: &PrivateNode) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(driver) = Amqp091Driver::connect(Amqp091Config::new(node.amqp091_url())).await {
            let counted = match driver.declare(&spec(load_id(), "load")).await {
                Ok(()) => driver.info(&load_id()).await.ok().and_then(|i| i.ready),
                Err(_) => None,
            };
            let _ = driver.close().await;
            if let Some(ready) = counted {
                return ready;
            }
        }
        assert!(Instant::now() < deadline, "cannot count the load queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ready messages in `done`, from a passive declare (cheap enough to poll).
async fn done_ready(counter: &Amqp091Driver) -> u64 {
    counter
        .info(&done_id())
        .await
        .ok()
        .and_then(|i| i.ready)
        .unwrap_or(0)
}

/// Waits until at least `n` messages are in `done`.
async fn wait_done(counter: &Amqp091Driver, n: u64, what: &str, runtime: &Runtime) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while done_ready(counter).await < n {
        assert!(
            Instant::now() < deadline,
            "{what}: fewer than {n} messages done after 120 s:\n{}",
            runtime.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every queue but `done` is empty, counting unacknowledged messages
/// too: then every load message was handled and acked, and the handler had its
/// `done` publish confirmed before that.
fn wait_until_only_done_has_messages(node: &PrivateNode, what: &str, runtime: &Runtime) {
    let deadline = Instant::now() + FINISH_LIMIT;
    loop {
        let queues = node.queue_messages();
        let busy: Vec<&(String, u64)> = queues
            .iter()
            .filter(|(name, count)| name != "done" && *count > 0)
            .collect();
        if busy.is_empty() && queues.iter().any(|(name, _)| name == "load") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: queues still busy after {FINISH_LIMIT:?}: {busy:?}\n{}",
            runtime.log()
        );
        // Each rabbitmqctl call takes ~0.7 s; that is the polling pace.
    }
}

/// One cell of the matrix.
async fn runtime_fault(pair: Pair, fault: Fault, test: &str) {
    let port = free_loopback_port();
    let app_dir = app(&[("app.yaml", &app_yaml(pair, port)), ("h.lua", HANDLER)]);
    let dir = app_dir.path();
    let tally = Arc::new(Tally::new());
    let label = format!("{test} ({} x RabbitMQ)", pair.name());

    // Declared before the runtime, so that on a panic the runtime is killed before
    // the node is stopped.
    let mut node;
    let mut runtime = None;
    if fault == Fault::BrokerDownAtStart {
        // The runtime first, on a port where nothing listens yet.
        let first = Runtime::start(dir, "run-1.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !first.log().contains("broker unreachable; waiting for it") {
            assert!(
                Instant::now() < deadline,
                "the runtime did not report waiting for its broker:\n{}",
                first.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Now the broker comes up, on the port the runtime keeps trying.
        node = blocking(|| PrivateNode::start_on(port));
        runtime = Some(first);
    } else {
        node = blocking(|| PrivateNode::start_on(port));
    }

    // The test's own clients: the pair's driver publishes the load; the AMQP 0-9-1
    // driver counts `done`. Each declares what the other protocol uses too.
    let publisher = pair.driver(&node).await;
    let counter = amqp091(&node).await;
    publisher
        .declare(&spec(load_id(), "load"))
        .await
        .expect("declare load through the pair's driver");
    counter
        .declare(&spec(done_id(), "done"))
        .await
        .expect("declare done through amqp091");
    counter
        .declare(&spec(load_id(), "load"))
        .await
        .expect("amqp091 accepts the load queue as the pair's driver declared it");
    publish_load(Arc::clone(&publisher), Arc::clone(&tally)).await;
    let _ = publisher.close().await;

    let mut runtime = runtime.unwrap_or_else(|| Runtime::start(dir, "run-1.log"));
    wait_done(&counter, STRIKE_AT, &label, &runtime).await;

    match fault {
        Fault::SigTerm | Fault::SigKill => {
            let name = if fault == Fault::SigTerm {
                "TERM"
            } else {
                "KILL"
            };
            blocking(|| runtime.stop(name));
            // Whatever the runtime had not acknowledged is back in the queue.
            let left = counter
                .info(&load_id())
                .await
                .ok()
                .and_then(|i| i.ready)
                .unwrap_or(0);
            assert!(left > 0, "{label}: the signal came after the load was done");
            runtime = Runtime::start(dir, "run-2.log");
        }
        Fault::CloseAllConnections | Fault::StopAppStartApp => {
            let before = blocking(|| runtime.connection("app:rabbit").counts());
            // (a), read the moment the fault is over: work was still outstanding.
            let waiting = if fault == Fault::CloseAllConnections {
                blocking(|| node.close_all_connections());
                load_waiting(&node).await
            } else {
                blocking(|| node.stop_app());
                // While its broker is down the runtime is not ready, and says why.
                let down = blocking(|| runtime.wait_ready_status(503));
                assert_eq!(down["status"], "reconnecting", "{label}: {down}");
                assert_eq!(
                    down["drivers"]["app:rabbit"]["connected"], false,
                    "{label}: {down}"
                );
                blocking(|| node.start_app());
                let waiting = load_waiting(&node).await;
                let up = blocking(|| runtime.wait_ready_status(200));
                assert_eq!(up["status"], "ready", "{label}: {up}");
                assert_eq!(
                    up["consumers"]["app:w"]["attached"], up["consumers"]["app:w"]["of"],
                    "{label}: {up}"
                );
                waiting
            };
            assert!(waiting > 0, "{label}: the load was done before the fault");
            blocking(|| wait_until_only_done_has_messages(&node, &label, &runtime));
            // (b) The runtime's driver saw it: a new connection, or (RabbitMQ 3.x
            // ends one AMQP 1.0 session on close_all_connections) a re-attached link.
            let after = blocking(|| runtime.connection("app:rabbit").counts());
            let reconnected = after.0 > before.0;
            let reattached = after.1 > before.1;
            assert!(
                reconnected || (fault == Fault::CloseAllConnections && reattached),
                "{label}: the runtime never saw the fault (connections, links {before:?} -> {after:?}):\n{}",
                runtime.log()
            );
            println!(
                "{label}: {waiting} of {LOAD} still waiting after the fault; connections, links {before:?} -> {after:?}"
            );
        }
        Fault::BrokerDownAtStart => {}
    }

    blocking(|| wait_until_only_done_has_messages(&node, &label, &runtime));
    blocking(|| runtime.stop("TERM"));
    drain_numbers(&counter, &done_id(), &tally).await;
    let counts = tally.counts();
    println!("{label}: {counts}");
    let missing = tally.missing();
    assert!(
        counts.lost == 0 && missing.is_empty(),
        "{label}: lost {:?}...",
        &missing[..missing.len().min(10)]
    );
    assert_eq!(counts.confirmed, LOAD as u64);
    if fault == Fault::SigTerm {
        // A clean stop finishes or returns every delivery: nothing handled twice.
        assert_eq!(counts.duplicates, 0, "{label}: SIGTERM caused redeliveries");
    }
    let _ = counter.close().await;
    blocking(move || drop(node));
}

/// Every cell, named `rabbitmq::<driver>::<case>` for the broker matrix.
fn main() {
    let unavailable = PrivateNode::unavailable();
    let cases = [
        (
            "sigterm_under_load_then_restart_loses_nothing",
            Fault::SigTerm,
        ),
        (
            "sigkill_under_load_then_restart_loses_nothing",
            Fault::SigKill,
        ),
        (
            "close_all_connections_under_load_loses_nothing",
            Fault::CloseAllConnections,
        ),
        (
            "stop_app_start_app_under_load_loses_nothing",
            Fault::StopAppStartApp,
        ),
        (
            "broker_down_at_start_then_up_loses_nothing",
            Fault::BrokerDownAtStart,
        ),
    ];
    let mut trials = Vec::new();
    for pair in [Pair::Amqp091, Pair::Amqp10] {
        for (case, fault) in cases {
            let name = format!("rabbitmq::{}::{case}", pair.name());
            let label = name.clone();
            trials.push(queue_testkit::broker_test(
                &name,
                unavailable.clone(),
                move || async move { runtime_fault(pair, fault, &label).await },
            ));
        }
    }
    queue_testkit::run(trials);
}
