//! Admission control with real clients and a real origin: body caps, rate
//! limits, inflight caps, fair queues, write shedding, probes, the decode
//! guard, slow clients and the connection cap. Every refusal is also
//! checked in the worker's `rejected_total` line printed at exit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use crate::support::*;

/// One worker (so per-worker limits are exact) in front of `origin`,
/// with extra listener and route keys (either may open a `limits` table),
/// and an admin socket ([`admin_socket`]).
fn proxy_with(origin: &Proc, listener: &str, route: &str) -> Proc {
    let dir = temp_dir();
    let config = format!(
        "[server]\ndrain_timeout = \"5s\"\ndrain_grace = \"0s\"\nadmin_socket = \"{}\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n{listener}\n\n\
         [upstream.app]\nbackends = [\"tcp://{}\"]\n\n[[route]]\nupstream = \"app\"\n{route}\n",
        dir.join("admin.sock").display(),
        origin.addr
    );
    coregate_in(dir, &config, &["--workers", "1"])
}

/// The admin socket of a [`proxy_with`] proxy.
fn admin_socket(proxy: &Proc) -> std::path::PathBuf {
    proxy.dir.join("admin.sock")
}

/// Wait until the proxy's statistic `key` is `n`.
fn wait_stat(proxy: &Proc, key: &str, n: u64) {
    let got = stat_when(&admin_socket(proxy), &[key], |v| v == n);
    assert_eq!(got, n, "{key}");
}

/// Status line and head of the response to `req` (sent whole), on a new
/// connection.
fn exchange(addr: &str, req: &str) -> (u16, String) {
    let (got, _) = raw_exchange(addr, req.as_bytes());
    let text = String::from_utf8_lossy(&got).into_owned();
    (statuses(&got).first().copied().unwrap_or(0), text)
}

fn get(addr: &str, path: &str, headers: &str) -> (u16, String) {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n"),
    )
}

fn post(addr: &str, path: &str, body: &[u8], headers: &str) -> (u16, String) {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let (got, _) = raw_exchange(addr, &req);
    let text = String::from_utf8_lossy(&got).into_owned();
    (statuses(&got).first().copied().unwrap_or(0), text)
}

/// Stop the proxy and return its worker's `rejected:` log line.
fn rejected_line(proxy: &mut Proc) -> String {
    proxy.signal(libc::SIGTERM);
    proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    let log = proxy.stderr();
    log.lines()
        .find(|l| l.contains("rejected:"))
        .unwrap_or("")
        .to_string()
}

/// Start `path` (a `/slow` one) in the background on its own connection,
/// and return once the origin is serving it.
fn hold(addr: &str, origin: &Proc, path: &str) -> thread::JoinHandle<u16> {
    let before = origin_slow(&origin.addr);
    let (addr, path) = (addr.to_string(), path.to_string());
    let h = thread::spawn(move || get(&addr, &path, "").0);
    wait_origin_slow(&origin.addr, before + 1);
    h
}

#[test]
fn content_length_over_the_cap_is_413_before_the_body() {
    let origin = python_origin();
    let mut proxy = proxy_with(&origin, "", "");
    // The default cap is 1 MiB. Only the head is sent: a 413 that
    // arrives proves the body was never waited for.
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1048577\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("an answer before any body byte");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    // Exactly at the cap passes.
    let (status, text) = post(&proxy.addr, "/echo", &vec![b'x'; 1 << 20], "");
    assert_eq!(status, 200, "{text}");
    assert!(rejected_line(&mut proxy).contains("body_too_large=1"));
}

