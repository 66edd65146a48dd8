//! Validating `[[route]]` and `[[rule]]` sections and compiling them into a
//! [`RuleSet`]. Every regex is compiled here, once per load; a bad one is
//! reported with its line and the regex crate's own message.
//!
//! Owns: the meaning of each rule key and its checks. Does not own:
//! matching (`rules`).

use std::collections::BTreeMap;

use regex::bytes::{Regex, RegexBuilder};
use toml::Spanned;

use super::Validator;
use super::file::{
    EditSection, FieldSection, Matchers, OneOrMany, RedirectSection, RespondSection, RuleSection,
};
use crate::http::head::is_tchar;
use crate::rules::action::{Action, HeaderEdits, LogField, Rewrite, Template};
use crate::rules::matcher::{Cidr, Conditions, FieldTest, HostPattern, PathMatch, ValueTest};
use crate::rules::{Rule, RuleSet, RuleSource, Upgrades};

/// Compiled regexes above this size are refused: a pattern like
/// `\w{1000}` compiles to megabytes per worker.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Fields coregate writes itself or that frame the message: editing them
/// would break framing or forwarding guarantees.
const MANAGED_FIELDS: [&str; 12] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "expect",
    "via",
    "x-forwarded-for",
    "x-forwarded-proto",
];

/// Compiles a template at a config location, reporting problems there.
type TemplateFn<'c> =
    dyn FnMut(&mut Validator<'_>, &Spanned<String>, String) -> Option<Template> + 'c;

/// Compiles the routes and rules of one file, collecting their regexes
/// into one table.
pub(super) struct RuleCompiler<'v, 't> {
    v: &'v mut Validator<'t>,
    regexes: Vec<Regex>,
}

/// A `[[route]]` or a `[[rule]]`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Route,
    Rule,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Route => "route",
            Kind::Rule => "rule",
        }
    }
}

impl<'v, 't> RuleCompiler<'v, 't> {
    pub(super) fn new(v: &'v mut Validator<'t>) -> Self {
        RuleCompiler {
            v,
            regexes: Vec::new(),
        }
    }

