//! From a YAML entry to a driver: each driver's configuration type says how
//! ([`DriverConfig`]), and one generic [`Factory`] turns that into the object-safe
//! [`DriverFactory`] the runtime keeps per `queue.driver.<name>` kind.

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::{Capabilities, Driver, Result};

/// A driver's configuration: what its YAML entry deserializes into, checked, and
/// connected. Implementing it (and registering `Factory::<ItsConfig>::new()`) is
/// all a driver crate does to be usable from the runtime.
#[async_trait]
pub trait DriverConfig: DeserializeOwned + Send + 'static {
    /// The entry kind, e.g. `queue.driver.amqp`.
    const KIND: &'static str;
    /// Checks what deserializing cannot (ranges, the URL) without connecting, and
    /// tells what a driver built from this configuration will be able to do. Errors
    /// name their field in the `field` detail ([`crate::config::field_error`]).
    fn validate(&self) -> Result<Capabilities>;
    /// Builds and connects the driver.
    async fn connect(self) -> Result<Arc<dyn Driver>>;
}

/// Builds drivers from YAML entries of one kind. The runtime keeps one per kind;
/// [`Factory`] implements it for every [`DriverConfig`].
#[async_trait]
pub trait DriverFactory: Send + Sync {
    /// The entry kind this factory serves, e.g. `queue.driver.amqp`.
    fn kind(&self) -> &'static str;
    /// Checks the entry's fields without connecting (used by `check`), and tells
    /// what a driver built from them will be able to do, so that `check` refuses
    /// queues that need more.
    fn validate(&self, config: &serde_json::Value) -> Result<Capabilities>;
    /// Builds (and connects) the driver.
    async fn create(&self, config: serde_json::Value) -> Result<Arc<dyn Driver>>;
}

/// The [`DriverFactory`] of a [`DriverConfig`].
///
/// ```
/// use queue_core::{DriverFactory, Factory};
/// use queue_core::memory::MemoryConfig;
/// let factory = Factory::<MemoryConfig>::new();
/// assert_eq!(factory.kind(), "queue.driver.memory");
/// assert!(factory.validate(&serde_json::json!({"publish_timeout": "2s"})).unwrap().delay);
/// assert!(factory.validate(&serde_json::json!({"colour": "red"})).is_err());
/// ```
pub struct Factory<C>(PhantomData<fn() -> C>);

impl<C> Factory<C> {
    /// The factory.
    pub const fn new() -> Self {
        Factory(PhantomData)
    }
}

impl<C> Default for Factory<C> {
    fn default() -> Self {
        Factory::new()
    }
}

impl<C> std::fmt::Debug for Factory<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Factory")
    }
}

#[async_trait]
impl<C: DriverConfig> DriverFactory for Factory<C> {
    fn kind(&self) -> &'static str {
        C::KIND
    }

    fn validate(&self, config: &serde_json::Value) -> Result<Capabilities> {
        crate::config::from_value::<C>(C::KIND, config.clone())?.validate()
    }

    async fn create(&self, config: serde_json::Value) -> Result<Arc<dyn Driver>> {
        let config = crate::config::from_value::<C>(C::KIND, config)?;
        config.validate()?;
        config.connect().await
    }
}
