//! The phases of a request that only read it: probes, rules, and what
//! admission will be asked, decided while the head is still in the
//! buffer. Nothing here waits or touches a socket.
//!
//! Owns: the worker's probe answers, turning a rule decision into a
//! [`Plan`], the request's admission asks and body bounds, the target a
//! rewrite sends upstream, and what the access log will need. Does not
//! own: evaluating rules (`rules`), admission's checks (`admission`) or
//! choosing a backend (`balance`, after admission: `Proxy::pick`).

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::access_log;
use crate::admission::decode::{self, Coding};
use crate::admission::{self, Ask, DecodeGuard, PolicyState, Readiness, Reason, Refusal};
use crate::balance::{self, HashKey};
use crate::config::snapshot::strip_port;
use crate::context::{Current, WorkerCtx};
use crate::http::edits::HeaderPlan;
use crate::http::head::{BodyFraming, RequestHead, upgrade_protocols};
use crate::http::view::{RequestView, needs_normalizing, normalize_path};
use crate::rules::{Action, Decision, LogField, PlanEdits, Rewrite, Upgrades};

/// What the request gets, once admitted.
pub enum Plan {
    /// Close without answering (a `drop = "close"` rule).
    Close,
    /// Refuse with a canned response (no route, or a drop rule).
    Refuse(Reason),
    /// A rule's own response: `fields` then the body.
    Fixed {
        status: u16,
        fields: HeaderPlan,
        body: Vec<u8>,
    },
    /// Forward to a backend of `group`. `key`: the request's hash for
    /// `balance = "hash"` (a retry picks with it too); `rewritten`: the
    /// target sent upstream is the one `decide` wrote, not the client's.
    Proxy {
        group: usize,
        key: u64,
        rewritten: bool,
    },
    /// The worker's own liveness or readiness answer.
    Probe { status: u16, body: &'static str },
}

impl Plan {
    /// Work a route does passes admission; probes, 404s and drops cost
    /// less than the checks would.
    pub fn needs_admission(&self) -> bool {
        matches!(self, Plan::Fixed { .. } | Plan::Proxy { .. })
    }
}

/// What a logged request carries to its access log line.
pub struct Logged {
    pub started: Instant,
    pub request: access_log::Request,
    pub fields: Vec<LogField>,
    pub route: Option<String>,
}

/// The request as `decide` reads it.
pub struct Inputs<'a> {
    pub ctx: &'a WorkerCtx,
    pub cur: &'a Current,
    pub listener: usize,
    pub client: IpAddr,
    pub req: &'a RequestHead,
    /// The bytes `req` indexes into.
    pub data: &'a [u8],
    pub draining: bool,
    /// The connection is TLS.
    pub tls: bool,
}

/// Where `decide` writes what outlives the head's bytes; pooled with the
/// exchange, so a request that needs none of it allocates nothing.
#[derive(Default)]
pub struct Edits {
    /// Header edits for the request going upstream.
    pub request: HeaderPlan,
    /// Header edits for the response going to the client.
    pub response: HeaderPlan,
    /// The target sent upstream, when the plan says `rewritten`.
    pub target: Vec<u8>,
}

impl Edits {
    pub fn clear(&mut self) {
        self.request.clear();
        self.response.clear();
        self.target.clear();
    }
}

/// What `decide` made of a parsed request.
pub struct Decided {
    pub plan: Plan,
    /// Admission under the listener's policy, then the route's.
    pub asks: [Option<(Rc<PolicyState>, Ask)>; 2],
    /// The body cap: the route's, or its listener's.
    pub max_len: u64,
    /// The route's decode guard, with the request's content codings.
    pub decode: Option<(DecodeGuard, Vec<Coding>)>,
    /// Refused before admission was asked (an undecodable body coding,
    /// an upgrade with a body).
    pub refused: Option<Refusal>,
    pub logged: Option<Logged>,
    /// The request's upgrade goes on to the backend, and a tunnel it
    /// opens closes after this long without traffic.
    pub tunnel: Option<Duration>,
}

