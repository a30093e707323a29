//! TLS for real (feature `tls`): messages over a private RabbitMQ node's TLS listener
//! whose certificate comes from a CA the driver is told to trust (`tls.ca_file`); and
//! the failures, an `amqps://` URL pointed at a plain AMQP port and a certificate
//! nobody trusts, each with a clear error that names the redacted URL and never the
//! password. Built with the crate's `tls` feature, which the runtime turns on.

mod support;

use std::sync::Arc;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile, TlsConfig};
use queue_core::Driver;
use queue_fixtures::certs::UntrustedTlsServer;
use queue_fixtures::rabbitmq::TlsNode;
use queue_testkit::conformance::three_messages_are_delivered_exactly_once;
use queue_testkit::{TestContext, everything_said};

const SECRET: &str = "tls-secret-4b7d";

async fn messages_flow_over_tls_to_a_broker_of_a_trusted_private_ca() {
    let node = tokio::task::block_in_place(TlsNode::start);
    let port = node.port();
    let mut config = Amqp10Config::new(
        format!("amqps://guest:guest@127.0.0.1:{port}"),
        Profile::RabbitmqV1,
    );
    config.tls = Some(TlsConfig {
        ca_file: Some(node.ca_file()),
        ..TlsConfig::default()
    });
    let driver = Arc::new(
        Amqp10Driver::connect(config)
            .await
            .expect("connects over TLS"),
    );
    three_messages_are_delivered_exactly_once(&TestContext::new(driver.clone())).await;
    driver.close().await.expect("closes");
    tokio::task::block_in_place(|| drop(node));
}

async fn amqps_to_a_plain_port_fails_without_showing_the_password() {
    let url = format!("amqps://guest:{SECRET}@127.0.0.1:5672");
    let err = Amqp10Driver::connect(Amqp10Config::new(url, Profile::RabbitmqV1))
        .await
        .unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(SECRET), "password leaked: {said}");
    assert!(said.contains("amqps://guest:***@127.0.0.1:5672"), "{said}");
}

async fn an_untrusted_certificate_fails_without_showing_the_password() {
    let server = tokio::task::block_in_place(UntrustedTlsServer::start);
    let port = server.port();
    let url = format!("amqps://app:{SECRET}@127.0.0.1:{port}");
    let err = Amqp10Driver::connect(Amqp10Config::new(url, Profile::Generic))
        .await
        .unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(SECRET), "password leaked: {said}");
    assert!(
        said.contains(&format!("amqps://app:***@127.0.0.1:{port}")),
        "{said}"
    );
    assert!(said.to_lowercase().contains("certificate"), "{said}");
}

async fn a_ca_file_without_certificates_is_invalid_and_named() {
    let dir = std::env::temp_dir().join(format!("queue-amqp10-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("ca.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    for ca_file in [not_pem.clone(), dir.join("missing.pem")] {
        let mut config = Amqp10Config::new(
            format!("amqps://app:{SECRET}@127.0.0.1:5671"),
            Profile::Generic,
        );
        config.tls = Some(TlsConfig {
            ca_file: Some(ca_file.clone()),
            ..TlsConfig::default()
        });
        let err = Amqp10Driver::connect(config).await.unwrap_err();
        assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
        let said = everything_said(&err);
        assert!(said.contains("tls.ca_file"), "{said}");
        assert!(said.contains(&ca_file.display().to_string()), "{said}");
        assert!(!said.contains(SECRET), "password leaked: {said}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

queue_testkit::broker_tests! {
    unavailable: TlsNode::unavailable().or_else(queue_fixtures::rabbitmq::shared_unavailable);
    async: [
        messages_flow_over_tls_to_a_broker_of_a_trusted_private_ca,
        amqps_to_a_plain_port_fails_without_showing_the_password,
        an_untrusted_certificate_fails_without_showing_the_password,
        a_ca_file_without_certificates_is_invalid_and_named,
    ];
    sync: [];
}
