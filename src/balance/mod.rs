//! Backend selection and passive health, per worker.
//!
//! Each worker keeps its own view of every upstream group ([`GroupView`]):
//! requests it has in flight to each backend, an EWMA of each backend's
//! latency, consecutive failures, and ejections. No counter is shared
//! between workers: each sees the backends through its own traffic, as
//! Envoy's and Finagle's per-host load balancers do.
//!
//! Methods ([`Method`]), each O(1) per pick whatever the number of
//! backends (the ejected-backend fallback aside):
//! - `p2c` (the default): power of two choices on a score of
//!   (inflight + 1) × EWMA latency: two random backends, the lower score
//!   wins. A slow backend's EWMA and its pile of inflight requests both
//!   push its score up, so it gets few requests without any global view.
//! - `least_inflight`: two random choices on inflight alone.
//! - `round_robin`, and `weighted_round_robin` (nginx's smooth WRR).
//! - `hash`: consistent hashing on a key (a header, the client address or
//!   the path) through a Maglev table (Eisenbud et al., NSDI 2016): when a
//!   backend leaves, only the keys that mapped to it move.
//!
//! Passive health: `max_fails` consecutive failures (connect errors,
//! resets, timeouts, invalid responses; 5xx with `eject_on_5xx`) eject a
//! backend for `eject_time`, doubled at each ejection in a row up to
//! `max_eject_time`; a success ends the streak. When every backend is
//! ejected the group fails open (picks as if none were) or answers 503,
//! as configured.
//!
//! Owns: picking, the per-worker backend view, ejection, the retry
//! budget. Does not own: connections (`net::upstream`) or deciding what
//! counts as a failure (`proxy`).

pub mod maglev;

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// How a group picks a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    P2c,
    LeastInflight,
    RoundRobin,
    WeightedRoundRobin,
    Hash(HashKey),
}

/// What consistent hashing hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value (lowercase name); a request without it
    /// hashes its client address.
    Header(Vec<u8>),
    ClientIp,
    Path,
}

/// A group's balancing settings, compiled from `[upstream.NAME]`.
#[derive(Debug, Clone)]
pub struct Balance {
    pub method: Method,
    /// One per backend (1 when not given).
    pub weights: Vec<u32>,
    /// Consecutive failures that eject a backend; 0 turns ejection off.
    pub max_fails: u32,
    pub eject_time: Duration,
    pub max_eject_time: Duration,
    /// Count 5xx responses as failures.
    pub eject_on_5xx: bool,
    /// With every backend ejected: pick anyway (true) or answer 503.
    pub fail_open: bool,
    /// Retries allowed as a share of requests (Envoy's retry budget).
    pub retry_budget: f64,
    /// Requests (so connections in use) per backend per worker; 0: no cap.
    pub max_conns: u32,
    /// The Maglev table, for `hash`.
    pub table: Option<maglev::Table>,
    /// For `weighted_round_robin`: one period of nginx's smooth WRR order,
    /// computed once, so a pick is one index (see `Balance::schedule`).
    pub schedule: Vec<u32>,
}

/// Longest precomputed WRR period; beyond it picks scan the weights.
const MAX_SCHEDULE: u64 = 1 << 16;

impl Balance {
    /// One period (the sum of the weights) of smooth weighted round robin:
    /// every backend gains its weight, the richest is picked and pays the
    /// total. Empty when the period would pass `MAX_SCHEDULE` entries.
    pub fn schedule(weights: &[u32]) -> Vec<u32> {
        let total: u64 = weights.iter().map(|&w| w as u64).sum();
        if total == 0 || total > MAX_SCHEDULE {
            return Vec::new();
        }
        let mut current = vec![0i64; weights.len()];
        (0..total)
            .map(|_| smooth_step(weights, &mut current, total as i64) as u32)
            .collect()
    }

    fn retry_milli(&self) -> u64 {
        (self.retry_budget * MILLI as f64).round() as u64
    }
}

fn smooth_step(weights: &[u32], current: &mut [i64], total: i64) -> usize {
    let mut best = 0;
    for (i, w) in weights.iter().enumerate() {
        current[i] += *w as i64;
        if current[i] > current[best] {
            best = i;
        }
    }
    current[best] -= total;
    best
}

/// How an exchange with a backend ended, for its health and EWMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived this long after the exchange started.
    Answered(Duration),
    Failed,
}

