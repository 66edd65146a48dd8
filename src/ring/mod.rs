//! The per-worker I/O core, owned by coregate instead of a runtime: the
//! operations a proxy needs, submitted with a caller's `user_data` and
//! answered by [`Completion`]s, on io_uring or, where it is blocked, epoll.
//!
//! Owns: the [`Driver`] (one per worker thread) and its two backends,
//! [`uring::Ring`] and [`epoll::Poller`], the receive buffers both
//! deliver bytes in ([`bufs`]), and the worker's deadlines ([`wheel`]). Does not own: what a completion means; the
//! caller dispatches it by its `user_data`.
//!
//! The operations, alike on both backends:
//! - multishot accept: a completion per new connection (its fd) until one
//!   comes without [`Completion::more`];
//! - multishot receive: a completion per arrival, naming the worker buffer
//!   that holds the bytes ([`Completion::buffer`]), to be read with
//!   [`Driver::buf`] and given back with [`Driver::recycle`]; it ends with
//!   EOF (0), an error, `ENOBUFS` (every buffer in use: re-arm once some
//!   are given back) or `ECANCELED`;
//! - send and connect: one completion each;
//! - cancel: the operation's final completion comes with `ECANCELED` (or
//!   its own result, if it finished first).
//!
//! A connection waiting for bytes holds no buffer on either backend: one
//! is taken only when bytes arrive.

pub mod bufs;
pub mod epoll;
pub mod uring;
pub mod wheel;

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub use uring::{Ring, RingConfig, Setup};

/// `user_data` the core keeps for itself (its own cancellations); never
/// returned to the caller.
pub const INTERNAL: u64 = u64::MAX;

/// `IORING_CQE_F_BUFFER`: the completion names a buffer.
pub(crate) const F_BUFFER: u32 = 1;
/// `IORING_CQE_F_MORE`: the multishot operation stays armed.
pub(crate) const F_MORE: u32 = 2;

/// One completion, in io_uring's terms on both backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    pub fn new(user_data: u64, result: i32, flags: u32) -> Self {
        Completion {
            user_data,
            result,
            flags,
        }
    }

    /// A multishot operation stays armed and will complete again.
    pub fn more(&self) -> bool {
        self.flags & F_MORE != 0
    }

    /// The receive buffer holding the bytes, if the completion took one.
    pub fn buffer(&self) -> Option<u16> {
        (self.flags & F_BUFFER != 0).then_some((self.flags >> 16) as u16)
    }

    /// The result as a byte count (or fd) or an error.
    pub fn io_result(&self) -> io::Result<usize> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as usize)
        }
    }
}

/// Which event loop a worker runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    /// io_uring when the kernel allows it, epoll otherwise.
    Auto,
    Uring,
    Epoll,
}

