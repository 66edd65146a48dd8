//! Table-driven replay of the HTTP/1.1 parsing corpora in `tests/corpus/`
//! (origin and licences in its README.md) through coregate's request and
//! response parsers, driven the way the proxy drives them.
//!
//! Each case's bytes are one connection's byte stream. [`replay`] parses a
//! head, consumes the body its framing announces, then parses the next
//! message from the remaining bytes, reusing one head struct as a
//! connection does. Any head, framing or chunked error is a reject; running
//! out of bytes is an accept (the proxy would wait for more), so a trailing
//! incomplete message and a headers-only POST are both fine.
//!
//! How corpus verdicts map onto coregate (details at each place):
//!
//! - Missing Host: coregate answers 400 to an HTTP/1.1 request without
//!   Host, and many llhttp request cases have none. Those cases run with a
//!   Host line inserted after the request line, only for HTTP/1.1 heads and
//!   only where that cannot change what the case tests
//!   ([`host_insertion_point`]). desync-guardian cases already carry one.
//! - llhttp `*-lenient-*` types hold only with an llhttp leniency switched
//!   on: skipped and counted (their strict twins are in the corpus). The
//!   one case without bytes is skipped too.
//! - llhttp `upgrade`: coregate strips Upgrade and never tunnels. CONNECT
//!   (400), an HTTP/2 preface `PRI *` and a 101 response (502) are expected
//!   to be rejected; any other upgrade request is proxied as plain HTTP, so
//!   it must complete like llhttp's, and the bytes llhttp would hand to the
//!   new protocol are parsed as the next request, whatever that yields.
//! - Data after a message that closes the connection (`Connection: close`,
//!   HTTP/1.0 without keep-alive) is an error unless it is only CR/LF, as in
//!   llhttp; the proxy never reads it.
//! - Responses answer a GET, or a HEAD where llhttp's `skipBody` says the
//!   test's callback declared no body. A request with `skipBody` has its
//!   framing ignored, as llhttp's callback does.
//! - `messages_completed` is compared for every llhttp `accept`. A
//!   close-delimited response body completes only at EOF, so, as in llhttp,
//!   it is not counted.
//! - desync-guardian: Severe must be rejected, Compliant and Acceptable
//!   accepted, Ambiguous rejected or justified in [`DEVIATIONS`].
//!
//! Where coregate deliberately differs from a corpus verdict the case is
//! listed in [`DEVIATIONS`] with a reason. The tests fail on any
//! disagreement not listed there, and on any listed entry that no longer
//! disagrees (a stale entry), so the table always tells the truth. A case
//! expected to be rejected that merely waits for the rest of its head must
//! still be rejected once the head is complete.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use coregate::http::chunked::ChunkedDecoder;
use coregate::http::head::{
    BodyFraming, HeadLimits, Method, RequestHead, ResponseHead, Status, parse_request,
    parse_response,
};
use serde_json::Value;

#[path = "support/base64.rs"]
mod base64;
use base64::base64_decode;