#[test]
fn chunked_body_crossing_a_route_cap_is_413() {
    let origin = python_origin();
    let mut proxy = proxy_with(&origin, "", "[route.limits]\nmax_body = 1000\n");
    let chunk = format!("1f4\r\n{}\r\n", "y".repeat(500));
    let small = format!(
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let (status, text) = exchange(&proxy.addr, &small);
    assert_eq!(status, 200, "1000 bytes is at the cap: {text}");
    assert!(text.contains("\"body_len\": 1000"), "{text}");
    // Three chunks pass the cap; the rest of the body is never sent, and
    // the answer comes anyway.
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let big = format!(
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}"
    );
    s.write_all(big.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("413 without the rest of the body");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413 "),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(rejected_line(&mut proxy).contains("body_too_large=1"));
}

#[test]
fn rate_limit_per_api_key_is_429_with_a_truthful_retry_after() {
    let origin = python_origin();
    let mut proxy = proxy_with(
        &origin,
        "",
        "[route.limits]\nrate = \"6/m\"\nburst = 3\nprincipal = \"header:X-Api-Key\"\n",
    );
    let statuses: Vec<u16> = (0..5)
        .map(|_| get(&proxy.addr, "/echo", "X-Api-Key: alpha\r\n").0)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // One token every 10 s: the bucket is empty, so the next is about
    // 10 s away (rounded up).
    let (_, text) = get(&proxy.addr, "/echo", "X-Api-Key: alpha\r\n");
    let retry: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {text}"));
    assert!((9..=10).contains(&retry), "Retry-After: {retry}");
    // Another key has its own bucket.
    assert_eq!(get(&proxy.addr, "/echo", "X-Api-Key: beta\r\n").0, 200);
    assert!(rejected_line(&mut proxy).contains("rate_limited=3"));
}

#[test]
fn inflight_cap_is_503_and_writes_are_shed_first() {
    let origin = python_origin();
    let mut proxy = proxy_with(
        &origin,
        "",
        "[route.limits]\nmax_inflight = 2\nshed_writes_at = 0.5\n",
    );
    let first = hold(&proxy.addr, &origin, "/slow?ms=1500");
    // One of two slots is taken: writes are shed, reads go on.
    let (status, text) = post(&proxy.addr, "/echo", b"w", "");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("Retry-After: 1"), "{text}");
    let second = hold(&proxy.addr, &origin, "/slow?ms=1500");
    // Both taken: reads are refused too.
    assert_eq!(get(&proxy.addr, "/echo", "").0, 503);
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(second.join().unwrap(), 200);
    // Slots come back when responses end.
    assert_eq!(post(&proxy.addr, "/echo", b"w", "").0, 200);
    let line = rejected_line(&mut proxy);
    assert!(line.contains("writes_shed=1"), "{line}");
    assert!(line.contains("inflight=1"), "{line}");
}

#[test]
fn readyz_says_writes_first_then_overloaded_and_healthz_stays_up() {
    let origin = python_origin();
    let proxy = proxy_with(
        &origin,
        "[listener.limits]\nmax_inflight = 2\nshed_writes_at = 0.5\n",
        "",
    );
    let (status, text) = get(&proxy.addr, "/readyz", "");
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("ready\n"), "{text}");
    let first = hold(&proxy.addr, &origin, "/slow?ms=1500");
    let (status, text) = get(&proxy.addr, "/readyz", "");
    assert_eq!(status, 503);
    assert!(text.contains("not ready for writes"), "{text}");
    let second = hold(&proxy.addr, &origin, "/slow?ms=1500");
    let (status, text) = get(&proxy.addr, "/readyz", "");
    assert_eq!(status, 503);
    assert!(text.contains("not ready: overloaded"), "{text}");
    // Liveness is not readiness, and probes take no slot.
    let (status, text) = get(&proxy.addr, "/healthz", "");
    assert_eq!(status, 200);
    assert!(text.ends_with("ok\n"), "{text}");
    first.join().unwrap();
    second.join().unwrap();
    assert_eq!(get(&proxy.addr, "/readyz", "").0, 200);
}

#[test]
fn probe_paths_are_configurable_and_can_be_turned_off() {
    let origin = python_origin();
    let proxy = proxy_with(&origin, "health_path = \"/live\"\nready_path = \"\"\n", "");
    assert_eq!(get(&proxy.addr, "/live", "").0, 200);
    // No longer probes: these reach the origin (whose /echo... paths
    // echo, and others are its 404).
    let (_, text) = get(&proxy.addr, "/echo/readyz", "");
    assert!(text.contains("\"path\": \"/echo/readyz\""), "{text}");
    let (_, text) = get(&proxy.addr, "/healthz", "");
    assert!(!text.ends_with("ok\n"), "{text}");
}

