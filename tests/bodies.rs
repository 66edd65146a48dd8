//! Request and response bodies in every framing, large and small.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::*;

fn make_file(dir: &std::path::Path, name: &str, size: usize) -> std::path::PathBuf {
    let path = dir.join(name);
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn chunked_request_body_reaches_upstream_intact() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let file = make_file(&proxy.dir, "up.bin", 300_000);
    let out = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{}/echo", proxy.addr),
    ]);
    let echo = echo_json(&out.stdout);
    assert_eq!(echo["body_len"], 300_000);
    assert_eq!(echo["body_sha256"], sha256_hex(&file));
    assert_eq!(header(&echo, "transfer-encoding"), Some("chunked"));
}

#[test]
fn chunked_response_with_trailers_reaches_client_intact() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let out = curl(&[
        "--raw",
        "-i",
        &format!("http://{}/chunked?n=5000", proxy.addr),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
    assert!(
        text.ends_with("0\r\nX-Trailer: done\r\n\r\n"),
        "trailers forwarded verbatim"
    );
    let decoded = curl(&[&format!("http://{}/chunked?n=5000", proxy.addr)]);
    assert_eq!(decoded.stdout.len(), 5000);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").unwrap();
    let mut rest = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&rest).contains("body_sha256") {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early");
        rest.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body_len\": 5"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("expect"),
        "Expect is not forwarded: {text}"
    );
}

/// A head and a body larger than one buffer leave in one vectored write
/// (`Buf::write_after`); every byte must arrive where it was in the
/// message, request after request on one connection.
#[test]
fn heads_and_bodies_past_a_buffer_arrive_intact_request_after_request() {
    let origin = python_origin();
    let proxy = coregate(
        &config_for(&format!("tcp://{}", origin.addr), ""),
        &["--workers", "1"],
    );
    let file = make_file(&proxy.dir, "body.bin", 100_000);
    let url = format!("http://{}/echo", proxy.addr);
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 20).collect();
    let data = format!("@{}", file.display());
    let mut args = vec!["--data-binary", &data, "-w", "\n"];
    args.extend(&urls);
    let out = curl(&args);
    let lines: Vec<&[u8]> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 20, "{}", String::from_utf8_lossy(&out.stdout));
    let sha = sha256_hex(&file);
    for line in lines {
        let echo = echo_json(line);
        assert_eq!(echo["body_len"], 100_000);
        assert_eq!(echo["body_sha256"], sha);
    }

    let bytes = format!("http://{}/bytes?n=300000", proxy.addr);
    let mut args = vec!["-w", "%{http_code} %{size_download}\n"];
    for _ in 0..10 {
        args.extend(["-o", "/dev/null", bytes.as_str()]);
    }
    let out = curl(&args);
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.lines().filter(|l| *l == "200 300000").count(),
        10,
        "{got}"
    );
}

#[test]
fn ten_mib_bodies_both_ways_with_bounded_memory() {
    let origin = python_origin();
    // Past the default 1 MiB body cap: raised for this listener.
    let config = config_for(&format!("tcp://{}", origin.addr), "").replace(
        "[upstream.app]",
        "[listener.limits]\nmax_body = \"16MiB\"\n\n[upstream.app]",
    );
    let proxy = coregate(&config, &["--workers", "1"]);
    let before = proxy.rss_kib();
    let file = make_file(&proxy.dir, "ten.bin", 10 << 20);
    let out = curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{}/echo", proxy.addr),
    ]);
    let echo = echo_json(&out.stdout);
    assert_eq!(echo["body_len"], 10 << 20);
    assert_eq!(echo["body_sha256"], sha256_hex(&file));

    let down = proxy.dir.join("down.bin");
    let out = curl(&[
        "-o",
        down.to_str().unwrap(),
        "-w",
        "%{http_code}",
        &format!("http://{}/bytes?n={}", proxy.addr, 10 << 20),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(std::fs::metadata(&down).unwrap().len(), 10 << 20);
    let grown = proxy.rss_kib().saturating_sub(before);
    // A streamed body holds a few 64 KiB buffers, never the body.
    assert!(
        grown < 8 * 1024,
        "proxy RSS grew by {grown} KiB relaying 10 MiB each way"
    );
}

#[test]
fn head_and_bodyless_statuses_carry_no_body() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    // HEAD keeps Content-Length but sends no body; the next request on the
    // same connection must parse cleanly.
    let reqs = "HEAD /bytes?n=100 HTTP/1.1\r\nHost: a\r\n\r\nGET /bytes?n=2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let (got, _) = raw_exchange(&proxy.addr, reqs.as_bytes());
    let text = String::from_utf8_lossy(&got);
    assert_eq!(statuses(&got), vec![200, 200], "{text}");
    assert!(text.contains("Content-Length: 100\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n01"), "{text}");
}

#[test]
fn body_in_the_same_packet_as_the_head_is_forwarded() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let (got, _) = raw_exchange(
        &proxy.addr,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    );
    assert!(String::from_utf8_lossy(&got).contains("\"body_len\": 3"));
}

#[test]
fn a_16_mib_streaming_echo_moves_both_ways_at_once() {
    // The origin answers each piece of the body as it reads it. A proxy
    // that read the whole body before the response would stall once the
    // socket buffers between it and the origin filled up.
    let origin = python_origin();
    let config = config_for(&format!("tcp://{}", origin.addr), "").replace(
        "[upstream.app]",
        "[listener.limits]\nmax_body = \"32MiB\"\n\n[upstream.app]",
    );
    let proxy = coregate(&config, &["--workers", "1"]);
    let file = make_file(&proxy.dir, "sixteen.bin", 16 << 20);
    let echoed = proxy.dir.join("echoed.bin");
    let out = curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        "-o",
        echoed.to_str().unwrap(),
        "-w",
        "%{http_code}",
        &format!("http://{}/stream-echo", proxy.addr),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(std::fs::metadata(&echoed).unwrap().len(), 16 << 20);
    assert_eq!(sha256_hex(&echoed), sha256_hex(&file));
}

#[test]
fn an_early_answer_arrives_before_the_upload_ends() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let mut s = TcpStream::connect(&proxy.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A 512 KiB body announced, a quarter of it sent, and then nothing:
    // the backend's 413 must come back while the client still owes 384 KiB.
    s.write_all(b"POST /early413 HTTP/1.1\r\nHost: t\r\nContent-Length: 524288\r\n\r\n")
        .unwrap();
    s.write_all(&vec![b'x'; 128 << 10]).unwrap();
    let mut got = Vec::new();
    let mut part = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut part) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&part[..n]),
            Err(e) => panic!("no answer while the upload is unfinished: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "the rest of the body is not read, so the connection cannot go on: {text}"
    );
}
