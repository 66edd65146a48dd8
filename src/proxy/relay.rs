//! Streaming one message body from a source to a destination, in whatever
//! framing it arrived in, without ever holding more than one buffer of it.
//!
//! Owns: the body copy loop, its idle timeouts, re-framing (chunked to
//! close-delimited for HTTP/1.0 clients, close-delimited to chunked for
//! HTTP/1.1 clients) and detecting truncation. Does not own: heads or
//! deciding the framing.

use std::io;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::time::Instant;

use crate::http::chunked::{ChunkError, ChunkedDecoder, LAST_CHUNK, write_chunk_header};
use crate::net::buffer::{BUF_SIZE, Buf, flush};

/// How the body arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyIn {
    Length(u64),
    Chunked,
    /// Until the source closes (responses only).
    UntilClose,
}

/// How the body leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOut {
    /// Byte for byte, framing included.
    Verbatim,
    /// Chunk data only (for a close-delimited HTTP/1.0 response).
    Dechunk,
    /// Wrapped in chunks, with a last-chunk at the end.
    Rechunk,
}

/// Body bytes are copied behind the head (or behind earlier body bytes) as
/// long as everything fits in one buffer, and leave in one send; what does
/// not fit leaves from the read buffer, in one vectored write with what is
/// queued before it (a 64 KiB POST went from 0.79x to 0.87x nginx's req/s
/// when its head stopped leaving in a send of its own). Copying 16 KiB
/// costs less than a second send: with a 16 KiB threshold, 16 KiB
/// responses went out as two sends and coregate ran at 0.79x nginx's
/// req/s; coalescing up to the buffer size made it 1.26x at 0.74x the CPU
/// per request (scripts/compare-nginx.sh --body 16384, 3 rounds).
const COALESCE_BYTES: usize = BUF_SIZE;

/// Room kept free in `out` for chunk framing around copied data.
const FRAMING_SLACK: usize = 32;

/// Which side failed, and how. The caller maps these to status codes and
/// to whether either connection may be reused.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("source closed before the body ended")]
    SrcClosed,
    #[error("source read failed: {0}")]
    SrcIo(io::Error),
    #[error("source idle past its timeout")]
    SrcTimeout,
    #[error("source still sending at its deadline")]
    SrcDeadline,
    #[error("body passes its cap of {0} bytes")]
    TooLarge(u64),
    #[error("invalid chunked framing: {0}")]
    Framing(ChunkError),
    #[error("destination write failed: {0}")]
    DstIo(io::Error),
    #[error("destination stalled past its timeout")]
    DstTimeout,
}

impl RelayError {
    /// True when the source side is at fault.
    pub fn is_source(&self) -> bool {
        !matches!(self, RelayError::DstIo(_) | RelayError::DstTimeout)
    }
}

/// Time and size bounds of one relay.
pub struct Bounds {
    /// Longest silence from the source.
    pub read: Duration,
    /// Longest stall writing to the destination.
    pub write: Duration,
    /// When the source must have sent the whole body (a request's total
    /// deadline); `None` for no deadline.
    pub deadline: Option<Instant>,
    /// Largest body: a chunked body crossing it stops the relay at once
    /// (a length body is checked against it before the relay starts).
    pub max_len: u64,
}

impl Bounds {
    pub fn new(read: Duration, write: Duration) -> Self {
        Bounds {
            read,
            write,
            deadline: None,
            max_len: u64::MAX,
        }
    }

    /// Read from `src` into `buf`, within the idle timeout and the
    /// deadline.
    pub async fn read<R: AsyncReadRent>(
        &self,
        src: &mut R,
        buf: &mut Buf,
    ) -> Result<usize, RelayError> {
        let idle = Instant::now() + self.read;
        let until = self.deadline.map_or(idle, |d| d.min(idle));
        match monoio::time::timeout_at(until, buf.read_from(src)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(RelayError::SrcIo(e)),
            Err(_) if until < idle => Err(RelayError::SrcDeadline),
            Err(_) => Err(RelayError::SrcTimeout),
        }
    }
}

