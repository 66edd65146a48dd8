//! Admission control: deciding, before any upstream work, whether a request
//! may go on, and shedding it cheaply with the right status when it may not.
//!
//! A listener has a policy (`[listener.limits]`) that every request on it
//! passes; a route may add its own (`[route.limits]`), checked after. In
//! each policy, in order: the body cap (413), the principal's token bucket
//! (429 with Retry-After), then the inflight cap: writes are shed first
//! (503), reads take a slot, or queue per tenant when the policy has queues
//! (503 when the tenant's queue is full or the wait passes its deadline;
//! `fair` serves the queues and keeps a reserve for quiet tenants).
//!
//! Shared-nothing: each worker keeps its own buckets, counts and queues
//! ([`Admission`]), and enforces `1/workers` of each configured rate.
//! Summed over workers that is the configured rate when connections spread
//! evenly over workers (SO_REUSEPORT hashes them); a principal whose every
//! connection lands on one worker gets only that worker's share. The
//! alternative, one shared counter, puts an atomic on every request's path
//! and makes cores contend for one cache line: the trade-off nginx's
//! shared-memory limit_req pays and this design does not.
//!
//! Owns: the compiled limits ([`Policy`]), per-worker admission state,
//! rejection reasons and their counters, readiness. Does not own: where
//! requests come from or how refusals are written (`proxy`).

pub mod bucket;
pub mod decode;
pub mod fair;
pub mod fleet;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bucket::Buckets;
pub use fair::Ticket;
use fair::{Full, Gate};

use crate::http::view::RequestView;

/// Where a request's principal (rate limits) or tenant (fair queuing)
/// comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    ClientIp,
    /// A request header's value, e.g. an API key; a request without it
    /// falls back to its client address.
    Header(Vec<u8>),
    /// The tenant key of the same policy (principal only).
    Tenant,
    /// Everyone together: one bucket or one queue.
    All,
}

/// A rate limit as configured: the whole process's rate per principal,
/// or the whole fleet's (`scope = "fleet"`).
#[derive(Debug, Clone)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
    pub principal: Key,
    pub scope: Scope,
}

/// Who a rate limit's rate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This process: each worker gets its share.
    Local,
    /// Every instance of the fleet together, shared through Redis
    /// (`crate::fleet`).
    Fleet,
}

/// Queueing when the inflight cap is reached.
#[derive(Debug, Clone)]
pub struct Queue {
    pub tenant: Key,
    /// Waiters per tenant, per worker.
    pub depth: usize,
    pub timeout: Duration,
    /// DRR weight by tenant key value; others weigh 1.
    pub weights: HashMap<Vec<u8>, u32>,
}

/// Limits on decoded request bodies (`decode_guard`).
#[derive(Debug, Clone, Copy)]
pub struct DecodeGuard {
    pub ratio: u64,
    pub max: u64,
}

/// The compiled `limits` table of a listener or a route.
#[derive(Debug)]
pub struct Policy {
    /// Index into the worker's state table; unique within a snapshot.
    pub id: usize,
    /// Largest request body; a route's replaces its listener's.
    pub max_body: Option<u64>,
    pub rate: Option<Rate>,
    /// Requests in flight per worker.
    pub max_inflight: Option<usize>,
    /// Writes are shed once this many requests are in flight (per worker).
    pub write_limit: usize,
    /// Slots of `max_inflight` that tenants with a backlog cannot take
    /// (`fair::Gate`); 0 without queues.
    pub quiet_reserve: usize,
    pub queue: Option<Queue>,
    /// Routes only; off by default.
    pub decode: Option<DecodeGuard>,
}

/// Default body cap of a listener (nginx's client_max_body_size).
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
/// Share of `max_inflight` beyond which writes are shed.
pub const DEFAULT_SHED_WRITES_AT: f64 = 0.8;

impl Policy {
    /// A policy that limits nothing but the body (a listener without a
    /// `limits` table still caps bodies at 1 MiB).
    pub fn body_only(id: usize, max_body: Option<u64>) -> Policy {
        Policy {
            id,
            max_body,
            rate: None,
            max_inflight: None,
            write_limit: usize::MAX,
            quiet_reserve: 0,
            queue: None,
            decode: None,
        }
    }

    pub fn limits_requests(&self) -> bool {
        self.rate.is_some() || self.max_inflight.is_some()
    }
}

/// Whose doing a refusal is: the client's request, the upstream side, or
/// this worker's own limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Internal,
}

