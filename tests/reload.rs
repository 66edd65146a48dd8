//! Live reload: SIGHUP and `coregate reload` over the admin socket, under
//! load, with valid and invalid configs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// Config `which` ("A" or "B"): `/p` is proxied with X-Config set on the
/// request and on the response; `/a/` answers only under A, `/b/` only
/// under B.
fn config(which: &str, origin: &str, admin: &Path) -> String {
    let own = which.to_ascii_lowercase();
    format!(
        r#"[server]
admin_socket = "{admin}"

[[listener]]
listen = "127.0.0.1:0"

[upstream.app]
backends = ["tcp://{origin}"]

[[route]]
path = "/p"
upstream = "app"
rewrite = "/echo"
request_headers = {{ set = {{ "X-Config" = "{which}" }} }}
response_headers = {{ set = {{ "X-Config" = "{which}" }} }}

[[route]]
path_prefix = "/{own}/"
respond = {{ status = 200, body = "{which}" }}
"#,
        admin = admin.display()
    )
}

#[test]
fn reload_under_load_never_fails_or_mixes_configs() {
    let origin = python_origin();
    let dir = temp_dir();
    let admin = dir.join("admin.sock");
    let proxy = coregate(&config("A", &origin.addr, &admin), &["--workers", "2"]);
    let path = proxy.dir.join("coregate.toml");
    let mode = std::fs::metadata(&admin)
        .expect("admin socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode");

    let mut load = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/load.py"))
        .args(["--addr", &proxy.addr, "--rate", "200", "--duration", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start load.py");
    // The load runs before the first reload: its first answers are in.
    let mut answered = stat_when(&admin, &["responses", "2xx"], |n| n > 0 && n != u64::MAX);
    assert!(answered > 0 && answered != u64::MAX, "no load answered");
    let first_answered = answered;
    let mut reloads = 0;
    for i in 0..50 {
        let which = if i % 2 == 0 { "B" } else { "A" };
        std::fs::write(&path, config(which, &origin.addr, &admin)).expect("write config");
        let out = reload(&admin);
        assert!(
            out.status.success(),
            "reload {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("epoch {}", i + 2)), "{text}");
        reloads += 1;
        // Requests between every two reloads: ten more answers.
        answered = stat_when(&admin, &["responses", "2xx"], |n| n >= answered + 10);
    }
    assert!(
        answered >= first_answered + 500,
        "the load ran across the reloads: {first_answered} then {answered} answers"
    );
    // The last valid config is A. An invalid one (a bad regex) changes
    // nothing while the load runs on.
    let bad = config("B", &origin.addr, &admin)
        + "\n[[route]]\npath_regex = \"^/(unclosed\"\nrespond = { status = 200 }\n";
    std::fs::write(&path, bad).expect("write bad config");
    let out = reload(&admin);
    assert!(!out.status.success(), "an invalid reload must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("coregate.toml:22: route.path_regex: bad regex") && err.contains("epoch 51"),
        "{err}"
    );

    let status = load.wait().expect("load.py ends");
    assert!(status.success());
    let mut stdout = String::new();
    std::io::Read::read_to_string(load.stdout.as_mut().expect("stdout"), &mut stdout)
        .expect("read load.py");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("summary line")).expect("JSON");
    eprintln!("reload under load: {reloads} reloads, {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["mixed"], 0, "{summary}");
    assert!(summary["A"].as_u64().unwrap() > 0 && summary["B"].as_u64().unwrap() > 0);
    // Still config A after the refused reload.
    assert_eq!(status_of(&[&format!("http://{}/a/x", proxy.addr)]), 200);
    assert_eq!(status_of(&[&format!("http://{}/b/x", proxy.addr)]), 404);
}

#[test]
fn sighup_reloads_and_keep_alive_connections_follow() {
    let origin = python_origin();
    let dir = temp_dir();
    let admin = dir.join("admin.sock");
    let proxy = coregate(&config("A", &origin.addr, &admin), &["--workers", "1"]);
    let path = proxy.dir.join("coregate.toml");
    // One keep-alive connection across the reload.
    let mut conn = std::net::TcpStream::connect(&proxy.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ask = |conn: &mut std::net::TcpStream, path: &str| -> u16 {
        use std::io::{Read, Write};
        write!(conn, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 4096];
        let n = conn.read(&mut buf).expect("response");
        statuses(&buf[..n])[0]
    };
    assert_eq!(ask(&mut conn, "/a/x"), 200);
    std::fs::write(&path, config("B", &origin.addr, &admin)).unwrap();
    proxy.signal(libc::SIGHUP);
    let mut switched = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(50));
        if ask(&mut conn, "/b/x") == 200 {
            switched = true;
            break;
        }
    }
    assert!(switched, "the kept-alive connection uses the new rules");
    assert_eq!(ask(&mut conn, "/a/x"), 404);
    let log = proxy.stderr();
    assert!(log.contains("SIGHUP: reloaded"), "{log}");
}

#[test]
fn reload_refuses_listener_changes_and_reports_what_runs() {
    let origin = python_origin();
    let dir = temp_dir();
    let admin = dir.join("admin.sock");
    let proxy = coregate(&config("A", &origin.addr, &admin), &["--workers", "1"]);
    let path = proxy.dir.join("coregate.toml");
    let moved = config("A", &origin.addr, &admin).replace("127.0.0.1:0", "127.0.0.1:1");
    std::fs::write(&path, moved).unwrap();
    let out = reload(&admin);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a restart") && err.contains("epoch 1"),
        "{err}"
    );
    assert_eq!(status_of(&[&format!("http://{}/a/x", proxy.addr)]), 200);
}
