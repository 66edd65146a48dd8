//! WebSocket load for coregate's tunnel benchmark (`scripts/bench ws`),
//! on tungstenite: the same echo server behind every proxy, a closed-loop
//! echo client, and a holder of idle tunnels.
//!
//!   ws-load serve --listen 127.0.0.1:9100
//!   ws-load echo --url ws://127.0.0.1:8080/ --conns 50 --size 1024 --duration 5
//!   ws-load hold --url ws://127.0.0.1:8080/ --conns 10000
//!
//! `echo` prints one JSON line: messages echoed, seconds, rate and latency
//! percentiles. `hold` opens its tunnels one after another, prints
//! `held N`, and closes them when a line (or end of input) comes on stdin.

use std::io::BufRead;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn num(args: &[String], name: &str, default: u64) -> u64 {
    let v = arg(args, name, &default.to_string());
    v.parse()
        .unwrap_or_else(|_| fail(&format!("{name}: {v:?} is not a number")))
}

fn fail(msg: &str) -> ! {
    eprintln!("ws-load: {msg}");
    std::process::exit(2)
}

/// Echo every data message back until the peer goes.
fn serve(listen: &str) {
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| fail(&format!("{listen}: {e}")));
    println!("listening on {}", listener.local_addr().expect("bound"));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        // Small stacks: ten thousand idle tunnels are ten thousand threads.
        let _ = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                loop {
                    match ws.read() {
                        Ok(m @ (Message::Binary(_) | Message::Text(_))) => {
                            if ws.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
    }
}

fn open(url: &str) -> WebSocket<TcpStream> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| fail(&format!("{url}: not a ws:// URL")));
    let stream =
        TcpStream::connect(authority).unwrap_or_else(|e| fail(&format!("{authority}: {e}")));
    stream.set_nodelay(true).expect("nodelay");
    match tungstenite::client(url, stream) {
        Ok((ws, _)) => ws,
        Err(e) => fail(&format!("{url}: handshake: {e}")),
    }
}

/// `conns` connections, each sending a `size`-byte message and waiting
/// for it to come back, for `seconds`.
fn echo(url: &str, conns: usize, size: usize, seconds: u64) {
    let start = Arc::new(Barrier::new(conns + 1));
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let mut ws = open(url);
            let start = start.clone();
            std::thread::spawn(move || {
                let payload: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
                let mut latencies = Vec::new();
                start.wait();
                let end = Instant::now() + Duration::from_secs(seconds);
                while Instant::now() < end {
                    let sent = Instant::now();
                    ws.send(Message::binary(payload.clone())).expect("send");
                    loop {
                        match ws.read().expect("read") {
                            Message::Binary(b) => {
                                assert_eq!(b.len(), size, "an echo of another size");
                                break;
                            }
                            Message::Close(_) => fail("the server closed"),
                            _ => {}
                        }
                    }
                    latencies.push(sent.elapsed().as_micros() as u32);
                }
                let _ = ws.close(None);
                let _ = ws.flush();
                latencies
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut all: Vec<u32> = Vec::new();
    for t in threads {
        all.extend(t.join().expect("a load thread"));
    }
    let elapsed = began.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"messages\": {}, \"seconds\": {elapsed:.3}, \"rate\": {:.1}, \"p50_us\": {}, \"p99_us\": {}}}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
}

/// Open `conns` tunnels and keep them quiet until told.
fn hold(url: &str, conns: usize) {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        held.push(open(url));
    }
    println!("held {}", held.len());
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = arg(&args, "--url", "ws://127.0.0.1:8080/");
    let conns = num(&args, "--conns", 50) as usize;
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&arg(&args, "--listen", "127.0.0.1:9100")),
        Some("echo") => echo(
            &url,
            conns,
            num(&args, "--size", 1024) as usize,
            num(&args, "--duration", 5),
        ),
        Some("hold") => hold(&url, conns),
        _ => fail("usage: ws-load serve|echo|hold [--listen A] [--url U] [--conns N] [--size B] [--duration S]"),
    }
}
