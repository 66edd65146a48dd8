//! Which rules could match a request, found without trying them all: a
//! host map (exact names, then `*.suffix` names, then rules for any host),
//! and under each host a byte trie of path prefixes. A rule sits in the
//! trie under the literal start of its path matcher: a prefix, an exact
//! path, or the literal that an anchored regex begins with (`^/api/v1/`).
//! Regexes with no literal start share one `RegexSet` per host bucket, run
//! once as a prefilter.
//!
//! The index only narrows: every candidate is then tested in full, so a
//! candidate too many costs time, never correctness. Lookup walks the path
//! once per host bucket that applies (one to three), so its cost follows
//! the path's length and the number of candidates, not the rule count.
//!
//! Owns: building and walking the index. Does not own: the conditions
//! themselves (`matcher`).

use std::collections::HashMap;

use regex::bytes::RegexSet;

use super::matcher::{Conditions, HostPattern, PathMatch};

/// Rule ids are positions in their list (file order), so sorting the
/// candidates restores first-match order.
pub type RuleId = u32;

#[derive(Debug, Default)]
pub struct Index {
    exact: HashMap<Box<[u8]>, PathIndex>,
    /// Keyed by the suffix with its leading dot: `.example.com`.
    suffix: HashMap<Box<[u8]>, PathIndex>,
    any: PathIndex,
}

#[derive(Debug, Default)]
struct PathIndex {
    /// `nodes[0]` is the root (the empty prefix).
    nodes: Vec<Node>,
    /// Rules whose path regex has no literal start, with the set of those
    /// regexes (an index into the rule set's `sets`).
    floating: Vec<RuleId>,
    set: Option<usize>,
}

#[derive(Debug, Default)]
struct Node {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    rules: Vec<RuleId>,
}

/// What the index needs of one rule.
pub struct Entry<'a> {
    pub when: &'a Conditions,
    /// For a path regex: its literal start, if it is anchored at `^`.
    pub regex_prefix: Option<Vec<u8>>,
    /// For a path regex: its pattern, for the floating set.
    pub regex_pattern: Option<&'a str>,
}

impl PathIndex {
    fn insert(&mut self, key: &[u8], id: RuleId) {
        if self.nodes.is_empty() {
            self.nodes.push(Node::default());
        }
        let mut at = 0usize;
        for &b in key {
            let children = &self.nodes[at].children;
            at = match children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => children[i].1 as usize,
                Err(i) => {
                    let next = self.nodes.len();
                    self.nodes[at].children.insert(i, (b, next as u32));
                    self.nodes.push(Node::default());
                    next
                }
            };
        }
        self.nodes[at].rules.push(id);
    }

    fn collect(&self, path: &[u8], sets: &[RegexSet], out: &mut Vec<RuleId>) {
        if let Some(root) = self.nodes.first() {
            out.extend_from_slice(&root.rules);
            let mut node = root;
            for &b in path {
                match node.children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => node = &self.nodes[node.children[i].1 as usize],
                    Err(_) => break,
                }
                out.extend_from_slice(&node.rules);
            }
        }
        if let Some(set) = self.set
            && sets[set].is_match(path)
        {
            out.extend_from_slice(&self.floating);
        }
    }
}

