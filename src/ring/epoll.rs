//! The epoll backend: the same operations and completions as the io_uring
//! one, for kernels or containers where io_uring is blocked.
//!
//! Owns: emulating multishot accept and receive with edge-triggered
//! readiness (one `epoll_ctl` per socket, at its first operation), sends
//! and connects that complete at once when the socket allows and wait for
//! writability when it does not, and a pool of receive buffers named by id
//! as provided buffers are. Does not own: what a completion means.
//!
//! Every operation is tried when it is submitted or when its socket becomes
//! ready, and its completion is queued for the next [`Poller::turn`], so a
//! caller sees the same order of events on either backend.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{Completion, F_BUFFER, F_MORE};

/// Reads or accepts one socket gets per readiness before others get a
/// turn (its remaining bytes wait for the next loop turn).
const READS_PER_TURN: usize = 4;

/// What is armed on one socket.
#[derive(Default)]
struct Watch {
    registered: bool,
    readable: bool,
    writable: bool,
    /// A multishot receive (`user_data`).
    recv: Option<u64>,
    /// A multishot accept (`user_data`).
    accept: Option<u64>,
    /// A send waiting for room: `(bytes, len, user_data)`.
    send: Option<(*const u8, usize, u64)>,
    /// A connect in progress (`user_data`).
    connect: Option<u64>,
    /// Queued in `pending`: readable with work left.
    pending: bool,
}

/// Receive buffers named by id, as the kernel's provided buffers are.
struct Buffers {
    memory: Box<[u8]>,
    size: usize,
    free: Vec<u16>,
}

/// An epoll instance and the operations armed on it.
pub struct Poller {
    epfd: RawFd,
    /// Indexed by fd.
    watches: Vec<Watch>,
    bufs: Buffers,
    /// Completions found outside `epoll_wait` (at submission), delivered
    /// at the next turn.
    ready: Vec<Completion>,
    /// Sockets with readable bytes left after their share of a turn.
    pending: VecDeque<RawFd>,
    events: Vec<libc::epoll_event>,
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl Poller {
    /// `buffers` receive buffers of `buffer_size` bytes.
    pub fn new(buffers: u16, buffer_size: u32) -> io::Result<Poller> {
        // SAFETY: plain syscall; the fd is checked and owned below.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let size = buffer_size as usize;
        Ok(Poller {
            epfd,
            watches: Vec::new(),
            bufs: Buffers {
                memory: vec![0u8; usize::from(buffers) * size].into_boxed_slice(),
                size,
                // Popped from the end: buffer 0 first.
                free: (0..buffers).rev().collect(),
            },
            ready: Vec::new(),
            pending: VecDeque::new(),
            events: Vec::with_capacity(256),
        })
    }

    fn watch(&mut self, fd: RawFd) -> io::Result<&mut Watch> {
        let i = fd as usize;
        if self.watches.len() <= i {
            self.watches.resize_with(i + 1, Watch::default);
        }
        if !self.watches[i].registered {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: fd as u64,
            };
            // SAFETY: `ev` is valid for the call; the kernel copies it.
            if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // Readiness already there when it was added is reported by
            // the first wait; until then, assume nothing.
            self.watches[i] = Watch {
                registered: true,
                ..Watch::default()
            };
        }
        Ok(&mut self.watches[i])
    }

    pub fn accept_multi(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        // accept4 has no per-call MSG_DONTWAIT: the listener itself must
        // not block.
        // SAFETY: fcntl on an fd the caller owns; no memory involved.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let w = self.watch(fd)?;
        w.accept = Some(user_data);
        if w.readable {
            self.service(fd);
        }
        Ok(())
    }

    pub fn recv_multi(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let w = self.watch(fd)?;
        w.recv = Some(user_data);
        if w.readable {
            self.service(fd);
        }
        Ok(())
    }

    /// # Safety
    /// The `len` bytes at `buf` stay in place until the completion.
    pub unsafe fn send(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: usize,
        user_data: u64,
    ) -> io::Result<()> {
        self.watch(fd)?.send = Some((buf, len, user_data));
        self.try_send(fd);
        Ok(())
    }

