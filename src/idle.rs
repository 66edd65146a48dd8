//! Idle deadlines for keep-alive connections, one small slab entry each,
//! and the worker's drain signal, which fires them all.
//!
//! An idle connection must cost little (docs/design.md: nginx keeps about
//! 0.6 KiB per idle connection). A monoio `Sleep` is 640 bytes with
//! 128-byte alignment, which would more than double an idle connection's
//! footprint. Instead each worker keeps an [`IdleSet`]: a slab of
//! `(deadline, waker)` entries swept by one task every [`IDLE_TICK`], the
//! way nginx keeps one timer node per connection. Deadlines fire up to one
//! tick late, which idle and header timeouts tolerate. Draining fires every
//! entry at once.
//!
//! Tasks that only wait for the drain (accept loops, the pool purge, the
//! built-in origin's connections) register with no deadline.
//!
//! Owns: idle deadlines, the drain flag, and their wake-ups. Does not own:
//! per-request timeouts, which live in the request's own (boxed) future.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// How often deadlines are checked: the most an idle deadline fires late.
pub const IDLE_TICK: Duration = Duration::from_millis(250);

struct Entry {
    /// `None`: woken only by the drain.
    deadline: Option<Instant>,
    waker: Option<Waker>,
    fired: bool,
}

#[derive(Default)]
pub struct IdleSet {
    entries: RefCell<Slab<Entry>>,
    /// Set by `start_drain`: every wait fires, now and from then on.
    draining: Cell<bool>,
}

impl IdleSet {
    /// Resolves at `deadline` (up to one tick late) or when the worker
    /// drains, whichever comes first.
    pub fn wait_until(&self, deadline: Instant) -> IdleWait<'_> {
        IdleWait {
            set: self,
            key: None,
            deadline: Some(deadline),
        }
    }

    /// Resolves when the worker drains.
    pub fn drained(&self) -> IdleWait<'_> {
        IdleWait {
            set: self,
            key: None,
            deadline: None,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Start the drain: wake every waiter, and make later waits resolve at
    /// once.
    pub fn start_drain(&self) {
        self.draining.set(true);
        for (_, e) in self.entries.borrow_mut().iter_mut() {
            e.fired = true;
            if let Some(w) = e.waker.take() {
                w.wake();
            }
        }
    }

    /// Fire every entry whose deadline has passed. Called every tick.
    pub fn expire(&self, now: Instant) {
        for (_, e) in self.entries.borrow_mut().iter_mut() {
            if !e.fired && e.deadline.is_some_and(|d| d <= now) {
                e.fired = true;
                if let Some(w) = e.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Entries registered (idle connections waiting).
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct IdleWait<'a> {
    set: &'a IdleSet,
    key: Option<usize>,
    deadline: Option<Instant>,
}

impl Future for IdleWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.draining.get() {
            return Poll::Ready(());
        }
        let mut entries = self.set.entries.borrow_mut();
        match self.key {
            Some(k) => {
                let e = &mut entries[k];
                if e.fired {
                    return Poll::Ready(());
                }
                match &mut e.waker {
                    Some(w) => w.clone_from(cx.waker()),
                    None => e.waker = Some(cx.waker().clone()),
                }
            }
            None => {
                let deadline = self.deadline;
                let k = entries.insert(Entry {
                    deadline,
                    waker: Some(cx.waker().clone()),
                    fired: false,
                });
                drop(entries);
                self.key = Some(k);
            }
        }
        Poll::Pending
    }
}

impl Drop for IdleWait<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            // Only this wait removes its own key.
            self.set.entries.borrow_mut().remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[monoio::test(enable_timer = true)]
    async fn fires_after_deadline_and_on_drain() {
        let set = IdleSet::default();
        let start = Instant::now();
        let wait = set.wait_until(start + Duration::from_millis(20));
        let sweeper = async {
            loop {
                monoio::time::sleep(Duration::from_millis(5)).await;
                set.expire(Instant::now());
            }
        };
        monoio::select! {
            _ = wait => {}
            _ = sweeper => unreachable!(),
        }
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(set.is_empty(), "a finished wait deregisters");

        let far = set.wait_until(Instant::now() + Duration::from_secs(3600));
        let mut far = std::pin::pin!(far);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(far.as_mut().poll(&mut cx).is_pending());
        assert_eq!(set.len(), 1);
        set.start_drain();
        assert!(far.as_mut().poll(&mut cx).is_ready());
        // After a drain, new waits fire at once.
        let mut late = std::pin::pin!(set.wait_until(Instant::now() + Duration::from_secs(3600)));
        assert!(late.as_mut().poll(&mut cx).is_ready());
    }
}
