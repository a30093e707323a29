//! What happens to a message whose handler failed (SPEC §7): another attempt after a
//! backoff, or the dead-letter queue, decided by the `attempts` header. Built only from
//! publish and ack, so every driver gets retries and dead letters.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use queue_core::{Delivery, Driver, HeaderValue, QueueId, Result, names};

use crate::metrics::names as metric;
use crate::registry::RetryPolicy;

/// A queue as the consumer host sees it: where retries and dead letters go.
pub struct FailurePath {
    /// The queue.
    pub queue: QueueId,
    /// Its driver.
    pub driver: Arc<dyn Driver>,
    /// The retry policy.
    pub retry: RetryPolicy,
    /// The dead-letter queue and its driver, unless `dead_letter: false`.
    pub dead_letter: Option<(QueueId, Arc<dyn Driver>)>,
    /// Set when the runtime stops: a delivery held for its backoff goes back at once.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based): initial × multiplier^(attempt-1),
    /// capped at max, shortened by up to 20% when jitter is on.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = secs.min(self.max.as_secs_f64());
        let factor = if self.jitter {
            1.0 - 0.2 * fastrand::f64()
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

/// What became of a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Republished for another attempt, original acked.
    Retried,
    /// Moved to the dead-letter queue, original acked.
    DeadLettered,
    /// Exhausted with `dead_letter: false`: logged, counted, acked.
    Dropped,
    /// The original went back to its queue unchanged: the republish failed, or the
    /// runtime stopped while holding it for its backoff.
    Returned,
}

impl FailurePath {
    /// Handles a failure: republishes a copy with `attempts` + 1 and the backoff as
    /// `delay` (or holds the delivery for the backoff on drivers without delays), or
    /// dead-letters it past `max_attempts`; acks the original only once that publish is
    /// confirmed. If it cannot publish, the original is released, never lost.
    pub async fn fail(&self, delivery: &Delivery, reason: &str) -> Result<Disposition> {
        let label = self.queue.to_string();
        metrics::counter!(metric::NACKED, "queue" => label.clone()).increment(1);
        let attempts = delivery.message().headers.attempts();
        let mut copy = delivery.message().clone();
        copy.headers.remove(names::DELAY);
        let mut wait = Duration::ZERO;
        let (target, driver, disposition) = if attempts < self.retry.max_attempts {
            wait = self.retry.backoff(attempts);
            copy.headers
                .insert(names::ATTEMPTS, HeaderValue::Int(i64::from(attempts) + 1));
            if self.driver.capabilities().delay {
                copy.headers
                    .insert(names::DELAY, HeaderValue::Int(wait.as_millis() as i64));
            } else {
                // Held unacked meanwhile: a crash now means the broker redelivers it.
                // Stopping does not wait out the backoff: the delivery goes back, with
                // the same attempts, for whoever consumes next.
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => {
                        delivery.release().await?;
                        return Ok(Disposition::Returned);
                    }
                }
            }
            (&self.queue, &self.driver, Disposition::Retried)
        } else if let Some((dlq, driver)) = &self.dead_letter {
            copy.headers
                .insert(names::X_ORIGINAL_QUEUE, self.queue.to_string());
            copy.headers
                .insert(names::X_DEAD_LETTER_REASON, reason.to_string());
            copy.headers
                .insert(names::X_DEAD_LETTER_TIME, rfc3339_now());
            (dlq, driver, Disposition::DeadLettered)
        } else {
            tracing::error!(queue = %self.queue, id = %copy.id, attempts, %reason, "handler failed for the last time; dropped (dead_letter: false)");
            metrics::counter!(metric::DROPPED, "queue" => label).increment(1);
            delivery.ack().await?;
            return Ok(Disposition::Dropped);
        };
        if let Err(e) = driver.publish(target, copy).await {
            tracing::error!(queue = %self.queue, error = %e, "could not republish a failed message; returning it to its queue");
            delivery.release().await?;
            return Ok(Disposition::Returned);
        }
        // Logged once the copy is confirmed, so a line never reports a move that failed.
        let name = if disposition == Disposition::Retried {
            tracing::warn!(queue = %self.queue, id = %delivery.message().id, attempts, retry_in = ?wait, %reason, "handler failed; retrying");
            metric::RETRIED
        } else {
            tracing::error!(queue = %self.queue, id = %delivery.message().id, attempts, dead_letter_queue = %target, %reason, "handler failed for the last time; dead-lettered");
            metric::DEAD_LETTERED
        };
        metrics::counter!(name, "queue" => label).increment(1);
        delivery.ack().await?;
        Ok(disposition)
    }
}

/// Now as RFC 3339 UTC (`2026-11-23T19:15:00Z`).
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(60),
            jitter,
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = policy(false);
        let waits: Vec<u64> = (1..=8).map(|a| p.backoff(a).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn jitter_only_shortens_by_at_most_a_fifth() {
        let p = policy(true);
        for attempt in 1..=6 {
            let full = policy(false).backoff(attempt);
            let jittered = p.backoff(attempt);
            assert!(
                jittered <= full && jittered >= full.mul_f64(0.8),
                "{attempt}: {jittered:?}"
            );
        }
    }

    #[test]
    fn rfc3339_dates() {
        let at = |secs| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_460_100), "2026-11-23T18:55:00Z");
    }

    #[test]
    fn dead_letter_times_are_rfc3339_utc() {
        let now = rfc3339_now();
        assert_eq!(now.len(), "2026-11-23T19:15:00Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }
}
