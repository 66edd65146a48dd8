//! The control thread: starts workers, owns signals, reloads on SIGHUP
//! and drains on SIGTERM/SIGINT.
//!
//! Owns: choosing cores, binding listeners before workers start (so errors
//! surface at once and port 0 resolves to one port shared by all workers),
//! the worker control channels, and the signal loop. Does not own: request
//! handling.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::admin::Reloader;
use crate::admission::fleet::Board;
use crate::config::epoch::Published;
use crate::context::{MSG_DRAIN, MSG_HANDOVER};
use crate::net::listener::bind_reuseport;
use crate::ring::DriverKind;
use crate::stats::hub::Hub;
use crate::upgrade::{self, Handover, Sockets};
use crate::worker::{self, Role, WorkerSpec};

/// How to lay workers out on the machine.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Worker count; default one per selected core.
    pub workers: Option<usize>,
    /// Cores to use, a subset of the process's allowed CPUs; default all.
    pub cores: Option<Vec<usize>>,
    pub driver: DriverKind,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            workers: None,
            cores: None,
            driver: DriverKind::Auto,
        }
    }
}

/// A running set of workers.
pub struct Server {
    handles: Vec<JoinHandle<()>>,
    controls: Vec<UnixStream>,
    addrs: Vec<SocketAddr>,
    /// A message from each worker once it accepts.
    ready: std::sync::mpsc::Receiver<()>,
    /// Each worker's exchange with the fleet thread.
    boards: Vec<Arc<Board>>,
    /// Read by every worker's `/readyz`: set during the drain grace.
    leaving: Arc<AtomicBool>,
}

/// Parse `0-3,6` into `[0, 1, 2, 3, 6]`.
pub fn parse_core_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a core number or range like 0-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("empty core list".into());
    }
    Ok(out)
}

