//! A worker's idle upstream connections, per backend: which connection
//! records (`Up`, by id) wait for the next request to their backend.
//!
//! Owns: the lists, their order (LIFO: the most recently used connection
//! is the warmest and the least likely to have been closed by the
//! backend's own idle timer), their caps, and following a reload (idle
//! connections to a backend the new configuration keeps, `config::carry`,
//! at the same address, stay pooled). Does not own: the sockets. An idle
//! connection keeps its receive armed, so the proxy learns at once when
//! the backend closes it or sends bytes nobody asked for, and takes it
//! out (`remove`) before any request could meet it.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::carry::Carry;
use crate::context::{Current, WorkerCtx};

struct Idle {
    id: u32,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    /// The configuration the lists are indexed by.
    cur: Option<Rc<Current>>,
    /// `idle[group][backend]`
    idle: Vec<Vec<Vec<Idle>>>,
    count: usize,
}

impl Pool {
    /// Index the lists by `cur`'s groups, if they are not already; idle
    /// connections to backends it no longer has go into `close`.
    pub fn follow(&mut self, ctx: &WorkerCtx, cur: &Rc<Current>, close: &mut Vec<u32>) {
        if self.cur.as_ref().is_some_and(|c| c.epoch == cur.epoch) {
            return;
        }
        let mut fresh: Vec<Vec<Vec<Idle>>> = cur
            .snapshot
            .upstreams
            .iter()
            .map(|g| g.backends.iter().map(|_| Vec::new()).collect())
            .collect();
        if let Some(old) = self.cur.take() {
            // The worker's map of this switch, unless the pool was not
            // used on an epoch in between: then one of its own.
            let built;
            let carry = match &cur.carried {
                Some((from, carry)) if *from == old.epoch => carry,
                _ => {
                    built = Carry::between(&old.snapshot, &cur.snapshot);
                    &built
                }
            };
            for (g, lists) in fresh.iter_mut().enumerate() {
                for (b, list) in lists.iter_mut().enumerate() {
                    if let Some((og, kept)) = carry.backend(g, b)
                        && kept.same_peer
                    {
                        *list = std::mem::take(&mut self.idle[og][kept.old]);
                    }
                }
            }
            close.extend(self.idle.drain(..).flatten().flatten().map(|i| i.id));
        }
        self.idle = fresh;
        self.cur = Some(cur.clone());
        self.recount(ctx);
    }

    /// An idle connection to `backend` of `group`, if one waits. `cur`
    /// must be the configuration the pool follows.
    pub fn take(&mut self, ctx: &WorkerCtx, group: usize, backend: usize) -> Option<u32> {
        let id = self.idle.get_mut(group)?.get_mut(backend)?.pop()?.id;
        self.recount(ctx);
        Some(id)
    }

    /// Pool `id` as idle to `backend` of `group` of the configuration
    /// `cur`; false when it cannot be (the list is at `max_idle`, or
    /// `cur` is not what the pool follows): close it instead.
    pub fn put(
        &mut self,
        ctx: &WorkerCtx,
        cur: &Current,
        group: usize,
        backend: usize,
        id: u32,
        now: Instant,
    ) -> bool {
        if self.cur.as_ref().is_none_or(|c| c.epoch != cur.epoch) {
            return false;
        }
        let max = cur.snapshot.upstreams[group].max_idle;
        let list = &mut self.idle[group][backend];
        if list.len() >= max {
            return false;
        }
        list.push(Idle { id, since: now });
        self.recount(ctx);
        true
    }

    /// Take `id` out wherever it waits (its backend closed it).
    pub fn remove(&mut self, ctx: &WorkerCtx, id: u32) -> bool {
        for list in self.idle.iter_mut().flatten() {
            if let Some(i) = list.iter().position(|c| c.id == id) {
                list.remove(i);
                self.recount(ctx);
                return true;
            }
        }
        false
    }

    /// Idle connections older than their group's keepalive timeout go
    /// into `close`.
    pub fn expire(&mut self, ctx: &WorkerCtx, now: Instant, close: &mut Vec<u32>) {
        let Some(cur) = &self.cur else { return };
        for (lists, group) in self.idle.iter_mut().zip(&cur.snapshot.upstreams) {
            let max_age: Duration = group.keepalive_timeout;
            for list in lists {
                list.retain(|c| {
                    let keep = now.saturating_duration_since(c.since) < max_age;
                    if !keep {
                        close.push(c.id);
                    }
                    keep
                });
            }
        }
        self.recount(ctx);
    }

    /// Every idle connection goes into `close` (drain).
    pub fn clear(&mut self, ctx: &WorkerCtx, close: &mut Vec<u32>) {
        for list in self.idle.iter_mut().flatten() {
            close.extend(list.drain(..).map(|c| c.id));
        }
        self.recount(ctx);
    }

    fn recount(&mut self, ctx: &WorkerCtx) {
        self.count = self.idle.iter().flatten().map(Vec::len).sum();
        ctx.upstream_idle.set(self.count);
    }
}
