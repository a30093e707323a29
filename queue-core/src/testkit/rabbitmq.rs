//! A private RabbitMQ node for fault tests (feature `testkit`).
//!
//! Fault tests cut connections and stop brokers; doing that to the machine's shared
//! node on 127.0.0.1:5672 would break every other test running against it. A
//! [`PrivateNode`] is a RabbitMQ node of the test's own: its own node name, data
//! directory, Erlang cookie (`HOME`), loopback listener on a free port and
//! distribution port, with the `rabbitmq_amqp1_0` plugin so both AMQP drivers can
//! use it. Dropping the guard stops the node and deletes its directory, also when
//! the test panics.
//!
//! Nodes are started one at a time per test process: each guard holds a process-wide
//! lock, because two Erlang nodes booting at once on a 2-core machine starve each
//! other and the tests' timings with them.
//!
//! The API is blocking (it runs `rabbitmqctl`, ~0.7 s a call); from an async test on a
//! multi-threaded runtime, wrap calls in `tokio::task::block_in_place`.
//!
//! ```no_run
//! use queue_core::testkit::rabbitmq::PrivateNode;
//! let Some(mut node) = PrivateNode::start_or_skip("my_fault_test") else { return };
//! println!("AMQP 0-9-1 at {}", node.amqp091_url());
//! node.close_all_connections();
//! node.stop_app();
//! node.start_app();
//! // dropped: stopped and deleted
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where Debian's package keeps the real scripts. `/usr/sbin/rabbitmq-server` is a
/// wrapper that switches to the `rabbitmq` user when run as root, which would then
/// not be able to use our directory and cookie; the scripts here run as the caller.
const DEFAULT_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";

/// How long a node may take to open its listener (a cold boot is ~5 s here; CI
/// machines under load can be much slower).
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// One node at a time per process (see the module docs).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
static NEXT_NODE: AtomicU64 = AtomicU64::new(0);

