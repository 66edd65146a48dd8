//! Writing heads: the request head sent upstream and the response head
//! sent downstream, with hop-by-hop fields removed and the proxy's own
//! fields (X-Forwarded-For, X-Forwarded-Proto, Via, framing) added.
//!
//! Owns: header filtering and head serialisation into a caller's buffer.
//! Does not own: deciding framing (see `head`) or any I/O.

use super::edits::HeaderPlan;
use super::head::{HeaderKind, HeaderSpan, RequestHead, ResponseHead, Version};

/// The token this proxy adds to Via (RFC 9110 7.6.3).
pub const VIA_TOKEN: &[u8] = b"1.1 coregate";

/// Append the decimal form of `n` without allocating.
pub fn write_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `HTTP/1.1 STATUS REASON\r\n`: downstream responses always say 1.1.
fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    write_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// The connection field a downstream response needs, then the blank line:
/// `close` when the connection ends, `keep-alive` for an HTTP/1.0 client
/// that keeps it (1.0 closes by default), nothing otherwise.
fn end_response_head(out: &mut Vec<u8>, keep_alive: bool, client_version: Version) {
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if client_version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Write `Name: v1, v2, own`: the values of every field of `kind` in the
/// message, then this proxy's own element (X-Forwarded-For, Via).
fn write_appended(
    out: &mut Vec<u8>,
    name: &[u8],
    buf: &[u8],
    headers: &[HeaderSpan],
    kind: HeaderKind,
    own: &[u8],
) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for h in headers.iter().filter(|h| h.kind == kind) {
        out.extend_from_slice(h.value.get(buf));
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(own);
    out.extend_from_slice(b"\r\n");
}

/// Facts about the downstream connection the upstream request carries.
pub struct Forwarded<'a> {
    /// The client address as text, e.g. `127.0.0.1`.
    pub client_ip: &'a [u8],
    /// `http` (TLS is not terminated by coregate yet).
    pub proto: &'a [u8],
    /// Host to send when the client sent none (HTTP/1.0): the backend's
    /// authority.
    pub default_host: &'a [u8],
}

