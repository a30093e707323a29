//! `cargo xtask docs`: checks every internal link of the manual (file and `#anchor`)
//! and builds it with mdBook when mdBook is installed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Checks links, then builds the book; `Ok(false)` on a broken link or a failed build.
pub fn run(require_mdbook: bool) -> Result<bool, String> {
    let mut pages = Vec::new();
    collect(Path::new("docs"), &mut pages);
    pages.push(PathBuf::from("README.md"));
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).map_err(|e| format!("{}: {e}", page.display()))?;
        for (line_no, target) in links(&text) {
            if let Err(why) = check(page, &target) {
                broken.push(format!("{}:{line_no}: {target}: {why}", page.display()));
            }
        }
    }
    for b in &broken {
        eprintln!("broken link: {b}");
    }
    println!(
        "checked the links of {} pages: {} broken",
        pages.len(),
        broken.len()
    );
    let has_mdbook = Command::new("mdbook")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let built = if has_mdbook {
        let status = Command::new("mdbook")
            .args(["build", "docs"])
            .status()
            .map_err(|e| e.to_string())?;
        status.success()
    } else if require_mdbook {
        eprintln!("mdbook is not installed (cargo install mdbook)");
        false
    } else {
        println!("skipped the book build: mdbook is not installed");
        true
    };
    Ok(broken.is_empty() && built)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "book") {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

/// Markdown link targets `](target)` outside code fences, with their line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut in_code = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            found.push((i + 1, after[..end].to_string()));
            rest = &after[end..];
        }
    }
    found
}

fn check(page: &Path, target: &str) -> Result<(), String> {
    if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
        return Ok(());
    }
    let (file, anchor) = match target.split_once('#') {
        Some((f, a)) => (f, Some(a)),
        None => (target, None),
    };
    let dest = if file.is_empty() {
        page.to_path_buf()
    } else {
        page.parent().unwrap_or(Path::new(".")).join(file)
    };
    if !dest.exists() {
        return Err("no such file".into());
    }
    if let Some(anchor) = anchor {
        let text = std::fs::read_to_string(&dest).map_err(|e| e.to_string())?;
        if !anchors(&text).contains(anchor) {
            return Err(format!("no heading with anchor #{anchor}"));
        }
    }
    Ok(())
}

/// The anchors mdBook gives headings: lower case, spaces to dashes, punctuation dropped.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut set = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .chars()
            .filter_map(|c| match c {
                c if c.is_alphanumeric() => Some(c.to_ascii_lowercase()),
                ' ' | '-' => Some('-'),
                '_' => Some('_'),
                _ => None,
            })
            .collect();
        set.insert(slug);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_follow_mdbook() {
        let set = anchors(
            "# The core model\n## `queue.publish(queue_id, data [, headers])`\n```\n# not a heading\n```\n",
        );
        assert!(set.contains("the-core-model"));
        assert!(set.contains("queuepublishqueue_id-data--headers"));
        assert!(!set.contains("not-a-heading"));
    }

    #[test]
    fn finds_links_outside_code() {
        let found = links("see [a](a.md#x) and [b](https://e.org)\n```\n[c](c.md)\n```\n");
        assert_eq!(
            found,
            vec![(1, "a.md#x".to_string()), (1, "https://e.org".to_string())]
        );
    }
}
