//! The proxy on the native I/O core (`engine`, `ring`): an explicit state
//! machine per downstream connection, driven by completions.
//!
//! Owns: the life of a request (docs/design.md), in the order the phases
//! run: read the head ([`Proxy::read_head`]), decide (probes and rules,
//! `decide`), admit ([`Proxy::admit`]), pick a backend ([`Proxy::pick`]),
//! the exchange with it ([`Proxy::connect`], [`Proxy::pump_body`],
//! [`Proxy::pump_response`]) or our own answer ([`Proxy::respond`]), and
//! the request's end ([`Proxy::end_request`]): what becomes of both
//! connections, in one place. Also retries, 100-continue, lingering
//! close, and every timeout, as deadlines in the exchange (`timers`).
//! Does not own: parsing (`http`), the body's framing (`relay::Framer`),
//! rules, admission's checks or balancing.
//!
//! Shapes:
//! - A downstream connection is a [`Down`] record: socket, listener,
//!   client address, a deadline and a receive armed. Idle, that is all it
//!   is; when bytes arrive it takes an [`Exchange`] from the free list
//!   (buffers, heads, timers, the request's state) and gives it back when
//!   it goes idle again.
//! - An upstream connection is an [`Up`] record. Idle in the pool it keeps
//!   its receive armed, so a backend that closes it or sends bytes nobody
//!   asked for is noticed at once and the connection is dropped, without
//!   a syscall on reuse.
//! - Request body and response move at the same time (full duplex): each
//!   side's bytes are forwarded when they arrive, each side's receive
//!   pauses when the other side is not taking them.
//!
//! Each request takes the worker's current configuration (one epoch
//! check) and keeps it to its end, so a reload never shows one request a
//! mix of two configs.

pub mod decide;
pub mod keep;
pub mod pool;
pub mod relay;
pub mod timers;
mod tls;
mod tunnel;

use std::cell::RefCell;
use std::net::IpAddr;
use std::os::fd::{BorrowedFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::task::{RawWaker, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use crate::admission::decode::{self, Coding, DecodeError, DecodeLimits};
use crate::admission::fair::Ticket;
use crate::admission::{Admit, Ask, DecodeGuard, PolicyState, Reason, Refusal, Slot};
use crate::balance::Outcome;
use crate::config::BackendAddr;
use crate::context::{Current, WorkerCtx};
use crate::engine::{Io, Kind, Service, token, untoken};
use crate::http::chunked::ChunkedDecoder;
use crate::http::edits::HeaderPlan;
use crate::http::encode::{self, Forwarded, OutFraming};
use crate::http::head::{self, BodyFraming, Method, RequestHead, ResponseHead, Status, Version};
use crate::net::buffer::{BUF_SIZE, Buf, BufPool};
use crate::ring::Completion;
use crate::ring::wheel::Visit;
use crate::stats::Stamp;
use decide::{Decided, Edits, Inputs, Logged, Plan};
use keep::{Keep, Next, UpstreamState, upstream_reusable};
use relay::{BodyIn, BodyOut, Framer, RelayError};
use timers::{Timer, Timers};
use tunnel::Tunnel;

/// Largest upstream response head accepted (nginx's proxy_buffer_size is
/// 4-8 KiB; backends with large cookies need more).
const MAX_UPSTREAM_HEAD_BYTES: usize = 32 * 1024;

/// After an error response that closes the connection, read and discard
/// what the client still sends for at most this long, so the response is
/// not lost to a TCP reset (nginx's lingering_close).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Bytes one side may have received and not yet handed on before its
/// receive pauses (a multishot receive has no flow control of its own).
/// One more provided buffer (16 KiB) still fits a pooled buffer behind it.
const MAX_BUFFERED: usize = 64 * 1024;

/// The proxy's operations, as token kinds.
const DOWN_RECV: u8 = Kind::Service as u8;
const DOWN_SEND: u8 = Kind::Service as u8 + 1;
const UP_RECV: u8 = Kind::Service as u8 + 2;
const UP_SEND: u8 = Kind::Service as u8 + 3;
const UP_CONNECT: u8 = Kind::Service as u8 + 4;

/// A tick no deadline reaches.
const NEVER: u64 = u64::MAX;

/// A downstream connection. Idle, this record and a receive armed are all
/// it holds.
struct Down {
    fd: RawFd,
    listener: u16,
    recv_armed: bool,
    sending: bool,
    closing: bool,
    /// Its receive was cancelled to push back on the client.
    paused: bool,
    /// The client closed its side: no more bytes will come.
    eof: bool,
    client: IpAddr,
    /// While idle: when the connection closes (header or keep-alive
    /// timeout). With an exchange, its timers say.
    idle_until: u64,
    /// The tick of the connection's live wheel entry; `NEVER`: none.
    filed: u64,
    ex: Option<Box<Exchange>>,
    /// The TLS session of an HTTPS listener's connection.
    tls: Option<Box<crate::tls::Session>>,
}

/// An upstream connection: in use by one exchange, or idle in the pool.
#[derive(Default)]
struct Up {
    fd: RawFd,
    /// The downstream connection whose request this carries; `None` while
    /// pooled (any byte or EOF then ends it).
    down: Option<usize>,
    recv_armed: bool,
    sending: bool,
    connecting: bool,
    closing: bool,
    paused: bool,
    eof: bool,
    /// The connection failed (a reset) rather than closed: what came
    /// before is not a whole close-delimited body.
    reset: bool,
    /// Taken from the pool (a silent close may have raced our request).
    reused: bool,
    /// A send to it failed: it takes no more of the request.
    stopped: bool,
    /// Bytes to the backend: the request head (kept until the response
    /// head arrives when the request has no body, so it can be sent
    /// again), then body pieces. `sent` of them are out.
    out: Vec<u8>,
    sent: usize,
    /// Bytes from the backend not yet handed on.
    buf: Buf,
    /// Where it connects to, alive until the connect completes.
    addr: Option<Box<SockAddr>>,
    /// The TLS session to an `https://` backend. Its plaintext is `out`
    /// and `buf`, as on a plain connection: `out` is sealed into the
    /// session's own buffer (and counted in `sent` as it is), and what
    /// comes is decrypted into `buf`.
    tls: Option<Box<crate::tls::Session>>,
}

impl Up {
    /// Send what waits: `out` from `sent` on, or on a TLS connection the
    /// records sealed from it (and the handshake's own messages). One send
    /// at a time; false when there was nothing to send.
    fn flush(&mut self, io: &mut Io, uid: usize) -> std::io::Result<bool> {
        debug_assert!(!self.sending);
        let bytes = match self.tls.as_deref_mut() {
            None if self.sent == self.out.len() => return Ok(false),
            None => &self.out[self.sent..],
            Some(session) => {
                if !session.pending() {
                    // Until the handshake is done only its own messages
                    // go: the request stays whole in `out`, to be sent
                    // again elsewhere should the handshake fail.
                    if self.sent < self.out.len() && !session.is_handshaking() {
                        // Sealed is as good as sent for the exchange: the
                        // plaintext is the session's now (buffered until
                        // the handshake is done).
                        self.sent += session.seal(&self.out[self.sent..]);
                        session.carried = 0;
                    } else {
                        session.flush();
                    }
                }
                if !session.pending() {
                    return Ok(false);
                }
                &session.out[session.sent..]
            }
        };
        // SAFETY: the bytes live in the heap storage of `out`, or of the
        // boxed session's `out`, which stay put when the slab moves;
        // neither is touched and the record is not freed while `sending`
        // is set (`up_sent`, `close_up`).
        unsafe { io.driver.send(self.fd, bytes, token(UP_SEND, uid as u64))? };
        self.sending = true;
        Ok(true)
    }
}

/// Where a request is.
enum Phase {
    /// Reading a request head (or idle between requests).
    Head,
    /// Waiting in the admission queue of `asks[at]`.
    Queued { ticket: Ticket, at: usize },
    /// The decode guard reads the whole body before anything is sent.
    Guard,
    /// With an upstream: request body and response on their way.
    Forward,
    /// Our own answer is in `out`.
    Respond,
    /// Answered and closing: discarding what the client still sends.
    Linger,
    /// Switched protocols: raw bytes both ways (`tunnel`).
    Tunnel,
}

/// Why the upstream exchange failed before a response head came.
#[derive(Clone, Copy, Debug)]
enum UpstreamFailure {
    /// 502: connect refused or reset, invalid or truncated response head.
    BadGateway,
    /// 504: connect, write or response-head timeout.
    Timeout,
}

impl UpstreamFailure {
    fn status(self) -> u16 {
        match self {
            UpstreamFailure::BadGateway => 502,
            UpstreamFailure::Timeout => 504,
        }
    }
}

/// How an exchange with a backend failed.
#[derive(Clone, Copy, Debug)]
enum UpFail {
    /// Nothing of the request reached the backend: no connection.
    Unsent(UpstreamFailure),
    /// The connection closed before a byte of an answer: a pooled
    /// connection the backend had already given up on.
    ClosedEarly,
    Failed(UpstreamFailure),
}

/// The decode guard's progress through a chunked body.
#[derive(Default)]
struct GuardScan {
    decoder: ChunkedDecoder,
    scanned: usize,
    plain: Vec<u8>,
}

/// What a request in flight needs; taken from the free list when bytes
/// arrive on an idle connection and given back when it goes idle.
struct Exchange {
    phase: Phase,
    /// The configuration this request runs on.
    cur: Option<Rc<Current>>,
    /// Received from the client, not yet parsed or forwarded.
    buf: Buf,
    /// Bytes to the client; `out_sent` of them are out.
    out: Vec<u8>,
    out_sent: usize,
    req: RequestHead,
    res: ResponseHead,
    timers: Timers,
    edits: Edits,
    /// The upstream request head, written at `pick`, until a connection
    /// takes it.
    fwd: Vec<u8>,
    /// A request has started (its first byte came): counted at its end.
    active: bool,
    /// Its head parsed: `req` describes it.
    parsed: bool,
    /// Bytes of the head still at the front of `buf` (a forwarded
    /// request's, until `pick` writes the upstream head from them).
    head_pending: usize,
    started: Stamp,
    status: u16,
    received: u64,
    sent: u64,
    /// What the client connection's fate depends on (`keep`).
    keep: Keep,
    /// The answer is whole in `out`: what follows once it is sent.
    next: Option<Next>,
    plan: Option<Plan>,
    asks: [Option<(Rc<PolicyState>, Ask)>; 2],
    slots: [Option<Slot>; 2],
    max_len: u64,
    decode: Option<(DecodeGuard, Vec<Coding>)>,
    scan: Option<Box<GuardScan>>,
    logged: Option<Logged>,
    // The upstream side.
    group: usize,
    backend: usize,
    key: u64,
    up: Option<usize>,
    /// Counted in flight at `backend` (balancing).
    inflight: bool,
    /// A retry on another backend was used.
    retried: bool,
    /// A retry on a fresh connection to the same backend was used.
    refreshed: bool,
    /// Length of the upstream head at the start of the upstream's `out`.
    up_head: usize,
    up_started: Instant,
    /// The request body on its way upstream; `None`: no body.
    body_in: Option<Framer>,
    /// The response head went to the client.
    head_in: bool,
    body_out: Option<Framer>,
    /// The backend last asked, for the access log.
    used: Option<(usize, usize)>,
    lingered: usize,
    /// The response is counted in the worker's statistics (a 101 is, when
    /// its tunnel opens).
    counted: bool,
    tunnel: Tunnel,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            phase: Phase::Head,
            cur: None,
            buf: Buf::default(),
            out: Vec::new(),
            out_sent: 0,
            req: RequestHead::default(),
            res: ResponseHead::default(),
            timers: Timers::default(),
            edits: Edits::default(),
            fwd: Vec::new(),
            active: false,
            parsed: false,
            head_pending: 0,
            started: Stamp::now(),
            status: 0,
            received: 0,
            sent: 0,
            keep: Keep::default(),
            next: None,
            plan: None,
            asks: [None, None],
            slots: [None, None],
            max_len: u64::MAX,
            decode: None,
            scan: None,
            logged: None,
            group: 0,
            backend: 0,
            key: 0,
            up: None,
            inflight: false,
            retried: false,
            refreshed: false,
            up_head: 0,
            up_started: Instant::now(),
            body_in: None,
            head_in: false,
            body_out: None,
            used: None,
            lingered: 0,
            counted: false,
            tunnel: Tunnel::default(),
        }
    }
}

