//! Reports as people and programs read them: Prometheus text, and the
//! tables of `coregate stats` and `coregate top`.
//!
//! Owns: formats. Does not own: collecting (`hub`) or the figures.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Latency, Report, window};

/// Upper bounds (seconds) of the Prometheus latency buckets.
const BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A label value escaped for the text exposition format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition (version 0.0.4) of every worker's figures,
/// labelled `worker`; sum over it for the process. A stuck worker shows
/// as `coregate_worker_up 0` with no other series.
pub fn prometheus(reports: &[Report]) -> String {
    let mut out = String::new();
    let ok: Vec<&Report> = reports.iter().filter(|r| r.state == "ok").collect();
    let id = |r: &Report| r.worker.map(|w| w.to_string()).unwrap_or_default();

    let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
    };

    family(
        "coregate_worker_up",
        "gauge",
        "1 if the worker answered the stats request in time.",
        reports
            .iter()
            .map(|r| {
                format!(
                    "coregate_worker_up{{worker=\"{}\"}} {}",
                    id(r),
                    u8::from(r.state == "ok")
                )
            })
            .collect(),
    );
    family(
        "coregate_worker_info",
        "gauge",
        "The worker's core, event loop driver and config epoch (value 1).",
        ok.iter()
            .map(|r| {
                format!(
                    "coregate_worker_info{{worker=\"{}\",core=\"{}\",driver=\"{}\",epoch=\"{}\"}} 1",
                    id(r),
                    r.core.map(|c| c.to_string()).unwrap_or_default(),
                    label(&r.driver),
                    r.epoch
                )
            })
            .collect(),
    );
    let counter_map =
        |name: &str, key: &str, pick: fn(&Report) -> &std::collections::BTreeMap<String, u64>| {
            ok.iter()
                .flat_map(|r| {
                    pick(r).iter().map(move |(k, v)| {
                        format!("{name}{{worker=\"{}\",{key}=\"{}\"}} {v}", id(r), label(k))
                    })
                })
                .collect::<Vec<_>>()
        };
    family(
        "coregate_responses_total",
        "counter",
        "Responses by status class.",
        counter_map("coregate_responses_total", "class", |r| &r.responses),
    );
    family(
        "coregate_route_requests_total",
        "counter",
        "Requests by the route they matched.",
        counter_map("coregate_route_requests_total", "route", |r| &r.routes),
    );
    family(
        "coregate_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed, by reason.",
        counter_map("coregate_tls_handshake_failures_total", "reason", |r| {
            &r.tls_failures
        }),
    );
    family(
        "coregate_tls_versions_total",
        "counter",
        "TLS handshakes completed, by protocol version.",
        counter_map("coregate_tls_versions_total", "version", |r| {
            &r.tls_versions
        }),
    );
    family(
        "coregate_rejected_total",
        "counter",
        "Requests and connections refused, by reason.",
        counter_map("coregate_rejected_total", "reason", |r| &r.rejected),
    );
    let scalar = |name: &str, pick: fn(&Report) -> u64| {
        ok.iter()
            .map(|r| format!("{name}{{worker=\"{}\"}} {}", id(r), pick(r)))
            .collect::<Vec<_>>()
    };
    for (name, kind, help, pick) in [
        (
            "coregate_received_bytes_total",
            "counter",
            "Request bytes received (heads and bodies).",
            (|r: &Report| r.bytes_in) as fn(&Report) -> u64,
        ),
        (
            "coregate_sent_bytes_total",
            "counter",
            "Response bytes sent.",
            |r| r.bytes_out,
        ),
        (
            "coregate_connections_open",
            "gauge",
            "Client connections open now.",
            |r| r.connections_open,
        ),
        (
            "coregate_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            |r| r.connections_accepted,
        ),
        (
            "coregate_requests_queued",
            "gauge",
            "Requests waiting in fair queues now.",
            |r| r.requests_queued,
        ),
        (
            "coregate_buffers_free",
            "gauge",
            "Free buffers in the worker's pool.",
            |r| r.buffers_free,
        ),
        (
            "coregate_upstream_idle_connections",
            "gauge",
            "Idle pooled upstream connections.",
            |r| r.upstream_idle,
        ),
        (
            "coregate_rule_evaluations_total",
            "counter",
            "Requests evaluated against the rules.",
            |r| r.rule_evaluations,
        ),
        (
            "coregate_parse_errors_total",
            "counter",
            "Request heads refused as malformed or too large.",
            |r| r.parse_errors,
        ),
        (
            "coregate_tls_handshakes_total",
            "counter",
            "TLS handshakes completed.",
            |r| r.tls_handshakes,
        ),
        (
            "coregate_tls_resumed_total",
            "counter",
            "TLS handshakes that resumed a session (ticket or cache).",
            |r| r.tls_resumed,
        ),
        (
            "coregate_tunnels_open",
            "gauge",
            "Tunnels (upgraded connections, e.g. WebSocket) open now.",
            |r| r.tunnels_open,
        ),
        (
            "coregate_tunnels_opened_total",
            "counter",
            "Tunnels opened (a backend answered 101 Switching Protocols).",
            |r| r.tunnels_opened,
        ),
        (
            "coregate_tunnels_idle_closed_total",
            "counter",
            "Tunnels closed after tunnel_idle_timeout without traffic.",
            |r| r.tunnels_idle_closed,
        ),
        (
            "coregate_tunnel_upstream_bytes_total",
            "counter",
            "Tunnel bytes relayed from clients to backends.",
            |r| r.tunnel_bytes_up,
        ),
        (
            "coregate_tunnel_downstream_bytes_total",
            "counter",
            "Tunnel bytes relayed from backends to clients.",
            |r| r.tunnel_bytes_down,
        ),
    ] {
        family(name, kind, help, scalar(name, pick));
    }
    for (name, help, pick) in [
        (
            "coregate_upstream_connects_total",
            "New upstream connections.",
            (|b: &super::BackendReport| b.connects) as fn(&super::BackendReport) -> u64,
        ),
        (
            "coregate_upstream_reuses_total",
            "Pooled upstream connections used.",
            |b| b.reuses,
        ),
        (
            "coregate_upstream_failures_total",
            "Upstream connect failures, resets, timeouts, bad responses.",
            |b| b.failures,
        ),
    ] {
        let lines = ok
            .iter()
            .flat_map(|r| {
                r.upstreams.iter().map(move |(k, b)| {
                    format!(
                        "{name}{{worker=\"{}\",backend=\"{}\"}} {}",
                        id(r),
                        label(k),
                        pick(b)
                    )
                })
            })
            .collect();
        family(name, "counter", help, lines);
    }
    for (name, help, pick) in [
        (
            "coregate_request_duration_seconds",
            "From a request's first byte to the end of its response.",
            (|r: &Report| &r.latency) as fn(&Report) -> &Latency,
        ),
        (
            "coregate_upstream_duration_seconds",
            "From taking an upstream connection to its response head.",
            |r| &r.upstream_latency,
        ),
    ] {
        let mut lines = Vec::new();
        for r in &ok {
            let l = pick(r);
            let h = l.histogram();
            for &b in BUCKETS_S {
                let le_us = (b * 1e6) as u64;
                let n = if h.is_empty() {
                    0
                } else {
                    h.count_between(0, le_us)
                };
                lines.push(format!(
                    "{name}_bucket{{worker=\"{}\",le=\"{b}\"}} {n}",
                    id(r)
                ));
            }
            lines.push(format!(
                "{name}_bucket{{worker=\"{}\",le=\"+Inf\"}} {}",
                id(r),
                l.count
            ));
            lines.push(format!(
                "{name}_sum{{worker=\"{}\"}} {:.6}",
                id(r),
                l.mean_us * l.count as f64 / 1e6
            ));
            lines.push(format!("{name}_count{{worker=\"{}\"}} {}", id(r), l.count));
        }
        family(name, "histogram", help, lines);
    }
    out
}