impl Index {
    /// Build over `entries` (rule id = position). Regex sets for floating
    /// regexes are compiled into `sets`.
    pub fn build(entries: &[Entry<'_>], sets: &mut Vec<RegexSet>) -> Result<Index, String> {
        let mut index = Index::default();
        // Floating patterns per bucket, compiled once all rules are in.
        let mut floating: HashMap<(u8, Box<[u8]>), Vec<&str>> = HashMap::new();
        for (id, e) in entries.iter().enumerate() {
            let id = id as RuleId;
            let buckets: Vec<(u8, &[u8])> = if e.when.hosts.is_empty() {
                vec![(0, &b""[..])]
            } else {
                e.when
                    .hosts
                    .iter()
                    .map(|h| match h {
                        HostPattern::Exact(n) => (1, &n[..]),
                        HostPattern::Suffix(s) => (2, &s[..]),
                    })
                    .collect()
            };
            for (kind, name) in buckets {
                let bucket = index.bucket(kind, name);
                match (&e.when.path, &e.regex_prefix) {
                    (None, _) => bucket.insert(b"", id),
                    (Some(PathMatch::Exact(p) | PathMatch::Prefix(p)), _) => bucket.insert(p, id),
                    (Some(PathMatch::Regex(_)), Some(prefix)) => bucket.insert(prefix, id),
                    (Some(PathMatch::Regex(_)), None) => {
                        bucket.floating.push(id);
                        let pattern = e.regex_pattern.expect("a path regex has a pattern");
                        floating
                            .entry((kind, name.into()))
                            .or_default()
                            .push(pattern);
                    }
                }
            }
        }
        for ((kind, name), patterns) in floating {
            let set = RegexSet::new(&patterns).map_err(|e| e.to_string())?;
            let bucket = index.bucket(kind, &name);
            bucket.set = Some(sets.len());
            sets.push(set);
        }
        Ok(index)
    }

    /// The path index of a host bucket: 0 any host, 1 an exact name, 2 a
    /// `.suffix`.
    fn bucket(&mut self, kind: u8, name: &[u8]) -> &mut PathIndex {
        match kind {
            0 => &mut self.any,
            1 => self.exact.entry(name.into()).or_default(),
            _ => self.suffix.entry(name.into()).or_default(),
        }
    }

    /// Every rule that could match, in rule order, into `out`. `host` is
    /// lowercase, without port.
    pub fn candidates(
        &self,
        host: Option<&[u8]>,
        path: &[u8],
        sets: &[RegexSet],
        out: &mut Vec<RuleId>,
    ) {
        out.clear();
        if let Some(host) = host {
            if let Some(b) = self.exact.get(host) {
                b.collect(path, sets, out);
            }
            if !self.suffix.is_empty() {
                for (i, _) in host.iter().enumerate().filter(|(_, c)| **c == b'.') {
                    if i > 0
                        && let Some(b) = self.suffix.get(&host[i..])
                    {
                        b.collect(path, sets, out);
                    }
                }
            }
        }
        self.any.collect(path, sets, out);
        out.sort_unstable();
        out.dedup();
    }
}

/// The literal bytes an anchored regex must start with, from its syntax
/// tree: `^/api/v(\d+)` gives `/api/v`. `None` when it is not anchored at
/// the start, or begins with something that is not a literal (a class, a
/// case-insensitive letter, an alternation).
pub fn anchored_prefix(pattern: &str) -> Option<Vec<u8>> {
    use regex_syntax::hir::{HirKind, Look};
    let hir = regex_syntax::ParserBuilder::new()
        .utf8(false)
        .build()
        .parse(pattern)
        .ok()?;
    let HirKind::Concat(parts) = hir.kind() else {
        return None;
    };
    let mut parts = parts.iter();
    match parts.next()?.kind() {
        HirKind::Look(Look::Start) => {}
        _ => return None,
    }
    let mut prefix = Vec::new();
    for part in parts {
        match part.kind() {
            HirKind::Literal(lit) => prefix.extend_from_slice(&lit.0),
            _ => break,
        }
    }
    Some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchored_prefixes() {
        assert_eq!(
            anchored_prefix(r"^/api/v1/users/(\d+)$").as_deref(),
            Some(&b"/api/v1/users/"[..])
        );
        assert_eq!(anchored_prefix(r"^/a\.b").as_deref(), Some(&b"/a.b"[..]));
        // The quantifier binds to the last letter only: it is not literal.
        assert_eq!(anchored_prefix(r"^/abc?").as_deref(), Some(&b"/ab"[..]));
        assert_eq!(anchored_prefix(r"^(?i)/api").as_deref(), Some(&b"/"[..]));
        assert_eq!(anchored_prefix(r"\.php$"), None);
        // Alternation: anchored, but no literal start common to both.
        assert!(anchored_prefix(r"^/a|^/b").is_none_or(|p| p.is_empty() || p == b"/"));
        assert_eq!(anchored_prefix(r"/x"), None);
    }
}
