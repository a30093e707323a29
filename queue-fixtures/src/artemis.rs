//! ActiveMQ Artemis, from Maven Central (docs/drivers/amqp10.md, "ActiveMQ Artemis").
//!
//! The distribution is fetched once with Maven into `target/brokers/artemis/` (ignored
//! by git, kept by CI's cache) and unpacked. Two kinds of broker run from it:
//!
//! - the **shared** instance (`cargo xtask brokers up`, `.ci/start-brokers`): AMQP on
//!   127.0.0.1:6672 (port offset 1000, so nothing collides with RabbitMQ's 5672),
//!   guest/guest, created once and reused, started in the background and left
//!   running; `cargo xtask brokers down` stops it;
//! - a **private** instance per fault test ([`ArtemisNode`]): its own directory and
//!   ports, struck through [`Outage`], always stopped and deleted.
//!
//! Both are created with `etc/broker.properties` that make plain addresses anycast
//! queues and stop the broker from dead-lettering by delivery count (the runtime
//! counts attempts itself), and are waited for until an AMQP client can open a
//! connection (Qpid Proton's Python client), never for a fixed time.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use queue_testkit::{Fault, Outage};

use crate::port_open;

/// The Artemis release the project runs (the newest whose `bin` distribution Maven
/// Central serves; it needs Java 17).
pub const VERSION: &str = "2.40.0";

/// How far the shared instance offsets its ports from Artemis' defaults.
pub const SHARED_PORT_OFFSET: u16 = 1000;

/// The shared instance's AMQP port.
pub const SHARED_AMQP_PORT: u16 = 5672 + SHARED_PORT_OFFSET;

/// Login of every instance.
const USER: &str = "guest";
const PASSWORD: &str = "guest";
/// `guest:guest` in base64, for Jolokia's Basic login.
const BASIC_AUTH: &str = "Z3Vlc3Q6Z3Vlc3Q=";

/// How long a start may take (a cold JVM on a loaded 2-core machine needs ~7 s).
const START_LIMIT: Duration = Duration::from_secs(120);

/// Debian's python with `python3-qpid-proton`, the AMQP client of the readiness check.
const PYTHON: &str = "/usr/bin/python3";

/// Address settings and journal tuning every instance gets (no XML editing), written
/// before each start.
const BROKER_PROPERTIES: &str = "\
# Plain addresses are anycast queues, whatever the client's terminus capabilities.
addressSettings.\"#\".defaultAddressRoutingType=ANYCAST
addressSettings.\"#\".defaultQueueRoutingType=ANYCAST
# The runtime counts attempts and dead-letters itself: the broker never does by count.
addressSettings.\"#\".maxDeliveryAttempts=-1
# What `artemis create` autotune would write (it is skipped: --no-autotune).
journalBufferTimeout_NIO=200000
# Test brokers share a build machine's disk with cargo's target directory: the default
# (block every producer once the disk is 90% used) stalls publishes with no error a test
# could name. Production brokers keep the guard (docs/drivers/amqp10.md).
maxDiskUsage=-1
";

/// The URL of the shared instance.
pub fn shared_url() -> String {
    format!("amqp://{USER}:{PASSWORD}@127.0.0.1:{SHARED_AMQP_PORT}")
}

/// The shared instance's Artemis core protocol port, which JMS clients of Artemis use
/// (the instance's all-protocols acceptor).
pub const SHARED_CORE_PORT: u16 = 61616 + SHARED_PORT_OFFSET;