    /// # Safety
    /// Nothing is kept: the address is used during the call only.
    pub unsafe fn connect(
        &mut self,
        fd: RawFd,
        addr: &socket2::SockAddr,
        user_data: u64,
    ) -> io::Result<()> {
        self.watch(fd)?;
        // SAFETY: `addr` is a valid socket address for the call.
        let r = unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len()) };
        if r == 0 {
            self.ready.push(Completion::new(user_data, 0, 0));
        } else {
            match errno() {
                libc::EINPROGRESS => self.watches[fd as usize].connect = Some(user_data),
                e => self.ready.push(Completion::new(user_data, -e, 0)),
            }
        }
        Ok(())
    }

    /// End the multishot operation `user_data` on `fd` (and a send or
    /// connect of it): its final completion is `ECANCELED`.
    pub fn cancel(&mut self, fd: RawFd, user_data: u64) {
        let Some(w) = self.watches.get_mut(fd as usize) else {
            return;
        };
        let mut cancelled = |slot: &mut Option<u64>| {
            if *slot == Some(user_data) {
                *slot = None;
                self.ready
                    .push(Completion::new(user_data, -libc::ECANCELED, 0));
            }
        };
        cancelled(&mut w.recv);
        cancelled(&mut w.accept);
        cancelled(&mut w.connect);
        if matches!(w.send, Some((_, _, ud)) if ud == user_data) {
            w.send = None;
            self.ready
                .push(Completion::new(user_data, -libc::ECANCELED, 0));
        }
    }

    /// The socket is about to be closed: forget it (its number will be
    /// reused). Closing removes it from the epoll set.
    pub fn forget(&mut self, fd: RawFd) {
        if let Some(w) = self.watches.get_mut(fd as usize) {
            *w = Watch::default();
        }
    }

    pub fn buf(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.bufs.size;
        &self.bufs.memory[start..start + len]
    }

    pub fn recycle(&mut self, bid: u16) {
        debug_assert!(
            !self.bufs.free.contains(&bid),
            "buffer {bid} recycled twice"
        );
        self.bufs.free.push(bid);
    }

    pub fn buffer_size(&self) -> usize {
        self.bufs.size
    }

    /// Deliver what is ready, waiting up to `timeout` when nothing is.
    pub fn turn(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        out.clear();
        // Sockets that had bytes left get their next share first.
        for _ in 0..self.pending.len() {
            let Some(fd) = self.pending.pop_front() else {
                break;
            };
            self.watches[fd as usize].pending = false;
            self.service(fd);
        }
        let wait_ms = if !self.ready.is_empty() || !self.pending.is_empty() {
            0
        } else {
            match timeout {
                // Rounded up: a wait that returns early only spins.
                Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
                None => -1,
            }
        };
        self.events.clear();
        // SAFETY: `events` has room for `capacity` entries; the kernel
        // writes at most that many and we set the length it reports.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd,
                self.events.as_mut_ptr(),
                self.events.capacity() as i32,
                wait_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        } else {
            // SAFETY: the kernel initialised the first `n` entries.
            unsafe { self.events.set_len(n as usize) };
        }
        for i in 0..self.events.len() {
            let ev = self.events[i];
            let fd = ev.u64 as RawFd;
            let Some(w) = self.watches.get_mut(fd as usize) else {
                continue;
            };
            if !w.registered {
                continue;
            }
            let bits = ev.events as i32;
            if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                w.readable = true;
            }
            if bits & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                w.writable = true;
            }
            self.service(fd);
        }
        out.append(&mut self.ready);
        Ok(())
    }

    /// Run what is armed on `fd` as far as its readiness allows.
    fn service(&mut self, fd: RawFd) {
        let w = &mut self.watches[fd as usize];
        if w.writable {
            if let Some(ud) = w.connect.take() {
                let mut err: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: `err` and `len` are valid for the call.
                unsafe {
                    libc::getsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&mut err as *mut libc::c_int).cast(),
                        &mut len,
                    )
                };
                self.ready.push(Completion::new(ud, -err, 0));
            }
            self.try_send(fd);
        }
        let w = &mut self.watches[fd as usize];
        if !w.readable {
            return;
        }
        if let Some(ud) = w.accept {
            for _ in 0..READS_PER_TURN {
                // SAFETY: no address is asked for.
                let s = unsafe {
                    libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    )
                };
                if s >= 0 {
                    self.ready.push(Completion::new(ud, s, F_MORE));
                    continue;
                }
                match errno() {
                    libc::EAGAIN => {
                        self.watches[fd as usize].readable = false;
                        return;
                    }
                    // The peer gave up before we took it: next.
                    libc::ECONNABORTED | libc::EINTR => {}
                    // EMFILE and friends: reported, the accept stays armed.
                    e => {
                        self.ready.push(Completion::new(ud, -e, F_MORE));
                        return;
                    }
                }
            }
            self.queue_pending(fd);
            return;
        }
        let Some(ud) = w.recv else { return };
        for _ in 0..READS_PER_TURN {
            let Some(bid) = self.bufs.free.pop() else {
                // As the kernel does when the buffer ring is empty.
                self.watches[fd as usize].recv = None;
                self.ready.push(Completion::new(ud, -libc::ENOBUFS, 0));
                return;
            };
            let size = self.bufs.size;
            let start = usize::from(bid) * size;
            // SAFETY: reads into buffer `bid`, `size` bytes inside
            // `memory`, which no one else uses while it is off the free
            // list.
            let n =
                unsafe { libc::recv(fd, self.bufs.memory[start..].as_mut_ptr().cast(), size, 0) };
            if n > 0 {
                let flags = F_BUFFER | F_MORE | (u32::from(bid) << 16);
                self.ready.push(Completion::new(ud, n as i32, flags));
                continue;
            }
            self.bufs.free.push(bid);
            if n == 0 {
                self.watches[fd as usize].recv = None;
                self.ready.push(Completion::new(ud, 0, 0));
                return;
            }
            match errno() {
                libc::EAGAIN => {
                    self.watches[fd as usize].readable = false;
                    return;
                }
                libc::EINTR => {}
                e => {
                    self.watches[fd as usize].recv = None;
                    self.ready.push(Completion::new(ud, -e, 0));
                    return;
                }
            }
        }
        self.queue_pending(fd);
    }

    fn queue_pending(&mut self, fd: RawFd) {
        let w = &mut self.watches[fd as usize];
        if !w.pending {
            w.pending = true;
            self.pending.push_back(fd);
        }
    }

    fn try_send(&mut self, fd: RawFd) {
        let w = &mut self.watches[fd as usize];
        let Some((buf, len, ud)) = w.send else { return };
        // SAFETY: the submitter keeps `len` bytes at `buf` in place until
        // this completion (`send`'s contract).
        let n = unsafe { libc::send(fd, buf.cast(), len, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            w.send = None;
            self.ready.push(Completion::new(ud, n as i32, 0));
            return;
        }
        match errno() {
            libc::EAGAIN => w.writable = false,
            e => {
                w.send = None;
                self.ready.push(Completion::new(ud, -e, 0));
            }
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // SAFETY: the epoll fd this poller owns, closed once.
        unsafe { libc::close(self.epfd) };
    }
}
