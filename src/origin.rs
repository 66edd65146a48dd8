//! The built-in origin: a small, fast HTTP/1.1 server for the demo,
//! benchmarks and tests (`coregate origin`), and the first service on the
//! native I/O core (`engine`, `ring`): an explicit state machine per
//! connection, driven by completions.
//!
//! Every request gets `200 OK` with a fixed body of `--body-size` bytes.
//! A request body is read and discarded, and its size is echoed back in
//! `X-Received-Bytes`, so tests can check what arrived. An idle keep-alive
//! connection is a slab record with a receive armed and no buffer. Owns:
//! nothing the proxy uses; it shares the worker and HTTP modules.

use std::os::fd::RawFd;
use std::time::Duration;

use bytes::Bytes;
use slab::Slab;

use crate::context::WorkerCtx;
use crate::engine::{Io, Kind, Service, token, untoken};
use crate::http::encode::{write_canned, write_decimal};
use crate::http::head::{self, BodyFraming, Method, RequestHead, Status, Version};
use crate::proxy::relay::{BodyIn, BodyOut, Framer};
use crate::ring::Completion;
use crate::ring::wheel::Visit;

/// The response an origin sends, prepared once.
pub struct OriginBody {
    /// Status line, headers and body for a keep-alive GET.
    full: Bytes,
    /// Just the body.
    body: Bytes,
}

impl OriginBody {
    pub fn new(size: usize) -> Self {
        let body: Vec<u8> = (0..size)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789\n"[i % 37])
            .collect();
        let mut full = Vec::with_capacity(size + 128);
        full.extend_from_slice(b"HTTP/1.1 200 OK\r\nServer: coregate-origin\r\nContent-Type: text/plain\r\nContent-Length: ");
        write_decimal(&mut full, size as u64);
        full.extend_from_slice(b"\r\n\r\n");
        full.extend_from_slice(&body);
        OriginBody {
            full: Bytes::from(full),
            body: Bytes::from(body),
        }
    }
}

/// A connection idle (or silent mid-request) this long is closed.
const IDLE: Duration = Duration::from_secs(60);

/// Received bytes a connection may hold unparsed before its receive is
/// paused (four pooled buffers' worth).
const MAX_BUFFERED: usize = 4 * crate::net::buffer::BUF_SIZE;

/// The origin's operations, as token kinds.
const RECV: u8 = Kind::Service as u8;
const SEND: u8 = Kind::Service as u8 + 1;

/// Where a connection is in its current request.
enum State {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Reading a request body to discard it.
    Body {
        framer: Framer,
        keep: bool,
        method: Method,
    },
    /// Sending the response; then the next request, or close.
    Respond { keep: bool },
}

/// What a connection holds only while it has a request under way: taken
/// from the origin's free list when bytes arrive on an idle connection,
/// given back (with its header array) when it goes idle again.
struct Exchange {
    state: State,
    req: RequestHead,
    /// Received and not yet used.
    buf: Vec<u8>,
    /// Bytes to send first (a head, `100 Continue`, an error answer)...
    out: Vec<u8>,
    /// ...then these (the prepared response or its body).
    tail: Option<Bytes>,
    /// Bytes of the piece in flight already sent.
    sent: usize,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            state: State::Head,
            req: RequestHead::default(),
            buf: Vec::new(),
            out: Vec::new(),
            tail: None,
            sent: 0,
        }
    }
}

/// One connection's record. An idle keep-alive connection is this and
/// nothing more (40 bytes): its receive is armed, and it holds no buffer,
/// no header array and no request state.
struct Conn {
    fd: RawFd,
    listener: u32,
    sending: bool,
    recv_armed: bool,
    closing: bool,
    /// Receiving is stopped until the backlog in `buf` is worked off.
    paused: bool,
    /// Current deadline, and the tick the wheel holds this id under.
    deadline: u64,
    filed: u64,
    /// The request under way; `None` while idle. Never given back while
    /// a send from it is in flight.
    ex: Option<Box<Exchange>>,
}

/// The built-in origin as an engine service.
pub struct Origin {
    body: OriginBody,
    conns: Slab<Conn>,
    /// Exchanges of connections gone idle, reused (no allocation per
    /// request once the worker has seen its peak concurrency). Boxed on
    /// purpose: an exchange moves between this list and a connection as
    /// one pointer, never copied and never reallocated.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Exchange>>,
}

