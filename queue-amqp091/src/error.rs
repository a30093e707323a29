//! lapin errors -> the workspace's [`Error`].
//!
//! Nothing here formats a URL: connection errors get their (redacted) address from
//! the caller. lapin's own messages never carry credentials, but the parse error of
//! an AMQP URI does, so URI parsing has its own path in `config.rs`.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use queue_core::{Error, ErrorKind};

/// The AMQP reply code of a broker error, if the error is one.
pub(crate) fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Whether the error means the connection (not just one channel) is gone.
pub(crate) fn is_connection_level(err: &lapin::Error) -> bool {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Hard(_)),
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::RuntimeShutdownError(_)
        | lapin::ErrorKind::MissingHeartbeatError
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::ParsingError(_)
        | lapin::ErrorKind::SerialisationError(_) => true,
        _ => false,
    }
}

/// What RabbitMQ says with NOT_FOUND when a queue exists but its process is down for
/// a while (its node stopping or stopped in a cluster): not a missing queue, and
/// cured by waiting, so it is `UNAVAILABLE` and retried.
const QUEUE_DOWN: [&str; 2] = [
    "process is stopped by supervisor",
    "is down or inaccessible",
];

/// Maps a lapin error to a portable one; `what` says what was being done
/// ("declare queue app:tasks"). Broker refusals keep their AMQP reply text.
pub(crate) fn map(what: impl std::fmt::Display, err: lapin::Error) -> Error {
    let (kind, retryable) = match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
                if QUEUE_DOWN
                    .iter()
                    .any(|t| amqp.get_message().as_str().contains(t)) =>
            {
                (ErrorKind::Unavailable, true)
            }
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => (ErrorKind::NotFound, false),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                (ErrorKind::PermissionDenied, false)
            }
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                (ErrorKind::AlreadyExists, false)
            }
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => (ErrorKind::Invalid, false),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => (ErrorKind::PermissionDenied, false),
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => (ErrorKind::Internal, true),
            _ => (ErrorKind::Internal, true),
        },
        _ => (ErrorKind::Internal, true),
    };
    let detail = describe(&err);
    let code = reply_code(&err);
    let mut out = Error::new(kind, format!("{what}: {detail}")).retryable_if(retryable);
    if let Some(code) = code {
        out = out.with_detail("amqp_reply_code", code.to_string());
    }
    out.with_source(err)
}

/// A short human description of a lapin error.
pub(crate) fn describe(err: &lapin::Error) -> String {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!("broker replied {} {}", amqp.get_id(), amqp.get_message())
        }
        lapin::ErrorKind::IOError(io) => format!("I/O error: {io}"),
        lapin::ErrorKind::MissingHeartbeatError => "missed broker heartbeats".to_string(),
        lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidConnectionState(_) => {
            format!("connection or channel is closed ({err})")
        }
        _ => err.to_string(),
    }
}

/// The error of an operation attempted while no connection is up.
pub(crate) fn not_connected(what: impl std::fmt::Display, why: &str) -> Error {
    Error::internal(format!("{what}: not connected to the broker ({why})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn amqp(code: u16, text: &str) -> lapin::Error {
        let e = AMQPError::from_id(code, text.into()).expect("known code");
        lapin::ErrorKind::ProtocolError(e).into()
    }

    #[test]
    fn broker_codes_map_to_kinds() {
        let e = map(
            "declare q",
            amqp(406, "PRECONDITION_FAILED - inequivalent arg"),
        );
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(!e.retryable());
        assert!(e.message().contains("inequivalent arg"), "{e}");
        assert_eq!(map("x", amqp(404, "NOT_FOUND")).kind(), ErrorKind::NotFound);
        // A queue whose node is down in a cluster comes back: retried.
        let down = map(
            "x",
            amqp(
                404,
                "NOT_FOUND - home node 'rabbit@a' of durable queue 'q' in vhost '/' is down or inaccessible",
            ),
        );
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(down.retryable());
        assert_eq!(
            map("x", amqp(403, "ACCESS_REFUSED")).kind(),
            ErrorKind::PermissionDenied
        );
        let forced = map("x", amqp(320, "CONNECTION_FORCED"));
        assert_eq!(forced.kind(), ErrorKind::Internal);
        assert!(forced.retryable());
        assert!(is_connection_level(&amqp(320, "CONNECTION_FORCED")));
        assert!(!is_connection_level(&amqp(404, "NOT_FOUND")));
    }
}
