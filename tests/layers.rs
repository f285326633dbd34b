//! The crate's layers import only downward: kernels -> networks and files -> the diffusion
//! process -> samplers -> pipelines -> training -> front ends. These tests read every
//! `crate::` and `super::` path in `src/` and fail on one that reaches a higher layer, and on
//! files that import each other in a circle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layer of a module path relative to `src/` (`pipeline/txt2img.rs`, `diffusion/...`).
fn layer(path: &str) -> (usize, &'static str) {
    let top = path
        .split('/')
        .next()
        .unwrap_or(path)
        .trim_end_matches(".rs");
    match top {
        // `crate::Result` and `crate::Error` are `error`'s, re-exported.
        "error" | "ops" | "Result" | "Error" => (0, "kernels"),
        "model" | "weights" | "single_file" | "checkpoint" | "tokenizer" | "hub" | "image_io"
        | "data" | "embedded" | "judge" => (1, "networks and files"),
        "diffusion" => (2, "the diffusion process"),
        "sampler" => (3, "samplers"),
        "pipeline" => (4, "pipelines"),
        "train" | "toy" => (5, "training"),
        "cli" | "serve" | "bin" | "main" | "lib" => (6, "front ends"),
        other => panic!("src/{path}: module `{other}` has no layer; add it to tests/layers.rs"),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names through `crate::` (in `use` lines and in paths), with
/// test modules left out (tests may reach anywhere).
fn imported_modules(text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        for (at, _) in line.match_indices("crate::") {
            // `diffuse::crate::` does not exist; skip `$crate::` in macros.
            if line[..at].ends_with('$') {
                continue;
            }
            let rest = &line[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        if let Some(group) = line.strip_prefix("use crate::{") {
            for part in group.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
fn imports_run_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let (from, from_name) = layer(&relative);
        for module in imported_modules(&std::fs::read_to_string(file).unwrap()) {
            let (to, to_name) = layer(&module);
            if to <= from {
                continue;
            }
            upward.push(format!(
                "src/{relative} ({from_name}) imports crate::{module} ({to_name})"
            ));
        }
    }
    assert!(
        upward.is_empty(),
        "imports that run upward:\n{}",
        upward.join("\n")
    );
}

/// The file a module path names (`["cli", "train_ldm"]` -> `cli/train_ldm.rs`), the longest
/// prefix that is one.
fn module_file(src: &Path, parts: &[&str]) -> Option<String> {
    for n in (1..=parts.len()).rev() {
        let joined = parts[..n].join("/");
        for candidate in [format!("{joined}.rs"), format!("{joined}/mod.rs")] {
            if src.join(&candidate).is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// The files of this crate that `file` (relative to `src/`) imports by `crate::` or `super::`
/// paths, leaving out its own parent module (a child reading its parent's items is how Rust
/// modules share them, not a circle).
fn imported_files(src: &Path, file: &str, text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    };
    let dir: Vec<&str> = match file.rsplit_once('/') {
        Some((dir, _)) => dir.split('/').collect(),
        None => Vec::new(),
    };
    // The module `super` names from this file.
    let parent: Vec<&str> = if file.ends_with("mod.rs") {
        dir[..dir.len().saturating_sub(1)].to_vec()
    } else {
        dir.clone()
    };
    let parent_file = module_file(src, &parent).unwrap_or_else(|| "lib.rs".into());
    let mut found = BTreeSet::new();
    for line in code.lines().map(str::trim_start) {
        if line.starts_with("//") {
            continue;
        }
        for (prefix, base) in [("crate::", Vec::new()), ("super::", parent.clone())] {
            for (at, _) in line.match_indices(prefix) {
                if line[..at].ends_with('$') || line[..at].ends_with(':') {
                    continue;
                }
                let rest = &line[at + prefix.len()..];
                let path: Vec<&str> = rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap_or("")
                    .split("::")
                    .filter(|p| !p.is_empty())
                    .collect();
                let mut parts = base.clone();
                parts.extend(path);
                if let Some(target) = module_file(src, &parts) {
                    if target != file && target != parent_file {
                        found.insert(target);
                    }
                }
            }
        }
    }
    found
}

#[test]
fn no_files_import_each_other_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let graph: std::collections::BTreeMap<String, BTreeSet<String>> = files
        .iter()
        .map(|file| {
            let relative = file
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(file).unwrap();
            let imports = imported_files(&src, &relative, &text);
            (relative, imports)
        })
        .collect();
    // A depth-first search that reports the first circle it walks into.
    fn visit(
        node: &str,
        graph: &std::collections::BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(circle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!(
                "files import each other in a circle: {}",
                circle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_reader_sees_grouped_and_inline_paths() {
    let text = "use crate::{model::unet, sampler};\nfn f() { crate::train::run(); }\n\
                // crate::cli is a comment\n#[cfg(test)]\nmod tests { use crate::cli; }\n";
    let found: Vec<String> = imported_modules(text).into_iter().collect();
    assert_eq!(found, ["model", "sampler", "train"]);
}
