//! The desync-guardian corpus replayed against a running proxy: every
//! Severe request is refused with 400 and the connection closes. The
//! backend is a dead port, so a request that slipped through would show
//! as 502 instead.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::support::base64::base64_decode;
use crate::support::*;

/// Send `bytes`, half-close, and read the answer until the proxy closes.
fn send_and_close(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).expect("write");
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn severe_desync_guardian_cases_are_refused_end_to_end() {
    let proxy = coregate(
        &config_for(&format!("tcp://127.0.0.1:{}", dead_port()), ""),
        &[],
    );
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/desync-guardian.jsonl");
    let text = std::fs::read_to_string(path).expect("corpus");
    let mut severe = 0;
    let mut failures = Vec::new();
    for line in text.lines() {
        let case: serde_json::Value = serde_json::from_str(line).expect("json line");
        if case["tier"] != "Severe" {
            continue;
        }
        severe += 1;
        let raw = base64_decode(case["raw_b64"].as_str().expect("raw_b64"));
        let got = send_and_close(&proxy.addr, &raw);
        if statuses(&got) != vec![400] {
            failures.push(format!(
                "{}: {:?}",
                case["name"],
                String::from_utf8_lossy(&got)
            ));
        }
    }
    assert!(severe >= 50, "only {severe} Severe cases found");
    assert!(
        failures.is_empty(),
        "{} of {severe} Severe cases not refused:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Pooled upstream connections must not carry bytes nobody asked for to
/// the next client. Each test asserts through the counters that the
/// poisoned connection was discarded, then sends the next client.
mod pooled_connection_poisoning {
    use super::*;

    /// The proxy, one worker, with an admin socket for its counters.
    fn proxy_with_counters(origin: &Proc) -> (Proc, std::path::PathBuf) {
        let socket = temp_dir().join("admin.sock");
        let config = config_for(&format!("tcp://{}", origin.addr), "").replace(
            "[server]\n",
            &format!("[server]\nadmin_socket = \"{}\"\n", socket.display()),
        );
        (coregate(&config, &["--workers", "1"]), socket)
    }

    /// Whether the pool empties (no upstream connection idle in it)
    /// within 10 s.
    fn pool_empties(socket: &std::path::Path) -> bool {
        stat_when(socket, &["upstream_idle"], |n| n == 0) == 0
    }

    /// The one backend was connected to twice and no connection reused:
    /// the next client's request went on a new connection.
    fn assert_no_reuse(socket: &std::path::Path) {
        let backends = &stats_total(socket)["upstreams"];
        let counts = backends.as_object().and_then(|b| b.values().next());
        let counts = counts.expect("one backend");
        assert_eq!(
            (&counts["connects"], &counts["reuses"]),
            (&2.into(), &0.into()),
            "{backends}"
        );
    }

    #[test]
    fn body_sent_to_a_head_request_does_not_reach_the_next_client() {
        let origin = python_origin();
        let (proxy, socket) = proxy_with_counters(&origin);
        let url = format!("http://{}", proxy.addr);
        let _ = curl(&["-I", &format!("{url}/headbody")]);
        // Bytes came past the HEAD answer's end: the connection is closed,
        // never pooled.
        assert!(
            pool_empties(&socket),
            "the poisoned connection stayed pooled"
        );
        let out = curl(&["-i", &format!("{url}/echo?victim")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("X-Injected"),
            "next client got injected bytes:\n{text}"
        );
        assert!(text.contains("/echo?victim"), "{text}");
        assert_no_reuse(&socket);
    }

    #[test]
    fn request_smuggled_in_an_ignored_body_is_not_answered_to_the_next_client() {
        let origin = python_origin();
        let (proxy, socket) = proxy_with_counters(&origin);
        let url = format!("http://{}", proxy.addr);
        // Answered 100 ms later: the stray answer arrives while the
        // connection sits in the pool, which drops it then.
        let smuggled = "GET /slow?ms=100&smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        let out = curl(&["--data-binary", smuggled, &format!("{url}/ignore")]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ignored\n");
        assert!(
            pool_empties(&socket),
            "the poisoned connection stayed pooled"
        );
        let out = curl(&[&format!("{url}/echo?victim")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("/echo?victim") && !text.contains("smuggled"),
            "next client got: {text}"
        );
        assert_no_reuse(&socket);
    }

    #[test]
    fn canned_answer_to_head_has_no_body_on_a_kept_alive_connection() {
        let origin = python_origin();
        let config = format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[upstream.app]\nbackends = [\"tcp://{}\"]\n\n\
             [[route]]\nhost = \"known\"\nupstream = \"app\"\n",
            origin.addr
        );
        let proxy = coregate(&config, &[]);
        let reqs = "HEAD / HTTP/1.1\r\nHost: other\r\n\r\nGET /echo HTTP/1.1\r\nHost: known\r\nConnection: close\r\n\r\n";
        let got = send_and_close(&proxy.addr, reqs.as_bytes());
        let text = String::from_utf8_lossy(&got);
        assert_eq!(statuses(&got), vec![404, 200], "{text}");
        assert!(
            text.contains("Content-Length: 10\r\n\r\nHTTP/1.1 200"),
            "HEAD answer carried a body:\n{text}"
        );
    }
}
