//! The view of a parsed request that routing, rules, admission and the
//! access log read, and the path normalisation it is built with.
//!
//! Owns: [`RequestView`] and the normalised path. Does not own: parsing
//! (`head`) or what is decided from the view (`rules`, `admission`).

use std::net::IpAddr;

use super::head::HeaderSpan;

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
    /// It came over TLS (`$scheme` is `https`).
    pub tls: bool,
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
}