impl Exchange {
    fn cur(&self) -> &Rc<Current> {
        self.cur
            .as_ref()
            .expect("a request under way has its config")
    }
}

thread_local! {
    /// Connections whose admission ticket was granted, for the loop.
    static WOKEN: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// A waker that queues connection `id` in `WOKEN`.
fn waker(id: usize) -> Waker {
    const VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);
    fn clone(p: *const ()) -> RawWaker {
        RawWaker::new(p, &VTABLE)
    }
    fn wake(p: *const ()) {
        WOKEN.with(|w| w.borrow_mut().push(p as usize));
    }
    fn drop(_: *const ()) {}
    // SAFETY: the data pointer is a connection id, never dereferenced;
    // every function of the table is sound for any value of it.
    unsafe { Waker::from_raw(RawWaker::new(id as *const (), &VTABLE)) }
}

/// The client's address, or the unspecified address when the socket has
/// none (it is already gone).
fn peer_ip(fd: RawFd) -> IpAddr {
    // SAFETY: `fd` is an open socket this worker owns, borrowed only for
    // this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    SockRef::from(&fd)
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical())
}

/// Write `ip` as text into `buf` without allocating; the written part.
/// An IPv4 address, every request's usual case, is written by hand:
/// through `fmt` it cost about 600 instructions per request (callgrind).
fn write_ip(buf: &mut [u8; 48], ip: IpAddr) -> &[u8] {
    use std::io::Write;
    if let IpAddr::V4(v4) = ip {
        let mut n = 0;
        for (i, o) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[n] = b'.';
                n += 1;
            }
            if o >= 100 {
                buf[n] = b'0' + o / 100;
                n += 1;
            }
            if o >= 10 {
                buf[n] = b'0' + o / 10 % 10;
                n += 1;
            }
            buf[n] = b'0' + o % 10;
            n += 1;
        }
        return &buf[..n];
    }
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An IPv6 address is at most 45 characters.
    let _ = write!(cursor, "{ip}");
    let n = cursor.position() as usize;
    &buf[..n]
}

