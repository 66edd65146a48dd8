//! Fleet-wide rate limits (`scope = "fleet"`): one sync thread per
//! process, beside the workers, never on a request's path.
//!
//! Every `sync_interval` the thread takes each worker's count of requests
//! offered per principal (`admission::fleet::Board`), adds this instance's
//! total into Redis (`INCRBY` on a key per principal and time slot, with
//! an expiry) and reads the fleet's totals for the two slots before. A
//! worker's rate for a principal is then the fleet's rate times the share
//! of the fleet's demand that came to that worker: instances that see
//! more of a principal's traffic get more of its rate, and together they
//! admit the fleet's rate whether the load is spread evenly or all comes
//! to one instance. Shares go back to each worker's board; a worker reads
//! them with one atomic load per request.
//!
//! Redis slow, down or restarted: the sync fails within one interval, the
//! workers fall back to `on_unreachable` (each instance `rate /
//! instances`, or no limit), the switch is logged once and counted, and
//! every interval tries again; the first good sync restores the shares.
//!
//! Owns: the Redis keys, the share computation, the thread. Does not own:
//! the buckets (`admission`) or the config (`config::Fleet`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::admission::fleet::{Board, FleetKey, Mode, Shares};
use crate::config::epoch::Published;
use crate::config::{Fleet, Snapshot, Unreachable};
use crate::stats::hub::{FleetState, FleetStatus};

/// The slots read back are `slot - LAG - 1` and `slot - LAG`, not the one
/// just ended: an instance that synced at its very end may not have had
/// its count reach Redis yet, and a short total would give every instance
/// a larger part of the rate. It costs one interval of reaction.
const LAG: u64 = 2;

/// Slots of history kept per principal: the two read back, the ones
/// between, and the one being filled.
const SLOTS_KEPT: u64 = LAG + 2;

/// Principals followed per instance. Past this, a new principal is not
/// counted and gets the local share: a client sending a new key with each
/// request cannot grow the sync's work (and its time, which a slow sync
/// would turn into a fallback) without bound.
pub const MAX_TRACKED: usize = 1024;

/// How often the thread looks for a `[fleet]` when the config has none.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Start the sync thread for `boards` (one per worker).
pub fn spawn(
    published: Arc<Published>,
    boards: Vec<Arc<Board>>,
    status: Arc<FleetStatus>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("coregate-fleet".into())
        .spawn(move || Sync::new(boards, status).run(&published))
        .map(|_| ())
}

/// One principal's demand at this instance, per slot.
#[derive(Default)]
struct History {
    /// Oldest first.
    slots: VecDeque<Slot>,
}

struct Slot {
    slot: u64,
    /// Requests offered per worker.
    per_worker: Vec<u64>,
    /// How many of them are in Redis already (a slot may see two syncs).
    sent: u64,
}

struct Sync {
    boards: Vec<Arc<Board>>,
    status: Arc<FleetStatus>,
    /// The connection and the URL it was opened for.
    conn: Option<(String, redis::Connection)>,
    history: HashMap<FleetKey, History>,
    /// The last mode published, to log and count switches once.
    mode: Option<Mode>,
    /// The interval slots were numbered by: history kept under another
    /// one means nothing.
    interval_ms: u64,
}

impl Sync {
    fn new(boards: Vec<Arc<Board>>, status: Arc<FleetStatus>) -> Sync {
        Sync {
            boards,
            status,
            conn: None,
            history: HashMap::new(),
            mode: None,
            interval_ms: 0,
        }
    }

    fn run(mut self, published: &Published) {
        let mut next = Instant::now();
        loop {
            let (_, snapshot) = published.load();
            let Some(fleet) = snapshot.fleet.clone() else {
                if self.mode.is_some() {
                    // Off by a reload: no stale shares for when a later
                    // reload turns it on again.
                    self.publish(Mode::LocalShare, Vec::new());
                }
                self.status.set(FleetState::Off);
                self.conn = None;
                self.mode = None;
                std::thread::sleep(IDLE_CHECK);
                next = Instant::now();
                continue;
            };
            next += fleet.sync_interval;
            let now = Instant::now();
            match next.checked_duration_since(now) {
                Some(wait) => std::thread::sleep(wait),
                // Behind (a slow Redis): start the schedule again.
                None => next = now,
            }
            self.round(&snapshot, &fleet);
        }
    }

