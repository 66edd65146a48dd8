//! Any bytes through the body framer in every framing, whole and in
//! pieces of a size the input picks (as receive completions deliver them):
//! no panic, and the same body, leftover, length and verdict either way
//! (a body that fails agrees on failing).
#![no_main]

use coregate::proxy::relay::{BodyIn, BodyOut, Framer};
use libfuzzer_sys::fuzz_target;

/// `(body bytes as they leave, bytes left after the body, length, ended,
/// failed)`
type Outcome = (Vec<u8>, Vec<u8>, u64, bool, bool);

fn frame(input: &[u8], body_in: BodyIn, body_out: BodyOut, piece: usize) -> Outcome {
    let mut framer = Framer::new(body_in, body_out, 1 << 20);
    let (mut sent, mut pending, mut fed) = (Vec::new(), Vec::new(), 0);
    loop {
        let mut out = Vec::new();
        let step = match framer.step(&pending, &mut out) {
            Ok(step) => step,
            // A stream forwards what it had before the error showed, so
            // only the verdict must agree.
            Err(_) => return (Vec::new(), Vec::new(), 0, false, true),
        };
        assert!(step.consumed <= pending.len());
        if step.verbatim {
            sent.extend_from_slice(&pending[..step.consumed]);
        }
        sent.extend_from_slice(&out);
        pending.drain(..step.consumed);
        if step.done {
            pending.extend_from_slice(&input[fed..]);
            return (sent, pending, framer.total(), true, false);
        }
        if fed == input.len() {
            if step.consumed > 0 {
                // Re-framed output was full: step again.
                continue;
            }
            let mut out = Vec::new();
            if framer.at_eof(&mut out).is_err() {
                return (Vec::new(), Vec::new(), 0, false, true);
            }
            sent.extend_from_slice(&out);
            return (sent, pending, framer.total(), true, false);
        }
        let next = (fed + piece).min(input.len());
        pending.extend_from_slice(&input[fed..next]);
        fed = next;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let piece = usize::from(pick % 16) + 1;
    let modes = [
        (BodyIn::Length(u64::from(pick)), BodyOut::Verbatim),
        (BodyIn::Chunked, BodyOut::Verbatim),
        (BodyIn::Chunked, BodyOut::Dechunk),
        (BodyIn::UntilClose, BodyOut::Verbatim),
    ];
    for (body_in, body_out) in modes {
        let whole = frame(input, body_in, body_out, input.len().max(1));
        let pieces = frame(input, body_in, body_out, piece);
        assert_eq!(
            whole, pieces,
            "{body_in:?}/{body_out:?} in pieces of {piece}"
        );
    }
});