/// Runs a Java program (one source file, `source`, whose public class is `class`)
/// with Artemis's own client jars (JMS on the core protocol among them) and `args`,
/// the shared instance's core URL and login first: its output, or why it failed.
pub fn run_jms_client(class: &str, source: &str, args: &[&str]) -> Result<String, String> {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = root().join("clients");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // A file of its own per run, so that runs at once (two test binaries) never read
    // one another's half-written source; Java's source launcher runs the first class
    // of a file whatever the file's name.
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = dir.join(format!("{class}-{}-{run}.java", std::process::id()));
    std::fs::write(&file, source).map_err(|e| format!("writing {}: {e}", file.display()))?;
    let core_url = format!("tcp://127.0.0.1:{SHARED_CORE_PORT}");
    let out = crate::process::output_within(
        Command::new("java")
            .arg("-cp")
            .arg(home().join("lib/*"))
            .arg(&file)
            .args([core_url.as_str(), USER, PASSWORD])
            .args(args),
        crate::process::TOOL_LIMIT,
    )
    .map_err(|e| format!("java {}: {e}", file.display()));
    let _ = std::fs::remove_file(&file);
    let out = out?;
    if !out.status.success() {
        return Err(format!(
            "java {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the distribution and the shared instance live: `target/brokers/artemis`.
fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join("target/brokers/artemis")
}

/// The unpacked distribution.
fn home() -> PathBuf {
    root().join(format!("apache-artemis-{VERSION}"))
}

fn command_exists(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn proton_missing() -> Option<String> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import proton"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| format!("{PYTHON} cannot import proton (python3-qpid-proton), the AMQP client that checks Artemis is up"))
}

/// Why Artemis cannot run here, if it cannot: not installed and no Maven or Java to
/// install it, or no AMQP client to see it come up.
pub fn unavailable() -> Option<String> {
    if !home().join("bin/artemis").exists() {
        for tool in ["mvn", "java", "tar"] {
            if !command_exists(tool) {
                return Some(format!(
                    "ActiveMQ Artemis is not installed under {} and `{tool}` is missing to install it",
                    root().display()
                ));
            }
        }
    }
    proton_missing()
}

/// Installs the distribution if it is not there yet: `mvn dependency:copy` of
/// `org.apache.activemq:apache-artemis:VERSION:tar.gz:bin` from Maven Central, then
/// unpacked. Returns its directory.
pub fn install() -> Result<PathBuf, String> {
    let home = home();
    if home.join("bin/artemis").exists() {
        return Ok(home);
    }
    let downloads = root().join("dl");
    std::fs::create_dir_all(&downloads).map_err(|e| format!("{}: {e}", downloads.display()))?;
    println!("installing ActiveMQ Artemis {VERSION} from Maven Central");
    let fetched = Command::new("mvn")
        .args([
            "-q",
            "dependency:copy",
            &format!("-Dartifact=org.apache.activemq:apache-artemis:{VERSION}:tar.gz:bin"),
        ])
        .arg(format!("-DoutputDirectory={}", downloads.display()))
        .status()
        .map_err(|e| format!("mvn: {e}"))?;
    if !fetched.success() {
        return Err(format!(
            "mvn dependency:copy of Artemis {VERSION} failed: {fetched}"
        ));
    }
    let archive = downloads.join(format!("apache-artemis-{VERSION}-bin.tar.gz"));
    let unpacked = Command::new("tar")
        .arg("xzf")
        .arg(&archive)
        .arg("-C")
        .arg(root())
        .status()
        .map_err(|e| format!("tar: {e}"))?;
    if !unpacked.success() || !home.join("bin/artemis").exists() {
        return Err(format!("unpacking {} failed", archive.display()));
    }
    Ok(home)
}

/// One broker instance: its directory, ports, and (while running) its JVM.
struct Instance {
    dir: PathBuf,
    offset: u16,
    child: Option<Child>,
}

impl Instance {
    fn amqp_port(&self) -> u16 {
        5672 + self.offset
    }

    fn jolokia_port(&self) -> u16 {
        8161 + self.offset
    }

    fn url(&self) -> String {
        format!("amqp://{USER}:{PASSWORD}@127.0.0.1:{}", self.amqp_port())
    }

    /// `artemis create` with the project's settings, unless the directory already
    /// holds an instance (it is then reused).
    fn create(dir: PathBuf, offset: u16) -> Result<Instance, String> {
        let instance = Instance {
            dir,
            offset,
            child: None,
        };
        if instance.dir.join("bin/artemis").exists() {
            return Ok(instance);
        }
        let home = install()?;
        let created = Command::new(home.join("bin/artemis"))
            .arg("create")
            .arg(&instance.dir)
            .args([
                "--silent",
                "--user",
                USER,
                "--password",
                PASSWORD,
                "--require-login",
                "--host",
                "127.0.0.1",
                "--http-host",
                "127.0.0.1",
                "--name",
                "artemis",
                "--no-autotune",
                "--java-memory",
                "512M",
                "--no-stomp-acceptor",
                "--no-hornetq-acceptor",
                "--no-mqtt-acceptor",
                "--port-offset",
            ])
            .arg(offset.to_string())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("artemis create: {e}"))?;
        if !created.success() {
            return Err(format!(
                "artemis create {} failed: {created}",
                instance.dir.display()
            ));
        }
        Ok(instance)
    }

    /// Starts the JVM (`bin/artemis run`, its output in `log/console.out`) and waits
    /// until an AMQP connection opens.
    fn start(&mut self) -> Result<(), String> {
        // Written at every start, so a reused instance gets today's settings.
        std::fs::write(self.dir.join("etc/broker.properties"), BROKER_PROPERTIES)
            .map_err(|e| format!("broker.properties: {e}"))?;
        let log_dir = self.dir.join("log");
        std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join("console.out"))
            .map_err(|e| e.to_string())?;
        let child = Command::new(self.dir.join("bin/artemis"))
            .arg("run")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting Artemis: {e}"))?;
        // The script execs java: this pid is the broker's JVM.
        std::fs::write(self.dir.join("broker.pid"), child.id().to_string())
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until an AMQP client opens a connection, or the JVM exits.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("Artemis exited ({status}):\n{}", self.log_tail()));
            }
            if port_open(self.amqp_port()) && amqp_opens(&self.url()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Artemis did not accept an AMQP connection within {START_LIMIT:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("log/console.out")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Signals the JVM and waits until it is gone.
    fn signal_and_wait(&mut self, signal: &str) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("Artemis did not exit within 60 s of SIG{signal}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a broker management operation through Jolokia (see [`management`]).
    fn management(&self, operation: &str, arguments: &str) -> Result<String, String> {
        management(self.jolokia_port(), operation, arguments)
    }
}

/// Asks the broker whose console listens on `jolokia_port` (loopback) to run a
/// management operation (`arguments` is a JSON array); fails unless it answers with
/// status 200.
fn management(jolokia_port: u16, operation: &str, arguments: &str) -> Result<String, String> {
    let body = format!(
        r#"{{"type":"exec","mbean":"org.apache.activemq.artemis:broker=\"artemis\"","operation":"{operation}","arguments":{arguments}}}"#
    );
    let request = format!(
        "POST /console/jolokia HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://127.0.0.1\r\nAuthorization: Basic {BASIC_AUTH}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", jolokia_port))
        .map_err(|e| format!("Jolokia on {}: {e}", jolokia_port))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    if response.contains("\"status\":200") {
        Ok(response)
    } else {
        Err(format!("Jolokia {operation} failed: {response}"))
    }
}

/// Deletes a queue of the shared instance, with its messages and consumers; a queue
/// that does not exist is fine. For tests that must start from an empty queue.
pub fn delete_shared_queue(name: &str) -> Result<(), String> {
    let arguments = format!("[{},true,true]", json_string(name));
    match management(
        8161 + SHARED_PORT_OFFSET,
        "destroyQueue(java.lang.String,boolean,boolean)",
        &arguments,
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.contains("ActiveMQNonExistentQueueException") => Ok(()),
        Err(e) => Err(format!("deleting Artemis queue {name:?}: {e}")),
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether an AMQP 1.0 client (Qpid Proton) opens a connection to `url` and closes it.
fn amqp_opens(url: &str) -> bool {
    Command::new(PYTHON)
        .args([
            "-c",
            "import sys\nfrom proton.utils import BlockingConnection\nBlockingConnection(sys.argv[1], timeout=5, allowed_mechs='PLAIN').close()",
            url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure the shared instance runs: installs Artemis, creates the instance once
/// (reused afterwards), starts it in the background unless it already answers, and
/// waits until it does. Returns its URL.
pub fn ensure_shared() -> Result<String, String> {
    let url = shared_url();
    if port_open(SHARED_AMQP_PORT) && amqp_opens(&url) {
        return Ok(url);
    }
    let mut instance = Instance::create(
        root().join(format!("shared-{SHARED_AMQP_PORT}")),
        SHARED_PORT_OFFSET,
    )?;
    println!(
        "starting ActiveMQ Artemis {VERSION} on 127.0.0.1:{SHARED_AMQP_PORT} ({})",
        instance.dir.display()
    );
    instance.start()?;
    // Left running for the tests that follow: the JVM is not this process's child
    // to wait for (`stop_shared` ends it through its pid file).
    std::mem::forget(instance.child.take());
    Ok(url)
}

/// Stops the shared instance (SIGTERM: a clean shutdown), if it runs.
pub fn stop_shared() -> Result<(), String> {
    let pid_file = root()
        .join(format!("shared-{SHARED_AMQP_PORT}"))
        .join("broker.pid");
    let Ok(pid) = std::fs::read_to_string(&pid_file) else {
        return Ok(());
    };
    let pid = pid.trim().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            return Err(format!("Artemis (pid {pid}) did not stop within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(pid_file);
    Ok(())
}

/// Why the shared instance cannot be used here, if it cannot (it is not running:
/// `cargo xtask brokers up` starts it).
pub fn shared_unavailable() -> Option<String> {
    unavailable().or_else(|| {
        (!(port_open(SHARED_AMQP_PORT) && amqp_opens(&shared_url()))).then(|| {
            format!(
                "ActiveMQ Artemis is not running on 127.0.0.1:{SHARED_AMQP_PORT} (`cargo xtask brokers up` starts it)"
            )
        })
    })
}

/// An Artemis instance of a test's own: its own directory and ports; struck through
/// [`Outage`]; killed and deleted on drop.
pub struct ArtemisNode {
    instance: Instance,
}

static NEXT_NODE: AtomicU64 = AtomicU64::new(0);

impl ArtemisNode {
    /// Creates and starts an instance on free ports. Blocking (seconds).
    pub fn start() -> Result<ArtemisNode, String> {
        Self::start_with_offset(Self::free_offset())
    }

    /// A port offset whose ports are free now, for a test that points a client at a
    /// broker before starting it ([`ArtemisNode::start_with_offset`]); its AMQP port is
    /// 5672 plus the offset.
    pub fn free_offset() -> u16 {
        free_offset()
    }

    /// Creates and starts an instance whose ports are Artemis' defaults plus `offset`.
    pub fn start_with_offset(offset: u16) -> Result<ArtemisNode, String> {
        if let Some(reason) = unavailable() {
            return Err(reason);
        }
        let dir = std::env::temp_dir().join(format!(
            "queue-artemis-{}-{}",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut node = ArtemisNode {
            instance: Instance::create(dir, offset)?,
        };
        node.instance.start()?;
        Ok(node)
    }

    /// Its AMQP URL (guest/guest).
    pub fn url(&self) -> String {
        self.instance.url()
    }

    /// Closes every client connection from 127.0.0.1, through the management API
    /// (the broker drops the sockets without an AMQP close).
    pub fn close_all_connections(&self) -> Result<(), String> {
        self.instance
            .management(
                "closeConnectionsForAddress(java.lang.String)",
                r#"["127.0.0.1"]"#,
            )
            .map(|_| ())
    }
}

/// An offset at which the ports an instance opens (AMQP 5672, all protocols 61616,
/// console 8161, each plus the offset) are free now. The all-protocols port caps it
/// at 3919; tests in one process start at different offsets.
fn free_offset() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let start = (std::process::id() as u64 * 7 + NEXT.fetch_add(1, Ordering::Relaxed) * 13) % 1900;
    (0..1900u64)
        .map(|i| 2000 + ((start + i) % 1900) as u16)
        .find(|&offset| [5672, 61616, 8161].iter().all(|base| free(base + offset)))
        .expect("a free port offset between 2000 and 3900")
}

impl Outage for ArtemisNode {
    /// `CutConnections`: management closes every connection; `StopStart`: SIGTERM (a
    /// clean shutdown), then a start from the same data; `Kill`: SIGKILL of the JVM,
    /// then a start from its journal.
    fn inflict(&mut self, fault: Fault) -> Result<(), String> {
        match fault {
            Fault::CutConnections => self.close_all_connections(),
            Fault::StopStart => {
                self.instance.signal_and_wait("TERM")?;
                self.instance.start()
            }
            Fault::Kill => {
                self.instance.signal_and_wait("KILL")?;
                self.instance.start()
            }
        }
    }
}

impl Drop for ArtemisNode {
    fn drop(&mut self) {
        let _ = self.instance.signal_and_wait("KILL");
        let _ = std::fs::remove_dir_all(&self.instance.dir);
    }
}
