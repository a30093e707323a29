//! Helpers every driver's configuration shares.

use std::time::Duration;

use serde::Deserialize;

use crate::{Error, Result};

/// Parses a duration: `"500ms"`, `"5s"`, `"2m"`, `"1h"`, or a bare number of seconds.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(queue_core::config::parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// assert_eq!(queue_core::config::parse_duration("2m").unwrap(), Duration::from_secs(120));
/// assert!(queue_core::config::parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| duration_error(text))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(duration_error(text)),
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(duration_error(text));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn duration_error(text: &str) -> Error {
    Error::invalid(format!(
        "{text:?} is not a duration: use a number with ms, s, m or h (\"500ms\", \"5s\")"
    ))
}

/// Serde support for durations in configuration (`#[serde(with = "queue_core::config::duration")]`).
pub mod duration {
    use super::*;
    use serde::Deserializer;

    /// Deserializes a string like `"5s"` or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Seconds(f64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(t) => t,
            Raw::Seconds(s) => s.to_string(),
        };
        parse_duration(&text).map_err(|e| serde::de::Error::custom(e.message()))
    }
}

/// Like [`duration`], for optional fields.
pub mod option_duration {
    use super::*;
    use serde::Deserializer;

    /// Deserializes an optional duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// Reads a driver's typed configuration out of the generic YAML value of its entry.
pub fn from_value<T: serde::de::DeserializeOwned>(
    kind: &str,
    value: serde_json::Value,
) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::invalid(format!("{kind}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "s", "-1s", "5 days", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
