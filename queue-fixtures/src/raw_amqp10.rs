//! A raw fe2o3-amqp connection for the benches' baselines, opened as the AMQP 1.0
//! driver opens its own: on a TCP stream with `TCP_NODELAY`.
//!
//! `fe2o3_amqp::Connection::open(url)` leaves Nagle's algorithm on. A receiver's
//! credit flow (a small frame) then waits for the broker's delayed ACK before it
//! leaves: on ActiveMQ Artemis that stalled a raw receiver with credit 1000 for about
//! 40 ms every 1000 deliveries, six times slower than the driver (docs/performance.md,
//! "Broker drivers"). A baseline must be what a careful user of the client gets.

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;

/// Opens an AMQP 1.0 connection to `url` (`amqp://user:password@127.0.0.1:port`, as
/// the fixtures' shared URLs are) with SASL PLAIN, `TCP_NODELAY` set. Any host but
/// 127.0.0.1 is refused: the benches measure loopback brokers only.
///
/// ```no_run
/// # async fn example() -> Result<(), String> {
/// let url = queue_fixtures::artemis::shared_url();
/// let mut connection = queue_fixtures::raw_amqp10::open("bench-raw", &url).await?;
/// let _ = connection.close().await;
/// # Ok(())
/// # }
/// ```
pub async fn open(container_id: &str, url: &str) -> Result<ConnectionHandle<()>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    if parsed.scheme() != "amqp" || parsed.host_str() != Some("127.0.0.1") {
        return Err(format!("{url}: only amqp://…@127.0.0.1 is opened here"));
    }
    let port = parsed.port().unwrap_or(5672);
    let decoded = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|e| format!("{url}: {e}"))
    };
    let username = decoded(parsed.username())?;
    let password = decoded(parsed.password().unwrap_or(""))?;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
    fe2o3_amqp::Connection::builder()
        .container_id(container_id)
        .hostname("127.0.0.1")
        .sasl_profile(SaslProfile::Plain { username, password })
        .open_with_stream(stream)
        .await
        .map_err(|e| format!("opening an AMQP 1.0 connection to 127.0.0.1:{port}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::open;

    fn refused(url: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        match rt.block_on(open("test", url)) {
            Ok(_) => panic!("{url} was opened"),
            Err(e) => e,
        }
    }

    #[test]
    fn only_loopback_amqp_urls_are_opened() {
        for url in [
            "amqp://guest:guest@example.com:5672",
            "amqp://guest:guest@localhost:5672",
            "amqps://guest:guest@127.0.0.1:5671",
        ] {
            let e = refused(url);
            assert!(e.contains("only amqp://…@127.0.0.1"), "{url}: {e}");
        }
        assert!(refused("not a url").starts_with("not a url: "));
    }
}
