//! Per-core statistics: what each worker counts, how the control side
//! collects it, and how it is shown.
//!
//! Each worker owns its figures ([`WorkerStats`], and [`Tallies`] per
//! route and backend in its current configuration) in plain `Cell`s and
//! two HDR histograms: no atomics, no sharing, nothing on the request
//! path but increments and one histogram record. The admin thread asks
//! every worker for a [`Report`] over its control socket and collects the
//! answers from a channel (`hub`); a worker that does not answer in time
//! is reported as stuck instead of holding the reply up. Reports merge
//! (counters add, histograms add, percentiles are read from the merged
//! histogram, never averaged) and render as JSON, Prometheus text or a
//! table (`render`).
//!
//! Building with `--no-default-features` compiles the recording out
//! (`feature = "stats"`): counters and histograms stay at zero and no
//! clock is read for them, which is how their cost is measured.
//!
//! Owns: the figures, their collection and their formats. Does not own:
//! where requests are counted (`proxy`, `worker`) or the admin socket
//! (`admin`).

pub mod hub;
pub mod render;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::admission::{Reason, Rejections};
use crate::config::Snapshot;
use crate::config::carry::Carry;

/// Latencies are recorded in microseconds from 1 us to an hour, to three
/// significant figures (0.1%).
const HIST_MAX_US: u64 = 3_600_000_000;
const HIST_SIGFIG: u8 = 3;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG).expect("valid histogram bounds")
}

/// When a request (or an upstream exchange) started, for its latency; a
/// zero-sized nothing when statistics are compiled out, so no clock is
/// read for them.
#[cfg(feature = "stats")]
#[derive(Clone, Copy)]
pub struct Stamp(Instant);

#[cfg(not(feature = "stats"))]
#[derive(Clone, Copy)]
pub struct Stamp;

impl Stamp {
    #[inline]
    pub fn now() -> Stamp {
        #[cfg(feature = "stats")]
        return Stamp(Instant::now());
        #[cfg(not(feature = "stats"))]
        return Stamp;
    }

    /// The stamp of `at`: an event loop stamps with its turn's time, one
    /// clock read for every event of the turn.
    #[inline]
    pub fn at(at: Instant) -> Stamp {
        #[cfg(feature = "stats")]
        return Stamp(at);
        #[cfg(not(feature = "stats"))]
        {
            let _ = at;
            Stamp
        }
    }

    #[cfg(feature = "stats")]
    fn micros_until(self, end: Stamp) -> u64 {
        end.0.saturating_duration_since(self.0).as_micros() as u64
    }
}

/// A worker's own figures.
pub struct WorkerStats {
    started: Instant,
    /// Responses by status class, 1xx to 5xx.
    classes: [Cell<u64>; 5],
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    accepted: Cell<u64>,
    rule_evaluations: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
    upstream_latency: RefCell<Histogram<u64>>,
    /// Upgraded connections: counted whatever the `stats` feature says,
    /// as open connections are (none is on a request's path).
    pub tunnels: TunnelStats,
    /// TLS handshakes, counted the same way.
    pub tls: TlsStats,
}

/// A worker's TLS handshakes: done, resumed, by version, failed by reason.
#[derive(Default)]
pub struct TlsStats {
    handshakes: Cell<u64>,
    resumed: Cell<u64>,
    tls13: Cell<u64>,
    failures: [Cell<u64>; crate::tls::Failure::ALL.len()],
}

impl TlsStats {
    pub fn handshake(&self, resumed: bool, version: Option<&str>) {
        let bump = |c: &Cell<u64>| c.set(c.get() + 1);
        bump(&self.handshakes);
        if resumed {
            bump(&self.resumed);
        }
        if version == Some("TLSv1.3") {
            bump(&self.tls13);
        }
    }

    pub fn failed(&self, why: crate::tls::Failure) {
        let c = &self.failures[why as usize];
        c.set(c.get() + 1);
    }
}

