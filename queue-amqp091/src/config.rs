//! The `queue.driver.amqp` configuration (docs/configuration.md).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use queue_core::config::{duration, option_duration};
use queue_core::{Error, Result, redact_url};
use serde::Deserialize;

/// The entry kind this driver serves.
pub const KIND: &str = "queue.driver.amqp";

/// Configuration of one AMQP 0-9-1 connection (the fields of a `queue.driver.amqp`
/// entry). `Debug` never shows a password.
///
/// ```
/// let config = queue_amqp091::Amqp091Config::from_json(serde_json::json!({
///     "url": "amqp://app:secret@127.0.0.1:5672",
///     "publish_timeout": "2s",
/// })).unwrap();
/// assert_eq!(config.publish_timeout, std::time::Duration::from_secs(2));
/// assert!(!format!("{config:?}").contains("secret"));
///
/// // The nodes of one cluster: the driver connects to the first that answers.
/// let cluster = queue_amqp091::Amqp091Config::from_json(serde_json::json!({
///     "url": ["amqp://app:secret@rabbit-1.example:5672/", "amqp://app:secret@rabbit-2.example:5672/"],
/// })).unwrap();
/// assert_eq!(cluster.urls.len(), 2);
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amqp091Config {
    /// `url` in configuration: `amqp://user:pass@host:port/vhost` (or `amqps://` with
    /// the `tls` feature), or a list of them, the nodes of one cluster. The driver
    /// connects to the first node that answers, in list order, and after a
    /// connection loss to the next live one after the node it lost.
    #[serde(
        rename = "url",
        default = "default_urls",
        with = "queue_core::config::url_list"
    )]
    pub urls: Vec<String>,
    /// Virtual host; overrides the one in the URL.
    #[serde(default)]
    pub vhost: Option<String>,
    /// Name shown for the connection in the broker's management UI.
    #[serde(default)]
    pub connection_name: Option<String>,
    /// Heartbeat interval asked of the broker (whole seconds; default: the broker's).
    #[serde(default, with = "option_duration")]
    pub heartbeat: Option<Duration>,
    /// How long one connection attempt may take (default 10s).
    #[serde(default = "default_connection_timeout", with = "duration")]
    pub connection_timeout: Duration,
    /// First wait before reconnecting after a connection loss (default 1s).
    #[serde(default = "default_reconnect_delay", with = "duration")]
    pub reconnect_delay: Duration,
    /// The backoff doubles up to this (default 30s).
    #[serde(default = "default_reconnect_max_delay", with = "duration")]
    pub reconnect_max_delay: Duration,
    /// How long a publish may wait for a connection and for the broker's confirm
    /// (default 5s); then it fails INTERNAL, retryable.
    #[serde(default = "default_publish_timeout", with = "duration")]
    pub publish_timeout: Duration,
    /// At most this many published messages wait for their confirm at once (default 1000).
    #[serde(default = "default_confirm_window")]
    pub confirm_window: usize,
    /// The broker's `consumer_timeout`: how long it lets a delivery go unacknowledged
    /// before it closes the channel and gives the message out again (RabbitMQ's
    /// default, 30 minutes); `0s` where the broker has it off. The runtime refuses a
    /// consumer whose `timeout` reaches it (docs/drivers/amqp091.md, "Consuming").
    #[serde(default = "default_consumer_timeout", with = "duration")]
    pub consumer_timeout: Duration,
    /// TLS settings (`amqps://`); needs the crate's `tls` feature.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// TLS settings for `amqps://` URLs.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the certificate authorities to trust (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate clients by certificate.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_urls() -> Vec<String> {
    vec!["amqp://127.0.0.1:5672/%2f".to_string()]
}

fn default_connection_timeout() -> Duration {
    Duration::from_secs(10)
}
/// The largest frame the driver accepts (RabbitMQ's default `frame_max`).
pub(crate) const MAX_FRAME: u32 = 128 * 1024;
/// AMQP 0-9-1's smallest `frame_max`, which RabbitMQ holds a client to at the
/// handshake.
pub(crate) const MIN_FRAME: u32 = 4096;

fn default_reconnect_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_confirm_window() -> usize {
    1000
}
/// RabbitMQ's own default `consumer_timeout`.
pub(crate) const RABBITMQ_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
fn default_consumer_timeout() -> Duration {
    RABBITMQ_CONSUMER_TIMEOUT
}

