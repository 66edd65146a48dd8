//! The chunked transfer coding (RFC 9112 section 7.1) as an explicit state
//! machine that validates every framing byte and reports where the chunk
//! data lies, so callers can forward bytes verbatim or strip the framing.
//!
//! Owns: chunk-size lines, extensions, data boundaries, trailers. Does not
//! own: I/O, or what to do with the data.

use std::ops::Range;

/// Longest chunk-ext we accept on one chunk line. The RFC sets no limit;
/// extensions carry nothing a proxy needs, and an unbounded line would let
/// a client make us scan forever without data (hyper uses 16 KiB in total).
pub const MAX_CHUNK_EXT_BYTES: usize = 4096;

/// Largest trailer section accepted after the last chunk.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Chunk sizes above 2^60 cannot be honest and would overflow arithmetic.
const MAX_CHUNK_SIZE_DIGITS: u8 = 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    Size,
    #[error("invalid chunk extension")]
    Extension,
    #[error("chunk extension too long")]
    ExtensionTooLong,
    #[error("missing CRLF after chunk")]
    DataEnd,
    #[error("invalid trailer field")]
    Trailer,
    #[error("trailer section too large")]
    TrailerTooLarge,
    #[error("invalid line ending in chunked framing")]
    LineEnding,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// chunk-size = 1*HEXDIG
    Size,
    /// chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
    /// We take no BWS: llhttp refuses "a \r\n" too, and whitespace here is
    /// where parsers disagree.
    ExtStart,
    ExtName,
    ExtValueStart,
    ExtToken,
    ExtQuoted,
    ExtQuotedEscape,
    ExtQuotedEnd,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// trailer-section = *( field-line CRLF ), then CRLF
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// Decodes one chunked body. Feed it the bytes as they arrive.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: u8,
    ext_len: usize,
    trailer_len: usize,
    /// Total chunk-data bytes seen so far (the decoded body length).
    pub data_len: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

fn is_tchar(b: u8) -> bool {
    matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+'
        | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text
fn is_qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5B | 0x5D..=0x7E | 0x80..=0xFF)
}

fn is_field_vchar(b: u8) -> bool {
    matches!(b, b'\t' | b' '..=0x7E | 0x80..=0xFF)
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            size: 0,
            digits: 0,
            ext_len: 0,
            trailer_len: 0,
            data_len: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consume bytes from `input` until it is exhausted or the body ends.
    /// Calls `on_data` with each range of chunk data inside `input`, in order.
    /// Returns how many bytes of `input` belong to the body; bytes past that
    /// (when `is_done()`) are the next message.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(Range<usize>),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let take = (self.size as usize).min(input.len() - i);
                // `size as usize` saturates nothing on 64-bit; on 32-bit the
                // min() above bounds it by the input length anyway.
                on_data(i..i + take);
                i += take;
                self.size -= take as u64;
                self.data_len += take as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            if self.state == State::Done {
                break;
            }
            self.step(input[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use State::*;
        self.state = match self.state {
            Size => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if self.digits == MAX_CHUNK_SIZE_DIGITS {
                        return Err(ChunkError::Size);
                    }
                    let d = (b as char).to_digit(16).expect("matched a hex digit") as u64;
                    self.size = self.size * 16 + d;
                    self.digits += 1;
                    Size
                }
                b';' if self.digits > 0 => ExtStart,
                b'\r' if self.digits > 0 => SizeLf,
                _ => return Err(ChunkError::Size),
            },
            ExtStart => {
                self.bump_ext()?;
                if is_tchar(b) {
                    ExtName
                } else {
                    return Err(ChunkError::Extension);
                }
            }
            ExtName => {
                self.bump_ext()?;
                match b {
                    _ if is_tchar(b) => ExtName,
                    b'=' => ExtValueStart,
                    b';' => ExtStart,
                    b'\r' => SizeLf,
                    _ => return Err(ChunkError::Extension),
                }
            }
            ExtValueStart => {
                self.bump_ext()?;
                match b {
                    b'"' => ExtQuoted,
                    _ if is_tchar(b) => ExtToken,
                    _ => return Err(ChunkError::Extension),
                }
            }
            ExtToken => {
                self.bump_ext()?;
                match b {
                    _ if is_tchar(b) => ExtToken,
                    b';' => ExtStart,
                    b'\r' => SizeLf,
                    _ => return Err(ChunkError::Extension),
                }
            }
            ExtQuoted => {
                self.bump_ext()?;
                match b {
                    b'"' => ExtQuotedEnd,
                    b'\\' => ExtQuotedEscape,
                    _ if is_qdtext(b) => ExtQuoted,
                    _ => return Err(ChunkError::Extension),
                }
            }
            ExtQuotedEscape => {
                self.bump_ext()?;
                // quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
                if is_field_vchar(b) {
                    ExtQuoted
                } else {
                    return Err(ChunkError::Extension);
                }
            }
            ExtQuotedEnd => {
                self.bump_ext()?;
                match b {
                    b';' => ExtStart,
                    b'\r' => SizeLf,
                    _ => return Err(ChunkError::Extension),
                }
            }
            SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError::LineEnding);
                }
                self.ext_len = 0;
                self.digits = 0;
                if self.size == 0 { TrailerStart } else { Data }
            }
            Data => unreachable!("data is consumed in bulk by decode()"),
            DataCr => {
                if b == b'\r' {
                    DataLf
                } else {
                    return Err(ChunkError::DataEnd);
                }
            }
            DataLf => {
                if b == b'\n' {
                    Size
                } else {
                    return Err(ChunkError::DataEnd);
                }
            }
            TrailerStart => {
                self.bump_trailer()?;
                match b {
                    b'\r' => EndLf,
                    _ if is_tchar(b) => TrailerName,
                    _ => return Err(ChunkError::Trailer),
                }
            }
            TrailerName => {
                self.bump_trailer()?;
                match b {
                    _ if is_tchar(b) => TrailerName,
                    b':' => TrailerValue,
                    _ => return Err(ChunkError::Trailer),
                }
            }
            TrailerValue => {
                self.bump_trailer()?;
                match b {
                    b'\r' => TrailerLf,
                    _ if is_field_vchar(b) => TrailerValue,
                    _ => return Err(ChunkError::Trailer),
                }
            }
            TrailerLf => {
                self.bump_trailer()?;
                if b == b'\n' {
                    TrailerStart
                } else {
                    return Err(ChunkError::LineEnding);
                }
            }
            EndLf => {
                if b == b'\n' {
                    Done
                } else {
                    return Err(ChunkError::LineEnding);
                }
            }
            Done => Done,
        };
        Ok(())
    }

    fn bump_ext(&mut self) -> Result<(), ChunkError> {
        self.ext_len += 1;
        if self.ext_len > MAX_CHUNK_EXT_BYTES {
            return Err(ChunkError::ExtensionTooLong);
        }
        Ok(())
    }

    fn bump_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILER_BYTES {
            return Err(ChunkError::TrailerTooLarge);
        }
        Ok(())
    }
}

