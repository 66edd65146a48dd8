//! Running under a service manager: systemd's readiness notifications,
//! socket activation, privilege drop, and the binary upgrade under load.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, BIN, Proc};

/// The next notification on `socket` (each is one datagram), at most 15 s.
fn next_notification(socket: &UnixDatagram) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 15 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Notifications until one contains `wanted`; all of them, in order.
fn notifications_until(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let n = next_notification(socket);
        let done = n.contains(wanted);
        seen.push(n);
        if done {
            return seen;
        }
    }
}

fn coregate_notifying(config: &str, notify: &Path, extra: &[&str]) -> Proc {
    coregate_printing(config, notify, extra, &["coregate listening on http://"]).0
}

/// coregate with `NOTIFY_SOCKET`, once it has printed a line starting with
/// each of `markers`: the rest of each line, in the order of `markers`.
fn coregate_printing(
    config: &str,
    notify: &Path,
    extra: &[&str],
    markers: &[&str],
) -> (Proc, Vec<String>) {
    let dir = support::temp_dir();
    let path = dir.join("coregate.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .args(extra)
        .env("NOTIFY_SOCKET", notify)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Every line is read, so the child never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut found: Vec<Option<String>> = vec![None; markers.len()];
    while found.iter().any(Option::is_none) {
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("coregate did not print {markers:?} within 15 s"));
        for (m, slot) in markers.iter().zip(&mut found) {
            if let Some(rest) = line.strip_prefix(m) {
                *slot = Some(rest.trim().to_string());
            }
        }
    }
    let found: Vec<String> = found.into_iter().map(Option::unwrap).collect();
    let addr = found[0].clone();
    (Proc { child, addr, dir }, found)
}

/// What the systemd tests share: a notification socket as systemd's, an
/// origin, a config in front of it and a path for the admin socket.
struct Managed {
    notify_path: std::path::PathBuf,
    notify: UnixDatagram,
    admin: std::path::PathBuf,
    config: String,
    _origin: Proc,
}

impl Managed {
    fn new() -> Managed {
        let dir = support::temp_dir();
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let origin = support::coregate_origin(16);
        Managed {
            admin: dir.join("admin.sock"),
            config: support::config_for(&format!("tcp://{}", origin.addr), ""),
            notify_path,
            notify,
            _origin: origin,
        }
    }
}

#[test]
fn readiness_reloads_and_the_drain_are_told_to_systemd() {
    let m = Managed::new();
    let (notify_path, notify, admin) = (&m.notify_path, &m.notify, &m.admin);
    let proxy = coregate_notifying(
        &m.config,
        notify_path,
        &["--admin-socket", admin.to_str().unwrap()],
    );
    // READY=1 comes once every worker accepts, with the epoch serving.
    let ready = next_notification(notify);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("STATUS=serving epoch 1 of "), "{ready:?}");
    assert_eq!(
        support::status_of(&[&format!("http://{}/", proxy.addr)]),
        200
    );

    // A reload through the admin socket and one through SIGHUP: each is
    // RELOADING=1 with the monotonic clock, then READY=1 with the epoch.
    let out = support::reload(admin);
    assert!(out.status.success(), "{out:?}");
    let reloading = next_notification(notify);
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    let again = next_notification(notify);
    assert!(
        again.starts_with("READY=1\nSTATUS=serving epoch 2 of "),
        "{again:?}"
    );
    proxy.signal(libc::SIGHUP);
    let seen = notifications_until(notify, "READY=1");
    assert!(seen[0].starts_with("RELOADING=1\n"), "{seen:?}");
    assert!(
        seen.last().unwrap().contains("STATUS=serving epoch 3 of "),
        "{seen:?}"
    );

    // The drain says STOPPING=1 at once.
    proxy.signal(libc::SIGTERM);
    let stopping = next_notification(notify);
    assert_eq!(stopping, "STOPPING=1\nSTATUS=draining");
}

/// Start coregate as systemd would with `listeners` passed from fd 3 on:
/// LISTEN_PID is the process's own (the shell's PID, kept by exec).
fn socket_activated(config: &str, listeners: &[&TcpListener], names: &str) -> Proc {
    let fds = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let (cmd, dir) = activated_command(config, fds, names);
    support::start(cmd, "coregate listening on http://", dir)
}

