//! Request matchers: what one rule asks of a request (host, path, method,
//! header, query parameter, client address), and the view of a parsed
//! request they are asked against.
//!
//! Owns: evaluating one rule's conditions, path normalisation for matching,
//! host and query helpers. Does not own: choosing which rules to evaluate
//! (`index`) or what a matching rule does (`action`).

use std::net::IpAddr;

use regex::bytes::Regex;

use crate::http::head::HeaderSpan;

/// What the matchers see of a request. Borrowed from the connection's
/// buffer; nothing is copied except a normalised path when the raw one
/// needed it.
pub struct RequestView<'a> {
    pub method: &'a [u8],
    /// Host without port; compared case-insensitively.
    pub host: Option<&'a [u8]>,
    /// Host as sent, with its port if any (`$http_host`).
    pub authority: Option<&'a [u8]>,
    /// Path without query, normalised (see `normalize_path`).
    pub path: &'a [u8],
    /// Query without the `?`; empty when there is none.
    pub query: &'a [u8],
    pub buf: &'a [u8],
    pub headers: &'a [HeaderSpan],
    pub client: IpAddr,
}

impl RequestView<'_> {
    /// The first value of the field `name` (lowercase), if any.
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.get(self.buf).eq_ignore_ascii_case(name))
            .map(|h| h.value.get(self.buf))
    }
}

/// A rule's conditions; all must hold. Empty lists hold for any request.
#[derive(Debug, Default)]
pub struct Conditions {
    /// Any of these hosts.
    pub hosts: Vec<HostPattern>,
    pub path: Option<PathMatch>,
    /// Any of these methods (uppercase, compared exactly: methods are
    /// case-sensitive, RFC 9110 9.1).
    pub methods: Vec<Box<[u8]>>,
    /// All of these header tests.
    pub headers: Vec<FieldTest>,
    /// All of these query parameter tests.
    pub query: Vec<FieldTest>,
    /// Any of these client networks.
    pub clients: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Lowercase name, e.g. `api.example.com`.
    Exact(Box<[u8]>),
    /// `*.example.com` stored as `.example.com`: any name ending in it, at
    /// any depth, but not `example.com` itself (nginx's server_name).
    Suffix(Box<[u8]>),
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    /// Index into the rule set's regex table.
    Regex(usize),
}

/// A test on a header or query parameter, by name.
#[derive(Debug)]
pub struct FieldTest {
    /// Header names are lowercase and compared case-insensitively; query
    /// parameter names are compared exactly.
    pub name: Box<[u8]>,
    pub test: ValueTest,
}

#[derive(Debug)]
pub enum ValueTest {
    Present,
    Equals(Box<[u8]>),
    /// Index into the rule set's regex table.
    Regex(usize),
}

/// An IPv4 or IPv6 network. IPv4-mapped IPv6 clients are compared as IPv4
/// (the view carries canonical addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub bits: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `::1/128`, or a bare address (a host network).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network (10.0.0.0/8, ::1/128)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(Cidr { addr, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl HostPattern {
    /// `host` must already be lowercase and without port.
    pub fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostPattern::Exact(h) => **h == *host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s),
        }
    }
}

impl Conditions {
    /// True when every condition holds. `host` is the view's host,
    /// lowercased by the caller.
    pub fn matches(&self, req: &RequestView<'_>, host: Option<&[u8]>, regexes: &[Regex]) -> bool {
        if !self.hosts.is_empty() {
            let Some(host) = host else { return false };
            if !self.hosts.iter().any(|p| p.matches(host)) {
                return false;
            }
        }
        match &self.path {
            None => {}
            Some(PathMatch::Exact(p)) if **p != *req.path => return false,
            Some(PathMatch::Prefix(p)) if !req.path.starts_with(p) => return false,
            Some(PathMatch::Regex(i)) if !regexes[*i].is_match(req.path) => return false,
            Some(_) => {}
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| **m == *req.method) {
            return false;
        }
        if !self.clients.is_empty() && !self.clients.iter().any(|c| c.contains(req.client)) {
            return false;
        }
        self.headers.iter().all(|t| header_test(t, req, regexes))
            && self.query.iter().all(|t| query_test(t, req.query, regexes))
    }
}

fn value_test(test: &ValueTest, value: &[u8], regexes: &[Regex]) -> bool {
    match test {
        ValueTest::Present => true,
        ValueTest::Equals(want) => **want == *value,
        ValueTest::Regex(i) => regexes[*i].is_match(value),
    }
}

/// A header test holds when any field of that name passes it.
fn header_test(t: &FieldTest, req: &RequestView<'_>, regexes: &[Regex]) -> bool {
    req.headers.iter().any(|h| {
        h.name.get(req.buf).eq_ignore_ascii_case(&t.name)
            && value_test(&t.test, h.value.get(req.buf), regexes)
    })
}

/// A query test holds when any parameter of that name passes it. Values
/// are compared after percent-decoding (and `+` as space), as a form
/// decoder would read them.
fn query_test(t: &FieldTest, query: &[u8], regexes: &[Regex]) -> bool {
    query_pairs(query).any(|(name, value)| {
        if *name != *t.name {
            return false;
        }
        if matches!(t.test, ValueTest::Present) {
            return true;
        }
        if value.iter().any(|&b| b == b'%' || b == b'+') {
            value_test(&t.test, &percent_decode(value, true), regexes)
        } else {
            value_test(&t.test, value, regexes)
        }
    })
}

