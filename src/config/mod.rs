//! Configuration: TOML text → [`FileConfig`](file::FileConfig) → validated
//! [`Snapshot`].
//!
//! Owns: loading, validation (every problem reported with file, line and
//! key), defaults, compiling rules (`rules`), and the publication point
//! workers read snapshots from (`epoch`). Does not own: matching requests
//! (`crate::rules`).

pub mod carry;
pub mod epoch;
pub mod file;
mod limits;
mod rules;
pub mod snapshot;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use toml::Spanned;

use crate::admission::Policy;
use crate::balance::{Balance, HashKey, Method, maglev};
use crate::http::head::is_tchar;
use crate::http::head::{HeadLimits, MAX_HEADERS_HARD};
use crate::net::buffer::BUF_SIZE;
use crate::rules::RuleSet;
use crate::tls;
use file::{FileConfig, ListenerSection, TlsSection, UpstreamSection};
pub use snapshot::{
    Backend, BackendAddr, Check, Fleet, Listener, Snapshot, Unreachable, UpstreamGroup,
};

/// One thing wrong with a config, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// Everything wrong with a config file. Displays one problem per line as
/// `FILE:LINE: KEY: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}: {}", self.source, p.line, p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Read and validate a config file.
pub fn load(path: &Path) -> Result<Snapshot, ConfigError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source: source.clone(),
        problems: vec![Problem {
            line: 0,
            key: "-".into(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    parse(&text, &source)
}

/// Validate config text; `source` names it in errors.
pub fn parse(text: &str, source: &str) -> Result<Snapshot, ConfigError> {
    let base = std::path::Path::new(source)
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && p.is_dir())
        .map_or_else(|| std::path::PathBuf::from("."), |p| p.to_path_buf());
    let mut v = Validator {
        text,
        base,
        problems: Vec::new(),
        policies: Vec::new(),
        has_fleet: false,
    };
    let file: FileConfig = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let line = e.span().map(|s| v.line_of(s.start)).unwrap_or(0);
            let key = e
                .span()
                .map(|s| text[s].trim().to_string())
                .unwrap_or_else(|| "-".into());
            let key = if key.is_empty() || key.len() > 60 {
                "-".into()
            } else {
                key
            };
            return Err(ConfigError {
                source: source.into(),
                problems: vec![Problem {
                    line,
                    key,
                    message: e.message().trim().to_string(),
                }],
            });
        }
    };
    let snapshot = v.snapshot(file, source);
    if v.problems.is_empty() {
        Ok(snapshot)
    } else {
        v.problems.sort_by_key(|p| p.line);
        Err(ConfigError {
            source: source.into(),
            problems: v.problems,
        })
    }
}

/// A config for `coregate run --listen ADDR --upstream URL`, checked by the
/// same validator as a file.
pub fn quick(
    listen: &str,
    upstream: &str,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Snapshot, ConfigError> {
    let tls = tls.map_or(String::new(), |(cert, key)| {
        format!(
            "[listener.tls]\ncerts = [{{ cert = {}, key = {} }}]\n",
            toml_string(&cert.to_string_lossy()),
            toml_string(&key.to_string_lossy())
        )
    });
    let text = format!(
        "[[listener]]\nlisten = {}\n{tls}\n[upstream.default]\nbackends = [{}]\n\n[[route]]\nupstream = \"default\"\n",
        toml_string(listen),
        toml_string(upstream)
    );
    parse(&text, "<command line>")
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `server.drain_grace` by default: long enough for a balancer checking
/// `/readyz` every second or two to take the instance out.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Longest duration a config may set. Deadlines are computed as
/// `Instant + duration`; an unbounded one would overflow.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parse `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    })
}

struct Validator<'t> {
    text: &'t str,
    /// Where relative file names in the config are found: the config
    /// file's directory.
    base: std::path::PathBuf,
    problems: Vec<Problem>,
    /// Admission policies in the order compiled; a policy's id is its
    /// index here.
    policies: Vec<Arc<Policy>>,
    /// The file has a `[fleet]` (a limit may then say `scope = "fleet"`).
    has_fleet: bool,
}