/// Write the chunk-size line for `len` data bytes (lowercase hex, no
/// extensions) into `out`.
pub fn write_chunk_header(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The last-chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut data = Vec::new();
        let n = d.decode(input, |r| data.extend_from_slice(&input[r]))?;
        Ok((data, n, d.is_done()))
    }

    #[test]
    fn simple_body() {
        let (data, n, done) = decode_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT").unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(n, 26);
        assert!(done);
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"a;x=\"q\\\"\"\r\n0123456789\r\n0\r\nX-T: v\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut data = Vec::new();
        for i in 0..input.len() {
            let n = d
                .decode(&input[i..i + 1], |r| {
                    data.extend_from_slice(&input[i..i + 1][r])
                })
                .unwrap();
            assert_eq!(n, 1);
        }
        assert!(d.is_done());
        assert_eq!(data, b"0123456789");
    }

    #[test]
    fn rejects() {
        for bad in [
            &b"a \r\n0123456789\r\n0\r\n\r\n"[..], // space after size
            b"2;\r\nab\r\n0\r\n\r\n",              // no extension name
            b"2 erfrf\r\nab\r\n0\r\n\r\n",         // no semicolon
            b"3\r\nfoo\r\n\r\n",                   // missing last-chunk
            b"5\r\nABCDE0\r\n",                    // data not followed by CRLF
            b"5\nhello\r\n0\r\n\r\n",              // bare LF
            b"-1\r\n",
            b"ffffffffffffffffff\r\n", // overflow
            b"0\r\nbad trailer\r\n\r\n",
            b"1\r\na\r\n0\r\n\r\r",
        ] {
            assert!(
                decode_all(bad).is_err() || !decode_all(bad).unwrap().2,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn long_extension_is_refused() {
        let mut input = b"1;a=".to_vec();
        input.extend(std::iter::repeat_n(b'b', MAX_CHUNK_EXT_BYTES));
        assert_eq!(
            decode_all(&input).unwrap_err(),
            ChunkError::ExtensionTooLong
        );
    }

    #[test]
    fn chunk_header_hex() {
        let mut out = Vec::new();
        write_chunk_header(&mut out, 0x1a2b);
        assert_eq!(out, b"1a2b\r\n");
        out.clear();
        write_chunk_header(&mut out, 0);
        assert_eq!(out, b"0\r\n");
    }
}
