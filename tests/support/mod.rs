//! Test harness: real processes on 127.0.0.1, each bounded in time and
//! stopped by PID when its handle drops.
//!
//! How the tests here wait, so that a busy machine slows them down
//! instead of failing them:
//! - Every wait polls its condition with a deadline: the proxy's own
//!   figures (`stat_when`, `admin`), a line it printed
//!   (`Proc::printed`), the origin's count of requests it is serving
//!   (`wait_origin_slow`). No fixed sleep stands in for "by now it has
//!   happened"; sleeps pace a load or a slow client, or space polls.
//! - No assertion on how long something took. Where a timeout is under
//!   test, the test shows which timer fired (the status it alone
//!   produces, the refusal counter, an end of stream the other timers
//!   cannot cause), and bounds latencies by what the client measured.
//! - No port found free and bound later: a peer gets the socket the
//!   test bound (`reserve_port`, `python_origin_on`, `pass_from_3`, nginx
//!   through `NGINX="3;"`), or binds port 0 and prints the address.

#![allow(dead_code)]

pub mod base64;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_coregate");

/// A fresh directory for one test's files.
pub fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "coregate-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A child process, sent SIGINT then SIGKILL when dropped (SIGINT: a
/// coregate drains at once, without SIGTERM's `drain_grace`).
pub struct Proc {
    pub child: Child,
    /// What the process printed as its address (host:port or a path).
    pub addr: String,
    pub dir: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident set size of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// The rest of the first stdout line starting with `prefix`, once
    /// printed (waited for 10 s at most), for a process [`start`]ed.
    pub fn printed(&self, prefix: &str) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let out = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
            if let Some(rest) = out.lines().find_map(|l| l.strip_prefix(prefix)) {
                return rest.trim().to_string();
            }
            assert!(Instant::now() < end, "no {prefix:?} line in:\n{out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGINT);
            if self.wait_exit(Duration::from_secs(3)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Start `cmd`, wait (up to 15 s) for a stdout line starting with
/// `marker`, and return the process with the text after the marker.
pub fn start(cmd: Command, marker: &str, dir: PathBuf) -> Proc {
    start_lines(cmd, marker, 1, dir).0
}

/// [`start`], waiting for `n` lines starting with `marker` (a process
/// with several listeners): the text after the marker on each, in order.
/// The process's `addr` is the first.
pub fn start_lines(mut cmd: Command, marker: &str, n: usize, dir: PathBuf) -> (Proc, Vec<String>) {
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = marker.to_string();
    let mut log = std::fs::File::create(dir.join("stdout.log")).expect("stdout log");
    std::thread::spawn(move || {
        // Every line is read, so the child never blocks on a full pipe,
        // and kept for `Proc::printed`.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let mut lines = Vec::new();
    while lines.len() < n {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                panic!("{cmd:?} did not print {n} {marker:?} lines within 15 s; stderr:\n{log}");
            }
        }
    }
    let addr = lines[0].clone();
    (Proc { child, addr, dir }, lines)
}

/// The Python test origin (tests/support/origin.py) on 127.0.0.1.
pub fn python_origin() -> Proc {
    let dir = temp_dir();
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/origin.py"));
    let mut p = start(cmd, "READY", dir);
    p.addr = format!("127.0.0.1:{}", p.addr);
    p
}

/// The Python test origin on a reserved port (a backend that starts, or
/// starts again): it listens on the reserved socket itself, so no other
/// process can have taken the port meanwhile.
pub fn python_origin_on(reserved: &Reserved) -> Proc {
    use std::os::fd::AsRawFd;
    let dir = temp_dir();
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/origin.py"))
        .args(["--fd", "3"]);
    pass_from_3(&mut cmd, vec![reserved.socket.as_raw_fd()]);
    let mut p = start(cmd, "READY", dir);
    p.addr = format!("127.0.0.1:{}", p.addr);
    p
}

/// The Python test origin on a UNIX socket.
pub fn python_origin_unix() -> Proc {
    let dir = temp_dir();
    let sock = dir.join("origin.sock");
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/origin.py"))
        .arg("--unix")
        .arg(&sock);
    start(cmd, "READY", dir)
}

/// coregate's own origin.
pub fn coregate_origin(body_size: usize) -> Proc {
    let dir = temp_dir();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "origin",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--body-size",
        &body_size.to_string(),
    ]);
    // The origin runs on the native core; COREGATE_TEST_DRIVER=epoll puts
    // it on that core's epoll backend.
    if let Ok(driver) = std::env::var("COREGATE_TEST_DRIVER") {
        cmd.args(["--driver", &driver]);
    }
    let mut p = start(cmd, "coregate origin listening on http://", dir);
    p.addr = p
        .addr
        .split_whitespace()
        .next()
        .expect("address")
        .to_string();
    p
}

/// coregate with this config text (its listener should use port 0).
pub fn coregate(config: &str, extra: &[&str]) -> Proc {
    coregate_in(temp_dir(), config, extra)
}

/// [`coregate`] with its files in `dir` (where the config may have put
/// an admin socket).
pub fn coregate_in(dir: PathBuf, config: &str, extra: &[&str]) -> Proc {
    let path = dir.join("coregate.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&path).args(extra);
    // COREGATE_TEST_DRIVER=epoll runs the suite on the epoll path; tests
    // that pick a driver themselves keep theirs.
    if let Ok(driver) = std::env::var("COREGATE_TEST_DRIVER")
        && !extra.contains(&"--driver")
    {
        cmd.args(["--driver", &driver]);
    }
    start(cmd, "coregate listening on http://", dir)
}

/// A one-route config in front of `backend` (a tcp:// or unix: URL).
pub fn config_for(backend: &str, upstream_extra: &str) -> String {
    format!(
        "[server]\ndrain_timeout = \"10s\"\ndrain_grace = \"0s\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\n\n\
         [upstream.app]\nbackends = [\"{backend}\"]\n{upstream_extra}\n\n[[route]]\nupstream = \"app\"\n"
    )
}

/// The proxy in front of a TCP origin, with `workers` workers.
pub fn proxy_to(origin: &Proc, upstream_extra: &str, extra: &[&str]) -> Proc {
    coregate(
        &config_for(&format!("tcp://{}", origin.addr), upstream_extra),
        extra,
    )
}

/// Run curl with a 20 s cap.
pub fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl")
}

/// `curl -o /dev/null -w %{http_code}` → status.
pub fn status_of(args: &[&str]) -> u16 {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    let out = curl(&all);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Send raw bytes, then read until the server closes or 5 s pass.
/// Returns what was read and whether the server closed.
pub fn raw_exchange(addr: &str, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

/// Status codes of every response in `raw`, in order (status lines only).
pub fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// A port nothing else can take: a socket bound to it without
/// SO_REUSEADDR and not listening, so a connection to it is refused until
/// a peer is handed the socket and listens on it ([`python_origin_on`]).
pub struct Reserved {
    pub socket: socket2::Socket,
    pub port: u16,
}

pub fn reserve_port() -> Reserved {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).expect("bind 127.0.0.1:0");
    let port = socket
        .local_addr()
        .unwrap()
        .as_socket()
        .expect("an inet address")
        .port();
    Reserved { socket, port }
}

/// A port where nothing listens, for the whole test run: reserved, and
/// the reservation kept (no other test or process can start a server
/// there).
pub fn dead_port() -> u16 {
    static KEPT: std::sync::Mutex<Vec<Reserved>> = std::sync::Mutex::new(Vec::new());
    let r = reserve_port();
    let port = r.port;
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    port
}

/// One admin-socket command's JSON answer, through coregate's own client.
pub fn admin(socket: &Path, command: &str) -> serde_json::Value {
    coregate::client::request(socket, command)
        .unwrap_or_else(|e| panic!("admin socket {}: {command}: {e:#}", socket.display()))
}

/// Read one response from `stream` (a head, then a Content-Length body):
/// its status and whether the server closes after it. `got_any` says
/// whether any byte came (a reused connection closed before any may be
/// retried, as HTTP clients do).
pub fn read_response(stream: &mut TcpStream, got_any: &mut bool) -> std::io::Result<(u16, bool)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        *got_any = true;
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok((status, text.contains("\r\nconnection: close")))
}

/// Make `fds` the child's descriptors 3, 4, ... (as systemd passes
/// sockets, and as the Python origin takes a reserved one).
pub fn pass_from_3(cmd: &mut Command, fds: Vec<i32>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only fcntl and dup2 run, which are
    // async-signal-safe; the descriptors belong to sockets the caller
    // keeps open until the child has started.
    unsafe {
        cmd.pre_exec(move || {
            // Each source is first copied above the targets, so that
            // placing one cannot overwrite another still to be placed.
            let mut high = Vec::new();
            for &fd in &fds {
                let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if copy < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(copy);
            }
            for (i, &fd) in high.iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Parse the Python origin's /echo JSON.
pub fn echo_json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

pub fn header<'a>(echo: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    echo["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|h| h[1].as_str())
}

/// sha256 of a file's bytes, in hex (sha256sum).
pub fn sha256_hex(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// How many `/slow` requests the Python origin at `origin` is serving
/// now, asked of it directly.
pub fn origin_slow(origin: &str) -> u64 {
    let (raw, _) = raw_exchange(
        origin,
        b"GET /inflight HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&raw);
    text.rsplit("\r\n\r\n")
        .next()
        .and_then(|b| b.trim().parse().ok())
        .unwrap_or(0)
}

/// Wait (10 s at most) until the Python origin at `origin` serves at
/// least `n` `/slow` requests: a request sent on is there, not a guess.
pub fn wait_origin_slow(origin: &str, n: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while origin_slow(origin) < n {
        assert!(
            Instant::now() < end,
            "{origin} never served {n} /slow requests"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `coregate reload` on the admin socket at `socket`.
pub fn reload(socket: &Path) -> Output {
    Command::new(BIN)
        .args(["reload", "--socket"])
        .arg(socket)
        .output()
        .expect("run coregate reload")
}

/// `coregate stats --json --per-core` on the admin socket at `socket`:
/// the process's `total` and each worker's report.
pub fn stats_json(socket: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["stats", "--json", "--per-core", "--socket"])
        .arg(socket)
        .output()
        .expect("run coregate stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

/// The process's figures (every worker's, merged): [`stats_json`]'s
/// `total`.
pub fn stats_total(socket: &Path) -> serde_json::Value {
    stats_json(socket)["total"].take()
}

/// The number at `path` (keys into [`stats_total`]) once `ok` holds for
/// it, polled for 10 s at most; the last value read.
pub fn stat_when(socket: &Path, path: &[&str], ok: impl Fn(u64) -> bool) -> u64 {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut v = stats_total(socket);
        for key in path {
            v = v[*key].take();
        }
        let n = v.as_u64().unwrap_or(u64::MAX);
        if ok(n) || Instant::now() > end {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