/// Weight of a new latency sample in the EWMA: about the last 10.
const EWMA_ALPHA: f64 = 0.1;
/// EWMA of a backend with no sample yet: optimistic, so new or
/// recovered backends get tried.
const EWMA_START_US: f64 = 1.0;
/// A backend's latency estimate fades while it gets no requests: halved
/// after this long without a sample, a tenth after nine times it. Without
/// it a backend that was slow once (a cold connection, a hiccup) would
/// never be picked again and never show it recovered; with it, a slow
/// backend is probed now and then (Finagle's peak EWMA decays likewise).
const EWMA_FADE: Duration = Duration::from_millis(250);
/// Retry tokens are counted in thousandths. A worker starts each group
/// with a few retries' worth, so a quiet group can still retry (Envoy's
/// min_retry_concurrency plays this part), and unused budget piles up to
/// at most that floor plus 100 requests' worth.
const MILLI: u64 = 1000;
const RETRY_FLOOR: u64 = 3 * MILLI;

/// One worker's view of one backend.
#[derive(Debug)]
pub struct BackendView {
    inflight: Cell<u32>,
    ewma_us: Cell<f64>,
    fails: Cell<u32>,
    /// Ejections in a row (doubles the next one's length).
    ejections: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    /// When the last sample came in.
    sampled: Cell<Option<Instant>>,
}

impl Default for BackendView {
    fn default() -> Self {
        BackendView {
            inflight: Cell::new(0),
            ewma_us: Cell::new(EWMA_START_US),
            fails: Cell::new(0),
            ejections: Cell::new(0),
            ejected_until: Cell::new(None),
            sampled: Cell::new(None),
        }
    }
}

impl BackendView {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.get().is_some_and(|t| t > now)
    }

    fn score(&self, now: Instant) -> f64 {
        let ewma = match self.sampled.get() {
            Some(t) => {
                let idle = now.saturating_duration_since(t).as_secs_f64();
                self.ewma_us.get() / (1.0 + idle / EWMA_FADE.as_secs_f64())
            }
            None => self.ewma_us.get(),
        };
        (self.inflight.get() as f64 + 1.0) * ewma
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.get()
    }

    pub fn ewma_us(&self) -> f64 {
        self.ewma_us.get()
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected(now)
    }
}

/// What balancing reads of an upstream group: its settings, and its
/// backends' health. The configuration's group implements it
/// (`config::UpstreamGroup`); balancing never sees the config type.
pub trait Group {
    fn balance(&self) -> &Balance;
    fn backend_count(&self) -> usize;
    /// Whether active health checks let backend `i` be picked.
    fn healthy(&self, i: usize) -> bool;
}

/// One worker's view of one group.
#[derive(Debug)]
pub struct GroupView {
    backends: Vec<BackendView>,
    cursor: Cell<usize>,
    /// Smooth WRR current weights.
    wrr: RefCell<Vec<i64>>,
    rng: Cell<u64>,
    /// Retry tokens, in thousandths.
    retry_tokens: Cell<u64>,
}

impl GroupView {
    /// A fresh view; `seed` differs per worker so that workers do not
    /// start on the same backend.
    pub fn new(group: &impl Group, seed: usize) -> Self {
        let n = group.backend_count();
        GroupView {
            backends: (0..n).map(|_| BackendView::default()).collect(),
            cursor: Cell::new(seed % n.max(1)),
            wrr: RefCell::new(vec![0; n]),
            rng: Cell::new(
                0x9E37_79B9_7F4A_7C15 ^ (seed as u64).wrapping_mul(0xA076_1D64_78BD_642F) | 1,
            ),
            // A budget of 0 turns retries off, floor included.
            retry_tokens: Cell::new(if group.balance().retry_budget > 0.0 {
                RETRY_FLOOR
            } else {
                0
            }),
        }
    }

    /// The view for `new`, keeping what this worker learned of the
    /// backends it keeps: `kept[i]` is new backend `i`'s index in the old
    /// view (the reload's one map, `config::carry`). EWMA, ejection and
    /// failure streak carry; inflight counts start at zero: requests in
    /// flight release into the view they started on, so a copied count
    /// would never come down.
    pub fn carry(
        view: &GroupView,
        new: &impl Group,
        kept: impl Fn(usize) -> Option<usize>,
        seed: usize,
    ) -> Self {
        let next = GroupView::new(new, seed);
        for (i, n) in next.backends.iter().enumerate() {
            if let Some(v) = kept(i).map(|o| &view.backends[o]) {
                n.ewma_us.set(v.ewma_us.get());
                n.fails.set(v.fails.get());
                n.ejections.set(v.ejections.get());
                n.ejected_until.set(v.ejected_until.get());
                n.sampled.set(v.sampled.get());
            }
        }
        next
    }

    pub fn backend(&self, i: usize) -> &BackendView {
        &self.backends[i]
    }

