//! Binary upgrade with no refused connection: the running process starts
//! the new binary, hands it the listening sockets over the admin socket
//! (SCM_RIGHTS, as HAProxy's `-x` does), waits until it reports ready and
//! only then drains. The sockets never close, so a connection arriving
//! during the hand-over waits in the same accept queue for whichever
//! process accepts first: none is refused.
//!
//! The sequence, old process O and new process N:
//!
//! 1. `coregate upgrade` (or SIGUSR2) asks O; O starts N with O's own
//!    arguments and `COREGATE_UPGRADE_FROM=<admin socket>`.
//! 2. N connects to O's admin socket and sends `handover`; O checks the
//!    peer is the process it started (SO_PEERCRED) and sends one line per
//!    listener, `listener CONFIGURED BOUND COUNT`, with its sockets
//!    attached, and one for the metrics listener (`metrics ...`), then
//!    `end`.
//! 3. N loads its config, uses those sockets for the listeners with the
//!    same configured address, binds the rest, starts its workers, waits
//!    until each accepts, and writes `ready` on the same connection. Its
//!    admin socket waits beside O's path ([`staged_path`]).
//! 4. O moves N's admin socket onto the path, tells systemd the new main
//!    PID, answers `ok`, answers the `upgrade` client, and drains (its
//!    listeners close; N's stay open).
//!
//! Anything that fails before step 4 (N exits, does not answer within
//! [`UPGRADE_TIMEOUT`], or the connection breaks) stops N and leaves O
//! serving as before.
//!
//! Owns: the hand-over protocol on both sides and the new process's
//! start. Does not own: the admin socket (`admin`), binding and matching
//! listeners (`control`), or the drain (`control`, `engine`).

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The variable that tells a new process to take its listeners from the
/// admin socket it names.
pub const FROM_ENV: &str = "COREGATE_UPGRADE_FROM";

/// How long the new process has to report ready.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most descriptors sent in one message (the kernel's SCM_MAX_FD is
/// 253).
const FDS_PER_MESSAGE: usize = 200;

/// What a handed-over socket listens for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A `[[listener]]`.
    Listener,
    /// `server.metrics_listen`.
    Metrics,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Listener => "listener",
            Role::Metrics => "metrics",
        }
    }
}

/// One listener's sockets as handed over or passed by systemd: the
/// address it was configured with (none from systemd), the address it is
/// bound to, and its sockets (one per worker of the process that bound it,
/// all in one SO_REUSEPORT group; never none).
#[derive(Debug)]
pub struct Sockets {
    pub role: Role,
    pub configured: Option<SocketAddr>,
    pub bound: SocketAddr,
    pub fds: Vec<OwnedFd>,
}

impl Sockets {
    /// Whether these sockets serve a listener configured at `addr`: the
    /// same configured address (port 0 included), or, from systemd, the
    /// same bound one.
    pub fn serves(&self, addr: SocketAddr) -> bool {
        match self.configured {
            Some(c) => c == addr,
            None => self.bound == addr,
        }
    }
}

/// The running process's side: what it can hand over, and the upgrade in
/// progress. One per process, shared by the admin thread (the `upgrade`
/// and `handover` commands) and the control thread (SIGUSR2, drain).
pub struct Handover {
    /// The binary as it was started: after a package upgrade this path
    /// holds the new binary.
    exe: PathBuf,
    args: Vec<OsString>,
    admin: PathBuf,
    /// Our listening sockets, duplicated; `None` once draining.
    listeners: Mutex<Option<Vec<Sockets>>>,
    /// The new process being started, and where its hand-over connection
    /// is sent.
    pending: Mutex<Option<(u32, Sender<UnixStream>)>>,
    handed_over: AtomicBool,
}

/// How an upgrade ended, for the `upgrade` client and the log.
fn outcome_json(result: &anyhow::Result<u32>) -> serde_json::Value {
    match result {
        Ok(pid) => serde_json::json!({ "ok": true, "pid": pid }),
        Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
    }
}

