//! The runtime on ActiveMQ Artemis (AMQP 1.0, profile `artemis`), with the real
//! binary: interop with another AMQP 1.0 client (Qpid Proton's Python client) both
//! ways, and the runtime's own faults — SIGTERM and SIGKILL of the runtime under load,
//! and a broker that is down when the runtime starts — on private Artemis instances,
//! counted end to end (published / confirmed / consumed / duplicates / lost). Ignored
//! with the reason when Artemis cannot run here (failed in CI).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::{ConsumeOptions, Driver, QueueId, QueueSpec};
use queue_fixtures::artemis::{ArtemisNode, shared_url};
use queue_testkit::{Tally, number_of, numbered};
use support::*;

/// Messages of load per fault case.
const LOAD: i64 = 2000;

fn unique() -> String {
    queue_core::new_message_id().replace('-', "")[20..].to_string()
}

fn driver_yaml(url: &str) -> String {
    format!(
        "  - name: broker\n    kind: queue.driver.amqp10\n    url: {url}\n    profile: artemis\n    reconnect_delay: 200ms\n    reconnect_max_delay: 2s\n    publish_timeout: 30s\n"
    )
}

/// Qpid Proton sends one message with its own properties, then reads what the
/// runtime answered and prints it as JSON.
const PROTON_SEND: &str = r#"
import sys
from proton import Message
from proton.utils import BlockingConnection
conn = BlockingConnection(sys.argv[1], allowed_mechs="PLAIN")
sender = conn.create_sender(sys.argv[2])
m = Message(id="proton-1", correlation_id="corr-1", content_type="application/json",
            body=b'{"n": 7, "word": "hello"}', priority=7,
            properties={"tenant": "acme", "count": 3, "ratio": 0.5, "flag": True})
m.inferred = True
sender.send(m)
conn.close()
"#;

const PROTON_RECEIVE: &str = r#"
import sys, json
from proton.utils import BlockingConnection
conn = BlockingConnection(sys.argv[1], allowed_mechs="PLAIN")
receiver = conn.create_receiver(sys.argv[2])
m = receiver.receive(timeout=30)
receiver.accept()
body = m.body if isinstance(m.body, (bytes, memoryview)) else str(m.body).encode()
print(json.dumps({"body": bytes(body).decode(), "content_type": m.content_type,
                  "id": str(m.id), "correlation_id": str(m.correlation_id),
                  "priority": m.priority, "properties": m.properties}))
conn.close()
"#;

