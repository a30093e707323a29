//! Behaviour against the shared RabbitMQ on 127.0.0.1:5672 beyond the conformance
//! suite: credentials in real failures, URL forms and vhosts, lists of nodes, full
//! queues, conflicting redeclares, unroutable publishes, delays, quorum queues.

mod common;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use queue_amqp091::{Amqp091Config, Amqp091Driver, X_DELIVERY_COUNT};
use queue_core::retry::{Disposition, Exhausted, FailurePath, RetryPolicy};
use queue_core::{
    Backoff, Codec, Driver, ErrorKind, HeaderValue, Headers, Message, QueueId, QueueSpec,
    QueueType, Value,
};
use queue_fixtures::proxy::BrokerProxy;
use queue_fixtures::rabbitmq::SharedVhost;
use queue_testkit::{everything_said, next, number_of, within};

fn numbered(n: i64) -> Message {
    Message::encode(
        &Value::map([("n", Value::Int(n))]),
        Headers::new(),
        Codec::Json,
    )
    .unwrap()
}

async fn wrong_password_is_refused_without_showing_it() {
    let secret = "not-the-guest-password-7f3a";
    let err = Amqp091Driver::connect(Amqp091Config::new(format!(
        "amqp://guest:{secret}@127.0.0.1:5672/%2f"
    )))
    .await
    .unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(secret), "password leaked: {said}");
    assert!(said.contains("guest:***@127.0.0.1"), "{said}");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{said}");
    assert!(!err.retryable());
}

async fn refused_port_fails_retryable_without_showing_the_password() {
    // A port nothing listens on: bind one, learn it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "s3cret-for-a-closed-port";
    let mut config = Amqp091Config::new(format!("amqp://app:{secret}@127.0.0.1:{port}/%2f"));
    config.connection_timeout = Duration::from_secs(3);
    let err = Amqp091Driver::connect(config).await.unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(secret), "password leaked: {said}");
    assert!(
        said.contains(&format!("app:***@127.0.0.1:{port}")),
        "{said}"
    );
    assert_eq!(err.kind(), ErrorKind::Internal, "{said}");
    assert!(err.retryable());
}

async fn a_full_queue_nacks_and_publish_fails_internal_retryable() {
    let driver = common::rabbit().await;
    let name = common::unique("full");
    let id = QueueId::new("test", &name).unwrap();
    let spec = QueueSpec::new(id.clone())
        .with_name(&name)
        .with_durable(false)
        .with_max_length(3);
    driver.declare(&spec).await.unwrap();
    for n in 0..3 {
        driver.publish(&id, numbered(n)).await.unwrap();
    }
    let err = driver.publish(&id, numbered(3)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.retryable(), "{err}");
    assert!(err.message().contains("nack"), "{err}");
    // A batch past the limit fails too, and says how far it got.
    let err = driver
        .publish_batch(&id, (10..15).map(numbered).collect())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert_eq!(driver.info(&id).await.unwrap().ready, Some(3));
    // After making room, publishing works again on the same driver.
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let d = next(&mut sub).await;
    d.ack().await.unwrap();
    sub.cancel().await.unwrap();
    driver.publish(&id, numbered(4)).await.unwrap();
    delete(&name).await;
    driver.close().await.unwrap();
}

/// Publishes from several threads on the driver's one publishing channel: lapin gives
/// each its delivery tag before it copies the body into frames, so a large body's
/// frames could reach the broker after a small one's with a later tag, and each was
/// told the other's confirm: a message the full queue refused was told stored, one it
/// stored told refused (review). A queue kept nearly full by a consumer refuses some.
/// (The race is narrow: this test did not catch it here without the fix; the
/// review's run, two Lua processes publishing 1 MB and small bodies through
/// `queue-runtime run`, did at every run, and does not with it: docs/reliability.md.)
async fn publishes_from_several_threads_are_each_told_their_own_confirm() {
    let driver = Arc::new(common::rabbit().await);
    let name = common::unique("in-order");
    let id = QueueId::new("test", &name).unwrap();
    let spec = QueueSpec::new(id.clone())
        .with_name(&name)
        .with_durable(false)
        .with_max_length(3);
    driver.declare(&spec).await.unwrap();
    let publisher = |prefix: &'static str, count: usize, body_bytes: usize| {
        let (driver, id) = (Arc::clone(&driver), id.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut told = Vec::new();
                for n in 0..count {
                    let body = Value::String("x".repeat(body_bytes));
                    let mut message = Message::encode(&body, Headers::new(), Codec::Json).unwrap();
                    message.id = format!("{prefix}-{n}");
                    let stored = driver.publish(&id, message.clone()).await.is_ok();
                    told.push((message.id, stored));
                }
                told
            })
        })
    };
    let publishers = [
        publisher("big", 60, 1_000_000),
        publisher("small", 1_000, 10),
        publisher("tiny", 1_000, 10),
        publisher("wee", 1_000, 10),
    ];
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let mut consumed = std::collections::HashSet::new();
    let finished = || publishers.iter().all(|p| p.is_finished());
    let mut quiet = 0;
    while quiet < 10 {
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Ok(delivery))) => {
                consumed.insert(delivery.message().id.clone());
                delivery.ack().await.unwrap();
                quiet = 0;
            }
            Ok(other) => panic!("the subscription ended: {:?}", other.map(|r| r.err())),
            Err(_) if finished() => quiet += 1,
            Err(_) => {}
        }
    }
    sub.cancel().await.unwrap();
    let (mut stored, mut refused) = (0, 0);
    for publisher in publishers {
        for (message, told_stored) in publisher.join().unwrap() {
            match told_stored {
                true => {
                    stored += 1;
                    assert!(
                        consumed.contains(&message),
                        "{message} was told stored, and never came"
                    );
                }
                false => {
                    refused += 1;
                    assert!(
                        !consumed.contains(&message),
                        "{message} was told refused, and came"
                    );
                }
            }
        }
    }
    println!("stored {stored}, refused {refused}");
    assert!(
        refused > 0,
        "the queue never refused a publish: the test proves nothing"
    );
    delete(&name).await;
    driver.close().await.unwrap();
}

