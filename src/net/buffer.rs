//! Per-worker buffer pool and the read buffer type connections use.
//!
//! Owns: handing out fixed-size byte buffers and taking them back, and
//! [`Buf`], a buffer with a consumed offset that received bytes are
//! appended to. Does not own: what the bytes mean.
//!
//! Each worker has its own pool (no locks, no atomics). A connection holds
//! a buffer only while a request is in flight; an idle keep-alive
//! connection holds none, which is what keeps idle connections cheap.

use std::cell::RefCell;

/// Size of every pooled buffer: 64 KiB of body behind a head of up to
/// 16 KiB (the default `max_head_bytes`). Bodies are relayed in reads of
/// up to this size, a quarter of the syscalls per MiB of HAProxy's 16 KiB
/// at the same copy cost. With a 64 KiB buffer, a 64 KiB POST and its
/// head did not fit together: the body left for the backend in two sends,
/// and coregate ran at 0.87x nginx's req/s and 1.17x its CPU per request
/// (`scripts/bench --workloads post-64k --rounds 5`); with 80 KiB, 0.95x
/// and 1.04x, other workloads unchanged.
pub const BUF_SIZE: usize = 80 * 1024;

/// Free buffers a worker keeps for reuse; beyond this they are freed, so a
/// burst does not pin memory forever (80 MiB per worker at most).
pub const MAX_FREE: usize = 1024;

/// A free list of vectors of one capacity, owned by one worker.
pub struct VecPool<T> {
    free: RefCell<Vec<Vec<T>>>,
    capacity: usize,
}

/// The byte buffers every connection reads and writes through.
pub type BufPool = VecPool<u8>;

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl BufPool {
    pub fn new() -> Self {
        VecPool::with_capacity(BUF_SIZE)
    }
}

impl<T> VecPool<T> {
    /// A pool handing out vectors with room for `capacity` elements.
    pub fn with_capacity(capacity: usize) -> Self {
        VecPool {
            free: RefCell::new(Vec::new()),
            capacity,
        }
    }

    pub fn get(&self) -> Vec<T> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Take a vector back. One of another size is dropped instead: a
    /// shorter one (a buffer given up empty has none) would be handed out
    /// short, and a grown one (a backlog received while a receive was
    /// being paused, a body held whole for the decode guard) would pin a
    /// burst's memory.
    pub fn put(&self, mut v: Vec<T>) {
        if v.capacity() != self.capacity {
            return;
        }
        v.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < MAX_FREE {
            free.push(v);
        }
    }

    /// Buffers currently free in the pool.
    pub fn free_count(&self) -> usize {
        self.free.borrow().len()
    }
}

/// A read buffer: bytes `[pos, len)` are received and not yet consumed.
#[derive(Default)]
pub struct Buf {
    v: Vec<u8>,
    pos: usize,
}

impl Buf {
    pub fn new(v: Vec<u8>) -> Self {
        debug_assert!(v.is_empty());
        Buf { v, pos: 0 }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.v
    }

    pub fn has_capacity(&self) -> bool {
        self.v.capacity() > 0
    }

    /// Received bytes not yet consumed.
    pub fn data(&self) -> &[u8] {
        &self.v[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.v.len()
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(self.pos + n <= self.v.len());
        self.pos += n;
        if self.pos == self.v.len() {
            self.v.clear();
            self.pos = 0;
        }
    }

    /// Append `bytes` behind the unread ones, moving those to the front
    /// first when the end has no room (and growing only when that is
    /// not enough).
    pub fn push(&mut self, bytes: &[u8]) {
        if self.v.capacity() - self.v.len() < bytes.len() && self.pos > 0 {
            self.v.copy_within(self.pos.., 0);
            self.v.truncate(self.v.len() - self.pos);
            self.pos = 0;
        }
        self.v.extend_from_slice(bytes);
    }

    /// The storage and the offset of its first unread byte, leaving this
    /// buffer empty and without storage.
    pub fn take_parts(&mut self) -> (Vec<u8>, usize) {
        (std::mem::take(&mut self.v), std::mem::take(&mut self.pos))
    }

    /// Drop every unread byte.
    pub fn clear(&mut self) {
        self.v.clear();
        self.pos = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_bounds() {
        let pool = BufPool::new();
        let a = pool.get();
        assert_eq!(a.capacity(), BUF_SIZE);
        let ptr = a.as_ptr();
        pool.put(a);
        assert_eq!(pool.free_count(), 1);
        let again = pool.get();
        assert_eq!(again.as_ptr(), ptr);
        pool.put(Vec::new());
        assert_eq!(pool.free_count(), 0);
        pool.put(Vec::with_capacity(2 * BUF_SIZE));
        assert_eq!(pool.free_count(), 0);
    }

    #[test]
    fn pushed_bytes_move_down_before_the_buffer_grows() {
        let mut b = Buf::new(Vec::with_capacity(8));
        b.push(b"abcdef");
        b.consume(4);
        b.push(b"ghijkl");
        assert_eq!(b.data(), b"efghijkl");
        assert_eq!(b.into_inner().capacity(), 8, "moved down, not grown");
        let mut b = Buf::new(Vec::with_capacity(4));
        b.push(b"abc");
        b.push(b"defg");
        assert_eq!(b.data(), b"abcdefg");
        b.consume(7);
        assert!(b.is_empty());
    }
}
