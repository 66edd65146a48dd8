//! What a proxied request and response look like on the other side.

use std::io::{Read, Write};

use crate::support::*;

#[test]
fn forwards_request_and_strips_hop_by_hop_headers() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let out = curl(&[
        "-H",
        "Connection: X-Secret",
        "-H",
        "X-Secret: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "Proxy-Authorization: Basic eA==",
        "-H",
        "X-Forwarded-For: 203.0.113.7",
        "-H",
        "X-Forwarded-Proto: https",
        "-H",
        "X-Kept: yes",
        &format!("http://{}/echo/path?q=1", proxy.addr),
    ]);
    let echo = echo_json(&out.stdout);
    assert_eq!(echo["path"], "/echo/path?q=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(header(&echo, "x-kept"), Some("yes"));
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert_eq!(
            header(&echo, gone),
            None,
            "{gone} must not reach the upstream: {echo}"
        );
    }
    assert_eq!(
        header(&echo, "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(header(&echo, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(&echo, "via"), Some("1.1 coregate"));
    assert_eq!(header(&echo, "host"), Some(proxy.addr.as_str()));
}

#[test]
fn response_carries_via_and_keeps_upstream_headers() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let out = curl(&["-i", &format!("http://{}/bytes?n=5", proxy.addr)]);
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("via: 1.1 coregate\r\n"), "{text}");
    assert!(text.contains("content-length: 5\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n01234"), "{text}");
}

#[test]
fn keep_alive_is_reused_on_both_sides() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &["--workers", "1"]);
    let url = format!("http://{}/echo", proxy.addr);
    // One curl, three URLs: curl reuses its connection to the proxy.
    let out = curl(&["-v", "-w", "\n", &url, &url, &url]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("Re-using existing connection").count(),
        2,
        "{stderr}"
    );
    let ports: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| echo_json(l.as_bytes())["peer_port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports.len(), 3);
    // The origin saw one upstream connection for all three requests.
    assert!(
        ports.iter().all(|&p| p == ports[0]),
        "upstream connection not reused: {ports:?}"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let reqs = "GET /slow?ms=300&id=1 HTTP/1.1\r\nHost: a\r\n\r\n\
                GET /bytes?n=3&id=2 HTTP/1.1\r\nHost: a\r\n\r\n\
                GET /echo?id=3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let (got, closed) = raw_exchange(&proxy.addr, reqs.as_bytes());
    assert!(closed);
    let text = String::from_utf8_lossy(&got);
    assert_eq!(statuses(&got), vec![200, 200, 200], "{text}");
    let first = text.find("id=1").expect("first response");
    let second = text.find("\r\n\r\n012").expect("second response");
    let third = text.find("id=3").expect("third response");
    assert!(
        first < second && second < third,
        "responses out of order:\n{text}"
    );
}

#[test]
fn http10_client_gets_close_delimited_body_from_chunked_upstream() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let (got, closed) = raw_exchange(&proxy.addr, b"GET /chunked?n=2500 HTTP/1.0\r\n\r\n");
    assert!(closed);
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body.len(), 2500, "{head}");
}

#[test]
fn close_delimited_upstream_is_rechunked_for_http11_clients() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let out = curl(&["-i", &format!("http://{}/close?n=3000", proxy.addr)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{text}"
    );
    let body = text.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body.len(), 3000);
}