/// A worker's tunnels (connections switched to another protocol).
#[derive(Default)]
pub struct TunnelStats {
    open: Cell<u64>,
    opened: Cell<u64>,
    /// Bytes relayed from clients to backends, and back.
    bytes_up: Cell<u64>,
    bytes_down: Cell<u64>,
    /// Closed for `tunnel_idle_timeout`.
    idle_closed: Cell<u64>,
}

impl TunnelStats {
    pub fn opened(&self) {
        self.open.set(self.open.get() + 1);
        self.opened.set(self.opened.get() + 1);
    }

    pub fn closed(&self) {
        self.open.set(self.open.get() - 1);
    }

    pub fn idle_closed(&self) {
        self.idle_closed.set(self.idle_closed.get() + 1);
    }

    /// Bytes relayed since the last call: `up` to the backend, `down` to
    /// the client.
    pub fn relayed(&self, up: u64, down: u64) {
        self.bytes_up.set(self.bytes_up.get() + up);
        self.bytes_down.set(self.bytes_down.get() + down);
    }
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            started: Instant::now(),
            classes: Default::default(),
            bytes_in: Cell::new(0),
            bytes_out: Cell::new(0),
            accepted: Cell::new(0),
            rule_evaluations: Cell::new(0),
            latency: RefCell::new(histogram()),
            upstream_latency: RefCell::new(histogram()),
            tunnels: TunnelStats::default(),
            tls: TlsStats::default(),
        }
    }
}

#[cfg(feature = "stats")]
fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

impl WorkerStats {
    /// A request answered with `status`, from `started` to `ended`.
    /// Status 0 (closed without an answer: the client went away, or a drop
    /// rule) is not a response and is not counted.
    #[inline]
    pub fn response(
        &self,
        status: u16,
        started: Stamp,
        ended: Stamp,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        #[cfg(feature = "stats")]
        {
            if !(100..600).contains(&status) {
                return;
            }
            add(&self.classes[status as usize / 100 - 1], 1);
            add(&self.bytes_in, bytes_in);
            add(&self.bytes_out, bytes_out);
            let _ = self
                .latency
                .borrow_mut()
                .record(started.micros_until(ended).clamp(1, HIST_MAX_US));
        }
        #[cfg(not(feature = "stats"))]
        let _ = (status, started, ended, bytes_in, bytes_out);
    }

    /// An upstream exchange that took `elapsed` (connect or reuse to its
    /// response head). Given as a duration: the balancer reads the same
    /// clock for its EWMA, so the proxy reads it once for both.
    #[inline]
    pub fn upstream_latency(&self, elapsed: Duration) {
        #[cfg(feature = "stats")]
        let _ = self
            .upstream_latency
            .borrow_mut()
            .record((elapsed.as_micros() as u64).clamp(1, HIST_MAX_US));
        #[cfg(not(feature = "stats"))]
        let _ = elapsed;
    }

    #[inline]
    pub fn accepted(&self) {
        #[cfg(feature = "stats")]
        add(&self.accepted, 1);
    }

    #[inline]
    pub fn rule_evaluation(&self) {
        #[cfg(feature = "stats")]
        add(&self.rule_evaluations, 1);
    }
}

/// Counts per route and per backend of one configuration. They follow
/// routes by name and backends by group and label across a reload.
#[derive(Default)]
pub struct Tallies {
    routes: Vec<Cell<u64>>,
    /// `[group][backend]`
    backends: Vec<Vec<BackendTally>>,
}

#[derive(Default)]
pub struct BackendTally {
    /// New connections opened.
    pub connects: Cell<u64>,
    /// Pooled connections used.
    pub reuses: Cell<u64>,
    /// Connect failures, resets, timeouts and invalid responses.
    pub failures: Cell<u64>,
}

impl Tallies {
    pub fn new(snapshot: &Snapshot) -> Self {
        Tallies {
            routes: snapshot
                .rules
                .routes()
                .iter()
                .map(|_| Cell::new(0))
                .collect(),
            backends: snapshot
                .upstreams
                .iter()
                .map(|g| g.backends.iter().map(|_| BackendTally::default()).collect())
                .collect(),
        }
    }

