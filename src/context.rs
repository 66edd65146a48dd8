//! What a worker owns, shared by every connection it serves: its handle
//! on the published configuration ([`Current`]), buffer and header pools,
//! the count of idle upstream connections, counters and statistics.
//!
//! Owns: [`WorkerCtx`] and [`Current`], and the one-byte control messages
//! a worker reads from its socketpair. Does not own: the thread, its event
//! loop or what a connection does (`worker`, `engine`, `proxy`,
//! `origin`): all of those use this, and it uses none of them.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::access_log::AccessLog;
use crate::admission::fleet::{self, Board};
use crate::admission::{Admission, Rejections};
use crate::balance::GroupView;
use crate::config::Snapshot;
use crate::config::carry::Carry;
use crate::config::epoch::Published;
use crate::http::head::HeaderSpan;
use crate::net::buffer::{BufPool, VecPool};
use crate::ring::DriverKind;
use crate::rules::{RuleSet, Scratch};
use crate::stats::{self, Report, Tallies, WorkerStats};

/// Control messages, one byte each, over the worker's socketpair.
pub const MSG_DRAIN: u8 = b'D';
/// Drain after an upgrade: as `MSG_DRAIN`, except that idle keep-alive
/// connections are not closed at once (their client may be sending on
/// them right now) but answer one more request with `Connection: close`,
/// or reach their keep-alive timeout. The new process serves the rest.
pub const MSG_HANDOVER: u8 = b'U';

/// The configuration a worker runs on: a published snapshot and the
/// worker's own clone of its rules (own regex scratch space).
pub struct Current {
    pub epoch: u64,
    pub snapshot: Arc<Snapshot>,
    pub rules: RuleSet,
    /// This worker's buckets, inflight counts and queues for the
    /// snapshot's admission policies.
    pub admission: Admission,
    /// Requests per route and upstream counts per backend.
    pub tallies: Tallies,
    /// This worker's view of each upstream group (`balance`).
    pub groups: Vec<GroupView>,
    /// The epoch this worker switched from, and what this snapshot kept
    /// of it: the idle connection pool follows it too (`proxy::pool`).
    pub carried: Option<(u64, Carry)>,
}

impl Current {
    fn new(
        epoch: u64,
        snapshot: Arc<Snapshot>,
        workers: usize,
        tallies: Tallies,
        groups: Vec<GroupView>,
        carried: Option<(u64, Carry)>,
        board: &Arc<Board>,
    ) -> Self {
        let fleet = snapshot
            .fleet
            .as_ref()
            .map(|f| Rc::new(fleet::View::new(board.clone(), f.instances)));
        Current {
            epoch,
            rules: snapshot.rules.clone(),
            admission: Admission::new(&snapshot.policies, workers, fleet.as_ref()),
            tallies,
            groups,
            carried,
            snapshot,
        }
    }
}

/// Everything one worker owns. Shared by its tasks through `Rc`: no
/// locks, and one atomic load per request (the config epoch).
pub struct WorkerCtx {
    pub id: usize,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
    /// How many workers share the configured rates.
    pub workers: usize,
    published: Arc<Published>,
    current: RefCell<Rc<Current>>,
    /// Rule evaluation scratch, borrowed for one evaluation at a time.
    pub scratch: RefCell<Scratch>,
    pub bufs: BufPool,
    /// Header offset arrays for request and response heads in flight.
    pub header_vecs: VecPool<HeaderSpan>,
    /// Idle pooled upstream connections (the proxy's pool counts them).
    pub upstream_idle: Cell<usize>,
    pub open_connections: Cell<usize>,
    /// Open connections per listener (index into the snapshot's).
    pub listener_connections: Vec<Cell<usize>>,
    /// Tunnels per listener, open or waiting for their `101`
    /// (`max_tunnels`).
    pub listener_tunnels: Vec<Cell<usize>>,
    /// `rejected_total{reason}` of this worker.
    pub rejections: Rejections,
    pub stats: WorkerStats,
    pub access_log: AccessLog,
    pub driver: DriverKind,
    /// What this worker and the fleet thread tell each other
    /// (fleet-scoped rate limits).
    pub fleet: Arc<Board>,
    /// Set by the control thread at SIGTERM: `/readyz` says draining
    /// while requests are still served (`server.drain_grace`).
    pub leaving: Arc<AtomicBool>,
}

