//! An inflight cap with per-tenant queues served by deficit round robin,
//! owned by one worker.
//!
//! Owns: counting requests in flight under one policy, queueing the ones
//! beyond the cap per tenant, and handing each freed slot to the next
//! waiter in DRR order (Shreedhar and Varghese, 1995): every active tenant
//! is visited in turn and may start `weight` requests per visit, so a
//! tenant sending ten times more than another gets no more slots than its
//! weight says, and a quiet tenant waits at most one round. Does not own:
//! deadlines (the caller races the wait against its queue timeout) or
//! which tenant a request belongs to.
//!
//! A freed slot goes straight to a waiter without the count dropping, so a
//! request arriving while others queue cannot jump ahead of them.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::task::Waker;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WaitState {
    Waiting,
    /// A slot was handed over; the waiter owns it from now on.
    Granted,
    /// Gave up (deadline, or its connection went away).
    Cancelled,
}

struct Waiter {
    state: Cell<WaitState>,
    waker: Cell<Option<Waker>>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Waiter({:?})", self.state.get())
    }
}

#[derive(Debug, Default)]
struct TenantQueue {
    waiters: VecDeque<Rc<Waiter>>,
    /// Waiters not cancelled: what the depth bound counts.
    waiting: usize,
    weight: u32,
    deficit: u32,
}

impl TenantQueue {
    /// Drop cancelled waiters from the front. Queue deadlines are equal and
    /// queues FIFO, so cancelled waiters gather there.
    fn drop_cancelled(&mut self) {
        while self
            .waiters
            .front()
            .is_some_and(|w| w.state.get() == WaitState::Cancelled)
        {
            self.waiters.pop_front();
        }
    }
}

/// Tenants with waiters, in two round-robin lists as in FQ-CoDel (RFC
/// 8290 4.2): a tenant that was idle starts in `new`, served before
/// `old`, and moves to the back of `old` when its turn ends with waiters
/// left. A tenant sending little therefore takes the very next free slot
/// instead of waiting a round behind the busy ones, and still gets no
/// more than one turn before it queues with them.
#[derive(Debug, Default)]
struct Queues {
    tenants: HashMap<u64, TenantQueue>,
    new: VecDeque<u64>,
    old: VecDeque<u64>,
}

impl Queues {
    /// The next waiter in DRR order, with cancelled ones dropped; with
    /// `only_new`, only a tenant that had no backlog.
    fn pick(&mut self, only_new: bool) -> Option<Rc<Waiter>> {
        loop {
            let (list, t) = match (self.new.front(), self.old.front()) {
                (Some(&t), _) => (&mut self.new, t),
                (None, Some(&t)) if !only_new => (&mut self.old, t),
                _ => return None,
            };
            let Some(q) = self.tenants.get_mut(&t) else {
                list.pop_front();
                continue;
            };
            q.drop_cancelled();
            let Some(w) = q.waiters.pop_front() else {
                // Empty: it leaves the round, and comes back as new.
                list.pop_front();
                self.tenants.remove(&t);
                continue;
            };
            if q.deficit == 0 {
                q.deficit = q.weight;
            }
            q.deficit -= 1;
            q.waiting -= 1;
            if q.deficit == 0 {
                // Its turn is over: to the back of the old tenants.
                list.pop_front();
                if q.waiters.is_empty() {
                    self.tenants.remove(&t);
                } else {
                    self.old.push_back(t);
                }
            }
            return Some(w);
        }
    }
}

/// One policy's inflight count and queues on one worker.
///
/// The top `reserve` slots are kept for quiet tenants: a tenant with a
/// backlog (in the old list) is not granted one, so a tenant that has
/// none finds a slot free at once, or is next when one frees. Without it
/// a quiet tenant waits for a busy one's slot to free, and with an origin
/// of steady latency slots free in bunches: its p99 rose 1.5x beside a
/// tenant ten times louder (scripts/bench admission fair).
#[derive(Debug)]
pub struct Gate {
    max: usize,
    reserve: usize,
    inflight: Cell<usize>,
    queues: RefCell<Queues>,
    /// Waiters across all tenants (not cancelled).
    queued: Cell<usize>,
}

/// Why a request could not take or wait for a slot.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    /// No slot, and no queue (or writes are shed at this load).
    Inflight,
    /// The tenant's queue is at its depth.
    QueueFull,
}

