//! The worker's provided buffer ring: one pool of receive buffers that
//! backs every armed multishot receive of the worker.
//!
//! Owns: the ring of buffer descriptors shared with the kernel, the buffer
//! memory, and handing a buffer back to the kernel once its bytes are
//! used. Does not own: which connection a buffer's bytes belong to (the
//! completion says that).
//!
//! A connection waiting for bytes holds no buffer: the kernel picks one
//! from this ring only when bytes arrive, so ten thousand idle keep-alive
//! connections cost `buffers * buffer_size` in all, not per connection.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;

/// `struct io_uring_buf`: one descriptor in the ring.
#[repr(C)]
struct RingEntry {
    addr: u64,
    len: u32,
    bid: u16,
    /// In entry 0 this field is the ring's tail (`struct io_uring_buf_ring`).
    resv: u16,
}

/// Provided buffers, registered with one ring under one buffer group.
pub struct BufRing {
    /// The descriptor ring: `entries` descriptors, page-aligned (mmap), read
    /// by the kernel.
    ring: *mut RingEntry,
    ring_bytes: usize,
    /// Buffer `bid` is `memory[bid * size..][..size]`.
    memory: Box<[u8]>,
    size: usize,
    entries: u16,
    /// Our copy of the tail; the kernel sees it once published.
    tail: u16,
    /// Buffers handed to us by completions and not yet recycled
    /// (a debug check that none is recycled twice).
    #[cfg(debug_assertions)]
    lent: Vec<bool>,
}

impl BufRing {
    /// `count` buffers of `size` bytes each, registered as `group` with
    /// `uring`, all handed to the kernel. `count` must be a power of two.
    pub fn new(uring: &IoUring, group: u16, count: u16, size: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two up to 32768",
            ));
        }
        let ring_bytes = usize::from(count) * std::mem::size_of::<RingEntry>();
        // SAFETY: a fresh anonymous private mapping; checked for failure
        // below. It is page-aligned, as the kernel requires of a ring.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let size = size as usize;
        // Zeroed: the allocator maps untouched pages lazily, so buffers
        // the kernel never fills cost no memory.
        let memory = vec![0u8; usize::from(count) * size].into_boxed_slice();
        let mut bufs = BufRing {
            ring: ptr.cast(),
            ring_bytes,
            memory,
            size,
            entries: count,
            tail: 0,
            #[cfg(debug_assertions)]
            lent: vec![true; usize::from(count)],
        };
        // SAFETY: the descriptor ring stays mapped, and the buffer memory
        // allocated, until `BufRing` is dropped, which `Ring` does only
        // after the io_uring itself is closed (its field order).
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ptr as u64, count, group, 0)?;
        }
        for bid in 0..count {
            bufs.recycle(bid);
        }
        Ok(bufs)
    }

    /// Bytes per buffer.
    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// The first `len` bytes of buffer `bid`, as a completion delivered
    /// them. Valid until `bid` is recycled.
    pub fn get(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.size;
        debug_assert!(len <= self.size);
        #[cfg(debug_assertions)]
        debug_assert!(
            self.lent[usize::from(bid)],
            "buffer {bid} read after recycling"
        );
        &self.memory[start..start + len]
    }

    /// Give buffer `bid` back to the kernel; its bytes must not be read
    /// again.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.entries, "buffer id out of range");
        #[cfg(debug_assertions)]
        {
            let lent = &mut self.lent[usize::from(bid)];
            debug_assert!(*lent, "buffer {bid} recycled twice");
            *lent = false;
        }
        let slot = usize::from(self.tail & (self.entries - 1));
        let addr = self.memory[usize::from(bid) * self.size..].as_ptr() as u64;
        // SAFETY: `slot` < entries, inside the mapping. The kernel reads
        // only descriptors between its head and the published tail, and
        // this slot is past the tail until `publish` below: it is ours.
        unsafe {
            let e = self.ring.add(slot);
            (*e).addr = addr;
            (*e).len = self.size as u32;
            (*e).bid = bid;
        }
        self.tail = self.tail.wrapping_add(1);
        self.publish();
    }

    /// Mark buffer `bid` as handed to us by a completion (debug check).
    pub fn taken(&mut self, bid: u16) {
        #[cfg(debug_assertions)]
        {
            let lent = &mut self.lent[usize::from(bid)];
            debug_assert!(!*lent, "buffer {bid} delivered twice");
            *lent = true;
        }
        let _ = bid;
    }

    fn publish(&self) {
        // SAFETY: the tail is the u16 at byte 14 of the ring (the `resv`
        // of descriptor 0, `struct io_uring_buf_ring`), aligned to 2, and
        // the kernel reads it with an acquire load: the release store
        // orders the descriptor writes before it.
        unsafe {
            let tail = &*(std::ptr::addr_of_mut!((*self.ring).resv) as *const AtomicU16);
            tail.store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used by the kernel
        // (the ring was closed first, see `Ring`).
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
        }
    }
}
