//! The conformance contracts every driver keeps, one function each, and the suite
//! that runs them (docs/drivers/writing-a-driver.md).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use libtest_mimic::Trial;
use queue_core::{Capabilities, ErrorKind, HeaderValue, Headers, Message, Value};

use crate::{Backend, TestContext, message, next, number_of, numbered, within};

/// Declaring the same queue twice is fine.
pub async fn declare_twice_is_fine(ctx: &TestContext) {
    let spec = ctx.spec("declare-twice");
    ctx.declare(spec.clone()).await;
    ctx.declare(spec).await;
}

/// Publish then consume: id, body and headers arrive intact.
pub async fn round_trip_keeps_id_body_and_headers(ctx: &TestContext) {
    let q = ctx.declared("round-trip").await;
    let headers = Headers::from_pairs([
        ("tenant", HeaderValue::from("acme")),
        ("count", HeaderValue::Int(-42)),
        ("ratio", HeaderValue::Float(0.25)),
        ("urgent", HeaderValue::Bool(true)),
    ]);
    let body = Value::map([
        ("action", Value::from("send_email")),
        ("user_id", Value::Int(456)),
    ]);
    let sent = message(body.clone(), headers.clone());
    ctx.publish(&q, sent.clone()).await;
    let mut sub = ctx.consume(&q, 10).await;
    let got = next(&mut sub).await;
    assert_eq!(got.message().id, sent.id);
    assert_eq!(got.message().decode().unwrap(), body);
    for (k, v) in headers.iter() {
        assert_eq!(got.message().headers.get(k), Some(v), "header {k}");
    }
    within("ack", got.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// Every body value type survives the trip through the driver.
pub async fn every_value_type_round_trips(ctx: &TestContext) {
    let q = ctx.declared("value-types").await;
    let bodies = vec![
        Value::Bool(false),
        Value::Int(i64::MIN),
        Value::Int(5),
        Value::Float(5.0),
        Value::Float(-1.5e300),
        Value::from("text with ünïcode"),
        Value::Array(vec![Value::Int(1), Value::Nil, Value::from("x")]),
        Value::map([(
            "nested",
            Value::map([(
                "list",
                Value::Array(vec![Value::Float(0.5), Value::Bool(true)]),
            )]),
        )]),
    ];
    let mut sub = ctx.consume(&q, 10).await;
    for body in &bodies {
        for codec in [queue_core::Codec::Json, queue_core::Codec::MsgPack] {
            ctx.publish(&q, Message::encode(body, Headers::new(), codec).unwrap())
                .await;
            let got = next(&mut sub).await;
            assert_eq!(&got.message().decode().unwrap(), body, "{codec}");
            within("ack", got.ack()).await.unwrap();
        }
    }
    let bytes = Value::Bytes(vec![0, 159, 146, 150, 255]);
    ctx.publish(
        &q,
        Message::encode(&bytes, Headers::new(), queue_core::Codec::MsgPack).unwrap(),
    )
    .await;
    let got = next(&mut sub).await;
    assert_eq!(got.message().decode().unwrap(), bytes);
    within("ack", got.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// Three messages, each delivered exactly once.
pub async fn three_messages_are_delivered_exactly_once(ctx: &TestContext) {
    let q = ctx.declared("three").await;
    for n in 1..=3 {
        ctx.publish(&q, numbered(n)).await;
    }
    let mut sub = ctx.consume(&q, 10).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = next(&mut sub).await;
        seen.push(number_of(&d));
        within("ack", d.ack()).await.unwrap();
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3]);
    assert_nothing_more(ctx, &q, &mut sub).await;
    within("cancel", sub.cancel()).await.unwrap();
}

/// Publishes a marker and checks that it is the next thing the consumer gets: proves
/// that nothing else was left, without waiting for a quiet period.
async fn assert_nothing_more(
    ctx: &TestContext,
    q: &queue_core::QueueId,
    sub: &mut Box<dyn queue_core::Subscription>,
) {
    ctx.publish(q, numbered(-1)).await;
    let d = next(sub).await;
    assert_eq!(number_of(&d), -1, "an unexpected message was still in {q}");
    within("ack", d.ack()).await.unwrap();
}

/// A released delivery comes back with the same id and headers.
pub async fn release_redelivers_the_same_message(ctx: &TestContext) {
    let q = ctx.declared("release").await;
    let headers = Headers::from_pairs([("k", HeaderValue::from("v"))]);
    let sent = message(Value::from("again"), headers);
    ctx.publish(&q, sent.clone()).await;
    let mut sub = ctx.consume(&q, 1).await;
    let first = next(&mut sub).await;
    within("release", first.release()).await.unwrap();
    let second = next(&mut sub).await;
    assert_eq!(second.message().id, sent.id);
    assert_eq!(second.message().headers.get("k"), sent.headers.get("k"));
    assert_eq!(
        second.message().headers.attempts(),
        1,
        "a release is not an attempt"
    );
    assert_eq!(second.message().decode().unwrap(), Value::from("again"));
    within("ack", second.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// Dropping an unsettled delivery returns it to the queue.
pub async fn dropping_a_delivery_releases_it(ctx: &TestContext) {
    let q = ctx.declared("drop").await;
    let sent = numbered(7);
    ctx.publish(&q, sent.clone()).await;
    let mut sub = ctx.consume(&q, 1).await;
    drop(next(&mut sub).await);
    let again = next(&mut sub).await;
    assert_eq!(again.message().id, sent.id);
    within("ack", again.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// Publishing to or consuming from a queue never declared is `NOT_FOUND`.
pub async fn undeclared_queue_is_not_found(ctx: &TestContext) {
    let q = ctx.spec("undeclared").id;
    let err = within("publish", ctx.driver().publish(&q, numbered(1)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    match within("consume", ctx.driver().consume(&q, Default::default())).await {
        Err(err) => assert_eq!(err.kind(), ErrorKind::NotFound, "{err}"),
        Ok(_) => panic!("consuming an undeclared queue succeeded"),
    }
}

/// A batch publish delivers every message.
pub async fn batch_publish_delivers_all(ctx: &TestContext) {
    let q = ctx.declared("batch").await;
    let batch: Vec<Message> = (0..50).map(numbered).collect();
    within("publish_batch", ctx.driver().publish_batch(&q, batch))
        .await
        .unwrap();
    let mut sub = ctx.consume(&q, 50).await;
    let mut seen = HashSet::new();
    for _ in 0..50 {
        let d = next(&mut sub).await;
        assert!(seen.insert(number_of(&d)));
        within("ack", d.ack()).await.unwrap();
    }
    assert_eq!(seen, (0..50).collect());
    within("cancel", sub.cancel()).await.unwrap();
}

/// Well-known headers read back exactly as published.
pub async fn neutral_headers_round_trip(ctx: &TestContext) {
    let q = ctx.declared("neutral-headers").await;
    let headers = Headers::from_pairs([
        ("correlation_id", HeaderValue::from("req-17")),
        ("reply_to", HeaderValue::from("app:replies")),
        ("content_type", HeaderValue::from("text/x-mine")),
        ("message_type", HeaderValue::from("order_shipped")),
        ("content_encoding", HeaderValue::from("gzip")),
        ("priority", HeaderValue::from("high")),
        ("timestamp", HeaderValue::Int(1_700_000_000)),
    ]);
    let sent = message(Value::from("h"), headers.clone());
    ctx.publish(&q, sent).await;
    let mut sub = ctx.consume(&q, 1).await;
    let got = next(&mut sub).await;
    let read: BTreeMap<_, _> = got.message().headers.iter().collect();
    for (k, v) in headers.iter() {
        assert_eq!(read.get(k), Some(&v), "header {k} in {read:?}");
    }
    assert_eq!(
        got.message().content_type,
        "application/json",
        "the wire content type is the codec's"
    );
    within("ack", got.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// The runtime's `attempts` header reads back as written.
pub async fn attempts_header_round_trips(ctx: &TestContext) {
    let q = ctx.declared("attempts").await;
    let headers = Headers::from_pairs([("attempts", HeaderValue::Int(3))]);
    ctx.publish(&q, message(Value::from("a"), headers)).await;
    let mut sub = ctx.consume(&q, 1).await;
    let got = next(&mut sub).await;
    assert_eq!(got.message().headers.attempts(), 3);
    within("ack", got.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// A message published to one queue never shows up in another.
pub async fn queues_are_isolated(ctx: &TestContext) {
    let a = ctx.declared("isolated-a").await;
    let b = ctx.declared("isolated-b").await;
    ctx.publish(&a, numbered(1)).await;
    ctx.publish(&b, numbered(2)).await;
    let mut sub_b = ctx.consume(&b, 10).await;
    let d = next(&mut sub_b).await;
    assert_eq!(number_of(&d), 2);
    within("ack", d.ack()).await.unwrap();
    assert_nothing_more(ctx, &b, &mut sub_b).await;
    within("cancel", sub_b.cancel()).await.unwrap();
    let mut sub_a = ctx.consume(&a, 10).await;
    let d = next(&mut sub_a).await;
    assert_eq!(number_of(&d), 1);
    within("ack", d.ack()).await.unwrap();
    within("cancel", sub_a.cancel()).await.unwrap();
}

/// `info` counts the messages ready in a queue.
pub async fn info_counts_ready(ctx: &TestContext) {
    let q = ctx.declared("info").await;
    for n in 0..3 {
        ctx.publish(&q, numbered(n)).await;
    }
    let info = eventually_info(ctx, &q, |i| i.ready == Some(3)).await;
    assert_eq!(info.ready, Some(3));
}

/// `info` counts a delivery that is held unsettled as in flight, no longer ready.
pub async fn info_counts_in_flight(ctx: &TestContext) {
    let q = ctx.declared("info").await;
    for n in 0..3 {
        ctx.publish(&q, numbered(n)).await;
    }
    let mut sub = ctx.consume(&q, 1).await;
    let held = next(&mut sub).await;
    let info = eventually_info(ctx, &q, |i| i.in_flight == Some(1)).await;
    assert_eq!(info.in_flight, Some(1));
    if let Some(ready) = info.ready {
        assert_eq!(ready, 2, "the held delivery still counts as ready");
    }
    within("ack", held.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// An ack reaches the backend while the subscription stays open and others are held:
/// a driver that gathers acks must not keep a lone one back until more come or the
/// subscription ends.
pub async fn an_ack_settles_while_others_are_held(ctx: &TestContext) {
    let q = ctx.declared("lone-ack").await;
    for n in 0..3 {
        ctx.publish(&q, numbered(n)).await;
    }
    let mut sub = ctx.consume(&q, 10).await;
    // A broker that pushes deliveries has sent all three before one is taken (the
    // others stay held); a driver that hands them out as they are taken has sent none.
    eventually_info(ctx, &q, |i| i.ready == Some(0) || i.in_flight == Some(0)).await;
    let first = next(&mut sub).await;
    within("ack", first.ack()).await.unwrap();
    let info = eventually_info(ctx, &q, |i| i.message_count().is_some_and(|n| n < 3)).await;
    assert_eq!(info.message_count(), Some(2), "the ack was not settled");
    for _ in 0..2 {
        within("ack", next(&mut sub).await.ack()).await.unwrap();
    }
    within("cancel", sub.cancel()).await.unwrap();
}

/// `info` counts the consumers attached to a queue.
pub async fn info_counts_consumers(ctx: &TestContext) {
    let q = ctx.declared("info").await;
    let sub = ctx.consume(&q, 1).await;
    let info = eventually_info(ctx, &q, |i| i.consumers == Some(1)).await;
    assert_eq!(info.consumers, Some(1));
    within("cancel", sub.cancel()).await.unwrap();
}

/// Brokers report counts with a little lag: polls `info` until `done` holds (bounded).
async fn eventually_info(
    ctx: &TestContext,
    q: &queue_core::QueueId,
    done: impl Fn(&queue_core::QueueInfo) -> bool,
) -> queue_core::QueueInfo {
    within("info to settle", async {
        loop {
            let info = ctx.driver().info(q).await.unwrap();
            if done(&info) {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Cancelling stops delivery and returns what the consumer held unsettled.
pub async fn cancel_stops_delivery_and_returns_unsettled(ctx: &TestContext) {
    let q = ctx.declared("cancel").await;
    for n in 0..3 {
        ctx.publish(&q, numbered(n)).await;
    }
    let mut sub = ctx.consume(&q, 3).await;
    let held: Vec<_> = vec![next(&mut sub).await, next(&mut sub).await];
    let held_numbers: HashSet<i64> = held.iter().map(number_of).collect();
    within("cancel", sub.cancel()).await.unwrap();
    ctx.publish(&q, numbered(3)).await;
    let mut after = ctx.consume(&q, 10).await;
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let d = next(&mut after).await;
        seen.insert(number_of(&d));
        within("ack", d.ack()).await.unwrap();
    }
    assert_eq!(
        seen,
        (0..4).collect(),
        "held {held_numbers:?} must come back"
    );
    for d in held {
        assert!(
            within("ack", d.ack()).await.is_err(),
            "acking a delivery of a cancelled consumer must fail"
        );
    }
    within("cancel", after.cancel()).await.unwrap();
}

/// Messages published before any consumer wait for one.
pub async fn publish_before_any_consumer(ctx: &TestContext) {
    let q = ctx.declared("before-consumer").await;
    for n in 0..5 {
        ctx.publish(&q, numbered(n)).await;
    }
    let mut sub = ctx.consume(&q, 10).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let d = next(&mut sub).await;
        seen.push(number_of(&d));
        within("ack", d.ack()).await.unwrap();
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4], "FIFO order");
    within("cancel", sub.cancel()).await.unwrap();
}

/// A new consumer after a cancel gets what follows.
pub async fn new_consumer_after_cancel(ctx: &TestContext) {
    let q = ctx.declared("after-cancel").await;
    let sub = ctx.consume(&q, 10).await;
    within("cancel", sub.cancel()).await.unwrap();
    ctx.publish(&q, numbered(1)).await;
    let mut sub = ctx.consume(&q, 10).await;
    let d = next(&mut sub).await;
    assert_eq!(number_of(&d), 1);
    within("ack", d.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// Acks made right before a cancel are kept: a driver that gathers acks sends what it
/// gathered before the consumer goes, so a new consumer does not get them again.
pub async fn acks_made_right_before_cancel_are_kept(ctx: &TestContext) {
    let q = ctx.declared("ack-then-cancel").await;
    for n in 0..3 {
        ctx.publish(&q, numbered(n)).await;
    }
    let mut sub = ctx.consume(&q, 10).await;
    for _ in 0..3 {
        within("ack", next(&mut sub).await.ack()).await.unwrap();
    }
    within("cancel", sub.cancel()).await.unwrap();
    let mut sub = ctx.consume(&q, 10).await;
    assert_nothing_more(ctx, &q, &mut sub).await;
    within("cancel", sub.cancel()).await.unwrap();
}

/// Ten rapid consume/cancel cycles leave the queue working and lose nothing.
pub async fn rapid_consume_cancel_cycles(ctx: &TestContext) {
    let q = ctx.declared("cycles").await;
    for n in 0..10 {
        ctx.publish(&q, numbered(n)).await;
    }
    let mut acked = HashSet::new();
    for _ in 0..10 {
        let mut sub = ctx.consume(&q, 2).await;
        let d = next(&mut sub).await;
        acked.insert(number_of(&d));
        within("ack", d.ack()).await.unwrap();
        within("cancel", sub.cancel()).await.unwrap();
    }
    assert_eq!(acked, (0..10).collect());
}

/// Cancelling a consumer that still has deliveries on their way to it costs nothing
/// but that consumer. Eight churners side by side each run 100 cycles of consume, take
/// one, ack, cancel (with more messages waiting, so each consumer is sent more than it
/// takes), while a steady consumer takes and acks one message per cycle: the driver
/// stays on the connection it started with, and every ack of the steady consumer
/// reaches the broker. (lapin's consumer, dropped while active, cancels itself from a
/// task of its own; racing the channel's close, that cancel failed and lapin closed
/// the whole connection, taking the other consumers' unsent acks with it.)
pub async fn cancelling_one_consumer_spares_the_others(ctx: &TestContext) {
    const CHURNERS: i64 = 8;
    const CYCLES: i64 = 100;
    let churned = ctx.declared("cancel-churn").await;
    let steady = ctx.declared("cancel-steady").await;
    for n in 0..CHURNERS * (CYCLES + 2) {
        ctx.publish(&churned, numbered(n)).await;
    }
    let steady_count = CHURNERS * CYCLES;
    for n in 0..steady_count {
        ctx.publish(&steady, numbered(n)).await;
    }
    // Consuming first: a driver may open a connection for its consumers on the first
    // consume (AMQP 0-9-1 does); that one is not the cost this case looks for.
    let mut kept = ctx.consume(&steady, 1).await;
    let before = ctx.driver().connection();
    let churners = (0..CHURNERS).map(|_| async {
        for _ in 0..CYCLES {
            let mut sub = ctx.consume(&churned, 2).await;
            within("ack", next(&mut sub).await.ack()).await.unwrap();
            within("cancel", sub.cancel()).await.unwrap();
        }
    });
    let steady_acks = async {
        let mut acked = HashSet::new();
        for _ in 0..steady_count {
            let d = next(&mut kept).await;
            acked.insert(number_of(&d));
            within("ack", d.ack()).await.unwrap();
        }
        within("cancel", kept.cancel()).await.unwrap();
        acked
    };
    let ((), acked) = futures_util::future::join(
        futures_util::future::join_all(churners).map(|_| ()),
        steady_acks,
    )
    .await;
    assert_eq!(acked, (0..steady_count).collect(), "a steady ack was lost");
    if let (Some(before), Some(after)) = (before, ctx.driver().connection()) {
        assert_eq!(
            after.connections_opened, before.connections_opened,
            "cancelling consumers cost the connection"
        );
    }
    let mut sub = ctx.consume(&steady, 10).await;
    assert_nothing_more(ctx, &steady, &mut sub).await;
    within("cancel", sub.cancel()).await.unwrap();
}

/// Every message arrives with the id it was published with, and no two share one.
pub async fn each_message_keeps_its_own_id(ctx: &TestContext) {
    let q = ctx.declared("ids").await;
    let mut sub = ctx.consume(&q, 100).await;
    let mut published = BTreeMap::new();
    for n in 0..100 {
        let m = numbered(n);
        published.insert(n, m.id.clone());
        ctx.publish(&q, m).await;
    }
    let mut ids = HashSet::new();
    for _ in 0..100 {
        let d = next(&mut sub).await;
        assert_eq!(
            Some(&d.message().id),
            published.get(&number_of(&d)),
            "message {} arrived with another id",
            number_of(&d)
        );
        assert!(
            ids.insert(d.message().id.clone()),
            "duplicate id {}",
            d.message().id
        );
        within("ack", d.ack()).await.unwrap();
    }
    within("cancel", sub.cancel()).await.unwrap();
}

/// Two competing consumers share the work; nothing is delivered twice.
pub async fn competing_consumers_share_without_duplicates(ctx: &TestContext) {
    let q = ctx.declared("competing").await;
    let total = 200;
    let messages: Vec<Message> = (0..total).map(numbered).collect();
    within("publish_batch", ctx.driver().publish_batch(&q, messages))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Neither consumer acks its first delivery before the other has one: a fast one
    // cannot drain the queue alone before the other is even asking, and the check
    // below then holds for any fair driver, however the tasks are scheduled.
    let both_started = Arc::new(tokio::sync::Barrier::new(2));
    let mut subs = Vec::new();
    for _ in 0..2 {
        subs.push(ctx.consume(&q, 5).await);
    }
    let mut workers = Vec::new();
    for (worker, mut sub) in subs.into_iter().enumerate() {
        let tx = tx.clone();
        let both_started = Arc::clone(&both_started);
        workers.push(tokio::spawn(async move {
            let mut first = true;
            while let Some(Ok(d)) = sub.next().await {
                let n = number_of(&d);
                if std::mem::take(&mut first) {
                    within("the other consumer's first delivery", both_started.wait()).await;
                }
                within("ack", d.ack()).await.unwrap();
                if tx.send((worker, n)).is_err() {
                    break;
                }
            }
            sub
        }));
    }
    let mut seen = HashSet::new();
    let mut by_worker = [0u32; 2];
    for _ in 0..total {
        let (worker, n) = within("competing delivery", rx.recv())
            .await
            .expect("workers alive");
        assert!(seen.insert(n), "message {n} delivered twice");
        by_worker[worker] += 1;
    }
    assert!(
        by_worker.iter().all(|n| *n > 0),
        "one consumer got all the work: {by_worker:?}"
    );
    drop(rx);
    for w in workers {
        w.abort();
    }
    assert_eq!(seen.len(), total as usize);
}

/// Eight publishers at once: every message arrives once.
pub async fn eight_concurrent_publishers(ctx: &TestContext) {
    let q = ctx.declared("concurrent").await;
    let mut tasks = Vec::new();
    for p in 0..8 {
        let driver = ctx.driver_arc();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                driver.publish(&q, numbered(p * 100 + i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        within("publisher", t).await.unwrap();
    }
    let mut sub = ctx.consume(&q, 50).await;
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let d = next(&mut sub).await;
        assert!(seen.insert(number_of(&d)));
        within("ack", d.ack()).await.unwrap();
    }
    within("cancel", sub.cancel()).await.unwrap();
}

/// Ten thousand messages through one queue, none lost or doubled.
pub async fn ten_thousand_messages(ctx: &TestContext) {
    let q = ctx.declared("ten-thousand").await;
    let mut sub = ctx.consume(&q, 500).await;
    let driver = ctx.driver_arc();
    let publisher = {
        let q = q.clone();
        tokio::spawn(async move {
            for chunk in (0..10_000).collect::<Vec<i64>>().chunks(500) {
                driver
                    .publish_batch(&q, chunk.iter().copied().map(numbered).collect())
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = vec![false; 10_000];
    for _ in 0..10_000 {
        let d = next(&mut sub).await;
        let n = number_of(&d) as usize;
        assert!(!seen[n], "message {n} delivered twice");
        seen[n] = true;
        within("ack", d.ack()).await.unwrap();
    }
    within("publisher", publisher).await.unwrap();
    assert!(seen.iter().all(|s| *s));
    within("cancel", sub.cancel()).await.unwrap();
}

/// Messages larger than any frame arrive whole: bodies of a megabyte and more, of
/// sizes that end them at other places of the frames each time, and headers of tens
/// of kilobytes (RabbitMQ's frames are 128 KiB, Artemis keeps anything over 100 KiB as
/// a large message, AMQP 1.0's guard follows the body across frames).
pub async fn large_messages_arrive_whole(ctx: &TestContext) {
    let q = ctx.declared("large").await;
    let text = |len: usize, seed: usize| -> String {
        (0..len)
            .map(|i| char::from(b'a' + ((i * 7 + seed) % 26) as u8))
            .collect()
    };
    let sent: Vec<Message> = (0..6)
        .map(|i| {
            let headers =
                Headers::from_pairs([("note", HeaderValue::from(text(20_000 + i * 997, i)))]);
            message(Value::from(text((1 << 20) + i * 40_961, i)), headers)
        })
        .collect();
    for m in &sent {
        ctx.publish(&q, m.clone()).await;
    }
    let mut sub = ctx.consume(&q, 2).await;
    for m in &sent {
        let got = next(&mut sub).await;
        assert_eq!(got.message().id, m.id);
        assert!(
            got.message().decode().unwrap() == m.decode().unwrap(),
            "the body of {} arrived changed",
            m.id
        );
        assert_eq!(got.message().headers.get("note"), m.headers.get("note"));
        within("ack", got.ack()).await.unwrap();
    }
    within("cancel", sub.cancel()).await.unwrap();
}

/// A second ack or release is `INVALID`, never a double settle.
pub async fn second_settlement_is_an_error(ctx: &TestContext) {
    let q = ctx.declared("second-settle").await;
    ctx.publish(&q, numbered(1)).await;
    ctx.publish(&q, numbered(2)).await;
    let mut sub = ctx.consume(&q, 10).await;
    let d = next(&mut sub).await;
    within("ack", d.ack()).await.unwrap();
    assert_eq!(
        within("ack", d.ack()).await.unwrap_err().kind(),
        ErrorKind::Invalid
    );
    assert_eq!(
        within("release", d.release()).await.unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let d2 = next(&mut sub).await;
    assert_eq!(number_of(&d2), 2, "the first message must not come back");
    within("release", d2.release()).await.unwrap();
    assert_eq!(
        within("ack", d2.ack()).await.unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let d3 = next(&mut sub).await;
    assert_eq!(number_of(&d3), 2);
    within("ack", d3.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// A consumer never holds more than `prefetch` unsettled deliveries: with two held,
/// the broker still counts the other three as ready (it hands a consumer what its
/// credit allows as soon as messages are ready, so more credit would show at once).
pub async fn prefetch_bounds_unsettled_deliveries(ctx: &TestContext) {
    let q = ctx.declared("prefetch").await;
    for n in 0..5 {
        ctx.publish(&q, numbered(n)).await;
    }
    eventually_info(ctx, &q, |i| i.ready == Some(5)).await;
    let mut sub = ctx.consume(&q, 2).await;
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    let info = eventually_info(ctx, &q, |i| i.ready.is_some_and(|r| r <= 3)).await;
    assert_eq!(
        info.ready,
        Some(3),
        "the driver took more than its prefetch of 2"
    );
    within("ack", a.ack()).await.unwrap();
    let c = next(&mut sub).await;
    within("ack", b.ack()).await.unwrap();
    within("ack", c.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// A lone ack frees its place in the prefetch while the other deliveries are held:
/// with a prefetch of 4 and all 4 held, the fifth message waits in the queue, and
/// acking one of the 4 brings it. A driver that gathers acks into rounds must send a
/// round that stays short, or a consumer whose other handlers are slow stalls.
pub async fn an_ack_makes_room_while_others_are_held(ctx: &TestContext) {
    let q = ctx.declared("prefetch-room").await;
    for n in 0..5 {
        ctx.publish(&q, numbered(n)).await;
    }
    eventually_info(ctx, &q, |i| i.ready == Some(5)).await;
    let mut sub = ctx.consume(&q, 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut sub).await);
    }
    let info = eventually_info(ctx, &q, |i| i.ready.is_some_and(|r| r <= 1)).await;
    assert_eq!(info.ready, Some(1), "the fifth message was not held back");
    within("ack", held.remove(0).ack()).await.unwrap();
    let fifth = next(&mut sub).await;
    assert_eq!(number_of(&fifth), 4);
    held.push(fifth);
    for d in held {
        within("ack", d.ack()).await.unwrap();
    }
    within("cancel", sub.cancel()).await.unwrap();
}

/// Higher priorities are delivered first where the queue has `max_priority`.
pub async fn priority_orders_delivery(ctx: &TestContext) {
    let q = ctx.declare(ctx.spec("priority").with_max_priority(9)).await;
    for (n, p) in [(1, "low"), (2, "normal"), (3, "high"), (4, "low")] {
        let headers = Headers::from_pairs([("priority", HeaderValue::from(p))]);
        ctx.publish(&q, message(Value::map([("n", Value::Int(n))]), headers))
            .await;
    }
    let mut sub = ctx.consume(&q, 1).await;
    let mut order = Vec::new();
    for _ in 0..4 {
        let d = next(&mut sub).await;
        order.push(number_of(&d));
        within("ack", d.ack()).await.unwrap();
    }
    assert_eq!(order, vec![3, 2, 1, 4]);
    within("cancel", sub.cancel()).await.unwrap();
}

/// A delayed message arrives no earlier than its delay; a driver without the
/// capability refuses the header with `INVALID` naming itself.
pub async fn delay_is_honoured_or_refused(ctx: &TestContext) {
    let q = ctx.declared("delay").await;
    let delayed = message(
        Value::from("later"),
        Headers::from_pairs([("delay", HeaderValue::Int(400))]),
    );
    if !ctx.caps().delay {
        let err = within("publish", ctx.driver().publish(&q, delayed))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(err.message().contains(ctx.driver().name()), "{err}");
        return;
    }
    let started = tokio::time::Instant::now();
    ctx.publish(&q, delayed).await;
    ctx.publish(&q, numbered(1)).await;
    let mut sub = ctx.consume(&q, 10).await;
    let first = next(&mut sub).await;
    assert_eq!(number_of(&first), 1, "the undelayed message comes first");
    within("ack", first.ack()).await.unwrap();
    let later = next(&mut sub).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "delivered after {:?}",
        started.elapsed()
    );
    assert_eq!(later.message().decode().unwrap(), Value::from("later"));
    within("ack", later.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// A delayed message's time to live counts from the end of its delay: a message
/// delayed past its `ttl` (a retry copy of a message published with one, whose
/// backoff is longer) is delivered, not expired while it waited. Counted from the
/// publish, the copy was lost: confirmed, its original acked, then dropped unseen.
pub async fn a_delayed_messages_ttl_counts_from_the_end_of_its_delay(ctx: &TestContext) {
    let q = ctx.declared("delay-ttl").await;
    let delay = Duration::from_millis(800);
    let delayed = message(
        Value::from("delayed past its ttl"),
        Headers::from_pairs([
            ("delay", HeaderValue::Int(800)),
            ("ttl", HeaderValue::Int(200)),
        ]),
    );
    let started = tokio::time::Instant::now();
    ctx.publish(&q, delayed).await;
    let mut sub = ctx.consume(&q, 10).await;
    let got = next(&mut sub).await;
    assert!(
        started.elapsed() >= delay,
        "delivered after {:?}",
        started.elapsed()
    );
    assert_eq!(
        got.message().decode().unwrap(),
        Value::from("delayed past its ttl")
    );
    within("ack", got.ack()).await.unwrap();
    within("cancel", sub.cancel()).await.unwrap();
}

/// At `max_length` ready messages a queue refuses more (the publish fails) and drops
/// none of what it holds.
pub async fn max_length_refuses_and_keeps_what_it_holds(ctx: &TestContext) {
    let q = ctx.declare(ctx.spec("max-length").with_max_length(3)).await;
    for n in 0..3 {
        ctx.publish(&q, numbered(n)).await;
    }
    let refused = within(
        "a publish to a full queue",
        ctx.driver().publish(&q, numbered(3)),
    )
    .await;
    assert!(refused.is_err(), "a full queue took a fourth message");
    let mut sub = ctx.consume(&q, 10).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut sub).await;
        got.push(number_of(&d));
        within("ack", d.ack()).await.unwrap();
    }
    assert_eq!(got, vec![0, 1, 2], "a full queue dropped what it held");
    assert_nothing_more(ctx, &q, &mut sub).await;
    within("cancel", sub.cancel()).await.unwrap();
}

/// A message older than the queue's `message_ttl` is never delivered.
pub async fn message_ttl_expires_old_messages(ctx: &TestContext) {
    let ttl = Duration::from_millis(300);
    let q = ctx.declare(ctx.spec("ttl").with_message_ttl(ttl)).await;
    ctx.publish(&q, numbered(1)).await;
    // Expiry is about time: let the first message grow older than the TTL.
    tokio::time::sleep(ttl * 2).await;
    ctx.publish(&q, numbered(2)).await;
    let mut sub = ctx.consume(&q, 10).await;
    let d = next(&mut sub).await;
    assert_eq!(number_of(&d), 2, "an expired message was delivered");
    within("ack", d.ack()).await.unwrap();
    assert_nothing_more(ctx, &q, &mut sub).await;
    within("cancel", sub.cancel()).await.unwrap();
}

/// A capability a contract needs: its name, and whether a backend has it.
type Need = (&'static str, fn(&Capabilities) -> bool);

/// One contract: its name, the capability it needs (if any), and its body.
struct Contract {
    name: &'static str,
    needs: Option<Need>,
    run: for<'a> fn(&'a TestContext) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
}

macro_rules! needs {
    () => {
        None
    };
    ($capability:ident) => {
        Some((stringify!($capability), |c: &Capabilities| c.$capability))
    };
}

macro_rules! contracts {
    ($($name:ident $(needs $capability:ident)?),* $(,)?) => {
        &[$(Contract {
            name: stringify!($name),
            needs: needs!($($capability)?),
            run: |ctx| Box::pin($name(ctx)),
        }),*]
    };
}

/// Every contract, with the capability each needs.
const CONTRACTS: &[Contract] = contracts![
    declare_twice_is_fine,
    round_trip_keeps_id_body_and_headers,
    every_value_type_round_trips,
    three_messages_are_delivered_exactly_once,
    release_redelivers_the_same_message,
    dropping_a_delivery_releases_it,
    undeclared_queue_is_not_found,
    batch_publish_delivers_all,
    neutral_headers_round_trip,
    attempts_header_round_trips,
    queues_are_isolated,
    info_counts_ready needs info_ready,
    info_counts_in_flight needs info_in_flight,
    an_ack_settles_while_others_are_held needs info_in_flight,
    info_counts_consumers needs info_consumers,
    cancel_stops_delivery_and_returns_unsettled,
    publish_before_any_consumer,
    new_consumer_after_cancel,
    acks_made_right_before_cancel_are_kept,
    rapid_consume_cancel_cycles,
    cancelling_one_consumer_spares_the_others,
    each_message_keeps_its_own_id,
    competing_consumers_share_without_duplicates,
    eight_concurrent_publishers,
    ten_thousand_messages,
    large_messages_arrive_whole,
    second_settlement_is_an_error,
    prefetch_bounds_unsettled_deliveries needs info_ready,
    an_ack_makes_room_while_others_are_held needs info_ready,
    priority_orders_delivery needs priority,
    delay_is_honoured_or_refused,
    a_delayed_messages_ttl_counts_from_the_end_of_its_delay needs delay,
    max_length_refuses_and_keeps_what_it_holds needs max_length,
    message_ttl_expires_old_messages needs message_ttl,
];

/// Every contract against every backend: one test each, `<backend>::<contract>`.
pub fn trials(backends: &[Backend]) -> Vec<libtest_mimic::Trial> {
    let mut trials: Vec<Trial> = Vec::new();
    for backend in backends {
        for contract in CONTRACTS {
            let lacks = contract
                .needs
                .filter(|(_, has)| !has(&backend.capabilities()))
                .map(|(name, _)| name);
            let run = contract.run;
            trials.push(backend.trial(contract.name, lacks, move |ctx| async move {
                run(&ctx).await;
            }));
        }
    }
    trials
}