    /// One sync: collect, add, read back, publish.
    fn round(&mut self, snapshot: &Snapshot, fleet: &Fleet) {
        let demand: Vec<HashMap<FleetKey, u64>> =
            self.boards.iter().map(|b| b.take_demand()).collect();
        let interval_ms = fleet.sync_interval.as_millis().max(1) as u64;
        if interval_ms != self.interval_ms {
            self.history.clear();
            self.interval_ms = interval_ms;
        }
        let slot = unix_ms() / interval_ms;
        self.record(&demand, slot);
        match self.exchange(fleet, slot, interval_ms) {
            Ok(totals) => {
                self.status.syncs.fetch_add(1, Ordering::Relaxed);
                let rates = self.shares(snapshot, slot, &totals);
                self.publish(Mode::Synced, rates);
            }
            Err(e) => {
                self.conn = None;
                let mode = match fleet.on_unreachable {
                    Unreachable::LocalShare => Mode::LocalShare,
                    Unreachable::FailOpen => Mode::FailOpen,
                };
                if self.mode != Some(mode) {
                    self.status.fallbacks.fetch_add(1, Ordering::Relaxed);
                    crate::warn!(
                        "fleet: Redis {} unreachable ({e}); fleet limits fall back to {} until it answers",
                        redacted(&fleet.redis),
                        match mode {
                            Mode::FailOpen => "no limit (fail_open)",
                            _ => "rate / instances (local_share)",
                        }
                    );
                }
                let rates = match mode {
                    Mode::LocalShare => self.local_shares(snapshot, slot, fleet.instances),
                    _ => Vec::new(),
                };
                self.publish(mode, rates);
            }
        }
    }

    /// Without Redis: this instance's part of each rate (`rate /
    /// instances`), split over the workers by their recent demand.
    fn local_shares(
        &self,
        snapshot: &Snapshot,
        slot: u64,
        instances: usize,
    ) -> Vec<HashMap<FleetKey, f64>> {
        let mut out = vec![HashMap::new(); self.boards.len()];
        for (&key, h) in &self.history {
            let Some(rate) = snapshot.policies.get(key.0).and_then(|p| p.rate.as_ref()) else {
                continue;
            };
            let mut per_worker = vec![0u64; self.boards.len()];
            for s in h.slots.iter().filter(|s| s.slot + LAG >= slot) {
                for (w, n) in s.per_worker.iter().enumerate() {
                    per_worker[w] += n;
                }
            }
            let total: u64 = per_worker.iter().sum();
            for (w, &n) in per_worker.iter().enumerate() {
                if n > 0 {
                    let part = rate.per_second / instances.max(1) as f64;
                    out[w].insert(key, part * n as f64 / total as f64);
                }
            }
        }
        out
    }

    /// Add this round's demand to the history, per principal and slot.
    fn record(&mut self, demand: &[HashMap<FleetKey, u64>], slot: u64) {
        let workers = self.boards.len();
        for (w, counts) in demand.iter().enumerate() {
            for (&key, &n) in counts {
                if self.history.len() >= MAX_TRACKED && !self.history.contains_key(&key) {
                    continue;
                }
                let h = self.history.entry(key).or_default();
                if h.slots.back().is_none_or(|s| s.slot != slot) {
                    h.slots.push_back(Slot {
                        slot,
                        per_worker: vec![0; workers],
                        sent: 0,
                    });
                }
                if let Some(s) = h.slots.back_mut() {
                    s.per_worker[w] += n;
                }
            }
        }
        // By both ends: a clock stepped back leaves slots "ahead".
        self.history.retain(|_, h| {
            h.slots
                .retain(|s| s.slot <= slot && s.slot + SLOTS_KEPT > slot);
            !h.slots.is_empty()
        });
    }