impl WorkerCtx {
    pub fn new(
        id: usize,
        workers: usize,
        published: Arc<Published>,
        driver: DriverKind,
        fleet: Arc<Board>,
        leaving: Arc<AtomicBool>,
    ) -> Self {
        let (epoch, snapshot) = published.load();
        let tallies = Tallies::new(&snapshot);
        let groups = snapshot
            .upstreams
            .iter()
            .map(|g| GroupView::new(g, id))
            .collect();
        WorkerCtx {
            id,
            core: None,
            workers,
            upstream_idle: Cell::new(0),
            access_log: AccessLog::new(snapshot.access_log.as_deref()),
            // Listen addresses cannot change on reload (`admin`), so
            // neither does their number.
            listener_connections: snapshot.listeners.iter().map(|_| Cell::new(0)).collect(),
            listener_tunnels: snapshot.listeners.iter().map(|_| Cell::new(0)).collect(),
            rejections: Rejections::default(),
            stats: WorkerStats::default(),
            current: RefCell::new(Rc::new(Current::new(
                epoch, snapshot, workers, tallies, groups, None, &fleet,
            ))),
            fleet,
            leaving,
            published,
            scratch: RefCell::new(Scratch::default()),
            bufs: BufPool::new(),
            header_vecs: VecPool::with_capacity(HEADER_VEC_CAPACITY),
            open_connections: Cell::new(0),
            driver,
        }
    }

    /// The configuration to serve the next request with. Called once per
    /// request: one relaxed atomic load, and a switch to the newly
    /// published snapshot when the epoch moved. Requests in flight keep
    /// the `Current` they started with, so none sees a mix of two configs.
    pub fn current(&self) -> Rc<Current> {
        {
            let cur = self.current.borrow();
            if cur.epoch == self.published.epoch() {
                return cur.clone();
            }
        }
        self.switch()
    }

    #[cold]
    fn switch(&self) -> Rc<Current> {
        let (epoch, snapshot) = self.published.load();
        let old = self.current.borrow().clone();
        self.access_log.retarget(snapshot.access_log.as_deref());
        // Counts and what this worker learned of backends (latency,
        // ejections) follow what the new snapshot keeps.
        let carry = Carry::between(&old.snapshot, &snapshot);
        let tallies = Tallies::carry(&carry, &old.tallies, &snapshot);
        let groups = snapshot
            .upstreams
            .iter()
            .enumerate()
            .map(|(g, group)| match carry.groups[g] {
                Some(og) => GroupView::carry(
                    &old.groups[og],
                    group,
                    |b| carry.backends[g][b].map(|k| k.old),
                    self.id,
                ),
                None => GroupView::new(group, self.id),
            })
            .collect();
        let next = Rc::new(Current::new(
            epoch,
            snapshot,
            self.workers,
            tallies,
            groups,
            Some((old.epoch, carry)),
            &self.fleet,
        ));
        *self.current.borrow_mut() = next.clone();
        crate::debug!("worker {} now on config epoch {epoch}", self.id);
        next
    }
}

/// Header slots a pooled header array starts with: typical requests carry
/// 10-20 fields, so growth is rare.
const HEADER_VEC_CAPACITY: usize = 32;

impl WorkerCtx {
    /// This worker's statistics, for the control thread.
    pub fn report(&self) -> Report {
        let cur = self.current.borrow().clone();
        self.stats.report(&stats::Context {
            worker: self.id,
            core: self.core,
            driver: self.driver.name(),
            epoch: cur.epoch,
            snapshot: &cur.snapshot,
            tallies: &cur.tallies,
            rejections: &self.rejections,
            connections_open: self.open_connections.get() as u64,
            requests_queued: cur.admission.queued(),
            buffers_free: self.bufs.free_count() as u64,
            upstream_idle: self.upstream_idle.get() as u64,
        })
    }
}
