//! `${VAR}` and `${VAR:-default}` in configuration text, so secrets stay out of files.

/// Replaces every `${VAR}` / `${VAR:-default}` with the environment's value. An unset
/// variable without a default is an error naming the line. `$${` writes a literal `${`.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut line = 1;
    while let Some(start) = rest.find('$') {
        let (before, after) = rest.split_at(start);
        line += before.matches('\n').count();
        out.push_str(before);
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
            continue;
        }
        let Some(body_start) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body_start.find('}') else {
            return Err((line, "unclosed ${ in configuration".to_string()));
        };
        let body = &body_start[..end];
        let (name, default) = match body.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (body, None),
        };
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err((
                line,
                format!(
                    "${{{body}}} is not a variable reference: use ${{NAME}} or ${{NAME:-default}}"
                ),
            ));
        }
        match (lookup(name), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err((
                    line,
                    format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} for a default)"
                    ),
                ));
            }
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOST").then(|| "127.0.0.1".to_string())
    }

    #[test]
    fn substitutes_defaults_and_escapes() {
        let text = "url: amqp://${HOST}:${PORT:-5672}\ncost: $5 $${literal}";
        assert_eq!(
            interpolate(text, env).unwrap(),
            "url: amqp://127.0.0.1:5672\ncost: $5 ${literal}"
        );
    }

    #[test]
    fn unset_without_default_names_the_line() {
        let (line, message) = interpolate("a: 1\nb: ${MISSING}", env).unwrap_err();
        assert_eq!(line, 2);
        assert!(message.contains("MISSING"));
        assert!(interpolate("a: ${bad name}", env).is_err());
        assert!(interpolate("a: ${OPEN", env).is_err());
    }
}
