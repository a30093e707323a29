//! Project automation, run as `cargo xtask <command>`:
//!
//! - `brokers up|down`: installs, starts and stops the shared brokers (RabbitMQ,
//!   ActiveMQ Artemis) the tests use; `.ci/start-brokers` runs `brokers up`.
//! - `test-brokers`: runs every driver's conformance, fault and TLS suites against
//!   every broker they name, and prints the matrix.
//! - `bench`: runs the benchmarks, each next to its baseline in the same run, and writes
//!   a table, JSON and an SVG plot under `target/bench/`.
//! - `docs`: checks the manual's internal links and builds it with mdBook.
//! - `fuzz`: runs the cargo-fuzz targets for a while each.
//! - `soak`: a long run through the runtime on the memory driver or RabbitMQ (either
//!   protocol), watching its memory.

mod bench;
mod brokers;
mod docs;
mod fuzz;
mod matrix;
mod soak;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A shared broker `brokers up` starts.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Broker {
    /// RabbitMQ 3.x on 127.0.0.1:5672 (AMQP 0-9-1, and AMQP 1.0 through its plugin).
    Rabbitmq,
    /// ActiveMQ Artemis on 127.0.0.1:6672 (AMQP 1.0), from Maven Central.
    Artemis,
}

/// What `brokers` does.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum BrokersAction {
    /// Install what is missing, start, and wait until each answers.
    Up,
    /// Stop them.
    Down,
}

#[derive(Subcommand)]
enum Command {
    /// Run the conformance, fault and TLS suites for every driver x broker pair.
    TestBrokers {
        /// Only this broker (as the suites name it: rabbitmq, artemis, proton, ...).
        #[arg(long)]
        broker: Option<String>,
        /// Only this driver (the crate name without `queue-`: amqp091, amqp10, ...).
        #[arg(long)]
        driver: Option<String>,
        /// Skip the fault tests.
        #[arg(long)]
        quick: bool,
    },
    /// Start (or stop) the shared brokers the tests use.
    Brokers {
        /// up or down.
        #[arg(value_enum)]
        action: BrokersAction,
        /// Only this broker.
        #[arg(long, value_enum)]
        broker: Option<Broker>,
    },
    /// Run the benchmarks with their baselines and write target/bench/.
    Bench {
        /// Shorter runs.
        #[arg(long)]
        quick: bool,
        /// Only build the tables from what the last run left on disk (the criterion
        /// figures it measured, target/bench/latency.json) and a fresh kombu run.
        #[arg(long)]
        report_only: bool,
        /// Also show each ratio next to the one in this earlier run's JSON
        /// (target/bench/runs/*.json).
        #[arg(long, value_name = "OLD.json")]
        compare: Option<std::path::PathBuf>,
        /// Write the tables into docs/performance.md (between its bench-table markers)
        /// and the plot into docs/performance.svg.
        #[arg(long)]
        write_docs: bool,
    },
    /// Check the manual's internal links and build it with mdBook.
    Docs {
        /// Fail when mdBook is not installed (CI).
        #[arg(long)]
        require_mdbook: bool,
    },
    /// Run each fuzz target (cargo-fuzz, nightly) for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Push many messages through the runtime and check its memory stays flat.
    Soak {
        /// How many messages (default: 3,000,000 on the memory driver, about 12 s, so
        /// that RSS is measured well past its warm-up; 1,000,000 on RabbitMQ, where
        /// each Lua publish waits for its confirm).
        #[arg(long)]
        messages: Option<u64>,
        /// Which driver carries them (amqp091 and amqp10 use RabbitMQ).
        #[arg(long, value_enum, default_value_t = soak::SoakDriver::Memory)]
        driver: soak::SoakDriver,
        /// The broker's host:port, for amqp091 and amqp10 (loopback only).
        #[arg(long, default_value = "127.0.0.1:5672")]
        broker: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::TestBrokers {
            broker,
            driver,
            quick,
        } => matrix::run(broker, driver, quick),
        Command::Brokers { action, broker } => match action {
            BrokersAction::Up => brokers::up(broker),
            BrokersAction::Down => brokers::down(broker),
        },
        Command::Bench {
            quick,
            report_only,
            compare,
            write_docs,
        } => bench::run(bench::Options {
            quick,
            report_only,
            compare,
            write_docs,
        }),
        Command::Docs { require_mdbook } => docs::run(require_mdbook),
        Command::Fuzz { seconds, target } => fuzz::run(seconds, target),
        Command::Soak {
            messages,
            driver,
            broker,
        } => soak::run(
            messages.unwrap_or_else(|| driver.default_messages()),
            driver,
            &broker,
        ),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
