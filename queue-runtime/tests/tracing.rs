//! Tracing across the queue (docs/operations.md, "Tracing"), through the real binary
//! and an OTLP/HTTP receiver in this test (a TCP listener decoding the protobuf
//! requests with opentelemetry-proto):
//!
//! - a process → queue A's handler → queue B's handler chain on the memory driver is
//!   one trace, each hop's span the child of the publish that sent it;
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` and `OTEL_SERVICE_NAME` are read; a retry keeps its
//!   original's context; a `traceparent` the application set is kept;
//! - without an endpoint no message gets a `traceparent`;
//! - a message pika published to RabbitMQ with a `traceparent` continues that trace
//!   (ignored, with the reason, when RabbitMQ or pika is not here; failed in CI).

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use support::*;

/// How long a run of the binary may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A span as the receiver got it, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    status_code: i32,
    attributes: BTreeMap<String, String>,
}

impl Received {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// An OTLP/HTTP receiver on a free loopback port: every POST to `/v1/traces` is
/// decoded and its spans sent to the channel; anything else fails the test by never
/// arriving (the paths are recorded too).
struct OtlpReceiver {
    port: u16,
    spans: mpsc::Receiver<Result<Vec<Received>, String>>,
}

impl OtlpReceiver {
    fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, spans) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || serve(stream, tx));
            }
        });
        OtlpReceiver { port, spans }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Spans received until `enough` holds on them (bounded: fails after 30 s).
    fn until(&self, what: &str, enough: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut all = Vec::new();
        while !enough(&all) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.spans.recv_timeout(left) {
                Ok(Ok(spans)) => all.extend(spans),
                Ok(Err(e)) => panic!("the receiver got a bad request: {e}"),
                Err(_) => panic!("timed out waiting for {what}; received:\n{all:#?}"),
            }
        }
        all
    }
}

/// Serves one connection's requests (keep-alive) until it closes.
fn serve(stream: TcpStream, tx: mpsc::Sender<Result<Vec<Received>, String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.unwrap_or(0)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("");
        let decoded = if !request_line.starts_with("POST ") || path != "/v1/traces" {
            Err(format!("unexpected request {request_line:?}"))
        } else if length.is_none() {
            Err("no content-length".to_string())
        } else {
            ExportTraceServiceRequest::decode(body.as_slice())
                .map(flatten)
                .map_err(|e| format!("not an ExportTraceServiceRequest: {e}"))
        };
        let _ = tx.send(decoded);
        let reply =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Received> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Received {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name.clone(),
                    kind: span.kind,
                    status_code: span.status.as_ref().map_or(0, |s| s.code),
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    spans
}

/// The binary with no `OTEL_*` variable of this process's environment, plus `env`.
fn runtime(args: &[&str], dir: &std::path::Path, env: &[(&str, &str)]) -> Command {
    let mut command = binary();
    command.args(args).current_dir(dir).stdin(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command
}

/// Runs the binary to its end (bounded), its pipes drained all along.
fn run_to_end(args: &[&str], dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let child = runtime(args, dir, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the runtime starts");
    let out = wait_with_timeout(child, RUN_LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    out
}

const CHAIN_YAML: &str = "namespace: app
entries:
  - name: a
    kind: queue.queue
  - name: b
    kind: queue.queue
  - name: on_a
    kind: queue.consumer
    queue: a
    source: h.lua
    method: on_a
  - name: on_b
    kind: queue.consumer
    queue: b
    source: h.lua
    method: on_b
  - name: start
    kind: process.lua
    source: h.lua
    method: start
";

const CHAIN_LUA: &str = r#"
function start()
  assert(queue.publish("app:a", { hop = 1 }))
end

function on_a(payload)
  local msg = queue.message()
  logger:info("Handled", { queue = "a", id = msg:id(), traceparent = msg:header("traceparent") })
  assert(queue.publish("app:b", { hop = 2 }))
end

function on_b(payload)
  local msg = queue.message()
  logger:info("Handled", { queue = "b", id = msg:id(), traceparent = msg:header("traceparent") })
end
"#;

/// The Lua `Handled` log line of queue `queue`.
fn handled(logs: &[serde_json::Value], queue: &str) -> serde_json::Value {
    lua_logs(logs, "Handled")
        .into_iter()
        .find(|h| h["queue"] == queue)
        .unwrap_or_else(|| panic!("no Handled line for queue {queue}: {logs:#?}"))
}

fn one<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    let found: Vec<&Received> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one span {name:?} in {spans:#?}");
    found[0]
}

fn chain_is_one_trace_with_a_span_per_hop() {
    let receiver = OtlpReceiver::start();
    let dir = app(&[("app.yaml", CHAIN_YAML), ("h.lua", CHAIN_LUA)]);
    let url = receiver.url();
    let out = run_to_end(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "--otlp-endpoint",
            &url,
            "app.yaml",
        ],
        dir.path(),
        &[],
    );
    let spans = receiver.until("the five spans of the chain", |s| s.len() >= 5);
    assert_eq!(spans.len(), 5, "{spans:#?}");

    let process = spans
        .iter()
        .find(|s| s.name.ends_with(" run"))
        .unwrap_or_else(|| panic!("no process span: {spans:#?}"));
    let publish_a = one(&spans, "app:a publish");
    let handle_a = one(&spans, "app:a process");
    let publish_b = one(&spans, "app:b publish");
    let handle_b = one(&spans, "app:b process");

    // One trace, each hop the child of the one before.
    let trace = &process.trace_id;
    assert_eq!(trace.len(), 32);
    assert!(spans.iter().all(|s| &s.trace_id == trace), "{spans:#?}");
    assert_eq!(process.parent, "", "the process starts the trace");
    assert_eq!(publish_a.parent, process.span_id);
    assert_eq!(handle_a.parent, publish_a.span_id);
    assert_eq!(publish_b.parent, handle_a.span_id);
    assert_eq!(handle_b.parent, publish_b.span_id);

    assert_eq!(process.kind, SpanKind::Internal as i32);
    assert_eq!(process.attr("queue.process.instance"), "1");
    for publish in [publish_a, publish_b] {
        assert_eq!(publish.kind, SpanKind::Producer as i32, "{publish:?}");
        assert_eq!(publish.attr("messaging.operation"), "publish");
        assert_eq!(publish.attr("messaging.system"), "memory");
    }

    // The handlers read the context they were delivered with.
    let logs = json_logs(&out.stderr);
    for (queue, publish, handle) in [("a", publish_a, handle_a), ("b", publish_b, handle_b)] {
        let line = handled(&logs, queue);
        assert_eq!(
            line["traceparent"],
            format!("00-{trace}-{}-01", publish.span_id),
            "{queue}: {line}"
        );
        assert_eq!(handle.kind, SpanKind::Consumer as i32);
        assert_eq!(handle.attr("messaging.system"), "memory");
        assert_eq!(
            handle.attr("messaging.destination.name"),
            format!("app:{queue}")
        );
        assert_eq!(handle.attr("messaging.operation"), "process");
        assert_eq!(
            handle.attr("messaging.message.id"),
            line["id"].as_str().unwrap()
        );
        assert_eq!(
            publish.attr("messaging.message.id"),
            line["id"].as_str().unwrap()
        );
        assert_eq!(handle.attr("messaging.queue.attempts"), "1");
        let keys: Vec<&str> = handle.attributes.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "messaging.destination.name",
                "messaging.message.id",
                "messaging.operation",
                "messaging.queue.attempts",
                "messaging.system"
            ],
            "no other attribute: {handle:?}"
        );
    }
    assert!(
        spans.iter().all(|s| s.service == "queue-runtime"),
        "the default service name: {spans:#?}"
    );
    // The log reads as without tracing: no span context on its lines.
    assert!(
        logs.iter()
            .all(|l| l.get("span").is_none() && l.get("spans").is_none()),
        "{}",
        text(&out.stderr)
    );
}

const RETRY_YAML: &str = "namespace: app
entries:
  - name: a
    kind: queue.queue
    retry:
      max_attempts: 3
      backoff: { initial: 10ms, multiplier: 1, max: 10ms, jitter: false }
  - name: on_a
    kind: queue.consumer
    queue: a
    source: h.lua
    method: on_a
  - name: start
    kind: process.lua
    source: h.lua
    method: start
";

/// A context the application sets itself.
const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_PARENT: &str = "00f067aa0ba902b7";

const RETRY_LUA: &str = r#"
function start()
  assert(queue.publish("app:a", { fail_once = true }))
  assert(queue.publish("app:a", { own = true },
    { traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" }))
end

function on_a(payload)
  local msg = queue.message()
  logger:info("Handled", { own = payload.own, attempts = msg:header("attempts"),
    traceparent = msg:header("traceparent") })
  if payload.fail_once and msg:header("attempts") == 1 then
    return nil, "first attempt fails"
  end
end
"#;

fn environment_endpoint_retries_and_an_applications_own_context() {
    let receiver = OtlpReceiver::start();
    let dir = app(&[("app.yaml", RETRY_YAML), ("h.lua", RETRY_LUA)]);
    let url = receiver.url();
    let out = run_to_end(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_SERVICE_NAME", "billing-worker"),
        ],
    );
    // The process, one publish span (the other message had its own context), the
    // failed attempt and the retry, and the other message's delivery.
    let spans = receiver.until("the spans of the run", |s| {
        s.iter().filter(|s| s.name == "app:a process").count() >= 3
            && s.iter().any(|s| s.name.ends_with(" run"))
    });
    assert!(
        spans.iter().all(|s| s.service == "billing-worker"),
        "{spans:#?}"
    );
    let publish = one(&spans, "app:a publish");
    let handles: Vec<&Received> = spans.iter().filter(|s| s.name == "app:a process").collect();
    assert_eq!(handles.len(), 3, "{spans:#?}");

    let own: Vec<&&Received> = handles.iter().filter(|s| s.trace_id == APP_TRACE).collect();
    assert_eq!(
        own.len(),
        1,
        "the application's context is kept: {spans:#?}"
    );
    assert_eq!(own[0].parent, APP_PARENT);

    // The retry copy keeps its original's context: both attempts are children of the
    // one publish, the first marked failed.
    let mut attempts: Vec<&&Received> = handles
        .iter()
        .filter(|s| s.trace_id == publish.trace_id)
        .collect();
    attempts.sort_by_key(|s| s.attr("messaging.queue.attempts").to_string());
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    assert!(
        attempts.iter().all(|s| s.parent == publish.span_id),
        "{spans:#?}"
    );
    assert_eq!(attempts[0].attr("messaging.queue.attempts"), "1");
    assert_eq!(attempts[1].attr("messaging.queue.attempts"), "2");
    const ERROR: i32 = 2;
    assert_eq!(attempts[0].status_code, ERROR, "{:?}", attempts[0]);
    assert_ne!(attempts[1].status_code, ERROR, "{:?}", attempts[1]);

    let logs = json_logs(&out.stderr);
    let lines = lua_logs(&logs, "Handled");
    let expected = format!("00-{}-{}-01", publish.trace_id, publish.span_id);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["traceparent"] == expected.as_str())
            .count(),
        2,
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["own"] == true
                && l["traceparent"] == format!("00-{APP_TRACE}-{APP_PARENT}-01"))
    );
}

fn without_an_endpoint_no_message_gets_a_traceparent() {
    let dir = app(&[("app.yaml", CHAIN_YAML), ("h.lua", CHAIN_LUA)]);
    let out = run_to_end(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir.path(),
        &[],
    );
    let logs = json_logs(&out.stderr);
    for queue in ["a", "b"] {
        let line = handled(&logs, queue);
        assert!(line["traceparent"].is_null(), "{queue}: {line}");
    }
    assert!(
        !text(&out.stderr).contains("exporting trace spans"),
        "{}",
        text(&out.stderr)
    );
}

/// Debian's python with `python3-pika` (`.ci/start-brokers` installs it).
const PYTHON: &str = "/usr/bin/python3";

fn pika_unavailable() -> Option<String> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import pika"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| format!("{PYTHON} cannot import pika (install Debian's python3-pika)"))
}

/// Publishes one JSON message with a `traceparent` header, with confirms.
const PIKA_PUBLISHER: &str = r#"
import sys, pika
conn = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
channel = conn.channel()
channel.confirm_delivery()
channel.basic_publish(
    exchange="", routing_key=sys.argv[1], body=b'{"from": "pika"}', mandatory=True,
    properties=pika.BasicProperties(content_type="application/json", message_id=sys.argv[3],
        headers={"traceparent": sys.argv[2]}))
conn.close()
"#;

const PIKA_LUA: &str = r#"
function handle(payload)
  local msg = queue.message()
  logger:info("Handled", { id = msg:id(), from = payload.from,
    traceparent = msg:header("traceparent") })
end
"#;

fn a_message_pika_published_with_a_traceparent_continues_its_trace() {
    let receiver = OtlpReceiver::start();
    let unique = queue_core::new_message_id().replace('-', "")[20..].to_string();
    let queue = format!("it-tracing-{unique}");
    let yaml = format!(
        "namespace: app\nentries:\n  - name: rabbit\n    kind: queue.driver.amqp\n    url: amqp://guest:guest@127.0.0.1:5672/%2f\n  - name: jobs\n    kind: queue.queue\n    queue_name: {queue}\n    durable: false\n    dead_letter: false\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n"
    );
    let dir = app(&[("app.yaml", &yaml), ("h.lua", PIKA_LUA)]);
    let url = receiver.url();
    let mut child = runtime(
        &[
            "run",
            "--log-format",
            "json",
            "--otlp-endpoint",
            &url,
            "app.yaml",
        ],
        dir.path(),
        &[],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the runtime starts");
    let stderr = child.stderr.take().expect("stderr");
    // Killed if an assertion below fails first.
    let child = Spawned::from(child);
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        // Read to the end, even once nobody listens: the runtime never blocks on it.
        let mut stderr = BufReader::new(stderr);
        let mut line = Vec::new();
        while stderr.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = tx.send(text(&line).trim_end().to_string());
            line.clear();
        }
    });
    let mut seen = wait_for_line(&lines, "runtime started");

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let traceparent = format!("00-{trace}-{parent}-01");
    let message_id = format!("pika-{unique}");
    let published = python(PIKA_PUBLISHER, &[&queue, &traceparent, &message_id]);
    assert!(
        published.status.success(),
        "pika: {}",
        text(&published.stderr)
    );

    seen.extend(wait_for_line(&lines, "Handled"));
    signal(&child, "TERM");
    let out = wait_with_timeout(child, RUN_LIMIT);
    assert!(out.status.success(), "{}", seen.join("\n"));
    seen.extend(rest_of_lines(&lines));

    let name = "app:jobs process".to_string();
    let spans = receiver.until("the handler's span", |s| s.iter().any(|s| s.name == name));
    let handle = one(&spans, &name);
    assert_eq!(handle.trace_id, trace, "{handle:?}");
    assert_eq!(handle.parent, parent, "{handle:?}");
    assert_eq!(handle.kind, SpanKind::Consumer as i32);
    assert_eq!(handle.attr("messaging.system"), "rabbitmq");
    assert_eq!(handle.attr("messaging.message.id"), message_id);

    let logs: Vec<serde_json::Value> = seen
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let line = lua_logs(&logs, "Handled")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no Handled line:\n{}", seen.join("\n")));
    assert_eq!(line["traceparent"], traceparent.as_str(), "{line}");
    assert_eq!(line["from"], "pika");
}

fn main() {
    let rabbitmq = queue_fixtures::rabbitmq::shared_unavailable().or_else(pika_unavailable);
    let sync = |f: fn()| move || async move { queue_testkit::tokio::task::block_in_place(f) };
    queue_testkit::run(vec![
        queue_testkit::broker_test(
            "chain_is_one_trace_with_a_span_per_hop",
            None,
            sync(chain_is_one_trace_with_a_span_per_hop),
        ),
        queue_testkit::broker_test(
            "environment_endpoint_retries_and_an_applications_own_context",
            None,
            sync(environment_endpoint_retries_and_an_applications_own_context),
        ),
        queue_testkit::broker_test(
            "without_an_endpoint_no_message_gets_a_traceparent",
            None,
            sync(without_an_endpoint_no_message_gets_a_traceparent),
        ),
        queue_testkit::broker_test(
            "a_message_pika_published_with_a_traceparent_continues_its_trace",
            rabbitmq,
            sync(a_message_pika_published_with_a_traceparent_continues_its_trace),
        ),
    ]);
}
