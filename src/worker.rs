//! Workers: one OS thread per selected core, pinned, each running the
//! native I/O core's event loop (`engine`) with its own listeners,
//! buffers and upstream pools.
//!
//! Owns: the thread, its pinning, and which service its connections get
//! (the proxy, or the built-in origin). Does not own: the loop, drain and
//! panic isolation (`engine`), what a worker shares with its connections
//! (`context`), what a connection does (`proxy`, `origin`) or when to
//! drain (`control`).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;

use crate::admission::fleet::Board;

use crate::config::epoch::Published;
use crate::context::WorkerCtx;
use crate::engine::Service;
use crate::origin::{Origin, OriginBody};
use crate::proxy::Proxy;
use crate::ring::{Driver, DriverKind, Setup};
use crate::stats::Report;

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
    /// Told once the worker accepts on its listeners.
    pub ready: Sender<()>,
    /// This worker's exchange with the fleet thread.
    pub fleet: Arc<Board>,
    /// Set at SIGTERM, during `server.drain_grace`.
    pub leaving: Arc<AtomicBool>,
    pub role: Role,
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
            native_main(spec, driver);
        })
}

/// A worker's life on the native core (`engine`): its context, its
/// service, and the loop until it has drained.
fn native_main(spec: WorkerSpec, driver: DriverKind) {
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
    crate::info!("worker {} on core {} running {}", spec.id, core, io.name());
    if let Driver::Uring(ring) = &io
        && ring.setup() != Setup::Deferred
    {
        // Linux before 6.1: completions cost an extra kernel entry or an
        // interrupt (docs/design.md, "Ring setup, measured").
        crate::warn!(
            "worker {}: io_uring without DEFER_TASKRUN (setup: {})",
            spec.id,
            ring.setup().name()
        );
    }
    let mut ctx = WorkerCtx::new(
        spec.id,
        spec.workers,
        spec.published.clone(),
        driver,
        spec.fleet.clone(),
        spec.leaving.clone(),
    );
    ctx.core = spec.core.map(|c| c.id);
    let mut service: Box<dyn Service> = match spec.role {
        Role::Proxy => Box::new(Proxy::new()),
        Role::Origin(size) => Box::new(Origin::new(OriginBody::new(size))),
    };
    crate::engine::run(
        crate::engine::Endpoints {
            listeners: spec.listeners,
            control: spec.control,
            ready: spec.ready,
            stats: spec.stats,
        },
        &ctx,
        io,
        service.as_mut(),
    );
}
