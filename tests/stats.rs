//! Per-core statistics over the admin socket: exact counts against what
//! the client sent, latency percentiles against a latency the origin
//! injects, the Prometheus text through a real parser, and `coregate top`
//! in a real terminal (tmux).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_coregate");

/// coregate with an admin socket in its temp dir, two workers.
fn proxy_with_socket(routes: &str, upstream: &str) -> (Proc, PathBuf) {
    proxy_with_server_keys(routes, upstream, "")
}

fn proxy_with_server_keys(routes: &str, upstream: &str, server: &str) -> (Proc, PathBuf) {
    let dir = temp_dir();
    let socket = dir.join("admin.sock");
    let config = format!(
        "[server]\nadmin_socket = \"{}\"\n{server}\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n{upstream}\n\n{routes}\n",
        socket.display()
    );
    let proxy = coregate(&config, &["--workers", "2"]);
    (proxy, socket)
}

/// Send `paths` in order over one keep-alive connection, reading each
/// response whole (by Content-Length) before the next.
fn keep_alive_run(addr: &str, paths: &[&str]) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // One write per request, sent at once: no Nagle wait on the next.
    s.set_nodelay(true).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for p in paths {
        w.write_all(format!("GET {p} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).unwrap();
    }
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn per_core_counts_add_up_to_what_the_client_sent() {
    let (proxy, socket) = proxy_with_socket(
        "[[route]]\nname = \"ok\"\npath = \"/ok\"\nrespond = { status = 200, body = \"ok\" }\n\n\
         [[route]]\nname = \"teapot\"\npath = \"/teapot\"\nrespond = { status = 418 }\n",
        "",
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");
    // 10,000 requests over 8 connections: 6,000 /ok, 3,000 without a
    // route (404) and 1,000 /teapot (418).
    let paths: Vec<&str> = (0..1250)
        .map(|i| match i % 10 {
            0..=5 => "/ok",
            6..=8 => "/missing",
            _ => "/teapot",
        })
        .collect();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (addr, paths) = (proxy.addr.clone(), paths.clone());
            thread::spawn(move || keep_alive_run(&addr, &paths))
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let s = stats_json(&socket);
    let total = &s["total"];
    assert_eq!(n(&total["responses"]["2xx"]), 6000, "{total}");
    assert_eq!(n(&total["responses"]["4xx"]), 4000);
    assert_eq!(n(&total["routes"]["ok"]), 6000);
    assert_eq!(n(&total["routes"]["teapot"]), 1000);
    assert_eq!(n(&total["rejected"]["no_route"]), 3000);
    assert_eq!(n(&total["latency"]["count"]), 10_000);
    assert_eq!(n(&total["rule_evaluations"]), 10_000);
    assert_eq!(n(&total["connections_accepted"]), 8);
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for key in ["2xx", "4xx"] {
        let sum: u64 = workers.iter().map(|w| n(&w["responses"][key])).sum();
        assert_eq!(sum, n(&total["responses"][key]), "per-core {key} adds up");
    }
    let sum: u64 = workers.iter().map(|w| n(&w["latency"]["count"])).sum();
    assert_eq!(sum, 10_000);
    for w in workers {
        assert_eq!(w["state"], "ok");
        assert_eq!(w["epoch"], 1);
    }
}

#[test]
fn percentiles_match_a_latency_the_origin_injects() {
    let origin = python_origin();
    let (proxy, socket) = proxy_with_socket(
        "[[route]]\nupstream = \"app\"\n",
        &format!("[upstream.app]\nbackends = [\"tcp://{}\"]", origin.addr),
    );
    // Each request's time as the client saw it, which holds the
    // proxy's upstream exchange: an upper bound that no busy machine
    // can break, where a fixed one could.
    let mut client_us: Vec<u64> = (0..10)
        .map(|_| {
            let out = curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{time_total}",
                &format!("http://{}/slow?ms=200", proxy.addr),
            ]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (code, secs) = text.split_once(' ').expect("code and time");
            assert_eq!(code, "200", "{text}");
            (secs.parse::<f64>().expect("seconds") * 1e6) as u64
        })
        .collect();
    client_us.sort_unstable();
    let total = &stats_json(&socket)["total"];
    let upstream = &total["upstream_latency"];
    assert_eq!(n(&upstream["count"]), 10);
    // The origin sleeps 200 ms; the histogram holds values to 0.1%. The
    // k-th fastest upstream exchange is no slower than the k-th fastest
    // request: p50 is the 5th of 10, p99 the 10th.
    let p50 = n(&upstream["p50_us"]);
    let p99 = n(&upstream["p99_us"]);
    let within = |us: u64, bound: u64| us >= 199_800 && us <= bound + bound / 1000;
    assert!(
        within(p50, client_us[4]),
        "upstream p50 {p50} us, client {client_us:?}"
    );
    assert!(
        within(p99, client_us[9]),
        "upstream p99 {p99} us, client {client_us:?}"
    );
    // Total latency holds the upstream exchange.
    assert!(n(&total["latency"]["p50_us"]) >= p50 - p50 / 1000);
    let backend = &total["upstreams"][format!("app/tcp://{}", origin.addr)];
    assert_eq!(
        n(&backend["connects"]) + n(&backend["reuses"]),
        10,
        "{backend}"
    );
}

#[test]
fn prometheus_text_passes_a_real_parser_and_agrees_with_json() {
    let (proxy, socket) = proxy_with_server_keys(
        "[[route]]\nname = \"quote \\\" and \\\\ backslash\"\nrespond = { status = 200 }\n",
        "",
        "metrics_listen = \"127.0.0.1:0\"",
    );
    // Port 0: the port the proxy bound and printed.
    let metrics = proxy
        .printed("metrics on http://")
        .trim_end_matches("/metrics")
        .to_string();
    for _ in 0..20 {
        assert_eq!(status_of(&[&format!("http://{}/", proxy.addr)]), 200);
    }
    let out = Command::new(BIN)
        .args(["stats", "--prometheus", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = proxy.dir.join("metrics.txt");
    std::fs::write(&text, &out.stdout).unwrap();
    // prometheus_client's parser: every family and sample, summed by name
    // and label set without the worker.
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
sums, types = {}, {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    types[fam.name] = fam.type
    for s in fam.samples:
        labels = {k: v for k, v in s.labels.items() if k != "worker"}
        key = s.name + json.dumps(labels, sort_keys=True)
        sums[key] = sums.get(key, 0) + s.value
print(json.dumps({"sums": sums, "types": types}))
"#;
    let parsed = Command::new("python3")
        .args(["-c", script])
        .arg(&text)
        .output()
        .expect("python3");
    assert!(
        parsed.status.success(),
        "parser refused the text: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(v["types"]["coregate_responses"], "counter");
    assert_eq!(v["types"]["coregate_request_duration_seconds"], "histogram");
    assert_eq!(
        v["sums"]["coregate_responses_total{\"class\": \"2xx\"}"],
        20.0
    );
    assert_eq!(
        v["sums"]["coregate_route_requests_total{\"route\": \"quote \\\" and \\\\ backslash\"}"],
        20.0,
        "{}",
        v["sums"]
    );
    assert_eq!(v["sums"]["coregate_request_duration_seconds_count{}"], 20.0);
    assert_eq!(v["sums"]["coregate_worker_up{}"], 2.0);
    let json = stats_json(&socket);
    assert_eq!(n(&json["total"]["responses"]["2xx"]), 20);

    // The same text over HTTP on the loopback metrics listener.
    let scraped = curl(&["-i", &format!("http://{metrics}/metrics")]);
    let scraped = String::from_utf8_lossy(&scraped.stdout);
    assert!(scraped.starts_with("HTTP/1.1 200 OK"), "{scraped}");
    assert!(scraped.contains("text/plain; version=0.0.4"), "{scraped}");
    assert!(scraped.contains("coregate_responses_total{worker=\"0\",class=\"2xx\"}"));
    assert_eq!(status_of(&[&format!("http://{metrics}/other")]), 404);
}

/// `coregate top` in a real terminal: what a person sees, then q quits.
#[test]
fn top_shows_every_core_and_quits_on_q() {
    let (proxy, socket) =
        proxy_with_socket("[[route]]\nrespond = { status = 200, body = \"hi\" }\n", "");
    let session = format!("coregate-top-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(args)
            .output()
            .expect("tmux (installed by .ci/run)")
    };
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "140",
        "-y",
        "20",
        &format!("{BIN} top --socket {}", socket.display()),
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    // Traffic while top runs, until a frame shows a request rate on the
    // total row and a row per worker (or 15 s pass).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (addr, stop) = (proxy.addr.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                keep_alive_run(&addr, &["/"; 50]);
            }
        })
    };
    let rate_of = |pane: &str| -> f64 {
        pane.lines()
            .find(|l| l.starts_with("total"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let end = Instant::now() + Duration::from_secs(15);
    let pane = loop {
        let pane = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout)
            .into_owned();
        let shown = pane.contains("w0") && pane.contains("w1") && rate_of(&pane) > 0.0;
        if shown || Instant::now() > end {
            break pane;
        }
        thread::sleep(Duration::from_millis(100));
    };
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let quit = tmux(&["send-keys", "-t", &session, "q"]);
    assert!(quit.status.success());
    let end = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        if !tmux(&["has-session", "-t", &session]).status.success() {
            break true;
        }
        if Instant::now() > end {
            let _ = tmux(&["kill-session", "-t", &session]);
            break false;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(pane.contains("coregate top"), "{pane}");
    assert!(pane.contains("w0"), "a row for worker 0:\n{pane}");
    assert!(pane.contains("w1"), "a row for worker 1:\n{pane}");
    assert!(
        pane.lines().any(|l| l.starts_with("total")),
        "a total row:\n{pane}"
    );
    assert!(rate_of(&pane) > 0.0, "the total row shows traffic:\n{pane}");
    assert!(closed, "q quits top");
}

#[test]
fn an_upstream_connection_paused_by_a_large_response_is_reused() {
    // A response far larger than the proxy buffers pauses the upstream's
    // receive while the client catches up; the connection must still go
    // back to the pool, not be closed and dialled anew for each request.
    let origin = python_origin();
    let (proxy, socket) = proxy_with_socket(
        "[[route]]\nupstream = \"app\"\n",
        &format!("[upstream.app]\nbackends = [\"tcp://{}\"]\n", origin.addr),
    );
    let url = format!("http://{}/bytes?n={}", proxy.addr, 4 << 20);
    // curl fetches the three over one keep-alive connection.
    let out = curl(&[
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} ",
        &url,
        &url,
        &url,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 200 200 ");
    let total = &stats_json(&socket)["total"];
    let backend = &total["upstreams"][format!("app/tcp://{}", origin.addr)];
    assert_eq!(
        (n(&backend["connects"]), n(&backend["reuses"])),
        (1, 2),
        "{backend}"
    );
}