impl Handover {
    /// `admin` is the admin socket the new process will reach us on.
    pub fn new(admin: PathBuf) -> anyhow::Result<Arc<Handover>> {
        Ok(Arc::new(Handover {
            exe: std::env::current_exe().context("the path of the running binary")?,
            args: std::env::args_os().skip(1).collect(),
            admin,
            listeners: Mutex::new(Some(Vec::new())),
            pending: Mutex::new(None),
            handed_over: AtomicBool::new(false),
        }))
    }

    /// Keep duplicates of a listener's sockets to hand over.
    pub fn keep(&self, sockets: Sockets) {
        debug_assert!(!sockets.fds.is_empty());
        if let Some(list) = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            list.push(sockets);
        }
    }

    /// The drain starts: close our duplicates, so the sockets close when
    /// the workers close theirs (unless a new process holds them).
    pub fn close_listeners(&self) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Whether a new process took over (the drain then tells systemd
    /// nothing: the new process is the service now).
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Start an upgrade to `binary` (default: the path we were started
    /// from) on its own thread. The outcome is logged, and written as one
    /// JSON line to `reply` when given (the `upgrade` client). On success
    /// this process drains: `drain` is called (it raises SIGTERM).
    pub fn begin(
        self: &Arc<Self>,
        binary: Option<PathBuf>,
        reply: Option<UnixStream>,
        drain: fn(),
    ) {
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("coregate-upgrade".into())
            .spawn(move || {
                let result = this.run(binary.unwrap_or_else(|| this.exe.clone()));
                match &result {
                    Ok(pid) => crate::info!("upgrade: process {pid} took over; draining"),
                    Err(e) => crate::warn!("upgrade refused; still serving: {e:#}"),
                }
                if let Some(mut out) = reply {
                    let _ = writeln!(out, "{}", outcome_json(&result));
                }
                if result.is_ok() {
                    drain();
                }
            });
        if let Err(e) = spawned {
            crate::warn!("upgrade: cannot start its thread: {e}");
        }
    }

    fn run(&self, binary: PathBuf) -> anyhow::Result<u32> {
        if self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            bail!("this process is draining");
        }
        let (tx, rx) = channel();
        let mut child = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.is_some() {
                bail!("another upgrade is in progress");
            }
            let child = Command::new(&binary)
                .args(&self.args)
                .env(FROM_ENV, &self.admin)
                .spawn()
                .with_context(|| format!("start {}", binary.display()))?;
            *pending = Some((child.id(), tx));
            child
        };
        crate::info!(
            "upgrade: started {} as process {}",
            binary.display(),
            child.id()
        );
        let result = self.hand_over(&mut child, &rx);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if result.is_err() {
            // Stop what is left of the new process; our sockets stay ours.
            let _ = child.kill();
            let _ = child.wait();
        }
        result
    }

    /// Steps 2 to 4 of the sequence, from the old process's side.
    fn hand_over(&self, child: &mut Child, rx: &Receiver<UnixStream>) -> anyhow::Result<u32> {
        let deadline = Instant::now() + UPGRADE_TIMEOUT;
        let pid = child.id();
        let exited = |child: &mut Child| -> anyhow::Result<()> {
            if let Some(status) = child.try_wait()? {
                bail!("the new process exited ({status}) before it was ready; its log says why");
            }
            if Instant::now() >= deadline {
                bail!(
                    "the new process was not ready within {}s",
                    UPGRADE_TIMEOUT.as_secs()
                );
            }
            Ok(())
        };
        let stream = loop {
            exited(child)?;
            if let Ok(s) = rx.recv_timeout(Duration::from_millis(50)) {
                break s;
            }
        };
        // Duplicates, so that no lock is held while sending.
        let list = {
            let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            let Some(list) = listeners.as_ref() else {
                bail!("this process started draining during the upgrade");
            };
            list.iter()
                .map(Sockets::try_clone)
                .collect::<io::Result<Vec<_>>>()?
        };
        send_listeners(&stream, &list).context("send the listening sockets")?;
        drop(list);
        // The new process starts its workers now; wait for its `ready`.
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        loop {
            exited(child)?;
            match reader.read_line(&mut line) {
                Ok(0) => bail!("the new process closed the hand-over before it was ready"),
                Ok(_) if line.ends_with('\n') => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("read the new process's answer"),
            }
        }
        if line.trim() != "ready" {
            bail!("the new process answered {:?}", line.trim());
        }
        {
            // Decided under the listeners' lock: a drain that began first
            // (SIGTERM during the upgrade) wins, and the new process goes.
            let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            if listeners.is_none() {
                bail!("this process started draining during the upgrade");
            }
            self.handed_over.store(true, Ordering::Release);
        }
        // From here on `coregate` commands reach the new process.
        let staged = staged_path(&self.admin, pid);
        if let Err(e) = std::fs::rename(&staged, &self.admin) {
            crate::warn!(
                "upgrade: cannot move the new admin socket {} to {}: {e}; it answers at the first path",
                staged.display(),
                self.admin.display()
            );
        }
        crate::systemd::notify(&format!(
            "MAINPID={pid}\nSTATUS=handed over to process {pid}; draining"
        ));
        let mut out = &stream;
        // The new process serves from here on, whether or not it reads
        // this: our answer only tells it systemd knows its PID.
        let _ = out.write_all(b"ok\n");
        Ok(pid)
    }

    /// The `handover` command: the connection of a new process we started.
    /// Refused (and closed) when no upgrade waits for one or the peer is
    /// another process.
    pub fn accept_child(&self, stream: UnixStream) {
        let peer = peer_pid(&stream);
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.as_ref() {
            Some((pid, tx)) if peer.ok() == Some(*pid) => {
                let _ = tx.send(stream);
            }
            _ => {
                let mut out = &stream;
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "ok": false,
                        "error": "handover: no upgrade is waiting for this process",
                    })
                );
            }
        }
    }
}