impl DriverKind {
    /// Resolve `Auto` against what this kernel (or container) permits.
    pub fn resolve(self) -> DriverKind {
        match self {
            DriverKind::Auto if Ring::available() => DriverKind::Uring,
            DriverKind::Auto => DriverKind::Epoll,
            other => other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Auto => "auto",
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// A worker's I/O core on one of the two backends.
// One per worker: boxing the larger variant would only add an indirection
// to every operation.
#[allow(clippy::large_enum_variant)]
pub enum Driver {
    Uring(Ring),
    Epoll(Poller),
}

pub use epoll::Poller;

impl Driver {
    /// io_uring with `config`'s sizes.
    pub fn uring(config: RingConfig) -> io::Result<Driver> {
        Ring::new(config).map(Driver::Uring)
    }

    /// epoll with `config`'s buffer sizes.
    pub fn epoll(config: RingConfig) -> io::Result<Driver> {
        Poller::new(config.buffers, config.buffer_size).map(Driver::Epoll)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Driver::Uring(_) => "io_uring",
            Driver::Epoll(_) => "epoll",
        }
    }

    pub fn accept_multi(&mut self, listener: RawFd, user_data: u64) -> io::Result<()> {
        match self {
            Driver::Uring(r) => r.accept_multi(listener, user_data),
            Driver::Epoll(p) => p.accept_multi(listener, user_data),
        }
    }

    pub fn recv_multi(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        match self {
            Driver::Uring(r) => r.recv_multi(fd, user_data),
            Driver::Epoll(p) => p.recv_multi(fd, user_data),
        }
    }

    /// Send `bytes`: one completion with how many went (possibly fewer).
    ///
    /// # Safety
    /// `bytes` stays allocated and unchanged until the completion arrives,
    /// even if the operation is cancelled.
    pub unsafe fn send(&mut self, fd: RawFd, bytes: &[u8], user_data: u64) -> io::Result<()> {
        // SAFETY: the caller's promise covers both backends' use.
        unsafe {
            match self {
                Driver::Uring(r) => r.send(fd, bytes.as_ptr(), bytes.len(), user_data),
                Driver::Epoll(p) => p.send(fd, bytes.as_ptr(), bytes.len(), user_data),
            }
        }
    }

    /// Connect `fd` (non-blocking) to `addr`: one completion, 0 or an
    /// error.
    ///
    /// # Safety
    /// `addr` stays in place until the completion arrives.
    pub unsafe fn connect(
        &mut self,
        fd: RawFd,
        addr: &socket2::SockAddr,
        user_data: u64,
    ) -> io::Result<()> {
        // SAFETY: the caller's promise covers both backends' use.
        unsafe {
            match self {
                Driver::Uring(r) => r.connect(fd, addr, user_data),
                Driver::Epoll(p) => p.connect(fd, addr, user_data),
            }
        }
    }

    /// End the operation `user_data` on `fd`.
    pub fn cancel(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        match self {
            Driver::Uring(r) => r.cancel(user_data),
            Driver::Epoll(p) => {
                p.cancel(fd, user_data);
                Ok(())
            }
        }
    }

    /// `fd` is about to be closed, its operations all completed.
    pub fn forget(&mut self, fd: RawFd) {
        match self {
            Driver::Uring(_) => {}
            Driver::Epoll(p) => p.forget(fd),
        }
    }

    /// The first `len` bytes of receive buffer `bid`.
    pub fn buf(&mut self, bid: u16, len: usize) -> &[u8] {
        match self {
            Driver::Uring(r) => r.bufs().get(bid, len),
            Driver::Epoll(p) => p.buf(bid, len),
        }
    }

    /// Give receive buffer `bid` back.
    pub fn recycle(&mut self, bid: u16) {
        match self {
            Driver::Uring(r) => r.bufs().recycle(bid),
            Driver::Epoll(p) => p.recycle(bid),
        }
    }

    /// Submit what is queued and collect what completed, waiting up to
    /// `timeout` (for ever with `None`) when nothing has.
    pub fn turn(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        match self {
            Driver::Uring(r) => r.turn(timeout, out),
            Driver::Epoll(p) => p.turn(timeout, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    const SMALL: RingConfig = RingConfig {
        entries: 64,
        buffers: 8,
        buffer_size: 64,
        setup: Setup::Deferred,
        register_fd: true,
    };

    /// Both backends where the kernel allows them.
    fn drivers() -> Vec<Driver> {
        let mut d = vec![Driver::epoll(SMALL).expect("epoll")];
        if Ring::available() {
            d.push(Driver::uring(SMALL).expect("ring"));
        } else {
            eprintln!("io_uring unavailable here; epoll only");
        }
        d
    }

    /// A driver and the completions collected but not yet looked at.
    struct Harness {
        driver: Driver,
        backlog: VecDeque<Completion>,
    }

    impl Harness {
        /// The next completion with `user_data`, turning the driver for up
        /// to 5 s; others stay in the backlog.
        fn next(&mut self, user_data: u64) -> Completion {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut out = Vec::new();
            loop {
                if let Some(i) = self.backlog.iter().position(|c| c.user_data == user_data) {
                    return self.backlog.remove(i).expect("position is in range");
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: no completion for {user_data} within 5 s",
                    self.driver.name()
                );
                self.driver
                    .turn(Some(Duration::from_millis(100)), &mut out)
                    .expect("turn");
                self.backlog.extend(out.drain(..));
            }
        }

        /// Receive completions for `user_data` until `want` bytes came,
        /// each buffer given back.
        fn receive(&mut self, user_data: u64, want: usize) -> Vec<u8> {
            let mut got = Vec::new();
            while got.len() < want {
                let c = self.next(user_data);
                assert!(c.more(), "{}: {c:?}", self.driver.name());
                let bid = c.buffer().expect("a receive buffer");
                let n = c.io_result().expect("bytes");
                assert!(n <= 64);
                got.extend_from_slice(self.driver.buf(bid, n));
                self.driver.recycle(bid);
            }
            got
        }
    }

    fn each(test: impl Fn(&mut Harness)) {
        for driver in drivers() {
            test(&mut Harness {
                driver,
                backlog: VecDeque::new(),
            });
        }
    }

    #[test]
    fn multishot_accept_and_receive_through_worker_buffers() {
        each(|h| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            h.driver
                .accept_multi(listener.as_raw_fd(), 1)
                .expect("accept");
            let mut clients = Vec::new();
            let mut fds = Vec::new();
            for _ in 0..2 {
                clients.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
                let c = h.next(1);
                assert!(c.more(), "multishot accept stays armed");
                fds.push(c.io_result().expect("accepted fd") as RawFd);
            }
            h.driver.recv_multi(fds[0], 2).expect("recv");
            // More bytes than one buffer: they arrive in several buffers.
            let sent: Vec<u8> = (0..200u8).collect();
            clients[0].write_all(&sent).unwrap();
            assert_eq!(h.receive(2, sent.len()), sent);
            // EOF ends the multishot receive.
            drop(clients.remove(0));
            let c = h.next(2);
            assert_eq!(c.result, 0);
            assert!(!c.more());
            for fd in fds {
                h.driver.forget(fd);
                // SAFETY: fds accepted above, owned by this test.
                unsafe { libc::close(fd) };
            }
        });
    }

    #[test]
    fn a_receive_that_runs_out_of_buffers_ends_and_can_be_rearmed() {
        each(|h| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            h.driver.recv_multi(server.as_raw_fd(), 7).expect("recv");
            // 8 buffers of 64 bytes, none given back: 600 bytes exhaust them.
            client.write_all(&[b'x'; 600]).unwrap();
            let mut held = Vec::new();
            let mut total = 0;
            let end = loop {
                let c = h.next(7);
                if !c.more() {
                    break c;
                }
                total += c.io_result().unwrap();
                held.push(c.buffer().unwrap());
            };
            assert_eq!(end.result, -libc::ENOBUFS, "{}: {end:?}", h.driver.name());
            assert_eq!(total, 8 * 64);
            for bid in held {
                h.driver.recycle(bid);
            }
            h.driver.recv_multi(server.as_raw_fd(), 7).expect("re-arm");
            assert_eq!(h.receive(7, 600 - total).len(), 600 - total);
            // Nothing was lost or duplicated: the socket is empty now.
            let mut rest = [0u8; 1];
            assert!((&server).read(&mut rest).is_err());
            h.driver.forget(server.as_raw_fd());
        });
    }

    #[test]
    fn cancelling_a_multishot_receive_ends_it() {
        each(|h| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            h.driver.recv_multi(server.as_raw_fd(), 9).expect("recv");
            h.driver.cancel(server.as_raw_fd(), 9).expect("cancel");
            let c = h.next(9);
            assert_eq!(c.result, -libc::ECANCELED, "{}", h.driver.name());
            assert!(!c.more());
            h.driver.forget(server.as_raw_fd());
        });
    }

    #[test]
    fn connect_then_send_more_than_the_socket_takes_at_once() {
        each(|h| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = socket2::SockAddr::from(listener.local_addr().unwrap());
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            // SAFETY: `addr` lives until the completion below.
            unsafe { h.driver.connect(s.as_raw_fd(), &addr, 3) }.expect("connect");
            assert_eq!(h.next(3).result, 0, "{}", h.driver.name());
            let (mut peer, _) = listener.accept().unwrap();
            // Several MiB: the kernel takes it in parts, each a completion.
            let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                peer.read_to_end(&mut got).unwrap();
                got
            });
            let mut sent = 0;
            while sent < data.len() {
                // SAFETY: `data` outlives the completion awaited next.
                unsafe { h.driver.send(s.as_raw_fd(), &data[sent..], 4) }.expect("send");
                let n = h.next(4).io_result().expect("sent");
                assert!(n > 0);
                sent += n;
            }
            h.driver.forget(s.as_raw_fd());
            drop(s);
            assert!(
                reader.join().unwrap() == data,
                "{}: bytes arrive intact",
                h.driver.name()
            );
        });
    }

    #[test]
    fn a_refused_connect_completes_with_its_error() {
        each(|h| {
            // Bound but not listening: connects there are refused, and the
            // port stays ours for the length of the test.
            let bound =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            bound
                .bind(
                    &"127.0.0.1:0"
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
            let addr = bound.local_addr().unwrap();
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            // SAFETY: `addr` lives until the completion below.
            unsafe { h.driver.connect(s.as_raw_fd(), &addr, 5) }.expect("connect");
            assert_eq!(h.next(5).result, -libc::ECONNREFUSED, "{}", h.driver.name());
            h.driver.forget(s.as_raw_fd());
        });
    }
}
