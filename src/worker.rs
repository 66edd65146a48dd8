//! Workers: one OS thread per selected core, pinned, each with its own
//! event loop, listeners, buffers and upstream pools. Proxy workers run a
//! monoio runtime; origin workers already run the native core (`engine`),
//! which proxy workers move onto next (docs/design.md).
//!
//! Owns: the thread, the proxy's monoio runtime (io_uring or epoll), its
//! accept loops, drain sequence and panic isolation per connection. Does
//! not own: what a worker shares with its connections (`context`), what a
//! connection does (`proxy`, `origin`) or when to drain (`control`).

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use monoio::io::AsyncReadRent;
use monoio::net::{TcpListener, UnixStream};

use std::sync::mpsc::Sender;

use crate::admission::Reason;
use crate::config::epoch::Published;
use crate::context::{MSG_DRAIN, WorkerCtx};
use crate::origin::{Origin, OriginBody};
use crate::ring::DriverKind;
use crate::stats::Report;
use crate::stats::hub::MSG_STATS;

/// What the worker's connections do.
#[derive(Clone)]
pub enum Role {
    Proxy,
    /// The built-in origin server, answering every request itself with a
    /// body of this many bytes.
    Origin(usize),
}

/// What the control thread hands a worker thread.
pub struct WorkerSpec {
    pub id: usize,
    /// Workers started in all.
    pub workers: usize,
    /// Where the worker sends its statistics reports.
    pub stats: Option<Sender<Report>>,
    pub core: Option<core_affinity::CoreId>,
    pub driver: DriverKind,
    pub published: Arc<Published>,
    /// `(socket, index into snapshot.listeners)`
    pub listeners: Vec<(std::net::TcpListener, usize)>,
    pub control: std::os::unix::net::UnixStream,
    pub role: Role,
}

/// io_uring submission queue size: enough for every connection of a busy
/// worker to have a read or poll in flight without waiting for space.
const URING_ENTRIES: u32 = 4096;

/// io_uring setup for a ring that only its own worker thread touches.
///
/// COOP_TASKRUN: completions for sockets woken from other CPUs run as task
/// work on our next kernel entry instead of interrupting the worker with an
/// IPI. Measured in interleaved rounds (1 worker, 50 connections, 128-byte
/// bodies, proxy alone on its CPU): 17.0 -> 12.9 us of proxy CPU per
/// request and 56k -> 76k req/s; without it 9% of the worker's time went
/// to `irqentry_exit_to_user_mode`. SINGLE_ISSUER holds by construction
/// (one thread per ring) and lets the kernel skip locking. Both need Linux
/// 6.0; `spawn` falls back to a plain ring on older kernels.
fn uring_setup() -> io_uring_monoio::Builder {
    let mut b = io_uring_monoio::IoUring::builder();
    b.setup_coop_taskrun().setup_single_issuer();
    b
}

/// Start the worker thread.
pub fn spawn(spec: WorkerSpec) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(match spec.role {
            // Origin threads are told apart from proxy ones in logs (demo).
            Role::Proxy => format!("coregate-w{}", spec.id),
            Role::Origin(_) => format!("coregate-o{}", spec.id),
        })
        .spawn(move || {
            if let Some(core) = spec.core
                && !core_affinity::set_for_current(core)
            {
                crate::warn!("could not pin to core {}", core.id);
            }
            let driver = spec.driver.resolve();
            if let Role::Origin(size) = spec.role {
                return native_main(spec, driver, size);
            }
            let result = match driver {
                DriverKind::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(URING_ENTRIES)
                    .uring_builder(uring_setup())
                    .enable_timer()
                    .build()
                    .or_else(|e| {
                        crate::warn!(
                            "io_uring refused COOP_TASKRUN|SINGLE_ISSUER ({e}); using a plain ring"
                        );
                        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                            .with_entries(URING_ENTRIES)
                            .enable_timer()
                            .build()
                    })
                    .map(|mut rt| rt.block_on(worker_main(spec, driver))),
                _ => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
                    .map(|mut rt| rt.block_on(worker_main(spec, driver))),
            };
            if let Err(e) = result {
                crate::error!("cannot start the {} event loop: {e}", driver.name());
                std::process::exit(1);
            }
        })
}

