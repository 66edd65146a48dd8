//! WebSocket and Upgrade tunnels: the `websockets` package's server and
//! client (tests/support/ws.py) through the proxy, raw sockets for the
//! edges (half-closes, a 101 nobody asked for), and the Python origin's
//! `/switch` for backends that switch protocols badly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::support::*;

fn ws_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ws.py")
}

/// The `websockets` server (`/echo`, `/stream`, `/decline`).
fn ws_origin() -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(ws_script()).arg("server");
    let mut p = start(cmd, "READY", temp_dir());
    p.addr = format!("127.0.0.1:{}", p.addr);
    p
}

/// A `websockets` client running `steps` (see ws.py), its output lines
/// read as they come.
struct WsClient {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl WsClient {
    fn start(url: &str, steps: &[&str]) -> WsClient {
        let mut child = Command::new("python3")
            .arg(ws_script())
            .arg("client")
            .arg(url)
            .args(steps)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start ws.py client");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        WsClient {
            child,
            stdin,
            lines,
        }
    }

    /// The next line the client prints, within 60 s.
    fn line(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| "(no line within 60 s)".into())
    }

    /// Let a `line` step go on.
    fn go_on(&mut self) {
        self.stdin.write_all(b"\n").expect("client's stdin");
        self.stdin.flush().expect("client's stdin");
    }

    /// Every line until the client exits (within 90 s), and whether it
    /// exited 0.
    fn finish(mut self) -> (Vec<String>, bool) {
        let mut lines = Vec::new();
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => lines.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(_) if Instant::now() > end => break,
                Err(_) => {}
            }
        }
        let ok = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s.success(),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => break false,
            }
        };
        (lines, ok)
    }
}

impl Drop for WsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a client to its end: its lines, asserting it exited 0.
fn ws(url: &str, steps: &[&str]) -> Vec<String> {
    let (lines, ok) = WsClient::start(url, steps).finish();
    assert!(ok, "ws.py client {url} {steps:?} failed: {lines:?}");
    lines
}

/// The proxy with an admin socket, `listener` and `route` keys added.
fn tunnel_proxy(backend: &str, server: &str, listener: &str, route: &str) -> (Proc, PathBuf) {
    let dir = temp_dir();
    let socket = dir.join("admin.sock");
    let log = dir.join("access.log");
    let config = tunnel_config(backend, server, listener, route, &socket, &log);
    (coregate(&config, &["--workers", "1"]), socket)
}

fn tunnel_config(
    backend: &str,
    server: &str,
    listener: &str,
    route: &str,
    socket: &Path,
    log: &Path,
) -> String {
    format!(
        "[server]\nadmin_socket = \"{}\"\naccess_log = \"{}\"\ndrain_grace = \"0s\"\n{server}\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\n{listener}\n\n\
         [upstream.app]\nbackends = [\"tcp://{backend}\"]\n\n\
         [[rule]]\nlog = [\"path\", \"status\", \"bytes\"]\n\n\
         [[route]]\nupstream = \"app\"\n{route}\n",
        socket.display(),
        log.display()
    )
}

/// Send an upgrade request for `path` offering `protocol` and read the
/// response head: its status line and fields, and the socket.
fn upgrade(addr: &str, path: &str, protocol: &str) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    (String::from_utf8_lossy(&head).into_owned(), s)
}

/// Everything until the peer closes (within 10 s).
fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

#[test]
fn websocket_messages_of_every_size_pass_the_quick_proxy_with_no_config() {
    let origin = ws_origin();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(format!("tcp://{}", origin.addr))
        .args(["--workers", "1"]);
    if let Ok(driver) = std::env::var("COREGATE_TEST_DRIVER") {
        cmd.args(["--driver", &driver]);
    }
    let proxy = start(cmd, "coregate listening on http://", temp_dir());
    let url = format!("ws://{}/echo", proxy.addr);
    let lines = ws(&url, &["echo:1000:7", "text:50", "ping", "close"]);
    assert_eq!(lines[0], "open");
    assert!(lines[1].starts_with("echoed 1000 "), "{lines:?}");
    assert_eq!(&lines[2..], ["texted 50", "pong", "closed 1000"]);
}

