//! What happens to a message whose handler failed (docs/consumers.md, "Retries and
//! dead letters"): another attempt after a backoff, or the dead-letter queue, decided
//! by the `attempts` header. Built only from publish and ack, so every driver gets
//! retries and dead letters without code of its own.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::{
    Backoff, Delivery, Driver, Error, HeaderValue, Headers, Message, QueueId, Result, names,
};

/// How failures of a queue's messages are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries before the message is dead-lettered.
    pub max_attempts: u32,
    /// The waits between attempts.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    /// 10 attempts, 1 s doubling to 60 s, with jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_secs(1), 2.0, Duration::from_secs(60))
                .with_jitter(true),
        }
    }
}

impl RetryPolicy {
    /// The longest backoff the failure path waits out for one failure: the last
    /// retry's (before jitter shortens it), or `max` when a failing dead letter may be
    /// kept in the queue after the longest backoff (`keeps_dead_letters`: a
    /// dead-letter queue, or a queue without one, where another's dead letter may
    /// arrive). On a driver without delays it holds the delivery that long.
    pub fn longest_wait(&self, keeps_dead_letters: bool) -> Duration {
        let backoff = self.backoff.with_jitter(false);
        if keeps_dead_letters {
            return backoff.longest();
        }
        match self.max_attempts {
            0 | 1 => Duration::ZERO,
            attempts => backoff.delay(attempts - 1),
        }
    }
}

/// What happens to a message past its last attempt.
#[derive(Clone)]
pub enum Exhausted {
    /// It moves to this dead-letter queue, on this driver.
    DeadLetter(QueueId, Arc<dyn Driver>),
    /// No dead-letter queue (`dead_letter: false`, or a dead-letter queue without one
    /// of its own): dropped, with an error log line; but a dead letter, and anything in
    /// a dead-letter queue, is kept ([`FailurePath::is_dead_letter_queue`]).
    Drop,
}

/// A queue as the consumer host sees it: where retries and dead letters go.
pub struct FailurePath {
    /// The queue.
    pub queue: QueueId,
    /// Its driver.
    pub driver: Arc<dyn Driver>,
    /// The retry policy.
    pub retry: RetryPolicy,
    /// Past the last attempt.
    pub exhausted: Exhausted,
    /// Whether another queue dead-letters into this one. Past its last attempt here, a
    /// dead letter (a message with `x_dead_letter_reason`) is kept: queued here again
    /// after the longest backoff, never moved on or dropped. Without a dead-letter queue
    /// of its own, so is every message (one put here directly, without the headers).
    /// Elsewhere a dead letter is moved to the queue's dead-letter queue like any
    /// message (one moved back with its headers returns there), and kept only where
    /// failures are dropped.
    pub is_dead_letter_queue: bool,
    /// Set when the runtime stops: a delivery held for its backoff goes back at once.
    /// A sender dropped never stops it.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// The longest dead-letter reason a copy carries: a handler's error can be any size,
/// and a header past the broker's frame limit closes the whole connection.
pub const MAX_REASON_BYTES: usize = 4096;

/// The longest reason and note a bare dead letter carries
/// ([`FailurePath`]'s fallback when a dead letter is refused as it is): small enough
/// for AMQP 0-9-1's smallest frame (4,096 bytes) with the other records.
pub const BARE_TEXT_BYTES: usize = 1024;

/// The shortest wait before a message that could not be moved goes back to its queue:
/// never an immediate redelivery loop.
const MIN_RETURN_WAIT: Duration = Duration::from_millis(100);

/// What became of a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Republished for another attempt, original acked.
    Retried,
    /// Moved to the dead-letter queue, original acked.
    DeadLettered,
    /// Past its last attempt but never dropped nor moved on (a dead letter, or any
    /// message in a dead-letter queue without one of its own): queued in its queue
    /// again after the longest backoff, original acked.
    Kept,
    /// Exhausted with `dead_letter: false`: logged and acked.
    Dropped,
    /// The original went back to its queue unchanged, after a wait: the republish
    /// failed, or the runtime stopped while holding it for its backoff.
    Returned,
}

