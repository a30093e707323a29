//! `${VAR}` and `${VAR:-default}` in configuration text, so secrets stay out of files.

/// Text after interpolation, with the line of the original text each of its lines
/// came from: a value with newlines must not move the lines that errors point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpolated {
    /// The text with every reference replaced.
    pub text: String,
    /// `lines[i]` is the original line of line `i + 1` of `text`.
    lines: Vec<usize>,
}

impl Interpolated {
    /// The line of the original text that line `line` (1-based) of the result came
    /// from.
    pub fn source_line(&self, line: usize) -> usize {
        line.checked_sub(1)
            .and_then(|i| self.lines.get(i))
            .copied()
            .unwrap_or(line)
    }
}

/// Replaces every `${VAR}` / `${VAR:-default}` with the environment's value; a default
/// may itself hold references (`${A:-${B:-x}}`). An unset variable without a default
/// is an error naming the line. `$${` writes a literal `${`.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Interpolated, (usize, String)> {
    interpolate_with(text, &lookup, 0)
}

/// How deep defaults may nest (`${A:-${B:-...}}`): each level is a recursion, and a
/// few hundred kilobytes of `${X:-` would otherwise overflow the stack.
const MAX_NESTING: usize = 16;

fn interpolate_with(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    nesting: usize,
) -> Result<Interpolated, (usize, String)> {
    if nesting > MAX_NESTING {
        return Err((
            1,
            format!("${{...}} defaults nest deeper than {MAX_NESTING} levels"),
        ));
    }
    let mut out = Interpolated {
        text: String::with_capacity(text.len()),
        lines: vec![1],
    };
    let mut line = 1;
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        let (before, after) = rest.split_at(start);
        push_source(&mut out, before, &mut line);
        if let Some(escaped) = after.strip_prefix("$${") {
            out.text.push_str("${");
            rest = escaped;
            continue;
        }
        let Some(body_start) = after.strip_prefix("${") else {
            out.text.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = closing_brace(body_start) else {
            return Err((line, "unclosed ${ in configuration".to_string()));
        };
        let value =
            resolve(&body_start[..end], lookup, nesting).map_err(|message| (line, message))?;
        // A value's own newlines belong to the line of its reference.
        for c in value.chars() {
            out.text.push(c);
            if c == '\n' {
                out.lines.push(line);
            }
        }
        // The file was capped as read; its references could still ask for gigabytes.
        if out.text.len() as u64 > super::MAX_CONFIG_BYTES {
            let mib = super::MAX_CONFIG_BYTES / (1024 * 1024);
            return Err((
                line,
                format!("with its ${{...}} references replaced the file is larger than {mib} MiB"),
            ));
        }
        rest = &body_start[end + 1..];
    }
    push_source(&mut out, rest, &mut line);
    Ok(out)
}

fn push_source(out: &mut Interpolated, source: &str, line: &mut usize) {
    for c in source.chars() {
        out.text.push(c);
        if c == '\n' {
            *line += 1;
            out.lines.push(*line);
        }
    }
}

/// The index of the `}` that closes a reference whose body starts `body`, counting
/// the references nested in a default. A reference ends on its line: a `}` missing
/// there was found on a later line, and what lay between vanished from the file.
fn closing_brace(body: &str) -> Option<usize> {
    let mut depth = 0;
    let bytes = body.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'{' if i > 0 && bytes[i - 1] == b'$' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            b'\n' => return None,
            _ => {}
        }
    }
    None
}

