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
use queue_core::{ConsumeOptions, Delivery, Driver, HeaderValue, Message, QueueId, Queues, Value};
use queue_core::{Error, ErrorKind, Result};

/// How long a queue must stay quiet before a tool reading a driver that cannot count
/// its messages takes it for read through.
const QUIET: Duration = Duration::from_secs(2);

/// The most deliveries a tool holds at once: what it looks at stays unsettled until
/// it finishes.
pub const MAX_HELD: u32 = 10_000;

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
        // A text body that is not UTF-8 reads as bytes: shown as text all the same.
        Ok(Value::Bytes(bytes)) => serde_json::json!(String::from_utf8_lossy(&bytes)),
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

/// What a visitor tells the read: go on, or stop reading (what it has is enough).
#[derive(PartialEq, Eq)]
enum Next {
    More,
    Stop,
}

/// Reads a queue once through (at most `limit`, and at most [`MAX_HELD`] at a time),
/// handing each delivery to `visit`, which settles it or keeps it. Then it cancels its
/// subscription, which gives back every delivery still unsettled (the drivers'
/// contract), before `visit` drops what it kept: a released message is not handed to
/// the same subscription again. Returns how many were read.
async fn read_through(
    driver: &Arc<dyn Driver>,
    queue: &QueueId,
    limit: Option<u64>,
    visit: &mut dyn Visit,
) -> Result<Read> {
    let waiting = driver.info(queue).await.ok().and_then(|i| readable(&i));
    let to_read = match (waiting, limit) {
        (Some(w), Some(l)) => Some(w.min(l)),
        (w, l) => w.or(l),
    }
    .map(|n| n.min(u64::from(MAX_HELD)));
    if to_read == Some(0) {
        return Ok(Read { read: 0, waiting });
    }
    let prefetch = to_read.map_or(MAX_HELD, |n| n.max(1) as u32);
    let mut subscription = driver.consume(queue, ConsumeOptions { prefetch }).await?;
    let mut read = 0u64;
    // A driver that counts: the messages are there, wait for them (bounded all the
    // same). One that cannot: a quiet spell ends the read.
    let patience = if waiting.is_some() { QUIET * 15 } else { QUIET };
    let result = loop {
        if to_read.is_some_and(|n| read >= n) || read >= u64::from(MAX_HELD) {
            break Ok(());
        }
        let delivery = match tokio::time::timeout(patience, subscription.next()).await {
            Err(_) | Ok(None) => {
                if let Some(counted) = to_read.filter(|n| read < *n) {
                    // The tool would say it read all there was (`0 message(s)
                    // shown`, `purged 0`) of a queue where messages wait (review).
                    tracing::warn!(%queue, read, counted, "the queue counted more messages than could be read before nothing more came: those left cannot be read (one larger than the driver's max_message_size, or held elsewhere); they are still in the queue");
                }
                break Ok(());
            }
            Ok(Some(Err(e))) => break Err(e),
            Ok(Some(Ok(d))) => d,
        };
        read += 1;
        match visit.visit(delivery).await {
            Ok(Next::More) => {}
            Ok(Next::Stop) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = subscription.cancel().await {
        tracing::warn!(error = %e, %queue, "could not cancel the subscription; the broker gives its messages back when the connection closes (Redis: once their lease runs out, to the next consumer or tool that reads the queue)");
    }
    visit.kept().clear();
    result.map(|()| Read { read, waiting })
}

/// What a read of a queue is to take: the ready messages, and those held by no live
/// consumer. A broker that keeps what a dead consumer held until a live one takes it
/// back (Redis, once its lease ran out) hands them to the read: a queue that showed
/// none ready was not read at all, and the letters of a replay killed midway stayed
/// held, every tool saying 0, for ever (review). `None` from a driver that cannot
/// count.
fn readable(info: &queue_core::QueueInfo) -> Option<u64> {
    let orphaned = match info.consumers {
        Some(0) => info.in_flight.unwrap_or(0),
        _ => 0,
    };
    info.ready.map(|ready| ready.saturating_add(orphaned))
}

/// What one read went through.
struct Read {
    /// Deliveries handed to the visitor.
    read: u64,
    /// What the read was to take when it started ([`readable`]), if its driver counts.
    waiting: Option<u64>,
}

/// What a tool does with each delivery it reads: settle it, or keep it unsettled
/// until the read ends (it then goes back to its queue).
#[async_trait::async_trait(?Send)]
trait Visit {
    async fn visit(&mut self, delivery: Delivery) -> Result<Next>;
    /// The deliveries it kept.
    fn kept(&mut self) -> &mut Vec<Delivery>;
}

/// Shows up to `limit` messages of a queue without taking them: each goes back to the
/// queue once all were read.
pub async fn peek(driver: &Arc<dyn Driver>, queue: &QueueId, limit: u64) -> Result<Vec<Message>> {
    #[derive(Default)]
    struct Peek {
        kept: Vec<Delivery>,
        seen: Vec<Message>,
    }
    #[async_trait::async_trait(?Send)]
    impl Visit for Peek {
        async fn visit(&mut self, delivery: Delivery) -> Result<Next> {
            self.seen.push(delivery.message().clone());
            self.kept.push(delivery);
            Ok(Next::More)
        }
        fn kept(&mut self) -> &mut Vec<Delivery> {
            &mut self.kept
        }
    }
    let mut peek = Peek::default();
    read_through(driver, queue, Some(limit), &mut peek).await?;
    Ok(peek.seen)
}

/// Removes the messages a queue holds when it starts (acknowledges each); returns
/// how many. With a driver that cannot count, one read: up to `MAX_HELD`, until the
/// queue is quiet. A queue with consumers is `UNAVAILABLE`: they would take some of
/// what it counted, and it would take newer messages in their place.
pub async fn purge(driver: &Arc<dyn Driver>, queue: &QueueId) -> Result<u64> {
    #[derive(Default)]
    struct Purge(Vec<Delivery>);
    #[async_trait::async_trait(?Send)]
    impl Visit for Purge {
        async fn visit(&mut self, delivery: Delivery) -> Result<Next> {
            delivery.ack().await?;
            Ok(Next::More)
        }
        fn kept(&mut self) -> &mut Vec<Delivery> {
            &mut self.0
        }
    }
    // A driver that counts consumers and cannot now (a timeout, a reconnect) would
    // have the purge race them unchecked: its error is the purge's.
    let info = match driver.info(queue).await {
        Ok(info) => Some(info),
        Err(e) if driver.capabilities().info_consumers => {
            return Err(e.context(format!(
                "purge {queue}: could not tell whether the queue has consumers; nothing was purged"
            )));
        }
        Err(_) => None,
    };
    if let Some(consumers) = info.as_ref().and_then(|i| i.consumers)
        && consumers > 0
    {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "queue {queue} has {consumers} consumer(s): purge would race them and, to make up for what they took, remove messages published after it started; stop them first"
            ),
        ));
    }
    let waiting = info.as_ref().and_then(readable);
    let mut purged = 0;
    // A queue holding more than one read takes is purged in several, each bounded by
    // what is left of the count taken at the start.
    loop {
        let left = waiting.map(|w| w.saturating_sub(purged));
        let read = read_through(driver, queue, left, &mut Purge::default())
            .await?
            .read;
        purged += read;
        if let Some(left) = left.filter(|l| read == 0 && *l > 0) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "purged {purged} message(s) from {queue}, and {left} more it counted could not be read: a message larger than the driver's max_message_size (the log says which), or one held elsewhere; they are still in the queue"
                ),
            ));
        }
        if waiting.is_none() || read == 0 || left.is_some_and(|l| read >= l) {
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
    /// Moved back to their queue (published there and confirmed, then acknowledged
    /// here, but for the one a stop names); in a dry run, those that would be.
    pub replayed: u64,
    /// Left in the dead-letter queue: filtered out or past the limit (past it, those
    /// the queue counted ready when the run started, where its driver counts).
    pub skipped: u64,
    /// Left in the dead-letter queue because their `x_original_queue` is missing, not
    /// a queue a copy can go to (not declared, on the embedded memory driver, or the
    /// dead-letter queue itself).
    pub no_target: u64,
    /// Left in the dead-letter queue because their queue refused the copy (or its
    /// size was over the queue's `max_message_bytes`).
    pub failed: u64,
    /// Left in the dead-letter queue untried: a copy to their queue failed earlier in
    /// the run in a way that may pass (its broker down, an alarm, the publish's time
    /// limit, a full queue). Each such queue is tried once a run, so that a broker
    /// that is down costs one time limit, not one per letter, and letters for other
    /// queues still move.
    pub deferred: u64,
    /// A copy failed in a way that may pass: a later run may move what this one left.
    pub may_pass: bool,
    /// Why the first refused copy was refused (the first that may pass, if one did);
    /// when it stopped early, why it stopped.
    pub first_failure: Option<String>,
    /// The replay stopped: a dead letter whose copy was confirmed on its queue could
    /// not be acknowledged (the dead-letter queue's broker failing). It stays, so a
    /// later run moves it again (a duplicate, which `first_failure` names); the
    /// letters after it were not read.
    pub stopped_early: bool,
    /// It read [`MAX_HELD`] dead letters, the most one run holds: those after them
    /// were not read. A broker that keeps released messages in place (RabbitMQ)
    /// hands the next run the same ones first.
    pub held_the_most: bool,
}

