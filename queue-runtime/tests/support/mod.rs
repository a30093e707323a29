//! Helpers for tests that run the real `queue-runtime` binary.

#![allow(dead_code)] // each test file uses part of it

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

pub use queue_fixtures::free_port;

/// How long a one-off command (`check`, `info`, `publish`, ...) may take.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// How long, once the runtime has exited, its pipes may take to reach their end. A
/// process it started and left behind may hold them open: what was read by then is
/// the output, instead of a wait for that process.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// The runtime's command, started as from a shell with every signal at its default:
/// the runtime leaves SIGHUP and SIGINT ignored when it was started with them ignored
/// (`nohup`, a script's background job), so a test run under `nohup` would see its
/// SIGHUP ignored.
pub fn binary() -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(assert_cmd::cargo::cargo_bin!("queue-runtime"));
    // SAFETY: between fork and exec, only `signal`, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    command
}

/// Runs a Python script (`python3 -c SCRIPT ARGS`, Debian's python with pika and
/// Qpid Proton) to its end: a client that hangs on a broker fails the test at
/// [`queue_fixtures::process::TOOL_LIMIT`] instead of holding it.
pub fn python(script: &str, args: &[&str]) -> Output {
    use queue_fixtures::process::{TOOL_LIMIT, output_within};
    output_within(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .args(args),
        TOOL_LIMIT,
    )
    .unwrap_or_else(|e| panic!("python3: {e}"))
}