/// A delayed message (a retry copy waiting out its backoff) for a classic queue with
/// `max_length` waits while the queue is full, in its delay queue. That queue
/// dead-letters it into the target when the delay ends; RabbitMQ dropped what a
/// classic delay queue dead-lettered into a full queue, so the copy, confirmed and
/// its original acked, was lost.
/// A content header must fit in one frame: RabbitMQ ends the whole connection on a
/// larger one (`FRAME_ERROR`), failing every publish and consumer on it, and a
/// dead-letter copy grown past the limit by its reason did it again at every
/// redelivery (review). The publish is refused as `INVALID`, and the connection stays.
async fn headers_past_frame_max_are_refused_and_cost_no_connection() {
    let driver = Amqp091Driver::connect(Amqp091Config::new(format!(
        "{}?frame_max=4096",
        common::URL
    )))
    .await
    .unwrap();
    let id = declare_transient(&driver, &common::unique("frame-max")).await;
    let opened = driver.connection().expect("a report").connections_opened;
    let mut headers = Headers::new();
    headers.insert("note", "x".repeat(5_000));
    let oversized = Message::encode(&Value::Int(1), headers, Codec::Json).unwrap();
    let err = driver.publish(&id, oversized).await.unwrap_err();
    let said = everything_said(&err);
    assert_eq!(err.kind(), ErrorKind::Invalid, "{said}");
    assert!(!err.retryable(), "{said}");
    assert!(
        said.contains("frame_max") && said.contains("4096"),
        "{said}"
    );
    // Headers up to the frame's room still go.
    let mut headers = Headers::new();
    headers.insert("note", "x".repeat(3_000));
    let fits = Message::encode(&Value::Int(2), headers, Codec::Json).unwrap();
    driver.publish(&id, fits).await.unwrap();
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.message().decode().unwrap(), Value::Int(2));
    delivery.ack().await.unwrap();
    assert_eq!(
        driver.connection().expect("a report").connections_opened,
        opened,
        "the oversized publish cost the connection"
    );
}

/// A user who may not write gets `PERMISSION_DENIED`, not retryable: every publish
/// goes through the default exchange, so no retry can succeed. It was a retryable
/// `INTERNAL`, and a handler's publishes went round their retries (review).
async fn a_publish_the_users_permissions_refuse_is_permission_denied() {
    let name = common::unique("no-write");
    let user =
        tokio::task::block_in_place(|| queue_fixtures::rabbitmq::SharedUser::add(&name, "pw"))
            .expect("a user");
    tokio::task::block_in_place(|| user.permit(".*", "^$", ".*")).expect("permissions");
    let driver = Amqp091Driver::connect(Amqp091Config::new(format!(
        "amqp://{name}:pw@127.0.0.1:5672/%2f"
    )))
    .await
    .unwrap();
    let id = declare_transient(&driver, &common::unique("refused")).await;
    for n in 0..2 {
        let err = driver.publish(&id, numbered(n)).await.unwrap_err();
        let said = everything_said(&err);
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{said}");
        assert!(!err.retryable(), "{said}");
        assert!(said.contains("ACCESS_REFUSED"), "{said}");
    }
}

async fn a_delayed_message_for_a_full_queue_waits_for_room() {
    let driver = common::rabbit().await;
    let name = common::unique("full-delayed");
    let id = QueueId::new("test", &name).unwrap();
    let spec = QueueSpec::new(id.clone())
        .with_name(&name)
        .with_durable(false)
        .with_max_length(1);
    driver.declare(&spec).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    let delayed = Message::encode(
        &Value::from("later"),
        Headers::from_pairs([("delay", HeaderValue::Int(200))]),
        Codec::Json,
    )
    .unwrap();
    driver.publish(&id, delayed.clone()).await.unwrap();
    // Its delay ends while the queue is full. Nothing signals RabbitMQ's attempts to
    // move it (and a quorum queue no longer counts a message waiting to be
    // dead-lettered as ready): a window of several delays, what the test measures.
    let delay_queue = format!("{name}.delay.200");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = driver.info(&id).await.unwrap();
    assert_eq!(
        info.ready,
        Some(1),
        "the full queue took more than its limit"
    );
    // The delay queue still holds it, waiting to dead-letter it (RabbitMQ tries again
    // every `dead_letter_worker_publisher_confirm_timeout`, minutes by default, so
    // its arrival once there is room is not waited for here).
    // A quorum queue's count is published every tick (5 s), so it is read until it
    // says 1 (a classic queue's, read from the queue itself, said 0: dropped).
    let held_by_delay_queue = || {
        list_queues(&["name", "messages"])
            .lines()
            .find(|l| l.split_whitespace().next() == Some(delay_queue.as_str()))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
    };
    let held = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if held_by_delay_queue().as_deref() == Some("1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    assert!(
        held.is_ok(),
        "the delayed message was dropped: its delay queue holds {:?}",
        held_by_delay_queue()
    );
    delete(&delay_queue).await;
    delete(&name).await;
    driver.close().await.unwrap();
}