/// What becomes of the downstream connection after a refusal's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Closed: the stream's state is unknown (a framing error, a timeout
    /// mid-head or mid-body), or the connection was never served.
    Close,
    /// Kept alive when the request's body was read to its end (or it had
    /// none) and the client asked for keep-alive; closed otherwise, since
    /// the unread body would be taken for the next request.
    KeepIfBodyRead,
}

macro_rules! reasons {
    ($($variant:ident => $name:literal, $status:literal, $side:ident, $after:ident;)*) => {
        /// Why a request or connection was refused: the `reason` label of
        /// `rejected_total`, and through [`Reason::status`],
        /// [`Reason::side`] and [`Reason::after`] the one table every
        /// refusal is answered by.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason { $($variant,)* }

        impl Reason {
            pub const ALL: &[Reason] = &[$(Reason::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }

            /// The status a refusal for this reason is answered with.
            pub fn status(self) -> u16 {
                match self { $(Reason::$variant => $status,)* }
            }

            pub fn side(self) -> Side {
                match self { $(Reason::$variant => Side::$side,)* }
            }

            pub fn after(self) -> After {
                match self { $(Reason::$variant => After::$after,)* }
            }
        }
    };
}

// The refusal table (docs/design.md, "Errors and status codes"):
// reason => metric label, status, side, what becomes of the connection.
reasons! {
    BadRequest => "bad_request", 400, Downstream, Close;
    HeadTooLarge => "head_too_large", 431, Downstream, Close;
    UriTooLong => "uri_too_long", 414, Downstream, Close;
    HeaderTimeout => "header_timeout", 408, Downstream, Close;
    BodyTimeout => "body_timeout", 408, Downstream, Close;
    RequestTimeout => "request_timeout", 408, Downstream, Close;
    BodyTooLarge => "body_too_large", 413, Downstream, KeepIfBodyRead;
    DecodedTooLarge => "decoded_too_large", 413, Downstream, KeepIfBodyRead;
    BadEncoding => "bad_encoding", 400, Downstream, KeepIfBodyRead;
    UnsupportedEncoding => "unsupported_encoding", 415, Downstream, KeepIfBodyRead;
    RateLimited => "rate_limited", 429, Downstream, KeepIfBodyRead;
    Inflight => "inflight", 503, Internal, KeepIfBodyRead;
    WritesShed => "writes_shed", 503, Internal, KeepIfBodyRead;
    QueueFull => "queue_full", 503, Internal, KeepIfBodyRead;
    QueueTimeout => "queue_timeout", 503, Internal, KeepIfBodyRead;
    NoRoute => "no_route", 404, Downstream, KeepIfBodyRead;
    Dropped => "dropped", 403, Downstream, KeepIfBodyRead;
    NoBackend => "no_backend", 503, Upstream, KeepIfBodyRead;
    // An upgrade request may not carry a body (what follows the head
    // would be both the body and the new protocol's first bytes).
    UpgradeWithBody => "upgrade_with_body", 400, Downstream, Close;
    TunnelLimit => "tunnel_limit", 503, Internal, KeepIfBodyRead;
    // Closed at accept, before a byte is read: the status is never sent.
    ConnectionLimit => "connection_limit", 503, Internal, Close;
}

/// Per-worker `rejected_total{reason}`.
#[derive(Debug, Default)]
pub struct Rejections([Cell<u64>; Reason::ALL.len()]);

impl Rejections {
    pub fn count(&self, reason: Reason) {
        let c = &self.0[reason as usize];
        c.set(c.get() + 1);
    }

    pub fn get(&self, reason: Reason) -> u64 {
        self.0[reason as usize].get()
    }

    /// `reason=count` for each non-zero reason, for the drain log line.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = Reason::ALL
            .iter()
            .filter(|r| self.get(**r) > 0)
            .map(|r| format!("{}={}", r.name(), self.get(*r)))
            .collect();
        parts.join(" ")
    }
}

/// A refusal: why, and Retry-After when known; the status and what becomes
/// of the connection come from the reason's row in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub retry_after: Option<u32>,
    pub reason: Reason,
}

impl Refusal {
    pub fn of(reason: Reason) -> Self {
        Refusal {
            retry_after: None,
            reason,
        }
    }

    fn retry(reason: Reason, seconds: u32) -> Self {
        Refusal {
            retry_after: Some(seconds),
            reason,
        }
    }

    pub fn status(&self) -> u16 {
        self.reason.status()
    }
}

/// What admission needs to know of one request, read while its head is
/// still in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub principal: u64,
    pub tenant: u64,
    pub weight: u32,
    pub write: bool,
    pub content_length: Option<u64>,
}

