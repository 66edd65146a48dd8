//! Sockets: downstream listeners, upstream connections and their per-worker
//! keep-alive pools, and the per-worker buffer pool.

pub mod buffer;
pub mod listener;
pub mod upstream;
