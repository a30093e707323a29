//! A backend: a driver on one broker, as the suites see it, and how their tests run.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use libtest_mimic::{Arguments, Trial};
use queue_core::Capabilities;

use crate::TestContext;

/// Whether the tests run in CI, where a backend that cannot run is a failure, not a
/// skip: `CI` is `true` or `1` (`.ci/run` sets `CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

type Connect = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<TestContext, String>> + Send>> + Send + Sync,
>;

/// A driver on one broker: its name (the first part of every test name), the
/// capabilities the driver claims there (checked against the connected driver's), and
/// how to connect a fresh [`TestContext`] for one test.
#[derive(Clone)]
pub struct Backend {
    name: String,
    capabilities: Capabilities,
    unavailable: Option<String>,
    connect: Connect,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("unavailable", &self.unavailable)
            .finish()
    }
}

impl Backend {
    /// A backend whose tests connect with `connect`.
    pub fn new<F, Fut>(name: impl Into<String>, capabilities: Capabilities, connect: F) -> Backend
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<TestContext, String>> + Send + 'static,
    {
        Backend {
            name: name.into(),
            capabilities,
            unavailable: None,
            connect: Arc::new(move || Box::pin(connect())),
        }
    }

    /// Marks the backend as one that cannot run here, and why (checked once, before
    /// any test): outside CI its tests are ignored with that reason, in CI they fail.
    pub fn unavailable_if(mut self, reason: Option<String>) -> Backend {
        self.unavailable = reason;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The capabilities the driver claims on it.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// Why it cannot run here, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// A trial named `<backend>::<test>` that connects and runs `body`, ignored with a
    /// reason when the backend cannot run here outside CI, or when `lacks` names a
    /// capability the test needs and the backend does not have.
    pub(crate) fn trial<F, Fut>(&self, test: &str, lacks: Option<&str>, body: F) -> Trial
    where
        F: FnOnce(TestContext) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let connect = Arc::clone(&self.connect);
        let claimed = self.capabilities;
        self.trial_with(test, lacks, move || async move {
            let ctx = connect().await?;
            let actual = ctx.caps();
            if actual != claimed {
                return Err(format!(
                    "the driver claims {actual:?} on this backend, the suite was told {claimed:?}"
                ));
            }
            body(ctx).await;
            Ok(())
        })
    }

    /// A trial of the backend whose body connects by itself (a fault test starting its
    /// own broker) and says why it failed; ignored like [`Backend::trial`]'s.
    pub(crate) fn fault_trial<F, Fut>(&self, test: &str, lacks: Option<&str>, body: F) -> Trial
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.trial_with(test, lacks, body)
    }

    fn trial_with<F, Fut>(&self, test: &str, lacks: Option<&str>, body: F) -> Trial
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.trial_named(format!("{}::{test}", self.name), lacks, body)
    }

    fn trial_named<F, Fut>(&self, name: String, lacks: Option<&str>, body: F) -> Trial
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let skip = match (&self.unavailable, lacks) {
            (Some(reason), _) if !in_ci() => Some(format!("skipped: {reason}")),
            (_, Some(capability)) => Some(format!("lacks {capability}")),
            _ => None,
        };
        let unavailable = self.unavailable.clone();
        let trial = Trial::test(name, move || {
            if let Some(reason) = unavailable {
                return Err(format!("cannot run here, and CI requires it: {reason}").into());
            }
            block_on(body()).map_err(Into::into)
        });
        match skip {
            Some(reason) => trial.with_kind(reason).with_ignored_flag(true),
            None => trial,
        }
    }
}

/// One test of a broker-backed test binary: ignored with `unavailable`'s reason when
/// the broker cannot run here outside CI, failed with it in CI, run otherwise.
/// [`broker_tests!`](crate::broker_tests) builds a whole binary's `main` from these.
pub fn broker_test<F, Fut>(name: &str, unavailable: Option<String>, body: F) -> Trial
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Backend::new("", Capabilities::default(), || async {
        Err("a broker test connects by itself".to_string())
    })
    .unavailable_if(unavailable)
    .trial_named(name.to_string(), None, move || async move {
        body().await;
        Ok(())
    })
}

/// The `main` of a test binary (`harness = false`) whose tests need a broker: each
/// `async` test function runs on its own two-thread tokio runtime, each plain one on
/// its own thread; all are ignored with the reason outside CI when `unavailable` is
/// `Some`, and fail with it in CI. An optional `prefix:` names the tests
/// `<prefix>::<function>`, which is how the broker matrix (`cargo xtask
/// test-brokers`) finds a runtime test's broker and driver (`artemis::amqp10`).
///
/// ```no_run
/// async fn publishes() { /* ... */ }
/// fn runs_the_binary() { /* ... */ }
/// queue_testkit::broker_tests! {
///     unavailable: None::<String>;
///     async: [publishes];
///     sync: [runs_the_binary];
/// }
/// ```
#[macro_export]
macro_rules! broker_tests {
    (unavailable: $unavailable:expr; async: [$($async_test:ident),* $(,)?]; sync: [$($sync_test:ident),* $(,)?]; ) => {
        $crate::broker_tests! {
            prefix: "";
            unavailable: $unavailable;
            async: [$($async_test),*];
            sync: [$($sync_test),*];
        }
    };
    (prefix: $prefix:expr; unavailable: $unavailable:expr; async: [$($async_test:ident),* $(,)?]; sync: [$($sync_test:ident),* $(,)?]; ) => {
        fn main() {
            let unavailable: Option<String> = $unavailable;
            let name = |test: &str| -> String {
                match $prefix {
                    "" => test.to_string(),
                    prefix => format!("{prefix}::{test}"),
                }
            };
            let trials = vec![
                $($crate::broker_test(&name(stringify!($async_test)), unavailable.clone(), || $async_test()),)*
                $($crate::broker_test(&name(stringify!($sync_test)), unavailable.clone(), || async {
                    $crate::tokio::task::block_in_place($sync_test)
                }),)*
            ];
            $crate::run(trials);
        }
    };
}

/// Runs a future on a fresh two-thread runtime (each test has its own, as
/// `#[tokio::test]` would give it).
pub(crate) fn block_on<T>(fut: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(fut)
}

/// Runs trials as a test binary's `main` does (`cargo test` arguments apply), and
/// exits with their outcome.
///
/// With `RUST_LOG` set (`RUST_LOG=queue_amqp091=debug`), the drivers' logs go to
/// stderr: what a failed fault case needs to be understood.
pub fn run(trials: Vec<Trial>) -> ! {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    libtest_mimic::run(&Arguments::from_args(), trials).exit()
}
