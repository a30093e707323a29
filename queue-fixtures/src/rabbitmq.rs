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
//! A [`PrivateCluster`] is three such nodes sharing one Erlang cookie, joined into one
//! RabbitMQ cluster, for tests of failover and quorum queues.
//!
//! Nodes are started one at a time per test process: each guard (a node, or a whole
//! cluster) holds a process-wide lock, because two Erlang nodes booting at once on a
//! 2-core machine starve each other and the tests' timings with them.
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
use crate::process::{TOOL_LIMIT, output_within, wait_or_kill};
use crate::{free_port, port_open};

/// The machine's shared node (`.ci/start-brokers` starts it), for AMQP 0-9-1.
pub const SHARED_AMQP091_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The machine's shared node, for AMQP 1.0 (the `rabbitmq_amqp1_0` plugin).
pub const SHARED_AMQP10_URL: &str = "amqp://guest:guest@127.0.0.1:5672";

/// Every queue on the shared node with its message count, ready plus unacknowledged,
/// as [`PrivateNode::queue_messages`] gives it for a private node.
pub fn shared_queue_messages() -> Result<Vec<(String, u64)>, String> {
    let listed = shared_ctl(&LIST_QUEUE_MESSAGES)?;
    Ok(queue_counts(&listed))
}

/// Runs `rabbitmqctl ARGS` against the shared node and returns what it printed
/// (within [`TOOL_LIMIT`]: the tool's own operation timeout is infinity).
pub fn shared_ctl(args: &[&str]) -> Result<String, String> {
    let out = output_within(Command::new("rabbitmqctl").args(args), TOOL_LIMIT)
        .map_err(|e| format!("rabbitmqctl {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A user of the shared node with every permission on vhost `/`, for one test;
/// deleted when dropped, also when the test panics.
///
/// ```no_run
/// use queue_fixtures::rabbitmq::SharedUser;
/// let user = SharedUser::add("odd@user", "p@ss:word").expect("rabbitmqctl runs");
/// // log in as odd@user; dropped: deleted
/// ```
pub struct SharedUser(String);

impl SharedUser {
    /// Adds the user; an error says what `rabbitmqctl` said.
    pub fn add(name: &str, password: &str) -> Result<SharedUser, String> {
        shared_ctl(&["add_user", name, password])?;
        let user = SharedUser(name.to_string());
        shared_ctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"])?;
        Ok(user)
    }

    /// Sets the user's permissions on `/`: regular expressions of the resources it may
    /// configure, write to and read from (`"^$"`: none).
    pub fn permit(&self, configure: &str, write: &str, read: &str) -> Result<(), String> {
        shared_ctl(&[
            "set_permissions",
            "-p",
            "/",
            &self.0,
            configure,
            write,
            read,
        ])
        .map(|_| ())
    }
}

impl Drop for SharedUser {
    fn drop(&mut self) {
        // Nothing to do about a failure here but leave the user behind.
        let _ = shared_ctl(&["delete_user", &self.0]);
    }
}

/// A vhost of the shared node for one test, on which `guest` has every permission;
/// deleted with all its queues when dropped, also when the test panics.
///
/// ```no_run
/// use queue_fixtures::rabbitmq::SharedVhost;
/// let vhost = SharedVhost::add("returns-test").expect("rabbitmqctl runs");
/// // amqp://guest:guest@127.0.0.1:5672/{vhost.name()}
/// vhost.limit_queues(2).expect("a limit");
/// ```
pub struct SharedVhost(String);

impl SharedVhost {
    /// Adds the vhost; an error says what `rabbitmqctl` said.
    pub fn add(name: &str) -> Result<SharedVhost, String> {
        shared_ctl(&["add_vhost", name])?;
        let vhost = SharedVhost(name.to_string());
        shared_ctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])?;
        Ok(vhost)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Refuses to declare queues past `max` on it (RabbitMQ's `max-queues` limit):
    /// one deleted there cannot be declared again.
    pub fn limit_queues(&self, max: u32) -> Result<(), String> {
        let limit = format!("{{\"max-queues\": {max}}}");
        shared_ctl(&["set_vhost_limits", "-p", &self.0, &limit]).map(drop)
    }

    /// Every queue on it with its message count, as [`shared_queue_messages`] gives
    /// them for vhost `/`.
    pub fn queue_messages(&self) -> Result<Vec<(String, u64)>, String> {
        let [quiet, list, headers, name, messages] = LIST_QUEUE_MESSAGES;
        let listed = shared_ctl(&[quiet, list, "-p", &self.0, headers, name, messages])?;
        Ok(queue_counts(&listed))
    }

    /// Deletes the queue `name` on it.
    pub fn delete_queue(&self, name: &str) -> Result<(), String> {
        shared_ctl(&["delete_queue", "-p", &self.0, name]).map(drop)
    }
}

impl Drop for SharedVhost {
    fn drop(&mut self) {
        // Nothing to do about a failure here but leave the vhost behind.
        let _ = shared_ctl(&["delete_vhost", &self.0]);
    }
}

const LIST_QUEUE_MESSAGES: [&str; 5] = [
    "-q",
    "list_queues",
    "--no-table-headers",
    "name",
    "messages",
];

/// `list_queues name messages` output as pairs.
fn queue_counts(listed: &str) -> Vec<(String, u64)> {
    listed
        .lines()
        .filter_map(|line| {
            let (name, count) = line.trim_end().rsplit_once(char::is_whitespace)?;
            Some((name.trim_end().to_string(), count.parse().ok()?))
        })
        .collect()
}

/// Makes sure the shared node runs on 127.0.0.1:5672 with its AMQP 1.0 plugin:
/// installs RabbitMQ (and Qpid Proton's Python client, which the AMQP 1.0 tests use,
/// and pika, which the tracing test uses) with apt-get when missing, starts it detached when nothing listens, and waits for
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
    // pika, the AMQP 0-9-1 client the runtime's tracing test publishes with.
    let has_pika = Command::new("/usr/bin/python3")
        .args(["-c", "import pika"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_pika {
        missing.push("python3-pika");
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
    /// `None` for a node of a cluster: the cluster holds the slot for all three.
    _slot: Option<Slot>,
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
        Self::try_boot(port, certificates, Some(slot), None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a node; `cookie` is the Erlang cookie it shares with the other nodes of
    /// its cluster (default: one of its own).
    fn try_boot(
        port: u16,
        certificates: Option<&TestCertificates>,
        slot: Option<Slot>,
        cookie: Option<&str>,
    ) -> Result<PrivateNode, String> {
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
        let io = |what: &str, e: std::io::Error| format!("node {name}: {what}: {e}");
        std::fs::create_dir_all(&dir).map_err(|e| io("create its directory", e))?;
        if let Some(cookie) = cookie {
            write_cookie(&dir, cookie).map_err(|e| io("write its Erlang cookie", e))?;
        }
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
        std::fs::write(dir.join("rabbitmq.conf"), config).map_err(|e| io("write its config", e))?;
        // AMQP 1.0 shares the 0-9-1 listener, so one node serves both drivers.
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_amqp1_0].\n")
            .map_err(|e| io("write its plugins file", e))?;
        // An empty env file: the package's /etc/rabbitmq/rabbitmq-env.conf would
        // otherwise override our node name and paths.
        std::fs::write(dir.join("rabbitmq-env.conf"), "")
            .map_err(|e| io("write its env file", e))?;
        let child = try_spawn_server(&name, &dir, port, dist_port)?;
        let mut node = PrivateNode {
            name,
            port,
            tls_port,
            dist_port,
            dir,
            child,
            _slot: slot,
        };
        node.try_wait_ready()?;
        Ok(node)
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
        self.try_wait_ready().unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Self::wait_ready`], saying why it is not ready (with the node's log) instead
    /// of panicking.
    pub fn try_wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        while !self.port_open() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "rabbitmq-server {} exited ({status}):\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if started.elapsed() > BOOT_LIMIT {
                return Err(format!(
                    "the private RabbitMQ {} did not open 127.0.0.1:{} within {BOOT_LIMIT:?}:\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The last lines the node printed, for failure messages.
    ///
    /// The server's output, then the warnings and errors of the node's own log (what
    /// a restart recovered or failed to, when a fault case loses messages).
    pub fn log_tail(&self) -> String {
        let tail = |text: &str, keep: &dyn Fn(&str) -> bool| {
            let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let out = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.join("log").join(format!("{}.log", self.name)))
            .unwrap_or_default();
        format!(
            "{}\nnode log (warnings, errors, recovery):\n{}",
            tail(&out, &|_| true),
            tail(&log, &|l| {
                l.contains("[warning]") || l.contains("[error]") || l.contains("ecover")
            })
        )
    }

    /// Runs `rabbitmqctl -n NODE ARGS` against this node only; panics if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::ctl`], saying why it failed instead of panicking.
    pub fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        self.tool("rabbitmqctl", args)
    }

    /// Runs one of RabbitMQ's command line tools (`rabbitmqctl`, `rabbitmq-queues`)
    /// with `-n NODE ARGS` against this node.
    fn tool(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(bin_dir().join(tool));
        env(&mut cmd, &self.name, &self.dir, self.port, 0);
        cmd.arg("-n").arg(&self.name).args(args);
        let out = output_within(&mut cmd, TOOL_LIMIT)
            .map_err(|e| format!("{tool} {args:?} on {}: {e}", self.name))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} {args:?} on {} failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every queue on the node with its message count, ready plus unacknowledged
    /// (`rabbitmqctl list_queues name messages`): what AMQP's passive declare cannot
    /// tell, since it counts only ready messages.
    pub fn queue_messages(&self) -> Vec<(String, u64)> {
        queue_counts(&self.ctl(&LIST_QUEUE_MESSAGES))
    }

    /// Every client connection is cut at once: `rabbitmqctl close_all_connections`,
    /// and the internal connection behind each AMQP 1.0 session ended too, which
    /// ends the sessions. RabbitMQ 3.x does not list its AMQP 1.0 connections, so
    /// `close_all_connections` alone never reaches an AMQP 1.0 client there.
    pub fn close_all_connections(&self) {
        self.try_close_all_connections()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Self::close_all_connections`], saying why it failed instead of panicking.
    pub fn try_close_all_connections(&self) -> Result<(), String> {
        // One call: each `rabbitmqctl` starts a VM, and the load may be done by a
        // second one.
        self.try_ctl(&[
            "eval",
            r#"rabbit_networking:close_all_connections("fault test"), [exit(P, kill) || P <- rabbit_direct:list()], ok."#,
        ])?;
        Ok(())
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
        self.kill();
        self.restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Kills the node's Erlang VM with SIGKILL and waits until it is gone.
    pub fn kill(&mut self) {
        self.kill_vm();
        assert!(
            wait_or_kill(&mut self.child, BOOT_LIMIT),
            "node {}: the VM outlived SIGKILL (its pid file or command line did not name it); killed its script with what it started",
            self.name
        );
        assert!(!self.port_open(), "the killed node still listens");
    }

    /// Starts a killed node again from its data directory and waits until it accepts
    /// connections.
    pub fn restart(&mut self) -> Result<(), String> {
        self.child = try_spawn_server(&self.name, &self.dir, self.port, self.dist_port)?;
        self.try_wait_ready()
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
            Fault::Kill => {
                // RabbitMQ 3.x keeps queue declarations in Mnesia, whose log reaches
                // the disk a moment later: a durable queue declared a second before a
                // SIGKILL can be gone after the restart, with what was confirmed to it
                // (docs/reliability.md, "Guarantees"). The case tests the messages'
                // durability, so the declarations are synced first.
                self.try_ctl(&["eval", "mnesia:sync_log()."])?;
                self.kill_and_restart();
            }
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
fn try_spawn_server(name: &str, dir: &Path, port: u16, dist_port: u16) -> Result<Child, String> {
    let io = |what: &str, e: std::io::Error| format!("node {name}: {what}: {e}");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.out"))
        .map_err(|e| io("open its log", e))?;
    let mut cmd = Command::new(bin_dir().join("rabbitmq-server"));
    env(&mut cmd, name, dir, port, dist_port);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| io("open its log", e))?)
        .stderr(log)
        .spawn()
        .map_err(|e| io("start rabbitmq-server", e))
}

/// Writes the Erlang cookie the nodes of a cluster share into a node's `HOME`, with
/// the owner-only mode Erlang insists on.
fn write_cookie(home: &Path, cookie: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = home.join(".erlang.cookie");
    std::fs::write(&path, cookie)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
}

/// How many nodes a [`PrivateCluster`] has: the smallest cluster in which a quorum
/// queue survives the loss of a node.
pub const CLUSTER_SIZE: usize = 3;

/// How long a cluster may take to see all its nodes online again.
const ONLINE_LIMIT_SECS: &str = "120";

/// Three private nodes joined into one RabbitMQ cluster: each with its own AMQP port,
/// distribution port and data directory, all sharing one Erlang cookie. Stopped and
/// deleted on drop, also when the test panics. Blocking, like [`PrivateNode`].
///
/// ```no_run
/// use queue_fixtures::rabbitmq::PrivateCluster;
/// let mut cluster = PrivateCluster::start().expect("RabbitMQ is installed");
/// println!("nodes at {:?}", cluster.urls());
/// cluster.stop_app(0).unwrap();
/// cluster.start_app(0).unwrap();
/// cluster.kill(1);
/// cluster.restart(1).unwrap();
/// // dropped: every node stopped and deleted
/// ```
pub struct PrivateCluster {
    // Declared first so that the nodes stop before the slot is given back.
    nodes: Vec<PrivateNode>,
    _slot: Slot,
}

impl std::fmt::Debug for PrivateCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateCluster")
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl PrivateCluster {
    /// Why a cluster cannot be started here, if it cannot (RabbitMQ not installed).
    pub fn unavailable() -> Option<String> {
        PrivateNode::unavailable()
    }

    /// Starts three nodes, one after the other, and joins the second and the third
    /// to the first (`stop_app`, `join_cluster`, `start_app`); returns once the first
    /// sees all three online (`await_online_nodes`) and each accepts connections.
    pub fn start() -> Result<PrivateCluster, String> {
        if let Some(reason) = Self::unavailable() {
            return Err(reason);
        }
        let slot = Slot::take();
        let cookie = format!(
            "QUEUETESTCLUSTER{}X{}",
            std::process::id(),
            NEXT_NODE.load(Ordering::Relaxed)
        );
        let mut nodes = Vec::with_capacity(CLUSTER_SIZE);
        for _ in 0..CLUSTER_SIZE {
            nodes.push(PrivateNode::try_boot(
                free_port(),
                None,
                None,
                Some(&cookie),
            )?);
        }
        let seed = nodes[0].name().to_string();
        for node in &mut nodes[1..] {
            node.try_ctl(&["stop_app"])?;
            node.try_ctl(&["join_cluster", &seed])?;
            node.try_ctl(&["start_app"])?;
            node.try_wait_ready()?;
        }
        let cluster = PrivateCluster { nodes, _slot: slot };
        cluster.await_online(0)?;
        Ok(cluster)
    }

    /// The AMQP 0-9-1 URLs of the nodes, in node order
    /// (`amqp://guest:guest@127.0.0.1:PORT/`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/", n.port()))
            .collect()
    }

    /// Node `i` (0, 1 or 2), for what the cluster's own methods do not cover.
    pub fn node(&self, i: usize) -> &PrivateNode {
        &self.nodes[i]
    }

    /// Node `i`, to strike it.
    pub fn node_mut(&mut self, i: usize) -> &mut PrivateNode {
        &mut self.nodes[i]
    }

    /// The index of the node whose AMQP port is `port`.
    pub fn node_on_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// `rabbitmqctl stop_app` on node `i`: its broker stops (client connections cut,
    /// listener closed, its quorum queue members gone) while its Erlang VM stays up.
    pub fn stop_app(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].try_ctl(&["stop_app"])?;
        if self.nodes[i].port_open() {
            return Err(format!("stop_app left node {i}'s listener open"));
        }
        Ok(())
    }

    /// `rabbitmqctl start_app` on node `i`; returns once it accepts connections and
    /// the cluster sees all its nodes online.
    pub fn start_app(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].try_ctl(&["start_app"])?;
        self.nodes[i].try_wait_ready()?;
        self.await_online(i)
    }

    /// SIGKILL to node `i`'s Erlang VM; returns once it is gone.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts a killed node `i` again from its data directory (it rejoins the
    /// cluster by itself); returns once it accepts connections and the cluster sees
    /// all its nodes online.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].restart()?;
        self.await_online(i)
    }

    /// Waits until node `i` sees every node of the cluster online.
    fn await_online(&self, i: usize) -> Result<(), String> {
        let count = CLUSTER_SIZE.to_string();
        self.nodes[i]
            .try_ctl(&["await_online_nodes", &count, "--timeout", ONLINE_LIMIT_SECS])
            .map(|_| ())
    }

    /// A node that runs its broker, to ask the cluster something.
    fn running(&self) -> Result<&PrivateNode, String> {
        self.nodes
            .iter()
            .find(|n| n.port_open())
            .ok_or_else(|| "no node of the cluster accepts connections".to_string())
    }

    /// The node leading quorum queue `queue` (its broker name), from the cluster's
    /// `list_queues name leader`; `None` while it has no leader.
    pub fn quorum_leader(&self, queue: &str) -> Result<Option<usize>, String> {
        let listed = self.running()?.try_ctl(&[
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "leader",
        ])?;
        let leader = listed.lines().find_map(|line| {
            let (name, leader) = line.trim_end().rsplit_once(char::is_whitespace)?;
            (name.trim_end() == queue).then(|| leader.to_string())
        });
        Ok(leader.and_then(|leader| self.nodes.iter().position(|n| n.name() == leader)))
    }

    /// `rabbitmq-queues quorum_status` of a quorum queue: each member's Raft state,
    /// for the message of a failed test.
    pub fn quorum_status(&self, queue: &str) -> Result<String, String> {
        self.running()?
            .tool("rabbitmq-queues", &["quorum_status", queue])
    }

    /// The node most client connections are on (by the server port they connected
    /// to), from `rabbitmqctl list_connections port`: the node a test's driver uses.
    pub fn node_with_clients(&self) -> Result<Option<usize>, String> {
        let listed =
            self.running()?
                .try_ctl(&["-q", "list_connections", "--no-table-headers", "port"])?;
        let mut counts = [0usize; CLUSTER_SIZE];
        for port in listed.lines().filter_map(|l| l.trim().parse::<u16>().ok()) {
            if let Some(i) = self.node_on_port(port) {
                counts[i] += 1;
            }
        }
        let busiest = (0..CLUSTER_SIZE).max_by_key(|i| counts[*i]);
        Ok(busiest.filter(|i| counts[*i] > 0))
    }

    /// Waits (up to `limit`) until clients have connected to another node than
    /// `gone`: the sign that they failed over.
    fn await_failover(&self, gone: usize, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if self.node_with_clients()?.is_some_and(|i| i != gone) {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!("no client moved off node {gone} within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// What each fault is on a cluster, struck where the clients are: every node closes
/// its client connections; the node most clients are on is stopped (`stop_app`) or
/// SIGKILLed, and started again once the clients have moved to another node.
impl Outage for PrivateCluster {
    fn inflict(&mut self, fault: Fault) -> Result<(), String> {
        if fault == Fault::CutConnections {
            for node in self.nodes.iter().filter(|n| n.port_open()) {
                node.try_close_all_connections()?;
            }
            return Ok(());
        }
        let target = self
            .node_with_clients()?
            .ok_or("no client is connected to the cluster")?;
        if fault == Fault::StopStart {
            self.stop_app(target)?;
        } else {
            self.kill(target);
        }
        self.await_failover(target, Duration::from_secs(60))?;
        if fault == Fault::StopStart {
            self.start_app(target)
        } else {
            self.restart(target)
        }
    }

    fn describe(&self) -> String {
        let queues = self
            .running()
            .and_then(|n| {
                n.try_ctl(&[
                    "list_queues",
                    "name",
                    "type",
                    "leader",
                    "messages_ready",
                    "messages_unacknowledged",
                    "consumers",
                ])
            })
            .unwrap_or_else(|e| e);
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("log of {}:\n{}", n.name(), n.log_tail()))
            .collect();
        format!("{queues}\n{}", logs.join("\n"))
    }
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
        cmd.arg("-n").arg(&self.name).arg("stop");
        let _ = output_within(&mut cmd, TOOL_LIMIT);
        // If `stop` did not work.
        self.kill_vm();
        wait_or_kill(&mut self.child, Duration::from_secs(30));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
