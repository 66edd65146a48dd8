//! The decode guard: whether a request body's content codings inflate it
//! past what a route allows, found by decoding it and discarding the output.
//!
//! Owns: parsing Content-Encoding, the chain of decoders for stacked
//! codings, and the size limit. Does not own: reading the body, the body
//! cap, or what to answer when a body fails.
//!
//! The decoded body is never kept: a small body can stand for gigabytes,
//! so memory is one scratch buffer plus each decoder's own state, whatever
//! the body decodes to. Decoding stops the moment the limit is passed.
//! Brotli's state includes its window, which the stream chooses: up to
//! 16 MiB (4 MiB at encoders' default), where gzip and deflate need 32 KiB.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Cursor, Read};

use flate2::bufread::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

/// Most codings one body may stack. Each one costs a decoder's state, and
/// no honest client stacks more than two.
pub const MAX_CODINGS: usize = 4;

/// What decoded output is read into and thrown away: large enough that
/// per-read overhead does not count, small enough for the worker's stack.
const SCRATCH_SIZE: usize = 16 * 1024;

/// Buffer between two decoders of a stack; only stacked codings pay it.
const LINK_SIZE: usize = 8 * 1024;

/// Input buffer of the brotli decoder.
const BROTLI_BUF_SIZE: usize = 4096;

/// One content coding of a request body, as named in Content-Encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Br,
    Identity,
}

impl Coding {
    /// Parse one token of a Content-Encoding field value, case-insensitively,
    /// trimmed of optional whitespace; `x-gzip` is gzip (RFC 9110 8.4.1.3). None for anything else.
    pub fn parse(token: &[u8]) -> Option<Coding> {
        let token = trim_ows_end(trim_ows_start(token));
        if token.eq_ignore_ascii_case(b"gzip") || token.eq_ignore_ascii_case(b"x-gzip") {
            Some(Coding::Gzip)
        } else if token.eq_ignore_ascii_case(b"deflate") {
            Some(Coding::Deflate)
        } else if token.eq_ignore_ascii_case(b"br") {
            Some(Coding::Br)
        } else if token.eq_ignore_ascii_case(b"identity") {
            Some(Coding::Identity)
        } else {
            None
        }
    }
}

/// OWS is SP and HTAB only (RFC 9110 5.6.3); trimming CR or LF as well would
/// accept what the head parser should have refused.
fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_ows(b)).unwrap_or(s.len());
    &s[start..]
}

fn trim_ows_end(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&b| !is_ows(b)).map_or(0, |i| i + 1);
    &s[..end]
}

/// Parse a whole Content-Encoding list value (comma-separated, possibly
/// several field lines already joined by the caller with ", ") into `out`,
/// in the order written. Err(()) when a token is unknown or empty tokens only, or when
/// more than MAX_CODINGS codings are stacked.
///
/// `out` is cleared first, and left empty on Err. Empty elements ("gzip, ,
/// br") are skipped, as RFC 9110 5.6.1 asks of list recipients.
// The caller has one answer for every bad value (refuse the request), so
// the error carries nothing.
#[allow(clippy::result_unit_err)]
pub fn parse_codings(value: &[u8], out: &mut Vec<Coding>) -> Result<(), ()> {
    out.clear();
    let result = parse_into(value, out);
    if result.is_err() {
        out.clear();
    }
    result
}

fn parse_into(value: &[u8], out: &mut Vec<Coding>) -> Result<(), ()> {
    for token in value.split(|&b| b == b',') {
        if trim_ows_start(token).is_empty() {
            continue;
        }
        // Identity counts too: a list this long is never honest, whatever
        // it holds.
        if out.len() == MAX_CODINGS {
            return Err(());
        }
        out.push(Coding::parse(token).ok_or(())?);
    }
    if out.is_empty() { Err(()) } else { Ok(()) }
}

#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Decoded size may be at most `ratio` times the encoded size...
    pub ratio: u64,
    /// ...and at most this many bytes.
    pub max: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("decoded body passes {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("body is not valid {0:?} data")]
    Corrupt(Coding),
}

