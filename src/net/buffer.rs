//! Per-worker buffer pool and the read buffer type connections use.
//!
//! Owns: handing out fixed-size byte buffers and taking them back, and
//! [`Buf`], a buffer with a consumed offset that reads through monoio's
//! owned-buffer API. Does not own: what the bytes mean.
//!
//! Each worker has its own pool (no locks, no atomics). A connection holds
//! a buffer only while a request is in flight; an idle keep-alive
//! connection holds none, which is what keeps idle connections cheap.

use std::cell::RefCell;
use std::io;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

/// Size of every pooled buffer. Bodies are relayed in reads of up to this
/// size: 64 KiB matches the kernel's default socket buffer growth and
/// halves syscalls per MiB against HAProxy's 16 KiB at the same copy cost.
pub const BUF_SIZE: usize = 64 * 1024;

/// Free buffers a worker keeps for reuse; beyond this they are freed, so a
/// burst does not pin memory forever (64 MiB per worker at most).
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

    /// Take a vector back. One smaller than the pool's size (a buffer lost
    /// to a cancelled read has none) or grown past four times it is dropped
    /// instead, so the pool neither hands out short buffers nor pins a
    /// burst's largest ones.
    pub fn put(&self, mut v: Vec<T>) {
        if v.capacity() < self.capacity || v.capacity() > 4 * self.capacity {
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

    /// Drop every unread byte.
    pub fn clear(&mut self) {
        self.v.clear();
        self.pos = 0;
    }

    /// Make room for at least `additional` more bytes (a body held whole;
    /// the pool frees such a grown buffer instead of keeping it).
    pub fn reserve(&mut self, additional: usize) {
        self.v.reserve(additional);
    }

    /// Bytes that can be read in before the buffer is full.
    pub fn spare(&self) -> usize {
        self.v.capacity() - self.v.len() + self.pos
    }

    /// No room is left to read into, even after moving unread bytes down.
    pub fn is_full(&self) -> bool {
        self.pos == 0 && self.v.len() == self.v.capacity()
    }

    /// Read once from `r`, appending to the unread bytes. `Ok(0)` is EOF.
    /// If the future is dropped mid-read the buffer is gone with it; the
    /// caller then closes the connection.
    pub async fn read_from<R: AsyncReadRent>(&mut self, r: &mut R) -> io::Result<usize> {
        if self.pos > 0 && self.v.len() == self.v.capacity() {
            self.v.copy_within(self.pos.., 0);
            self.v.truncate(self.v.len() - self.pos);
            self.pos = 0;
        }
        // While the vector is lent to the kernel, `self` reads as empty; if
        // this future is dropped mid-read it stays empty and consistent.
        let pos = std::mem::take(&mut self.pos);
        let v = std::mem::take(&mut self.v);
        let (len, cap) = (v.len(), v.capacity());
        if len == cap {
            self.v = v;
            self.pos = pos;
            return Err(io::Error::other("read buffer full"));
        }
        let (res, slice) = r.read(v.slice_mut(len..cap)).await;
        self.v = slice.into_inner();
        self.pos = pos;
        res
    }

    /// Write unread bytes `[0, n)` to `w` and consume them.
    pub async fn write_to<W: AsyncWriteRent>(&mut self, w: &mut W, n: usize) -> io::Result<()> {
        debug_assert!(n <= self.data().len());
        let start = std::mem::take(&mut self.pos);
        let v = std::mem::take(&mut self.v);
        let (res, slice) = w.write_all(v.slice(start..start + n)).await;
        self.v = slice.into_inner();
        self.pos = start;
        res?;
        self.consume(n);
        Ok(())
    }
}

/// Write all of `out` to `w`, then clear it, keeping its capacity.
pub async fn flush<W: AsyncWriteRent>(w: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let v = std::mem::take(out);
    let (res, mut v) = w.write_all(v).await;
    v.clear();
    *out = v;
    res.map(|_| ())
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
        pool.put(Vec::with_capacity(5 * BUF_SIZE));
        assert_eq!(pool.free_count(), 0);
    }

    #[monoio::test]
    async fn buf_reads_appends_and_compacts() {
        let mut b = Buf::new(Vec::with_capacity(8));
        let mut src: &[u8] = b"abcdefghij";
        assert_eq!(b.read_from(&mut src).await.unwrap(), 8);
        assert!(b.is_full());
        b.consume(6);
        assert_eq!(b.data(), b"gh");
        assert_eq!(b.read_from(&mut src).await.unwrap(), 2);
        assert_eq!(b.data(), b"ghij");
    }
}