/// The PID at the other end of a UNIX socket.
fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we
    // own and which outlives the call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

/// Where the admin socket of process `pid`, started by an upgrade, waits
/// until the old process moves it onto `admin`.
pub fn staged_path(admin: &Path, pid: u32) -> PathBuf {
    let mut p = admin.as_os_str().to_owned();
    p.push(format!(".{pid}.new"));
    PathBuf::from(p)
}

impl Sockets {
    fn try_clone(&self) -> io::Result<Sockets> {
        Ok(Sockets {
            role: self.role,
            configured: self.configured,
            bound: self.bound,
            fds: self
                .fds
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<io::Result<_>>()?,
        })
    }
}

/// Step 2, old side: a line per listener with its sockets, then `end`.
fn send_listeners(stream: &UnixStream, list: &[Sockets]) -> io::Result<()> {
    for s in list {
        let configured = s
            .configured
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        let line = format!(
            "{} {configured} {} {}\n",
            s.role.word(),
            s.bound,
            s.fds.len()
        );
        let fds: Vec<RawFd> = s.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut chunks = fds.chunks(FDS_PER_MESSAGE);
        send_with_fds(stream, line.as_bytes(), chunks.next().unwrap_or(&[]))?;
        for more in chunks {
            send_with_fds(stream, b"\n", more)?;
        }
    }
    let mut out = stream;
    out.write_all(b"end\n")
}

/// The new process's side of a hand-over in progress.
pub struct Inherited {
    stream: UnixStream,
    /// The old process's admin socket.
    pub from: PathBuf,
    pub listeners: Vec<Sockets>,
}

/// Step 2, new side: when started by an upgrade (`COREGATE_UPGRADE_FROM`
/// is set), connect to the old process and take its listening sockets.
/// The variable is removed, so a later upgrade started by this process
/// sets its own.
pub fn inherit() -> anyhow::Result<Option<Inherited>> {
    let Some(from) = std::env::var_os(FROM_ENV) else {
        return Ok(None);
    };
    // SAFETY: called by main on the control thread before any other
    // thread of ours reads or writes the environment.
    unsafe { std::env::remove_var(FROM_ENV) };
    let path = PathBuf::from(from);
    let handover = || -> anyhow::Result<Inherited> {
        let mut stream = UnixStream::connect(&path)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"handover\n")?;
        let listeners = receive_listeners(&stream)?;
        stream.set_read_timeout(None)?;
        Ok(Inherited {
            stream,
            from: path.clone(),
            listeners,
        })
    };
    handover()
        .with_context(|| format!("upgrade: take the listeners from {}", path.display()))
        .map(Some)
}