    /// Compile every route and rule; `None` if any had a problem (all are
    /// reported).
    pub(super) fn compile(
        mut self,
        routes: &[Spanned<RuleSection>],
        rules: &[Spanned<RuleSection>],
        upstreams: &BTreeMap<String, usize>,
    ) -> Option<RuleSet> {
        let before = self.v.problems.len();
        let routes: Vec<RuleSource> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.rule(r, i, Kind::Route, upstreams))
            .collect();
        let stack: Vec<RuleSource> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.rule(r, i, Kind::Rule, upstreams))
            .collect();
        if self.v.problems.len() > before {
            return None;
        }
        match RuleSet::build(routes, stack, self.regexes) {
            Ok(set) => Some(set),
            Err(e) => {
                self.v
                    .problem(0..0, "route", format!("cannot build the rule index: {e}"));
                None
            }
        }
    }

    fn regex(&mut self, pattern: &str, span: std::ops::Range<usize>, key: &str) -> Option<usize> {
        match RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            // Paths, header and query values are bytes, and mostly ASCII on
            // the wire. Unicode classes (`\d` as every script's digits)
            // made each compiled regex ~4x larger: 10,000 routes like
            // `^/api/v1/users/(\d+)$` took 595 MB and 1.6 s to load with
            // them, 154 MB and 1.1 s without. `(?u)` turns them back on.
            .unicode(false)
            .build()
        {
            Ok(re) => {
                self.regexes.push(re);
                Some(self.regexes.len() - 1)
            }
            Err(e) => {
                // The regex crate's message spans lines (a caret diagram);
                // keep it whole but indented under our line.
                let msg = e.to_string().replace('\n', "\n    ");
                self.v
                    .problem(span, key, format!("bad regex {pattern:?}: {msg}"));
                None
            }
        }
    }

    /// One `[[route]]` or `[[rule]]`: its matchers, its action, its
    /// stacking actions and its limits; `None` with every problem
    /// reported.
    fn rule(
        &mut self,
        section: &Spanned<RuleSection>,
        position: usize,
        kind: Kind,
        upstreams: &BTreeMap<String, usize>,
    ) -> Option<RuleSource> {
        let r = section.get_ref();
        let k = kind.key();
        let before = self.v.problems.len();
        let line = self.v.line_of(section.span().start);
        let name = match &r.name {
            Some(n) => n.get_ref().clone(),
            None => format!("{k} #{} (line {line})", position + 1),
        };
        let when = self.conditions(r.matchers(), k);
        let unless = r
            .not
            .as_ref()
            .map(|n| self.conditions(n.get_ref().matchers(), &format!("{k}.not")));
        let path_regex = match &when.path {
            Some(PathMatch::Regex(i)) => Some(*i),
            _ => None,
        };
        let captures = |name: &str| -> Result<usize, String> {
            let Some(i) = path_regex else {
                return Err("captures need a path_regex on this rule".into());
            };
            let re = &self.regexes[i];
            name.parse::<usize>()
                .ok()
                .or_else(|| re.capture_names().position(|c| c == Some(name)))
                .filter(|&g| g < re.captures_len())
                .ok_or_else(|| format!("path_regex {:?} has no group {name:?}", re.as_str()))
        };
        let mut templates_ok = true;
        let mut template =
            |v: &mut Validator<'_>, s: &Spanned<String>, key: String| match Template::parse(
                s.get_ref(),
                &captures,
            ) {
                Ok(t) => Some(t),
                Err(e) => {
                    templates_ok = false;
                    v.problem(s.span(), key, e);
                    None
                }
            };
        let v = &mut *self.v;
        let action = action(v, section, kind, upstreams, &mut template);
        let request_headers = edits(v, &r.request_headers, k, "request_headers", &mut template);
        let response_headers = edits(v, &r.response_headers, k, "response_headers", &mut template);
        let log = log_fields(v, r, k);
        if kind == Kind::Rule
            && request_headers.is_empty()
            && response_headers.is_empty()
            && log.is_empty()
            && v.problems.len() == before
        {
            v.problem(
                section.span(),
                "rule",
                "a [[rule]] needs request_headers, response_headers or log",
            );
        }
        let policy = match (&r.limits, kind) {
            (Some(l), Kind::Rule) => {
                v.problem(
                    l.span(),
                    "rule.limits",
                    "admission limits belong to a [[route]] (or a listener), not a [[rule]]",
                );
                None
            }
            (limits, _) => v.policy(limits.as_ref(), super::limits::Owner::Route),
        };
        let upgrades = self.upgrades(r, kind);
        if self.v.problems.len() > before || !templates_ok {
            return None;
        }
        let uses_captures = uses_captures(&action, [&request_headers, &response_headers]);
        if kind == Kind::Rule && uses_captures {
            self.v.problem(
                section.span(),
                "rule",
                "regex captures ($1, ${name}) are only available in a [[route]]",
            );
            return None;
        }
        Some(RuleSource {
            path_pattern: path_regex.map(|i| self.regexes[i].as_str().to_string()),
            rule: Rule {
                name,
                when,
                unless,
                action,
                request_headers,
                response_headers,
                log,
                uses_captures,
                policy,
                upgrades,
                // Set by `RuleSet::build`.
                index: 0,
            },
        })
    }

    /// `upgrade` and `tunnel_idle_timeout`: for routes to an upstream.
    fn upgrades(&mut self, r: &RuleSection, kind: Kind) -> Upgrades {
        let k = kind.key();
        let mut upgrades = Upgrades::default();
        if kind == Kind::Rule || r.upstream.is_none() {
            if let Some(s) = &r.upgrade {
                self.v.problem(
                    s.span(),
                    format!("{k}.upgrade"),
                    "only applies to a route with `upstream`",
                );
            }
            if let Some(s) = &r.tunnel_idle_timeout {
                self.v.problem(
                    s.span(),
                    format!("{k}.tunnel_idle_timeout"),
                    "only applies to a route with `upstream`",
                );
            }
            return upgrades;
        }
        if let Some(list) = &r.upgrade {
            upgrades.protocols.clear();
            for p in list.get_ref() {
                let name = p.get_ref();
                if name.is_empty() || !name.bytes().all(is_tchar) {
                    self.v.problem(
                        p.span(),
                        "route.upgrade",
                        format!(
                            "{name:?} is not a protocol name; write e.g. \"websocket\" or \"h2c\""
                        ),
                    );
                    continue;
                }
                let lower = name.to_ascii_lowercase().into_bytes().into_boxed_slice();
                if !upgrades.protocols.contains(&lower) {
                    upgrades.protocols.push(lower);
                }
            }
        }
        if r.tunnel_idle_timeout.is_some() {
            upgrades.idle_timeout = Some(self.v.duration(
                &r.tunnel_idle_timeout,
                "route.tunnel_idle_timeout",
                std::time::Duration::from_secs(3600),
            ));
        }
        upgrades
    }

    /// The matchers of a rule (`k` is `route` or `rule`) or of its `not`
    /// (`route.not`), each kind checked and compiled by its own function.
    fn conditions(&mut self, m: Matchers<'_>, k: &str) -> Conditions {
        let v = &mut *self.v;
        let hosts = m.host.as_ref().map(|h| hosts(v, h, k));
        let methods = m.methods.as_ref().map(|ms| methods(v, ms, k));
        let clients = m.client.as_ref().map(|cs| clients(v, cs, k));
        let tls = m.scheme.as_ref().and_then(|s| scheme(v, s, k));
        Conditions {
            hosts: hosts.unwrap_or_default(),
            path: self.path(&m, k),
            methods: methods.unwrap_or_default(),
            headers: self.field_tests(m.header, k, "header"),
            query: self.field_tests(m.query, k, "query"),
            clients: clients.unwrap_or_default(),
            tls,
        }
    }

    /// At most one of `path`, `path_prefix` and `path_regex`.
    fn path(&mut self, m: &Matchers<'_>, k: &str) -> Option<PathMatch> {
        let paths: Vec<(&str, &Spanned<String>)> = [
            ("path", m.path),
            ("path_prefix", m.path_prefix),
            ("path_regex", m.path_regex),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.as_ref().map(|p| (n, p)))
        .collect();
        let &(key, p) = match paths.as_slice() {
            [] => return None,
            [one] => one,
            [first, second, ..] => {
                self.v.problem(
                    second.1.span(),
                    format!("{k}.{}", second.0),
                    format!(
                        "use one of path, path_prefix and path_regex (also has {})",
                        first.0
                    ),
                );
                return None;
            }
        };
        let s = p.get_ref();
        match key {
            "path_regex" => self
                .regex(s, p.span(), &format!("{k}.path_regex"))
                .map(PathMatch::Regex),
            _ if !s.starts_with('/') => {
                self.v.problem(
                    p.span(),
                    format!("{k}.{key}"),
                    format!("{s:?} must start with '/'"),
                );
                None
            }
            "path" => Some(PathMatch::Exact(s.as_bytes().to_vec().into())),
            _ => Some(PathMatch::Prefix(s.as_bytes().to_vec().into())),
        }
    }

    /// `header = [...]` or `query = [...]` (`which`).
    fn field_tests(
        &mut self,
        list: &Option<Vec<Spanned<FieldSection>>>,
        k: &str,
        which: &str,
    ) -> Vec<FieldTest> {
        let key = format!("{k}.{which}");
        list.iter()
            .flatten()
            .filter_map(|f| self.field_test(f, &key, which == "header"))
            .collect()
    }

    fn field_test(
        &mut self,
        f: &Spanned<FieldSection>,
        key: &str,
        header: bool,
    ) -> Option<FieldTest> {
        let s = f.get_ref();
        let given = [s.present.is_some(), s.equals.is_some(), s.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if given != 1 {
            self.v.problem(
                f.span(),
                key,
                format!(
                    "{:?}: give exactly one of present = true, equals, regex",
                    s.name
                ),
            );
            return None;
        }
        if s.name.is_empty() || (header && !s.name.bytes().all(is_tchar)) {
            self.v
                .problem(f.span(), key, format!("{:?} is not a field name", s.name));
            return None;
        }
        let test = if let Some(p) = s.present {
            if !p {
                self.v.problem(
                    f.span(),
                    key,
                    "present = false: to match an absent field, put it under `not`",
                );
                return None;
            }
            ValueTest::Present
        } else if let Some(e) = &s.equals {
            ValueTest::Equals(e.as_bytes().to_vec().into())
        } else {
            let pattern = s.regex.as_deref().expect("one of the three is set");
            ValueTest::Regex(self.regex(pattern, f.span(), key)?)
        };
        let name = if header {
            s.name.to_ascii_lowercase()
        } else {
            s.name.clone()
        };
        Some(FieldTest {
            name: name.into_bytes().into(),
            test,
        })
    }
}