/// A dead letter as it goes back to its queue, on `target`'s driver: `attempts` 1, the
/// runtime's `x_*` headers gone but `x_dropped_headers` (what the message lost on its
/// way, which nothing else records), its time to live restored; what cannot be
/// published again, or `target` refuses (its reserved headers), is dropped and named
/// in `x_dropped_headers`, as the runtime's retries do.
pub fn revived(dead: &Message, target: &dyn Driver) -> Message {
    let mut copy = dead.clone();
    let expiration = copy.headers.get(names::X_ORIGINAL_EXPIRATION).cloned();
    let runtime_headers: Vec<String> = copy
        .headers
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| k.starts_with("x_") && k != names::X_DROPPED_HEADERS)
        .collect();
    for key in runtime_headers {
        copy.headers.remove(&key);
    }
    copy.headers.remove(names::DELAY);
    copy.headers.insert(names::ATTEMPTS, 1i64);
    if let Some(ttl) = expiration {
        copy.headers.insert(names::EXPIRATION, ttl);
    }
    copy.make_republishable_noting();
    queue_core::retry::leave_out_reserved_headers(&mut copy, target);
    copy
}

/// Moves dead letters back to their `x_original_queue`, each confirmed there before it
/// is acknowledged here: a crash in the middle duplicates at worst, never loses. A
/// copy goes only where `reachable` says it may (a broker queue: a copy in the tool's
/// own embedded memory driver would vanish with it). `show` gets each one a dry run
/// would replay.
pub async fn replay(
    queues: &Queues,
    dead_letters: &QueueId,
    options: &ReplayOptions,
    reachable: &dyn Fn(&QueueId) -> bool,
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
        dead_letters: &'a QueueId,
        options: &'a ReplayOptions,
        reachable: &'a dyn Fn(&QueueId) -> bool,
        show: &'a mut dyn FnMut(&Message),
        kept: Vec<Delivery>,
        report: ReplayReport,
        /// Queues a copy failed to in a way that may pass: not tried again this run.
        failing: std::collections::HashSet<QueueId>,
    }
    #[async_trait::async_trait(?Send)]
    impl Visit for Replay<'_> {
        async fn visit(&mut self, delivery: Delivery) -> Result<Next> {
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
                .is_none_or(|text| reason.contains(text));
            let target = message
                .headers
                .get(names::X_ORIGINAL_QUEUE)
                .and_then(|q| q.as_str())
                .and_then(|q| QueueId::parse(q).ok())
                .filter(|q| q != self.dead_letters && (self.reachable)(q))
                .and_then(|q| self.queues.get(&q).map(|registered| (q, registered)));
            match (wanted, target) {
                (false, _) => self.report.skipped += 1,
                (true, None) => self.report.no_target += 1,
                (true, Some(_)) if self.options.dry_run => {
                    (self.show)(message);
                    self.report.replayed += 1;
                }
                (true, Some((target, _))) if self.failing.contains(&target) => {
                    self.report.deferred += 1;
                }
                (true, Some((target, registered))) => {
                    let copy = revived(message, registered.driver.as_ref());
                    // Refused as a publish to its queue would be: it was published
                    // past `max_message_bytes` (review).
                    let published = match registered.check_size(copy.body.len()) {
                        Ok(()) => registered.driver.publish(&target, copy).await,
                        Err(too_large) => {
                            Err(too_large.context(format!("dead letter {}", message.id)))
                        }
                    };
                    match published {
                        Ok(()) => {
                            self.report.replayed += 1;
                            if let Err(e) = delivery.ack().await {
                                // Its copy is on its queue and it stays here: a later
                                // run would move it again. The acks after it would
                                // fail alike, each leaving a duplicate behind.
                                self.report.stopped_early = true;
                                self.report.first_failure = Some(on_one_line(&format!(
                                    "dead letter {} was replayed to {target} but could not be acknowledged in {}, where it stays: a later run replays it again, a duplicate in {target}: {e}",
                                    message.id, self.dead_letters
                                )));
                                return Ok(Next::Stop);
                            }
                            return Ok(self.more());
                        }
                        Err(e) => {
                            tracing::warn!(id = %message.id, queue = %target, error = %e, "the queue refused a replayed dead letter; it stays in the dead-letter queue");
                            self.report.failed += 1;
                            if e.retryable() {
                                // What may pass is what to tell: run it again later.
                                if !self.report.may_pass {
                                    self.report.first_failure = Some(on_one_line(&e.to_string()));
                                }
                                self.report.may_pass = true;
                                // The letters after it for this queue would wait out the
                                // same time limit and fail alike (docs/operations.md,
                                // "dlq replay"); the other queues' still move.
                                self.failing.insert(target);
                            } else {
                                self.report
                                    .first_failure
                                    .get_or_insert_with(|| on_one_line(&e.to_string()));
                            }
                        }
                    }
                }
            }
            self.kept.push(delivery);
            Ok(self.more())
        }
        fn kept(&mut self) -> &mut Vec<Delivery> {
            &mut self.kept
        }
    }
    impl Replay<'_> {
        /// Past the limit, the rest of the queue is not worth reading.
        fn more(&self) -> Next {
            match self.options.limit {
                Some(limit) if self.report.replayed >= limit => Next::Stop,
                _ => Next::More,
            }
        }
    }
    if options.limit == Some(0) {
        // Nothing is read: what the queue holds is all skipped.
        let waiting = driver
            .info(dead_letters)
            .await
            .ok()
            .and_then(|i| readable(&i));
        return Ok(ReplayReport {
            skipped: waiting.unwrap_or(0),
            ..ReplayReport::default()
        });
    }
    let mut replay = Replay {
        queues,
        dead_letters,
        options,
        reachable,
        show,
        kept: Vec::new(),
        report: ReplayReport::default(),
        failing: Default::default(),
    };
    let Read { read, waiting } = read_through(&driver, dead_letters, None, &mut replay).await?;
    let mut report = replay.report;
    report.held_the_most = read >= u64::from(MAX_HELD);
    if options.limit.is_some_and(|limit| report.replayed >= limit) && !report.stopped_early {
        // Those it did not read as the limit was reached are skipped too.
        report.skipped += waiting.map_or(0, |w| w.saturating_sub(read));
    }
    Ok(report)
}