/// Serialise the request head for the upstream into `out`.
///
/// The upstream side always speaks HTTP/1.1 with keep-alive. Hop-by-hop
/// fields (Connection and the names it lists, Keep-Alive, TE, Trailer,
/// Upgrade, Proxy-*) and Expect are removed: the proxy answers
/// `100-continue` itself. With `upgrade`, the request's Upgrade field
/// goes on with `Connection: upgrade` (a route lets it switch protocols). Content-Length and Transfer-Encoding pass as
/// validated; the body is forwarded in the framing it arrived in.
///
/// `target` replaces the request target (a rewritten or normalised path
/// with its query); `edits` are the rules' header edits (never framing or
/// forwarding fields: config validation refuses those).
pub fn write_upstream_request(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    fwd: &Forwarded<'_>,
    target: Option<&[u8]>,
    edits: &HeaderPlan,
    upgrade: bool,
) {
    out.extend_from_slice(head.method_span.get(buf));
    out.push(b' ');
    // An absolute-form target may have no path ("http://a" or
    // "http://a?q"); origin-form always starts with '/' (RFC 9112 3.2.1).
    let path = target.unwrap_or_else(|| head.path.get(buf));
    if path.first() != Some(&b'/') && path != b"*" {
        out.push(b'/');
    }
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let edited = !edits.is_empty();
    let host_replaced = edited && edits.drops(b"host");

    for h in &head.headers {
        match h.kind {
            HeaderKind::Upgrade if upgrade => {}
            HeaderKind::Connection
            | HeaderKind::HopByHop
            | HeaderKind::Upgrade
            | HeaderKind::Expect
            | HeaderKind::Shadowing
            | HeaderKind::XForwardedFor
            | HeaderKind::XForwardedProto
            | HeaderKind::Via => continue,
            HeaderKind::Host if head.authority.is_some() || host_replaced => continue,
            HeaderKind::Other if head.is_connection_listed(buf, h.name) => continue,
            _ if edited && edits.drops(h.name.get(buf)) => continue,
            _ => {}
        }
        header(out, h.name.get(buf), h.value.get(buf));
    }
    match (head.authority, head.host) {
        _ if host_replaced => {}
        (Some(a), _) => header(out, b"Host", a.get(buf)),
        (None, None) => header(out, b"Host", fwd.default_host),
        (None, Some(_)) => {}
    }
    for (name, value) in edits.fields() {
        header(out, name, value);
    }
    let headers = &head.headers;
    write_appended(
        out,
        b"X-Forwarded-For",
        buf,
        headers,
        HeaderKind::XForwardedFor,
        fwd.client_ip,
    );
    header(out, b"X-Forwarded-Proto", fwd.proto);
    write_appended(out, b"Via", buf, headers, HeaderKind::Via, VIA_TOKEN);
    if upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the downstream response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutFraming {
    /// No body, or a body delimited by Content-Length (forwarded as is).
    AsIs,
    /// The upstream's chunked body, forwarded byte for byte.
    ChunkedVerbatim,
    /// The upstream closes to end the body; we chunk it for the client.
    Rechunk,
    /// No framing header: the body ends when we close the connection.
    UntilClose,
    /// A `101 Switching Protocols`: its Upgrade field goes on, with
    /// `Connection: upgrade`; what follows is the new protocol's.
    Switch,
}

/// Serialise the response head for the downstream client into `out`,
/// with the rules' header `edits`.
pub fn write_downstream_response(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    framing: OutFraming,
    client_version: Version,
    keep_alive: bool,
    edits: &HeaderPlan,
) {
    let edited = !edits.is_empty();
    status_line(out, head.status, head.reason.get(buf));
    for h in &head.headers {
        match h.kind {
            HeaderKind::Upgrade if framing == OutFraming::Switch => {}
            HeaderKind::Connection
            | HeaderKind::HopByHop
            | HeaderKind::Upgrade
            | HeaderKind::Shadowing => continue,
            HeaderKind::TransferEncoding if framing != OutFraming::ChunkedVerbatim => continue,
            HeaderKind::Via => continue,
            HeaderKind::Other if head.is_connection_listed(buf, h.name) => continue,
            _ if edited && edits.drops(h.name.get(buf)) => continue,
            _ => {}
        }
        header(out, h.name.get(buf), h.value.get(buf));
    }
    for (name, value) in edits.fields() {
        header(out, name, value);
    }
    if framing == OutFraming::Rechunk {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    write_appended(out, b"Via", buf, &head.headers, HeaderKind::Via, VIA_TOKEN);
    if framing == OutFraming::Switch {
        out.extend_from_slice(b"Connection: upgrade\r\n\r\n");
        return;
    }
    end_response_head(out, keep_alive, client_version);
}

/// Reason phrase for the statuses the proxy itself produces.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        401 => "Unauthorized",
        405 => "Method Not Allowed",
        410 => "Gone",
        418 => "I'm a teapot",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A response a rule answers (`respond`, `redirect`): the rule's fields,
/// then the header edits, then the body with its length. A HEAD request
/// gets the head only (`with_body` false).
#[allow(clippy::too_many_arguments)]
pub fn write_fixed(
    out: &mut Vec<u8>,
    status: u16,
    fields: &HeaderPlan,
    edits: &HeaderPlan,
    body: &[u8],
    keep_alive: bool,
    client_version: Version,
    with_body: bool,
) {
    status_line(out, status, reason_phrase(status).as_bytes());
    for (name, value) in fields.fields() {
        if !edits.drops(name) {
            header(out, name, value);
        }
    }
    for (name, value) in edits.fields() {
        header(out, name, value);
    }
    if !matches!(status, 204 | 304) {
        out.extend_from_slice(b"Content-Length: ");
        write_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    end_response_head(out, keep_alive, client_version);
    if with_body {
        out.extend_from_slice(body);
    }
}

/// A response the proxy answers itself: status line, a short text body
/// naming the status (left out, length kept, when `with_body` is false:
/// the answer to HEAD), and `Connection: close` when the connection ends.
pub fn write_canned(
    out: &mut Vec<u8>,
    status: u16,
    keep_alive: bool,
    client_version: Version,
    with_body: bool,
    retry_after: Option<u32>,
) {
    let reason = reason_phrase(status).as_bytes();
    status_line(out, status, reason);
    if let Some(seconds) = retry_after {
        out.extend_from_slice(b"Retry-After: ");
        write_decimal(out, seconds as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Type: text/plain\r\nContent-Length: ");
    write_decimal(out, reason.len() as u64 + 1);
    out.extend_from_slice(b"\r\n");
    end_response_head(out, keep_alive, client_version);
    if with_body {
        out.extend_from_slice(reason);
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{
        HeadLimits, Method, RequestHead, ResponseHead, parse_request, parse_response,
    };

    fn upstream(raw: &str) -> String {
        let mut head = RequestHead::default();
        parse_request(raw.as_bytes(), &HeadLimits::default(), &mut head).unwrap();
        let mut out = Vec::new();
        let fwd = Forwarded {
            client_ip: b"10.0.0.9",
            proto: b"http",
            default_host: b"backend:80",
        };
        write_upstream_request(
            &mut out,
            raw.as_bytes(),
            &head,
            &fwd,
            None,
            &HeaderPlan::default(),
            false,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn an_upgrade_passes_with_connection_upgrade_only_when_allowed() {
        let raw = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n";
        let mut head = RequestHead::default();
        parse_request(raw.as_bytes(), &HeadLimits::default(), &mut head).unwrap();
        let fwd = Forwarded {
            client_ip: b"10.0.0.9",
            proto: b"http",
            default_host: b"backend:80",
        };
        let write = |upgrade| {
            let mut out = Vec::new();
            let plan = HeaderPlan::default();
            write_upstream_request(&mut out, raw.as_bytes(), &head, &fwd, None, &plan, upgrade);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            write(true),
            "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nVia: 1.1 coregate\r\nConnection: upgrade\r\n\r\n"
        );
        let plain = write(false);
        assert!(
            !plain.contains("Upgrade") && !plain.contains("upgrade"),
            "{plain}"
        );

        let raw = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n";
        let mut res = ResponseHead::default();
        parse_response(raw.as_bytes(), 16384, Method::Get, &mut res).unwrap();
        let mut out = Vec::new();
        write_downstream_response(
            &mut out,
            raw.as_bytes(),
            &res,
            OutFraming::Switch,
            Version::Http11,
            true,
            &HeaderPlan::default(),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\nVia: 1.1 coregate\r\nConnection: upgrade\r\n\r\n"
        );
    }

    #[test]
    fn strips_hop_by_hop_and_adds_forwarding() {
        let out = upstream(
            "GET /p HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: x\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nExpect: 100-continue\r\nX-Keep: yes\r\nContent_Length: 5\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n",
        );
        assert_eq!(
            out,
            "GET /p HTTP/1.1\r\nHost: a\r\nX-Keep: yes\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nX-Forwarded-Proto: http\r\nVia: 1.1 coregate\r\n\r\n"
        );
    }

    #[test]
    fn http10_gets_host_and_absolute_form_is_rewritten() {
        assert!(upstream("GET / HTTP/1.0\r\n\r\n").contains("Host: backend:80\r\n"));
        let out = upstream("GET http://example.com?q=1 HTTP/1.1\r\nHost: other\r\n\r\n");
        assert!(out.starts_with("GET /?q=1 HTTP/1.1\r\n"), "{out}");
        let out = upstream("GET http://example.com HTTP/1.1\r\nHost: other\r\n\r\n");
        assert!(out.starts_with("GET / HTTP/1.1\r\n"), "{out}");
        assert!(
            out.contains("Host: example.com\r\n") && !out.contains("other"),
            "{out}"
        );
    }

    #[test]
    fn response_head_rewrite() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\nX-App: 1\r\n\r\n";
        let mut head = ResponseHead::default();
        parse_response(raw.as_bytes(), 16384, Method::Get, &mut head).unwrap();
        let mut out = Vec::new();
        write_downstream_response(
            &mut out,
            raw.as_bytes(),
            &head,
            OutFraming::ChunkedVerbatim,
            Version::Http11,
            true,
            &HeaderPlan::default(),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-App: 1\r\nVia: 1.1 coregate\r\n\r\n"
        );
    }

    #[test]
    fn canned_has_exact_length() {
        let mut out = Vec::new();
        write_canned(&mut out, 502, false, Version::Http11, true, None);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nBad Gateway\n"
        );
    }
}
