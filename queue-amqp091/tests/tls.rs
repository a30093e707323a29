//! Real TLS failures (feature `tls`): an `amqps://` URL pointed at a plain AMQP port,
//! and a broker certificate nobody trusts. Each must fail with a clear error that
//! names the redacted URL and never the password. `.ci/run` runs this with
//! `cargo test -p queue-amqp091 --features tls --test tls`.
#![cfg(feature = "tls")]

mod common;

use std::time::Duration;

use queue_amqp091::{AmqpConfig, AmqpDriver};
use queue_core::testkit::everything_said;
use queue_core::testkit::tls::UntrustedTlsServer;

const SECRET: &str = "tls-secret-9c1e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_a_plain_port_fails_without_showing_the_password() {
    if common::rabbit().await.is_none() {
        return;
    }
    let mut config = AmqpConfig::new(format!("amqps://guest:{SECRET}@127.0.0.1:5672/%2f"));
    config.connection_timeout = Duration::from_secs(5);
    let err = AmqpDriver::connect(config).await.unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(SECRET), "password leaked: {said}");
    assert!(said.contains("amqps://guest:***@127.0.0.1:5672"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_without_showing_the_password() {
    let Some(server) = UntrustedTlsServer::start_or_skip("amqp091 untrusted certificate") else {
        return;
    };
    let port = server.port();
    let mut config = AmqpConfig::new(format!("amqps://app:{SECRET}@127.0.0.1:{port}/%2f"));
    config.connection_timeout = Duration::from_secs(5);
    let err = AmqpDriver::connect(config).await.unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(SECRET), "password leaked: {said}");
    assert!(
        said.contains(&format!("amqps://app:***@127.0.0.1:{port}")),
        "{said}"
    );
    assert!(said.to_lowercase().contains("certificate"), "{said}");
}