/// `/healthz` (liveness: the worker answers) and `/readyz` (readiness of
/// this worker under its listener's limits), when `path` is one of them.
fn probe(
    cur: &Current,
    listener: &crate::config::Listener,
    path: &[u8],
    draining: bool,
) -> Option<Plan> {
    if listener.health_path.as_deref() == Some(path) {
        return Some(Plan::Probe {
            status: 200,
            body: "ok\n",
        });
    }
    if listener.ready_path.as_deref() == Some(path) {
        let ready = Readiness::of(&cur.admission.states[listener.policy.id], draining);
        return Some(Plan::Probe {
            status: ready.status(),
            body: ready.body(),
        });
    }
    None
}

/// The request's hash for consistent hashing.
fn hash_key(key: &HashKey, view: &RequestView<'_>) -> u64 {
    match key {
        HashKey::Header(name) => match view.header(name) {
            Some(v) => admission::key_hash(v),
            None => admission::ip_hash(view.client),
        },
        HashKey::ClientIp => admission::ip_hash(view.client),
        HashKey::Path => admission::key_hash(view.path),
    }
}

/// The request's content codings, when the decode guard will check them:
/// empty when there are none (or only `identity`); `Err` for a coding the
/// guard cannot decode.
fn content_codings(view: &RequestView<'_>) -> Result<Vec<Coding>, ()> {
    let mut value = Vec::new();
    for h in view.headers {
        if h.name
            .get(view.buf)
            .eq_ignore_ascii_case(b"content-encoding")
        {
            if !value.is_empty() {
                value.extend_from_slice(b", ");
            }
            value.extend_from_slice(h.value.get(view.buf));
        }
    }
    let mut codings = Vec::new();
    if !value.is_empty() {
        decode::parse_codings(&value, &mut codings)?;
        codings.retain(|c| *c != Coding::Identity);
    }
    Ok(codings)
}

