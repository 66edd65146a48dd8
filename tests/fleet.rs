//! Beyond one machine: fleet-scoped rate limits shared through a real
//! `redis-server`, Redis going away and coming back, and the drain grace
//! a load balancer's readiness checks need.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Proc};

/// A `redis-server` on a UNIX socket of its own (no TCP port to race
/// for), stopped when dropped.
struct Redis {
    child: Child,
    socket: PathBuf,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let socket = dir.join("redis.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (installed by .ci/run)");
        let end = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < end, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, socket }
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// coregate with a fleet limit of `rate` for everyone together. The sync
/// interval is also the time Redis has to answer: 250 ms, so that a
/// shared, busy machine does not make a slow answer look like an outage.
fn fleet_proxy(origin: &Proc, redis_url: &str, rate: u32, admin: &Path) -> Proc {
    let config = format!(
        "[server]\ndrain_grace = \"0s\"\n\n\
         [fleet]\nredis = \"{redis_url}\"\ninstances = 2\nsync_interval = \"250ms\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\n\
         [listener.limits]\nrate = \"{rate}/s\"\nburst = 10\nprincipal = \"all\"\nscope = \"fleet\"\n\n\
         [upstream.app]\nbackends = [\"tcp://{}\"]\n\n[[route]]\nupstream = \"app\"\n",
        origin.addr
    );
    support::coregate(
        &config,
        &["--workers", "2", "--admin-socket", admin.to_str().unwrap()],
    )
}

/// What a paced run got: answers 200 and 429, and the 200s per second of
/// the time it really took.
struct Paced {
    ok: u64,
    limited: u64,
    rate: f64,
}

impl Paced {
    /// The admitted rate, checked to be the limiter's: some requests
    /// were refused, so the client offered more than the limit (else the
    /// rate would measure the client, on a slow machine).
    fn limited_rate(&self, what: &str) -> f64 {
        assert!(
            self.limited > 0,
            "{what}: no 429 in {} answers: the load did not reach the limit",
            self.ok
        );
        self.rate
    }

    /// [`Paced::limited_rate`], which must lie in `within`.
    fn assert_rate(&self, what: &str, within: std::ops::RangeInclusive<f64>) {
        let rate = self.limited_rate(what);
        assert!(
            within.contains(&rate),
            "{what}: {rate}/s ({} ok, {} limited)",
            self.ok,
            self.limited
        );
    }
}

/// Send `per_second` requests a second to `addr` for `length` over one
/// keep-alive connection.
fn paced(addr: &str, per_second: u32, length: Duration) -> Paced {
    let mut conn: Option<TcpStream> = None;
    let interval = Duration::from_secs(1) / per_second;
    let start = Instant::now();
    let mut next = start;
    let (mut ok, mut limited) = (0, 0);
    while start.elapsed() < length {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        next += interval;
        let mut s = match conn.take() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s
            }
        };
        s.write_all(b"GET / HTTP/1.1\r\nHost: fleet\r\n\r\n")
            .expect("send");
        let (status, closes) = support::read_response(&mut s, &mut false)
            .unwrap_or_else(|e| panic!("no whole answer (closed mid-answer?): {e}"));
        match status {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
        if !closes {
            conn = Some(s);
        }
    }
    Paced {
        ok,
        limited,
        rate: ok as f64 / start.elapsed().as_secs_f64(),
    }
}

/// The admin socket's `fleet` figures.
fn fleet_status(admin: &Path) -> serde_json::Value {
    support::admin(admin, "stats")["fleet"].clone()
}

