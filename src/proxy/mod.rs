//! The per-connection state machine: read a request head, route it, pick a
//! backend, forward head and body, stream the response back, repeat while
//! the connection stays alive.
//!
//! Owns: the life of a request (docs/design.md), mapping every failure to its
//! status code, keep-alive decisions on both sides, 100-continue, and
//! retrying a request that met a dead pooled connection. Does not own:
//! parsing (`http`), sockets (`net`) or the body copy loop (`relay`).
//!
//! Each request takes the worker's current configuration (`WorkerCtx::
//! current`, one epoch check) and keeps it to its end, so a reload never
//! shows one request a mix of two configs. `Conn::handle` asks the rules
//! for a decision and performs its action.
//!
//! Admission (`crate::admission`) runs in `handle` once the rules have
//! decided; backend choice (`crate::balance`) is the worker's `GroupView`
//! for the route's group; statistics are recorded in `Conn::request` (every
//! response) and `Conn::proxy` (upstream latency, backend counts).

pub mod relay;

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::access_log;
use crate::admission;
use crate::admission::decode::{self, Coding, DecodeError, DecodeLimits};
use crate::admission::{
    Admit, After, Ask, DecodeGuard, PolicyState, Readiness, Reason, Refusal, Slot,
};
use crate::balance::{self, GroupView, HashKey, Outcome};
use crate::config::UpstreamGroup;
use crate::config::snapshot::strip_port;
use crate::context::{Current, WorkerCtx};
use crate::http::chunked::ChunkedDecoder;
use crate::http::encode::{self, Forwarded, OutFraming};
use crate::http::head::{self, BodyFraming, Method, RequestHead, ResponseHead, Status, Version};
use crate::net::buffer::{BUF_SIZE, Buf, flush};
use crate::net::upstream::{self, ConnectError, UpStream};
use crate::rules::matcher::{needs_normalizing, normalize_path};
use crate::rules::{Action, Decision, HeaderPlan, RequestView, Rewrite};
use crate::stats::Stamp;
use relay::{BodyIn, BodyOut, Bounds, RelayError, relay};

/// Largest upstream response head accepted (nginx's proxy_buffer_size is
/// 4-8 KiB; backends with large cookies need more).
const MAX_UPSTREAM_HEAD_BYTES: usize = 32 * 1024;

/// After an error response that closes the connection, read and discard
/// what the client still sends for at most this long, so the response is
/// not lost to a TCP reset (nginx's lingering_close).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Serve one downstream connection until it closes.
pub async fn serve(ctx: Rc<WorkerCtx>, stream: TcpStream, peer: SocketAddr, listener_idx: usize) {
    let mut conn = Conn {
        cur: ctx.current(),
        listener_idx,
        client: peer.ip().to_canonical(),
        stream,
        buf: Buf::default(),
        out: Vec::new(),
        req: RequestHead::default(),
        res: ResponseHead::default(),
        ctx,
        status: 0,
        sent: 0,
        received: 0,
    };
    conn.run().await;
    conn.release_buffers();
}

/// The connection's listener settings, from the configuration its current
/// request runs on.
macro_rules! listener {
    ($conn:expr) => {
        $conn.cur.snapshot.listeners[$conn.listener_idx]
    };
}

struct Conn {
    ctx: Rc<WorkerCtx>,
    /// The configuration the current (or last) request runs on.
    cur: Rc<Current>,
    listener_idx: usize,
    client: IpAddr,
    stream: TcpStream,
    /// Downstream read buffer; empty (no capacity) while idle.
    buf: Buf,
    /// Scratch for heads and small bodies on their way out.
    out: Vec<u8>,
    req: RequestHead,
    res: ResponseHead,
    /// Status, bytes sent and bytes received (head and body) for the
    /// request in progress (access log, statistics).
    status: u16,
    sent: u64,
    received: u64,
}

/// How a request ended for the downstream connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// Close after draining what the client still sends.
    LingerClose,
}

/// Why the upstream exchange failed before a response head was sent.
enum UpstreamFailure {
    /// 502: connect refused or reset, invalid or truncated response head.
    BadGateway,
    /// 504: connect, write or response-head timeout.
    Timeout,
}

impl UpstreamFailure {
    fn status(&self) -> u16 {
        match self {
            UpstreamFailure::BadGateway => 502,
            UpstreamFailure::Timeout => 504,
        }
    }
}

/// What `handle` decided to do once the request's bytes are no longer
/// borrowed.
enum Plan {
    /// Close without answering (a `drop = "close"` rule).
    Close,
    /// Refuse with a canned response (no route, or a drop rule).
    Refuse(Reason),
    /// A rule's own response: `fields` then the body.
    Fixed {
        status: u16,
        fields: HeaderPlan,
        body: Vec<u8>,
    },
    /// Forward upstream; the request head for it is in `out`. `key`: the
    /// request's hash for `balance = "hash"` (a retry picks with it too).
    Proxy {
        group: usize,
        backend: usize,
        key: u64,
    },
    /// Every backend of the group is ejected and it does not fail open.
    NoBackend,
    /// The worker's own liveness or readiness answer.
    Probe { status: u16, body: &'static str },
}

/// What `Conn::decide` made of a parsed request.
struct Decided<'c> {
    plan: Plan,
    decision: Decision<'c>,
    /// Admission under the listener's policy, then the route's.
    asks: [Option<(Rc<PolicyState>, Ask)>; 2],
    bounds: BodyBounds,
    /// Refused before admission was asked (an undecodable body coding).
    refused: Option<Refusal>,
    /// When the request started and what the access log will need, for a
    /// logged request.
    logged: Option<(Instant, access_log::Request)>,
}