impl Gate {
    pub fn new(max: usize, reserve: usize) -> Self {
        debug_assert!(reserve < max.max(1));
        Gate {
            max,
            reserve,
            inflight: Cell::new(0),
            queues: RefCell::new(Queues::default()),
            queued: Cell::new(0),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.get()
    }

    pub fn queued(&self) -> usize {
        self.queued.get()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Take a slot for `tenant` now if one is free and nobody is queued
    /// for it. Only tenants with a backlog can be queued while a slot is
    /// free (it is in the reserve): then a tenant without one takes it.
    pub fn try_take(&self, tenant: u64) -> bool {
        let free = self.inflight.get() < self.max;
        if free && (self.queued.get() == 0 || !self.queues.borrow().tenants.contains_key(&tenant)) {
            self.inflight.set(self.inflight.get() + 1);
            true
        } else {
            false
        }
    }

    /// Queue for a slot as `tenant`, unless its queue holds `depth`
    /// waiters already.
    pub fn enqueue(
        self: &Rc<Self>,
        tenant: u64,
        weight: u32,
        depth: usize,
    ) -> Result<Ticket, Full> {
        let mut qs = self.queues.borrow_mut();
        let qs = &mut *qs;
        let known = qs.tenants.contains_key(&tenant);
        let q = qs.tenants.entry(tenant).or_insert_with(|| TenantQueue {
            weight: weight.max(1),
            ..TenantQueue::default()
        });
        if q.waiting >= depth {
            return Err(Full::QueueFull);
        }
        // Queue deadlines are equal and queues are FIFO, so cancelled
        // waiters gather at the front: dropping them here keeps a queue's
        // memory bounded by its depth even while no slot frees up.
        q.drop_cancelled();
        // A tenant is in `tenants` exactly while it is in one of the lists.
        if !known {
            qs.new.push_back(tenant);
        }
        let waiter = Rc::new(Waiter {
            state: Cell::new(WaitState::Waiting),
            waker: Cell::new(None),
        });
        q.waiters.push_back(waiter.clone());
        q.waiting += 1;
        self.queued.set(self.queued.get() + 1);
        Ok(Ticket {
            gate: self.clone(),
            tenant,
            waiter,
            taken: false,
        })
    }

    /// A slot was freed: hand it to the next waiter, or count it free.
    pub fn release(&self) {
        // A slot in the reserve goes only to a tenant without a backlog.
        let only_new = self.inflight.get() > self.max - self.reserve;
        let next = self.queues.borrow_mut().pick(only_new);
        match next {
            Some(w) => {
                self.queued.set(self.queued.get() - 1);
                w.state.set(WaitState::Granted);
                if let Some(waker) = w.waker.take() {
                    waker.wake();
                }
            }
            None => self.inflight.set(self.inflight.get() - 1),
        }
    }

    fn cancel(&self, tenant: u64, waiter: &Waiter) {
        waiter.state.set(WaitState::Cancelled);
        self.queued.set(self.queued.get() - 1);
        if let Some(q) = self.queues.borrow_mut().tenants.get_mut(&tenant) {
            q.waiting -= 1;
        }
    }
}

/// A place in a tenant's queue. Dropping it gives the place up, or the
/// slot back if one was granted and not taken, so a cancelled request
/// never leaks a slot.
#[derive(Debug)]
pub struct Ticket {
    gate: Rc<Gate>,
    tenant: u64,
    waiter: Rc<Waiter>,
    taken: bool,
}

impl Ticket {
    /// Without waiting: true once a slot was granted; until then `waker`
    /// is woken when one is (a completion-driven caller's way to wait).
    pub fn poll_granted(&self, waker: &Waker) -> bool {
        if self.is_granted() {
            return true;
        }
        self.waiter.waker.set(Some(waker.clone()));
        false
    }

    /// Whether the slot was granted (checked after a timeout: a grant and
    /// the deadline can fire in the same turn).
    pub fn is_granted(&self) -> bool {
        self.waiter.state.get() == WaitState::Granted
    }

    /// Own the granted slot: the caller releases it.
    pub fn take(mut self) {
        debug_assert!(self.is_granted());
        self.taken = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match self.waiter.state.get() {
            WaitState::Waiting => self.gate.cancel(self.tenant, &self.waiter),
            WaitState::Granted if !self.taken => self.gate.release(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize) -> Rc<Gate> {
        Rc::new(Gate::new(max, 0))
    }

    #[test]
    fn slots_up_to_the_cap() {
        let g = gate(2);
        assert!(g.try_take(0));
        assert!(g.try_take(0));
        assert!(!g.try_take(0));
        g.release();
        assert_eq!(g.inflight(), 1);
        assert!(g.try_take(0));
    }

    #[test]
    fn a_freed_slot_goes_to_a_waiter_not_to_a_newcomer() {
        let g = gate(1);
        assert!(g.try_take(0));
        let t = g.enqueue(1, 1, 4).expect("room");
        g.release();
        assert!(t.is_granted());
        assert_eq!(g.inflight(), 1, "handed over, not freed");
        assert!(!g.try_take(0), "the newcomer does not jump the queue");
        t.take();
        g.release();
        assert_eq!(g.inflight(), 0);
    }

    #[test]
    fn queue_depth_is_per_tenant() {
        let g = gate(1);
        assert!(g.try_take(0));
        let _a1 = g.enqueue(1, 1, 2).expect("room");
        let _a2 = g.enqueue(1, 1, 2).expect("room");
        assert_eq!(g.enqueue(1, 1, 2).unwrap_err(), Full::QueueFull);
        let _b = g.enqueue(2, 1, 2).expect("tenant 2 has its own queue");
    }

    /// Serve order under DRR: tenant A with 10 waiters and weight 1 does
    /// not starve B; with weight 2, C gets two turns per round.
    #[test]
    fn deficit_round_robin_order() {
        let g = gate(1);
        assert!(g.try_take(0));
        let mut tickets = Vec::new();
        for _ in 0..6 {
            tickets.push((b'A', g.enqueue(1, 1, 100).expect("room")));
        }
        for _ in 0..2 {
            tickets.push((b'B', g.enqueue(2, 1, 100).expect("room")));
        }
        for _ in 0..4 {
            tickets.push((b'C', g.enqueue(3, 2, 100).expect("room")));
        }
        let mut order = Vec::new();
        for _ in 0..tickets.len() {
            g.release();
            let i = tickets
                .iter()
                .position(|(_, t)| t.is_granted())
                .expect("a slot was handed over");
            let (who, t) = tickets.remove(i);
            t.take();
            order.push(who);
        }
        assert_eq!(order, b"ABCCABCCAAAA");
    }

    /// A tenant that was idle takes the next free slot, ahead of a busy
    /// tenant's backlog, and then queues with it.
    #[test]
    fn an_idle_tenant_goes_first_for_one_turn() {
        let g = gate(1);
        assert!(g.try_take(0));
        let mut a: VecDeque<Ticket> = (0..5)
            .map(|_| g.enqueue(1, 1, 100).expect("room"))
            .collect();
        g.release();
        a.pop_front().expect("a's first").take();
        let b1 = g.enqueue(2, 1, 100).expect("room");
        let b2 = g.enqueue(2, 1, 100).expect("room");
        g.release();
        assert!(b1.is_granted(), "b was idle: it goes before a's backlog");
        b1.take();
        g.release();
        assert!(
            a[0].is_granted() && !b2.is_granted(),
            "then b waits its turn"
        );
    }

    /// With one slot in reserve, a tenant with a backlog runs on the
    /// others, and a quiet tenant finds the reserved one free.
    #[test]
    fn the_reserve_is_kept_for_tenants_without_a_backlog() {
        let g = Rc::new(Gate::new(3, 1));
        assert!(
            g.try_take(1) && g.try_take(1) && g.try_take(1),
            "no backlog: all 3"
        );
        let mut a: VecDeque<Ticket> = (0..3)
            .map(|_| g.enqueue(1, 1, 100).expect("room"))
            .collect();
        g.release();
        assert!(
            a[0].is_granted(),
            "a new tenant's first turn may use the reserve"
        );
        a.pop_front().expect("granted").take();
        // Tenant 1 is now an old tenant with a backlog: a freed reserve
        // slot stays free for others.
        g.release();
        assert!(!a[0].is_granted());
        assert_eq!(g.inflight(), 2);
        assert!(!g.try_take(1), "tenant 1 queues");
        assert!(g.try_take(2), "tenant 2 takes the reserved slot at once");
        // Below the reserve, tenant 1's backlog moves again.
        g.release();
        g.release();
        assert!(a[0].is_granted());
    }

    #[test]
    fn cancelled_waiters_are_skipped_and_dropped_grants_come_back() {
        let g = gate(1);
        assert!(g.try_take(0));
        let gone = g.enqueue(1, 1, 1).expect("room");
        let kept = g.enqueue(2, 1, 1).expect("room");
        drop(gone);
        assert_eq!(g.queued(), 1);
        // Tenant 1's place is free again, and its turn in the round kept.
        let again = g.enqueue(1, 1, 1).expect("cancelled waiters do not count");
        g.release();
        assert!(again.is_granted() && !kept.is_granted());
        // Granted but dropped before use (its connection went away): the
        // slot goes on to the next waiter.
        drop(again);
        assert!(kept.is_granted());
        kept.take();
        g.release();
        assert_eq!((g.inflight(), g.queued()), (0, 0));
    }

    #[test]
    fn a_waiter_is_woken_when_granted() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let woken = std::sync::Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let g = gate(1);
        assert!(g.try_take(0));
        let t = g.enqueue(9, 1, 1).expect("room");
        assert!(!t.poll_granted(&waker));
        assert_eq!(woken.0.load(std::sync::atomic::Ordering::Relaxed), 0);
        g.release();
        assert_eq!(woken.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(t.poll_granted(&waker));
        t.take();
        assert_eq!(g.inflight(), 1);
    }
}
