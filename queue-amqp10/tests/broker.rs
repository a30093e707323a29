//! Real failures against the main RabbitMQ node (and one private node, stopped and
//! started under a subscription): errors carry the right kind and never
//! the password.

mod support;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::{ConsumeOptions, Driver, DriverFactory, ErrorKind, QueueId, QueueSpec};
use queue_fixtures::proxy::{BrokerProxy, Performative};
use queue_fixtures::rabbitmq::{SharedUser, SharedVhost};
use queue_testkit::{everything_said, number_of, numbered, within};

const SECRET: &str = "not-the-password-7f3a";

async fn wrong_password_is_refused_without_showing_it() {
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:5672");
    let err = Amqp10Driver::connect(Amqp10Config::new(url.clone(), Profile::RabbitmqV1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let text = everything_said(&err);
    assert!(!text.contains(SECRET), "password leaked: {text}");
    assert!(text.contains("guest:***@127.0.0.1:5672"), "{text}");

    // The same through the factory, as the runtime builds it.
    let result = queue_core::Factory::<Amqp10Config>::new()
        .create(serde_json::json!({"url": url, "profile": "rabbitmq-v1"}))
        .await;
    let Err(err) = result else {
        panic!("a wrong password connected")
    };
    assert!(!everything_said(&err).contains(SECRET));
}

async fn refused_port_is_internal_retryable_without_the_password() {
    // A port nobody listens on: bind one, then free it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:{port}");
    let err = Amqp10Driver::connect(Amqp10Config::new(url, Profile::Generic))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.retryable());
    let text = everything_said(&err);
    assert!(!text.contains(SECRET), "password leaked: {text}");
    assert!(
        text.contains(&format!("guest:***@127.0.0.1:{port}")),
        "{text}"
    );
}

async fn options_rabbitmq_3_cannot_honour_are_invalid() {
    // As every user of a driver gets it: behind the capability checks.
    let driver = queue_core::Checked::layer(std::sync::Arc::new(
        support::rabbit_driver(Profile::RabbitmqV1).await,
    ));
    let id = QueueId::parse("amqp10-tests:unsupported").unwrap();
    for spec in [
        QueueSpec::new(id.clone()).with_max_priority(9),
        QueueSpec::new(id.clone()).with_max_length(10),
        QueueSpec::new(id.clone()).with_message_ttl(std::time::Duration::from_secs(1)),
    ] {
        let err = driver.declare(&spec).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(err.message().contains("amqp10"), "{err}");
    }
    // The plugin reads `%2F` as a '/' too: `a%2Fb` declared queue `a/b` (review).
    for name in ["a/b", "a%2Fb"] {
        let slash = QueueSpec::new(id.clone()).with_name(name);
        let err = driver.declare(&slash).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{name}: {err}");
    }
    driver.close().await.unwrap();
}

async fn a_durability_clash_is_already_exists() {
    let first = support::rabbit_driver(Profile::RabbitmqV1).await;
    let second = support::rabbit_driver(Profile::RabbitmqV1).await;
    let name = format!("amqp10-tests-clash-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    first
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    let err = second
        .declare(&QueueSpec::new(id.clone()).with_durable(true))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    // The first driver's links are on their own sessions: still fine.
    first
        .publish(&id, queue_testkit::numbered(1))
        .await
        .unwrap();
    first.close().await.unwrap();
    second.close().await.unwrap();
}

/// RabbitMQ 3.x's plugin accepts a publish to a queue deleted on the broker and drops
/// it (no `mandatory` over AMQP 1.0), and the sender link never learns of the deletion:
/// every later publish was lost, for as long as the driver ran (review, measured). The
/// driver declares a queue it publishes to again every few seconds (attaching a sender
/// is the declaration): the queue comes back, and publishes are stored again within
/// that bound. The ones between the deletion and the declaration are still lost.
async fn a_queue_deleted_under_its_publisher_comes_back_within_seconds() {
    let driver = support::rabbit_driver(Profile::RabbitmqV1).await;
    let name = format!("amqp10-tests-deleted-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    let spec = QueueSpec::new(id.clone()).with_durable(false);
    driver.declare(&spec).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    let ctl = |args: &[&str]| {
        tokio::task::block_in_place(|| queue_fixtures::rabbitmq::shared_ctl(args))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    ctl(&["delete_queue", spec.name.as_str()]);
    let listed = |ctl: &dyn Fn(&[&str]) -> String| {
        ctl(&[
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .lines()
        .find(|line| line.starts_with(spec.name.as_str()))
        .map(str::to_string)
    };
    assert_eq!(listed(&ctl), None, "the queue was deleted");
    within("the queue coming back under its publisher", async {
        loop {
            driver.publish(&id, numbered(2)).await.unwrap();
            if listed(&ctl).is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    // Declared again, the queue stores what is published to it.
    let before = listed(&ctl).unwrap();
    driver.publish(&id, numbered(3)).await.unwrap();
    let after = listed(&ctl).unwrap();
    assert_ne!(
        before, after,
        "the publish after the declaration was stored"
    );
    ctl(&["delete_queue", spec.name.as_str()]);
    driver.close().await.unwrap();
}

/// With a list of URLs the driver skips a node that does not answer, reports the one
/// it connected to, and says which nodes failed when none answers.
async fn a_url_list_connects_to_the_first_node_that_answers() {
    let dead = format!(
        "amqp://guest:{SECRET}@127.0.0.1:{}",
        queue_fixtures::free_port()
    );
    let live = "amqp://guest:guest@127.0.0.1:5672".to_string();
    let driver = Amqp10Driver::connect(Amqp10Config::cluster(
        [dead.clone(), live],
        Profile::RabbitmqV1,
    ))
    .await
    .expect("the second node answers");
    let report = driver.connection().expect("a connection report");
    assert_eq!(report.node, "amqp://guest:***@127.0.0.1:5672");
    assert_eq!(report.connections_opened, 1);
    let queue = QueueId::parse("app:url-list").unwrap();
    driver
        .declare(&QueueSpec::new(queue.clone()))
        .await
        .expect("declare on the live node");
    driver.close().await.expect("close");

    let other_dead = format!(
        "amqp://guest:{SECRET}@127.0.0.1:{}",
        queue_fixtures::free_port()
    );
    let err = Amqp10Driver::connect(Amqp10Config::cluster([dead, other_dead], Profile::Generic))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    let text = everything_said(&err);
    assert!(text.contains("none of the 2 nodes answered"), "{text}");
    assert!(!text.contains(SECRET), "password leaked: {text}");
}

/// `ack` returns once the settlement is handed to the link's task, before the
/// disposition is written: a cancel right after sends those acks ahead of releasing
/// the rest, so only the deliveries left unsettled come back.
async fn acks_handed_over_before_a_cancel_are_sent() {
    let driver = support::rabbit_driver(Profile::RabbitmqV1).await;
    let name = format!("amqp10-tests-handed-over-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    for n in 0..200 {
        driver.publish(&id, numbered(n)).await.unwrap();
    }
    let mut sub = driver
        .consume(&id, ConsumeOptions { prefetch: 200 })
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..200 {
        let delivery = within("a delivery", sub.next()).await.unwrap().unwrap();
        if number_of(&delivery) < 150 {
            delivery.ack().await.expect("ack of a live link");
        } else {
            held.push(delivery);
        }
    }
    within("cancel", sub.cancel()).await.unwrap();
    // Settled after the cancel: both refused as such (INVALID), as the Driver
    // contract says; the ack was told "the connection was lost" and the release Ok.
    let mut held = held.into_iter();
    let acked = held
        .next()
        .unwrap()
        .ack()
        .await
        .expect_err("an ack after the cancel");
    assert_eq!(acked.kind(), ErrorKind::Invalid, "{acked}");
    let released = held.next().unwrap().release().await;
    let released = released.expect_err("a release after the cancel");
    assert_eq!(released.kind(), ErrorKind::Invalid, "{released}");
    drop(held);
    // Published after the cancel, so it comes after whatever went back.
    driver.publish(&id, numbered(-1)).await.unwrap();

    let mut again = driver
        .consume(&id, ConsumeOptions { prefetch: 100 })
        .await
        .unwrap();
    let mut back = Vec::new();
    loop {
        let delivery = within("a redelivery", again.next()).await.unwrap().unwrap();
        let n = number_of(&delivery);
        delivery.ack().await.unwrap();
        if n == -1 {
            break;
        }
        back.push(n);
    }
    back.sort_unstable();
    assert_eq!(
        back,
        (150..200).collect::<Vec<_>>(),
        "only the unsettled deliveries come back"
    );
    within("cancel", again.cancel()).await.unwrap();
    driver.close().await.unwrap();
}

/// An ack of a delivery whose link was lost is refused (`INTERNAL`, retryable: the
/// message comes again), though acks return without waiting for the broker, and the
/// delivery says it is lost. On a
/// private node, stopped and started under the subscription.
async fn an_ack_of_a_lost_link_is_refused() {
    let mut node = tokio::task::spawn_blocking(queue_fixtures::rabbitmq::PrivateNode::start)
        .await
        .unwrap()
        .expect("a private RabbitMQ node");
    let mut config = Amqp10Config::new(node.amqp10_url(), Profile::RabbitmqV1);
    config.reconnect_delay = std::time::Duration::from_millis(100);
    config.reconnect_max_delay = std::time::Duration::from_secs(1);
    config.publish_timeout = std::time::Duration::from_secs(30);
    let driver = Amqp10Driver::connect(config).await.unwrap();
    let id = QueueId::parse("amqp10-tests:lost-link").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    let mut sub = driver
        .consume(&id, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let held = within("a delivery", sub.next()).await.unwrap().unwrap();
    assert!(!held.is_lost());

    let node = tokio::task::spawn_blocking(move || {
        node.stop_app_then_start(std::time::Duration::from_secs(1));
        node
    })
    .await
    .unwrap();
    // A delivery after the restart comes on a new link: the held one's is gone.
    driver.publish(&id, numbered(2)).await.unwrap();
    let again = within("a delivery on the new link", sub.next())
        .await
        .unwrap()
        .unwrap();
    // Which a retry holding it through its backoff asks before it publishes a copy.
    assert!(held.is_lost(), "the held delivery's link is gone");
    assert!(!again.is_lost());
    let err = held.ack().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.retryable(), "{err}");
    again.ack().await.expect("an ack on the new link");
    within("cancel", sub.cancel()).await.unwrap();
    driver.close().await.unwrap();
    drop(node);
}

/// An ack made while a cancel waits for the broker's answer to its detach: it said
/// `Ok` and was dropped, the delivery released with the rest, so that the message came
/// back after its handler had acked it (review). It is refused (`INVALID`, the
/// consumer cancelled), and the message comes back as the cancel said.
async fn an_ack_while_a_cancel_waits_for_the_broker_is_refused() {
    let proxy = std::sync::Arc::new(BrokerProxy::start_amqp10(5672).expect("proxy"));
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let name = format!("ack-during-cancel-{}", queue_core::new_message_id());
    let (driver, mut sub) = consuming(Amqp10Config::new(url, Profile::RabbitmqV1), &name).await;
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    let held = queue_testkit::next(&mut sub).await;
    proxy.withhold(Performative::Detach);
    let cancelling = sub.cancel();
    tokio::pin!(cancelling);
    let watched = std::sync::Arc::clone(&proxy);
    let withheld = tokio::task::spawn_blocking(move || {
        watched.wait_withheld(1, std::time::Duration::from_secs(20))
    });
    tokio::select! {
        _ = &mut cancelling => panic!("the cancel ended before the broker's detach was withheld"),
        seen = withheld => assert!(seen.unwrap(), "the broker's detach was never withheld"),
    }
    let err = held
        .ack()
        .await
        .expect_err("an ack while the consumer is cancelled");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    within("the cancel", cancelling).await.unwrap();
    proxy.stop_withholding();
    let mut again = driver
        .consume(&id, ConsumeOptions { prefetch: 1 })
        .await
        .unwrap();
    let redelivered = queue_testkit::next(&mut again).await;
    assert_eq!(number_of(&redelivered), 1);
    redelivered.ack().await.unwrap();
    within("cancel", again.cancel()).await.unwrap();
    driver.close().await.unwrap();
}

/// A publish whose caller gave up while the sender declared its queue again (every
/// 5 s on RabbitMQ 3.x: docs/drivers/amqp10.md, "Sending"), the broker slow to
/// answer the declaration: it was sent once the declaration ended, after its caller
/// was told to publish again, so that the next publish made a duplicate (review).
async fn a_publish_given_up_during_a_declaration_is_not_sent_late() {
    let proxy = std::sync::Arc::new(BrokerProxy::start_amqp10(5672).expect("proxy"));
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let mut config = Amqp10Config::new(url, Profile::RabbitmqV1);
    config.publish_timeout = std::time::Duration::from_secs(2);
    let driver = Amqp10Driver::connect(config).await.unwrap();
    let name = format!("amqp10-tests-late-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    let spec = QueueSpec::new(id.clone()).with_durable(false);
    driver.declare(&spec).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    // No signal says when the sender's next declaration is due: its clock is the
    // only one (5 s after the last).
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    // The answer to the declaration's attach, and the flow RabbitMQ sends with it,
    // which fe2o3-amqp takes for a link it does not know and ends the session.
    proxy.withhold(Performative::Attach);
    proxy.withhold(Performative::Flow);
    let err = driver.publish(&id, numbered(2)).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    let watched = std::sync::Arc::clone(&proxy);
    let withheld = tokio::task::spawn_blocking(move || {
        watched.wait_withheld(1, std::time::Duration::from_secs(20))
    });
    assert!(
        withheld.await.unwrap(),
        "the declaration's attach was never withheld"
    );
    proxy.stop_withholding();
    within("a publish once the declaration gave up", async {
        while driver.publish(&id, numbered(3)).await.is_err() {}
    })
    .await;
    let stored = tokio::task::block_in_place(queue_fixtures::rabbitmq::shared_queue_messages)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .find(|(queue, _)| *queue == spec.name)
        .map(|(_, count)| count);
    assert_eq!(stored, Some(2), "the first and the last publish, no more");
    driver.close().await.unwrap();
    tokio::task::block_in_place(|| {
        queue_fixtures::rabbitmq::shared_ctl(&["delete_queue", spec.name.as_str()])
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A publish whose caller gave up waiting for the broker's credit (a broker slow to
/// grant it): it was sent once the credit came, after its caller was told to publish
/// again, so that the publish made again was a duplicate. A message of several frames
/// is still sent, since a transfer stopped part way would break the link (a known
/// limit): the largest frame is what the broker's `open` said (256 KiB on RabbitMQ
/// 3.10), which the guard reads.
async fn a_publish_given_up_waiting_for_credit_is_not_sent_late() {
    for (size, bytes, stored) in [("one frame", 16, 1), ("several frames", 600 << 10, 2)] {
        let message = || {
            queue_core::Message::from_bytes(
                vec![b'x'; bytes],
                queue_core::Headers::new(),
                "application/octet-stream",
            )
        };
        let proxy = std::sync::Arc::new(BrokerProxy::start_amqp10(5672).expect("proxy"));
        let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
        let mut config = Amqp10Config::new(url, Profile::RabbitmqV1);
        config.publish_timeout = std::time::Duration::from_secs(1);
        let driver = Amqp10Driver::connect(config).await.unwrap();
        let name = format!("amqp10-tests-credit-{}", queue_core::new_message_id());
        let id = QueueId::new("amqp10-tests", &name).unwrap();
        let spec = QueueSpec::new(id.clone()).with_durable(false);
        // The sender attaches as the queue is declared; the broker's credit follows.
        proxy.delay(Performative::Flow);
        driver.declare(&spec).await.unwrap();
        let err = driver.publish(&id, message()).await.unwrap_err();
        assert!(err.retryable(), "{size}: {err}");
        assert!(
            proxy.withheld() >= 1,
            "{size}: the broker's credit was never held back"
        );
        proxy.release_delayed();
        within(
            "a publish once the credit came",
            driver.publish(&id, message()),
        )
        .await
        .unwrap_or_else(|e| panic!("{size}: a publish with credit: {e}"));
        let found = tokio::task::block_in_place(queue_fixtures::rabbitmq::shared_queue_messages)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .find(|(queue, _)| *queue == spec.name)
            .map(|(_, count)| count);
        assert_eq!(found, Some(stored), "{size}");
        driver.close().await.unwrap();
        tokio::task::block_in_place(|| {
            queue_fixtures::rabbitmq::shared_ctl(&["delete_queue", spec.name.as_str()])
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A queue's sender and a subscription's receiver run on the runtime the driver was
/// connected on, as its sessions do: declared and consumed from another runtime
/// (a library user's short-lived one) that then ended, the queue still takes
/// publishes and the subscription still receives. They ran on the caller's runtime
/// and ended with it: every publish `CANCELED`, the subscription ended (review).
async fn a_queue_declared_and_consumed_on_another_runtime_outlives_it() {
    let driver = std::sync::Arc::new(support::rabbit_driver(Profile::RabbitmqV1).await);
    let name = format!("amqp10-tests-elsewhere-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    let spec = QueueSpec::new(id.clone()).with_durable(false);
    let side = {
        let (driver, spec) = (std::sync::Arc::clone(&driver), spec.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime of its own");
            runtime.block_on(async {
                driver.declare(&spec).await?;
                driver
                    .consume(&spec.id, ConsumeOptions { prefetch: 10 })
                    .await
            })
        })
    };
    let mut sub = within(
        "the other runtime's declare and consume",
        tokio::task::spawn_blocking(move || side.join()),
    )
    .await
    .expect("the join")
    .expect("the other runtime's thread")
    .expect("declared and consumed on the other runtime");
    // That runtime is gone, with every task it ran.
    within("a publish after it ended", driver.publish(&id, numbered(7)))
        .await
        .expect("the queue's sender ended with the other runtime");
    let delivery = within("a delivery after it ended", sub.next())
        .await
        .expect("the subscription ended with the other runtime")
        .expect("a delivery");
    assert_eq!(number_of(&delivery), 7);
    delivery.ack().await.expect("the ack");
    within("cancel", sub.cancel()).await.unwrap();
    driver.close().await.unwrap();
    tokio::task::block_in_place(|| {
        queue_fixtures::rabbitmq::shared_ctl(&["delete_queue", spec.name.as_str()])
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A URL's path names the RabbitMQ vhost: the plugin reads it from the `open`'s
/// hostname as `vhost:NAME`, and any other hostname as its default vhost, so the
/// queue is declared and filled there, not in `/`. A path was refused, with an error
/// that sent users to the hostname (review).
async fn a_url_path_names_the_rabbitmq_vhost() {
    let name = format!("amqp10-tests-vhost-{}", std::process::id());
    let vhost = tokio::task::block_in_place(|| SharedVhost::add(&name)).expect("a vhost");
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.name());
    let driver = Amqp10Driver::connect(Amqp10Config::new(url, Profile::RabbitmqV1))
        .await
        .unwrap();
    let spec =
        QueueSpec::new(QueueId::new("amqp10-tests", "in-a-vhost").unwrap()).with_durable(false);
    driver.declare(&spec).await.unwrap();
    driver.publish(&spec.id, numbered(1)).await.unwrap();
    driver.close().await.unwrap();
    let held = tokio::task::block_in_place(|| vhost.queue_messages()).expect("the vhost's queues");
    assert_eq!(held, vec![(spec.name.clone(), 1)]);
}

/// A sender whose re-attach is refused for good (its permissions revoked while its
/// connection was down) fails its publishes with that refusal and attaches again
/// only after a back-off: each publish attached again at once, one broker channel
/// and error line per publish (review).
async fn a_refused_reattach_backs_off_and_fails_publishes_meanwhile() {
    let name = format!("amqp10-refused-{}", std::process::id());
    let user = tokio::task::block_in_place(|| SharedUser::add(&name, "pw")).expect("a user");
    let proxy = BrokerProxy::start_amqp10(5672).expect("proxy");
    let mut config = Amqp10Config::new(
        format!("amqp://{name}:pw@127.0.0.1:{}", proxy.port()),
        Profile::RabbitmqV1,
    );
    config.reconnect_delay = std::time::Duration::from_millis(200);
    config.reconnect_max_delay = std::time::Duration::from_secs(2);
    // The cut connection stays open, silent: noticed within this.
    config.idle_timeout = std::time::Duration::from_secs(2);
    config.publish_timeout = std::time::Duration::from_secs(1);
    let driver = Amqp10Driver::connect(config).await.unwrap();
    let spec = QueueSpec::new(QueueId::new("amqp10-tests", &name).unwrap()).with_durable(false);
    driver.declare(&spec).await.unwrap();
    driver.publish(&spec.id, numbered(0)).await.unwrap();
    tokio::task::block_in_place(|| {
        queue_fixtures::rabbitmq::shared_ctl(&[
            "set_permissions",
            "-p",
            "/",
            &name,
            "^$",
            "^$",
            "^$",
        ])
    })
    .expect("permissions revoked");
    proxy.cut_off_open_connections();
    // The first publish after the cut reconnects and is refused at the attach.
    let refused = within("the first publish after the cut", async {
        loop {
            if let Err(e) = driver.publish(&spec.id, numbered(1)).await
                && e.kind() == ErrorKind::PermissionDenied
            {
                break;
            }
        }
    });
    refused.await;
    // RabbitMQ refuses such an attach by ending its session: one `end` per attach.
    let attaches = proxy.seen(Performative::End);
    for n in 2..22 {
        let err = driver.publish(&spec.id, numbered(n)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    }
    let more = proxy.seen(Performative::End) - attaches;
    // Backing off from 200 ms, a few at most whatever the publishes take.
    assert!(more <= 4, "{more} attaches for 20 publishes");
    drop(driver);
    drop(user);
    let _ = tokio::task::block_in_place(|| {
        queue_fixtures::rabbitmq::shared_ctl(&["delete_queue", spec.name.as_str()])
    });
}

/// A driver on `config` and a consumer of the shared broker's queue `name`.
async fn consuming(
    config: Amqp10Config,
    name: &str,
) -> (Amqp10Driver, Box<dyn queue_core::Subscription>) {
    let driver = Amqp10Driver::connect(config).await.unwrap();
    let id = QueueId::new("amqp10-tests", name).unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let sub = driver
        .consume(&id, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    (driver, sub)
}

/// fe2o3-amqp's session engine, once it has sent a session's `end`, polls a closed
/// channel in a loop until the broker's `end` comes back, for as long as the session's
/// handle or one of its links is held. The driver holds neither while it waits, so a
/// broker slow to answer, or one that never does, costs no CPU: here the proxy
/// withholds the broker's `end` from a cancelled consumer's session. Then it withholds
/// the broker's `close` too: the driver's close gives up after its timeout and leaves
/// nothing running. Everything runs on one thread (fe2o3's engines with it), whose CPU
/// time is the evidence.
fn unanswered_ends_and_closes_leave_nothing_spinning() {
    let proxy = std::sync::Arc::new(BrokerProxy::start_amqp10(5672).expect("proxy"));
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let watched = std::sync::Arc::clone(&proxy);
    let used = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut config = Amqp10Config::new(url, Profile::RabbitmqV1);
            config.container_id = Some(format!("queue-amqp10-silent-end-{}", std::process::id()));
            let (driver, sub) = consuming(config, "silent-end").await;
            watched.withhold(Performative::End);
            let before = queue_testkit::thread_cpu();
            within("cancel", sub.cancel()).await.unwrap();
            let landed = watched
                .wait_async(|p| p.wait_withheld(1, std::time::Duration::from_secs(30)))
                .await;
            assert!(landed, "the session's end never reached the broker");
            // The window in which a spinning engine would show.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let used_by_cancel = queue_testkit::thread_cpu() - before;

            watched.withhold(Performative::Close);
            let withheld = watched.withheld();
            let closing = std::time::Instant::now();
            within("close", driver.close()).await.unwrap();
            assert!(
                watched.withheld() > withheld,
                "the close never reached the broker"
            );
            // Proof the close went unanswered: the driver waited out its limit (5 s).
            assert!(
                closing.elapsed() >= std::time::Duration::from_secs(4),
                "the close was answered after {:?}",
                closing.elapsed()
            );
            // Given up on, the connection is cut: its socket does not linger.
            let gone = watched
                .wait_async(|p| p.wait_clients_gone(std::time::Duration::from_secs(10)))
                .await;
            assert!(
                gone,
                "the driver kept its socket after giving up on the close"
            );
            let before = queue_testkit::thread_cpu();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            (used_by_cancel, queue_testkit::thread_cpu() - before)
        })
    })
    .join()
    .unwrap();
    let (used_by_cancel, used_after_close) = used;
    assert!(
        used_by_cancel < std::time::Duration::from_millis(300),
        "waiting for the broker's end spun: {used_by_cancel:?} of CPU"
    );
    assert!(
        used_after_close < std::time::Duration::from_millis(300),
        "something still spins after the close: {used_after_close:?} of CPU in a second"
    );
}

/// A broker that goes silent without closing TCP (it hangs, or the network drops
/// everything) is noticed within `idle_timeout`, and the driver reconnects. Without it
/// a consumer, which only waits for deliveries and never writes, would wait forever.
/// While the broker is only idle, its heartbeats keep the connection.
async fn a_silent_broker_is_noticed_within_the_idle_timeout() {
    let proxy = std::sync::Arc::new(BrokerProxy::start(5672).expect("proxy"));
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let mut config = Amqp10Config::new(url, Profile::RabbitmqV1);
    config.idle_timeout = std::time::Duration::from_secs(2);
    config.reconnect_delay = std::time::Duration::from_millis(100);
    let (driver, sub) = consuming(config, "silent").await;
    // Idle for two and a half idle timeouts: what the test measures, not a wait for
    // something to happen.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(proxy.accepted(), 1, "an idle connection was dropped");

    let noticed = proxy
        .freeze_until_redialled(std::time::Duration::from_secs(30))
        .await;
    noticed.expect("the driver noticed the broker's silence");
    // Reconnecting (the new connection's open waits on the frozen broker), the
    // driver is not connected, and says so (the runtime's /ready reads it).
    assert!(
        !driver.connection().unwrap().connected,
        "reported connected while reconnecting"
    );
    drop(sub);
    driver.close().await.unwrap();
}

/// A broker that stops reading its socket while it still sends (hung in part, or a
/// network whose one direction stalls) left the driver writing into full socket
/// buffers: fe2o3-amqp checks its idle timeout only while it reads, and the broker's
/// frames still came, so the connection was never replaced and every publish after the
/// stall timed out, for good. The socket now gives up on writes left unacknowledged for
/// `idle_timeout` (`TCP_USER_TIMEOUT`), the connection is replaced, and publishing
/// goes on.
async fn a_broker_that_stops_reading_is_noticed_within_the_idle_timeout() {
    let proxy = std::sync::Arc::new(BrokerProxy::start(5672).expect("proxy"));
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let mut config = Amqp10Config::new(url, Profile::RabbitmqV1);
    config.idle_timeout = std::time::Duration::from_secs(2);
    config.publish_timeout = std::time::Duration::from_secs(1);
    config.reconnect_delay = std::time::Duration::from_millis(100);
    let driver = Amqp10Driver::connect(config).await.unwrap();
    let name = format!("amqp10-tests-unread-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    proxy.publish_through_a_stop_in_reading(&driver, &id).await;
    driver.close().await.unwrap();
}

/// A publish to a broker that hangs with its connection open fails within
/// `publish_timeout`, retryable, and so does a declare: a `queue.publish` in a handler
/// is never held up for longer than its limit, and the message is never reported sent.
async fn a_publish_to_a_hung_broker_fails_within_its_limit() {
    let proxy = BrokerProxy::start(5672).expect("proxy");
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let mut config = Amqp10Config::new(url, Profile::RabbitmqV1);
    config.publish_timeout = std::time::Duration::from_secs(2);
    let driver = Amqp10Driver::connect(config).await.unwrap();
    let unique = |what: &str| format!("amqp10-tests-{what}-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &unique("hung-publish")).unwrap();
    let spec = QueueSpec::new(id.clone()).with_durable(false);
    driver.declare(&spec).await.unwrap();
    let err = proxy.publish_to_frozen(&driver, &id).await;
    assert!(err.retryable(), "{err}");
    assert!(err.message().contains("not accepted within"), "{err}");
    let other = QueueId::new("amqp10-tests", &unique("hung-declare")).unwrap();
    let spec = QueueSpec::new(other).with_durable(false);
    let (err, took) = proxy.declare_while_frozen(&driver, &spec).await;
    assert!(err.retryable(), "{err}");
    assert!(err.message().contains("timed out"), "{err}");
    // One time limit (10 s), not one for the session and one more for a new connection.
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
    let _ = within("the close", driver.close()).await;
}

/// Publishes whose outcomes were lost with their connection fail once the loss is
/// noticed, and give their window slots back. fe2o3-amqp settles nothing of a session
/// that stopped while its sender is held: with the window full, the send task waited
/// for a slot only those outcomes could free, and every later publish to the queue
/// timed out until the driver was closed.
async fn a_full_window_lost_with_its_connection_does_not_stall_publishing() {
    use std::time::Duration;
    let proxy = std::sync::Arc::new(BrokerProxy::start(5672).expect("proxy"));
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let mut config = Amqp10Config::new(url, Profile::RabbitmqV1);
    config.confirm_window = 2;
    config.idle_timeout = Duration::from_secs(2);
    config.publish_timeout = Duration::from_secs(4);
    config.reconnect_delay = Duration::from_millis(100);
    let driver = std::sync::Arc::new(Amqp10Driver::connect(config).await.unwrap());
    let name = format!("amqp10-tests-full-window-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    driver
        .publish(&id, numbered(0))
        .await
        .expect("a publish before the loss");
    let opened = driver.connection().expect("a report").connections_opened;
    // Nothing passes on the connection from now on: the two publishes fill the window
    // and their outcomes never come; the driver notices within its idle timeout.
    proxy.cut_off_open_connections();
    let lost: Vec<_> = (1..=2)
        .map(|n| {
            let (driver, id) = (std::sync::Arc::clone(&driver), id.clone());
            tokio::spawn(async move { driver.publish(&id, numbered(n)).await })
        })
        .collect();
    for publish in lost {
        let published = within("a publish on the lost connection", publish).await;
        let err = published.unwrap().expect_err("no outcome came back");
        assert!(err.retryable(), "{err}");
    }
    assert!(proxy.withheld() > 0, "nothing was cut off");
    // A publish on a new connection goes through; tried again while the loss is not
    // noticed yet. Stalled, every try times out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut tries = 0;
    loop {
        tries += 1;
        match driver.publish(&id, numbered(3)).await {
            Ok(()) => break,
            Err(err) if tokio::time::Instant::now() < deadline => {
                assert!(err.retryable(), "{err}");
            }
            Err(err) => panic!("publishing stayed stalled after {tries} tries: {err}"),
        }
    }
    let report = driver.connection().expect("a report");
    assert!(
        report.connections_opened > opened,
        "no new connection: {report:?}"
    );
    let _ = within("the close", driver.close()).await;
}

/// Declares queued behind a broker that hangs with its connection open each waited
/// out a time limit of their own (a session, then a new connection, 10 s each), one
/// after the other, and a close waited behind them all: a SIGTERM took minutes. The
/// declares waiting share the failure of the one before them, and a close ends the
/// waits at once.
async fn callers_queued_behind_a_hung_broker_share_its_failure_and_a_close_ends_them() {
    use std::time::{Duration, Instant};
    let proxy = BrokerProxy::start(5672).expect("proxy");
    let url = format!("amqp://guest:guest@127.0.0.1:{}", proxy.port());
    let driver = std::sync::Arc::new(
        Amqp10Driver::connect(Amqp10Config::new(url, Profile::RabbitmqV1))
            .await
            .unwrap(),
    );
    let spec = |what: &str| {
        let name = format!("amqp10-tests-hung-{what}-{}", queue_core::new_message_id());
        QueueSpec::new(QueueId::new("amqp10-tests", &name).unwrap()).with_durable(false)
    };
    driver.declare(&spec("first")).await.unwrap();
    proxy.freeze();
    // Three at once: the first waits out its limit, the two behind it get its failure.
    let started = Instant::now();
    let declares: Vec<_> = (0..3)
        .map(|n| {
            let (driver, spec) = (std::sync::Arc::clone(&driver), spec(&format!("q{n}")));
            tokio::spawn(async move { driver.declare(&spec).await })
        })
        .collect();
    for declare in declares {
        let declared = within("a declare on the hung broker", declare)
            .await
            .unwrap();
        assert!(declared.expect_err("the broker is hung").retryable());
    }
    let took = started.elapsed();
    assert!(
        proxy.withheld() > 0,
        "the broker's answers were not withheld"
    );
    assert!(
        took < Duration::from_secs(15),
        "three declares took {took:?}"
    );
    // Three more, and a close while they wait: it ends them, and does not wait for
    // their time limits.
    let proxy = std::sync::Arc::new(proxy);
    let withheld = proxy.withheld();
    let declares: Vec<_> = (0..3)
        .map(|n| {
            let (driver, spec) = (std::sync::Arc::clone(&driver), spec(&format!("r{n}")));
            tokio::spawn(async move { driver.declare(&spec).await })
        })
        .collect();
    // The first is waiting on the broker: its connection's opening was withheld.
    let limit = Duration::from_secs(10);
    assert!(
        proxy
            .wait_async(move |p| p.wait_withheld(withheld + 1, limit))
            .await
    );
    let closing = Instant::now();
    within("the close", driver.close()).await.unwrap();
    for declare in declares {
        let declared = within("a declare cut by the close", declare).await.unwrap();
        declared.expect_err("the driver closed");
    }
    let took = closing.elapsed();
    assert!(
        took < Duration::from_secs(7),
        "the close and its waiters took {took:?}"
    );
}

/// Sends `message` and fails the test unless the broker accepts it.
async fn send_accepted<T: fe2o3_amqp::types::messaging::SerializableBody>(
    sender: &mut fe2o3_amqp::Sender,
    message: fe2o3_amqp::types::messaging::Message<T>,
) {
    let outcome = sender.send(message).await.expect("sent");
    outcome.accepted_or_else(|o| o).expect("accepted");
}

/// Bodies another client sends that no codec reads: a value nested past the limit
/// arrives with the bytes it came in, a value the link cannot decode at all (a
/// described value whose value is described) is rejected, once, and the consumer goes
/// on with the next message; before, that one made the link re-attach and take it
/// again, for ever.
async fn bodies_no_codec_reads_arrive_as_they_came_and_undecodable_ones_are_rejected() {
    use fe2o3_amqp::types::messaging::{AmqpValue, Data, Message as AmqpMessage, Properties};
    use fe2o3_amqp::types::primitives::{LazyValue, Value};
    use fe2o3_amqp::{Sender, Session};
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;

    let driver = support::rabbit_driver(Profile::RabbitmqV1).await;
    let name = format!("amqp10-tests-odd-bodies-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    let spec = QueueSpec::new(id.clone())
        .with_name(name.clone())
        .with_durable(false);
    driver.declare(&spec).await.unwrap();
    let mut connection = queue_fixtures::raw_amqp10::open("odd-bodies", support::RABBIT_URL)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut sender = Sender::attach(&mut session, "odd-bodies", format!("/queue/{name}"))
        .await
        .unwrap();
    // 200 lists, each holding the next, around an empty one (`list32`s).
    let depth = 200;
    let mut deep = Vec::new();
    for level in (1..=depth).rev() {
        deep.push(0xd0);
        deep.extend_from_slice(&(9 * level - 4u32).to_be_bytes());
        deep.extend_from_slice(&1u32.to_be_bytes());
    }
    deep.push(0x45);
    // A described value (descriptor 1) whose value is described (descriptor 2).
    let described = |code: u64, value: Value| {
        Value::Described(Box::new(Described {
            descriptor: Descriptor::Code(code),
            value,
        }))
    };
    let twice_described = described(1, described(2, Value::Uint(1)));
    let properties = |message_id: &str| {
        Properties::builder()
            .message_id(message_id.to_string())
            .build()
    };
    let deep_value: LazyValue = serde_amqp::from_slice(&deep).unwrap();
    let message = AmqpMessage::builder()
        .properties(properties("deep"))
        .body(AmqpValue(deep_value))
        .build();
    send_accepted(&mut sender, message).await;
    let message = AmqpMessage::builder()
        .properties(properties("twice-described"))
        .body(AmqpValue(twice_described))
        .build();
    send_accepted(&mut sender, message).await;
    let after = AmqpMessage::builder()
        .properties(properties("after"))
        .data(Data(br#"{"n":3}"#.to_vec().into()))
        .build();
    send_accepted(&mut sender, after).await;
    let _ = sender.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;

    let links_before = driver.connection().unwrap().links_attached;
    let mut sub = driver
        .consume(&id, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let first = queue_testkit::next(&mut sub).await;
    assert_eq!(first.message().id, "deep");
    assert_eq!(first.message().content_type, "application/x-amqp-encoded");
    assert!(first.message().body == deep, "not the bytes that were sent");
    let second = queue_testkit::next(&mut sub).await;
    assert_eq!(
        second.message().id,
        "after",
        "the undecodable one came back"
    );
    first.ack().await.unwrap();
    second.ack().await.unwrap();
    // One attach, the consumer's: the undecodable message did not cost the link.
    assert_eq!(
        driver.connection().unwrap().links_attached,
        links_before + 1
    );
    // Settled for good, not released nor held: the queue empties (the broker applies
    // the acks and the reject a moment later; it has no signal to wait on).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let counts = queue_fixtures::rabbitmq::shared_queue_messages().unwrap();
        let left = counts
            .iter()
            .find(|(queue, _)| *queue == name)
            .map(|(_, n)| *n);
        if left == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still in the queue: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    sub.cancel().await.unwrap();
    driver.close().await.unwrap();
}

/// A delivery larger than `max_message_size` is refused before it is held whole, and
/// the re-attaches back off (the Artemis tests run the same check).
async fn a_delivery_over_max_message_size_is_refused_and_reattaches_back_off() {
    support::a_delivery_over_max_message_size_is_refused(
        support::RABBIT_URL.to_string(),
        Profile::RabbitmqV1,
    )
    .await;
}

/// More links than fe2o3-amqp's default `channel_max` allows sessions, on one
/// connection (the Artemis tests run the same check).
async fn links_past_fe2o3s_default_channel_max_share_one_connection() {
    support::links_past_fe2o3s_default_channel_max_share_one_connection(
        support::RABBIT_URL.to_string(),
        Profile::RabbitmqV1,
    )
    .await;
}

queue_testkit::broker_tests! {
    unavailable: queue_fixtures::rabbitmq::shared_unavailable();
    async: [
        a_url_list_connects_to_the_first_node_that_answers,
        wrong_password_is_refused_without_showing_it,
        refused_port_is_internal_retryable_without_the_password,
        options_rabbitmq_3_cannot_honour_are_invalid,
        a_durability_clash_is_already_exists,
        acks_handed_over_before_a_cancel_are_sent,
        an_ack_of_a_lost_link_is_refused,
        an_ack_while_a_cancel_waits_for_the_broker_is_refused,
        a_silent_broker_is_noticed_within_the_idle_timeout,
        a_broker_that_stops_reading_is_noticed_within_the_idle_timeout,
        a_queue_deleted_under_its_publisher_comes_back_within_seconds,
        a_publish_given_up_during_a_declaration_is_not_sent_late,
        a_publish_given_up_waiting_for_credit_is_not_sent_late,
        a_publish_to_a_hung_broker_fails_within_its_limit,
        a_full_window_lost_with_its_connection_does_not_stall_publishing,
        callers_queued_behind_a_hung_broker_share_its_failure_and_a_close_ends_them,
        bodies_no_codec_reads_arrive_as_they_came_and_undecodable_ones_are_rejected,
        a_delivery_over_max_message_size_is_refused_and_reattaches_back_off,
        links_past_fe2o3s_default_channel_max_share_one_connection,
        a_queue_declared_and_consumed_on_another_runtime_outlives_it,
        a_url_path_names_the_rabbitmq_vhost,
        a_refused_reattach_backs_off_and_fails_publishes_meanwhile,
    ];
    sync: [unanswered_ends_and_closes_leave_nothing_spinning];
}