async fn redeclaring_with_other_arguments_is_a_clear_error_not_a_dead_driver() {
    let driver = common::rabbit().await;
    let name = common::unique("redeclare");
    let id = QueueId::new("test", &name).unwrap();
    let spec = QueueSpec::new(id.clone())
        .with_name(&name)
        .with_durable(false);
    driver.declare(&spec).await.unwrap();
    let err = driver
        .declare(&spec.clone().with_max_priority(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(err.message().contains(&name), "{err}");
    assert!(err.message().contains("x-max-priority"), "{err}");
    // The driver (and the original registration) still work.
    driver.publish(&id, numbered(1)).await.unwrap();
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        d.message().decode().unwrap(),
        Value::map([("n", Value::Int(1))])
    );
    d.ack().await.unwrap();
    sub.cancel().await.unwrap();
    delete(&name).await;
    driver.close().await.unwrap();
}

/// A queue deleted on the broker (by an operator, or to empty it) that nobody
/// consumes: publishing to it was `NOT_FOUND` until a reconnect, for as long as the
/// driver lived, and a failed message whose dead-letter queue it was went back to its
/// queue at every attempt. The first publish that comes back declares it again, as
/// it was declared, and fails retryable, saying so; the next is stored. Where it
/// cannot be declared again, publishing stays `NOT_FOUND`, saying why.
async fn publishing_to_a_queue_deleted_on_the_broker_declares_it_again() {
    let driver = common::rabbit().await;
    let (name, id) = declared_transient(&driver, "deleted").await;
    delete(&name).await;
    assert_eq!(
        driver.info(&id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let err = driver.publish(&id, numbered(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.retryable(), "{err}");
    assert!(err.message().contains("declared again"), "{err}");
    driver.publish(&id, numbered(2)).await.unwrap();
    let info = driver.info(&id).await.unwrap();
    assert_eq!(info.ready, Some(1), "only the second was stored: {info:?}");
    delete(&name).await;
    driver.close().await.unwrap();

    let (_vhost, driver, gone, _) = with_a_queue_gone_for_good("deleted-for-good", &[]).await;
    for _ in 0..2 {
        let err = driver.publish(&gone, numbered(3)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(err.message().contains("declaring it again failed"), "{err}");
    }
    driver.close().await.unwrap();
}

/// Consuming a queue deleted on the broker since it was declared failed `NOT_FOUND`,
/// where a running subscription and a publish declare it again (review): the
/// subscription declares it again, and what is published next is delivered.
async fn consuming_a_queue_deleted_on_the_broker_declares_it_again() {
    let driver = common::rabbit().await;
    let (name, id) = declared_transient(&driver, "consume-deleted").await;
    delete(&name).await;
    let mut sub = driver
        .consume(&id, queue_core::ConsumeOptions { prefetch: 1 })
        .await
        .expect("a subscription to a queue deleted on the broker");
    assert_eq!(driver.info(&id).await.unwrap().ready, Some(0));
    driver.publish(&id, numbered(1)).await.unwrap();
    let d = queue_testkit::next(&mut sub).await;
    assert_eq!(number_of(&d), 1);
    d.ack().await.unwrap();
    sub.cancel().await.unwrap();
    delete(&name).await;
    driver.close().await.unwrap();
}

/// A queue's dead-letter queue deleted on the broker: the failed message went back to
/// its queue at every attempt, a WARN each time, until a reconnect. Its first
/// dead-letter copy comes back and declares the dead-letter queue again, the message
/// goes back to its queue once, and its next failure dead-letters it.
async fn a_dead_letter_queue_deleted_on_the_broker_is_declared_again_by_its_dead_letters() {
    let driver = Arc::new(common::rabbit().await);
    let (name, id) = declared_transient(&driver, "dlq-source").await;
    let (dlq_name, dlq) = declared_transient(&driver, "dlq-deleted").await;
    delete(&dlq_name).await;
    driver.publish(&id, numbered(7)).await.unwrap();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let path = FailurePath {
        queue: id.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 1,
            backoff: Backoff::new(Duration::from_millis(10), 2.0, Duration::from_millis(10)),
        },
        exhausted: Exhausted::DeadLetter(dlq.clone(), driver.clone()),
        is_dead_letter_queue: false,
        stop,
    };
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let first = next(&mut sub).await;
    assert_eq!(
        path.fail(&first, "boom").await.unwrap(),
        Disposition::Returned
    );
    let again = next(&mut sub).await;
    assert_eq!(number_of(&again), 7);
    assert_eq!(
        path.fail(&again, "boom").await.unwrap(),
        Disposition::DeadLettered
    );
    assert_eq!(driver.info(&dlq).await.unwrap().ready, Some(1));
    sub.cancel().await.unwrap();
    delete(&name).await;
    delete(&dlq_name).await;
    driver.close().await.unwrap();
}

/// A `basic.return` carries no delivery tag: lapin hands each to whichever confirm it
/// completes next, and completes the confirms of one `multiple` ack in no set order.
/// Publishes to a deleted queue sent in turns with publishes to live ones (a classic
/// and a quorum queue, whose confirms come at other times) were then reported
/// stored, and lost, while stored ones were reported returned. The driver pairs
/// returns with publishes by message id: none to the deleted queue is `Ok`, every
/// message reported stored is in its queue, and none reported returned is; one whose
/// pairing cannot be told is a retryable error and may be either.
async fn returns_are_paired_with_their_own_publishes() {
    use std::collections::BTreeSet;
    const ROUNDS: i64 = 8;
    const PER_QUEUE: i64 = 300;
    let (_vhost, driver, gone, live) =
        with_a_queue_gone_for_good("returned", &[QueueType::Classic, QueueType::Quorum]).await;
    let (classic, quorum) = (live[0].clone(), live[1].clone());
    // Per live queue: the numbers reported stored, and reported returned.
    let mut stored = [BTreeSet::new(), BTreeSet::new()];
    let mut returned = [BTreeSet::new(), BTreeSet::new()];
    let mut uncertain = 0;
    for round in 0..ROUNDS {
        // Sent in turns, so that one ack covers publishes to all three.
        let targets = [&gone, &classic, &quorum];
        let publishes = (0..PER_QUEUE).flat_map(|i| {
            targets.map(|id| {
                let (driver, n) = (&driver, round * PER_QUEUE + i);
                async move { (id, n, driver.publish(id, numbered(n)).await) }
            })
        });
        let outcomes = within(
            "three queues' publishes",
            futures_util::future::join_all(publishes),
        )
        .await;
        for (id, n, outcome) in outcomes {
            let live = [&classic, &quorum].iter().position(|q| *q == id);
            match (live, outcome) {
                (None, Ok(())) => panic!("publish {n} to a deleted queue was Ok"),
                // A return taken for a live queue's publish would declare that queue
                // again, and say so.
                (_, Err(e))
                    if e.is(ErrorKind::NotFound) || e.message().contains("declared again") =>
                {
                    if let Some(q) = live {
                        returned[q].insert(n);
                    }
                }
                (_, Err(e)) => {
                    assert!(e.retryable(), "{e}");
                    uncertain += 1;
                }
                (Some(q), Ok(())) => {
                    stored[q].insert(n);
                }
            }
        }
    }
    println!("publishes whose pairing could not be told: {uncertain}");
    for (q, id) in [&classic, &quorum].into_iter().enumerate() {
        let held = driver.info(id).await.unwrap().ready.unwrap();
        let mut sub = driver.consume(id, Default::default()).await.unwrap();
        let mut numbers = BTreeSet::new();
        for _ in 0..held {
            let delivery = next(&mut sub).await;
            numbers.insert(number_of(&delivery));
            delivery.ack().await.unwrap();
        }
        sub.cancel().await.unwrap();
        assert!(!stored[q].is_empty());
        let lost: Vec<_> = stored[q].difference(&numbers).collect();
        assert!(lost.is_empty(), "{id}: reported stored, not held: {lost:?}");
        let held_returned: Vec<_> = returned[q].intersection(&numbers).collect();
        assert!(
            held_returned.is_empty(),
            "{id}: reported returned, held: {held_returned:?}"
        );
    }
    driver.close().await.unwrap();
}

/// Two publishes in flight may share a message id (a publisher's own `message_id`):
/// a return names only the id, so it may be either's. One to a deleted queue was
/// reported stored when the other took its return (review). Neither is ever told
/// anything certain that is false: the returned one is never `Ok`, the stored one
/// never `NOT_FOUND`.
async fn publishes_sharing_a_message_id_are_never_told_a_false_outcome() {
    const ROUNDS: i64 = 30;
    let (_vhost, driver, gone, live) =
        with_a_queue_gone_for_good("returned-twin", &[QueueType::Classic]).await;
    let live = live[0].clone();
    let (mut stored, mut uncertain) = (0, 0);
    for round in 0..ROUNDS {
        let twin = |n: i64| {
            let mut message = numbered(n);
            message.id = format!("twin-{round}");
            message
        };
        let (to_gone, to_live) = within(
            "two publishes of one message id",
            futures_util::future::join(
                driver.publish(&gone, twin(2 * round)),
                driver.publish(&live, twin(2 * round + 1)),
            ),
        )
        .await;
        let err = to_gone.expect_err("a publish to a deleted queue was Ok");
        assert!(err.is(ErrorKind::NotFound) || err.retryable(), "{err}");
        match to_live {
            Ok(()) => stored += 1,
            Err(e) => {
                assert!(
                    !e.is(ErrorKind::NotFound) && !e.message().contains("declared again"),
                    "a stored publish was told it came back: {e}"
                );
                assert!(e.retryable(), "{e}");
                uncertain += 1;
            }
        }
    }
    println!("stored {stored}, uncertain {uncertain}");
    // Everything told stored is there (the uncertain ones may be too).
    let held = driver.info(&live).await.unwrap().ready.unwrap();
    assert!(held >= stored, "held {held}, told stored {stored}");
    // Where no return is read, a shared id costs nothing: a batch of one message
    // twice is stored, said so (each was told uncertain until the review).
    let twice = || {
        let mut message = numbered(0);
        message.id = "twice".to_string();
        message
    };
    within(
        "a batch of one message twice",
        driver.publish_batch(&live, vec![twice(), twice()]),
    )
    .await
    .expect("stored, and said so");
    driver.close().await.unwrap();
}

/// A driver on a vhost of its own, where the queue it declared (the `QueueId`) was
/// deleted and stays so: the vhost's queue limit refuses to declare it again, so every
/// publish to it comes back unroutable, as the returns' tests need (the driver
/// declares a deleted queue again at its first return otherwise). The `live` queues,
/// of these types, are declared before.
async fn with_a_queue_gone_for_good(
    label: &str,
    live: &[QueueType],
) -> (SharedVhost, Amqp091Driver, QueueId, Vec<QueueId>) {
    let vhost = tokio::task::block_in_place(|| SharedVhost::add(&common::unique(label)))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.name());
    let driver = Amqp091Driver::connect(Amqp091Config::new(url))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (n, queue_type) in live.iter().enumerate() {
        let id = QueueId::new("test", &format!("live-{n}")).unwrap();
        let spec = QueueSpec::new(id.clone()).with_queue_type(*queue_type);
        driver.declare(&spec).await.unwrap();
        ids.push(id);
    }
    let gone = QueueId::new("test", "gone").unwrap();
    driver.declare(&QueueSpec::new(gone.clone())).await.unwrap();
    let max = u32::try_from(live.len()).unwrap();
    tokio::task::block_in_place(|| {
        vhost.delete_queue("test:gone")?;
        vhost.limit_queues(max)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (vhost, driver, gone, ids)
}

/// A classic queue counts no deliveries, so its `x-delivery-count` is only ever a
/// publisher's: one another client set (a shovel copying it from a quorum queue) was
/// read as the broker's on any redelivery, and the runtime's guard dead-lettered the
/// message (or dropped it) without running its handler (review).
async fn a_classic_queues_delivery_count_is_a_publishers_header() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::AMQPValue;
    let driver = common::rabbit().await;
    let (name, id) = declared_transient(&driver, "forged-count").await;
    let conn = lapin::Connection::connect(common::URL, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(10));
    let confirm = ch
        .basic_publish(
            "".into(),
            name.as_str().into(),
            BasicPublishOptions::default(),
            b"{\"n\": 1}",
            lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .unwrap();
    drop(confirm);
    let _ = conn.close(200, "OK".into()).await;
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let first = next(&mut sub).await;
    first.release().await.unwrap();
    let again = next(&mut sub).await;
    assert!(
        !again.message().headers.contains(X_DELIVERY_COUNT),
        "{:?}",
        again.message().headers
    );
    again.ack().await.unwrap();
    delete(&name).await;
    driver.close().await.unwrap();
}

async fn delayed_messages_wait_in_an_expiring_delay_queue_and_arrive_clean() {
    let driver = common::rabbit().await;
    let (name, id) = declared_transient(&driver, "delay").await;
    let headers = Headers::from_pairs([
        ("delay", HeaderValue::Int(700)),
        ("tenant", HeaderValue::from("acme")),
    ]);
    let sent = Message::encode(&Value::from("later"), headers, Codec::Json).unwrap();
    let started = tokio::time::Instant::now();
    driver.publish(&id, sent.clone()).await.unwrap();
    let info = driver.info(&id).await.unwrap();
    assert_eq!(info.delayed, Some(1), "{info:?}");
    assert_eq!(info.ready, Some(0), "{info:?}");
    // The delay queue exists with an expiry (a passive declare finds it).
    let conn = lapin::Connection::connect(common::URL, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        format!("{name}.delay.700").as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(got.message().id, sent.id);
    assert_eq!(
        got.message().headers,
        sent.headers,
        "x-death and friends stay hidden"
    );
    got.ack().await.unwrap();
    sub.cancel().await.unwrap();
    ch.queue_delete(
        format!("{name}.delay.700").as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    delete(&name).await;
    driver.close().await.unwrap();
}

async fn the_factory_validates_without_connecting_and_creates_a_driver() {
    use queue_core::DriverFactory;
    let factory = queue_core::Factory::<queue_amqp091::Amqp091Config>::new();
    assert_eq!(factory.kind(), "queue.driver.amqp");
    // A port nothing listens on validates fine: validation never connects.
    factory
        .validate(&serde_json::json!({"url": "amqp://u:p@127.0.0.1:1/%2f", "confirm_window": 10}))
        .unwrap();
    let err = factory
        .validate(&serde_json::json!({"url": "amqp://127.0.0.1", "bogus": 1}))
        .unwrap_err();
    assert!(err.message().contains("bogus"), "{err}");
    let driver = factory
        .create(serde_json::json!({"url": common::URL, "connection_name": "amqp091-factory-test"}))
        .await
        .unwrap();
    assert_eq!(driver.name(), "amqp");
    driver.close().await.unwrap();
}

/// A port nothing listens on: bind one, learn it, let it go.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn the_default_vhost_url_forms_all_connect() {
    for url in [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqp://guest:guest@127.0.0.1:5672",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "amqp://guest:guest@127.0.0.1:5672/%2F",
    ] {
        let driver = Amqp091Driver::connect(Amqp091Config::new(url))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let name = common::unique("vhost-form");
        let id = QueueId::new("test", &name).unwrap();
        let spec = QueueSpec::new(id.clone())
            .with_name(&name)
            .with_durable(false);
        driver.declare(&spec).await.unwrap();
        driver.publish(&id, numbered(1)).await.unwrap();
        assert_eq!(driver.info(&id).await.unwrap().ready, Some(1), "{url}");
        delete(&name).await;
        driver.close().await.unwrap();
    }
}

async fn a_missing_vhost_is_not_found_and_named() {
    let vhost = common::unique("no-such-vhost");
    let err = Amqp091Driver::connect(Amqp091Config::new(format!(
        "amqp://guest:guest@127.0.0.1:5672/{vhost}"
    )))
    .await
    .unwrap_err();
    let said = everything_said(&err);
    assert_eq!(err.kind(), ErrorKind::NotFound, "{said}");
    assert!(!err.retryable(), "{said}");
    assert!(
        err.message()
            .contains(&format!("vhost \"{vhost}\" not found")),
        "{err}"
    );
    assert!(said.contains("guest:***@127.0.0.1:5672"), "{said}");
    assert!(!said.contains("guest:guest"), "password shown: {said}");
    // The `vhost` field overrides the URL's, and is named the same way.
    let mut config = Amqp091Config::new("amqp://guest:guest@127.0.0.1:5672/");
    config.vhost = Some(vhost.clone());
    let err = Amqp091Driver::connect(config).await.unwrap_err();
    assert!(
        err.message()
            .contains(&format!("vhost \"{vhost}\" not found")),
        "{err}"
    );
}

async fn a_list_of_nodes_connects_to_the_first_that_answers() {
    let dead = closed_port();
    let secret = "list-secret-51d";
    let mut config = Amqp091Config::cluster([
        format!("amqp://guest:{secret}@127.0.0.1:{dead}/"),
        "amqp://guest:guest@127.0.0.1:5672/".to_string(),
    ]);
    config.connection_timeout = Duration::from_secs(3);
    let driver = Amqp091Driver::connect(config).await.unwrap();
    let report = driver.connection().unwrap();
    assert_eq!(
        report.node, "amqp://guest:***@127.0.0.1:5672/",
        "{report:?}"
    );
    assert!(report.connected);
    assert!(!format!("{driver:?}").contains(secret));
    driver.close().await.unwrap();

    // None answers: one retryable error naming every node, no password.
    let other = closed_port();
    let mut config = Amqp091Config::cluster([
        format!("amqp://guest:{secret}@127.0.0.1:{dead}/"),
        format!("amqp://guest:{secret}@127.0.0.1:{other}/"),
    ]);
    config.connection_timeout = Duration::from_secs(3);
    let err = Amqp091Driver::connect(config).await.unwrap_err();
    let said = everything_said(&err);
    assert_eq!(err.kind(), ErrorKind::Internal, "{said}");
    assert!(err.retryable(), "{said}");
    assert!(!said.contains(secret), "password leaked: {said}");
    for port in [dead, other] {
        assert!(
            err.message()
                .contains(&format!("guest:***@127.0.0.1:{port}")),
            "{err}"
        );
    }
}

async fn quorum_queues_deliver_delay_and_count_redeliveries() {
    let driver = common::rabbit().await;
    let name = common::unique("quorum");
    let id = QueueId::new("test", &name).unwrap();
    let spec = QueueSpec::new(id.clone())
        .with_name(&name)
        .with_queue_type(QueueType::Quorum);
    driver.declare(&spec).await.unwrap();
    // Declaring the same again is fine.
    driver.declare(&spec).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    let first = next(&mut sub).await;
    assert!(
        !first.message().headers.contains(X_DELIVERY_COUNT),
        "a first delivery has no count: {:?}",
        first.message().headers
    );
    first.release().await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!(
        again.message().headers.get(X_DELIVERY_COUNT),
        Some(&HeaderValue::Int(1)),
        "{:?}",
        again.message().headers
    );
    assert!(!again.message().headers.contains("x-delivery-count"));
    // A republished copy (what a retry is) does not carry the count.
    let copy = Message::from_bytes(
        again.message().body.clone(),
        again.message().headers.clone(),
        &again.message().content_type,
    );
    driver.publish(&id, copy).await.unwrap();
    again.ack().await.unwrap();
    let copy = next(&mut sub).await;
    assert!(
        !copy.message().headers.contains(X_DELIVERY_COUNT),
        "{:?}",
        copy.message().headers
    );
    copy.ack().await.unwrap();
    // Delays go through a quorum delay queue.
    let delayed = Message::encode(
        &Value::from("later"),
        Headers::from_pairs([("delay", HeaderValue::Int(300))]),
        Codec::Json,
    )
    .unwrap();
    driver.publish(&id, delayed.clone()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.message().id, delayed.id);
    got.ack().await.unwrap();
    sub.cancel().await.unwrap();
    // The broker says which type each queue has.
    let listed = list_queues(&["name", "type", "arguments"]);
    for queue in [name.clone(), format!("{name}.delay.300")] {
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue.as_str()))
            .unwrap_or_else(|| panic!("{queue} not listed:\n{listed}"));
        assert!(line.contains("\tquorum"), "{line}");
    }
    // A quorum queue's expiry is not renewed by redeclaring it: a delay queue that
    // had one would be deleted with the copies waiting in it.
    let delay_line = listed
        .lines()
        .find(|l| l.starts_with(&format!("{name}.delay.300")))
        .unwrap_or_default();
    assert!(!delay_line.contains("x-expires"), "{delay_line}");
    delete(&format!("{name}.delay.300")).await;
    delete(&name).await;
    driver.close().await.unwrap();
}

async fn redeclaring_with_another_type_names_both_types() {
    let driver = common::rabbit().await;
    for (existing, declared) in [
        (QueueType::Classic, QueueType::Quorum),
        (QueueType::Quorum, QueueType::Classic),
    ] {
        let name = common::unique("retype");
        let id = QueueId::new("test", &name).unwrap();
        let spec = QueueSpec::new(id.clone())
            .with_name(&name)
            .with_queue_type(existing);
        driver.declare(&spec).await.unwrap();
        let err = driver
            .declare(&spec.clone().with_queue_type(declared))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        let said = err.message();
        assert!(
            said.contains(&format!(
                "exists on the broker as a {} queue",
                existing.as_str()
            )),
            "{said}"
        );
        assert!(
            said.contains(&format!("declared now as a {} queue", declared.as_str())),
            "{said}"
        );
        assert_eq!(err.details()["field"], "queue_type");
        // Neither the connection nor the original registration suffered.
        driver.publish(&id, numbered(1)).await.unwrap();
        assert_eq!(driver.info(&id).await.unwrap().ready, Some(1));
        delete(&name).await;
    }
    driver.close().await.unwrap();
}

async fn quorum_queue_options_the_broker_lacks_are_refused_up_front() {
    let driver = queue_core::Checked::layer(std::sync::Arc::new(common::rabbit().await));
    assert!(driver.capabilities().quorum_queues);
    let id = QueueId::new("test", &common::unique("quorum-prio")).unwrap();
    let quorum = QueueSpec::new(id).with_queue_type(QueueType::Quorum);
    let err = driver
        .declare(&quorum.clone().with_max_priority(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert_eq!(err.details()["field"], "max_priority", "{err}");
    let err = driver
        .declare(&quorum.with_durable(false))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert_eq!(err.details()["field"], "durable", "{err}");
    driver.close().await.unwrap();
}

/// A delay queue already on the broker that clashes only in its expiry (one an
/// earlier version declared, which expires by itself once unused) fails the publish
/// retryably, so the runtime tries the retry again later; any other clash (a queue made
/// by hand, a type that changed) stays until someone acts, and is not retried.
async fn a_delay_queue_declared_otherwise_fails_the_publish_retryably_only_while_it_expires() {
    use lapin::types::{AMQPValue, ShortString};
    let driver = common::rabbit().await;
    let conn = lapin::Connection::connect(common::URL, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for (label, expires_by_itself) in [("older", true), ("by-hand", false)] {
        let (name, id) = declared_transient(&driver, &format!("delay-clash-{label}")).await;
        let delay_queue = format!("{name}.delay.500");
        let mut args = FieldTable::default();
        if expires_by_itself {
            // What the driver declares, with another expiry.
            let arg = |k: &str| ShortString::from(k);
            args.insert(arg("x-message-ttl"), AMQPValue::LongLongInt(500));
            args.insert(
                arg("x-dead-letter-exchange"),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                arg("x-dead-letter-routing-key"),
                AMQPValue::LongString(name.as_bytes().into()),
            );
            args.insert(arg("x-expires"), AMQPValue::LongLongInt(60_000));
        }
        ch.queue_declare(
            delay_queue.as_str().into(),
            QueueDeclareOptions::default(),
            args,
        )
        .await
        .unwrap();
        let headers = Headers::from_pairs([("delay", HeaderValue::Int(500))]);
        let sent = Message::encode(&Value::from("later"), headers, Codec::Json).unwrap();
        let err = driver.publish(&id, sent).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{label}: {err}");
        assert_eq!(err.retryable(), expires_by_itself, "{label}: {err}");
        delete(&delay_queue).await;
        delete(&name).await;
    }
    let _ = conn.close(200, "OK".into()).await;
    driver.close().await.unwrap();
}

/// A fresh non-durable queue declared through `driver`, named after `label`: its
/// broker name and its id.
/// A delay queue deleted on the broker (by hand, as the docs ask of leftover ones, or
/// by an `expires` policy) while the driver still counts it declared: the next delayed
/// publish is returned. That is not the target queue missing: it fails retryably, and
/// the one after declares the delay queue again. It failed as NOT_FOUND, not
/// retryable, and the runtime dead-lettered every retry of that delay on its first
/// failure for half a minute.
async fn a_delay_queue_deleted_on_the_broker_is_declared_again() {
    let driver = common::rabbit().await;
    let (name, id) = declared_transient(&driver, "delay-gone").await;
    let delayed = || {
        let headers = Headers::from_pairs([("delay", HeaderValue::Int(60_000))]);
        Message::encode(&Value::from("later"), headers, Codec::Json).unwrap()
    };
    driver.publish(&id, delayed()).await.unwrap();
    let delay_queue = format!("{name}.delay.60000");
    delete(&delay_queue).await;
    let lost = driver
        .publish(&id, delayed())
        .await
        .expect_err("the delay queue was gone");
    assert!(lost.retryable(), "{lost}");
    assert_ne!(lost.kind(), queue_core::ErrorKind::NotFound, "{lost}");
    assert!(lost.message().contains(&delay_queue), "{lost}");
    driver.publish(&id, delayed()).await.unwrap();
    let info = driver.info(&id).await.unwrap();
    assert_eq!(info.delayed, Some(1), "{info:?}");
    delete(&delay_queue).await;
    delete(&name).await;
    driver.close().await.unwrap();
}

/// A queue deleted on the broker under its consumer (by an operator, or to empty it):
/// RabbitMQ cancels the consumer, and attaching again found the queue missing:
/// `NOT_FOUND`, once per reconnect delay for as long as the driver lived, each a
/// warning in the runtime's log, and no message consumed again until a reconnect. The
/// consumer declares its queue again, as it was declared, and goes on. A delivery
/// its handler still held is not said to be lost (the broker will not deliver it
/// again: it went with the queue), so a failure still makes its retry copy.
async fn a_consumer_of_a_queue_deleted_on_the_broker_declares_it_again() {
    let driver = Arc::new(common::rabbit().await);
    let (name, id) = declared_transient(&driver, "consumed-gone").await;
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    driver.publish(&id, numbered(10)).await.unwrap();
    let held = next(&mut sub).await;
    let attached = || {
        driver
            .connection()
            .expect("a broker driver reports its connection")
            .links_attached
    };
    let attached_before = attached();
    delete(&name).await;
    // Published once the consumer has attached again, so that it is the consumer that
    // declared the queue (a publish that comes back would declare it too).
    let publish_once_back = async {
        while attached() == attached_before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        driver
            .publish(&id, numbered(2))
            .await
            .expect("the consumer declared its queue again");
    };
    let (delivery, ()) = within("the consumer declaring its queue again", async {
        tokio::join!(next(&mut sub), publish_once_back)
    })
    .await;
    assert_eq!(
        delivery.message().decode().unwrap(),
        Value::map([("n", Value::Int(2))])
    );
    delivery.ack().await.unwrap();
    assert_eq!(
        attached(),
        attached_before + 1,
        "one attach after the cancel"
    );
    assert!(
        !held.is_lost(),
        "its queue was deleted: it comes back no more"
    );
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let path = FailurePath {
        queue: id.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_millis(10), 2.0, Duration::from_millis(10)),
        },
        exhausted: Exhausted::Drop,
        is_dead_letter_queue: false,
        stop,
    };
    // The copy is confirmed; the ack of the original is refused, as it was cancelled.
    match path.fail(&held, "boom").await {
        Ok(disposition) => assert_eq!(disposition, Disposition::Retried),
        Err(e) => assert!(e.to_string().contains("cancelled by the broker"), "{e}"),
    }
    let copy = next(&mut sub).await;
    assert_eq!(number_of(&copy), 10);
    copy.ack().await.unwrap();
    sub.cancel().await.unwrap();
    delete(&name).await;
    driver.close().await.unwrap();
}

/// A driver instance counts what waits in the delay queues it used: another process
/// (the `info` command, a runtime started again) cannot see the others, and said
/// `delayed: Some(0)` while retries waited there (review). It says it does not know.
async fn delay_queues_another_instance_used_are_not_counted_as_empty() {
    let driver = common::rabbit().await;
    let (name, id) = declared_transient(&driver, "delay-unseen").await;
    let delayed = Message::encode(
        &Value::from("later"),
        Headers::from_pairs([("delay", HeaderValue::Int(60_000))]),
        Codec::Json,
    )
    .unwrap();
    driver.publish(&id, delayed).await.unwrap();
    assert_eq!(driver.info(&id).await.unwrap().delayed, Some(1));
    let other = common::rabbit().await;
    declare_transient(&other, &name).await;
    let info = other.info(&id).await.unwrap();
    assert_eq!(info.delayed, None, "{info:?}");
    delete(&format!("{name}.delay.60000")).await;
    delete(&name).await;
    other.close().await.unwrap();
    driver.close().await.unwrap();
}

async fn declared_transient(driver: &Amqp091Driver, label: &str) -> (String, QueueId) {
    let name = common::unique(label);
    let id = declare_transient(driver, &name).await;
    (name, id)
}

/// Declares the non-durable queue `name` through `driver` (again, if it was before).
async fn declare_transient(driver: &Amqp091Driver, name: &str) -> QueueId {
    let id = QueueId::new("test", name).unwrap();
    driver
        .declare(
            &QueueSpec::new(id.clone())
                .with_name(name)
                .with_durable(false),
        )
        .await
        .unwrap();
    id
}

/// `rabbitmqctl list_queues` of the shared broker, one line per queue, with `columns`.
fn list_queues(columns: &[&str]) -> String {
    let args: Vec<&str> = ["-q", "list_queues", "--no-table-headers"]
        .into_iter()
        .chain(columns.iter().copied())
        .collect();
    tokio::task::block_in_place(|| queue_fixtures::rabbitmq::shared_ctl(&args))
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn delete(name: &str) {
    let conn = lapin::Connection::connect(common::URL, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "OK".into()).await;
}

/// A broker that hangs with its connections open (here a proxy that stops passing on
/// anything RabbitMQ says) must not hold up a consumer's cancel or the driver's close:
/// the runtime's shutdown waits on both. Each gives up after its time limit and says
/// why; the deliveries the consumer held go back when the broker drops the connection.
async fn a_hung_broker_cannot_hold_up_a_cancel_or_a_close() {
    let proxy = BrokerProxy::start(5672).expect("proxy");
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let driver = Amqp091Driver::connect(Amqp091Config::new(url))
        .await
        .unwrap();
    let id = QueueId::new("test", &common::unique("hung")).unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    let mut sub = driver
        .consume(&id, queue_core::ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let held = next(&mut sub).await;
    proxy.freeze();
    // Something the broker says after the freeze proves it landed: the ack's
    // settlement round and the cancel's channel close both expect an answer.
    drop(held);
    let cancel = tokio::time::timeout(Duration::from_secs(30), sub.cancel()).await;
    let Ok(cancelled) = cancel else {
        panic!("the cancel waited for the hung broker")
    };
    let err = cancelled.expect_err("a cancel the broker never answered");
    assert!(err.message().contains("did not answer"), "{err}");
    assert!(
        proxy.withheld() >= 1,
        "the broker said nothing after the freeze"
    );
    let close = tokio::time::timeout(Duration::from_secs(30), driver.close()).await;
    let Ok(closed) = close else {
        panic!("the close waited for the hung broker")
    };
    let err = closed.expect_err("a close the broker never answered");
    assert!(err.message().contains("did not answer"), "{err}");
    drop(proxy);
    delete(id.as_str()).await;
}

/// A broker that stops reading its socket while it still sends (hung in part, or a
/// network whose one direction stalls): its heartbeats still come, but the driver's
/// writes block, and publishing must not stay stuck behind them. The AMQP 1.0 driver
/// stayed so for good (its test of the same name); this one replaces the connection,
/// and publishing goes on.
async fn a_broker_that_stops_reading_is_noticed() {
    let proxy = std::sync::Arc::new(BrokerProxy::start(5672).expect("proxy"));
    let mut config =
        Amqp091Config::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()));
    config.heartbeat = Some(Duration::from_secs(1));
    config.publish_timeout = Duration::from_secs(1);
    config.reconnect_delay = Duration::from_millis(100);
    let driver = Amqp091Driver::connect(config).await.unwrap();
    let id = QueueId::new("test", &common::unique("unread")).unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    proxy.publish_through_a_stop_in_reading(&driver, &id).await;
    driver.close().await.unwrap();
    drop(proxy);
    delete(id.as_str()).await;
}

/// A broker that goes silent without closing TCP (it hangs, or the network drops
/// everything) is noticed through the missed heartbeats, and the driver reconnects. A
/// consumer only waits for deliveries and never writes: without heartbeats it would
/// wait forever. While the broker is only idle, its heartbeats keep the connection.
async fn a_silent_broker_is_noticed_through_its_missed_heartbeats() {
    let proxy = std::sync::Arc::new(BrokerProxy::start(5672).expect("proxy"));
    let mut config =
        Amqp091Config::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()));
    config.heartbeat = Some(Duration::from_secs(2));
    config.reconnect_delay = Duration::from_millis(100);
    let driver = Amqp091Driver::connect(config).await.unwrap();
    let id = QueueId::new("test", &common::unique("silent")).unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    let sub = driver
        .consume(&id, queue_core::ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    // The publishing connection and the consumers' own.
    assert_eq!(proxy.accepted(), 2);
    // Idle for two and a half heartbeat timeouts: what the test measures, not a wait
    // for something to happen.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(proxy.accepted(), 2, "an idle connection was dropped");

    let noticed = proxy.freeze_until_redialled(Duration::from_secs(30)).await;
    noticed.expect("the driver noticed the broker's silence");
    // Both connections noticed, the idle consumers' one among them.
    let both = proxy
        .wait_async(|p| p.wait_accepted(4, Duration::from_secs(30)))
        .await;
    assert!(both, "only {} connections dialled", proxy.accepted());
    // Reconnecting (the new connection's handshake waits on the frozen broker), the
    // driver is not connected, and says so (the runtime's /ready reads it).
    assert!(
        !driver.connection().unwrap().connected,
        "reported connected while reconnecting"
    );
    drop(sub);
    let _ = tokio::time::timeout(Duration::from_secs(30), driver.close()).await;
    drop(proxy);
    delete(id.as_str()).await;
}

/// A publish to a broker that hangs with its connection open fails within
/// `publish_timeout`, retryable, and a declare within `connection_timeout`: a
/// `queue.publish` in a handler is never held up past its limit, and the message is
/// never reported sent.
async fn a_publish_to_a_hung_broker_fails_within_its_limit() {
    let proxy = BrokerProxy::start(5672).expect("proxy");
    let mut config =
        Amqp091Config::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()));
    config.publish_timeout = Duration::from_secs(2);
    config.connection_timeout = Duration::from_secs(2);
    let driver = Amqp091Driver::connect(config).await.unwrap();
    let id = QueueId::new("test", &common::unique("hung-publish")).unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    let err = proxy.publish_to_frozen(&driver, &id).await;
    assert!(err.retryable(), "{err}");
    assert!(err.message().contains("publish_timeout"), "{err}");
    // A batch, whose confirms are awaited oldest first under one timer, ends the same
    // way: every message written, none confirmed.
    let batch = driver.publish_batch(&id, (3..53).map(numbered).collect());
    let err = within("a batch to the hung broker", batch)
        .await
        .expect_err("a batch the broker never confirmed");
    assert!(err.retryable(), "{err}");
    assert!(
        err.message()
            .contains("not confirmed within publish_timeout"),
        "{err}"
    );
    assert_eq!(err.details()["confirmed"], "0", "{err}");
    assert_eq!(err.details()["batch_size"], "50", "{err}");
    let other = QueueId::new("test", &common::unique("hung-declare")).unwrap();
    let spec = QueueSpec::new(other).with_durable(false);
    let (err, _) = proxy.declare_while_frozen(&driver, &spec).await;
    assert!(err.retryable(), "{err}");
    assert!(err.message().contains("did not answer"), "{err}");
    let _ = within("the close", driver.close()).await;
    drop(proxy);
    delete(id.as_str()).await;
}

/// A close while publishes wait for their confirm must not report a publish failed
/// that the broker took: a publisher that tries again would make a duplicate. The
/// queue holds exactly the publishes reported done, singles and a batch's confirmed
/// part alike.
async fn publishes_waiting_at_a_close_get_their_real_outcome() {
    let driver = std::sync::Arc::new(common::rabbit().await);
    let (name, id) = declared_transient(&driver, "closing").await;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let publishes: Vec<_> = (0..500)
        .map(|n| {
            let (driver, id, done) = (std::sync::Arc::clone(&driver), id.clone(), done_tx.clone());
            tokio::spawn(async move {
                let published = driver.publish(&id, numbered(n)).await;
                let _ = done.send(published.is_ok());
                published
            })
        })
        .collect();
    // Closed once the first is confirmed: the others are being sent or wait.
    while !within("a first confirm", done_rx.recv())
        .await
        .unwrap_or(true)
    {}
    let batch = {
        let (driver, id) = (std::sync::Arc::clone(&driver), id.clone());
        tokio::spawn(async move {
            let messages: Vec<_> = (1000..3000).map(numbered).collect();
            driver.publish_batch(&id, messages).await
        })
    };
    // A moment for part of the batch to be sent: nothing signals it (the test holds
    // whatever the moment catches, all of the batch or none of it included).
    tokio::time::sleep(Duration::from_millis(40)).await;
    driver.close().await.unwrap();
    // A batch that failed says how many of its messages were confirmed.
    let mut confirmed = match batch.await.unwrap() {
        Ok(()) => 2000,
        Err(err) => err.details()["confirmed"].parse::<u64>().unwrap(),
    };
    for publish in publishes {
        if publish.await.unwrap().is_ok() {
            confirmed += 1;
        }
    }
    let counter = common::rabbit().await;
    let id = declare_transient(&counter, &name).await;
    let held = counter.info(&id).await.unwrap().message_count();
    let held = held.expect("RabbitMQ counts its queues over AMQP 0-9-1");
    assert_eq!(
        held, confirmed,
        "the queue holds {held}, {confirmed} were confirmed"
    );
    counter.close().await.unwrap();
    delete(&name).await;
}

queue_testkit::broker_tests! {
    unavailable: queue_fixtures::rabbitmq::shared_unavailable();
    async: [
        wrong_password_is_refused_without_showing_it,
        a_delay_queue_deleted_on_the_broker_is_declared_again,
        a_hung_broker_cannot_hold_up_a_cancel_or_a_close,
        a_silent_broker_is_noticed_through_its_missed_heartbeats,
        a_broker_that_stops_reading_is_noticed,
        a_publish_to_a_hung_broker_fails_within_its_limit,
        refused_port_fails_retryable_without_showing_the_password,
        a_full_queue_nacks_and_publish_fails_internal_retryable,
        a_delayed_message_for_a_full_queue_waits_for_room,
        redeclaring_with_other_arguments_is_a_clear_error_not_a_dead_driver,
        publishing_to_a_queue_deleted_on_the_broker_declares_it_again,
        consuming_a_queue_deleted_on_the_broker_declares_it_again,
        a_dead_letter_queue_deleted_on_the_broker_is_declared_again_by_its_dead_letters,
        a_consumer_of_a_queue_deleted_on_the_broker_declares_it_again,
        returns_are_paired_with_their_own_publishes,
        publishes_sharing_a_message_id_are_never_told_a_false_outcome,
        a_classic_queues_delivery_count_is_a_publishers_header,
        delayed_messages_wait_in_an_expiring_delay_queue_and_arrive_clean,
        delay_queues_another_instance_used_are_not_counted_as_empty,
        a_delay_queue_declared_otherwise_fails_the_publish_retryably_only_while_it_expires,
        the_factory_validates_without_connecting_and_creates_a_driver,
        the_default_vhost_url_forms_all_connect,
        a_missing_vhost_is_not_found_and_named,
        a_list_of_nodes_connects_to_the_first_that_answers,
        quorum_queues_deliver_delay_and_count_redeliveries,
        redeclaring_with_another_type_names_both_types,
        quorum_queue_options_the_broker_lacks_are_refused_up_front,
        publishes_waiting_at_a_close_get_their_real_outcome,
        publishes_from_several_threads_are_each_told_their_own_confirm,
        headers_past_frame_max_are_refused_and_cost_no_connection,
        a_publish_the_users_permissions_refuse_is_permission_denied,
    ];
    sync: [];
}