/// The value of one reference body (`NAME` or `NAME:-default`).
fn resolve(
    body: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    nesting: usize,
) -> Result<String, String> {
    let (name, default) = match body.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (body, None),
    };
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "${{{}}} is not a variable reference: use ${{NAME}} or ${{NAME:-default}}",
            body.chars().take(64).collect::<String>()
        ));
    }
    // `:-` applies to a variable set empty too, as in a shell (docs/configuration.md).
    match (
        lookup(name).filter(|v| default.is_none() || !v.is_empty()),
        default,
    ) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => interpolate_with(default, lookup, nesting + 1)
            .map(|d| d.text)
            .map_err(|(_, message)| message),
        (None, None) => Err(format!(
            "environment variable {name} is not set (write ${{{name}:-default}} for a default)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("127.0.0.1".to_string()),
            "CERT" => Some("line one\nline two\nline three".to_string()),
            _ => None,
        }
    }

    /// The file is capped as read, and so is what its references make of it: 800 KB
    /// of `#${BIG}` lines with a 100 KB variable asked for 10 GB, and the allocator
    /// aborted the runtime (review). At a default's level too.
    #[test]
    fn text_growing_past_the_file_limit_is_an_error_naming_the_line() {
        let big = |name: &str| (name == "BIG").then(|| "x".repeat(100_000));
        let lines = "#${BIG}\n".repeat(1_000);
        let (line, message) = interpolate(&lines, big).unwrap_err();
        assert_eq!(line, 168, "the first line past 16 MiB: {message}");
        assert!(message.contains("larger than 16 MiB"), "{message}");
        let in_a_default = format!("x: ${{UNSET:-{}}}\n", "${BIG}".repeat(200));
        let (line, message) = interpolate(&in_a_default, big).unwrap_err();
        assert_eq!(line, 1, "{message}");
        assert!(message.contains("larger than 16 MiB"), "{message}");
        let at_the_limit = "#${BIG}\n".repeat(100);
        assert!(interpolate(&at_the_limit, big).is_ok());
    }

    #[test]
    fn defaults_nested_past_sixteen_levels_are_an_error_not_a_stack_overflow() {
        let nested = |depth: usize| {
            format!(
                "# comment\nurl: {}x{}\n",
                "${UNSET:-".repeat(depth),
                "}".repeat(depth)
            )
        };
        assert_eq!(
            interpolate(&nested(16), env).unwrap().text,
            "# comment\nurl: x\n"
        );
        let (line, message) = interpolate(&nested(17), env).unwrap_err();
        assert_eq!(line, 2);
        assert!(message.contains("deeper than 16 levels"), "{message}");
        // The bomb: 30,000 levels, about 300 KB.
        let (line, message) = interpolate(&nested(30_000), env).unwrap_err();
        assert_eq!(line, 2);
        assert!(message.contains("deeper than 16 levels"), "{message}");
    }

    #[test]
    fn substitutes_defaults_and_escapes() {
        let text = "url: amqp://${HOST}:${PORT:-5672}\ncost: $5 $${literal}";
        assert_eq!(
            interpolate(text, env).unwrap().text,
            "url: amqp://127.0.0.1:5672\ncost: $5 ${literal}"
        );
    }

    /// As in a shell and in docker compose: `DLQ=` set empty must not turn
    /// `${DLQ:-false}` into a YAML null (which means "the default dead-letter queue").
    #[test]
    fn a_variable_set_empty_takes_the_default() {
        let empty = |name: &str| (name == "EMPTY").then(String::new);
        let got = interpolate("a: ${EMPTY:-false}\nb: \"${EMPTY}\"", empty).unwrap();
        assert_eq!(got.text, "a: false\nb: \"\"");
    }

    #[test]
    fn defaults_may_hold_references() {
        let got = interpolate("a: ${X:-${HOST}}\nb: ${X:-${Y:-deep}}", env).unwrap();
        assert_eq!(got.text, "a: 127.0.0.1\nb: deep");
        assert!(interpolate("a: ${X:-${Y}}", env).is_err());
    }

    #[test]
    fn newlines_in_values_keep_the_lines_of_what_follows() {
        let got = interpolate("a: 1\ncert: \"${CERT}\"\nb: 2\n", env).unwrap();
        assert_eq!(got.text.lines().nth(4), Some("b: 2"));
        assert_eq!(got.source_line(5), 3, "{got:?}");
        assert_eq!(got.source_line(3), 2);
        assert_eq!(got.source_line(1), 1);
    }

    #[test]
    fn unset_without_default_names_the_line() {
        let (line, message) = interpolate("a: 1\nb: ${MISSING}", env).unwrap_err();
        assert_eq!(line, 2);
        assert!(message.contains("MISSING"));
        assert!(interpolate("a: ${bad name}", env).is_err());
        assert!(interpolate("a: ${OPEN", env).is_err());
        // A `}` missing on its line was found on a later one, and the lines between
        // were taken for the default (or dropped, the variable set): review.
        let typo = "a: ${HOST:-amqp://127.0.0.1:5672\n- name: jobs\n  options: {durable: true}\n";
        let (line, message) = interpolate(typo, env).unwrap_err();
        assert_eq!(line, 1);
        assert!(message.contains("unclosed"), "{message}");
    }
}
