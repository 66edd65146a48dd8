//! coregate: an HTTP/1.1 reverse proxy with one shared-nothing worker per
//! core, each on its own io_uring (or epoll) event loop.
//!
//! # Layout
//!
//! - [`cli`]: clap definitions of the command line, nothing else.
//! - [`config`]: TOML file → validated [`config::Snapshot`]; errors carry
//!   file, line and key. `config::epoch` is where workers find the
//!   current snapshot.
//! - [`context`]: what a worker owns and its connections share: the
//!   configuration handle, pools, counters; the control messages.
//! - [`control`]: the control thread: binds listeners, starts workers,
//!   handles signals and drains.
//! - [`worker`]: one pinned thread per core, and the service its
//!   connections get (the proxy or the built-in origin).
//! - [`engine`]: a worker's event loop on the native I/O core: accepts,
//!   completions dispatched to a connection state machine, deadlines,
//!   housekeeping, control messages, drain and panic isolation.
//! - [`net`]: listeners (SO_REUSEPORT) and the per-worker buffer pool.
//! - [`http`]: HTTP/1.1 syntax: head parsing with strict framing checks,
//!   the chunked coding, head serialisation.
//! - [`proxy`]: the request's life as a state machine per connection:
//!   phases, upstream pool, full-duplex relay, retries, timeouts.
//! - [`ring`]: the per-worker io_uring core: ring setup, one enter per
//!   loop turn, the provided buffer ring, multishot accept and receive.
//! - [`origin`]: the built-in origin server used by the demo and benches.
//! - [`rules`]: compiled routes and stacking rules: matchers, the host and
//!   path-prefix index, actions, header edits, templates.
//! - [`admission`]: body caps, per-principal token buckets, inflight caps
//!   with per-tenant fair queuing, readiness, and rejection counters.
//! - [`balance`]: backend selection (p2c on inflight and EWMA latency,
//!   least-inflight, round robin, smooth WRR, Maglev hashing), passive
//!   ejection with backoff, the retry budget.
//! - [`fleet`]: fleet-wide rate limits: the thread that shares counts
//!   through Redis and gives each worker its part of the fleet's rate.
//! - [`health`]: active health checks on a thread of the control side,
//!   marking backends down and up in the published snapshot.
//! - [`admin`]: the admin UNIX socket, live reload, and its client.
//! - [`stats`]: per-worker counters and HDR histograms, their collection
//!   over the workers' control sockets, JSON, Prometheus text and the
//!   `stats`/`top` tables.
//! - [`access_log`]: JSON-lines access log, buffered per worker.
//! - [`log`]: leveled stderr logging.
//! - [`systemd`]: readiness notification and socket activation, written
//!   out (`sd_notify`, `sd_listen_fds`).
//! - [`upgrade`]: binary upgrade: the new process takes the listening
//!   sockets over the admin socket, the old one drains once it serves.

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod balance;
pub mod cli;
pub mod client;
pub mod config;
pub mod context;
pub mod control;
pub mod engine;
pub mod fleet;
pub mod health;
pub mod http;
pub mod log;
pub mod net;
pub mod origin;
pub mod proxy;
pub mod ring;
pub mod rules;
pub mod stats;
pub mod systemd;
pub mod tls;
pub mod upgrade;
pub mod worker;
