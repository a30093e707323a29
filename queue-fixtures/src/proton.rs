//! A small AMQP 1.0 broker on Qpid Proton's reactor (`brokers/proton_broker.py`),
//! started per test on a free port and stopped when its guard is dropped. This
//! project wrote it: it checks the driver speaks AMQP 1.0 to a Proton peer (a
//! protocol-level smoke test), not that it agrees with an independent broker's queue
//! semantics; RabbitMQ and ActiveMQ Artemis are those.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Debian's python with `python3-qpid-proton`; `python3` on PATH may be another one.
const PYTHON: &str = "/usr/bin/python3";

/// How long the broker may take to say it listens.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A running broker; killed on drop.
pub struct ProtonBroker {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl ProtonBroker {
    /// The broker's URL (ANONYMOUS login).
    pub fn url(&self) -> String {
        format!("amqp://127.0.0.1:{}", self.port)
    }

    /// Why the broker cannot run here (no python, no proton module), if it cannot.
    pub fn unavailable() -> Option<String> {
        let has_proton = Command::new(PYTHON)
            .args(["-c", "import proton"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        (!has_proton).then(|| {
            format!("{PYTHON} cannot import proton (install Debian's python3-qpid-proton)")
        })
    }

    /// Starts a broker, or explains why it cannot (no python, no proton module).
    pub fn start() -> Result<ProtonBroker, String> {
        Self::start_with(&[])
    }

    /// Starts a broker that sends every delivery settled to a consumer whose attach
    /// allows it (`snd-settle-mode` `mixed`, the default, or `settled`): the message
    /// leaves the queue as it is sent, and a release or a lost link does not bring it
    /// back.
    pub fn start_presettling() -> Result<ProtonBroker, String> {
        Self::start_with(&["--presettle-when-allowed"])
    }

    fn start_with(options: &[&str]) -> Result<ProtonBroker, String> {
        if let Some(reason) = Self::unavailable() {
            return Err(reason);
        }
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            listener.local_addr().map_err(|e| e.to_string())?.port()
        };
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/brokers/proton_broker.py");
        let child = Command::new(PYTHON)
            .arg(script)
            .arg(port.to_string())
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {script}: {e}"))?;
        let mut broker = ProtonBroker { child, port };
        // The broker prints "ready" once it listens.
        let Some(stdout) = broker.child.stdout.take() else {
            return Err("no stdout from the broker".into());
        };
        // Its stdout is read to the end on a thread of its own: a pipe nobody reads
        // would fill up and stall the broker (or break it once the reader is gone).
        let (first_line, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let read = stdout.read_line(&mut line).map(|_| line);
            let _ = first_line.send(read);
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        // Python and proton are there (checked above): a broker that does not come up
        // is a failure, not a skip.
        match ready.recv_timeout(START_LIMIT) {
            Ok(Ok(line)) if line.trim() == "ready" => Ok(broker),
            Ok(Ok(line)) => panic!("the proton test broker did not start (printed {line:?})"),
            Ok(Err(e)) => panic!("the proton test broker did not start (reading its output: {e})"),
            Err(_) => {
                panic!("the proton test broker did not say it listens within {START_LIMIT:?}")
            }
        }
    }
}

impl Drop for ProtonBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