#[test]
fn a_server_stream_is_relayed_counted_and_logged() {
    let origin = ws_origin();
    let (proxy, socket) = tunnel_proxy(&origin.addr, "", "", "");
    let base = format!("ws://{}", proxy.addr);
    // A tunnel held open shows in the gauges.
    let mut held = WsClient::start(&format!("{base}/echo"), &["echo:3:1", "line", "close"]);
    assert_eq!(held.line(), "open");
    assert!(held.line().starts_with("echoed 3 "));
    assert_eq!(stat_when(&socket, &["tunnels_open"], |n| n == 1), 1);

    let lines = ws(
        &format!("{base}/stream?n=200"),
        &["recv:200", "wait-close:10"],
    );
    assert_eq!(lines, ["open", "received 200", "closed"]);
    held.go_on();
    let (lines, ok) = held.finish();
    assert!(ok, "{lines:?}");
    assert_eq!(lines, ["closed 1000"]);

    assert_eq!(stat_when(&socket, &["tunnels_open"], |n| n == 0), 0);
    let total = &stats_total(&socket);
    assert_eq!(total["tunnels_opened"], 2, "{total}");
    assert_eq!(total["responses"]["1xx"], 2, "{total}");
    // 200 messages (compressed: websockets negotiates permessage-deflate)
    // are at least a frame head each.
    let down = total["tunnel_bytes_down"].as_u64().unwrap();
    assert!(down > 200 * 2, "{total}");
    assert!(total["tunnel_bytes_up"].as_u64().unwrap() > 0, "{total}");
    let metrics = Command::new(BIN)
        .args(["stats", "--prometheus", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("coregate_tunnels_opened_total{worker=\"0\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("coregate_tunnels_open{worker=\"0\"} 0"),
        "{text}"
    );
    // Each tunnel is one access log line with status 101, written when
    // it ends, with the bytes sent to the client.
    let path = socket.with_file_name("access.log");
    let end = Instant::now() + Duration::from_secs(10);
    let mut lines: Vec<serde_json::Value> = Vec::new();
    while lines.len() < 2 && Instant::now() < end {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l["status"] == 101), "{lines:?}");
    assert!(lines.iter().any(|l| l["path"] == "/stream"), "{lines:?}");
    // Each line's bytes: its 101 head and what its tunnel relayed down.
    let logged: u64 = lines.iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
    assert!(
        logged > down && logged < down + 2 * 1000,
        "{lines:?} {down}"
    );
}

#[test]
fn a_declined_upgrade_is_an_ordinary_response_and_the_connection_stays_http() {
    let ws_backend = ws_origin();
    let (proxy, _socket) = tunnel_proxy(&ws_backend.addr, "", "", "");
    let lines = ws(&format!("ws://{}/decline", proxy.addr), &[]);
    assert_eq!(lines, ["refused 403"]);

    // A backend that ignores the upgrade answers 200; the next request on
    // the connection is answered too. The upgrade went on to it.
    let origin = python_origin();
    let plain = proxy_to(&origin, "", &[]);
    let mut s = TcpStream::connect(&plain.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
          GET /echo?second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let all = read_to_end(&mut s);
    assert_eq!(
        statuses(&all),
        [200, 200],
        "{}",
        String::from_utf8_lossy(&all)
    );
    let text = String::from_utf8_lossy(&all);
    let first = &text[text.find('{').unwrap()..];
    let echo: serde_json::Value = serde_json::Deserializer::from_str(first)
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(header(&echo, "Upgrade"), Some("websocket"), "{echo}");
    assert_eq!(header(&echo, "Connection"), Some("upgrade"), "{echo}");
}

#[test]
fn a_101_the_request_did_not_ask_for_is_a_502_that_closes() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    // A plain GET answered with 101.
    let (all, closed) = raw_exchange(
        &proxy.addr,
        b"GET /switch?to=websocket HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(statuses(&all), [502], "{}", String::from_utf8_lossy(&all));
    assert!(closed);
    // An upgrade to websocket answered with a switch to another protocol,
    // or with a 101 that names none.
    for to in ["h2c", ""] {
        let (head, mut s) = upgrade(&proxy.addr, &format!("/switch?to={to}"), "websocket");
        assert!(head.starts_with("HTTP/1.1 502 "), "{to:?}: {head}");
        assert!(head.contains("Connection: close"), "{head}");
        assert!(read_to_end(&mut s).len() < 1000, "closed after the 502");
    }
}

#[test]
fn protocols_a_route_does_not_list_go_on_without_the_upgrade() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let out = curl(&[
        "-H",
        "Connection: Upgrade, HTTP2-Settings",
        "-H",
        "Upgrade: h2c",
        "-H",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        &format!("http://{}/echo", proxy.addr),
    ]);
    let echo = echo_json(&out.stdout);
    assert_eq!(header(&echo, "Upgrade"), None, "{echo}");
    assert_eq!(header(&echo, "HTTP2-Settings"), None, "{echo}");
    assert_eq!(header(&echo, "Connection"), None, "{echo}");
    // A 101 to that request is one nobody asked for.
    let (head, _s) = upgrade(&proxy.addr, "/switch?to=h2c", "h2c");
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");

    // Listed on a route, h2c passes and its tunnel relays raw bytes.
    let (listed, _socket) =
        tunnel_proxy(&origin.addr, "", "", "upgrade = [\"websocket\", \"h2c\"]");
    let (head, mut s) = upgrade(&listed.addr, "/switch?to=h2c", "h2c");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Upgrade: h2c\r\n"), "{head}");
    assert!(head.contains("Connection: upgrade\r\n"), "{head}");
    s.write_all(b"PRI * raw bytes").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut s), b"PRI * raw bytes");
}

