//! Any bytes into the request parser, as a pipelined stream: no panic, and
//! every accepted head's offsets stay inside the input.
#![no_main]

use coregate::http::head::{parse_request, BodyFraming, HeadLimits, RequestHead, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    let mut head = RequestHead::default();
    let mut rest = data;
    while let Ok(Status::Complete(n)) = parse_request(rest, &limits, &mut head) {
        assert!(n <= rest.len());
        for h in &head.headers {
            let _ = (h.name.get(rest), h.value.get(rest));
        }
        let _ = (head.target.get(rest), head.routing_path(rest), head.routing_host(rest));
        // Accepted framing is never ambiguous.
        if let BodyFraming::Length(len) = head.framing {
            assert!(len > 0);
        }
        rest = &rest[n..];
    }
});