impl Origin {
    pub fn new(body: OriginBody) -> Self {
        Origin {
            body,
            conns: Slab::new(),
            spare: Vec::new(),
        }
    }

    /// Parse, read bodies and answer as far as the bytes at hand allow.
    fn progress(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        loop {
            let conn = &mut self.conns[id];
            if conn.closing || conn.sending {
                return;
            }
            let listener = conn.listener as usize;
            let Some(ex) = conn.ex.as_deref_mut() else {
                return;
            };
            match &mut ex.state {
                State::Head => {
                    if ex.req.headers.capacity() == 0 {
                        ex.req.headers = ctx.header_vecs.get();
                    }
                    let limits = &ctx.current().snapshot.listeners[listener].limits;
                    let n = match head::parse_request(&ex.buf, limits, &mut ex.req) {
                        Ok(Status::Complete(n)) => n,
                        Ok(Status::Partial) => return,
                        Err(e) => {
                            write_canned(
                                &mut ex.out,
                                e.status(),
                                false,
                                Version::Http11,
                                true,
                                None,
                            );
                            ex.state = State::Respond { keep: false };
                            return self.send(io, id);
                        }
                    };
                    ex.buf.drain(..n);
                    let keep = ex.req.keep_alive && !io.draining;
                    let method = ex.req.method;
                    let body_in = match ex.req.framing {
                        BodyFraming::Length(n) => BodyIn::Length(n),
                        BodyFraming::Chunked => BodyIn::Chunked,
                        _ => {
                            self.respond(io, ctx, id, None, keep, method);
                            continue;
                        }
                    };
                    ex.state = State::Body {
                        framer: Framer::new(body_in, BodyOut::Verbatim, u64::MAX),
                        keep,
                        method,
                    };
                    if ex.req.expect_continue
                        && ex.req.version == Version::Http11
                        && ex.buf.is_empty()
                    {
                        ex.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        return self.send(io, id);
                    }
                }
                State::Body {
                    framer,
                    keep,
                    method,
                } => {
                    let (keep, method) = (*keep, *method);
                    let mut discard = Vec::new();
                    let step = match framer.step(&ex.buf, &mut discard) {
                        Ok(step) => step,
                        Err(_) => return self.close(io, ctx, id),
                    };
                    ex.buf.drain(..step.consumed);
                    if !step.done {
                        return;
                    }
                    let received = framer.total();
                    self.respond(io, ctx, id, Some(received), keep, method);
                }
                State::Respond { .. } => return,
            }
        }
    }

    /// Queue the response and start sending it.
    fn respond(
        &mut self,
        io: &mut Io,
        ctx: &WorkerCtx,
        id: usize,
        received: Option<u64>,
        keep: bool,
        method: Method,
    ) {
        let ex = self.conns[id]
            .ex
            .as_deref_mut()
            .expect("a request under way has its exchange");
        ex.state = State::Respond { keep };
        if ex.out.capacity() == 0 {
            ex.out = ctx.bufs.get();
        }
        match (received, keep, method) {
            // The common case: one prepared send, no formatting.
            (None, true, m) if m != Method::Head => ex.tail = Some(self.body.full.clone()),
            _ => {
                let out = &mut ex.out;
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\nServer: coregate-origin\r\nContent-Type: text/plain\r\nContent-Length: ");
                write_decimal(out, self.body.body.len() as u64);
                if let Some(n) = received {
                    out.extend_from_slice(b"\r\nX-Received-Bytes: ");
                    write_decimal(out, n);
                }
                if !keep {
                    out.extend_from_slice(b"\r\nConnection: close");
                }
                out.extend_from_slice(b"\r\n\r\n");
                if method != Method::Head {
                    ex.tail = Some(self.body.body.clone());
                }
            }
        }
        self.send(io, id);
    }

