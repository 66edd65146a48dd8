//! Sockets and memory for them: downstream listeners and the per-worker
//! buffer pool.

pub mod buffer;
pub mod listener;