    /// xorshift64*: cheap, and good enough to pick two backends.
    fn random(&self, n: usize) -> usize {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as usize % n
    }

    /// Pick a backend for a request with hash `key` (used by `hash`),
    /// avoiding `avoid` (a retry goes elsewhere) when there is a choice.
    /// `None`: every backend is ejected and the group does not fail open.
    pub fn pick(
        &self,
        group: &impl Group,
        key: u64,
        now: Instant,
        avoid: Option<usize>,
    ) -> Option<usize> {
        let b = group.balance();
        let n = self.backends.len();
        // A cap holds even when failing open: it protects the backend.
        let at_cap = |i: usize| b.max_conns > 0 && self.backends[i].inflight.get() >= b.max_conns;
        // Down by active checks, ejected by this worker's own failures,
        // or at its connection cap.
        let out = |i: usize| self.backends[i].ejected(now) || !group.healthy(i) || at_cap(i);
        if n == 1 {
            let ok = !out(0) || (b.fail_open && !at_cap(0));
            return ok.then_some(0);
        }
        let usable = |i: usize| Some(i) != avoid && !out(i);
        let first = match &b.method {
            Method::P2c | Method::LeastInflight => {
                let i = self.random(n);
                let mut j = self.random(n - 1);
                if j >= i {
                    j += 1;
                }
                let better = |x: usize, y: usize| match b.method {
                    Method::P2c => self.backends[x].score(now) <= self.backends[y].score(now),
                    _ => self.backends[x].inflight.get() <= self.backends[y].inflight.get(),
                };
                match (usable(i), usable(j)) {
                    (true, true) if better(i, j) => i,
                    (true, true) => j,
                    (true, false) => i,
                    (false, true) => j,
                    (false, false) => i,
                }
            }
            Method::RoundRobin => {
                let i = self.cursor.get() % n;
                self.cursor.set(i + 1);
                i
            }
            Method::WeightedRoundRobin if !b.schedule.is_empty() => {
                let i = self.cursor.get() % b.schedule.len();
                self.cursor.set(i + 1);
                b.schedule[i] as usize
            }
            Method::WeightedRoundRobin => {
                // A period too long to precompute: the same order, one
                // scan of the weights per pick.
                let total = b.weights.iter().map(|&w| w as i64).sum();
                smooth_step(&b.weights, &mut self.wrr.borrow_mut(), total)
            }
            Method::Hash(_) => match &b.table {
                Some(t) => t.lookup(key),
                None => 0,
            },
        };
        if usable(first) {
            return Some(first);
        }
        // The pick is ejected (or the one to avoid): the next usable one
        // in order. For `hash` that is the next table entry, so the keys
        // of an ejected backend spread instead of all moving to one.
        let next = match &b.table {
            Some(t) if matches!(b.method, Method::Hash(_)) => t.next_usable(key, usable),
            _ => (1..n).map(|k| (first + k) % n).find(|&i| usable(i)),
        };
        match next {
            Some(i) => Some(i),
            // Only `avoid` is usable: a retry may go back to it.
            None if avoid.is_some_and(|a| !out(a)) => avoid,
            None if b.fail_open && !at_cap(first) => Some(first),
            None => None,
        }
    }

    /// A request starts on backend `i`.
    pub fn start(&self, i: usize) {
        let v = &self.backends[i];
        v.inflight.set(v.inflight.get() + 1);
    }

    /// The request on backend `i` is done with it.
    pub fn finish(&self, i: usize) {
        let v = &self.backends[i];
        v.inflight.set(v.inflight.get().saturating_sub(1));
    }

    /// Record how an exchange with backend `i` went.
    pub fn record(&self, b: &Balance, i: usize, outcome: Outcome, now: Instant) {
        let v = &self.backends[i];
        v.sampled.set(Some(now));
        match outcome {
            Outcome::Answered(latency) => {
                let us = latency.as_secs_f64() * 1e6;
                let old = v.ewma_us.get();
                let next = if old <= EWMA_START_US {
                    // A first sample often carries a cold connection's
                    // setup: it starts no worse than its peers' mean, and a
                    // backend truly slower climbs there within ~10 samples.
                    us.min(self.peers_mean(i).unwrap_or(us))
                } else {
                    old + EWMA_ALPHA * (us - old)
                };
                v.ewma_us.set(next.max(EWMA_START_US));
                v.fails.set(0);
                v.ejections.set(0);
            }
            Outcome::Failed => {
                let fails = v.fails.get() + 1;
                v.fails.set(fails);
                // A failing backend also looks slow, so p2c avoids it
                // before it is ejected.
                v.ewma_us.set((v.ewma_us.get() * 2.0).max(1000.0));
                if b.max_fails > 0 && fails >= b.max_fails {
                    let k = v.ejections.get().min(16);
                    let time = b.eject_time.saturating_mul(1 << k).min(b.max_eject_time);
                    v.ejected_until.set(Some(now + time));
                    v.ejections.set(k + 1);
                    v.fails.set(0);
                    crate::debug!("backend {i} ejected for {time:?}");
                }
            }
        }
    }

