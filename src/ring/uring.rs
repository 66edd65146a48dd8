//! The io_uring backend: one ring per worker thread.
//!
//! Owns: setting the ring up with the cheapest flags the kernel accepts,
//! the one `io_uring_enter` per loop turn that both submits and collects,
//! the worker's provided buffer ring ([`BufRing`]) and the submissions for
//! the operations a proxy needs (multishot accept and receive, send,
//! connect, cancel).
//!
//! Memory the kernel may touch: a receive writes only into the provided
//! buffer ring, which lives as long as the `Ring`; the ring is dropped
//! (closing the io_uring fd, which cancels and waits for every operation)
//! before the buffer memory (field order). A send, a connect or anything
//! else that points at caller memory goes through [`Ring::push`], which is
//! `unsafe`: the caller keeps that memory in place until the operation's
//! last completion arrives, cancellations included.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{EnterFlags, IoUring, opcode, squeue, types};

use super::bufs::BufRing;
use super::{Completion, INTERNAL};

/// How the ring was set up, from the cheapest to the most widely available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// SINGLE_ISSUER + DEFER_TASKRUN + TASKRUN_FLAG (Linux 6.1): completion
    /// work runs only when this thread enters the kernel to collect it, in
    /// one batch, never as an interrupt of the worker.
    Deferred,
    /// SINGLE_ISSUER + COOP_TASKRUN (Linux 6.0): completion work waits for
    /// the next kernel entry of any kind.
    Cooperative,
    /// No setup flags (older kernels).
    Plain,
}

impl Setup {
    pub fn name(self) -> &'static str {
        match self {
            Setup::Deferred => "single-issuer+defer-taskrun",
            Setup::Cooperative => "single-issuer+coop-taskrun",
            Setup::Plain => "plain",
        }
    }
}

/// Sizes of one worker's ring.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    /// Submission queue entries.
    pub entries: u32,
    /// Provided buffers in the worker's buffer ring (a power of two).
    pub buffers: u16,
    /// Bytes per provided buffer.
    pub buffer_size: u32,
    /// The cheapest setup to try first (`Deferred` tries all three); a
    /// cheaper one is only asked for to measure it against.
    pub setup: Setup,
    /// Register the ring fd, so an enter skips the fd table lookup.
    pub register_fd: bool,
}

/// 64 buffers of 32 KiB: 2 MiB per worker, touched in rotation by bulk
/// transfers (512 x 16 KiB touched 8 MiB). Receives copy their bytes out
/// and recycle the buffer in the same turn, so few are ever in use at
/// once. 32 KiB against 16 KiB: a 16 KiB response arrives in one
/// completion instead of two, 0.79x nginx's CPU per request instead of
/// 1.05x (scripts/bench run --proxies nginx,coregate,coregate-epoll --workloads get-16k --rounds 3); 128-byte
/// responses 0.74x against 0.77x.
impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            entries: 4096,
            buffers: 64,
            buffer_size: 32 * 1024,
            setup: Setup::Deferred,
            register_fd: true,
        }
    }
}

/// The buffer group id of the worker's provided buffer ring (one per ring).
pub const BUF_GROUP: u16 = 0;

/// `struct io_uring_getevents_arg` (IORING_ENTER_EXT_ARG): a wait timeout
/// without a timeout operation.
#[repr(C)]
struct GetEventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// `struct __kernel_timespec`.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

/// `struct io_uring_rsrc_update`, for registering the ring fd.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

const IORING_REGISTER_RING_FDS: libc::c_uint = 20;

/// Sets a [`Setup`]'s flags on a ring builder.
type SetupFlags = fn(&mut io_uring::Builder);

/// A worker's ring and its provided buffers.
pub struct Ring {
    // Field order matters: the ring is dropped (and every operation in
    // flight cancelled and reaped by the kernel) before the buffer memory
    // the kernel may still be writing into.
    uring: IoUring,
    bufs: BufRing,
    setup: Setup,
    /// The registered ring fd's index, when registration worked: each
    /// enter then skips the fd table lookup.
    registered: Option<u32>,
    /// Submissions pushed since the last enter.
    unsubmitted: u32,
    /// `io_uring_enter` calls made (statistics and benchmarks).
    enters: u64,
}