/// `text` as one line of a terminal: control and bidirectional characters escaped, as
/// log lines write them. A failure names what another client wrote (a message id, a
/// broker's refusal of it), and printed as the command's `error:` line, an id with a
/// newline and `ESC[8m` forged a log line and hid the rest (review).
fn on_one_line(text: &str) -> String {
    use std::fmt::Write;
    let mut line = String::with_capacity(text.len());
    let mut one = queue_core::OneLine::new(&mut line, usize::MAX);
    let _ = one.write_str(text);
    let _ = one.finish();
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `peek` shows each body as it decodes, and text that is not UTF-8 (or a body
    /// nothing reads) as text, not as a list of byte values.
    #[test]
    fn bodies_are_shown_as_handlers_read_them() {
        let body = |bytes: &[u8], content_type: &str| {
            let message = Message::from_bytes(bytes.to_vec(), Default::default(), content_type);
            show(&message)["body"].clone()
        };
        assert_eq!(body(br#"{"n": 1}"#, ""), serde_json::json!({ "n": 1 }));
        assert_eq!(body(b"hello", "text/plain"), "hello");
        assert_eq!(body(b"caf\xe9", "text/plain"), "caf\u{fffd}");
        assert_eq!(body(b"<n/>", "application/xml"), "<n/>");
    }

    /// `app:jobs` declared on `driver` with three messages, and a consumer holding one.
    async fn three_messages_and_a_consumer(
        driver: &Arc<dyn Driver>,
    ) -> (QueueId, Box<dyn queue_core::Subscription>) {
        let queue = QueueId::parse("app:jobs").unwrap();
        driver
            .declare(&queue_core::QueueSpec::new(queue.clone()))
            .await
            .unwrap();
        let message = || Message::from_bytes(b"1".to_vec(), Default::default(), "application/json");
        driver
            .publish_batch(&queue, vec![message(), message(), message()])
            .await
            .unwrap();
        let consumer = driver
            .consume(&queue, ConsumeOptions { prefetch: 1 })
            .await
            .unwrap();
        (queue, consumer)
    }

    /// A purge racing a consumer would make up what the consumer took with messages
    /// published after it started.
    #[tokio::test]
    async fn purge_refuses_a_queue_with_consumers_and_then_takes_all_it_held() {
        let driver: Arc<dyn Driver> = Arc::new(queue_core::memory::MemoryDriver::new());
        let (queue, consumer) = three_messages_and_a_consumer(&driver).await;
        let err = purge(&driver, &queue).await.unwrap_err();
        assert_eq!(err.kind(), queue_core::ErrorKind::Unavailable, "{err}");
        assert!(err.message().contains("1 consumer"), "{err}");
        consumer.cancel().await.unwrap();
        assert_eq!(purge(&driver, &queue).await.unwrap(), 3);
    }

    /// A driver that counts consumers and fails to count them now: the purge stops and
    /// says so. It went on as for a driver that cannot count, racing the consumers
    /// unchecked, and said `purged` (review).
    #[tokio::test]
    async fn purge_stops_when_the_consumers_cannot_be_counted() {
        let controlled = Arc::new(queue_testkit::ControlledDriver::new());
        let driver: Arc<dyn Driver> = controlled.clone();
        let (queue, consumer) = three_messages_and_a_consumer(&driver).await;
        controlled.fail_next_infos(1);
        let err = purge(&driver, &queue).await.unwrap_err();
        assert!(
            err.message()
                .contains("could not tell whether the queue has consumers"),
            "{err}"
        );
        assert!(err.retryable(), "{err}");
        consumer.cancel().await.unwrap();
        assert_eq!(
            purge(&driver, &queue).await.unwrap(),
            3,
            "nothing was purged before"
        );
    }

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
        let copy = revived(&dead, &queue_core::memory::MemoryDriver::new());
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

    /// A dead letter that carries another client's `CC` went back to an AMQP 0-9-1
    /// queue, which refuses `CC`, at every replay, and stayed in its dead-letter queue
    /// for good; and what it had lost before (`x_dropped_headers`) was forgotten
    /// (review).
    #[test]
    fn a_revived_dead_letter_leaves_out_what_its_queue_refuses_and_keeps_the_note() {
        let mut dead = queue_core::Message::from_bytes(
            b"{}".to_vec(),
            queue_core::Headers::new(),
            "application/json",
        );
        dead.headers.insert("CC", "boss@example.com");
        dead.headers
            .insert(names::X_DROPPED_HEADERS, "\"trace\" (a nested table): ...");
        let target = queue_testkit::ControlledDriver::reserving(&["CC", "BCC"]);
        let copy = revived(&dead, &target);
        assert!(!copy.headers.contains("CC"), "{:?}", copy.headers);
        let note = copy
            .headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str)
            .unwrap_or_default();
        assert!(note.starts_with("\"trace\" (a nested table)"), "{note}");
        assert!(note.contains(r#""CC"="boss@example.com""#), "{note}");
    }

    /// `app:jobs`, `app:other` and their dead-letter queue `app:jobs.dlq`, declared on
    /// `driver` (the first with `max_message_bytes` of 10).
    async fn queues_on(driver: &Arc<dyn Driver>) -> Queues {
        let queues = Queues::new();
        for id in ["app:jobs", "app:other", "app:jobs.dlq"] {
            let settings = queue_core::PublishSettings {
                max_message_bytes: if id == "app:jobs" { 10 } else { 1 << 20 },
                ..Default::default()
            };
            let spec = queue_core::QueueSpec::new(QueueId::parse(id).unwrap());
            queues
                .declare(spec, settings, driver.clone())
                .await
                .unwrap();
        }
        queues
    }

    /// A dead letter of `queue` whose body is `body`.
    fn letter(queue: &str, body: &[u8]) -> Message {
        let mut m = Message::from_bytes(body.to_vec(), Default::default(), "application/json");
        m.headers.insert(names::X_ORIGINAL_QUEUE, queue);
        m
    }

    fn id(text: &str) -> QueueId {
        QueueId::parse(text).unwrap()
    }

    /// A queue that cannot take messages for now (its broker down, an alarm, a time
    /// limit, full) is tried once a run: each of its letters waited out the publish's
    /// time limit (5 s by default, hours for a large queue). Until 2026-12-07 that
    /// failure stopped the whole replay: a full queue's first letter kept every
    /// other queue's letters from moving, run after run (review). Every letter left
    /// stays; a later replay moves them.
    #[tokio::test]
    async fn a_queue_failing_in_a_way_that_may_pass_is_tried_once_and_the_others_move() {
        let controlled = Arc::new(queue_testkit::ControlledDriver::new());
        let driver: Arc<dyn Driver> = controlled.clone();
        let queues = queues_on(&driver).await;
        let dead = id("app:jobs.dlq");
        let letters = vec![
            letter("app:jobs", b"1"),
            letter("app:jobs", b"2"),
            letter("app:other", b"3"),
            letter("app:jobs", b"4"),
            letter("app:other", b"5"),
        ];
        driver.publish_batch(&dead, letters).await.unwrap();
        let everything = ReplayOptions::default();
        let replay_all =
            || async { replay(&queues, &dead, &everything, &|_| true, &mut |_| {}).await };

        controlled.fail_next_publishes(1);
        let report = replay_all().await.unwrap();
        assert_eq!(
            (report.replayed, report.failed, report.deferred),
            (2, 1, 2),
            "{report:?}"
        );
        assert!(report.may_pass && !report.stopped_early, "{report:?}");
        let failure = report.first_failure.unwrap_or_default();
        assert!(failure.contains("failed a publish"), "{failure}");
        assert_eq!(driver.info(&dead).await.unwrap().ready, Some(3));
        assert_eq!(driver.info(&id("app:other")).await.unwrap().ready, Some(2));

        let report = replay_all().await.unwrap();
        assert_eq!((report.replayed, report.failed), (3, 0), "{report:?}");
        assert_eq!(driver.info(&id("app:jobs")).await.unwrap().ready, Some(3));
        assert_eq!(driver.info(&dead).await.unwrap().ready, Some(0));
    }

    /// A copy over its queue's `max_message_bytes` is refused as a publish to it is:
    /// the replay published it (review).
    #[tokio::test]
    async fn a_copy_over_its_queues_size_limit_is_refused() {
        let driver: Arc<dyn Driver> = Arc::new(queue_core::memory::MemoryDriver::new());
        let queues = queues_on(&driver).await;
        let dead = id("app:jobs.dlq");
        let letters = vec![
            {
                let mut long = letter("app:jobs", b"\"eleven bytes\"");
                long.id = "evil\n2026-12-07T23:59:59Z  INFO all fine\x1b[8m".to_string();
                long
            },
            letter("app:jobs", b"1"),
        ];
        driver.publish_batch(&dead, letters).await.unwrap();
        let report = replay(
            &queues,
            &dead,
            &ReplayOptions::default(),
            &|_| true,
            &mut |_| {},
        )
        .await
        .unwrap();
        assert_eq!((report.replayed, report.failed), (1, 1), "{report:?}");
        assert!(!report.may_pass, "{report:?}");
        let failure = report.first_failure.unwrap_or_default();
        assert!(failure.contains("max_message_bytes"), "{failure}");
        // Another client's id, printed as the command's `error:` line, forged a log
        // line and hid the rest of the terminal's text (review).
        assert!(
            failure.contains("evil\\n2026") && failure.contains("\\u{1b}[8m"),
            "{failure}"
        );
        assert_eq!(driver.info(&id("app:jobs")).await.unwrap().ready, Some(1));
        assert_eq!(driver.info(&dead).await.unwrap().ready, Some(1));
    }

    /// A letter whose copy is on its queue and that cannot be acknowledged stops the
    /// replay, naming the duplicate a later run makes: the error alone was printed,
    /// without what the run had moved (review).
    #[tokio::test]
    async fn a_failed_ack_stops_the_replay_and_names_the_duplicate() {
        let controlled = Arc::new(queue_testkit::ControlledDriver::new());
        let driver: Arc<dyn Driver> = controlled.clone();
        let queues = queues_on(&driver).await;
        let dead = id("app:jobs.dlq");
        let letters = (1..=4).map(|n| letter("app:other", format!("{n}").as_bytes()));
        driver
            .publish_batch(&dead, letters.collect())
            .await
            .unwrap();
        let mut first = None;
        let dry = ReplayOptions {
            dry_run: true,
            limit: Some(1),
            ..Default::default()
        };
        let mut show = |m: &Message| first = Some(m.id.clone());
        replay(&queues, &dead, &dry, &|_| true, &mut show)
            .await
            .unwrap();
        let first = first.expect("a letter shown");

        controlled.fail_next_acks(1);
        let report = replay(
            &queues,
            &dead,
            &ReplayOptions::default(),
            &|_| true,
            &mut |_| {},
        )
        .await
        .unwrap();
        assert_eq!((report.replayed, report.failed), (1, 0), "{report:?}");
        assert!(report.stopped_early, "{report:?}");
        let failure = report.first_failure.unwrap_or_default();
        assert!(
            failure.contains(&first) && failure.contains("duplicate in app:other"),
            "{failure}"
        );
        // Its copy is on its queue, and it is back with the unread ones.
        assert_eq!(driver.info(&id("app:other")).await.unwrap().ready, Some(1));
        assert_eq!(driver.info(&dead).await.unwrap().ready, Some(4));
    }

    /// Letters past `--limit` are counted as skipped: the summary said `0 skipped`
    /// with most of the queue left (review).
    #[tokio::test]
    async fn letters_past_the_limit_are_counted_as_skipped() {
        let driver: Arc<dyn Driver> = Arc::new(queue_core::memory::MemoryDriver::new());
        let queues = queues_on(&driver).await;
        let dead = id("app:jobs.dlq");
        let letters = (1..=20).map(|_| letter("app:other", b"1"));
        driver
            .publish_batch(&dead, letters.collect())
            .await
            .unwrap();
        for (limit, replayed, skipped) in [(0, 0, 20), (4, 4, 16)] {
            let options = ReplayOptions {
                limit: Some(limit),
                ..Default::default()
            };
            let report = replay(&queues, &dead, &options, &|_| true, &mut |_| {})
                .await
                .unwrap();
            assert_eq!(
                (report.replayed, report.skipped),
                (replayed, skipped),
                "{report:?}"
            );
        }
    }

    /// A run reads at most [`MAX_HELD`] dead letters: one that skipped them all said
    /// `replayed 0` and nothing of the letters it never read (review).
    #[tokio::test]
    async fn a_replay_says_when_it_read_the_most_one_run_holds() {
        let driver: Arc<dyn Driver> = Arc::new(queue_core::memory::MemoryDriver::new());
        let queues = Queues::new();
        let dead = QueueId::parse("app:jobs.dlq").unwrap();
        let spec =
            queue_core::QueueSpec::new(dead.clone()).with_max_length(2 * u64::from(MAX_HELD));
        queues
            .declare(spec, Default::default(), driver.clone())
            .await
            .unwrap();
        let letter = || Message::from_bytes(b"1".to_vec(), Default::default(), "application/json");
        let letters = (0..=MAX_HELD).map(|_| letter()).collect();
        driver.publish_batch(&dead, letters).await.unwrap();
        let everything = ReplayOptions::default();
        let report = replay(&queues, &dead, &everything, &|_| true, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(report.no_target, u64::from(MAX_HELD), "{report:?}");
        assert!(report.held_the_most, "{report:?}");
    }
}
