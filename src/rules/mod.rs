//! Traffic rules compiled from the config: which route a request takes and
//! which stacking rules (header edits, access log) apply to it.
//!
//! Routes (`[[route]]`) are tried in file order and the first that matches
//! wins; it carries the terminal action. Stacking rules (`[[rule]]`) all
//! apply when they match, in file order, before the route's own edits.
//!
//! A `RuleSet` is built once per config load and is immutable. Each worker
//! keeps its own clone: cloning a `Regex` gives the clone its own scratch
//! space, so cores never contend for regex caches.
//!
//! Owns: the compiled rule set and request evaluation. Does not own:
//! reading rules from TOML (`config::rules`) or performing actions (`proxy`).

pub mod action;
pub mod index;
pub mod matcher;

use std::sync::Arc;

use regex::bytes::{CaptureLocations, Regex, RegexSet};

pub use action::{Action, HeaderEdits, LogField, PlanEdits, Rewrite, Template};

use crate::http::edits::HeaderPlan;
use index::{Entry, Index, RuleId};
pub use matcher::Conditions;

use crate::http::view::RequestView;

/// One rule: conditions, optional negation, and what it does.
#[derive(Debug)]
pub struct Rule {
    /// `route #2 (line 14)`: for logs and the access log's `route` field.
    pub name: String,
    pub when: Conditions,
    /// The rule does not match when all of these hold.
    pub unless: Option<Conditions>,
    /// Routes have one; stacking rules none.
    pub action: Option<Action>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// Fields for the access log; empty: this rule does not log.
    pub log: Vec<LogField>,
    /// Whether the rule's templates use captures of its path regex.
    pub uses_captures: bool,
    /// The route's own admission limits (`[route.limits]`).
    pub policy: Option<Arc<crate::admission::Policy>>,
    /// What a request may switch to through the route, and its tunnels'
    /// idle timeout.
    pub upgrades: Upgrades,
    /// Position among the routes (or the stacking rules), for per-route
    /// counts.
    pub index: usize,
}

/// The protocols a route lets a request switch to (`Upgrade`, RFC 9110
/// 7.8), and how long a tunnel opened through it may stay quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrades {
    /// Protocol names, in lowercase: a request offering any other is
    /// forwarded without its upgrade.
    pub protocols: Vec<Box<[u8]>>,
    /// Replaces the listener's `tunnel_idle_timeout`.
    pub idle_timeout: Option<std::time::Duration>,
}

impl Default for Upgrades {
    /// WebSocket passes with no configuration, as it does through HAProxy.
    fn default() -> Self {
        Upgrades {
            protocols: vec![b"websocket".to_vec().into_boxed_slice()],
            idle_timeout: None,
        }
    }
}

struct Table {
    routes: Vec<Rule>,
    stack: Vec<Rule>,
    route_index: Index,
    stack_index: Index,
}

/// The compiled rules. Cheap to clone: the table is shared; the regexes
/// are cloned so that each clone has its own matching scratch space.
#[derive(Clone)]
pub struct RuleSet {
    table: Arc<Table>,
    regexes: Vec<Regex>,
    sets: Vec<RegexSet>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("routes", &self.table.routes.len())
            .field("rules", &self.table.stack.len())
            .field("regexes", &self.regexes.len())
            .finish()
    }
}

/// What the rules decided for one request.
#[derive(Debug, Default)]
pub struct Decision<'r> {
    pub route: Option<&'r Rule>,
    /// Captures of the route's path regex, when its templates use them.
    pub caps: Option<CaptureLocations>,
    pub request: HeaderPlan,
    pub response: HeaderPlan,
    /// Access log fields, in order, from every matching rule; empty: the
    /// request is not logged.
    pub log: Vec<&'r LogField>,
}

impl Decision<'_> {
    pub fn clear(&mut self) {
        self.route = None;
        self.caps = None;
        self.request.clear();
        self.response.clear();
        self.log.clear();
    }
}

/// Rules as read from the config, with their regex patterns; compiled by
/// `RuleSet::build`.
pub struct RuleSource {
    pub rule: Rule,
    /// The path regex's pattern, when the path matcher is a regex.
    pub path_pattern: Option<String>,
}

fn numbered(list: Vec<RuleSource>) -> Vec<Rule> {
    list.into_iter()
        .enumerate()
        .map(|(i, s)| Rule { index: i, ..s.rule })
        .collect()
}