fn proton(script: &str, args: &[&str]) -> String {
    let out = python(script, args);
    assert!(
        out.status.success(),
        "the Proton client failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

const INTEROP_HANDLER: &str = r#"
function handle(payload)
  local msg = queue.message()
  logger:info("Received", {
    n = payload.n, word = payload.word,
    tenant = msg:header("tenant"), count = msg:header("count"), ratio = msg:header("ratio"),
    flag = msg:header("flag"), correlation_id = msg:header("correlation_id"),
    priority = msg:header("priority"), id = msg:id(),
  })
  assert(queue.publish("app:out", { echo = payload.n }, {
    correlation_id = msg:header("correlation_id"), tenant = "acme", priority = 3,
  }))
end
"#;

/// Another AMQP 1.0 client's message reaches a Lua handler with its body and headers
/// as docs/drivers/amqp10.md maps them, and what the handler publishes reaches that
/// client with the same mapping.
fn a_proton_client_and_the_runtime_understand_each_other() {
    let url = shared_url();
    let id = unique();
    let (inbound, outbound) = (format!("interop-in-{id}"), format!("interop-out-{id}"));
    let yaml = format!(
        "namespace: app\nentries:\n{}  - name: in\n    kind: queue.queue\n    queue_name: {inbound}\n    max_priority: 9\n  - name: out\n    kind: queue.queue\n    queue_name: {outbound}\n    max_priority: 9\n  - name: w\n    kind: queue.consumer\n    queue: in\n    source: h.lua\n    method: handle\n",
        driver_yaml(&url)
    );
    let dir = app(&[("app.yaml", &yaml), ("h.lua", INTEROP_HANDLER)]);
    let (child, lines) = spawn_with_lines(&["run", "--log-format", "json", "app.yaml"], dir.path());
    let mut seen = wait_for_line(&lines, "runtime started");
    proton(PROTON_SEND, &[&url, &inbound]);
    seen.extend(wait_for_line(&lines, "Received"));
    let answer = proton(PROTON_RECEIVE, &[&url, &outbound]);
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", seen.join("\n"));
    let logs: Vec<serde_json::Value> = seen
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let got = &lua_logs(&logs, "Received")[0];
    assert_eq!(got["n"], 7);
    assert_eq!(got["word"], "hello");
    assert_eq!(got["tenant"], "acme");
    assert_eq!(got["count"], 3);
    assert_eq!(got["ratio"], 0.5);
    assert_eq!(got["flag"], true);
    assert_eq!(got["correlation_id"], "corr-1");
    assert_eq!(got["priority"], 7);
    assert_eq!(got["id"], "proton-1");

    let answer: serde_json::Value = serde_json::from_str(answer.trim()).expect("JSON");
    assert_eq!(answer["body"], r#"{"echo":7}"#, "{answer}");
    assert_eq!(answer["content_type"], "application/json");
    assert_eq!(answer["correlation_id"], "corr-1");
    assert_eq!(answer["priority"], 3);
    assert_eq!(answer["properties"]["tenant"], "acme");
}

/// What a Qpid Proton client can send that the runtime's own driver never does: bodies
/// that are not bytes, ids that are not strings, properties of every AMQP type,
/// a 100 KB property name, a priority of 255, a property the client library cannot
/// decode and a `delivery-count` of 1,000.
const PROTON_ODD: &str = r#"
import sys, uuid
from proton import Message, symbol, char, timestamp, ulong, decimal32, Array, Data, Described, UNDESCRIBED
from proton.utils import BlockingConnection
conn = BlockingConnection(sys.argv[1], allowed_mechs="PLAIN")
sender = conn.create_sender(sys.argv[2])
def send(mid, body, inferred=False, **kw):
    m = Message(id=mid, body=body, **kw)
    m.inferred = inferred
    sender.send(m)
json = dict(inferred=True, content_type="application/json")
send("top-list", [1, "two"])
send("sequence", [3, 4], inferred=True)
send("map", {"a": 1, "b": [True, None]})
send("symbol", symbol("sym"))
send(ulong(42), b'{"a": 2}', **json)
send(uuid.UUID("6bc313ed-9e39-41b4-ba7a-86a9a5d81021"), b'{"a": 3}', **json)
send(b"\x00bin", b'{"a": 4}', **json)
send("typed-properties", b'{"a": 5}', properties={
    "u": uuid.UUID("6bc313ed-9e39-41b4-ba7a-86a9a5d81021"), "sym": symbol("s"),
    "ch": char("x"), "ts": timestamp(1000), "big": ulong(2**64 - 1), "bin": b"\x00\x01",
    "none": None, "dec": decimal32(5)}, **json)
send("long-name", b'{"fail": true}', properties={"k" * 100000: "v"}, **json)
send("priority-255", b'{"fail": true}', priority=255, **json)
send("text", "just text")
send("json-text", '{"a": 10}')
send("list-property", b'{"a": 6}', properties={"l": [1, 2], "m": {"k": 1}}, **json)
deaths = Array(UNDESCRIBED, Data.MAP, {symbol("queue"): "q", symbol("count"): ulong(1)},
               {symbol("queue"): "r", symbol("count"): ulong(2)})
send("deaths", b'{"a": 8}', annotations={symbol("x-opt-deaths"): deaths}, **json)
send("described-property", b'{"a": 9}', properties={"d": Described(symbol("d"), 1)}, **json)
send("described-twice", Described(symbol("a"), Described(symbol("b"), 1)))
send("counted", b'{"a": 7}', delivery_count=1000, **json)
conn.close()
"#;

const ODD_HANDLERS: &str = r#"
function handle(payload)
  local msg = queue.message()
  local t = type(payload) == "table"
  logger:info("Handled", { id = msg:id(), kind = type(payload), text = (not t) and payload or nil,
    first = t and payload[1] or nil, second = t and payload[2] or nil, a = t and payload.a or nil,
    sym = msg:header("sym"), u = msg:header("u") })
  if t and payload.fail then return nil, "asked to fail" end
end
function dead(payload)
  local msg = queue.message()
  logger:warn("Dead letter", { id = msg:id(), dropped = msg:header("x_dropped_headers") })
end
"#;

/// Every odd message from another AMQP 1.0 client on Artemis reaches a handler, is
/// dead-lettered (at once when its `delivery-count`, here its publisher's, which
/// Artemis passes on, says it came back too often: docs/consumers.md), or, the
/// one the client library cannot decode (a body value described twice), is
/// rejected, which Artemis moves to its own `DLQ`: none is lost, none comes back in a
/// loop. Lists, maps and described values as application properties and an array of
/// maps as an annotation (RabbitMQ 4's `x-opt-deaths`) reach the handler, and so does
/// a string body with no content type (a JMS `TextMessage`): as its JSON object when
/// it is one, else as the text.
fn odd_messages_from_a_proton_client_are_handled_or_dead_lettered() {
    let url = shared_url();
    let queue = format!("odd-{}", unique());
    let yaml = format!(
        "namespace: app\nentries:\n{}  - name: in\n    kind: queue.queue\n    queue_name: {queue}\n    retry:\n      max_attempts: 2\n      backoff: {{ initial: 50ms, multiplier: 1, max: 50ms, jitter: false }}\n  - name: w\n    kind: queue.consumer\n    queue: in\n    source: h.lua\n    method: handle\n  - name: d\n    kind: queue.consumer\n    queue: in.dlq\n    source: h.lua\n    method: dead\n",
        driver_yaml(&url)
    );
    let dir = app(&[("app.yaml", &yaml), ("h.lua", ODD_HANDLERS)]);
    let (child, lines) = spawn_with_lines(&["run", "--log-format", "json", "app.yaml"], dir.path());
    let mut seen = wait_for_line(&lines, "runtime started");
    proton(PROTON_ODD, &[&url, &queue]);
    let parse = |seen: &[String]| -> Vec<serde_json::Value> {
        seen.iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let moved = |logs: &[serde_json::Value], id: &str| {
        logs.iter().any(|l| {
            l["fields"]["message"] == "handler failed for the last time; dead-lettered"
                && l["fields"]["id"] == id
        })
    };
    // The two that fail and the counted one are moved to the dead-letter queue.
    let handled = |logs: &[serde_json::Value], id: &str| {
        lua_logs(logs, "Handled").iter().any(|h| h["id"] == id)
    };
    let done = |logs: &[serde_json::Value]| {
        lua_logs(logs, "Dead letter").len() == 3
            && handled(logs, "text")
            && handled(logs, "json-text")
            && ["long-name", "priority-255", "counted"]
                .iter()
                .all(|id| moved(logs, id))
            && logs.iter().any(|l| {
                l["fields"]["message"] == "amqp10 receiver rejected a message it cannot decode"
            })
    };
    while !done(&parse(&seen)) {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("not all handled:\n{}", seen.join("\n")));
        seen.push(line);
    }
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    seen.extend(rest_of_lines(&lines));
    let logs = parse(&seen);
    let context = seen.join("\n");
    let handled = lua_logs(&logs, "Handled");
    let calls = |id: &str| -> Vec<serde_json::Value> {
        handled.iter().filter(|h| h["id"] == id).cloned().collect()
    };
    let once = |id: &str| {
        let got = calls(id);
        assert_eq!(got.len(), 1, "{id}: {context}");
        got[0].clone()
    };
    let list = once("top-list");
    assert_eq!(
        (&list["first"], &list["second"]),
        (&1.into(), &"two".into())
    );
    assert_eq!(once("sequence")["second"], 4);
    assert_eq!(once("map")["a"], 1);
    assert_eq!(once("symbol")["text"], "sym");
    assert_eq!(once("text")["text"], "just text");
    assert_eq!(once("json-text")["a"], 10);
    assert_eq!(once("list-property")["a"], 6);
    assert_eq!(once("deaths")["a"], 8);
    assert_eq!(once("described-property")["a"], 9);
    assert_eq!(once("42")["a"], 2);
    assert_eq!(once("6bc313ed-9e39-41b4-ba7a-86a9a5d81021")["a"], 3);
    assert_eq!(once("0062696e")["a"], 4);
    let typed = once("typed-properties");
    assert_eq!(typed["sym"], "s", "{typed}");
    assert_eq!(
        typed["u"], "6bc313ed-9e39-41b4-ba7a-86a9a5d81021",
        "{typed}"
    );
    for id in ["long-name", "priority-255"] {
        assert_eq!(calls(id).len(), 2, "{id}: {context}");
    }
    let dead = lua_logs(&logs, "Dead letter");
    let long = dead
        .iter()
        .find(|d| d["id"] == "long-name")
        .unwrap_or_else(|| panic!("{context}"));
    assert!(
        long["dropped"].as_str().is_some_and(|d| d.contains("kkkk")),
        "{long}"
    );
    for id in ["counted", "described-twice"] {
        assert!(calls(id).is_empty(), "{id} reached a handler: {context}");
    }
    let rejected = logs
        .iter()
        .filter(|l| l["fields"]["message"] == "amqp10 receiver rejected a message it cannot decode")
        .count();
    assert_eq!(rejected, 1, "rejected once, never redelivered: {context}");
}

/// The runtime's fault cases on a private Artemis.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    SigTerm,
    SigKill,
    BrokerDownAtStart,
}

/// A JMS client on Artemis's core protocol. `send QUEUE PROBE` sends two
/// `BytesMessage`s of 30,000 bytes as compressed large messages, one that compresses
/// well and one that does not (random bytes), then a `TextMessage` `{"n":2}`, all with
/// the property `probe`; `dlq PROBE` reads the two with that `probe` back from
/// Artemis's `DLQ` and prints their sizes.
const JMS_COMPRESSED: &str = r#"
import javax.jms.*;
import org.apache.activemq.artemis.jms.client.ActiveMQConnectionFactory;

public class Compressed {
    public static void main(String[] args) throws Exception {
        String url = args[0] + "?compressLargeMessage=true&minLargeMessageSize=10240";
        try (Connection c = new ActiveMQConnectionFactory(url).createConnection(args[1], args[2])) {
            Session s = c.createSession(false, Session.AUTO_ACKNOWLEDGE);
            if (args[3].equals("send")) {
                MessageProducer p = s.createProducer(s.createQueue(args[4]));
                byte[] pattern = new byte[30000];
                for (int i = 0; i < pattern.length; i++) pattern[i] = (byte) (i % 7);
                byte[] random = new byte[30000];
                new java.util.Random(7).nextBytes(random);
                for (byte[] bytes : new byte[][] {pattern, random}) {
                    BytesMessage big = s.createBytesMessage();
                    big.writeBytes(bytes);
                    big.setStringProperty("probe", args[5]);
                    p.send(big);
                }
                TextMessage small = s.createTextMessage("{\"n\":2}");
                small.setStringProperty("probe", args[5]);
                p.send(small);
            } else {
                c.start();
                MessageConsumer dlq = s.createConsumer(s.createQueue("DLQ"), "probe = '" + args[4] + "'");
                for (int i = 0; i < 2; i++) {
                    Message kept = dlq.receive(60000);
                    System.out.println(kept instanceof BytesMessage bytes ? "kept " + bytes.getBodyLength() : "not kept: " + kept);
                }
            }
        }
    }
}
"#;

/// Compressed large messages from a JMS client on the core protocol, which Artemis
/// hands AMQP 1.0 consumers as many bytes as their compressed form has (the first 73
/// of 30,000; 30,016 for 30,000 random ones), are rejected with why, and Artemis
/// keeps them whole in its `DLQ`; the next message is handled. Before, the handler
/// read those bytes as if they were the message.
fn messages_artemis_mangled_are_rejected_and_kept_whole() {
    let url = shared_url();
    let queue = format!("mangled-{}", unique());
    let probe = unique();
    let yaml = format!(
        "namespace: app\nentries:\n{}  - name: in\n    kind: queue.queue\n    queue_name: {queue}\n  - name: w\n    kind: queue.consumer\n    queue: in\n    source: h.lua\n    method: handle\n",
        driver_yaml(&url)
    );
    let handler = "function handle(p)\n  logger:info(\"Handled\", { kind = type(p), n = type(p) == \"table\" and p.n or #p })\n  return true\nend\n";
    let dir = app(&[("app.yaml", &yaml), ("h.lua", handler)]);
    let (child, lines) = spawn_with_lines(&["run", "--log-format", "json", "app.yaml"], dir.path());
    let mut seen = wait_for_line(&lines, "runtime started");
    let run = |args: &[&str]| {
        queue_fixtures::artemis::run_jms_client("Compressed", JMS_COMPRESSED, args)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    run(&["send", &queue, &probe]);
    let rejected = |logs: &[serde_json::Value]| {
        logs.iter()
            .filter(|l| {
                l["fields"]["message"] == "amqp10 receiver rejected a message it cannot decode"
                    && l["fields"]["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("bytes for the 30000 of a compressed"))
            })
            .count()
    };
    let parse = |seen: &[String]| -> Vec<serde_json::Value> {
        seen.iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let done =
        |logs: &[serde_json::Value]| rejected(logs) == 2 && !lua_logs(logs, "Handled").is_empty();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&parse(&seen)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("not rejected and handled:\n{}", seen.join("\n")));
        seen.push(line);
    }
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    seen.extend(rest_of_lines(&lines));
    assert_eq!(
        rejected(&parse(&seen)),
        2,
        "each rejected once:\n{}",
        seen.join("\n")
    );
    let context = seen.join("\n");
    assert!(
        context.contains("Artemis delivered 73 bytes for the 30000"),
        "{context}"
    );
    let handled = lua_logs(&parse(&seen), "Handled");
    assert_eq!(handled.len(), 1, "only the whole one: {handled:?}");
    assert_eq!(handled[0]["n"], 2, "{handled:?}");
    assert_eq!(run(&["dlq", &probe]).trim(), "kept 30000\nkept 30000");
}

const FAULT_HANDLER: &str = r#"
function handle(payload)
  assert(queue.publish("app:done", { n = payload.n }))
end
"#;

async fn counts(driver: &Amqp10Driver, queue: &QueueId) -> (u64, u64) {
    let info = driver.info(queue).await.expect("info from Artemis");
    let total = info.message_count().expect("Artemis counts its queues");
    (total, info.ready.unwrap_or(0))
}

async fn runtime_fault(fault: Fault) {
    let offset = ArtemisNode::free_offset();
    let url = format!("amqp://guest:guest@127.0.0.1:{}", 5672 + offset);
    let yaml = format!(
        "namespace: app\nentries:\n{}  - name: load\n    kind: queue.queue\n  - name: done\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: load\n    source: h.lua\n    method: handle\n    concurrency: 8\n    prefetch: 50\n",
        driver_yaml(&url)
    );
    let app_dir = app(&[("app.yaml", &yaml), ("h.lua", FAULT_HANDLER)]);
    let dir = app_dir.path();
    let label = format!("{fault:?} (amqp10 x Artemis)");
    let mut runtime = None;
    if fault == Fault::BrokerDownAtStart {
        let first = Runtime::start(dir, "run-1.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !first.log().contains("broker unreachable; waiting for it") {
            assert!(
                Instant::now() < deadline,
                "{label}: the runtime did not wait"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        runtime = Some(first);
    }
    let node = tokio::task::block_in_place(|| ArtemisNode::start_with_offset(offset))
        .expect("a private Artemis");
    let driver = Arc::new(
        Amqp10Driver::connect(Amqp10Config::new(node.url(), Profile::Artemis))
            .await
            .expect("connect"),
    );
    let (load, done) = (
        QueueId::parse("app:load").unwrap(),
        QueueId::parse("app:done").unwrap(),
    );
    for id in [&load, &done] {
        driver
            .declare(&QueueSpec::new(id.clone()))
            .await
            .expect("declare");
    }
    let tally = Arc::new(Tally::new());
    for n in 0..LOAD {
        tally.publishing(n);
        driver.publish(&load, numbered(n)).await.expect("publish");
        tally.confirmed(n);
    }
    let mut runtime = runtime.unwrap_or_else(|| Runtime::start(dir, "run-1.log"));
    // Strike once a tenth is done.
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts(&driver, &done).await.0 < LOAD as u64 / 10 {
        assert!(
            Instant::now() < deadline,
            "{label}: the runtime does not work"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if matches!(fault, Fault::SigTerm | Fault::SigKill) {
        let name = if fault == Fault::SigTerm {
            "TERM"
        } else {
            "KILL"
        };
        blocking(|| runtime.stop(name));
        let left = counts(&driver, &load).await.0;
        assert!(left > 0, "{label}: the signal came after the load was done");
        runtime = Runtime::start(dir, "run-2.log");
    }
    // Done when the load queue is empty, nothing in flight: every message was handled.
    let deadline = Instant::now() + Duration::from_secs(300);
    while counts(&driver, &load).await.0 > 0 {
        assert!(
            Instant::now() < deadline,
            "{label}: the load was not finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    blocking(|| runtime.stop("TERM"));
    let mut sub = driver
        .consume(&done, ConsumeOptions { prefetch: 500 })
        .await
        .expect("consume done");
    // Drain until every confirmed number arrived; a quiet spell of 30 s ends the
    // drain and the count below names what is missing.
    while !tally.missing().is_empty() {
        match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
            Ok(Some(Ok(d))) => {
                tally.consumed(number_of(&d));
                d.ack().await.expect("ack");
            }
            Ok(other) => panic!("{label}: the done subscription ended: {other:?}"),
            Err(_) => break,
        }
    }
    // A duplicate may come after the last missing number: drain up to a marker
    // published now, behind everything the (stopped) runtime published.
    const MARKER: i64 = -1;
    driver
        .publish(&done, numbered(MARKER))
        .await
        .expect("marker");
    loop {
        match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
            Ok(Some(Ok(d))) => {
                let n = number_of(&d);
                d.ack().await.expect("ack");
                if n == MARKER {
                    break;
                }
                tally.consumed(n);
            }
            other => {
                panic!("{label}: the marker behind the runtime's output never came: {other:?}")
            }
        }
    }
    let counts = tally.counts();
    println!("{label}: {counts}");
    assert_eq!(counts.lost, 0, "{label}: lost {:?}", tally.missing());
    if fault == Fault::SigTerm {
        assert_eq!(counts.duplicates, 0, "{label}: SIGTERM caused redeliveries");
    }
    let _ = sub.cancel().await;
    let _ = driver.close().await;
    tokio::task::block_in_place(move || drop(node));
}

async fn sigterm_under_load_then_restart_loses_nothing() {
    runtime_fault(Fault::SigTerm).await;
}

async fn sigkill_under_load_then_restart_loses_nothing() {
    runtime_fault(Fault::SigKill).await;
}

async fn broker_down_at_start_then_up_loses_nothing() {
    runtime_fault(Fault::BrokerDownAtStart).await;
}

queue_testkit::broker_tests! {
    prefix: "artemis::amqp10";
    unavailable: queue_fixtures::artemis::shared_unavailable();
    async: [
        sigterm_under_load_then_restart_loses_nothing,
        sigkill_under_load_then_restart_loses_nothing,
        broker_down_at_start_then_up_loses_nothing,
    ];
    sync: [
        a_proton_client_and_the_runtime_understand_each_other,
        odd_messages_from_a_proton_client_are_handled_or_dead_lettered,
        messages_artemis_mangled_are_rejected_and_kept_whole,
    ];
}
