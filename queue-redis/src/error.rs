//! Turning the redis crate's errors into the workspace's [`queue_core::Error`].
//!
//! The crate's errors never carry the connection URL, and the driver only ever
//! formats the redacted one, so no password reaches a message.

use queue_core::{Error, ErrorKind};
use redis::RedisError;

/// The error code the driver's scripts raise for a queue whose stream is gone.
pub(crate) const NOT_FOUND_CODE: &str = "QUEUE_NOT_FOUND";
/// The error code the driver's scripts raise for a full queue.
pub(crate) const FULL_CODE: &str = "QUEUE_FULL";
/// The error code the declare script raises for other settings.
pub(crate) const CONFLICT_CODE: &str = "QUEUE_CONFLICT";

/// Whether the error means the connection is gone (or never came up), so that a
/// fresh one may succeed.
pub(crate) fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
        || matches!(
            err.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::MasterDown
            )
        )
}

/// Whether Redis refused the login (a wrong password, a user that is gone or off).
/// The redis crate keeps a connection whose login failed and fails every command on
/// it with the same error: the driver replaces it ([`crate::connection::Link`]).
pub(crate) fn is_refused_login(err: &RedisError) -> bool {
    err.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// Whether Redis refused the `SELECT` of the URL's database (the redis crate sends it
/// as a connection comes up) because it has no such database. The crate words every
/// refused `SELECT` alike (an ACL that forbids it, a busy script): only the server's
/// own words tell this one.
fn is_refused_database(err: &RedisError) -> bool {
    err.to_string().contains("refused to switch database")
        && err
            .detail()
            .is_some_and(|d| d.contains("DB index is out of range"))
}

/// The portable error for a failed command; `what` says what was being done
/// (`publish to app:tasks`).
pub(crate) fn from_redis(what: impl std::fmt::Display, err: RedisError) -> Error {
    let code = err.code().unwrap_or_default().to_string();
    let detail = err.detail().unwrap_or_default().to_string();
    let error = if is_refused_login(&err) {
        Error::permission_denied(format!(
            "{what}: Redis refused the login ({})",
            if code.is_empty() {
                "authentication failed"
            } else {
                &code
            }
        ))
    } else if is_refused_database(&err) {
        // The URL's database number is past the server's `databases` setting: the
        // URL is at fault, and no retry mends it.
        Error::invalid(format!(
            "{what}: Redis has no such database ({detail}): the URL's path must be a database number below the server's `databases` setting (16 unless set)"
        ))
        .with_detail("field", "url")
    } else if code == "NOPERM" {
        // The crate keeps Redis' words out of `detail` for this code.
        let said = if detail.is_empty() {
            err.to_string()
        } else {
            detail
        };
        Error::permission_denied(format!("{what}: the Redis user may not do this: {said}"))
    } else if code == NOT_FOUND_CODE || code == "NOGROUP" {
        Error::not_found(format!(
            "{what}: the queue's stream or group does not exist"
        ))
    } else if code == FULL_CODE {
        Error::internal(format!("{what}: {detail}"))
    } else if code == "WRONGTYPE" {
        Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "{what}: a key of another type holds the queue's name in Redis (delete or rename it, or give the queue another queue_name)"
            ),
        )
    } else if code == CONFLICT_CODE {
        Error::new(ErrorKind::AlreadyExists, format!("{what}: {detail}"))
    } else if is_connection_error(&err) {
        Error::internal(format!("{what}: the connection to Redis failed: {err}"))
    } else {
        Error::internal(format!("{what}: {err}"))
    };
    // The server's code, for callers that tell errors apart: never their text, which
    // `what` (a message id, a queue name) may hold anything in.
    let error = if code.is_empty() {
        error
    } else {
        error.with_detail(REDIS_CODE, code)
    };
    error.with_source(err)
}

/// The detail that holds a server error's code (`TOO_WIDE`, `NOGROUP`, ...).
pub(crate) const REDIS_CODE: &str = "redis_code";

/// The code Redis (or one of the driver's scripts) answered `err` with, if any.
pub(crate) fn redis_code(err: &Error) -> Option<&str> {
    err.details().get(REDIS_CODE).map(String::as_str)
}

/// The driver is closed.
pub(crate) fn closed(what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Canceled,
        format!("{what}: the redis driver is closed"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &str) -> RedisError {
        redis::make_extension_error(code.to_string(), Some(detail.to_string()))
    }

    #[test]
    fn codes_map_to_portable_kinds() {
        let e = from_redis("publish", server(NOT_FOUND_CODE, "x"));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.retryable());
        let e = from_redis(
            "publish",
            server("WRONGPASS", "invalid username-password pair"),
        );
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let e = from_redis("declare", server(CONFLICT_CODE, "max_length 3, not 4"));
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        let e = from_redis("publish", server(FULL_CODE, "queue is full"));
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.message().contains("queue is full"), "{e}");
        // Another kind of key holds the queue's name: no retry mends that.
        let e = from_redis(
            "publish",
            server(
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
            ),
        );
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert!(!e.retryable());
        assert!(e.message().contains("another type"), "{e}");
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let e = from_redis("publish", io);
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.retryable());
    }

    /// Errors are told apart by the server's code, not by their text: a message id
    /// in `what` may read like any reply.
    #[test]
    fn the_code_is_read_from_the_reply_never_from_the_text() {
        let lookalike =
            "ack message TOO_WIDE the entry has more fields than a script can copy back";
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(redis_code(&from_redis(lookalike, io)), None);
        let e = from_redis("release message 1", server("TOO_WIDE", "it stays pending"));
        assert_eq!(redis_code(&e), Some("TOO_WIDE"));
        assert_eq!(redis_code(&e.context("more")), Some("TOO_WIDE"));
    }
}
