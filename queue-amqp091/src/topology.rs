//! What the driver declared on the broker: the registry of declared queues (what
//! `publish` and `consume` accept, what a reconnect redeclares), the delay queues in
//! front of them, and the counts `info` reads back with passive declares.
//!
//! Declarations and passive declares each use a short-lived channel of their own: a
//! refused declare closes its channel, and must never take a publisher or a
//! consumer down with it.
//!
//! A quorum queue is declared with `x-queue-type: quorum`, always durable; its delay
//! queues are quorum queues too, and dead-letter into it at least once
//! (`x-dead-letter-strategy: at-least-once`, which RabbitMQ allows only with
//! `x-overflow: reject-publish`): a message whose delay is over leaves the delay
//! queue only once the target has it. A classic queue is declared without
//! `x-queue-type`, as other clients and earlier versions of this driver declare it,
//! so redeclaring theirs is not a conflict.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, MAX_SHORT_STRING_LENGTH, ShortString};
use queue_core::{Error, ErrorKind, QueueId, QueueInfo, QueueSpec, QueueType, Result};

use crate::connection::Link;
use crate::{error, lock};

/// Unused delay queues disappear this long after their last declaration plus their delay.
const DELAY_QUEUE_EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// A delay queue is redeclared (which resets its expiry) when older than this.
const DELAY_QUEUE_REFRESH: Duration = Duration::from_secs(30);

/// The longest a message waits in a delay queue: a minute short of the longest
/// expiry RabbitMQ takes, so that its queue can outlive it ([`delay_queue_expiry`]).
const LONGEST_DELAY_MS: u64 = queue_core::MAX_MILLIS - DELAY_QUEUE_EXPIRY_MARGIN.as_secs() * 1000;

/// The longest queue name whose delay queues' names (`NAME.delay.MILLISECONDS`) fit in
/// AMQP's short strings.
pub(crate) const MAX_QUEUE_NAME_BYTES: usize =
    MAX_SHORT_STRING_LENGTH - ".delay.".len() - digits(LONGEST_DELAY_MS);

const fn digits(mut n: u64) -> usize {
    let mut count = 1;
    while n >= 10 {
        n /= 10;
        count += 1;
    }
    count
}

/// The delay a message waits in a delay queue for `delay_ms`: rounded up to two
/// significant digits (1,234 ms waits 1,300), never shorter than asked (below the
/// longest, [`LONGEST_DELAY_MS`], a minute short of 49.7 days) and at most a tenth
/// longer, so that backoff with jitter, which draws a new millisecond value for
/// almost every retry, shares a few delay queues (fewer than a hundred per decade of
/// delays) instead of making one per retry.
pub(crate) fn delay_bucket(delay_ms: u64) -> u64 {
    let mut step = 1u64;
    while delay_ms / step >= 100 {
        step = step.saturating_mul(10);
    }
    delay_ms
        .div_ceil(step)
        .saturating_mul(step)
        .min(LONGEST_DELAY_MS)
}

/// How long one declaration of a queue after a returned publish
/// ([`Topology::declare_again_after_return`]) stands for the returns that follow.
const DECLARE_AGAIN_EVERY: Duration = Duration::from_secs(1);

/// How many queues a reconnect declares again at once, each on a channel of its own.
const REDECLARE_AT_ONCE: usize = 16;

/// A delay queue this driver declared.
#[derive(Debug, Clone)]
struct DelayQueue {
    target: QueueId,
    declared: Instant,
    generation: u64,
}

/// The queues declared through one driver.
#[derive(Default)]
pub(crate) struct Topology {
    /// Behind an `Arc`: every publish reads its queue's spec, and a clone of the
    /// spec's strings cost each one its allocations.
    registry: Mutex<HashMap<QueueId, Arc<QueueSpec>>>,
    /// By broker name.
    delay_queues: Mutex<HashMap<String, DelayQueue>>,
    /// When each queue was last declared again after a publish to it came back
    /// unroutable, and why that failed for good, if it did
    /// ([`Topology::declare_again_after_return`]).
    declared_after_return: Mutex<HashMap<QueueId, (Instant, Option<String>)>>,
    /// Held while a queue is declared again after a return, so that the returns of
    /// the publishes in flight with it wait for that declaration and take its outcome.
    declaring_after_return: tokio::sync::Mutex<()>,
}