impl Default for Amqp091Config {
    fn default() -> Self {
        Amqp091Config {
            urls: default_urls(),
            vhost: None,
            connection_name: None,
            heartbeat: None,
            connection_timeout: default_connection_timeout(),
            reconnect_delay: default_reconnect_delay(),
            reconnect_max_delay: default_reconnect_max_delay(),
            publish_timeout: default_publish_timeout(),
            confirm_window: default_confirm_window(),
            consumer_timeout: default_consumer_timeout(),
            tls: None,
        }
    }
}

impl fmt::Debug for Amqp091Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Amqp091Config")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("vhost", &self.vhost)
            .field("connection_name", &self.connection_name)
            .field("heartbeat", &self.heartbeat)
            .field("connection_timeout", &self.connection_timeout)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("publish_timeout", &self.publish_timeout)
            .field("consumer_timeout", &self.consumer_timeout)
            .field("confirm_window", &self.confirm_window)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Amqp091Config {
    /// A configuration with this URL and every other field at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Amqp091Config {
            urls: vec![url.into()],
            ..Amqp091Config::default()
        }
    }

    /// A configuration for the nodes of one cluster (tried in this order), every other
    /// field at its default.
    pub fn cluster<I>(urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Amqp091Config {
            urls: urls.into_iter().map(Into::into).collect(),
            ..Amqp091Config::default()
        }
    }

    /// Reads and checks the YAML/JSON value of a `queue.driver.amqp` entry.
    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        let config: Amqp091Config = queue_core::config::from_value(KIND, value)?;
        config.validate()?;
        Ok(config)
    }

    /// The waits between reconnect attempts: doubling from `reconnect_delay` up to
    /// `reconnect_max_delay`.
    pub fn reconnect_backoff(&self) -> queue_core::Backoff {
        queue_core::Backoff::new(self.reconnect_delay, 2.0, self.reconnect_max_delay)
    }

    /// What the driver can do against this broker: [`crate::CAPABILITIES`], with the
    /// broker's `consumer_timeout` as the longest a delivery may stay unsettled.
    pub fn capabilities(&self) -> queue_core::Capabilities {
        queue_core::Capabilities {
            max_unsettled: (!self.consumer_timeout.is_zero()).then_some(self.consumer_timeout),
            ..crate::CAPABILITIES
        }
    }

    /// Checks values serde cannot: the URL, the ranges, TLS availability.
    pub fn validate(&self) -> Result<()> {
        let endpoints = self.endpoints()?;
        if self.confirm_window == 0 || self.confirm_window > 1_000_000 {
            return Err(field_error(
                "confirm_window",
                "must be between 1 and 1000000",
            ));
        }
        if self.reconnect_delay.is_zero() {
            return Err(field_error("reconnect_delay", "must be more than 0"));
        }
        if self.reconnect_max_delay < self.reconnect_delay {
            return Err(field_error(
                "reconnect_max_delay",
                "must be at least reconnect_delay",
            ));
        }
        for (field, timeout) in [
            ("publish_timeout", self.publish_timeout),
            ("connection_timeout", self.connection_timeout),
        ] {
            if timeout.is_zero() {
                return Err(field_error(field, "must be more than 0"));
            }
        }
        if self.vhost.as_deref() == Some("") {
            return Err(field_error(
                "vhost",
                "is empty: RabbitMQ has no vhost \"\" (leave the field out for the URL's, `/` by default)",
            ));
        }
        if let Some(hb) = self.heartbeat
            && !(Duration::from_secs(1)..=Duration::from_secs(u64::from(u16::MAX))).contains(&hb)
        {
            // AMQP counts heartbeats in whole seconds, and lapin reads 0 as "the
            // broker's value": `500ms` and `0s` both gave RabbitMQ's 60 s.
            return Err(field_error(
                "heartbeat",
                "must be between 1s and 65535s (leave it out for the broker's value; heartbeats cannot be turned off)",
            ));
        }
        if !cfg!(feature = "tls") {
            let amqps = endpoints
                .iter()
                .position(|e| matches!(e.uri.scheme, AMQPScheme::AMQPS));
            if let Some(i) = amqps {
                return Err(field_error(
                    &self.url_field(i),
                    &format!(
                        "{} needs TLS, but queue-amqp091 was built without its \"tls\" feature",
                        endpoints[i].shown
                    ),
                ));
            }
            if self.tls.is_some() {
                return Err(field_error(
                    "tls",
                    "needs TLS, but queue-amqp091 was built without its \"tls\" feature",
                ));
            }
        }
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return Err(field_error("tls", "cert_file and key_file go together"));
        }
        // lapin speaks TLS only to `amqps://`: a `tls:` block beside an `amqp://` URL
        // (a typo, one plain node in a cluster's list) would log in in cleartext.
        if self.tls.is_some()
            && let Some(i) = endpoints
                .iter()
                .position(|e| !matches!(e.uri.scheme, AMQPScheme::AMQPS))
        {
            let which = match endpoints.len() {
                1 => "the url".to_string(),
                _ => format!("{} ({})", self.url_field(i), endpoints[i].shown),
            };
            return Err(field_error(
                "tls",
                &format!("is set but {which} is not amqps://: the password would go in cleartext"),
            ));
        }
        // Read now, so that `check` finds a file missing or not PEM, not the connect.
        self.tls_config()
            .map_err(|e| e.with_detail("field", "tls"))?;
        Ok(())
    }

    /// The URLs without their passwords, for logs and errors: one URL, or
    /// `[url, url, ...]` for a cluster.
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

    /// The field a validation error about URL `i` names: `url`, or `url[i]` in a list.
    fn url_field(&self, i: usize) -> String {
        if self.urls.len() == 1 {
            "url".to_string()
        } else {
            format!("url[{i}]")
        }
    }

    /// Every node's parsed URI, with `vhost`, `heartbeat` and `connection_timeout`
    /// applied, in the configured order.
    pub(crate) fn endpoints(&self) -> Result<Vec<Endpoint>> {
        if self.urls.is_empty() {
            return Err(field_error("url", "must name at least one node"));
        }
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| self.endpoint(i, url))
            .collect()
    }

    fn endpoint(&self, i: usize, url: &str) -> Result<Endpoint> {
        if queue_core::credentials_cut_short(url) {
            return Err(field_error(
                &self.url_field(i),
                &format!(
                    "{:?}: the user name or password holds a '/', '?' or '#', or the vhost an '@': percent-encode it (%2F, %3F, %23, %40)",
                    redact_url(url)
                ),
            ));
        }
        check_query(url).map_err(|why| {
            field_error(&self.url_field(i), &format!("{:?}: {why}", redact_url(url)))
        })?;
        // The parser's error repeats the whole URL, password included: never show it.
        let mut uri = AMQPUri::from_str(url).map_err(|_| {
            field_error(
                &self.url_field(i),
                &format!(
                    "{:?} is not an AMQP URL (amqp://user:password@host:port/vhost)",
                    redact_url(url)
                ),
            )
        })?;
        check_credentials(url, &uri).map_err(|why| {
            field_error(&self.url_field(i), &format!("{:?}: {why}", redact_url(url)))
        })?;
        // lapin's parser takes the host from the URL's domain, and an IP literal has
        // none: `amqp://[2001:db8::5]` dialled `localhost`, with the password. The
        // literal is the host (IPv4 literals parse as such already).
        if let Ok(parsed) = url::Url::parse(url)
            && let Some(url::Host::Ipv6(ip)) = parsed.host()
        {
            uri.authority.host = ip.to_string();
        }
        // `amqp://host:5672/` has an empty path. The AMQP URI spec reads that as the
        // vhost "", which RabbitMQ never has; pika, kombu and most users mean the
        // default vhost "/".
        if uri.vhost.is_empty() {
            uri.vhost = "/".to_string();
        }
        if let Some(vhost) = &self.vhost {
            uri.vhost = vhost.clone();
        }
        // The fields say these, checked; the URL's query said them unchecked: lapin
        // reads `heartbeat=0` as the broker's value, where pika and kombu turn
        // heartbeats off, and the field overwrote the query's timeout (review; the
        // query's `connection_timeout=` is refused by `check_query`).
        if uri.query.heartbeat == Some(0) && self.heartbeat.is_none() {
            return Err(field_error(
                &self.url_field(i),
                "`heartbeat=0` cannot turn heartbeats off (it means the broker's value): leave it out, or set the `heartbeat` field",
            ));
        }
        if let Some(hb) = self.heartbeat {
            uri.query.heartbeat = Some(u16::try_from(hb.as_secs()).unwrap_or(u16::MAX));
        }
        uri.query.connection_timeout =
            Some(u64::try_from(self.connection_timeout.as_millis()).unwrap_or(u64::MAX));
        // A frame bounds how deep another client can nest the header tables lapin's
        // parser recurses through (docs/drivers/amqp091.md, "Messages from other
        // clients"): never more than RabbitMQ's default, whatever the broker offers.
        // A URL's `frame_max=0` asks for the broker's size, which would lift the cap.
        uri.query.frame_max = Some(match uri.query.frame_max {
            None | Some(0) => MAX_FRAME,
            // RabbitMQ refuses it at the handshake.
            Some(f) if f < MIN_FRAME => {
                return Err(field_error(
                    &self.url_field(i),
                    &format!(
                        "{:?}: frame_max={f} is below AMQP 0-9-1's smallest frame, {MIN_FRAME} bytes",
                        redact_url(url)
                    ),
                ));
            }
            Some(f) => f.min(MAX_FRAME),
        });
        Ok(Endpoint {
            shown: redact_url(url),
            uri,
        })
    }

    /// Reads the TLS files into lapin's form.
    pub(crate) fn tls_config(&self) -> Result<lapin::tcp::OwnedTLSConfig> {
        let mut out = lapin::tcp::OwnedTLSConfig::default();
        let Some(tls) = &self.tls else {
            return Ok(out);
        };
        let read = |path: &PathBuf| {
            queue_core::config::read_regular_file(path, MAX_PEM_BYTES).map_err(|e| {
                Error::invalid(format!("{KIND}: tls: cannot read {}: {e}", path.display()))
            })
        };
        if let Some(ca) = &tls.ca_file {
            let pem = String::from_utf8(read(ca)?)
                .ok()
                .filter(|text| text.contains("-----BEGIN CERTIFICATE-----"));
            let Some(pem) = pem else {
                return Err(Error::invalid(format!(
                    "{KIND}: tls: ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); a DER file converts with `openssl x509 -inform der -in ca.der -out ca.pem`",
                    ca.display()
                )));
            };
            out.cert_chain = Some(pem);
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            let pem = read(cert)?;
            if !contains(&pem, "-----BEGIN CERTIFICATE-----") {
                return Err(Error::invalid(format!(
                    "{KIND}: tls: cert_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); a DER file converts with `openssl x509 -inform der -in cert.der -out cert.pem`",
                    cert.display()
                )));
            }
            // rustls reads PKCS#8, PKCS#1 (RSA) and SEC1 (EC) keys, none encrypted.
            let key_pem = read(key)?;
            let readable = ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"]
                .iter()
                .any(|kind| contains(&key_pem, &format!("-----BEGIN {kind}-----")));
            if !readable {
                let held = if contains(&key_pem, "-----BEGIN ENCRYPTED PRIVATE KEY-----") {
                    "an encrypted key, which the driver cannot open"
                } else {
                    "no PEM private key"
                };
                return Err(Error::invalid(format!(
                    "{KIND}: tls: key_file {} holds {held}; give it an unencrypted PEM key (-----BEGIN PRIVATE KEY-----; `openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.pkcs8.pem` converts one)",
                    key.display()
                )));
            }
            out.identity = Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key: key_pem });
        }
        Ok(out)
    }
}

