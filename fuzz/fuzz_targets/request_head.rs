//! Any bytes into the request parser, as a pipelined stream: no panic, and
//! every accepted head's offsets stay inside the input and it has no bare
//! CR or LF.
#![no_main]

use coregate::http::head::{BodyFraming, HeadLimits, RequestHead, Status, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    let mut head = RequestHead::default();
    let mut rest = data;
    while let Ok(Status::Complete(n)) = parse_request(rest, &limits, &mut head) {
        assert!(n <= rest.len());
        // No bare LF and no bare CR in an accepted head, by definition.
        let accepted = &rest[..n];
        for (i, &b) in accepted.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && accepted[i - 1] == b'\r', "bare LF accepted");
            }
            if b == b'\r' {
                assert_eq!(accepted.get(i + 1), Some(&b'\n'), "bare CR accepted");
            }
        }
        for h in &head.headers {
            let _ = (h.name.get(rest), h.value.get(rest));
        }
        let _ = (
            head.target.get(rest),
            head.routing_path(rest),
            head.routing_host(rest),
        );
        // Accepted framing is never ambiguous.
        if let BodyFraming::Length(len) = head.framing {
            assert!(len > 0);
        }
        rest = &rest[n..];
    }
});