impl Topology {
    /// The spec `queue` was declared with; `what` ("publish to") names the operation
    /// in the error.
    pub(crate) fn spec_of(&self, queue: &QueueId, what: &str) -> Result<Arc<QueueSpec>> {
        lock(&self.registry).get(queue).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "{what} {queue}: the queue was not declared on this amqp driver"
            ))
        })
    }

    /// Refuses what the broker would refuse, before waiting for a connection: a
    /// name too long for AMQP, for itself or for its delay queues (a retry goes
    /// through one: with no room for its name, every retry was `INVALID`, and the
    /// first failure dead-lettered the message).
    pub(crate) fn check(spec: &QueueSpec) -> Result<()> {
        queue_name(&spec.name)?;
        if spec.name.len() > MAX_QUEUE_NAME_BYTES {
            return Err(Error::invalid(format!(
                "queue name {:?}... is {} bytes: its delay queues (`NAME.delay.MILLISECONDS`, which retries go through) need it to be at most {MAX_QUEUE_NAME_BYTES}",
                spec.name.chars().take(40).collect::<String>(),
                spec.name.len()
            ))
            .with_detail("field", "name"));
        }
        Ok(())
    }

    /// Declares a queue on the broker and registers it ([`Self::check`] it first).
    pub(crate) async fn declare(&self, link: &Link, spec: &QueueSpec) -> Result<()> {
        self.declare_on(link, spec).await?;
        lock(&self.registry).insert(spec.id.clone(), Arc::new(spec.clone()));
        Ok(())
    }

    /// Redeclares every registered queue on a new link, [`REDECLARE_AT_ONCE`] at a
    /// time; failures are logged, since nobody waits for them (the queue's next
    /// publish or attach reports its own). The link is handed out once they are done:
    /// one at a time, each declaration's three round trips (a channel opened, the
    /// declare, the close) held up every publish and consumer for seconds after a
    /// reconnect of a driver with hundreds of queues (review).
    pub(crate) async fn redeclare(&self, link: &Link) {
        let specs: Vec<Arc<QueueSpec>> = lock(&self.registry).values().cloned().collect();
        futures_util::stream::iter(specs)
            .for_each_concurrent(REDECLARE_AT_ONCE, |spec| async move {
                if let Err(e) = self.declare_on(link, &spec).await {
                    tracing::warn!(queue = %spec.id, error = %e, "redeclare after reconnect failed");
                }
            })
            .await;
    }

    /// Declares the registered `queue` on the broker again, as it was declared (it
    /// was deleted there behind the driver's back).
    pub(crate) async fn declare_again(&self, link: &Link, queue: &QueueId) -> Result<()> {
        let spec = self.spec_of(queue, "declare again")?;
        self.declare_on(link, &spec).await
    }

    /// Declares the registered `queue` again after a publish to it came back
    /// unroutable (deleted on the broker, by an operator or to empty it): without
    /// this, publishing to it failed until a consumer or a reconnect declared it again,
    /// and a failed message whose dead-letter queue it was went back to its queue at
    /// every attempt (docs/drivers/amqp091.md, "Queues"). Every publish in flight to it
    /// comes back too: within [`DECLARE_AGAIN_EVERY`] of one declaration the others
    /// take its outcome instead of declaring again.
    ///
    /// A declaration that fails retryably (no connection, a timeout) is not kept: the
    /// next return tries again. One that fails for good is (its error's message).
    pub(crate) async fn declare_again_after_return(
        &self,
        link: &Link,
        queue: &QueueId,
    ) -> Result<()> {
        // One declaration at a time (this is the rare path: only after a return), so
        // that a window of returns makes one declaration, not one channel each.
        let _declaring = self.declaring_after_return.lock().await;
        let recent = lock(&self.declared_after_return)
            .get(queue)
            .filter(|(at, _)| at.elapsed() < DECLARE_AGAIN_EVERY)
            .map(|(_, failed)| failed.clone());
        match recent {
            Some(None) => return Ok(()),
            Some(Some(why)) => return Err(Error::not_found(why)),
            None => {}
        }
        let outcome = self.declare_again(link, queue).await;
        let failed = match &outcome {
            Err(e) if e.retryable() => return outcome,
            Err(e) => Some(e.message().to_string()),
            Ok(()) => None,
        };
        lock(&self.declared_after_return).insert(queue.clone(), (Instant::now(), failed));
        outcome
    }

    /// Declares a queue on the broker (not the registry).
    async fn declare_on(&self, link: &Link, spec: &QueueSpec) -> Result<()> {
        let mut args = FieldTable::default();
        if spec.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), string(QueueType::Quorum.as_str()));
        }
        if let Some(max) = spec.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(clamp_i64(max)),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        if let Some(p) = spec.max_priority {
            args.insert(
                "x-max-priority".into(),
                AMQPValue::LongLongInt(i64::from(p)),
            );
        }
        if let Some(ttl) = spec.message_ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis(ttl)));
        }
        declare_raw(
            link,
            &spec.name,
            spec.durable,
            args,
            &format!("declare queue {}", spec.id),
        )
        .await
    }

    /// Counts the delay queue `name` as not declared: the next publish through it
    /// declares it again.
    pub(crate) fn forget_delay_queue(&self, name: &str) {
        lock(&self.delay_queues).remove(name);
    }

    /// Makes sure the delay queue for `delay_ms` in front of `spec` exists; returns its name.
    pub(crate) async fn delay_queue(
        &self,
        link: &Link,
        spec: &QueueSpec,
        delay_ms: u64,
    ) -> Result<String> {
        let delay_ms = delay_bucket(delay_ms);
        let name = format!("{}.delay.{delay_ms}", spec.name);
        let fresh = lock(&self.delay_queues).get(&name).is_some_and(|d| {
            d.generation == link.generation && d.declared.elapsed() < DELAY_QUEUE_REFRESH
        });
        if fresh {
            return Ok(name);
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(clamp_i64(delay_ms)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(spec.name.as_bytes().into()),
        );
        // A target that can be full (`max_length`, `reject-publish`) gets a quorum
        // delay queue as a quorum target does: one that dead-letters at least once,
        // keeping a message until the target takes it. A classic delay queue's move
        // is not confirmed, and RabbitMQ dropped what a full target refused: a retry
        // copy, confirmed and its original acked, lost.
        let quorum = spec.queue_type == QueueType::Quorum || spec.max_length.is_some();
        if quorum {
            // No `x-expires`: a quorum queue's expiry runs from its creation, and
            // redeclaring does not renew it (measured on RabbitMQ 3.10), so a delay
            // queue in use would be deleted with the copies waiting in it. Its delays
            // are rounded ([`delay_bucket`]), so there are few of them.
            args.insert("x-queue-type".into(), string(QueueType::Quorum.as_str()));
            args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
            args.insert("x-overflow".into(), string("reject-publish"));
        } else {
            let expires = delay_queue_expiry(delay_ms);
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(clamp_i64(expires)),
            );
        }
        declare_raw(
            link,
            &name,
            // A quorum queue is always durable, and refuses to be declared otherwise.
            spec.durable || quorum,
            args,
            &format!("declare delay queue of {}", spec.id),
        )
        .await?;
        lock(&self.delay_queues).insert(
            name.clone(),
            DelayQueue {
                target: spec.id.clone(),
                declared: Instant::now(),
                generation: link.generation,
            },
        );
        Ok(name)
    }

    /// Counts: ready and consumers from a passive declare; delayed from the delay
    /// queues this driver declared for the queue.
    pub(crate) async fn info(&self, link: &Link, queue: &QueueId) -> Result<QueueInfo> {
        let spec = self.spec_of(queue, "info of")?;
        let what = format!("info of {queue}");
        let Some((ready, consumers)) = passive(link, &spec.name, &what).await? else {
            return Err(Error::not_found(format!(
                "{what}: queue {:?} does not exist on the broker (deleted?); declare it again",
                spec.name
            )));
        };
        let delay_queues: Vec<String> = lock(&self.delay_queues)
            .iter()
            .filter(|(_, d)| &d.target == queue)
            .map(|(name, _)| name.clone())
            .collect();
        // The broker lists no queues over AMQP: delay queues another process used
        // (a runtime before a restart, for the `info` command) are not seen, and a
        // driver that used none cannot say that nothing waits (docs/drivers/amqp091.md,
        // "Delays").
        let mut delayed = (!delay_queues.is_empty()).then_some(0u64);
        for name in delay_queues {
            match passive(link, &name, &what).await? {
                Some((n, _)) => delayed = delayed.map(|d| d + n),
                // Expired: it held nothing any more.
                None => {
                    lock(&self.delay_queues).remove(&name);
                }
            }
        }
        Ok(QueueInfo {
            ready: Some(ready),
            in_flight: None,
            delayed,
            consumers: Some(consumers),
        })
    }
}

