//! Metrics (Prometheus text on `/metrics`) and `/health`, and the driver layer that
//! counts publishes without any driver knowing about metrics.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use queue_core::retry::Disposition;
use queue_core::{
    Capabilities, ConsumeOptions, Driver, Message, QueueId, QueueInfo, QueueSpec, Result,
    Subscription,
};
use tokio::net::TcpListener;

/// Metric names, all prefixed `queue_`.
pub mod names {
    /// Confirmed publishes (applications', retry copies and dead letters), by queue.
    pub const PUBLISHED: &str = "queue_published_total";
    /// Publishes that failed, by queue.
    pub const PUBLISH_FAILED: &str = "queue_publish_failed_total";
    /// Deliveries handed to handlers, by queue.
    pub const DELIVERED: &str = "queue_delivered_total";
    /// Deliveries acknowledged, by queue.
    pub const ACKED: &str = "queue_acked_total";
    /// Handler failures (nack), by queue.
    pub const NACKED: &str = "queue_nacked_total";
    /// Failures republished for another attempt, by queue.
    pub const RETRIED: &str = "queue_retried_total";
    /// Messages moved to a dead-letter queue, by source queue.
    pub const DEAD_LETTERED: &str = "queue_dead_lettered_total";
    /// Exhausted messages dropped because the queue has `dead_letter: false`.
    pub const DROPPED: &str = "queue_dropped_total";
    /// Messages kept past their last attempt (dead letters, and anything in a
    /// dead-letter queue without one of its own): queued in their queue again, after
    /// the longest backoff (a dead letter is never dropped).
    pub const DEAD_LETTERS_KEPT: &str = "queue_dead_letters_kept_total";
    /// Failed deliveries that could not be republished and went back to their queue
    /// after a wait, by queue.
    pub const RETURNED: &str = "queue_returned_total";
    /// Handler run time in seconds, by queue.
    pub const HANDLER_SECONDS: &str = "queue_handler_duration_seconds";
    /// Deliveries being handled or waiting for a retry, all queues.
    pub const IN_FLIGHT: &str = "queue_in_flight";
    /// Lua states the runtime runs handlers on.
    pub const LUA_STATES: &str = "queue_lua_states";
    /// Instances of a `process.lua` entry still running, by process.
    pub const PROCESSES_RUNNING: &str = "queue_processes_running";
    /// Instances of a `process.lua` entry that failed, by process.
    pub const PROCESS_FAILURES: &str = "queue_process_failures_total";
}

/// Installs the process-wide recorder (once) and returns the handle that renders it.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0])
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// Folds recorded histogram samples into their buckets every few seconds. Without it
/// (and without a scrape) the recorder keeps every raw sample: memory grows with every
/// handled message.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Most connections the metrics server holds at once, so a flood cannot take the
/// process's file descriptors. Past it, a new connection takes the place of the one
/// that has waited longest without sending a request ([`Waiting`]).
const MAX_CONNECTIONS: usize = 64;

/// How long a new connection waits for the place of an evicted one.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// The open connections, oldest first. A probe sends its request as soon as it
/// connects and reads the answer at once; what waits is idle or slow (a flood).
/// Closing the oldest of these for a new connection keeps `/health` answering while a
/// flood holds every slot, where closing the new one would fail the probe, and a
/// liveness probe that fails has the orchestrator restart a healthy process.
#[derive(Default)]
struct Waiting {
    connections: std::sync::Mutex<std::collections::VecDeque<Accepted>>,
}

/// One accepted connection: whether its request has arrived, and how to close it.
struct Accepted {
    /// When it was accepted.
    accepted: std::time::Instant,
    /// When its request arrived, once it has.
    requested: Arc<std::sync::OnceLock<std::time::Instant>>,
    task: tokio::task::AbortHandle,
}