    /// Tallies for `new`, carrying the counts of the routes and backends
    /// it keeps (`carry`) from `old`.
    pub fn carry(carry: &Carry, old: &Tallies, new: &Snapshot) -> Self {
        let next = Tallies::new(new);
        for (count, kept) in next.routes.iter().zip(&carry.routes) {
            if let Some(o) = kept {
                count.set(old.routes[*o].get());
            }
        }
        for (g, lists) in next.backends.iter().enumerate() {
            for (b, n) in lists.iter().enumerate() {
                if let Some((og, kept)) = carry.backend(g, b) {
                    let t = &old.backends[og][kept.old];
                    n.connects.set(t.connects.get());
                    n.reuses.set(t.reuses.get());
                    n.failures.set(t.failures.get());
                }
            }
        }
        next
    }

    #[inline]
    pub fn route(&self, index: usize) {
        #[cfg(feature = "stats")]
        add(&self.routes[index], 1);
        #[cfg(not(feature = "stats"))]
        let _ = index;
    }

    #[inline]
    pub fn backend(&self, group: usize, backend: usize) -> &BackendTally {
        &self.backends[group][backend]
    }
}

impl BackendTally {
    #[inline]
    pub fn count(&self, which: fn(&BackendTally) -> &Cell<u64>) {
        #[cfg(feature = "stats")]
        add(which(self), 1);
        #[cfg(not(feature = "stats"))]
        let _ = which;
    }
}

/// Percentiles of one histogram, with its recorded values so that the
/// receiver can merge or subtract histograms.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// `[value_us, count]` for every recorded bucket (on the admin socket;
    /// `coregate stats --json` leaves it out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recorded: Vec<(u64, u64)>,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            min_us: h.min(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            recorded: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    /// The histogram back from its recorded values.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = histogram();
        for &(v, n) in &self.recorded {
            let _ = h.record_n(v.clamp(1, HIST_MAX_US), n);
        }
        h
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackendReport {
    pub connects: u64,
    pub reuses: u64,
    pub failures: u64,
}

/// One worker's figures at one moment (or, merged, the whole process's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Worker id; `None` for a merged total.
    pub worker: Option<usize>,
    pub core: Option<usize>,
    /// `ok`, or `stuck` when the worker did not answer in time (then
    /// every figure is zero).
    pub state: String,
    pub driver: String,
    pub epoch: u64,
    pub uptime_s: f64,
    /// Responses by status class: `1xx` .. `5xx`.
    pub responses: BTreeMap<String, u64>,
    /// Requests per route (by route name).
    pub routes: BTreeMap<String, u64>,
    /// `rejected_total{reason}`.
    pub rejected: BTreeMap<String, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections_open: u64,
    pub connections_accepted: u64,
    /// Requests waiting in the current epoch's fair queues
    /// (`queue_depth`) now.
    #[serde(default)]
    pub requests_queued: u64,
    /// By backend label, `group/label`.
    pub upstreams: BTreeMap<String, BackendReport>,
    pub latency: Latency,
    pub upstream_latency: Latency,
    /// Free buffers in the worker's pool; idle pooled upstream connections.
    pub buffers_free: u64,
    pub upstream_idle: u64,
    pub rule_evaluations: u64,
    /// Heads refused as malformed, too large or with too long a target.
    pub parse_errors: u64,
    /// Tunnels open now, and opened since start.
    #[serde(default)]
    pub tunnels_open: u64,
    #[serde(default)]
    pub tunnels_opened: u64,
    /// Tunnels closed for their idle timeout.
    #[serde(default)]
    pub tunnels_idle_closed: u64,
    /// Tunnel bytes from clients to backends, and from backends to clients.
    #[serde(default)]
    pub tunnel_bytes_up: u64,
    #[serde(default)]
    pub tunnel_bytes_down: u64,
    /// TLS handshakes completed, of them resumed, and by version.
    #[serde(default)]
    pub tls_handshakes: u64,
    #[serde(default)]
    pub tls_resumed: u64,
    #[serde(default)]
    pub tls_versions: BTreeMap<String, u64>,
    /// Failed handshakes by reason (`tls::Failure`).
    #[serde(default)]
    pub tls_failures: BTreeMap<String, u64>,
}

