//! Finding and starting the brokers on this machine (loopback only).

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// A broker found or started, and whether this run must stop it.
pub struct Available {
    /// How tests reach it (`ARTEMIS_URL`, ...), as environment variables.
    pub env: Vec<(String, String)>,
    /// Started by this run: stopped at the end.
    pub started: bool,
}

/// Why a broker is not available.
pub type Unavailable = String;

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok()
}

fn on_path(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if port_open(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// RabbitMQ on 127.0.0.1:5672 with the AMQP 1.0 plugin: found running, or started.
pub fn rabbitmq() -> Result<Available, Unavailable> {
    let mut started = false;
    if !port_open(5672) {
        if !on_path("rabbitmq-server") {
            return Err("not installed (apt-get install rabbitmq-server) and nothing listens on 127.0.0.1:5672".into());
        }
        println!("starting RabbitMQ (rabbitmq-server -detached)");
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("rabbitmq-server -detached failed: {status}"));
        }
        // `rabbitmq-diagnostics ping` answers before the AMQP port opens: wait for the port.
        if !wait_for_port(5672, Duration::from_secs(60)) {
            return Err("started, but 127.0.0.1:5672 did not open within 60 s".into());
        }
        started = true;
    }
    let plugin = Command::new("rabbitmq-plugins")
        .args(["enable", "rabbitmq_amqp1_0"])
        .output();
    if let Ok(out) = plugin
        && !out.status.success()
    {
        return Err(format!(
            "cannot enable rabbitmq_amqp1_0: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Available {
        env: Vec::new(),
        started,
    })
}

/// Stops a RabbitMQ this run started.
pub fn stop_rabbitmq() {
    println!("stopping the RabbitMQ this run started");
    let _ = Command::new("rabbitmqctl").arg("stop").status();
}

/// How far an Artemis instance this run creates offsets its acceptors (`artemis create
/// --port-offset`), so that its AMQP port never collides with the RabbitMQ on 5672.
const ARTEMIS_PORT_OFFSET: u16 = 1000;
const ARTEMIS_AMQP_PORT: u16 = 5672 + ARTEMIS_PORT_OFFSET;

/// The instance's directory. Named for its port: an instance made with other ports
/// (they are fixed at `create`) is never reused by mistake.
fn artemis_instance() -> std::path::PathBuf {
    format!("target/artemis-instance-{ARTEMIS_AMQP_PORT}").into()
}

/// Artemis: `ARTEMIS_URL`, or an instance created and started with the `artemis` command.
pub fn artemis() -> Result<Available, Unavailable> {
    if let Ok(url) = std::env::var("ARTEMIS_URL") {
        return Ok(Available {
            env: vec![("ARTEMIS_URL".into(), url)],
            started: false,
        });
    }
    if !on_path("artemis") {
        return Err("not available here: ARTEMIS_URL is not set and no `artemis` command is on PATH (Artemis cannot be installed on this machine)".into());
    }
    let instance = artemis_instance();
    if !instance.exists() {
        let status = Command::new("artemis")
            .args([
                "create",
                "--user",
                "queue",
                "--password",
                "queue",
                "--require-login",
                "--silent",
                "--host",
                "127.0.0.1",
                "--port-offset",
            ])
            .arg(ARTEMIS_PORT_OFFSET.to_string())
            .arg(&instance)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("artemis create failed: {status}"));
        }
    }
    let status = Command::new(instance.join("bin/artemis-service"))
        .arg("start")
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() || !wait_for_port(ARTEMIS_AMQP_PORT, Duration::from_secs(90)) {
        return Err("the artemis instance did not start".into());
    }
    Ok(Available {
        env: vec![(
            "ARTEMIS_URL".into(),
            format!("amqp://queue:queue@127.0.0.1:{ARTEMIS_AMQP_PORT}"),
        )],
        started: true,
    })
}

/// Stops an Artemis this run started.
pub fn stop_artemis() {
    let _ = Command::new(artemis_instance().join("bin/artemis-service"))
        .arg("stop")
        .status();
}

/// Qpid Proton's Python bindings, which the amqp10 tests use to start a broker of their own.
pub fn proton() -> Result<Available, Unavailable> {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import proton"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(Available {
            env: Vec::new(),
            started: false,
        })
    } else {
        Err("python3-qpid-proton is not installed (apt-get install python3-qpid-proton)".into())
    }
}
