//! A test that xtask's modules form no import cycle: no module uses another that uses it back,
//! directly or through others (a parent declaring a child counts as using it, so a child that
//! reaches back to its parent's items is a cycle too). Tests (`#[cfg(test)]`, at the end of a
//! file) are left out: a test module using `super::*` is how Rust tests are written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`bench::delta`) of a source file relative to `src/`; the crate root is "".
fn module_of(relative: &str) -> String {
    let trimmed = relative.trim_end_matches(".rs");
    let trimmed = trimmed
        .strip_suffix("/mod")
        .unwrap_or(trimmed)
        .trim_start_matches("main");
    trimmed.replace('/', "::")
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}::{name}")
    }
}

fn parent(module: &str) -> &str {
    module.rsplit_once("::").map_or("", |(p, _)| p)
}

/// The paths of a use tree starting at `text` (after `crate::` or `super::`), relative to it:
/// `a::b`, `a::{self, b::c}` → `a`, `a`, `a::b::c`.
fn use_paths(text: &str) -> Vec<String> {
    // Tokens up to the first one that cannot be part of a path: identifiers, `::`, `{`, `,`, `}`.
    let mut tokens = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        let ident = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if ident > 0 {
            tokens.push(&rest[..ident]);
            rest = &rest[ident..];
        } else if let Some(after) = rest.strip_prefix("::") {
            tokens.push("::");
            rest = after;
        } else if rest.starts_with(['{', ',', '}']) {
            tokens.push(&rest[..1]);
            rest = &rest[1..];
        } else {
            break;
        }
    }
    fn tree(tokens: &[&str], at: &mut usize, prefix: &str, out: &mut Vec<String>) {
        match tokens.get(*at) {
            Some(&"{") => {
                *at += 1;
                while *at < tokens.len() && tokens[*at] != "}" {
                    tree(tokens, at, prefix, out);
                    if tokens.get(*at) == Some(&",") {
                        *at += 1;
                    }
                }
                *at += 1;
            }
            Some(word) if !matches!(*word, "::" | "," | "}") => {
                *at += 1;
                let path = if *word == "self" {
                    prefix.to_owned()
                } else {
                    join(prefix, word)
                };
                if tokens.get(*at) == Some(&"::") {
                    *at += 1;
                    tree(tokens, at, &path, out);
                } else {
                    out.push(path);
                }
            }
            _ => *at += 1,
        }
    }
    let mut out = Vec::new();
    tree(&tokens, &mut 0, "", &mut out);
    out
}

/// Module → the modules it uses, from `(file relative to src/, text)` pairs.
fn graph(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files.iter().map(|(f, _)| module_of(f)).collect();
    // The longest known module that `path` starts with.
    let resolve = |path: &str| -> String {
        let mut best = String::new();
        let mut prefix = String::new();
        for part in path.split("::") {
            prefix = join(&prefix, part);
            if modules.contains(&prefix) {
                best.clone_from(&prefix);
            }
        }
        best
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in files {
        let me = module_of(file);
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let uses = edges.entry(me.clone()).or_default();
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            if let Some(child) = line
                .strip_prefix("mod ")
                .or_else(|| line.strip_prefix("pub mod "))
                .and_then(|rest| rest.strip_suffix(';'))
            {
                uses.insert(join(&me, child));
            }
            for (marker, base) in [
                ("crate::", String::new()),
                ("super::", parent(&me).to_owned()),
            ] {
                for (at, _) in line.match_indices(marker) {
                    for path in use_paths(&line[at + marker.len()..]) {
                        let target = resolve(&join(&base, &path));
                        if target != me {
                            uses.insert(target);
                        }
                    }
                }
            }
        }
    }
    edges
}

/// A cycle in `edges`, as the modules along it, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut found = stack[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, stack, done) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

fn sources(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((relative, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
        .collect()
}

#[test]
fn xtask_modules_form_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    sources(&src, &src, &mut found);
    let edges = graph(&found);
    assert!(edges.len() > 10, "too few modules read: {edges:?}");
    if let Some(cycle) = cycle(&edges) {
        panic!("xtask modules use each other: {}", cycle.join(" -> "));
    }
}

#[test]
fn use_trees_are_read_whole() {
    assert_eq!(
        use_paths("{a::{self, b::c}, d};"),
        ["a", "a::b::c", "d"].map(String::from)
    );
    assert_eq!(
        use_paths("sh::run(&mut cmd)"),
        ["sh::run"].map(String::from)
    );
}

#[test]
fn two_modules_using_each_other_are_a_cycle() {
    let edges = graph(&files(&[
        ("main.rs", "mod a;\nmod b;\n"),
        ("a.rs", "use crate::b::thing;\n"),
        ("b/mod.rs", "use crate::{a::other, sh};\n"),
    ]));
    assert!(cycle(&edges).is_some(), "{edges:?}");
}

#[test]
fn a_child_using_its_parents_items_is_a_cycle() {
    let edges = graph(&files(&[
        ("main.rs", "mod bench;\n"),
        ("bench/mod.rs", "mod link;\npub fn measure() {}\n"),
        ("bench/link.rs", "use super::measure;\n"),
    ]));
    assert!(cycle(&edges).is_some(), "{edges:?}");
}

#[test]
fn siblings_and_tests_are_not_cycles() {
    let edges = graph(&files(&[
        ("main.rs", "mod bench;\nmod sh;\n"),
        (
            "sh.rs",
            "pub fn run() {}\n#[cfg(test)]\nmod tests { use super::*; use crate::bench; }\n",
        ),
        ("bench/mod.rs", "mod build;\nmod link;\n"),
        ("bench/build.rs", "use crate::sh::run;\n"),
        ("bench/link.rs", "use super::build::{self, Profile};\n"),
    ]));
    assert_eq!(cycle(&edges), None, "{edges:?}");
    assert!(edges["bench::link"].contains("bench::build"), "{edges:?}");
}
