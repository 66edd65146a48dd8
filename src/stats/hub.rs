//! Collecting reports from the workers without ever waiting on one.
//!
//! The admin side writes one byte (`MSG_STATS`) to each worker's control
//! socket, without blocking (a full socket means that worker has not read
//! its earlier requests: it is stuck either way), and gathers the answers
//! from one channel until every worker has answered or the timeout
//! passes. A worker's event loop answers when its control socket's
//! receive completes, by a non-blocking channel send, so the exchange never stops a worker, and a worker that
//! does not answer shows as `stuck` in the reply instead of hanging it.
//!
//! Owns: the worker registry and the collection round. Does not own: what
//! a report holds (`stats`) or who asks (`admin`).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Report;

/// Control message asking a worker for its report.
pub const MSG_STATS: u8 = b'S';

struct Link {
    worker: usize,
    core: Option<usize>,
    control: UnixStream,
}

/// Where fleet-scoped limits stand with Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FleetState {
    /// No `[fleet]` in the config.
    Off = 0,
    Synced = 1,
    /// Redis unreachable: each instance enforces `rate / instances`.
    LocalShare = 2,
    /// Redis unreachable: no limit.
    FailOpen = 3,
}

impl FleetState {
    pub fn name(self) -> &'static str {
        match self {
            FleetState::Off => "off",
            FleetState::Synced => "synced",
            FleetState::LocalShare => "local_share",
            FleetState::FailOpen => "fail_open",
        }
    }
}

/// The fleet sync thread's figures.
#[derive(Debug, Default)]
pub struct FleetStatus {
    state: std::sync::atomic::AtomicU8,
    /// Switches to the fallback (Redis became unreachable).
    pub fallbacks: std::sync::atomic::AtomicU64,
    /// Syncs that reached Redis.
    pub syncs: std::sync::atomic::AtomicU64,
}

impl FleetStatus {
    pub fn set(&self, state: FleetState) {
        self.state
            .store(state as u8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn state(&self) -> FleetState {
        match self.state.load(std::sync::atomic::Ordering::Relaxed) {
            1 => FleetState::Synced,
            2 => FleetState::LocalShare,
            3 => FleetState::FailOpen,
            _ => FleetState::Off,
        }
    }

    /// For `coregate stats --json` and the admin socket's `stats`.
    pub fn to_json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "state": self.state().name(),
            "fallbacks": self.fallbacks.load(Relaxed),
            "syncs": self.syncs.load(Relaxed),
        })
    }

    /// Prometheus text: the state as a gauge per state, and the counts.
    pub fn prometheus(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.state();
        let mut out = String::from(
            "# HELP coregate_fleet_state Where fleet-scoped rate limits stand with Redis (1 for the current state).\n# TYPE coregate_fleet_state gauge\n",
        );
        for s in [
            FleetState::Off,
            FleetState::Synced,
            FleetState::LocalShare,
            FleetState::FailOpen,
        ] {
            out.push_str(&format!(
                "coregate_fleet_state{{state=\"{}\"}} {}\n",
                s.name(),
                u8::from(s == now)
            ));
        }
        out.push_str(&format!(
            "# HELP coregate_fleet_fallbacks_total Times Redis became unreachable and fleet limits fell back.\n# TYPE coregate_fleet_fallbacks_total counter\ncoregate_fleet_fallbacks_total {}\n\
             # HELP coregate_fleet_syncs_total Syncs with Redis that succeeded.\n# TYPE coregate_fleet_syncs_total counter\ncoregate_fleet_syncs_total {}\n",
            self.fallbacks.load(Relaxed),
            self.syncs.load(Relaxed)
        ));
        out
    }
}

/// The workers' addresses and the channel their reports come back on.
pub struct Hub {
    /// The fleet sync thread's state (`crate::fleet`), reported beside the
    /// workers' figures.
    pub fleet: Arc<FleetStatus>,
    links: Mutex<Vec<Link>>,
    /// Held for a whole round, so rounds from two admin clients do not
    /// take each other's answers.
    answers: Mutex<Receiver<Report>>,
    sender: Sender<Report>,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        let (sender, answers) = channel();
        Arc::new(Hub {
            fleet: Arc::new(FleetStatus::default()),
            links: Mutex::new(Vec::new()),
            answers: Mutex::new(answers),
            sender,
        })
    }

    /// Where a worker sends its reports.
    pub fn sender(&self) -> Sender<Report> {
        self.sender.clone()
    }

    /// A worker started; `control` is (a clone of) our end of its
    /// control socket.
    pub fn register(&self, worker: usize, core: Option<usize>, control: UnixStream) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.push(Link {
            worker,
            core,
            control,
        });
        links.sort_by_key(|l| l.worker);
    }

    /// Every registered worker's report, in worker order; `stuck` for a
    /// worker that did not answer within `timeout`.
    pub fn collect(&self, timeout: Duration) -> Vec<Report> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        // Late answers to an earlier round are stale now.
        while answers.try_recv().is_ok() {}
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let mut reports: Vec<Option<Report>> = links.iter().map(|_| None).collect();
        let mut waiting = 0;
        for l in links.iter() {
            if ask(&l.control) {
                waiting += 1;
            }
        }
        let deadline = Instant::now() + timeout;
        while waiting > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match answers.recv_timeout(left) {
                Ok(r) => {
                    if let Some(i) = links.iter().position(|l| Some(l.worker) == r.worker)
                        && reports[i].is_none()
                    {
                        reports[i] = Some(r);
                        waiting -= 1;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        links
            .iter()
            .zip(reports)
            .map(|(l, r)| r.unwrap_or_else(|| Report::stuck(l.worker, l.core)))
            .collect()
    }
}

/// Ask one worker, without blocking: false if its socket would not take
/// the byte (closed, or full because the worker stopped reading).
fn ask(control: &UnixStream) -> bool {
    let byte = [MSG_STATS];
    // SAFETY: send(2) on a socket we own, from a one-byte buffer.
    let n = unsafe {
        libc::send(
            control.as_raw_fd(),
            byte.as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// One worker answers, one never reads its socket: the round ends at
    /// the timeout with the second reported stuck.
    #[test]
    fn a_silent_worker_is_reported_stuck() {
        let hub = Hub::new();
        let (ours0, mut theirs0) = UnixStream::pair().unwrap();
        let (ours1, _theirs1) = UnixStream::pair().unwrap();
        hub.register(0, Some(3), ours0);
        hub.register(1, Some(4), ours1);
        let tx = hub.sender();
        let answering = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            theirs0.read_exact(&mut b).unwrap();
            assert_eq!(b[0], MSG_STATS);
            tx.send(Report {
                worker: Some(0),
                state: "ok".into(),
                ..Report::default()
            })
            .unwrap();
        });
        let started = Instant::now();
        let reports = hub.collect(Duration::from_millis(200));
        answering.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(reports.len(), 2);
        assert_eq!(
            (reports[0].worker, reports[0].state.as_str()),
            (Some(0), "ok")
        );
        assert_eq!(
            (
                reports[1].worker,
                reports[1].core,
                reports[1].state.as_str()
            ),
            (Some(1), Some(4), "stuck")
        );
    }
}
