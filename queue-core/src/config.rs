//! Helpers every driver's configuration shares.

use std::time::Duration;

use serde::Deserialize;

use crate::{Error, Result};

/// Reads `reader` to its end, refusing more than `max` bytes ("larger than N MiB")
/// rather than reading until memory runs out: the files a runtime is pointed at
/// (configuration, Lua sources) may turn out to be `/dev/zero` or a runaway pipe.
///
/// ```
/// let text = queue_core::config::read_at_most(&b"namespace: app"[..], 1024 * 1024).unwrap();
/// assert_eq!(text, b"namespace: app");
/// let endless = std::io::repeat(b'x');
/// let err = queue_core::config::read_at_most(endless, 1024 * 1024).unwrap_err();
/// assert_eq!(err.to_string(), "larger than 1 MiB");
/// ```
pub fn read_at_most(reader: impl std::io::Read, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    reader.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            max / (1024 * 1024)
        )));
    }
    Ok(bytes)
}

/// Reads the regular file at `path`, at most `max` bytes (as [`read_at_most`]). A
/// directory, a device or a named pipe is refused ("not a regular file") without
/// being read: `/dev/zero` never ends, and opening a pipe nobody writes to waits
/// forever. For the files a configuration names (Lua sources, certificates).
///
/// ```
/// let err = queue_core::config::read_regular_file("/dev/zero".as_ref(), 1024).unwrap_err();
/// assert_eq!(err.to_string(), "not a regular file");
/// ```
pub fn read_regular_file(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    let is_file = |metadata: std::fs::Metadata| match metadata.is_file() {
        true => Ok(()),
        false => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )),
    };
    // Before opening, so that no device is opened (opening some acts on them)...
    is_file(std::fs::metadata(path)?)?;
    let file = open_without_waiting(path)?;
    // ...and of the open file, in case the path was swapped in between.
    is_file(file.metadata()?)?;
    read_at_most(file, max)
}

/// Opens `path` for reading without waiting: opening a named pipe waits for a writer
/// unless asked not to. A regular file reads as usual with the flag set.
#[cfg(unix)]
fn open_without_waiting(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Elsewhere no file-system entry makes opening wait.
#[cfg(not(unix))]
fn open_without_waiting(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

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
        // Serde's default text for a mismatch names the enum, which tells a user nothing.
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "expected a duration: a number with ms, s, m or h (\"500ms\", \"5s\")"
        )]
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

/// Parses a size in bytes: a bare number of bytes, or a number with `KiB`, `MiB` or
/// `GiB`.
///
/// ```
/// assert_eq!(queue_core::config::parse_byte_size("64MiB").unwrap(), 64 * 1024 * 1024);
/// assert_eq!(queue_core::config::parse_byte_size("4096").unwrap(), 4096);
/// assert!(queue_core::config::parse_byte_size("lots").is_err());
/// ```
pub fn parse_byte_size(text: &str) -> Result<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: usize = number.parse().map_err(|_| byte_size_error(text))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(byte_size_error(text)),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| byte_size_error(text))
}

fn byte_size_error(text: &str) -> Error {
    Error::invalid(format!(
        "{text:?} is not a size: use a number of bytes, or a number with KiB, MiB or GiB (\"256MiB\")"
    ))
}

/// Serde support for sizes in configuration (`"256MiB"` or a number of bytes).
pub mod byte_size {
    use super::*;
    use serde::Deserializer;

    /// Deserializes a string like `"256MiB"` or a number of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "expected a size: a number of bytes, or a number with KiB, MiB or GiB (\"256MiB\")"
        )]
        enum Raw {
            Text(String),
            Bytes(u64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(t) => t,
            Raw::Bytes(n) => n.to_string(),
        };
        parse_byte_size(&text).map_err(|e| serde::de::Error::custom(e.message()))
    }
}

/// Serde support for a driver's `url`: one URL, or a list of them (the nodes of one
/// cluster). Always a non-empty list once read.
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Entry {
///     #[serde(rename = "url", with = "queue_core::config::url_list")]
///     urls: Vec<String>,
/// }
/// let one: Entry = serde_json::from_value(serde_json::json!({"url": "amqp://a"})).unwrap();
/// let two: Entry = serde_json::from_value(serde_json::json!({"url": ["amqp://a", "amqp://b"]})).unwrap();
/// assert_eq!((one.urls.len(), two.urls.len()), (1, 2));
/// assert!(serde_json::from_value::<Entry>(serde_json::json!({"url": []})).is_err());
/// ```
pub mod url_list {
    use serde::{Deserialize, Deserializer};

    /// Deserializes `"amqp://..."` or `["amqp://...", ...]`.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "expected a URL or a list of URLs (amqp://user:password@host:port)"
        )]
        enum Urls {
            One(String),
            Many(Vec<String>),
        }
        match Urls::deserialize(d)? {
            Urls::One(url) => Ok(vec![url]),
            Urls::Many(urls) if urls.is_empty() => Err(serde::de::Error::custom(
                "the list of URLs is empty: give at least one",
            )),
            Urls::Many(urls) => Ok(urls),
        }
    }
}

/// Reads a driver's typed configuration out of the generic YAML value of its entry.
/// The error's `field` detail names the field at fault (`tls.ca_file`), so the
/// runtime can point at its line.
pub fn from_value<T: serde::de::DeserializeOwned>(
    kind: &str,
    value: serde_json::Value,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // Unknown and missing fields are reported at the entry, with the name quoted.
        let field = if path == "." {
            message.split('`').nth(1).unwrap_or_default().to_string()
        } else {
            path
        };
        let error = if field.is_empty() || message.contains(&format!("`{field}`")) {
            Error::invalid(format!("{kind}: {message}"))
        } else {
            Error::invalid(format!("{kind}: {field}: {message}"))
        };
        if field.is_empty() {
            error
        } else {
            error.with_detail("field", field)
        }
    })
}

/// A driver configuration error about one field: `INVALID`, with the field in the
/// message and in the `field` detail.
///
/// ```
/// let e = queue_core::config::field_error("queue.driver.amqp", "confirm_window", "must be at least 1");
/// assert_eq!(e.message(), "queue.driver.amqp: confirm_window must be at least 1");
/// assert_eq!(e.details()["field"], "confirm_window");
/// ```
pub fn field_error(kind: &str, field: &str, what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{kind}: {field} {what}")).with_detail("field", field)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A regular file swapped for a pipe between the first check and the open is
    /// opened without waiting, and refused by the check of the open file.
    #[test]
    fn a_pipe_opens_without_waiting_and_is_seen_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("ca.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let is_file = queue_testkit::finishes_within(
            Duration::from_secs(30),
            "opening a named pipe returns at once",
            move || {
                let opened = open_without_waiting(&fifo).and_then(|f| f.metadata());
                opened.map(|m| m.is_file()).map_err(|e| e.to_string())
            },
        );
        assert_eq!(is_file, Ok(false));
    }

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
