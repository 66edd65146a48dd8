//! A worker's event loop on the native I/O core (`ring`): the loop every
//! connection state machine runs under.
//!
//! Owns: the loop turn (one `Driver::turn`, completions dispatched by
//! token, deadlines from the worker's wheel), the listeners' multishot
//! accepts and the connection cap, the control socket (statistics
//! requests, drain), the drain sequence, and panic isolation per
//! completion. Does not own: what a connection does; that is a
//! [`Service`] (`proxy::Proxy`, or the built-in `origin::Origin`).
//!
//! Tokens: the top byte of a completion's `user_data` says whose it is
//! ([`Kind`]); the service owns every kind from [`Kind::Service`] up and
//! the low 56 bits.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use crate::admission::Reason;
use crate::context::{MSG_DRAIN, MSG_HANDOVER, WorkerCtx};
use crate::ring::DriverKind;
use crate::ring::wheel::{TICK, Visit, Wheel};
use crate::ring::{Completion, Driver, RingConfig};
use crate::stats::Report;
use crate::stats::hub::MSG_STATS;

/// Whose a completion is, from the top byte of its `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A listener's accept; the low bits are its index in `Endpoints`.
    Accept = 1,
    /// The control socket's receive.
    Control = 2,
    /// Everything from here up belongs to the service.
    Service = 16,
}

/// `user_data` for `kind` (a raw byte from `Kind::Service` up for the
/// service's own kinds) and `id`.
pub fn token(kind: u8, id: u64) -> u64 {
    debug_assert!(id < 1 << 56);
    u64::from(kind) << 56 | id
}

/// `(kind byte, id)` of a `user_data`.
pub fn untoken(user_data: u64) -> (u8, u64) {
    ((user_data >> 56) as u8, user_data & ((1 << 56) - 1))
}

/// What the loop lends a service while it handles an event.
pub struct Io {
    pub driver: Driver,
    pub wheel: Wheel,
    /// The time of this loop turn (one clock read per turn).
    pub now: Instant,
    /// `now` as a wheel tick (rounded up).
    pub tick: u64,
    pub draining: bool,
    /// The drain is an upgrade's (`MSG_HANDOVER`): a keep-alive connection
    /// is closed only after an answer that says so, never while idle, so
    /// no client sends a request on a connection being closed.
    pub handover: bool,
}

impl Io {
    /// A closing connection's operations on `fd` still in flight, as
    /// `(in flight, user_data)`: each is cancelled the `first` time the
    /// connection closes, and true is returned while any is in flight
    /// (its final completion comes back to the service, which closes
    /// again). False: nothing of it is in the kernel, so it may be freed.
    pub fn cancel_in_flight(&mut self, fd: RawFd, first: bool, ops: &[(bool, u64)]) -> bool {
        let busy = ops.iter().any(|&(in_flight, _)| in_flight);
        if busy && first {
            for &(in_flight, user_data) in ops {
                if in_flight {
                    let _ = self.driver.cancel(fd, user_data);
                }
            }
        }
        busy
    }

    /// The wheel tick `d` from now (up to a tick late, never early).
    pub fn tick_after(&self, d: Duration) -> u64 {
        self.tick + ticks(d)
    }

    /// Close `fd` once no operation on it is in flight.
    pub fn close(&mut self, fd: RawFd) {
        self.driver.forget(fd);
        // SAFETY: the caller owns `fd` and has collected every completion
        // of its operations; nothing uses the number after this.
        unsafe { libc::close(fd) };
    }
}

/// Whole wheel ticks in `d`, rounded up; no 128-bit division.
fn ticks(d: Duration) -> u64 {
    const PER_SECOND: u64 = 1_000_000_000 / TICK.as_nanos() as u64;
    const NANOS: u64 = TICK.as_nanos() as u64;
    d.as_secs()
        .saturating_mul(PER_SECOND)
        .saturating_add(u64::from(d.subsec_nanos()).div_ceil(NANOS))
}