/// What a worker knows that its `WorkerStats` does not hold.
pub struct Context<'a> {
    pub worker: usize,
    pub core: Option<usize>,
    pub driver: &'a str,
    pub epoch: u64,
    pub snapshot: &'a Snapshot,
    pub tallies: &'a Tallies,
    pub rejections: &'a Rejections,
    pub connections_open: u64,
    pub requests_queued: u64,
    pub buffers_free: u64,
    pub upstream_idle: u64,
}

impl WorkerStats {
    pub fn report(&self, c: &Context<'_>) -> Report {
        let responses = self
            .classes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("{}xx", i + 1), n.get()))
            .collect();
        let routes = c
            .snapshot
            .rules
            .routes()
            .iter()
            .zip(&c.tallies.routes)
            .map(|(r, n)| (r.name.clone(), n.get()))
            .collect();
        let rejected = Reason::ALL
            .iter()
            .map(|r| (r.name().to_string(), c.rejections.get(*r)))
            .collect();
        let mut upstreams = BTreeMap::new();
        for (g, lists) in c.snapshot.upstreams.iter().zip(&c.tallies.backends) {
            for (b, t) in g.backends.iter().zip(lists) {
                upstreams.insert(
                    format!("{}/{}", g.name, b.label),
                    BackendReport {
                        connects: t.connects.get(),
                        reuses: t.reuses.get(),
                        failures: t.failures.get(),
                    },
                );
            }
        }
        let parse_errors = [Reason::BadRequest, Reason::HeadTooLarge, Reason::UriTooLong]
            .iter()
            .map(|r| c.rejections.get(*r))
            .sum();
        Report {
            worker: Some(c.worker),
            core: c.core,
            state: "ok".into(),
            driver: c.driver.into(),
            epoch: c.epoch,
            uptime_s: self.started.elapsed().as_secs_f64(),
            responses,
            routes,
            rejected,
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            connections_open: c.connections_open,
            requests_queued: c.requests_queued,
            connections_accepted: self.accepted.get(),
            upstreams,
            latency: Latency::of(&self.latency.borrow()),
            upstream_latency: Latency::of(&self.upstream_latency.borrow()),
            buffers_free: c.buffers_free,
            upstream_idle: c.upstream_idle,
            rule_evaluations: self.rule_evaluations.get(),
            parse_errors,
            tunnels_open: self.tunnels.open.get(),
            tunnels_opened: self.tunnels.opened.get(),
            tunnels_idle_closed: self.tunnels.idle_closed.get(),
            tunnel_bytes_up: self.tunnels.bytes_up.get(),
            tunnel_bytes_down: self.tunnels.bytes_down.get(),
            tls_handshakes: self.tls.handshakes.get(),
            tls_resumed: self.tls.resumed.get(),
            tls_versions: [
                ("TLSv1.3".to_string(), self.tls.tls13.get()),
                (
                    "TLSv1.2".to_string(),
                    self.tls.handshakes.get() - self.tls.tls13.get(),
                ),
            ]
            .into(),
            tls_failures: crate::tls::Failure::ALL
                .iter()
                .map(|f| (f.name().to_string(), self.tls.failures[*f as usize].get()))
                .collect(),
        }
    }
}

impl Report {
    /// Without the histograms' recorded values, for people to read.
    pub fn without_buckets(mut self) -> Report {
        self.latency.recorded.clear();
        self.upstream_latency.recorded.clear();
        self
    }

    /// A worker that did not answer in time.
    pub fn stuck(worker: usize, core: Option<usize>) -> Report {
        Report {
            worker: Some(worker),
            core,
            state: "stuck".into(),
            ..Report::default()
        }
    }