/// Cases where coregate deliberately (or, marked `BUG:`, not deliberately)
/// reaches another verdict than the corpus: `(corpus, case key, reason)`.
/// The key is the case name, prefixed `request: ` / `response: ` in llhttp,
/// with ` #2` appended to the second case of the same key.
///
/// A `BUG:` reason marks behaviour that looks unintended and is left failing
/// the corpus on purpose, so that it shows up here until the parser is fixed.
const DEVIATIONS: &[(&str, &str, &str)] = &[
    // --- llhttp, requests -------------------------------------------------
    (
        "llhttp",
        "request: Content-Length header / Error on `Content-Length` overflow",
        "incomplete head: framing fields are checked when the head is complete; \
         the same bytes plus the final CRLF are rejected (checked by run())",
    ),
    (
        "llhttp",
        "request: Content-Length header / Error on duplicate `Content-Length`",
        "incomplete head: framing fields are checked when the head is complete; \
         the same bytes plus the final CRLF are rejected (checked by run())",
    ),
    (
        "llhttp",
        "request: Invalid requests / HTTP protocol and ANNOUNCE method",
        "methods are an open set of tokens (RFC 9110 9.1): an unknown method is \
         forwarded, not checked against llhttp's method list",
    ),
    (
        "llhttp",
        "request: Invalid requests / Invalid method",
        "methods are an open set of tokens (RFC 9110 9.1): `MKCOLA` is a valid \
         token and is forwarded",
    ),
    (
        "llhttp",
        "request: Methods / M-SEARCH request",
        "asterisk-form is only valid with OPTIONS (RFC 9112 3.2.4); `M-SEARCH *` \
         is SSDP, not something to proxy",
    ),
    (
        "llhttp",
        "request: Methods / SOURCE request with ICE",
        "only HTTP/1.0 and HTTP/1.1 are spoken: an ICE/1.0 request line is refused",
    ),
    (
        "llhttp",
        "request: Methods / OPTIONS request with RTSP",
        "only HTTP/1.0 and HTTP/1.1 are spoken: an RTSP/1.0 request line is refused",
    ),
    (
        "llhttp",
        "request: Methods / ANNOUNCE request with RTSP",
        "only HTTP/1.0 and HTTP/1.1 are spoken: an RTSP/1.0 request line is refused",
    ),
    (
        "llhttp",
        "request: Sample requests / No HTTP version",
        "HTTP/0.9 request lines (no version) are refused",
    ),
    (
        "llhttp",
        "request: `host:port` and basic auth",
        "userinfo in an absolute-form target is refused: RFC 9110 4.2.4 deprecates \
         it, and hops disagree on which part of `a:b@host` is the host",
    ),
    // --- llhttp, responses ------------------------------------------------
    (
        "llhttp",
        "response: Sample responses / RTSP response",
        "upstreams must speak HTTP/1.x: an RTSP status line is a 502",
    ),
    (
        "llhttp",
        "response: Sample responses / ICE response",
        "upstreams must speak HTTP/1.x: an ICE status line is a 502",
    ),
    (
        "llhttp",
        "response: Sample responses / HTTP version 0.9",
        "HTTP/0.9 status lines are refused (502)",
    ),
    (
        "llhttp",
        "response: Transfer-Encoding header / `chunked` before other transfer-encoding",
        "a response whose Transfer-Encoding does not end in chunked is refused \
         (502) instead of read until close (RFC 9112 6.3 rule 4)",
    ),
    (
        "llhttp",
        "response: Transfer-Encoding header / multiple transfer-encoding where chunked is not the last one",
        "a response whose Transfer-Encoding does not end in chunked is refused \
         (502) instead of read until close (RFC 9112 6.3 rule 4)",
    ),
    (
        "llhttp",
        "response: Transfer-Encoding header / `chunkedchunked` transfer-encoding does not enable chunked enconding",
        "a response whose Transfer-Encoding does not end in chunked is refused \
         (502) instead of read until close (RFC 9112 6.3 rule 4)",
    ),
    // --- desync-guardian, Acceptable and Compliant cases refused -----------
    (
        "desync-guardian",
        "No TE/CL headers, some others are non-compliant",
        "whitespace before the colon is refused (RFC 9112 5.1: MUST reject): two \
         parsers disagreeing on `name : value` is a desync vector",
    ),
    (
        "desync-guardian",
        "TE and some others are non-compliant",
        "whitespace before the colon is refused (RFC 9112 5.1: MUST reject): two \
         parsers disagreeing on `name : value` is a desync vector",
    ),
    (
        "desync-guardian",
        "CL and some others are non-compliant",
        "whitespace before the colon is refused (RFC 9112 5.1: MUST reject): two \
         parsers disagreeing on `name : value` is a desync vector",
    ),
    (
        "desync-guardian",
        "A non-essential header with a non-printable character (x01)",
        "a control character in a field name is refused: names are tokens (RFC 9110 \
         5.1), and hops that strip or keep the byte see different fields",
    ),
    (
        "desync-guardian",
        "Some-Header\\x01",
        "a control character in a field name is refused: names are tokens (RFC 9110 \
         5.1), and hops that strip or keep the byte see different fields",
    ),
    (
        "desync-guardian",
        "\\x01Some-Header",
        "a control character in a field name is refused: names are tokens (RFC 9110 \
         5.1), and hops that strip or keep the byte see different fields",
    ),
    (
        "desync-guardian",
        "Some-Header: \\x01value",
        "a control character in a field value is refused (RFC 9110 5.5: not a \
         field-vchar), as httparse does",
    ),
    (
        "desync-guardian",
        "Some-Header: value\\x01",
        "a control character in a field value is refused (RFC 9110 5.5: not a \
         field-vchar), as httparse does",
    ),
    (
        "desync-guardian",
        "Non-RFC, but OK HTTP/0.9",
        "HTTP/0.9 is refused: only HTTP/1.0 and HTTP/1.1 are spoken",
    ),
    (
        "desync-guardian",
        "Empty version, which means HTTP/0.9",
        "HTTP/0.9 request lines (no version) are refused",
    ),
    (
        "desync-guardian",
        "Unknown but OK HTTP/1.2",
        "only HTTP/1.0 and HTTP/1.1 are accepted; an unknown minor version is refused \
         rather than assumed compatible",
    ),
    (
        "desync-guardian",
        "TE with custom parameters OK",
        "transfer-coding parameters are refused: chunked defines none (RFC 9112 7.1), \
         and `chunked;x` is where hops disagree on whether a body is chunked",
    ),
    (
        "desync-guardian",
        "Transfer-Encoding with a param: chunked;custom_param",
        "transfer-coding parameters are refused: chunked defines none (RFC 9112 7.1), \
         and `chunked;x` is where hops disagree on whether a body is chunked",
    ),
    (
        "desync-guardian",
        "Empty URI",
        "an empty request-target is refused: `GET  HTTP/1.1` is not a request line \
         (RFC 9112 3)",
    ),
    (
        "desync-guardian",
        "[space] in URI",
        "a space inside the request-target is refused (RFC 9112 3.2): hops split \
         such a request line differently",
    ),
    // --- desync-guardian, Ambiguous cases forwarded -------------------------
    (
        "desync-guardian",
        "Get with a body and Content-Length",
        "a request body is framed by Content-Length whatever the method (RFC 9112 \
         6.3) and the field is forwarded, so the upstream sees the same framing; \
         the upstream connection is then never reused, so a backend that ignores \
         the body cannot answer it to another client",
    ),
    (
        "desync-guardian",
        "Has a CL in GET",
        "a request body is framed by Content-Length whatever the method (RFC 9112 \
         6.3) and the field is forwarded, so the upstream sees the same framing; \
         the upstream connection is then never reused, so a backend that ignores \
         the body cannot answer it to another client",
    ),
    (
        "desync-guardian",
        "Head with a body and Content-Length",
        "a request body is framed by Content-Length whatever the method (RFC 9112 \
         6.3) and the field is forwarded, so the upstream sees the same framing; \
         the upstream connection is then never reused, so a backend that ignores \
         the body cannot answer it to another client",
    ),
    (
        "desync-guardian",
        "Get with a body and Transfer-Encoding",
        "a request body is framed by chunked whatever the method (RFC 9112 6.3) and \
         forwarded with its Transfer-Encoding, so the upstream sees the same framing; \
         the upstream connection is then never reused",
    ),
    (
        "desync-guardian",
        "Has a TE in GET",
        "a request body is framed by chunked whatever the method (RFC 9112 6.3) and \
         forwarded with its Transfer-Encoding, so the upstream sees the same framing; \
         the upstream connection is then never reused",
    ),
    (
        "desync-guardian",
        "Head with a body and Transfer-Encoding",
        "a request body is framed by chunked whatever the method (RFC 9112 6.3) and \
         forwarded with its Transfer-Encoding, so the upstream sees the same framing; \
         the upstream connection is then never reused",
    ),
    (
        "desync-guardian",
        "Transfer-Encoding with multiple hyphens",
        "`Transfer---Encoding` is a valid token naming another field; no common \
         normalisation turns it into Transfer-Encoding, so it is forwarded as is",
    ),
    (
        "desync-guardian",
        "Transfer-Encoding with multiple delimiters",
        "`Transfer___Encoding` is a valid token naming another field; CGI-style \
         '_'/'-' folding gives TRANSFER___ENCODING, not a framing field",
    ),
    (
        "desync-guardian",
        "Transfer_Encoding with underscore.",
        "normalised, not refused: the field is classed HeaderKind::Shadowing and \
         dropped before forwarding, so a backend folding '_' into '-' never sees it \
         (nginx drops underscored names too); the message goes on with no body",
    ),
    (
        "desync-guardian",
        "Content_Length with underscore.",
        "normalised, not refused: the field is classed HeaderKind::Shadowing and \
         dropped before forwarding, so a backend folding '_' into '-' never sees it; \
         the message goes on with no body",
    ),
];

