//! Metrics (Prometheus text on `/metrics`) and `/health`, and the driver layer that
//! counts publishes without any driver knowing about metrics.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use queue_core::{
    Capabilities, ConsumeOptions, Driver, Message, QueueId, QueueInfo, QueueSpec, Result,
    Subscription,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    /// Handler run time in seconds, by queue.
    pub const HANDLER_SECONDS: &str = "queue_handler_duration_seconds";
    /// Deliveries being handled or waiting for a retry, all queues.
    pub const IN_FLIGHT: &str = "queue_in_flight";
    /// Lua states the runtime runs handlers on.
    pub const LUA_STATES: &str = "queue_lua_states";
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

/// Serves `/metrics` and `/health` on an address until the task is dropped.
pub async fn serve(
    addr: std::net::SocketAddr,
    handle: PrometheusHandle,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /health");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
                let Ok(Ok(n)) = read else { return };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, content_type, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
                    "/health" => (
                        "200 OK",
                        "application/json",
                        "{\"status\":\"ok\"}\n".to_string(),
                    ),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    }))
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
}

impl ConsumerMeters {
    /// The instruments of `queue`.
    pub fn of(queue: &QueueId) -> ConsumerMeters {
        let label = queue.to_string();
        ConsumerMeters {
            delivered: metrics::counter!(names::DELIVERED, "queue" => label.clone()),
            acked: metrics::counter!(names::ACKED, "queue" => label.clone()),
            handler_seconds: metrics::histogram!(names::HANDLER_SECONDS, "queue" => label),
        }
    }
}

/// A driver layer that counts confirmed and failed publishes per queue.
pub struct Metered {
    inner: Arc<dyn Driver>,
}

impl Metered {
    /// Wraps a driver.
    pub fn layer(inner: Arc<dyn Driver>) -> Arc<dyn Driver> {
        Arc::new(Metered { inner })
    }
}

fn count_publish(queue: &QueueId, n: u64, result: &Result<()>) {
    let name = if result.is_ok() {
        names::PUBLISHED
    } else {
        names::PUBLISH_FAILED
    };
    metrics::counter!(name, "queue" => queue.to_string()).increment(n);
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
        self.inner.declare(spec).await
    }
    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        let result = self.inner.publish(queue, message).await;
        count_publish(queue, 1, &result);
        result
    }
    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let n = messages.len() as u64;
        let result = self.inner.publish_batch(queue, messages).await;
        count_publish(queue, n, &result);
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
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