/// The cores workers go on: the allowed set (sched_getaffinity, so taskset
/// and cgroup cpusets are respected), narrowed by `--cores`, cycled or cut
/// to `--workers`.
fn choose_cores(opts: &RunOptions) -> anyhow::Result<Vec<Option<core_affinity::CoreId>>> {
    let allowed = core_affinity::get_core_ids().unwrap_or_default();
    let mut cores: Vec<core_affinity::CoreId> = match &opts.cores {
        None => allowed.clone(),
        Some(list) => {
            let mut v = Vec::new();
            for &id in list {
                match allowed.iter().find(|c| c.id == id) {
                    Some(c) => v.push(*c),
                    None => bail!(
                        "--cores: core {id} is not in this process's CPU set ({})",
                        allowed
                            .iter()
                            .map(|c| c.id.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                }
            }
            v
        }
    };
    if cores.is_empty() {
        // No affinity information: run unpinned.
        return Ok(vec![None; opts.workers.unwrap_or(1).max(1)]);
    }
    let n = opts.workers.unwrap_or(cores.len());
    if n == 0 {
        bail!("--workers must be at least 1");
    }
    let base = cores.clone();
    while cores.len() < n {
        cores.push(base[cores.len() % base.len()]);
    }
    cores.truncate(n);
    Ok(cores.into_iter().map(Some).collect())
}

/// Listeners bound (or taken over) and the cores chosen: what is left
/// before workers start. Privileges are dropped between the two.
pub struct Bound {
    cores: Vec<Option<core_affinity::CoreId>>,
    per_worker: Vec<Vec<(std::net::TcpListener, usize)>>,
    addrs: Vec<SocketAddr>,
}

impl Bound {
    /// The bound address of each listener, in config order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Start a worker per chosen core on the bound listeners.
    pub fn spawn(
        self,
        published: Arc<Published>,
        opts: &RunOptions,
        role: Role,
        hub: Option<&Hub>,
    ) -> anyhow::Result<Server> {
        let n = self.cores.len();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let leaving = Arc::new(AtomicBool::new(false));
        let boards: Vec<Arc<Board>> = (0..n).map(|_| Arc::new(Board::default())).collect();
        let mut handles = Vec::with_capacity(n);
        let mut controls = Vec::with_capacity(n);
        for (id, (core, listeners)) in self.cores.into_iter().zip(self.per_worker).enumerate() {
            let (ours, theirs) = UnixStream::pair().context("control socketpair")?;
            if let Some(hub) = hub {
                hub.register(
                    id,
                    core.map(|c| c.id),
                    ours.try_clone().context("clone a control socket")?,
                );
            }
            let spec = WorkerSpec {
                id,
                workers: n,
                stats: hub.map(Hub::sender),
                core,
                driver: opts.driver,
                published: published.clone(),
                listeners,
                control: theirs,
                ready: ready_tx.clone(),
                fleet: boards[id].clone(),
                leaving: leaving.clone(),
                role: role.clone(),
            };
            handles.push(worker::spawn(spec).context("spawn worker thread")?);
            controls.push(ours);
        }
        Ok(Server {
            handles,
            controls,
            addrs: self.addrs,
            ready,
            boards,
            leaving,
        })
    }
}

/// Hand `sockets` (one SO_REUSEPORT group) out to `n` workers: each
/// socket to one worker, and when there are fewer sockets than workers
/// (systemd passes one) the rest share them.
fn spread(
    mut sockets: Vec<std::net::TcpListener>,
    n: usize,
) -> anyhow::Result<Vec<Vec<std::net::TcpListener>>> {
    let k = sockets.len();
    let mut out: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
    for w in k..n {
        out[w].push(
            sockets[w % k]
                .try_clone()
                .context("share a listening socket")?,
        );
    }
    for (j, s) in sockets.drain(..).enumerate() {
        out[j % n].push(s);
    }
    Ok(out)
}

impl Server {
    /// Bind every listener of the published snapshot and start the
    /// workers on it.
    pub fn start(
        published: Arc<Published>,
        opts: &RunOptions,
        role: Role,
        hub: Option<&Hub>,
    ) -> anyhow::Result<Server> {
        Server::bind(&published, opts, Vec::new(), None)?.spawn(published, opts, role, hub)
    }

    /// Bind every listener of the published snapshot, or take it from
    /// `inherited` (sockets passed by systemd or handed over by the
    /// process we upgrade) where one serves its address. Duplicates of
    /// every listener's sockets go to `handover`, for a later upgrade.
    pub fn bind(
        published: &Published,
        opts: &RunOptions,
        mut inherited: Vec<Sockets>,
        handover: Option<&Handover>,
    ) -> anyhow::Result<Bound> {
        let (_, snapshot) = published.load();
        let cores = choose_cores(opts)?;
        let n = cores.len();
        let mut per_worker: Vec<Vec<(std::net::TcpListener, usize)>> =
            (0..n).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        for (idx, l) in snapshot.listeners.iter().enumerate() {
            let sockets = match inherited.iter().position(|s| s.serves(l.addr)) {
                Some(i) => {
                    let s = inherited.remove(i);
                    let what = format!("the inherited listener for {}", l.addr);
                    let sockets = s
                        .fds
                        .into_iter()
                        .map(|fd| upgrade::tcp_listener(fd, &what))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    crate::info!(
                        "listener {}: {} inherited sockets on {}",
                        l.addr,
                        sockets.len(),
                        s.bound
                    );
                    sockets
                }
                None => bind_reuseport(l.addr, l.backlog, n)
                    .with_context(|| format!("{}: cannot listen on {}", snapshot.source, l.addr))?,
            };
            let bound = sockets[0].local_addr()?;
            addrs.push(bound);
            if let Some(h) = handover {
                let fds = sockets
                    .iter()
                    .map(|s| s.try_clone().map(OwnedFd::from))
                    .collect::<std::io::Result<Vec<_>>>()
                    .context("keep the listening sockets for an upgrade")?;
                h.keep(Sockets {
                    role: upgrade::Role::Listener,
                    configured: Some(l.addr),
                    bound,
                    fds,
                });
            }
            for (w, group) in spread(sockets, n)?.into_iter().enumerate() {
                per_worker[w].extend(group.into_iter().map(|s| (s, idx)));
            }
        }
        for s in inherited {
            crate::warn!(
                "inherited listener {} serves no [[listener]] of {}; closed",
                s.bound,
                snapshot.source
            );
        }
        Ok(Bound {
            cores,
            per_worker,
            addrs,
        })
    }

    /// Wait until every worker accepts on its listeners (`READY=1` and an
    /// upgrade's hand-over wait for this), at most `limit`.
    pub fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + limit;
        let mut ready = 0;
        while ready < self.handles.len() {
            if self.any_finished() {
                bail!("a worker exited while starting");
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                bail!("workers not accepting after {}s", limit.as_secs());
            }
            if self
                .ready
                .recv_timeout(left.min(Duration::from_millis(50)))
                .is_ok()
            {
                ready += 1;
            }
        }
        Ok(())
    }

    /// The bound address of each listener, in config order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Each worker's board, for the fleet thread (`crate::fleet`).
    pub fn boards(&self) -> Vec<Arc<Board>> {
        self.boards.clone()
    }

    /// `/readyz` answers draining from now on; requests are still served.
    fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
    }

    /// Ask every worker to drain: stop accepting, finish in-flight
    /// requests, close idle connections (after their next answer when
    /// `handed_over`: see `MSG_HANDOVER`), exit.
    pub fn drain(&mut self, handed_over: bool) {
        let msg = if handed_over { MSG_HANDOVER } else { MSG_DRAIN };
        for c in &mut self.controls {
            // A worker that already exited has closed its end; nothing to do.
            let _ = c.write_all(&[msg]);
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handles.iter().all(JoinHandle::is_finished)
    }

    pub fn any_finished(&self) -> bool {
        self.handles.iter().any(JoinHandle::is_finished)
    }

    /// Wait for every worker thread to exit.
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Raise the soft open-files limit to the hard limit, as HAProxy does on
/// its own and nginx with worker_rlimit_nofile: each proxied request holds
/// two sockets, and a soft limit of 1024 would cap a worker near 500.
/// Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, initialised rlimit struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

/// The signals the control thread handles: SIGTERM, SIGINT, SIGHUP,
/// SIGUSR2.
fn control_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block the control signals in the calling thread; threads spawned
/// afterwards inherit the mask, so only `next_signal` sees them.
pub fn block_signals() {
    let set = control_signals();
    // SAFETY: pthread_sigmask on the current thread with a valid set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait up to `timeout` for one of the blocked signals.
fn next_signal(timeout: Duration) -> Option<i32> {
    let set = control_signals();
    // SAFETY: sigtimedwait reads a valid set and timespec.
    unsafe {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let sig = libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
        (sig > 0).then_some(sig)
    }
}

/// Run until SIGTERM or SIGINT, then drain every server and wait for them.
/// SIGHUP reloads the config through `reloader` (ignored, with a warning,
/// without one); SIGUSR2 upgrades to the binary we were started from
/// through `handover` (which needs an admin socket). A second
/// SIGTERM/SIGINT while draining exits at once. Returns an error if a
/// worker dies on its own.
pub fn run_until_signal(
    mut servers: Vec<Server>,
    reloader: Option<&Reloader>,
    handover: Option<&Arc<Handover>>,
) -> anyhow::Result<()> {
    let stop = loop {
        match next_signal(Duration::from_millis(200)) {
            Some(s @ (libc::SIGTERM | libc::SIGINT)) => break s,
            Some(libc::SIGHUP) => match reloader {
                Some(r) => {
                    let _ = r.reload_and_log("SIGHUP");
                }
                None => crate::warn!("SIGHUP: nothing to reload here"),
            },
            Some(libc::SIGUSR2) => match handover {
                Some(h) => {
                    crate::info!("SIGUSR2: upgrade requested");
                    h.begin(None, None, crate::admin::request_drain);
                }
                None => crate::warn!(
                    "SIGUSR2: an upgrade needs an admin socket (server.admin_socket or --admin-socket) to hand the listeners over on"
                ),
            },
            _ => {}
        }
        stop_if_a_worker_died(&mut servers)?;
    };
    // Decided before the grace: a stop that began first wins over an
    // upgrade asked for during it.
    let handed_over = handover.is_some_and(|h| {
        h.close_listeners();
        h.handed_over()
    });
    if stop == libc::SIGTERM
        && !handed_over
        && let Some(r) = reloader
    {
        grace(&servers, r);
        stop_if_a_worker_died(&mut servers)?;
    }
    // After an upgrade a stop of the service (systemd signals the whole
    // cgroup) or the upgrade's own SIGTERM must not cut this drain short:
    // only a signal after a signalled drain exits at once.
    let escalates = !handed_over;
    if handed_over {
        crate::info!("draining after the upgrade: finishing requests in flight");
    } else {
        crate::info!("draining: no new connections; finishing requests in flight");
        crate::systemd::notify("STOPPING=1\nSTATUS=draining");
    }
    for s in &mut servers {
        s.drain(handed_over);
    }
    while !servers.iter().all(Server::is_finished) {
        if let Some(libc::SIGTERM | libc::SIGINT) = next_signal(Duration::from_millis(50)) {
            if escalates {
                crate::warn!("second signal: exiting without waiting");
                std::process::exit(1);
            }
            crate::info!("already draining after the upgrade; the drain goes on");
        }
    }
    for s in servers {
        s.join();
    }
    crate::info!("drained; exiting");
    Ok(())
}

/// A worker that exited on its own ends the process: the others drain,
/// and the error says why.
fn stop_if_a_worker_died(servers: &mut [Server]) -> anyhow::Result<()> {
    if servers.iter().any(Server::any_finished) {
        for s in servers {
            s.drain(false);
        }
        bail!("a worker exited unexpectedly");
    }
    Ok(())
}

/// SIGTERM's first step (`server.drain_grace`): `/readyz` says draining
/// at once, so a load balancer checking it takes this instance out, while
/// requests are still served; the listeners close when the grace ends.
/// Another SIGTERM or SIGINT ends the grace early; SIGHUP still reloads,
/// and SIGUSR2 is refused. SIGINT (an operator's Ctrl-C) and an upgrade
/// have no grace: nobody needs to route away; nor do the demo and the
/// built-in origin, which have no config to reload.
fn grace(servers: &[Server], reloader: &Reloader) {
    let grace = reloader.drain_grace();
    if grace.is_zero() {
        return;
    }
    for s in servers {
        s.leave();
    }
    crate::info!(
        "SIGTERM: /readyz says draining; serving {:.1}s more before the listeners close",
        grace.as_secs_f64()
    );
    crate::systemd::notify(&format!(
        "STATUS=leaving: /readyz says draining for {:.1}s",
        grace.as_secs_f64()
    ));
    let end = std::time::Instant::now() + grace;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || servers.iter().any(Server::any_finished) {
            return;
        }
        match next_signal(left.min(Duration::from_millis(200))) {
            Some(libc::SIGTERM | libc::SIGINT) => {
                crate::info!("second signal: the drain starts now");
                return;
            }
            Some(libc::SIGHUP) => {
                let _ = reloader.reload_and_log("SIGHUP");
            }
            Some(libc::SIGUSR2) => crate::warn!("SIGUSR2: no upgrade while stopping"),
            _ => {}
        }
    }
}

/// Run as `user` from here on (`server.user`, `--user`): its groups, its
/// group, then its uid, as nginx's workers do. Called after the listeners,
/// the admin socket and the logs are open and before any worker starts.
/// Running as that user already is fine (systemd's `User=`, an upgraded
/// process); otherwise anything but a complete switch is an error, and
/// the caller refuses to run on.
pub fn drop_privileges(user: &str) -> anyhow::Result<()> {
    let who = crate::config::lookup_user(user)?;
    // SAFETY: getuid/geteuid only read our credentials.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if uid == who.uid && euid == who.uid {
        return Ok(());
    }
    if euid != 0 {
        bail!(
            "user {user:?}: running as uid {euid}, which cannot switch to uid {} (start as root, or as {user})",
            who.uid
        );
    }
    let name = std::ffi::CString::new(user).context("user name")?;
    // SAFETY: initgroups reads a NUL-terminated name; setgid and setuid
    // change this process's credentials (glibc applies them to every
    // thread). No memory is shared with the kernel beyond the calls.
    unsafe {
        if libc::initgroups(name.as_ptr(), who.gid) != 0 {
            bail!(
                "user {user:?}: initgroups: {}",
                std::io::Error::last_os_error()
            );
        }
        if libc::setgid(who.gid) != 0 {
            bail!(
                "user {user:?}: setgid({}): {}",
                who.gid,
                std::io::Error::last_os_error()
            );
        }
        if libc::setuid(who.uid) != 0 {
            bail!(
                "user {user:?}: setuid({}): {}",
                who.uid,
                std::io::Error::last_os_error()
            );
        }
        if libc::getgid() != who.gid || libc::getegid() != who.gid {
            bail!("user {user:?}: the group is not {} after setgid", who.gid);
        }
        if who.uid != 0 && (libc::setuid(0) == 0 || libc::geteuid() != who.uid) {
            bail!("user {user:?}: root privileges could be regained after setuid");
        }
    }
    crate::info!("running as user {user} (uid {}, gid {})", who.uid, who.gid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists() {
        assert_eq!(parse_core_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_core_list("1").unwrap(), vec![1]);
        assert!(parse_core_list("3-1").is_err());
        assert!(parse_core_list("x").is_err());
        assert!(parse_core_list("").is_err());
    }

    #[test]
    fn fewer_sockets_than_workers_are_shared_and_more_are_dealt_out() {
        let bind = |n| bind_reuseport("127.0.0.1:0".parse().unwrap(), 16, n).unwrap();
        let one = spread(bind(1), 3).unwrap();
        assert_eq!(one.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        let addr = one[0][0].local_addr().unwrap();
        assert!(one.iter().all(|w| w[0].local_addr().unwrap() == addr));
        let five = spread(bind(5), 2).unwrap();
        assert_eq!(five.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
    }
}
