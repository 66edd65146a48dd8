//! Deadlines for every connection of a worker in one timing wheel: no timer
//! object per connection, and nothing to do per request when a deadline
//! moves later.
//!
//! Owns: which ids are due when. Does not own: the deadlines themselves.
//! Each connection record keeps its own current deadline; the wheel holds
//! at most one entry per schedule (an id and the tick it was filed under)
//! and, when that tick comes, asks the owner what the id's deadline is now
//! ([`Visit`]): expired, later (filed again under the later tick, the way
//! most deadlines move: a keep-alive connection's is pushed back by every
//! request), or no longer filed under this tick (a stale entry, dropped).
//! Only a deadline that moves *earlier* than its filed tick needs a new
//! entry ([`Wheel::insert`]). This is HAProxy's and the Linux kernel's
//! lazy re-queueing, on a hashed wheel like Varghese and Lauck's.

use std::time::{Duration, Instant};

/// The wheel's resolution: a deadline fires up to one tick late, never
/// early. Proxy timeouts are seconds; connect timeouts hundreds of ms.
pub const TICK: Duration = Duration::from_millis(10);

/// Slots in the wheel (a power of two): it spans `SLOTS * TICK` (10.24 s).
/// A later deadline waits in the slot of its tick modulo the span and is
/// filed again each time that slot comes round early.
const SLOTS: usize = 1024;

/// What the owner says of an id whose tick has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visit {
    /// Expired (the owner acted on it), or not filed under this tick any
    /// more: the entry goes.
    Drop,
    /// The deadline is later now: file the id under this tick.
    Later(u64),
}

pub struct Wheel {
    origin: Instant,
    /// `(id, tick filed under)`
    slots: Box<[Vec<(u32, u64)>]>,
    /// One bit per slot that holds entries, to find the next one without
    /// walking the wheel.
    occupied: [u64; SLOTS / 64],
    /// Ticks before this one have been handed out.
    next: u64,
    len: usize,
}

impl Wheel {
    pub fn new(now: Instant) -> Wheel {
        Wheel {
            origin: now,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            occupied: [0; SLOTS / 64],
            next: 0,
            len: 0,
        }
    }

    /// The tick a deadline at `at` is filed under: rounded up, so it never
    /// fires early.
    pub fn tick_of(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        nanos.div_ceil(TICK.as_nanos()) as u64
    }

    /// File `id` under `tick` (the owner records `tick` as the one its
    /// live entry is under). A tick already handed out is filed under the
    /// next one.
    pub fn insert(&mut self, id: u32, tick: u64) {
        let tick = tick.max(self.next);
        let slot = (tick as usize) & (SLOTS - 1);
        self.slots[slot].push((id, tick));
        self.occupied[slot / 64] |= 1 << (slot % 64);
        self.len += 1;
    }

    /// Entries filed (live and stale).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hand every entry filed under a tick up to `now` to `visit(id,
    /// tick)`, `tick` being the one it was filed under.
    pub fn advance(&mut self, now: Instant, mut visit: impl FnMut(u32, u64) -> Visit) {
        let now_tick = now.saturating_duration_since(self.origin).as_nanos() / TICK.as_nanos();
        let now_tick = now_tick as u64;
        // An idle wheel skips ahead; a busy one visits each slot once per
        // turn at most (a gap longer than the span visits each once).
        while self.next <= now_tick && self.len > 0 {
            let span_end = self.next + SLOTS as u64;
            let tick = match self.next_occupied() {
                Some(t) if t <= now_tick && t < span_end => t,
                _ => break,
            };
            let slot = (tick as usize) & (SLOTS - 1);
            let mut ids = std::mem::take(&mut self.slots[slot]);
            self.occupied[slot / 64] &= !(1 << (slot % 64));
            self.len -= ids.len();
            self.next = tick + 1;
            for (id, filed) in ids.drain(..) {
                if filed > now_tick {
                    // Filed for a later round of the wheel.
                    self.insert(id, filed);
                } else if let Visit::Later(t) = visit(id, filed) {
                    self.insert(id, t);
                }
            }
            // Keep the slot's capacity: no allocation next time round.
            if self.slots[slot].is_empty() {
                self.slots[slot] = ids;
            }
        }
        self.next = self.next.max(now_tick + 1);
    }

