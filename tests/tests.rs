//! Integration tests: coregate as a real process on 127.0.0.1 between real
//! clients (curl, raw sockets) and real origins (Python's http.server,
//! nginx, coregate's own origin). One binary, a module per area.

mod support;

mod admission;
mod balance;
mod bodies;
mod deploy;
mod failures;
mod fleet;
mod forwarding;
mod lifecycle;
mod modules;
mod nginx;
mod origin;
mod reload;
mod rules;
mod smuggling;
mod stats;
mod tls;
mod tunnels;