/// `/healthz` (liveness: the worker answers) and `/readyz` (readiness of
/// this worker under its listener's limits), when `path` is one of them.
fn probe(
    cur: &Current,
    listener: &crate::config::Listener,
    path: &[u8],
    draining: bool,
) -> Option<Plan> {
    if listener.health_path.as_deref() == Some(path) {
        return Some(Plan::Probe {
            status: 200,
            body: "ok\n",
        });
    }
    if listener.ready_path.as_deref() == Some(path) {
        let ready = Readiness::of(&cur.admission.states[listener.policy.id], draining);
        return Some(Plan::Probe {
            status: ready.status(),
            body: ready.body(),
        });
    }
    None
}

/// A request in flight to a backend, counted in the worker's view of its
/// group until dropped.
struct Inflight<'a>(&'a GroupView, usize);

impl<'a> Inflight<'a> {
    fn start(view: &'a GroupView, backend: usize) -> Self {
        view.start(backend);
        Inflight(view, backend)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.finish(self.1);
    }
}

/// The request's hash for consistent hashing.
fn hash_key(key: &HashKey, view: &RequestView<'_>) -> u64 {
    match key {
        HashKey::Header(name) => match view.header(name) {
            Some(v) => admission::key_hash(v),
            None => admission::ip_hash(view.client),
        },
        HashKey::ClientIp => admission::ip_hash(view.client),
        HashKey::Path => admission::key_hash(view.path),
    }
}

/// Admission under each policy in turn; the slots taken, or why not. A
/// slot taken under the listener is given back if the route refuses.
async fn admit(asks: [Option<(Rc<PolicyState>, Ask)>; 2]) -> Result<[Option<Slot>; 2], Refusal> {
    let mut slots = [None, None];
    for (i, ask) in asks.into_iter().enumerate() {
        let Some((state, ask)) = ask else { continue };
        slots[i] = match state.admit(&ask) {
            Admit::Go(slot) => slot,
            Admit::Wait(ticket) => Some(state.wait(ticket).await?),
            Admit::Refuse(r) => return Err(r),
        };
    }
    Ok(slots)
}

/// The request's content codings, when the decode guard will check them:
/// empty when there are none (or only `identity`); `Err` for a coding the
/// guard cannot decode.
fn content_codings(view: &RequestView<'_>) -> Result<Vec<Coding>, ()> {
    let mut value = Vec::new();
    for h in view.headers {
        if h.name
            .get(view.buf)
            .eq_ignore_ascii_case(b"content-encoding")
        {
            if !value.is_empty() {
                value.extend_from_slice(b", ");
            }
            value.extend_from_slice(h.value.get(view.buf));
        }
    }
    let mut codings = Vec::new();
    if !value.is_empty() {
        decode::parse_codings(&value, &mut codings)?;
        codings.retain(|c| *c != Coding::Identity);
    }
    Ok(codings)
}

/// Write `ip` as text into `buf` without allocating; the written part.
fn write_ip(buf: &mut [u8; 48], ip: IpAddr) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An IPv6 address is at most 45 characters.
    let _ = write!(cursor, "{ip}");
    let n = cursor.position() as usize;
    &buf[..n]
}

/// What `exchange` needs to know of the request once its head is consumed.
#[derive(Clone, Copy)]
struct RequestFacts {
    method: Method,
    version: Version,
    framing: BodyFraming,
    expect_continue: bool,
}

/// The limits a request's body is read under, from its listener and route.
struct BodyBounds {
    /// The request's total deadline (`request_timeout`), from its first byte.
    deadline: monoio::time::Instant,
    /// The body cap: the route's, or its listener's.
    max_len: u64,
    /// The route's decode guard, with the request's content codings.
    decode: Option<(DecodeGuard, Vec<Coding>)>,
}

/// Why a request ended without a response from the upstream.
enum Fail {
    /// No connection to the backend: nothing of the request reached it
    /// (and nothing of its body was read), so it may go to another.
    Unsent(UpstreamFailure),
    /// Answer `status` ourselves; keep-alive only if the request body was
    /// fully read.
    Respond { status: u16, body_consumed: bool },
    /// Close without answering (the client broke the exchange).
    Close,
}

/// Outcome of reading a response head.
enum HeadResult {
    Ok,
    /// Closed before sending a byte: a pooled connection the backend had
    /// already given up on. Safe to retry when nothing else was sent.
    ClosedEarly,
    Failed(UpstreamFailure),
}

impl Conn {
    async fn run(&mut self) {
        // A new connection gets `header_timeout` to send its first byte
        // (nginx's client_header_timeout); between requests it may idle
        // for `keepalive_timeout`.
        let mut idle_limit = listener!(self).header_timeout;
        loop {
            if self.buf.is_empty() {
                // Idle: hold no buffer while waiting for the next request.
                self.release_buffers();
                if !self.wait_readable(idle_limit).await {
                    return;
                }
            }
            idle_limit = listener!(self).keepalive_timeout;
            // The request's state machine is large (3.3 KB) and an idle
            // connection should not carry it: it lives in a box for the
            // length of one request.
            let next = Box::pin(self.request()).await;
            match next {
                Next::KeepAlive if !self.ctx.idle.is_draining() => {}
                // Boxed: its timer would otherwise make every idle
                // connection's future larger.
                Next::LingerClose => return Box::pin(self.linger()).await,
                _ => return,
            }
        }
    }

    /// Read one request and answer it.
    async fn request(&mut self) -> Next {
        let started = Stamp::now();
        // The one epoch check per request.
        self.cur = self.ctx.current();
        self.status = 0;
        self.sent = 0;
        self.received = 0;
        if !self.buf.has_capacity() {
            self.buf = Buf::new(self.ctx.bufs.get());
        }
        for heads in [&mut self.req.headers, &mut self.res.headers] {
            if heads.capacity() == 0 {
                *heads = self.ctx.header_vecs.get();
            }
        }
        let deadline = monoio::time::Instant::now() + listener!(self).request_timeout;
        let next = match self.read_head(deadline).await {
            Ok(()) => self.handle(deadline).await,
            // A head that failed says nothing of a body: closed (the
            // table's rows for head errors close anyway).
            // A head that failed says nothing of a body: closed (the
            // table's rows for head errors close anyway).
            Err(Some(refusal)) => self.refuse(refusal, false).await,
            Err(None) => Next::Close,
        };
        self.ctx
            .stats
            .response(self.status, started, self.received, self.sent);
        next
    }