#[test]
fn an_upgrade_request_with_a_body_is_refused() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let (all, closed) = raw_exchange(
        &proxy.addr,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(statuses(&all), [400], "{}", String::from_utf8_lossy(&all));
    assert!(closed);
}

#[test]
fn half_closes_pass_through_a_tunnel_each_way() {
    let origin = python_origin();
    let (proxy, socket) = tunnel_proxy(&origin.addr, "", "", "");
    // The client closes its side first: all it sent comes back, then the
    // backend's close.
    let (head, mut s) = upgrade(&proxy.addr, "/switch?to=websocket", "websocket");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        sent
    });
    let back = read_to_end(&mut s);
    let sent = writer.join().unwrap();
    assert_eq!(back.len(), sent.len());
    assert!(back == sent, "the echo differs");

    // The backend closes its side first: its bytes, then end of stream,
    // and the client can still send.
    let (head, mut s) = upgrade(&proxy.addr, "/switch?to=websocket&first=5000", "websocket");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(read_to_end(&mut s).len(), 5000);
    s.write_all(&[7u8; 1000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(stat_when(&socket, &["tunnels_open"], |n| n == 0), 0);
    let up = stats_total(&socket)["tunnel_bytes_up"].as_u64().unwrap();
    assert_eq!(up, 300_000 + 1000);
}

#[test]
fn an_idle_tunnel_is_closed_by_its_timeout() {
    let origin = ws_origin();
    let (proxy, socket) = tunnel_proxy(&origin.addr, "", "", "tunnel_idle_timeout = \"1s\"");
    let lines = ws(
        &format!("ws://{}/echo", proxy.addr),
        &["echo:2:3", "wait-close:30"],
    );
    assert_eq!(lines[0], "open");
    assert_eq!(lines[2], "closed", "{lines:?}");
    assert_eq!(stat_when(&socket, &["tunnels_idle_closed"], |n| n == 1), 1);
    assert_eq!(stat_when(&socket, &["tunnels_open"], |n| n == 0), 0);
}

#[test]
fn a_tunnel_survives_a_reload_and_new_ones_take_the_new_config() {
    let origin = ws_origin();
    let dir = temp_dir();
    let socket = dir.join("admin.sock");
    let log = dir.join("access.log");
    let proxy = coregate(
        &tunnel_config(&origin.addr, "", "", "", &socket, &log),
        &["--workers", "1"],
    );
    let url = format!("ws://{}/echo", proxy.addr);
    let mut held = WsClient::start(&url, &["echo:5:1", "line", "echo:5:2", "close"]);
    assert_eq!(held.line(), "open");
    assert!(held.line().starts_with("echoed 5 "));
    // The new config sends upgrades nowhere: tunnels are refused.
    let path = proxy.dir.join("coregate.toml");
    let refusing = tunnel_config(&origin.addr, "", "max_tunnels = 0", "", &socket, &log);
    std::fs::write(&path, refusing).unwrap();
    let out = reload(&socket);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ws(&url, &[]), ["refused 503"]);
    held.go_on();
    let (lines, ok) = held.finish();
    assert!(ok, "{lines:?}");
    assert!(lines[0].starts_with("echoed 5 "), "{lines:?}");
    assert_eq!(lines[1], "closed 1000");
}

