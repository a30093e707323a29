//! Lua <-> message values (docs/core-model.md): what converts, what is refused and how the
//! refusal names the offending path or header.

mod support;

use proptest::prelude::*;
use queue_core::{HeaderValue, Value};
use queue_lua::Outcome;
use support::Harness;

async fn publish_error(h: &Harness, lua_args: &str) -> (String, String) {
    let code = format!(
        "local ok, err = queue.publish({lua_args}) if ok then return 'ok', '' end return err:kind(), err:message()"
    );
    let out = h.host.eval(&code).await.unwrap();
    match (&out[0], &out[1]) {
        (Value::String(kind), Value::String(message)) => (kind.clone(), message.clone()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn tables_become_arrays_or_maps_and_numbers_keep_their_kind() {
    let h = Harness::new().await;
    let code = r#"return queue.publish("app:tasks", {
        list = { 1, 2.5, "three", true },
        map = { a = 5, b = 5.0 },
        empty = {},
        nested = { deeper = { { x = 1 } } },
    })"#;
    h.host.eval(code).await.unwrap();
    let body = h.take("app:tasks").await.decode().unwrap();
    let expected = Value::map([
        (
            "list",
            Value::Array(vec![
                Value::Int(1),
                Value::Float(2.5),
                Value::from("three"),
                Value::Bool(true),
            ]),
        ),
        (
            "map",
            Value::map([("a", Value::Int(5)), ("b", Value::Float(5.0))]),
        ),
        ("empty", Value::Map(Default::default())),
        (
            "nested",
            Value::map([(
                "deeper",
                Value::Array(vec![Value::map([("x", Value::Int(1))])]),
            )]),
        ),
    ]);
    assert_eq!(body, expected);
}

/// A table of more values than mlua's reference stack holds at once (about a
/// million: each string collected holds a slot until its table is converted): the
/// error said "out of Lua stack, too many arguments to a Lua function" (review).
#[test]
fn a_table_of_more_values_than_can_be_held_at_once_says_so() {
    let lua = mlua::Lua::new();
    let wide: mlua::Value = lua
        .load("local t = {} for i = 1, 1100000 do t[i] = 'x' end return t")
        .eval()
        .unwrap();
    let err = queue_lua::value::from_lua_within(&wide, "data", usize::MAX).unwrap_err();
    assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
    assert!(err.message().contains("about a million values"), "{err}");
}

#[tokio::test]
async fn scalars_publish_as_themselves() {
    let h = Harness::new().await;
    for (lua, value) in [
        ("42", Value::Int(42)),
        ("4.5", Value::Float(4.5)),
        ("true", Value::Bool(true)),
        ("false", Value::Bool(false)),
        ("'hi'", Value::from("hi")),
    ] {
        h.host
            .eval(&format!("assert(queue.publish('app:tasks', {lua}))"))
            .await
            .unwrap();
        assert_eq!(h.take("app:tasks").await.decode().unwrap(), value, "{lua}");
    }
}

/// A queue id that is not UTF-8 is refused: read lossily, `app:t\xff` published to
/// `app:t\u{FFFD}`, whose permission was checked instead.
#[tokio::test]
async fn a_queue_id_that_is_not_utf8_is_invalid() {
    let h = Harness::new().await;
    let (kind, message) = publish_error(&h, r#""app:tasks\255", { n = 1 }"#).await;
    assert_eq!(kind, "Invalid", "{message}");
    assert!(message.contains("UTF-8"), "{message}");
}

#[tokio::test]
async fn non_utf8_strings_travel_as_bytes_on_msgpack_and_are_refused_by_json() {
    let h = Harness::new().await;
    h.host
        .eval(r#"assert(queue.publish("app:raw", { blob = "\xff\x00\xfe" }))"#)
        .await
        .unwrap();
    let body = h.take("app:raw").await.decode().unwrap();
    assert_eq!(
        body,
        Value::map([("blob", Value::Bytes(vec![0xff, 0, 0xfe]))])
    );
    let (kind, message) = publish_error(&h, r#""app:tasks", { blob = "\xff" }"#).await;
    assert_eq!(kind, "Invalid");
    assert!(
        message.contains("data.blob") && message.contains("msgpack"),
        "{message}"
    );
    let (kind, message) = publish_error(&h, r#""app:tasks", { x = 0/0 }"#).await;
    assert_eq!(kind, "Invalid");
    assert!(message.contains("msgpack"), "{message}");
}

#[tokio::test]
async fn values_that_cannot_travel_are_invalid_naming_their_path() {
    let h = Harness::new().await;
    let cases = [
        (
            r#""app:tasks", { items = { 1, 2, { cb = print } } }"#,
            "data.items[3].cb",
        ),
        (r#""app:tasks", { u = errors.new("a userdata") }"#, "data.u"),
        (
            r#""app:tasks", { co = coroutine.create(print) }"#,
            "data.co",
        ),
        (r#""app:tasks", { 1, 2, x = 3 }"#, "mixes"),
        (
            r#""app:tasks", { [1] = "a", [2^40] = "c" }"#,
            "has integer keys up to 1099511627776 for 2 values",
        ),
        (r#""app:tasks", { [0] = "a", [1] = "b" }"#, "run from 1"),
        (r#""app:tasks", { [true] = 1 }"#, "boolean key"),
        (r#""app:tasks", print"#, "data is a function"),
    ];
    for (args, needle) in cases {
        let (kind, message) = publish_error(&h, args).await;
        assert_eq!(kind, "Invalid", "{args}");
        assert!(message.contains(needle), "{args}: {message}");
    }
    assert_eq!(h.ready("app:tasks").await, 0);
}

#[tokio::test]
async fn cycles_and_deep_nesting_are_invalid() {
    let h = Harness::new().await;
    let (kind, message) = publish_error(
        &h,
        r#""app:tasks", (function() local t = {} t.self = t return t end)()"#,
    )
    .await;
    assert_eq!(kind, "Invalid");
    assert!(
        message.contains("data.self") && message.contains("cycle"),
        "{message}"
    );
    let deep =
        "(function() local t = { leaf = 1 } for i = 1, 200 do t = { t = t } end return t end)()";
    let (kind, message) = publish_error(&h, &format!("\"app:tasks\", {deep}")).await;
    assert_eq!(kind, "Invalid");
    assert!(message.contains("deeper than 128"), "{message}");
}

#[tokio::test]
async fn a_table_shared_many_times_over_is_refused_by_its_size_not_converted_for_ever() {
    let h = Harness::new().await;
    // A few kilobytes in Lua, 2^40 strings once every reference is followed.
    let shared = "(function() local t = { 'x' } for i = 1, 40 do t = { t, t } end return t end)()";
    let (kind, message) = publish_error(&h, &format!("\"app:tasks\", {shared}")).await;
    assert_eq!(kind, "Invalid");
    assert!(
        message.contains("takes more than 1048576 bytes"),
        "{message}"
    );
    // The logger, which needs no permission, refuses them as well.
    let logged = h
        .host
        .eval(&format!("logger:info('shared', {shared}) return 'logged'"))
        .await
        .unwrap();
    assert_eq!(logged, vec![Value::from("logged")]);
}

#[tokio::test]
async fn header_values_are_checked_by_key() {
    let h = Harness::new().await;
    let cases = [
        (
            r#""app:tasks", { a = 1 }, { trace = { id = 1 } }"#,
            "\"trace\"",
        ),
        (r#""app:tasks", { a = 1 }, { cb = print }"#, "\"cb\""),
        (
            r#""app:tasks", { a = 1 }, { attempts = 2 }"#,
            "\"attempts\"",
        ),
        (
            r#""app:tasks", { a = 1 }, { x_original_queue = "app:other" }"#,
            "\"x_original_queue\"",
        ),
        (
            r#""app:tasks", { a = 1 }, { priority = "urgent" }"#,
            "priority",
        ),
        (r#""app:tasks", { a = 1 }, { delay = -1 }"#, "delay"),
        (
            r#""app:tasks", { a = 1 }, "not a table""#,
            "headers must be a table",
        ),
    ];
    for (args, needle) in cases {
        let (kind, message) = publish_error(&h, args).await;
        assert_eq!(kind, "Invalid", "{args}");
        assert!(message.contains(needle), "{args}: {message}");
    }
    assert_eq!(h.ready("app:tasks").await, 0);
}

#[tokio::test]
async fn seed_headers_arrive_as_published() {
    let h = Harness::new().await;
    h.host
        .eval(r#"assert(queue.publish("app:notifications", { type = "order_shipped" }, { priority = "high", correlation_id = "req-1", retries = 3, ok = true }))"#)
        .await
        .unwrap();
    let msg = h.take("app:notifications").await;
    assert_eq!(
        msg.headers.get("priority"),
        Some(&HeaderValue::from("high"))
    );
    assert_eq!(
        msg.headers.get("correlation_id"),
        Some(&HeaderValue::from("req-1"))
    );
    assert_eq!(msg.headers.get("retries"), Some(&HeaderValue::Int(3)));
    assert_eq!(msg.headers.get("ok"), Some(&HeaderValue::Bool(true)));
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>()
            .prop_filter("NaN never equals itself", |f| !f.is_nan())
            .prop_map(Value::Float),
        ".*".prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 1..8)
            .prop_filter("bytes that are not UTF-8", |b| std::str::from_utf8(b)
                .is_err())
            .prop_map(Value::Bytes),
    ];
    // Lua tables cannot hold nil, and an empty table reads back as a map.
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 1..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..6).prop_map(Value::Map),
        ]
    })
    .prop_filter("publish refuses empty data", |v| !v.is_empty_data())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_value_publish_accepts_arrives_equal_in_the_handler(value in arb_value()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let h = Harness::new().await;
            let lua_value = queue_lua::value::to_lua(h.host.lua(), &value).unwrap();
            h.host.globals().set("generated", lua_value).unwrap();
            h.host.eval(r#"assert(queue.publish("app:raw", generated))"#).await.unwrap();
            let published = h.take("app:raw").await;
            // The handler receives it and publishes what it got back out.
            let (outcome, _) = h.handle("handlers.lua", "echo", published).await;
            assert_eq!(outcome, Outcome::Ack);
            let echoed = h.take("app:raw").await.decode().unwrap();
            assert_eq!(echoed, value);
        });
    }
}

#[tokio::test]
async fn the_seed_priority_word_orders_delivery_on_a_priority_queue() {
    let h = Harness::new().await;
    let spec = queue_core::QueueSpec::new(queue_core::QueueId::parse("app:prio").unwrap())
        .with_max_priority(9);
    h.queues
        .declare(spec, Default::default(), h.driver.clone())
        .await
        .unwrap();
    h.host
        .eval(
            r#"
            assert(queue.publish("app:prio", { n = 1 }, { priority = "low" }))
            assert(queue.publish("app:prio", { n = 2 }, { priority = "high" }))
        "#,
        )
        .await
        .unwrap();
    let first = h.take("app:prio").await;
    assert_eq!(first.decode().unwrap(), Value::map([("n", Value::Int(2))]));
}

/// A body as another client may send it: not written by our encoder.
fn outside_json(body: &[u8]) -> queue_core::Message {
    let mut message = support::json_message(Value::Nil, Default::default());
    message.body = body.to_vec();
    message
}

#[tokio::test]
async fn a_key_sent_twice_reaches_the_handler_with_its_last_value() {
    let h = Harness::new().await;
    let message = outside_json(br#"{"a": 1, "b": [true, "x"], "a": 3}"#);
    let (outcome, _) = h.handle("handlers.lua", "echo", message).await;
    assert_eq!(outcome, Outcome::Ack);
    let echoed = h.take("app:raw").await.decode().unwrap();
    let expected = Value::map([
        ("a", Value::Int(3)),
        ("b", Value::Array(vec![Value::Bool(true), Value::from("x")])),
    ]);
    assert_eq!(echoed, expected);
}

/// JSON's `null` is Lua's `nil`: a key that holds it is absent, a list that holds it
/// has a hole. Forwarding such a payload writes the hole back as `null`; it was
/// refused, INVALID ("a list cannot have holes"), and the message dead-lettered at its
/// first attempt (review).
#[tokio::test]
async fn a_payload_with_nulls_can_be_forwarded_as_it_came() {
    let h = Harness::new().await;
    let message = outside_json(br#"{"tags": [null, "x"], "note": null, "k": 1}"#);
    let (outcome, _) = h.handle("handlers.lua", "echo", message).await;
    assert_eq!(outcome, Outcome::Ack);
    let echoed = h.take("app:raw").await.decode().unwrap();
    let expected = Value::map([
        ("tags", Value::Array(vec![Value::Nil, Value::from("x")])),
        ("k", Value::Int(1)),
    ]);
    assert_eq!(echoed, expected);
    // As many holes as fit: twenty nulls and a value, as JSON sends them.
    let message = outside_json(br#"[null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, "x"]"#);
    let (outcome, _) = h.handle("handlers.lua", "echo", message).await;
    assert_eq!(outcome, Outcome::Ack);
    let mut twenty = vec![Value::Nil; 20];
    twenty.push(Value::from("x"));
    assert_eq!(
        h.take("app:raw").await.decode().unwrap(),
        Value::Array(twenty)
    );
    // More holes than the size limit has room for: refused, not built.
    let (kind, message) = publish_error(&h, r#""app:tasks", { [1] = 1, [1e9] = 2 }"#).await;
    assert_eq!(kind, "Invalid");
    assert!(
        message.contains("data has integer keys up to 1000000000"),
        "{message}"
    );
    let listed = h
        .host
        .eval(r#"return queue.publish("app:tasks", { [2] = "b", [3] = "c", [6] = "f" })"#)
        .await
        .unwrap();
    assert_eq!(listed[0], Value::Bool(true));
    let holes = h.take("app:tasks").await.decode().unwrap();
    assert_eq!(
        holes,
        Value::Array(vec![
            Value::Nil,
            Value::from("b"),
            Value::from("c"),
            Value::Nil,
            Value::Nil,
            Value::from("f")
        ])
    );
}

#[tokio::test]
async fn a_body_nested_as_deep_as_allowed_reaches_the_handler_whole() {
    let h = Harness::new().await;
    let depth = queue_core::MAX_DEPTH;
    let body = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let (outcome, _) = h
        .handle("handlers.lua", "echo", outside_json(body.as_bytes()))
        .await;
    assert_eq!(outcome, Outcome::Ack);
    let mut expected = Value::Int(1);
    for _ in 0..depth {
        expected = Value::Array(vec![expected]);
    }
    assert_eq!(h.take("app:raw").await.decode().unwrap(), expected);
}

#[tokio::test]
async fn a_payload_made_by_another_host_fails_the_run_instead_of_crossing_states() {
    let h = Harness::new().await;
    let other = Harness::new().await;
    let handler = h
        .host
        .handler(&support::lua_file("handlers.lua"), "echo")
        .unwrap();
    let foreign = other.host.payload(&Value::from("x")).unwrap();
    let context = queue_lua::DeliveryContext {
        message: std::sync::Arc::new(support::json_message(Value::from("x"), Default::default())),
        settle: std::rc::Rc::new(support::Recorder::default()),
    };
    let outcome = h
        .host
        .run_handler(&handler, foreign, context, Default::default())
        .await;
    match outcome {
        Outcome::Nack { reason, retryable } => {
            assert!(reason.contains("made by another Lua host"), "{reason}");
            assert!(retryable);
        }
        other => panic!("expected a nack, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Whatever bytes another client sends, under a codec's content type, a text one or
    /// none, the payload is built or the body is `INVALID`: never a panic inside the
    /// call into Lua. Text and untyped bodies always become a payload.
    #[test]
    fn any_body_becomes_a_payload_or_is_invalid(
        body in proptest::collection::vec(any::<u8>(), 0..96),
        content_type in prop_oneof![
            Just("application/json"),
            Just("application/msgpack"),
            Just("text/plain"),
            Just(""),
        ],
    ) {
        let host = queue_lua::LuaHost::new(
            queue_core::Queues::new(),
            queue_core::security::SecurityContext::default(),
        )
        .unwrap();
        let mut message = support::json_message(Value::Nil, Default::default());
        message.content_type = content_type.to_string();
        message.body = body;
        match host.decode_payload(&message) {
            Ok(_) => {}
            Err(e) => {
                prop_assert_eq!(e.kind(), queue_core::ErrorKind::Invalid, "{}", e);
                prop_assert!(content_type.starts_with("application/"), "{}", e);
            }
        }
    }
}