/// `coregate run` on `config` with `fds` passed from 3 on, and the
/// directory of its files.
fn activated_command(config: &str, fds: Vec<i32>, names: &str) -> (Command, std::path::PathBuf) {
    let dir = support::temp_dir();
    let path = dir.join("coregate.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names);
    support::pass_from_3(&mut cmd, fds);
    (cmd, dir)
}

#[test]
fn socket_activation_serves_the_passed_listener_and_binds_the_rest() {
    let origin = support::coregate_origin(16);
    let passed = TcpListener::bind("127.0.0.1:0").unwrap();
    let stray = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = passed.local_addr().unwrap();
    let config = format!(
        "[[listener]]\nlisten = \"{addr}\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstream.app]\nbackends = [\"tcp://{}\"]\n\n[[route]]\nupstream = \"app\"\n",
        origin.addr
    );
    let proxy = socket_activated(&config, &[&passed, &stray], "web:stray");
    assert_eq!(proxy.addr, addr.to_string());
    // The passed socket serves: this test's own copy is not SO_REUSEPORT,
    // so coregate could not have bound the address itself.
    assert_eq!(support::status_of(&[&format!("http://{addr}/")]), 200);
    let log = proxy.stderr();
    assert!(
        log.contains(&format!("listener {addr}: 1 inherited sockets on {addr}")),
        "{log}"
    );
    // A passed socket no listener is configured for is closed, said so.
    let stray_addr = stray.local_addr().unwrap();
    assert!(
        log.contains(&format!(
            "inherited listener {stray_addr} serves no [[listener]]"
        )),
        "{log}"
    );
    drop(proxy);

    // A passed descriptor that is not a listening socket is an error
    // naming it.
    let client = TcpStream::connect(addr).unwrap();
    let (mut cmd, _dir) = activated_command(&config, vec![client.as_raw_fd()], "web");
    cmd.stdout(Stdio::null());
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("LISTEN_FDS #0 (web) (fd 3) is not a listening socket"),
        "{err}"
    );
}

/// The uid and gid lines of every thread of `pid`.
fn thread_ids(pid: i32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push((field("Uid:"), field("Gid:"), field("Groups:")));
    }
    out
}

#[test]
fn started_as_root_every_thread_runs_as_the_configured_user() {
    // SAFETY: geteuid only reads our credentials.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the privilege drop needs the suite to run as root (CI does)");
        return;
    }
    let origin = support::coregate_origin(16);
    let config = support::config_for(&format!("tcp://{}", origin.addr), "")
        .replace("[server]\n", "[server]\nuser = \"nobody\"\n");
    let proxy = support::coregate(&config, &["--workers", "2"]);
    assert_eq!(
        support::status_of(&[&format!("http://{}/", proxy.addr)]),
        200
    );
    let nobody = "65534 65534 65534 65534";
    let ids = thread_ids(proxy.pid());
    // At least the main (control) thread, the health checker's and the
    // two workers'.
    assert!(ids.len() >= 3, "{ids:?}");
    for (uid, gid, groups) in &ids {
        assert_eq!(uid, nobody, "{ids:?}");
        assert_eq!(gid, nobody, "{ids:?}");
        assert!(!groups.split(' ').any(|g| g == "0"), "{ids:?}");
    }

    // An upgrade of a process that switched users: the admin socket was
    // handed to the user, so the new process (started as that user) takes
    // the listeners over, in a directory the user may write in.
    let admin_dir = support::temp_dir();
    std::os::unix::fs::chown(&admin_dir, Some(65534), Some(65534)).unwrap();
    let admin = admin_dir.join("admin.sock");
    let mut old = support::coregate(
        &config,
        &["--workers", "2", "--admin-socket", admin.to_str().unwrap()],
    );
    let out = upgrade(&admin, None);
    assert!(out.status.success(), "{out:?}");
    let new = Adopted(upgraded_pid(&out));
    assert!(old.wait_exit(Duration::from_secs(15)).is_some());
    assert_eq!(support::status_of(&[&format!("http://{}/", old.addr)]), 200);
    for (uid, gid, _) in thread_ids(new.0) {
        assert_eq!((uid.as_str(), gid.as_str()), (nobody, nobody));
    }
    drop(new);

    // A user that cannot be switched to: the process refuses to run on.
    let out = Command::new(BIN)
        .args(["run", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(format!("tcp://{}", origin.addr))
        .args(["--user", "no-such-user-coregate"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to run on: no user \"no-such-user-coregate\""),
        "{err}"
    );
}

/// A process that is not our child (the upgraded one), stopped by PID.
struct Adopted(i32);

impl Adopted {
    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.0)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.0))
                .unwrap_or_default()
                .contains(") Z ")
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID the upgrade reported, ours to stop.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while self.alive() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            // SAFETY: as above.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