/// `host = "a.example"` or a list: exact names and `*.suffix`es.
fn hosts(v: &mut Validator<'_>, h: &Spanned<OneOrMany>, k: &str) -> Vec<HostPattern> {
    let mut hosts = Vec::new();
    for host in h.get_ref().items() {
        let lower = host.to_ascii_lowercase();
        match lower.strip_prefix("*.") {
            Some(rest) if super::valid_route_host(rest) && !rest.starts_with('[') => {
                hosts.push(HostPattern::Suffix(format!(".{rest}").into_bytes().into()))
            }
            None if super::valid_route_host(&lower) => {
                hosts.push(HostPattern::Exact(lower.into_bytes().into()))
            }
            _ => v.problem(
                h.span(),
                format!("{k}.host"),
                format!("{host:?} is not a host name, *.suffix or IP literal (no port, no path)"),
            ),
        }
    }
    hosts
}

/// A non-empty list under `key`, each item compiled by `parse` (its
/// error is reported at the item).
fn list_of<T>(
    v: &mut Validator<'_>,
    list: &Spanned<Vec<Spanned<String>>>,
    key: &str,
    what: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Vec<T> {
    if list.get_ref().is_empty() {
        v.problem(list.span(), key, format!("list at least one {what}"));
    }
    let mut items = Vec::new();
    for item in list.get_ref() {
        match parse(item.get_ref()) {
            Ok(t) => items.push(t),
            Err(e) => v.problem(item.span(), key, e),
        }
    }
    items
}

/// `methods = [...]`, uppercased: GET is meant, not get (methods are
/// case-sensitive).
fn methods(v: &mut Validator<'_>, ms: &Spanned<Vec<Spanned<String>>>, k: &str) -> Vec<Box<[u8]>> {
    list_of(v, ms, &format!("{k}.methods"), "method", |s| {
        if s.is_empty() || !s.bytes().all(is_tchar) {
            return Err(format!("{s:?} is not a method"));
        }
        Ok(s.to_ascii_uppercase().into_bytes().into())
    })
}

/// `client = ["10.0.0.0/8", ...]`.
fn clients(v: &mut Validator<'_>, cs: &Spanned<Vec<Spanned<String>>>, k: &str) -> Vec<Cidr> {
    list_of(v, cs, &format!("{k}.client"), "network", Cidr::parse)
}

/// `scheme = "http"` or `"https"`: whether the request came over TLS.
fn scheme(v: &mut Validator<'_>, scheme: &Spanned<String>, k: &str) -> Option<bool> {
    match scheme.get_ref().to_ascii_lowercase().as_str() {
        "http" => Some(false),
        "https" => Some(true),
        other => {
            v.problem(
                scheme.span(),
                format!("{k}.scheme"),
                format!("{other:?}: write \"http\" or \"https\""),
            );
            None
        }
    }
}

/// The terminal action of a route: exactly one of `upstream`, `respond`,
/// `redirect` and `drop`; a `[[rule]]` has none. `strip_prefix` and
/// `rewrite` only go with `upstream`.
fn action(
    v: &mut Validator<'_>,
    section: &Spanned<RuleSection>,
    kind: Kind,
    upstreams: &BTreeMap<String, usize>,
    template: &mut TemplateFn<'_>,
) -> Option<Action> {
    let r = section.get_ref();
    let k = kind.key();
    if kind == Kind::Rule || r.upstream.is_none() {
        for (key, present) in [("strip_prefix", &r.strip_prefix), ("rewrite", &r.rewrite)] {
            if let Some(s) = present {
                v.problem(
                    s.span(),
                    format!("{k}.{key}"),
                    "only applies to a route with `upstream`",
                );
            }
        }
    }
    let given: Vec<&str> = [
        ("upstream", r.upstream.is_some()),
        ("respond", r.respond.is_some()),
        ("redirect", r.redirect.is_some()),
        ("drop", r.drop.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, set)| set.then_some(n))
    .collect();
    match (kind, given.as_slice()) {
        (Kind::Rule, []) => None,
        (Kind::Rule, [first, ..]) => {
            v.problem(
                section.span(),
                format!("rule.{first}"),
                "a [[rule]] only edits headers and logs; put terminal actions in a [[route]]",
            );
            None
        }
        (Kind::Route, [_]) => {
            if let Some(u) = &r.upstream {
                proxy_action(v, u, r, upstreams, template)
            } else if let Some(resp) = &r.respond {
                respond_action(v, resp, template)
            } else if let Some(red) = &r.redirect {
                redirect_action(v, red, template)
            } else {
                r.drop.as_ref().and_then(|d| drop_action(v, d))
            }
        }
        (Kind::Route, _) => {
            v.problem(
                section.span(),
                "route",
                if given.is_empty() {
                    "a route needs one action: upstream, respond, redirect or drop".to_string()
                } else {
                    format!(
                        "a route has one action; this one has {}",
                        given.join(" and ")
                    )
                },
            );
            None
        }
    }
}

/// `upstream = "NAME"`, with its path change (`strip_prefix` or
/// `rewrite`).
fn proxy_action(
    v: &mut Validator<'_>,
    u: &Spanned<String>,
    r: &RuleSection,
    upstreams: &BTreeMap<String, usize>,
    template: &mut TemplateFn<'_>,
) -> Option<Action> {
    let upstream = match upstreams.get(u.get_ref()) {
        Some(&i) => Some(i),
        None => {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            v.problem(
                u.span(),
                "route.upstream",
                format!(
                    "no upstream named {:?} (defined: {})",
                    u.get_ref(),
                    known.join(", ")
                ),
            );
            None
        }
    };
    let rewrite = match (&r.strip_prefix, &r.rewrite) {
        (Some(_), Some(w)) => {
            v.problem(
                w.span(),
                "route.rewrite",
                "use strip_prefix or rewrite, not both",
            );
            None
        }
        (Some(p), None) if p.get_ref().starts_with('/') => {
            Some(Rewrite::StripPrefix(p.get_ref().as_bytes().to_vec().into()))
        }
        (Some(p), None) => {
            v.problem(
                p.span(),
                "route.strip_prefix",
                format!("{:?} must start with '/'", p.get_ref()),
            );
            None
        }
        (None, Some(w)) if !w.get_ref().starts_with(['/', '$']) => {
            v.problem(
                w.span(),
                "route.rewrite",
                format!("{:?} must start with '/' or a variable", w.get_ref()),
            );
            None
        }
        (None, Some(w)) => template(v, w, "route.rewrite".into()).map(Rewrite::Path),
        (None, None) => Some(Rewrite::None),
    };
    Some(Action::Proxy {
        upstream: upstream?,
        rewrite: rewrite?,
    })
}

/// `respond = { status, headers, body }`: an answer of the proxy's own.
fn respond_action(
    v: &mut Validator<'_>,
    resp: &Spanned<RespondSection>,
    template: &mut TemplateFn<'_>,
) -> Option<Action> {
    let r = resp.get_ref();
    let status = *r.status.get_ref();
    let status_ok = (200..=599).contains(&status);
    if !status_ok {
        v.problem(
            r.status.span(),
            "route.respond.status",
            format!("{status} is not a final status (200..=599)"),
        );
    } else if matches!(status, 204 | 304) && !r.body.is_empty() {
        v.problem(
            r.status.span(),
            "route.respond.body",
            format!("a {status} response has no body"),
        );
    }
    let mut headers = Vec::new();
    for (n, val) in &r.headers {
        let key = format!("route.respond.headers.{n}");
        if check_field(v, resp.span(), &key, n, val, &[]) {
            let s = Spanned::new(resp.span(), val.clone());
            if let Some(t) = template(v, &s, key) {
                headers.push((n.as_bytes().to_vec().into_boxed_slice(), t));
            }
        }
    }
    let body = Spanned::new(resp.span(), r.body.clone());
    let body = template(v, &body, "route.respond.body".into());
    match (status_ok, body) {
        (true, Some(body)) => Some(Action::Respond {
            status: status as u16,
            headers,
            body,
        }),
        _ => None,
    }
}

/// `redirect = { status, location }`.
fn redirect_action(
    v: &mut Validator<'_>,
    red: &Spanned<RedirectSection>,
    template: &mut TemplateFn<'_>,
) -> Option<Action> {
    let r = red.get_ref();
    let status = r.status.as_ref().map_or(302, |s| *s.get_ref());
    let status_ok = matches!(status, 301 | 302 | 303 | 307 | 308);
    if !status_ok {
        v.problem(
            r.status.as_ref().map_or(red.span(), |s| s.span()),
            "route.redirect.status",
            format!("{status} is not a redirect status (301, 302, 303, 307, 308)"),
        );
    }
    let loc = &r.location;
    let location = if check_value(loc.get_ref()) {
        template(v, loc, "route.redirect.location".into())
    } else {
        v.problem(
            loc.span(),
            "route.redirect.location",
            "control characters are not allowed in a header value",
        );
        None
    };
    match (status_ok, location) {
        (true, Some(location)) => Some(Action::Redirect {
            status: status as u16,
            location,
        }),
        _ => None,
    }
}

/// `drop = "403"` (answer Forbidden) or `drop = "close"`.
fn drop_action(v: &mut Validator<'_>, d: &Spanned<String>) -> Option<Action> {
    match d.get_ref().as_str() {
        "403" => Some(Action::Drop { close: false }),
        "close" => Some(Action::Drop { close: true }),
        other => {
            v.problem(
                d.span(),
                "route.drop",
                format!(
                    "{other:?}: write \"403\" (answer Forbidden) or \"close\" (close without answering)"
                ),
            );
            None
        }
    }
}

/// `log = [...]`: access log fields this rule adds, each once.
fn log_fields(v: &mut Validator<'_>, r: &RuleSection, k: &str) -> Vec<LogField> {
    let Some(fields) = &r.log else {
        return Vec::new();
    };
    let mut log = Vec::new();
    for field in list_of(v, fields, &format!("{k}.log"), "field", LogField::parse) {
        if !log.contains(&field) {
            log.push(field);
        }
    }
    log
}

/// Whether any template of the rule reads regex captures.
fn uses_captures(action: &Option<Action>, edits: [&HeaderEdits; 2]) -> bool {
    let in_action = match action {
        Some(Action::Proxy {
            rewrite: Rewrite::Path(t),
            ..
        }) => t.uses_captures(),
        Some(Action::Redirect { location, .. }) => location.uses_captures(),
        Some(Action::Respond { headers, body, .. }) => {
            body.uses_captures() || headers.iter().any(|(_, t)| t.uses_captures())
        }
        _ => false,
    };
    in_action
        || edits
            .iter()
            .any(|e| e.set.iter().chain(&e.add).any(|(_, t)| t.uses_captures()))
}

fn edits(
    v: &mut Validator<'_>,
    section: &Option<Spanned<EditSection>>,
    k: &str,
    side: &str,
    template: &mut TemplateFn<'_>,
) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    let Some(s) = section else { return edits };
    let span = s.span();
    let e = s.get_ref();
    // Host can be replaced on the way up, never removed (HTTP/1.1
    // requires it) or added twice.
    let request = side == "request_headers";
    for name in &e.remove {
        let key = format!("{k}.{side}.remove");
        let extra: &[&str] = if request { &["host"] } else { &[] };
        if check_field(v, span.clone(), &key, name, "", extra) {
            edits
                .remove
                .push(name.to_ascii_lowercase().into_bytes().into());
        }
    }
    for (op, map) in [("set", &e.set), ("add", &e.add)] {
        for (name, value) in map {
            let key = format!("{k}.{side}.{op}.{name}");
            let extra: &[&str] = if request && op == "add" {
                &["host"]
            } else {
                &[]
            };
            if !check_field(v, span.clone(), &key, name, value, extra) {
                continue;
            }
            let spanned = Spanned::new(span.clone(), value.clone());
            if let Some(t) = template(v, &spanned, key) {
                let entry = (name.as_bytes().to_vec().into_boxed_slice(), t);
                if op == "set" {
                    edits.set.push(entry);
                } else {
                    edits.add.push(entry);
                }
            }
        }
    }
    edits
}

/// Header values may hold visible text, spaces and tabs only.
fn check_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || b >= 0x20 && b != 0x7f)
}

/// A header name to edit: a token, not managed by coregate (nor one of
/// `extra`), with a value free of control characters.
fn check_field(
    v: &mut Validator<'_>,
    span: std::ops::Range<usize>,
    key: &str,
    name: &str,
    value: &str,
    extra: &[&str],
) -> bool {
    let lower = name.to_ascii_lowercase();
    let problem = if name.is_empty() || !name.bytes().all(is_tchar) {
        format!("{name:?} is not a header name")
    } else if MANAGED_FIELDS.contains(&lower.as_str()) || extra.contains(&lower.as_str()) {
        format!("{name} is managed by coregate (framing and forwarding) and cannot be edited here")
    } else if !check_value(value) {
        format!("the value of {name} has control characters")
    } else {
        return true;
    };
    v.problem(span, key, problem);
    false
}