async fn declare_raw(
    link: &Link,
    name: &str,
    durable: bool,
    args: FieldTable,
    what: &str,
) -> Result<()> {
    let name = queue_name(name)?;
    let declared_type = match args.inner().get("x-queue-type") {
        Some(AMQPValue::LongString(t)) => String::from_utf8_lossy(t.as_bytes()).into_owned(),
        _ => QueueType::Classic.as_str().to_string(),
    };
    let options = QueueDeclareOptions {
        durable,
        ..QueueDeclareOptions::default()
    };
    let declare = async {
        let channel = link.channel(what).await?;
        let declared = channel.queue_declare(name.clone(), options, args).await;
        let _ = channel.close(200, "OK".into()).await;
        Ok(declared)
    };
    let declared = link.answered(what, declare).await?;
    declared.map(|_| ()).map_err(|e| {
        link.saw(&e);
        let mapped = error::map(what, e);
        if let Some(existing) = existing_type(mapped.message()) {
            Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{what}: queue {:?} already exists on the broker as a {existing} queue, declared now as a {declared_type} queue; a queue cannot change its type: declare it with queue_type {existing}, or delete it (and its messages) first",
                    name.as_str()
                ),
            )
            .with_detail("field", "queue_type")
            .with_detail("amqp_reply_code", "406")
        } else if mapped.message().contains("queue limit in vhost") {
            // 406 as well, and not about this queue's settings.
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{}: the vhost holds as many queues as its limit allows (max-queues); delete queues, or raise the limit",
                    mapped.message()
                ),
            )
            .retryable_if(false)
        } else if mapped.is(ErrorKind::AlreadyExists) {
            Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{}: queue {:?} already exists on the broker with other settings; delete it or declare it as it is",
                    mapped.message(),
                    name.as_str()
                ),
            )
        } else {
            mapped
        }
    })
}

