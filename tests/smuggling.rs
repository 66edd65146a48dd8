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