/// Decode `body` (encoded with `codings`, applied in the order listed, so decoded in reverse) and
/// return the decoded size, or TooLarge as soon as the decoded output passes
/// min(ratio * body.len(), max). Stops reading at that point (never decodes the rest).
///
/// Truncated streams and bytes after the end of a stream are Corrupt: the
/// origin would refuse them too, and a guard that passed them would let a
/// body through that it never fully decoded.
pub fn check(body: &[u8], codings: &[Coding], limits: DecodeLimits) -> Result<u64, DecodeError> {
    let limit = limits
        .ratio
        .saturating_mul(body.len() as u64)
        .min(limits.max);
    // Identity layers change nothing, so they get no reader.
    let mut layers = codings.iter().rev().filter(|&&c| c != Coding::Identity);
    let Some(&innermost) = layers.next() else {
        return within(body.len() as u64, limit);
    };
    // The first layer to fail records itself here. An error travels out
    // through every layer above it, and the layers above cannot tell it from
    // their own, so the innermost report is the true one.
    let failed = Cell::new(None);
    let corrupt = || DecodeError::Corrupt(failed.get().unwrap_or(codings[0]));

    let mut reader = decoder(innermost, Box::new(body), &failed).map_err(|_| corrupt())?;
    for &coding in layers {
        let input = Box::new(BufReader::with_capacity(LINK_SIZE, reader));
        reader = decoder(coding, input, &failed).map_err(|_| corrupt())?;
    }

    let mut scratch = [0u8; SCRATCH_SIZE];
    let mut total: u64 = 0;
    loop {
        // Ask for no more than one byte past the limit, so a bomb is cut off
        // at the limit rather than a scratch buffer later.
        let want = (limit - total).saturating_add(1).min(SCRATCH_SIZE as u64) as usize;
        match reader.read(&mut scratch[..want]) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                total += n as u64;
                within(total, limit)?;
            }
            Err(_) => return Err(corrupt()),
        }
    }
}

fn within(decoded: u64, limit: u64) -> Result<u64, DecodeError> {
    if decoded > limit {
        Err(DecodeError::TooLarge { limit })
    } else {
        Ok(decoded)
    }
}

/// The decoder for one coding, reading the encoded bytes from `input`.
/// Fails only when reading the first bytes of a deflate layer's input fails,
/// which is the layer below failing (and recording itself).
fn decoder<'a>(
    coding: Coding,
    mut input: Box<dyn BufRead + 'a>,
    failed: &'a Cell<Option<Coding>>,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match coding {
        Coding::Gzip => Box::new(Layer::new(MultiGzDecoder::new(input), coding, failed)),
        Coding::Deflate => {
            let (head, n) = peek2(&mut input)?;
            let input = Cursor::new(head).take(n as u64).chain(input);
            if n == 2 && is_zlib_header(head) {
                Box::new(Layer::new(ZlibDecoder::new(input), coding, failed))
            } else {
                Box::new(Layer::new(DeflateDecoder::new(input), coding, failed))
            }
        }
        Coding::Br => {
            let d = brotli_decompressor::Decompressor::new(input, BROTLI_BUF_SIZE);
            Box::new(Layer::new(d, coding, failed))
        }
        Coding::Identity => Box::new(input),
    })
}

/// Up to the first two bytes of `input`, taken out of it. A layer below may
/// hand them over one at a time, so one fill_buf is not enough.
fn peek2(input: &mut dyn BufRead) -> io::Result<([u8; 2], usize)> {
    let mut head = [0u8; 2];
    let mut n = 0;
    while n < 2 {
        match input.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok((head, n))
}

/// RFC 1950 header: method 8 (deflate), window at most 32 KiB, and a check
/// value making CMF*256+FLG a multiple of 31. HTTP's "deflate" is zlib
/// (RFC 9110 8.4.1.2), but some clients send raw deflate. No raw stream an
/// encoder writes starts like this: low nibble 8 would be a stored block
/// with its padding bits set, and encoders write them as zero.
fn is_zlib_header([cmf, flg]: [u8; 2]) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) * 256 + u16::from(flg)) % 31 == 0
}

/// A decoder that can tell, once its stream has ended, whether it took all
/// of its input.
trait Decode: Read {
    /// Called once, after read returned end of stream.
    fn took_all(&mut self, scratch: &mut [u8]) -> io::Result<bool>;
}

// The flate2 decoders stop at the end of the deflate stream and leave what
// follows in their input. (Gzip reads what follows as a next member and
// fails itself; checking costs nothing.)
impl<R: BufRead> Decode for MultiGzDecoder<R> {
    fn took_all(&mut self, _: &mut [u8]) -> io::Result<bool> {
        Ok(self.get_mut().fill_buf()?.is_empty())
    }
}

impl<R: BufRead> Decode for ZlibDecoder<R> {
    fn took_all(&mut self, _: &mut [u8]) -> io::Result<bool> {
        Ok(self.get_mut().fill_buf()?.is_empty())
    }
}