#[test]
fn max_tunnels_caps_the_open_tunnels_of_a_worker() {
    let origin = ws_origin();
    let (proxy, socket) = tunnel_proxy(&origin.addr, "", "max_tunnels = 1", "");
    let url = format!("ws://{}/echo", proxy.addr);
    let mut first = WsClient::start(&url, &["line", "close"]);
    assert_eq!(first.line(), "open");
    assert_eq!(ws(&url, &[]), ["refused 503"]);
    let rejected = &stats_total(&socket)["rejected"];
    assert_eq!(rejected["tunnel_limit"], 1, "{rejected}");
    first.go_on();
    let (lines, ok) = first.finish();
    assert!(ok && lines == ["closed 1000"], "{lines:?}");
    assert_eq!(stat_when(&socket, &["tunnels_open"], |n| n == 0), 0);
    assert_eq!(ws(&url, &["close"]), ["open", "closed 1000"]);
}

#[test]
fn drain_closes_tunnels_once_its_timeout_passes() {
    let origin = ws_origin();
    let (mut proxy, _socket) = tunnel_proxy(&origin.addr, "drain_timeout = \"1s\"", "", "");
    let mut held = WsClient::start(
        &format!("ws://{}/echo", proxy.addr),
        &["echo:1:1", "wait-close:60"],
    );
    assert_eq!(held.line(), "open");
    assert!(held.line().starts_with("echoed 1 "));
    proxy.signal(libc::SIGTERM);
    assert_eq!(held.line(), "closed");
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the drain timeout");
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr());
    assert!(
        proxy.stderr().contains("drain timeout: closing 1"),
        "{}",
        proxy.stderr()
    );
}

#[test]
fn an_open_tunnel_holds_its_inflight_slot() {
    let origin = ws_origin();
    let (proxy, socket) = tunnel_proxy(&origin.addr, "", "", "limits = { max_inflight = 1 }");
    let url = format!("ws://{}/echo", proxy.addr);
    let mut held = WsClient::start(&url, &["echo:1:1", "line", "close"]);
    assert_eq!(held.line(), "open");
    assert!(held.line().starts_with("echoed 1 "));
    // The route's one slot is the tunnel's while it is open.
    assert_eq!(ws(&url, &[]), ["refused 503"]);
    let rejected = &stats_total(&socket)["rejected"];
    assert_eq!(rejected["inflight"], 1, "{rejected}");
    held.go_on();
    let (lines, ok) = held.finish();
    assert!(ok && lines == ["closed 1000"], "{lines:?}");
    assert_eq!(stat_when(&socket, &["tunnels_open"], |n| n == 0), 0);
    assert_eq!(ws(&url, &["close"]), ["open", "closed 1000"]);
}
