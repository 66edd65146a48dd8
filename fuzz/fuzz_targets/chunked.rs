//! Any bytes into the chunked decoder, whole and split in two: no panic,
//! data ranges inside the input, and the same verdict and data either way.
#![no_main]

use coregate::http::chunked::ChunkedDecoder;
use libfuzzer_sys::fuzz_target;

fn decode(parts: &[&[u8]]) -> (Result<usize, ()>, Vec<u8>, bool) {
    let mut d = ChunkedDecoder::new();
    let mut data = Vec::new();
    let mut used = 0;
    for part in parts {
        match d.decode(part, |r| data.extend_from_slice(&part[r])) {
            Ok(n) => {
                used += n;
                if d.is_done() {
                    break;
                }
            }
            Err(_) => return (Err(()), data, false),
        }
    }
    (Ok(used), data, d.is_done())
}

fuzz_target!(|input: &[u8]| {
    let whole = decode(&[input]);
    let mid = input.len() / 2;
    let split = decode(&[&input[..mid], &input[mid..]]);
    assert_eq!(whole, split);
});