impl<R: BufRead> Decode for DeflateDecoder<R> {
    fn took_all(&mut self, _: &mut [u8]) -> io::Result<bool> {
        Ok(self.get_mut().fill_buf()?.is_empty())
    }
}

impl<R: BufRead> Decode for brotli_decompressor::Decompressor<R> {
    fn took_all(&mut self, scratch: &mut [u8]) -> io::Result<bool> {
        // The brotli reader keeps input in a buffer of its own and reports
        // leftovers there only on a read after the one that ended the stream.
        if self.read(scratch)? != 0 {
            return Ok(false);
        }
        Ok(self.get_mut().fill_buf()?.is_empty())
    }
}

/// One layer of the chain: its decoder, and the slot where it records that
/// it was the one that failed.
struct Layer<'a, D> {
    decoder: D,
    coding: Coding,
    failed: &'a Cell<Option<Coding>>,
    /// The end was reached and checked: further reads are end of stream.
    ended: bool,
}

impl<'a, D: Decode> Layer<'a, D> {
    fn new(decoder: D, coding: Coding, failed: &'a Cell<Option<Coding>>) -> Self {
        Layer {
            decoder,
            coding,
            failed,
            ended: false,
        }
    }

    fn read_checked(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended {
            return Ok(0);
        }
        let n = self.decoder.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if !self.decoder.took_all(buf)? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "data after the end of the stream",
                ));
            }
            self.ended = true;
        }
        Ok(n)
    }
}