impl Waiting {
    fn add(&self, accepted: Accepted) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|c| !c.task.is_finished());
        connections.push_back(accepted);
    }

    /// Closes, of the connections held, the first there is of: the oldest that has
    /// sent no request for [`REQUEST_GRACE`]; the one whose request came first, over
    /// [`ANSWER_GRACE`] ago; the oldest of those just accepted; the one whose request
    /// came first. False if there is none. The answer is ready at once and a client
    /// that reads it is done in milliseconds, so the one asked longest ago is a client
    /// that does not read (a `/metrics` page larger than the socket buffers). Only
    /// those asked 2 s ago or more could go, and clients that asked and never read,
    /// opened 32 a second, kept every slot and the liveness probe out. A probe, just
    /// accepted with its request on its way or just asked and reading its answer,
    /// goes last: taken first, a probe amid clients that asked and never read, or
    /// amid connections that send nothing, was reset now and then (reviews).
    fn evict_oldest(&self) -> bool {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|c| !c.task.is_finished());
        let now = std::time::Instant::now();
        let silent_for = |grace: Duration| {
            connections.iter().position(|c| {
                c.requested.get().is_none() && now.duration_since(c.accepted) >= grace
            })
        };
        let asked_first = |grace: Duration| {
            (0..connections.len())
                .filter_map(|i| connections[i].requested.get().map(|at| (i, *at)))
                .filter(|(_, at)| now.duration_since(*at) >= grace)
                .min_by_key(|(_, at)| *at)
                .map(|(i, _)| i)
        };
        let chosen = silent_for(REQUEST_GRACE)
            .or_else(|| asked_first(ANSWER_GRACE))
            .or_else(|| silent_for(Duration::ZERO))
            .or_else(|| asked_first(Duration::ZERO));
        match chosen {
            Some(oldest) => {
                if let Some(evicted) = connections.remove(oldest) {
                    evicted.task.abort();
                }
                true
            }
            None => false,
        }
    }
}

/// How long a client may take to send its request head.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection that has sent no request yet is taken for one whose request
/// is on its way, and evicted only after those that asked and did not read.
const REQUEST_GRACE: Duration = Duration::from_secs(1);

/// How long a connection that has asked is taken for one reading its answer, and
/// evicted only when no other can be.
const ANSWER_GRACE: Duration = Duration::from_millis(100);

/// The send buffer of each connection (the kernel doubles it for its bookkeeping).
/// Left to itself the kernel grows a connection's buffer to hold a whole `/metrics`
/// page for a client that does not read; capped, the page waits in the server, where
/// the connection keeps its slot and is evicted as a slow reader.
const SEND_BUFFER_BYTES: usize = 64 * 1024;

/// The longest pause between two looks of a connection whose answer is written at
/// whether the client has it; the first looks come sooner ([`delivered`]).
const DRAIN_LOOK_EVERY: Duration = Duration::from_millis(10);

/// Serves `GET /metrics`, `GET /health` and `GET /ready` on an address until the task
/// is dropped,
/// with hyper: whole requests however they are split into packets, query strings
/// ignored, 405 for other methods, at most `MAX_CONNECTIONS` at once (a new one in
/// place of the oldest that sent no request), and a pause (not a spin) when accepting
/// fails, as it does when file descriptors run out.
pub async fn serve(
    addr: std::net::SocketAddr,
    handle: PrometheusHandle,
    readiness: crate::health::Readiness,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = listen(addr)?;
    tracing::info!(%addr, "serving /metrics, /health and /ready");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let waiting = Waiting::default();
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics server cannot accept a connection; pausing");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            let slot = match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) if waiting.evict_oldest() => {
                    // The evicted connection's task gives its slot back once aborted.
                    let freed =
                        tokio::time::timeout(EVICTION_WAIT, Arc::clone(&slots).acquire_owned());
                    match freed.await {
                        Ok(Ok(slot)) => slot,
                        _ => continue,
                    }
                }
                // Every connection is being served: closed at once.
                Err(_) => continue,
            };
            let (handle, readiness) = (handle.clone(), readiness.clone());
            let requested = Arc::new(std::sync::OnceLock::new());
            let seen = Arc::clone(&requested);
            // Until the client has its whole answer, closing the connection (a timeout,
            // an eviction, an error) resets it: the kernel then drops what it held,
            // where a plain close kept it for a client that may never read.
            let _ = stream.set_zero_linger();
            let task = tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    seen.get_or_init(std::time::Instant::now);
                    let response = respond(&request, &handle, &readiness);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let answered = async {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
                        .keep_alive(false)
                        // A client may close its side once its request is sent.
                        .half_close(true)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .without_shutdown();
                    let Ok(parts) = connection.await else { return };
                    let mut stream = parts.io.into_inner();
                    if tokio::io::AsyncWriteExt::shutdown(&mut stream)
                        .await
                        .is_ok()
                    {
                        delivered(&stream).await;
                        close_gracefully(stream);
                    }
                };
                // A client that stalls after its head, or does not read its answer, is
                // cut off too.
                let _ = tokio::time::timeout(REQUEST_HEAD_TIMEOUT * 2, answered).await;
                drop(slot);
            });
            waiting.add(Accepted {
                accepted: std::time::Instant::now(),
                requested,
                task: task.abort_handle(),
            });
        }
    }))
}

