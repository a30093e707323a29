//! Loopback ports.

use std::time::{Duration, Instant};

/// A free port on 127.0.0.1 (free when asked; the broker binds it moments later),
/// below the kernel's range of ephemeral ports. A fault test stops a node and starts
/// it again on the same port: a port from the ephemeral range (what binding port 0
/// gives) can meanwhile become the source port of another test's outgoing
/// connection, and the restart then fails with "address already in use".
pub fn free_port() -> u16 {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(first_ephemeral / 2);
    let span = u32::from(first_ephemeral.saturating_sub(low).max(1));
    // Start somewhere different in each process and call, so parallel tests rarely
    // try the same ports.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(NEXT.fetch_add(7_919, std::sync::atomic::Ordering::Relaxed));
    for attempt in 0..span {
        let port = low + ((seed.wrapping_add(attempt) % span) as u16);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .is_ok()
}

/// Waits until 127.0.0.1:`port` accepts connections; `false` after `limit`.
pub fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if port_open(port) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
