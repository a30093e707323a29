//! The `queue.driver.redis` configuration entry.

use std::fmt;
use std::time::Duration;

use queue_core::config::{duration, field_error};
use queue_core::{Result, redact_url};
use serde::Deserialize;

/// The kind this driver's YAML entries have.
pub const KIND: &str = "queue.driver.redis";

/// Configuration of the Redis driver (docs/drivers/redis.md). `Debug` never shows
/// the password.
///
/// ```
/// let config = queue_redis::RedisConfig::from_value(serde_json::json!({
///     "url": "redis://app:s3cret@127.0.0.1:6379/0",
///     "publish_timeout": "2s",
/// })).unwrap();
/// assert_eq!(config.publish_timeout, std::time::Duration::from_secs(2));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` (`/db` defaults to 0).
    pub url: String,
    /// How long a publish waits for Redis' reply, reconnects included (default 5s);
    /// then it fails INTERNAL, retryable.
    #[serde(default = "default_publish_timeout", with = "duration")]
    pub publish_timeout: Duration,
    /// First wait before reconnecting (default 100ms), doubled after each failure.
    #[serde(default = "default_reconnect_delay", with = "duration")]
    pub reconnect_delay: Duration,
    /// The longest wait between reconnect attempts (default 5s).
    #[serde(default = "default_reconnect_max_delay", with = "duration")]
    pub reconnect_max_delay: Duration,
    /// How long a consumer whose process stopped renewing its lease keeps its
    /// unsettled messages before another consumer returns them to the queue
    /// (default 30s, at least 10s). A live consumer renews it every quarter of this,
    /// between reads that wait up to 2 s.
    #[serde(default = "default_consumer_timeout", with = "duration")]
    pub consumer_timeout: Duration,
}

/// The shortest `consumer_timeout` (see `validate`).
const MIN_CONSUMER_TIMEOUT: Duration = Duration::from_secs(10);

fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_reconnect_delay() -> Duration {
    Duration::from_millis(100)
}
fn default_reconnect_max_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_consumer_timeout() -> Duration {
    Duration::from_secs(30)
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("publish_timeout", &self.publish_timeout)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("consumer_timeout", &self.consumer_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// A configuration with defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            publish_timeout: default_publish_timeout(),
            reconnect_delay: default_reconnect_delay(),
            reconnect_max_delay: default_reconnect_max_delay(),
            consumer_timeout: default_consumer_timeout(),
        }
    }

    /// Reads the entry's fields (`INVALID` naming the kind and field on error).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let config: RedisConfig = queue_core::config::from_value(KIND, value)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot: the URL and the durations.
    pub fn validate(&self) -> Result<()> {
        self.client()?;
        if self.publish_timeout.is_zero() {
            return Err(field_error(KIND, "publish_timeout", "must be above zero"));
        }
        if self.reconnect_delay.is_zero() {
            return Err(field_error(KIND, "reconnect_delay", "must be above zero"));
        }
        if self.reconnect_max_delay < self.reconnect_delay {
            return Err(field_error(
                KIND,
                "reconnect_max_delay",
                "must not be below reconnect_delay",
            ));
        }
        if self.consumer_timeout < MIN_CONSUMER_TIMEOUT {
            // A consumer renews its lease between reads that wait up to 2 s: a shorter
            // lease ran out under a live consumer, and another one took back and
            // handed out what it was still handling.
            return Err(field_error(
                KIND,
                "consumer_timeout",
                "must be at least 10s (a consumer renews its lease between reads that wait up to 2s)",
            ));
        }
        if self.consumer_timeout < self.publish_timeout.saturating_mul(2) {
            // A lease renewal on a connection lost without a word waits out one
            // command's limit (`publish_timeout`, 5 s at least) before a new connection
            // renews it, a quarter of the lease after the last renewal: with the two
            // close, the lease ran out first, and another consumer handed out
            // everything this live one held.
            return Err(field_error(
                KIND,
                "consumer_timeout",
                format!(
                    "must be at least twice publish_timeout ({:?}): a lease renewal that waits out one command's limit on a lost connection must leave time to renew it on a new one",
                    self.publish_timeout
                ),
            ));
        }
        if self.consumer_timeout.as_millis() > u128::from(queue_core::MAX_MILLIS) {
            // A lease is a Redis key's expiry in milliseconds, which Redis refuses
            // past its range: `Duration::MAX` from Rust made every consume fail.
            return Err(field_error(
                KIND,
                "consumer_timeout",
                "must be at most 4294967295ms (about 49 days): it is how long a dead consumer's messages wait before another takes them",
            ));
        }
        Ok(())
    }

    /// The redis crate's client for the URL. Only the redacted URL is ever shown: the
    /// crate's own parse errors are not passed on, in case they quote it.
    pub(crate) fn client(&self) -> Result<redis::Client> {
        let redacted = redact_url(&self.url);
        let bad = |why: &str| field_error(KIND, "url", format!("{redacted}: {why}"));
        let Some(rest) = self.url.strip_prefix("redis://") else {
            return Err(bad(
                "the scheme must be redis:// (TLS and unix sockets are not supported)",
            ));
        };
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        // Before anything that shows the URL: the redaction hides only what follows a
        // ':' in the user part, and `redis://PASSWORD@host` has none. The redis crate
        // reads it as a user name and sends no AUTH at all (review).
        if let Some((user, _)) = authority.rsplit_once('@')
            && !user.contains(':')
        {
            return Err(field_error(
                KIND,
                "url",
                format!(
                    "redis://***@{}/...: a user without a password (the Redis client then logs in with none): write redis://:PASSWORD@host:6379, or redis://USER:PASSWORD@host:6379",
                    &authority[user.len() + 1..]
                ),
            ));
        }
        if queue_core::credentials_cut_short(&self.url) {
            // `redis://u:12#ab@host` reads as host `u`, port 12, no password: the
            // password would be dropped and another host dialled.
            return Err(bad(
                "the user or password holds a '/', '?' or '#': percent-encode it (%2F, %3F, %23)",
            ));
        }
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host_port.is_empty() || host_port.starts_with(':') {
            return Err(bad("the host is empty"));
        }
        if let Some((_, port)) = host_port.rsplit_once(':')
            && !host_port.ends_with(']')
            && port.parse::<u16>().is_err()
        {
            return Err(bad("the port is not a number"));
        }
        let path = &rest[authority.len()..];
        let db = path.split(['?', '#']).next().unwrap_or_default();
        let db = db.trim_start_matches('/');
        if !db.is_empty() && db.parse::<u16>().is_err() {
            return Err(bad("the path must be a database number (/0)"));
        }
        // The redis crate reads `protocol` from the query and ignores the rest: a
        // `?password=` was dropped (the login then failed) and shown in every message.
        let query = path.split('#').next().unwrap_or_default();
        if let Some((_, query)) = query.split_once('?') {
            for name in query.split('&').filter(|p| !p.is_empty()) {
                let name = name.split('=').next().unwrap_or_default();
                if name != "protocol" {
                    return Err(bad(&format!(
                        "the query parameter {:?} is not read by the Redis client (only `protocol` is); a password goes before the host: redis://:PASSWORD@host:6379",
                        name.chars().take(40).collect::<String>()
                    )));
                }
            }
        }
        redis::Client::open(self.url.as_str()).map_err(|_| bad("not a valid Redis URL"))
    }

    /// The URL without its password, for messages and the connection report.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c =
            RedisConfig::from_value(serde_json::json!({"url": "redis://127.0.0.1:6379"})).unwrap();
        assert_eq!(c.publish_timeout, Duration::from_secs(5));
        assert_eq!(c.reconnect_delay, Duration::from_millis(100));
        assert_eq!(c.consumer_timeout, Duration::from_secs(30));
        let err = RedisConfig::from_value(serde_json::json!({"url": "redis://h", "stream": "x"}))
            .unwrap_err();
        assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
        assert!(err.message().contains("stream"), "{err}");
        let err = RedisConfig::from_value(serde_json::json!({
            "url": "redis://h", "publish_timeout": "soon"
        }))
        .unwrap_err();
        assert_eq!(err.details()["field"], "publish_timeout");
        let err = RedisConfig::from_value(serde_json::json!({
            "url": "redis://h", "reconnect_delay": "5s", "reconnect_max_delay": "1s"
        }))
        .unwrap_err();
        assert_eq!(err.details()["field"], "reconnect_max_delay");
        let err = RedisConfig::from_value(serde_json::json!({})).unwrap_err();
        assert!(err.message().contains("url"), "{err}");
        // A lease a live consumer cannot renew in time.
        let err = RedisConfig::from_value(serde_json::json!({
            "url": "redis://h", "consumer_timeout": "5s"
        }))
        .unwrap_err();
        assert_eq!(err.details()["field"], "consumer_timeout");
        let c = RedisConfig::from_value(serde_json::json!({
            "url": "redis://h", "consumer_timeout": "10s"
        }));
        assert!(c.is_ok(), "{c:?}");
        // A renewal waiting out a command's limit must leave the lease time.
        let err = RedisConfig::from_value(serde_json::json!({
            "url": "redis://h", "publish_timeout": "30s"
        }))
        .unwrap_err();
        assert_eq!(err.details()["field"], "consumer_timeout");
        assert!(err.message().contains("twice publish_timeout"), "{err}");
        let c = RedisConfig::from_value(serde_json::json!({
            "url": "redis://h", "publish_timeout": "30s", "consumer_timeout": "1m"
        }));
        assert!(c.is_ok(), "{c:?}");
        // From Rust, `Duration::MAX`: Redis refuses a key's expiry that long.
        let mut endless = RedisConfig::new("redis://h");
        endless.consumer_timeout = Duration::MAX;
        let err = endless.validate().unwrap_err();
        assert_eq!(err.details()["field"], "consumer_timeout");
    }

    #[test]
    fn bad_urls_name_the_field_and_never_show_the_password() {
        for url in [
            "http://u:topsecret@h",
            "rediss://u:topsecret@h",
            "redis://u:topsecret@h:notaport",
            "redis://u:topsecret@:6379",
            "redis://u:topsecret@h:6379/notadb",
            "redis://u:top/secret@h:6379/x",
            // Read as host `u`, port 123, the password dropped.
            "redis://u:123#topsecret@h:6379/0",
            "redis://u:123?topsecret@h:6379/0",
            // The redis crate reads no password from the query: it was dropped, and
            // shown in every message.
            "redis://h:6379/0?password=topsecret",
            "redis://h:6379/0?protocol=resp2&pass=topsecret",
            "redis://h/0?password=top@secret",
            // No ':': the redis crate reads a user name and sends no AUTH, and the
            // redaction, which hides what follows a ':', showed it (review); nor is
            // what follows the host shown with it.
            "redis://topsecret@h:6379/0",
            "redis://topsecret@h:notaport/0",
            "redis://pw@h/0?password=topsecret",
        ] {
            let err = RedisConfig::from_value(serde_json::json!({ "url": url })).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{url}");
            assert_eq!(err.details()["field"], "url", "{url}");
            let said = format!("{err} {err:?}");
            assert!(
                !said.contains("topsecret") && !said.contains("secret@"),
                "{said}"
            );
        }
        for url in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1:6379/3",
            "redis://:pw@127.0.0.1/0",
            "redis://user:p%40ss@127.0.0.1:6379/0",
            "redis://127.0.0.1:6379/0?protocol=resp2",
        ] {
            RedisConfig::new(url)
                .validate()
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }
}
