//! RabbitMQ: the machine's shared node, and private nodes for fault and TLS tests.
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
//! use queue_fixtures::rabbitmq::PrivateNode;
//! let mut node = PrivateNode::start().expect("RabbitMQ is installed");
//! println!("AMQP 0-9-1 at {}", node.amqp091_url());
//! node.close_all_connections();
//! node.stop_app();
//! node.start_app();
//! // dropped: stopped and deleted
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use queue_testkit::{Fault, Outage};

use crate::certs::TestCertificates;
use crate::{free_port, port_open};

/// The machine's shared node (`.ci/start-brokers` starts it), for AMQP 0-9-1.
pub const SHARED_AMQP091_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The machine's shared node, for AMQP 1.0 (the `rabbitmq_amqp1_0` plugin).
pub const SHARED_AMQP10_URL: &str = "amqp://guest:guest@127.0.0.1:5672";

/// Makes sure the shared node runs on 127.0.0.1:5672 with its AMQP 1.0 plugin:
/// installs RabbitMQ (and Qpid Proton's Python client, which the AMQP 1.0 tests use)
/// with apt-get when missing, starts it detached when nothing listens, and waits for
/// the port (`rabbitmq-diagnostics ping` answers before the listener opens).
pub fn ensure_shared() -> Result<(), String> {
    let mut missing = Vec::new();
    if !Path::new("/usr/sbin/rabbitmq-server").exists() {
        missing.push("rabbitmq-server");
    }
    let has_proton = Command::new("/usr/bin/python3")
        .args(["-c", "import proton"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_proton {
        missing.push("python3-qpid-proton");
    }
    if !missing.is_empty() {
        println!("installing {}", missing.join(" "));
        let updated = Command::new("apt-get").args(["update", "-qq"]).status();
        let installed = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
        if !updated.is_ok_and(|s| s.success()) || !installed.is_ok_and(|s| s.success()) {
            return Err(format!("apt-get install {} failed", missing.join(" ")));
        }
    }
    let _ = Command::new("rabbitmq-plugins")
        .args(["enable", "--offline", "rabbitmq_amqp1_0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !port_open(5672) {
        println!("starting RabbitMQ (rabbitmq-server -detached)");
        let started = Command::new("rabbitmq-server")
            .arg("-detached")
            .status()
            .map_err(|e| format!("rabbitmq-server: {e}"))?;
        if !started.success() {
            return Err(format!("rabbitmq-server -detached failed: {started}"));
        }
    }
    if !crate::wait_for_port(5672, BOOT_LIMIT) {
        return Err(format!(
            "RabbitMQ did not open 127.0.0.1:5672 within {BOOT_LIMIT:?}"
        ));
    }
    // The plugin may have been enabled offline while the node was already running.
    let online = Command::new("rabbitmq-plugins")
        .args(["enable", "rabbitmq_amqp1_0"])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("rabbitmq-plugins: {e}"))?;
    if !online.success() {
        return Err("rabbitmq-plugins enable rabbitmq_amqp1_0 failed".into());
    }
    Ok(())
}

/// Stops the shared node.
pub fn stop_shared() -> Result<(), String> {
    let stopped = Command::new("rabbitmqctl")
        .arg("stop")
        .status()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if stopped.success() {
        Ok(())
    } else {
        Err(format!("rabbitmqctl stop failed: {stopped}"))
    }
}

/// Why the shared node cannot be used here, if it cannot.
pub fn shared_unavailable() -> Option<String> {
    (!port_open(5672)).then(|| {
        "RabbitMQ is not reachable on 127.0.0.1:5672 (`.ci/start-brokers` starts it)".to_string()
    })
}

/// Where Debian's package keeps the real scripts. `/usr/sbin/rabbitmq-server` is a
/// wrapper that switches to the `rabbitmq` user when run as root, which would then
/// not be able to use our directory and cookie; the scripts here run as the caller.
const DEFAULT_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";

/// How long a node may take to open its listener (a cold boot is ~5 s here; CI
/// machines under load can be much slower).
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// One node at a time per process (see the module docs): a slot a node holds until
/// it is dropped. A plain mutex guard would tie the node to one thread.
static SLOT: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());
static NEXT_NODE: AtomicU64 = AtomicU64::new(0);

/// The node slot, held by a running node.
struct Slot;

impl Slot {
    fn take() -> Slot {
        let (busy, freed) = &SLOT;
        let mut busy = busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy {
            busy = freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy = true;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (busy, freed) = &SLOT;
        *busy.lock().unwrap_or_else(|p| p.into_inner()) = false;
        freed.notify_one();
    }
}

/// The directory with `rabbitmq-server` and `rabbitmqctl`: `RABBITMQ_BIN_DIR`, or
/// Debian's default.
fn bin_dir() -> PathBuf {
    std::env::var_os("RABBITMQ_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR))
}

/// A running RabbitMQ node of the test's own; stopped and deleted on drop.
pub struct PrivateNode {
    name: String,
    port: u16,
    /// The TLS listener's port, for a node started with certificates.
    tls_port: Option<u16>,
    dist_port: u16,
    dir: PathBuf,
    child: Child,
    _slot: Slot,
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

    /// Starts a node on a free port, or says why it cannot here. Blocking.
    pub fn start() -> Result<PrivateNode, String> {
        match Self::unavailable() {
            Some(reason) => Err(reason),
            None => Ok(Self::start_on(free_port())),
        }
    }

    /// Starts a node listening on 127.0.0.1:`port` and waits until it accepts
    /// connections. Panics (with the node's log) when it does not come up.
    pub fn start_on(port: u16) -> PrivateNode {
        Self::boot(port, None)
    }

    fn boot(port: u16, certificates: Option<&TestCertificates>) -> PrivateNode {
        let slot = Slot::take();
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
        let child = spawn_server(&name, &dir, port, dist_port);
        let mut node = PrivateNode {
            name,
            port,
            tls_port,
            dist_port,
            dir,
            child,
            _slot: slot,
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

    /// Kills the node's Erlang VM with SIGKILL (no goodbye to any client, nothing
    /// flushed but what was already on disk), then starts it again from its data
    /// directory and waits until it accepts connections.
    pub fn kill_and_restart(&mut self) {
        self.kill_vm();
        let _ = self.child.wait();
        assert!(!self.port_open(), "the killed node still listens");
        self.child = spawn_server(&self.name, &self.dir, self.port, self.dist_port);
        self.wait_ready();
    }

    /// SIGKILL to the node's VM, if it is still ours.
    fn kill_vm(&self) {
        // `rabbitmq-server` is a script whose child is the Erlang VM: killing the
        // script alone would leave the VM running.
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
    }
}

/// What each fault is on a private node: `close_all_connections`, `stop_app` and
/// `start_app` after 2 s, SIGKILL of the VM and a restart from its data.
impl Outage for PrivateNode {
    fn inflict(&mut self, fault: Fault) -> Result<(), String> {
        match fault {
            Fault::CutConnections => self.close_all_connections(),
            Fault::StopStart => self.stop_app_then_start(Duration::from_secs(2)),
            Fault::Kill => self.kill_and_restart(),
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{}\nlog:\n{}",
            self.ctl(&[
                "list_queues",
                "name",
                "durable",
                "messages_ready",
                "messages_unacknowledged",
                "consumers"
            ]),
            self.log_tail()
        )
    }
}

/// Starts `rabbitmq-server` for a node, its output in the node's `server.out`.
fn spawn_server(name: &str, dir: &Path, port: u16, dist_port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.out"))
        .expect("node log");
    let mut cmd = Command::new(bin_dir().join("rabbitmq-server"));
    env(&mut cmd, name, dir, port, dist_port);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("node log"))
        .stderr(log)
        .spawn()
        .expect("rabbitmq-server starts")
}

/// A private node with a TLS listener whose certificate a fresh private CA signed:
/// what a TLS test needs to connect, trusting that CA.
pub struct TlsNode {
    // Declared first so that it is dropped (stopped) before its certificates are deleted.
    node: PrivateNode,
    certificates: TestCertificates,
}

impl TlsNode {
    /// Why a TLS node cannot start here (no RabbitMQ, no openssl), if it cannot.
    pub fn unavailable() -> Option<String> {
        PrivateNode::unavailable().or_else(crate::certs::unavailable)
    }

    /// Makes the certificates and starts the node. Blocking: call it from
    /// `tokio::task::block_in_place` in async tests.
    pub fn start() -> TlsNode {
        let certificates = TestCertificates::generate();
        let node = PrivateNode::boot(free_port(), Some(&certificates));
        TlsNode { node, certificates }
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
        // If `stop` did not work.
        self.kill_vm();
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
