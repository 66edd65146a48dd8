//! The admin UNIX socket and live reload.
//!
//! Protocol: the client sends one command line, the server answers and
//! closes. `reload`, `status`, `stats` and `drain` answer one JSON line;
//! `metrics` answers Prometheus text; `upgrade [BINARY]` answers one JSON
//! line once the new process serves or has failed (`upgrade`), and
//! `handover` is that new process asking for the listeners. The socket is created with mode 0600: only
//! its owner (and root) may reload the proxy or read its statistics.
//!
//! Owns: the socket's life (stale-file cleanup, permissions, removal at
//! exit), its thread, the reload sequence (load, validate, compile, check
//! against what cannot change live, publish). Does not own: what a snapshot
//! holds (`config`), how workers pick it up (`config::epoch`, `worker`), or
//! the client side of the socket (`client`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use crate::config::epoch::Published;
use crate::config::{self, Snapshot};
use crate::stats::hub::Hub;
use crate::stats::{COLLECT_TIMEOUT, Report, render};
use crate::upgrade::{Handover, Role, Sockets};

/// How long the admin thread waits for a client's command line.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What is running: reported by `reload` and `status`.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub epoch: u64,
    pub source: String,
    pub hash: u64,
    pub loaded_at: SystemTime,
    /// Reading, validating and compiling the file.
    pub load_time: Duration,
}

impl Loaded {
    /// systemd's `STATUS=` line: what `systemctl status` shows.
    pub fn status_line(&self) -> String {
        format!(
            "serving epoch {} of {} (fnv1a64:{:016x})",
            self.epoch, self.source, self.hash
        )
    }

    fn to_json(&self, ok: bool) -> serde_json::Value {
        let mut at = Vec::new();
        crate::access_log::rfc3339(&mut at, self.loaded_at);
        serde_json::json!({
            "ok": ok,
            "epoch": self.epoch,
            "config": self.source,
            "hash": format!("fnv1a64:{:016x}", self.hash),
            "loaded_at": String::from_utf8_lossy(&at),
            "load_ms": (self.load_time.as_secs_f64() * 1e6).round() / 1e3,
        })
    }
}

/// Loads the config file again and publishes it. Reloads are serialised:
/// SIGHUP and the admin socket may ask at the same time.
pub struct Reloader {
    /// `None` for a quick proxy started without a file.
    path: Option<PathBuf>,
    published: Arc<Published>,
    last: Mutex<Loaded>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, published: Arc<Published>, load_time: Duration) -> Reloader {
        let (epoch, snapshot) = published.load();
        Reloader {
            path,
            last: Mutex::new(Loaded {
                epoch,
                source: snapshot.source.clone(),
                hash: snapshot.hash,
                loaded_at: SystemTime::now(),
                load_time,
            }),
            published,
        }
    }

    /// `server.drain_grace` of the configuration running now.
    pub fn drain_grace(&self) -> Duration {
        self.published.load().1.drain_grace
    }

    pub fn status(&self) -> Loaded {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Load, validate, compile and publish. On any error the running
    /// configuration stays and the error says why, with file, line and key.
    pub fn reload(&self) -> Result<Loaded, String> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else {
            return Err(
                "started without a config file (--listen/--upstream): nothing to reload".into(),
            );
        };
        let start = Instant::now();
        let next = config::load(path).map_err(|e| e.to_string())?;
        let (_, running) = self.published.load();
        live_compatible(&running, &next)?;
        if let Some(p) = &next.access_log {
            crate::access_log::open(p)
                .map_err(|e| format!("{}: server.access_log: {}: {e}", next.source, p.display()))?;
        }
        let load_time = start.elapsed();
        let (source, hash) = (next.source.clone(), next.hash);
        *last = Loaded {
            epoch: self.published.publish(Arc::new(next)),
            source,
            hash,
            loaded_at: SystemTime::now(),
            load_time,
        };
        Ok(last.clone())
    }

    /// Reload and log the outcome (SIGHUP has nobody to answer). systemd
    /// hears `RELOADING=1` before and `READY=1` with the epoch after, so
    /// `systemctl reload` and `status` follow it.
    pub fn reload_and_log(&self, trigger: &str) -> Result<Loaded, String> {
        crate::systemd::notify(&format!(
            "RELOADING=1\n{}",
            crate::systemd::monotonic_usec()
        ));
        let result = self.reload();
        crate::systemd::notify(&format!("READY=1\nSTATUS={}", self.status().status_line()));
        match &result {
            Ok(l) => crate::info!(
                "{trigger}: reloaded {} (epoch {}, fnv1a64:{:016x}, {:.1} ms)",
                l.source,
                l.epoch,
                l.hash,
                l.load_time.as_secs_f64() * 1e3
            ),
            Err(e) => crate::warn!("{trigger}: reload refused; configuration unchanged:\n{e}"),
        }
        result
    }
}

