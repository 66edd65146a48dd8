//! What a matching rule does: proxy (with prefix strip or path rewrite),
//! respond, redirect, drop; header edits and access-log selection; and the
//! templates (`$host`, `$1`) that rewrites, Locations and header values are
//! written in.
//!
//! Owns: the compiled action types and template expansion. Does not own:
//! I/O (the proxy performs actions) or parsing the config (`config::rules`).

use regex::bytes::CaptureLocations;

use crate::http::edits::HeaderPlan;
use crate::http::view::RequestView;

/// A route's terminal action.
#[derive(Debug)]
pub enum Action {
    Proxy {
        /// Index into `Snapshot::upstreams`.
        upstream: usize,
        rewrite: Rewrite,
    },
    /// Answer with a fixed response.
    Respond {
        status: u16,
        /// Name and value, in order; Content-Length is added.
        headers: Vec<(Box<[u8]>, Template)>,
        body: Template,
    },
    Redirect {
        status: u16,
        location: Template,
    },
    /// 403 with a short body, or (`close`) close without answering.
    Drop {
        close: bool,
    },
}

/// How the path is changed before it is forwarded. The query is kept.
#[derive(Debug)]
pub enum Rewrite {
    None,
    /// Remove this prefix; an empty result becomes `/`.
    StripPrefix(Box<[u8]>),
    /// Replace the path with the template (captures of the path regex).
    Path(Template),
}

/// A string with `$variables`, compiled once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<[u8]>),
    Var(Var),
    /// Capture group of the rule's path regex.
    Capture(usize),
}

/// Request facts a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// Host as sent, without port.
    Host,
    /// Host as sent, with port.
    HttpHost,
    /// Path (normalised), without query.
    Path,
    /// Query without `?`.
    Query,
    /// `?query` when there is one, else nothing: `$path$is_args$query`.
    IsArgs,
    /// Path and query: what the client asked for.
    RequestUri,
    Method,
    /// `https` on a TLS listener, else `http`.
    Scheme,
    RemoteAddr,
}

impl Var {
    pub const ALL: [(&'static str, Var); 9] = [
        ("host", Var::Host),
        ("http_host", Var::HttpHost),
        ("path", Var::Path),
        ("query", Var::Query),
        ("is_args", Var::IsArgs),
        ("request_uri", Var::RequestUri),
        ("method", Var::Method),
        ("scheme", Var::Scheme),
        ("remote_addr", Var::RemoteAddr),
    ];
}

impl Template {
    /// Compile `$name`, `${name}`, `$1`, `${1}`, `${capture_name}` and `$$`.
    /// `captures` resolves a capture name or number to its group index (or
    /// says why not); without a path regex there are none.
    pub fn parse(
        s: &str,
        captures: &dyn Fn(&str) -> Result<usize, String>,
    ) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'$' {
                lit.push(b[i]);
                i += 1;
                continue;
            }
            let (name, next) = if b.get(i + 1) == Some(&b'$') {
                lit.push(b'$');
                i += 2;
                continue;
            } else if b.get(i + 1) == Some(&b'{') {
                let end = s[i + 2..]
                    .find('}')
                    .ok_or_else(|| format!("{s:?}: unclosed ${{ at byte {i}"))?;
                (&s[i + 2..i + 2 + end], i + 3 + end)
            } else {
                let len = b[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                    .count();
                // `$1abc` is capture 1 then `abc`; `$path_x` is one name.
                let len = if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count()
                } else {
                    len
                };
                (&s[i + 1..i + 1 + len], i + 1 + len)
            };
            if name.is_empty() {
                return Err(format!(
                    "{s:?}: `$` must start a variable ($host, $1, ${{name}}); write $$ for a literal $"
                ));
            }
            if !lit.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut lit).into()));
            }
            if let Some((_, v)) = Var::ALL.iter().find(|(n, _)| *n == name) {
                parts.push(Part::Var(*v));
            } else {
                parts.push(Part::Capture(captures(name).map_err(|e| {
                    let known: Vec<&str> = Var::ALL.iter().map(|(n, _)| *n).collect();
                    format!("{s:?}: ${name}: {e} (variables: {})", known.join(", "))
                })?));
            }
            i = next;
        }
        if !lit.is_empty() {
            parts.push(Part::Literal(lit.into()));
        }
        Ok(Template { parts })
    }

    pub fn uses_captures(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Capture(_)))
    }

    /// Append the expansion to `out`. `caps` holds the path regex's
    /// captures when the template uses any; an unmatched group expands to
    /// nothing.
    pub fn expand(
        &self,
        out: &mut Vec<u8>,
        req: &RequestView<'_>,
        caps: Option<&CaptureLocations>,
    ) {
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.extend_from_slice(l),
                Part::Var(v) => write_var(out, *v, req),
                Part::Capture(i) => {
                    if let Some((s, e)) = caps.and_then(|c| c.get(*i)) {
                        out.extend_from_slice(&req.path[s..e]);
                    }
                }
            }
        }
    }
}