/// `hash(value)`, for principal and tenant keys (and the balancer's hash
/// keys). Stable across processes, builds and hosts: a fleet limit's
/// Redis key and a consistent-hash pick are the same on every instance.
pub fn key_hash(value: &[u8]) -> u64 {
    fnv1a64(value)
}

/// [`key_hash`] of a client address: its family and octets.
pub fn ip_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            fnv1a64(&[4, o[0], o[1], o[2], o[3]])
        }
        IpAddr::V6(v6) => {
            let mut bytes = [6u8; 17];
            bytes[1..].copy_from_slice(&v6.octets());
            fnv1a64(&bytes)
        }
    }
}

/// FNV-1a, 64 bits: a stable hash (not a keyed one: maps of these values
/// hash them again with their own random keys).
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// One policy's state on one worker.
#[derive(Debug)]
pub struct PolicyState {
    pub policy: Arc<Policy>,
    buckets: Option<RefCell<Buckets>>,
    /// A fleet-scoped rate's shares and its local share (`None` for a
    /// local rate, or when the config has no `[fleet]`: then it counts as
    /// a local one).
    fleet: Option<(Rc<fleet::View>, f64)>,
    pub gate: Option<Rc<Gate>>,
}

/// A slot held under a policy's inflight cap, released on drop.
#[derive(Debug)]
pub struct Slot(Rc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The outcome of the immediate checks.
pub enum Admit {
    Go(Option<Slot>),
    /// Queued: poll the ticket ([`Ticket::poll_granted`]) until its queue
    /// timeout ([`PolicyState::queue_timeout`]), then [`PolicyState::claim`]
    /// the slot.
    Wait(Ticket),
    Refuse(Refusal),
}

impl PolicyState {
    pub fn new(policy: Arc<Policy>, workers: usize, fleet: Option<&Rc<fleet::View>>) -> Self {
        let fleet = match (&policy.rate, fleet) {
            (Some(r), Some(view)) if r.scope == Scope::Fleet => Some((
                view.clone(),
                r.per_second / view.instances as f64 / workers.max(1) as f64,
            )),
            _ => None,
        };
        let workers = workers.max(1) as f64;
        let buckets = policy.rate.as_ref().map(|r| {
            RefCell::new(Buckets::new(
                r.per_second / workers,
                (r.burst / workers).max(1.0),
            ))
        });
        let gate = policy
            .max_inflight
            .map(|m| Rc::new(Gate::new(m, policy.quiet_reserve)));
        PolicyState {
            policy,
            buckets,
            fleet,
            gate,
        }
    }

    /// What this policy needs to know of a request: its principal and
    /// tenant by the policy's key sources, and whether it is a write.
    /// `content_length` is left out when a route's body cap replaces this
    /// (listener) policy's.
    pub fn ask(&self, view: &RequestView<'_>, write: bool, content_length: Option<u64>) -> Ask {
        let key = |k: &Key| -> u64 {
            match k {
                Key::ClientIp | Key::Tenant => ip_hash(view.client),
                Key::Header(name) => view
                    .header(name)
                    .map_or_else(|| ip_hash(view.client), key_hash),
                Key::All => 0,
            }
        };
        let (tenant, weight) = match &self.policy.queue {
            Some(q) => {
                let weight = match &q.tenant {
                    Key::Header(name) if !q.weights.is_empty() => view
                        .header(name)
                        .and_then(|v| q.weights.get(v).copied())
                        .unwrap_or(1),
                    _ => 1,
                };
                (key(&q.tenant), weight)
            }
            None => (0, 1),
        };
        let principal = match &self.policy.rate {
            Some(Rate {
                principal: Key::Tenant,
                ..
            }) => tenant,
            Some(r) => key(&r.principal),
            None => 0,
        };
        Ask {
            principal,
            tenant,
            weight,
            write,
            content_length,
        }
    }

    /// Body cap, token bucket and inflight cap, without waiting.
    pub fn admit(&self, ask: &Ask) -> Admit {
        if let (Some(max), Some(len)) = (self.policy.max_body, ask.content_length)
            && len > max
        {
            return Admit::Refuse(Refusal::of(Reason::BodyTooLarge));
        }
        if let Some(buckets) = &self.buckets
            && let Err(seconds) = self.take_token(&mut buckets.borrow_mut(), ask.principal)
        {
            return Admit::Refuse(Refusal::retry(Reason::RateLimited, seconds));
        }
        let Some(gate) = &self.gate else {
            return Admit::Go(None);
        };
        if ask.write && gate.inflight() >= self.policy.write_limit {
            return Admit::Refuse(Refusal::retry(Reason::WritesShed, 1));
        }
        if gate.try_take(ask.tenant) {
            return Admit::Go(Some(Slot(gate.clone())));
        }
        let Some(q) = &self.policy.queue else {
            return Admit::Refuse(Refusal::retry(Reason::Inflight, 1));
        };
        match gate.enqueue(ask.tenant, ask.weight, q.depth) {
            Ok(ticket) => Admit::Wait(ticket),
            Err(Full::QueueFull) => Admit::Refuse(Refusal::retry(Reason::QueueFull, 1)),
            Err(Full::Inflight) => Admit::Refuse(Refusal::retry(Reason::Inflight, 1)),
        }
    }

    /// A token of the rate limit: at this worker's share of the process's
    /// rate, or of the fleet's as the fleet thread last said (the burst in
    /// the same proportion).
    fn take_token(&self, buckets: &mut Buckets, principal: u64) -> Result<(), u32> {
        let (Some((view, local_share)), Some(rate)) = (&self.fleet, &self.policy.rate) else {
            return buckets.take(principal, Instant::now());
        };
        match view.offer((self.policy.id, principal), *local_share) {
            None => Ok(()),
            Some(share) => {
                let burst = (rate.burst * share / rate.per_second).max(1.0);
                // A tiny share (little demand here, much elsewhere) is
                // recomputed every sync: Retry-After never says more than
                // a token takes at the local share.
                let longest = (1.0 / local_share).ceil().clamp(1.0, u32::MAX as f64) as u32;
                buckets
                    .take_at(
                        principal,
                        Instant::now(),
                        share.max(f64::MIN_POSITIVE),
                        burst,
                    )
                    .map_err(|wait| wait.min(longest))
            }
        }
    }

    /// The slot a granted `ticket` holds.
    pub fn claim(&self, ticket: Ticket) -> Slot {
        let gate = self
            .gate
            .as_ref()
            .expect("only a policy with a gate hands out tickets");
        ticket.take();
        Slot(gate.clone())
    }

    /// How long a request may wait in this policy's queue.
    pub fn queue_timeout(&self) -> Duration {
        self.policy
            .queue
            .as_ref()
            .map_or(Duration::ZERO, |q| q.timeout)
    }
}

/// A worker's admission state: one entry per policy of the snapshot it
/// runs, rebuilt when it switches to a new snapshot (a reload starts
/// buckets full and counts anew; requests in flight release into the
/// state they took their slot from).
#[derive(Debug, Default)]
pub struct Admission {
    pub states: Vec<Rc<PolicyState>>,
}

impl Admission {
    /// `fleet`: the worker's view of its fleet board, when the config
    /// has a `[fleet]`.
    pub fn new(policies: &[Arc<Policy>], workers: usize, fleet: Option<&Rc<fleet::View>>) -> Self {
        Admission {
            states: policies
                .iter()
                .map(|p| Rc::new(PolicyState::new(p.clone(), workers, fleet)))
                .collect(),
        }
    }

    /// Requests waiting in this epoch's fair queues now.
    pub fn queued(&self) -> u64 {
        self.states
            .iter()
            .filter_map(|s| s.gate.as_ref())
            .map(|g| g.queued() as u64)
            .sum()
    }
}

/// What `/readyz` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Past the write threshold: writes are shed, reads still admitted.
    NotReadyForWrites,
    Overloaded,
    Draining,
}