/// Whether `bytes` hold `text`.
fn contains(bytes: &[u8], text: &str) -> bool {
    bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

/// The largest certificate or key file the driver reads.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// One node to connect to.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) uri: AMQPUri,
    /// The URL as configured, password redacted: what logs, errors and the
    /// connection report show.
    pub(crate) shown: String,
}

impl Endpoint {
    /// The vhost connected to.
    pub(crate) fn vhost(&self) -> &str {
        &self.uri.vhost
    }
}

/// Refuses what lapin would log in as `guest` in place of: an empty user name, and a
/// user with an empty or no password (its URL parser fills both in with RabbitMQ's
/// well-known default, so a `${RABBIT_PASSWORD}` set to nothing logged in as guest).
/// A URL without any user is that default on purpose; EXTERNAL and ANONYMOUS send no
/// password.
fn check_credentials(url: &str, uri: &AMQPUri) -> std::result::Result<(), &'static str> {
    if matches!(
        uri.query.auth_mechanism,
        Some(SASLMechanism::External | SASLMechanism::Anonymous)
    ) {
        return Ok(());
    }
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    let Some((userinfo, _host)) = authority.rsplit_once('@') else {
        return Ok(());
    };
    match userinfo.split_once(':') {
        _ if userinfo.is_empty() || userinfo.starts_with(':') => {
            Err("the user name is empty: lapin would log in as guest in its place")
        }
        None => Err("the user has no password: lapin would send the password guest"),
        Some((_, "")) => {
            Err("the password is empty (is its variable set?): lapin would send the password guest")
        }
        Some(_) => Ok(()),
    }
}