/// Same value as the proxy's `MAX_UPSTREAM_HEAD_BYTES`.
const MAX_UPSTREAM_HEAD_BYTES: usize = 32 * 1024;

/// Host inserted into llhttp HTTP/1.1 requests that have none.
const HOST_LINE: &[u8] = b"Host: corpus.test\r\n";

// ---------------------------------------------------------------------------
// Replaying a byte stream

#[derive(Clone, Copy, Debug)]
enum Side {
    Request,
    /// Responses to requests made with this method (HEAD: no bodies).
    Response(Method),
}

#[derive(Clone, Copy, Debug)]
struct Opts {
    side: Side,
    /// Insert [`HOST_LINE`] into HTTP/1.1 request heads without Host
    /// (see [`host_insertion_point`]).
    insert_host: bool,
    /// llhttp `skipBody` on a request: the test's callback declares that no
    /// body follows the head, whatever its framing says.
    skip_body: bool,
}

/// Where the stream stopped when no error occurred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Every byte belonged to a complete message.
    Idle,
    /// Inside a head: waiting for more of it.
    Head,
    /// Inside a Content-Length or chunked body: waiting for more of it.
    Body,
    /// Inside a close-delimited response body, which ends at EOF.
    UntilClose,
    /// After a message that closes the connection (only CR/LF followed).
    Closed,
}