#[test]
fn fair_queue_serves_waiters_and_refuses_past_depth_and_deadline() {
    let origin = python_origin();
    let mut proxy = proxy_with(
        &origin,
        "",
        "[route.limits]\nmax_inflight = 1\nqueue_depth = 2\nqueue_timeout = \"3s\"\ntenant = \"header:X-Tenant\"\n",
    );
    // Waiters are served when the slot frees up.
    let held = hold(&proxy.addr, &origin, "/slow?ms=600");
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let addr = proxy.addr.clone();
            thread::spawn(move || get(&addr, "/echo", "X-Tenant: a\r\n").0)
        })
        .collect();
    wait_stat(&proxy, "requests_queued", 2);
    // Tenant a's queue is full; tenant b has its own.
    assert_eq!(get(&proxy.addr, "/echo", "X-Tenant: a\r\n").0, 503);
    let b = {
        let addr = proxy.addr.clone();
        thread::spawn(move || get(&addr, "/echo", "X-Tenant: b\r\n").0)
    };
    assert_eq!(held.join().unwrap(), 200);
    for w in waiters {
        assert_eq!(w.join().unwrap(), 200);
    }
    assert_eq!(b.join().unwrap(), 200);

    let line = rejected_line(&mut proxy);
    assert!(line.contains("queue_full=1"), "{line}");
}

#[test]
fn queue_deadline_is_503() {
    let origin = python_origin();
    let mut proxy = proxy_with(
        &origin,
        "",
        "[route.limits]\nmax_inflight = 1\nqueue_depth = 4\nqueue_timeout = \"300ms\"\n",
    );
    let held = hold(&proxy.addr, &origin, "/slow?ms=2000");
    let (status, text) = get(&proxy.addr, "/echo", "");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("Retry-After: 1"), "{text}");
    assert!(
        !held.is_finished(),
        "left the queue at its deadline, while the slot was still held"
    );
    assert_eq!(held.join().unwrap(), 200);
    assert!(rejected_line(&mut proxy).contains("queue_timeout=1"));
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn decode_guard_refuses_a_gzip_bomb_and_forwards_honest_bodies_untouched() {
    let origin = python_origin();
    let mut proxy = proxy_with(&origin, "", "[route.limits]\ndecode_guard = true\n");
    // About 12 MiB of zeros in a few KiB: well past 10x and past 8 MiB.
    let bomb = gzip(&vec![0u8; 12 << 20]);
    let before = proxy.rss_kib();
    let (status, text) = post(&proxy.addr, "/echo", &bomb, "Content-Encoding: gzip\r\n");
    assert_eq!(status, 413, "{text}");
    let grown = proxy.rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB refusing the bomb"
    );

    // Hex digits of a pseudo-random sequence compress about 2x: that
    // passes, and the origin gets the compressed bytes as sent.
    let mut x: u64 = 1;
    let text_body: Vec<u8> = (0..20_000)
        .flat_map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{:016x}\n", x).into_bytes()
        })
        .collect();
    let honest = gzip(&text_body);
    let (status, text) = post(&proxy.addr, "/echo", &honest, "Content-Encoding: gzip\r\n");
    assert_eq!(status, 200, "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let echo = echo_json(body.as_bytes());
    assert_eq!(echo["body_len"], honest.len());
    let file = proxy.dir.join("honest.gz");
    std::fs::write(&file, &honest).unwrap();
    assert_eq!(echo["body_sha256"], sha256_hex(&file));

    // A coding the guard cannot decode is refused, and so is a body that
    // is not what it claims to be.
    let (status, _) = post(
        &proxy.addr,
        "/echo",
        b"abc",
        "Content-Encoding: compress\r\n",
    );
    assert_eq!(status, 415);
    let (status, _) = post(
        &proxy.addr,
        "/echo",
        b"not gzip",
        "Content-Encoding: gzip\r\n",
    );
    assert_eq!(status, 400);
    let line = rejected_line(&mut proxy);
    assert!(line.contains("decoded_too_large=1"), "{line}");
    assert!(line.contains("unsupported_encoding=1"), "{line}");
    assert!(line.contains("bad_encoding=1"), "{line}");
}