/// A worker on the native core (`engine`): the built-in origin today.
fn native_main(spec: WorkerSpec, driver: DriverKind, body_size: usize) {
    let core = spec
        .core
        .map(|c| c.id.to_string())
        .unwrap_or_else(|| "-".into());
    let io = match crate::engine::driver(driver) {
        Ok(io) => io,
        Err(e) => {
            crate::error!("cannot start the {} event loop: {e}", driver.name());
            std::process::exit(1);
        }
    };
    crate::info!(
        "worker {} on core {} running {} (native core)",
        spec.id,
        core,
        io.name()
    );
    let mut ctx = WorkerCtx::new(spec.id, spec.workers, spec.published.clone(), driver);
    ctx.core = spec.core.map(|c| c.id);
    let mut origin = Origin::new(OriginBody::new(body_size));
    crate::engine::run(
        crate::engine::Endpoints {
            listeners: spec.listeners,
            control: spec.control,
            stats: spec.stats,
        },
        &ctx,
        io,
        &mut origin,
    );
}

async fn worker_main(spec: WorkerSpec, driver: DriverKind) {
    let core = spec
        .core
        .map(|c| c.id.to_string())
        .unwrap_or_else(|| "-".into());
    crate::info!(
        "worker {} on core {} running {}",
        spec.id,
        core,
        driver.name()
    );
    let mut ctx = WorkerCtx::new(spec.id, spec.workers, spec.published, driver);
    ctx.core = spec.core.map(|c| c.id);
    let ctx = Rc::new(ctx);
    for (socket, idx) in spec.listeners {
        match TcpListener::from_std(socket) {
            Ok(l) => {
                monoio::spawn(accept_loop(ctx.clone(), l, idx));
            }
            Err(e) => {
                crate::error!("cannot register listener: {e}");
                std::process::exit(1);
            }
        }
    }
    monoio::spawn(housekeeping(ctx.clone()));
    monoio::spawn(sweep_idle(ctx.clone()));
    // The control socket closing (control thread gone) drains too. It must
    // be non-blocking: the epoll driver tries a read before waiting for
    // readiness, and a blocking read would stop the whole worker until the
    // next control message (found by `top` under epoll).
    let _ = spec.control.set_nonblocking(true);
    if let Ok(mut control) = UnixStream::from_std(spec.control) {
        loop {
            let (res, buf) = control.read(vec![0u8; 16]).await;
            match res {
                Ok(n) if n > 0 && buf[..n].contains(&MSG_DRAIN) => break,
                Ok(n) if n > 0 => {
                    // Several requests read at once get one answer.
                    if buf[..n].contains(&MSG_STATS)
                        && let Some(tx) = &spec.stats
                    {
                        // Unbounded: never blocks this worker.
                        let _ = tx.send(ctx.report());
                    }
                }
                _ => break,
            }
        }
    }
    let drain_timeout = ctx.current().snapshot.drain_timeout;
    ctx.idle.start_drain();
    ctx.upstreams.clear();
    let deadline = Instant::now() + drain_timeout;
    while ctx.open_connections.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = ctx.open_connections.get();
    if left > 0 {
        crate::warn!("drain timeout: closing {left} connections still open");
    }
    ctx.access_log.flush();
    let rejected = ctx.rejections.summary();
    if !rejected.is_empty() {
        crate::info!("worker {} rejected: {rejected}", ctx.id);
    }
}

/// Expire idle deadlines every tick until the worker drains.
async fn sweep_idle(ctx: Rc<WorkerCtx>) {
    while !ctx.idle.is_draining() {
        monoio::time::sleep(crate::idle::IDLE_TICK).await;
        ctx.idle.expire(Instant::now());
    }
}