async fn write_out<W: AsyncWriteRent>(
    dst: &mut W,
    out: &mut Vec<u8>,
    t: &Bounds,
) -> Result<(), RelayError> {
    match monoio::time::timeout(t.write, flush(dst, out)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RelayError::DstIo(e)),
        Err(_) => Err(RelayError::DstTimeout),
    }
}

/// The framing of one body, without I/O: told the bytes that arrived, it
/// says how many belong to the body, whether the body ended, and (when the
/// framing changes on the way) writes the re-framed bytes out. The async
/// [`relay`] drives it from reads and writes; a completion-driven caller
/// drives it from receive completions.
pub struct Framer {
    body_in: BodyIn,
    body_out: BodyOut,
    /// Length body: bytes still to come.
    remaining: u64,
    decoder: ChunkedDecoder,
    /// Body bytes seen (chunk data for a chunked body).
    total: u64,
    max_len: u64,
}

/// What [`Framer::step`] made of the bytes it was shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input that belong to the body (and are used up).
    pub consumed: usize,
    /// The output is the input unchanged: the caller forwards
    /// `data[..consumed]` itself. Otherwise the re-framed bytes are
    /// already in `out`.
    pub verbatim: bool,
    /// The body has ended.
    pub done: bool,
}

impl Framer {
    /// A body arriving as `body_in` and leaving as `body_out`; a chunked
    /// body crossing `max_len` bytes of data is refused as it does.
    pub fn new(body_in: BodyIn, body_out: BodyOut, max_len: u64) -> Self {
        debug_assert!(!(body_in != BodyIn::Chunked && body_out == BodyOut::Dechunk));
        Framer {
            body_in,
            body_out,
            remaining: match body_in {
                BodyIn::Length(n) => n,
                _ => 0,
            },
            decoder: ChunkedDecoder::new(),
            total: 0,
            max_len,
        }
    }