/// The listening socket, with every connection's send buffer capped
/// ([`SEND_BUFFER_BYTES`]: an accepted socket takes its listener's).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_send_buffer_size(SEND_BUFFER_BYTES as u32)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Returns once the client has acknowledged everything written to `stream`, the end
/// of the answer included (until then the kernel holds it, and the connection its
/// slot), or once the client reset the connection: then it never will. The kernel
/// gives no signal for it, so it is looked at; the caller's time limit bounds the
/// wait.
///
/// A client on the same host has it within microseconds: the first look comes after
/// the other tasks have had a turn, the next ones 1, 2, 4 ms later, then every
/// [`DRAIN_LOOK_EVERY`]. Looking every 10 ms from the start held each answered
/// connection's slot for 10 ms, so a flood of ordinary quick requests (6,400 a
/// second) filled the slots, and the probes among them were reset (review: 9–27%).
async fn delivered(stream: &tokio::net::TcpStream) {
    let mut pause = Duration::ZERO;
    while unacknowledged_bytes(stream) > 0 {
        if !matches!(stream.take_error(), Ok(None)) {
            return;
        }
        if pause.is_zero() {
            tokio::task::yield_now().await;
            pause = Duration::from_millis(1);
        } else {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(DRAIN_LOOK_EVERY);
        }
    }
}

/// What the kernel holds of `stream`'s writes, sent or not, until the peer
/// acknowledges it (`SIOCOUTQ`, the end of the stream counting one); 0 where that
/// cannot be read.
#[cfg(target_os = "linux")]
fn unacknowledged_bytes(stream: &tokio::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut held: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a socket) writes one int through the pointer,
    // which points at `held`; the descriptor is open while `stream` lives.
    let read = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut held) };
    if read == 0 { held } else { 0 }
}

#[cfg(not(target_os = "linux"))]
fn unacknowledged_bytes(_stream: &tokio::net::TcpStream) -> i32 {
    0
}