/// A non-blocking socket for `addr`, and the address to connect it to.
fn upstream_socket(addr: &BackendAddr) -> std::io::Result<(RawFd, SockAddr)> {
    let (domain, to) = match addr {
        BackendAddr::Tcp(a) => (Domain::for_address(*a), SockAddr::from(*a)),
        BackendAddr::Unix(p) => (Domain::UNIX, SockAddr::unix(p)?),
    };
    let s = Socket::new(domain, Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    if matches!(addr, BackendAddr::Tcp(_)) {
        s.set_nodelay(true)?;
    }
    Ok((s.into_raw_fd(), to))
}

/// Body bytes straight from a receive's provided buffer into the buffer
/// that sends them on, when nothing is queued ahead of them on either
/// side: one copy in user space instead of two (kernel buffer → side
/// buffer → send buffer). How many of `bytes` were taken; the rest goes
/// through the side buffer as before. The response side: upstream
/// `uid`'s bytes into its client's `out`, once the response head went out and while no send to
/// the client is in flight.
fn direct_response(
    downs: &mut Slab<Down>,
    uid: usize,
    u: &mut Up,
    bytes: &[u8],
    bufs: &BufPool,
) -> Result<usize, RelayError> {
    if !u.buf.is_empty() {
        return Ok(0);
    }
    let Some(d) = u.down.and_then(|id| downs.get_mut(id)) else {
        return Ok(0);
    };
    if d.sending || d.closing {
        return Ok(0);
    }
    let Some(ex) =
        d.ex.as_deref_mut()
            .filter(|ex| ex.head_in && ex.up == Some(uid))
    else {
        return Ok(0);
    };
    if ex.out.capacity() == 0 {
        // A quiet tunnel gave its buffer back.
        ex.out = bufs.get();
    }
    let Some(framer) = ex.body_out.as_mut() else {
        return Ok(0);
    };
    Ok(framer
        .copy_out(bytes, &mut ex.out, &mut ex.out_sent)?
        .consumed)
}

/// The request side of [`direct_response`]: a client's body bytes into its
/// upstream's `out`, while the body is being forwarded and no send to the
/// upstream is in flight.
fn direct_body(
    ex: &mut Exchange,
    ups: &mut Slab<Up>,
    bytes: &[u8],
    bufs: &BufPool,
) -> Result<usize, RelayError> {
    let open = match ex.phase {
        Phase::Forward => !ex.keep.body_read,
        Phase::Tunnel => !ex.tunnel.up_shut,
        _ => false,
    };
    if !open || !ex.buf.is_empty() {
        return Ok(0);
    }
    let Some(u) = ex.up.and_then(|uid| ups.get_mut(uid)) else {
        return Ok(0);
    };
    if u.sending || u.connecting || u.closing || u.stopped {
        return Ok(0);
    }
    if u.out.capacity() == 0 {
        // A quiet tunnel gave its buffer back.
        u.out = bufs.get();
    }
    let Some(framer) = ex.body_in.as_mut() else {
        return Ok(0);
    };
    let taken = framer.copy_out(bytes, &mut u.out, &mut u.sent)?.consumed;
    ex.received += taken as u64;
    if framer.done() {
        ex.keep.body_read = true;
        ex.timers.clear(Timer::BodyIdle);
        ex.timers.clear(Timer::Request);
    }
    Ok(taken)
}

/// Whether the request's body has been received whole: forwarded already,
/// or the rest of it waiting in `buf`. A client may half-close once it
/// has sent everything.
fn body_received(ex: &Exchange) -> bool {
    ex.keep.body_read
        || ex
            .body_in
            .as_ref()
            .is_none_or(|f| f.ends_within(ex.buf.data()))
}

/// Append `bytes` to `buf`, taking a pooled buffer when it has none.
fn take_in(ctx: &WorkerCtx, buf: &mut Buf, bytes: &[u8]) {
    if !buf.has_capacity() {
        *buf = Buf::new(ctx.bufs.get());
    }
    buf.push(bytes);
}

/// The proxy service: every connection of one worker.
#[derive(Default)]
pub struct Proxy {
    downs: Slab<Down>,
    ups: Slab<Up>,
    pool: pool::Pool,
    /// Exchanges ready for reuse: one moves between this list and a
    /// connection as one pointer, never copied and never reallocated.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Exchange>>,
    /// Upstream connections to close (scratch).
    closing: Vec<u32>,
}

impl Proxy {
    pub fn new() -> Self {
        Proxy::default()
    }

    // ---- Downstream receive: bytes in, then whatever phase is next. ----

    fn down_received(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, c: &Completion) {
        let d = &mut self.downs[id];
        if !c.more() {
            d.recv_armed = false;
        }
        if d.tls.is_some()
            && let (Some(bid), Ok(n)) = (c.buffer(), c.io_result())
        {
            if self.tls_received(io, ctx, id, bid, n) {
                self.received(io, ctx, id);
            }
            return;
        }
        let Proxy {
            downs, spare, ups, ..
        } = self;
        let d = &mut downs[id];
        match (c.buffer(), c.io_result()) {
            (Some(bid), Ok(n)) => {
                let ex = d.ex.get_or_insert_with(|| spare.pop().unwrap_or_default());
                if matches!(ex.phase, Phase::Linger) {
                    ex.lingered += n;
                    io.driver.recycle(bid);
                    if ex.lingered >= LINGER_BYTES {
                        return self.close_down(io, ctx, id);
                    }
                    return;
                }
                let bytes = io.driver.buf(bid, n);
                let taken = match direct_body(ex, ups, bytes, &ctx.bufs) {
                    Ok(taken) => taken,
                    Err(e) => {
                        io.driver.recycle(bid);
                        return self.body_failure(io, ctx, id, e);
                    }
                };
                if taken < n {
                    take_in(ctx, &mut ex.buf, &bytes[taken..]);
                }
                io.driver.recycle(bid);
            }
            (None, Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) && !d.closing => {
                if d.paused {
                    // Ended while being paused: armed again once drained.
                    return self.resume_down(io, id);
                }
                // Every worker buffer was in use: receive again.
                d.recv_armed = io
                    .driver
                    .recv_multi(d.fd, token(DOWN_RECV, id as u64))
                    .is_ok();
                return;
            }
            // The receive this connection paused has ended.
            (None, Err(e))
                if e.raw_os_error() == Some(libc::ECANCELED) && d.paused && !d.closing =>
            {
                return self.resume_down(io, id);
            }
            (None, Ok(0)) if !d.closing => {
                d.eof = true;
                return self.after_client_eof(io, ctx, id);
            }
            // An error, or our own cancellation.
            _ => return self.close_down(io, ctx, id),
        }
        self.received(io, ctx, id);
    }

    /// Bytes were taken in (into the exchange's `buf`, or handed on):
    /// keep receiving, push back on a client that sends faster than its
    /// bytes go on, and move the request on.
    fn received(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        if d.closing {
            return self.close_down(io, ctx, id);
        }
        if d.eof {
            // A TLS client's close_notify.
            return self.after_client_eof(io, ctx, id);
        }
        if !d.recv_armed && !d.paused && !d.eof {
            // The kernel ended the multishot receive with data (a full
            // completion queue does that): receive again.
            d.recv_armed = io
                .driver
                .recv_multi(d.fd, token(DOWN_RECV, id as u64))
                .is_ok();
        }
        let backlog = d.ex.as_ref().map_or(0, |ex| ex.buf.data().len());
        let guarding =
            d.ex.as_ref()
                .is_some_and(|ex| matches!(ex.phase, Phase::Guard));
        if backlog > MAX_BUFFERED && d.recv_armed && !d.paused && !guarding {
            // The client sends faster than its bytes are handed on (a
            // body to a slow backend, a flood of pipelined requests): stop
            // receiving until the backlog halves, and let TCP push back.
            d.paused = true;
            let _ = io.driver.cancel(d.fd, token(DOWN_RECV, id as u64));
        }
        self.advance(io, ctx, id);
    }

    /// Receive again on a paused connection once its backlog is down to
    /// half the cap and its receive has ended.
    fn resume_down(&mut self, io: &mut Io, id: usize) {
        let d = &mut self.downs[id];
        if !d.paused {
            return;
        }
        let backlog = d.ex.as_ref().map_or(0, |ex| ex.buf.data().len());
        // The decode guard reads the whole body: no backlog cap there (a
        // body that piled up while the request was queued resumes).
        let guarding =
            d.ex.as_ref()
                .is_some_and(|ex| matches!(ex.phase, Phase::Guard));
        let cap = if guarding { usize::MAX } else { MAX_BUFFERED };
        if !d.paused || d.recv_armed || d.closing || d.eof || backlog > cap / 2 {
            return;
        }
        d.paused = false;
        d.recv_armed = io
            .driver
            .recv_multi(d.fd, token(DOWN_RECV, id as u64))
            .is_ok();
    }

    /// The client closed its side. A request already read whole is still
    /// answered (a client may half-close after sending); anything that
    /// needs more bytes from it ends here.
    fn after_client_eof(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &self.downs[id];
        let needs_bytes = match d.ex.as_deref() {
            None => true,
            Some(ex) => match ex.phase {
                Phase::Head => !self.head_complete(ctx, id),
                Phase::Guard | Phase::Linger => true,
                // Received whole is enough: forwarding it can finish.
                Phase::Forward => !body_received(ex),
                // Passed on to the backend once all before it went.
                Phase::Queued { .. } | Phase::Respond | Phase::Tunnel => false,
            },
        };
        if needs_bytes {
            return self.close_down(io, ctx, id);
        }
        if let Some(ex) = self.downs[id].ex.as_deref_mut() {
            ex.keep.asked = false;
        }
        self.advance(io, ctx, id);
    }

    /// Whether the bytes at hand hold a whole request head.
    fn head_complete(&self, ctx: &WorkerCtx, id: usize) -> bool {
        let d = &self.downs[id];
        let Some(ex) = d.ex.as_deref() else {
            return false;
        };
        let limits = &ctx.current().snapshot.listeners[d.listener as usize].limits;
        let mut scratch = RequestHead::default();
        matches!(
            head::parse_request(ex.buf.data(), limits, &mut scratch),
            Ok(Status::Complete(_))
        )
    }

    /// Move the connection's request on as far as the bytes at hand allow.
    fn advance(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &self.downs[id];
        if d.closing {
            return;
        }
        let Some(ex) = d.ex.as_deref() else { return };
        match ex.phase {
            Phase::Head => self.read_head(io, ctx, id),
            Phase::Guard => self.guard(io, ctx, id),
            Phase::Forward => self.pump_body(io, ctx, id),
            Phase::Tunnel => self.pump_tunnel(io, ctx, id),
            Phase::Queued { .. } | Phase::Respond | Phase::Linger => {}
        }
    }

    // ---- Phase 1: read the head. ----

    /// Parse a request head from what the client sent; once whole, decide.
    fn read_head(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        if d.sending {
            // The previous answer is still going out.
            return;
        }
        let listener = d.listener as usize;
        let eof = d.eof;
        let ex =
            d.ex.as_deref_mut()
                .expect("a head is read into an exchange");
        if ex.buf.is_empty() {
            if eof {
                return self.close_down(io, ctx, id);
            }
            return;
        }
        if !ex.active {
            self.start_request(io, ctx, id);
        }
        let d = &mut self.downs[id];
        let ex = d.ex.as_deref_mut().expect("started");
        let cur = ex.cur().clone();
        let limits = &cur.snapshot.listeners[listener].limits;
        match head::parse_request(ex.buf.data(), limits, &mut ex.req) {
            Ok(Status::Complete(_)) => {
                ex.timers.clear(Timer::Head);
                self.decide(io, ctx, id)
            }
            Ok(Status::Partial) if eof => self.close_down(io, ctx, id),
            // More bytes than any head may have, and still no end to it.
            Ok(Status::Partial) if ex.buf.data().len() >= BUF_SIZE => {
                self.refuse(io, ctx, id, Refusal::of(Reason::HeadTooLarge))
            }
            Ok(Status::Partial) => {}
            Err(e) => {
                crate::debug!("downstream {}: {e}", d.client);
                let reason = match e.status() {
                    414 => Reason::UriTooLong,
                    431 => Reason::HeadTooLarge,
                    _ => Reason::BadRequest,
                };
                self.refuse(io, ctx, id, Refusal::of(reason))
            }
        }
    }

    /// The first byte of a request is here: take the configuration it
    /// runs on (the one epoch check per request) and start its clocks.
    fn start_request(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        let ex =
            d.ex.as_deref_mut()
                .expect("a request starts in an exchange");
        let cur = ctx.current();
        let listener = &cur.snapshot.listeners[d.listener as usize];
        ex.timers.clear_all();
        ex.timers
            .set(Timer::Head, io.tick_after(listener.header_timeout));
        ex.timers
            .set(Timer::Request, io.tick_after(listener.request_timeout));
        if ex.req.headers.capacity() == 0 {
            ex.req.headers = ctx.header_vecs.get();
        }
        if ex.res.headers.capacity() == 0 {
            ex.res.headers = ctx.header_vecs.get();
        }
        if ex.out.capacity() == 0 {
            ex.out = ctx.bufs.get();
        }
        ex.cur = Some(cur);
        ex.keep = Keep::default();
        ex.active = true;
        ex.started = Stamp::at(io.now);
        ex.status = 0;
        ex.received = 0;
        ex.sent = 0;
        ex.next = None;
    }

    // ---- Phase 2: probes and rules (`decide`). ----

    fn decide(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        let ex = d.ex.as_deref_mut().expect("decided in an exchange");
        let cur = ex.cur().clone();
        ex.edits.clear();
        let Decided {
            plan,
            asks,
            max_len,
            decode,
            refused,
            logged,
            tunnel,
        } = decide::decide(
            &Inputs {
                ctx,
                cur: &cur,
                listener: d.listener as usize,
                client: d.client,
                req: &ex.req,
                data: ex.buf.data(),
                draining: io.draining || ctx.leaving.load(std::sync::atomic::Ordering::Relaxed),
                tls: d.tls.is_some(),
            },
            &mut ex.edits,
        );
        ex.received = ex.req.len as u64;
        ex.keep = Keep::for_request(&ex.req, io.draining);
        ex.asks = asks;
        ex.max_len = max_len;
        ex.decode = decode;
        ex.logged = logged;
        ex.tunnel.idle = tunnel;
        if tunnel.is_some()
            && let Some(offer) = ex.req.upgrade
        {
            ex.tunnel.offer.clear();
            ex.tunnel.offer.extend_from_slice(offer.get(ex.buf.data()));
        }
        if ex.keep.body_read {
            ex.timers.clear(Timer::Request);
        }
        ex.parsed = true;
        // A forwarded request's head is written for its backend at
        // `pick`; the others need its bytes no more.
        ex.head_pending = ex.req.len;
        if !matches!(plan, Plan::Proxy { .. }) {
            consume_head(ex);
        }
        if let Some(r) = refused {
            return self.refuse(io, ctx, id, r);
        }
        let admit = plan.needs_admission();
        ex.plan = Some(plan);
        if admit {
            self.admit(io, ctx, id, 0);
        } else {
            self.act(io, ctx, id);
        }
    }

    // ---- Phase 3: admission. ----

    /// Admission under each policy from `from` on; a queue wait parks the
    /// connection until its ticket is granted or its deadline passes.
    fn admit(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, from: usize) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("admitted in an exchange");
        for at in from..2 {
            let Some((state, ask)) = ex.asks[at].take() else {
                continue;
            };
            match state.admit(&ask) {
                Admit::Go(slot) => ex.slots[at] = slot,
                Admit::Wait(ticket) => {
                    ex.timers
                        .set(Timer::Queue, io.tick_after(state.queue_timeout()));
                    ticket.poll_granted(&waker(id));
                    ex.asks[at] = Some((state, ask));
                    ex.phase = Phase::Queued { ticket, at };
                    return;
                }
                Admit::Refuse(r) => return self.refuse(io, ctx, id, r),
            }
        }
        ex.asks = [None, None];
        self.act(io, ctx, id);
    }

    /// A queued request's ticket may have been granted (woken), or its
    /// queue deadline passed (`expired`): on with admission, or refused.
    fn queue_turn(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, expired: bool) {
        let Some(d) = self.downs.get_mut(id).filter(|d| !d.closing) else {
            return;
        };
        let Some(ex) = d.ex.as_deref_mut() else {
            return;
        };
        let Phase::Queued { ticket, at } = &ex.phase else {
            return;
        };
        let at = *at;
        // A grant and the deadline can land in the same turn: a granted
        // slot is used rather than wasted.
        if !ticket.is_granted() {
            if !expired {
                return;
            }
            ex.phase = Phase::Head;
            ex.asks = [None, None];
            return self.refuse(
                io,
                ctx,
                id,
                Refusal {
                    retry_after: Some(1),
                    reason: Reason::QueueTimeout,
                },
            );
        }
        let Phase::Queued { ticket, .. } = std::mem::replace(&mut ex.phase, Phase::Head) else {
            unreachable!("matched above");
        };
        ex.timers.clear(Timer::Queue);
        let (state, _) = ex.asks[at].take().expect("a queued ask is kept");
        ex.slots[at] = Some(state.claim(ticket));
        self.admit(io, ctx, id, at + 1)
    }

    /// Admitted: do what the plan says.
    fn act(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("acted in an exchange");
        ex.keep.draining = io.draining;
        let keep = ex.keep.keeps();
        let with_body = ex.req.method != Method::Head;
        let version = ex.req.version;
        match ex.plan.take().expect("a decided request has a plan") {
            Plan::Close => {
                ctx.rejections.count(Reason::Dropped);
                self.close_down(io, ctx, id)
            }
            Plan::Refuse(reason) => self.refuse(io, ctx, id, Refusal::of(reason)),
            Plan::Probe { status, body } => {
                let out = writable_out(false, ex, 0).expect("nothing is sent before an answer");
                encode::write_fixed(
                    out,
                    status,
                    &HeaderPlan::default(),
                    &HeaderPlan::default(),
                    body.as_bytes(),
                    keep,
                    version,
                    with_body,
                );
                self.respond(io, ctx, id, status)
            }
            Plan::Fixed {
                status,
                fields,
                body,
            } => {
                let edits = std::mem::take(&mut ex.edits.response);
                let out = writable_out(false, ex, 0).expect("nothing is sent before an answer");
                encode::write_fixed(
                    out, status, &fields, &edits, &body, keep, version, with_body,
                );
                ex.edits.response = edits;
                self.respond(io, ctx, id, status)
            }
            Plan::Proxy {
                group,
                key,
                rewritten,
            } => {
                ex.group = group;
                ex.key = key;
                let listener = self.downs[id].listener as usize;
                let ex = self.downs[id].ex.as_deref_mut().expect("acted");
                if ex.tunnel.idle.is_some() && !tunnel::reserve(ctx, ex, listener) {
                    return self.refuse(io, ctx, id, Refusal::of(Reason::TunnelLimit));
                }
                self.pick(io, ctx, id, rewritten)
            }
        }
    }

    // ---- Phase 4: pick a backend. ----

    /// Choose the backend, write the request head for it, then read the
    /// body for the decode guard or go straight to the upstream.
    fn pick(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, rewritten: bool) {
        let d = &mut self.downs[id];
        let client = d.client;
        let proto: &[u8] = if d.tls.is_some() { b"https" } else { b"http" };
        let ex = d.ex.as_deref_mut().expect("picked in an exchange");
        let cur = ex.cur().clone();
        let group = &cur.snapshot.upstreams[ex.group];
        let view = &cur.groups[ex.group];
        view.request(&group.balance);
        let Some(backend) = view.pick(group, ex.key, io.now, None) else {
            return self.refuse(io, ctx, id, Refusal::of(Reason::NoBackend));
        };
        ex.backend = backend;
        let mut ip = [0u8; 48];
        let fwd = Forwarded {
            client_ip: write_ip(&mut ip, client),
            proto,
            default_host: group.backends[backend].authority.as_bytes(),
        };
        if ex.fwd.capacity() == 0 {
            ex.fwd = ctx.bufs.get();
        }
        ex.fwd.clear();
        encode::write_upstream_request(
            &mut ex.fwd,
            ex.buf.data(),
            &ex.req,
            &fwd,
            rewritten.then_some(&ex.edits.target[..]),
            &ex.edits.request,
            ex.tunnel.idle.is_some(),
        );
        consume_head(ex);
        ex.up_head = ex.fwd.len();
        ex.body_in = match ex.req.framing {
            BodyFraming::Length(n) => Some(Framer::new(
                BodyIn::Length(n),
                BodyOut::Verbatim,
                ex.max_len,
            )),
            BodyFraming::Chunked => {
                Some(Framer::new(BodyIn::Chunked, BodyOut::Verbatim, ex.max_len))
            }
            _ => None,
        };
        ex.retried = false;
        ex.refreshed = false;
        if ex.decode.is_some() {
            ex.phase = Phase::Guard;
            self.send_continue(io, ctx, id);
            self.arm_body_timer(io, id);
            return self.guard(io, ctx, id);
        }
        self.connect(io, ctx, id, false)
    }

    /// The decode guard: read the whole body (it is at most the body cap),
    /// decode it into a scratch buffer that is thrown away, and refuse it
    /// with 413 if it inflates past the route's ratio or absolute cap.
    /// When it passes, the original bytes wait in `buf` and are forwarded
    /// as they came.
    fn guard(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("guarded in an exchange");
        // Framing around tiny chunks can outweigh their data many times.
        let max_raw = ex.max_len.saturating_mul(2).saturating_add(BUF_SIZE as u64);
        let data = ex.buf.data();
        let done = match ex.req.framing {
            BodyFraming::Length(n) => data.len() as u64 >= n,
            _ => {
                let scan = ex.scan.get_or_insert_with(Box::default);
                let window = &data[scan.scanned..];
                let plain = &mut scan.plain;
                let decoded = scan
                    .decoder
                    .decode(window, |r| plain.extend_from_slice(&window[r]));
                match decoded {
                    Ok(n) => scan.scanned += n,
                    Err(e) => return self.body_failure(io, ctx, id, RelayError::Framing(e)),
                }
                if scan.decoder.data_len > ex.max_len {
                    let max = ex.max_len;
                    return self.body_failure(io, ctx, id, RelayError::TooLarge(max));
                }
                scan.decoder.is_done()
            }
        };
        if !done {
            if data.len() as u64 >= max_raw {
                let max = ex.max_len;
                return self.body_failure(io, ctx, id, RelayError::TooLarge(max));
            }
            self.arm_body_timer(io, id);
            if self.downs[id].eof {
                return self.close_down(io, ctx, id);
            }
            return self.resume_down(io, id);
        }
        let (guard, codings) = ex.decode.take().expect("guarding with a guard");
        let body = match ex.req.framing {
            BodyFraming::Length(n) => &data[..n as usize],
            _ => &ex.scan.as_ref().expect("scanned").plain[..],
        };
        let limits = DecodeLimits {
            ratio: guard.ratio,
            max: guard.max,
        };
        let checked = decode::check(body, &codings, limits);
        ex.scan = None;
        if let Err(e) = checked {
            crate::debug!("request body from {}: {e}", self.downs[id].client);
            let reason = match e {
                DecodeError::TooLarge { .. } => Reason::DecodedTooLarge,
                DecodeError::Corrupt(_) => Reason::BadEncoding,
            };
            return self.refuse(io, ctx, id, Refusal::of(reason));
        }
        ex.timers.clear(Timer::BodyIdle);
        self.connect(io, ctx, id, false)
    }

    // ---- Phase 5: the exchange with the backend. ----

    /// Get a connection to the chosen backend: a pooled one (`fresh`
    /// skips the pool), or a new one; the request head goes with it.
    fn connect(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, fresh: bool) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("connected for an exchange");
        ex.phase = Phase::Forward;
        let cur = ex.cur().clone();
        let (g, b) = (ex.group, ex.backend);
        if !ex.inflight {
            cur.groups[g].start(b);
            ex.inflight = true;
            ex.up_started = io.now;
        }
        ex.used = Some((g, b));
        let tally = cur.tallies.backend(g, b);
        let pooled = if fresh {
            None
        } else {
            self.pool.follow(ctx, &cur, &mut self.closing);
            self.pool.take(ctx, g, b)
        };
        self.close_pending(io, ctx);
        let uid = match pooled {
            Some(uid) => {
                tally.count(|t| &t.reuses);
                let u = &mut self.ups[uid as usize];
                u.down = Some(id);
                u.reused = true;
                uid as usize
            }
            None => {
                let backend = &cur.snapshot.upstreams[g].backends[b];
                let (fd, to) = match upstream_socket(&backend.addr) {
                    Ok(s) => s,
                    Err(e) => {
                        crate::warn!("upstream {}: cannot open a socket: {e}", backend.label);
                        return self.upstream_failed(
                            io,
                            ctx,
                            id,
                            UpFail::Unsent(UpstreamFailure::BadGateway),
                        );
                    }
                };
                let tls = match (&backend.tls_name, &cur.snapshot.upstreams[g].tls) {
                    (Some(name), Some(config)) => {
                        match crate::tls::Session::client(config, name.clone()) {
                            Ok(s) => Some(Box::new(s)),
                            Err(e) => {
                                crate::warn!("upstream {}: TLS session: {e}", backend.label);
                                io.close(fd);
                                return self.upstream_failed(
                                    io,
                                    ctx,
                                    id,
                                    UpFail::Unsent(UpstreamFailure::BadGateway),
                                );
                            }
                        }
                    }
                    _ => None,
                };
                let uid = self.ups.insert(Up {
                    fd,
                    down: Some(id),
                    connecting: true,
                    addr: Some(Box::new(to)),
                    tls,
                    ..Up::default()
                });
                let u = &mut self.ups[uid];
                let addr = u.addr.as_deref().expect("just set");
                // SAFETY: the address is boxed in the record, which is not
                // freed while `connecting` is set (`close_up`).
                let pushed = unsafe { io.driver.connect(fd, addr, token(UP_CONNECT, uid as u64)) };
                if let Err(e) = pushed {
                    crate::warn!("upstream {}: connect: {e}", backend.label);
                    u.connecting = false;
                    u.down = None;
                    self.close_up(io, ctx, uid);
                    return self.upstream_failed(
                        io,
                        ctx,
                        id,
                        UpFail::Unsent(UpstreamFailure::BadGateway),
                    );
                }
                let ex = self.downs[id].ex.as_deref_mut().expect("connecting");
                ex.timers.set(
                    Timer::Connect,
                    io.tick_after(cur.snapshot.upstreams[g].connect_timeout),
                );
                uid
            }
        };
        let ex = self.downs[id].ex.as_deref_mut().expect("connecting");
        ex.up = Some(uid);
        let u = &mut self.ups[uid];
        u.out = std::mem::take(&mut ex.fwd);
        u.sent = 0;
        if !u.buf.has_capacity() {
            u.buf = Buf::new(ctx.bufs.get());
        }
        if !u.connecting {
            self.start_forward(io, ctx, id);
        }
    }

    fn up_connected(&mut self, io: &mut Io, ctx: &WorkerCtx, uid: usize, c: &Completion) {
        let u = &mut self.ups[uid];
        u.connecting = false;
        u.addr = None;
        let Some(id) = u.down.filter(|_| !u.closing) else {
            return self.close_up(io, ctx, uid);
        };
        if let Err(e) = c.io_result() {
            let ex = self.downs[id]
                .ex
                .as_deref()
                .expect("an upstream serves an exchange");
            crate::debug!(
                "upstream {}: {e}",
                ex.cur().snapshot.upstreams[ex.group].backends[ex.backend].label
            );
            return self.upstream_failed(io, ctx, id, UpFail::Unsent(UpstreamFailure::BadGateway));
        }
        let ex = self.downs[id]
            .ex
            .as_deref()
            .expect("an upstream serves an exchange");
        ex.cur()
            .tallies
            .backend(ex.group, ex.backend)
            .count(|t| &t.connects);
        u.recv_armed = io
            .driver
            .recv_multi(u.fd, token(UP_RECV, uid as u64))
            .is_ok();
        if !u.recv_armed {
            return self.upstream_failed(io, ctx, id, UpFail::Unsent(UpstreamFailure::BadGateway));
        }
        self.start_forward(io, ctx, id);
    }

    /// Connected: tell a client waiting on `Expect: 100-continue` to send
    /// its body, and start sending.
    fn start_forward(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id].ex.as_deref_mut().expect("forwarding");
        // A TLS backend's connect ends with its handshake
        // (`up_tls_received`).
        let handshaking = ex
            .up
            .and_then(|u| self.ups[u].tls.as_deref())
            .is_some_and(|s| s.is_handshaking());
        if !handshaking {
            ex.timers.clear(Timer::Connect);
        }
        self.send_continue(io, ctx, id);
        self.pump_body(io, ctx, id);
    }

    /// RFC 9110 10.1.1: a client waiting on `Expect: 100-continue` is told
    /// to send, unless it already started; an HTTP/1.0 client's
    /// expectation is ignored.
    fn send_continue(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id].ex.as_deref_mut().expect("continuing");
        if !(ex.req.expect_continue
            && ex.req.version == Version::Http11
            && ex.buf.is_empty()
            && ex.body_in.is_some()
            && !ex.keep.body_read)
        {
            return;
        }
        // Once only.
        ex.req.expect_continue = false;
        self.queue_out(io, ctx, id, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    /// Hand the request on to the upstream: the head, then body bytes as
    /// they come, one send in flight at a time.
    fn pump_body(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let Proxy { downs, ups, .. } = self;
        let d = &mut downs[id];
        let ex = d.ex.as_deref_mut().expect("forwarding");
        if matches!(ex.phase, Phase::Tunnel) {
            return self.pump_tunnel(io, ctx, id);
        }
        let Some(uid) = ex.up else { return };
        let u = &mut ups[uid];
        if u.sending || u.connecting || u.closing || u.stopped {
            // Waiting on the upstream, not on the client: the client's
            // silence is not counted until its bytes can go on.
            ex.timers.clear(Timer::BodyIdle);
            return;
        }
        if let Some(framer) = ex.body_in.as_mut().filter(|_| !ex.keep.body_read) {
            match framer.forward(&mut ex.buf, &mut u.out, &mut u.sent) {
                Ok(step) => {
                    ex.received += step.consumed as u64;
                    if step.done {
                        ex.keep.body_read = true;
                        ex.timers.clear(Timer::BodyIdle);
                        ex.timers.clear(Timer::Request);
                    }
                }
                Err(e) => return self.body_failure(io, ctx, id, e),
            }
        }
        let sending = match u.flush(io, uid) {
            Ok(sending) => sending,
            Err(_) => {
                u.stopped = true;
                return self.upstream_stopped_reading(io, ctx, id);
            }
        };
        if sending {
            let timeout = ex.cur().snapshot.upstreams[ex.group].response_timeout;
            ex.timers.set(Timer::UpWrite, io.tick_after(timeout));
        } else {
            ex.timers.clear(Timer::UpWrite);
            if ex.keep.body_read && !ex.head_in && !ex.timers.is_set(Timer::Response) {
                // All of the request is with the backend: its answer is due.
                let timeout = ex.cur().snapshot.upstreams[ex.group].response_timeout;
                ex.timers.set(Timer::Response, io.tick_after(timeout));
            }
        }
        if !ex.keep.body_read {
            self.arm_body_timer(io, id);
        }
        self.resume_down(io, id);
        let d = &self.downs[id];
        if d.eof && d.ex.as_ref().is_some_and(|ex| !body_received(ex)) {
            self.close_down(io, ctx, id);
        }
    }

    /// The client owes body bytes: `body_timeout` of silence at most, and
    /// the request's own deadline.
    fn arm_body_timer(&mut self, io: &mut Io, id: usize) {
        let d = &mut self.downs[id];
        let listener = d.listener as usize;
        let ex = d.ex.as_deref_mut().expect("reading a body");
        let timeout = ex.cur().snapshot.listeners[listener].body_timeout;
        ex.timers.set(Timer::BodyIdle, io.tick_after(timeout));
    }

    fn up_sent(&mut self, io: &mut Io, ctx: &WorkerCtx, uid: usize, c: &Completion) {
        let u = &mut self.ups[uid];
        u.sending = false;
        let id = match (u.down, c.io_result()) {
            (Some(id), Ok(n)) if n > 0 && !u.closing => {
                match u.tls.as_deref_mut() {
                    Some(session) => session.sent += n,
                    None => u.sent += n,
                }
                id
            }
            (Some(id), _) if !u.closing => {
                u.stopped = true;
                crate::debug!("request to upstream: {:?}", c.io_result());
                return self.upstream_stopped_reading(io, ctx, id);
            }
            _ => return self.close_up(io, ctx, uid),
        };
        self.pump_body(io, ctx, id);
    }

    /// A send to the upstream failed. Before the response head it is a
    /// failed exchange; after, the upstream answered early and stopped
    /// reading: its answer goes on, the rest of the body does not.
    fn upstream_stopped_reading(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id].ex.as_deref_mut().expect("forwarding");
        if matches!(ex.phase, Phase::Tunnel) {
            return self.close_down(io, ctx, id);
        }
        if ex.head_in {
            ex.timers.clear(Timer::UpWrite);
            return;
        }
        // It may still have answered (413, 401...): give the answer a
        // chance to arrive, within the response timeout.
        let got_any = ex.up.is_some_and(|u| !self.ups[u].buf.is_empty());
        if got_any {
            return self.pump_response(io, ctx, id);
        }
        let failure = if ex.body_in.is_none() {
            UpFail::ClosedEarly
        } else {
            ex.timers.clear(Timer::UpWrite);
            let timeout = ex.cur().snapshot.upstreams[ex.group].response_timeout;
            ex.timers.set(Timer::Response, io.tick_after(timeout));
            return;
        };
        self.upstream_failed(io, ctx, id, failure)
    }

    fn up_received(&mut self, io: &mut Io, ctx: &WorkerCtx, uid: usize, c: &Completion) {
        let u = &mut self.ups[uid];
        if !c.more() {
            u.recv_armed = false;
        }
        match (c.buffer(), c.io_result()) {
            (Some(bid), Ok(n)) if u.tls.is_some() => {
                if !self.up_tls_received(io, ctx, uid, bid, n) {
                    return;
                }
            }
            (Some(bid), Ok(n)) => {
                if u.down.is_none() || u.closing {
                    // Bytes nobody asked for on an idle connection: it
                    // never serves another request.
                    io.driver.recycle(bid);
                    return self.close_up(io, ctx, uid);
                }
                let bytes = io.driver.buf(bid, n);
                let taken = match direct_response(&mut self.downs, uid, u, bytes, &ctx.bufs) {
                    Ok(taken) => taken,
                    Err(e) => {
                        io.driver.recycle(bid);
                        let id = u.down.expect("checked above");
                        crate::debug!("response body: {e}");
                        return self.close_down(io, ctx, id);
                    }
                };
                if taken < n {
                    take_in(ctx, &mut u.buf, &bytes[taken..]);
                }
                io.driver.recycle(bid);
            }
            (None, Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) && !u.closing => {
                if u.paused {
                    return self.resume_up(io, uid);
                }
                u.recv_armed = io
                    .driver
                    .recv_multi(u.fd, token(UP_RECV, uid as u64))
                    .is_ok();
                return;
            }
            (None, Err(e))
                if e.raw_os_error() == Some(libc::ECANCELED) && u.paused && !u.closing =>
            {
                return self.resume_up(io, uid);
            }
            (None, Ok(0)) if u.down.is_some() && !u.closing => u.eof = true,
            // Closed while idle, an error, or our own cancellation.
            _ => {
                if let Some(id) = u.down.filter(|_| !u.closing) {
                    u.eof = true;
                    u.reset = true;
                    return self.pump_response(io, ctx, id);
                }
                return self.close_up(io, ctx, uid);
            }
        }
        let u = &mut self.ups[uid];
        if !u.recv_armed && !u.paused && !u.eof && !u.closing {
            // The kernel ended the multishot receive with data: again.
            u.recv_armed = io
                .driver
                .recv_multi(u.fd, token(UP_RECV, uid as u64))
                .is_ok();
        }
        if u.buf.data().len() > MAX_BUFFERED && u.recv_armed && !u.paused {
            u.paused = true;
            let _ = io.driver.cancel(u.fd, token(UP_RECV, uid as u64));
        }
        let id = u.down.expect("checked above");
        self.pump_response(io, ctx, id);
    }

    fn resume_up(&mut self, io: &mut Io, uid: usize) {
        let u = &mut self.ups[uid];
        if !u.paused {
            return;
        }
        if u.recv_armed || u.closing || u.eof || u.buf.data().len() > MAX_BUFFERED / 2 {
            return;
        }
        u.paused = false;
        u.recv_armed = io
            .driver
            .recv_multi(u.fd, token(UP_RECV, uid as u64))
            .is_ok();
    }

    // ---- Phase 6: the response. ----

    /// Hand the response on to the client: its head once whole, then body
    /// bytes as they come, one send in flight at a time.
    fn pump_response(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let Proxy { downs, ups, .. } = self;
        let d = &mut downs[id];
        if d.closing {
            return;
        }
        let ex = d.ex.as_deref_mut().expect("forwarding");
        if matches!(ex.phase, Phase::Tunnel) {
            return self.pump_tunnel(io, ctx, id);
        }
        if d.sending {
            // Waiting on the client (`DownSend` bounds that), not on the
            // upstream: its silence is not counted meanwhile.
            ex.timers.clear(Timer::UpRead);
            return;
        }
        let Some(uid) = ex.up else { return };
        let u = &mut ups[uid];
        if !ex.head_in {
            loop {
                let parsed = head::parse_response(
                    u.buf.data(),
                    MAX_UPSTREAM_HEAD_BYTES,
                    ex.req.method,
                    &mut ex.res,
                );
                match parsed {
                    // Switching protocols: only to what the request offered.
                    Ok(Status::Complete(_)) if ex.res.status == 101 => {
                        if !tunnel::answers(ex, u.buf.data()) {
                            return self.refuse_switch(io, ctx, id);
                        }
                        break;
                    }
                    // Informational: 100 Continue was answered by us, 103
                    // and others are optional; skip them.
                    Ok(Status::Complete(n)) if ex.res.status < 200 => u.buf.consume(n),
                    Ok(Status::Complete(_)) => break,
                    Ok(Status::Partial) if u.eof => {
                        let failure = if u.buf.is_empty() {
                            UpFail::ClosedEarly
                        } else {
                            UpFail::Failed(UpstreamFailure::BadGateway)
                        };
                        return self.upstream_failed(io, ctx, id, failure);
                    }
                    Ok(Status::Partial) => {
                        self.resume_up(io, uid);
                        return;
                    }
                    Err(e) => {
                        crate::debug!("upstream response: {e}");
                        return self.upstream_failed(
                            io,
                            ctx,
                            id,
                            UpFail::Failed(UpstreamFailure::BadGateway),
                        );
                    }
                }
            }
            if !self.response_head(io, ctx, id) {
                return;
            }
            if self.downs[id]
                .ex
                .as_ref()
                .is_some_and(|ex| ex.res.status == 101)
            {
                return self.open_tunnel(io, ctx, id);
            }
        }
        let Proxy { downs, ups, .. } = self;
        let d = &mut downs[id];
        let ex = d.ex.as_deref_mut().expect("forwarding");
        let uid = ex.up.expect("relaying from an upstream");
        let u = &mut ups[uid];
        let framer = ex
            .body_out
            .as_mut()
            .expect("a response head sets the body's framing");
        let mut done = match framer.forward(&mut u.buf, &mut ex.out, &mut ex.out_sent) {
            Ok(step) => step.done,
            Err(e) => {
                crate::debug!("response body to {}: {e}", d.client);
                return self.close_down(io, ctx, id);
            }
        };
        if !done && u.eof && u.buf.is_empty() {
            // A reset is never the end of a close-delimited body.
            let ended = if u.reset {
                Err(RelayError::SrcClosed)
            } else {
                framer.at_eof(&mut ex.out)
            };
            match ended {
                Ok(()) => done = true,
                Err(e) => {
                    // The head is out: all we can do is close, so the
                    // client sees a truncated message rather than a
                    // complete-looking one, after what already came.
                    crate::debug!("response body to {}: {e}", d.client);
                    ex.sent += framer.total();
                    ex.next = Some(Next::Close);
                    self.release_upstream(io, ctx, id, false);
                    return self.flush_down(io, ctx, id);
                }
            }
        }
        if done {
            ex.sent += framer.total();
            self.response_done(io, ctx, id);
        } else {
            let timeout = ex.cur().snapshot.upstreams[ex.group].read_timeout;
            ex.timers.set(Timer::UpRead, io.tick_after(timeout));
            self.resume_up(io, uid);
        }
        self.flush_down(io, ctx, id);
    }

    /// A response head is whole in the upstream's buffer: note what the
    /// backend did, and write the head for the client. False when the
    /// exchange ended instead.
    fn response_head(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) -> bool {
        let Proxy { downs, ups, .. } = self;
        let ex = downs[id].ex.as_deref_mut().expect("forwarding");
        let u = &mut ups[ex.up.expect("a response comes from an upstream")];
        let cur = ex.cur().clone();
        let group = &cur.snapshot.upstreams[ex.group];
        let balance = &group.balance;
        let elapsed = io.now.saturating_duration_since(ex.up_started);
        ctx.stats.upstream_latency(elapsed);
        let outcome = if balance.eject_on_5xx && ex.res.status >= 500 {
            Outcome::Failed
        } else {
            Outcome::Answered(elapsed)
        };
        cur.groups[ex.group].record(balance, ex.backend, outcome, io.now);
        ex.timers.clear(Timer::Response);
        let version = ex.req.version;
        let mut framed = true;
        let (body_in, out_framing, body_out) = match ex.res.framing {
            // What follows a 101 is the new protocol's, as it comes.
            _ if ex.res.status == 101 => {
                (BodyIn::UntilClose, OutFraming::Switch, BodyOut::Verbatim)
            }
            BodyFraming::None => (BodyIn::Length(0), OutFraming::AsIs, BodyOut::Verbatim),
            BodyFraming::Length(n) => (BodyIn::Length(n), OutFraming::AsIs, BodyOut::Verbatim),
            BodyFraming::Chunked if version == Version::Http11 => (
                BodyIn::Chunked,
                OutFraming::ChunkedVerbatim,
                BodyOut::Verbatim,
            ),
            BodyFraming::Chunked => {
                if !ex.res.te_is_plain_chunked {
                    // An HTTP/1.0 client cannot undo a coding we cannot
                    // strip.
                    ex.keep.framed = false;
                    self.release_upstream(io, ctx, id, false);
                    self.reject(io, ctx, id, 502);
                    return false;
                }
                framed = false;
                (BodyIn::Chunked, OutFraming::UntilClose, BodyOut::Dechunk)
            }
            BodyFraming::CloseDelimited if version == Version::Http11 => {
                (BodyIn::UntilClose, OutFraming::Rechunk, BodyOut::Rechunk)
            }
            BodyFraming::CloseDelimited => {
                framed = false;
                (
                    BodyIn::UntilClose,
                    OutFraming::UntilClose,
                    BodyOut::Verbatim,
                )
            }
        };
        // Decided now, with what the head says; a request body the
        // backend did not wait for ends it later (`response_done`).
        ex.keep.framed = framed;
        ex.keep.draining = io.draining;
        if ex.out_sent == ex.out.len() {
            ex.out.clear();
            ex.out_sent = 0;
        }
        let before = ex.out.len();
        encode::write_downstream_response(
            &mut ex.out,
            u.buf.data(),
            &ex.res,
            out_framing,
            version,
            ex.keep.keeps(),
            &ex.edits.response,
        );
        u.buf.consume(ex.res.len);
        ex.status = ex.res.status;
        ex.sent = (ex.out.len() - before) as u64;
        ex.head_in = true;
        ex.body_out = Some(Framer::new(body_in, body_out, u64::MAX));
        // The head is no longer needed for a retry.
        if u.sent == u.out.len() {
            u.out.clear();
            u.sent = 0;
        }
        true
    }

    /// The response is whole in `out`: the upstream goes back to the pool
    /// or closes, and the request ends once `out` is sent.
    fn response_done(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id].ex.as_deref_mut().expect("forwarding");
        ex.timers.clear(Timer::UpRead);
        ex.timers.clear(Timer::UpWrite);
        ex.timers.clear(Timer::Response);
        let uid = ex.up.expect("a response comes from an upstream");
        let u = &self.ups[uid];
        let reusable = upstream_reusable(
            &ex.req,
            &ex.res,
            ex.keep.body_read,
            io.draining,
            UpstreamState {
                sending: u.sending,
                eof: u.eof,
                leftover: !u.buf.is_empty(),
            },
        );
        ex.keep.draining = io.draining;
        ex.next = Some(ex.keep.after_response());
        self.release_upstream(io, ctx, id, reusable);
    }

    /// The exchange is over for the upstream: pooled when `reusable` (and
    /// nothing is left over on it), closed otherwise.
    fn release_upstream(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, reusable: bool) {
        let ex = self.downs[id].ex.as_deref_mut().expect("an exchange");
        // The upstream's deadlines go with it: one left running would act
        // on an exchange that has moved on (answered, or retried).
        for t in [
            Timer::Connect,
            Timer::UpWrite,
            Timer::Response,
            Timer::UpRead,
        ] {
            ex.timers.clear(t);
        }
        if ex.inflight {
            ex.cur().groups[ex.group].finish(ex.backend);
            ex.inflight = false;
        }
        let Some(uid) = ex.up.take() else { return };
        let cur = ex.cur().clone();
        let (g, b) = (ex.group, ex.backend);
        let u = &mut self.ups[uid];
        u.down = None;
        let clean = reusable && !u.closing;
        if clean && self.pool.put(ctx, &cur, g, b, uid as u32, io.now) {
            let u = &mut self.ups[uid];
            u.reused = false;
            u.stopped = false;
            for v in [
                std::mem::take(&mut u.out),
                std::mem::take(&mut u.buf).into_inner(),
            ] {
                if v.capacity() > 0 {
                    ctx.bufs.put(v);
                }
            }
            u.sent = 0;
            // An idle pooled connection must have its receive armed. One
            // paused by a large response is armed again here, or, while
            // its cancellation is still on the way, when that completes
            // (`resume_up`). Closing it instead cost a new connection per
            // 256 KiB response (1.8x nginx's CPU per request).
            if !u.recv_armed {
                u.paused = false;
                u.recv_armed = io
                    .driver
                    .recv_multi(u.fd, token(UP_RECV, uid as u64))
                    .is_ok();
                if !u.recv_armed {
                    self.pool.remove(ctx, uid as u32);
                    self.close_up(io, ctx, uid);
                }
            }
        } else {
            self.close_up(io, ctx, uid);
        }
    }

    /// The exchange failed before a response head: retry where that is
    /// safe, answer 502 or 504 where not.
    fn upstream_failed(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, f: UpFail) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("an exchange failed");
        let cur = ex.cur().clone();
        let group = &cur.snapshot.upstreams[ex.group];
        let view = &cur.groups[ex.group];
        let bodyless = ex.req.framing == BodyFraming::None;
        let retryable = bodyless && ex.req.method.is_idempotent();
        let reused = ex.up.is_some_and(|u| self.ups[u].reused);
        // The request head, should it be sent again.
        let head: Option<Vec<u8>> = ex.up.map(|u| {
            let mut v = ctx.bufs.get();
            v.extend_from_slice(&self.ups[u].out[..ex.up_head.min(self.ups[u].out.len())]);
            v
        });
        ex.timers.clear(Timer::Connect);
        ex.timers.clear(Timer::UpWrite);
        ex.timers.clear(Timer::Response);
        // A pooled connection may be closed by the backend between our
        // taking it and our write. An idempotent body-less request is
        // then sent once more on a new connection (RFC 9110 9.2.2);
        // anything else cannot be replayed.
        if matches!(f, UpFail::ClosedEarly) && reused && retryable && !ex.refreshed {
            ex.refreshed = true;
            let head = head.expect("a reused connection carried the head");
            self.drop_upstream(io, ctx, id);
            let ex = self.downs[id].ex.as_deref_mut().expect("retrying");
            ctx.bufs.put(std::mem::replace(&mut ex.fwd, head));
            return self.connect(io, ctx, id, true);
        }
        let (failure, unsent) = match f {
            UpFail::Unsent(x) => (x, true),
            UpFail::ClosedEarly => (UpstreamFailure::BadGateway, false),
            UpFail::Failed(x) => (x, false),
        };
        let status = failure.status();
        backend_failed(ex, io.now);
        crate::debug!(
            "upstream {}: answered {status} to {}",
            group.backends[ex.backend].label,
            self.downs[id].client
        );
        // The head: from the connection that carried it, or still here
        // when no connection took it.
        let head = head.unwrap_or_else(|| {
            let ex = self.downs[id].ex.as_deref_mut().expect("retrying");
            std::mem::take(&mut ex.fwd)
        });
        self.drop_upstream(io, ctx, id);
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("an exchange failed");
        // Retry elsewhere only when the request can be sent again as it
        // was: nothing of it reached the backend, or it is an idempotent
        // request without a body that met a broken connection (not a
        // timeout: a slow backend retried is twice the load on a
        // struggling group).
        let replayable = unsent || (status == 502 && retryable);
        if replayable
            && !ex.retried
            && view.has_retry()
            && let Some(next) = view.pick(group, ex.key, io.now, Some(ex.backend))
            && next != ex.backend
            && view.take_retry()
        {
            ex.retried = true;
            ex.backend = next;
            ctx.bufs.put(std::mem::replace(&mut ex.fwd, head));
            return self.connect(io, ctx, id, false);
        }
        ctx.bufs.put(head);
        self.reject(io, ctx, id, status)
    }

    /// Detach and close the exchange's upstream connection, and count the
    /// request out of its backend.
    fn drop_upstream(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        self.release_upstream(io, ctx, id, false);
    }

    /// How a request body that failed on the client's side ends: counted,
    /// and answered when there is someone to answer.
    fn body_failure(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, e: RelayError) {
        crate::debug!("request body from {}: {e}", self.downs[id].client);
        let reason = match e {
            RelayError::SrcTimeout => Reason::BodyTimeout,
            RelayError::SrcDeadline => Reason::RequestTimeout,
            RelayError::TooLarge(_) => Reason::BodyTooLarge,
            RelayError::Framing(_) => Reason::BadRequest,
            // The client went away mid-body: nobody to answer.
            _ => return self.close_down(io, ctx, id),
        };
        let ex = self.downs[id].ex.as_deref_mut().expect("reading a body");
        if ex.head_in {
            // Its answer is on the way: the client cannot be told more.
            ctx.rejections.count(reason);
            return self.close_down(io, ctx, id);
        }
        self.drop_upstream(io, ctx, id);
        self.refuse(io, ctx, id, Refusal::of(reason))
    }

    // ---- Our own answers. ----

    /// Refuse a request, count why, and keep the connection or close it
    /// as the reason's row in the refusal table says.
    fn refuse(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, r: Refusal) {
        ctx.rejections.count(r.reason);
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("refused in an exchange");
        ex.keep = ex.keep.refused(r.reason.after());
        self.canned(io, ctx, id, r.status(), r.retry_after)
    }

    /// Answer with a canned response (a failure of ours or the upstream's).
    fn reject(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, status: u16) {
        self.canned(io, ctx, id, status, None)
    }

    fn canned(
        &mut self,
        io: &mut Io,
        ctx: &WorkerCtx,
        id: usize,
        status: u16,
        retry_after: Option<u32>,
    ) {
        let d = &mut self.downs[id];
        let ex = d.ex.as_deref_mut().expect("answered in an exchange");
        ex.keep.draining = io.draining;
        let keep = ex.keep.keeps();
        // A HEAD answer carries no content (RFC 9110 9.3.2), or a
        // kept-alive client would read it as the start of its next
        // response. A head that never parsed is answered as HTTP/1.1.
        let (version, with_body) = if ex.parsed {
            (ex.req.version, ex.req.method != Method::Head)
        } else {
            (Version::Http11, true)
        };
        let Some(out) = writable_out(d.sending, ex, CANNED_MAX) else {
            return self.close_down(io, ctx, id);
        };
        encode::write_canned(out, status, keep, version, with_body, retry_after);
        self.respond(io, ctx, id, status)
    }

    /// Our answer is (or goes) in `out`: send it, then end the request.
    fn respond(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, status: u16) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("answered in an exchange");
        consume_head(ex);
        ex.phase = Phase::Respond;
        ex.status = status;
        ex.sent = (ex.out.len() - ex.out_sent) as u64;
        ex.next = Some(ex.keep.after_own_answer());
        ex.timers.clear(Timer::Queue);
        ex.timers.clear(Timer::BodyIdle);
        ex.timers.clear(Timer::Request);
        ex.timers.clear(Timer::Head);
        self.flush_down(io, ctx, id);
    }

    /// Append `bytes` to what goes to the client and send.
    fn queue_out(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, bytes: &[u8]) {
        let d = &mut self.downs[id];
        let ex = d.ex.as_deref_mut().expect("sending from an exchange");
        let Some(out) = writable_out(d.sending, ex, bytes.len()) else {
            return self.close_down(io, ctx, id);
        };
        out.extend_from_slice(bytes);
        self.flush_down(io, ctx, id);
    }

    /// Send what waits in `out`, unless a send is in flight.
    fn flush_down(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        if d.sending || d.closing {
            return;
        }
        if d.tls.is_some() {
            return self.flush_tls(io, ctx, id);
        }
        let listener = d.listener as usize;
        let ex = d.ex.as_deref_mut().expect("sending from an exchange");
        if ex.out_sent == ex.out.len() {
            return self.out_drained(io, ctx, id);
        }
        d.sending = true;
        let bytes = &ex.out[ex.out_sent..];
        // SAFETY: the bytes live in `out`'s heap storage, which stays put
        // when the slab or the box moves; while `sending` is set `out` is
        // only appended to within its capacity (`queue_out`), never
        // cleared, and the exchange is not given back (`close_down`).
        let r = unsafe { io.driver.send(d.fd, bytes, token(DOWN_SEND, id as u64)) };
        if r.is_err() {
            d.sending = false;
            return self.close_down(io, ctx, id);
        }
        arm_down_send(ex, listener, io);
    }

    /// All of `out` is sent: its send deadline ends, and a whole answer
    /// ends its request.
    fn out_drained(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let Some(ex) = self.downs[id].ex.as_deref_mut() else {
            return;
        };
        ex.timers.clear(Timer::DownSend);
        if ex.next.is_some() {
            self.end_request(io, ctx, id);
        }
    }

    fn down_sent(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, c: &Completion) {
        let d = &mut self.downs[id];
        d.sending = false;
        let n = match c.io_result() {
            Ok(n) if n > 0 && !d.closing => n,
            _ => return self.close_down(io, ctx, id),
        };
        let n = if d.tls.is_some() {
            match self.tls_sent(io, ctx, id, n) {
                Some(plain) => plain,
                None => return,
            }
        } else {
            n
        };
        let d = &mut self.downs[id];
        let ex = d.ex.as_deref_mut().expect("a send comes from an exchange");
        ex.out_sent += n;
        if ex.out_sent < ex.out.len() {
            return self.flush_down(io, ctx, id);
        }
        ex.out.clear();
        ex.out_sent = 0;
        ex.timers.clear(Timer::DownSend);
        if ex.next.is_some() {
            return self.end_request(io, ctx, id);
        }
        match ex.phase {
            Phase::Forward => self.pump_response(io, ctx, id),
            Phase::Tunnel => self.pump_tunnel(io, ctx, id),
            // A `100 Continue` went out ahead of the guard's reading.
            _ => self.advance(io, ctx, id),
        }
    }

    // ---- Phase 7: the request's end. ----

    /// The answer is out: count the request, log it, and go on as its
    /// `Next` says.
    fn end_request(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        let ex = d.ex.as_deref_mut().expect("a request ends in its exchange");
        let next = ex.next.take().expect("an ended request knows what follows");
        finish(ctx, ex, io.now);
        // Answers of our own use up pipelined bytes too: a receive paused
        // on them is armed again here, before the connection may go idle.
        self.resume_down(io, id);
        let d = &mut self.downs[id];
        let ex = d.ex.as_deref_mut().expect("a request ends in its exchange");
        // An upgrade's drain closes only after answers that said so.
        match next.unless_draining(io.draining && !io.handover) {
            Next::KeepAlive => {
                ex.phase = Phase::Head;
                let listener = d.listener as usize;
                if ex.buf.is_empty() {
                    let timeout = ex.cur().snapshot.listeners[listener].keepalive_timeout;
                    d.idle_until = io.tick_after(timeout);
                    if d.eof {
                        return self.close_down(io, ctx, id);
                    }
                    self.go_idle(ctx, id);
                } else {
                    // A pipelined request is already here.
                    self.read_head(io, ctx, id);
                }
            }
            Next::Close => self.close_after_answer(io, ctx, id),
            Next::LingerClose => self.linger(io, ctx, id),
        }
    }

    /// The connection waits for its next request: its exchange goes back
    /// to the free list, its buffers to the worker's pool.
    fn go_idle(&mut self, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        debug_assert!(!d.sending, "a send still uses the exchange");
        if let Some(ex) = d.ex.take() {
            self.spare.push(recycle(ex, ctx));
        }
    }

    /// After a closing answer: stop sending, and read and discard what the
    /// client still sends for a while, so it reads the answer instead of a
    /// reset.
    fn linger(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        if d.eof {
            return self.close_down(io, ctx, id);
        }
        shut_write(d.fd);
        let ex = d.ex.as_deref_mut().expect("lingering in an exchange");
        ex.phase = Phase::Linger;
        ex.lingered = ex.buf.data().len();
        ex.buf.clear();
        ex.timers.clear_all();
        ex.timers.set(Timer::Linger, io.tick_after(LINGER_TIME));
        if d.paused && !d.recv_armed {
            d.paused = false;
            d.recv_armed = io
                .driver
                .recv_multi(d.fd, token(DOWN_RECV, id as u64))
                .is_ok();
        }
        if !d.recv_armed && !d.paused {
            self.close_down(io, ctx, id);
        }
    }

    // ---- Timers. ----

    /// `timer` of connection `id` passed.
    fn expire(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, timer: Timer) {
        let d = &mut self.downs[id];
        let Some(ex) = d.ex.as_deref_mut() else {
            // Idle past its keep-alive (or first-byte) timeout.
            return self.close_down(io, ctx, id);
        };
        let request_first = ex.timers.get(Timer::Request) <= ex.timers.get(Timer::Head);
        ex.timers.clear(timer);
        let upstream_timer = matches!(
            timer,
            Timer::Connect | Timer::UpWrite | Timer::Response | Timer::UpRead
        );
        if upstream_timer && !(matches!(ex.phase, Phase::Forward) && ex.up.is_some()) {
            return;
        }
        match timer {
            Timer::Head | Timer::Request if matches!(ex.phase, Phase::Head) => {
                // A client that started a head and stalled gets 408.
                let reason = if timer == Timer::Request || request_first {
                    Reason::RequestTimeout
                } else {
                    Reason::HeaderTimeout
                };
                self.refuse(io, ctx, id, Refusal::of(reason))
            }
            Timer::Head => {}
            Timer::Request if !ex.keep.body_read => {
                self.body_failure(io, ctx, id, RelayError::SrcDeadline)
            }
            Timer::BodyIdle if !ex.keep.body_read => {
                self.body_failure(io, ctx, id, RelayError::SrcTimeout)
            }
            Timer::Request | Timer::BodyIdle => {}
            Timer::Queue => self.queue_turn(io, ctx, id, true),
            Timer::Connect => {
                crate::debug!("upstream connect timed out");
                self.upstream_failed(io, ctx, id, UpFail::Unsent(UpstreamFailure::Timeout))
            }
            Timer::UpWrite | Timer::Response if !ex.head_in => {
                self.upstream_failed(io, ctx, id, UpFail::Failed(UpstreamFailure::Timeout))
            }
            Timer::UpWrite | Timer::Response => {
                // The answer came; the rest of the body did not go.
                if ex.keep.body_read {
                    return;
                }
                self.close_down(io, ctx, id)
            }
            Timer::UpRead => {
                crate::debug!("upstream silent mid-response to {}", d.client);
                self.close_down(io, ctx, id)
            }
            Timer::DownSend | Timer::Linger => self.close_down(io, ctx, id),
            Timer::TunnelIdle => {
                // Bytes moved since it was set: it is set again from the
                // last of them (one store per event instead of a timer).
                if let Some(due) = ex.tunnel.idle_due().filter(|&due| due > io.tick) {
                    ex.timers.set(Timer::TunnelIdle, due);
                    return;
                }
                crate::debug!("tunnel of {} idle past its timeout", d.client);
                ctx.stats.tunnels.idle_closed();
                self.close_down(io, ctx, id)
            }
        }
    }

    /// File connection `id`'s earliest deadline with the wheel, if it is
    /// earlier than the one filed (a later one costs nothing: the entry
    /// is re-filed when it comes due).
    fn schedule(&mut self, io: &mut Io, id: usize) {
        let Some(d) = self.downs.get_mut(id) else {
            return;
        };
        let due = due(d);
        if due < d.filed {
            io.wheel.insert(id as u32, due);
            d.filed = due;
        }
    }

    /// Connections whose admission ticket was granted.
    fn run_woken(&mut self, io: &mut Io, ctx: &WorkerCtx) {
        loop {
            let Some(id) = WOKEN.with(|w| w.borrow_mut().pop()) else {
                return;
            };
            self.queue_turn(io, ctx, id, false);
            self.schedule(io, id);
        }
    }

    // ---- Closing. ----

    /// Close `id`: its upstream too, its receive and a send to a client
    /// that stopped reading cancelled; freed once the kernel holds
    /// nothing of it.
    fn close_down(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        let first = !d.closing;
        d.closing = true;
        if first
            && let Some(s) = d.tls.as_deref_mut()
            && s.is_handshaking()
            && !s.closing
        {
            // The client went away (or the worker drains) mid-handshake.
            s.closing = true;
            ctx.stats.tls.failed(crate::tls::Failure::Closed);
        }
        if first
            && d.ex
                .as_ref()
                .is_some_and(|ex| ex.up.is_some() || ex.inflight)
        {
            self.release_upstream(io, ctx, id, false);
        }
        let d = &self.downs[id];
        let ops = [
            (d.recv_armed, token(DOWN_RECV, id as u64)),
            (d.sending, token(DOWN_SEND, id as u64)),
        ];
        if io.cancel_in_flight(d.fd, first, &ops) {
            return;
        }
        let mut d = self.downs.remove(id);
        io.close(d.fd);
        if let Some(s) = d.tls.as_deref_mut() {
            ctx.bufs.put(std::mem::take(&mut s.out));
        }
        if let Some(mut ex) = d.ex {
            if ex.active {
                // Counted and logged as any other request.
                finish(ctx, &mut ex, io.now);
            }
            self.spare.push(recycle(ex, ctx));
        }
        for open in [
            &ctx.open_connections,
            &ctx.listener_connections[d.listener as usize],
        ] {
            open.set(open.get() - 1);
        }
    }

    /// Close upstream `uid` once no operation of it is in flight.
    fn close_up(&mut self, io: &mut Io, ctx: &WorkerCtx, uid: usize) {
        let u = &mut self.ups[uid];
        let first = !u.closing;
        u.closing = true;
        if first && u.down.is_none() {
            self.pool.remove(ctx, uid as u32);
        }
        let u = &self.ups[uid];
        let ops = [
            (u.recv_armed, token(UP_RECV, uid as u64)),
            (u.sending, token(UP_SEND, uid as u64)),
            (u.connecting, token(UP_CONNECT, uid as u64)),
        ];
        if io.cancel_in_flight(u.fd, first, &ops) {
            return;
        }
        let u = self.ups.remove(uid);
        io.close(u.fd);
        for v in [u.out, u.buf.into_inner()] {
            if v.capacity() > 0 {
                ctx.bufs.put(v);
            }
        }
    }

    /// Close the upstream connections the pool let go of.
    fn close_pending(&mut self, io: &mut Io, ctx: &WorkerCtx) {
        while let Some(uid) = self.closing.pop() {
            let uid = uid as usize;
            if self.ups.contains(uid) {
                self.close_up(io, ctx, uid);
            }
        }
    }
}

