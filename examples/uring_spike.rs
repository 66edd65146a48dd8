//! The two smallest candidates for coregate's request path on its own
//! io_uring core (`coregate::ring`), built to choose between them by
//! measurement (docs/design.md, "The request path on the native core").
//!
//! Both are keep-alive reverse proxies of GETs on one thread: multishot
//! accept, a multishot receive on every downstream and upstream socket
//! from the worker's one provided buffer ring, upstream keep-alive reuse
//! with no syscall (an idle pooled connection keeps its receive armed, so
//! a backend's close or stray bytes are seen at once), and the project's
//! own head parser and encoder, so the per-request user-space work is the
//! proxy's. They differ in how a request's life is written:
//!
//! - `--mode sm`: an explicit state machine; every completion is
//!   dispatched to a connection's handler by its `user_data`.
//! - `--mode task`: async code on a tiny executor; an idle connection is a
//!   record with a receive armed, and a task (one boxed future) lives for
//!   one request.
//!
//! Left out of both, alike: timeouts, bodies other than Content-Length
//! responses, request bodies, error responses (a failure closes).
//!
//! ```sh
//! cargo build --release --examples
//! target/release/examples/uring_spike --mode sm --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000
//! ```
//!
//! `--setup defer|coop|plain` picks the ring setup to try first and
//! `--no-register-fd` leaves the ring fd unregistered, to measure what the
//! core's defaults buy.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use coregate::http::edits::HeaderPlan;
use coregate::http::encode::{self, Forwarded, OutFraming};
use coregate::http::head::{
    self, BodyFraming, HeadLimits, Method, RequestHead, ResponseHead, Status,
};
use coregate::net::buffer::BufPool;
use coregate::ring::{Completion, Ring, RingConfig, Setup};
use slab::Slab;

const MAX_UPSTREAM_HEAD: usize = 32 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(mode), Some(listen), Some(upstream)) =
        (get("--mode"), get("--listen"), get("--upstream"))
    else {
        eprintln!(
            "usage: uring_spike --mode sm|task --listen ADDR --upstream ADDR \
             [--setup defer|coop|plain] [--no-register-fd]"
        );
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("--upstream is host:port");
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| {
            s.set_reuse_address(true)?;
            s.bind(
                &listen
                    .parse::<SocketAddr>()
                    .expect("--listen is host:port")
                    .into(),
            )?;
            s.listen(4096)?;
            Ok(TcpListener::from(s))
        })
        .expect("listen");
    stop_on_signals();
    // `--setup defer|coop|plain` and `--no-register-fd` measure what the
    // core's defaults buy.
    let setup = match get("--setup").as_deref() {
        None | Some("defer") => Setup::Deferred,
        Some("coop") => Setup::Cooperative,
        Some("plain") => Setup::Plain,
        Some(other) => {
            eprintln!("unknown --setup {other}: defer, coop or plain");
            std::process::exit(2);
        }
    };
    let config = RingConfig {
        setup,
        register_fd: !args.iter().any(|a| a == "--no-register-fd"),
        ..RingConfig::default()
    };
    let ring = Ring::new(config).expect("io_uring");
    if ring.setup() != setup {
        eprintln!("uring_spike: the kernel refused {}", setup.name());
    }
    let result = match mode.as_str() {
        "sm" => sm::run(ring, listener, upstream),
        "task" => task::run(ring, listener, upstream),
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("uring_spike: {e}");
        std::process::exit(1);
    }
    eprintln!(
        "uring_spike: {} heap allocations",
        ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// Counts heap allocations, printed at exit: the difference between two
/// runs of different lengths is the allocations per request.
struct Counting;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Set by SIGINT or SIGTERM: the loop ends and the process exits cleanly,
/// so tools that write their results at exit (DHAT, callgrind) do.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long a loop turn waits at most, so a stop request is seen.
const TURN_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

fn stop_on_signals() {
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn stopped() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

/// What a completion is for: the operation in the top byte, a slot below.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Op {
    Accept = 1,
    DownRecv,
    DownSend,
    UpRecv,
    UpSend,
    UpConnect,
    /// Cancellations and closes: nothing to do on completion.
    Ignore,
}

fn token(op: Op, slot: usize) -> u64 {
    (op as u64) << 56 | slot as u64
}

fn untoken(user_data: u64) -> (Op, usize) {
    let op = match user_data >> 56 {
        1 => Op::Accept,
        2 => Op::DownRecv,
        3 => Op::DownSend,
        4 => Op::UpRecv,
        5 => Op::UpSend,
        6 => Op::UpConnect,
        _ => Op::Ignore,
    };
    (op, (user_data & 0x00ff_ffff_ffff_ffff) as usize)
}

/// Push a send of `buf[from..]`.
///
/// # Safety
/// `buf`'s heap storage stays allocated and unchanged until the send
/// completes.
unsafe fn push_send(ring: &mut Ring, fd: RawFd, buf: &[u8], from: usize, ud: u64) {
    let rest = &buf[from..];
    // SAFETY: the caller keeps `buf` in place until the completion.
    unsafe { ring.send(fd, rest.as_ptr(), rest.len(), ud) }.expect("push send");
}

/// A non-blocking TCP socket for an upstream connection.
fn upstream_socket() -> io::Result<RawFd> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    Ok(std::os::fd::IntoRawFd::into_raw_fd(s))
}

