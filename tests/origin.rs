//! The built-in origin, the first service on the native I/O core: real
//! clients (Python's http.client, curl, raw sockets) against
//! `coregate origin`, on io_uring and, with COREGATE_TEST_DRIVER=epoll, on
//! the core's epoll backend.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// Python's http.client over one keep-alive connection: GETs, HEADs and
/// bodies of both framings; prints one line per response.
const CLIENT: &str = r#"
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], timeout=10)
def show(method, body=None, headers={}):
    c.request(method, "/", body=body, headers=headers,
              encode_chunked="Transfer-Encoding" in headers)
    r = c.getresponse()
    data = r.read()
    print(method, r.status, len(data), r.getheader("X-Received-Bytes"))
for _ in range(3):
    show("GET")
show("HEAD")
show("POST", body=b"x" * 100000)
show("POST", body=iter([b"a" * 5000, b"b" * 70000, b"c"]), headers={"Transfer-Encoding": "chunked"})
show("GET")
"#;

#[test]
fn a_keep_alive_client_gets_every_answer_on_one_connection() {
    let origin = coregate_origin(300);
    let out = Command::new("python3")
        .args(["-c", CLIENT, &origin.addr])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    let want = [
        "GET 200 300 None",
        "GET 200 300 None",
        "GET 200 300 None",
        "HEAD 200 0 None",
        "POST 200 300 100000",
        "POST 200 300 75001",
        "GET 200 300 None",
    ];
    assert_eq!(lines.lines().collect::<Vec<_>>(), want);
}

#[test]
fn a_large_upload_waits_for_100_continue_and_is_counted() {
    let origin = coregate_origin(5);
    let dir = temp_dir();
    let file = dir.join("upload");
    std::fs::write(&file, vec![b'u'; 3 << 20]).unwrap();
    let out = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{}/", origin.addr),
    ]);
    let head = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    assert!(head.contains("X-Received-Bytes: 3145728"), "{head}");
}

#[test]
fn pipelined_requests_are_answered_in_order_and_a_bad_one_closes() {
    let origin = coregate_origin(4);
    let (raw, closed) = raw_exchange(
        &origin.addr,
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(statuses(&raw), [200, 200, 200]);
    assert!(String::from_utf8_lossy(&raw).contains("X-Received-Bytes: 3"));
    assert!(closed, "Connection: close is honoured");
    let (raw, closed) = raw_exchange(
        &origin.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert_eq!(statuses(&raw), [400]);
    assert!(closed);
}

#[test]
fn a_head_sent_a_byte_at_a_time_is_answered() {
    let origin = coregate_origin(6);
    let mut s = TcpStream::connect(&origin.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    for b in b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" {
        s.write_all(&[*b]).unwrap();
    }
    let mut got = [0u8; 512];
    let n = s.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"HTTP/1.1 200 OK"));
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_and_exits() {
    let mut origin = coregate_origin(6);
    // Idle keep-alive connections, each after one answered request.
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&origin.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
            let mut got = [0u8; 512];
            let n = s.read(&mut got).unwrap();
            assert!(got[..n].starts_with(b"HTTP/1.1 200 OK"));
            s
        })
        .collect();
    origin.signal(libc::SIGTERM);
    let status = origin
        .wait_exit(Duration::from_secs(10))
        .expect("exits within its drain timeout");
    assert!(status.success(), "{}", origin.stderr());
    for s in &mut idle {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).unwrap_or(0), 0, "closed, nothing sent");
    }
}

/// More than the origin holds unparsed before it pauses its receive
/// (`origin::MAX_BUFFERED`, 320 KiB).
const MAX_HELD: usize = 320 * 1024;

#[test]
fn a_flood_of_pipelined_requests_is_answered_whole_while_the_client_reads_late() {
    let origin = coregate_origin(6);
    let stream = TcpStream::connect(&origin.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    // About 2 MiB of requests, several times what a connection may hold
    // unparsed: its receive pauses and resumes as the answers drain.
    const N: usize = 70_000;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = written.clone();
    let sender = std::thread::spawn(move || {
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut batch = Vec::new();
        for _ in 0..1000 {
            batch.extend_from_slice(request);
        }
        for _ in 0..N / 1000 {
            writer.write_all(&batch).unwrap();
            progress.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Read only once the client has sent a good part (or could send no
    // more: the origin stopped reading and TCP pushed back), so the
    // answers pile up unread.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = 0;
    while written.load(std::sync::atomic::Ordering::Relaxed) < 1 << 20
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if now == last && now > MAX_HELD {
            break;
        }
        last = now;
    }
    let mut reader = stream;
    let mut seen = 0;
    let mut tail = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let status = b"HTTP/1.1 200 OK";
    while seen < N {
        let n = reader.read(&mut chunk).expect("answers keep coming");
        assert!(n > 0, "closed after {seen} answers");
        tail.extend_from_slice(&chunk[..n]);
        let mut last = 0;
        let mut i = 0;
        while let Some(p) = tail[i..].windows(status.len()).position(|w| w == status) {
            seen += 1;
            i += p + status.len();
            last = i;
        }
        tail.drain(..last);
    }
    sender.join().unwrap();
    assert_eq!(seen, N);
}
