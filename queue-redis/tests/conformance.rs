//! The conformance suite on Redis: `redis::<contract>`, each test against a
//! `redis-server` of its own (queue_fixtures::redis::RedisNode, AOF on), stopped when
//! the test ends. Contracts needing priorities, delays or TTLs are ignored and marked
//! (the driver lacks them); the delay contract checks the header is refused.

use std::sync::Arc;

use queue_fixtures::redis::{RedisNode, unavailable};
use queue_redis::{CAPABILITIES, RedisConfig, RedisDriver};
use queue_testkit::{Backend, TestContext};

fn main() {
    let redis = Backend::new("redis", CAPABILITIES, || async {
        let node = tokio::task::spawn_blocking(RedisNode::start)
            .await
            .map_err(|e| e.to_string())??;
        let driver = RedisDriver::connect(RedisConfig::new(node.url()))
            .await
            .map_err(|e| format!("connecting to {}: {e}", node.url()))?;
        // The context owns the server: it stops when the test ends, pass or fail.
        Ok(TestContext::new(Arc::new(driver)).keeping(node))
    })
    .unavailable_if(unavailable());
    queue_testkit::run(queue_testkit::conformance::trials(&[redis]));
}
