//! Queue identifiers: `namespace:name`.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// A validated queue id, `namespace:name`, split at the first `:`.
///
/// ```
/// use queue_core::QueueId;
/// let id: QueueId = "app:tasks".parse().unwrap();
/// assert_eq!(id.namespace(), "app");
/// assert_eq!(id.name(), "tasks");
/// assert!(QueueId::parse("tasks").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId {
    full: String,
    colon: usize,
}

impl QueueId {
    /// The longest id, in bytes: a broker names its queue after it, and AMQP queue
    /// names are at most 255 bytes.
    pub const MAX_LEN: usize = 255;

    /// Parses and validates `namespace:name`: both parts non-empty, at most
    /// [`QueueId::MAX_LEN`] bytes, no whitespace or control characters. Anything else
    /// is `INVALID` with the reason (and never the whole of a long id).
    pub fn parse(text: &str) -> Result<QueueId> {
        if text.is_empty() {
            return Err(Error::invalid("queue id is empty"));
        }
        if text.len() > QueueId::MAX_LEN {
            return Err(Error::invalid(format!(
                "queue id {} is longer than {} bytes",
                shown(text),
                QueueId::MAX_LEN
            )));
        }
        if let Some(bad) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(format!(
                "queue id {text:?} contains {bad:?}: whitespace and control characters are not allowed"
            )));
        }
        let colon = text.find(':').ok_or_else(|| {
            Error::invalid(format!(
                "queue id {text:?} must have the form \"namespace:name\""
            ))
        })?;
        if colon == 0 || colon + 1 == text.len() {
            return Err(Error::invalid(format!(
                "queue id {text:?} needs a non-empty namespace and name (\"namespace:name\")"
            )));
        }
        Ok(QueueId {
            full: text.to_string(),
            colon,
        })
    }

    /// Builds an id from its two parts, validating them.
    pub fn new(namespace: &str, name: &str) -> Result<QueueId> {
        QueueId::parse(&format!("{namespace}:{name}"))
    }

    /// The part before the first `:`.
    pub fn namespace(&self) -> &str {
        &self.full[..self.colon]
    }

    /// The part after the first `:` (it may contain more colons).
    pub fn name(&self) -> &str {
        &self.full[self.colon + 1..]
    }

    /// The whole id.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

/// A text as an error shows it: quoted, and cut with its length when long.
fn shown(text: &str) -> String {
    if text.len() <= 64 {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(32).collect();
    format!("{head:?}... ({} bytes)", text.len())
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for QueueId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        QueueId::parse(s)
    }
}

impl AsRef<str> for QueueId {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn splits_at_the_first_colon() {
        let id = QueueId::parse("app:tasks:high").unwrap();
        assert_eq!(id.namespace(), "app");
        assert_eq!(id.name(), "tasks:high");
    }

    #[test]
    fn a_huge_id_is_refused_without_being_echoed() {
        let huge = format!("app:{}", "x".repeat(1024 * 1024));
        let err = QueueId::parse(&huge).unwrap_err();
        assert!(err.message().len() < 200, "{}", err.message().len());
        assert!(err.message().contains("1048580 bytes"), "{err}");
        assert!(QueueId::parse(&format!("app:{}", "x".repeat(251))).is_ok());
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "",
            ":",
            "app:",
            ":tasks",
            "apptasks",
            "app: tasks",
            "app:ta\tsks",
            "a\u{7}:b",
        ] {
            let err = QueueId::parse(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips(text in ".*") {
            if let Ok(id) = QueueId::parse(&text) {
                proptest::prop_assert_eq!(id.as_str(), text.as_str());
                proptest::prop_assert_eq!(format!("{}:{}", id.namespace(), id.name()), text);
            }
        }

        /// Random text is almost never an id: here every case is one, so the round
        /// trip is checked every time (any character but whitespace, control
        /// characters and, in the namespace, `:`; 61 characters of at most 4 bytes
        /// stay under the 255 bytes an id may take).
        #[test]
        fn every_valid_id_round_trips(
            namespace in "[^\\s\\p{Cc}:]{1,20}",
            name in "[^\\s\\p{Cc}]{1,40}",
        ) {
            let text = format!("{namespace}:{name}");
            let id = QueueId::parse(&text).unwrap();
            proptest::prop_assert_eq!(id.namespace(), namespace.as_str());
            proptest::prop_assert_eq!(id.name(), name.as_str());
            proptest::prop_assert_eq!(id.as_str(), text.as_str());
        }
    }
}
