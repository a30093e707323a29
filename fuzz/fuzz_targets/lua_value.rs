//! Publishing any Lua value from a chunk built from fuzz input either succeeds or is
//! INVALID: no crash, no other error kind.
#![no_main]

#[path = "../lua_expression.rs"]
mod lua_expression;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use queue_core::memory::{MemoryConfig, MemoryDriver};
use queue_core::security::SecurityContext;
use queue_core::{PublishSettings, QueueId, QueueSpec, Queues};
use queue_lua::LuaHost;

thread_local! {
    static WORLD: (tokio::runtime::Runtime, LuaHost) = {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let queues = Queues::new();
        let driver = Arc::new(MemoryDriver::with_config(MemoryConfig { default_max_length: u64::MAX, ..Default::default() }));
        let settings = PublishSettings { codec: queue_core::Codec::MsgPack, ..Default::default() };
        rt.block_on(queues.declare(QueueSpec::new(QueueId::parse("fuzz:q").expect("id")), settings, driver))
            .expect("declare");
        let host = LuaHost::new(queues, SecurityContext::default()).expect("host");
        (rt, host)
    };
}

fuzz_target!(|data: &[u8]| {
    let chunk = lua_expression::chunk(data);
    WORLD.with(|(rt, host)| {
        if let Err(e) = rt.block_on(host.eval(&chunk)) {
            panic!("{e}\n{chunk}");
        }
    });
});