#[test]
fn decode_guard_reads_a_chunked_body_whole_and_is_off_by_default() {
    let origin = python_origin();
    let guarded = proxy_with(&origin, "", "[route.limits]\ndecode_guard = true\n");
    let plain = proxy_with(&origin, "", "");
    let bomb = gzip(&vec![0u8; 12 << 20]);
    let mut req = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for part in bomb.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (got, _) = raw_exchange(&guarded.addr, &req);
    assert_eq!(statuses(&got), [413]);
    // Without the guard the bomb is the backend's problem, as in nginx.
    let (got, _) = raw_exchange(&plain.addr, &req);
    assert_eq!(statuses(&got), [200]);
}

#[test]
fn slow_heads_and_bodies_meet_their_deadlines() {
    let origin = python_origin();
    let mut proxy = proxy_with(
        &origin,
        "header_timeout = \"10s\"\nrequest_timeout = \"1s\"\nbody_timeout = \"500ms\"\n",
        "",
    );
    // A head dripped a byte at a time never completes within the
    // request deadline, however short each pause: 408.
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = s.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A body that goes quiet past body_timeout: 408.
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408 "));

    // A body that keeps trickling (never quiet for 500 ms) still ends at
    // the request deadline.
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    for _ in 0..20 {
        let _ = s.write_all(b"x");
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Ok(_) => break,
            Err(_) => {}
        }
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408 "));
    let line = rejected_line(&mut proxy);
    // The dripped head and the trickled body both met the request deadline.
    assert!(line.contains("request_timeout=2"), "{line}");
    assert!(line.contains("body_timeout=1"), "{line}");
}

#[test]
fn connections_past_the_cap_are_closed_at_once() {
    let origin = python_origin();
    let mut proxy = proxy_with(&origin, "max_connections = 2\n", "");
    let a = TcpStream::connect(&proxy.addr).unwrap();
    let b = TcpStream::connect(&proxy.addr).unwrap();
    wait_stat(&proxy, "connections_open", 2);
    let mut c = TcpStream::connect(&proxy.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let closed = match c.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(closed, "the third connection is closed without a request");
    // A freed place is taken again.
    drop(a);
    wait_stat(&proxy, "connections_open", 1);
    assert_eq!(get(&proxy.addr, "/echo", "").0, 200);
    drop(b);
    assert!(rejected_line(&mut proxy).contains("connection_limit=1"));
}

/// Each listener counts its own connections: many connections opened and
/// closed on a second listener leave the first listener's count alone.
#[test]
fn connection_caps_are_per_listener() {
    let origin = python_origin();
    let dir = temp_dir();
    let config = format!(
        "[server]\nadmin_socket = \"{}\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\n\n\
         [upstream.app]\nbackends = [\"tcp://{}\"]\n\n[[route]]\nupstream = \"app\"\n",
        dir.join("admin.sock").display(),
        origin.addr
    );
    // Both listeners on port 0: the addresses are the ones printed.
    let path = dir.join("coregate.toml");
    std::fs::write(&path, &config).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .args(["--workers", "1"]);
    let (mut proxy, addrs) = start_lines(cmd, "coregate listening on http://", 2, dir);
    let (a, b) = (addrs[0].clone(), addrs[1].clone());
    for _ in 0..5 {
        assert_eq!(get(&b, "/echo", "").0, 200);
    }
    let held = TcpStream::connect(&a).unwrap();
    wait_stat(&proxy, "connections_open", 1);
    assert_eq!(get(&a, "/echo", "").0, 200, "listener a has one place left");
    assert_eq!(get(&b, "/echo", "").0, 200);
    drop(held);
    assert!(!rejected_line(&mut proxy).contains("connection_limit"));
}
