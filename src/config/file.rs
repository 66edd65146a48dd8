//! The TOML file as written by the user (`FileConfig`): serde types that
//! mirror the file one to one and keep each value's position, so that
//! validation can name the line of every problem.
//!
//! Owns: the schema and its defaults' documentation. Does not own:
//! deciding whether values are valid (see `validate`).

use serde::Deserialize;
use toml::Spanned;

/// Top level of a coregate config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub listener: Vec<Spanned<ListenerSection>>,
    #[serde(default)]
    pub upstream: std::collections::BTreeMap<String, Spanned<UpstreamSection>>,
    /// Routing rules: the first that matches wins.
    #[serde(default)]
    pub route: Vec<Spanned<RuleSection>>,
    /// Stacking rules (header edits, access log): every match applies.
    #[serde(default)]
    pub rule: Vec<Spanned<RuleSection>>,
    /// Fleet-wide rate limits through Redis.
    pub fleet: Option<Spanned<FleetSection>>,
}

/// `[fleet]`: the instances behind one L4 balancer share rate limits with
/// `scope = "fleet"` through Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://...` (TLS), or
    /// `redis+unix:///PATH`.
    pub redis: Option<Spanned<String>>,
    /// How often counts go to Redis and shares come back.
    pub sync_interval: Option<Spanned<String>>,
    /// `local_share` or `fail_open`.
    pub on_unreachable: Option<Spanned<String>>,
    /// The fleet's size, for the local share.
    pub instances: Option<Spanned<i64>>,
}

/// `[server]`: process-wide settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_timeout: Option<Spanned<String>>,
    /// After SIGTERM, how long `/readyz` says draining while requests are
    /// still served, before the listeners close.
    pub drain_grace: Option<Spanned<String>>,
    /// Admin UNIX socket (reload, stats), created with mode 0600.
    pub admin_socket: Option<Spanned<String>>,
    /// Loopback address of an HTTP listener serving `/metrics`; off by
    /// default.
    pub metrics_listen: Option<Spanned<String>>,
    /// Where access log lines go: a file path, or `-` for stdout.
    pub access_log: Option<Spanned<String>>,
    /// The user to run as after binding, when started as root.
    pub user: Option<Spanned<String>>,
}

/// `[[listener]]`: one address every worker accepts on (SO_REUSEPORT).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub listen: Spanned<String>,
    pub backlog: Option<Spanned<i64>>,
    pub max_head_bytes: Option<Spanned<i64>>,
    pub max_headers: Option<Spanned<i64>>,
    pub max_uri_bytes: Option<Spanned<i64>>,
    pub header_timeout: Option<Spanned<String>>,
    pub keepalive_timeout: Option<Spanned<String>>,
    pub body_timeout: Option<Spanned<String>>,
    pub send_timeout: Option<Spanned<String>>,
    /// From the first byte of a request to the last byte of its body.
    pub request_timeout: Option<Spanned<String>>,
    /// Open connections per worker on this listener.
    pub max_connections: Option<Spanned<i64>>,
    /// Open tunnels (upgraded connections) per worker on this listener.
    pub max_tunnels: Option<Spanned<i64>>,
    /// A tunnel with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Option<Spanned<String>>,
    /// Liveness and readiness paths answered by the worker; "" turns one off.
    pub health_path: Option<Spanned<String>>,
    pub ready_path: Option<Spanned<String>>,
    pub limits: Option<Spanned<LimitsSection>>,
    /// `[listener.tls]`: HTTPS on this listener.
    pub tls: Option<Spanned<TlsSection>>,
}

/// `[listener.tls]`: certificates, chosen by SNI (the first when the
/// client names none or none matches).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// `[{ cert = "site.pem", key = "site.key" }, ...]`: PEM files,
    /// relative to the config file's directory unless absolute.
    pub certs: Spanned<Vec<Spanned<CertSection>>>,
    /// From accept to the end of the handshake.
    pub handshake_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertSection {
    pub cert: String,
    pub key: String,
}

/// `[listener.limits]` and `[route.limits]`: admission control.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest request body: bytes, or `"512KiB"`, `"1MiB"`.
    pub max_body: Option<Spanned<toml::Value>>,
    /// Requests per principal for the whole process: `"100/s"`, `"600/m"`.
    pub rate: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
    /// `client_ip`, `header:NAME`, `tenant` or `all`.
    pub principal: Option<Spanned<String>>,
    /// `local` (this process) or `fleet` (every instance, via `[fleet]`).
    pub scope: Option<Spanned<String>>,
    /// Requests in flight per worker.
    pub max_inflight: Option<Spanned<i64>>,
    /// Share of `max_inflight` beyond which writes are shed.
    pub shed_writes_at: Option<Spanned<f64>>,
    /// Fair queuing when `max_inflight` is reached.
    pub queue_depth: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<String>>,
    /// `client_ip`, `header:NAME` or `all`.
    pub tenant: Option<Spanned<String>>,
    pub tenant_weights: Option<Spanned<std::collections::BTreeMap<String, i64>>>,
    /// Slots of `max_inflight` kept for tenants without a backlog.
    pub quiet_reserve: Option<Spanned<i64>>,
    /// Routes only.
    pub decode_guard: Option<Spanned<bool>>,
    pub decode_ratio: Option<Spanned<i64>>,
    pub decode_max: Option<Spanned<toml::Value>>,
}

