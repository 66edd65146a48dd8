//! Any bytes as a request path through the rules' normaliser: no panic,
//! and the result is what rules may rely on: it starts with `/`, has no
//! empty, `.` or `..` segment, no escape of an unreserved character, and
//! normalising it again changes nothing.
#![no_main]

use coregate::http::view::normalize_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut once = Vec::new();
    normalize_path(input, &mut once);
    assert_eq!(once.first(), Some(&b'/'));
    let body = &once[1..];
    let body = body.strip_suffix(b"/").unwrap_or(body);
    if !body.is_empty() {
        for segment in body.split(|&b| b == b'/') {
            assert!(!matches!(segment, b"" | b"." | b".."), "{once:?}");
        }
    }
    let mut twice = Vec::new();
    normalize_path(&once, &mut twice);
    assert_eq!(once, twice, "normalising is idempotent");
});