fn write_var(out: &mut Vec<u8>, v: Var, req: &RequestView<'_>) {
    match v {
        Var::Host => out.extend_from_slice(req.host.unwrap_or_default()),
        Var::HttpHost => out.extend_from_slice(req.authority.unwrap_or_default()),
        Var::Path => out.extend_from_slice(req.path),
        Var::Query => out.extend_from_slice(req.query),
        Var::IsArgs if !req.query.is_empty() => out.push(b'?'),
        Var::IsArgs => {}
        Var::RequestUri => {
            out.extend_from_slice(req.path);
            if !req.query.is_empty() {
                out.push(b'?');
                out.extend_from_slice(req.query);
            }
        }
        Var::Method => out.extend_from_slice(req.method),
        Var::Scheme if req.tls => out.extend_from_slice(b"https"),
        Var::Scheme => out.extend_from_slice(b"http"),
        Var::RemoteAddr => {
            use std::io::Write;
            let _ = write!(out, "{}", req.client);
        }
    }
}

/// Edits to one side's header fields, applied in the order `remove`,
/// `set`, `add` within a rule, rule after rule.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Lowercase names whose fields are removed.
    pub remove: Vec<Box<[u8]>>,
    /// Remove fields of that name (case-insensitively), then add this one.
    pub set: Vec<(Box<[u8]>, Template)>,
    /// Add a field, keeping any already there.
    pub add: Vec<(Box<[u8]>, Template)>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// A rule's header edits planned into a request's [`HeaderPlan`], with
/// their templates expanded for that request.
pub trait PlanEdits {
    /// Apply one rule's edits on top of what earlier rules planned.
    fn apply(
        &mut self,
        edits: &HeaderEdits,
        req: &RequestView<'_>,
        caps: Option<&CaptureLocations>,
    );
    /// Append a field whose value is `value` expanded for `req`.
    fn push(
        &mut self,
        name: &[u8],
        value: &Template,
        req: &RequestView<'_>,
        caps: Option<&CaptureLocations>,
    );
}

impl PlanEdits for HeaderPlan {
    fn apply(
        &mut self,
        edits: &HeaderEdits,
        req: &RequestView<'_>,
        caps: Option<&CaptureLocations>,
    ) {
        let names = edits.remove.iter().chain(edits.set.iter().map(|(n, _)| n));
        for name in names {
            self.remove(name);
        }
        for (name, value) in edits.set.iter().chain(&edits.add) {
            self.push(name, value, req, caps);
        }
    }

    fn push(
        &mut self,
        name: &[u8],
        value: &Template,
        req: &RequestView<'_>,
        caps: Option<&CaptureLocations>,
    ) {
        self.add_with(name, |out| value.expand(out, req, caps));
    }
}

/// A field the access log can record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogField {
    Time,
    Method,
    Path,
    Query,
    Host,
    Status,
    /// Milliseconds from the rules' decision on the request head to the
    /// end of the response.
    Latency,
    Upstream,
    /// Response bytes sent to the client, head included.
    Bytes,
    Client,
    Route,
    /// `https` over TLS, else `http`.
    Scheme,
    /// A request header, by lowercase name.
    Header(Box<[u8]>),
}