#[derive(Debug)]
struct Outcome {
    /// Messages completed before the stream ended or failed.
    completed: usize,
    /// Why the stream was rejected.
    error: Option<String>,
    end: End,
    hosts_inserted: usize,
}

impl Outcome {
    fn describe(&self) -> String {
        let mut s = match &self.error {
            Some(e) => format!("reject ({e}) after {} message(s)", self.completed),
            None => format!("accept, {} message(s), ends {:?}", self.completed, self.end),
        };
        if self.hosts_inserted > 0 {
            s.push_str(&format!(", Host inserted x{}", self.hosts_inserted));
        }
        s
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where to insert a Host line into the request starting at `msg`, or None.
///
/// coregate answers 400 to an HTTP/1.1 request without Host (RFC 9112
/// 3.2), and many llhttp cases have none because llhttp does not care. To
/// keep those cases testing what they were written for, a Host line goes
/// right after the request line, but only when that cannot change what the
/// case tests: the request line is well formed up to ` HTTP/1.1` and ends
/// in CRLF, the next line does not start with whitespace (cases about
/// obs-fold and "space after start line"), and no line of the head already
/// names Host (even malformed, e.g. `Host : x`).
fn host_insertion_point(msg: &[u8]) -> Option<usize> {
    // httparse skips empty lines before a request line; so does llhttp.
    let mut start = 0;
    while msg[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let line_len = find(&msg[start..], b"\r\n")?;
    let line = &msg[start..start + line_len];
    if !line.ends_with(b" HTTP/1.1") || line.iter().any(|&b| b == b'\r' || b == b'\n') {
        return None;
    }
    let after = start + line_len + 2;
    if matches!(msg.get(after), Some(b' ' | b'\t')) {
        return None;
    }
    // The head's lines, up to the first empty one.
    let mut i = after;
    while i < msg.len() && !msg[i..].starts_with(b"\r\n") {
        let end = find(&msg[i..], b"\r\n").map_or(msg.len(), |n| i + n);
        let names_host = msg[i..end].split(|&b| b == b'\r' || b == b'\n').any(|l| {
            l.len() >= 4
                && l[..4].eq_ignore_ascii_case(b"host")
                && matches!(l.get(4), Some(b':' | b' ' | b'\t'))
        });
        if names_host {
            return None;
        }
        i = end + 2;
    }
    Some(after)
}

/// Replay `raw` as one connection's bytes, the way the proxy reads them.
fn replay(raw: &[u8], o: Opts) -> Outcome {
    let mut buf = raw.to_vec();
    let mut out = Outcome {
        completed: 0,
        error: None,
        end: End::Idle,
        hosts_inserted: 0,
    };
    let limits = HeadLimits::default();
    let mut req = RequestHead::default();
    let mut res = ResponseHead::default();
    let mut pos = 0;
    let fail = |mut out: Outcome, e: String| {
        out.error = Some(e);
        out
    };
    loop {
        if pos == buf.len() {
            out.end = End::Idle;
            return out;
        }
        let (framing, keep_alive) = match o.side {
            Side::Request => {
                if o.insert_host
                    && let Some(at) = host_insertion_point(&buf[pos..])
                {
                    buf.splice(pos + at..pos + at, HOST_LINE.iter().copied());
                    out.hosts_inserted += 1;
                }
                match parse_request(&buf[pos..], &limits, &mut req) {
                    Ok(Status::Partial) => {
                        out.end = End::Head;
                        return out;
                    }
                    Err(e) => return fail(out, format!("request head: {e}")),
                    Ok(Status::Complete(n)) => {
                        pos += n;
                        let framing = if o.skip_body {
                            BodyFraming::None
                        } else {
                            req.framing
                        };
                        (framing, req.keep_alive)
                    }
                }
            }
            Side::Response(method) => {
                match parse_response(&buf[pos..], MAX_UPSTREAM_HEAD_BYTES, method, &mut res) {
                    Ok(Status::Partial) => {
                        out.end = End::Head;
                        return out;
                    }
                    Err(e) => return fail(out, format!("response head: {e}")),
                    // The proxy never forwards Upgrade, so it answers 502 to
                    // a 101 rather than switch protocols it did not ask for.
                    Ok(Status::Complete(_)) if res.status == 101 => {
                        return fail(out, "101 Switching Protocols (proxy: 502)".into());
                    }
                    Ok(Status::Complete(n)) => {
                        pos += n;
                        (res.framing, res.keep_alive)
                    }
                }
            }
        };
        match framing {
            BodyFraming::None => {}
            BodyFraming::Length(n) => {
                if ((buf.len() - pos) as u64) < n {
                    out.end = End::Body;
                    return out;
                }
                pos += n as usize;
            }
            BodyFraming::Chunked => {
                let mut decoder = ChunkedDecoder::new();
                match decoder.decode(&buf[pos..], |_| {}) {
                    Err(e) => return fail(out, format!("chunked body: {e}")),
                    Ok(n) => pos += n,
                }
                if !decoder.is_done() {
                    out.end = End::Body;
                    return out;
                }
            }
            BodyFraming::CloseDelimited => {
                // Everything left is body; the message completes at EOF.
                out.end = End::UntilClose;
                return out;
            }
        }
        out.completed += 1;
        if !keep_alive {
            // The connection closes after this message. llhttp tolerates
            // CR and LF there and refuses anything else ("Data after
            // `Connection: close`"); the proxy never reads it.
            if buf[pos..].iter().all(|&b| b == b'\r' || b == b'\n') {
                out.end = End::Closed;
                return out;
            }
            return fail(out, "data after the connection closes".into());
        }
    }
}

thread_local! {
    /// Set while [`replay_guarded`] runs, to keep expected panics quiet.
    static IN_REPLAY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`replay`], with a parser panic turned into an outcome that meets no
/// expectation: the proxy would lose the connection (or, with overflow
/// checks off in release, carry on with a corrupt offset).
fn replay_guarded(raw: &[u8], o: Opts) -> Outcome {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_REPLAY.with(|f| f.get()) {
                previous(info);
            }
        }));
    });
    IN_REPLAY.with(|f| f.set(true));
    let r = std::panic::catch_unwind(|| replay(raw, o));
    IN_REPLAY.with(|f| f.set(false));
    r.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Outcome {
            completed: 0,
            error: Some(format!("{PANIC}{msg}")),
            end: End::Idle,
            hosts_inserted: 0,
        }
    })
}

