//! Real TLS failures (feature `tls`): an `amqps://` URL pointed at a plain AMQP port,
//! and a broker certificate nobody trusts. Each must fail with a clear error that
//! names the redacted URL and never the password. `.ci/run` runs this with
//! `cargo test -p queue-amqp10 --features tls --test tls`.
#![cfg(feature = "tls")]

mod support;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::testkit::everything_said;
use queue_core::testkit::tls::UntrustedTlsServer;

const SECRET: &str = "tls-secret-4b7d";

#[tokio::test]
async fn amqps_to_a_plain_port_fails_without_showing_the_password() {
    if support::rabbit_driver(Profile::RabbitmqV1).await.is_none() {
        return;
    }
    let url = format!("amqps://guest:{SECRET}@127.0.0.1:5672");
    let err = Amqp10Driver::connect(Amqp10Config::new(url, Profile::RabbitmqV1))
        .await
        .unwrap_err();
    let said = everything_said(&err);
    assert!(!said.contains(SECRET), "password leaked: {said}");
    assert!(said.contains("amqps://guest:***@127.0.0.1:5672"), "{said}");
}

#[tokio::test]
async fn an_untrusted_certificate_fails_without_showing_the_password() {
    let Some(server) = UntrustedTlsServer::start_or_skip("amqp10 untrusted certificate") else {
        return;
    };
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