/// A kind of connection the loop serves: the state machine behind it.
pub trait Service {
    /// A new downstream connection, accepted on listener `listener`.
    fn accepted(&mut self, io: &mut Io, ctx: &WorkerCtx, fd: RawFd, listener: usize);
    /// A completion for one of the service's tokens.
    fn complete(&mut self, io: &mut Io, ctx: &WorkerCtx, c: Completion);
    /// Connection `id`'s filed tick came: what its deadline is now.
    fn deadline(&mut self, io: &mut Io, ctx: &WorkerCtx, id: u32, tick: u64) -> Visit;
    /// A handler for this token panicked: end what it belonged to.
    fn abandon(&mut self, io: &mut Io, ctx: &WorkerCtx, user_data: u64);
    /// The worker drains: finish what is in flight, and close what is idle
    /// now, or after its next answer when `io.handover` (an upgrade's).
    fn drain(&mut self, io: &mut Io, ctx: &WorkerCtx);
    /// The drain's time is up: close every connection still open (a
    /// tunnel, a request still running), each counted and logged as it
    /// ends.
    fn close_all(&mut self, _io: &mut Io, _ctx: &WorkerCtx) {}
    /// The end of a loop turn: every completion and deadline of it was
    /// handled.
    fn turn_done(&mut self, _io: &mut Io, _ctx: &WorkerCtx) {}
    /// Housekeeping, every [`HOUSEKEEPING`] (idle pooled connections
    /// past their timeout, say).
    fn tick(&mut self, _io: &mut Io, _ctx: &WorkerCtx) {}
    /// Connections still open.
    fn open(&self) -> usize;
}

/// After the drain timeout's `close_all`, how long the loop still turns
/// for the cancellations and closes to complete.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long a listener whose accept failed (EMFILE, say) rests before it
/// accepts again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// How often the service's housekeeping runs and buffered access log
/// lines are written out.
pub const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// How long a turn waits at most when no deadline is nearer, so a drain's
/// own deadline and the listeners' cap are looked at now and then.
const MAX_WAIT: Duration = Duration::from_millis(250);

/// A worker's ways in: its listeners, its control socket, and where its
/// statistics go.
pub struct Endpoints {
    /// `(socket, index into snapshot.listeners)`
    pub listeners: Vec<(std::net::TcpListener, usize)>,
    pub control: std::os::unix::net::UnixStream,
    /// Told once every listener accepts (the control thread's readiness).
    pub ready: std::sync::mpsc::Sender<()>,
    pub stats: Option<std::sync::mpsc::Sender<Report>>,
}

