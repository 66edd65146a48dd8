//! The deadlines of one request, as ticks of the worker's timing wheel
//! (`ring::wheel`): one small array per exchange instead of a timer object
//! per wait. The connection's wheel entry is filed at the earliest of
//! them; when it comes due the proxy asks which one passed.

/// What a deadline bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// The request head must be complete (`header_timeout`).
    Head,
    /// The request must be read whole (`request_timeout`), head and body.
    Request,
    /// A place in an admission queue (the policy's queue timeout).
    Queue,
    /// Silence from the client mid-body (`body_timeout`).
    BodyIdle,
    /// The upstream connect (`connect_timeout`).
    Connect,
    /// A send to the upstream in flight (`response_timeout`).
    UpWrite,
    /// The response head, once the request is sent (`response_timeout`).
    Response,
    /// Silence from the upstream mid-body (`read_timeout`).
    UpRead,
    /// A send to the client in flight (`send_timeout`).
    DownSend,
    /// Reading what a refused client still sends, before closing.
    Linger,
    /// A tunnel with no bytes either way (`tunnel_idle_timeout`).
    TunnelIdle,
}

const COUNT: usize = Timer::TunnelIdle as usize + 1;

/// Ticks at which each [`Timer`] fires; `OFF` for one not running.
#[derive(Clone, Copy, Debug)]
pub struct Timers([u64; COUNT]);

const OFF: u64 = u64::MAX;

impl Default for Timers {
    fn default() -> Self {
        Timers([OFF; COUNT])
    }
}

impl Timers {
    pub fn set(&mut self, t: Timer, tick: u64) {
        self.0[t as usize] = tick;
    }

    pub fn clear(&mut self, t: Timer) {
        self.0[t as usize] = OFF;
    }

    pub fn get(&self, t: Timer) -> Option<u64> {
        let v = self.0[t as usize];
        (v != OFF).then_some(v)
    }

    pub fn is_set(&self, t: Timer) -> bool {
        self.0[t as usize] != OFF
    }

    /// The earliest running deadline, if any.
    pub fn next(&self) -> Option<u64> {
        // `OFF` is the largest tick: the plain minimum, without a branch
        // per timer (it runs after every completion).
        let earliest = self.0.iter().fold(OFF, |m, &v| m.min(v));
        (earliest != OFF).then_some(earliest)
    }

    /// A deadline due at `tick`, earliest first.
    pub fn expired(&self, tick: u64) -> Option<Timer> {
        const ALL: [Timer; COUNT] = [
            Timer::Head,
            Timer::Request,
            Timer::Queue,
            Timer::BodyIdle,
            Timer::Connect,
            Timer::UpWrite,
            Timer::Response,
            Timer::UpRead,
            Timer::DownSend,
            Timer::Linger,
            Timer::TunnelIdle,
        ];
        ALL.iter()
            .copied()
            .filter(|&t| self.0[t as usize] <= tick)
            .min_by_key(|&t| self.0[t as usize])
    }

    pub fn clear_all(&mut self) {
        self.0 = [OFF; COUNT];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_passed_deadline_is_named() {
        let mut t = Timers::default();
        assert_eq!(t.next(), None);
        assert_eq!(t.expired(u64::MAX - 1), None);
        t.set(Timer::Request, 50);
        t.set(Timer::Head, 30);
        t.set(Timer::DownSend, 10);
        assert_eq!(t.next(), Some(10));
        assert_eq!(t.expired(9), None);
        assert_eq!(t.expired(40), Some(Timer::DownSend));
        t.clear(Timer::DownSend);
        assert_eq!(t.expired(40), Some(Timer::Head));
        assert_eq!(t.get(Timer::Request), Some(50));
        t.clear_all();
        assert!(!t.is_set(Timer::Request));
    }
}
