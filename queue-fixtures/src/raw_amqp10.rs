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

/// Opens an AMQP 1.0 connection to `127.0.0.1:port` with SASL PLAIN, `TCP_NODELAY`
/// set.
///
/// ```no_run
/// # async fn example() -> Result<(), String> {
/// let mut connection = queue_fixtures::raw_amqp10::open("bench-raw", 6672, "guest", "guest").await?;
/// let _ = connection.close().await;
/// # Ok(())
/// # }
/// ```
pub async fn open(
    container_id: &str,
    port: u16,
    username: &str,
    password: &str,
) -> Result<ConnectionHandle<()>, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
    fe2o3_amqp::Connection::builder()
        .container_id(container_id)
        .hostname("127.0.0.1")
        .sasl_profile(SaslProfile::Plain {
            username: username.to_string(),
            password: password.to_string(),
        })
        .open_with_stream(stream)
        .await
        .map_err(|e| format!("opening an AMQP 1.0 connection to 127.0.0.1:{port}: {e}"))
}
