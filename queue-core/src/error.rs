//! The one error type of the workspace: a portable [`ErrorKind`], a retryable flag, a
//! message, optional details and the driver's own error as the source.

use std::collections::BTreeMap;
use std::fmt;

/// The portable error kinds. The Lua constants (`errors.INVALID`, ...) and their string
/// values (`"Invalid"`, ...) come from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bad input: a malformed queue id, empty data, a value that cannot be carried.
    Invalid,
    /// A security policy denied the action.
    PermissionDenied,
    /// The queue (or another named thing) does not exist.
    NotFound,
    /// The thing already exists with other settings.
    AlreadyExists,
    /// The broker or a resource is not reachable right now.
    Unavailable,
    /// An operation did not finish in time.
    Timeout,
    /// The operation was cancelled (a consumer was cancelled, the runtime is stopping).
    Canceled,
    /// Anything else, including a publish the broker did not confirm.
    Internal,
}

impl ErrorKind {
    /// Every kind, in the order of the specification.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Invalid,
        ErrorKind::PermissionDenied,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Canceled,
        ErrorKind::Internal,
    ];

    /// The string value a Lua script sees (`err:kind() == "Invalid"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "Invalid",
            ErrorKind::PermissionDenied => "PermissionDenied",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::Timeout => "Timeout",
            ErrorKind::Canceled => "Canceled",
            ErrorKind::Internal => "Internal",
        }
    }

    /// The name of the Lua constant (`errors.PERMISSION_DENIED`).
    pub fn constant_name(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "INVALID",
            ErrorKind::PermissionDenied => "PERMISSION_DENIED",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::AlreadyExists => "ALREADY_EXISTS",
            ErrorKind::Unavailable => "UNAVAILABLE",
            ErrorKind::Timeout => "TIMEOUT",
            ErrorKind::Canceled => "CANCELED",
            ErrorKind::Internal => "INTERNAL",
        }
    }

    /// Parses the string value back (`"Invalid"` -> `Invalid`).
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == name || k.constant_name() == name)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error with a portable kind, a retryable flag and a message.
///
/// The message is what a user reads; drivers put their own error in [`Error::with_source`].
/// Nothing here ever formats a connection URL with its password: drivers pass URLs
/// through [`redact_url`] first.
///
/// ```
/// use queue_core::{Error, ErrorKind};
/// let err = Error::invalid("queue id is empty");
/// assert_eq!(err.kind(), ErrorKind::Invalid);
/// assert!(!err.retryable());
/// assert_eq!(err.to_string(), "Invalid: queue id is empty");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    retryable: bool,
    message: String,
    details: BTreeMap<String, String>,
    #[source]
    source: Option<Source>,
}

/// The workspace's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error; `retryable` defaults to true only for `Internal`, `Unavailable` and
    /// `Timeout`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let retryable = matches!(
            kind,
            ErrorKind::Internal | ErrorKind::Unavailable | ErrorKind::Timeout
        );
        Error {
            kind,
            retryable,
            message: message.into(),
            details: BTreeMap::new(),
            source: None,
        }
    }

    /// `INVALID`, not retryable.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// `PERMISSION_DENIED`, not retryable.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }

    /// `NOT_FOUND`, not retryable.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// `INTERNAL`, retryable.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Overrides the retryable flag.
    pub fn retryable_if(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Adds one detail (shown to Lua as `err:details()`).
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }

    /// The error that ended a batch publish, with how far the batch got: details
    /// `confirmed` (how many of its messages are known to be published: a count, not
    /// which ones, as pipelined publishes complete in any order) and `batch_size`. A
    /// caller that publishes the batch again duplicates `confirmed` of them. A batch
    /// of one is left as it is, and so is an error that says it already (a layer
    /// above the driver adds `in_batch(0, n)` to what was refused before sending).
    ///
    /// ```
    /// use queue_core::{Error, ErrorKind};
    /// let e = Error::new(ErrorKind::Internal, "queue full").in_batch(2, 5);
    /// assert_eq!(e.details().get("confirmed").map(String::as_str), Some("2"));
    /// assert_eq!(e.details().get("batch_size").map(String::as_str), Some("5"));
    /// // Said once, by whoever knew: a layer above leaves it as it is.
    /// let e = e.in_batch(0, 5);
    /// assert_eq!(e.details().get("confirmed").map(String::as_str), Some("2"));
    /// ```
    pub fn in_batch(self, confirmed: usize, batch_size: usize) -> Self {
        if batch_size <= 1 || self.details.contains_key("batch_size") {
            return self;
        }
        self.with_detail("confirmed", confirmed.to_string())
            .with_detail("batch_size", batch_size.to_string())
    }

    /// Keeps the driver's own error as the source.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Prefixes the message with where it happened (`"publish to app:tasks: ..."`),
    /// unless it begins so already: a driver's error often names its operation, and
    /// its caller's same context read `publish to app:tasks: publish to app:tasks: ...`.
    ///
    /// ```
    /// use queue_core::Error;
    /// let e = Error::internal("publish to app:tasks: nack").context("publish to app:tasks");
    /// assert_eq!(e.message(), "publish to app:tasks: nack");
    /// let e = Error::internal("nack").context("publish to app:tasks");
    /// assert_eq!(e.message(), "publish to app:tasks: nack");
    /// ```
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        let context = context.to_string();
        let said_already = self
            .message
            .strip_prefix(context.as_str())
            .is_some_and(|rest| rest.starts_with(": "));
        if !said_already {
            self.message = format!("{context}: {}", self.message);
        }
        self
    }

    /// The portable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether trying the same operation again may succeed.
    pub fn retryable(&self) -> bool {
        self.retryable
    }

    /// The message without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Extra key/value details.
    pub fn details(&self) -> &BTreeMap<String, String> {
        &self.details
    }

    /// `true` if the error is of this kind.
    pub fn is(&self, kind: ErrorKind) -> bool {
        self.kind == kind
    }
}

