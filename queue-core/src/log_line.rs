//! Text for one log line: what a handler or another client wrote (a failure reason, a
//! broker's error text) must not start a line of its own that reads as the runtime's.

use std::fmt;

/// Whether `c` is written escaped in a log line: a control character (a newline in a
/// reason started a line of the handler's making, `ok\n2026-... ERROR queue_runtime:
/// ...`), the line and paragraph separators, which some viewers break lines at, and the
/// bidirectional overrides, which make a line read as something else.
///
/// ```
/// assert!(queue_core::escaped_in_a_log_line('\n'));
/// assert!(queue_core::escaped_in_a_log_line('\u{202E}'));
/// assert!(!queue_core::escaped_in_a_log_line('é'));
/// ```
pub fn escaped_in_a_log_line(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A [`fmt::Write`] over `out` that writes what one log line may carry: each character
/// [`escaped_in_a_log_line`] escaped (`\n`, `\u{202e}`), and at most `max` bytes, the
/// rest counted, not copied; [`OneLine::finish`] says how much was left out.
///
/// ```
/// use std::fmt::Write;
/// let mut line = String::new();
/// let mut one = queue_core::OneLine::new(&mut line, 8);
/// write!(one, "ok\nFORGED and more").unwrap();
/// one.finish().unwrap();
/// assert_eq!(line, "ok\\nFORG... (11 more bytes)");
/// ```
pub struct OneLine<W: fmt::Write> {
    out: W,
    room: usize,
    left_out: usize,
}

impl<W: fmt::Write> OneLine<W> {
    /// Writes into `out`, `max` bytes at most.
    pub fn new(out: W, max: usize) -> Self {
        OneLine {
            out,
            room: max,
            left_out: 0,
        }
    }

    /// Counts `bytes` more as left out: ones the caller cut before writing, so as not
    /// to copy them at all.
    pub fn count_left_out(&mut self, bytes: usize) {
        self.left_out += bytes;
    }

    /// Notes how many bytes were left out, if any.
    pub fn finish(mut self) -> fmt::Result {
        if self.left_out > 0 {
            write!(self.out, "... ({} more bytes)", self.left_out)?;
        }
        Ok(())
    }
}

impl<W: fmt::Write> fmt::Write for OneLine<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            let mut escaped = [0u8; 16];
            let shown: &str = if escaped_in_a_log_line(c) {
                let mut at = 0;
                for e in c.escape_default() {
                    at += e.encode_utf8(&mut escaped[at..]).len();
                }
                std::str::from_utf8(&escaped[..at]).map_err(|_| fmt::Error)?
            } else {
                c.encode_utf8(&mut escaped)
            };
            if self.left_out > 0 || shown.len() > self.room {
                self.left_out += shown.len();
                continue;
            }
            self.room -= shown.len();
            self.out.write_str(shown)?;
        }
        Ok(())
    }
}
