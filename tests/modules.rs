//! The module graph: which top-level module of `src/` imports which
//! (`crate::NAME` paths outside `#[cfg(test)]` modules and comments) must
//! be exactly the table in docs/architecture.md ("Module graph"), and that
//! table must have no cycle. A new import between modules fails here until
//! the table says so, and a cycle cannot be written down at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without comments and without `#[cfg(test)] mod NAME { ... }`.
fn strip(text: &str) -> String {
    let mut code = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else if rest.starts_with('"') {
            // A string literal (a URL's `//` is not a comment).
            let bytes = rest.as_bytes();
            let mut i = 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            let end = (i + 1).min(rest.len());
            code.push_str(&rest[..end]);
            rest = &rest[end..];
        } else {
            let c = rest.chars().next().expect("not empty");
            code.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    let mut out = String::with_capacity(code.len());
    let mut rest = &code[..];
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_mod = trimmed.starts_with("mod ") || trimmed.starts_with("pub mod ");
        match (is_mod, trimmed.find('{')) {
            (true, Some(open)) if !trimmed[..open].contains(';') => {
                let body = &trimmed[open + 1..];
                let mut depth = 1;
                let mut end = body.len();
                for (i, c) in body.char_indices() {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                rest = &body[end..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Every `crate::NAME` and `crate::{NAME, ...}` in `code`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                names.push(ident(item.trim()));
            }
        } else {
            names.push(ident(rest));
        }
    }
    names
}

/// The imports between top-level modules, as the code has them.
fn imports(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module_of = |path: &Path| -> String {
        let rel = path.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component");
        first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| module_of(p))
        .filter(|m| m != "main" && m != "lib")
        .collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for path in &files {
        let module = module_of(path);
        let Some(edges) = graph.get_mut(&module) else {
            continue;
        };
        let text = std::fs::read_to_string(path).expect("read a source file");
        for name in crate_paths(&strip(&text)) {
            if name != module && modules.contains(&name) {
                edges.insert(name);
            }
        }
    }
    graph
}

/// The table under "Module graph" in docs/architecture.md.
fn documented(doc: &str) -> Graph {
    let start = doc
        .find("<!-- module-graph -->")
        .expect("docs/architecture.md has the module graph table");
    let mut graph = Graph::new();
    for line in doc[start..].lines().skip(1) {
        let line = line.trim();
        if line.is_empty() && !graph.is_empty() {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let names = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        let module = names(cells[1]).remove(0);
        graph.insert(module, names(cells[2]).into_iter().collect());
    }
    graph
}

/// A cycle in `graph`, if it has one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(graph, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn the_module_graph_is_the_documented_one_and_has_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let actual = imports(&root.join("src"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).expect("read the doc");
    let table = documented(&doc);
    if let Some(c) = cycle(&actual) {
        panic!("an import cycle between modules: {}", c.join(" -> "));
    }
    let mut wrong = Vec::new();
    for module in actual.keys().chain(table.keys()).collect::<BTreeSet<_>>() {
        let has = actual.get(module).cloned().unwrap_or_default();
        let says = table.get(module).cloned().unwrap_or_default();
        if has != says || !actual.contains_key(module) || !table.contains_key(module) {
            wrong.push(format!(
                "| `{module}` | code imports {has:?}; the table says {says:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/architecture.md's module graph differs from the code; \
         update the table (a new import must not close a cycle):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_finds_imports_and_cycles() {
    let code = strip(
        "use crate::a::X; // crate::b\nuse crate::{c, d::Y};\nlet u = \"http://crate::e\";\n\
         #[cfg(test)]\nmod tests { use crate::f; }\nfn g() { crate::h::run() }\n",
    );
    let names = crate_paths(&code);
    assert_eq!(names, ["a", "c", "d", "e", "h"]);
    let mut g = Graph::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), BTreeSet::new());
    assert_eq!(cycle(&g), None);
    g.get_mut("c").unwrap().insert("a".into());
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}