impl Validator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn problem(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let line = self.line_of(span.start);
        self.problems.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = value else { return default };
        match parse_duration(v.get_ref()) {
            Some(d) if !d.is_zero() && d <= MAX_DURATION => d,
            Some(d) if d.is_zero() => {
                self.problem(v.span(), key, "must be greater than zero");
                default
            }
            Some(_) => {
                self.problem(v.span(), key, "must be at most 7 days");
                default
            }
            None => {
                self.problem(
                    v.span(),
                    key,
                    format!(
                        "{:?} is not a duration; write e.g. \"250ms\", \"5s\" or \"2m\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn int(
        &mut self,
        value: &Option<Spanned<i64>>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
    ) -> i64 {
        let Some(v) = value else { return default };
        let n = *v.get_ref();
        if range.contains(&n) {
            n
        } else {
            self.problem(
                v.span(),
                key,
                format!("{n} is out of range ({}..={})", range.start(), range.end()),
            );
            default
        }
    }

    fn snapshot(&mut self, file: FileConfig, source: &str) -> Snapshot {
        let drain_timeout = self.duration(
            &file.server.drain_timeout,
            "server.drain_timeout",
            Duration::from_secs(30),
        );
        let drain_grace = match &file.server.drain_grace {
            Some(v) if parse_duration(v.get_ref()).is_some_and(|d| d.is_zero()) => Duration::ZERO,
            other => self.duration(other, "server.drain_grace", DEFAULT_DRAIN_GRACE),
        };
        // Before the limits that may refer to it.
        let fleet = file.fleet.as_ref().and_then(|f| self.fleet(f));
        if file.listener.is_empty() {
            self.problem(
                0..0,
                "listener",
                "no [[listener]] is configured; add one with `listen = \"127.0.0.1:8080\"`",
            );
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for l in &file.listener {
            if let Some(listener) = self.listener(l) {
                // Port 0 is "any free port": two of them are two ports.
                if listener.addr.port() != 0 && listeners.iter().any(|x| x.addr == listener.addr) {
                    self.problem(
                        l.get_ref().listen.span(),
                        "listener.listen",
                        format!("{} is listed twice", listener.addr),
                    );
                }
                listeners.push(listener);
            }
        }
        let mut names = BTreeMap::new();
        let mut upstreams = Vec::new();
        for (name, section) in &file.upstream {
            names.insert(name.clone(), upstreams.len());
            upstreams.push(self.upstream(name, section));
        }
        let rules = rules::RuleCompiler::new(self).compile(&file.route, &file.rule, &names);
        let admin_socket = self.absolute_path(&file.server.admin_socket, "server.admin_socket");
        let metrics_listen = self.metrics_listen(&file.server.metrics_listen);
        let user = self.user(&file.server.user);
        let access_log = match &file.server.access_log {
            Some(p) if p.get_ref() == "-" => None,
            other => self.absolute_path(other, "server.access_log"),
        };
        Snapshot {
            source: source.to_string(),
            drain_timeout,
            listeners,
            upstreams,
            // When rules failed, problems were recorded: the snapshot is
            // discarded by `parse`.
            rules: rules.unwrap_or_else(RuleSet::empty),
            admin_socket,
            metrics_listen,
            access_log,
            user,
            drain_grace,
            fleet,
            policies: std::mem::take(&mut self.policies),
            hash: fnv1a64(self.text.as_bytes()),
        }
    }

    fn listener(&mut self, section: &Spanned<ListenerSection>) -> Option<Listener> {
        let l = section.get_ref();
        let addr = match l.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    l.listen.span(),
                    "listener.listen",
                    format!("{:?} is not an IP:port address", l.listen.get_ref()),
                );
                None
            }
        };
        let defaults = HeadLimits::default();
        let backlog = self.int(&l.backlog, "listener.backlog", 1..=65535, 4096) as i32;
        let max_head_bytes = self.int(
            &l.max_head_bytes,
            "listener.max_head_bytes",
            // A head must fit the connection's read buffer.
            256..=BUF_SIZE as i64,
            defaults.max_head_bytes as i64,
        );
        let max_headers = self.int(
            &l.max_headers,
            "listener.max_headers",
            1..=MAX_HEADERS_HARD as i64,
            defaults.max_headers as i64,
        );
        let max_uri_bytes = self.int(
            &l.max_uri_bytes,
            "listener.max_uri_bytes",
            16..=BUF_SIZE as i64,
            defaults.max_uri_bytes as i64,
        );
        let header_timeout = self.duration(
            &l.header_timeout,
            "listener.header_timeout",
            Duration::from_secs(10),
        );
        let keepalive_timeout = self.duration(
            &l.keepalive_timeout,
            "listener.keepalive_timeout",
            Duration::from_secs(60),
        );
        let body_timeout = self.duration(
            &l.body_timeout,
            "listener.body_timeout",
            Duration::from_secs(30),
        );
        let send_timeout = self.duration(
            &l.send_timeout,
            "listener.send_timeout",
            Duration::from_secs(30),
        );
        let request_timeout = self.duration(
            &l.request_timeout,
            "listener.request_timeout",
            Duration::from_secs(5),
        );
        let max_connections = self.int(
            &l.max_connections,
            "listener.max_connections",
            1..=1_000_000,
            10_000,
        ) as usize;
        // Every tunnel is a connection: `max_connections` caps them too.
        let max_tunnels = self.int(
            &l.max_tunnels,
            "listener.max_tunnels",
            0..=1_000_000,
            max_connections as i64,
        ) as usize;
        let tunnel_idle_timeout = self.duration(
            &l.tunnel_idle_timeout,
            "listener.tunnel_idle_timeout",
            Duration::from_secs(3600),
        );
        let health_path = self.probe_path(&l.health_path, "listener.health_path", "/healthz");
        let ready_path = self.probe_path(&l.ready_path, "listener.ready_path", "/readyz");
        let (tls, handshake_timeout) = self.tls(l.tls.as_ref());
        let policy = self.policy(l.limits.as_ref(), limits::Owner::Listener)?;
        Some(Listener {
            addr: addr?,
            backlog,
            limits: HeadLimits {
                max_head_bytes: max_head_bytes as usize,
                max_headers: max_headers as usize,
                max_uri_bytes: max_uri_bytes as usize,
            },
            header_timeout,
            keepalive_timeout,
            body_timeout,
            send_timeout,
            request_timeout,
            max_connections,
            max_tunnels,
            tunnel_idle_timeout,
            health_path,
            ready_path,
            policy,
            tls,
            handshake_timeout,
        })
    }

    /// `[listener.tls]`: every certificate and key read and checked now,
    /// so a bad one is refused here (at start or reload) and never
    /// reaches a worker.
    fn tls(&mut self, section: Option<&Spanned<TlsSection>>) -> (Option<tls::Acceptor>, Duration) {
        let default_timeout = Duration::from_secs(10);
        let Some(section) = section else {
            return (None, default_timeout);
        };
        let t = section.get_ref();
        let timeout = self.duration(
            &t.handshake_timeout,
            "listener.tls.handshake_timeout",
            default_timeout,
        );
        if t.certs.get_ref().is_empty() {
            self.problem(
                t.certs.span(),
                "listener.tls.certs",
                "list at least one { cert = \"FILE\", key = \"FILE\" }",
            );
            return (None, timeout);
        }
        let files: Vec<(std::path::PathBuf, std::path::PathBuf)> = t
            .certs
            .get_ref()
            .iter()
            .map(|c| {
                (
                    self.base.join(&c.get_ref().cert),
                    self.base.join(&c.get_ref().key),
                )
            })
            .collect();
        let pairs: Vec<(&std::path::Path, &std::path::Path)> = files
            .iter()
            .map(|(c, k)| (c.as_path(), k.as_path()))
            .collect();
        match tls::acceptor(&pairs) {
            Ok(a) => (Some(a), timeout),
            Err(e) => {
                // The entry at fault when the message names its file.
                let span = t
                    .certs
                    .get_ref()
                    .iter()
                    .zip(&files)
                    .find(|(_, (c, k))| {
                        e.contains(&*c.to_string_lossy()) || e.contains(&*k.to_string_lossy())
                    })
                    .map_or(t.certs.span(), |(c, _)| c.span());
                self.problem(span, "listener.tls.certs", e);
                (None, timeout)
            }
        }
    }

    fn upstream(&mut self, name: &str, section: &Spanned<UpstreamSection>) -> UpstreamGroup {
        let u = section.get_ref();
        let key = |k: &str| format!("upstream.{name}.{k}");
        if u.backends.get_ref().is_empty() {
            self.problem(
                u.backends.span(),
                key("backends"),
                "an upstream group needs at least one backend",
            );
        }
        let mut backends = Vec::new();
        for b in u.backends.get_ref() {
            match parse_backend(b.get_ref()) {
                Ok(backend) => backends.push(backend),
                Err(msg) => self.problem(b.span(), key("backends"), msg),
            }
        }
        let tls = self.connector(u, &backends, &key);
        let balance = self.balance(u, &backends, &key);
        let health_check = u.health_check.as_ref().map(|h| {
            let c = h.get_ref();
            if !c.path.starts_with('/') || c.path.bytes().any(|b| b <= b' ' || b >= 0x7f) {
                self.problem(
                    h.span(),
                    key("health_check.path"),
                    format!("{:?} is not a path; write e.g. \"/health\"", c.path),
                );
            }
            Check {
                path: c.path.clone(),
                interval: self.duration(
                    &c.interval,
                    &key("health_check.interval"),
                    Duration::from_secs(5),
                ),
                timeout: self.duration(
                    &c.timeout,
                    &key("health_check.timeout"),
                    Duration::from_secs(1),
                ),
                healthy: self.int(&c.healthy, &key("health_check.healthy"), 1..=100, 2) as u32,
                unhealthy: self.int(&c.unhealthy, &key("health_check.unhealthy"), 1..=100, 3)
                    as u32,
            }
        });
        UpstreamGroup {
            name: name.to_string(),
            backends,
            connect_timeout: self.duration(
                &u.connect_timeout,
                &key("connect_timeout"),
                Duration::from_secs(3),
            ),
            response_timeout: self.duration(
                &u.response_timeout,
                &key("response_timeout"),
                Duration::from_secs(60),
            ),
            read_timeout: self.duration(
                &u.read_timeout,
                &key("read_timeout"),
                Duration::from_secs(60),
            ),
            keepalive_timeout: self.duration(
                &u.keepalive_timeout,
                &key("keepalive_timeout"),
                Duration::from_secs(60),
            ),
            max_idle: self.int(&u.max_idle, &key("max_idle"), 0..=65536, 64) as usize,
            balance,
            health_check,
            tls,
        }
    }

    /// The client TLS configuration for a group with `https://` backends
    /// (`ca`, `tls_verify`); those keys alone are a mistake.
    fn connector(
        &mut self,
        u: &UpstreamSection,
        backends: &[Backend],
        key: &dyn Fn(&str) -> String,
    ) -> Option<Arc<rustls::ClientConfig>> {
        let verify = u.tls_verify.as_ref().is_none_or(|v| *v.get_ref());
        if !backends.iter().any(|b| b.tls_name.is_some()) {
            for (k, span) in [
                ("ca", u.ca.as_ref().map(|c| c.span())),
                ("tls_verify", u.tls_verify.as_ref().map(|v| v.span())),
            ] {
                if let Some(span) = span {
                    self.problem(span, key(k), "only applies to https:// backends");
                }
            }
            return None;
        }
        if let (Some(ca), false) = (&u.ca, verify) {
            self.problem(
                ca.span(),
                key("ca"),
                "tls_verify = false verifies nothing: drop one of the two",
            );
        }
        let ca_file = u.ca.as_ref().map(|c| self.base.join(c.get_ref()));
        match tls::connector(ca_file.as_deref(), verify) {
            Ok(config) => Some(config),
            Err(e) => {
                let span = u.ca.as_ref().map_or(u.backends.span(), |c| c.span());
                let k = if u.ca.is_some() { "ca" } else { "backends" };
                self.problem(span, key(k), e);
                None
            }
        }
    }

    fn balance(
        &mut self,
        u: &UpstreamSection,
        backends: &[Backend],
        key: &dyn Fn(&str) -> String,
    ) -> Balance {
        let n = backends.len();
        let method = match u.balance.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "p2c")) => Method::P2c,
            Some((_, "least_inflight")) => Method::LeastInflight,
            Some((_, "round_robin")) => Method::RoundRobin,
            Some((_, "weighted_round_robin")) => Method::WeightedRoundRobin,
            Some((v, "hash")) => {
                let hk = match u.hash_key.as_ref().map(|h| (h, h.get_ref().as_str())) {
                    Some((_, "client_ip")) => HashKey::ClientIp,
                    Some((_, "path")) => HashKey::Path,
                    Some((h, s)) => {
                        match s.strip_prefix("header:") {
                            Some(name) if !name.is_empty() && name.bytes().all(is_tchar) => {
                                HashKey::Header(name.to_ascii_lowercase().into_bytes())
                            }
                            _ => {
                                self.problem(
                                h.span(),
                                key("hash_key"),
                                format!("{s:?} is not a hash key; use header:NAME, client_ip or path"),
                            );
                                HashKey::ClientIp
                            }
                        }
                    }
                    None => {
                        self.problem(
                            v.span(),
                            key("hash_key"),
                            "balance = \"hash\" needs hash_key (header:NAME, client_ip or path)",
                        );
                        HashKey::ClientIp
                    }
                };
                Method::Hash(hk)
            }
            Some((v, other)) => {
                self.problem(
                    v.span(),
                    key("balance"),
                    format!(
                        "{other:?} is not a balancing method; use p2c, least_inflight, round_robin, weighted_round_robin or hash"
                    ),
                );
                Method::P2c
            }
        };
        let weights = match &u.weights {
            Some(w) => {
                let ws = w.get_ref();
                if ws.len() != n || ws.iter().any(|x| !(1..=1000).contains(x)) {
                    self.problem(
                        w.span(),
                        key("weights"),
                        format!("needs {n} weights (one per backend), each 1 to 1000"),
                    );
                }
                ws.iter()
                    .map(|&x| x.clamp(1, 1000) as u32)
                    .chain(std::iter::repeat(1))
                    .take(n)
                    .collect()
            }
            None => vec![1; n],
        };
        let all_ejected = u.all_ejected.as_ref().map(|v| (v, v.get_ref().as_str()));
        let fail_open = match all_ejected {
            None | Some((_, "fail_open")) => true,
            Some((_, "503")) => false,
            Some((v, other)) => {
                self.problem(
                    v.span(),
                    key("all_ejected"),
                    format!("{other:?}: use \"fail_open\" or \"503\""),
                );
                true
            }
        };
        let retry_budget = match &u.retry_budget {
            Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                self.problem(v.span(), key("retry_budget"), "must be from 0 to 1");
                0.2
            }
            None => 0.2,
        };
        let eject_time = self.duration(&u.eject_time, &key("eject_time"), Duration::from_secs(1));
        let max_eject_time = self.duration(
            &u.max_eject_time,
            &key("max_eject_time"),
            Duration::from_secs(30),
        );
        Balance {
            table: matches!(method, Method::Hash(_)).then(|| {
                let labels: Vec<&str> = backends.iter().map(|b| b.label.as_str()).collect();
                maglev::Table::new(&labels)
            }),
            method,
            schedule: Balance::schedule(&weights),
            weights,
            max_fails: self.int(&u.max_fails, &key("max_fails"), 0..=1000, 3) as u32,
            eject_time,
            max_eject_time: max_eject_time.max(eject_time),
            eject_on_5xx: u.eject_on_5xx.as_ref().is_some_and(|v| *v.get_ref()),
            fail_open,
            retry_budget,
            max_conns: self.int(&u.max_conns, &key("max_conns"), 0..=1_000_000, 0) as u32,
        }
    }

    /// The `/metrics` listener: a loopback address only. Statistics name
    /// routes and backends; anything wider belongs behind a proxy with
    /// access control, which can reach it on loopback.
    fn metrics_listen(&mut self, value: &Option<Spanned<String>>) -> Option<SocketAddr> {
        let v = value.as_ref()?;
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => Some(a),
            Ok(a) => {
                self.problem(
                    v.span(),
                    "server.metrics_listen",
                    format!("{a} is not a loopback address; use 127.0.0.1:PORT or [::1]:PORT"),
                );
                None
            }
            Err(_) => {
                self.problem(
                    v.span(),
                    "server.metrics_listen",
                    format!("{:?} is not an IP:port address", v.get_ref()),
                );
                None
            }
        }
    }

    /// A liveness or readiness path: absolute, or "" for none.
    fn probe_path(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: &str,
    ) -> Option<Vec<u8>> {
        let Some(v) = value else {
            return Some(default.as_bytes().to_vec());
        };
        let path = v.get_ref();
        if path.is_empty() {
            return None;
        }
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == b'?' || b >= 0x7f) {
            self.problem(
                v.span(),
                key,
                format!("{path:?} is not a path; write e.g. \"{default}\", or \"\" to turn it off"),
            );
        }
        Some(path.as_bytes().to_vec())
    }

    /// `[fleet]`: a Redis URL the `redis` crate accepts, the sync
    /// interval, the fallback and the fleet's size.
    fn fleet(&mut self, section: &Spanned<file::FleetSection>) -> Option<Fleet> {
        self.has_fleet = true;
        let f = section.get_ref();
        let redis = match &f.redis {
            Some(url) => match redis::Client::open(url.get_ref().as_str()) {
                Ok(_) => Some(url.get_ref().clone()),
                Err(e) => {
                    self.problem(
                        url.span(),
                        "fleet.redis",
                        format!(
                            "{:?} is not a Redis URL ({e}); write e.g. \"redis://127.0.0.1:6379/0\"",
                            url.get_ref()
                        ),
                    );
                    None
                }
            },
            None => {
                self.problem(
                    section.span(),
                    "fleet.redis",
                    "missing: where the fleet's counts are kept, e.g. \"redis://127.0.0.1:6379/0\"",
                );
                None
            }
        };
        let sync_interval = self.duration(
            &f.sync_interval,
            "fleet.sync_interval",
            Duration::from_millis(100),
        );
        let on_unreachable = match f.on_unreachable.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "local_share")) => Unreachable::LocalShare,
            Some((_, "fail_open")) => Unreachable::FailOpen,
            Some((v, other)) => {
                self.problem(
                    v.span(),
                    "fleet.on_unreachable",
                    format!("{other:?} is not one of \"local_share\", \"fail_open\""),
                );
                Unreachable::LocalShare
            }
        };
        if f.instances.is_none() {
            self.problem(
                section.span(),
                "fleet.instances",
                "missing: the number of instances, which share a limit while Redis is unreachable",
            );
        }
        let instances = self.int(&f.instances, "fleet.instances", 1..=10_000, 1) as usize;
        Some(Fleet {
            redis: redis?,
            sync_interval,
            on_unreachable,
            instances,
        })
    }

    /// `server.user`: a user of this system (what the process runs as
    /// after binding, when started as root).
    fn user(&mut self, value: &Option<Spanned<String>>) -> Option<String> {
        let v = value.as_ref()?;
        match lookup_user(v.get_ref()) {
            Ok(_) => Some(v.get_ref().clone()),
            Err(e) => {
                self.problem(v.span(), "server.user", format!("{e:#}"));
                None
            }
        }
    }

    fn absolute_path(&mut self, value: &Option<Spanned<String>>, key: &str) -> Option<PathBuf> {
        let v = value.as_ref()?;
        let path = PathBuf::from(v.get_ref());
        if path.is_absolute() {
            Some(path)
        } else {
            self.problem(
                v.span(),
                key,
                format!("{:?} must be an absolute path", v.get_ref()),
            );
            None
        }
    }
}

