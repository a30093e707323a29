//! The queue tools of the command line (docs/operations.md, "Queue and dead-letter
//! tools"): `queue peek`, `queue purge` and `dlq replay`. Each works through the
//! `Driver` trait alone, so every broker driver has them.
//!
//! They read a queue by consuming it: what they only look at (`peek`, what `replay`
//! skips) is released back to its queue when they finish. A queue is read once
//! through: a tool stops at the count the broker gave when it started (or, from a
//! driver that cannot count, after a quiet spell), so messages released back or
//! arriving meanwhile are not read twice.

use std::sync::Arc;
use std::time::Duration;

use queue_core::names;
use queue_core::{ConsumeOptions, Delivery, Driver, HeaderValue, Message, QueueId, Queues};
use queue_core::{Error, Result};

/// How long a queue must stay quiet before a tool reading a driver that cannot count
/// its messages takes it for read through.
const QUIET: Duration = Duration::from_secs(2);

/// The most deliveries a tool holds at once: what it looks at stays unsettled until
/// it finishes.
const MAX_HELD: u32 = 10_000;

/// One message as `peek` and `replay --dry-run` show it: a line of JSON.
pub fn show(message: &Message) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = message
        .headers
        .iter()
        .map(|(k, v)| {
            let v = match v {
                HeaderValue::String(s) => serde_json::json!(s),
                HeaderValue::Int(i) => serde_json::json!(i),
                HeaderValue::Float(f) => serde_json::json!(f),
                HeaderValue::Bool(b) => serde_json::json!(b),
            };
            (k.clone(), v)
        })
        .collect();
    let body = match message.decode() {
        Ok(value) => serde_json::to_value(&value).unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::json!(String::from_utf8_lossy(&message.body)),
    };
    let reason = message
        .headers
        .get(names::X_DEAD_LETTER_REASON)
        .and_then(|r| r.as_str())
        .map(str::to_string);
    serde_json::json!({
        "id": message.id,
        "headers": headers,
        "body": body,
        "dead_letter_reason": reason,
    })
}

/// Reads a queue once through (at most `limit`, and at most [`MAX_HELD`] at a time),
/// handing each delivery to `visit`, which settles it or keeps it; `visit` releases
/// what it kept at the end. Returns how many were read.
async fn read_through(
    driver: &Arc<dyn Driver>,
    queue: &QueueId,
    limit: Option<u64>,
    visit: &mut dyn AsyncVisit,
) -> Result<u64> {
    let waiting = driver.info(queue).await.ok().and_then(|i| i.ready);
    let to_read = match (waiting, limit) {
        (Some(w), Some(l)) => Some(w.min(l)),
        (w, l) => w.or(l),
    };
    if to_read == Some(0) {
        return Ok(0);
    }
    let prefetch = to_read.map_or(MAX_HELD, |n| n.clamp(1, u64::from(MAX_HELD)) as u32);
    let mut subscription = driver.consume(queue, ConsumeOptions { prefetch }).await?;
    let mut read = 0u64;
    let result = loop {
        if to_read.is_some_and(|n| read >= n) || read >= u64::from(MAX_HELD) {
            break Ok(());
        }
        // A driver that counts: the messages are there, wait for them (bounded all
        // the same). One that cannot: a quiet spell ends the read.
        let patience = if waiting.is_some() { QUIET * 15 } else { QUIET };
        let delivery = match tokio::time::timeout(patience, subscription.next()).await {
            Err(_) | Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(e),
            Ok(Some(Ok(d))) => d,
        };
        read += 1;
        if let Err(e) = visit.visit(delivery).await {
            break Err(e);
        }
    };
    visit.finish().await;
    let _ = subscription.cancel().await;
    result.map(|()| read)
}

/// What a tool does with each delivery it reads.
#[async_trait::async_trait(?Send)]
trait AsyncVisit {
    async fn visit(&mut self, delivery: Delivery) -> Result<()>;
    /// Releases what it kept.
    async fn finish(&mut self);
}

/// Deliveries a tool only looked at: released back to their queue at the end.
#[derive(Default)]
struct Held(Vec<Delivery>);

impl Held {
    async fn release_all(&mut self) {
        for delivery in self.0.drain(..) {
            if let Err(e) = delivery.release().await {
                tracing::warn!(error = %e, id = %delivery.message().id, "could not release a message; the broker gives it back when the connection closes");
            }
        }
    }
}

/// Shows up to `limit` messages of a queue without taking them: each is released
/// back to the queue once all were read.
pub async fn peek(driver: &Arc<dyn Driver>, queue: &QueueId, limit: u64) -> Result<Vec<Message>> {
    struct Peek {
        held: Held,
        seen: Vec<Message>,
    }
    #[async_trait::async_trait(?Send)]
    impl AsyncVisit for Peek {
        async fn visit(&mut self, delivery: Delivery) -> Result<()> {
            self.seen.push(delivery.message().clone());
            self.held.0.push(delivery);
            Ok(())
        }
        async fn finish(&mut self) {
            self.held.release_all().await;
        }
    }
    let mut peek = Peek {
        held: Held::default(),
        seen: Vec::new(),
    };
    read_through(driver, queue, Some(limit), &mut peek).await?;
    Ok(peek.seen)
}