    /// Send the next piece waiting: `out`, then `tail`.
    fn send(&mut self, io: &mut Io, id: usize) {
        let conn = &mut self.conns[id];
        let Some(ex) = conn.ex.as_deref() else { return };
        let piece: &[u8] = if !ex.out.is_empty() {
            &ex.out
        } else if let Some(t) = &ex.tail {
            t
        } else {
            return;
        };
        conn.sending = true;
        // SAFETY: the bytes live in the exchange's heap storage (`out`'s
        // buffer or `tail`'s), which stays put when the slab or the box
        // moves; `out` is not touched, `tail` not dropped and the exchange
        // not given back while `sending` is set (`go_idle`, `close`).
        let r = unsafe {
            io.driver
                .send(conn.fd, &piece[ex.sent..], token(SEND, id as u64))
        };
        if r.is_err() {
            conn.sending = false;
            conn.closing = true;
        }
    }

    fn sent(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, c: &Completion) {
        self.send_done(io, ctx, id, c);
        if self.conns.contains(id) {
            self.resume(io, id);
        }
    }

    fn send_done(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, c: &Completion) {
        let conn = &mut self.conns[id];
        conn.sending = false;
        let n = match c.io_result() {
            Ok(n) if n > 0 && !conn.closing => n,
            _ => return self.close(io, ctx, id),
        };
        let ex = conn
            .ex
            .as_deref_mut()
            .expect("a send comes from an exchange");
        ex.sent += n;
        let len = if !ex.out.is_empty() {
            ex.out.len()
        } else {
            ex.tail.as_ref().map_or(0, Bytes::len)
        };
        if ex.sent < len {
            return self.send(io, id);
        }
        ex.sent = 0;
        if !ex.out.is_empty() {
            ex.out.clear();
            if ex.tail.is_some() {
                return self.send(io, id);
            }
        } else {
            ex.tail = None;
        }
        match ex.state {
            // A `100 Continue` went out: on with the body.
            State::Body { .. } => self.progress(io, ctx, id),
            State::Respond { keep: true } if !io.draining || io.handover => {
                ex.state = State::Head;
                if ex.buf.is_empty() {
                    self.go_idle(ctx, id);
                } else {
                    self.progress(io, ctx, id);
                }
            }
            _ => self.close(io, ctx, id),
        }
    }

    /// The connection waits for its next request: its exchange goes back
    /// to the free list, its buffers to the worker's pool.
    fn go_idle(&mut self, ctx: &WorkerCtx, id: usize) {
        let conn = &mut self.conns[id];
        debug_assert!(!conn.sending, "a send still uses the exchange");
        if let Some(ex) = conn.ex.take() {
            self.spare.push(recycle(ex, ctx));
        }
    }

    fn received(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize, c: &Completion) {
        let Origin { conns, spare, .. } = self;
        let conn = &mut conns[id];
        if !c.more() {
            conn.recv_armed = false;
        }
        match (c.buffer(), c.io_result()) {
            (Some(bid), Ok(n)) => {
                let ex = conn
                    .ex
                    .get_or_insert_with(|| spare.pop().unwrap_or_default());
                if ex.buf.capacity() == 0 {
                    ex.buf = ctx.bufs.get();
                }
                ex.buf.extend_from_slice(io.driver.buf(bid, n));
                io.driver.recycle(bid);
                // Pushed back: the wheel is not touched (`ring::wheel`).
                conn.deadline = io.wheel.tick_of(io.now + IDLE);
            }
            (None, Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) && !conn.closing => {
                // Every worker buffer was in use: receive again.
                conn.recv_armed = io
                    .driver
                    .recv_multi(conn.fd, token(RECV, id as u64))
                    .is_ok();
                return;
            }
            // The receive this connection paused (below) has ended.
            (None, Err(e))
                if e.raw_os_error() == Some(libc::ECANCELED) && conn.paused && !conn.closing =>
            {
                return self.resume(io, id);
            }
            // EOF, an error, or our own cancellation.
            _ => return self.close(io, ctx, id),
        }
        if conn.closing {
            return self.close(io, ctx, id);
        }
        let backlog = conn.ex.as_ref().map_or(0, |ex| ex.buf.len());
        if backlog > MAX_BUFFERED && conn.recv_armed && !conn.paused {
            // A client that sends faster than it reads answers (a flood of
            // pipelined requests): a multishot receive has no flow control
            // of its own, so stop receiving until the backlog is worked
            // off, and let TCP push back on the client.
            conn.paused = true;
            let _ = io.driver.cancel(conn.fd, token(RECV, id as u64));
        }
        self.progress(io, ctx, id);
    }