/// Serve `service` on `endpoints`' listeners until the worker has drained.
pub fn run(endpoints: Endpoints, ctx: &WorkerCtx, driver: Driver, service: &mut dyn Service) {
    let mut io = Io {
        driver,
        wheel: Wheel::new(Instant::now()),
        now: Instant::now(),
        tick: 0,
        draining: false,
        handover: false,
    };
    let mut listeners: Vec<Option<(RawFd, usize)>> = Vec::new();
    // Each listener's index into snapshot.listeners, kept after it closes.
    let mut listener_idx = Vec::new();
    // Whether each listener's multishot accept is in the kernel. The loop
    // ends only once none is: after an upgrade the socket stays open in
    // the new process, and an accept still armed here would take its
    // connections into a ring about to be dropped.
    let mut armed = Vec::new();
    for (i, (socket, idx)) in endpoints.listeners.into_iter().enumerate() {
        listener_idx.push(idx);
        armed.push(true);
        let fd = socket.into_raw_fd();
        if let Err(e) = io
            .driver
            .accept_multi(fd, token(Kind::Accept as u8, i as u64))
        {
            crate::error!("cannot accept on listener: {e}");
            std::process::exit(1);
        }
        listeners.push(Some((fd, idx)));
    }
    let _ = endpoints.ready.send(());
    let _ = endpoints.control.set_nonblocking(true);
    let control = endpoints.control.as_raw_fd();
    let mut control_open = io
        .driver
        .recv_multi(control, token(Kind::Control as u8, 0))
        .is_ok();
    let mut drain_deadline = None;
    let mut idle_close_at = None;
    let mut closed_all = false;
    let mut housekeeping = io.now + HOUSEKEEPING;
    let mut done = Vec::with_capacity(256);
    let mut due = Vec::new();
    // Listeners whose accept failed, re-armed at the time given.
    let mut paused: Vec<(Instant, usize)> = Vec::new();
    loop {
        paused.retain(|&(at, i)| {
            if at > io.now {
                return true;
            }
            if let Some(Some((fd, _))) = listeners.get(i) {
                armed[i] = io
                    .driver
                    .accept_multi(*fd, token(Kind::Accept as u8, i as u64))
                    .is_ok();
            }
            false
        });
        if io.draining && service.open() == 0 && !armed.contains(&true) {
            break;
        }
        // An upgrade's drain keeps idle keep-alive connections for their
        // next request; halfway to the drain timeout the ones still idle
        // close, rather than all at once when it passes.
        if let Some(at) = idle_close_at
            && io.now >= at
        {
            idle_close_at = None;
            io.handover = false;
            service.drain(&mut io, ctx);
        }
        if let Some(d) = drain_deadline
            && io.now >= d
        {
            if closed_all {
                break;
            }
            crate::warn!(
                "drain timeout: closing {} connections still open",
                service.open()
            );
            service.close_all(&mut io, ctx);
            closed_all = true;
            drain_deadline = Some(io.now + CLOSE_GRACE);
            continue;
        }
        let mut wait = io
            .wheel
            .next_due(io.now)
            .map_or(MAX_WAIT, |d| d.min(MAX_WAIT));
        if !paused.is_empty() {
            wait = wait.min(ACCEPT_PAUSE);
        }
        if let Err(e) = io.driver.turn(Some(wait), &mut done) {
            crate::error!("worker {}: event loop failed: {e}", ctx.id);
            std::process::exit(1);
        }
        io.now = Instant::now();
        io.tick = io.wheel.tick_of(io.now);
        for c in done.drain(..) {
            let (kind, id) = untoken(c.user_data);
            match kind {
                k if k == Kind::Accept as u8 => {
                    let i = id as usize;
                    if !c.more()
                        && let Some(a) = armed.get_mut(i)
                    {
                        *a = false;
                    }
                    let Some(Some((fd, idx))) = listeners.get(i).copied() else {
                        // A closed listener's last accepts, completed before
                        // the cancellation: accepted, so served like any
                        // other (their one request, then close).
                        if c.result >= 0
                            && let Some(&idx) = listener_idx.get(i)
                        {
                            accept(&mut io, ctx, service, c.result as RawFd, idx);
                        }
                        continue;
                    };
                    match c.io_result() {
                        Ok(conn) => accept(&mut io, ctx, service, conn as RawFd, idx),
                        // EMFILE and friends: logged, and the accept
                        // re-armed after a pause instead of spinning.
                        Err(e) => {
                            crate::warn!("accept failed: {e}");
                            if !c.more() {
                                paused.push((io.now + ACCEPT_PAUSE, i));
                                continue;
                            }
                        }
                    }
                    if !c.more() && !io.draining {
                        // The kernel ended the multishot accept: re-arm.
                        armed[i] = io.driver.accept_multi(fd, c.user_data).is_ok();
                    }
                }
                k if k == Kind::Control as u8 => {
                    if !c.more() {
                        control_open = false;
                    }
                    let (drain, handover, stats) = match (c.buffer(), c.result) {
                        (Some(bid), n) => {
                            let msg = io.driver.buf(bid, n as usize);
                            let seen = (
                                msg.contains(&MSG_DRAIN),
                                msg.contains(&MSG_HANDOVER),
                                msg.contains(&MSG_STATS),
                            );
                            io.driver.recycle(bid);
                            seen
                        }
                        // Every worker buffer was in use: receive again.
                        (None, r) if r == -libc::ENOBUFS => (false, false, false),
                        // EOF or an error: the control thread is gone,
                        // which drains too.
                        _ => (true, false, false),
                    };
                    if (drain || handover) && !io.draining {
                        let timeout = ctx.current().snapshot.drain_timeout;
                        drain_deadline = Some(io.now + timeout);
                        if handover {
                            idle_close_at = Some(io.now + timeout / 2);
                        }
                        start_drain(&mut io, ctx, service, &mut listeners, handover);
                    } else if stats && let Some(tx) = &endpoints.stats {
                        // Several requests read at once get one answer;
                        // unbounded: never blocks this worker.
                        let _ = tx.send(ctx.report());
                    }
                    if !control_open && !io.draining {
                        control_open = io
                            .driver
                            .recv_multi(control, token(Kind::Control as u8, 0))
                            .is_ok();
                    }
                }
                _ => {
                    let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        service.complete(&mut io, ctx, c)
                    }));
                    if served.is_err() {
                        crate::error!("a connection's handler panicked; closed it");
                        service.abandon(&mut io, ctx, c.user_data);
                    }
                }
            }
        }
        io.wheel.advance(io.now, |id, tick| {
            due.push((id, tick));
            Visit::Drop
        });
        for (id, tick) in due.drain(..) {
            if let Visit::Later(t) = service.deadline(&mut io, ctx, id, tick) {
                io.wheel.insert(id, t);
            }
        }
        service.turn_done(&mut io, ctx);
        if io.now >= housekeeping {
            housekeeping = io.now + HOUSEKEEPING;
            ctx.access_log.flush();
            service.tick(&mut io, ctx);
        }
    }
    if control_open {
        let _ = io.driver.cancel(control, token(Kind::Control as u8, 0));
    }
    ctx.access_log.flush();
    let rejected = ctx.rejections.summary();
    if !rejected.is_empty() {
        crate::info!("worker {} rejected: {rejected}", ctx.id);
    }
}