/// Removes the messages a queue holds when it starts (acknowledges each); returns
/// how many.
pub async fn purge(driver: &Arc<dyn Driver>, queue: &QueueId) -> Result<u64> {
    struct Purge;
    #[async_trait::async_trait(?Send)]
    impl AsyncVisit for Purge {
        async fn visit(&mut self, delivery: Delivery) -> Result<()> {
            delivery.ack().await
        }
        async fn finish(&mut self) {}
    }
    let mut purged = 0;
    // A queue holding more than one read takes can be purged in several.
    loop {
        let read = read_through(driver, queue, None, &mut Purge).await?;
        purged += read;
        if read < u64::from(MAX_HELD) {
            return Ok(purged);
        }
    }
}

/// What `dlq replay` is to do.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Replay at most this many.
    pub limit: Option<u64>,
    /// Only dead letters whose reason contains this text.
    pub filter_reason: Option<String>,
    /// Show what would be replayed; move nothing.
    pub dry_run: bool,
}

/// What `dlq replay` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Moved back to their queue (published there, confirmed, then acknowledged here).
    pub replayed: u64,
    /// Left in the dead-letter queue: filtered out, past the limit, or shown by a dry run.
    pub skipped: u64,
    /// Left in the dead-letter queue because their `x_original_queue` is missing or
    /// not declared in this configuration.
    pub no_target: u64,
}

/// A dead letter as it goes back to its queue: `attempts` 1, the runtime's `x_*`
/// headers gone, its time to live restored.
pub fn revived(dead: &Message) -> Message {
    let mut copy = dead.clone();
    let expiration = copy.headers.get(names::X_ORIGINAL_EXPIRATION).cloned();
    let runtime_headers: Vec<String> = copy
        .headers
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| k.starts_with("x_"))
        .collect();
    for key in runtime_headers {
        copy.headers.remove(&key);
    }
    copy.headers.remove(names::DELAY);
    copy.headers.insert(names::ATTEMPTS, 1i64);
    if let Some(ttl) = expiration {
        copy.headers.insert(names::EXPIRATION, ttl);
    }
    copy
}

/// Moves dead letters back to their `x_original_queue`, each confirmed there before it
/// is acknowledged here: a crash in the middle duplicates at worst, never loses.
/// `show` gets each one a dry run would replay.
pub async fn replay(
    queues: &Queues,
    dead_letters: &QueueId,
    options: &ReplayOptions,
    show: &mut dyn FnMut(&Message),
) -> Result<ReplayReport> {
    let driver = Arc::clone(
        &queues
            .get(dead_letters)
            .ok_or_else(|| Error::not_found(format!("queue {dead_letters} is not declared")))?
            .driver,
    );
    struct Replay<'a> {
        queues: &'a Queues,
        options: &'a ReplayOptions,
        show: &'a mut dyn FnMut(&Message),
        held: Held,
        report: ReplayReport,
    }
    #[async_trait::async_trait(?Send)]
    impl AsyncVisit for Replay<'_> {
        async fn visit(&mut self, delivery: Delivery) -> Result<()> {
            let message = delivery.message();
            let reason = message
                .headers
                .get(names::X_DEAD_LETTER_REASON)
                .and_then(|r| r.as_str())
                .unwrap_or("");
            let wanted = self
                .options
                .filter_reason
                .as_deref()
                .is_none_or(|text| reason.contains(text))
                && self
                    .options
                    .limit
                    .is_none_or(|limit| self.report.replayed < limit);
            let target = message
                .headers
                .get(names::X_ORIGINAL_QUEUE)
                .and_then(|q| q.as_str())
                .and_then(|q| QueueId::parse(q).ok())
                .and_then(|q| self.queues.get(&q).map(|registered| (q, registered)));
            match (wanted, target) {
                (false, _) => self.report.skipped += 1,
                (true, None) => self.report.no_target += 1,
                (true, Some(_)) if self.options.dry_run => {
                    (self.show)(message);
                    self.report.skipped += 1;
                }
                (true, Some((target, registered))) => {
                    registered.driver.publish(&target, revived(message)).await?;
                    delivery.ack().await?;
                    self.report.replayed += 1;
                    return Ok(());
                }
            }
            self.held.0.push(delivery);
            Ok(())
        }
        async fn finish(&mut self) {
            self.held.release_all().await;
        }
    }
    let mut replay = Replay {
        queues,
        options,
        show,
        held: Held::default(),
        report: ReplayReport::default(),
    };
    read_through(&driver, dead_letters, None, &mut replay).await?;
    Ok(replay.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revived_dead_letter_starts_over_without_the_runtimes_headers() {
        let mut dead = queue_core::Message::from_bytes(
            b"{}".to_vec(),
            queue_core::Headers::new(),
            "application/json",
        );
        for (k, v) in [
            (names::X_ORIGINAL_QUEUE, HeaderValue::from("app:jobs")),
            (names::X_DEAD_LETTER_REASON, HeaderValue::from("boom")),
            (names::X_ORIGINAL_ATTEMPTS, HeaderValue::Int(3)),
            (names::X_ORIGINAL_EXPIRATION, HeaderValue::Int(60_000)),
            (names::ATTEMPTS, HeaderValue::Int(2)),
            ("correlation_id", HeaderValue::from("c-1")),
        ] {
            dead.headers.insert(k, v);
        }
        let copy = revived(&dead);
        assert_eq!(copy.id, dead.id);
        assert_eq!(copy.body, dead.body);
        assert!(copy.headers.iter().all(|(k, _)| !k.starts_with("x_")));
        assert_eq!(
            copy.headers.get(names::ATTEMPTS),
            Some(&HeaderValue::Int(1))
        );
        assert_eq!(
            copy.headers.get(names::EXPIRATION),
            Some(&HeaderValue::Int(60_000))
        );
        assert_eq!(
            copy.headers.get("correlation_id"),
            Some(&HeaderValue::from("c-1"))
        );
    }
}
