//! Bad backends and hostile clients get the status codes of docs/design.md.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

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
    // /hang never answers: only the response timeout can make a 504.
    assert_eq!(status_of(&[&format!("http://{}/hang", proxy.addr)]), 504);
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
    let reserved = reserve_port();
    let first = python_origin_on(&reserved);
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
    let _second = python_origin_on(&reserved);
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
    // Nothing else closes a fresh connection within the read timeout
    // (keepalive_timeout is 60s): an end of stream is the header timeout.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let read = s.read_to_end(&mut got);
    assert!(read.is_ok(), "closed by the proxy, not timed out: {read:?}");
    assert!(
        got.is_empty(),
        "no response for a connection that sent nothing"
    );
}

#[test]
fn a_reset_mid_close_delimited_body_never_looks_complete() {
    // A backend that answers with a close-delimited body, and then resets
    // the connection instead of closing it. Re-chunked for an HTTP/1.1
    // client, the body must not get its last chunk: a reset is a
    // truncation, not the end.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let (reset_now, reset) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut s, _) = backend.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-body")
            .unwrap();
        let _ = reset.recv_timeout(Duration::from_secs(5));
        let s = socket2::Socket::from(s);
        s.set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    });
    let proxy = coregate(&config_for(&format!("tcp://{backend_addr}"), ""), &[]);
    let mut c = TcpStream::connect(&proxy.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /reset HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut part = [0u8; 4096];
    while !got.windows(12).any(|w| w == b"partial-body") {
        match c.read(&mut part) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&part[..n]),
            Err(e) => panic!("no body before the reset: {e}"),
        }
    }
    reset_now.send(()).unwrap();
    loop {
        match c.read(&mut part) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&part[..n]),
        }
    }
    server.join().unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a reset body was completed: {text:?}"
    );
}

#[test]
fn a_pipelined_burst_answered_by_the_proxy_itself_is_answered_whole() {
    // 8,000 probe requests in one write (about 288 KiB: past the backlog at
    // which the proxy pauses its receive) are all answered, and a request
    // sent after them is read: the receive paused on the burst is armed
    // again as the proxy's own answers use it up.
    let proxy = coregate(
        &config_for(&format!("tcp://127.0.0.1:{}", dead_port()), ""),
        &[],
    );
    let mut c = TcpStream::connect(&proxy.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let burst: Vec<u8> = request.repeat(8000);
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || c.write_all(&burst).unwrap())
    };
    let mut got = Vec::new();
    let mut part = [0u8; 65536];
    let count = |b: &[u8]| b.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count();
    while count(&got) < 8000 {
        match c.read(&mut part) {
            Ok(0) => panic!("closed after {} answers", count(&got)),
            Ok(n) => got.extend_from_slice(&part[..n]),
            Err(e) => panic!("stalled after {} answers: {e}", count(&got)),
        }
    }
    writer.join().unwrap();
    c.write_all(request).unwrap();
    while count(&got) < 8001 {
        match c.read(&mut part) {
            Ok(0) => panic!("closed before the request after the burst was answered"),
            Ok(n) => got.extend_from_slice(&part[..n]),
            Err(e) => panic!("the request after the burst was never read: {e}"),
        }
    }
}