/// Closes a connection whose answer the client has, as TCP closes (not the reset a
/// connection closed before that gets).
fn close_gracefully(stream: tokio::net::TcpStream) {
    // SO_LINGER off: tokio deprecates setting it because a positive time blocks the
    // thread that closes the socket; turning it off blocks nothing.
    #[allow(deprecated)]
    let _ = stream.set_linger(None);
    drop(stream);
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn respond(
    request: &hyper::Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    readiness: &crate::health::Readiness,
) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode, header};
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = hyper::Response::new(Body::from(body));
        *response.status_mut() = status;
        if let Ok(value) = header::HeaderValue::from_str(content_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".to_string(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
        "/health" => reply(
            StatusCode::OK,
            "application/json",
            "{\"status\":\"ok\"}\n".to_string(),
        ),
        "/ready" => {
            let (ready, body) = readiness.report();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", format!("{body}\n"))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    }
}

/// The `queue` label of `queue`'s series. Queue ids may hold `\\` and `"`, which the
/// Prometheus exporter takes for the start of an escape already written: `app:a"b`
/// and `app:a\\"b` both came out as `a\\"b` on the page. Escaped here, every id
/// reads back from the page as it is (docs/operations.md, "Metrics"); a recorder of
/// an embedder's own sees the escaped form.
fn queue_label(queue: &QueueId) -> String {
    escaped_label(queue.as_str())
}

/// `id` as a label value the exporter reads back as it is (see [`queue_label`]).
fn escaped_label(id: &str) -> String {
    if !id.contains(['\\', '"']) {
        return id.to_string();
    }
    let mut label = String::with_capacity(id.len() + 4);
    for c in id.chars() {
        if matches!(c, '\\' | '"') {
            label.push('\\');
        }
        label.push(c);
    }
    label
}

/// The instruments a consumer updates for every delivery, resolved once when it
/// attaches: looking a labelled metric up by name costs a hash and allocations per
/// message. Create them after [`install`], or they stay no-ops.
#[derive(Clone)]
pub struct ConsumerMeters {
    /// [`names::DELIVERED`] for the consumer's queue.
    pub delivered: metrics::Counter,
    /// [`names::ACKED`] for the consumer's queue.
    pub acked: metrics::Counter,
    /// [`names::HANDLER_SECONDS`] for the consumer's queue.
    pub handler_seconds: metrics::Histogram,
    /// [`names::NACKED`] for the consumer's queue.
    pub nacked: metrics::Counter,
    /// What became of failures: [`names::RETRIED`], [`names::DEAD_LETTERED`],
    /// [`names::DEAD_LETTERS_KEPT`], [`names::DROPPED`], [`names::RETURNED`].
    dispositions: [metrics::Counter; 5],
}

impl ConsumerMeters {
    /// The instruments of `queue`.
    pub fn of(queue: &QueueId) -> ConsumerMeters {
        let label = queue_label(queue);
        let counter = |name: &'static str| metrics::counter!(name, "queue" => label.clone());
        ConsumerMeters {
            delivered: counter(names::DELIVERED),
            acked: counter(names::ACKED),
            handler_seconds: metrics::histogram!(names::HANDLER_SECONDS, "queue" => label.clone()),
            nacked: counter(names::NACKED),
            dispositions: [
                counter(names::RETRIED),
                counter(names::DEAD_LETTERED),
                counter(names::DEAD_LETTERS_KEPT),
                counter(names::DROPPED),
                counter(names::RETURNED),
            ],
        }
    }

    /// Counts what became of a failed delivery.
    pub fn count(&self, disposition: Disposition) {
        let index = match disposition {
            Disposition::Retried => 0,
            Disposition::DeadLettered => 1,
            Disposition::Kept => 2,
            Disposition::Dropped => 3,
            Disposition::Returned => 4,
        };
        self.dispositions[index].increment(1);
    }
}

/// The instruments of one `process.lua` entry, registered when it starts (its
/// failures show from 0).
#[derive(Clone)]
pub struct ProcessMeters {
    /// [`names::PROCESSES_RUNNING`] for the process.
    pub running: metrics::Gauge,
    /// [`names::PROCESS_FAILURES`] for the process.
    pub failures: metrics::Counter,
}

impl ProcessMeters {
    /// The instruments of the process entry `id`.
    pub fn new(id: &str) -> ProcessMeters {
        let label = escaped_label(id);
        ProcessMeters {
            running: metrics::gauge!(names::PROCESSES_RUNNING, "process" => label.clone()),
            failures: metrics::counter!(names::PROCESS_FAILURES, "process" => label),
        }
    }
}

/// A driver layer that counts confirmed and failed publishes per queue.
///
/// A queue's counters are registered with the recorder when it is declared: install
/// the recorder ([`install`]) before declaring queues, as the runtime does.
pub struct Metered {
    inner: Arc<dyn Driver>,
    /// The counters of each queue declared through this layer: registering them on
    /// every publish cost each one its label's allocation and the recorder's lookup.
    counters: RwLock<HashMap<QueueId, PublishCounters>>,
}

/// The publish counters of one queue.
struct PublishCounters {
    published: metrics::Counter,
    failed: metrics::Counter,
}

impl PublishCounters {
    fn register(queue: &QueueId) -> Self {
        PublishCounters {
            published: metrics::counter!(names::PUBLISHED, "queue" => queue_label(queue)),
            failed: metrics::counter!(names::PUBLISH_FAILED, "queue" => queue_label(queue)),
        }
    }

    fn count(&self, n: u64, result: &Result<()>) {
        match result {
            Ok(()) => self.published.increment(n),
            Err(_) => self.failed.increment(n),
        }
    }
}

impl Metered {
    /// Wraps a driver.
    pub fn layer(inner: Arc<dyn Driver>) -> Arc<dyn Driver> {
        Arc::new(Metered {
            inner,
            counters: RwLock::default(),
        })
    }

    fn count_publish(&self, queue: &QueueId, n: u64, result: &Result<()>) {
        if let Some(counters) = self
            .counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
        {
            return counters.count(n, result);
        }
        // Not declared through this layer (the driver has most likely refused it).
        PublishCounters::register(queue).count(n, result);
    }
}

#[async_trait]
impl Driver for Metered {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        self.inner.declare(spec).await?;
        self.counters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(spec.id.clone())
            .or_insert_with(|| PublishCounters::register(&spec.id));
        Ok(())
    }
    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        let result = self.inner.publish(queue, message).await;
        self.count_publish(queue, 1, &result);
        result
    }
    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let n = messages.len() as u64;
        let result = self.inner.publish_batch(queue, messages).await;
        self.count_publish(queue, n, &result);
        result
    }
    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        self.inner.consume(queue, options).await
    }
    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        self.inner.info(queue).await
    }
    fn acked_total(&self, queue: &QueueId) -> Option<u64> {
        self.inner.acked_total(queue)
    }
    fn connection(&self) -> Option<queue_core::ConnectionReport> {
        self.inner.connection()
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes the kernel holds unsent or unacknowledged in the sockets whose local port
    /// is `port` (`/proc/net/tcp`'s `tx_queue`), closed ones included.
    #[cfg(target_os = "linux")]
    fn queued_on_port(port: u16) -> u64 {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields.get(1)?.rsplit(':').next()?;
                let queued = fields.get(4)?.split(':').next()?;
                (u16::from_str_radix(local_port, 16).ok()? == port)
                    .then(|| u64::from_str_radix(queued, 16).ok())?
            })
            .sum()
    }

    /// The exporter reads a `\\` or `\"` in a label value as already escaped, so that
    /// the queues `app:a"b` and `app:a\"b` were one series on the page, and `app:a\b`
    /// and `app:a\\b` another (review). Each queue is its own series, its id read back
    /// from the page as it is.
    #[test]
    fn queue_ids_with_backslashes_and_quotes_are_series_of_their_own() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let ids = [
            r#"app:a"b"#,
            r#"app:a\"b"#,
            r"app:a\b",
            r"app:a\\b",
            r"app:end\",
        ];
        metrics::with_local_recorder(&recorder, || {
            for (n, id) in ids.iter().enumerate() {
                let queue = QueueId::parse(id).unwrap();
                ConsumerMeters::of(&queue).acked.increment(n as u64 + 1);
                PublishCounters::register(&queue)
                    .published
                    .increment(n as u64 + 1);
            }
        });
        let page = handle.render();
        for name in [names::ACKED, names::PUBLISHED] {
            let mut series: Vec<(String, u64)> = page
                .lines()
                .filter_map(|line| line.strip_prefix(name)?.strip_prefix("{queue=\""))
                .map(|rest| {
                    let (value, count) = rest.rsplit_once("\"} ").unwrap();
                    (unescaped(value), count.parse().unwrap())
                })
                .collect();
            series.sort_by_key(|(_, count)| *count);
            let expected: Vec<(String, u64)> = ids
                .iter()
                .enumerate()
                .map(|(n, id)| (id.to_string(), n as u64 + 1))
                .collect();
            assert_eq!(series, expected, "{name} in\n{page}");
        }
    }

    /// A label value as Prometheus reads it (`\\`, `\"` and `\n` escaped).
    fn unescaped(value: &str) -> String {
        let mut out = String::new();
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => panic!("a dangling backslash in {value:?}"),
            }
        }
        out
    }

    /// A `/metrics` page of 2,000 series, about 200 KB, and its handle.
    fn a_large_page() -> PrometheusHandle {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for i in 0..2000 {
                metrics::counter!("queue_test_padding_total", "label" => format!("{i:0>80}"))
                    .increment(1);
            }
        });
        handle
    }

    /// A client that closes its side once its request is sent (`nc -N`, a script
    /// that sends and then reads) was cut off: hyper took the end of the request
    /// stream for an error, and the connection was reset with the page half sent
    /// (review). It gets the whole page.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_half_closes_gets_the_whole_page() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let handle = a_large_page();
        let page = handle.render().len();
        let port = queue_fixtures::free_port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let server = serve(addr, handle, crate::health::Readiness::default())
            .await
            .unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the answer within 10 s");
        read.expect("the whole answer, not a reset");
        assert!(
            answer.len() > page,
            "{} bytes of a {page}-byte page",
            answer.len()
        );
        server.abort();
    }

    /// A client that closed with its answer unread (a reset) will never acknowledge
    /// the rest: its connection gave its slot back only at the 10 s limit (review).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_connection_reset_by_its_client_is_not_waited_for() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(1).unwrap();
        let client = client.connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        // As much as the kernel takes; the client reads none of it.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            server.write_all(&vec![b'x'; 300_000]),
        )
        .await;
        client.set_zero_linger().unwrap();
        drop(client);
        tokio::time::timeout(Duration::from_secs(2), delivered(&server))
            .await
            .expect("delivered() ended once the client reset");
    }

    /// Clients that send `GET /metrics` and never read: hyper handed the whole page
    /// to the kernel and closed the socket, which freed the connection's slot while
    /// the kernel kept the page for the client (about 0.5 MB each for a 200 KB page):
    /// 300 such clients held 141 MiB of the machine's TCP memory, and a few thousand
    /// would have reached its limit, broker connections included (review). A
    /// connection now keeps its slot until the client has its answer, and one closed
    /// before that is reset, which frees what the kernel held.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_that_never_read_cannot_pin_the_kernels_memory() {
        use tokio::io::AsyncWriteExt;
        let (addr, server) = serving_a_large_page().await;
        let port = addr.port();
        let mut clients = Vec::new();
        for _ in 0..150 {
            let Ok(mut stream) = not_reading(addr).await else {
                continue;
            };
            if stream
                .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .is_ok()
            {
                clients.push(stream);
            }
        }
        // What the kernel holds for them, looked at for a while: at most a full set of
        // slots' worth, each a send buffer.
        let bound = (MAX_CONNECTIONS * 2 * SEND_BUFFER_BYTES) as u64;
        let mut most = 0;
        let watched = std::time::Instant::now();
        while watched.elapsed() < Duration::from_secs(3) {
            most = most.max(queued_on_port(port));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The fault landed: the clients got answers they did not read.
        assert!(
            most > 1 << 20,
            "{most} bytes queued: the clients were not answered"
        );
        assert!(
            most <= bound,
            "{most} bytes queued for {} clients, more than {bound}",
            clients.len()
        );
        server.abort();
    }

    /// A server on a free port whose `/metrics` page is larger than the socket buffers.
    #[cfg(target_os = "linux")]
    async fn serving_a_large_page() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let handle = a_large_page();
        let page = handle.render().len();
        assert!(page > 200_000, "{page} bytes");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], queue_fixtures::free_port()));
        let server = serve(addr, handle, crate::health::Readiness::default())
            .await
            .unwrap();
        (addr, server)
    }

    /// A connection to `addr` whose receive buffer is as small as the kernel allows:
    /// a client that (almost) never reads.
    #[cfg(target_os = "linux")]
    async fn not_reading(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(1)?;
        socket.connect(addr).await
    }

    /// Clients that each send a request and never read the answer, opened faster than
    /// any of them grows old: every slot is held by a connection answered moments ago.
    /// A liveness probe must still be answered. It was closed at once: only connections
    /// answered for 2 s could be evicted, and a flood of 32 such clients a second kept
    /// the probe out for as long as it lasted.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_is_answered_while_fresh_non_readers_hold_every_slot() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, server) = serving_a_large_page().await;
        let mut clients = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = not_reading(addr).await.unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            clients.push(stream);
        }
        // Each is being answered (its first byte came) before the probe: none is a
        // connection that sent nothing yet, which any rule would evict first.
        for client in &mut clients {
            let mut first = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut first))
                .await
                .expect("answered in time")
                .unwrap();
        }
        let probe = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), probe)
            .await
            .expect("the probe is answered in time");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        server.abort();
    }

    /// Ordinary quick requests from a few clients at once, each read to its end: none
    /// is reset. Every answered connection kept its slot for 10 ms, the first look at
    /// whether its client had the answer, so such a flood filled the slots and fresh
    /// connections, probes among them, were reset (review: 201 of 2,000 with 4
    /// clients).
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quick_requests_from_a_few_clients_at_once_are_all_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, server) = serving_a_large_page().await;
        let client = move || async move {
            let mut reset = 0;
            for _ in 0..250 {
                let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                    reset += 1;
                    continue;
                };
                let asked = stream
                    .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await;
                let mut answer = Vec::new();
                let read = stream.read_to_end(&mut answer).await;
                if asked.is_err() || read.is_err() || !answer.starts_with(b"HTTP/1.1 200") {
                    reset += 1;
                }
            }
            reset
        };
        // Light enough not to starve the other tests' servers on two cores.
        let clients: Vec<_> = (0..4).map(|_| tokio::spawn(client())).collect();
        let mut reset = 0;
        for c in clients {
            reset += c.await.unwrap();
        }
        assert_eq!(reset, 0, "{reset} of 1,000 requests were not answered");
        server.abort();
    }

    /// A connection of the server, for the eviction rule: one whose task never ends
    /// by itself, accepted `ago` before now, whose request arrived then (or has not).
    fn connection(requested: bool, ago: Duration) -> (Accepted, tokio::task::JoinHandle<()>) {
        let task = tokio::spawn(std::future::pending::<()>());
        let then = std::time::Instant::now() - ago;
        let at = std::sync::OnceLock::new();
        if requested {
            let _ = at.set(then);
        }
        let accepted = Accepted {
            accepted: then,
            requested: Arc::new(at),
            task: task.abort_handle(),
        };
        (accepted, task)
    }

    /// A probe goes last: just accepted, its request on its way, it went before the
    /// clients that asked and never read; just asked, reading its answer, it went
    /// before connections that send nothing, all accepted under a second ago: under
    /// either flood a probe was reset now and then (reviews).
    #[tokio::test]
    async fn a_probe_goes_after_clients_that_do_not_read_and_connections_that_say_nothing() {
        let waiting = Waiting::default();
        let (asked, asked_task) = connection(true, Duration::from_millis(500));
        let (probe, probe_task) = connection(false, Duration::ZERO);
        for accepted in [asked, probe] {
            waiting.add(accepted);
        }
        assert!(waiting.evict_oldest());
        let evicted = tokio::time::timeout(Duration::from_secs(5), asked_task).await;
        assert!(evicted.expect("the client that asked goes first").is_err());
        assert!(!probe_task.is_finished(), "the probe stays");
        assert!(waiting.evict_oldest(), "last, it goes too");
        assert!(probe_task.await.unwrap_err().is_cancelled());

        let (silent, silent_task) = connection(false, Duration::from_millis(10));
        let (probe, probe_task) = connection(true, Duration::ZERO);
        for accepted in [silent, probe] {
            waiting.add(accepted);
        }
        assert!(waiting.evict_oldest());
        let evicted = tokio::time::timeout(Duration::from_secs(5), silent_task).await;
        assert!(evicted.expect("the silent one goes first").is_err());
        assert!(!probe_task.is_finished(), "the probe stays");
    }

    /// Every slot held by clients that sent a request and never read the answer (a
    /// `/metrics` page larger than the socket buffers): the slots stayed held for the
    /// connection's whole 10 s, and a liveness probe was refused meanwhile. Those that
    /// sent nothing go first; then the one whose request came first, however recent.
    #[tokio::test]
    async fn eviction_takes_idle_connections_first_then_the_longest_answered() {
        let waiting = Waiting::default();
        let (fresh, fresh_task) = connection(true, Duration::ZERO);
        let (stalled, stalled_task) = connection(true, Duration::from_millis(500));
        let (idle, idle_task) = connection(false, REQUEST_GRACE);
        for accepted in [fresh, stalled, idle] {
            waiting.add(accepted);
        }
        assert!(waiting.evict_oldest());
        assert!(
            idle_task.await.unwrap_err().is_cancelled(),
            "the idle one goes first"
        );
        assert!(waiting.evict_oldest());
        assert!(stalled_task.await.unwrap_err().is_cancelled());
        assert!(!fresh_task.is_finished(), "the newest request goes last");
        assert!(waiting.evict_oldest());
        assert!(fresh_task.await.unwrap_err().is_cancelled());
        assert!(!waiting.evict_oldest(), "none is left");
    }
}