impl Readiness {
    pub fn of(listener: &PolicyState, draining: bool) -> Readiness {
        if draining {
            return Readiness::Draining;
        }
        match &listener.gate {
            Some(g) if g.inflight() >= g.max() => Readiness::Overloaded,
            Some(g) if g.inflight() >= listener.policy.write_limit => Readiness::NotReadyForWrites,
            _ => Readiness::Ready,
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Readiness::Ready => 200,
            _ => 503,
        }
    }

    pub fn body(self) -> &'static str {
        match self {
            Readiness::Ready => "ready\n",
            Readiness::NotReadyForWrites => {
                "not ready for writes: shedding writes, reads admitted\n"
            }
            Readiness::Overloaded => "not ready: overloaded\n",
            Readiness::Draining => "not ready: draining\n",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_inflight: usize, write_limit: usize, queue: Option<Queue>) -> Arc<Policy> {
        Arc::new(Policy {
            max_inflight: Some(max_inflight),
            write_limit,
            queue,
            ..Policy::body_only(0, Some(100))
        })
    }

    fn ask(write: bool) -> Ask {
        Ask {
            principal: 1,
            tenant: 1,
            weight: 1,
            write,
            content_length: None,
        }
    }

    #[test]
    fn principal_hashes_are_the_same_in_every_build() {
        // FNV-1a 64 test vectors: a fleet's instances and Redis keys rely
        // on these never changing.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(key_hash(b"foobar"), 0x85944171f73967e8);
        assert_ne!(
            ip_hash("10.0.0.1".parse().unwrap()),
            ip_hash("::ffff:10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn the_refusal_table_has_one_label_and_an_error_status_per_reason() {
        let mut labels: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Reason::ALL.len(), "labels are unique");
        for r in Reason::ALL {
            assert!((400..600).contains(&r.status()), "{r:?}");
            // What fails mid-head or mid-body leaves the stream unknown.
            if matches!(
                r,
                Reason::BadRequest | Reason::HeaderTimeout | Reason::BodyTimeout
            ) {
                assert_eq!(r.after(), After::Close, "{r:?}");
            }
        }
    }

    #[test]
    fn body_cap_goes_first() {
        let s = PolicyState::new(policy(1, 1, None), 1, None);
        let big = Ask {
            content_length: Some(101),
            ..ask(true)
        };
        let Admit::Refuse(r) = s.admit(&big) else {
            panic!("the body cap refuses first");
        };
        assert_eq!((r.status(), r.reason), (413, Reason::BodyTooLarge));
        let fits = Ask {
            content_length: Some(100),
            ..ask(false)
        };
        assert!(matches!(s.admit(&fits), Admit::Go(Some(_))));
    }

    #[test]
    fn writes_are_shed_before_reads() {
        let s = PolicyState::new(policy(4, 2, None), 1, None);
        let a = s.admit(&ask(true));
        let b = s.admit(&ask(false));
        assert!(matches!((&a, &b), (Admit::Go(Some(_)), Admit::Go(Some(_)))));
        assert_eq!(Readiness::of(&s, false), Readiness::NotReadyForWrites);
        match s.admit(&ask(true)) {
            Admit::Refuse(r) => assert_eq!((r.status(), r.reason), (503, Reason::WritesShed)),
            _ => panic!("a write at the write limit is shed"),
        }
        let c = s.admit(&ask(false));
        let d = s.admit(&ask(false));
        assert!(matches!((&c, &d), (Admit::Go(Some(_)), Admit::Go(Some(_)))));
        assert_eq!(Readiness::of(&s, false), Readiness::Overloaded);
        match s.admit(&ask(false)) {
            Admit::Refuse(r) => assert_eq!((r.status(), r.reason), (503, Reason::Inflight)),
            _ => panic!("a read beyond the cap is refused"),
        }
        drop((a, b, c, d));
        assert_eq!(Readiness::of(&s, false), Readiness::Ready);
        assert_eq!(Readiness::of(&s, true), Readiness::Draining);
    }

    #[test]
    fn each_worker_enforces_its_share_of_the_rate() {
        let p = Arc::new(Policy {
            rate: Some(Rate {
                per_second: 10.0,
                burst: 10.0,
                principal: Key::ClientIp,
                scope: Scope::Local,
            }),
            ..Policy::body_only(0, None)
        });
        let admitted = |workers| {
            let s = PolicyState::new(p.clone(), workers, None);
            (0..20)
                .filter(|_| matches!(s.admit(&ask(false)), Admit::Go(_)))
                .count()
        };
        assert_eq!(admitted(1), 10);
        assert_eq!(admitted(2), 5);
    }

    #[test]
    fn a_queued_request_gets_the_freed_slot_and_a_given_up_place_is_not_counted() {
        let q = Queue {
            tenant: Key::All,
            depth: 1,
            timeout: Duration::from_millis(20),
            weights: HashMap::new(),
        };
        let s = PolicyState::new(policy(1, 1, Some(q)), 1, None);
        assert_eq!(s.queue_timeout(), Duration::from_millis(20));
        let held = s.admit(&ask(false));
        let Admit::Wait(ticket) = s.admit(&ask(false)) else {
            panic!("queued behind the held slot");
        };
        assert!(matches!(
            s.admit(&ask(false)),
            Admit::Refuse(Refusal {
                reason: Reason::QueueFull,
                ..
            })
        ));
        // Its deadline passed: the place is given up (the proxy answers
        // 503 queue_timeout).
        drop(ticket);
        let Admit::Wait(ticket) = s.admit(&ask(false)) else {
            panic!("the given-up place is free again");
        };
        drop(held);
        assert!(ticket.is_granted(), "the freed slot goes to the waiter");
        let slot = s.claim(ticket);
        assert_eq!(
            s.gate.as_ref().map(|g| (g.inflight(), g.queued())),
            Some((1, 0))
        );
        drop(slot);
        assert_eq!(
            s.gate.as_ref().map(|g| (g.inflight(), g.queued())),
            Some((0, 0))
        );
    }
}