impl LogField {
    pub const NAMES: [(&'static str, LogField); 12] = [
        ("time", LogField::Time),
        ("method", LogField::Method),
        ("path", LogField::Path),
        ("query", LogField::Query),
        ("host", LogField::Host),
        ("status", LogField::Status),
        ("latency", LogField::Latency),
        ("upstream", LogField::Upstream),
        ("bytes", LogField::Bytes),
        ("client", LogField::Client),
        ("route", LogField::Route),
        ("scheme", LogField::Scheme),
    ];

    /// `status`, or `header:User-Agent`.
    pub fn parse(s: &str) -> Result<LogField, String> {
        if let Some(h) = s.strip_prefix("header:") {
            if h.is_empty() || !h.bytes().all(crate::http::head::is_tchar) {
                return Err(format!("{s:?}: not a header name"));
            }
            return Ok(LogField::Header(h.to_ascii_lowercase().into_bytes().into()));
        }
        LogField::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| {
                let known: Vec<&str> = LogField::NAMES.iter().map(|(n, _)| *n).collect();
                format!(
                    "{s:?} is not a log field (fields: {}, header:NAME)",
                    known.join(", ")
                )
            })
    }

    pub fn key(&self) -> &str {
        match self {
            LogField::Header(_) => "header",
            f => LogField::NAMES
                .iter()
                .find(|(_, g)| g == f)
                .map(|(n, _)| *n)
                .unwrap_or("field"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(path: &'a [u8], query: &'a [u8]) -> RequestView<'a> {
        RequestView {
            method: b"GET",
            host: Some(b"a.example"),
            authority: Some(b"a.example:8080"),
            path,
            query,
            buf: b"",
            headers: &[],
            client: "10.0.0.1".parse().unwrap(),
            tls: false,
        }
    }

    fn no_caps(name: &str) -> Result<usize, String> {
        Err(format!("unknown {name}"))
    }

    #[test]
    fn templates_expand() {
        let t = Template::parse("https://$host$request_uri?x=$$${scheme}", &no_caps).unwrap();
        let mut out = Vec::new();
        t.expand(&mut out, &view(b"/p", b"q=1"), None);
        assert_eq!(out, b"https://a.example/p?q=1?x=$http");
        assert!(Template::parse("$nope", &no_caps).is_err());
        assert!(Template::parse("${host", &no_caps).is_err());
        assert!(Template::parse("a$", &no_caps).is_err());
    }

    #[test]
    fn captures_expand() {
        let re = regex::bytes::Regex::new(r"^/u/(\d+)/(?P<rest>.*)$").unwrap();
        let lookup = |n: &str| -> Result<usize, String> {
            n.parse::<usize>()
                .ok()
                .or_else(|| re.capture_names().position(|c| c == Some(n)))
                .filter(|&i| i < re.captures_len())
                .ok_or_else(|| "no such group".to_string())
        };
        let t = Template::parse("/users/$1/${rest}$2x", &lookup).unwrap();
        assert!(t.uses_captures());
        let mut locs = re.capture_locations();
        let v = view(b"/u/42/a/b", b"");
        re.captures_read(&mut locs, v.path).unwrap();
        let mut out = Vec::new();
        t.expand(&mut out, &v, Some(&locs));
        assert_eq!(out, b"/users/42/a/ba/bx");
        assert!(Template::parse("$3", &lookup).is_err());
    }

    #[test]
    fn plans_stack_in_order() {
        let t = |s: &str| Template::parse(s, &no_caps).unwrap();
        let v = view(b"/", b"");
        let mut plan = HeaderPlan::default();
        plan.apply(
            &HeaderEdits {
                add: vec![(b"x-a".to_vec().into(), t("1"))],
                ..Default::default()
            },
            &v,
            None,
        );
        plan.apply(
            &HeaderEdits {
                set: vec![(b"X-A".to_vec().into(), t("2"))],
                remove: vec![b"cookie".to_vec().into()],
                ..Default::default()
            },
            &v,
            None,
        );
        let fields: Vec<_> = plan.fields().collect();
        assert_eq!(fields, vec![(&b"X-A"[..], &b"2"[..])]);
        assert!(plan.drops(b"Cookie") && plan.drops(b"x-a") && !plan.drops(b"x-b"));
    }
}
