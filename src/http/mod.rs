//! HTTP/1.1 message syntax: heads, the chunked coding, and serialisation.
//!
//! Everything here is pure (no I/O, no allocation per message beyond the
//! caller's reused buffers) so it can be table-tested, fuzzed and benched
//! on its own. The proxy state machine drives it from `proxy`.

pub mod chunked;
pub mod edits;
pub mod encode;
pub mod head;
pub mod view;
