//! Any bytes into the upstream response parser: no panic, offsets in range.
#![no_main]

use coregate::http::head::{Method, ResponseHead, Status, parse_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = ResponseHead::default();
    for method in [Method::Get, Method::Head] {
        if let Ok(Status::Complete(n)) = parse_response(data, 32 * 1024, method, &mut head) {
            assert!(n <= data.len());
            let _ = head.reason.get(data);
            for h in &head.headers {
                let _ = (h.name.get(data), h.value.get(data));
            }
        }
    }
});
