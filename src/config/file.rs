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
    #[serde(default)]
    pub route: Vec<Spanned<RouteSection>>,
}

/// `[server]`: process-wide settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_timeout: Option<Spanned<String>>,
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
}

/// `[[route]]`: requests matching host and path prefix go to `upstream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub upstream: Spanned<String>,
}