    /// Add this slot's demand into Redis and read the fleet's counts of
    /// the slots `slot - LAG` and `slot - LAG - 1`, for every principal
    /// with history.
    fn exchange(
        &mut self,
        fleet: &Fleet,
        slot: u64,
        interval_ms: u64,
    ) -> redis::RedisResult<HashMap<FleetKey, [u64; 2]>> {
        let timeout = fleet.sync_interval.max(Duration::from_millis(50));
        let conn = match self.conn.take() {
            Some(open) if open.0 == fleet.redis => &mut self.conn.insert(open).1,
            _ => {
                let client = redis::Client::open(fleet.redis.as_str())?;
                let conn = client.get_connection_with_timeout(timeout)?;
                conn.set_read_timeout(Some(timeout))?;
                conn.set_write_timeout(Some(timeout))?;
                if self.mode.is_some_and(|m| m != Mode::Synced) {
                    crate::info!(
                        "fleet: Redis {} answers again; fleet limits are shared",
                        redacted(&fleet.redis)
                    );
                }
                &mut self.conn.insert((fleet.redis.clone(), conn)).1
            }
        };
        let keys: Vec<FleetKey> = self.history.keys().copied().collect();
        if keys.is_empty() {
            // Nothing to count: still ask, so that the state reported is
            // Redis's as of now.
            redis::cmd("PING").query::<()>(conn)?;
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        let mut sending = Vec::new();
        for key in &keys {
            let added: u64 = self.history[key]
                .slots
                .back()
                .filter(|s| s.slot == slot)
                .map_or(0, |s| s.per_worker.iter().sum::<u64>() - s.sent);
            if added > 0 {
                sending.push((*key, added));
                pipe.cmd("INCRBY")
                    .arg(redis_key(*key, slot))
                    .arg(added)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(redis_key(*key, slot))
                    .arg(interval_ms * (SLOTS_KEPT + 2))
                    .ignore();
            }
            pipe.cmd("MGET")
                .arg(redis_key(*key, slot.wrapping_sub(LAG)))
                .arg(redis_key(*key, slot.wrapping_sub(LAG + 1)));
        }
        let read: Vec<Vec<Option<u64>>> = pipe.query(conn)?;
        for (key, added) in sending {
            if let Some(s) = self.history.get_mut(&key).and_then(|h| h.slots.back_mut()) {
                s.sent += added;
            }
        }
        Ok(keys
            .into_iter()
            .zip(read)
            .map(|(key, counts)| {
                let at = |i: usize| counts.get(i).copied().flatten().unwrap_or(0);
                (key, [at(0), at(1)])
            })
            .collect())
    }

    /// Each worker's rate per principal: the fleet's rate times the
    /// worker's part of the fleet's demand over the two slots read.
    fn shares(
        &self,
        snapshot: &Snapshot,
        slot: u64,
        counts: &HashMap<FleetKey, [u64; 2]>,
    ) -> Vec<HashMap<FleetKey, f64>> {
        let mut out = vec![HashMap::new(); self.boards.len()];
        for (&key, read) in counts {
            let Some(rate) = snapshot.policies.get(key.0).and_then(|p| p.rate.as_ref()) else {
                continue;
            };
            let Some(h) = self.history.get(&key) else {
                continue;
            };
            let mut fleet_total = 0;
            for (i, &in_fleet) in read.iter().enumerate() {
                let target = slot.wrapping_sub(LAG + i as u64);
                let Some(s) = h.slots.iter().find(|s| s.slot == target) else {
                    fleet_total += in_fleet;
                    continue;
                };
                // Redis holds at least what we sent, unless it lost it (a
                // restart, an eviction): never count the fleet as smaller
                // than ourselves.
                fleet_total += in_fleet.max(s.sent);
                // Only what Redis has of ours (counts taken while it was
                // unreachable never reached it).
                let total: u64 = s.per_worker.iter().sum();
                let in_redis = s.sent as f64 / total.max(1) as f64;
                for (w, &n) in s.per_worker.iter().enumerate() {
                    *out[w].entry(key).or_insert(0.0) += n as f64 * in_redis;
                }
            }
            if fleet_total == 0 {
                for worker in &mut out {
                    worker.remove(&key);
                }
                continue;
            }
            for worker in &mut out {
                if let Some(own) = worker.get_mut(&key) {
                    if *own == 0.0 {
                        // No demand here lately: the local share, until
                        // there is.
                        worker.remove(&key);
                    } else {
                        *own = (rate.per_second * *own / fleet_total as f64).min(rate.per_second);
                    }
                }
            }
        }
        out
    }

    fn publish(&mut self, mode: Mode, rates: Vec<HashMap<FleetKey, f64>>) {
        let mut rates = rates.into_iter();
        for board in &self.boards {
            board.publish(Shares {
                mode,
                rates: rates.next().unwrap_or_default(),
            });
        }
        self.status.set(match mode {
            Mode::Synced => FleetState::Synced,
            Mode::LocalShare => FleetState::LocalShare,
            Mode::FailOpen => FleetState::FailOpen,
        });
        self.mode = Some(mode);
    }
}

/// The Redis key of a principal's count in a slot. The policy is named by
/// its position in the config, so instances running the same config
/// share it.
fn redis_key((policy, principal): FleetKey, slot: u64) -> String {
    format!("coregate:fleet:{policy}:{principal:016x}:{slot}")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The URL for a log line, without its password.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        crate::config::parse(
            "[fleet]\nredis = \"redis://127.0.0.1:1/0\"\ninstances = 3\n\
             [[listener]]\nlisten = \"127.0.0.1:1\"\n\
             [listener.limits]\nrate = \"300/s\"\nprincipal = \"all\"\nscope = \"fleet\"\n",
            "t",
        )
        .expect("config")
    }