impl Inherited {
    /// Step 3's end: tell the old process we serve, and wait for its
    /// answer (by then it has moved our admin socket onto its path and
    /// told systemd our PID). Without one we serve on all the same: the
    /// old process may have died, and these sockets are ours either way.
    pub fn ready(self) {
        let answer = || -> io::Result<String> {
            let mut out = &self.stream;
            out.write_all(b"ready\n")?;
            self.stream
                .set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut answer = String::new();
            BufReader::new(&self.stream).read_line(&mut answer)?;
            Ok(answer)
        };
        match answer() {
            Ok(a) if a.trim() == "ok" => crate::info!("upgrade: serving; the old process drains"),
            Ok(a) => crate::warn!(
                "upgrade: the old process answered {:?}; serving anyway",
                a.trim()
            ),
            Err(e) => crate::warn!("upgrade: no answer from the old process ({e}); serving anyway"),
        }
    }
}

/// Read `listener` lines and their sockets up to `end`.
fn receive_listeners(stream: &UnixStream) -> anyhow::Result<Vec<Sockets>> {
    let mut text = Vec::new();
    let mut fds: std::collections::VecDeque<OwnedFd> = Default::default();
    while !text.ends_with(b"end\n") {
        let n = recv_with_fds(stream, &mut text, &mut fds)?;
        if n == 0 {
            if text.starts_with(b"{") {
                // The old process refused: its answer is a JSON line.
                bail!("{}", String::from_utf8_lossy(&text).trim());
            }
            bail!("the connection closed before the last listener");
        }
    }
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(&text).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] | ["end"] => {}
            [role @ ("listener" | "metrics"), configured, bound, count] => {
                let bad = || anyhow::anyhow!("bad hand-over line {line:?}");
                let count: usize = count.parse().map_err(|_| bad())?;
                if count == 0 {
                    return Err(bad());
                }
                if fds.len() < count {
                    bail!("{line:?}: only {} sockets came with it", fds.len());
                }
                out.push(Sockets {
                    role: if *role == "metrics" {
                        Role::Metrics
                    } else {
                        Role::Listener
                    },
                    configured: match *configured {
                        "-" => None,
                        c => Some(c.parse().map_err(|_| bad())?),
                    },
                    bound: bound.parse().map_err(|_| bad())?,
                    fds: fds.drain(..count).collect(),
                });
            }
            _ => bail!("bad hand-over line {line:?}"),
        }
    }
    Ok(out)
}

/// Space for `n` descriptors' control message, in u64s so it is aligned
/// as `cmsghdr` needs.
fn control_buffer(n: usize) -> Vec<u64> {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) } as usize;
    vec![0u64; bytes.div_ceil(8)]
}

/// Send `data` with `fds` attached (SCM_RIGHTS).
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = control_buffer(fds.len());
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * 8;
        // SAFETY: msg_control points at `control`, large enough for one
        // header and `fds` (control_buffer); CMSG_FIRSTHDR is therefore
        // non-null and CMSG_DATA has room for every descriptor.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: msg points at `iov` (over `data`) and `control`, both alive
    // for the call; the kernel copies them before returning.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptors went with the first byte; the rest is plain data.
    let mut out = stream;
    out.write_all(&data[sent as usize..])
}

/// Receive into `text` and `fds`; the bytes read (0 at EOF).
fn recv_with_fds(
    stream: &UnixStream,
    text: &mut Vec<u8>,
    fds: &mut std::collections::VecDeque<OwnedFd>,
) -> io::Result<usize> {
    let mut data = [0u8; 4096];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = control_buffer(253);
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: msg points at `data` and `control`, both ours and alive for
    // the call; the kernel writes within their lengths.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg's control area; CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk it within msg_controllen, and each SCM_RIGHTS
    // payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push_back(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off in transit"));
    }
    text.extend_from_slice(&data[..n as usize]);
    Ok(n as usize)
}