    /// How long until the next filed tick, for the loop's wait; `None`
    /// when nothing is filed.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        let tick = self.next_occupied()?;
        let at = self.origin + TICK * tick as u32;
        Some(at.saturating_duration_since(now))
    }

    /// The first tick from `next` on whose slot holds entries (entries
    /// filed a round later share the slot: visiting early only re-files
    /// them).
    fn next_occupied(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let start = (self.next as usize) & (SLOTS - 1);
        for step in 0..=SLOTS / 64 {
            let word = (start / 64 + step) % (SLOTS / 64);
            let mut bits = self.occupied[word];
            if step == 0 {
                bits &= !0u64 << (start % 64);
            }
            if bits != 0 {
                let slot = word * 64 + bits.trailing_zeros() as usize;
                let ahead = (slot + SLOTS - start) % SLOTS;
                return Some(self.next + ahead as u64);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deadlines of a few ids, and what the wheel handed out.
    struct Owner {
        deadline: Vec<Option<u64>>,
        filed: Vec<u64>,
        fired: Vec<(u32, u64)>,
    }

    impl Owner {
        fn new(n: usize) -> Owner {
            Owner {
                deadline: vec![None; n],
                filed: vec![0; n],
                fired: Vec::new(),
            }
        }

        /// Set `id`'s deadline, filing it only when it moved earlier.
        fn set(&mut self, wheel: &mut Wheel, id: u32, tick: u64) {
            let i = id as usize;
            let earlier = self.deadline[i].is_none() || tick < self.filed[i];
            self.deadline[i] = Some(tick);
            if earlier {
                self.filed[i] = tick;
                wheel.insert(id, tick);
            }
        }

        fn visit(&mut self, id: u32, tick: u64) -> Visit {
            let i = id as usize;
            match self.deadline[i] {
                _ if self.filed[i] != tick => Visit::Drop,
                Some(d) if d <= tick => {
                    self.deadline[i] = None;
                    self.fired.push((id, tick));
                    Visit::Drop
                }
                Some(d) => {
                    self.filed[i] = d;
                    Visit::Later(d)
                }
                None => Visit::Drop,
            }
        }
    }

    fn at(origin: Instant, tick: u64) -> Instant {
        origin + TICK * tick as u32
    }

    #[test]
    fn deadlines_fire_at_their_tick_never_early_and_once() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        let mut o = Owner::new(4);
        o.set(&mut w, 0, 5);
        o.set(&mut w, 1, 3);
        // Beyond the wheel's span: waits out several rounds.
        o.set(&mut w, 2, 2 * SLOTS as u64 + 7);
        w.advance(at(t0, 2), |id, t| o.visit(id, t));
        assert!(o.fired.is_empty());
        assert_eq!(w.next_due(at(t0, 2)), Some(TICK));
        w.advance(at(t0, 5), |id, t| o.visit(id, t));
        assert_eq!(o.fired, [(1, 3), (0, 5)]);
        w.advance(at(t0, 2 * SLOTS as u64 + 6), |id, t| o.visit(id, t));
        assert_eq!(o.fired.len(), 2, "the far deadline is not early");
        w.advance(at(t0, 2 * SLOTS as u64 + 7), |id, t| o.visit(id, t));
        assert_eq!(o.fired[2], (2, 2 * SLOTS as u64 + 7));
        assert!(w.is_empty());
        assert_eq!(w.next_due(at(t0, 9999)), None);
    }

    #[test]
    fn a_deadline_pushed_later_costs_no_entry_and_fires_late() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        let mut o = Owner::new(1);
        o.set(&mut w, 0, 10);
        // A keep-alive connection served a hundred requests: its deadline
        // moved later each time, and the wheel was not touched.
        for tick in 11..111 {
            o.set(&mut w, 0, tick);
        }
        assert_eq!(w.len(), 1);
        w.advance(at(t0, 10), |id, t| o.visit(id, t));
        assert!(o.fired.is_empty(), "re-filed under its later tick");
        assert_eq!(w.len(), 1);
        w.advance(at(t0, 110), |id, t| o.visit(id, t));
        assert_eq!(o.fired, [(0, 110)]);
    }

    #[test]
    fn a_deadline_moved_earlier_fires_at_the_earlier_tick_and_the_stale_entry_goes() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        let mut o = Owner::new(1);
        o.set(&mut w, 0, 500);
        o.set(&mut w, 0, 20);
        w.advance(at(t0, 20), |id, t| o.visit(id, t));
        assert_eq!(o.fired, [(0, 20)]);
        w.advance(at(t0, 600), |id, t| o.visit(id, t));
        assert_eq!(o.fired.len(), 1, "the entry left at 500 is stale");
        assert!(w.is_empty());
    }

    #[test]
    fn a_long_pause_hands_out_everything_due() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        let mut o = Owner::new(3);
        for (id, tick) in [(0, 1), (1, SLOTS as u64 - 1), (2, SLOTS as u64 + 3)] {
            o.set(&mut w, id, tick);
        }
        // The loop was away for longer than the wheel's span.
        w.advance(at(t0, 5 * SLOTS as u64), |id, t| o.visit(id, t));
        let mut ids: Vec<u32> = o.fired.iter().map(|f| f.0).collect();
        ids.sort();
        assert_eq!(ids, [0, 1, 2]);
    }
}
