//! The `queue.driver.amqp10` configuration entry and its URL.

use std::fmt;
use std::time::Duration;

use queue_core::config::duration;
use queue_core::config::field_error;
use queue_core::{Result, redact_url};
use serde::Deserialize;

use crate::Profile;

/// The kind this driver's YAML entries have.
pub const KIND: &str = "queue.driver.amqp10";

/// Configuration of the AMQP 1.0 driver (docs/configuration.md). `Debug` never shows the password.
///
/// ```
/// let config: queue_amqp10::Amqp10Config = serde_json::from_value(serde_json::json!({
///     "url": "amqp://guest:guest@127.0.0.1:5672",
///     "profile": "rabbitmq-v1",
///     "publish_timeout": "2s",
/// })).unwrap();
/// assert_eq!(config.publish_timeout, std::time::Duration::from_secs(2));
/// assert!(!format!("{config:?}").contains("guest@"));
///
/// // The nodes of one cluster: the driver connects to the first that answers.
/// let cluster: queue_amqp10::Amqp10Config = serde_json::from_value(serde_json::json!({
///     "url": ["amqp://app:secret@rabbit-1.example", "amqp://app:secret@rabbit-2.example"],
/// })).unwrap();
/// assert_eq!(cluster.urls.len(), 2);
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amqp10Config {
    /// `url` in configuration: `amqp://user:pass@host:port` or `amqps://...`, or a list
    /// of them, the nodes of one cluster. With a user, SASL PLAIN is used; without,
    /// SASL ANONYMOUS. The driver connects to the first node that answers, in list
    /// order, and after a connection loss to the next one after the node it lost.
    #[serde(rename = "url", with = "queue_core::config::url_list")]
    pub urls: Vec<String>,
    /// The broker family (default `generic`).
    #[serde(default)]
    pub profile: Profile,
    /// The AMQP container id (default `queue-<random>`).
    #[serde(default)]
    pub container_id: Option<String>,
    /// First wait before reconnecting (default 1s), doubled after each failure.
    #[serde(default = "default_reconnect_delay", with = "duration")]
    pub reconnect_delay: Duration,
    /// The longest wait between reconnect attempts (default 30s).
    #[serde(default = "default_reconnect_max_delay", with = "duration")]
    pub reconnect_max_delay: Duration,
    /// How long a publish waits for the `accepted` outcome, reconnects included
    /// (default 5s); then it fails INTERNAL, retryable.
    #[serde(default = "default_publish_timeout", with = "duration")]
    pub publish_timeout: Duration,
    /// Unsettled sends in flight per queue (default 1000).
    #[serde(default = "default_confirm_window")]
    pub confirm_window: u32,
    /// How long the broker may stay silent before the connection counts as lost
    /// (default 60s; `0s` turns it off). The driver asks the broker for a frame at
    /// least every half of it (AMQP's idle time-out), so only a broker that hangs or a
    /// network that drops everything without closing TCP goes silent that long.
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// The largest message a receiver takes, in bytes as it travels (default and
    /// most 128 MiB, RabbitMQ 3.x's own limit; at least 64 KiB). Advertised as each receiver link's
    /// `max-message-size`, so that a larger delivery is refused before it is held
    /// whole in memory (docs/drivers/amqp10.md, "Receiving").
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// How long the broker lets a delivery go unsettled before it ends the session and
    /// gives the message out again: RabbitMQ's `consumer_timeout`, 30 minutes by
    /// default, which its AMQP 1.0 plugin applies too (the default on the
    /// `rabbitmq-*` profiles; none on the others); `0s` for none. The runtime refuses
    /// a consumer that would hold a delivery that long (docs/drivers/amqp10.md,
    /// "Receiving").
    #[serde(default, with = "queue_core::config::option_duration")]
    pub consumer_timeout: Option<Duration>,
    /// TLS settings for `amqps://` URLs (needs the crate's `tls` feature).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// TLS settings (`tls:` in the entry). `amqps://` turns TLS on; the server certificate is
/// checked against the Mozilla root store (webpki-roots), or against `ca_file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The name the server certificate must carry (default: the URL's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the certificate authorities to trust instead of the Mozilla roots
    /// (a broker with a certificate from a private CA).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_reconnect_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_confirm_window() -> u32 {
    1000
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
/// The smallest `max_message_size`: below it, a message's own properties and headers
/// could be refused.
const MIN_MAX_MESSAGE_SIZE: u64 = 64 * 1024;

fn default_max_message_size() -> u64 {
    128 * 1024 * 1024
}

impl fmt::Debug for Amqp10Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Amqp10Config")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("profile", &self.profile)
            .field("container_id", &self.container_id)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("publish_timeout", &self.publish_timeout)
            .field("confirm_window", &self.confirm_window)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("consumer_timeout", &self.consumer_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Amqp10Config {
    /// A configuration with defaults for everything but the URL and profile.
    pub fn new(url: impl Into<String>, profile: Profile) -> Self {
        Amqp10Config::cluster([url], profile)
    }

    /// A configuration for the nodes of one cluster (tried in this order), with
    /// defaults for everything else.
    pub fn cluster<I>(urls: I, profile: Profile) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Amqp10Config {
            urls: urls.into_iter().map(Into::into).collect(),
            profile,
            container_id: None,
            reconnect_delay: default_reconnect_delay(),
            reconnect_max_delay: default_reconnect_max_delay(),
            publish_timeout: default_publish_timeout(),
            confirm_window: default_confirm_window(),
            idle_timeout: default_idle_timeout(),
            max_message_size: default_max_message_size(),
            consumer_timeout: None,
            tls: None,
        }
    }

    /// What the driver can do: its profile's capabilities, with `consumer_timeout`
    /// as the longest a delivery may stay unsettled where one is set.
    pub fn capabilities(&self) -> queue_core::Capabilities {
        let profile = self.profile.capabilities();
        match self.consumer_timeout {
            None => profile,
            Some(limit) => queue_core::Capabilities {
                max_unsettled: (!limit.is_zero()).then_some(limit),
                ..profile
            },
        }
    }

    /// Reads the entry's fields (`INVALID` naming the kind and field on error).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let config: Amqp10Config = queue_core::config::from_value(KIND, value)?;
        config.validate()?;
        Ok(config)
    }

    /// The waits between reconnect attempts: doubling from `reconnect_delay` up to
    /// `reconnect_max_delay`.
    pub fn reconnect_backoff(&self) -> queue_core::Backoff {
        queue_core::Backoff::new(self.reconnect_delay, 2.0, self.reconnect_max_delay)
    }

    /// Checks values serde cannot: the URLs, delays and the window.
    pub fn validate(&self) -> Result<()> {
        let endpoints = self.endpoints()?;
        for (i, endpoint) in endpoints.iter().enumerate() {
            let rabbitmq = matches!(self.profile, Profile::RabbitmqV1 | Profile::RabbitmqV2);
            if endpoint.vhost.is_some() && !rabbitmq {
                return Err(field_error(
                    KIND,
                    &self.url_field(i),
                    format!(
                        "{}: a path names a RabbitMQ vhost, on the rabbitmq-v1 and rabbitmq-v2 profiles only",
                        endpoint.redacted
                    ),
                ));
            }
            if endpoint.tls && !cfg!(feature = "tls") {
                return Err(field_error(
                    KIND,
                    &self.url_field(i),
                    format!(
                        "{} needs TLS, but queue-amqp10 was built without its `tls` feature",
                        endpoint.redacted
                    ),
                ));
            }
            if self.tls.is_some() && !endpoint.tls {
                let which = match endpoints.len() {
                    1 => "the url".to_string(),
                    _ => format!("{} ({})", self.url_field(i), endpoint.redacted),
                };
                return Err(field_error(
                    KIND,
                    "tls",
                    format!("is set but {which} is not amqps://"),
                ));
            }
        }
        // Read now, so that `check` finds a file missing or without a certificate, not
        // the connect.
        #[cfg(feature = "tls")]
        if let Some(ca_file) = self.tls.as_ref().and_then(|t| t.ca_file.as_deref()) {
            crate::tls::trusting(ca_file).map_err(|e| e.with_detail("field", "tls"))?;
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
        if self.publish_timeout.is_zero() {
            return Err(field_error(KIND, "publish_timeout", "must be above zero"));
        }
        if !(1..=65_535).contains(&self.confirm_window) {
            return Err(field_error(
                KIND,
                "confirm_window",
                "must be between 1 and 65535",
            ));
        }
        if !self.idle_timeout.is_zero()
            && !(Duration::from_secs(1)..=Duration::from_millis(u64::from(u32::MAX)))
                .contains(&self.idle_timeout)
        {
            return Err(field_error(
                KIND,
                "idle_timeout",
                "must be 0s (off) or between 1s and about 49 days",
            ));
        }
        if !(MIN_MAX_MESSAGE_SIZE..=crate::guard::MAX_CLAIM).contains(&self.max_message_size) {
            // Past the guard's claim limit, a message the link took could not be
            // decoded: it was rejected (and dropped by a broker without a dead-letter
            // queue) where a larger one than the limit is refused and kept.
            return Err(field_error(
                KIND,
                "max_message_size",
                format!(
                    "must be between {MIN_MAX_MESSAGE_SIZE} bytes (64 KiB) and {} bytes (128 MiB, the largest value the driver decodes)",
                    crate::guard::MAX_CLAIM
                ),
            ));
        }
        if self.container_id.as_ref().is_some_and(|id| id.is_empty()) {
            return Err(field_error(KIND, "container_id", "is empty"));
        }
        Ok(())
    }

    /// The URLs without their passwords: one URL, or `[url, url, ...]` for a cluster.
    pub fn redacted_url(&self) -> String {
        match self.urls.as_slice() {
            [one] => redact_url(one),
            many => format!(
                "[{}]",
                many.iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Every node's parsed URL, in the configured order.
    pub(crate) fn endpoints(&self) -> Result<Vec<Endpoint>> {
        if self.urls.is_empty() {
            return Err(field_error(KIND, "url", "is an empty list"));
        }
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| Endpoint::parse_field(url, &self.url_field(i)))
            .collect()
    }

    /// The field an error about URL `i` names: `url`, or `url[i]` in a list.
    fn url_field(&self, i: usize) -> String {
        if self.urls.len() == 1 {
            "url".to_string()
        } else {
            format!("url[{i}]")
        }
    }
}

/// A parsed broker URL. The password never leaves this struct except into the SASL
/// profile; `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The RabbitMQ vhost the URL's path names (percent-decoded), if it names one.
    pub vhost: Option<String>,
    /// The URL with the password removed, for messages.
    pub redacted: String,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl Endpoint {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/[vhost]]`.
    #[cfg(test)]
    pub fn parse(url: &str) -> Result<Endpoint> {
        Endpoint::parse_field(url, "url")
    }

    /// Parses a URL; errors name `field` (`url`, or `url[1]` in a list).
    pub fn parse_field(url: &str, field: &str) -> Result<Endpoint> {
        let redacted = redact_url(url);
        let bad = |why: &str| field_error(KIND, field, format!("{redacted}: {why}"));
        let (tls, rest) = if let Some(rest) = url.strip_prefix("amqp://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("amqps://") {
            (true, rest)
        } else {
            return Err(bad("the scheme must be amqp:// or amqps://"));
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if queue_core::credentials_cut_short(url) {
            return Err(bad(
                "the user name or password holds a '/', '?' or '#': percent-encode it (%2F, %3F, %23)",
            ));
        }
        let vhost = match path.strip_prefix('/') {
            None if path.is_empty() => None,
            Some("") => None,
            Some(name) if !name.contains(['/', '?', '#']) => {
                Some(percent_decode(name).ok_or_else(|| bad("bad %-escape in the vhost"))?)
            }
            _ => {
                return Err(bad(
                    "only a vhost may follow the host: /VHOST, with a '/' in it percent-encoded (%2F); no query",
                ));
            }
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, pass) = match info.find(':') {
                    Some(colon) => (&info[..colon], Some(&info[colon + 1..])),
                    None => (info, None),
                };
                let user = percent_decode(user).ok_or_else(|| bad("bad %-escape in the user"))?;
                let pass = match pass {
                    Some(p) => {
                        Some(percent_decode(p).ok_or_else(|| bad("bad %-escape in the password"))?)
                    }
                    None => None,
                };
                if user.is_empty() {
                    return Err(bad("the user name is empty"));
                }
                (Some(user), pass)
            }
        };
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let close = bracketed
                .find(']')
                .ok_or_else(|| bad("unclosed '[' in the host"))?;
            let host = &bracketed[..close];
            let after = &bracketed[close + 1..];
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => return Err(bad("after ']' only ':port' may follow")),
            };
            (host.to_string(), port)
        } else {
            match hostport.rfind(':') {
                Some(colon) => (hostport[..colon].to_string(), Some(&hostport[colon + 1..])),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        let port = match port {
            None => {
                if tls {
                    5671
                } else {
                    5672
                }
            }
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?,
        };
        Ok(Endpoint {
            tls,
            host,
            port,
            username,
            password,
            vhost,
            redacted,
        })
    }

    /// The `hostname` of the connection's `open`: RabbitMQ reads the vhost from it,
    /// as `vhost:NAME`, and any other hostname as its default vhost.
    pub fn open_hostname(&self) -> String {
        match &self.vhost {
            Some(vhost) => format!("vhost:{vhost}"),
            None => self.host.clone(),
        }
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            // `from_str_radix` alone takes a sign: `%+1` is not an escape.
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ's `consumer_timeout` (30 minutes as it ships) bounds how long a
    /// delivery stays unsettled on the `rabbitmq-*` profiles; on the others nothing
    /// does unless told; `0s` is none.
    #[test]
    fn consumer_timeout_bounds_how_long_a_delivery_stays_unsettled() {
        let limit = |profile: &str, value: Option<&str>| {
            let mut fields = serde_json::json!({ "url": "amqp://127.0.0.1", "profile": profile });
            if let Some(value) = value {
                fields["consumer_timeout"] = serde_json::json!(value);
            }
            Amqp10Config::from_value(fields)
                .unwrap()
                .capabilities()
                .max_unsettled
        };
        let minutes = |m: u64| Some(Duration::from_secs(m * 60));
        assert_eq!(limit("rabbitmq-v1", None), minutes(30));
        assert_eq!(limit("rabbitmq-v2", Some("2h")), minutes(120));
        assert_eq!(limit("rabbitmq-v1", Some("0s")), None);
        assert_eq!(limit("artemis", None), None);
        assert_eq!(limit("generic", Some("5m")), minutes(5));
    }

    #[test]
    fn idle_timeout_is_off_at_zero_and_at_least_a_second_otherwise() {
        let parse = |value: &str| {
            serde_json::from_value::<Amqp10Config>(serde_json::json!({
                "url": "amqp://127.0.0.1", "idle_timeout": value
            }))
            .unwrap()
        };
        assert_eq!(
            Amqp10Config::new("amqp://127.0.0.1", Profile::Generic).idle_timeout,
            Duration::from_secs(60)
        );
        assert!(parse("0s").validate().is_ok());
        assert!(parse("15s").validate().is_ok());
        let err = parse("500ms").validate().unwrap_err();
        assert_eq!(err.details()["field"], "idle_timeout", "{err}");
        assert!(parse("1200h").validate().is_err());
    }

    #[test]
    fn max_message_size_defaults_to_128_mib_and_is_between_64_kib_and_128_mib() {
        let parse = |value: u64| {
            serde_json::from_value::<Amqp10Config>(serde_json::json!({
                "url": "amqp://127.0.0.1", "max_message_size": value
            }))
            .unwrap()
        };
        assert_eq!(
            Amqp10Config::new("amqp://127.0.0.1", Profile::Generic).max_message_size,
            128 * 1024 * 1024
        );
        assert!(parse(65_536).validate().is_ok());
        let err = parse(65_535).validate().unwrap_err();
        assert_eq!(err.details()["field"], "max_message_size", "{err}");
        // A larger limit let through messages the decoder refuses: rejected, not kept.
        assert!(parse(128 << 20).validate().is_ok());
        let err = parse((128 << 20) + 1).validate().unwrap_err();
        assert_eq!(err.details()["field"], "max_message_size", "{err}");
        assert!(err.message().contains("128 MiB"), "{err}");
    }

    #[test]
    fn urls_parse_with_and_without_credentials() {
        let e = Endpoint::parse("amqp://guest:s%40cret@127.0.0.1:5673").unwrap();
        assert_eq!(e.host, "127.0.0.1");
        assert_eq!(e.port, 5673);
        assert_eq!(e.username.as_deref(), Some("guest"));
        assert_eq!(e.password.as_deref(), Some("s@cret"));
        assert!(!format!("{e:?}").contains("cret"));
        let e = Endpoint::parse("amqps://broker.example").unwrap();
        assert!(e.tls);
        assert_eq!(e.port, 5671);
        assert_eq!(e.username, None);
        let e = Endpoint::parse("amqp://[::1]:5000/").unwrap();
        assert_eq!(e.host, "::1");
        assert_eq!(e.port, 5000);
    }

    /// RabbitMQ's AMQP 1.0 plugin reads the vhost from the `open`'s hostname, as
    /// `vhost:NAME` (any other hostname is its default vhost): a URL's path names it,
    /// as in an AMQP 0-9-1 URL. Refused before, with an error that sent users to the
    /// hostname, where any name meant the default vhost (review).
    #[test]
    fn a_path_names_the_rabbitmq_vhost() {
        let e = Endpoint::parse("amqp://u:p@rabbit:5672/orders").unwrap();
        assert_eq!(e.vhost.as_deref(), Some("orders"));
        assert_eq!(e.open_hostname(), "vhost:orders");
        let e = Endpoint::parse("amqp://u:p@rabbit/a%2Fb%20c").unwrap();
        assert_eq!(e.vhost.as_deref(), Some("a/b c"));
        for url in ["amqp://u:p@rabbit", "amqp://u:p@rabbit/"] {
            let e = Endpoint::parse(url).unwrap();
            assert_eq!(e.vhost, None);
            assert_eq!(e.open_hostname(), "rabbit");
        }
        let config = |profile: &str| {
            Amqp10Config::from_value(serde_json::json!({
                "url": ["amqp://u:p@a/orders", "amqp://u:p@b/orders"], "profile": profile
            }))
        };
        assert!(config("rabbitmq-v1").is_ok());
        assert!(config("rabbitmq-v2").is_ok());
        for profile in ["artemis", "generic"] {
            let err = config(profile).unwrap_err();
            assert_eq!(err.details()["field"], "url[0]", "{err}");
            assert!(err.message().contains("vhost"), "{err}");
        }
    }

    /// `tls.ca_file` is read when the configuration is checked: `/dev/zero` was read
    /// until memory ran out, and a named pipe nobody writes to waited forever
    /// (review); a file past 1 MiB is no certificate file.
    #[cfg(feature = "tls")]
    #[test]
    fn a_ca_file_that_never_ends_or_is_not_a_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let huge = dir.path().join("huge.pem");
        std::fs::write(&huge, vec![b'a'; 2 * 1024 * 1024]).unwrap();
        for (path, says) in [
            (fifo, "not a regular file"),
            ("/dev/zero".into(), "not a regular file"),
            (huge, "larger than 1 MiB"),
        ] {
            let config = serde_json::json!({
                "url": "amqps://u:p@127.0.0.1:5671", "tls": {"ca_file": path}
            });
            let read = queue_testkit::finishes_within(
                Duration::from_secs(30),
                "a CA file is read or refused at once",
                move || Amqp10Config::from_value(config),
            );
            let err = read.expect_err("refused");
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
            assert!(err.message().contains(says), "{err}");
        }
    }

    #[test]
    fn bad_urls_are_invalid_and_never_show_the_password() {
        for url in [
            "http://u:topsecret@h",
            "amqp://u:topsecret@h:notaport",
            "amqp://u:topsecret@:5672",
            "amqp://u:topsecret@h/a/b",
            "amqp://u:topsecret@h/vhost?heartbeat=5",
            "amqp://u:topsecret@h/bad%zz",
            "amqp://u:topsecret%zz@h",
        ] {
            let err = Endpoint::parse(url).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
            assert!(!err.to_string().contains("topsecret"), "{err}");
        }
    }

    /// A raw '/', '?' or '#' in a password (base64 has '/') cut the URL short and the
    /// error spoke of a path; text after an IPv6 literal was dropped (`[::1]5673`
    /// dialled 5672); `%+1` decoded as a byte.
    #[test]
    fn odd_characters_get_an_error_that_says_what_to_do() {
        for (url, says) in [
            ("amqp://u:top/secret@h", "percent-encode"),
            ("amqp://u:top?secret@h", "percent-encode"),
            ("amqp://u:top#secret@h", "percent-encode"),
            ("amqp://u:topsecret@[::1]5673", "after ']'"),
            ("amqp://u:topsecret%+1@h", "%-escape"),
        ] {
            let err = Endpoint::parse(url).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
            assert!(err.to_string().contains(says), "{url}: {err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c = Amqp10Config::from_value(serde_json::json!({"url": "amqp://127.0.0.1"})).unwrap();
        assert_eq!(c.profile, Profile::Generic);
        assert_eq!(c.reconnect_delay, Duration::from_secs(1));
        assert_eq!(c.reconnect_max_delay, Duration::from_secs(30));
        assert_eq!(c.publish_timeout, Duration::from_secs(5));
        let err = Amqp10Config::from_value(serde_json::json!({"url": "amqp://h", "vhost": "/"}))
            .unwrap_err();
        assert!(err.message().contains("vhost"), "{err}");
        let err = Amqp10Config::from_value(serde_json::json!({
            "url": "amqp://h", "reconnect_delay": "5s", "reconnect_max_delay": "1s"
        }))
        .unwrap_err();
        assert!(err.message().contains("reconnect_max_delay"), "{err}");
        let err = Amqp10Config::from_value(serde_json::json!({
            "url": "amqp://h", "profile": "rabbitmq-v3"
        }))
        .unwrap_err();
        assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
    }

    #[test]
    fn a_list_of_urls_is_a_cluster_and_errors_name_the_bad_one() {
        let c = Amqp10Config::from_value(serde_json::json!({
            "url": ["amqp://u:topsecret@a:5672", "amqp://u:topsecret@b:5673"]
        }))
        .unwrap();
        let endpoints = c.endpoints().unwrap();
        assert_eq!(
            endpoints.iter().map(|e| e.port).collect::<Vec<_>>(),
            [5672, 5673]
        );
        assert_eq!(
            c.redacted_url(),
            "[amqp://u:***@a:5672, amqp://u:***@b:5673]"
        );
        let err = Amqp10Config::from_value(serde_json::json!({
            "url": ["amqp://u:topsecret@a", "http://u:topsecret@b"]
        }))
        .unwrap_err();
        assert_eq!(err.details()["field"], "url[1]", "{err}");
        assert!(!err.to_string().contains("topsecret"), "{err}");
        for bad in [
            serde_json::json!([]),
            serde_json::json!(5),
            serde_json::json!({"a": 1}),
        ] {
            let err = Amqp10Config::from_value(serde_json::json!({ "url": bad })).unwrap_err();
            assert_eq!(err.details()["field"], "url", "{err}");
        }
    }
}
