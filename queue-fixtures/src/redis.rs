//! Redis: private servers for the Redis driver's conformance and fault tests.
//!
//! A [`RedisNode`] is a `redis-server` of the test's own, from Debian's package: a
//! free loopback port, its own data directory, the AOF on with `appendfsync always`
//! (a confirmed `XADD` is on disk before its reply, so it survives a kill), no RDB
//! snapshots. It is ready once it answers `PING` (and not while it loads its AOF),
//! never after a fixed wait; it is stopped and its directory deleted on drop, also
//! when the test panics.
//!
//! Faults ([`Outage`]): `CutConnections` is `CLIENT KILL TYPE normal` (every client
//! connection but the fixture's own), `StopStart` a `SHUTDOWN` (which syncs the AOF)
//! and a start from the same directory, `Kill` SIGKILL and a start from the AOF.
//!
//! The API is blocking; from an async test, wrap calls in
//! `tokio::task::spawn_blocking` or `block_in_place`.
//!
//! ```no_run
//! let mut node = queue_fixtures::redis::RedisNode::start().expect("redis-server is installed");
//! println!("Redis at {}", node.url());
//! node.command(&["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
//! // dropped: stopped and deleted
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use queue_testkit::{Fault, Outage};

use crate::free_port;

/// Debian's `redis-server` (package `redis-server`).
const SERVER: &str = "/usr/bin/redis-server";

/// How long a start (loading the AOF included) may take.
const START_LIMIT: Duration = Duration::from_secs(60);

/// How long a command to the server may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_NODE: AtomicU64 = AtomicU64::new(0);

/// Why a private Redis cannot start here, if it cannot (`redis-server` is missing).
pub fn unavailable() -> Option<String> {
    (!Path::new(SERVER).exists()).then(|| {
        format!("Redis is not installed ({SERVER} is missing: apt-get install redis-server)")
    })
}

/// Installs Debian's `redis-server` with apt-get when it is missing (`cargo xtask
/// brokers up` calls it). It starts no server: every test starts its own.
pub fn ensure_installed() -> Result<(), String> {
    if unavailable().is_none() {
        return Ok(());
    }
    println!("installing redis-server");
    let updated = Command::new("apt-get").args(["update", "-qq"]).status();
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-qq", "redis-server"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    if !updated.is_ok_and(|s| s.success()) || !installed.is_ok_and(|s| s.success()) {
        return Err("apt-get install redis-server failed".into());
    }
    match unavailable() {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

/// A running `redis-server` of the test's own; stopped and deleted on drop.
pub struct RedisNode {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl std::fmt::Debug for RedisNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisNode")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish()
    }
}

impl RedisNode {
    /// Starts a server on a free port with a fresh data directory, and waits until it
    /// answers `PING`. Blocking.
    pub fn start() -> Result<RedisNode, String> {
        if let Some(reason) = unavailable() {
            return Err(reason);
        }
        let dir = std::env::temp_dir().join(format!(
            "queue-redis-{}-{}",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = free_port();
        let config = format!(
            "bind 127.0.0.1\nport {port}\ndir {}\n\
             appendonly yes\nappendfsync always\nappenddirname aof\n\
             save \"\"\ndaemonize no\nprotected-mode yes\n\
             logfile {}\n",
            dir.display(),
            dir.join("server.log").display()
        );
        std::fs::write(dir.join("redis.conf"), config).map_err(|e| e.to_string())?;
        let mut node = RedisNode {
            port,
            dir,
            child: None,
        };
        node.spawn()?;
        Ok(node)
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one command and returns its reply as text (a simple string, an integer,
    /// a bulk string; an array's items one per line). An error reply is `Err`.
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        command(self.port, args)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("console.out"))
            .map_err(|e| e.to_string())?;
        let child = Command::new(SERVER)
            .arg(self.dir.join("redis.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {SERVER}: {e}"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until `PING` answers `PONG` (a server still loading its AOF answers
    /// `-LOADING`), or the server exits.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "redis-server exited ({status}):\n{}",
                    self.log_tail()
                ));
            }
            if matches!(self.command(&["PING"]).as_deref(), Ok("PONG")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server did not answer PING on 127.0.0.1:{} within {START_LIMIT:?}:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines the server logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(self.dir.join("console.out")).unwrap_or_default());
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until the server process is gone; kills it after `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-server did not exit within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `CLIENT KILL TYPE normal`: every client connection is cut, the server stays up.
    /// Returns how many it cut: a fault test proves its fault landed with it.
    pub fn cut_connections(&self) -> Result<u64, String> {
        let killed = self.command(&["CLIENT", "KILL", "TYPE", "normal"])?;
        killed
            .parse()
            .map_err(|_| format!("CLIENT KILL answered {killed:?}, not a count"))
    }

    /// `SHUTDOWN` (the AOF is synced first), then a start from the same directory.
    pub fn stop_and_start(&mut self) -> Result<(), String> {
        // The server closes the connection instead of replying when it goes down.
        let _ = self.command(&["SHUTDOWN"]);
        self.wait_exit(Duration::from_secs(30))?;
        self.spawn()
    }

    /// SIGKILL, then a start from what the AOF holds.
    pub fn kill_and_restart(&mut self) -> Result<(), String> {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill(); // SIGKILL on Unix
        }
        self.wait_exit(Duration::from_secs(30))?;
        self.spawn()
    }
}

impl Outage for RedisNode {
    fn inflict(&mut self, fault: Fault) -> Result<(), String> {
        match fault {
            Fault::CutConnections => match self.cut_connections()? {
                0 => Err("CLIENT KILL found no connection to cut".into()),
                _ => Ok(()),
            },
            Fault::StopStart => self.stop_and_start(),
            Fault::Kill => self.kill_and_restart(),
        }
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One RESP command on a fresh connection to 127.0.0.1:`port`.
fn command(port: u16, args: &[&str]) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        COMMAND_TIMEOUT,
    )
    .map_err(|e| format!("connecting to 127.0.0.1:{port}: {e}"))?;
    stream
        .set_read_timeout(Some(COMMAND_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    read_reply(&mut reader)
}

fn read_reply(reader: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the server closed the connection".into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Err(rest.to_string()),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| format!("bad reply {line:?}"))?;
            if len < 0 {
                return Ok(String::new());
            }
            let mut data = vec![0; len as usize + 2];
            reader.read_exact(&mut data).map_err(|e| e.to_string())?;
            data.truncate(len as usize);
            Ok(String::from_utf8_lossy(&data).into_owned())
        }
        "*" => {
            let count: i64 = rest.parse().map_err(|_| format!("bad reply {line:?}"))?;
            let mut items = Vec::new();
            for _ in 0..count.max(0) {
                items.push(read_reply(reader)?);
            }
            Ok(items.join("\n"))
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}