    /// Mean EWMA of the other backends that have a sample.
    fn peers_mean(&self, i: usize) -> Option<f64> {
        let (sum, n) = self
            .backends
            .iter()
            .enumerate()
            .filter(|(j, v)| *j != i && v.ewma_us.get() > EWMA_START_US)
            .fold((0.0, 0), |(s, n), (_, v)| (s + v.ewma_us.get(), n + 1));
        (n > 0).then(|| sum / n as f64)
    }

    /// Count a request toward the retry budget.
    pub fn request(&self, b: &Balance) {
        let t = self.retry_tokens.get() + b.retry_milli();
        self.retry_tokens
            .set(t.min(RETRY_FLOOR + 100 * b.retry_milli()));
    }

    /// Whether the budget holds a retry (without taking it).
    pub fn has_retry(&self) -> bool {
        self.retry_tokens.get() >= MILLI
    }

    /// Take a retry from the budget, if one is left.
    pub fn take_retry(&self) -> bool {
        let t = self.retry_tokens.get();
        if t >= MILLI {
            self.retry_tokens.set(t - MILLI);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamGroup;

    fn group(n: usize) -> UpstreamGroup {
        let text = format!(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\n[upstream.g]\nbackends = [{}]\n",
            (0..n)
                .map(|i| format!("\"tcp://127.0.0.1:{}\"", 1000 + i))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut s = crate::config::parse(&text, "t").expect("valid");
        s.upstreams.remove(0)
    }

    /// `g` with balancing settings `b`.
    fn gb(g: &UpstreamGroup, b: &Balance) -> UpstreamGroup {
        let text = format!(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\n[upstream.g]\nbackends = [{}]\n",
            g.backends
                .iter()
                .map(|x| format!("\"{}\"", x.label))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut s = crate::config::parse(&text, "t").expect("valid");
        let mut out = s.upstreams.remove(0);
        out.balance = b.clone();
        out
    }

    fn balance(method: Method, n: usize) -> Balance {
        Balance {
            table: matches!(method, Method::Hash(_)).then(|| {
                let labels: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
                maglev::Table::new(&labels)
            }),
            method,
            schedule: Balance::schedule(&vec![1; n]),
            weights: vec![1; n],
            max_fails: 2,
            eject_time: Duration::from_secs(1),
            max_eject_time: Duration::from_secs(8),
            eject_on_5xx: false,
            fail_open: false,
            retry_budget: 0.2,
            max_conns: 0,
        }
    }

    #[test]
    fn p2c_sends_little_to_a_slow_backend() {
        let g = group(3);
        let b = balance(Method::P2c, 3);
        let v = GroupView::new(&g, 0);
        let now = Instant::now();
        let mut counts = [0; 3];
        for _ in 0..10_000 {
            let i = v.pick(&gb(&g, &b), 0, now, None).expect("healthy");
            counts[i] += 1;
            let latency = if i == 2 { 10_000 } else { 1_000 };
            v.record(
                &b,
                i,
                Outcome::Answered(Duration::from_micros(latency)),
                now,
            );
        }
        assert!(counts[2] < 1000, "the 10x slower backend got {counts:?}");
    }

    #[test]
    fn a_cold_first_sample_starts_at_the_peers_mean() {
        let g = group(2);
        let b = balance(Method::P2c, 2);
        let v = GroupView::new(&g, 0);
        let now = Instant::now();
        v.record(&b, 0, Outcome::Answered(Duration::from_micros(100)), now);
        // Backend 1's first answer took 2 ms (a new connection).
        v.record(&b, 1, Outcome::Answered(Duration::from_millis(2)), now);
        assert_eq!(v.backend(1).ewma_us(), 100.0);
    }

    #[test]
    fn a_backend_slow_once_is_tried_again_later() {
        let g = group(2);
        let b = balance(Method::P2c, 2);
        let v = GroupView::new(&g, 0);
        let t0 = Instant::now();
        v.record(&b, 0, Outcome::Answered(Duration::from_millis(20)), t0);
        v.record(&b, 1, Outcome::Answered(Duration::from_millis(1)), t0);
        assert_eq!(v.pick(&gb(&g, &b), 0, t0, None), Some(1));
        // Backend 1 stays busy; 30 s later backend 0's old sample has
        // faded below backend 1's fresh ones.
        let t1 = t0 + Duration::from_secs(30);
        v.record(&b, 1, Outcome::Answered(Duration::from_millis(1)), t1);
        assert_eq!(v.pick(&gb(&g, &b), 0, t1, None), Some(0));
    }

    #[test]
    fn failures_eject_with_growing_backoff_and_success_clears() {
        let g = group(2);
        let b = balance(Method::RoundRobin, 2);
        let v = GroupView::new(&g, 0);
        let t0 = Instant::now();
        v.record(&b, 1, Outcome::Failed, t0);
        assert!(!v.backend(1).is_ejected(t0), "one failure is not enough");
        v.record(&b, 1, Outcome::Failed, t0);
        assert!(v.backend(1).is_ejected(t0));
        for _ in 0..4 {
            assert_eq!(
                v.pick(&gb(&g, &b), 0, t0, None),
                Some(0),
                "ejected: skipped"
            );
        }
        let t1 = t0 + Duration::from_millis(1001);
        assert!(!v.backend(1).is_ejected(t1), "back after 1 s");
        // Failing again right away: ejected for twice as long.
        v.record(&b, 1, Outcome::Failed, t1);
        v.record(&b, 1, Outcome::Failed, t1);
        assert!(v.backend(1).is_ejected(t1 + Duration::from_millis(1900)));
        assert!(!v.backend(1).is_ejected(t1 + Duration::from_millis(2001)));
        v.record(&b, 1, Outcome::Answered(Duration::from_millis(1)), t1);
        assert_eq!(v.backend(1).ejections.get(), 0);
    }

    #[test]
    fn every_backend_ejected_fails_open_or_not() {
        let g = group(2);
        let mut b = balance(Method::P2c, 2);
        let v = GroupView::new(&g, 0);
        let now = Instant::now();
        for i in 0..2 {
            v.record(&b, i, Outcome::Failed, now);
            v.record(&b, i, Outcome::Failed, now);
        }
        assert_eq!(v.pick(&gb(&g, &b), 0, now, None), None);
        b.fail_open = true;
        assert!(v.pick(&gb(&g, &b), 0, now, None).is_some());
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves() {
        let g = group(3);
        let mut b = balance(Method::WeightedRoundRobin, 3);
        b.weights = vec![5, 1, 1];
        b.schedule = Balance::schedule(&b.weights);
        let now = Instant::now();
        let v = GroupView::new(&g, 0);
        let picks: Vec<usize> = (0..14)
            .map(|_| v.pick(&gb(&g, &b), 0, now, None).unwrap())
            .collect();
        // nginx's example, a a b a c a a, period after period.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
        // Without the precomputed period: the same order.
        b.schedule.clear();
        let v = GroupView::new(&g, 0);
        let scanned: Vec<usize> = (0..14)
            .map(|_| v.pick(&gb(&g, &b), 0, now, None).unwrap())
            .collect();
        assert_eq!(scanned, picks);
    }

    #[test]
    fn a_retry_avoids_the_backend_that_failed() {
        let g = group(3);
        let b = balance(Method::RoundRobin, 3);
        let v = GroupView::new(&g, 0);
        let now = Instant::now();
        for _ in 0..10 {
            assert_ne!(v.pick(&gb(&g, &b), 0, now, Some(1)), Some(1));
        }
    }

    #[test]
    fn a_backend_at_its_connection_cap_is_skipped() {
        let g = group(2);
        let mut b = balance(Method::RoundRobin, 2);
        b.max_conns = 1;
        let g = gb(&g, &b);
        let v = GroupView::new(&g, 0);
        let now = Instant::now();
        v.start(0);
        for _ in 0..4 {
            assert_eq!(v.pick(&g, 0, now, None), Some(1));
        }
        v.start(1);
        assert_eq!(v.pick(&g, 0, now, None), None, "both at their cap");
        v.finish(0);
        assert_eq!(v.pick(&g, 0, now, None), Some(0));
    }

    #[test]
    fn retry_budget_is_a_share_of_requests() {
        let g = group(2);
        let b = balance(Method::P2c, 2);
        let v = GroupView::new(&g, 0);
        // The floor: a few retries even without traffic.
        let floor = (0..10).filter(|_| v.take_retry()).count();
        assert_eq!(floor, 3);
        for _ in 0..100 {
            v.request(&b);
        }
        let earned = (0..100).filter(|_| v.take_retry()).count();
        assert_eq!(earned, 20, "20% of 100 requests");
    }
}