/// What is wrong with a URL's query, if anything: an option lapin does not read (pika's
/// and kombu's own, `socket_timeout`, `ssl_options`, ..., were silently ignored), or a
/// value it cannot parse (its parser's error named no option).
fn check_query(url: &str) -> std::result::Result<(), String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    for (option, value) in parsed.query_pairs() {
        let readable = match option.as_ref() {
            "frame_max" => value.parse::<u32>().is_ok(),
            "channel_max" | "heartbeat" => value.parse::<u16>().is_ok(),
            "connection_timeout" => {
                return Err(
                    "give the `connection_timeout` field instead of the URL's `connection_timeout=`"
                        .to_string(),
                );
            }
            "auth_mechanism" => {
                matches!(
                    value.as_ref(),
                    "plain" | "amqplain" | "external" | "anonymous"
                )
            }
            _ => {
                return Err(format!(
                    "the URL option `{option}` is not one the driver reads (frame_max, channel_max, heartbeat, auth_mechanism; the others are fields of the entry, docs/drivers/amqp091.md)"
                ));
            }
        };
        if !readable {
            return Err(match option.as_ref() {
                "auth_mechanism" => format!(
                    "`auth_mechanism={value}` is not one of plain, amqplain, external, anonymous"
                ),
                _ => format!("`{option}={value}` is not a whole number in range"),
            });
        }
    }
    Ok(())
}

