//! A TLS endpoint whose certificate nobody trusts (feature `testkit`).
//!
//! Drivers must fail clearly, and without showing the password, when a broker's TLS
//! certificate cannot be verified. Testing that needs a real TLS handshake with a
//! certificate no trust store knows: [`UntrustedTlsServer`] runs `openssl s_server`
//! with a throwaway self-signed certificate on a free loopback port. Dropping the
//! guard stops the server and deletes the certificate, also when the test panics.
//!
//! ```no_run
//! use queue_core::testkit::tls::UntrustedTlsServer;
//! let Some(server) = UntrustedTlsServer::start_or_skip("my_tls_test") else { return };
//! let url = format!("amqps://app:secret@127.0.0.1:{}", server.port());
//! ```

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::rabbitmq::{free_port, in_ci};

/// How long `openssl s_server` may take to listen.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A running `openssl s_server` with a self-signed certificate; stopped on drop.
pub struct UntrustedTlsServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl UntrustedTlsServer {
    /// Starts the server, or returns `None` after printing `skipped: <test>: <reason>`
    /// when the `openssl` command is missing. In CI (`CI=true`) that fails the test.
    pub fn start_or_skip(test: &str) -> Option<UntrustedTlsServer> {
        let has_openssl = Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_openssl {
            let reason = "the `openssl` command is not installed";
            assert!(!in_ci(), "{test}: {reason} (CI=true)");
            println!("skipped: {test}: {reason}");
            return None;
        }
        Some(Self::start())
    }

    /// Makes a certificate and starts the server; panics with openssl's output if
    /// either fails.
    fn start() -> UntrustedTlsServer {
        let dir = std::env::temp_dir().join(format!(
            "queue-untrusted-tls-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the certificate");
        let made = Command::new("openssl")
            .current_dir(&dir)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-subj",
                "/CN=localhost",
                "-days",
                "1",
            ])
            .output()
            .expect("runs openssl req");
        assert!(
            made.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let port = free_port();
        let mut child = Command::new("openssl")
            .current_dir(&dir)
            .args(["s_server", "-www", "-cert", "cert.pem", "-key", "key.pem"])
            .args(["-accept", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts openssl s_server");
        let stdout = child.stdout.take().expect("piped stdout");
        let server = UntrustedTlsServer { child, dir, port };
        // `-www` answers each connection by itself, without reading stdin. s_server
        // prints ACCEPT once it listens, then a report per connection: read
        // until the first and keep draining, so a full pipe never stalls it.
        let (listening, accepted) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ACCEPT") {
                    let _ = listening.send(());
                }
            }
        });
        accepted.recv_timeout(START_LIMIT).unwrap_or_else(|_| {
            panic!("openssl s_server did not listen on 127.0.0.1:{port} within {START_LIMIT:?}")
        });
        server
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for UntrustedTlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