    fn release_buffers(&mut self) {
        for heads in [&mut self.req.headers, &mut self.res.headers] {
            if heads.capacity() > 0 {
                self.ctx.header_vecs.put(std::mem::take(heads));
            }
        }
        // Rarely used (Connection listing other fields): just freed.
        self.req.connection_names = Vec::new();
        self.res.connection_names = Vec::new();
        let buf = std::mem::take(&mut self.buf).into_inner();
        if buf.capacity() > 0 {
            self.ctx.bufs.put(buf);
        }
        let out = std::mem::take(&mut self.out);
        if out.capacity() > 0 {
            self.ctx.bufs.put(out);
        }
    }

    fn out_buf(&mut self) -> &mut Vec<u8> {
        if self.out.capacity() == 0 {
            self.out = self.ctx.bufs.get();
        }
        &mut self.out
    }

    /// Wait, holding no buffer, until the client sends something. False
    /// when the connection should close: keep-alive timeout, drain, error.
    ///
    /// Measured with scripts/compare-nginx.sh (1 worker, 50 connections,
    /// 128-byte responses): on epoll the strict (non-relaxed) readiness
    /// check costs less than reading straight away (14.1 vs 15.8 us of
    /// proxy CPU per request), because the read then never meets EAGAIN;
    /// on io_uring the two are within noise.
    async fn wait_readable(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        monoio::select! {
            r = self.stream.readable(false) => r.is_ok(),
            // Fires at the deadline or when the worker drains.
            _ = self.ctx.idle.wait_until(deadline) => false,
        }
    }

    /// Read until a whole head is parsed into `self.req`, within
    /// `header_timeout` and the request's total `deadline`. `Err(Some(r))`:
    /// answer and close; `Err(None)`: close silently.
    async fn read_head(&mut self, deadline: monoio::time::Instant) -> Result<(), Option<Refusal>> {
        let header_deadline = monoio::time::Instant::now() + listener!(self).header_timeout;
        let late = if deadline < header_deadline {
            Refusal::of(Reason::RequestTimeout)
        } else {
            Refusal::of(Reason::HeaderTimeout)
        };
        let deadline = deadline.min(header_deadline);
        loop {
            let limits = &listener!(self).limits;
            match head::parse_request(self.buf.data(), limits, &mut self.req) {
                Ok(Status::Complete(_)) => return Ok(()),
                Ok(Status::Partial) => {}
                Err(e) => {
                    crate::debug!("downstream {}: {e}", self.client);
                    let reason = match e.status() {
                        414 => Reason::UriTooLong,
                        431 => Reason::HeadTooLarge,
                        _ => Reason::BadRequest,
                    };
                    return Err(Some(Refusal::of(reason)));
                }
            }
            if self.buf.is_full() {
                return Err(Some(Refusal::of(Reason::HeadTooLarge)));
            }
            let had_bytes = !self.buf.is_empty();
            match monoio::time::timeout_at(deadline, self.buf.read_from(&mut self.stream)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err(None),
                // A client that started a head and stalled gets 408; one
                // that never sent a byte is just an idle connection.
                Err(_) if had_bytes => return Err(Some(late)),
                Err(_) => return Err(None),
            }
        }
    }

    /// Answer with a canned response. A closing answer lingers, so the
    /// client reads it even if it is still sending.
    async fn reject(&mut self, status: u16, keep_alive: bool) -> Next {
        self.canned(status, keep_alive, None).await
    }

    /// Refuse a request, count why, and keep the connection or close it
    /// as the reason's row in the refusal table says (`body_read`: the
    /// request's body, if any, was read to its end).
    async fn refuse(&mut self, r: Refusal, body_read: bool) -> Next {
        self.ctx.rejections.count(r.reason);
        let keep = match r.reason.after() {
            After::Close => false,
            After::KeepIfBodyRead => body_read && self.req.keep_alive,
        };
        self.canned(r.status(), keep, r.retry_after).await
    }

    async fn canned(&mut self, status: u16, keep_alive: bool, retry_after: Option<u32>) -> Next {
        let keep_alive = keep_alive && !self.ctx.idle.is_draining();
        let version = self.req.version;
        // A HEAD answer carries no content (RFC 9110 9.3.2), or a kept-alive
        // client would read it as the start of its next response.
        let with_body = self.req.method != Method::Head;
        let out = self.out_buf();
        out.clear();
        encode::write_canned(out, status, keep_alive, version, with_body, retry_after);
        self.send_out(status, keep_alive).await
    }

