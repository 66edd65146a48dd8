//! The config epoch: the one place workers read the current snapshot from.
//!
//! The control thread publishes a new snapshot and then bumps the epoch.
//! A worker checks the epoch once per request with a relaxed load (a plain
//! `mov` on x86); only when it moved does the worker take the lock to
//! clone the new `Arc`. A worker that reads the new epoch a moment late
//! merely serves one more request on the previous snapshot, which is
//! complete and valid in itself. The mutex orders the snapshot's contents.
//!
//! Owns: publication. Does not own: building snapshots (`config`) or what a
//! worker derives from one (`worker`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Snapshot;
use super::carry::Carry;

pub struct Published {
    epoch: AtomicU64,
    current: Mutex<Arc<Snapshot>>,
}

impl Published {
    /// Epoch 1 carries the snapshot the process started with.
    pub fn new(snapshot: Arc<Snapshot>) -> Arc<Published> {
        Arc::new(Published {
            epoch: AtomicU64::new(1),
            current: Mutex::new(snapshot),
        })
    }

    /// The hot-path check.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The current snapshot and its epoch.
    pub fn load(&self) -> (u64, Arc<Snapshot>) {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (self.epoch.load(Ordering::Relaxed), current.clone())
    }

    /// Make `snapshot` current; returns its epoch. The backends it keeps
    /// (`Carry`) get the current snapshot's health marks first, so no
    /// worker reads a mark the checks have not set. A mark the health
    /// thread flips on the old snapshot during this call is lost, and set
    /// again by that backend's next check: the thread keeps its streaks
    /// across reloads.
    pub fn publish(&self, snapshot: Arc<Snapshot>) -> u64 {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Carry::between(&current, &snapshot).health_marks(&current, &snapshot);
        *current = snapshot;
        // Bumped under the lock, so `load` never pairs an epoch with a
        // snapshot other than its own.
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }
}
