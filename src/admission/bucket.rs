//! Token buckets, one per principal, owned by one worker.
//!
//! Owns: refilling, taking a token, and telling how long until the next
//! one (the truthful Retry-After). Does not own: which principal a request
//! belongs to (`admission::Key`) or the share of the rate a worker gets
//! (the caller divides the configured rate by the number of workers).

use std::collections::HashMap;
use std::time::Instant;

/// Principals remembered per policy per worker. A flood of distinct
/// principals (spoofed keys, a botnet) must not grow memory without bound:
/// past this, buckets that have refilled completely are forgotten (they
/// hold no information), and if that frees nothing the map starts over.
pub const MAX_PRINCIPALS: usize = 65_536;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The buckets of one rate limit on one worker.
#[derive(Debug)]
pub struct Buckets {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens a bucket holds; a new principal starts full.
    burst: f64,
    map: HashMap<u64, Bucket>,
}

impl Buckets {
    pub fn new(rate: f64, burst: f64) -> Self {
        debug_assert!(rate > 0.0 && burst >= 1.0);
        Buckets {
            rate,
            burst,
            map: HashMap::new(),
        }
    }

    /// Take one token for `principal`. `Err(seconds)`: none is left, and
    /// the next arrives in that many seconds (rounded up, at least 1, as
    /// Retry-After counts whole seconds).
    pub fn take(&mut self, principal: u64, now: Instant) -> Result<(), u32> {
        self.take_at(principal, now, self.rate, self.burst)
    }

    /// [`Buckets::take`] at a rate and burst of the caller's (a fleet
    /// limit's, which change with the fleet's use). A bucket's tokens are
    /// capped at the burst given now.
    pub fn take_at(
        &mut self,
        principal: u64,
        now: Instant,
        rate: f64,
        burst: f64,
    ) -> Result<(), u32> {
        if self.map.len() >= MAX_PRINCIPALS && !self.map.contains_key(&principal) {
            self.forget_full(now);
        }
        let b = self.map.entry(principal).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / rate;
            Err((wait.ceil() as u32).max(1))
        }
    }

    fn forget_full(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.map.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
        if self.map.len() >= MAX_PRINCIPALS {
            self.map.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Buckets::new(10.0, 3.0);
        for _ in 0..3 {
            assert_eq!(b.take(1, t0), Ok(()));
        }
        assert_eq!(b.take(1, t0), Err(1), "empty: the next token is 0.1 s away");
        // Another principal has its own bucket.
        assert_eq!(b.take(2, t0), Ok(()));
        // 0.25 s at 10/s: two tokens.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(b.take(1, t1), Ok(()));
        assert_eq!(b.take(1, t1), Ok(()));
        assert!(b.take(1, t1).is_err());
    }

    #[test]
    fn retry_after_tells_when_the_next_token_comes() {
        let t0 = Instant::now();
        // One token every 4 s.
        let mut b = Buckets::new(0.25, 1.0);
        assert_eq!(b.take(7, t0), Ok(()));
        assert_eq!(b.take(7, t0), Err(4));
        assert_eq!(b.take(7, t0 + Duration::from_millis(1500)), Err(3));
        assert_eq!(b.take(7, t0 + Duration::from_secs(4)), Ok(()));
    }

    #[test]
    fn memory_is_bounded_by_forgetting_refilled_buckets() {
        let t0 = Instant::now();
        let mut b = Buckets::new(1.0, 2.0);
        for p in 0..MAX_PRINCIPALS as u64 {
            b.take(p, t0).expect("a new principal starts full");
        }
        assert_eq!(b.len(), MAX_PRINCIPALS);
        // Two seconds later every bucket is full again: all forgotten.
        b.take(u64::MAX, t0 + Duration::from_secs(2)).expect("new");
        assert_eq!(b.len(), 1);
    }
}