/// How often the worker writes out access log lines and checks idle
/// upstream connections against their timeout.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(250);

async fn housekeeping(ctx: Rc<WorkerCtx>) {
    loop {
        monoio::select! {
            _ = monoio::time::sleep(HOUSEKEEPING_INTERVAL) => {
                ctx.access_log.flush();
                ctx.upstreams.purge_expired(&ctx.current().snapshot);
            }
            _ = ctx.idle.drained() => return,
        }
    }
}

async fn accept_loop(ctx: Rc<WorkerCtx>, listener: TcpListener, listener_idx: usize) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = ctx.idle.drained() => None,
        };
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => {
                let open = &ctx.listener_connections[listener_idx];
                if open.get() >= ctx.current().snapshot.listeners[listener_idx].max_connections {
                    // At the cap: close at once rather than leave it in
                    // the backlog, where it would hold a slot the kernel
                    // could give a client we can serve later.
                    ctx.rejections.count(Reason::ConnectionLimit);
                    drop(stream);
                    continue;
                }
                open.set(open.get() + 1);
                ctx.stats.accepted();
                let _ = stream.set_nodelay(true);
                ctx.open_connections.set(ctx.open_connections.get() + 1);
                let fut = crate::proxy::serve(ctx.clone(), stream, peer, listener_idx);
                monoio::spawn(Isolated {
                    fut,
                    peer,
                    _guard: ConnGuard(ctx.clone(), listener_idx),
                });
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                crate::warn!("accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts a connection out of the worker's and its listener's totals.
struct ConnGuard(Rc<WorkerCtx>, usize);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        for open in [
            &self.0.open_connections,
            &self.0.listener_connections[self.1],
        ] {
            open.set(open.get() - 1);
        }
    }
}

/// One connection's task: polls the connection future, turning a panic
/// inside it into a log line that ends this connection only; the guard
/// keeps the open-connection count right either way.
///
/// A named future rather than an async block, and the connection future
/// held inline: an async block wrapping the future reserved its 968 bytes
/// twice (once for the captured value, once for the value moved out of
/// it), and boxing it inside the block cost a second allocation of the
/// same size. Either way about 1 KB more per idle connection (massif).
struct Isolated<F> {
    fut: F,
    peer: SocketAddr,
    _guard: ConnGuard,
}

impl<F: Future<Output = ()>> Future for Isolated<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let peer = self.peer;
        // SAFETY: structural pinning of `fut`: it is never moved out of
        // `self`, and `Isolated` has no Drop impl of its own.
        let fut = unsafe { self.map_unchecked_mut(|s| &mut s.fut) };
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                crate::error!("connection from {peer} panicked; closed it");
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[monoio::test(enable_timer = true)]
    async fn a_panicking_connection_ends_alone() {
        let snapshot =
            Arc::new(crate::config::quick("127.0.0.1:0", "tcp://127.0.0.1:9").expect("valid"));
        let ctx = Rc::new(WorkerCtx::new(
            0,
            1,
            Published::new(snapshot),
            DriverKind::Epoll,
        ));
        ctx.open_connections.set(2);
        ctx.listener_connections[0].set(2);
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let panicking = monoio::spawn(Isolated {
            fut: async { panic!("a bug in one connection") },
            peer,
            _guard: ConnGuard(ctx.clone(), 0),
        });
        let healthy = monoio::spawn(Isolated {
            fut: monoio::time::sleep(Duration::from_millis(10)),
            peer,
            _guard: ConnGuard(ctx.clone(), 0),
        });
        panicking.await;
        assert_eq!(
            ctx.open_connections.get(),
            1,
            "the panicking connection is counted out"
        );
        healthy.await;
        assert_eq!(
            ctx.open_connections.get(),
            0,
            "the other connection ran to its end"
        );
    }
}