fn field_error(field: &str, what: &str) -> Error {
    queue_core::config::field_error(KIND, field, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_follow_the_spec() {
        let c = Amqp091Config::from_json(json!({})).unwrap();
        assert_eq!(c.reconnect_delay, Duration::from_secs(1));
        assert_eq!(c.reconnect_max_delay, Duration::from_secs(30));
        assert_eq!(c.publish_timeout, Duration::from_secs(5));
        assert_eq!(c.confirm_window, 1000);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_invalid() {
        for bad in [
            json!({"urll": "amqp://x"}),
            json!({"confirm_window": 0}),
            json!({"publish_timeout": "soon"}),
            json!({"reconnect_delay": "5s", "reconnect_max_delay": "1s"}),
            json!({"url": "http://[::1"}),
        ] {
            let err = Amqp091Config::from_json(bad.clone()).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{bad}: {err}");
        }
    }

    /// lapin logs in as `guest` in place of an empty user name and of an empty or
    /// missing password: `${RABBIT_PASSWORD}` set to nothing logged in with RabbitMQ's
    /// well-known default (review). A URL without any user is RabbitMQ's default
    /// login, and EXTERNAL and ANONYMOUS take no password.
    #[test]
    fn an_empty_user_or_password_is_refused_not_replaced_by_guest() {
        for (url, says) in [
            ("amqp://app:@127.0.0.1:5672/%2f", "the password is empty"),
            ("amqp://app@127.0.0.1:5672", "no password"),
            ("amqp://:secret@127.0.0.1:5672", "the user name is empty"),
            ("amqp://:@127.0.0.1:5672", "the user name is empty"),
            ("amqp://@127.0.0.1:5672", "the user name is empty"),
        ] {
            let err = Amqp091Config::from_json(json!({ "url": url })).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{url}: {err}");
            assert!(err.message().contains(says), "{url}: {err}");
            assert!(err.message().contains("guest"), "{url}: {err}");
            assert!(!err.message().contains("secret"), "{url}: {err}");
        }
        for url in [
            "amqp://127.0.0.1:5672",
            "amqp://app:secret@127.0.0.1:5672",
            "amqp://app@127.0.0.1:5672?auth_mechanism=external",
            "amqp://127.0.0.1:5672?auth_mechanism=anonymous",
        ] {
            let config = Amqp091Config::from_json(json!({ "url": url }));
            assert!(config.is_ok(), "{url}: {:?}", config.err());
        }
    }

    /// RabbitMQ has no vhost `""`: `vhost: "${V}"` with `V` set to nothing passed
    /// `check` and failed every connect with NOT_FOUND (review).
    #[test]
    fn an_empty_vhost_field_is_refused_at_check() {
        let config = json!({"url": "amqp://app:pw@127.0.0.1:5672", "vhost": ""});
        let err = Amqp091Config::from_json(config).unwrap_err();
        assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
        assert_eq!(err.details()["field"], "vhost", "{err}");
    }

    // Without the feature, any `tls:` block is refused (`amqps_without_the_feature_says_so`).
    #[cfg(feature = "tls")]
    #[test]
    fn a_tls_block_beside_a_plain_url_is_refused_rather_than_logging_in_in_cleartext() {
        let tls = json!({"ca_file": "ca.pem"});
        for (urls, named) in [
            (json!("amqp://app:hunter2@127.0.0.1:5671"), "the url"),
            (
                json!([
                    "amqps://app:hunter2@127.0.0.1:5671",
                    "amqp://app:hunter2@127.0.0.1:5672"
                ]),
                "url[1]",
            ),
        ] {
            let err = Amqp091Config::from_json(json!({"url": urls, "tls": tls})).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
            let shown = err.to_string();
            assert!(
                shown.contains("is not amqps://") && shown.contains(named),
                "{shown}"
            );
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        // With amqps://, what stops it is the file, read when the config is checked.
        let secured = json!({"url": "amqps://app:hunter2@127.0.0.1:5671", "tls": tls});
        let err = Amqp091Config::from_json(secured).unwrap_err();
        assert!(err.message().contains("cannot read ca.pem"), "{err}");
        assert_eq!(
            err.details().get("field").map(String::as_str),
            Some("tls"),
            "{err}"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_ca_file_that_is_not_pem_or_is_huge_is_refused_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let der = dir.path().join("ca.der");
        std::fs::write(&der, [0x30, 0x82, 0x01, 0x0a, 0xff, 0xfe]).unwrap();
        let huge = dir.path().join("huge.pem");
        std::fs::write(&huge, vec![b'a'; 2 * 1024 * 1024]).unwrap();
        // A named pipe nobody writes to: opening it waited forever (review).
        let fifo = dir.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let zero = PathBuf::from("/dev/zero");
        for (path, says) in [
            (&der, "holds no PEM certificate"),
            (&huge, "larger than 1 MiB"),
            (&fifo, "not a regular file"),
            (&zero, "not a regular file"),
        ] {
            // Refused when the config is checked, not at the connect.
            let config = json!({"url": "amqps://u:p@127.0.0.1:5671", "tls": {"ca_file": path}});
            let read = queue_testkit::finishes_within(
                std::time::Duration::from_secs(30),
                "a TLS file is read or refused at once",
                move || Amqp091Config::from_json(config),
            );
            let Err(err) = read else {
                panic!("{} was taken", path.display())
            };
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
            assert!(err.message().contains(says), "{err}");
        }
    }

    /// `check` reads the client certificate and key too: a DER certificate or a key
    /// lapin cannot take (encrypted, or none) failed only at the connect (review);
    /// PKCS#1 and SEC1 keys, which rustls reads, pass.
    #[cfg(feature = "tls")]
    #[test]
    fn a_client_certificate_or_key_lapin_cannot_take_is_refused_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let cert = write(
            "cert.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let der = write("cert.der", "0\u{82}\u{1}");
        let pkcs8 = write(
            "key.pem",
            "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
        );
        let rsa = write(
            "rsa.pem",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n",
        );
        let encrypted = write(
            "enc.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIE\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let config = |cert: &std::path::Path, key: &std::path::Path| {
            Amqp091Config::from_json(json!({
                "url": "amqps://u:p@127.0.0.1:5671",
                "tls": {"cert_file": cert, "key_file": key}
            }))
        };
        config(&cert, &pkcs8).expect("a PEM certificate and a PKCS#8 key");
        config(&cert, &rsa).expect("a PKCS#1 key, which rustls reads");
        for (cert, key, says) in [
            (&der, &pkcs8, "cert_file"),
            (&cert, &der, "no PEM private key"),
            (&cert, &encrypted, "encrypted"),
        ] {
            let Err(err) = config(cert, key) else {
                panic!("{} and {} were taken", cert.display(), key.display())
            };
            assert!(err.message().contains(says), "{err}");
        }
    }

    #[test]
    fn a_bad_url_error_hides_the_password() {
        let err =
            Amqp091Config::from_json(json!({"url": "amqp://u:hunter2@host:notaport"})).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    }

    /// A '/' in a password cut the URL short: `amqp://app:2024/pw@rabbit` dialled host
    /// `app`, port 2024, as guest, and sent `pw@rabbit` as the vhost.
    #[test]
    fn a_password_holding_an_unencoded_slash_is_refused_saying_how_to_write_it() {
        for url in [
            "amqp://app:2024/pw@rabbit",
            "amqp://u:p#w@rabbit/",
            "amqp://u:p?w@rabbit",
        ] {
            let err = Amqp091Config::from_json(json!({ "url": url })).unwrap_err();
            assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{url}: {err}");
            assert!(err.to_string().contains("percent-encode"), "{url}: {err}");
            assert!(!err.to_string().contains("pw@"), "{url}: {err}");
        }
        let encoded =
            Amqp091Config::from_json(json!({ "url": "amqp://app:2024%2Fpw@rabbit/" })).unwrap();
        let uri = encoded.endpoints().unwrap().remove(0).uri;
        assert_eq!(
            (
                uri.authority.host.as_str(),
                uri.authority.userinfo.password.as_str()
            ),
            ("rabbit", "2024/pw")
        );
    }

    #[test]
    fn overrides_land_in_the_uri() {
        let c = Amqp091Config::from_json(json!({
            "url": "amqp://u:p@127.0.0.1:5673/%2f", "vhost": "other", "heartbeat": "10s"
        }))
        .unwrap();
        let uri = c.endpoints().unwrap().remove(0).uri;
        assert_eq!(uri.vhost, "other");
        assert_eq!(uri.query.heartbeat, Some(10));
        assert_eq!(uri.query.frame_max, Some(MAX_FRAME));
        assert_eq!(uri.authority.port, 5673);
    }

    #[test]
    fn an_ipv6_literal_is_the_host_not_localhost() {
        let c = Amqp091Config::from_json(json!({"url": "amqp://u:p@[2001:db8::5]:5673/"})).unwrap();
        let uri = c.endpoints().unwrap().remove(0).uri;
        assert_eq!(uri.authority.host, "2001:db8::5");
        assert_eq!(uri.authority.port, 5673);
        for (url, host) in [
            ("amqp://u:p@127.0.0.1:5672/", "127.0.0.1"),
            ("amqp://u:p@rabbit.example:5672/", "rabbit.example"),
        ] {
            let c = Amqp091Config::from_json(json!({ "url": url })).unwrap();
            assert_eq!(c.endpoints().unwrap().remove(0).uri.authority.host, host);
        }
    }

    #[test]
    fn a_frame_max_below_amqps_smallest_is_invalid() {
        let url = "amqp://u:secret@127.0.0.1:5672/?frame_max=4095";
        let Err(err) = Amqp091Config::from_json(json!({ "url": url })) else {
            panic!("frame_max=4095 taken")
        };
        assert_eq!(err.kind(), queue_core::ErrorKind::Invalid);
        assert!(err.message().contains("frame_max=4095"), "{err}");
        assert!(!err.message().contains("secret"), "{err}");
    }

    #[test]
    fn a_frame_max_of_zero_in_the_url_keeps_the_cap() {
        let c = Amqp091Config::from_json(json!({"url": "amqp://u:p@127.0.0.1:5672/?frame_max=0"}))
            .unwrap();
        let uri = c.endpoints().unwrap().remove(0).uri;
        assert_eq!(uri.query.frame_max, Some(MAX_FRAME));
    }

    #[test]
    fn a_heartbeat_is_whole_seconds_from_one() {
        for bad in ["0s", "500ms", "70000s"] {
            let err = Amqp091Config::from_json(json!({
                "url": "amqp://u:p@127.0.0.1:5672", "heartbeat": bad
            }))
            .unwrap_err();
            assert_eq!(err.details()["field"], "heartbeat", "{bad}: {err}");
        }
    }

    #[test]
    fn url_query_settings_the_fields_give_are_refused_where_they_mislead() {
        for url in [
            "amqp://u:p@127.0.0.1:5672/?heartbeat=0",
            "amqp://u:p@127.0.0.1:5672/?connection_timeout=60000",
        ] {
            let Err(err) = Amqp091Config::from_json(json!({ "url": url }))
                .and_then(|config| config.endpoints())
            else {
                panic!("{url} was taken");
            };
            assert_eq!(err.details()["field"], "url", "{url}: {err}");
        }
        let config =
            Amqp091Config::from_json(json!({ "url": "amqp://u:p@127.0.0.1:5672/?heartbeat=5" }))
                .unwrap();
        assert_eq!(config.endpoints().unwrap()[0].uri.query.heartbeat, Some(5));
        // The field, when set, says the heartbeat: the URL's 0 means nothing then.
        let config = Amqp091Config::from_json(
            json!({ "url": "amqp://u:p@127.0.0.1:5672/?heartbeat=0", "heartbeat": "10s" }),
        )
        .unwrap();
        assert_eq!(config.endpoints().unwrap()[0].uri.query.heartbeat, Some(10));
    }

    /// A query option lapin does not read (pika's and kombu's own) was silently
    /// ignored, and one it could not parse was "not an AMQP URL", naming nothing
    /// (review): each is refused, naming the option, never the password.
    #[test]
    fn url_query_options_are_read_or_refused_by_name() {
        for (url, says) in [
            ("amqp://u:secret@h/?socket_timeout=5", "`socket_timeout`"),
            ("amqp://u:secret@h/?ssl_options=x", "`ssl_options`"),
            ("amqp://u:secret@h/?heartbeat=30s", "`heartbeat=30s`"),
            ("amqp://u:secret@h/?frame_max=128k", "`frame_max=128k`"),
            (
                "amqp://u:secret@h/?channel_max=70000",
                "`channel_max=70000`",
            ),
            (
                "amqp://u:secret@h/?auth_mechanism=gssapi",
                "`auth_mechanism=gssapi`",
            ),
            (
                "amqp://u:secret@h/?connection_timeout=5s",
                "the `connection_timeout` field",
            ),
        ] {
            let Err(err) = Amqp091Config::from_json(json!({ "url": url }))
                .and_then(|config| config.endpoints())
            else {
                panic!("{url} was taken");
            };
            assert_eq!(err.details()["field"], "url", "{url}: {err}");
            assert!(err.message().contains(says), "{url}: {err}");
            assert!(!err.message().contains("secret"), "{url}: {err}");
        }
        let url = "amqp://u:p@h/?frame_max=131072&channel_max=64&heartbeat=5&auth_mechanism=plain";
        let endpoints = Amqp091Config::from_json(json!({ "url": url }))
            .and_then(|config| config.endpoints())
            .unwrap();
        assert_eq!(endpoints[0].uri.query.channel_max, Some(64));
    }

    /// The broker's `consumer_timeout` is the longest a delivery may stay unsettled:
    /// RabbitMQ's 30 minutes unless told, none at `0s`.
    #[test]
    fn consumer_timeout_bounds_how_long_a_delivery_stays_unsettled() {
        let limit = |value: Option<&str>| {
            let mut fields = json!({ "url": "amqp://u:p@127.0.0.1:5672" });
            if let Some(value) = value {
                fields["consumer_timeout"] = json!(value);
            }
            Amqp091Config::from_json(fields)
                .unwrap()
                .capabilities()
                .max_unsettled
        };
        assert_eq!(limit(None), Some(Duration::from_secs(1800)));
        assert_eq!(limit(Some("2h")), Some(Duration::from_secs(7200)));
        assert_eq!(limit(Some("0s")), None);
    }

    #[test]
    fn an_empty_path_is_the_default_vhost_and_percent_2f_still_works() {
        for (url, vhost) in [
            ("amqp://u:p@127.0.0.1:5672/", "/"),
            ("amqp://u:p@127.0.0.1:5672", "/"),
            ("amqp://u:p@127.0.0.1:5672/%2f", "/"),
            ("amqp://u:p@127.0.0.1:5672/%2F", "/"),
            ("amqp://u:p@127.0.0.1:5672/app", "app"),
            ("amqp://u:p@127.0.0.1:5672/app%2fprod", "app/prod"),
        ] {
            let c = Amqp091Config::new(url);
            assert_eq!(c.endpoints().unwrap()[0].vhost(), vhost, "{url}");
        }
    }

    #[test]
    fn url_takes_one_string_or_a_list_in_order() {
        let one = Amqp091Config::from_json(json!({"url": "amqp://u:p@a:5672/"})).unwrap();
        assert_eq!(one.urls, vec!["amqp://u:p@a:5672/"]);
        let many = Amqp091Config::from_json(json!({
            "url": ["amqp://u:s3cret@a:5672/", "amqp://u:s3cret@b:5673/", "amqp://u:s3cret@c:5674/"]
        }))
        .unwrap();
        let ports: Vec<u16> = many
            .endpoints()
            .unwrap()
            .iter()
            .map(|e| e.uri.authority.port)
            .collect();
        assert_eq!(ports, vec![5672, 5673, 5674]);
        let shown = format!("{many:?} {}", many.redacted_url());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://u:***@b:5673/"), "{shown}");
    }

    #[test]
    fn url_list_errors_name_the_entry_and_hide_passwords() {
        let err = Amqp091Config::from_json(json!({"url": []})).unwrap_err();
        assert_eq!(err.details()["field"], "url", "{err}");
        let err = Amqp091Config::from_json(json!({
            "url": ["amqp://u:hunter2@a:5672/", "amqp://u:hunter2@b:notaport/"]
        }))
        .unwrap_err();
        assert_eq!(err.details()["field"], "url[1]", "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = Amqp091Config::from_json(json!({"url": 5})).unwrap_err();
        assert!(err.message().contains("url"), "{err}");
        assert!(err.message().contains("list of URLs"), "{err}");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn amqps_without_the_feature_says_so() {
        let err = Amqp091Config::from_json(json!({"url": "amqps://u:p@127.0.0.1"})).unwrap_err();
        assert!(err.message().contains("tls"), "{err}");
    }
}