/// Prefix of [`Outcome::error`] when the parser panicked.
const PANIC: &str = "PANIC in parser: ";

// ---------------------------------------------------------------------------
// Cases and expectations

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// No error, and this many messages completed (None: any number).
    Accept(Option<usize>),
    Reject,
    /// llhttp `upgrade` for a request coregate proxies as plain HTTP: the
    /// first `n` messages (the upgrade request included) complete before
    /// any error. What follows is what llhttp hands to the new protocol;
    /// coregate parses it as the next HTTP/1.1 request, and a 400 there is
    /// as good as anything else.
    UpgradeAsHttp(usize),
    /// desync-guardian Ambiguous: "refused or normalised, never forwarded as
    /// they are". A parser test cannot see normalisation, so a refusal meets
    /// this and every accepted case must be justified in [`DEVIATIONS`]
    /// (or marked `BUG:` there).
    Ambiguous,
}

struct Case {
    key: String,
    raw: Vec<u8>,
    opts: Opts,
    expect: Expect,
}

/// What a corpus yields: the cases to run and the ones skipped, with why.
struct Corpus {
    name: &'static str,
    cases: Vec<Case>,
    skipped: Vec<(String, String)>,
}

fn read_jsonl(file: &str) -> Vec<Value> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "corpus", file]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("field {k} missing in {v}"))
}