/// Probes, then the rules: the request's plan, its admission asks, body
/// bounds and log capture; header edits and a rewritten target go into
/// `edits`.
pub fn decide(inp: &Inputs<'_>, edits: &mut Edits) -> Decided {
    let Inputs {
        ctx,
        cur,
        req,
        data,
        client,
        ..
    } = *inp;
    let mut decision = Decision::default();
    let mut decided = Decided {
        plan: Plan::Close,
        asks: [None, None],
        max_len: u64::MAX,
        decode: None,
        refused: None,
        logged: None,
        tunnel: None,
    };
    let routing_path = req.routing_path(data);
    let (raw_path, query) = match routing_path.iter().position(|&b| b == b'?') {
        Some(i) => (&routing_path[..i], &routing_path[i + 1..]),
        None => (routing_path, &b""[..]),
    };
    let mut normalized = Vec::new();
    let path = if needs_normalizing(raw_path) {
        normalize_path(raw_path, &mut normalized);
        &normalized[..]
    } else {
        raw_path
    };
    let authority = req.routing_host(data);
    let view = RequestView {
        method: req.method_span.get(data),
        host: authority.map(strip_port),
        authority,
        path,
        query,
        buf: data,
        headers: &req.headers,
        client,
        tls: inp.tls,
    };
    let listener = &cur.snapshot.listeners[inp.listener];
    if let Some(probe) = probe(cur, listener, path, inp.draining) {
        decided.plan = probe;
        return decided;
    }
    cur.rules
        .evaluate(&view, &mut ctx.scratch.borrow_mut(), &mut decision);
    ctx.stats.rule_evaluation();
    if let Some(r) = decision.route {
        cur.tallies.route(r.index);
    }
    let route_policy = decision.route.and_then(|r| r.policy.as_deref());
    let content_length = match req.framing {
        BodyFraming::Length(n) => Some(n),
        _ => None,
    };
    let write = req.method.is_write();
    // A route's body cap replaces its listener's.
    let route_cap = route_policy.and_then(|p| p.max_body);
    let listener_state = &cur.admission.states[listener.policy.id];
    let listener_length = if route_cap.is_some() {
        None
    } else {
        content_length
    };
    decided.asks[0] = Some((
        listener_state.clone(),
        listener_state.ask(&view, write, listener_length),
    ));
    if let Some(p) = route_policy {
        let state = &cur.admission.states[p.id];
        decided.asks[1] = Some((state.clone(), state.ask(&view, write, content_length)));
    }
    decided.max_len = route_cap.or(listener.policy.max_body).unwrap_or(u64::MAX);
    if let Some(guard) = route_policy.and_then(|p| p.decode)
        && req.framing != BodyFraming::None
    {
        match content_codings(&view) {
            Ok(codings) if codings.is_empty() => {}
            Ok(codings) => decided.decode = Some((guard, codings)),
            Err(()) => decided.refused = Some(Refusal::of(Reason::UnsupportedEncoding)),
        }
    }
    // Only a logged request reads the clock (latency is its field).
    if !decision.log.is_empty() {
        decided.logged = Some(Logged {
            started: Instant::now(),
            request: access_log::Request::capture(&view, &decision.log),
            fields: decision.log.iter().map(|f| (*f).clone()).collect(),
            route: decision.route.map(|r| r.name.clone()),
        });
    }
    let path_changed = path != raw_path;
    decided.plan = match decision.route.and_then(|r| r.action.as_ref()) {
        None => Plan::Refuse(Reason::NoRoute),
        Some(Action::Drop { close: true }) => Plan::Close,
        Some(Action::Drop { close: false }) => Plan::Refuse(Reason::Dropped),
        Some(Action::Respond {
            status,
            headers,
            body,
        }) => {
            let mut fields = HeaderPlan::default();
            for (name, value) in headers {
                fields.push(name, value, &view, decision.caps.as_ref());
            }
            let mut text = Vec::new();
            body.expand(&mut text, &view, decision.caps.as_ref());
            Plan::Fixed {
                status: *status,
                fields,
                body: text,
            }
        }
        Some(Action::Redirect { status, location }) => {
            let mut fields = HeaderPlan::default();
            fields.push(b"Location", location, &view, decision.caps.as_ref());
            Plan::Fixed {
                status: *status,
                fields,
                body: Vec::new(),
            }
        }
        Some(Action::Proxy { upstream, rewrite }) => {
            let group = *upstream;
            let key = match &cur.snapshot.upstreams[group].balance.method {
                balance::Method::Hash(k) => hash_key(k, &view),
                _ => 0,
            };
            // The target sent upstream: the normalised path, with the
            // route's rewrite, and the query as it came.
            let target = &mut edits.target;
            let rewritten = match rewrite {
                Rewrite::None if !path_changed => false,
                Rewrite::None => {
                    target.extend_from_slice(path);
                    true
                }
                Rewrite::StripPrefix(prefix) => {
                    let rest = path.strip_prefix(&prefix[..]).unwrap_or(path);
                    if rest.first() != Some(&b'/') {
                        target.push(b'/');
                    }
                    target.extend_from_slice(rest);
                    true
                }
                Rewrite::Path(t) => {
                    t.expand(target, &view, decision.caps.as_ref());
                    true
                }
            };
            if rewritten && !query.is_empty() {
                target.push(b'?');
                target.extend_from_slice(query);
            }
            Plan::Proxy {
                group,
                key,
                rewritten,
            }
        }
    };
    // An upgrade the route allows goes on; one it does not is dropped
    // with the other hop-by-hop fields, and the request is served as
    // plain HTTP (nginx's behaviour without its two lines of config).
    if let (Plan::Proxy { .. }, Some(offer), Some(route)) =
        (&decided.plan, req.upgrade, decision.route)
        && allows(&route.upgrades, offer.get(data))
    {
        if req.framing == BodyFraming::None {
            let idle = route.upgrades.idle_timeout;
            decided.tunnel = Some(idle.unwrap_or(listener.tunnel_idle_timeout));
        } else {
            decided
                .refused
                .get_or_insert(Refusal::of(Reason::UpgradeWithBody));
        }
    }
    edits.request = std::mem::take(&mut decision.request);
    edits.response = std::mem::take(&mut decision.response);
    decided
}

/// Whether a route allows every protocol an Upgrade field `offered`.
fn allows(upgrades: &Upgrades, offered: &[u8]) -> bool {
    upgrade_protocols(offered)
        .all(|p| p.is_some_and(|p| upgrades.protocols.iter().any(|a| a.eq_ignore_ascii_case(p))))
}
