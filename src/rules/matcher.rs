//! Request matchers: what one rule asks of a request (host, path, method,
//! header, query parameter, client address).
//!
//! Owns: evaluating one rule's conditions, host and query helpers. Does
//! not own: the view of a request they are asked against, or path
//! normalisation (`http::view`), choosing which rules to evaluate
//! (`index`) or what a matching rule does (`action`).

use std::net::IpAddr;

use regex::bytes::Regex;

use crate::http::view::{RequestView, percent_decode};

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
    /// Over TLS (`scheme = "https"`) or not (`"http"`); either when unset.
    pub tls: Option<bool>,
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
        if self.tls.is_some_and(|tls| tls != req.tls) {
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