/// Listening sockets are bound once, before workers start: their
/// addresses cannot change without a restart.
fn live_compatible(running: &Snapshot, next: &Snapshot) -> Result<(), String> {
    let addrs = |s: &Snapshot| s.listeners.iter().map(|l| l.addr).collect::<Vec<_>>();
    if addrs(running) != addrs(next) {
        return Err(format!(
            "{}: listener: the listen addresses changed ({:?} -> {:?}); that needs a restart",
            next.source,
            addrs(running),
            addrs(next)
        ));
    }
    if running.user != next.user {
        crate::warn!(
            "{}: server.user changed; the process keeps its user until a restart",
            next.source
        );
    }
    if running.admin_socket != next.admin_socket {
        crate::warn!(
            "{}: server.admin_socket changed; the socket stays where it is until a restart",
            next.source
        );
    }
    Ok(())
}

/// Ask the control thread to drain, as an operator's SIGTERM would (the
/// `drain` command, a finished upgrade).
pub fn request_drain() {
    // SAFETY: kill(2) on our own process with a signal the control thread
    // handles.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

/// The bound admin socket. Removes its file when dropped, unless the path
/// holds another process's socket by then (the one we upgraded to).
pub struct AdminSocket {
    path: PathBuf,
    /// Where an upgraded process's socket waits until it serves
    /// (`install`).
    staged: Option<PathBuf>,
    /// The socket file's device and inode.
    id: Option<(u64, u64)>,
}

impl AdminSocket {
    /// After an upgrade's `ready`: the old process has moved our staged
    /// socket onto the path (or failed to, and said so); from now on the
    /// file to remove at exit is wherever our socket is.
    pub fn settle(&mut self) {
        if self.staged.is_some() && crate::upgrade::file_id(&self.path) == self.id {
            self.staged = None;
        }
    }

    /// Hand the socket file to the user the process is about to run as
    /// (`server.user`), so that a process it upgrades to, started as that
    /// user, can still connect to it.
    pub fn give_to(&self, uid: libc::uid_t, gid: libc::gid_t) -> anyhow::Result<()> {
        let path = self.staged.as_ref().unwrap_or(&self.path);
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown admin socket {}", path.display()))
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let path = self.staged.as_ref().unwrap_or(&self.path);
        crate::upgrade::remove_if_ours(path, self.id);
    }
}

/// What the admin thread answers with.
pub struct Serving {
    pub reloader: Arc<Reloader>,
    pub hub: Arc<Hub>,
    /// Present when this process can be upgraded (`upgrade`, `handover`).
    pub handover: Option<Arc<Handover>>,
}

/// Bind the admin socket at `path` (mode 0600) and serve it on its own
/// thread. A stale socket file (no one answers) is replaced; a live one
/// means another coregate runs there, and is an error, unless `staged`:
/// a process started by an upgrade binds beside the path, and the old
/// process moves the socket onto it once the new one serves.
pub fn serve(path: &Path, serving: Serving, staged: bool) -> anyhow::Result<AdminSocket> {
    let bind_at = if staged {
        let p = crate::upgrade::staged_path(path, std::process::id());
        let _ = std::fs::remove_file(&p);
        p
    } else {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "admin socket {}: another process is listening there",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("remove stale admin socket {}", path.display()))?;
        }
        path.to_path_buf()
    };
    // SAFETY: umask only swaps the process file-creation mask. Called from
    // the control thread before any worker exists, so no other thread can
    // create a file under the narrowed mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&bind_at);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("bind admin socket {}", bind_at.display()))?;
    std::fs::set_permissions(&bind_at, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", bind_at.display()))?;
    let id = crate::upgrade::file_id(&bind_at);
    let serving = Arc::new(serving);
    std::thread::Builder::new()
        .name("coregate-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => answer(stream, &serving),
                    Err(e) => {
                        crate::warn!("admin socket: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("spawn the admin thread")?;
    Ok(AdminSocket {
        path: path.to_path_buf(),
        staged: staged.then_some(bind_at),
        id,
    })
}

fn answer(stream: UnixStream, serving: &Serving) {
    let Serving {
        reloader,
        hub,
        handover,
    } = serving;
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream).take(1024);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match line.trim() {
        "handover" => {
            // A process we started to upgrade to, asking for the
            // listeners: the upgrade's thread takes the connection.
            match handover {
                Some(h) => h.accept_child(stream),
                None => {
                    let mut out = &stream;
                    let _ = writeln!(out, "{}", no_upgrade());
                }
            }
            return;
        }
        command if command == "upgrade" || command.starts_with("upgrade ") => {
            let binary = command
                .strip_prefix("upgrade ")
                .map(|b| PathBuf::from(b.trim()));
            match handover {
                Some(h) => {
                    crate::info!("admin socket: upgrade requested");
                    // The upgrade's thread answers when it has ended.
                    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                    h.begin(binary, Some(stream), request_drain);
                    return;
                }
                None => no_upgrade(),
            }
        }
        "reload" => match reloader.reload_and_log("admin socket") {
            Ok(l) => l.to_json(true),
            Err(e) => {
                serde_json::json!({ "ok": false, "error": e, "running": reloader.status().to_json(true) })
            }
        },
        "status" => reloader.status().to_json(true),
        "stats" => {
            let workers = hub.collect(COLLECT_TIMEOUT);
            let total = Report::merge(&workers);
            serde_json::json!({
                "ok": true,
                "total": total,
                "workers": workers,
                "fleet": hub.fleet.to_json(),
            })
        }
        "drain" => {
            // The control thread owns the drain and waits for its signals
            // (`control::run_until_signal`): ask it the way an operator's
            // SIGTERM would.
            crate::info!("admin socket: drain requested");
            request_drain();
            serde_json::json!({ "ok": true, "draining": true })
        }
        "metrics" => {
            let mut out = &stream;
            let _ = out.write_all(metrics_text(hub).as_bytes());
            return;
        }
        other => serde_json::json!({
            "ok": false,
            "error": format!("unknown command {other:?}; commands: reload, status, stats, metrics, drain, upgrade [BINARY]"),
        }),
    };
    let mut out = &stream;
    let _ = writeln!(out, "{reply}");
}

/// The Prometheus text of the workers' figures and the fleet thread's.
fn metrics_text(hub: &Hub) -> String {
    let mut text = render::prometheus(&hub.collect(COLLECT_TIMEOUT));
    text.push_str(&hub.fleet.prometheus());
    text
}

fn no_upgrade() -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": "this process cannot be upgraded: only `coregate run` can" })
}

/// Serve `GET /metrics` (Prometheus text) over HTTP on a loopback
/// address (`server.metrics_listen`), one scrape at a time on its own
/// thread. Returns the bound address (port 0 picks one). A socket handed
/// over by an upgrade (`inherited`) is used instead of binding; with a
/// `handover`, a duplicate is kept for the next upgrade, and the thread
/// stops accepting once a new process has taken over.
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    hub: Arc<Hub>,
    inherited: Option<Sockets>,
    handover: Option<Arc<Handover>>,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = match inherited.filter(|s| s.serves(addr)) {
        Some(mut s) => {
            crate::upgrade::tcp_listener(s.fds.remove(0), "the inherited metrics listener")?
        }
        None => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("server.metrics_listen: cannot listen on {addr}"))?;
            l.set_nonblocking(true)?;
            l
        }
    };
    let bound = listener.local_addr()?;
    if let Some(h) = &handover {
        h.keep(Sockets {
            role: Role::Metrics,
            configured: Some(addr),
            bound,
            fds: vec![listener.try_clone()?.into()],
        });
    }
    std::thread::Builder::new()
        .name("coregate-metrics".into())
        .spawn(move || {
            let mut poll = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                events: libc::POLLIN,
                revents: 0,
            };
            while !handover.as_ref().is_some_and(|h| h.handed_over()) {
                // SAFETY: poll reads and writes the one pollfd we own.
                let ready = unsafe { libc::poll(&mut poll, 1, 250) };
                if ready <= 0 {
                    continue;
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        scrape(stream, &hub);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        crate::warn!("metrics listener: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("spawn the metrics thread")?;
    Ok(bound)
}

/// Answer one HTTP request: the metrics for `GET /metrics`, 404 for other
/// paths, 405 for other methods; the connection closes after.
fn scrape(stream: std::net::TcpStream, hub: &Hub) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut reader = BufReader::new(&stream).take(8192);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // The rest of the head is read and ignored.
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim_end() != "" {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics_text(hub),
        ),
        (_, "/metrics") => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
        _ => ("404 Not Found", "text/plain", "see /metrics\n".into()),
    };
    let mut out = &stream;
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        let _ = out.write_all(body.as_bytes());
    }
}