/// Check that `fd` is a listening TCP socket; it as a `TcpListener`,
/// non-blocking (the epoll driver's accepts need it).
pub fn tcp_listener(fd: OwnedFd, what: &str) -> anyhow::Result<std::net::TcpListener> {
    if !socket2::SockRef::from(&fd).is_listener().unwrap_or(false) {
        bail!("{what} (fd {}) is not a listening socket", fd.as_raw_fd());
    }
    let listener = std::net::TcpListener::from(fd);
    let addr = listener
        .local_addr()
        .with_context(|| format!("{what}: not a TCP socket"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("{what} {addr}: set non-blocking"))?;
    Ok(listener)
}

/// Remove a file at `path` only if it is still the one we made (same
/// device and inode): after an upgrade the path holds the new process's
/// admin socket, which must outlive us.
pub fn remove_if_ours(path: &Path, ours: Option<(u64, u64)>) {
    if ours.is_some() && file_id(path) == ours {
        let _ = std::fs::remove_file(path);
    }
}

/// The device and inode of the file at `path` itself (not what a link
/// points to): which socket file is there.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_and_their_sockets_cross_a_unix_socket_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr1 = l1.local_addr().unwrap();
        let addr2 = l2.local_addr().unwrap();
        // More sockets than fit in one message.
        let many: Vec<OwnedFd> = (0..FDS_PER_MESSAGE + 3)
            .map(|_| OwnedFd::from(l2.try_clone().unwrap()))
            .collect();
        let list = vec![
            Sockets {
                role: Role::Listener,
                configured: Some("127.0.0.1:0".parse().unwrap()),
                bound: addr1,
                fds: vec![OwnedFd::from(l1.try_clone().unwrap())],
            },
            Sockets {
                role: Role::Metrics,
                configured: None,
                bound: addr2,
                fds: many,
            },
        ];
        let sender = std::thread::spawn(move || send_listeners(&a, &list).unwrap());
        let got = receive_listeners(&b).unwrap();
        sender.join().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].configured, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(got[0].bound, addr1);
        assert_eq!(got[0].fds.len(), 1);
        assert_eq!(got[1].configured, None);
        assert_eq!(got[1].role, Role::Metrics);
        assert_eq!(got[1].fds.len(), FDS_PER_MESSAGE + 3);
        // The descriptors are the same sockets: a connection to each
        // address is accepted through them.
        let first = tcp_listener(got.into_iter().next().unwrap().fds.remove(0), "test").unwrap();
        assert_eq!(first.local_addr().unwrap(), addr1);
        let _client = std::net::TcpStream::connect(addr1).unwrap();
        first.set_nonblocking(false).unwrap();
        assert!(first.accept().is_ok());
    }

    #[test]
    fn a_socket_that_does_not_listen_is_refused() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let err = tcp_listener(OwnedFd::from(s), "LISTEN_FDS #0").unwrap_err();
        assert!(err.to_string().contains("not a listening socket"), "{err}");
    }

    #[test]
    fn configured_addresses_match_before_bound_ones() {
        let fd = || OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let handed = Sockets {
            role: Role::Listener,
            configured: Some("127.0.0.1:0".parse().unwrap()),
            bound: "127.0.0.1:4321".parse().unwrap(),
            fds: vec![fd()],
        };
        assert!(handed.serves("127.0.0.1:0".parse().unwrap()));
        assert!(!handed.serves("127.0.0.1:4321".parse().unwrap()));
        let passed = Sockets {
            role: Role::Listener,
            configured: None,
            bound: "127.0.0.1:4321".parse().unwrap(),
            fds: vec![fd()],
        };
        assert!(passed.serves("127.0.0.1:4321".parse().unwrap()));
    }
}
