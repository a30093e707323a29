//! A private RabbitMQ node for fault tests: its own node name, data directory, config
//! (listening on 127.0.0.1:<free port> only), distribution port and plugins file
//! (rabbitmq_amqp1_0). The main node on 5672 is never touched. Stopped and its data
//! directory removed when the guard is dropped, also when a test fails.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

/// A running private node.
pub struct RabbitNode {
    child: Child,
    /// `name@host` for `rabbitmqctl -n`.
    pub node: String,
    /// The AMQP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl RabbitNode {
    /// Whether `rabbitmq-server` is installed.
    pub fn available() -> bool {
        Command::new("sh")
            .args(["-c", "command -v rabbitmq-server && command -v rabbitmqctl"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Starts a fresh node and waits until it has booted (`rabbitmqctl wait`).
    pub fn start() -> std::io::Result<RabbitNode> {
        let port = free_port()?;
        let dist_port = free_port()?;
        let unique = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let dir = std::env::temp_dir().join(format!("queue-amqp10-node-{unique}"));
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        let config = dir.join("rabbitmq.conf");
        std::fs::write(
            &config,
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )?;
        let plugins = dir.join("enabled_plugins");
        std::fs::write(&plugins, "[rabbitmq_amqp1_0].\n")?;
        // Debian's rabbitmq-server drops from root to the rabbitmq user: let it write.
        for path in [&dir, &dir.join("mnesia"), &dir.join("log")] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
        }
        let pid_file = dir.join("node.pid");
        let node = format!("amqp10fault{}@localhost", std::process::id());
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_PID_FILE", &pid_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let rabbit = RabbitNode {
            child,
            node,
            port,
            dir,
        };
        // Blocks until the node has booted (or failed to).
        let waited = rabbit.ctl(&["wait", "--timeout", "120", &pid_file.to_string_lossy()])?;
        if !waited.status.success() {
            return Err(std::io::Error::other(format!(
                "the private RabbitMQ node did not start: {}",
                String::from_utf8_lossy(&waited.stderr)
            )));
        }
        Ok(rabbit)
    }

    /// Runs `rabbitmqctl -n <node> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
    }

    /// `amqp://guest:guest@127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}", self.port)
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
