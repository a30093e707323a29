//! The AMQP 1.0 driver on a private three-node RabbitMQ cluster (never the shared node;
//! always stopped and deleted), given the three nodes' URLs: it connects to the first
//! node that answers, and the workspace's fault contract runs with every node closing
//! every client connection, or the node it is connected to stopped and started again,
//! or SIGKILLed and restarted
//! (`rabbitmq-cluster::faults::*`, the `rabbitmq-cluster` broker of `cargo xtask
//! test-brokers`).
//!
//! RabbitMQ 3.x's AMQP 1.0 plugin has no quorum queues (`rabbitmq-v1`), so the queues
//! are classic: each lives on the node it was declared on. While that node is down
//! the driver, reconnected to another node, cannot reach the queue: publishes fail
//! and are retried, the consumer re-attaches once the node is back with its queue
//! (docs/cluster.md). RabbitMQ 3.x does not list AMQP 1.0 connections, so the node to
//! strike is the one the driver reports it is connected to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::{ConsumeOptions, Driver, QueueId, QueueSpec};
use queue_fixtures::rabbitmq::{PrivateCluster, PrivateNode};
use queue_testkit::faults::FaultBackend;
use queue_testkit::{Fault, Outage, TestContext, broker_test, next, numbered, within};

fn config(urls: Vec<String>) -> Amqp10Config {
    let mut config = Amqp10Config::cluster(urls, Profile::RabbitmqV1);
    config.reconnect_delay = Duration::from_millis(100);
    config.reconnect_max_delay = Duration::from_secs(1);
    config.publish_timeout = Duration::from_secs(10);
    config
}

fn urls(cluster: &PrivateCluster) -> Vec<String> {
    (0..3).map(|i| cluster.node(i).amqp10_url()).collect()
}

/// The node (index) the driver says it is connected to, by the port in its report.
fn connected_node(cluster: &PrivateCluster, driver: &dyn Driver) -> Option<usize> {
    let report = driver.connection()?;
    if !report.connected {
        return None;
    }
    let port = report.node.rsplit(':').next()?.trim_end_matches('/');
    cluster.node_on_port(port.parse().ok()?)
}

/// The cluster, struck where the driver is connected.
struct StruckWhereConnected {
    cluster: PrivateCluster,
    driver: Arc<Amqp10Driver>,
}

impl Outage for StruckWhereConnected {
    fn inflict(&mut self, fault: Fault) -> Result<(), String> {
        if fault == Fault::CutConnections {
            // Every node closes every client connection: the driver's is among them.
            return self.cluster.inflict(fault);
        }
        let target = connected_node(&self.cluster, self.driver.as_ref())
            .ok_or("the driver is not connected to a node of the cluster")?;
        match fault {
            Fault::StopStart => self.cluster.stop_app(target)?,
            Fault::Kill => self.cluster.kill(target),
            Fault::CutConnections => unreachable!("struck above"),
        }
        // The driver moves to another node while this one is down.
        let deadline = Instant::now() + Duration::from_secs(60);
        while connected_node(&self.cluster, self.driver.as_ref()).is_none_or(|i| i == target) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the driver did not move off node {target} within 60 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match fault {
            Fault::StopStart => self.cluster.start_app(target),
            _ => self.cluster.restart(target),
        }
    }

    fn describe(&self) -> String {
        self.cluster.describe()
    }
}

async fn start_for_the_fault_contract() -> Result<(TestContext, Box<dyn Outage>), String> {
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .map_err(|e| e.to_string())??;
    let driver = Arc::new(
        Amqp10Driver::connect(config(urls(&cluster)))
            .await
            .map_err(|e| e.to_string())?,
    );
    let outage = StruckWhereConnected {
        cluster,
        driver: Arc::clone(&driver),
    };
    Ok((TestContext::new(driver), Box::new(outage)))
}

/// With the first node of its list down, the driver connects to the next one, and
/// messages flow there.
async fn connects_to_the_next_node_when_the_first_is_down() {
    let mut cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .expect("join")
        .expect("cluster");
    tokio::task::block_in_place(|| cluster.stop_app(0)).expect("stop node 0");
    let driver = within("connect", Amqp10Driver::connect(config(urls(&cluster))))
        .await
        .expect("connects to a live node");
    let on = connected_node(&cluster, &driver);
    assert!(
        on.is_some_and(|i| i != 0),
        "connected to {:?}, not to a live node",
        driver.connection()
    );
    let q = QueueId::parse("app:cluster").unwrap();
    within(
        "declare",
        driver.declare(&QueueSpec::new(q.clone()).with_durable(true)),
    )
    .await
    .expect("declare");
    within("publish", driver.publish(&q, numbered(1)))
        .await
        .expect("publish");
    let mut sub = within(
        "consume",
        driver.consume(&q, ConsumeOptions { prefetch: 1 }),
    )
    .await
    .expect("consume");
    let delivery = next(&mut sub).await;
    within("ack", delivery.ack()).await.expect("ack");
    within("close", driver.close()).await.expect("close");
    tokio::task::block_in_place(|| drop(cluster));
}

fn main() {
    let unavailable = PrivateNode::unavailable();
    let mut trials = vec![broker_test(
        "rabbitmq-cluster::failover::connects_to_the_next_node_when_the_first_is_down",
        unavailable.clone(),
        connects_to_the_next_node_when_the_first_is_down,
    )];
    let cluster = FaultBackend::new(
        "rabbitmq-cluster",
        Profile::RabbitmqV1.capabilities(),
        &[Fault::CutConnections, Fault::StopStart, Fault::Kill],
        start_for_the_fault_contract,
    )
    .unavailable_if(unavailable);
    trials.extend(queue_testkit::faults::trials(&[cluster]));
    queue_testkit::run(trials);
}