#[test]
fn routes_by_host_and_prefix_and_404s_the_rest() {
    let a = python_origin();
    let b = coregate_origin(7);
    let config = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[upstream.a]\nbackends = [\"tcp://{}\"]\n\n\
         [upstream.b]\nbackends = [\"tcp://{}\"]\n\n\
         [[route]]\nhost = \"api.test\"\npath_prefix = \"/v1/\"\nupstream = \"b\"\n\n\
         [[route]]\npath_prefix = \"/echo\"\nupstream = \"a\"\n",
        a.addr, b.addr
    );
    let proxy = coregate(&config, &[]);
    let base = format!("http://{}", proxy.addr);
    let out = curl(&["-H", "Host: API.test:80", &format!("{base}/v1/x")]);
    assert_eq!(
        out.stdout.len(),
        7,
        "host+prefix route goes to the 7-byte origin"
    );
    assert_eq!(status_of(&[&format!("{base}/echo/1")]), 200);
    assert_eq!(
        status_of(&["-H", "Host: other", &format!("{base}/v1/x")]),
        404
    );
    assert_eq!(status_of(&[&format!("{base}/nothing")]), 404);
}

#[test]
fn round_robin_spreads_over_backends() {
    let a = coregate_origin(1);
    let b = coregate_origin(2);
    let config = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[upstream.app]\nbackends = [\"tcp://{}\", \"tcp://{}\"]\n\
         balance = \"round_robin\"\n\n[[route]]\nupstream = \"app\"\n",
        a.addr, b.addr
    );
    let proxy = coregate(&config, &["--workers", "1"]);
    let url = format!("http://{}/", proxy.addr);
    let out = curl(&["-w", "|", &url, &url, &url, &url]);
    let sizes: Vec<usize> = String::from_utf8_lossy(&out.stdout)
        .split('|')
        .filter(|s| !s.is_empty())
        .map(str::len)
        .collect();
    assert_eq!(sizes.iter().filter(|&&n| n == 1).count(), 2, "{sizes:?}");
    assert_eq!(sizes.iter().filter(|&&n| n == 2).count(), 2, "{sizes:?}");
}

#[test]
fn unix_socket_backend() {
    let origin = python_origin_unix();
    let proxy = coregate(&config_for(&format!("unix:{}", origin.addr), ""), &[]);
    let out = curl(&["-d", "over unix", &format!("http://{}/echo", proxy.addr)]);
    let echo = echo_json(&out.stdout);
    assert_eq!(echo["body_len"], 9);
    assert_eq!(echo["method"], "POST");
}

#[test]
fn absolute_form_without_path_routes_to_root() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let (got, _) = raw_exchange(
        &proxy.addr,
        b"GET http://example.test HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert_eq!(statuses(&got), vec![200], "{text}");
    assert!(text.contains("\"path\": \"/\""), "{text}");
    assert!(text.contains("[\"Host\", \"example.test\"]"), "{text}");
}

#[test]
fn http10_client_gets_no_100_continue() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    let (got, _) = raw_exchange(
        &proxy.addr,
        b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi",
    );
    let text = String::from_utf8_lossy(&got);
    assert_eq!(statuses(&got), vec![200], "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
}

#[test]
fn upstream_connection_is_not_reused_after_a_get_with_a_body() {
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &["--workers", "1"]);
    let reqs = "GET /echo HTTP/1.1\r\nHost: a\r\n\r\n\
                GET /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi\
                GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let (got, _) = raw_exchange(&proxy.addr, reqs.as_bytes());
    let text = String::from_utf8_lossy(&got);
    let ports: Vec<u64> = text
        .split("\r\n\r\n")
        .filter(|part| part.starts_with('{'))
        .map(|body| {
            echo_json(&body.as_bytes()[..body.rfind('}').unwrap() + 1])["peer_port"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(ports.len(), 3, "{text}");
    assert_eq!(
        ports[0], ports[1],
        "a plain GET leaves the connection pooled"
    );
    assert_ne!(
        ports[1], ports[2],
        "the connection that carried a GET body is not reused"
    );
}

#[test]
fn a_client_that_half_closes_after_its_whole_body_gets_its_answer() {
    // Head, body and FIN in one go: the body is all here before the
    // upstream connection is, and the answer must still come.
    let origin = python_origin();
    let proxy = proxy_to(&origin, "", &[]);
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(&proxy.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        assert!(text.contains("\"body_len\": 5"), "{text}");
    }
}