/// Push a connect of `fd` to `addr`.
///
/// # Safety
/// `addr` stays in place until the connect completes.
unsafe fn push_connect(ring: &mut Ring, fd: RawFd, addr: &socket2::SockAddr, ud: u64) {
    // SAFETY: the caller keeps `addr` in place until the completion.
    unsafe { ring.connect(fd, addr, ud) }.expect("push connect");
}

fn close_fd(fd: RawFd) {
    // SAFETY: a socket this process owns, closed once, after its last
    // operation completed (callers track that).
    unsafe { libc::close(fd) };
}

fn peer_ip(fd: RawFd) -> IpAddr {
    // SAFETY: a socket fd we own, borrowed only for this call.
    let s = std::mem::ManuallyDrop::new(unsafe {
        <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    s.peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn ip_text(ip: IpAddr, out: &mut [u8; 48]) -> usize {
    use std::io::Write;
    let mut c = io::Cursor::new(&mut out[..]);
    let _ = write!(c, "{ip}");
    c.position() as usize
}

/// Append a completion's bytes to `buf` (taken from `pool` when it has no
/// capacity) and give the provided buffer back.
fn take_bytes(ring: &mut Ring, pool: &BufPool, c: &Completion, buf: &mut Vec<u8>) -> usize {
    let n = c.result as usize;
    let bid = c.buffer().expect("a receive with bytes names its buffer");
    if buf.capacity() == 0 {
        *buf = pool.get();
    }
    buf.extend_from_slice(ring.bufs().get(bid, n));
    ring.bufs().recycle(bid);
    n
}

/// The explicit state machine.
mod sm {
    use super::*;

    struct Down {
        fd: RawFd,
        ip: IpAddr,
        /// Received, not yet parsed; no capacity while idle.
        buf: Vec<u8>,
        /// Response bytes on their way out; `sent` of them are.
        out: Vec<u8>,
        sent: usize,
        sending: bool,
        recv_armed: bool,
        /// The upstream connection answering the request in flight.
        up: Option<usize>,
        req: RequestHead,
        keep_alive: bool,
        closing: bool,
    }

    impl Down {
        fn new(fd: RawFd) -> Down {
            Down {
                fd,
                ip: peer_ip(fd),
                buf: Vec::new(),
                out: Vec::new(),
                sent: 0,
                sending: false,
                recv_armed: true,
                up: None,
                req: RequestHead::default(),
                keep_alive: false,
                closing: false,
            }
        }
    }

    #[derive(Default)]
    struct Up {
        fd: RawFd,
        buf: Vec<u8>,
        out: Vec<u8>,
        sent: usize,
        sending: bool,
        connecting: bool,
        recv_armed: bool,
        down: Option<usize>,
        res: ResponseHead,
        head_done: bool,
        body_left: u64,
        closing: bool,
    }

    struct Proxy {
        ring: Ring,
        pool: BufPool,
        downs: Slab<Down>,
        ups: Slab<Up>,
        idle_ups: Vec<usize>,
        upstream: socket2::SockAddr,
        authority: Vec<u8>,
        limits: HeadLimits,
        plan: HeaderPlan,
    }

    pub fn run(ring: Ring, listener: TcpListener, upstream: SocketAddr) -> io::Result<()> {
        let mut p = Proxy {
            ring,
            pool: BufPool::new(),
            downs: Slab::new(),
            ups: Slab::new(),
            idle_ups: Vec::new(),
            upstream: upstream.into(),
            authority: upstream.to_string().into_bytes(),
            limits: HeadLimits::default(),
            plan: HeaderPlan::default(),
        };
        p.ring
            .accept_multi(listener.as_raw_fd(), token(Op::Accept, 0))?;
        let mut done = Vec::new();
        while !stopped() {
            p.ring.turn(Some(TURN_WAIT), &mut done)?;
            for c in done.drain(..) {
                let (op, slot) = untoken(c.user_data);
                match op {
                    Op::Accept => p.accepted(&c, listener.as_raw_fd())?,
                    Op::DownRecv => p.down_recv(slot, &c),
                    Op::DownSend => p.down_sent(slot, &c),
                    Op::UpRecv => p.up_recv(slot, &c),
                    Op::UpSend => p.up_sent(slot, &c),
                    Op::UpConnect => p.up_connected(slot, &c),
                    Op::Ignore => {}
                }
            }
        }
        Ok(())
    }

    impl Proxy {
        fn accepted(&mut self, c: &Completion, listener: RawFd) -> io::Result<()> {
            if !c.more() {
                self.ring.accept_multi(listener, token(Op::Accept, 0))?;
            }
            let Ok(fd) = c.io_result() else { return Ok(()) };
            let fd = fd as RawFd;
            let slot = self.downs.insert(Down::new(fd));
            self.ring.recv_multi(fd, token(Op::DownRecv, slot))
        }

        fn down_recv(&mut self, slot: usize, c: &Completion) {
            let d = &mut self.downs[slot];
            if !c.more() {
                d.recv_armed = false;
            }
            if c.result == -libc::ENOBUFS && !d.closing {
                d.recv_armed = true;
                let _ = self.ring.recv_multi(d.fd, token(Op::DownRecv, slot));
                return;
            }
            if c.result <= 0 {
                return self.close_down(slot);
            }
            take_bytes(&mut self.ring, &self.pool, c, &mut d.buf);
            if d.closing {
                return self.close_down(slot);
            }
            if d.up.is_none() && !d.sending {
                self.next_request(slot);
            }
        }

        /// Parse a request from what the client sent and forward it.
        fn next_request(&mut self, slot: usize) {
            let d = &mut self.downs[slot];
            match head::parse_request(&d.buf, &self.limits, &mut d.req) {
                Ok(Status::Complete(_))
                    if d.req.method == Method::Get && d.req.framing == BodyFraming::None => {}
                Ok(Status::Partial) => return,
                _ => return self.close_down(slot),
            }
            d.keep_alive = d.req.keep_alive;
            let up = match self.idle_ups.pop() {
                Some(u) => u,
                None => match self.new_up() {
                    Some(u) => u,
                    None => return self.close_down(slot),
                },
            };
            let d = &mut self.downs[slot];
            let u = &mut self.ups[up];
            if u.out.capacity() == 0 {
                u.out = self.pool.get();
            }
            let mut ip = [0u8; 48];
            let n = ip_text(d.ip, &mut ip);
            encode::write_upstream_request(
                &mut u.out,
                &d.buf,
                &d.req,
                &Forwarded {
                    client_ip: &ip[..n],
                    proto: b"http",
                    default_host: &self.authority,
                },
                None,
                &self.plan,
                false,
            );
            let head_len = d.req.len;
            d.buf.drain(..head_len);
            d.up = Some(up);
            u.down = Some(slot);
            u.head_done = false;
            if !u.connecting {
                u.sending = true;
                u.sent = 0;
                // SAFETY: `u.out` is neither touched nor dropped until the
                // send completes (`sending`).
                unsafe { push_send(&mut self.ring, u.fd, &u.out, 0, token(Op::UpSend, up)) };
            }
        }

        fn new_up(&mut self) -> Option<usize> {
            let fd = upstream_socket().ok()?;
            let slot = self.ups.insert(Up {
                fd,
                connecting: true,
                ..Default::default()
            });
            // SAFETY: `self.upstream` lives as long as the proxy.
            unsafe {
                push_connect(
                    &mut self.ring,
                    fd,
                    &self.upstream,
                    token(Op::UpConnect, slot),
                )
            };
            Some(slot)
        }

        fn up_connected(&mut self, slot: usize, c: &Completion) {
            let u = &mut self.ups[slot];
            u.connecting = false;
            if c.result < 0 {
                return self.close_up(slot);
            }
            u.recv_armed = true;
            let _ = self.ring.recv_multi(u.fd, token(Op::UpRecv, slot));
            if !u.out.is_empty() {
                u.sending = true;
                u.sent = 0;
                // SAFETY: as in `next_request`.
                unsafe { push_send(&mut self.ring, u.fd, &u.out, 0, token(Op::UpSend, slot)) };
            }
        }

        fn up_sent(&mut self, slot: usize, c: &Completion) {
            let u = &mut self.ups[slot];
            u.sending = false;
            if c.result <= 0 {
                return self.close_up(slot);
            }
            u.sent += c.result as usize;
            if u.sent < u.out.len() && !u.closing {
                u.sending = true;
                // SAFETY: as in `next_request`.
                unsafe {
                    push_send(
                        &mut self.ring,
                        u.fd,
                        &u.out,
                        u.sent,
                        token(Op::UpSend, slot),
                    )
                };
                return;
            }
            u.out.clear();
            if u.closing {
                self.close_up(slot);
            }
        }

        fn up_recv(&mut self, slot: usize, c: &Completion) {
            let u = &mut self.ups[slot];
            if !c.more() {
                u.recv_armed = false;
            }
            if c.result == -libc::ENOBUFS && !u.closing {
                u.recv_armed = true;
                let _ = self.ring.recv_multi(u.fd, token(Op::UpRecv, slot));
                return;
            }
            if c.result <= 0 || u.down.is_none() {
                // Closed, or bytes nobody asked for on an idle connection:
                // it never serves another request.
                if c.result > 0 {
                    let bid = c.buffer().expect("bytes name their buffer");
                    self.ring.bufs().recycle(bid);
                }
                return self.close_up(slot);
            }
            take_bytes(&mut self.ring, &self.pool, c, &mut u.buf);
            self.relay(slot);
        }

        /// Move what the upstream sent into the client's output.
        fn relay(&mut self, slot: usize) {
            let u = &mut self.ups[slot];
            let Some(down) = u.down else { return };
            let d = &mut self.downs[down];
            if !u.head_done {
                match head::parse_response(&u.buf, MAX_UPSTREAM_HEAD, Method::Get, &mut u.res) {
                    Ok(Status::Complete(n)) => {
                        let BodyFraming::Length(len) = u.res.framing else {
                            return self.fail(slot);
                        };
                        if d.out.capacity() == 0 {
                            d.out = self.pool.get();
                        }
                        encode::write_downstream_response(
                            &mut d.out,
                            &u.buf,
                            &u.res,
                            OutFraming::AsIs,
                            d.req.version,
                            d.keep_alive,
                            &self.plan,
                        );
                        u.buf.drain(..n);
                        u.head_done = true;
                        u.body_left = len;
                    }
                    Ok(Status::Partial) => return,
                    Err(_) => return self.fail(slot),
                }
            }
            let take = (u.body_left as usize).min(u.buf.len());
            d.out.extend_from_slice(&u.buf[..take]);
            u.buf.drain(..take);
            u.body_left -= take as u64;
            if u.body_left == 0 {
                // The exchange is over: the upstream goes back to the pool
                // with its receive armed.
                let reusable = u.res.keep_alive && u.buf.is_empty();
                u.down = None;
                d.up = None;
                if u.buf.capacity() > 0 {
                    self.pool.put(std::mem::take(&mut u.buf));
                }
                if reusable {
                    self.idle_ups.push(slot);
                } else {
                    self.close_up(slot);
                }
            }
            self.flush_down(down);
        }

        fn flush_down(&mut self, slot: usize) {
            let d = &mut self.downs[slot];
            if d.sending || d.out.len() == d.sent {
                return;
            }
            d.sending = true;
            // SAFETY: `d.out` is only appended to... never: appends wait
            // for `sending` to clear (see `down_sent`), and it is dropped
            // only by `close_down` once no send is in flight.
            unsafe {
                push_send(
                    &mut self.ring,
                    d.fd,
                    &d.out,
                    d.sent,
                    token(Op::DownSend, slot),
                )
            };
        }

        fn down_sent(&mut self, slot: usize, c: &Completion) {
            let d = &mut self.downs[slot];
            d.sending = false;
            if c.result <= 0 || d.closing {
                return self.close_down(slot);
            }
            d.sent += c.result as usize;
            if d.sent < d.out.len() {
                return self.flush_down(slot);
            }
            d.out.clear();
            d.sent = 0;
            if d.up.is_some() {
                return;
            }
            if !d.keep_alive {
                return self.close_down(slot);
            }
            if d.buf.is_empty() {
                // Idle: no buffer held while waiting for the next request.
                for v in [std::mem::take(&mut d.buf), std::mem::take(&mut d.out)] {
                    if v.capacity() > 0 {
                        self.pool.put(v);
                    }
                }
            } else {
                self.next_request(slot);
            }
        }

        /// The upstream failed mid-exchange: both sides close.
        fn fail(&mut self, up: usize) {
            if let Some(down) = self.ups[up].down.take() {
                self.downs[down].up = None;
                self.close_down(down);
            }
            self.close_up(up);
        }

        /// Stop receiving, and free the slot once no operation is in flight.
        fn close_down(&mut self, slot: usize) {
            let d = &mut self.downs[slot];
            d.closing = true;
            if let Some(up) = d.up.take() {
                self.ups[up].down = None;
                self.close_up(up);
            }
            let d = &mut self.downs[slot];
            if d.recv_armed {
                let _ = self.ring.cancel(token(Op::DownRecv, slot));
                return;
            }
            if d.sending {
                return;
            }
            let d = self.downs.remove(slot);
            close_fd(d.fd);
            for v in [d.buf, d.out] {
                if v.capacity() > 0 {
                    self.pool.put(v);
                }
            }
        }

        fn close_up(&mut self, slot: usize) {
            let u = &mut self.ups[slot];
            u.closing = true;
            self.idle_ups.retain(|&i| i != slot);
            if let Some(down) = u.down.take() {
                self.downs[down].up = None;
                self.close_down(down);
            }
            let u = &mut self.ups[slot];
            if u.recv_armed {
                let _ = self.ring.cancel(token(Op::UpRecv, slot));
                return;
            }
            if u.sending || u.connecting {
                return;
            }
            let u = self.ups.remove(slot);
            close_fd(u.fd);
            for v in [u.buf, u.out] {
                if v.capacity() > 0 {
                    self.pool.put(v);
                }
            }
        }
    }
}

/// Async code on a tiny executor of our own.
mod task {
    use super::*;

    /// One socket's I/O state, kept by the runtime so that memory the
    /// kernel uses outlives any future that is dropped.
    #[derive(Default)]
    struct Io {
        fd: RawFd,
        ip: Option<IpAddr>,
        /// Bytes received and not yet taken by a task.
        inbox: Vec<u8>,
        eof: bool,
        recv_armed: bool,
        /// A send in flight owns its buffer here until it completes.
        sending: Option<Vec<u8>>,
        sent: Option<io::Result<Vec<u8>>>,
        connect: Option<i32>,
        waker: Option<Waker>,
        /// A task is working on this socket.
        busy: bool,
        upstream: bool,
        closing: bool,
    }

    type Task = Pin<Box<dyn Future<Output = ()>>>;

    struct Runtime {
        ring: RefCell<Ring>,
        pool: BufPool,
        ios: RefCell<Slab<Io>>,
        tasks: RefCell<Slab<Option<Task>>>,
        idle_ups: RefCell<Vec<usize>>,
        /// Parsed heads of finished requests, reused (their header arrays).
        heads: RefCell<Vec<(RequestHead, ResponseHead)>>,
        upstream: socket2::SockAddr,
        authority: Vec<u8>,
        limits: HeadLimits,
        plan: HeaderPlan,
    }

    thread_local! {
        /// Tasks woken and waiting to be polled.
        static READY: RefCell<VecDeque<usize>> = const { RefCell::new(VecDeque::new()) };
    }

    fn waker_for(task: usize) -> Waker {
        fn clone(p: *const ()) -> RawWaker {
            RawWaker::new(p, &VTABLE)
        }
        fn wake(p: *const ()) {
            READY.with(|r| r.borrow_mut().push_back(p as usize));
        }
        fn drop(_: *const ()) {}
        static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);
        // SAFETY: the data pointer is a task index, never dereferenced;
        // the vtable's functions uphold RawWaker's contract for it.
        unsafe { Waker::from_raw(RawWaker::new(task as *const (), &VTABLE)) }
    }

    pub fn run(ring: Ring, listener: TcpListener, upstream: SocketAddr) -> io::Result<()> {
        let rt = Rc::new(Runtime {
            ring: RefCell::new(ring),
            pool: BufPool::new(),
            ios: RefCell::new(Slab::new()),
            tasks: RefCell::new(Slab::new()),
            idle_ups: RefCell::new(Vec::new()),
            heads: RefCell::new(Vec::new()),
            upstream: upstream.into(),
            authority: upstream.to_string().into_bytes(),
            limits: HeadLimits::default(),
            plan: HeaderPlan::default(),
        });
        let lfd = listener.as_raw_fd();
        rt.ring
            .borrow_mut()
            .accept_multi(lfd, token(Op::Accept, 0))?;
        let mut done = Vec::new();
        while !stopped() {
            rt.ring.borrow_mut().turn(Some(TURN_WAIT), &mut done)?;
            for c in done.drain(..) {
                rt.complete(&c, lfd)?;
            }
            rt.poll_ready();
        }
        Ok(())
    }

    impl Runtime {
        fn spawn(self: &Rc<Self>, fut: impl Future<Output = ()> + 'static) {
            let id = self.tasks.borrow_mut().insert(Some(Box::pin(fut)));
            READY.with(|r| r.borrow_mut().push_back(id));
        }

        fn poll_ready(self: &Rc<Self>) {
            while let Some(id) = READY.with(|r| r.borrow_mut().pop_front()) {
                let Some(mut fut) = self.tasks.borrow_mut().get_mut(id).and_then(Option::take)
                else {
                    continue;
                };
                let waker = waker_for(id);
                let mut cx = Context::from_waker(&waker);
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(()) => {
                        self.tasks.borrow_mut().remove(id);
                    }
                    Poll::Pending => self.tasks.borrow_mut()[id] = Some(fut),
                }
            }
        }

        fn wake(&self, slot: usize) {
            if let Some(w) = self.ios.borrow_mut()[slot].waker.take() {
                w.wake();
            }
        }

        fn complete(self: &Rc<Self>, c: &Completion, listener: RawFd) -> io::Result<()> {
            let (op, slot) = untoken(c.user_data);
            match op {
                Op::Accept => {
                    let mut ring = self.ring.borrow_mut();
                    if !c.more() {
                        ring.accept_multi(listener, token(Op::Accept, 0))?;
                    }
                    if let Ok(fd) = c.io_result() {
                        let fd = fd as RawFd;
                        let slot = self.ios.borrow_mut().insert(Io {
                            fd,
                            ip: Some(peer_ip(fd)),
                            recv_armed: true,
                            ..Default::default()
                        });
                        ring.recv_multi(fd, token(Op::DownRecv, slot))?;
                    }
                }
                Op::DownRecv | Op::UpRecv => self.received(slot, c),
                Op::DownSend | Op::UpSend => {
                    let mut ios = self.ios.borrow_mut();
                    let io = &mut ios[slot];
                    let buf = io.sending.take().expect("a send completes once");
                    io.sent = Some(if c.result < 0 {
                        Err(io::Error::from_raw_os_error(-c.result))
                    } else {
                        // Partial sends are resent by the task.
                        let mut b = buf;
                        b.drain(..c.result as usize);
                        Ok(b)
                    });
                    drop(ios);
                    self.wake(slot);
                    self.maybe_free(slot);
                }
                Op::UpConnect => {
                    self.ios.borrow_mut()[slot].connect = Some(c.result);
                    self.wake(slot);
                    self.maybe_free(slot);
                }
                Op::Ignore => {}
            }
            Ok(())
        }

        fn received(self: &Rc<Self>, slot: usize, c: &Completion) {
            let mut ios = self.ios.borrow_mut();
            let io = &mut ios[slot];
            if !c.more() {
                io.recv_armed = false;
            }
            if c.result == -libc::ENOBUFS && !io.closing {
                io.recv_armed = true;
                let op = if io.upstream {
                    Op::UpRecv
                } else {
                    Op::DownRecv
                };
                let _ = self.ring.borrow_mut().recv_multi(io.fd, token(op, slot));
                return;
            }
            if c.result > 0 {
                take_bytes(&mut self.ring.borrow_mut(), &self.pool, c, &mut io.inbox);
            } else {
                io.eof = true;
            }
            let idle = !io.busy && !io.closing;
            let upstream = io.upstream;
            drop(ios);
            if idle && upstream {
                // An idle pooled connection that spoke or closed.
                self.close(slot);
            } else if idle {
                // An idle connection's next request: a task for it.
                self.ios.borrow_mut()[slot].busy = true;
                let rt = self.clone();
                self.spawn(async move { rt.request(slot).await });
            } else {
                self.wake(slot);
                self.maybe_free(slot);
            }
        }

        /// Bytes received on `slot`, appended to `buf` (moved whole when
        /// `buf` is empty); `Ok(0)` at EOF.
        fn read<'a>(
            &'a self,
            slot: usize,
            buf: &'a mut Vec<u8>,
        ) -> impl Future<Output = usize> + 'a {
            std::future::poll_fn(move |cx| {
                let mut ios = self.ios.borrow_mut();
                let io = &mut ios[slot];
                if !io.inbox.is_empty() {
                    let n = io.inbox.len();
                    if buf.is_empty() {
                        let old = std::mem::replace(buf, std::mem::take(&mut io.inbox));
                        if old.capacity() > 0 {
                            self.pool.put(old);
                        }
                    } else {
                        buf.extend_from_slice(&io.inbox);
                        io.inbox.clear();
                    }
                    return Poll::Ready(n);
                }
                if io.eof {
                    return Poll::Ready(0);
                }
                io.waker = Some(cx.waker().clone());
                Poll::Pending
            })
        }

        /// Send all of `buf`; it comes back empty (its capacity kept).
        async fn send(&self, slot: usize, mut buf: Vec<u8>, op: Op) -> io::Result<Vec<u8>> {
            while !buf.is_empty() {
                {
                    let mut ios = self.ios.borrow_mut();
                    let io = &mut ios[slot];
                    // SAFETY: the buffer moves into the runtime's `Io`
                    // (heap storage unmoved) and stays there until the
                    // send's completion takes it out, whatever becomes of
                    // this future.
                    unsafe {
                        push_send(&mut self.ring.borrow_mut(), io.fd, &buf, 0, token(op, slot))
                    };
                    io.sending = Some(buf);
                }
                buf = std::future::poll_fn(|cx| {
                    let mut ios = self.ios.borrow_mut();
                    let io = &mut ios[slot];
                    match io.sent.take() {
                        Some(r) => Poll::Ready(r),
                        None => {
                            io.waker = Some(cx.waker().clone());
                            Poll::Pending
                        }
                    }
                })
                .await?;
            }
            Ok(buf)
        }

        async fn connect(&self) -> Option<usize> {
            let fd = upstream_socket().ok()?;
            let slot = self.ios.borrow_mut().insert(Io {
                fd,
                busy: true,
                upstream: true,
                ..Default::default()
            });
            // SAFETY: `self.upstream` lives as long as the runtime.
            unsafe {
                push_connect(
                    &mut self.ring.borrow_mut(),
                    fd,
                    &self.upstream,
                    token(Op::UpConnect, slot),
                )
            };
            let r = std::future::poll_fn(|cx| {
                let mut ios = self.ios.borrow_mut();
                let io = &mut ios[slot];
                match io.connect.take() {
                    Some(r) => Poll::Ready(r),
                    None => {
                        io.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            if r < 0 {
                self.close(slot);
                return None;
            }
            self.ios.borrow_mut()[slot].recv_armed = true;
            let _ = self
                .ring
                .borrow_mut()
                .recv_multi(fd, token(Op::UpRecv, slot));
            Some(slot)
        }

        /// One request's life: its task ends when the response is out.
        async fn request(self: Rc<Self>, down: usize) {
            let (mut req, mut res) = self.heads.borrow_mut().pop().unwrap_or_default();
            self.exchange(down, &mut req, &mut res).await;
            self.heads.borrow_mut().push((req, res));
        }

        async fn exchange(
            self: &Rc<Self>,
            down: usize,
            req: &mut RequestHead,
            res: &mut ResponseHead,
        ) {
            let mut buf = Vec::new();
            loop {
                match head::parse_request(&buf, &self.limits, req) {
                    Ok(Status::Complete(_))
                        if req.method == Method::Get && req.framing == BodyFraming::None =>
                    {
                        break;
                    }
                    Ok(Status::Partial) => {
                        if self.read(down, &mut buf).await == 0 {
                            return self.end(down, buf, false);
                        }
                    }
                    _ => return self.end(down, buf, false),
                }
            }
            let up = match self.idle_ups.borrow_mut().pop() {
                Some(u) => {
                    self.ios.borrow_mut()[u].busy = true;
                    Some(u)
                }
                None => None,
            };
            let Some(up) = (match up {
                Some(u) => Some(u),
                None => self.connect().await,
            }) else {
                return self.end(down, buf, false);
            };
            let mut out = self.pool.get();
            let mut ip = [0u8; 48];
            let ip_addr = self.ios.borrow()[down].ip.expect("downstream has a peer");
            let n = ip_text(ip_addr, &mut ip);
            encode::write_upstream_request(
                &mut out,
                &buf,
                req,
                &Forwarded {
                    client_ip: &ip[..n],
                    proto: b"http",
                    default_host: &self.authority,
                },
                None,
                &self.plan,
                false,
            );
            buf.drain(..req.len);
            let Ok(mut out) = self.send(up, out, Op::UpSend).await else {
                self.close(up);
                return self.end(down, buf, false);
            };
            let mut ubuf = Vec::new();
            let (head_len, len) = loop {
                match head::parse_response(&ubuf, MAX_UPSTREAM_HEAD, Method::Get, res) {
                    Ok(Status::Complete(n)) => match res.framing {
                        BodyFraming::Length(len) => break (n, len),
                        _ => {
                            self.close(up);
                            return self.end(down, buf, false);
                        }
                    },
                    Ok(Status::Partial) if self.read(up, &mut ubuf).await > 0 => {}
                    _ => {
                        self.close(up);
                        return self.end(down, buf, false);
                    }
                }
            };
            encode::write_downstream_response(
                &mut out,
                &ubuf,
                res,
                OutFraming::AsIs,
                req.version,
                req.keep_alive,
                &self.plan,
            );
            ubuf.drain(..head_len);
            let mut left = len;
            loop {
                let take = (left as usize).min(ubuf.len());
                out.extend_from_slice(&ubuf[..take]);
                ubuf.drain(..take);
                left -= take as u64;
                if left == 0 {
                    break;
                }
                if self.read(up, &mut ubuf).await == 0 {
                    self.close(up);
                    return self.end(down, buf, false);
                }
            }
            if res.keep_alive && ubuf.is_empty() {
                self.ios.borrow_mut()[up].busy = false;
                self.idle_ups.borrow_mut().push(up);
            } else {
                self.close(up);
            }
            if ubuf.capacity() > 0 {
                self.pool.put(ubuf);
            }
            let sent = self.send(down, out, Op::DownSend).await;
            let keep = req.keep_alive;
            match sent {
                Ok(out) => {
                    self.pool.put(out);
                    self.end(down, buf, keep);
                }
                Err(_) => self.end(down, buf, false),
            }
        }

        /// The request is over: park the connection with what the client
        /// already sent of its next request (a new task starts for it at
        /// once), or close it.
        fn end(self: &Rc<Self>, down: usize, buf: Vec<u8>, keep: bool) {
            if !keep {
                if buf.capacity() > 0 {
                    self.pool.put(buf);
                }
                return self.close(down);
            }
            let mut ios = self.ios.borrow_mut();
            let io = &mut ios[down];
            if !buf.is_empty() {
                let mut buf = buf;
                buf.extend_from_slice(&io.inbox);
                let old = std::mem::replace(&mut io.inbox, buf);
                if old.capacity() > 0 {
                    self.pool.put(old);
                }
            } else if buf.capacity() > 0 {
                self.pool.put(buf);
            }
            if !io.inbox.is_empty() || io.eof {
                drop(ios);
                let rt = self.clone();
                self.spawn(async move { rt.request(down).await });
            } else {
                io.busy = false;
                if io.inbox.capacity() > 0 {
                    self.pool.put(std::mem::take(&mut io.inbox));
                }
            }
        }

        fn close(&self, slot: usize) {
            let mut ios = self.ios.borrow_mut();
            let io = &mut ios[slot];
            io.closing = true;
            io.busy = false;
            if io.recv_armed {
                let op = if io.upstream {
                    Op::UpRecv
                } else {
                    Op::DownRecv
                };
                let _ = self.ring.borrow_mut().cancel(token(op, slot));
            }
            drop(ios);
            self.maybe_free(slot);
        }

        /// Free a closing socket's slot once the kernel is done with it.
        fn maybe_free(&self, slot: usize) {
            let mut ios = self.ios.borrow_mut();
            let io = &ios[slot];
            if !io.closing || io.recv_armed || io.sending.is_some() {
                return;
            }
            let io = ios.remove(slot);
            self.idle_ups.borrow_mut().retain(|&u| u != slot);
            close_fd(io.fd);
            if io.inbox.capacity() > 0 {
                self.pool.put(io.inbox);
            }
        }
    }
}