/// A new connection: counted, capped per listener, handed to the service.
/// One accepted while draining (its accept completed before the listener
/// closed) is served too: its request is answered with `Connection:
/// close`, never dropped unanswered.
fn accept(io: &mut Io, ctx: &WorkerCtx, service: &mut dyn Service, fd: RawFd, idx: usize) {
    let open = &ctx.listener_connections[idx];
    if open.get() >= ctx.current().snapshot.listeners[idx].max_connections {
        // At the cap: close at once rather than leave it in the backlog,
        // where it would hold a slot the kernel could give a client we can
        // serve later.
        ctx.rejections.count(Reason::ConnectionLimit);
        io.close(fd);
        return;
    }
    ctx.stats.accepted();
    // SAFETY: a socket we just accepted; setsockopt reads `one` only.
    unsafe {
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    service.accepted(io, ctx, fd, idx);
}

/// Stop accepting (the listeners close) and let the service close what is
/// idle, or, after an upgrade (`handover`), keep it for one last request.
fn start_drain(
    io: &mut Io,
    ctx: &WorkerCtx,
    service: &mut dyn Service,
    listeners: &mut [Option<(RawFd, usize)>],
    handover: bool,
) {
    io.draining = true;
    io.handover = handover;
    for (i, l) in listeners.iter_mut().enumerate() {
        if let Some((fd, _)) = l.take() {
            let _ = io.driver.cancel(fd, token(Kind::Accept as u8, i as u64));
            // The cancellation's completion comes back with the listener
            // slot empty and is dropped; closing now frees the port for a
            // new process at once.
            io.driver.forget(fd);
            // SAFETY: our listener fd; the accept on it is cancelled and
            // takes no memory of ours.
            unsafe { libc::close(fd) };
        }
    }
    service.drain(io, ctx);
}

/// A driver for `kind`, with the worker's buffer sizes.
pub fn driver(kind: DriverKind) -> io::Result<Driver> {
    let config = RingConfig::default();
    match kind {
        DriverKind::Epoll => Driver::epoll(config),
        _ => Driver::uring(config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_up_and_never_overflow() {
        assert_eq!(ticks(Duration::ZERO), 0);
        assert_eq!(ticks(Duration::from_millis(10)), 1);
        assert_eq!(ticks(Duration::from_millis(11)), 2);
        assert_eq!(ticks(Duration::from_secs(60)), 6000);
        assert_eq!(ticks(Duration::from_millis(2500)), 250);
        assert_eq!(ticks(Duration::MAX), u64::MAX);
    }
}