/// Drop the request head's bytes from the front of `buf`, once.
fn consume_head(ex: &mut Exchange) {
    let n = std::mem::take(&mut ex.head_pending);
    ex.buf.consume(n);
}

/// Room a canned answer needs at most.
const CANNED_MAX: usize = 512;

/// `out`, ready for `more` bytes behind what it holds: emptied when all of
/// it was sent. While a send is in flight (`sending`) bytes go behind it
/// only within `out`'s capacity, so the storage the kernel reads never
/// moves; `None` when they would not fit.
fn writable_out(sending: bool, ex: &mut Exchange, more: usize) -> Option<&mut Vec<u8>> {
    if !sending && ex.out_sent == ex.out.len() {
        ex.out.clear();
        ex.out_sent = 0;
    }
    if sending && ex.out.len() + more > ex.out.capacity() {
        return None;
    }
    Some(&mut ex.out)
}

/// Bound a send to the client by its listener's `send_timeout` (60 s
/// before a request took its configuration).
fn arm_down_send(ex: &mut Exchange, listener: usize, io: &Io) {
    let timeout = ex.cur.as_ref().map_or(Duration::from_secs(60), |c| {
        c.snapshot.listeners[listener].send_timeout
    });
    ex.timers.set(Timer::DownSend, io.tick_after(timeout));
}

