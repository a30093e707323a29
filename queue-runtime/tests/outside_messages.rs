//! Messages another client published to RabbitMQ (raw lapin over AMQP 0-9-1, as pika
//! or kombu would; Qpid Proton's Python client over AMQP 1.0),
//! with headers and bodies no driver publishes, handled by the real binary through
//! both drivers: each is retried on schedule and then dead-lettered, never redelivered
//! in a loop; dead letters keep no TTL; reasons and headers stay within their limits;
//! a handler reads `attempts` as a number. Ignored, with the reason, when RabbitMQ or
//! Qpid Proton's Python client is not here (failed in CI).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use support::*;

const RABBITMQ: &str = queue_fixtures::rabbitmq::SHARED_AMQP091_URL;

const DRIVERS: [(&str, &str); 2] = [
    (
        "amqp091",
        "  - name: rabbit\n    kind: queue.driver.amqp\n    url: amqp://guest:guest@127.0.0.1:5672/%2f\n",
    ),
    (
        "amqp10",
        "  - name: rabbit\n    kind: queue.driver.amqp10\n    url: amqp://guest:guest@127.0.0.1:5672\n    profile: rabbitmq-v1\n",
    ),
];

const HANDLERS: &str = r#"
function start()
  local ok, err = queue.publish("app:jobs", { n = 0 }, { note = string.rep("h", 200000) })
  logger:info("Huge header", { kind = err and err:kind() })
end

function handle(payload)
  local msg = queue.message()
  local attempts = msg:header("attempts")
  logger:info("Handled", { id = msg:id(), attempts = attempts, kind = math.type(attempts) })
  local ok, err = coroutine.wrap(function()
    return queue.publish("billing:audit", { id = msg:id() })
  end)()
  logger:info("Sneaked", { kind = err and err:kind() })
  if payload.big then return nil, string.rep("r", 200000) end
  return nil, "always fails"
end

function dead(payload)
  local msg = queue.message()
  logger:warn("Dead letter", {
    id = msg:id(),
    dropped = msg:header("x_dropped_headers"),
    expiration = msg:header("expiration"),
    original_expiration = msg:header("x_original_expiration"),
    reason_bytes = #msg:header("x_dead_letter_reason"),
  })
end
"#;

