//! TLS for real (feature `tls`): messages over a private RabbitMQ node's TLS listener
//! whose certificate comes from a CA the driver is told to trust; and the failures, an
//! `amqps://` URL pointed at a plain AMQP port and a certificate nobody trusts, each
//! with a clear error that names the redacted URL and never the password. Built with
//! the crate's `tls` feature, which the runtime turns on.

mod common;

use std::time::Duration;

use std::sync::Arc;

use queue_amqp091::{Amqp091Config, Amqp091Driver, TlsConfig};
use queue_core::Driver;
use queue_fixtures::certs::UntrustedTlsServer;
use queue_fixtures::rabbitmq::TlsNode;
use queue_testkit::conformance::three_messages_are_delivered_exactly_once;
use queue_testkit::{TestContext, everything_said};

const SECRET: &str = "tls-secret-9c1e";

async fn messages_flow_over_tls_to_a_broker_of_a_trusted_private_ca() {
    let node = tokio::task::block_in_place(TlsNode::start);
    let port = node.port();
    let mut config = Amqp091Config::new(format!("amqps://guest:guest@127.0.0.1:{port}/%2f"));
    config.tls = Some(TlsConfig {
        ca_file: Some(node.ca_file()),
        ..TlsConfig::default()
    });
    let driver = Arc::new(
        Amqp091Driver::connect(config)
            .await
            .expect("connects over TLS"),
    );
    three_messages_are_delivered_exactly_once(&TestContext::new(driver.clone())).await;
    driver.close().await.expect("closes");
    tokio::task::block_in_place(|| drop(node));
}

async fn amqps_to_a_plain_port_fails_without_showing_the_password() {
    let mut config = Amqp091Config::new(format!("amqps://guest:{SECRET}@127.0.0.1:5672/%2f"));
    config.connection_timeout = Duration::from_secs(5);
    let err = Amqp091Driver::connect(config).await.unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(SECRET), "password leaked: {said}");
    assert!(said.contains("amqps://guest:***@127.0.0.1:5672"), "{said}");
}

async fn an_untrusted_certificate_fails_without_showing_the_password() {
    let server = tokio::task::block_in_place(UntrustedTlsServer::start);
    let port = server.port();
    let mut config = Amqp091Config::new(format!("amqps://app:{SECRET}@127.0.0.1:{port}/%2f"));
    config.connection_timeout = Duration::from_secs(5);
    let err = Amqp091Driver::connect(config).await.unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(SECRET), "password leaked: {said}");
    assert!(
        said.contains(&format!("amqps://app:***@127.0.0.1:{port}")),
        "{said}"
    );
    assert!(said.to_lowercase().contains("certificate"), "{said}");
}

queue_testkit::broker_tests! {
    unavailable: TlsNode::unavailable().or_else(queue_fixtures::rabbitmq::shared_unavailable);
    async: [
        messages_flow_over_tls_to_a_broker_of_a_trusted_private_ca,
        amqps_to_a_plain_port_fails_without_showing_the_password,
        an_untrusted_certificate_fails_without_showing_the_password,
    ];
    sync: [];
}
