//! The worker's side of fleet-scoped rate limits: what a worker tells the
//! fleet thread (how many requests each principal offered) and what it is
//! told back (its rate for each principal), through one [`Board`] per
//! worker. A request never waits on the fleet thread or on Redis: it
//! counts under an uncontended lock and reads the last rates it was told.
//!
//! Owns: the board and how a worker reads it. Does not own: Redis, the
//! sync and the shares (`crate::fleet`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A fleet-scoped limit's principal: `(policy id, principal hash)`.
pub type FleetKey = (usize, u64);

/// Principals a worker counts between two syncs (the fleet thread follows
/// at most `crate::fleet::MAX_TRACKED` of them).
pub const MAX_BOARD: usize = 1024;

/// How the fleet thread stands with Redis, which decides the rate of a
/// principal it has no share for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Shares are fresh; a principal without one yet gets the local
    /// share until the next sync.
    Synced,
    /// Redis is unreachable (or not synced yet): this instance gets
    /// `rate / instances`, split over its workers by their demand (a
    /// principal without a rate: `rate / instances / workers`).
    LocalShare,
    /// Redis is unreachable and the config says `fail_open`: no limit.
    FailOpen,
}

/// What the fleet thread publishes to one worker.
#[derive(Debug)]
pub struct Shares {
    pub mode: Mode,
    /// This worker's requests per second for each principal.
    pub rates: HashMap<FleetKey, f64>,
}

/// One worker's exchange with the fleet thread.
#[derive(Debug)]
pub struct Board {
    /// Requests offered (admitted or not) per principal since the fleet
    /// thread last took them.
    demand: Mutex<HashMap<FleetKey, u64>>,
    shares: Mutex<Arc<Shares>>,
    /// Bumped with every publish, so a worker takes the lock only then.
    generation: AtomicU64,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            demand: Mutex::new(HashMap::new()),
            shares: Mutex::new(Arc::new(Shares {
                mode: Mode::LocalShare,
                rates: HashMap::new(),
            })),
            generation: AtomicU64::new(0),
        }
    }
}

impl Board {
    /// The fleet thread: take the demand counted since the last call.
    pub fn take_demand(&self) -> HashMap<FleetKey, u64> {
        std::mem::take(&mut *self.demand.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The fleet thread: publish this worker's rates.
    pub fn publish(&self, shares: Shares) {
        *self.shares.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(shares);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A worker's view of its board: the shares it last read, and the fleet's
/// size, for the local share.
#[derive(Debug)]
pub struct View {
    board: Arc<Board>,
    pub instances: usize,
    seen: RefCell<(u64, Arc<Shares>)>,
}

impl View {
    pub fn new(board: Arc<Board>, instances: usize) -> View {
        let shares = board
            .shares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        View {
            board,
            instances: instances.max(1),
            seen: RefCell::new((u64::MAX, shares)),
        }
    }

    /// Count one request of `key` and say this worker's rate for it
    /// (`None`: not limited, fail-open). `local_share` is the rate when
    /// there is no share from the fleet: the fleet's rate divided by the
    /// instances and this process's workers.
    pub fn offer(&self, key: FleetKey, local_share: f64) -> Option<f64> {
        {
            let mut demand = self.board.demand.lock().unwrap_or_else(|p| p.into_inner());
            let tracked = demand.len();
            match demand.get_mut(&key) {
                Some(n) => *n += 1,
                // Bounded as the fleet thread's history is: beyond it a
                // principal is not counted and keeps the local share.
                None if tracked < crate::admission::fleet::MAX_BOARD => {
                    demand.insert(key, 1);
                }
                None => {}
            }
        }
        let generation = self.board.generation.load(Ordering::Acquire);
        let mut seen = self.seen.borrow_mut();
        if seen.0 != generation {
            let shares = self
                .board
                .shares
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            *seen = (generation, shares);
        }
        match seen.1.mode {
            Mode::FailOpen => None,
            Mode::LocalShare | Mode::Synced => {
                Some(seen.1.rates.get(&key).copied().unwrap_or(local_share))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_counts_its_demand_and_reads_what_was_published() {
        let board = Arc::new(Board::default());
        let view = View::new(board.clone(), 3);
        // Before any sync: the local share (300 / 3 instances / 2 workers).
        assert_eq!(view.offer((0, 7), 50.0), Some(50.0));
        assert_eq!(view.offer((0, 7), 50.0), Some(50.0));
        assert_eq!(view.offer((1, 9), 50.0), Some(50.0));
        let demand = board.take_demand();
        assert_eq!(demand.get(&(0, 7)), Some(&2));
        assert_eq!(demand.get(&(1, 9)), Some(&1));
        assert!(board.take_demand().is_empty());

        board.publish(Shares {
            mode: Mode::Synced,
            rates: HashMap::from([((0, 7), 120.0)]),
        });
        assert_eq!(view.offer((0, 7), 50.0), Some(120.0));
        // A principal the sync has not seen yet: the local share.
        assert_eq!(view.offer((0, 8), 50.0), Some(50.0));
        board.publish(Shares {
            mode: Mode::FailOpen,
            rates: HashMap::new(),
        });
        assert_eq!(view.offer((0, 7), 50.0), None);
    }
}