/// How publishing a copy went.
enum Published {
    /// Confirmed, with where it went.
    Done(Disposition, QueueId),
    /// The broker is in trouble (a retryable error): try again later.
    Trouble,
    /// The driver refuses this copy as it is: trying again cannot help.
    Refused(Error),
}

/// Where a failed message's copy goes.
struct Move<'a> {
    target: &'a QueueId,
    driver: &'a Arc<dyn Driver>,
    disposition: Disposition,
    copy: Message,
}

impl FailurePath {
    /// Handles a failure: republishes a copy with `attempts` + 1 and the backoff as
    /// `delay` (or holds the delivery for the backoff on drivers without delays), or
    /// dead-letters it past `max_attempts`; acks the original only once that publish is
    /// confirmed. Headers another client set that cannot be published again are
    /// dropped from the copy (and named in `x_dropped_headers`); a copy the driver
    /// still refuses goes to the dead-letter queue instead. If nothing can be
    /// published, the original goes back to its queue after a wait, never lost and
    /// never spun.
    pub async fn fail(&self, delivery: &Delivery, reason: &str) -> Result<Disposition> {
        self.settle_failure(delivery, reason, false).await
    }

    /// The crash-loop guard (docs/consumers.md, "A handler that kills the runtime"):
    /// how often the broker delivered this message before without it being settled,
    /// when that is `max_attempts` or more. Only brokers that count deliveries say
    /// (the `x_delivery_count` header: RabbitMQ quorum queues, AMQP 1.0).
    pub fn redelivered_too_often(&self, delivery: &Delivery) -> Option<u64> {
        let count = delivery
            .message()
            .headers
            .get(names::X_DELIVERY_COUNT)?
            .as_int()?;
        let count = u64::try_from(count).ok()?;
        (count >= u64::from(self.retry.max_attempts)).then_some(count)
    }

    /// Gives up on a delivery without another attempt, whatever its `attempts`: as past
    /// its last attempt (the dead-letter queue, dropped, or kept in its queue after the
    /// longest backoff; see [`FailurePath::is_dead_letter_queue`]). For
    /// [`FailurePath::redelivered_too_often`].
    pub async fn give_up(&self, delivery: &Delivery, reason: &str) -> Result<Disposition> {
        self.settle_failure(delivery, reason, true).await
    }