/// Unique keys: the second case with a key gets ` #2`, and so on.
fn unique_key(seen: &mut HashMap<String, usize>, key: String) -> String {
    let n = seen.entry(key.clone()).or_insert(0);
    *n += 1;
    if *n == 1 { key } else { format!("{key} #{n}") }
}

fn load_llhttp() -> Corpus {
    let mut corpus = Corpus {
        name: "llhttp",
        cases: Vec::new(),
        skipped: Vec::new(),
    };
    let mut seen = HashMap::new();
    for v in read_jsonl("llhttp.jsonl") {
        let ty = str_field(&v, "type");
        let side_name = if ty.starts_with("request") {
            "request"
        } else {
            "response"
        };
        let key = unique_key(&mut seen, format!("{side_name}: {}", str_field(&v, "name")));
        // Lenient variants only hold with an llhttp leniency switched on;
        // coregate has none, and the strict twin of each is in the corpus.
        if ty.contains("-lenient-") {
            corpus.skipped.push((key, format!("lenient type {ty}")));
            continue;
        }
        let Some(b64) = v["raw_b64"].as_str() else {
            let why = v["skip"].as_str().unwrap_or("no raw bytes");
            corpus.skipped.push((key, format!("no bytes: {why}")));
            continue;
        };
        let raw = base64_decode(b64);
        // `request-finish` / `response-finish` also call llhttp_finish at
        // EOF; its verdict is about the bytes, so they replay like the rest.
        assert!(
            matches!(
                ty,
                "request" | "response" | "request-finish" | "response-finish"
            ),
            "unknown llhttp type {ty}"
        );
        // `skipBody`: the test's on_headers_complete says "no body". For a
        // response that is exactly what a HEAD request means to the proxy.
        let skip_body = v["meta"]["skipBody"].as_bool().unwrap_or(false);
        let side = if side_name == "request" {
            Side::Request
        } else if skip_body {
            Side::Response(Method::Head)
        } else {
            Side::Response(Method::Get)
        };
        let messages = v["messages_completed"]
            .as_u64()
            .expect("messages_completed") as usize;
        let expect = match str_field(&v, "verdict") {
            "accept" => Expect::Accept(Some(messages)),
            "reject" => Expect::Reject,
            // coregate never tunnels: CONNECT is refused with 400, an
            // HTTP/2 preface (`PRI * HTTP/1.1` here; `*` only goes with
            // OPTIONS) is not an HTTP/1.1 request, and a 101 from an
            // upstream is a 502.
            "upgrade"
                if raw.starts_with(b"CONNECT ")
                    || raw.starts_with(b"PRI ")
                    || side_name == "response" =>
            {
                Expect::Reject
            }
            // Other upgrades: Upgrade is stripped and the request proxied
            // as plain HTTP.
            "upgrade" => Expect::UpgradeAsHttp(messages),
            other => panic!("unknown llhttp verdict {other}"),
        };
        corpus.cases.push(Case {
            key,
            raw,
            opts: Opts {
                side,
                insert_host: side_name == "request",
                skip_body: skip_body && side_name == "request",
            },
            expect,
        });
    }
    corpus
}