/// The type of the existing queue when a declare was refused for declaring another
/// (RabbitMQ: "inequivalent arg 'x-queue-type' ... received 'quorum' but current is
/// none"; none is a classic queue).
fn existing_type(refusal: &str) -> Option<&'static str> {
    if !refusal.contains("inequivalent arg 'x-queue-type'") {
        return None;
    }
    let current = refusal.rsplit_once("current is").map_or("", |(_, c)| c);
    Some(if current.contains("quorum") {
        "quorum"
    } else if current.contains("stream") {
        "stream"
    } else {
        "classic"
    })
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// (ready, consumers) of a queue, `None` if it does not exist.
async fn passive(link: &Link, name: &str, what: &str) -> Result<Option<(u64, u64)>> {
    let name = queue_name(name)?;
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let ask = async {
        let channel = link.channel(what).await?;
        let out = channel
            .queue_declare(name, options, FieldTable::default())
            .await;
        if out.is_ok() {
            let _ = channel.close(200, "OK".into()).await;
        }
        Ok(out)
    };
    match link.answered(what, ask).await? {
        Ok(q) => Ok(Some((
            u64::from(q.message_count()),
            u64::from(q.consumer_count()),
        ))),
        Err(e) if error::reply_code(&e) == Some(404) => Ok(None),
        Err(e) => {
            link.saw(&e);
            Err(error::map(what, e))
        }
    }
}

