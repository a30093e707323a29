//! Lua `queue.publish` of a small table vs the same publish from Rust, and the cost of
//! dispatching one delivery to a no-op and to a computing Lua handler, each next to
//! the floor of what such a dispatch costs in its dependencies alone, and the floor's
//! parts (decoding the body; building the payload table). Same run, memory driver.
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

/// A handler that computes a little, as real ones do: what Lua instructions cost
/// under the host's time limits, next to the same function in a bare state.
const COMPUTE: &str = r#"
function compute(payload)
  local sum = 0
  for i = 1, 1000 do sum = sum + i * payload.user_id end
  local parts = {}
  for i = 1, 20 do parts[i] = tostring(i) .. payload.action end
  return sum > 0
end
"#;

struct Noop;

#[async_trait(?Send)]
impl Settle for Noop {
    async fn ack(&self) -> queue_core::Result<()> {
        Ok(())
    }
    async fn nack(&self, _: &str, _: bool) -> queue_core::Result<()> {
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
    let source = dir.join("handlers.lua");
    std::fs::write(&source, format!("function noop(payload) end\n{COMPUTE}")).expect("write");
    let body = Value::map([
        ("action", Value::from("send_email")),
        ("user_id", Value::Int(456)),
    ]);
    let message = Message::encode(&body, Headers::new(), Codec::Json).expect("encode");
    // Shared, as the runtime shares each delivery's message with its handler run.
    let shared_message = Arc::new(message.clone());
    let settle: Rc<dyn Settle> = Rc::new(Noop);
    // The floor: what any dispatch of this message to a Lua function in a coroutine
    // costs in serde_json, mlua and Lua alone. The same decode and payload table as
    // the host's, and a kept coroutine resumed through mlua's async API, without what
    // the host adds (the error guard, the time-slice hook, the coroutine's context,
    // the settlement mapping).
    let bare = mlua::Lua::new();
    let mut tape = queue_core::Tape::new();
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(1));
    for (method, floor) in [
        ("noop", "floor_mlua_coroutine"),
        ("compute", "floor_computing_mlua_coroutine"),
    ] {
        let handler = host.handler(&source, method).expect("handler");
        // Timed inside one `block_on` per sample, as the runtime dispatches inside a
        // running executor: entering the executor for each dispatch cost more than
        // resuming the coroutine.
        group.bench_function(format!("{method}_lua_handler"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let payload = host.decode_payload(&message).expect("decode");
                        let context = DeliveryContext {
                            message: Arc::clone(&shared_message),
                            settle: Rc::clone(&settle),
                        };
                        let outcome = host
                            .run_handler(&handler, payload, context, SecurityContext::default())
                            .await;
                        std::hint::black_box(outcome);
                    }
                    started.elapsed()
                })
            })
        });
        let function: mlua::Function = bare
            .load(format!(
                "function noop(payload) end\n{COMPUTE}\nreturn {method}"
            ))
            .eval()
            .expect("function");
        let thread = bare.create_thread(function.clone()).expect("thread");
        group.bench_function(floor, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        message.decode_onto(&mut tape).expect("decode");
                        let arg = queue_lua::value::tape_to_lua(&bare, &tape).expect("payload");
                        thread
                            .clone()
                            .into_async::<()>(arg)
                            .expect("resume")
                            .await
                            .expect("run");
                        thread.reset(function.clone()).expect("reset");
                    }
                    started.elapsed()
                })
            })
        });
    }
    // The floor's parts, so that the cost of resuming the coroutine is the floor's row
    // less `floor_decode_and_table`'s: reading the body onto the tape, then building
    // the payload table from it. In a state of their own, whose garbage does not
    // change the collector's pace for the rows above.
    let parts = mlua::Lua::new();
    group.bench_function("floor_decode", |b| {
        b.iter(|| message.decode_onto(&mut tape).expect("decode"))
    });
    group.bench_function("floor_decode_and_table", |b| {
        b.iter(|| {
            message.decode_onto(&mut tape).expect("decode");
            queue_lua::value::tape_to_lua(&parts, &tape).expect("payload")
        })
    });

    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