/// The exchange's backend failed it: counted, and told to balancing
/// (passive health).
fn backend_failed(ex: &Exchange, now: Instant) {
    let cur = ex.cur();
    let group = &cur.snapshot.upstreams[ex.group];
    cur.tallies
        .backend(ex.group, ex.backend)
        .count(|t| &t.failures);
    cur.groups[ex.group].record(&group.balance, ex.backend, Outcome::Failed, now);
}

/// Pass a half-close on: no more bytes go to `fd`'s peer.
fn shut_write(fd: RawFd) {
    // SAFETY: shutdown on a socket this worker owns; no memory passes.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// The earliest tick connection `d` must be looked at, or `NEVER`.
fn due(d: &Down) -> u64 {
    match &d.ex {
        Some(ex) => ex.timers.next().unwrap_or(NEVER),
        None => d.idle_until,
    }
}

/// Count the request's response in the worker's statistics, once.
fn count_response(ctx: &WorkerCtx, ex: &mut Exchange, now: Instant) {
    if !std::mem::replace(&mut ex.counted, true) {
        ctx.stats
            .response(ex.status, ex.started, Stamp::at(now), ex.received, ex.sent);
    }
}

/// Count a request that ended, and write its access log line.
fn finish(ctx: &WorkerCtx, ex: &mut Exchange, now: Instant) {
    tunnel::ended(ctx, ex);
    count_response(ctx, ex, now);
    if let Some(logged) = ex.logged.take() {
        let cur = ex.cur();
        let label = ex
            .used
            .map(|(g, b)| cur.snapshot.upstreams[g].backends[b].label.as_str());
        let fields: Vec<_> = logged.fields.iter().collect();
        ctx.access_log.write(
            &fields,
            &crate::access_log::Entry {
                req: &logged.request,
                status: ex.status,
                latency: logged.started.elapsed(),
                upstream: label,
                bytes: ex.sent,
                route: logged.route.as_deref(),
            },
        );
    }
    ex.active = false;
    ex.parsed = false;
    ex.slots = [None, None];
    ex.asks = [None, None];
    ex.plan = None;
    ex.decode = None;
    ex.scan = None;
    ex.used = None;
    ex.body_in = None;
    ex.body_out = None;
    ex.keep = Keep::default();
    ex.head_in = false;
    ex.counted = false;
    ex.tunnel.clear();
    if matches!(ex.phase, Phase::Tunnel) {
        ex.phase = Phase::Head;
    }
    ex.timers.clear_all();
}

/// An exchange made ready for its next request: buffers back to the
/// worker's pool, its header arrays kept for reuse.
fn recycle(mut ex: Box<Exchange>, ctx: &WorkerCtx) -> Box<Exchange> {
    debug_assert!(ex.up.is_none() && !ex.inflight);
    for v in [
        std::mem::take(&mut ex.buf).into_inner(),
        std::mem::take(&mut ex.out),
        std::mem::take(&mut ex.fwd),
    ] {
        if v.capacity() > 0 {
            ctx.bufs.put(v);
        }
    }
    ex.out_sent = 0;
    ex.phase = Phase::Head;
    ex.cur = None;
    ex.active = false;
    ex.next = None;
    ex.slots = [None, None];
    ex.asks = [None, None];
    ex.plan = None;
    ex.logged = None;
    ex.lingered = 0;
    ex.timers.clear_all();
    // Rarely used (Connection listing other fields): freed.
    ex.req.connection_names = Vec::new();
    ex.res.connection_names = Vec::new();
    ex
}

impl Service for Proxy {
    fn accepted(&mut self, io: &mut Io, ctx: &WorkerCtx, fd: RawFd, listener: usize) {
        // A new connection gets `header_timeout` to send its first byte
        // (nginx's client_header_timeout); between requests it may idle
        // for `keepalive_timeout`.
        let cur = ctx.current();
        let config = &cur.snapshot.listeners[listener];
        // An HTTPS connection's first deadline is its handshake's.
        let (tls, timeout) = match &config.tls {
            None => (None, config.header_timeout),
            Some(acceptor) => match crate::tls::Session::new(acceptor) {
                Ok(s) => (Some(Box::new(s)), config.handshake_timeout),
                Err(e) => {
                    crate::warn!("TLS session: {e}");
                    io.close(fd);
                    return;
                }
            },
        };
        let id = self.downs.insert(Down {
            fd,
            listener: listener as u16,
            recv_armed: true,
            sending: false,
            closing: false,
            paused: false,
            eof: false,
            client: peer_ip(fd),
            idle_until: io.tick_after(timeout),
            filed: NEVER,
            ex: None,
            tls,
        });
        for open in [&ctx.open_connections, &ctx.listener_connections[listener]] {
            open.set(open.get() + 1);
        }
        if io
            .driver
            .recv_multi(fd, token(DOWN_RECV, id as u64))
            .is_err()
        {
            self.downs[id].recv_armed = false;
            return self.close_down(io, ctx, id);
        }
        self.schedule(io, id);
    }

    fn complete(&mut self, io: &mut Io, ctx: &WorkerCtx, c: Completion) {
        let (kind, id) = untoken(c.user_data);
        let id = id as usize;
        let down = match kind {
            DOWN_RECV | DOWN_SEND => {
                if !self.downs.contains(id) {
                    return;
                }
                if kind == DOWN_RECV {
                    self.down_received(io, ctx, id, &c);
                } else {
                    self.down_sent(io, ctx, id, &c);
                }
                Some(id)
            }
            UP_RECV | UP_SEND | UP_CONNECT => {
                let Some(u) = self.ups.get(id) else { return };
                let down = u.down;
                match kind {
                    UP_RECV => self.up_received(io, ctx, id, &c),
                    UP_SEND => self.up_sent(io, ctx, id, &c),
                    _ => self.up_connected(io, ctx, id, &c),
                }
                down
            }
            _ => None,
        };
        if let Some(id) = down {
            self.schedule(io, id);
        }
    }

    fn deadline(&mut self, io: &mut Io, ctx: &WorkerCtx, id: u32, tick: u64) -> Visit {
        let id = id as usize;
        let Some(d) = self.downs.get_mut(id) else {
            return Visit::Drop;
        };
        if d.filed != tick {
            return Visit::Drop;
        }
        d.filed = NEVER;
        loop {
            let Some(d) = self.downs.get(id) else {
                return Visit::Drop;
            };
            if d.closing {
                return Visit::Drop;
            }
            let due = due(d);
            if due > tick {
                break;
            }
            match d.ex.as_deref().and_then(|ex| ex.timers.expired(tick)) {
                Some(timer) => self.expire(io, ctx, id, timer),
                None if d.ex.is_none() => {
                    if let Some(s) = self.downs[id].tls.as_deref_mut()
                        && s.is_handshaking()
                        && !s.closing
                    {
                        s.closing = true;
                        ctx.stats.tls.failed(crate::tls::Failure::Timeout);
                    }
                    self.close_down(io, ctx, id)
                }
                None => break,
            }
        }
        let Some(d) = self.downs.get_mut(id) else {
            return Visit::Drop;
        };
        let due = due(d);
        if due == NEVER || d.filed <= due {
            return Visit::Drop;
        }
        d.filed = due;
        Visit::Later(due)
    }

    fn abandon(&mut self, io: &mut Io, ctx: &WorkerCtx, user_data: u64) {
        let (kind, id) = untoken(user_data);
        let id = id as usize;
        match kind {
            DOWN_RECV | DOWN_SEND if self.downs.contains(id) => self.close_down(io, ctx, id),
            UP_RECV | UP_SEND | UP_CONNECT if self.ups.contains(id) => match self.ups[id].down {
                Some(down) if self.downs.contains(down) => self.close_down(io, ctx, down),
                _ => self.close_up(io, ctx, id),
            },
            _ => {}
        }
    }

    fn drain(&mut self, io: &mut Io, ctx: &WorkerCtx) {
        let idle: Vec<usize> = self
            .downs
            .iter()
            .filter(|(_, d)| !io.handover && d.ex.is_none() && !d.sending)
            .map(|(id, _)| id)
            .collect();
        for id in idle {
            self.close_down(io, ctx, id);
        }
        self.pool.clear(ctx, &mut self.closing);
        self.close_pending(io, ctx);
        self.run_woken(io, ctx);
    }

    fn close_all(&mut self, io: &mut Io, ctx: &WorkerCtx) {
        let open: Vec<usize> = self
            .downs
            .iter()
            .filter(|(_, d)| !d.closing)
            .map(|(id, _)| id)
            .collect();
        for id in open {
            self.close_down(io, ctx, id);
        }
    }

    fn tick(&mut self, io: &mut Io, ctx: &WorkerCtx) {
        self.pool.expire(ctx, io.now, &mut self.closing);
        self.close_pending(io, ctx);
        self.run_woken(io, ctx);
    }

    fn turn_done(&mut self, io: &mut Io, ctx: &WorkerCtx) {
        self.run_woken(io, ctx);
    }

    fn open(&self) -> usize {
        self.downs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "9.99.199.1",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().expect("an address");
            let mut buf = [0u8; 48];
            assert_eq!(write_ip(&mut buf, ip), ip.to_string().as_bytes());
        }
    }
}