impl Ring {
    /// A ring for the calling thread (SINGLE_ISSUER ties it to the thread
    /// that creates it), with the best setup the kernel accepts.
    pub fn new(config: RingConfig) -> io::Result<Ring> {
        let cq = config.entries * 4;
        let attempts: [(Setup, SetupFlags); 3] = [
            (Setup::Deferred, |b| {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }),
            (Setup::Cooperative, |b| {
                b.setup_single_issuer().setup_coop_taskrun();
            }),
            (Setup::Plain, |_| {}),
        ];
        let mut last = None;
        let first = attempts
            .iter()
            .position(|(s, _)| *s == config.setup)
            .expect("every setup is among the attempts");
        for (setup, flags) in attempts.into_iter().skip(first) {
            let mut builder = IoUring::builder();
            // Multishot receives can post many completions per submission:
            // a larger completion queue keeps them from overflowing.
            builder.setup_cqsize(cq).setup_submit_all();
            flags(&mut builder);
            match builder.build(config.entries) {
                Ok(uring) => {
                    let bufs = BufRing::new(&uring, BUF_GROUP, config.buffers, config.buffer_size)?;
                    let mut ring = Ring {
                        uring,
                        bufs,
                        setup,
                        registered: None,
                        unsubmitted: 0,
                        enters: 0,
                    };
                    if config.register_fd {
                        ring.registered = ring.register_ring_fd().ok();
                    }
                    return Ok(ring);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three attempts were made"))
    }

    /// Whether io_uring can be used here at all (seccomp profiles and
    /// `kernel.io_uring_disabled` refuse `io_uring_setup`).
    pub fn available() -> bool {
        IoUring::new(2).is_ok()
    }

    pub fn setup(&self) -> Setup {
        self.setup
    }

    pub fn enters(&self) -> u64 {
        self.enters
    }

    pub fn bufs(&mut self) -> &mut BufRing {
        &mut self.bufs
    }

    fn register_ring_fd(&self) -> io::Result<u32> {
        let mut up = RsrcUpdate {
            offset: u32::MAX,
            resv: 0,
            data: self.uring.as_raw_fd() as u64,
        };
        // SAFETY: `up` is a valid io_uring_rsrc_update for the duration of
        // the call; the kernel writes the chosen index into it and keeps
        // no pointer to it.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.uring.as_raw_fd(),
                IORING_REGISTER_RING_FDS,
                &mut up as *mut RsrcUpdate,
                1u32,
            )
        };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
        Ok(up.offset)
    }

    /// Queue one submission; it reaches the kernel at the next [`turn`]
    /// (or now, when the submission queue is full).
    ///
    /// # Safety
    /// Every pointer in `sqe` (a send's bytes, a connect's address, an
    /// iovec array) stays valid and unmoved until the operation's last
    /// completion has been collected, including after a cancellation.
    ///
    /// [`turn`]: Ring::turn
    pub unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller's promise above covers what `sqe` points to.
            if unsafe { self.uring.submission().push(sqe) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Full: hand what is queued to the kernel without waiting.
            self.enter(0, None)?;
        }
    }

    /// Multishot accept on a listening socket: one completion per new
    /// connection (the result is its fd) until one comes without `more`.
    pub fn accept_multi(&mut self, listener: RawFd, user_data: u64) -> io::Result<()> {
        let sqe = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(user_data);
        // SAFETY: accept writes no peer address (none is given), so the
        // entry points at no memory of ours.
        unsafe { self.push(&sqe) }
    }