    /// Take the body's part of `data`. Re-framed output goes into `out`,
    /// which is kept within one buffer: a step may consume less than all
    /// of the body bytes in `data` when `out` is full (send it, then step
    /// again).
    pub fn step(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Step, RelayError> {
        let room = BUF_SIZE.saturating_sub(out.len() + FRAMING_SLACK);
        let (consumed, done) = match (self.body_in, self.body_out) {
            (BodyIn::Length(_), _) => {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= take as u64;
                (take, self.remaining == 0)
            }
            (BodyIn::Chunked, BodyOut::Dechunk) => {
                let window = &data[..data.len().min(room)];
                let n = self
                    .decoder
                    .decode(window, |r| out.extend_from_slice(&window[r]))
                    .map_err(RelayError::Framing)?;
                (n, self.decoder.is_done())
            }
            (BodyIn::Chunked, _) => {
                let n = self
                    .decoder
                    .decode(data, |_| {})
                    .map_err(RelayError::Framing)?;
                (n, self.decoder.is_done())
            }
            (BodyIn::UntilClose, BodyOut::Rechunk) => (data.len().min(room), false),
            (BodyIn::UntilClose, _) => (data.len(), false),
        };
        if self.decoder.data_len > self.max_len {
            return Err(RelayError::TooLarge(self.max_len));
        }
        self.total = match self.body_in {
            BodyIn::Chunked => self.decoder.data_len,
            _ => self.total + consumed as u64,
        };
        if self.body_out == BodyOut::Rechunk && consumed > 0 {
            write_chunk_header(out, consumed);
            out.extend_from_slice(&data[..consumed]);
            out.extend_from_slice(b"\r\n");
        }
        Ok(Step {
            consumed,
            verbatim: self.body_out == BodyOut::Verbatim,
            done,
        })
    }

    /// The source closed. A close-delimited body ends here (its last chunk
    /// goes into `out` when re-chunked); any other is truncated.
    pub fn at_eof(&mut self, out: &mut Vec<u8>) -> Result<(), RelayError> {
        if self.body_in != BodyIn::UntilClose {
            return Err(RelayError::SrcClosed);
        }
        if self.body_out == BodyOut::Rechunk {
            out.extend_from_slice(LAST_CHUNK);
        }
        Ok(())
    }

    /// Body bytes so far: chunk data for a chunked body, all of it for
    /// the others.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Relay one body from `src` to `dst`.
///
/// `buf` holds bytes already read from `src` (the body may start there)
/// and, on return, any bytes read past the body's end (the next message).
/// `out` may hold a head to send first; small body bytes are appended to it
/// so head and body leave in one write. Returns the body bytes relayed.
pub async fn relay<R: AsyncReadRent, W: AsyncWriteRent>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
    body_in: BodyIn,
    body_out: BodyOut,
    t: &Bounds,
) -> Result<u64, RelayError> {
    let mut framer = Framer::new(body_in, body_out, t.max_len);
    loop {
        let step = framer.step(buf.data(), out)?;
        let take = step.consumed;
        if step.verbatim && out.len() + take <= COALESCE_BYTES {
            out.extend_from_slice(&buf.data()[..take]);
            buf.consume(take);
        } else if step.verbatim {
            // What is queued in `out` (a head, say) and this body part
            // leave in one vectored write.
            match monoio::time::timeout(t.write, buf.write_after(dst, out, take)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(RelayError::DstIo(e)),
                Err(_) => return Err(RelayError::DstTimeout),
            }
        } else {
            buf.consume(take);
        }
        if step.done {
            write_out(dst, out, t).await?;
            return Ok(framer.total());
        }
        if !buf.is_empty() {
            // `out` was full: send it and go on with what is buffered.
            write_out(dst, out, t).await?;
            continue;
        }
        // Send what we have before waiting: the peer may need it to go on.
        write_out(dst, out, t).await?;
        match t.read(src, buf).await {
            Ok(0) => {
                framer.at_eof(out)?;
                write_out(dst, out, t).await?;
                return Ok(framer.total());
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::buffer::{lent_bytes, lent_slices};

    /// A destination that collects everything written to it.
    struct Sink(Vec<u8>);

    impl AsyncWriteRent for Sink {
        async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
            let s = lent_bytes(&buf);
            self.0.extend_from_slice(s);
            (Ok(s.len()), buf)
        }
        async fn writev<T: monoio::buf::IoVecBuf>(
            &mut self,
            buf: T,
        ) -> monoio::BufResult<usize, T> {
            let mut n = 0;
            for s in lent_slices(&buf) {
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

    async fn run(
        input: &[u8],
        body_in: BodyIn,
        body_out: BodyOut,
    ) -> (Result<u64, RelayError>, Vec<u8>, Vec<u8>) {
        run_capped(input, body_in, body_out, u64::MAX).await
    }

    /// `run` with a body cap.
    async fn run_capped(
        input: &[u8],
        body_in: BodyIn,
        body_out: BodyOut,
        max_len: u64,
    ) -> (Result<u64, RelayError>, Vec<u8>, Vec<u8>) {
        let mut src: &[u8] = input;
        let mut buf = Buf::new(Vec::with_capacity(BUF_SIZE));
        let mut sink = Sink(Vec::new());
        let mut out = Vec::with_capacity(BUF_SIZE);
        let mut t = Bounds::new(Duration::from_secs(1), Duration::from_secs(1));
        t.max_len = max_len;
        let r = relay(
            &mut src, &mut buf, &mut sink, &mut out, body_in, body_out, &t,
        )
        .await;
        (r, sink.0, buf.data().to_vec())
    }

    #[monoio::test(enable_timer = true)]
    async fn length_body_leaves_next_message_in_buffer() {
        let (r, sent, rest) = run(b"helloGET", BodyIn::Length(5), BodyOut::Verbatim).await;
        assert_eq!(r.unwrap(), 5);
        assert_eq!(sent, b"hello");
        assert_eq!(rest, b"GET");
    }

    #[monoio::test(enable_timer = true)]
    async fn truncated_length_body_is_an_error() {
        let (r, _, _) = run(b"hel", BodyIn::Length(5), BodyOut::Verbatim).await;
        assert!(matches!(r, Err(RelayError::SrcClosed)));
    }

    #[monoio::test(enable_timer = true)]
    async fn chunked_verbatim_and_dechunked() {
        let input = b"5\r\nhello\r\n0\r\n\r\nNEXT";
        let (r, sent, rest) = run(input, BodyIn::Chunked, BodyOut::Verbatim).await;
        assert_eq!(r.unwrap(), 5);
        assert_eq!(sent, &input[..15]);
        assert_eq!(rest, b"NEXT");
        let (_, sent, _) = run(input, BodyIn::Chunked, BodyOut::Dechunk).await;
        assert_eq!(sent, b"hello");
    }

    #[monoio::test(enable_timer = true)]
    async fn close_delimited_is_rechunked() {
        let (r, sent, _) = run(b"abc", BodyIn::UntilClose, BodyOut::Rechunk).await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(sent, b"3\r\nabc\r\n0\r\n\r\n");
    }

    #[monoio::test(enable_timer = true)]
    async fn chunked_body_stops_as_it_crosses_its_cap() {
        let input = b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n";
        let (r, _, _) = run_capped(input, BodyIn::Chunked, BodyOut::Verbatim, 9).await;
        assert!(matches!(r, Err(RelayError::TooLarge(9))), "{r:?}");
        let (r, _, _) = run_capped(input, BodyIn::Chunked, BodyOut::Verbatim, 10).await;
        assert_eq!(r.expect("at the cap"), 10);
    }

    /// A source that never sends anything.
    struct Silent;

    impl AsyncReadRent for Silent {
        async fn read<T: monoio::buf::IoBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
            std::future::pending::<()>().await;
            (Ok(0), buf)
        }
        async fn readv<T: monoio::buf::IoVecBufMut>(
            &mut self,
            buf: T,
        ) -> monoio::BufResult<usize, T> {
            std::future::pending::<()>().await;
            (Ok(0), buf)
        }
    }

    #[monoio::test(enable_timer = true)]
    async fn the_deadline_is_told_from_an_idle_timeout() {
        let mut buf = Buf::new(Vec::with_capacity(64));
        let mut t = Bounds::new(Duration::from_millis(20), Duration::from_secs(1));
        assert!(matches!(
            t.read(&mut Silent, &mut buf).await,
            Err(RelayError::SrcTimeout)
        ));
        // A read cut short loses its buffer (the caller then closes).
        let mut buf = Buf::new(Vec::with_capacity(64));
        t.deadline = Some(Instant::now() + Duration::from_millis(5));
        assert!(matches!(
            t.read(&mut Silent, &mut buf).await,
            Err(RelayError::SrcDeadline)
        ));
    }

    /// Feed `input` to a framer in pieces of `piece` bytes, as receive
    /// completions would deliver it: the body's bytes as they leave, the
    /// bytes left over after its end, and the body length.
    fn frame_in_pieces(
        input: &[u8],
        body_in: BodyIn,
        body_out: BodyOut,
        piece: usize,
    ) -> (Vec<u8>, Vec<u8>, u64) {
        let mut framer = Framer::new(body_in, body_out, u64::MAX);
        let mut sent = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        loop {
            let mut out = Vec::new();
            let step = framer.step(&pending, &mut out).expect("valid body");
            if step.verbatim {
                sent.extend_from_slice(&pending[..step.consumed]);
            }
            sent.extend_from_slice(&out);
            pending.drain(..step.consumed);
            if step.done {
                pending.extend_from_slice(&input[fed..]);
                return (sent, pending, framer.total());
            }
            if fed == input.len() {
                let mut out = Vec::new();
                framer.at_eof(&mut out).expect("a close-delimited body");
                sent.extend_from_slice(&out);
                return (sent, pending, framer.total());
            }
            let next = (fed + piece).min(input.len());
            pending.extend_from_slice(&input[fed..next]);
            fed = next;
        }
    }

    #[test]
    fn the_framer_gives_one_answer_whatever_the_pieces() {
        let chunked = b"5\r\nhello\r\n3;ext=1\r\n, w\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        /// `(input, in, out, body as it leaves, bytes left after it, length)`
        type Case<'a> = (&'a [u8], BodyIn, BodyOut, &'a [u8], &'a [u8], u64);
        let cases: [Case<'_>; 5] = [
            (
                b"helloNEXT",
                BodyIn::Length(5),
                BodyOut::Verbatim,
                b"hello",
                b"NEXT",
                5,
            ),
            (
                chunked,
                BodyIn::Chunked,
                BodyOut::Verbatim,
                &chunked[..chunked.len() - 4],
                b"NEXT",
                8,
            ),
            (
                chunked,
                BodyIn::Chunked,
                BodyOut::Dechunk,
                b"hello, w",
                b"NEXT",
                8,
            ),
            (
                b"abcdef",
                BodyIn::UntilClose,
                BodyOut::Verbatim,
                b"abcdef",
                b"",
                6,
            ),
            (
                b"abc",
                BodyIn::UntilClose,
                BodyOut::Rechunk,
                b"3\r\nabc\r\n0\r\n\r\n",
                b"",
                3,
            ),
        ];
        for (input, body_in, body_out, body, rest, total) in cases {
            for piece in [1, 2, 3, 7, input.len()] {
                let (sent, left, n) = frame_in_pieces(input, body_in, body_out, piece);
                // Rechunking frames each piece as its own chunk: compare
                // the data, not the chunk boundaries, for that case.
                if body_out == BodyOut::Rechunk {
                    let mut plain = Vec::new();
                    let mut d = ChunkedDecoder::new();
                    d.decode(&sent, |r| plain.extend_from_slice(&sent[r]))
                        .unwrap();
                    assert!(d.is_done(), "{body_in:?} in pieces of {piece}");
                    assert_eq!(plain, b"abc");
                } else {
                    assert_eq!(sent, body, "{body_in:?}/{body_out:?} in pieces of {piece}");
                }
                assert_eq!(left, rest, "{body_in:?} in pieces of {piece}");
                assert_eq!(n, total, "{body_in:?} in pieces of {piece}");
            }
        }
    }

    #[test]
    fn a_truncated_body_is_told_from_a_close_delimited_one() {
        let mut out = Vec::new();
        let mut f = Framer::new(BodyIn::Length(5), BodyOut::Verbatim, u64::MAX);
        f.step(b"hel", &mut out).unwrap();
        assert!(matches!(f.at_eof(&mut out), Err(RelayError::SrcClosed)));
        let mut f = Framer::new(BodyIn::Chunked, BodyOut::Verbatim, u64::MAX);
        f.step(b"5\r\nhel", &mut out).unwrap();
        assert!(matches!(f.at_eof(&mut out), Err(RelayError::SrcClosed)));
    }

    #[monoio::test(enable_timer = true)]
    async fn large_body_streams_through_bounded_buffers() {
        let body = vec![b'x'; 3 * BUF_SIZE + 17];
        let (r, sent, _) = run(&body, BodyIn::Length(body.len() as u64), BodyOut::Verbatim).await;
        assert_eq!(r.unwrap(), body.len() as u64);
        assert_eq!(sent.len(), body.len());
    }
}