impl<D: Decode> Read for Layer<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.read_checked(buf);
        if r.is_err() && self.failed.get().is_none() {
            self.failed.set(Some(self.coding));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;

    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

    const UNLIMITED: DecodeLimits = DecodeLimits {
        ratio: u64::MAX,
        max: u64::MAX,
    };

    /// Brotli (quality 11) of 100,000 bytes of 'a', made with Python's
    /// brotli module: brotli-decompressor cannot encode.
    const BR_100K_A: &[u8] = &[91, 159, 134, 129, 95, 34, 44, 30, 11, 4, 178, 252, 2, 0];

    /// Brotli of gzip (mtime 0) of "hello, world\n" * 500 (6,500 bytes),
    /// i.e. Content-Encoding "gzip, br", made with Python's gzip and brotli.
    const BR_OF_GZIP_6500: &[u8] = &[
        139, 32, 128, 31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 237, 199, 177, 9, 0, 32, 12, 0, 176, 221,
        43, 60, 192, 179, 20, 58, 20, 10, 93, 124, 223, 23, 60, 32, 217, 18, 39, 179, 214, 188,
        213, 185, 71, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 136, 200, 79, 30, 81,
        145, 20, 38, 100, 25, 0, 0, 3,
    ];

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Text that compresses, but not to nothing.
    fn text(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| b"the quick brown fox "[i % 20] ^ (i / 7 % 3) as u8)
            .collect()
    }

    fn limits(ratio: u64, max: u64) -> DecodeLimits {
        DecodeLimits { ratio, max }
    }

    fn parsed(value: &str) -> Result<Vec<Coding>, ()> {
        let mut out = vec![Coding::Br];
        parse_codings(value.as_bytes(), &mut out).map(|()| out)
    }

    #[test]
    fn parse_single_gzip() {
        assert_eq!(parsed("gzip"), Ok(vec![Coding::Gzip]));
    }

    #[test]
    fn parse_trims_whitespace_and_ignores_case() {
        assert_eq!(parsed(" GZip , br"), Ok(vec![Coding::Gzip, Coding::Br]));
        assert_eq!(parsed("\tDeflate\t"), Ok(vec![Coding::Deflate]));
    }

    #[test]
    fn parse_x_gzip_is_gzip() {
        assert_eq!(parsed("x-gzip"), Ok(vec![Coding::Gzip]));
        assert_eq!(Coding::parse(b"X-GZIP"), Some(Coding::Gzip));
    }

    #[test]
    fn parse_identity() {
        assert_eq!(parsed("identity"), Ok(vec![Coding::Identity]));
    }

    #[test]
    fn parse_unknown_is_err() {
        assert_eq!(parsed("compress"), Err(()));
        assert_eq!(parsed("gzip, zstd"), Err(()));
        assert_eq!(Coding::parse(b"g zip"), None);
        // CR and LF are not OWS.
        assert_eq!(Coding::parse(b"gzip\r"), None);
    }

    #[test]
    fn parse_empty_is_err() {
        assert_eq!(parsed(""), Err(()));
        assert_eq!(parsed(" , ,\t"), Err(()));
    }

    #[test]
    fn parse_skips_empty_elements() {
        assert_eq!(parsed("gzip, , br,"), Ok(vec![Coding::Gzip, Coding::Br]));
    }

    #[test]
    fn parse_more_than_max_is_err() {
        assert_eq!(
            parsed("gzip, gzip, gzip, gzip").map(|v| v.len()),
            Ok(MAX_CODINGS)
        );
        let mut out = Vec::new();
        assert_eq!(
            parse_codings(b"gzip, br, gzip, deflate, gzip", &mut out),
            Err(())
        );
        assert!(out.is_empty());
    }

    #[test]
    fn no_codings_or_identity_is_body_length() {
        assert_eq!(check(b"hello", &[], UNLIMITED), Ok(5));
        assert_eq!(check(b"hello", &[Coding::Identity], UNLIMITED), Ok(5));
        assert_eq!(
            check(b"hello", &[Coding::Identity], limits(1, 4)),
            Err(DecodeError::TooLarge { limit: 4 })
        );
    }

    #[test]
    fn gzip_pass_returns_exact_size() {
        let data = text(300_000);
        assert_eq!(check(&gzip(&data), &[Coding::Gzip], UNLIMITED), Ok(300_000));
    }

    #[test]
    fn gzip_concatenated_members_decode() {
        let mut body = gzip(&text(1000));
        body.extend_from_slice(&gzip(&text(234)));
        assert_eq!(check(&body, &[Coding::Gzip], UNLIMITED), Ok(1234));
    }

    #[test]
    fn gzip_bomb_stops_at_max() {
        let body = gzip(&vec![0u8; 12 << 20]);
        assert!(body.len() < 20_000, "bomb is {} bytes", body.len());
        assert_eq!(
            check(&body, &[Coding::Gzip], limits(u64::MAX, 8 << 20)),
            Err(DecodeError::TooLarge { limit: 8 << 20 })
        );
    }

    #[test]
    fn gzip_bomb_stops_at_ratio() {
        let body = gzip(&vec![0u8; 12 << 20]);
        assert_eq!(
            check(&body, &[Coding::Gzip], limits(10, 8 << 20)),
            Err(DecodeError::TooLarge {
                limit: 10 * body.len() as u64
            })
        );
    }

    #[test]
    fn equal_to_limit_passes() {
        let body = gzip(&text(50_000));
        assert_eq!(
            check(&body, &[Coding::Gzip], limits(u64::MAX, 50_000)),
            Ok(50_000)
        );
        assert_eq!(
            check(&body, &[Coding::Gzip], limits(u64::MAX, 49_999)),
            Err(DecodeError::TooLarge { limit: 49_999 })
        );
    }

    #[test]
    fn deflate_zlib_decodes() {
        let body = zlib(&text(70_000));
        assert!(is_zlib_header([body[0], body[1]]));
        assert_eq!(check(&body, &[Coding::Deflate], UNLIMITED), Ok(70_000));
    }

    #[test]
    fn deflate_raw_decodes() {
        let body = raw_deflate(&text(70_000));
        assert!(!is_zlib_header([body[0], body[1]]));
        assert_eq!(check(&body, &[Coding::Deflate], UNLIMITED), Ok(70_000));
    }

    #[test]
    fn deflate_bomb_is_too_large() {
        let body = zlib(&vec![0u8; 4 << 20]);
        assert_eq!(
            check(&body, &[Coding::Deflate], limits(u64::MAX, 1 << 20)),
            Err(DecodeError::TooLarge { limit: 1 << 20 })
        );
    }

    #[test]
    fn deflate_trailing_data_is_corrupt() {
        for mut body in [zlib(&text(5000)), raw_deflate(&text(5000))] {
            body.extend_from_slice(b"junk");
            assert_eq!(
                check(&body, &[Coding::Deflate], UNLIMITED),
                Err(DecodeError::Corrupt(Coding::Deflate))
            );
        }
    }

    #[test]
    fn deflate_truncated_is_corrupt() {
        let body = zlib(&text(5000));
        assert_eq!(
            check(&body[..body.len() - 4], &[Coding::Deflate], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Deflate))
        );
    }

    #[test]
    fn br_decodes_exact_size() {
        assert_eq!(check(BR_100K_A, &[Coding::Br], UNLIMITED), Ok(100_000));
        assert_eq!(
            check(BR_100K_A, &[Coding::Br], limits(u64::MAX, 100_000)),
            Ok(100_000)
        );
    }

    #[test]
    fn br_too_large() {
        assert_eq!(
            check(BR_100K_A, &[Coding::Br], limits(u64::MAX, 99_999)),
            Err(DecodeError::TooLarge { limit: 99_999 })
        );
        assert_eq!(
            check(BR_100K_A, &[Coding::Br], limits(10, u64::MAX)),
            Err(DecodeError::TooLarge { limit: 140 })
        );
    }

    #[test]
    fn br_truncated_is_corrupt() {
        assert_eq!(
            check(&BR_100K_A[..10], &[Coding::Br], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Br))
        );
    }

    #[test]
    fn br_trailing_data_is_corrupt() {
        let mut body = BR_100K_A.to_vec();
        body.extend_from_slice(b"junk");
        assert_eq!(
            check(&body, &[Coding::Br], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Br))
        );
    }

    #[test]
    fn stacked_gzip_of_gzip_decodes() {
        let body = gzip(&gzip(&text(40_000)));
        assert_eq!(
            check(&body, &[Coding::Gzip, Coding::Gzip], UNLIMITED),
            Ok(40_000)
        );
    }

    #[test]
    fn stacked_gzip_then_br_decodes_br_first() {
        let codings = [Coding::Gzip, Coding::Br];
        assert_eq!(check(BR_OF_GZIP_6500, &codings, UNLIMITED), Ok(6500));
        assert_eq!(
            check(BR_OF_GZIP_6500, &codings, limits(u64::MAX, 6499)),
            Err(DecodeError::TooLarge { limit: 6499 })
        );
    }

    #[test]
    fn stacked_order_matters() {
        // "gzip, deflate": gzip applied first, so deflate is the outer layer.
        let body = zlib(&gzip(&text(20_000)));
        assert_eq!(
            check(&body, &[Coding::Gzip, Coding::Deflate], UNLIMITED),
            Ok(20_000)
        );
        assert!(matches!(
            check(&body, &[Coding::Deflate, Coding::Gzip], UNLIMITED),
            Err(DecodeError::Corrupt(_))
        ));
    }

    #[test]
    fn stacked_identity_is_skipped() {
        let body = gzip(&text(1000));
        let codings = [Coding::Identity, Coding::Gzip, Coding::Identity];
        assert_eq!(check(&body, &codings, UNLIMITED), Ok(1000));
    }

    #[test]
    fn stacked_error_names_the_failing_layer() {
        // The outer (deflate) layer truncated: the gzip inside is whole.
        let body = zlib(&gzip(&text(20_000)));
        assert_eq!(
            check(
                &body[..body.len() - 4],
                &[Coding::Gzip, Coding::Deflate],
                UNLIMITED
            ),
            Err(DecodeError::Corrupt(Coding::Deflate))
        );
        // The inner (gzip) layer broken inside a valid deflate layer.
        let mut inner = gzip(&text(20_000));
        inner[0] = 0;
        let body = zlib(&inner);
        assert_eq!(
            check(&body, &[Coding::Gzip, Coding::Deflate], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Gzip))
        );
    }

    #[test]
    fn corrupt_gzip_is_corrupt() {
        let mut body = gzip(&text(10_000));
        let crc = body.len() - 8;
        body[crc] ^= 0xff;
        assert_eq!(
            check(&body, &[Coding::Gzip], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Gzip))
        );
        assert_eq!(
            check(b"not gzip at all", &[Coding::Gzip], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Gzip))
        );
    }

    #[test]
    fn truncated_gzip_is_corrupt() {
        let body = gzip(&text(10_000));
        assert_eq!(
            check(&body[..body.len() - 3], &[Coding::Gzip], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Gzip))
        );
    }

    #[test]
    fn gzip_trailing_data_is_corrupt() {
        let mut body = gzip(&text(10_000));
        body.extend_from_slice(&[0; 10]);
        assert_eq!(
            check(&body, &[Coding::Gzip], UNLIMITED),
            Err(DecodeError::Corrupt(Coding::Gzip))
        );
    }

    #[test]
    fn empty_body_with_a_coding_is_corrupt() {
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Br] {
            assert_eq!(
                check(b"", &[coding], UNLIMITED),
                Err(DecodeError::Corrupt(coding))
            );
        }
    }

    #[test]
    fn zero_ratio_refuses_any_output() {
        assert_eq!(
            check(&gzip(b"x"), &[Coding::Gzip], limits(0, u64::MAX)),
            Err(DecodeError::TooLarge { limit: 0 })
        );
    }
}