/// Removes the password from anything that was meant as a URL, for logs and errors,
/// whatever its validity: a raw `/`, `#`, `?` or `@` in the password, no scheme, or a
/// URL that YAML cut at an unquoted ` #` (which leaves the password where the port
/// belongs). When in doubt it hides more, never less.
///
/// ```
/// use queue_core::redact_url;
/// assert_eq!(
///     redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
///     "amqp://guest:***@127.0.0.1:5672/%2f"
/// );
/// assert_eq!(redact_url("amqp://u:pa/ss#x@h/"), "amqp://u:***@h/");
/// assert_eq!(redact_url("guest:secret@h:5672"), "guest:***@h:5672");
/// assert_eq!(redact_url("amqp://u:secr"), "amqp://u:***");
/// assert_eq!(redact_url("amqp://u:83119274"), "amqp://u:***");
/// assert_eq!(redact_url("amqp://u:+5672"), "amqp://u:***");
/// assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
/// // A query parameter named like a secret is hidden too (no client reads one, but a
/// // careless user writes it there).
/// assert_eq!(redact_url("redis://h/0?password=s3cret"), "redis://h/0?password=***");
/// ```
pub fn redact_url(url: &str) -> String {
    redact_query_secrets(&redact_userinfo(url))
}

/// Whether `url`'s user name or password holds a character that ends the authority
/// (`/`, `?` or `#`) unencoded: the `@` of the credentials then comes after the cut, in
/// the path, query or fragment, and a URL parser reads part of the password as the
/// host, port or path (`amqp://app:2024/pw@rabbit` dialled host `app`, port 2024, and
/// sent `pw@rabbit` as the vhost). An `@` in a path (a vhost) must be encoded (`%40`)
/// for the same reason.
///
/// ```
/// use queue_core::credentials_cut_short;
/// assert!(credentials_cut_short("amqp://app:2024/pw@rabbit"));
/// assert!(credentials_cut_short("redis://u:p#w@h/0"));
/// assert!(!credentials_cut_short("amqp://app:2024%2Fpw@rabbit/%2f"));
/// assert!(!credentials_cut_short("amqp://rabbit:5672/"));
/// ```
pub fn credentials_cut_short(url: &str) -> bool {
    let rest = url.find("://").map_or(url, |i| &url[i + 3..]);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[authority_end..].contains('@')
}

/// Query parameter names that hold a secret when they contain one of these.
const SECRET_PARAMETERS: [&str; 8] = [
    "pass", "pwd", "secret", "token", "key", "auth", "sig", "cred",
];