    async fn settle_failure(
        &self,
        delivery: &Delivery,
        reason: &str,
        no_more_attempts: bool,
    ) -> Result<Disposition> {
        if delivery.is_lost() {
            // Lost while the handler ran: the broker delivers it again.
            return Ok(self.lost_while_held(delivery));
        }
        let attempts = delivery.message().headers.attempts();
        let reason = crate::truncate(reason, MAX_REASON_BYTES);
        let mut copy = delivery.message().clone();
        copy.headers.remove(names::DELAY);
        // The broker's count is of this delivery's message; a copy starts uncounted
        // (drivers that do not map it, like the memory driver, would carry it on).
        copy.headers.remove(names::X_DELIVERY_COUNT);
        if let Some(note) = copy.make_republishable_noting() {
            tracing::warn!(queue = %self.queue, id = %copy.id, dropped = %note, "dropped headers that cannot be published again");
        }
        let says_dead_letter = copy.headers.contains(names::X_DEAD_LETTER_REASON);
        let is_dead_letter = match self.exhausted {
            Exhausted::DeadLetter(..) => self.is_dead_letter_queue && says_dead_letter,
            Exhausted::Drop => self.is_dead_letter_queue || says_dead_letter,
        };
        let wait = self.retry.backoff.delay(attempts);
        let planned = if attempts < self.retry.max_attempts && !no_more_attempts {
            let mut retry = copy.clone();
            retry
                .headers
                .insert(names::ATTEMPTS, HeaderValue::Int(i64::from(attempts) + 1));
            if self.driver.capabilities().delay {
                retry
                    .headers
                    .insert(names::DELAY, HeaderValue::Int(delay_millis(wait)));
            } else if !self.told_then_held(delivery, attempts, wait, &reason).await {
                return self.give_back(delivery, Duration::ZERO).await;
            } else if delivery.is_lost() {
                return Ok(self.lost_while_held(delivery));
            }
            Some(Move {
                target: &self.queue,
                driver: &self.driver,
                disposition: Disposition::Retried,
                copy: retry,
            })
        } else if is_dead_letter {
            // Never dropped: it waits in its queue for the next try, after the
            // longest backoff (never none: `max: 0s` would loop it hot).
            let longest = self.retry.backoff.longest().max(MIN_RETURN_WAIT);
            let mut kept = copy.clone();
            without_ttl(&mut kept.headers);
            if self.driver.capabilities().delay {
                kept.headers
                    .insert(names::DELAY, HeaderValue::Int(delay_millis(longest)));
            } else if !self.hold(longest).await {
                return self.give_back(delivery, Duration::ZERO).await;
            } else if delivery.is_lost() {
                return Ok(self.lost_while_held(delivery));
            }
            Some(Move {
                target: &self.queue,
                driver: &self.driver,
                disposition: Disposition::Kept,
                copy: kept,
            })
        } else {
            None
        };
        // On a driver without delays the original was held through the wait already:
        // given back, it goes at once, not after another (it stayed unsettled twice
        // the backoff, past a broker's limit on unsettled deliveries sooner than
        // `check` allows for).
        let held = planned.is_some() && !self.driver.capabilities().delay;
        let return_wait = if held { Duration::ZERO } else { wait };
        let refused = match planned {
            None => None,
            Some(planned) => match self.publish(planned).await {
                Published::Done(disposition, target) => {
                    return self
                        .done(delivery, disposition, &target, attempts, wait, &reason)
                        .await;
                }
                Published::Trouble => return self.give_back(delivery, return_wait).await,
                Published::Refused(e) => Some(e),
            },
        };
        // Past the last attempt, or a retry copy the driver refused as it is: the
        // dead-letter queue, if there is one.
        let why = match &refused {
            Some(e) => crate::truncate(
                &format!("{reason} (and it cannot be retried: {e})"),
                MAX_REASON_BYTES,
            ),
            None => reason.clone(),
        };
        match &self.exhausted {
            Exhausted::DeadLetter(dlq, driver) if !is_dead_letter => {
                let letter = self.dead_letter(copy.clone(), attempts, &why);
                let moved = |copy| Move {
                    target: dlq,
                    driver,
                    disposition: Disposition::DeadLettered,
                    copy,
                };
                let mut published = self.publish(moved(letter)).await;
                let long_texts = why.len() > BARE_TEXT_BYTES
                    || copy
                        .headers
                        .get(names::X_DROPPED_HEADERS)
                        .and_then(HeaderValue::as_str)
                        .is_some_and(|note| note.len() > BARE_TEXT_BYTES);
                if long_texts && let Published::Refused(_) = &published {
                    // Its texts cut first, its headers kept; then bare.
                    let mut shorter = copy.clone();
                    cut_note(&mut shorter);
                    let why = crate::truncate(&why, BARE_TEXT_BYTES);
                    let shorter = self.dead_letter(shorter, attempts, &why);
                    published = self.publish(moved(shorter)).await;
                }
                if let Published::Refused(refusal) = &published {
                    let bare = self.bare_dead_letter(copy, attempts, &why, refusal);
                    published = self.publish(moved(bare)).await;
                }
                match published {
                    Published::Done(disposition, target) => {
                        self.done(delivery, disposition, &target, attempts, wait, &why)
                            .await
                    }
                    Published::Trouble => self.give_back(delivery, return_wait).await,
                    Published::Refused(_) => {
                        tracing::error!(queue = %self.queue, id = %delivery.message().id, reason = %why, "a failed message can be neither retried nor dead-lettered; it goes back to its queue");
                        self.give_back(delivery, self.stuck_wait()).await
                    }
                }
            }
            Exhausted::Drop if !is_dead_letter && refused.is_none() => {
                tracing::error!(queue = %self.queue, id = %copy.id, attempts, %reason, "handler failed for the last time; dropped (dead_letter: false)");
                delivery.ack().await?;
                Ok(Disposition::Dropped)
            }
            _ => {
                tracing::error!(queue = %self.queue, id = %delivery.message().id, reason = %why, "a failed message can be neither retried nor dead-lettered; it goes back to its queue");
                self.give_back(delivery, self.stuck_wait()).await
            }
        }
    }

