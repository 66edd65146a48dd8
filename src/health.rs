//! Active health checks, run by one thread of the control side.
//!
//! Every `interval`, each backend of a group with `health_check` gets a
//! `GET PATH` on a new connection, bounded by `timeout`. A 2xx or 3xx
//! answer is a success. `unhealthy` failures in a row mark the backend
//! down, `healthy` successes in a row mark it up again; the mark is an
//! `AtomicBool` on the backend in the published snapshot, which workers
//! read (relaxed) when they pick: read-mostly, written only on a change.
//! A reload's new snapshot gets the marks of the backends it keeps when it
//! is published (`config::carry`); this thread keeps its streaks and
//! schedule by group name and label, the same key.
//!
//! Checks of one round run one after another on this thread, so a round
//! takes up to `timeout` per unreachable backend; with the defaults (1 s,
//! every 5 s) that covers a few unreachable backends per group before
//! rounds stretch. Owns: probing and the marks. Does not own: passive
//! health or picking (`balance`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::config::epoch::Published;
use crate::config::{BackendAddr, Check};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// How often the thread looks for checks that are due.
const TICK: Duration = Duration::from_millis(50);

/// Streaks of one backend, by `(group name, label)`.
#[derive(Default, Clone, Copy)]
struct Streak {
    ok: u32,
    failed: u32,
}

/// Start the checker thread. It runs for the life of the process and
/// follows reloads (which may add or remove checks); without checks it
/// only wakes to look at the epoch.
pub fn spawn(published: Arc<Published>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("coregate-health".into())
        .spawn(move || run(published))?;
    Ok(())
}

fn run(published: Arc<Published>) {
    let mut streaks: HashMap<(String, String), Streak> = HashMap::new();
    let mut due: HashMap<(String, String), Instant> = HashMap::new();
    let (mut epoch, mut snapshot) = published.load();
    loop {
        if published.epoch() != epoch {
            (epoch, snapshot) = published.load();
        }
        let now = Instant::now();
        for group in &snapshot.upstreams {
            let Some(check) = &group.health_check else {
                continue;
            };
            for backend in &group.backends {
                let key = (group.name.clone(), backend.label.clone());
                if due.get(&key).is_some_and(|t| *t > now) {
                    continue;
                }
                due.insert(key.clone(), now + check.interval);
                let tls = backend.tls_name.clone().zip(group.tls.clone());
                let ok = probe(&backend.addr, &backend.authority, check, tls);
                let streak = streaks.entry(key).or_default();
                if ok {
                    streak.ok += 1;
                    streak.failed = 0;
                } else {
                    streak.failed += 1;
                    streak.ok = 0;
                }
                let up = backend.healthy.load(Ordering::Relaxed);
                if up && streak.failed >= check.unhealthy {
                    backend.healthy.store(false, Ordering::Relaxed);
                    crate::warn!("health check: {} {} is down", group.name, backend.label);
                } else if !up && streak.ok >= check.healthy {
                    backend.healthy.store(true, Ordering::Relaxed);
                    crate::info!("health check: {} {} is up", group.name, backend.label);
                }
            }
        }
        std::thread::sleep(TICK);
    }
}

/// One check: connect (with TLS to an `https://` backend, verified as
/// the proxy verifies it), send the request, read the status line, all
/// within `timeout`.
fn probe(
    addr: &BackendAddr,
    authority: &str,
    check: &Check,
    tls: Option<(ServerName<'static>, Arc<ClientConfig>)>,
) -> bool {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: coregate-health\r\nConnection: close\r\n\r\n",
        check.path
    );
    let status = match addr {
        BackendAddr::Tcp(a) => TcpStream::connect_timeout(a, check.timeout).and_then(|mut s| {
            s.set_read_timeout(Some(check.timeout))?;
            s.set_write_timeout(Some(check.timeout))?;
            match tls {
                None => exchange(&mut s, &request),
                Some((name, config)) => {
                    let conn =
                        ClientConnection::new(config, name).map_err(std::io::Error::other)?;
                    exchange(&mut StreamOwned::new(conn, s), &request)
                }
            }
        }),
        BackendAddr::Unix(p) => UnixStream::connect(p).and_then(|mut s| {
            s.set_read_timeout(Some(check.timeout))?;
            s.set_write_timeout(Some(check.timeout))?;
            exchange(&mut s, &request)
        }),
    };
    matches!(status, Ok(200..=399))
}

fn exchange<S: Read + Write>(s: &mut S, request: &str) -> std::io::Result<u16> {
    s.write_all(request.as_bytes())?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        let got = s.read(&mut head[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let line = String::from_utf8_lossy(&head[..n]);
    line.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}