fn wait_fleet_state(admin: &Path, state: &str) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let status = fleet_status(admin);
        if status["state"] == state {
            return status;
        }
        assert!(
            Instant::now() < end,
            "fleet state not {state} within 10 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two instances behind one fleet limit of 100/s (instances = 2): all the
/// load on one instance still gets the fleet's whole rate when Redis
/// answers (the local share alone would be 50/s), and half of it when
/// Redis is gone; spread over both, the two together get the fleet's
/// rate, not one each. Bounds are wide (the machine is shared); the
/// figures for the record come from scripts/bench fleet-demo.
#[test]
fn two_instances_share_a_fleet_limit_and_fall_back_while_redis_is_gone() {
    let dir = support::temp_dir();
    let redis = Redis::start(&dir);
    let origin = support::coregate_origin(16);
    let (admin_a, admin_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let a = fleet_proxy(&origin, &redis.url(), 100, &admin_a);
    let b = fleet_proxy(&origin, &redis.url(), 100, &admin_b);
    wait_fleet_state(&admin_a, "synced");
    wait_fleet_state(&admin_b, "synced");

    // All of it on A: the fleet's rate, 100/s, not the local share (50/s).
    let warm = paced(&a.addr, 200, Duration::from_secs(1));
    assert!(warm.ok > 0);
    paced(&a.addr, 200, Duration::from_secs(3)).assert_rate("A alone", 75.0..=130.0);

    // Spread over both: together the fleet's rate, not 100/s each.
    let t = std::thread::spawn({
        let addr = b.addr.clone();
        move || paced(&addr, 200, Duration::from_secs(4))
    });
    let on_a = paced(&a.addr, 200, Duration::from_secs(4));
    let on_b = t.join().unwrap();
    let rate = on_a.limited_rate("A beside B") + on_b.limited_rate("B beside A");
    assert!(
        (75.0..=135.0).contains(&rate),
        "A and B: {rate}/s ({} + {})",
        on_a.ok,
        on_b.ok
    );

    // Redis gone: the switch is counted once, requests keep flowing, and
    // A alone gets the local share.
    drop(redis);
    let status = wait_fleet_state(&admin_a, "local_share");
    assert_eq!(status["fallbacks"], 1, "{status}");
    paced(&a.addr, 200, Duration::from_millis(500));
    paced(&a.addr, 200, Duration::from_secs(3)).assert_rate("fallback", 35.0..=70.0);
    // Still one switch, however many syncs failed since.
    assert_eq!(fleet_status(&admin_a)["fallbacks"], 1);
    let log = a.stderr();
    assert_eq!(log.matches("unreachable").count(), 1, "{log}");

    // Redis back (empty, as after a restart): shares resume by themselves.
    let redis = Redis::start(&dir);
    wait_fleet_state(&admin_a, "synced");
    paced(&a.addr, 200, Duration::from_millis(500));
    paced(&a.addr, 200, Duration::from_secs(3)).assert_rate("after Redis returned", 75.0..=130.0);
    assert!(a.stderr().contains("answers again"));
    drop(redis);
}

/// SIGTERM with `drain_grace`: `/readyz` says draining at once while
/// requests are still served; then the listener closes and the process
/// exits.
#[test]
fn the_drain_grace_tells_the_balancer_first_and_serves_on() {
    let origin = support::coregate_origin(16);
    let config = support::config_for(&format!("tcp://{}", origin.addr), "")
        .replace("drain_grace = \"0s\"", "drain_grace = \"3s\"");
    let mut proxy = support::coregate(&config, &[]);
    let url = |path: &str| format!("http://{}{path}", proxy.addr);
    assert_eq!(support::status_of(&[&url("/readyz")]), 200);
    proxy.signal(libc::SIGTERM);
    // Ready no more, at once...
    let end = Instant::now() + Duration::from_secs(5);
    while support::status_of(&[&url("/readyz")]) != 503 {
        assert!(Instant::now() < end, "/readyz still 200 after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = support::curl(&[&url("/readyz")]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "not ready: draining\n"
    );
    // ...while requests are served (a few, well within the grace)...
    for _ in 0..5 {
        assert_eq!(support::status_of(&[&url("/")]), 200);
    }
    // ...until the grace ends: then the process exits.
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some());
    assert!(proxy.stderr().contains("SIGTERM: /readyz says draining"));
}
