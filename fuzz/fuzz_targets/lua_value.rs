//! Publishing any Lua value from a chunk built from fuzz input either succeeds or is
//! INVALID: no crash, no other error kind. What is published is consumed and acked
//! again at once, so the queue stays empty and a long run does not grow by every
//! message it ever published (it did: about 1 GB a minute).
#![no_main]

#[path = "../lua_expression.rs"]
mod lua_expression;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use queue_core::memory::{MemoryConfig, MemoryDriver};
use queue_core::security::SecurityContext;
use queue_core::{
    ConsumeOptions, Driver, PublishSettings, QueueId, QueueSpec, Queues, Subscription,
};
use queue_lua::LuaHost;

struct World {
    rt: tokio::runtime::Runtime,
    host: LuaHost,
    driver: Arc<MemoryDriver>,
    queue: QueueId,
    consumer: RefCell<Box<dyn Subscription>>,
}

impl World {
    /// Consumes and acks everything in the queue (a chunk publishes at most once, but
    /// draining by count does not depend on that).
    fn drain(&self) {
        self.rt.block_on(async {
            let mut consumer = self.consumer.borrow_mut();
            loop {
                let info = self.driver.info(&self.queue).await.expect("info");
                if info.message_count() == Some(0) {
                    return;
                }
                // The message is in the queue: it arrives at once; a hang is a bug.
                let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                    .await
                    .expect("a queued message is delivered")
                    .expect("the consumer is open")
                    .expect("delivery");
                delivery.ack().await.expect("ack");
            }
        });
    }
}

thread_local! {
    static WORLD: World = {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let queues = Queues::new();
        let driver = Arc::new(MemoryDriver::with_config(MemoryConfig { default_max_length: u64::MAX, ..Default::default() }));
        let settings = PublishSettings { codec: queue_core::Codec::MsgPack, ..Default::default() };
        let queue = QueueId::parse("fuzz:q").expect("id");
        let consumer = rt.block_on(async {
            queues
                .declare(QueueSpec::new(queue.clone()), settings, Arc::clone(&driver) as Arc<dyn Driver>)
                .await
                .expect("declare");
            driver.consume(&queue, ConsumeOptions { prefetch: 1 }).await.expect("consume")
        });
        let host = LuaHost::new(queues, SecurityContext::default()).expect("host");
        World { rt, host, driver, queue, consumer: RefCell::new(consumer) }
    };
}

fuzz_target!(|data: &[u8]| {
    let chunk = lua_expression::chunk(data);
    WORLD.with(|world| {
        if let Err(e) = world.rt.block_on(world.host.eval(&chunk)) {
            panic!("{e}\n{chunk}");
        }
        world.drain();
    });
});