/// A directory with the given files.
pub fn app(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

/// Runs a one-off command to its end (bounded: killed and failed after 2 minutes).
pub fn run(args: &[&str], dir: &Path) -> Output {
    run_with_env(args, dir, &[])
}

/// [`run`] with these environment variables set for the runtime.
pub fn run_with_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    wait_with_timeout(spawn_piped_with(args, dir, env), RUN_LIMIT)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The JSON log lines of a run with `--log-format json`.
pub fn json_logs(stderr: &[u8]) -> Vec<serde_json::Value> {
    text(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The JSON log lines among lines read from a run with `--log-format json`.
pub fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Log lines written by Lua's `logger` with this message, with their fields decoded.
pub fn lua_logs(logs: &[serde_json::Value], message: &str) -> Vec<serde_json::Value> {
    logs.iter()
        .filter(|l| l["target"] == "lua" && l["fields"]["message"] == message)
        .map(|l| {
            // An object, as a log pipeline reads it: not a string of JSON.
            let mut v = l["fields"]["fields"].clone();
            assert!(v.is_object(), "Lua fields not written as an object: {l}");
            v["timestamp"] = l["timestamp"].clone();
            v
        })
        .collect()
}

/// Asserts that the handler was called once per attempt for the message sent `to` this
/// address (`attempt` 1, 2, ... up to one more than `backoff` has waits, read from its
/// `Processing` log lines) and that each call came at least its wait (less 5 ms of
/// timestamp rounding) after the one before: retried on schedule, not spun.
pub fn assert_attempts_spaced(
    label: &str,
    logs: &[serde_json::Value],
    to: &str,
    backoff: &[Duration],
) {
    let calls: Vec<serde_json::Value> = lua_logs(logs, "Processing")
        .into_iter()
        .filter(|f| f["to"] == to)
        .collect();
    let attempts: Vec<i64> = calls
        .iter()
        .map(|f| f["attempt"].as_i64().unwrap_or(0))
        .collect();
    let expected: Vec<i64> = (1..=backoff.len() as i64 + 1).collect();
    assert_eq!(attempts, expected, "{label}: one call per attempt");
    let times: Vec<f64> = calls
        .iter()
        .map(|f| seconds_of_day(f["timestamp"].as_str().unwrap_or("")))
        .collect();
    for (i, wait) in backoff.iter().enumerate() {
        assert!(
            times[i + 1] - times[i] >= wait.as_secs_f64() - 0.005,
            "{label}: backoff {} should be {wait:?}: {times:?}",
            i + 1
        );
    }
}

/// Seconds of the day from an RFC 3339 timestamp (enough to compare within a run).
fn seconds_of_day(ts: &str) -> f64 {
    let time = ts
        .split('T')
        .nth(1)
        .unwrap_or("0:0:0")
        .trim_end_matches('Z');
    let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap_or(0.0)).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// The `summary:` lines as (queue, acked, ready, in_flight).
pub fn summary(stdout: &[u8]) -> Vec<(String, String, String, String)> {
    text(stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("summary: "))
        .map(|l| {
            let get = |key: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                    .unwrap_or("")
                    .to_string()
            };
            (get("queue"), get("acked"), get("ready"), get("in_flight"))
        })
        .collect()
}

/// GETs a path from the runtime's metrics server; `None` while it is not up.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_with_status(port, path).map(|(_, body)| body)
}

/// GETs a path from the runtime's metrics server: the status code and the body.
pub fn http_get_with_status(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of a metric line (`name{labels} value`) whose text starts with `prefix`.
pub fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls the metrics endpoint until `done` holds (bounded: fails after 60 s).
pub fn wait_for_metrics(port: u16, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(body) = http_get(port, "/metrics")
            && done(&body)
        {
            return body;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the runtime with its output read as it comes (see [`Spawned`]); stdin is
/// empty, as with `Command::output`.
pub fn spawn(args: &[&str], dir: &Path) -> Spawned {
    Spawned::from(spawn_piped_with(args, dir, &[]))
}

fn spawn_piped_with(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Child {
    binary()
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns")
}

/// A spawned runtime whose stdout and stderr are read into buffers from the start: a
/// pipe nobody reads fills up (64 KiB on Linux) and stalls the runtime's next write,
/// which a test would only see as a timeout. Derefs to its [`Child`]. Dropped while
/// the runtime still runs (a test that failed before stopping it), it kills the
/// runtime: otherwise it would go on consuming, for ever, after the test binary
/// ended.
pub struct Spawned {
    child: Child,
    stdout: Option<Drain>,
    stderr: Option<Drain>,
}

impl From<Child> for Spawned {
    /// Starts reading whichever of the child's pipes nobody took yet.
    fn from(mut child: Child) -> Spawned {
        let stdout = child.stdout.take().map(Drain::start);
        let stderr = child.stderr.take().map(Drain::start);
        Spawned {
            child,
            stdout,
            stderr,
        }
    }
}

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl Spawned {
    /// The exit status with everything the runtime wrote.
    fn output(mut self, status: ExitStatus) -> Output {
        Output {
            status,
            stdout: self.stdout.take().map(Drain::finish).unwrap_or_default(),
            stderr: self.stderr.take().map(Drain::finish).unwrap_or_default(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A thread reading one pipe to its end into a buffer.
struct Drain {
    read: Arc<Mutex<Vec<u8>>>,
    ended: mpsc::Receiver<()>,
}

impl Drain {
    fn start<R: Read + Send + 'static>(mut pipe: R) -> Drain {
        let read = Arc::new(Mutex::new(Vec::new()));
        let (end, ended) = mpsc::channel();
        let buffer = Arc::clone(&read);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buffer
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = end.send(());
        });
        Drain { read, ended }
    }

    /// What was read, once the pipe ended or [`PIPE_GRACE`] passed.
    fn finish(self) -> Vec<u8> {
        let _ = self.ended.recv_timeout(PIPE_GRACE);
        std::mem::take(&mut *self.read.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Polls `/ready` on `port` until it answers `status` (bounded: fails after 30 s,
/// saying `log()`); its body.
pub fn wait_ready_status(port: u16, status: u16, log: impl Fn() -> String) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http_get_with_status(port, "/ready");
        if let Some((got, body)) = &answer
            && *got == status
        {
            return serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("/ready answered {body:?}: {e}"));
        }
        assert!(
            Instant::now() < deadline,
            "/ready did not answer {status} within 30 s (last: {answer:?}):\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits for the child to exit (bounded), killing it if it does not; its output is
/// everything it wrote (its pipes are read all along, so it never blocks on them). A
/// plain [`Child`] has its pipes read from here on.
pub fn wait_with_timeout(child: impl Into<Spawned>, limit: Duration) -> Output {
    let mut spawned = child.into();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = spawned.child.try_wait().expect("wait") {
            return spawned.output(status);
        }
        if Instant::now() > deadline {
            let _ = spawned.child.kill();
            let status = spawned.child.wait().expect("wait");
            let out = spawned.output(status);
            panic!(
                "runtime did not exit within {limit:?}; stderr:\n{}",
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Spawns the runtime and streams its stderr lines into a channel as they come (its
/// stdout is read into the output, as [`spawn`] does; the output has no stderr).
pub fn spawn_with_lines(args: &[&str], dir: &Path) -> (Spawned, mpsc::Receiver<String>) {
    spawn_with_lines_and_env(args, dir, &[])
}

/// [`spawn_with_lines`] with these environment variables set for the runtime.
pub fn spawn_with_lines_and_env(
    args: &[&str],
    dir: &Path,
    env: &[(&str, &str)],
) -> (Spawned, mpsc::Receiver<String>) {
    let mut child = spawn_piped_with(args, dir, env);
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // Read to the end, whatever the bytes and even once nobody listens: the
        // runtime must never block on a full pipe.
        let mut stderr = std::io::BufReader::new(stderr);
        let mut line = Vec::new();
        while stderr.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = tx.send(text(&line).trim_end_matches(['\n', '\r']).to_string());
            line.clear();
        }
    });
    (Spawned::from(child), rx)
}

/// The lines still to come from a runtime that has exited: read until its stderr
/// ends (each line within [`PIPE_GRACE`], as a process it left behind may hold the
/// pipe open). `try_iter` would take only those the reader thread had passed on
/// yet, and a test that looks for a line's absence would pass without the last ones.
pub fn rest_of_lines(lines: &mpsc::Receiver<String>) -> Vec<String> {
    let mut rest = Vec::new();
    while let Ok(line) = lines.recv_timeout(PIPE_GRACE) {
        rest.push(line);
    }
    rest
}

/// Reads lines until one contains `needle` (bounded: fails after 30 s); returns the
/// lines read.
pub fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no line containing {needle:?}; saw:\n{}", seen.join("\n")));
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return seen;
        }
    }
}

/// Runs a blocking step (rabbitmqctl, waiting for a process) without stalling the
/// drivers' tasks.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A running `queue-runtime`, its output in a file of the app directory (a pipe nobody
/// reads would fill up and stall it). Killed on drop, so a failing test leaves no
/// runtime behind.
pub struct Runtime {
    child: Option<Child>,
    log: PathBuf,
    /// Where it serves `/ready`.
    metrics_port: u16,
}

/// A driver's connection as the runtime's `/ready` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverConnection {
    pub connections_opened: u64,
    pub links_attached: u64,
    /// The node it is connected to, password hidden.
    pub node: String,
}

impl DriverConnection {
    /// (connections opened, links attached).
    pub fn counts(&self) -> (u64, u64) {
        (self.connections_opened, self.links_attached)
    }
}

impl Runtime {
    pub fn start(dir: &Path, log: &str) -> Runtime {
        let log = dir.join(log);
        let out = std::fs::File::create(&log).expect("log file");
        let metrics_port = free_port();
        let child = binary()
            .args(["run", "--log-format", "json", "app.yaml", "--metrics-addr"])
            .arg(format!("127.0.0.1:{metrics_port}"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("the runtime starts");
        Runtime {
            child: Some(child),
            log,
            metrics_port,
        }
    }

    /// What the runtime's `/ready` says of driver `id` (`app:rabbit`): connections
    /// opened, links attached, the node (bounded wait for the server).
    pub fn connection(&self, id: &str) -> DriverConnection {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(body) = http_get(self.metrics_port, "/ready")
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&body)
                && let Some(driver) = json["drivers"].get(id)
            {
                let count = |k: &str| driver[k].as_u64().unwrap_or(0);
                return DriverConnection {
                    connections_opened: count("connections_opened"),
                    links_attached: count("links_attached"),
                    node: driver["node"].as_str().unwrap_or_default().to_string(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "/ready did not report the driver:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `/ready` until it answers `status` (bounded: fails after 30 s); its body.
    pub fn wait_ready_status(&self, status: u16) -> serde_json::Value {
        wait_ready_status(self.metrics_port, status, || self.log())
    }

    /// Whether the process has exited (killed, or crashed).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Signals the runtime and waits (bounded) for it to exit; after SIGTERM it must
    /// exit 0.
    pub fn stop(mut self, signal_name: &str) {
        let mut child = self.child.take().expect("running");
        signal(&child, signal_name);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the runtime did not exit within 60 s of SIG{signal_name}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if signal_name == "TERM" {
            assert!(status.success(), "SIGTERM exit {status}:\n{}", self.log());
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Drains the numbered messages of `queue` (JSON `{"n": N}`, as the tests' handlers
/// publish them) into the tally. A sentinel published last marks the end: one consumer
/// on a FIFO queue sees everything before it.
pub async fn drain_numbers(
    driver: &dyn queue_core::Driver,
    queue: &queue_core::QueueId,
    tally: &queue_testkit::Tally,
) {
    use queue_core::{Codec, ConsumeOptions, Value};
    // The test's own driver may still be reconnecting after a fault: retryable
    // failures are tried again, for as long as a reconnect may take.
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = driver.publish(queue, queue_testkit::numbered(-1)).await {
        assert!(
            e.retryable() && Instant::now() < deadline,
            "sentinel not published: {e}"
        );
    }
    let mut sub = driver
        .consume(queue, ConsumeOptions { prefetch: 500 })
        .await
        .expect("consume");
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(next) = sub.next().await {
            let d = next.expect("delivery");
            // Decoded as JSON whatever the content type another protocol left on it.
            let n = match Codec::Json.decode(&d.message().body) {
                Ok(body) => match body.get("n") {
                    Some(Value::Int(n)) => *n,
                    other => panic!("not a numbered message: {other:?}"),
                },
                Err(e) => panic!(
                    "a message of {queue} is not the JSON the handler published ({e}): {:?}",
                    String::from_utf8_lossy(&d.message().body)
                ),
            };
            d.ack().await.expect("ack");
            if n < 0 {
                return;
            }
            tally.consumed(n);
        }
        panic!("the consumer of {queue} closed before the sentinel");
    })
    .await;
    assert!(drained.is_ok(), "{queue} was not drained within 120 s");
    let _ = sub.cancel().await;
}