/// Hides the value of every query parameter whose name looks like a secret's.
fn redact_query_secrets(url: &str) -> String {
    // The query begins at the first '?' past the scheme: the password is hidden
    // already (`***` holds none), and a value may hold an '@' (`?password=p@ss`), so
    // no '@' says where the query starts. A '?' in a user name starts it too early,
    // which hides more, never less.
    let start = url.find("://").map_or(0, |i| i + 3);
    let Some(question) = url[start..].find('?').map(|q| start + q) else {
        return url.to_string();
    };
    let (head, rest) = url.split_at(question + 1);
    let (query, fragment) = rest.split_at(rest.find('#').unwrap_or(rest.len()));
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if looks_secret(name) => format!("{name}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}{}{fragment}", pairs.join("&"))
}

fn looks_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMETERS.iter().any(|s| name.contains(s))
}

/// Hides the password of the userinfo (see [`redact_url`]).
fn redact_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = url.split_at(start);
    // The userinfo ends at the last '@': a password may hold any character.
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        return match userinfo.find(':') {
            Some(colon) => format!("{scheme}{}:***@{}", &userinfo[..colon], &rest[at + 1..]),
            None => url.to_string(),
        };
    }
    // No '@': what follows a ':' in the authority must be a port, or it is a password.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host_end = if authority.starts_with('[') {
        authority.find(']').map_or(authority.len(), |i| i + 1)
    } else {
        0
    };
    match authority[host_end..].find(':') {
        Some(colon) => {
            let colon = host_end + colon;
            let port = &authority[colon + 1..];
            // Digits past a port's range are a password cut short: shown, they were
            // "not an AMQP URL" with the password in it (review).
            // Digits only: `parse` takes a `+` in front, which no URL's port has.
            if port.is_empty()
                || (port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok())
            {
                url.to_string()
            } else {
                // A broken URL: everything after the colon may be the password.
                format!("{scheme}{}:***", &authority[..colon])
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(kind.as_str()), Some(kind));
            assert_eq!(ErrorKind::from_name(kind.constant_name()), Some(kind));
        }
        assert_eq!(ErrorKind::from_name("Nope"), None);
    }

    #[test]
    fn retryable_defaults_follow_the_kind() {
        assert!(Error::internal("x").retryable());
        assert!(!Error::invalid("x").retryable());
        assert!(!Error::internal("x").retryable_if(false).retryable());
    }

    #[test]
    fn redaction_keeps_everything_but_the_password() {
        assert_eq!(
            redact_url("amqps://u:p%40ss@h:1/v?x=1"),
            "amqps://u:***@h:1/v?x=1"
        );
        assert_eq!(redact_url("amqp://user@h"), "amqp://user@h");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("amqp://u:p@ss@h/"), "amqp://u:***@h/");
        assert_eq!(redact_url("amqp://[::1]:5672/"), "amqp://[::1]:5672/");
        assert_eq!(
            redact_url("amqp://u:p?ss@[::1]:5672/"),
            "amqp://u:***@[::1]:5672/"
        );
        assert_eq!(
            redact_url("redis://h:6379/0?protocol=resp3&Password=x&apiKey=y#f"),
            "redis://h:6379/0?protocol=resp3&Password=***&apiKey=***#f"
        );
        assert_eq!(
            redact_url("amqp://u:p@h/?heartbeat=5&auth_token=t"),
            "amqp://u:***@h/?heartbeat=5&auth_token=***"
        );
        // An '@' in a query value (review).
        assert_eq!(
            redact_url("redis://h/0?password=top@secret"),
            "redis://h/0?password=***"
        );
        assert_eq!(
            redact_url("amqp://h/?email=a@b&token=t"),
            "amqp://h/?email=a@b&token=***"
        );
    }

    #[test]
    fn no_password_survives_redaction_whatever_the_url() {
        // Every character a password may hold raw, placed where a careless user puts it.
        for password in [
            "pa/ss", "pa#ss", "pa?ss", "pa@ss", "p:a:ss", "pa ss", "päss", "pa%2Fss",
        ] {
            for url in [
                format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
                format!("amqps://guest:{password}@host/vhost?heartbeat=5"),
                format!("guest:{password}@127.0.0.1:5672"),
                format!("amqp://guest:{password}"),
            ] {
                if password.contains('@') && url == format!("amqp://guest:{password}") {
                    continue; // cut short, `guest:pa@ss` reads as user:pass@host
                }
                let shown = redact_url(&url);
                let secret = password
                    .split(['/', '#', '?', '@', ':', ' '])
                    .max_by_key(|p| p.len())
                    .unwrap_or(password);
                assert!(!shown.contains(secret), "{url} shows {shown}");
            }
        }
    }
}