/// `[upstream.NAME]`: a group of interchangeable backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub backends: Spanned<Vec<Spanned<String>>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub response_timeout: Option<Spanned<String>>,
    pub read_timeout: Option<Spanned<String>>,
    pub keepalive_timeout: Option<Spanned<String>>,
    pub max_idle: Option<Spanned<i64>>,
    /// `p2c`, `least_inflight`, `round_robin`, `weighted_round_robin`, `hash`.
    pub balance: Option<Spanned<String>>,
    /// For `hash`: `header:NAME`, `client_ip` or `path`.
    pub hash_key: Option<Spanned<String>>,
    /// One per backend, for `weighted_round_robin`.
    pub weights: Option<Spanned<Vec<i64>>>,
    pub max_fails: Option<Spanned<i64>>,
    pub eject_time: Option<Spanned<String>>,
    pub max_eject_time: Option<Spanned<String>>,
    pub eject_on_5xx: Option<Spanned<bool>>,
    /// `fail_open` or `503`.
    pub all_ejected: Option<Spanned<String>>,
    pub retry_budget: Option<Spanned<f64>>,
    /// Connections in use per backend per worker.
    pub max_conns: Option<Spanned<i64>>,
    /// Active checks: `{ path = "/health", interval = "5s", ... }`.
    pub health_check: Option<Spanned<HealthCheckSection>>,
    /// `https://` backends: trusted CA certificates (PEM) instead of the
    /// system's.
    pub ca: Option<Spanned<String>>,
    /// `https://` backends: `false` accepts any certificate.
    pub tls_verify: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    pub path: String,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy: Option<Spanned<i64>>,
    pub unhealthy: Option<Spanned<i64>>,
}

/// Declares the sections that hold matchers with the matcher keys written
/// once: `[[route]]`/`[[rule]]` (`RuleSection`, with the keys of its own
/// after them), `not = { ... }` (`MatchSection`), and `Matchers`, the
/// keys borrowed from either, which the rule compiler reads. Both
/// sections keep `deny_unknown_fields` and every key's span.
macro_rules! sections_with_matchers {
    (
        matchers { $($(#[$m_doc:meta])* $m_key:ident: $m_ty:ty,)* }
        $(#[$r_doc:meta])*
        rule { $($(#[$k_doc:meta])* $k_key:ident: $k_ty:ty,)* }
    ) => {
        /// The matcher keys of a rule or of its `not`.
        pub struct Matchers<'a> {
            $($(#[$m_doc])* pub $m_key: &'a Option<$m_ty>,)*
        }

        /// The matchers of `not = { ... }`: the same keys as a rule's.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct MatchSection {
            $($(#[$m_doc])* pub $m_key: Option<$m_ty>,)*
        }

        $(#[$r_doc])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RuleSection {
            $($(#[$m_doc])* pub $m_key: Option<$m_ty>,)*
            $($(#[$k_doc])* pub $k_key: Option<$k_ty>,)*
        }

        impl MatchSection {
            pub fn matchers(&self) -> Matchers<'_> {
                Matchers { $($m_key: &self.$m_key,)* }
            }
        }

        impl RuleSection {
            pub fn matchers(&self) -> Matchers<'_> {
                Matchers { $($m_key: &self.$m_key,)* }
            }
        }
    };
}

sections_with_matchers! {
    matchers {
        host: Spanned<OneOrMany>,
        path: Spanned<String>,
        path_prefix: Spanned<String>,
        path_regex: Spanned<String>,
        methods: Spanned<Vec<Spanned<String>>>,
        header: Vec<Spanned<FieldSection>>,
        query: Vec<Spanned<FieldSection>>,
        client: Spanned<Vec<Spanned<String>>>,
        /// `"http"` or `"https"`: how the request came.
        scheme: Spanned<String>,
    }
    /// `[[route]]` and `[[rule]]`: matchers, then actions. Which keys a
    /// kind accepts is checked by validation (a `[[rule]]` has no terminal
    /// action).
    rule {
        name: Spanned<String>,
        /// The rule does not match when all of these hold.
        not: Spanned<MatchSection>,
        // Terminal actions (routes only): exactly one.
        upstream: Spanned<String>,
        respond: Spanned<RespondSection>,
        redirect: Spanned<RedirectSection>,
        drop: Spanned<String>,
        // Path changes for `upstream`.
        strip_prefix: Spanned<String>,
        rewrite: Spanned<String>,
        // Stacking actions.
        request_headers: Spanned<EditSection>,
        response_headers: Spanned<EditSection>,
        log: Spanned<Vec<Spanned<String>>>,
        /// Admission control for the route (routes only).
        limits: Spanned<LimitsSection>,
        /// Protocols a request may switch to through this route
        /// (`Upgrade`): routes with `upstream` only; `["websocket"]` when
        /// unset.
        upgrade: Spanned<Vec<Spanned<String>>>,
        /// Replaces the listener's for tunnels opened through this route.
        tunnel_idle_timeout: Spanned<String>,
    }
}

/// `"a"` or `["a", "b"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `{ name = "X-Env", equals = "canary" }`: one of `present`, `equals`,
/// `regex`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSection {
    pub name: String,
    pub present: Option<bool>,
    pub equals: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondSection {
    pub status: Spanned<i64>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSection {
    pub location: Spanned<String>,
    pub status: Option<Spanned<i64>>,
}

/// `{ set = { Name = "v" }, add = { Name = "v" }, remove = ["Name"] }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditSection {
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub add: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}