fn upgrade(admin: &Path, binary: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["upgrade", "--socket"]).arg(admin);
    if let Some(b) = binary {
        cmd.args(["--binary", b]);
    }
    cmd.output().unwrap()
}

/// The PID `coregate upgrade` printed.
fn upgraded_pid(out: &std::process::Output) -> i32 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.strip_prefix("upgraded: process ")
        .and_then(|t| t.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PID in {out:?}"))
}

fn admin_status(admin: &Path) -> serde_json::Value {
    support::admin(admin, "status")
}

#[test]
fn a_failed_upgrade_changes_nothing_and_a_good_one_tells_systemd_the_new_pid() {
    let m = Managed::new();
    let (notify_path, notify, admin) = (&m.notify_path, &m.notify, &m.admin);
    // A metrics listener too: the new process takes it over like the
    // others (a fixed port could not be bound twice).
    let config = m
        .config
        .replace("[server]\n", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n");
    let (mut old, printed) = coregate_printing(
        &config,
        notify_path,
        &["--admin-socket", admin.to_str().unwrap()],
        &["coregate listening on http://", "metrics on http://"],
    );
    let url = format!("http://{}/", old.addr);
    let metrics = format!("http://{}", printed[1]);
    assert_eq!(support::status_of(&[&metrics]), 200);
    assert!(next_notification(notify).starts_with("READY=1"));
    assert!(support::reload(admin).status.success());
    notifications_until(notify, "READY=1");
    let before = admin_status(admin);
    assert_eq!(before["epoch"], 2);

    // A binary that exits at once, and one that is not there: refused,
    // and the running process serves as before, reload and all.
    for bad in ["/bin/false", "/nonexistent/coregate"] {
        let out = upgrade(admin, Some(bad));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{out:?}");
        assert!(
            err.contains("upgrade refused; the running process keeps serving"),
            "{err}"
        );
        assert_eq!(admin_status(admin)["epoch"], 2);
        assert_eq!(support::status_of(&[&url]), 200);
        assert!(old.child.try_wait().unwrap().is_none());
    }
    assert!(
        String::from_utf8_lossy(&upgrade(admin, Some("/bin/false")).stderr)
            .contains("exited (exit status: 1) before it was ready")
    );

    // The real binary: the old process names the new main PID, the new
    // one is ready, the old one drains and exits, the address serves on.
    let out = upgrade(admin, None);
    assert!(out.status.success(), "{out:?}");
    let new = Adopted(upgraded_pid(&out));
    let seen = notifications_until(notify, "READY=1");
    assert!(
        seen.iter()
            .any(|n| n.starts_with(&format!("MAINPID={}\n", new.0))),
        "{seen:?}"
    );
    assert!(old.wait_exit(Duration::from_secs(15)).is_some());
    // The old process told systemd nothing of its drain: the service
    // did not stop.
    notify
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.recv(&mut buf) {
        assert!(
            !String::from_utf8_lossy(&buf[..n]).contains("STOPPING"),
            "the old process said STOPPING"
        );
    }
    assert!(new.alive());
    assert_eq!(support::status_of(&[&url]), 200);
    // The metrics address answers on, from the new process alone.
    assert_eq!(support::status_of(&[&metrics]), 200);
    // The admin socket is the new process's now (and was not removed by
    // the old one's exit): it reloads the new process, from epoch 1.
    assert_eq!(admin_status(admin)["epoch"], 1);
}

/// What the load saw.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    ok: u64,
    failed: u64,
    refused: u64,
    /// Requests sent again on a new connection because a reused
    /// keep-alive connection closed before any byte of the answer (what
    /// HTTP clients do, RFC 9112 9.3.1).
    retried: u64,
    errors: Vec<String>,
}