    /// How long a message none of whose copies the driver takes waits before it goes
    /// back to its queue: the longest backoff, as a dead letter kept in its queue
    /// does. Its `attempts` cannot grow, so at the first backoff (200 ms) a dead
    /// letter whose retry copy was refused came back for ever five times a second
    /// (review).
    fn stuck_wait(&self) -> Duration {
        self.retry.backoff.longest().max(MIN_RETURN_WAIT)
    }

    /// On a driver that cannot delay a message: says the handler failed, then holds the
    /// original through the backoff (`hold`; `false` when a stop ended the wait). Said
    /// after the wait, a failure was logged a backoff late, and never when a stop came
    /// during it (review).
    async fn told_then_held(
        &self,
        delivery: &Delivery,
        attempts: u32,
        wait: Duration,
        reason: &str,
    ) -> bool {
        // Not yet a move: the copy is published after the wait, and a refusal of it is
        // logged then (the message is dead-lettered or given back).
        tracing::warn!(queue = %self.queue, id = %delivery.message().id, attempts, retry_in = ?wait, %reason, "handler failed; retrying after the backoff");
        self.hold(wait).await
    }

    /// Counts and logs a confirmed move, then acks the original.
    async fn done(
        &self,
        delivery: &Delivery,
        disposition: Disposition,
        target: &QueueId,
        attempts: u32,
        wait: Duration,
        reason: &str,
    ) -> Result<Disposition> {
        // Logged once the copy is confirmed, so a line never reports a move that failed
        // (but the failure held through its backoff, said before the wait).
        match disposition {
            // Told as it failed, before the wait (`told_then_held`).
            Disposition::Retried if !self.driver.capabilities().delay => {
                tracing::debug!(queue = %self.queue, id = %delivery.message().id, attempts, "the retry copy is published")
            }
            Disposition::Retried => {
                tracing::warn!(queue = %self.queue, id = %delivery.message().id, attempts, retry_in = ?wait, %reason, "handler failed; retrying")
            }
            Disposition::Kept if self.is_dead_letter_queue => {
                tracing::error!(queue = %self.queue, id = %delivery.message().id, attempts, %reason, "a dead letter failed its last attempt; it stays in its dead-letter queue")
            }
            Disposition::Kept => {
                tracing::error!(queue = %self.queue, id = %delivery.message().id, attempts, %reason, "a dead letter failed its last attempt; it stays in its queue (a dead letter is never dropped)")
            }
            _ => {
                tracing::error!(queue = %self.queue, id = %delivery.message().id, attempts, dead_letter_queue = %target, %reason, "handler failed for the last time; dead-lettered")
            }
        }
        delivery.ack().await?;
        Ok(disposition)
    }

    /// The dead-letter copy: the `x_*` record of where and why it failed, `attempts`
    /// starting again for the dead-letter queue's own policy, and no TTL (a dead
    /// letter must not expire out of its queue).
    fn dead_letter(&self, mut copy: Message, attempts: u32, reason: &str) -> Message {
        let headers = &mut copy.headers;
        headers.insert(names::X_ORIGINAL_QUEUE, self.queue.to_string());
        headers.insert(names::X_DEAD_LETTER_REASON, reason.to_string());
        headers.insert(names::X_DEAD_LETTER_TIME, rfc3339_now());
        headers.insert(
            names::X_ORIGINAL_ATTEMPTS,
            HeaderValue::Int(i64::from(attempts)),
        );
        headers.remove(names::ATTEMPTS);
        without_ttl(headers);
        copy
    }

