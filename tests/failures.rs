//! Bad backends and hostile clients get the status codes of docs/design.md.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn dead_backend_is_502() {
    let proxy = coregate(
        &config_for(&format!("tcp://127.0.0.1:{}", dead_port()), ""),
        &[],
    );
    assert_eq!(status_of(&[&format!("http://{}/", proxy.addr)]), 502);
    // The connection survives a 502 for a body-less request.
    let out = curl(&[
        "-v",
        "-o",
        "/dev/null",
        &format!("http://{}/a", proxy.addr),
        &format!("http://{}/b", proxy.addr),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Re-using existing connection"));
}

#[test]
fn hanging_backend_is_504_after_response_timeout() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "response_timeout = \"1s\"", &[]);
    let start = Instant::now();
    assert_eq!(status_of(&[&format!("http://{}/hang", proxy.addr)]), 504);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn truncated_response_is_never_completed() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let out = curl(&[&format!("http://{}/truncate", proxy.addr)]);
    // curl exit 18: "transfer closed with outstanding read data remaining".
    assert_eq!(
        out.status.code(),
        Some(18),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 1000);
}

#[test]
fn invalid_upstream_response_is_502() {
    // A raw origin that answers with conflicting framing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        if let Ok((mut s, _)) = listener.accept() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        }
    });
    let proxy = coregate(&config_for(&format!("tcp://{addr}"), ""), &[]);
    assert_eq!(status_of(&[&format!("http://{}/", proxy.addr)]), 502);
    server.join().unwrap();
}

#[test]
fn oversize_head_is_431_and_long_uri_414() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let big = format!("X-Big: {}", "a".repeat(20_000));
    assert_eq!(
        status_of(&["-H", &big, &format!("http://{}/", proxy.addr)]),
        431
    );
    let long = format!("http://{}/{}", proxy.addr, "u".repeat(9000));
    assert_eq!(status_of(&[&long]), 414);
}

#[test]
fn smuggling_vectors_get_400_and_close() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let vectors: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nX: a\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ];
    for v in vectors {
        let (got, closed) = raw_exchange(&proxy.addr, v);
        assert_eq!(
            statuses(&got),
            vec![400],
            "vector {:?} got {:?}",
            String::from_utf8_lossy(v),
            String::from_utf8_lossy(&got)
        );
        assert!(
            closed,
            "connection stays open after {:?}",
            String::from_utf8_lossy(v)
        );
    }
}

#[test]
fn slow_head_gets_408() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_eq!(
        statuses(&got),
        vec![408],
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn upstream_that_answers_early_is_forwarded() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let file = proxy.dir.join("big.bin");
    std::fs::write(&file, vec![b'x'; 8 << 20]).unwrap();
    let code = status_of(&[
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{}/early413", proxy.addr),
    ]);
    assert_eq!(code, 413);
}

#[test]
fn backend_restart_does_not_fail_requests_on_dead_pooled_connections() {
    let port = dead_port();
    let first = python_origin_on(port);
    let proxy = proxy_to(&first, "", &["--workers", "1"]);
    let url = format!("http://{}/echo", proxy.addr);
    // Fill the pool with three idle upstream connections.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let u = format!("http://{}/slow?ms=300", proxy.addr);
            std::thread::spawn(move || status_of(&[&u]))
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    // Restart the backend: every pooled connection is now dead.
    drop(first);
    let _second = python_origin_on(port);
    // An idempotent request is retried once on a fresh connection.
    assert_eq!(status_of(&[&url]), 200);
    // A POST is never retried; its pooled connection is checked first.
    assert_eq!(
        status_of(&["-X", "POST", "-H", "Content-Length: 0", &url]),
        200
    );
    assert_eq!(status_of(&["-d", "x", &url]), 200);
}

#[test]
fn silent_connection_is_closed_after_header_timeout() {
    let origin = python_origin();
    // header_timeout is 2s in config_for; keepalive_timeout stays 60s.
    let proxy = proxy_to(&origin, "", &[]);
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "no response for a connection that sent nothing"
    );
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "closed after {waited:?}, not at header_timeout"
    );
}
