//! TLS for tests: a throwaway certificate authority, and a TLS
//! endpoint whose certificate nobody trusts.
//!
//! [`TestCertificates`] makes, with the `openssl` command, a private CA and a server
//! certificate it signed for `127.0.0.1` and `localhost`; a [`crate::rabbitmq::PrivateNode`]
//! started with them serves TLS, and a driver told to trust the CA connects.
//! [`UntrustedTlsServer`] runs `openssl s_server` with such a certificate, so a driver
//! that trusts only the usual roots fails the handshake. Both delete their files
//! (and stop the server) on drop, also when the test panics.
//!
//! ```no_run
//! use queue_fixtures::certs::UntrustedTlsServer;
//! let server = UntrustedTlsServer::start();
//! let url = format!("amqps://app:secret@127.0.0.1:{}", server.port());
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::free_port;

/// How long `openssl s_server` may take to listen.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A running `openssl s_server` whose certificate comes from a CA nobody trusts;
/// stopped on drop.
pub struct UntrustedTlsServer {
    child: Child,
    _certificates: TestCertificates,
    port: u16,
}

/// Why TLS tests cannot run here, if they cannot (no `openssl` command).
pub fn unavailable() -> Option<String> {
    let has_openssl = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!has_openssl).then(|| "the `openssl` command is not installed".to_string())
}

/// Runs `openssl ARGS` in `dir`; panics with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = crate::process::output_within(
        Command::new("openssl").current_dir(dir).args(args),
        crate::process::TOOL_LIMIT,
    )
    .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and a server certificate it signed for `127.0.0.1` and `localhost`,
/// as PEM files in a directory of their own (deleted on drop).
pub struct TestCertificates {
    dir: PathBuf,
}

impl TestCertificates {
    /// Makes the certificates (see [`unavailable`] for whether they can be made
    /// here); panics with openssl's output if that fails.
    pub fn generate() -> TestCertificates {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "queue-test-certificates-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the certificates");
        let p256 = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ca = ["req", "-x509", "-keyout", "ca.key", "-out", "ca.pem"];
        let ca_subject = ["-subj", "/CN=queue test CA", "-days", "1"];
        openssl(&dir, &[&ca[..], &p256, &ca_subject].concat());
        let request = ["req", "-keyout", "server.key", "-out", "server.csr"];
        openssl(
            &dir,
            &[&request[..], &p256, &["-subj", "/CN=localhost"]].concat(),
        );
        // A server certificate, not a CA: rustls refuses a CA certificate as a
        // server's own.
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .expect("extensions file");
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "server.ext",
            ],
        );
        TestCertificates { dir }
    }

    /// The CA certificate (PEM): what a client configured to trust it reads.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM), signed by the CA.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server certificate's private key (PEM).
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl UntrustedTlsServer {
    /// Starts the server with a certificate of a fresh private CA (see
    /// [`unavailable`] for whether it can start here); panics with openssl's output
    /// if that fails.
    pub fn start() -> UntrustedTlsServer {
        let certificates = TestCertificates::generate();
        let port = free_port();
        let mut child = Command::new("openssl")
            .arg("s_server")
            // `-www` answers each connection by itself, without reading stdin.
            .arg("-www")
            .arg("-cert")
            .arg(certificates.cert_file())
            .arg("-key")
            .arg(certificates.key_file())
            .args(["-accept", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts openssl s_server");
        let stdout = child.stdout.take().expect("piped stdout");
        let server = UntrustedTlsServer {
            child,
            _certificates: certificates,
            port,
        };
        // s_server prints ACCEPT once it listens, then a report per connection: read
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
    }
}