    pub fn requests(&self) -> u64 {
        self.responses.values().sum()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// The process's figures: counters added, histograms merged.
    pub fn merge(reports: &[Report]) -> Report {
        let mut total = Report {
            state: if reports.iter().all(|r| r.state == "ok") {
                "ok".into()
            } else {
                "partial".into()
            },
            ..Report::default()
        };
        let mut latency = histogram();
        let mut upstream = histogram();
        let sum = |into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>| {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        };
        for r in reports {
            if total.driver.is_empty() || total.driver == r.driver {
                total.driver = r.driver.clone();
            } else if !r.driver.is_empty() {
                total.driver = "mixed".into();
            }
            total.epoch = total.epoch.max(r.epoch);
            total.uptime_s = total.uptime_s.max(r.uptime_s);
            sum(&mut total.responses, &r.responses);
            sum(&mut total.routes, &r.routes);
            sum(&mut total.rejected, &r.rejected);
            total.bytes_in += r.bytes_in;
            total.bytes_out += r.bytes_out;
            total.connections_open += r.connections_open;
            total.requests_queued += r.requests_queued;
            total.connections_accepted += r.connections_accepted;
            for (k, b) in &r.upstreams {
                let t = total.upstreams.entry(k.clone()).or_default();
                t.connects += b.connects;
                t.reuses += b.reuses;
                t.failures += b.failures;
            }
            let _ = latency.add(r.latency.histogram());
            let _ = upstream.add(r.upstream_latency.histogram());
            total.buffers_free += r.buffers_free;
            total.upstream_idle += r.upstream_idle;
            total.rule_evaluations += r.rule_evaluations;
            total.parse_errors += r.parse_errors;
            total.tunnels_open += r.tunnels_open;
            total.tunnels_opened += r.tunnels_opened;
            total.tunnels_idle_closed += r.tunnels_idle_closed;
            total.tunnel_bytes_up += r.tunnel_bytes_up;
            total.tunnel_bytes_down += r.tunnel_bytes_down;
            total.tls_handshakes += r.tls_handshakes;
            total.tls_resumed += r.tls_resumed;
            sum(&mut total.tls_versions, &r.tls_versions);
            sum(&mut total.tls_failures, &r.tls_failures);
        }
        total.latency = Latency::of(&latency);
        total.upstream_latency = Latency::of(&upstream);
        total
    }
}

/// Percentile of latencies recorded between two reports of the same
/// worker (for rates and windows in `top`).
pub fn window(earlier: &Latency, later: &Latency) -> Latency {
    let mut h = later.histogram();
    if h.subtract(earlier.histogram()).is_err() {
        // The worker restarted its histogram (a new process): the later
        // one alone is the window.
        h = later.histogram();
    }
    Latency::of(&h)
}

/// How long the admin side waits for every worker's report.
pub const COLLECT_TIMEOUT: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_percentiles_come_from_the_merged_histogram() {
        // Worker 0 saw 99 fast requests, worker 1 one slow one: the merged
        // p99 is fast and the max slow; an average of per-worker p99s
        // (100 us and 1 s) would say neither.
        let mut a = histogram();
        a.record_n(100, 99).unwrap();
        let mut b = histogram();
        b.record(1_000_000).unwrap();
        let ra = Report {
            latency: Latency::of(&a),
            ..Report::default()
        };
        let rb = Report {
            latency: Latency::of(&b),
            ..Report::default()
        };
        let total = Report::merge(&[ra, rb]);
        assert_eq!(total.latency.count, 100);
        assert_eq!(total.latency.p50_us, 100);
        assert_eq!(total.latency.p99_us, 100);
        assert!(total.latency.max_us >= 999_000);
    }

    #[test]
    fn windows_subtract_earlier_from_later() {
        let mut h = histogram();
        h.record_n(50, 10).unwrap();
        let earlier = Latency::of(&h);
        h.record_n(5000, 10).unwrap();
        let later = Latency::of(&h);
        let w = window(&earlier, &later);
        assert_eq!(w.count, 10);
        assert!(w.p50_us >= 4995 && w.p50_us <= 5005, "{}", w.p50_us);
    }
}
