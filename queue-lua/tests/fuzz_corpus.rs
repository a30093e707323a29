//! Replays the committed `lua_value` fuzz corpus: every generated value publishes or
//! is INVALID.

#[path = "../../fuzz/lua_expression.rs"]
mod lua_expression;

use std::sync::Arc;

use queue_core::memory::MemoryDriver;
use queue_core::security::SecurityContext;
use queue_core::{PublishSettings, QueueId, QueueSpec, Queues, Value};
use queue_lua::LuaHost;

#[tokio::test]
async fn the_lua_value_corpus_publishes_or_is_invalid() {
    let queues = Queues::new();
    let settings = PublishSettings {
        codec: queue_core::Codec::MsgPack,
        ..Default::default()
    };
    let spec = QueueSpec::new(QueueId::parse("fuzz:q").unwrap());
    queues
        .declare(spec, settings, Arc::new(MemoryDriver::new()))
        .await
        .unwrap();
    let host = LuaHost::new(queues, SecurityContext::default()).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/lua_value");
    let mut outcomes = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let chunk = lua_expression::chunk(&data);
        let out = host
            .eval(&chunk)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{chunk}"));
        outcomes.push(out[0].clone());
    }
    assert!(outcomes.len() >= 4);
    assert!(
        outcomes
            .iter()
            .all(|o| *o == Value::from("published") || *o == Value::from("invalid"))
    );
    assert!(
        outcomes.contains(&Value::from("invalid")),
        "the corpus exercises refusals"
    );
}
