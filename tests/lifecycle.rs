//! Starting, checking, draining, and the epoll driver.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn sigterm_lets_a_request_in_flight_finish_and_exits_zero() {
    let origin = python_origin();
    let mut proxy = proxy_to(&origin, "", &[]);
    let url = format!("http://{}/slow?ms=1500", proxy.addr);
    let client = std::thread::spawn(move || curl(&["-w", "\n%{http_code}", &url]));
    wait_origin_slow(&origin.addr, 1);
    proxy.signal(libc::SIGTERM);
    let out = client.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n200"),
        "in-flight request did not complete: {text}"
    );
    assert!(text.contains("\"path\": \"/slow?ms=1500\""), "{text}");
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("exits after drain");
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr());
}

#[test]
fn drain_over_the_admin_socket_finishes_requests_in_flight() {
    let origin = python_origin();
    let socket = temp_dir().join("admin.sock");
    let config = config_for(&format!("tcp://{}", origin.addr), "").replace(
        "[server]\n",
        &format!("[server]\nadmin_socket = \"{}\"\n", socket.display()),
    );
    let mut proxy = coregate(&config, &[]);
    let url = format!("http://{}/slow?ms=1000", proxy.addr);
    let client = std::thread::spawn(move || curl(&["-w", "\n%{http_code}", &url]));
    // Drain once the request is with the backend (polled, not slept).
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let reports = coregate::client::fetch_stats(&socket).expect("stats");
        let total = coregate::stats::Report::merge(&reports);
        if total.upstreams.values().any(|b| b.connects > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = coregate::client::request(&socket, "drain").expect("admin socket");
    assert_eq!(reply["draining"], true, "{reply}");
    let out = client.join().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\n200"));
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("drains and exits");
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr());
}

#[test]
fn idle_keep_alive_connections_do_not_hold_up_drain() {
    let origin = python_origin();
    let mut proxy = proxy_to(&origin, "", &[]);
    let mut idle = std::net::TcpStream::connect(&proxy.addr).unwrap();
    use std::io::{Read, Write};
    idle.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    assert!(idle.read(&mut buf).unwrap() > 0);
    proxy.signal(libc::SIGTERM);
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("idle connection closed at drain");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn epoll_driver_proxies_too() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &["--driver", "epoll", "--workers", "1"]);
    let out = curl(&["-d", "via epoll", &format!("http://{}/echo", proxy.addr)]);
    assert_eq!(echo_json(&out.stdout)["body_len"], 9);
    assert!(
        proxy.stderr().contains("running epoll"),
        "{}",
        proxy.stderr()
    );
}

#[test]
fn io_uring_driver_is_logged() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &["--driver", "uring", "--workers", "1"]);
    assert_eq!(status_of(&[&format!("http://{}/echo", proxy.addr)]), 200);
    assert!(
        proxy.stderr().contains("running io_uring"),
        "{}",
        proxy.stderr()
    );
}

#[test]
fn check_reports_file_line_and_key_and_run_refuses() {
    let dir = temp_dir();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[upstream.a]\nbackends = [\"tcp://127.0.0.1:1\"]\nconnect_timeout = \"fast\"\n\n[[route]]\nupstream = \"b\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:6: upstream.a.connect_timeout:",
            path.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:9: route.upstream:", path.display())),
        "{err}"
    );
    let run = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("upstream.a.connect_timeout"));

    let good = dir.join("good.toml");
    std::fs::write(&good, "[[listener]]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn quick_proxy_without_config_file() {
    let origin = coregate_origin(11);
    let mut cmd = Command::new(BIN);
    let upstream = format!("tcp://{}", origin.addr);
    cmd.args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--workers",
        "2",
    ]);
    let proxy = start(cmd, "coregate listening on http://", temp_dir());
    let out = curl(&[&format!("http://{}/", proxy.addr)]);
    assert_eq!(out.stdout.len(), 11);
}