/// Publishes the outside messages with raw lapin; returns their ids by label.
async fn publish_outside(queue: &str) -> BTreeMap<&'static str, String> {
    let conn = lapin::Connection::connect(RABBITMQ, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let mut ids = BTreeMap::new();
    let mut odd = FieldTable::default();
    odd.insert(
        "priority".into(),
        AMQPValue::LongString(LongString::from("urgent")),
    );
    odd.insert(
        "expiration".into(),
        AMQPValue::LongString(LongString::from("soon")),
    );
    odd.insert("attempts".into(), AMQPValue::LongInt(-5));
    let mut text_attempts = FieldTable::default();
    text_attempts.insert(
        "attempts".into(),
        AMQPValue::LongString(LongString::from("abc")),
    );
    let json = |id: &str| {
        BasicProperties::default()
            .with_message_id(id.into())
            .with_content_type("application/json".into())
    };
    let messages: [(&str, BasicProperties, &[u8]); 4] = [
        (
            "odd headers",
            json("outside-odd").with_priority(200).with_headers(odd),
            br#"{"n": 1}"#,
        ),
        (
            "json sent as msgpack",
            json("outside-msgpack")
                .with_content_type("application/msgpack".into())
                .with_headers(text_attempts.clone()),
            b"123",
        ),
        (
            "with a ttl",
            json("outside-ttl")
                .with_expiration("60000".into())
                .with_headers(text_attempts),
            br#"{"n": 3}"#,
        ),
        ("a huge reason", json("outside-big"), br#"{"big": true}"#),
    ];
    for (label, props, body) in messages {
        ids.insert(
            label,
            props
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        );
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    ids
}

/// The same messages from Qpid Proton's Python client over AMQP 1.0 (what a 1.0
/// consumer would get from another 1.0 client); it is installed with RabbitMQ by
/// `.ci/start-brokers`.
const PROTON_PUBLISHER: &str = r#"
import sys
from proton import Message
from proton.utils import BlockingConnection
conn = BlockingConnection("amqp://guest:guest@127.0.0.1:5672", allowed_mechs="PLAIN")
sender = conn.create_sender("/queue/" + sys.argv[1])
def send(mid, body, content_type="application/json", props=None, priority=None, ttl=None):
    m = Message(id=mid, body=body, content_type=content_type, properties=props or {})
    m.inferred = True  # a data section, as every other client sends bytes
    if priority is not None: m.priority = priority
    if ttl is not None: m.ttl = ttl
    sender.send(m)
# A list and a map as properties, which the AMQP 1.0 driver reads as bytes and leaves
# out (RabbitMQ 3.x aborts the connection of a publisher that annotates a message with
# an array of maps, as RabbitMQ 4 does what it dead-lettered: tests/artemis.rs has that).
send("outside-odd", b'{"n": 1}', priority=200,
     props={"priority": "urgent", "expiration": "soon", "attempts": -5, "tags": ["a", "b"],
            "meta": {"k": 1}})
send("outside-msgpack", b"123", content_type="application/msgpack", props={"attempts": "abc"})
send("outside-ttl", b'{"n": 3}', ttl=60.0, props={"attempts": "abc"})
send("outside-big", b'{"big": true}')
conn.close()
"#;

fn publish_with_proton(queue: &str) -> BTreeMap<&'static str, String> {
    let out = python(PROTON_PUBLISHER, &[queue]);
    match out {
        out if out.status.success() => [
            ("odd headers", "outside-odd"),
            ("json sent as msgpack", "outside-msgpack"),
            ("with a ttl", "outside-ttl"),
            ("a huge reason", "outside-big"),
        ]
        .into_iter()
        .map(|(label, id)| (label, id.to_string()))
        .collect(),
        other => panic!(
            "Qpid Proton's Python client failed: {}",
            text(&other.stderr)
        ),
    }
}

fn outside_messages_are_retried_then_dead_lettered_never_spun() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, driver) in DRIVERS {
        let id = queue_core::new_message_id().replace('-', "")[20..].to_string();
        let queue = format!("it-outside-{name}-{id}");
        let yaml = format!(
            "namespace: app\nentries:\n{driver}  - name: jobs\n    kind: queue.queue\n    queue_name: {queue}\n    durable: false\n    retry:\n      max_attempts: 2\n      backoff: {{ initial: 50ms, multiplier: 1, max: 50ms, jitter: false }}\n  - name: billing:audit\n    kind: queue.queue\n    queue_name: {queue}-billing\n    durable: false\n  - name: app_only\n    kind: security.policy\n    actions: \"queue.*\"\n    resources: \"app:*\"\n    effect: allow\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n    concurrency: 2\n    security:\n      actor: {{ id: worker }}\n      policies: [app_only]\n  - name: d\n    kind: queue.consumer\n    queue: jobs.dlq\n    source: h.lua\n    method: dead\n  - name: start\n    kind: process.lua\n    source: h.lua\n    method: start\n"
        );
        let dir = app(&[("app.yaml", &yaml), ("h.lua", HANDLERS)]);
        let (child, lines) =
            spawn_with_lines(&["run", "--log-format", "json", "app.yaml"], dir.path());
        let mut seen = wait_for_line(&lines, "runtime started");
        let ids = if name == "amqp091" {
            rt.block_on(publish_outside(&queue))
        } else {
            publish_with_proton(&queue)
        };
        // The msgpack one never reaches a handler (its dead letter cannot be decoded
        // either): three dead letters are handled, and its own is logged as moved.
        let done = |seen: &[String]| {
            let logs = json_lines(seen);
            lua_logs(&logs, "Dead letter").len() == 3
                && seen.iter().any(|l| {
                    l.contains("dead-lettered") && l.contains(&ids["json sent as msgpack"])
                })
        };
        while !done(&seen) {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!(
                        "{name}: the dead letters did not all arrive:\n{}",
                        seen.join("\n")
                    )
                });
            seen.push(line);
        }
        stop_cleanly(child, name);
        seen.extend(rest_of_lines(&lines));
        let logs = json_lines(&seen);
        let context = format!("{name}:\n{}", seen.join("\n"));

        // Two attempts each, no more: nothing is redelivered in a loop.
        let handled = lua_logs(&logs, "Handled");
        for label in ["odd headers", "with a ttl", "a huge reason"] {
            let calls: Vec<&serde_json::Value> =
                handled.iter().filter(|h| h["id"] == ids[label]).collect();
            assert_eq!(calls.len(), 2, "{label}: {context}");
            assert!(
                calls.iter().all(|c| c["kind"] == "integer"),
                "{label}: {calls:?}"
            );
        }
        let odd: Vec<i64> = handled
            .iter()
            .filter(|h| h["id"] == ids["odd headers"])
            .map(|h| h["attempts"].as_i64().unwrap_or(0))
            .collect();
        assert_eq!(odd, vec![1, 2], "attempts -5 reads as 1: {context}");
        let texts: Vec<i64> = handled
            .iter()
            .filter(|h| h["id"] == ids["with a ttl"])
            .map(|h| h["attempts"].as_i64().unwrap_or(0))
            .collect();
        assert_eq!(texts, vec![1, 2], "attempts \"abc\" reads as 1: {context}");
        let undecodable_retries = seen
            .iter()
            .filter(|l| {
                l.contains("retrying")
                    && l.contains("\"queue\":\"app:jobs\"")
                    && l.contains(&ids["json sent as msgpack"])
            })
            .count();
        // A body that cannot be decoded never will be: no retry, straight to the
        // dead-letter queue (docs/consumers.md, "Errors that are not retried").
        assert_eq!(undecodable_retries, 0, "{context}");

        let dead = lua_logs(&logs, "Dead letter");
        let by_id = |label: &str| {
            dead.iter()
                .find(|d| d["id"] == ids[label])
                .unwrap_or_else(|| panic!("no dead letter for {label}: {context}"))
                .clone()
        };
        let odd = by_id("odd headers");
        let dropped = odd["dropped"].as_str().unwrap_or("");
        for header in ["priority", "expiration"] {
            assert!(dropped.contains(header), "{header} not dropped: {odd}");
        }
        let ttl = by_id("with a ttl");
        assert!(
            ttl["expiration"].is_null(),
            "a dead letter kept its TTL: {ttl}"
        );
        assert_eq!(ttl["original_expiration"], 60000, "{ttl}");
        let big = by_id("a huge reason");
        assert!(
            big["reason_bytes"].as_u64().is_some_and(|n| n <= 4096),
            "{big}"
        );
        // Policies held inside the handler's coroutine; the huge header was refused.
        let sneaked = lua_logs(&logs, "Sneaked");
        assert!(
            !sneaked.is_empty() && sneaked.iter().all(|s| s["kind"] == "PermissionDenied"),
            "{sneaked:?}"
        );
        assert_eq!(lua_logs(&logs, "Huge header")[0]["kind"], "Invalid");
    }
}