    /// Receive again on a paused connection once its backlog is down to
    /// half the cap and its receive has ended.
    fn resume(&mut self, io: &mut Io, id: usize) {
        let conn = &mut self.conns[id];
        let backlog = conn.ex.as_ref().map_or(0, |ex| ex.buf.len());
        if !conn.paused || conn.recv_armed || conn.closing || backlog > MAX_BUFFERED / 2 {
            return;
        }
        conn.paused = false;
        conn.recv_armed = io
            .driver
            .recv_multi(conn.fd, token(RECV, id as u64))
            .is_ok();
        if !conn.recv_armed {
            conn.closing = true;
        }
    }

    /// Close `id`: stop its receive (and a send to a client that stopped
    /// reading), and free it once the kernel holds nothing of it.
    fn close(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let conn = &mut self.conns[id];
        let first = !conn.closing;
        conn.closing = true;
        let ops = [
            (conn.recv_armed, token(RECV, id as u64)),
            (conn.sending, token(SEND, id as u64)),
        ];
        if io.cancel_in_flight(conn.fd, first, &ops) {
            return;
        }
        let conn = self.conns.remove(id);
        io.close(conn.fd);
        if let Some(ex) = conn.ex {
            self.spare.push(recycle(ex, ctx));
        }
        for open in [
            &ctx.open_connections,
            &ctx.listener_connections[conn.listener as usize],
        ] {
            open.set(open.get() - 1);
        }
    }
}

/// An exchange made ready for its next request: buffers back to the
/// worker's pool, its header array kept for reuse.
fn recycle(mut ex: Box<Exchange>, ctx: &WorkerCtx) -> Box<Exchange> {
    for v in [std::mem::take(&mut ex.buf), std::mem::take(&mut ex.out)] {
        if v.capacity() > 0 {
            ctx.bufs.put(v);
        }
    }
    ex.tail = None;
    ex.sent = 0;
    ex.state = State::Head;
    // Rarely used (Connection listing other fields): freed.
    ex.req.connection_names = Vec::new();
    ex
}

impl Service for Origin {
    fn accepted(&mut self, io: &mut Io, ctx: &WorkerCtx, fd: RawFd, listener: usize) {
        let deadline = io.wheel.tick_of(io.now + IDLE);
        let id = self.conns.insert(Conn {
            fd,
            listener: listener as u32,
            sending: false,
            recv_armed: true,
            closing: false,
            paused: false,
            deadline,
            filed: deadline,
            ex: None,
        });
        for open in [&ctx.open_connections, &ctx.listener_connections[listener]] {
            open.set(open.get() + 1);
        }
        io.wheel.insert(id as u32, deadline);
        if io.driver.recv_multi(fd, token(RECV, id as u64)).is_err() {
            self.conns[id].recv_armed = false;
            self.close(io, ctx, id);
        }
    }

    fn complete(&mut self, io: &mut Io, ctx: &WorkerCtx, c: Completion) {
        let (kind, id) = untoken(c.user_data);
        let id = id as usize;
        if !self.conns.contains(id) {
            return;
        }
        match kind {
            RECV => self.received(io, ctx, id, &c),
            SEND => self.sent(io, ctx, id, &c),
            _ => {}
        }
    }

    fn deadline(&mut self, io: &mut Io, ctx: &WorkerCtx, id: u32, tick: u64) -> Visit {
        let Some(conn) = self.conns.get_mut(id as usize) else {
            return Visit::Drop;
        };
        if conn.filed != tick {
            return Visit::Drop;
        }
        if conn.deadline > tick {
            conn.filed = conn.deadline;
            return Visit::Later(conn.deadline);
        }
        if !conn.closing {
            self.close(io, ctx, id as usize);
        }
        Visit::Drop
    }

    fn abandon(&mut self, io: &mut Io, ctx: &WorkerCtx, user_data: u64) {
        let id = untoken(user_data).1 as usize;
        if self.conns.contains(id) {
            // A send in flight still completes before the entry goes.
            self.close(io, ctx, id);
        }
    }

    fn drain(&mut self, io: &mut Io, ctx: &WorkerCtx) {
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !io.handover && c.ex.is_none() && !c.sending)
            .map(|(id, _)| id)
            .collect();
        for id in idle {
            self.close(io, ctx, id);
        }
    }

    fn open(&self) -> usize {
        self.conns.len()
    }
}