fn load_desync_guardian() -> Corpus {
    let mut corpus = Corpus {
        name: "desync-guardian",
        cases: Vec::new(),
        skipped: Vec::new(),
    };
    let mut seen = HashMap::new();
    for v in read_jsonl("desync-guardian.jsonl") {
        let key = unique_key(&mut seen, str_field(&v, "name").to_string());
        assert_eq!(str_field(&v, "type"), "request");
        let expect = match str_field(&v, "tier") {
            "Compliant" | "Acceptable" => Expect::Accept(None),
            "Severe" => Expect::Reject,
            "Ambiguous" => Expect::Ambiguous,
            other => panic!("unknown desync-guardian tier {other}"),
        };
        corpus.cases.push(Case {
            key,
            raw: base64_decode(str_field(&v, "raw_b64")),
            // The corpus already added Host where a case had none.
            opts: Opts {
                side: Side::Request,
                insert_host: false,
                skip_body: false,
            },
            expect,
        });
    }
    corpus
}

// ---------------------------------------------------------------------------
// Judging

fn meets(expect: Expect, o: &Outcome) -> bool {
    if o.error.as_deref().is_some_and(|e| e.starts_with(PANIC)) {
        return false;
    }
    match expect {
        Expect::Accept(n) => o.error.is_none() && n.is_none_or(|n| n == o.completed),
        Expect::Reject => o.error.is_some(),
        Expect::UpgradeAsHttp(n) => o.completed >= n,
        Expect::Ambiguous => o.error.is_some(),
    }
}