/// A queue name as AMQP carries it (at most 255 bytes).
pub(crate) fn queue_name(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        Error::invalid(format!(
            "queue name {:?}... is longer than AMQP's {MAX_SHORT_STRING_LENGTH} bytes",
            name.chars().take(40).collect::<String>()
        ))
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A classic delay queue's `x-expires`: its delay and a margin, within the largest
/// expiry RabbitMQ takes (u32::MAX ms; past it the declare is refused, and a delay
/// near the longest would never find its queue).
fn delay_queue_expiry(delay_ms: u64) -> u64 {
    delay_ms
        .saturating_add(millis(DELAY_QUEUE_EXPIRY_MARGIN) as u64)
        .min(queue_core::MAX_MILLIS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue name of 239 to 255 bytes was declared, and every retry through its
    /// delay queue (`NAME.delay.MS`, past 255 bytes) was `INVALID` (review).
    #[test]
    fn a_name_without_room_for_its_delay_queues_is_refused_at_declare() {
        let spec = |len: usize| {
            let id = QueueId::parse("app:long").unwrap();
            QueueSpec::new(id).with_name("q".repeat(len))
        };
        Topology::check(&spec(238)).unwrap();
        let err = Topology::check(&spec(239)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(err.message().contains("at most 238"), "{err}");
    }

    /// A delay queue is redeclared (its expiry reset) at most every 30 s, so it must
    /// outlive its delay by more than that: one that expired with copies in it lost
    /// them, confirmed and their originals acked. Near the longest delay, the expiry
    /// was capped at the delay itself.
    #[test]
    fn a_delay_queue_outlives_every_message_in_it_within_the_broker_limit() {
        assert_eq!(delay_queue_expiry(delay_bucket(1_000)), 61_000);
        let max = queue_core::MAX_MILLIS;
        for asked in [
            1,
            1_000,
            4_200_000_000,
            max - 60_000,
            max - 31_000,
            max - 1_000,
            max,
        ] {
            let waits = delay_bucket(asked);
            let expires = delay_queue_expiry(waits);
            assert!(
                expires > waits + millis(DELAY_QUEUE_REFRESH) as u64,
                "{asked}: waits {waits} ms in a queue that expires {expires} ms after its declare"
            );
            assert!(expires <= max, "{asked}: past what RabbitMQ takes");
        }
    }

    #[test]
    fn delays_round_up_to_two_significant_digits() {
        for (asked, waited) in [
            (1, 1),
            (99, 99),
            (100, 100),
            (101, 110),
            (1_234, 1_300),
            (1_000, 1_000),
            (59_999, 60_000),
            // Never so long that its queue could not outlive it.
            (queue_core::MAX_MILLIS, LONGEST_DELAY_MS),
        ] {
            assert_eq!(delay_bucket(asked), waited, "{asked}");
        }
        // Backoff with jitter from 800 to 1,000 ms shares 21 queues, not 201.
        let buckets: std::collections::BTreeSet<u64> = (800..=1_000).map(delay_bucket).collect();
        assert_eq!(buckets.len(), 21);
    }

    #[test]
    fn a_type_conflict_names_the_existing_type() {
        let refusal = |current: &str| {
            format!(
                "declare queue a:b: broker replied 406 PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'b' in vhost '/': received 'quorum' but current is {current}"
            )
        };
        assert_eq!(existing_type(&refusal("none")), Some("classic"));
        assert_eq!(existing_type(&refusal("'classic'")), Some("classic"));
        assert_eq!(
            existing_type(&refusal("the value 'quorum' of type 'longstr'")),
            Some("quorum")
        );
        assert_eq!(
            existing_type("406 PRECONDITION_FAILED - inequivalent arg 'x-max-priority'"),
            None
        );
    }
}