/// Whether the tests run in CI, where a missing broker is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The directory with `rabbitmq-server` and `rabbitmqctl`: `RABBITMQ_BIN_DIR`, or
/// Debian's default.
fn bin_dir() -> PathBuf {
    std::env::var_os("RABBITMQ_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR))
}

/// A free port on 127.0.0.1 (free when asked; the node binds it moments later).
pub fn free_port() -> u16 {
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

/// A running RabbitMQ node of the test's own; stopped and deleted on drop.
pub struct PrivateNode {
    name: String,
    port: u16,
    /// The TLS listener's port, for a node started with certificates.
    tls_port: Option<u16>,
    dir: PathBuf,
    child: Child,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl std::fmt::Debug for PrivateNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateNode")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish()
    }
}

impl PrivateNode {
    /// Why a node cannot be started here, if it cannot (RabbitMQ not installed).
    pub fn unavailable() -> Option<String> {
        let server = bin_dir().join("rabbitmq-server");
        (!server.exists()).then(|| {
            format!(
                "RabbitMQ is not installed ({} is missing; set RABBITMQ_BIN_DIR)",
                server.display()
            )
        })
    }

    /// Starts a node on a free port, or returns `None` after printing
    /// `skipped: <test>: <reason>` when RabbitMQ is not installed. In CI (`CI=true`)
    /// a missing RabbitMQ fails the test instead.
    pub fn start_or_skip(test: &str) -> Option<PrivateNode> {
        Self::start_on_or_skip(test, free_port())
    }

    /// Like [`PrivateNode::start_or_skip`], on a port the test chose (to start a broker
    /// where a client has been waiting for one).
    pub fn start_on_or_skip(test: &str, port: u16) -> Option<PrivateNode> {
        Self::can_start_or_skip(test).then(|| Self::start_on(port))
    }

    /// Whether a node can be started here; if not, prints `skipped: <test>: <reason>`,
    /// or fails the test in CI (`CI=true`).
    fn can_start_or_skip(test: &str) -> bool {
        let Some(reason) = Self::unavailable() else {
            return true;
        };
        assert!(!in_ci(), "{test}: {reason} (CI=true)");
        println!("skipped: {test}: {reason}");
        false
    }

    /// Starts a node listening on 127.0.0.1:`port` and waits until it accepts
    /// connections. Panics (with the node's log) when it does not come up.
    pub fn start_on(port: u16) -> PrivateNode {
        Self::start(port, None)
    }

    fn start(port: u16, certificates: Option<&super::tls::TestCertificates>) -> PrivateNode {
        let one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("queuetest{pid}x{n}@localhost");
        let dist_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let dir = std::env::temp_dir().join(format!("queue-rabbitmq-node-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("node directory");
        let mut config =
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n");
        let tls_port = certificates.map(|c| {
            let tls_port = loop {
                let p = free_port();
                if p != port && p != dist_port {
                    break p;
                }
            };
            config.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                c.ca_file().display(),
                c.cert_file().display(),
                c.key_file().display()
            ));
            tls_port
        });
        std::fs::write(dir.join("rabbitmq.conf"), config).expect("node config");
        // AMQP 1.0 shares the 0-9-1 listener, so one node serves both drivers.
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_amqp1_0].\n").expect("plugins file");
        // An empty env file: the package's /etc/rabbitmq/rabbitmq-env.conf would
        // otherwise override our node name and paths.
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("env file");
        let log = std::fs::File::create(dir.join("server.out")).expect("node log");
        let mut cmd = Command::new(bin_dir().join("rabbitmq-server"));
        env(&mut cmd, &name, &dir, port, dist_port);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("node log"))
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server starts");
        let mut node = PrivateNode {
            name,
            port,
            tls_port,
            dir,
            child,
            _one_at_a_time: one_at_a_time,
        };
        node.wait_ready();
        node
    }

    /// The AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node name, for `rabbitmqctl -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`, for the AMQP 0-9-1 driver.
    pub fn amqp091_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT`, for the AMQP 1.0 driver.
    pub fn amqp10_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}", self.port)
    }

    /// The TLS listener's port on 127.0.0.1, for a node started with certificates.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// Whether the node's listeners (TLS too, if it has one) accept connections.
    pub fn port_open(&self) -> bool {
        port_open(self.port) && self.tls_port.is_none_or(port_open)
    }

    /// Waits until the listener accepts connections. `rabbitmq-diagnostics ping`
    /// passes before the listener opens, and the listener is the last thing a boot
    /// (or `start_app`) opens, so the port is the signal.
    pub fn wait_ready(&mut self) {
        let started = Instant::now();
        while !self.port_open() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("rabbitmq-server exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                started.elapsed() < BOOT_LIMIT,
                "the private RabbitMQ did not open 127.0.0.1:{} within {BOOT_LIMIT:?}:\n{}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines the node printed, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `rabbitmqctl -n NODE ARGS` against this node only; panics if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(bin_dir().join("rabbitmqctl"));
        env(&mut cmd, &self.name, &self.dir, self.port, 0);
        let out = cmd
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every queue on the node with its message count, ready plus unacknowledged
    /// (`rabbitmqctl list_queues name messages`): what AMQP's passive declare cannot
    /// tell, since it counts only ready messages.
    pub fn queue_messages(&self) -> Vec<(String, u64)> {
        self.ctl(&[
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .lines()
        .filter_map(|line| {
            let (name, count) = line.trim_end().rsplit_once(char::is_whitespace)?;
            Some((name.trim_end().to_string(), count.parse().ok()?))
        })
        .collect()
    }

    /// `rabbitmqctl close_all_connections`: every client connection is cut at once.
    pub fn close_all_connections(&self) {
        self.ctl(&["close_all_connections", "fault test"]);
    }

    /// `rabbitmqctl stop_app`: the broker application stops (connections cut, listener
    /// closed) while the Erlang node stays up.
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
        assert!(!self.port_open(), "stop_app left the listener open");
    }

    /// `rabbitmqctl start_app`, then waits until the listener accepts connections.
    pub fn start_app(&mut self) {
        self.ctl(&["start_app"]);
        self.wait_ready();
    }

    /// `stop_app`, an outage of `outage` (the clients must ride it out), `start_app`.
    pub fn stop_app_then_start(&mut self, outage: Duration) {
        self.stop_app();
        std::thread::sleep(outage);
        self.start_app();
    }
}

/// A private node with a TLS listener whose certificate a fresh private CA signed:
/// what a TLS test needs to connect, trusting that CA.
pub struct TlsNode {
    // Declared first so that it is dropped (stopped) before its certificates are deleted.
    node: PrivateNode,
    certificates: super::tls::TestCertificates,
}

impl TlsNode {
    /// Makes the certificates and starts the node, or returns `None` after printing
    /// why not (failing instead under `CI=true`, as [`PrivateNode::start_or_skip`]).
    /// Blocking: call it from `tokio::task::block_in_place` in async tests.
    pub fn start_or_skip(test: &str) -> Option<TlsNode> {
        if !PrivateNode::can_start_or_skip(test) {
            return None;
        }
        let certificates = super::tls::TestCertificates::generate_or_skip(test)?;
        let node = PrivateNode::start(free_port(), Some(&certificates));
        Some(TlsNode { node, certificates })
    }

    /// The port of the node's TLS listener on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.node
            .tls_port()
            .expect("a TlsNode is started with a TLS listener")
    }

    /// The CA certificate (PEM) a client must trust to accept the node's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.certificates.ca_file()
    }
}

/// The environment that makes `rabbitmq-server` / `rabbitmqctl` use this node's files
/// and nothing of the machine's own node.
fn env(cmd: &mut Command, name: &str, dir: &Path, port: u16, dist_port: u16) {
    let d = |f: &str| dir.join(f);
    cmd.env("HOME", dir) // a private Erlang cookie, shared with our rabbitmqctl calls
        .env("RABBITMQ_NODENAME", name)
        .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
        .env("RABBITMQ_LOG_BASE", d("log"))
        .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
        .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
        .env("RABBITMQ_PID_FILE", d("node.pid"))
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}",
        );
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let mut cmd = Command::new(bin_dir().join("rabbitmqctl"));
        env(&mut cmd, &self.name, &self.dir, self.port, 0);
        let _ = cmd
            .arg("-n")
            .arg(&self.name)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // `rabbitmq-server` is a script whose child is the Erlang VM: if `stop` did not
        // work, killing the script alone would leave the VM running.
        if let Some(vm) = std::fs::read_to_string(self.dir.join("node.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            // Still our node's VM (not a process that reused its pid)? Its command
            // line carries `-home <our directory>`.
            && std::fs::read(format!("/proc/{vm}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&*self.dir.to_string_lossy())
            })
        {
            let _ = Command::new("kill")
                .args(["-KILL", &vm.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