    /// A dead letter its driver refused as it is, and with its texts cut, bare:
    /// without the message's own headers (named in [`names::X_DROPPED_HEADERS`]), its
    /// reason and that note cut to [`BARE_TEXT_BYTES`]. A refusal for the size of its
    /// headers (more than one AMQP 0-9-1 frame holds on a connection with a small
    /// `frame_max`) would otherwise send it back to its queue at every failure, never
    /// dead-lettered.
    fn bare_dead_letter(
        &self,
        mut copy: Message,
        attempts: u32,
        reason: &str,
        refusal: &Error,
    ) -> Message {
        let own = std::mem::take(&mut copy.headers);
        // The runtime's own records are written again; `attempts` starts again.
        let own_names: Vec<String> = own
            .iter()
            .map(|(name, _)| name)
            .filter(|name| *name != names::ATTEMPTS && !name.starts_with("x_"))
            .map(|name| format!("{name:?}"))
            .collect();
        tracing::warn!(queue = %self.queue, id = %copy.id, error = %refusal, headers = own.len(), "the dead letter was refused; sending it without the message's own headers");
        let refusal = crate::truncate(refusal.message(), 200);
        let note = format!(
            "left out, all {} of the message's own headers ({}): the dead letter was refused with them ({refusal})",
            own_names.len(),
            own_names.join(", ")
        );
        copy.headers.insert(
            names::X_DROPPED_HEADERS,
            crate::truncate(&note, BARE_TEXT_BYTES),
        );
        self.dead_letter(copy, attempts, &crate::truncate(reason, BARE_TEXT_BYTES))
    }

    /// Publishes a copy, without the headers its driver's broker acts on (another
    /// client's `CC` on AMQP 0-9-1): refused there, they would keep the message from
    /// ever moving.
    async fn publish(&self, planned: Move<'_>) -> Published {
        let mut copy = planned.copy;
        if let Some(note) = leave_out_reserved_headers(&mut copy, planned.driver.as_ref()) {
            tracing::warn!(queue = %self.queue, id = %copy.id, dropped = %note, "dropped headers that cannot be published again");
        }
        match planned.driver.publish(planned.target, copy).await {
            Ok(()) => Published::Done(planned.disposition, planned.target.clone()),
            Err(e) => {
                tracing::warn!(queue = %self.queue, target = %planned.target, error = %e, "could not republish a failed message");
                if e.retryable() {
                    Published::Trouble
                } else {
                    Published::Refused(e)
                }
            }
        }
    }

    /// Waits out a backoff holding the delivery; false when the runtime stopped first.
    async fn hold(&self, wait: Duration) -> bool {
        let mut stop = self.stop.clone();
        // A stop sender dropped (by a program using this crate) sends no stop: read as
        // one, every hold ended at once and a failing message came back without a
        // backoff, in a hot loop.
        let stopped = async move {
            if stop.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            () = stopped => false,
        }
    }

    /// The original was taken back by the broker while the runtime held it through
    /// its backoff, or before it failed (its connection or link was lost): the broker
    /// delivers it again, so no copy is published, which would have been a duplicate
    /// for every loss (docs/reliability.md, "When duplicates happen").
    fn lost_while_held(&self, delivery: &Delivery) -> Disposition {
        tracing::info!(queue = %self.queue, id = %delivery.message().id, "the delivery was lost before its failure was settled (its connection, link or channel closed): the broker delivers the message again, and no copy is published");
        Disposition::Returned
    }