/// A user's uid and primary gid.
pub struct UserIds {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Look `user` up in the password database (getpwnam_r).
pub fn lookup_user(user: &str) -> anyhow::Result<UserIds> {
    let name = std::ffi::CString::new(user)
        .map_err(|_| anyhow::anyhow!("user {user:?}: the name has a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed passwd is valid for getpwnam_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pwd` and `buf` (of the length given),
    // both ours and alive for the call, and sets `found`.
    let r = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 {
        anyhow::bail!("user {user:?}: {}", std::io::Error::from_raw_os_error(r));
    }
    if found.is_null() {
        anyhow::bail!("no user {user:?} on this system");
    }
    Ok(UserIds {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// FNV-1a, 64 bits: a fingerprint of the config text for `coregate reload`
/// to report (not a security hash).
pub use crate::admission::fnv1a64;

/// A route's host: a name or IPv4 address without port, or a bracketed
/// IPv6 literal such as `[::1]`, as it appears in Host.
fn valid_route_host(h: &str) -> bool {
    let bracketed = h.len() > 2 && h.starts_with('[') && h.ends_with(']');
    let inner = if bracketed { &h[1..h.len() - 1] } else { h };
    !inner.is_empty()
        && inner.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') || (bracketed && c == ':')
        })
}

/// `tcp://host:port`, `https://host[:port]` or `unix:/absolute/path`.
fn parse_backend(s: &str) -> Result<Backend, String> {
    let (rest, tls) = match (s.strip_prefix("tcp://"), s.strip_prefix("https://")) {
        (Some(rest), _) => (Some(rest), false),
        (_, Some(rest)) => (Some(rest), true),
        _ => (None, false),
    };
    if let Some(rest) = rest {
        let rest = rest.trim_end_matches('/');
        let host = snapshot::strip_port(rest.as_bytes());
        let host = std::str::from_utf8(host).unwrap_or(rest);
        let with_port = if tls && host.len() == rest.len() {
            format!("{rest}:443")
        } else {
            rest.to_string()
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {rest:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{rest:?} resolves to no address"))?;
        let tls_name = if tls {
            let name = host.trim_start_matches('[').trim_end_matches(']');
            Some(
                rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|e| format!("{s:?}: {name:?} is not a server name: {e}"))?,
            )
        } else {
            None
        };
        return Ok(Backend {
            addr: BackendAddr::Tcp(addr),
            label: s.to_string(),
            authority: rest.to_string(),
            tls_name,
            healthy: AtomicBool::new(true),
        });
    }
    if let Some(path) = s.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "{s:?}: a UNIX socket path must be absolute (unix:/run/app.sock)"
            ));
        }
        return Ok(Backend {
            addr: BackendAddr::Unix(path),
            label: s.to_string(),
            authority: "localhost".into(),
            tls_name: None,
            healthy: AtomicBool::new(true),
        });
    }
    Err(format!(
        "{s:?} is not a backend; write tcp://HOST:PORT, https://HOST[:PORT] or unix:/PATH"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
drain_timeout = "5s"

[[listener]]
listen = "127.0.0.1:8080"

[upstream.app]
backends = ["tcp://127.0.0.1:9000", "unix:/run/app.sock"]
connect_timeout = "250ms"

[[route]]
host = "API.example.com"
path_prefix = "/api/"
upstream = "app"

[[route]]
upstream = "app"
"#;

    #[test]
    fn good_config_compiles() {
        let s = parse(GOOD, "good.toml").unwrap();
        assert_eq!(s.drain_timeout, Duration::from_secs(5));
        assert_eq!(s.listeners[0].backlog, 4096);
        assert_eq!(s.upstreams[0].backends.len(), 2);
        assert_eq!(s.upstreams[0].connect_timeout, Duration::from_millis(250));
        assert_eq!(s.rules.routes().len(), 2);
        let route = |host: &'static [u8], path: &'static [u8]| {
            let view = crate::http::view::RequestView {
                method: b"GET",
                host: Some(host),
                authority: Some(host),
                path,
                query: b"",
                buf: b"",
                headers: &[],
                client: "127.0.0.1".parse().unwrap(),
                tls: false,
            };
            let mut scratch = crate::rules::Scratch::default();
            s.rules.route(&view, &mut scratch).map(|r| r.name.clone())
        };
        assert_eq!(
            route(b"API.example.com", b"/api/x").unwrap(),
            "route #1 (line 12)"
        );
        assert_eq!(route(b"other", b"/api/x").unwrap(), "route #2 (line 17)");
    }

    #[test]
    fn every_problem_is_reported_with_line_and_key() {
        let bad = r#"
[[listener]]
listen = "nowhere"
header_timeout = "soon"

[upstream.app]
backends = ["http://x"]

[[route]]
upstream = "missing"
"#;
        let err = parse(bad, "bad.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bad.toml:3: listener.listen:"), "{text}");
        assert!(
            text.contains("bad.toml:4: listener.header_timeout:"),
            "{text}"
        );
        assert!(
            text.contains("bad.toml:7: upstream.app.backends:"),
            "{text}"
        );
        assert!(text.contains("bad.toml:10: route.upstream:"), "{text}");
        assert_eq!(err.problems.len(), 4);
    }

    #[test]
    fn upgrades_and_tunnel_limits_are_read_and_checked() {
        let base = "[[listener]]\nlisten = \"127.0.0.1:1\"\n";
        let good = format!(
            "{base}max_tunnels = 5\ntunnel_idle_timeout = \"5m\"\n[upstream.a]\nbackends = [\"tcp://127.0.0.1:2\"]\n\
             [[route]]\npath = \"/chat\"\nupstream = \"a\"\nupgrade = [\"WebSocket\", \"h2c\"]\ntunnel_idle_timeout = \"30s\"\n\
             [[route]]\nupstream = \"a\"\n"
        );
        let s = parse(&good, "t").unwrap();
        assert_eq!(s.listeners[0].max_tunnels, 5);
        assert_eq!(s.listeners[0].tunnel_idle_timeout, Duration::from_secs(300));
        let routes = s.rules.routes();
        let names: Vec<&[u8]> = routes[0]
            .upgrades
            .protocols
            .iter()
            .map(|p| &p[..])
            .collect();
        assert_eq!(names, [&b"websocket"[..], &b"h2c"[..]]);
        assert_eq!(
            routes[0].upgrades.idle_timeout,
            Some(Duration::from_secs(30))
        );
        // Unset: WebSocket only, the listener's timeout.
        assert_eq!(routes[1].upgrades, crate::rules::Upgrades::default());
        let q = quick("127.0.0.1:0", "tcp://127.0.0.1:9", None).unwrap();
        assert_eq!(q.listeners[0].max_tunnels, q.listeners[0].max_connections);
        assert_eq!(
            q.listeners[0].tunnel_idle_timeout,
            Duration::from_secs(3600)
        );

        let bad = format!(
            "{base}[upstream.a]\nbackends = [\"tcp://127.0.0.1:2\"]\n\
             [[route]]\npath = \"/a\"\nupstream = \"a\"\nupgrade = [\"web socket\"]\n\
             [[route]]\npath = \"/b\"\nrespond = {{ status = 200 }}\nupgrade = [\"websocket\"]\n\
             [[rule]]\nlog = [\"path\"]\ntunnel_idle_timeout = \"1s\"\n"
        );
        let text = parse(&bad, "u.toml").unwrap_err().to_string();
        assert!(
            text.contains("u.toml:8: route.upgrade: \"web socket\" is not a protocol name"),
            "{text}"
        );
        assert!(
            text.contains("u.toml:12: route.upgrade: only applies to a route with `upstream`"),
            "{text}"
        );
        assert!(
            text.contains("u.toml:15: rule.tunnel_idle_timeout: only applies"),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_is_located() {
        let err = parse(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\nbaklog = 5\n",
            "t.toml",
        )
        .unwrap_err();
        assert_eq!(err.problems[0].line, 3, "{err}");
        assert!(err.to_string().contains("baklog"), "{err}");
    }

    #[test]
    fn balance_problems_name_line_and_key() {
        let base = "[[listener]]\nlisten = \"127.0.0.1:1\"\n[upstream.a]\nbackends = [\"tcp://127.0.0.1:2\", \"tcp://127.0.0.1:3\"]\n";
        let err = |extra: &str| match parse(&format!("{base}{extra}"), "b") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(
            err("balance = \"random\"\n")
                .contains("b:5: upstream.a.balance: \"random\" is not a balancing method")
        );
        assert!(
            err("balance = \"hash\"\n")
                .contains("upstream.a.hash_key: balance = \"hash\" needs hash_key")
        );
        assert!(
            err("balance = \"hash\"\nhash_key = \"cookie\"\n")
                .contains("upstream.a.hash_key: \"cookie\" is not a hash key")
        );
        assert!(err("weights = [1]\n").contains("upstream.a.weights: needs 2 weights"));
        assert!(err("all_ejected = \"never\"\n").contains("upstream.a.all_ejected"));
        assert!(
            err("retry_budget = 2.0\n").contains("upstream.a.retry_budget: must be from 0 to 1")
        );
        let ok = parse(
            &format!("{base}balance = \"weighted_round_robin\"\nweights = [3, 1]\n"),
            "b",
        )
        .unwrap();
        assert_eq!(ok.upstreams[0].balance.schedule, [0, 0, 1, 0]);
    }

    #[test]
    fn users_are_looked_up_and_unknown_ones_named() {
        assert_eq!(lookup_user("root").unwrap().uid, 0);
        let err = lookup_user("no-such-user-coregate").err().unwrap();
        assert!(
            err.to_string()
                .contains("no user \"no-such-user-coregate\""),
            "{err}"
        );
        let base = "[[listener]]\nlisten = \"127.0.0.1:1\"\n";
        let ok = parse(&format!("[server]\nuser = \"root\"\n{base}"), "u").expect("root exists");
        assert_eq!(ok.user.as_deref(), Some("root"));
        let bad = parse(
            &format!("[server]\nuser = \"no-such-user-coregate\"\n{base}"),
            "u",
        )
        .unwrap_err();
        assert!(
            bad.to_string()
                .contains("u:2: server.user: no user \"no-such-user-coregate\" on this system"),
            "{bad}"
        );
    }

    #[test]
    fn fleet_settings_are_checked_with_file_line_and_key() {
        let base = "[[listener]]\nlisten = \"127.0.0.1:1\"\n";
        let ok = parse(
            &format!(
                "[fleet]\nredis = \"redis://:pw@10.0.0.5:6379/2\"\ninstances = 3\n\
                 on_unreachable = \"fail_open\"\nsync_interval = \"50ms\"\n{base}\
                 [listener.limits]\nrate = \"300/s\"\nscope = \"fleet\"\n"
            ),
            "f",
        )
        .expect("a valid fleet");
        let fleet = ok.fleet.expect("[fleet]");
        assert_eq!(fleet.instances, 3);
        assert_eq!(fleet.on_unreachable, Unreachable::FailOpen);
        assert_eq!(fleet.sync_interval, Duration::from_millis(50));
        let rate = ok.policies[0].rate.as_ref().expect("rate");
        assert_eq!(rate.scope, crate::admission::Scope::Fleet);
        assert_eq!(ok.drain_grace, DEFAULT_DRAIN_GRACE);

        let problems = |text: &str| parse(text, "f").unwrap_err().to_string();
        let e = problems(&format!(
            "[fleet]\nredis = \"http://10.0.0.5\"\ninstances = 3\n{base}"
        ));
        assert!(
            e.contains("f:2: fleet.redis: \"http://10.0.0.5\" is not a Redis URL"),
            "{e}"
        );
        let e = problems(&format!("[fleet]\nredis = \"redis://h:1\"\n{base}"));
        assert!(e.contains("f:1: fleet.instances: missing"), "{e}");
        let e = problems(&format!(
            "[fleet]\nredis = \"redis://h:1\"\ninstances = 2\non_unreachable = \"open\"\n{base}"
        ));
        assert!(
            e.contains("f:4: fleet.on_unreachable: \"open\" is not one of"),
            "{e}"
        );
        let e = problems(&format!(
            "{base}[listener.limits]\nrate = \"1/s\"\nscope = \"fleet\"\n"
        ));
        assert!(
            e.contains("f:5: listener.limits.scope: \"fleet\" needs a [fleet] section"),
            "{e}"
        );
        let e = problems(&format!("{base}[listener.limits]\nscope = \"fleet\"\n"));
        assert!(
            e.contains("f:4: listener.limits.scope: needs `rate`"),
            "{e}"
        );
        let e = problems(&format!("[server]\ndrain_grace = \"soon\"\n{base}"));
        assert!(
            e.contains("f:2: server.drain_grace: \"soon\" is not a duration"),
            "{e}"
        );
        let off = parse(&format!("[server]\ndrain_grace = \"0s\"\n{base}"), "f").unwrap();
        assert_eq!(off.drain_grace, Duration::ZERO);
    }

    #[test]
    fn metrics_listen_is_loopback_only() {
        let base = "[[listener]]\nlisten = \"127.0.0.1:1\"\n";
        let ok = parse(
            &format!("[server]\nmetrics_listen = \"127.0.0.1:9100\"\n{base}"),
            "m",
        )
        .expect("loopback is fine");
        assert_eq!(ok.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let wide = parse(
            &format!("[server]\nmetrics_listen = \"0.0.0.0:9100\"\n{base}"),
            "m",
        )
        .unwrap_err();
        assert!(
            wide.to_string()
                .contains("m:2: server.metrics_listen: 0.0.0.0:9100 is not a loopback address"),
            "{wide}"
        );
    }

    #[test]
    fn route_problems_are_all_reported() {
        let text = "[[listener]]\nlisten = \"127.0.0.1:1\"\n[upstream.a]\nbackends = [\"tcp://127.0.0.1:2\"]\n\
                    [[route]]\nhost = \"a b\"\npath_prefix = \"x\"\nupstream = \"a\"\n\
                    [[route]]\nhost = \"[::1]\"\nupstream = \"a\"\n";
        let err = parse(text, "r.toml").unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.to_string().contains("r.toml:6: route.host:"), "{err}");
        assert!(
            err.to_string().contains("r.toml:7: route.path_prefix:"),
            "{err}"
        );
        let zero = parse(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\nheader_timeout = \"0s\"\n",
            "z",
        )
        .unwrap_err();
        assert!(zero.to_string().contains("greater than zero"), "{zero}");
        let huge = parse(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\nheader_timeout = \"18446744073709551615s\"\n",
            "h",
        )
        .unwrap_err();
        assert!(huge.to_string().contains("at most 7 days"), "{huge}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn quick_config() {
        let s = quick("127.0.0.1:0", "tcp://127.0.0.1:9", None).unwrap();
        assert_eq!(s.rules.routes().len(), 1);
        let err = quick("127.0.0.1:0", "ftp://x", None).unwrap_err();
        assert!(err.to_string().starts_with("<command line>:"), "{err}");
    }
}
