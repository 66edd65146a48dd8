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

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

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

    /// Write `head`, then unread bytes `[0, n)`, in one vectored write
    /// (one send for a head and the body behind it), and consume both.
    /// An empty `head` is a plain [`Buf::write_to`].
    pub async fn write_after<W: AsyncWriteRent>(
        &mut self,
        w: &mut W,
        head: &mut Vec<u8>,
        n: usize,
    ) -> io::Result<()> {
        if head.is_empty() {
            return self.write_to(w, n).await;
        }
        debug_assert!(n <= self.data().len());
        let mut pair = HeadAndBody::new(
            std::mem::take(head),
            std::mem::take(&mut self.v),
            self.pos,
            n,
        );
        // Not monoio's `write_vectored_all`: its 0.2.4 `VecMeta::consume`
        // shortens a partly written iovec without advancing its base, so
        // after a partial write it sends that iovec's first bytes again.
        let mut res = Ok(());
        while pair.remaining() > 0 {
            let (r, p) = w.writev(pair).await;
            pair = p;
            match r {
                Ok(0) => {
                    res = Err(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(written) => pair.advance(written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        let (mut h, v) = (pair.head, pair.body);
        h.clear();
        *head = h;
        self.v = v;
        res?;
        self.consume(n);
        Ok(())
    }
}

/// Two owned vectors lent to a vectored write: all of `head`, then
/// `body[start..start + len]`; `iov[first..]` is what is left to write.
///
/// The iovecs are boxed: io_uring reads them when the ring is submitted,
/// after monoio has moved the operation (and this value with it) into the
/// awaiting future, so they must not live inside the value itself.
struct HeadAndBody {
    head: Vec<u8>,
    body: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
    first: usize,
}

impl HeadAndBody {
    fn new(head: Vec<u8>, body: Vec<u8>, start: usize, len: usize) -> Self {
        assert!(start + len <= body.len());
        let iov = Box::new([
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                // SAFETY: start + len <= body.len(), checked above.
                iov_base: unsafe { body.as_ptr().add(start) } as *mut libc::c_void,
                iov_len: len,
            },
        ]);
        HeadAndBody {
            head,
            body,
            iov,
            first: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.iov[self.first..].iter().map(|v| v.iov_len).sum()
    }

    /// Drop the first `n` bytes left to write.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iov.len() {
            let v = &mut self.iov[self.first];
            let step = n.min(v.iov_len);
            // SAFETY: step <= iov_len, so the base stays within its vector.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(step) }.cast();
            v.iov_len -= step;
            n -= step;
            if v.iov_len == 0 {
                self.first += 1;
            }
        }
    }
}

// SAFETY: the iovecs point into the two vectors' heap storage, which this
// value owns and never changes while it exists, and they live in a box of
// their own: moving the value moves neither.
unsafe impl monoio::buf::IoVecBuf for HeadAndBody {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.first..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.first
    }
}

/// The byte slices a vectored buffer lends to a write, in order (empty
/// ones skipped: their base may be null).
pub fn lent_slices<T: IoVecBuf>(buf: &T) -> impl Iterator<Item = &[u8]> {
    // SAFETY: IoVecBuf guarantees read_iovec_len valid iovecs, each valid
    // for iov_len bytes while `buf` is borrowed.
    let iovs = unsafe { std::slice::from_raw_parts(buf.read_iovec_ptr(), buf.read_iovec_len()) };
    iovs.iter()
        .filter(|v| v.iov_len > 0)
        .map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
}

/// The bytes a buffer lends to a write (test writers).
#[cfg(test)]
pub fn lent_bytes<T: IoBuf>(buf: &T) -> &[u8] {
    // SAFETY: IoBuf guarantees read_ptr is valid for bytes_init bytes.
    unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) }
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

    /// Takes at most 5 bytes per call, so every write is partial.
    struct Trickle(Vec<u8>);

    impl AsyncWriteRent for Trickle {
        async fn write<T: IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
            let s = &lent_bytes(&buf)[..buf.bytes_init().min(5)];
            self.0.extend_from_slice(s);
            (Ok(s.len()), buf)
        }
        async fn writev<T: IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
            let mut n = 0;
            for s in lent_slices(&buf) {
                let s = &s[..s.len().min(5 - n)];
                self.0.extend_from_slice(s);
                n += s.len();
            }
            (Ok(n), buf)
        }
        async fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        async fn shutdown(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[monoio::test]
    async fn head_and_body_leave_together_through_partial_writes() {
        let mut b = Buf::new(Vec::with_capacity(32));
        let mut src: &[u8] = b"xxbody-bytes|next";
        b.read_from(&mut src).await.unwrap();
        b.consume(2);
        let mut head = b"HEAD\r\n".to_vec();
        let mut w = Trickle(Vec::new());
        b.write_after(&mut w, &mut head, 10).await.unwrap();
        assert_eq!(w.0, b"HEAD\r\nbody-bytes");
        assert!(head.is_empty() && head.capacity() >= 6);
        assert_eq!(b.data(), b"|next");
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