/// `a=1&b&c=3` as `(name, value)` pairs; a bare name has an empty value.
pub fn query_pairs(query: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    query
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|&b| b == b'=') {
            Some(i) => (&p[..i], &p[i + 1..]),
            None => (p, &p[p.len()..]),
        })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode `%XX` escapes (malformed ones are kept as written); with `plus`,
/// `+` means space (form encoding).
pub fn percent_decode(s: &[u8], plus: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether `path` needs `normalize_path`: it has an escape, an empty
/// segment or a dot segment. A scan, so a clean path costs no copy.
pub fn needs_normalizing(path: &[u8]) -> bool {
    path.windows(2)
        .any(|w| w[0] == b'%' || (w[0] == b'/' && (w[1] == b'/' || w[1] == b'.')))
        || path.last() == Some(&b'%')
}

/// The path rules match against, written into `out`:
/// - escapes of unreserved characters are decoded (`%61` is `a`, RFC 3986
///   6.2.2.2), other escapes are kept (`%2F` stays: it is not a `/`);
/// - runs of `/` become one (nginx's merge_slashes);
/// - `.` and `..` segments are resolved (RFC 3986 5.2.4); `..` never
///   climbs above the root.
///
/// Without this, `drop` on `/admin` could be walked around with
/// `/%61dmin`, `//admin` or `/x/../admin`, which the backend would serve
/// as `/admin`. The normalised path is also what is forwarded.
pub fn normalize_path(path: &[u8], out: &mut Vec<u8>) {
    out.clear();
    // Decode unreserved escapes first, so `%2E%2E` is seen as `..`. A
    // decoded byte can complete an escape with a literal `%` before it:
    // `/%%361dmin` is `/%61dmin` after one pass and `/admin` after two
    // (found by fuzz/fuzz_targets/path_normalize.rs). Decode until nothing
    // changes, so rules see what any number of decodes makes of the path;
    // each pass that changes something shortens it, so this ends.
    let mut decoded = decode_unreserved(path);
    loop {
        let again = decode_unreserved(&decoded);
        if again.len() == decoded.len() {
            break;
        }
        decoded = again;
    }
    for segment in decoded.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                let cut = out.iter().rposition(|&b| b == b'/').unwrap_or(0);
                out.truncate(cut);
            }
            s => {
                out.push(b'/');
                out.extend_from_slice(s);
            }
        }
    }
    // Keep a trailing slash: `/dir/` and `/dir` are different resources.
    let ends_in_dir = matches!(
        decoded.rsplit(|&b| b == b'/').next(),
        Some(b"" | b"." | b"..")
    );
    if out.is_empty() || ends_in_dir {
        out.push(b'/');
    }
}

/// One pass of decoding `%XX` escapes of unreserved characters.
fn decode_unreserved(path: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%'
            && i + 2 < path.len()
            && let (Some(h), Some(l)) = (hex(path[i + 1]), hex(path[i + 2]))
            && is_unreserved(h << 4 | l)
        {
            decoded.push(h << 4 | l);
            i += 3;
            continue;
        }
        decoded.push(path[i]);
        i += 1;
    }
    decoded
}

/// Lowercase `host` into `scratch` for matching; `None` if it is too long
/// to be a DNS name (no pattern can match it).
pub fn lower_host<'s>(host: &[u8], scratch: &'s mut [u8; 256]) -> Option<&'s [u8]> {
    let dst = scratch.get_mut(..host.len())?;
    for (d, s) in dst.iter_mut().zip(host) {
        *d = s.to_ascii_lowercase();
    }
    Some(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        let mut out = Vec::new();
        normalize_path(p.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn paths_normalize() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("//admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2E%2E/admin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/..", "/"),
            ("/../../etc", "/etc"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%", "/a%"),
            ("/a%4", "/a%4"),
            ("/dir/", "/dir/"),
            // Regression (fuzz): a decode must not leave a new escape.
            ("/%%361dmin", "/admin"),
        ] {
            assert_eq!(norm(raw), want, "{raw}");
            assert_eq!(
                needs_normalizing(raw.as_bytes()),
                raw != want || raw.contains('%'),
                "{raw}"
            );
        }
    }

    #[test]
    fn cidrs() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    #[test]
    fn query_and_decoding() {
        let pairs: Vec<_> = query_pairs(b"a=1&&b&c=x=y").collect();
        assert_eq!(
            pairs,
            vec![
                (&b"a"[..], &b"1"[..]),
                (&b"b"[..], &b""[..]),
                (&b"c"[..], &b"x=y"[..])
            ]
        );
        assert_eq!(percent_decode(b"John+Doe%21%zz%", true), b"John Doe!%zz%");
    }

    #[test]
    fn hosts() {
        let w = HostPattern::Suffix(b".example.com".to_vec().into());
        assert!(w.matches(b"a.example.com"));
        assert!(w.matches(b"a.b.example.com"));
        assert!(!w.matches(b"example.com"));
        assert!(!w.matches(b"badexample.com"));
    }
}