fn run(corpus: Corpus) {
    let verbose = std::env::var_os("CORPUS_VERBOSE").is_some();
    let deviations: HashMap<&str, &str> = DEVIATIONS
        .iter()
        .filter(|(c, _, _)| *c == corpus.name)
        .map(|&(_, k, r)| (k, r))
        .collect();
    let mut failures = Vec::new();
    let mut used = HashSet::new();
    let (mut as_expected, mut deviated, mut hosts) = (0, 0, 0);
    for case in &corpus.cases {
        let o = replay_guarded(&case.raw, case.opts);
        if o.hosts_inserted > 0 {
            hosts += 1;
        }
        let ok = meets(case.expect, &o);
        let listed = deviations.get(case.key.as_str());
        if listed.is_some() {
            used.insert(case.key.as_str());
        }
        if verbose {
            println!(
                "  [{}] {} | expect {:?} | {} | {:?}",
                if ok { "ok" } else { "DIFF" },
                case.key,
                case.expect,
                o.describe(),
                String::from_utf8_lossy(&case.raw)
            );
        }
        // Waiting for more of a head is not accepting it: a case expected to
        // be rejected must be rejected once its head is complete.
        let mut note = String::new();
        if matches!(case.expect, Expect::Reject) && o.error.is_none() && o.end == End::Head {
            let mut whole = case.raw.clone();
            whole.extend_from_slice(if whole.ends_with(b"\r\n") {
                b"\r\n"
            } else {
                b"\r\n\r\n"
            });
            let c = replay_guarded(&whole, case.opts);
            note = format!("; with the head completed: {}", c.describe());
            if c.error.is_none() {
                failures.push(format!(
                    "{}: waits for the rest of its head, and accepts it once complete ({})",
                    case.key,
                    c.describe()
                ));
            }
        }
        match (ok, listed) {
            (true, None) => as_expected += 1,
            (false, Some(reason)) => {
                deviated += 1;
                println!(
                    "  deviation: {} -> {}{note}\n      reason: {reason}",
                    case.key,
                    o.describe()
                );
            }
            (false, None) => failures.push(format!(
                "{}: expected {:?}, got {}\n    raw: {:?}",
                case.key,
                case.expect,
                o.describe(),
                String::from_utf8_lossy(&case.raw)
            )),
            (true, Some(_)) => failures.push(format!(
                "{}: listed in DEVIATIONS but now meets {:?} ({}): stale entry",
                case.key,
                case.expect,
                o.describe()
            )),
        }
    }
    let skipped: HashSet<&str> = corpus.skipped.iter().map(|(k, _)| k.as_str()).collect();
    for key in deviations.keys() {
        if !used.contains(key) && !skipped.contains(key) {
            failures.push(format!("DEVIATIONS entry {key:?} names no case that ran"));
        }
    }
    for (key, why) in &corpus.skipped {
        if verbose || deviations.contains_key(key.as_str()) {
            println!("  skipped: {key} ({why})");
        }
        if deviations.contains_key(key.as_str()) {
            failures.push(format!("DEVIATIONS entry {key:?} names a skipped case"));
        }
    }
    let lenient = corpus
        .skipped
        .iter()
        .filter(|(_, why)| why.starts_with("lenient"))
        .count();
    let bugs = DEVIATIONS
        .iter()
        .filter(|(c, _, r)| *c == corpus.name && r.starts_with("BUG:"))
        .count();
    println!(
        "{}: {} cases, {} as expected, {} deviations ({} marked BUG), {} skipped \
         ({} lenient, {} without bytes); Host inserted in {} cases",
        corpus.name,
        corpus.cases.len() + corpus.skipped.len(),
        as_expected,
        deviated,
        bugs,
        corpus.skipped.len(),
        lenient,
        corpus.skipped.len() - lenient,
        hosts,
    );
    assert!(
        failures.is_empty(),
        "{} corpus: {} unexpected result(s):\n{}",
        corpus.name,
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn llhttp_corpus() {
    run(load_llhttp());
}

#[test]
fn desync_guardian_corpus() {
    run(load_desync_guardian());
}

#[test]
fn deviation_keys_are_unique() {
    let mut seen = HashSet::new();
    for (corpus, key, reason) in DEVIATIONS {
        assert!(
            matches!(*corpus, "llhttp" | "desync-guardian"),
            "unknown corpus {corpus}"
        );
        assert!(!reason.is_empty(), "{key}: reason missing");
        assert!(seen.insert((corpus, key)), "{key} listed twice");
    }
}

#[test]
fn base64_decoder() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8h"), b"hello!");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("DQoNCg=="), b"\r\n\r\n");
}

#[test]
fn host_insertion() {
    let at = |s: &[u8]| host_insertion_point(s);
    assert_eq!(at(b"GET / HTTP/1.1\r\n\r\n"), Some(16));
    assert_eq!(at(b"\r\nGET / HTTP/1.1\r\nA: b\r\n\r\n"), Some(18));
    assert_eq!(at(b"GET / HTTP/1.1\r\nHOST: x\r\n\r\n"), None);
    assert_eq!(at(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"), None);
    assert_eq!(at(b"GET / HTTP/1.0\r\n\r\n"), None);
    assert_eq!(at(b"GET / HTTP/1.1\r\n Host: x\r\n\r\n"), None);
    assert_eq!(at(b"GET / HTTP/1.1\rX: y\r\n\r\n"), None);
    // Only this message's head counts, not the next one's.
    assert_eq!(
        at(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        Some(16)
    );
}
