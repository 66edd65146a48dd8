//! The validated, compiled configuration every worker runs on. Immutable
//! once built; workers hold it behind an `Arc` and never see raw TOML.
//!
//! Owns: the shapes of listeners, upstream groups, backends and the rule
//! set after validation. Does not own: parsing or checking (`config`), or
//! rule evaluation (`rules`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use crate::admission::Policy;
use crate::http::head::HeadLimits;
use crate::rules::RuleSet;

#[derive(Debug)]
pub struct Snapshot {
    /// Where it was loaded from (a path, or `<command line>`).
    pub source: String,
    pub drain_timeout: Duration,
    pub listeners: Vec<Listener>,
    pub upstreams: Vec<UpstreamGroup>,
    pub rules: RuleSet,
    /// Admin UNIX socket path (`server.admin_socket`).
    pub admin_socket: Option<PathBuf>,
    /// Where `/metrics` is served over HTTP (`server.metrics_listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// Access log destination (`server.access_log`): `None` is stdout.
    pub access_log: Option<PathBuf>,
    /// Who the process runs as once its sockets are open (`server.user`).
    pub user: Option<String>,
    /// After SIGTERM, how long `/readyz` says draining while requests are
    /// still served (`server.drain_grace`).
    pub drain_grace: Duration,
    /// Fleet-wide rate limits (`[fleet]`).
    pub fleet: Option<Fleet>,
    /// Every admission policy (listeners' and routes'), indexed by id.
    pub policies: Vec<Arc<Policy>>,
    /// FNV-1a 64 of the config text, to tell which file is running.
    pub hash: u64,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub backlog: i32,
    pub limits: HeadLimits,
    /// From the first byte of a head to its end (slow-loris guard): 408.
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection waits for its next request.
    pub keepalive_timeout: Duration,
    /// Longest silence while reading a request body.
    pub body_timeout: Duration,
    /// Longest stall while writing to the client.
    pub send_timeout: Duration,
    /// From the first byte of a request to the last byte of its body: 408.
    pub request_timeout: Duration,
    /// Open connections per worker; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Open tunnels per worker; beyond, an upgrade request gets 503.
    pub max_tunnels: usize,
    /// A tunnel quiet both ways for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// Answered by the worker itself: liveness, and readiness.
    pub health_path: Option<Vec<u8>>,
    pub ready_path: Option<Vec<u8>>,
    /// Admission limits every request on this listener passes.
    pub policy: Arc<Policy>,
    /// HTTPS: the certificates' server configuration, shared by every
    /// worker (so TLS sessions resume on any of them).
    pub tls: Option<crate::tls::Acceptor>,
    /// From accept to the end of a TLS handshake.
    pub handshake_timeout: Duration,
}

#[derive(Debug)]
pub struct UpstreamGroup {
    pub name: String,
    pub backends: Vec<Backend>,
    pub connect_timeout: Duration,
    /// From the end of the request to the end of the response head, and
    /// the longest stall writing the request to the backend: 504.
    pub response_timeout: Duration,
    /// Longest silence while reading a response body.
    pub read_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub keepalive_timeout: Duration,
    /// Idle pooled connections kept per backend per worker.
    pub max_idle: usize,
    /// How backends are picked, ejected and retried.
    pub balance: crate::balance::Balance,
    /// Active health checks (`health_check`), if configured.
    pub health_check: Option<Check>,
    /// The client TLS configuration of its `https://` backends.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl crate::balance::Group for UpstreamGroup {
    fn balance(&self) -> &crate::balance::Balance {
        &self.balance
    }

    fn backend_count(&self) -> usize {
        self.backends.len()
    }

    fn healthy(&self, i: usize) -> bool {
        self.backends[i]
            .healthy
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A group's active health checks (`health_check`), run by the health
/// thread (`health`).
#[derive(Debug, Clone)]
pub struct Check {
    /// The path asked with GET; a 2xx or 3xx answer is a pass.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that mark a backend up, and failures that mark it
    /// down.
    pub healthy: u32,
    pub unhealthy: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug)]
pub struct Backend {
    pub addr: BackendAddr,
    /// As written in the config: used in logs and errors.
    pub label: String,
    /// Host to send for HTTP/1.0 requests that carry none.
    pub authority: String,
    /// An `https://` backend: the name its certificate is verified for,
    /// sent as SNI unless it is an IP address.
    pub tls_name: Option<rustls::pki_types::ServerName<'static>>,
    /// Active health: written by the health checker thread (`health`),
    /// read by workers when they pick. True until checks say otherwise.
    pub healthy: std::sync::atomic::AtomicBool,
}

/// `host` without a trailing `:port`, for matching (IPv6 literals keep their
/// brackets).
pub fn strip_port(host: &[u8]) -> &[u8] {
    if let Some(end) = host.iter().rposition(|&b| b == b']') {
        return &host[..=end];
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) => &host[..i],
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port(b"a.com:80"), b"a.com");
        assert_eq!(strip_port(b"a.com"), b"a.com");
        assert_eq!(strip_port(b"[::1]:8080"), b"[::1]");
        assert_eq!(strip_port(b"[::1]"), b"[::1]");
    }
}

/// `[fleet]`: where fleet-scoped rate limits are shared.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    /// The Redis URL as written (checked by the `redis` crate at load).
    pub redis: String,
    pub sync_interval: Duration,
    pub on_unreachable: Unreachable,
    pub instances: usize,
}

/// What fleet-scoped limits do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Each instance enforces `rate / instances`.
    LocalShare,
    /// No limit.
    FailOpen,
}
