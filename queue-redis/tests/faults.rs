//! The fault suite on Redis: `redis::faults::<fault>` against a `redis-server` of
//! the test's own (AOF with `appendfsync always`), for a cut of every client
//! connection (`CLIENT KILL TYPE normal`), a `SHUTDOWN` and start, and SIGKILL with a
//! restart from the AOF. Each must show the driver saw the fault and lost nothing
//! it confirmed.

use std::sync::Arc;
use std::time::Duration;

use queue_fixtures::redis::{RedisNode, unavailable};
use queue_redis::{CAPABILITIES, RedisConfig, RedisDriver};
use queue_testkit::faults::{FaultBackend, trials};
use queue_testkit::{Fault, Outage, TestContext};

async fn start() -> Result<(TestContext, Box<dyn Outage>), String> {
    let node = tokio::task::spawn_blocking(RedisNode::start)
        .await
        .map_err(|e| e.to_string())??;
    let mut config = RedisConfig::new(node.url());
    config.reconnect_delay = Duration::from_millis(50);
    config.reconnect_max_delay = Duration::from_secs(1);
    config.publish_timeout = Duration::from_secs(10);
    let driver = RedisDriver::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    Ok((TestContext::new(Arc::new(driver)), Box::new(node)))
}

fn main() {
    let faults = [Fault::CutConnections, Fault::StopStart, Fault::Kill];
    let redis =
        FaultBackend::new("redis", CAPABILITIES, &faults, start).unavailable_if(unavailable());
    queue_testkit::run(trials(&[redis]));
}