    /// Multishot receive into the worker's provided buffers: one completion
    /// per arrival, each naming the buffer it filled, until one comes
    /// without `more` (EOF, an error, or no buffer left: re-arm then).
    pub fn recv_multi(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let sqe = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP)
            .build()
            .user_data(user_data);
        // SAFETY: the kernel writes only into the provided buffer ring,
        // which lives as long as the ring itself (see `Ring`'s fields).
        unsafe { self.push(&sqe) }
    }

    /// Cancel every operation submitted with `user_data`; each still
    /// completes (with ECANCELED or its own result) before its memory may
    /// be reused.
    pub fn cancel(&mut self, user_data: u64) -> io::Result<()> {
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(user_data).all())
            .build()
            .user_data(INTERNAL);
        // SAFETY: a cancellation points at no memory.
        unsafe { self.push(&sqe) }
    }

    /// Send `len` bytes from `buf`: one completion with the bytes sent
    /// (possibly fewer).
    ///
    /// # Safety
    /// The `len` bytes at `buf` stay allocated and unchanged until the
    /// completion arrives.
    pub unsafe fn send(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: usize,
        user_data: u64,
    ) -> io::Result<()> {
        let sqe = opcode::Send::new(types::Fd(fd), buf, len.min(u32::MAX as usize) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the bytes in place until the completion.
        unsafe { self.push(&sqe) }
    }

    /// Connect `fd` to `addr`: one completion, 0 or an error.
    ///
    /// # Safety
    /// `addr` stays in place until the completion arrives.
    pub unsafe fn connect(
        &mut self,
        fd: RawFd,
        addr: &socket2::SockAddr,
        user_data: u64,
    ) -> io::Result<()> {
        let sqe = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps `addr` in place until the completion.
        unsafe { self.push(&sqe) }
    }

    /// Submit what is queued, wait until at least one completion is ready
    /// (or `timeout` passes), and copy every ready completion into `out`.
    /// One `io_uring_enter` in all: the submission, the deferred
    /// completion work and the wait happen in the same call.
    pub fn turn(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
        out.clear();
        // Completions already posted need no wait (a plain or cooperative
        // ring posts them without an enter).
        let wait = self.uring.completion().is_empty();
        if wait || self.unsubmitted > 0 {
            match self.enter(u32::from(wait), if wait { timeout } else { None }) {
                Ok(()) => {}
                // A timeout or a signal: collect whatever is there.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                // The completion queue is full and the kernel holds more:
                // drain it, the next turn flushes the rest.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
        }
        for c in self.uring.completion() {
            let c = Completion {
                user_data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
            };
            if let Some(bid) = c.buffer() {
                self.bufs.taken(bid);
            }
            if c.user_data != INTERNAL {
                out.push(c);
            }
        }
        Ok(())
    }

    /// One `io_uring_enter`: submit what is queued and, with `min_complete`
    /// of 1, run completion work and wait for a completion or the timeout.
    fn enter(&mut self, min_complete: u32, timeout: Option<Duration>) -> io::Result<()> {
        let mut flags = EnterFlags::GETEVENTS.bits();
        let fd = match self.registered {
            Some(index) => {
                flags |= EnterFlags::REGISTERED_RING.bits();
                index as RawFd
            }
            None => self.uring.as_raw_fd(),
        };
        let ts;
        let arg;
        let (argp, argsz) = match timeout {
            Some(t) => {
                ts = KernelTimespec {
                    tv_sec: t.as_secs() as i64,
                    tv_nsec: i64::from(t.subsec_nanos()),
                };
                arg = GetEventsArg {
                    sigmask: 0,
                    sigmask_sz: 0,
                    min_wait_usec: 0,
                    ts: &ts as *const KernelTimespec as u64,
                };
                flags |= EnterFlags::EXT_ARG.bits();
                (
                    &arg as *const GetEventsArg as *const libc::c_void,
                    std::mem::size_of::<GetEventsArg>(),
                )
            }
            None => (std::ptr::null(), 0),
        };
        let to_submit = self.unsubmitted;
        self.enters += 1;
        // SAFETY: `arg` and `ts` live on this frame until the call returns;
        // the kernel reads them during the call only. The submission
        // entries were validated by `push`'s callers.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                to_submit,
                min_complete,
                flags,
                argp,
                argsz,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.unsubmitted = self.unsubmitted.saturating_sub(r as u32);
        Ok(())
    }
}

/// `user_data` of the cancellation a dropped ring sends itself.
const DROP_CANCEL: u64 = INTERNAL - 1;

impl Drop for Ring {
    /// Cancel every operation and collect the completions before the ring
    /// and then the buffers go. A cancelled receive completes within the
    /// cancellation's own enter (it is removed from its socket's wait
    /// queue under the ring's lock), so once the cancellation's completion
    /// is in, no receive can still pick a provided buffer.
    fn drop(&mut self) {
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
            .build()
            .user_data(DROP_CANCEL);
        // SAFETY: a cancellation points at no memory.
        if unsafe { self.push(&sqe) }.is_err() {
            return;
        }
        let mut out = Vec::new();
        for _ in 0..8 {
            if self
                .turn(Some(Duration::from_millis(10)), &mut out)
                .is_err()
                || out.iter().any(|c| c.user_data == DROP_CANCEL)
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_with_nothing_to_do_returns_at_its_timeout_in_one_enter() {
        if !Ring::available() {
            eprintln!("io_uring unavailable here; skipped");
            return;
        }
        let mut ring = Ring::new(RingConfig {
            entries: 8,
            buffers: 2,
            buffer_size: 64,
            ..RingConfig::default()
        })
        .expect("ring");
        let before = ring.enters();
        let mut out = Vec::new();
        ring.turn(Some(Duration::from_millis(1)), &mut out)
            .expect("turn");
        assert!(out.is_empty());
        assert_eq!(ring.enters() - before, 1);
    }
}