impl RuleSet {
    /// Compile routes and stacking rules. `regexes` are every pattern the
    /// rules' `Regex(i)` matchers index, already compiled (each was checked
    /// where the config names it).
    pub fn build(
        routes: Vec<RuleSource>,
        stack: Vec<RuleSource>,
        regexes: Vec<Regex>,
    ) -> Result<RuleSet, String> {
        let mut sets = Vec::new();
        fn entries(list: &[RuleSource]) -> Vec<Entry<'_>> {
            list.iter()
                .map(|s| Entry {
                    when: &s.rule.when,
                    regex_prefix: s.path_pattern.as_deref().and_then(index::anchored_prefix),
                    regex_pattern: s.path_pattern.as_deref(),
                })
                .collect()
        }
        let route_index = Index::build(&entries(&routes), &mut sets)?;
        let stack_index = Index::build(&entries(&stack), &mut sets)?;
        Ok(RuleSet {
            table: Arc::new(Table {
                routes: numbered(routes),
                stack: numbered(stack),
                route_index,
                stack_index,
            }),
            regexes,
            sets,
        })
    }

    /// No routes and no rules: every request gets 404.
    pub fn empty() -> RuleSet {
        RuleSet::build(Vec::new(), Vec::new(), Vec::new()).expect("an empty rule set builds")
    }

    pub fn routes(&self) -> &[Rule] {
        &self.table.routes
    }

    pub fn stacking_rules(&self) -> &[Rule] {
        &self.table.stack
    }

    pub fn regex_count(&self) -> usize {
        self.regexes.len()
    }

    fn rule_matches(&self, rule: &Rule, req: &RequestView<'_>, host: Option<&[u8]>) -> bool {
        rule.when.matches(req, host, &self.regexes)
            && !rule
                .unless
                .as_ref()
                .is_some_and(|u| u.matches(req, host, &self.regexes))
    }

    /// The first route that matches, if any, without its stacking rules:
    /// what a routing-only caller (and the bench) needs.
    pub fn route(&self, req: &RequestView<'_>, scratch: &mut Scratch) -> Option<&Rule> {
        let mut host_buf = [0u8; 256];
        let host = req.host.and_then(|h| matcher::lower_host(h, &mut host_buf));
        self.first_route(req, host, &mut scratch.ids)
    }

    /// The first route matching `req`; `host` is its host, lowercased.
    fn first_route(
        &self,
        req: &RequestView<'_>,
        host: Option<&[u8]>,
        ids: &mut Vec<RuleId>,
    ) -> Option<&Rule> {
        self.table
            .route_index
            .candidates(host, req.path, &self.sets, ids);
        ids.iter()
            .map(|&id| &self.table.routes[id as usize])
            .find(|r| self.rule_matches(r, req, host))
    }

    /// Evaluate every rule against `req` into `d`.
    pub fn evaluate<'r>(
        &'r self,
        req: &RequestView<'_>,
        scratch: &mut Scratch,
        d: &mut Decision<'r>,
    ) {
        d.clear();
        let mut host_buf = [0u8; 256];
        let host = req.host.and_then(|h| matcher::lower_host(h, &mut host_buf));
        let ids = &mut scratch.ids;
        if !self.table.stack.is_empty() {
            self.table
                .stack_index
                .candidates(host, req.path, &self.sets, ids);
            for &id in ids.iter() {
                let rule = &self.table.stack[id as usize];
                if self.rule_matches(rule, req, host) {
                    self.apply(rule, req, None, d);
                }
            }
        }
        if let Some(route) = self.first_route(req, host, ids) {
            if route.uses_captures
                && let Some(matcher::PathMatch::Regex(i)) = route.when.path
            {
                let re = &self.regexes[i];
                let mut locs = re.capture_locations();
                re.captures_read(&mut locs, req.path);
                d.caps = Some(locs);
            }
            let caps = d.caps.take();
            self.apply(route, req, caps.as_ref(), d);
            d.caps = caps;
            d.route = Some(route);
        }
    }

    fn apply<'r>(
        &'r self,
        rule: &'r Rule,
        req: &RequestView<'_>,
        caps: Option<&CaptureLocations>,
        d: &mut Decision<'r>,
    ) {
        if !rule.request_headers.is_empty() {
            d.request.apply(&rule.request_headers, req, caps);
        }
        if !rule.response_headers.is_empty() {
            d.response.apply(&rule.response_headers, req, caps);
        }
        for f in &rule.log {
            if !d.log.contains(&f) {
                d.log.push(f);
            }
        }
    }
}

/// Per-worker scratch space for evaluation, so matching allocates nothing
/// once warm.
#[derive(Default)]
pub struct Scratch {
    ids: Vec<RuleId>,
}