    fn sync(workers: usize) -> Sync {
        let boards = (0..workers).map(|_| Arc::new(Board::default())).collect();
        Sync::new(boards, Arc::new(FleetStatus::default()))
    }

    /// This instance's demand per worker in `slot`, all of it sent.
    fn sent(sync: &mut Sync, slot: u64, per_worker: &[u64]) {
        let demand: Vec<HashMap<FleetKey, u64>> = per_worker
            .iter()
            .map(|&n| HashMap::from([((0, 0), n)]))
            .collect();
        sync.record(&demand, slot);
        let s = sync
            .history
            .get_mut(&(0, 0))
            .unwrap()
            .slots
            .back_mut()
            .unwrap();
        s.sent = per_worker.iter().sum();
    }

    #[test]
    fn each_worker_gets_the_rate_in_proportion_to_its_part_of_the_fleets_demand() {
        let snap = snapshot();
        let mut sync = sync(2);
        // Slots 8 and 9 are read back at slot 11 (LAG 2): this instance had
        // 150 + 150 of the fleet's 900 in each (its workers 100 and 50).
        sent(&mut sync, 8, &[100, 50]);
        sent(&mut sync, 9, &[100, 50]);
        let counts = HashMap::from([((0, 0), [900, 900])]);
        let rates = sync.shares(&snap, 11, &counts);
        assert!((rates[0][&(0, 0)] - 300.0 * 200.0 / 1800.0).abs() < 1e-9);
        assert!((rates[1][&(0, 0)] - 300.0 * 100.0 / 1800.0).abs() < 1e-9);

        // Redis lost our counts (a restart): the fleet is never smaller
        // than this instance, so its rate stays within the fleet's.
        let lost = HashMap::from([((0, 0), [0, 0])]);
        let rates = sync.shares(&snap, 11, &lost);
        let total: f64 = rates.iter().map(|r| r[&(0, 0)]).sum();
        assert!((total - 300.0).abs() < 1e-9, "{total}");

        // A worker without demand gets no rate of its own (the local share).
        let mut sync = self::sync(2);
        sent(&mut sync, 8, &[100, 0]);
        sent(&mut sync, 9, &[100, 0]);
        let rates = sync.shares(&snap, 11, &counts);
        assert!(rates[1].is_empty());
    }

    #[test]
    fn history_outside_the_window_goes_whichever_way_the_clock_moved() {
        let mut sync = sync(1);
        sent(&mut sync, 100, &[5]);
        // The clock stepped back: slot 100 is "ahead" and must go.
        sent(&mut sync, 50, &[5]);
        let slots: Vec<u64> = sync.history[&(0, 0)].slots.iter().map(|s| s.slot).collect();
        assert_eq!(slots, [50]);
        sync.record(&[HashMap::new()], 50 + SLOTS_KEPT);
        assert!(sync.history.is_empty());
    }

    #[test]
    fn passwords_stay_out_of_the_log() {
        assert_eq!(
            redacted("redis://:secret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(
            redacted("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }

    #[test]
    fn keys_name_the_policy_the_principal_and_the_slot() {
        assert_eq!(
            redis_key((2, 0xabc), 17),
            "coregate:fleet:2:0000000000000abc:17"
        );
    }
}