/// `name=count` for every count above zero, or `none`.
fn nonzero(counts: &BTreeMap<String, u64>) -> String {
    let listed: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if listed.is_empty() {
        "none".into()
    } else {
        listed.join(" ")
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// One row of the stats table.
struct Row {
    name: String,
    state: String,
    rate: Option<f64>,
    requests: u64,
    latency: Latency,
    errors: u64,
    rejected: u64,
    open: u64,
    queued: u64,
    tunnels: u64,
    epoch: u64,
}

fn row(name: String, r: &Report, before: Option<&Report>, seconds: f64, windowed: bool) -> Row {
    let rate = before.map(|b| r.requests().saturating_sub(b.requests()) as f64 / seconds.max(1e-3));
    let latency = match before {
        Some(b) if windowed => window(&b.latency, &r.latency),
        _ => r.latency.clone(),
    };
    let errors = |x: &Report| x.responses.get("5xx").copied().unwrap_or(0);
    let (errors, rejected) = match before {
        Some(b) if windowed => (
            errors(r).saturating_sub(errors(b)),
            r.rejected_total().saturating_sub(b.rejected_total()),
        ),
        _ => (errors(r), r.rejected_total()),
    };
    Row {
        name,
        state: r.state.clone(),
        rate,
        requests: r.requests(),
        latency,
        errors,
        rejected,
        open: r.connections_open,
        queued: r.requests_queued,
        tunnels: r.tunnels_open,
        epoch: r.epoch,
    }
}

/// The table of `coregate stats` (cumulative percentiles, req/s over the
/// sampling interval) and `coregate top` (`windowed`: percentiles,
/// errors and rejects over the last interval only). `before` is the
/// previous sample of the same workers, if any.
pub fn table(
    reports: &[Report],
    before: Option<&[Report]>,
    seconds: f64,
    per_core: bool,
    windowed: bool,
) -> String {
    let mut rows = Vec::new();
    let prev = |w: Option<usize>| before.and_then(|b| b.iter().find(|x| x.worker == w));
    if per_core {
        for r in reports {
            let name = match (r.worker, r.core) {
                (Some(w), Some(c)) => format!("w{w} (core {c})"),
                (Some(w), None) => format!("w{w}"),
                _ => "?".into(),
            };
            rows.push(row(name, r, prev(r.worker), seconds, windowed));
        }
    }
    let total = Report::merge(reports);
    let total_before = before.map(Report::merge);
    rows.push(row(
        "total".into(),
        &total,
        total_before.as_ref(),
        seconds,
        windowed,
    ));

    let scope = if windowed {
        "last interval"
    } else {
        "since start"
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>10} {:>12} {:>9} {:>9} {:>9} {:>8} {:>9} {:>7} {:>7} {:>7} {:>6}",
        "worker",
        "state",
        "req/s",
        "requests",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "5xx",
        "rejected",
        "conns",
        "queued",
        "tunnels",
        "epoch"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>10} {:>12} {:>9} {:>9} {:>9} {:>8} {:>9} {:>7} {:>7} {:>7} {:>6}",
            r.name,
            r.state,
            r.rate
                .map(|x| format!("{x:.0}"))
                .unwrap_or_else(|| "-".into()),
            r.requests,
            ms(r.latency.p50_us),
            ms(r.latency.p99_us),
            ms(r.latency.p999_us),
            r.errors,
            r.rejected,
            r.open,
            r.queued,
            r.tunnels,
            r.epoch
        );
    }
    let _ = writeln!(
        out,
        "percentiles and 5xx/rejected {scope}; rejected by reason (since start): {}",
        nonzero(&total.rejected)
    );
    if total.tls_handshakes > 0 || total.tls_failures.values().any(|&n| n > 0) {
        let _ = writeln!(
            out,
            "tls (since start): {} handshakes, {} resumed; failed: {}",
            total.tls_handshakes,
            total.tls_resumed,
            nonzero(&total.tls_failures)
        );
    }
    if total.tunnels_opened > 0 {
        let _ = writeln!(
            out,
            "tunnels (since start): {} opened, {} closed idle, {} bytes up, {} bytes down",
            total.tunnels_opened,
            total.tunnels_idle_closed,
            total.tunnel_bytes_up,
            total.tunnel_bytes_down
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::histogram;

    fn report(worker: usize, ok_2xx: u64, latency_us: u64) -> Report {
        let mut h = histogram();
        h.record_n(latency_us, ok_2xx).unwrap();
        let mut r = Report {
            worker: Some(worker),
            core: Some(worker),
            state: "ok".into(),
            driver: "io_uring".into(),
            latency: Latency::of(&h),
            ..Report::default()
        };
        r.responses.insert("2xx".into(), ok_2xx);
        r.routes.insert("api \"v1\"".into(), ok_2xx);
        r
    }

    #[test]
    fn prometheus_text_has_every_family_typed_and_escaped() {
        let text = prometheus(&[report(0, 3, 2000), Report::stuck(1, Some(1))]);
        assert!(text.contains("# TYPE coregate_responses_total counter\n"));
        assert!(text.contains("coregate_responses_total{worker=\"0\",class=\"2xx\"} 3\n"));
        assert!(
            text.contains(
                "coregate_route_requests_total{worker=\"0\",route=\"api \\\"v1\\\"\"} 3\n"
            )
        );
        assert!(text.contains("coregate_worker_up{worker=\"1\"} 0\n"));
        assert!(
            text.contains(
                "coregate_request_duration_seconds_bucket{worker=\"0\",le=\"0.001\"} 0\n"
            )
        );
        assert!(
            text.contains(
                "coregate_request_duration_seconds_bucket{worker=\"0\",le=\"0.0025\"} 3\n"
            )
        );
        assert!(text.contains("coregate_request_duration_seconds_count{worker=\"0\"} 3\n"));
    }

    #[test]
    fn table_has_a_row_per_core_and_a_total() {
        let mut now = [report(0, 30, 1000), report(1, 10, 3000)];
        now[0].requests_queued = 2;
        now[1].requests_queued = 3;
        let before = [report(0, 10, 1000), report(1, 0, 3000)];
        let t = table(&now, Some(&before), 2.0, true, false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("w0 (core 0)"), "{t}");
        assert!(lines[2].starts_with("w1 (core 1)"), "{t}");
        let total: Vec<&str> = lines[3].split_whitespace().collect();
        // total, ok, 15 req/s ((20 + 10) / 2 s), 40 requests, p50 1.00 ms
        assert_eq!(&total[..5], ["total", "ok", "15", "40", "1.00"], "{t}");
        // The queues of both workers, in the third column from the right
        // (`queued tunnels epoch`).
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(header[header.len() - 3..], ["queued", "tunnels", "epoch"]);
        assert_eq!(total[total.len() - 3], "5", "{t}");
    }
}
