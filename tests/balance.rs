//! Backend selection and passive health with real backends that die,
//! hang, answer 5xx and come back. Backends are told apart by their
//! answers: coregate origins with bodies of 1, 2 or 3 bytes, or the
//! Python origin's JSON.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use crate::support::*;

fn proxy(backends: &[String], upstream_extra: &str) -> Proc {
    let list: Vec<String> = backends.iter().map(|b| format!("\"tcp://{b}\"")).collect();
    let config = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[upstream.app]\nbackends = [{}]\n{upstream_extra}\n\n\
         [[route]]\nupstream = \"app\"\n",
        list.join(", ")
    );
    coregate(&config, &["--workers", "1"])
}

/// The body of GET `path`, and its status.
fn fetch(addr: &str, path: &str) -> (u16, String) {
    let out = curl(&["-w", "\n%{http_code}", &format!("http://{addr}{path}")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.parse().unwrap_or(0), body.to_string())
}

#[test]
fn a_dead_backend_costs_no_request_and_is_ejected() {
    let live = coregate_origin(1);
    let dead = format!("127.0.0.1:{}", dead_port());
    let proxy = proxy(
        &[dead, live.addr.clone()],
        "balance = \"round_robin\"\nmax_fails = 2\neject_time = \"10s\"",
    );
    // Connection refused reaches the backend with nothing: every request
    // is retried on the live one (within the budget's floor of 3, then
    // the dead backend is ejected after 2 failures anyway).
    for _ in 0..20 {
        assert_eq!(fetch(&proxy.addr, "/"), (200, "a".into()));
    }
}

#[test]
fn a_hanging_backend_is_ejected_after_its_timeouts() {
    let live = coregate_origin(2);
    // Accepts and never answers.
    let hang = TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_addr = hang.local_addr().unwrap().to_string();
    let held = thread::spawn(move || {
        let mut conns = Vec::new();
        hang.set_nonblocking(true).unwrap();
        for _ in 0..100 {
            if let Ok((c, _)) = hang.accept() {
                conns.push(c);
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let proxy = proxy(
        &[hang_addr, live.addr.clone()],
        "balance = \"round_robin\"\nresponse_timeout = \"300ms\"\nmax_fails = 1\neject_time = \"10s\"",
    );
    let statuses: Vec<u16> = (0..10).map(|_| fetch(&proxy.addr, "/").0).collect();
    // A timeout is not retried (a slow group would get twice the load):
    // the first request to the hanging backend gets 504, which ejects it.
    assert_eq!(
        statuses.iter().filter(|&&s| s == 504).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        9,
        "{statuses:?}"
    );
    held.join().unwrap();
}

#[test]
fn five_hundreds_eject_when_asked_and_not_otherwise() {
    let good = coregate_origin(1);
    // A backend answering 500 to everything: coregate with a respond rule.
    let bad = coregate(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\nrespond = { status = 500 }\n",
        &["--workers", "1"],
    );
    let backends = [bad.addr.clone(), good.addr.clone()];
    let counting = proxy(
        &backends,
        "balance = \"round_robin\"\neject_on_5xx = true\nmax_fails = 2\neject_time = \"10s\"",
    );
    let statuses: Vec<u16> = (0..12).map(|_| fetch(&counting.addr, "/").0).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 500).count(),
        2,
        "{statuses:?}"
    );
    // By default a 5xx is an answer, not a failure: round robin goes on.
    let plain = proxy(&backends, "balance = \"round_robin\"\nmax_fails = 2");
    let statuses: Vec<u16> = (0..12).map(|_| fetch(&plain.addr, "/").0).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 500).count(),
        6,
        "{statuses:?}"
    );
}

#[test]
fn an_ejected_backend_comes_back_after_its_backoff() {
    let reserved = reserve_port();
    let port = reserved.port;
    let other = coregate_origin(1);
    let proxy = proxy(
        &[format!("127.0.0.1:{port}"), other.addr.clone()],
        "balance = \"round_robin\"\nmax_fails = 1\neject_time = \"500ms\"",
    );
    for _ in 0..4 {
        assert_eq!(fetch(&proxy.addr, "/echo").0, 200);
    }
    // The backend starts; once its ejection ends it gets its share again
    // (waited for: the first request it answers).
    let revived = python_origin_on(&reserved);
    assert!(
        until(|| fetch(&proxy.addr, "/echo").1.starts_with('{')),
        "the revived backend got no request"
    );
    let json = (0..10)
        .filter(|_| fetch(&proxy.addr, "/echo").1.starts_with('{'))
        .count();
    assert!(json >= 4, "the revived backend answered {json} of 10");
    drop(revived);
}

#[test]
fn every_backend_ejected_is_503_unless_failing_open() {
    let dead = [
        format!("127.0.0.1:{}", dead_port()),
        format!("127.0.0.1:{}", dead_port()),
    ];
    let strict = proxy(
        &dead,
        "max_fails = 1\neject_time = \"10s\"\nall_ejected = \"503\"",
    );
    // The first request fails on one backend, is retried on the other and
    // fails there too: both are ejected, and the rest get 503 at once.
    let statuses: Vec<u16> = (0..6).map(|_| fetch(&strict.addr, "/").0).collect();
    assert_eq!(statuses, [502, 503, 503, 503, 503, 503]);
    // Failing open keeps trying (and failing) rather than refusing.
    let open = proxy(&dead, "max_fails = 1\neject_time = \"10s\"");
    let statuses: Vec<u16> = (0..6).map(|_| fetch(&open.addr, "/").0).collect();
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");
}

#[test]
fn consistent_hashing_keeps_a_key_on_one_backend() {
    let origins: Vec<Proc> = (1..=3).map(coregate_origin).collect();
    let addrs: Vec<String> = origins.iter().map(|o| o.addr.clone()).collect();
    let proxy = proxy(&addrs, "balance = \"hash\"\nhash_key = \"header:X-User\"");
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..30 {
        let header = format!("X-User: user{user}");
        let url = format!("http://{}/", proxy.addr);
        let bodies: std::collections::BTreeSet<String> = (0..3)
            .map(|_| String::from_utf8_lossy(&curl(&["-H", &header, &url]).stdout).into_owned())
            .collect();
        assert_eq!(bodies.len(), 1, "user{user} went to {bodies:?}");
        seen.extend(bodies);
    }
    assert_eq!(
        seen.len(),
        3,
        "30 users spread over all 3 backends: {seen:?}"
    );
}

#[test]
fn active_checks_take_a_dead_backend_out_and_put_it_back() {
    let reserved = reserve_port();
    let port = reserved.port;
    let other = coregate_origin(1);
    // Passive ejection and retries off: only the checks keep requests
    // away from the dead backend.
    let proxy = proxy(
        &[format!("127.0.0.1:{port}"), other.addr.clone()],
        "balance = \"round_robin\"\nmax_fails = 0\nretry_budget = 0.0\n\
         health_check = { path = \"/echo/health\", interval = \"100ms\", timeout = \"200ms\", healthy = 2, unhealthy = 1 }",
    );
    // Checked down (a failing request is the sign it is not yet): then
    // every request goes to the other backend.
    assert!(
        until(|| fetch(&proxy.addr, "/").0 == 200 && fetch(&proxy.addr, "/").0 == 200),
        "never checked down"
    );
    let statuses: Vec<u16> = (0..10).map(|_| fetch(&proxy.addr, "/").0).collect();
    assert!(
        statuses.iter().all(|&s| s == 200),
        "checked down: {statuses:?}"
    );
    // It comes up: two good checks later it is back in the rotation.
    let revived = python_origin_on(&reserved);
    assert!(
        until(|| fetch(&proxy.addr, "/echo").1.starts_with('{')),
        "never checked up"
    );
    let json = (0..6)
        .filter(|_| fetch(&proxy.addr, "/echo").1.starts_with('{'))
        .count();
    assert_eq!(json, 3, "round robin over both again");
    drop(revived);
}

#[test]
fn a_backend_at_its_connection_cap_is_not_given_more() {
    let origin = python_origin();
    let proxy = proxy(std::slice::from_ref(&origin.addr), "max_conns = 1");
    let held = {
        let addr = proxy.addr.clone();
        thread::spawn(move || fetch(&addr, "/slow?ms=800").0)
    };
    wait_origin_slow(&origin.addr, 1);
    assert_eq!(
        fetch(&proxy.addr, "/echo").0,
        503,
        "the one connection is in use"
    );
    assert_eq!(held.join().unwrap(), 200);
    assert_eq!(fetch(&proxy.addr, "/echo").0, 200, "free again");
}

/// A backend that breaks off mid-head: the GET is retried on the other,
/// and none of the broken head's bytes reach the client.
#[test]
fn a_retry_starts_from_a_clean_response_buffer() {
    use std::io::{Read, Write};
    let good = coregate_origin(1);
    let broken = TcpListener::bind("127.0.0.1:0").unwrap();
    let broken_addr = broken.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for c in broken.incoming().take(4) {
            let Ok(mut c) = c else { continue };
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nX-Partial: ");
        }
    });
    let proxy = proxy(
        &[broken_addr, good.addr.clone()],
        "balance = \"round_robin\"\nmax_fails = 0",
    );
    // Three requests: each costs a retry, and the budget's floor is three
    // (the fourth in a row would get the 502).
    for _ in 0..3 {
        let out = curl(&["-i", &format!("http://{}/", proxy.addr)]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(!text.contains("X-Partial"), "a broken head leaked: {text}");
        assert!(text.ends_with("\r\n\r\na"), "{text}");
    }
}

/// Poll `ok` until it holds, for 10 s at most; whether it did.
fn until(mut ok: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < end {
        if ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}