/// One load thread: `rate` requests a second until `end`, each on a new
/// connection (`keep_alive` false) or over one kept connection.
fn load(addr: String, rate: u64, end: Instant, keep_alive: bool, tally: Arc<Mutex<Tally>>) {
    let mut t = Tally::default();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut next = Instant::now();
    let mut conn: Option<TcpStream> = None;
    let request = if keep_alive {
        "GET / HTTP/1.1\r\nHost: load\r\n\r\n"
    } else {
        "GET / HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n"
    };
    while Instant::now() < end {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        t.sent += 1;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reused = conn.is_some();
            let mut stream = match conn.take() {
                Some(s) => s,
                None => match TcpStream::connect(&addr) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        s
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        t.refused += 1;
                        break;
                    }
                    Err(e) => {
                        t.failed += 1;
                        t.errors.push(format!("connect: {e}"));
                        break;
                    }
                },
            };
            let mut got_any = false;
            let result = stream
                .write_all(request.as_bytes())
                .and_then(|_| support::read_response(&mut stream, &mut got_any));
            match result {
                Ok((200, closes)) => {
                    t.ok += 1;
                    if keep_alive && !closes {
                        conn = Some(stream);
                    }
                    break;
                }
                Ok((status, _)) => {
                    t.failed += 1;
                    t.errors.push(format!("status {status}"));
                    break;
                }
                Err(_) if reused && !got_any && attempt == 1 => {
                    t.retried += 1;
                }
                Err(e) => {
                    t.failed += 1;
                    t.errors.push(format!("reused {reused}: {e}"));
                    break;
                }
            }
        }
    }
    let mut all = tally.lock().unwrap();
    all.sent += t.sent;
    all.ok += t.ok;
    all.failed += t.failed;
    all.refused += t.refused;
    all.retried += t.retried;
    all.errors.extend(t.errors.into_iter().take(5));
}

/// The bounded load: 2,000 req/s for 10 s, half on new
/// connections and half over keep-alive ones, with one upgrade in the
/// middle. Figures: `cargo test --test integration deploy::upgrade_under_load
/// -- --nocapture`.
#[test]
fn upgrade_under_load_refuses_no_connection_and_fails_no_request() {
    let dir = support::temp_dir();
    let origin = support::coregate_origin(128);
    let admin = dir.join("admin.sock");
    let config = support::config_for(&format!("tcp://{}", origin.addr), "");
    let mut old = support::coregate(
        &config,
        &["--admin-socket", admin.to_str().unwrap(), "--workers", "2"],
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs(10);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (addr, tally) = (old.addr.clone(), tally.clone());
            std::thread::spawn(move || load(addr, 250, end, i % 2 == 0, tally))
        })
        .collect();
    // The upgrade once the load is under way: 5,000 answers in (of about
    // 20,000), with most of the run still to come.
    let answered = support::stat_when(&admin, &["responses", "2xx"], |n| {
        (5_000..u64::MAX).contains(&n)
    });
    assert!(
        (5_000..u64::MAX).contains(&answered),
        "the load is not under way"
    );
    let out = upgrade(&admin, None);
    assert!(out.status.success(), "{out:?}");
    let new = Adopted(upgraded_pid(&out));
    let upgraded_at = start.elapsed();
    for t in threads {
        t.join().unwrap();
    }
    let t = tally.lock().unwrap();
    println!(
        "upgrade under load: sent {} ok {} failed {} refused {} retried {} (upgrade at {:.1}s)",
        t.sent,
        t.ok,
        t.failed,
        t.refused,
        t.retried,
        upgraded_at.as_secs_f64()
    );
    assert_eq!(t.refused, 0, "{t:?}");
    assert_eq!(t.failed, 0, "{t:?}");
    // The old process answered its keep-alive connections' next request
    // with Connection: close instead of closing them idle: no client had
    // to retry.
    assert_eq!(t.retried, 0, "{t:?}");
    assert_eq!(t.ok, t.sent, "{t:?}");
    assert!(old.wait_exit(Duration::from_secs(15)).is_some());
    assert!(new.alive());
}