/// What Qpid Proton (and rhea) send by default for a dictionary or a list: an
/// `amqp-value` body, not bytes. Before, the driver refused it, and RabbitMQ dropped it.
const PROTON_STRUCTURED: &str = r#"
import sys
from proton import Message, decimal32
from proton.utils import BlockingConnection
conn = BlockingConnection("amqp://guest:guest@127.0.0.1:5672", allowed_mechs="PLAIN")
sender = conn.create_sender("/queue/" + sys.argv[1])
sender.send(Message(id="structured-dict", body={"n": 1, "tags": ["a", "b"], 7: None}))
# A list at the top: RabbitMQ 3.10's plugin drops the connection for it (the unit
# tests of queue-amqp10's `body` module cover lists and sequences).
sender.send(Message(id="structured-list", body={"list": [1, "two"]}))
sender.send(Message(id="structured-decimal", body={"price": decimal32(5)}))
conn.close()
"#;

const STRUCTURED_HANDLERS: &str = r#"
function handle(payload)
  local msg = queue.message()
  logger:info("Handled", {
    id = msg:id(),
    n = payload.n, tag = payload.tags and payload.tags[2],
    first = payload.list and payload.list[1], second = payload.list and payload.list[2],
  })
  return true
end
"#;

/// Structured bodies from another AMQP 1.0 client reach a handler as tables; one no
/// codec can carry (a decimal) is dead-lettered with its bytes, never dropped.
fn structured_bodies_from_an_amqp10_client_reach_handlers_as_tables() {
    let id = queue_core::new_message_id().replace('-', "")[20..].to_string();
    let queue = format!("it-structured-{id}");
    let (_dir, child, lines, mut seen) = consuming(DRIVERS[1].1, &queue, STRUCTURED_HANDLERS);
    let sent = python(PROTON_STRUCTURED, &[&queue]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let done = |seen: &[String]| {
        let logs = json_lines(seen);
        lua_logs(&logs, "Handled").len() == 2
            && seen
                .iter()
                .any(|l| l.contains("dead-lettered") && l.contains("structured-decimal"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !done(&seen) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("not every message arrived:\n{}", seen.join("\n")));
        let readable = ["structured-dict", "structured-list"];
        if line.contains("handler failed") && readable.iter().any(|id| line.contains(id)) {
            panic!("a readable body failed its handler: {line}");
        }
        seen.push(line);
    }
    stop_cleanly(child, "the runtime");
    let logs = json_lines(&seen);
    let context = seen.join("\n");
    let handled = lua_logs(&logs, "Handled");
    let by_id = |id: &str| {
        handled
            .iter()
            .find(|h| h["id"] == id)
            .unwrap_or_else(|| panic!("{id} not handled: {context}"))
            .clone()
    };
    let dict = by_id("structured-dict");
    assert_eq!(
        (dict["n"].as_i64(), dict["tag"].as_str()),
        (Some(1), Some("b")),
        "{dict}"
    );
    let list = by_id("structured-list");
    assert_eq!(
        (list["first"].as_i64(), list["second"].as_str()),
        (Some(1), Some("two")),
        "{list}"
    );
    dead_lettered_at_once_as_unread(&seen, "structured-decimal");
}

/// Asserts that the runtime's log `seen` says the message `id` was dead-lettered on
/// its first attempt because nothing reads its body.
fn dead_lettered_at_once_as_unread(seen: &[String], id: &str) {
    let dead = seen
        .iter()
        .find(|l| l.contains("dead-lettered") && l.contains(&format!("\"{id}\"")))
        .unwrap_or_else(|| panic!("{id} not dead-lettered:\n{}", seen.join("\n")));
    assert!(dead.contains("which no codec reads"), "{dead}");
    assert!(
        dead.contains("\"attempts\":1"),
        "dead-lettered at once: {dead}"
    );
}

/// Bodies as pika, RabbitMQ's management UI or a JMS `TextMessage` send them: no
/// content type, a text one, `application/octet-stream`, and one no reading knows.
const PIKA_UNTYPED: &str = r#"
import sys, pika
conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
ch = conn.channel()
def send(mid, body, content_type=None):
    props = pika.BasicProperties(message_id=mid, content_type=content_type)
    ch.basic_publish("", sys.argv[1], body, props)
send("json", b'{"n": 1}')
send("text", b"hello")
send("plain", b'{"n": 3}', "text/plain; charset=utf-8")
send("octets", b'{"n": 4}', "application/octet-stream")
send("binary", b"\xff\x00")
send("number", b"00042")
send("xml", b"<n>6</n>", "application/xml")
conn.close()
"#;

const UNTYPED_HANDLER: &str = r#"
function handle(p)
  local id = queue.message():id()
  local text = type(p) == "string" and id ~= "binary" and p or nil
  logger:info("Handled", { id = id, kind = type(p), n = type(p) == "table" and p.n or nil,
    text = text, bytes = type(p) == "string" and #p or nil })
  return true
end
"#;

/// A body with no content type, or `application/octet-stream`, reaches the handler
/// once, as its JSON value when it is a JSON object and as its text otherwise (a
/// number too); a `text/*` body as its text, even when it looks like JSON; one of
/// another content type is dead-lettered on its first attempt. Before, every one of
/// them was dead-lettered (docs/core-model.md, "Bodies from other clients").
/// Through both drivers: RabbitMQ hands a 0-9-1 message to an AMQP 1.0 consumer as a
/// `data` section.
fn bodies_without_a_codec_content_type_reach_handlers_as_json_or_text() {
    for (name, driver) in DRIVERS {
        let id = queue_core::new_message_id().replace('-', "")[20..].to_string();
        let queue = format!("it-untyped-{name}-{id}");
        let (_dir, child, lines, mut seen) = consuming(driver, &queue, UNTYPED_HANDLER);
        let sent = python(PIKA_UNTYPED, &[&queue]);
        assert!(sent.status.success(), "{}", text(&sent.stderr));
        let dead_lettered = |logs: &[serde_json::Value]| {
            logs.iter().any(|l| {
                l["fields"]["id"] == "xml"
                    && l["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("dead-lettered"))
            })
        };
        collect_until(&lines, &mut seen, |logs| {
            lua_logs(logs, "Handled").len() == 6 && dead_lettered(logs)
        });
        stop_cleanly(child, name);
        let logs = json_lines(&seen);
        let context = format!("{name}:\n{}", seen.join("\n"));
        let handled = lua_logs(&logs, "Handled");
        let got = |id: &str| {
            let calls: Vec<_> = handled.iter().filter(|h| h["id"] == id).collect();
            assert_eq!(calls.len(), 1, "{id} handled once: {context}");
            let h = calls[0];
            (
                h["kind"].clone(),
                h["n"].clone(),
                h["text"].clone(),
                h["bytes"].clone(),
            )
        };
        use serde_json::{Value as J, json};
        assert_eq!(
            got("json"),
            (json!("table"), json!(1), J::Null, J::Null),
            "{context}"
        );
        assert_eq!(
            got("text"),
            (json!("string"), J::Null, json!("hello"), json!(5)),
            "{context}"
        );
        assert_eq!(
            got("plain"),
            (json!("string"), J::Null, json!("{\"n\": 3}"), json!(8)),
            "{context}"
        );
        assert_eq!(
            got("octets"),
            (json!("table"), json!(4), J::Null, J::Null),
            "{context}"
        );
        assert_eq!(
            got("binary"),
            (json!("string"), J::Null, J::Null, json!(2)),
            "{context}"
        );
        assert_eq!(
            got("number"),
            (json!("string"), J::Null, json!("00042"), json!(5)),
            "{context}"
        );
        assert!(
            handled.iter().all(|h| h["id"] != "xml"),
            "xml reached a handler: {context}"
        );
        dead_lettered_at_once_as_unread(&seen, "xml");
    }
}

/// Header tables nested as deep as one frame allows (lists 26,000 deep, tables 18,000
/// deep), from pika; lapin's parser recurses once per level. A script's `main` for
/// [`handles_what_a_script_publishes`].
const PIKA_DEEP_HEADERS: &str = r#"
import pika
def main():
    deep_list, deep_table = [], {}
    for _ in range(26000): deep_list = [deep_list]
    for _ in range(18000): deep_table = {"a": deep_table}
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    ch = conn.channel()
    for n, headers in [(1, {"deep": deep_list}), (2, {"deep": deep_table}), (3, {})]:
        props = pika.BasicProperties(headers=headers, content_type="application/json")
        ch.basic_publish("", sys.argv[1], ('{"n":%d}' % n).encode(), props)
    conn.close()
"#;

/// A message whose header another client nested as deep as a frame allows is handled
/// like any other. Before, lapin's frame parser overflowed its thread's 2 MiB stack
/// and aborted the runtime, at every start while the message waited in its queue.
fn headers_nested_as_deep_as_a_frame_allows_cannot_crash_the_runtime() {
    handles_what_a_script_publishes(
        DRIVERS[0].1,
        "deep-headers",
        PIKA_DEEP_HEADERS,
        &[],
        |logs| lua_logs(logs, "Handled").len() == 3,
    );
}

/// The `main` of the test's Python script: pika writes `bytes` as they are where AMQP
/// 0-9-1 wants UTF-8, as php-amqplib does.
const PIKA_BYTES_FOR_SHORT_STRINGS: &str = r#"
import pika
def main():
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    ch = conn.channel()
    odd = pika.BasicProperties(headers={b"k\xe9": 1, "nested": {b"n\xff": True}},
                               message_id=b"id-\xff\xfe", content_type="application/json")
    ch.basic_publish("", sys.argv[1], b'{"n":1}', odd)
    ch.basic_publish("", sys.argv[1], b'{"n":2}', pika.BasicProperties(content_type="application/json"))
    conn.close()
"#;

/// A header name and a message id that another client wrote as bytes that are not
/// UTF-8 reach the handler with `?` for those bytes. Before, lapin's parser refused
/// the frame by closing the connection, and the message, redelivered at once, did it
/// again: no message of any queue of the driver was handled again.
fn short_strings_that_are_not_utf8_cost_no_connection() {
    let fields = "{ n = p.n, k = msg:header(\"k?\"), id = msg:id() }";
    let handled = two_handled_over_amqp091("short-strings", fields, PIKA_BYTES_FOR_SHORT_STRINGS);
    assert_eq!(
        (&handled[0]["n"], &handled[0]["k"]),
        (&1.into(), &1.into()),
        "{handled:?}"
    );
    assert_eq!(handled[0]["id"], "id-??", "{handled:?}");
    assert_eq!(handled[1]["n"], 2, "{handled:?}");
}

/// The same message id, delivered by RabbitMQ over AMQP 1.0, reaches the handler
/// with `?` for those bytes too. Before, fe2o3-amqp could not decode the message, so
/// the driver rejected it, and RabbitMQ dropped it. (RabbitMQ 3.x hands an AMQP 1.0
/// consumer none of a 0-9-1 message's headers: the header name is checked in the
/// guard's tests.)
fn strings_that_are_not_utf8_reach_amqp10_handlers() {
    let fields = "{ n = p.n, id = msg:id() }";
    let handled = two_handled_over(
        DRIVERS[1],
        "strings-10",
        fields,
        PIKA_BYTES_FOR_SHORT_STRINGS,
    );
    assert_eq!(
        (&handled[0]["n"], &handled[0]["id"]),
        (&1.into(), &"id-??".into()),
        "{handled:?}"
    );
    assert_eq!(handled[1]["n"], 2, "{handled:?}");
}

/// The `main` of the test's Python script: Qpid Proton sends a map of 300 KB in an
/// `amqp-value` body, which takes more than one transfer frame.
const PROTON_LARGE_VALUE_BODY: &str = r#"
def main():
    big = {"body": {"n": 1, "pad": "x" * 300000}, "content_type": None, "inferred": False}
    send_over_amqp10([(1, big), (2, {})])
"#;

/// A structured body of several frames reaches its handler as any other. Before, the
/// client library could not decode an `amqp-value` or `amqp-sequence` body that came in
/// more than one frame, so the driver rejected the message, and RabbitMQ dropped it (a
/// JMS `TextMessage` of 300 KB through Artemis too).
fn value_bodies_of_several_frames_reach_handlers() {
    let fields = "{ n = p.n, pad = p.pad and #p.pad }";
    let handled = two_handled_over(DRIVERS[1], "large-value", fields, PROTON_LARGE_VALUE_BODY);
    assert_eq!(
        (&handled[0]["n"], &handled[0]["pad"]),
        (&1.into(), &300_000.into()),
        "{handled:?}"
    );
    assert_eq!(handled[1]["n"], 2, "{handled:?}");
}

/// What the handler logged (`fields`, as in [`logs_what_a_script_publishes`]) of the
/// two messages a script whose `main` is `script_main` publishes to a queue the
/// runtime consumes over AMQP 0-9-1. The driver must have kept its connection.
fn two_handled_over_amqp091(what: &str, fields: &str, script_main: &str) -> Vec<serde_json::Value> {
    two_handled_over(DRIVERS[0], what, fields, script_main)
}

/// [`two_handled_over_amqp091`] through `driver`, an entry of [`DRIVERS`]: the driver
/// must have kept its connection or link, and rejected nothing.
fn two_handled_over(
    (name, driver): (&str, &str),
    what: &str,
    fields: &str,
    script_main: &str,
) -> Vec<serde_json::Value> {
    let refused = [
        "connection to the AMQP broker lost; reconnecting",
        "amqp10 receiver link lost; re-attaching",
        "amqp10 receiver rejected a message it cannot decode",
    ];
    // Each is looked for by its text, and its absence is what passes: a line renamed
    // in its driver would turn the check off, so the drivers must still log each.
    let sources = [
        include_str!("../../queue-amqp091/src/connection.rs"),
        include_str!("../../queue-amqp10/src/consume.rs"),
    ];
    for line in refused {
        assert!(
            sources.iter().any(|s| s.contains(&format!("\"{line}\""))),
            "no driver logs {line:?} any more: this check must look for its new text"
        );
    }
    let refused_one = |logs: &[serde_json::Value]| {
        logs.iter()
            .any(|l| refused.iter().any(|r| l["fields"]["message"] == *r))
    };
    // A rejected message is not delivered again: the wait ends on the rejection.
    let logs = logs_what_a_script_publishes(driver, what, script_main, fields, &[], |logs| {
        lua_logs(logs, "Handled").len() == 2 || refused_one(logs)
    });
    assert!(!refused_one(&logs), "{name}: {logs:#?}");
    lua_logs(&logs, "Handled")
}

/// The `main` of the test's Python script: Qpid Proton publishes over AMQP 1.0 a
/// message with 200 KB of application properties, which RabbitMQ 3.x hands AMQP 0-9-1
/// consumers as one header in one content header frame.
const PROTON_LARGE_PROPERTIES: &str = r#"
def main():
    send_over_amqp10([(1, {"properties": {"big": "x" * 200000}}), (2, {"properties": {"small": "s"}})])
"#;

/// A content header larger than the driver's `frame_max`, which RabbitMQ sends whole,
/// reaches the handler without the header that made it so, named in
/// `x_dropped_headers`. Before, lapin ended the connection on it at every delivery.
/// A smaller one is named there too, as binary, which handlers are not shown.
/// (RabbitMQ 3.x puts all the application properties in one header; a RabbitMQ 4
/// would need this test's expected name changed.)
fn a_content_header_past_frame_max_costs_no_connection() {
    let fields = "{ n = p.n, dropped = msg:header(\"x_dropped_headers\") }";
    let handled = two_handled_over_amqp091("large-header", fields, PROTON_LARGE_PROPERTIES);
    assert_eq!(handled[0]["n"], 1, "{handled:?}");
    let note = handled[0]["dropped"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("x-amqp-1.0-app-properties (") && note.contains("131072"),
        "{note}"
    );
    // The small one fits; RabbitMQ's binary encoding of it is still not shown, and
    // named so.
    assert_eq!(handled[1]["n"], 2, "{handled:?}");
    let note = handled[1]["dropped"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("x-amqp-1.0-app-properties (binary") && !note.contains("131072"),
        "{note}"
    );
}

/// The `main` of the test's Python script: Qpid Proton publishes over AMQP 1.0 a
/// message whose id is a `ulong`, which RabbitMQ 3.x cannot deliver over AMQP 0-9-1.
const PROTON_ULONG_MESSAGE_ID: &str = r#"
def main():
    from proton import ulong
    send_over_amqp10([(1, {"id": ulong(7)})])
"#;

/// RabbitMQ ends a 0-9-1 consumer's connection at every delivery of a message it
/// cannot convert (`541 INTERNAL_ERROR`): the driver cannot set it aside, so each loss
/// is logged with the broker's reply, which leads to the cause in RabbitMQ's own log
/// (docs/drivers/amqp091.md, "What is left"). Before, the line said only that the
/// connection was lost. (A RabbitMQ 4 converts such an id: there this test would
/// wait for a loss that never comes.)
fn a_connection_the_broker_ends_is_logged_with_its_reason() {
    let id = queue_core::new_message_id().replace('-', "")[20..].to_string();
    let queue = format!("it-broker-ends-{id}");
    let (_dir, child, lines, mut seen) =
        consuming(DRIVERS[0].1, &queue, "function handle(p) return true end\n");
    let script = format!("{DEEP_PYTHON}{PROTON_ULONG_MESSAGE_ID}{RUN_MAIN_DEEP}");
    let sent = python(&script, &[&queue]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    // The message stays in its queue for good: the queue goes when the test ends.
    let _queue = DeletedAtTheEnd(queue);
    let lost = "connection to the AMQP broker lost; reconnecting";
    // The loss comes again at every redelivery: one of them giving the broker's reply
    // is enough, should lapin once be slower to tell it than the driver waits.
    let explained = |l: &serde_json::Value| {
        l["fields"]["message"] == lost
            && l["fields"]["error"]
                .as_str()
                .is_some_and(|why| why.contains("INTERNAL_ERROR"))
    };
    collect_until(&lines, &mut seen, |logs| logs.iter().any(explained));
    stop_cleanly(child, "the runtime");
}

/// A queue on the shared RabbitMQ, deleted when this is dropped (a test that fails
/// included).
struct DeletedAtTheEnd(String);

impl Drop for DeletedAtTheEnd {
    fn drop(&mut self) {
        let delete = "import pika, sys\nconn = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1'))\nconn.channel().queue_delete(sys.argv[1])\nconn.close()\n";
        let deleted = python(delete, &[&self.0]);
        if !deleted.status.success() && !std::thread::panicking() {
            panic!("deleting {}: {}", self.0, text(&deleted.stderr));
        }
    }
}

/// A message annotation nested 50,000 deep, from Qpid Proton's Python client:
/// fe2o3-amqp decodes annotations whole, recursing once per level. A script's `main`
/// for [`handles_what_a_script_publishes`].
const PROTON_DEEP_ANNOTATION: &str = r#"
def main():
    from proton import symbol
    deep = []
    for _ in range(50000): deep = [deep]
    send_over_amqp10([(1, {"annotations": {symbol("x-opt-deep"): deep}}), (2, {})])
"#;

/// Annotations nested deep by another AMQP 1.0 client cannot crash the runtime,
/// whatever its stacks: fe2o3-amqp decodes them on a tokio worker, recursing once
/// per level, and such a message aborted the runtime at every start (this one with
/// the default 2 MiB stack, one 250,000 deep even with the 128 MiB the binary gives
/// its threads). The driver's guard cuts it at 128 levels, so it is rejected like any
/// message the client library cannot decode, and the one after it is handled. The
/// runtime runs with 8 MiB stacks here: without the guard, it aborts.
fn annotations_nested_deep_cannot_crash_the_runtime() {
    let rejected = "amqp10 receiver rejected a message it cannot decode";
    handles_what_a_script_publishes(
        DRIVERS[1].1,
        "deep-annotations",
        PROTON_DEEP_ANNOTATION,
        &[("RUST_MIN_STACK", "8388608")],
        |logs| {
            let handled = lua_logs(logs, "Handled");
            handled.len() == 1
                && handled[0]["n"] == 2
                && logs.iter().any(|l| l["fields"]["message"] == rejected)
        },
    );
}

/// What a publishing script of [`handles_what_a_script_publishes`] starts with,
/// `send_over_amqp10` among it: sends to the queue its first argument names, with Qpid
/// Proton, a message `{"n": n}` for each `(n, attributes)`, those attributes set.
const DEEP_PYTHON: &str = r#"import sys, threading
sys.setrecursionlimit(10000000)
def send_over_amqp10(messages):
    from proton import Message
    from proton.utils import BlockingConnection
    conn = BlockingConnection("amqp://guest:guest@127.0.0.1:5672", allowed_mechs="PLAIN")
    sender = conn.create_sender("/queue/" + sys.argv[1])
    for n, attributes in messages:
        message = Message(body=('{"n":%d}' % n).encode(), content_type="application/json")
        message.inferred = True
        for name, value in attributes.items():
            setattr(message, name, value)
        sender.send(message)
    conn.close()
"#;
/// ... and ends with: its `main` on a thread with a 1 GiB stack, an exception in it
/// ending the script with a failure, as it would off the thread.
const RUN_MAIN_DEEP: &str = "threading.stack_size(1024 * 1024 * 1024)\nfailed = []\ndef run():\n    try:\n        main()\n    except BaseException:\n        import traceback\n        traceback.print_exc()\n        failed.append(True)\nt = threading.Thread(target=run)\nt.start()\nt.join()\nsys.exit(1 if failed else 0)\n";

/// Starts the runtime (with `env`) consuming a fresh queue through `driver` with a
/// handler that logs each message, runs the Python `script` with the queue's name, and
/// waits until `done` holds for the runtime's log; then the runtime must stop cleanly
/// on SIGTERM.
fn handles_what_a_script_publishes(
    driver: &str,
    what: &str,
    script: &str,
    env: &[(&str, &str)],
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    logs_what_a_script_publishes(driver, what, script, "{ n = p.n }", env, done)
}

/// [`handles_what_a_script_publishes`], the handler logging `fields` (a Lua table of
/// `p`, the payload, and `msg`, the message) as "Handled"; returns the runtime's log.
fn logs_what_a_script_publishes(
    driver: &str,
    what: &str,
    script: &str,
    fields: &str,
    env: &[(&str, &str)],
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let id = queue_core::new_message_id().replace('-', "")[20..].to_string();
    let queue = format!("it-{what}-{id}");
    let handler = format!(
        "function handle(p)\n  local msg = queue.message()\n  logger:info(\"Handled\", {fields})\n  return true\nend\n"
    );
    let (_dir, child, lines, mut seen) = consuming_with(driver, &queue, &handler, env);
    // Python recurses once per level to encode, as the parsers do to decode: its
    // `main` runs on a thread with room for that.
    let script = format!("{DEEP_PYTHON}{script}{RUN_MAIN_DEEP}");
    let sent = python(&script, &[&queue]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    collect_until(&lines, &mut seen, done);
    stop_cleanly(child, "the runtime");
    json_lines(&seen)
}

/// Stops the runtime with SIGTERM: it must end cleanly within a minute.
fn stop_cleanly(child: Spawned, what: &str) {
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
}

/// The runtime binary consuming `queue` through `driver` (an entry of [`DRIVERS`])
/// with `handler` as `h.lua`'s `handle`, started: its app directory, the process,
/// its output lines and those read so far.
fn consuming(
    driver: &str,
    queue: &str,
    handler: &str,
) -> (
    tempfile::TempDir,
    Spawned,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
) {
    consuming_with(driver, queue, handler, &[])
}

/// [`consuming`], the runtime started with the environment variables `env`.
fn consuming_with(
    driver: &str,
    queue: &str,
    handler: &str,
    env: &[(&str, &str)],
) -> (
    tempfile::TempDir,
    Spawned,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
) {
    let yaml = format!(
        "namespace: app\nentries:\n{driver}  - name: jobs\n    kind: queue.queue\n    queue_name: {queue}\n    durable: false\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n"
    );
    let dir = app(&[("app.yaml", &yaml), ("h.lua", handler)]);
    let (child, lines) = spawn_with_lines_and_env(
        &["run", "--log-format", "json", "app.yaml"],
        dir.path(),
        env,
    );
    let seen = wait_for_line(&lines, "runtime started");
    (dir, child, lines, seen)
}

/// Reads the runtime's JSON log lines into `seen` until `done` holds for them; fails
/// the test when the runtime ends first or two minutes pass.
fn collect_until(
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    done: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let logs = json_lines(seen);
        if done(&logs) {
            return;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("not every message arrived:\n{}", seen.join("\n")),
        }
    }
}

queue_testkit::broker_tests! {
    unavailable: queue_fixtures::rabbitmq::shared_unavailable()
        .or_else(queue_fixtures::proton::ProtonBroker::unavailable);
    async: [];
    sync: [
        outside_messages_are_retried_then_dead_lettered_never_spun,
        structured_bodies_from_an_amqp10_client_reach_handlers_as_tables,
        bodies_without_a_codec_content_type_reach_handlers_as_json_or_text,
        headers_nested_as_deep_as_a_frame_allows_cannot_crash_the_runtime,
        short_strings_that_are_not_utf8_cost_no_connection,
        strings_that_are_not_utf8_reach_amqp10_handlers,
        value_bodies_of_several_frames_reach_handlers,
        a_content_header_past_frame_max_costs_no_connection,
        a_connection_the_broker_ends_is_logged_with_its_reason,
        annotations_nested_deep_cannot_crash_the_runtime,
    ];
}
