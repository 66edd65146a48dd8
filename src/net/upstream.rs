//! Upstream connections: TCP or UNIX-socket streams to backends, connect
//! with a timeout, and the per-worker keep-alive pool.
//!
//! Owns: establishing and reusing backend connections. Does not own:
//! choosing the backend (`proxy`, later `balance`) or speaking HTTP.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use monoio::BufResult;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::{TcpStream, UnixStream};

use crate::config::{BackendAddr, Snapshot};

/// A connection to a backend.
pub enum UpStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl UpStream {
    fn raw_fd(&self) -> i32 {
        match self {
            UpStream::Tcp(s) => s.as_raw_fd(),
            UpStream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// True when the backend has closed (or sent unsolicited bytes on) an
    /// idle connection. One non-blocking `recv(MSG_PEEK)`: used before
    /// sending a request that cannot be retried (a body, or a
    /// non-idempotent method), where a silent close would lose it.
    pub fn is_stale(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv into a valid one-byte buffer on a socket fd we own;
        // MSG_PEEK leaves the data in place, MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                self.raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return err.kind() != io::ErrorKind::WouldBlock;
        }
        true
    }
}

impl AsyncReadRent for UpStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Tcp(s) => s.read(buf).await,
            UpStream::Unix(s) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Tcp(s) => s.readv(buf).await,
            UpStream::Unix(s) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for UpStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Tcp(s) => s.write(buf).await,
            UpStream::Unix(s) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Tcp(s) => s.writev(buf).await,
            UpStream::Unix(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            UpStream::Tcp(s) => s.flush().await,
            UpStream::Unix(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            UpStream::Tcp(s) => s.shutdown().await,
            UpStream::Unix(s) => s.shutdown().await,
        }
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
}

/// Open a new connection to `addr` within `timeout`.
pub async fn connect(addr: &BackendAddr, timeout: Duration) -> Result<UpStream, ConnectError> {
    let fut = async {
        match addr {
            BackendAddr::Tcp(a) => {
                let s = TcpStream::connect_addr(*a).await?;
                s.set_nodelay(true)?;
                Ok::<_, io::Error>(UpStream::Tcp(s))
            }
            BackendAddr::Unix(p) => Ok(UpStream::Unix(UnixStream::connect(p).await?)),
        }
    };
    match monoio::time::timeout(timeout, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnectError::Timeout),
    }
}

struct Idle {
    stream: UpStream,
    since: Instant,
}

/// Idle keep-alive connections of one worker, per backend. LIFO: the most
/// recently used connection is the warmest and the least likely to have
/// been closed by the backend's own idle timer.
pub struct UpstreamPool {
    /// `idle[group][backend]`
    idle: RefCell<Vec<Vec<Vec<Idle>>>>,
}

impl UpstreamPool {
    pub fn new(snapshot: &Snapshot) -> Self {
        let idle = snapshot
            .upstreams
            .iter()
            .map(|g| g.backends.iter().map(|_| Vec::new()).collect())
            .collect();
        UpstreamPool {
            idle: RefCell::new(idle),
        }
    }

    /// A pooled connection younger than `max_age`, if any. Older ones are
    /// closed on the way.
    pub fn take(&self, group: usize, backend: usize, max_age: Duration) -> Option<UpStream> {
        let mut idle = self.idle.borrow_mut();
        let list = &mut idle[group][backend];
        while let Some(c) = list.pop() {
            if c.since.elapsed() < max_age {
                return Some(c.stream);
            }
        }
        None
    }

    pub fn put(&self, group: usize, backend: usize, stream: UpStream, max_idle: usize) {
        let mut idle = self.idle.borrow_mut();
        let list = &mut idle[group][backend];
        if list.len() < max_idle {
            list.push(Idle {
                stream,
                since: Instant::now(),
            });
        }
    }

    /// Close idle connections older than their group's keepalive timeout,
    /// so a backend's closed sockets do not sit in CLOSE_WAIT until the
    /// next request to that backend.
    pub fn purge_expired(&self, snapshot: &Snapshot) {
        let mut idle = self.idle.borrow_mut();
        for (lists, group) in idle.iter_mut().zip(&snapshot.upstreams) {
            for list in lists {
                list.retain(|c| c.since.elapsed() < group.keepalive_timeout);
            }
        }
    }

    /// Re-key the pool for a new snapshot: idle connections to a backend
    /// with the same group name and address stay pooled; the rest close.
    pub fn remap(&self, old: &Snapshot, new: &Snapshot) {
        let mut idle = self.idle.borrow_mut();
        let mut fresh: Vec<Vec<Vec<Idle>>> = new
            .upstreams
            .iter()
            .map(|g| g.backends.iter().map(|_| Vec::new()).collect())
            .collect();
        for (g, lists) in old.upstreams.iter().zip(idle.iter_mut()) {
            let Some(ng) = new.upstreams.iter().position(|n| n.name == g.name) else {
                continue;
            };
            for (b, list) in g.backends.iter().zip(lists.iter_mut()) {
                let group = &new.upstreams[ng];
                if let Some(nb) = group.backends.iter().position(|n| n.addr == b.addr) {
                    fresh[ng][nb].append(list);
                }
            }
        }
        *idle = fresh;
    }

    /// Idle connections held, all backends together.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().iter().flatten().map(Vec::len).sum()
    }

    /// Close every idle connection (drain).
    pub fn clear(&self) {
        for list in self.idle.borrow_mut().iter_mut().flatten() {
            list.clear();
        }
    }
}
