//! Lua `queue.publish` of a small table vs the same publish from Rust, and the cost of
//! dispatching one delivery to a no-op Lua handler, next to the floor of what such a
//! dispatch costs in its dependencies alone. Same run, memory driver.
//! Run: `cargo bench -p queue-lua --bench lua`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use queue_core::memory::MemoryDriver;
use queue_core::security::SecurityContext;
use queue_core::{
    Codec, HeaderValue, Headers, Message, PublishSettings, QueueId, QueueSpec, Queues, Value,
};
use queue_lua::{DeliveryContext, LuaHost, Settle};

const BATCH: u64 = 1000;

struct Noop;

#[async_trait(?Send)]
impl Settle for Noop {
    async fn ack(&self) -> queue_core::Result<()> {
        Ok(())
    }
    async fn nack(&self, _: &str) -> queue_core::Result<()> {
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let queues = Queues::new();
    // A large queue that the bench drains between rounds so publish never waits for room.
    let driver = Arc::new(MemoryDriver::with_config(
        queue_core::memory::MemoryConfig {
            default_max_length: u64::MAX,
            ..Default::default()
        },
    ));
    let id = QueueId::parse("bench:tasks").expect("id");
    rt.block_on(queues.declare(
        QueueSpec::new(id.clone()),
        PublishSettings::default(),
        driver.clone(),
    ))
    .expect("declare");
    let host = LuaHost::new(queues.clone(), SecurityContext::default()).expect("host");
    let ctx = SecurityContext::default();

    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("rust_facade", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters * BATCH {
                    let body = Value::map([
                        ("action", Value::from("send_email")),
                        ("user_id", Value::Int(456)),
                    ]);
                    let headers = Headers::from_pairs([("priority", HeaderValue::from("high"))]);
                    queues
                        .publish(&ctx, "bench:tasks", body, headers)
                        .await
                        .expect("publish");
                }
                started.elapsed()
            })
        })
    });
    let chunk = format!(
        r#"for i = 1, {BATCH} do
             local ok, err = queue.publish("bench:tasks", {{ action = "send_email", user_id = 456 }}, {{ priority = "high" }})
             if err then error(err) end
           end"#
    );
    group.bench_function("lua_queue_publish", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    host.eval(&chunk).await.expect("lua publish");
                }
                started.elapsed()
            })
        })
    });
    group.finish();

    let dir = std::env::temp_dir().join(format!("queue-lua-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let source = dir.join("noop.lua");
    std::fs::write(&source, "function noop(payload) end\n").expect("write");
    let handler = host.handler(&source, "noop").expect("handler");
    let body = Value::map([
        ("action", Value::from("send_email")),
        ("user_id", Value::Int(456)),
    ]);
    let message = Message::encode(&body, Headers::new(), Codec::Json).expect("encode");
    // Shared, as the runtime shares each delivery's message with its handler run.
    let shared_message = Arc::new(message.clone());
    let settle: Rc<dyn Settle> = Rc::new(Noop);
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(1));
    group.bench_function("noop_lua_handler", |b| {
        b.iter(|| {
            rt.block_on(async {
                let payload = host.decode_payload(&message).expect("decode");
                let context = DeliveryContext {
                    message: Arc::clone(&shared_message),
                    settle: Rc::clone(&settle),
                };
                host.run_handler(&handler, payload, context, SecurityContext::default())
                    .await
            })
        })
    });
    // The floor: what any dispatch of this message to a Lua function in a coroutine
    // costs in serde_json, mlua and Lua alone. The same decode and payload table as
    // the host's, and a kept coroutine resumed through mlua's async API, without what
    // the host adds (the error guard, the time-slice hook, the coroutine's context,
    // the settlement mapping).
    let bare = mlua::Lua::new();
    let noop: mlua::Function = bare
        .load("return function(payload) end")
        .eval()
        .expect("noop");
    let thread = bare.create_thread(noop.clone()).expect("thread");
    let mut tape = queue_core::Tape::new();
    group.bench_function("floor_mlua_coroutine", |b| {
        b.iter(|| {
            rt.block_on(async {
                message.decode_onto(&mut tape).expect("decode");
                let arg = queue_lua::value::tape_to_lua(&bare, &tape).expect("payload");
                thread
                    .clone()
                    .into_async::<()>(arg)
                    .expect("resume")
                    .await
                    .expect("run");
                thread.reset(noop.clone()).expect("reset");
            })
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
