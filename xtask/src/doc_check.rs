//! The doc check of `cargo xtask test`: the repository's text stands alone and names only what
//! is in it.
//!
//! 1. Every relative markdown link in every tracked `.md` file names a file or directory of the
//!    checkout (anchors after `#` are not checked; `http(s):` and `mailto:` links are not ours).
//! 2. In README.md, GLOSSARY.md and docs/, every backticked span that starts with a top-level
//!    directory of the repository (`agent/src/os/`, `crates/link`) names a path that exists.
//!    Spans with a placeholder (`<threat>`, `*`, `{...}`) are patterns, not paths, and are left
//!    alone. Fenced code blocks are skipped: their paths belong to the commands they show.
//! 3. No tracked text file cites what a reader of the repository cannot open: the founders'
//!    design and conventions files kept outside it, or a numbered issue. The decision belongs in
//!    docs/, in our words.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::sh::output;

/// Files outside the repository that docs once cited; built from parts so that this file does
/// not match itself.
fn outside_files() -> [String; 3] {
    [
        ["DESIGN", ".md"].concat(),
        ["CONVENTIONS", ".md"].concat(),
        ["CONVENTIONS", " §"].concat(),
    ]
}

/// Runs the three checks on the checkout at `root`.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let files = tracked(root)?;
    let mut problems = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(root.join(file)) else {
            continue; // binary
        };
        if file.ends_with(".md") {
            problems.extend(broken_links(root, file, &text));
        }
        if file == "README.md" || file == "GLOSSARY.md" || file.starts_with("docs/") {
            problems.extend(missing_paths(root, &files, file, &text));
        }
        if file != "xtask/src/doc_check.rs" && file != "Cargo.lock" {
            problems.extend(outside_citations(file, &text));
        }
    }
    if !problems.is_empty() {
        bail!(
            "the doc check found {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    println!(
        "doc check: {} files, links and paths exist, nothing cited from outside",
        files.len()
    );
    Ok(())
}

/// The checkout's tracked files (what a clone has), relative, with `/`.
fn tracked(root: &Path) -> anyhow::Result<Vec<String>> {
    let list = output(
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["ls-files", "-z"]),
    )
    .context("the doc check reads the file list from git")?;
    Ok(list
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The lines of `text` outside fenced code blocks, with their numbers (from 1).
fn prose(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fenced = false;
    text.lines().enumerate().filter_map(move |(i, line)| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return None;
        }
        (!fenced).then_some((i + 1, line))
    })
}

/// Relative link targets of `[text](target)` on `line`.
fn link_targets(line: &str) -> Vec<&str> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target);
        rest = &after[end..];
    }
    targets
}

fn broken_links(root: &Path, file: &str, text: &str) -> Vec<String> {
    let dir = Path::new(file).parent().unwrap_or(Path::new(""));
    let mut problems = Vec::new();
    for (number, line) in prose(text) {
        for target in link_targets(line) {
            if target.is_empty()
                || target.starts_with('#')
                || target.contains("://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let path = target.split('#').next().unwrap_or(target);
            if !root.join(dir).join(path).exists() {
                problems.push(format!(
                    "{file}:{number}: link to {target}, which is not in the repository"
                ));
            }
        }
    }
    problems
}

/// Backticked spans of `line`.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

fn missing_paths(root: &Path, files: &[String], file: &str, text: &str) -> Vec<String> {
    let top: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.split_once('/').map(|(dir, _)| dir))
        .collect();
    let mut problems = Vec::new();
    for (number, line) in prose(text) {
        for span in code_spans(line) {
            let Some((first, _)) = span.split_once('/') else {
                continue;
            };
            if !top.contains(first)
                || span.contains(char::is_whitespace)
                || span.contains(['<', '>', '*', '{', '}', '…'])
            {
                continue;
            }
            if !root.join(span).exists() {
                problems.push(format!(
                    "{file}:{number}: `{span}` is not a path in the repository"
                ));
            }
        }
    }
    problems
}

fn outside_citations(file: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for cite in outside_files() {
            if line.contains(&cite) {
                problems.push(format!(
                    "{file}:{}: cites {cite}, which is not in the repository",
                    i + 1
                ));
            }
        }
        if let Some(issue) = issue_number(line) {
            problems.push(format!(
                "{file}:{}: cites {issue:?}; say the decision in docs/ instead",
                i + 1
            ));
        }
    }
    problems
}

/// `issue 4`, `issues 3`, `Issue #12`, or a bare `#12` after a space or parenthesis: a numbered
/// issue. `PKCS#8` and Rust attributes are not.
fn issue_number(line: &str) -> Option<String> {
    let lower = line.to_lowercase();
    for word in ["issue ", "issues ", "issue #"] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(word) {
            let start = from + at;
            let after = &lower[start + word.len()..];
            let before_ok = lower[..start]
                .chars()
                .next_back()
                .is_none_or(|c| !c.is_alphanumeric());
            if before_ok && after.starts_with(|c: char| c.is_ascii_digit()) {
                let digits = after.chars().take_while(char::is_ascii_digit).count();
                return Some(line[start..start + word.len() + digits].to_owned());
            }
            from = start + word.len();
        }
    }
    let bytes = line.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'#'
            && (i == 0 || matches!(bytes[i - 1], b' ' | b'('))
            && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
        {
            let digits = line[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .count();
            return Some(line[i..=i + digits].to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkout() -> std::path::PathBuf {
        crate::sh::root()
    }

    #[test]
    fn a_link_to_a_made_up_path_is_reported() {
        let text = "See [the layout](images/no-such-file.md) and [docs](docs/delta.md).\n";
        let problems = broken_links(&checkout(), "README.md", text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("images/no-such-file.md"),
            "{problems:?}"
        );
    }

    #[test]
    fn links_resolve_from_the_linking_file() {
        let root = checkout();
        assert!(broken_links(&root, "docs/architecture.md", "[s](state-machines.md)").is_empty());
        assert_eq!(
            broken_links(&root, "docs/architecture.md", "[s](docs/delta.md)").len(),
            1
        );
    }

    #[test]
    fn a_backticked_made_up_repository_path_is_reported() {
        let root = checkout();
        let files = tracked(&root).unwrap();
        let text = "The driver is `agent/src/no_such_module.rs`; chunks in `crates/chunks`.\n\
                    ```sh\ncat `agent/src/in_a_fence.rs`\n```\n\
                    Output in `target/image`, fixtures in `tests/data/<threat>/`.\n";
        let problems = missing_paths(&root, &files, "docs/x.md", text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("no_such_module"), "{problems:?}");
    }

    #[test]
    fn citations_of_outside_files_and_issues_are_reported() {
        let design = format!("as {} §2 says", outside_files()[0]);
        assert_eq!(outside_citations("a.rs", &design).len(), 1);
        assert_eq!(issue_number("targets of Issue 3."), Some("Issue 3".into()));
        assert_eq!(issue_number("fixed in (#12)"), Some("#12".into()));
        assert_eq!(issue_number("a PKCS#8 key, #[derive(Debug)]"), None);
        assert_eq!(issue_number("no tissue 3 here"), None);
    }
}