    /// Returns the original to its queue after `wait` (at most half the broker's
    /// [`crate::Capabilities::max_unsettled`]), and never sooner than
    /// [`MIN_RETURN_WAIT`] (a zero backoff included), so a message that cannot move is
    /// not spun; at once only when the runtime is stopping (`hold` returns then).
    async fn give_back(&self, delivery: &Delivery, wait: Duration) -> Result<Disposition> {
        // A broker that takes back a delivery unsettled too long (RabbitMQ's
        // `consumer_timeout`) would do it during a long backoff, ending the channel
        // and sending its other deliveries again: the wait stays under half its limit.
        let wait = match self.driver.capabilities().max_unsettled {
            Some(limit) => wait.min(limit / 2),
            None => wait,
        };
        self.hold(wait.max(MIN_RETURN_WAIT)).await;
        delivery.release().await?;
        Ok(Disposition::Returned)
    }
}

/// Cuts the note of dropped headers a copy carries to [`BARE_TEXT_BYTES`].
fn cut_note(copy: &mut Message) {
    if let Some(note) = copy
        .headers
        .get(names::X_DROPPED_HEADERS)
        .and_then(HeaderValue::as_str)
        .filter(|note| note.len() > BARE_TEXT_BYTES)
    {
        let cut = crate::truncate(note, BARE_TEXT_BYTES);
        copy.headers.insert(names::X_DROPPED_HEADERS, cut);
    }
}

/// Leaves out of a copy bound for `driver` the headers its broker acts on
/// ([`crate::Capabilities::reserved_headers`]: another client's `CC` on AMQP 0-9-1),
/// each named in [`names::X_DROPPED_HEADERS`]. Refused, they would keep the copy from
/// ever being published. Returns the note, if anything was left out.
///
/// ```
/// use queue_core::memory::MemoryDriver;
/// use queue_core::{HeaderValue, Headers, Message, retry};
/// let headers = Headers::from_pairs([("CC", HeaderValue::from("boss@example.com"))]);
/// let mut copy = Message::from_bytes(b"1".to_vec(), headers, "application/json");
/// // The memory driver reserves nothing: a copy to it keeps every header.
/// assert_eq!(retry::leave_out_reserved_headers(&mut copy, &MemoryDriver::new()), None);
/// assert!(copy.headers.contains("CC"));
/// ```
pub fn leave_out_reserved_headers(copy: &mut Message, driver: &dyn Driver) -> Option<String> {
    let why = format!(
        "the {} driver's broker acts on it, so it refuses to publish it",
        driver.name()
    );
    copy.leave_out_noting(driver.capabilities().reserved_headers, &why)
}

/// Takes a dead letter's TTL off (a dead letter must not expire out of its queue),
/// keeping it as `x_original_expiration` (unless an earlier copy did).
fn without_ttl(headers: &mut Headers) {
    let ttl = headers
        .remove(names::EXPIRATION)
        .or_else(|| headers.remove(names::TTL));
    headers.remove(names::TTL);
    if let Some(ttl) = ttl
        && !headers.contains(names::X_ORIGINAL_EXPIRATION)
    {
        headers.insert(names::X_ORIGINAL_EXPIRATION, ttl);
    }
}

/// Now as RFC 3339 UTC (`2026-11-23T19:15:00Z`).
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A wait as a `delay` header: at most the longest delay a broker carries (a
/// `Backoff` may be capped at `Duration::MAX`, which as an i64 of milliseconds was -1).
fn delay_millis(wait: Duration) -> i64 {
    let ms = wait.as_millis().min(u128::from(crate::MAX_MILLIS));
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {

    /// The last retry waits `initial × multiplier^(max_attempts-2)` capped at `max`;
    /// a queue that keeps failing dead letters waits `max`.
    #[test]
    fn the_longest_wait_is_the_last_retrys_or_max_where_dead_letters_are_kept() {
        let hour = Duration::from_secs(3600);
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_secs(1), 2.0, hour).with_jitter(true),
        };
        assert_eq!(policy.longest_wait(false), Duration::from_secs(2));
        assert_eq!(policy.longest_wait(true), hour);
        let once = RetryPolicy {
            max_attempts: 1,
            ..policy
        };
        assert_eq!(once.longest_wait(false), Duration::ZERO);
    }

    use super::*;

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