    /// Send the response waiting in `out` (written by `reject` or a rule's
    /// fixed response) and say how the connection goes on.
    async fn send_out(&mut self, status: u16, keep_alive: bool) -> Next {
        self.status = status;
        self.sent = self.out.len() as u64;
        let send = listener!(self).send_timeout;
        match monoio::time::timeout(send, flush(&mut self.stream, &mut self.out)).await {
            Ok(Ok(())) if keep_alive => Next::KeepAlive,
            Ok(Ok(())) => Next::LingerClose,
            _ => Next::Close,
        }
    }

    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = monoio::time::Instant::now() + LINGER_TIME;
        let mut seen = 0;
        let mut scratch = vec![0u8; 4096];
        while seen < LINGER_BYTES {
            match monoio::time::timeout_at(deadline, self.stream.read(scratch)).await {
                Ok((Ok(n), b)) if n > 0 => {
                    seen += n;
                    scratch = b;
                }
                _ => return,
            }
        }
    }

    /// The request's plan, decided while its head is still in the buffer:
    /// probes, rule evaluation, what admission will be asked, the body's
    /// bounds, and the upstream head or the rule's fixed response written
    /// into `out`. Nothing here waits.
    fn decide<'c>(&mut self, cur: &'c Current, deadline: monoio::time::Instant) -> Decided<'c> {
        let mut decision = Decision::default();
        let mut logged = None;
        // Admission under the listener's policy, then the route's.
        let mut asks: [Option<(Rc<PolicyState>, Ask)>; 2] = [None, None];
        let mut refused = None;
        let mut bounds = BodyBounds {
            deadline,
            max_len: u64::MAX,
            decode: None,
        };
        // Everything that reads the request's bytes happens here, while
        // the head is still in the buffer: evaluation, the upstream head
        // or the rule's fixed response written into `out`, and what the
        // access log will need.
        let plan = 'plan: {
            if self.out.capacity() == 0 {
                self.out = self.ctx.bufs.get();
            }
            self.out.clear();
            let data = self.buf.data();
            let routing_path = self.req.routing_path(data);
            let (raw_path, query) = match routing_path.iter().position(|&b| b == b'?') {
                Some(i) => (&routing_path[..i], &routing_path[i + 1..]),
                None => (routing_path, &b""[..]),
            };
            let mut normalized = Vec::new();
            let path = if needs_normalizing(raw_path) {
                normalize_path(raw_path, &mut normalized);
                &normalized[..]
            } else {
                raw_path
            };
            let authority = self.req.routing_host(data);
            let view = RequestView {
                method: self.req.method_span.get(data),
                host: authority.map(strip_port),
                authority,
                path,
                query,
                buf: data,
                headers: &self.req.headers,
                client: self.client,
            };
            let listener = &cur.snapshot.listeners[self.listener_idx];
            if let Some(probe) = probe(cur, listener, path, self.ctx.idle.is_draining()) {
                break 'plan probe;
            }
            cur.rules
                .evaluate(&view, &mut self.ctx.scratch.borrow_mut(), &mut decision);
            self.ctx.stats.rule_evaluation();
            if let Some(r) = decision.route {
                cur.tallies.route(r.index);
            }
            let route_policy = decision.route.and_then(|r| r.policy.as_deref());
            let content_length = match self.req.framing {
                BodyFraming::Length(n) => Some(n),
                _ => None,
            };
            let write = self.req.method.is_write();
            // A route's body cap replaces its listener's.
            let route_cap = route_policy.and_then(|p| p.max_body);
            let listener_state = &cur.admission.states[listener.policy.id];
            let listener_length = if route_cap.is_some() {
                None
            } else {
                content_length
            };
            asks[0] = Some((
                listener_state.clone(),
                listener_state.ask(&view, write, listener_length),
            ));
            if let Some(p) = route_policy {
                let state = &cur.admission.states[p.id];
                asks[1] = Some((state.clone(), state.ask(&view, write, content_length)));
            }
            bounds.max_len = route_cap.or(listener.policy.max_body).unwrap_or(u64::MAX);
            if let Some(guard) = route_policy.and_then(|p| p.decode)
                && self.req.framing != BodyFraming::None
            {
                match content_codings(&view) {
                    Ok(codings) if codings.is_empty() => {}
                    Ok(codings) => bounds.decode = Some((guard, codings)),
                    Err(()) => refused = Some(Refusal::of(Reason::UnsupportedEncoding)),
                }
            }
            // Only a logged request reads the clock (latency is its field).
            if !decision.log.is_empty() {
                logged = Some((
                    Instant::now(),
                    access_log::Request::capture(&view, &decision.log),
                ));
            }
            let path_changed = path != raw_path;
            match decision.route.and_then(|r| r.action.as_ref()) {
                None => Plan::Refuse(Reason::NoRoute),
                Some(Action::Drop { close: true }) => Plan::Close,
                Some(Action::Drop { close: false }) => Plan::Refuse(Reason::Dropped),
                Some(Action::Respond {
                    status,
                    headers,
                    body,
                }) => {
                    let mut fields = HeaderPlan::default();
                    for (name, value) in headers {
                        fields.push(name, value, &view, decision.caps.as_ref());
                    }
                    let mut text = Vec::new();
                    body.expand(&mut text, &view, decision.caps.as_ref());
                    Plan::Fixed {
                        status: *status,
                        fields,
                        body: text,
                    }
                }
                Some(Action::Redirect { status, location }) => {
                    let mut fields = HeaderPlan::default();
                    fields.push(b"Location", location, &view, decision.caps.as_ref());
                    Plan::Fixed {
                        status: *status,
                        fields,
                        body: Vec::new(),
                    }
                }
                Some(Action::Proxy { upstream, rewrite }) => 'proxy: {
                    let group = *upstream;
                    let balance = &cur.snapshot.upstreams[group].balance;
                    let key = match &balance.method {
                        balance::Method::Hash(k) => hash_key(k, &view),
                        _ => 0,
                    };
                    let view_g = &cur.groups[group];
                    view_g.request(balance);
                    let Some(backend) =
                        view_g.pick(&cur.snapshot.upstreams[group], key, Instant::now(), None)
                    else {
                        break 'proxy Plan::NoBackend;
                    };
                    // The target sent upstream: the normalised path, with
                    // the route's rewrite, and the query as it came.
                    let mut target = Vec::new();
                    let rewritten = match rewrite {
                        Rewrite::None if !path_changed => false,
                        Rewrite::None => {
                            target.extend_from_slice(path);
                            true
                        }
                        Rewrite::StripPrefix(prefix) => {
                            let rest = path.strip_prefix(&prefix[..]).unwrap_or(path);
                            if rest.first() != Some(&b'/') {
                                target.push(b'/');
                            }
                            target.extend_from_slice(rest);
                            true
                        }
                        Rewrite::Path(t) => {
                            t.expand(&mut target, &view, decision.caps.as_ref());
                            true
                        }
                    };
                    if rewritten && !query.is_empty() {
                        target.push(b'?');
                        target.extend_from_slice(query);
                    }
                    let mut ip = [0u8; 48];
                    let fwd = Forwarded {
                        client_ip: write_ip(&mut ip, self.client),
                        proto: b"http",
                        default_host: cur.snapshot.upstreams[group].backends[backend]
                            .authority
                            .as_bytes(),
                    };
                    encode::write_upstream_request(
                        &mut self.out,
                        data,
                        &self.req,
                        &fwd,
                        rewritten.then_some(&target[..]),
                        &decision.request,
                    );
                    Plan::Proxy {
                        group,
                        backend,
                        key,
                    }
                }
            }
        };
        Decided {
            plan,
            decision,
            asks,
            bounds,
            refused,
            logged,
        }
    }

    /// Ask the rules what to do with the parsed request, and do it.
    async fn handle(&mut self, deadline: monoio::time::Instant) -> Next {
        let cur = self.cur.clone();
        let Decided {
            plan,
            decision,
            asks,
            bounds,
            mut refused,
            logged,
        } = self.decide(&cur, deadline);
        let head_len = self.req.len;
        self.received = head_len as u64;
        self.buf.consume(head_len);
        // Without reading the body we cannot find the next request: an
        // answer before it keeps the connection only when there is none.
        let bodyless = self.req.framing == BodyFraming::None;
        let keep_if_bodyless = self.req.keep_alive && bodyless;
        let mut upstream = None;
        // Work a route does passes admission; probes, 404s and drops cost
        // less than the checks would. The slots are held to the end of
        // the response.
        let mut _slots = [None, None];
        if refused.is_none()
            && matches!(
                plan,
                Plan::Fixed { .. } | Plan::Proxy { .. } | Plan::NoBackend
            )
        {
            match admit(asks).await {
                Ok(slots) => _slots = slots,
                Err(r) => refused = Some(r),
            }
        }
        let next = match (refused, plan) {
            (Some(r), _) => self.refuse(r, bodyless).await,
            (None, Plan::Close) => {
                self.ctx.rejections.count(Reason::Dropped);
                self.status = 0;
                Next::Close
            }
            (None, Plan::Refuse(reason)) => self.refuse(Refusal::of(reason), bodyless).await,
            (None, Plan::Probe { status, body }) => {
                let keep = keep_if_bodyless && !self.ctx.idle.is_draining();
                let with_body = self.req.method != Method::Head;
                encode::write_fixed(
                    &mut self.out,
                    status,
                    &HeaderPlan::default(),
                    &HeaderPlan::default(),
                    body.as_bytes(),
                    keep,
                    self.req.version,
                    with_body,
                );
                self.send_out(status, keep).await
            }
            (
                None,
                Plan::Fixed {
                    status,
                    fields,
                    body,
                },
            ) => {
                let keep = keep_if_bodyless && !self.ctx.idle.is_draining();
                let with_body = self.req.method != Method::Head;
                encode::write_fixed(
                    &mut self.out,
                    status,
                    &fields,
                    &decision.response,
                    &body,
                    keep,
                    self.req.version,
                    with_body,
                );
                self.send_out(status, keep).await
            }
            (None, Plan::NoBackend) => self.refuse(Refusal::of(Reason::NoBackend), bodyless).await,
            (
                None,
                Plan::Proxy {
                    group,
                    backend,
                    key,
                },
            ) => {
                let (next, used) = self
                    .proxy(&cur, group, backend, key, &decision.response, &bounds)
                    .await;
                upstream = Some((group, used));
                next
            }
        };
        if let Some((started, request)) = logged {
            let label = upstream.map(|(g, b)| cur.snapshot.upstreams[g].backends[b].label.as_str());
            self.ctx.access_log.write(
                &decision.log,
                &access_log::Entry {
                    req: &request,
                    status: self.status,
                    latency: started.elapsed(),
                    upstream: label,
                    bytes: self.sent,
                    route: decision.route.map(|r| r.name.as_str()),
                },
            );
        }
        next
    }

    /// Forward the request to `backend_idx` of the group, or, when that
    /// fails before anything reached it (or for an idempotent body-less
    /// request), once to another backend within the retry budget. Returns
    /// how the connection goes on and the backend that answered last.
    async fn proxy(
        &mut self,
        cur: &Current,
        group_idx: usize,
        mut backend_idx: usize,
        key: u64,
        response_edits: &HeaderPlan,
        bounds: &BodyBounds,
    ) -> (Next, usize) {
        let snapshot = &cur.snapshot;
        let group = &snapshot.upstreams[group_idx];
        let balance = &group.balance;
        let view = &cur.groups[group_idx];

        let version = self.req.version;
        let mut keep = self.req.keep_alive;
        let facts = RequestFacts {
            method: self.req.method,
            version,
            framing: self.req.framing,
            expect_continue: self.req.expect_continue,
        };

        if let Some((guard, codings)) = &bounds.decode
            && let Err(fail) = self.decode_guard(facts, bounds, *guard, codings).await
        {
            return (self.fail(fail).await, backend_idx);
        }

        // The upstream head is in `out` (written by `handle`); it stays
        // there until the response head is in, so a retry can resend it.
        let mut ubuf = Buf::new(self.ctx.bufs.get());
        let mut retried = false;
        let (mut up, body_sent, _inflight) = loop {
            let inflight = Inflight::start(view, backend_idx);
            let started = Instant::now();
            let result = self
                .exchange(group_idx, group, backend_idx, facts, bounds, &mut ubuf)
                .await;
            // One clock read serves the statistics, the EWMA and ejection.
            let elapsed = started.elapsed();
            let now = started + elapsed;
            let (status, body_consumed, unsent) = match result {
                Ok((up, body_sent)) => {
                    self.ctx.stats.upstream_latency(elapsed);
                    let outcome = if balance.eject_on_5xx && self.res.status >= 500 {
                        Outcome::Failed
                    } else {
                        Outcome::Answered(elapsed)
                    };
                    view.record(balance, backend_idx, outcome, now);
                    break (up, body_sent, inflight);
                }
                Err(Fail::Close) => {
                    self.ctx.bufs.put(ubuf.into_inner());
                    return (Next::Close, backend_idx);
                }
                Err(Fail::Unsent(f)) => (f.status(), facts.framing == BodyFraming::None, true),
                Err(Fail::Respond {
                    status,
                    body_consumed,
                }) => (status, body_consumed, false),
            };
            if status == 502 || status == 504 {
                cur.tallies
                    .backend(group_idx, backend_idx)
                    .count(|t| &t.failures);
                view.record(balance, backend_idx, Outcome::Failed, now);
            }
            drop(inflight);
            crate::debug!(
                "upstream {}: answered {status} to {}",
                group.backends[backend_idx].label,
                self.client
            );
            // Retry elsewhere only when the request can be sent again as
            // it was: nothing of it reached the backend, or it is an
            // idempotent request without a body that met a broken
            // connection (not a timeout: a slow backend retried is
            // twice the load on a struggling group).
            let replayable = unsent
                || (status == 502
                    && facts.framing == BodyFraming::None
                    && facts.method.is_idempotent());
            if replayable
                && !retried
                && view.has_retry()
                && let Some(next) = view.pick(group, key, now, Some(backend_idx))
                && next != backend_idx
                && view.take_retry()
            {
                retried = true;
                backend_idx = next;
                // Whatever the failed backend sent must not prefix the
                // next one's response.
                ubuf.clear();
                continue;
            }
            self.ctx.bufs.put(ubuf.into_inner());
            return (
                self.reject(status, keep && body_consumed).await,
                backend_idx,
            );
        };
        let backend = &group.backends[backend_idx];
        if !body_sent {
            keep = false;
        }

        // Response head to downstream.
        let (body_in, out_framing, body_out) = match self.res.framing {
            BodyFraming::None => (BodyIn::Length(0), OutFraming::AsIs, BodyOut::Verbatim),
            BodyFraming::Length(n) => (BodyIn::Length(n), OutFraming::AsIs, BodyOut::Verbatim),
            BodyFraming::Chunked if version == Version::Http11 => (
                BodyIn::Chunked,
                OutFraming::ChunkedVerbatim,
                BodyOut::Verbatim,
            ),
            BodyFraming::Chunked => {
                if !self.res.te_is_plain_chunked {
                    // An HTTP/1.0 client cannot undo a coding we cannot strip.
                    self.ctx.bufs.put(ubuf.into_inner());
                    return (self.reject(502, false).await, backend_idx);
                }
                keep = false;
                (BodyIn::Chunked, OutFraming::UntilClose, BodyOut::Dechunk)
            }
            BodyFraming::CloseDelimited if version == Version::Http11 => {
                (BodyIn::UntilClose, OutFraming::Rechunk, BodyOut::Rechunk)
            }
            BodyFraming::CloseDelimited => {
                keep = false;
                (
                    BodyIn::UntilClose,
                    OutFraming::UntilClose,
                    BodyOut::Verbatim,
                )
            }
        };
        if self.ctx.idle.is_draining() {
            keep = false;
        }
        self.out.clear();
        encode::write_downstream_response(
            &mut self.out,
            ubuf.data(),
            &self.res,
            out_framing,
            version,
            keep,
            response_edits,
        );
        ubuf.consume(self.res.len);
        self.status = self.res.status;
        self.sent = self.out.len() as u64;

        let timeouts = Bounds::new(group.read_timeout, listener!(self).send_timeout);
        let relayed = relay(
            &mut up,
            &mut ubuf,
            &mut self.stream,
            &mut self.out,
            body_in,
            body_out,
            &timeouts,
        )
        .await;
        if let Ok(body_bytes) = relayed {
            self.sent += body_bytes;
        }
        // A body on a method whose body has no defined meaning (RFC 9110
        // 9.3.1, 9.3.2, 9.3.5) is forwarded with its framing, but a backend
        // that ignores it would read it as a second request and answer it
        // to the next client on this connection (desync-guardian's
        // "Ambiguous" tier). Such a connection is never reused.
        let body_without_meaning = facts.framing != BodyFraming::None
            && matches!(facts.method, Method::Get | Method::Head | Method::Delete);
        let upstream_reusable = relayed.is_ok()
            && self.res.keep_alive
            && ubuf.is_empty()
            && body_sent
            && !body_without_meaning;
        self.ctx.bufs.put(ubuf.into_inner());
        if let Err(e) = relayed {
            // The head is out: all we can do is close, so the client sees a
            // truncated message rather than a complete-looking one.
            crate::debug!(
                "response body from {} to {}: {e}",
                backend.label,
                self.client
            );
            return (Next::Close, backend_idx);
        }
        if upstream_reusable && !self.ctx.idle.is_draining() {
            self.ctx
                .upstreams
                .put(group_idx, backend_idx, up, group.max_idle);
        }
        let next = match (keep, body_sent) {
            (true, _) => Next::KeepAlive,
            // The upstream answered before taking the whole body: the
            // client may still be sending, so linger or it gets a reset
            // instead of the answer.
            (false, false) => Next::LingerClose,
            (false, true) => Next::Close,
        };
        (next, backend_idx)
    }

    /// Connect (or reuse), send the request, and read the response head
    /// into `self.res`. On success returns the upstream connection and
    /// whether the request body was completely read from the client.
    async fn exchange(
        &mut self,
        group_idx: usize,
        group: &UpstreamGroup,
        backend_idx: usize,
        facts: RequestFacts,
        bounds: &BodyBounds,
        ubuf: &mut Buf,
    ) -> Result<(UpStream, bool), Fail> {
        let RequestFacts {
            method, framing, ..
        } = facts;
        let has_body = framing != BodyFraming::None;
        let upstream_fail = |f: UpstreamFailure| Fail::Respond {
            status: f.status(),
            body_consumed: !has_body,
        };
        // A pooled connection is peeked at before use (`upstream_conn`), but
        // the backend may still close it between the peek and our write.
        // An idempotent body-less request is then retried once on a new
        // connection (RFC 9110 9.2.2); anything else cannot be replayed.
        let retryable = !has_body && method.is_idempotent();
        let mut retried = false;
        loop {
            let (mut up, reused) = self
                .upstream_conn(group_idx, group, backend_idx, retried)
                .await
                .map_err(Fail::Unsent)?;
            if !has_body {
                // Head only: `out` stays intact until the response head is
                // in, so the request can be sent again.
                let head = std::mem::take(&mut self.out);
                let written =
                    monoio::time::timeout(group.response_timeout, up.write_all(head)).await;
                let Ok((res, head)) = written else {
                    return Err(upstream_fail(UpstreamFailure::Timeout));
                };
                self.out = head;
                let outcome = match res {
                    Ok(_) => {
                        self.read_response_head(&mut up, ubuf, method, group.response_timeout)
                            .await
                    }
                    Err(_) => HeadResult::ClosedEarly,
                };
                match outcome {
                    HeadResult::Ok => {
                        self.out.clear();
                        return Ok((up, true));
                    }
                    HeadResult::ClosedEarly if reused && retryable && !retried => {
                        retried = true;
                        continue;
                    }
                    HeadResult::ClosedEarly => {
                        return Err(upstream_fail(UpstreamFailure::BadGateway));
                    }
                    HeadResult::Failed(f) => return Err(upstream_fail(f)),
                }
            }

            // With a body: tell a waiting client to send it, then stream it.
            self.send_continue(facts).await?;
            let body_in = match framing {
                BodyFraming::Length(n) => BodyIn::Length(n),
                _ => BodyIn::Chunked,
            };
            let body_bounds = Bounds {
                read: listener!(self).body_timeout,
                write: group.response_timeout,
                deadline: Some(bounds.deadline),
                max_len: bounds.max_len,
            };
            let sent = relay(
                &mut self.stream,
                &mut self.buf,
                &mut up,
                &mut self.out,
                body_in,
                BodyOut::Verbatim,
                &body_bounds,
            )
            .await;
            let body_sent = match sent {
                Ok(n) => {
                    self.received += n;
                    true
                }
                Err(e) if e.is_source() => return Err(self.body_failure(e)),
                Err(e) => {
                    // The upstream stopped reading; it may have answered
                    // early (413, 401...). Forward that if it did.
                    crate::debug!("request body to upstream: {e}");
                    self.out.clear();
                    false
                }
            };
            return match self
                .read_response_head(&mut up, ubuf, method, group.response_timeout)
                .await
            {
                HeadResult::Ok => Ok((up, body_sent)),
                HeadResult::ClosedEarly => Err(Fail::Respond {
                    status: 502,
                    body_consumed: body_sent,
                }),
                HeadResult::Failed(f) => Err(Fail::Respond {
                    status: f.status(),
                    body_consumed: body_sent,
                }),
            };
        }
    }

    /// Tell a client waiting on `Expect: 100-continue` to send its body,
    /// unless it already started. RFC 9110 10.1.1: an HTTP/1.0 client's
    /// expectation is ignored.
    async fn send_continue(&mut self, facts: RequestFacts) -> Result<(), Fail> {
        if !(facts.expect_continue && facts.version == Version::Http11 && self.buf.is_empty()) {
            return Ok(());
        }
        let sent = monoio::time::timeout(
            listener!(self).send_timeout,
            self.stream.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]),
        )
        .await;
        match sent {
            Ok((Ok(_), _)) => Ok(()),
            _ => Err(Fail::Close),
        }
    }

    /// How a request body that failed on the client's side ends: counted,
    /// and answered when there is someone to answer.
    fn body_failure(&self, e: RelayError) -> Fail {
        crate::debug!("request body from {}: {e}", self.client);
        let reason = match e {
            RelayError::SrcTimeout => Reason::BodyTimeout,
            RelayError::SrcDeadline => Reason::RequestTimeout,
            RelayError::TooLarge(_) => Reason::BodyTooLarge,
            RelayError::Framing(_) => Reason::BadRequest,
            // The client went away mid-body: nobody to answer.
            _ => return Fail::Close,
        };
        self.ctx.rejections.count(reason);
        Fail::Respond {
            status: reason.status(),
            body_consumed: false,
        }
    }

    /// Answer a request that failed before reaching an upstream.
    async fn fail(&mut self, fail: Fail) -> Next {
        match fail {
            Fail::Unsent(f) => self.reject(f.status(), false).await,
            Fail::Respond {
                status,
                body_consumed,
            } => {
                self.reject(status, self.req.keep_alive && body_consumed)
                    .await
            }
            Fail::Close => Next::Close,
        }
    }

    /// The decode guard: read the whole body (it is at most the body cap),
    /// decode it into a scratch buffer that is thrown away, and refuse it
    /// with 413 if it inflates past the route's ratio or absolute cap.
    /// When it passes, the original bytes wait in `self.buf` and are
    /// forwarded as they came.
    async fn decode_guard(
        &mut self,
        facts: RequestFacts,
        bounds: &BodyBounds,
        guard: DecodeGuard,
        codings: &[Coding],
    ) -> Result<(), Fail> {
        self.send_continue(facts).await?;
        let read = Bounds {
            read: listener!(self).body_timeout,
            write: listener!(self).send_timeout,
            deadline: Some(bounds.deadline),
            max_len: bounds.max_len,
        };
        // A chunked body is decoded out of its framing into `plain`; a
        // length body is checked where it lies.
        let mut decoder = ChunkedDecoder::new();
        let mut scanned = 0;
        let mut plain = Vec::new();
        // Framing around tiny chunks can outweigh their data many times.
        let max_raw = bounds
            .max_len
            .saturating_mul(2)
            .saturating_add(BUF_SIZE as u64);
        loop {
            let data = self.buf.data();
            let (done, want) = match facts.framing {
                BodyFraming::Length(n) => {
                    let have = data.len() as u64;
                    (have >= n, n.saturating_sub(have).min(max_raw) as usize)
                }
                _ => {
                    let window = &data[scanned..];
                    let n = decoder
                        .decode(window, |r| plain.extend_from_slice(&window[r]))
                        .map_err(|e| self.body_failure(RelayError::Framing(e)))?;
                    scanned += n;
                    if decoder.data_len > bounds.max_len {
                        return Err(self.body_failure(RelayError::TooLarge(bounds.max_len)));
                    }
                    (decoder.is_done(), BUF_SIZE)
                }
            };
            if done {
                break;
            }
            if self.buf.spare() == 0 {
                if self.buf.data().len() as u64 >= max_raw {
                    return Err(self.body_failure(RelayError::TooLarge(bounds.max_len)));
                }
                self.buf.reserve(want.max(BUF_SIZE));
            }
            match read.read(&mut self.stream, &mut self.buf).await {
                Ok(0) => return Err(Fail::Close),
                Ok(_) => {}
                Err(e) => return Err(self.body_failure(e)),
            }
        }
        let body = match facts.framing {
            BodyFraming::Length(n) => &self.buf.data()[..n as usize],
            _ => &plain[..],
        };
        let limits = DecodeLimits {
            ratio: guard.ratio,
            max: guard.max,
        };
        match decode::check(body, codings, limits) {
            Ok(_) => Ok(()),
            Err(e) => {
                crate::debug!("request body from {}: {e}", self.client);
                let reason = match e {
                    DecodeError::TooLarge { .. } => Reason::DecodedTooLarge,
                    DecodeError::Corrupt(_) => Reason::BadEncoding,
                };
                self.ctx.rejections.count(reason);
                Err(Fail::Respond {
                    status: reason.status(),
                    body_consumed: false,
                })
            }
        }
    }

    /// A pooled connection to the backend, or a new one; `fresh` skips the
    /// pool (a retry must not meet another dead pooled connection).
    ///
    /// Every pooled connection is peeked at before use (`is_stale`). An
    /// idle connection must have nothing to read: bytes there are EOF, or
    /// an answer nobody asked for (a body after a HEAD response, bytes past
    /// Content-Length, a backend answering a request it found in a body it
    /// did not read). Handing such a connection to the next request would
    /// give that client someone else's response.
    async fn upstream_conn(
        &mut self,
        group_idx: usize,
        group: &UpstreamGroup,
        backend_idx: usize,
        fresh: bool,
    ) -> Result<(UpStream, bool), UpstreamFailure> {
        let cur = self.cur.clone();
        let tally = cur.tallies.backend(group_idx, backend_idx);
        while let Some(up) = (!fresh)
            .then(|| {
                self.ctx
                    .upstreams
                    .take(group_idx, backend_idx, group.keepalive_timeout)
            })
            .flatten()
        {
            if up.is_stale() {
                continue;
            }
            tally.count(|t| &t.reuses);
            return Ok((up, true));
        }
        let backend = &group.backends[backend_idx];
        match upstream::connect(&backend.addr, group.connect_timeout).await {
            Ok(up) => {
                tally.count(|t| &t.connects);
                Ok((up, false))
            }
            Err(ConnectError::Timeout) => {
                crate::debug!("upstream {}: connect timed out", backend.label);
                Err(UpstreamFailure::Timeout)
            }
            Err(ConnectError::Io(e)) => {
                crate::debug!("upstream {}: {e}", backend.label);
                Err(UpstreamFailure::BadGateway)
            }
        }
    }

    async fn read_response_head(
        &mut self,
        up: &mut UpStream,
        ubuf: &mut Buf,
        method: Method,
        timeout: Duration,
    ) -> HeadResult {
        let deadline = monoio::time::Instant::now() + timeout;
        let mut got_any = false;
        loop {
            match head::parse_response(ubuf.data(), MAX_UPSTREAM_HEAD_BYTES, method, &mut self.res)
            {
                Ok(Status::Complete(n)) => {
                    match self.res.status {
                        // Informational: 100 Continue was answered by us,
                        // 103 and others are optional; skip them. 101 would
                        // need an Upgrade we never forward.
                        101 => return HeadResult::Failed(UpstreamFailure::BadGateway),
                        100..=199 => {
                            ubuf.consume(n);
                            continue;
                        }
                        _ => return HeadResult::Ok,
                    }
                }
                Ok(Status::Partial) => {}
                Err(e) => {
                    crate::debug!("upstream response: {e}");
                    return HeadResult::Failed(UpstreamFailure::BadGateway);
                }
            }
            match monoio::time::timeout_at(deadline, ubuf.read_from(up)).await {
                Ok(Ok(n)) if n > 0 => got_any = true,
                Ok(Ok(_)) | Ok(Err(_)) if !got_any && ubuf.is_empty() => {
                    return HeadResult::ClosedEarly;
                }
                Ok(_) => return HeadResult::Failed(UpstreamFailure::BadGateway),
                Err(_) => return HeadResult::Failed(UpstreamFailure::Timeout),
            }
        }
    }
}
