//! Validating `[listener.limits]` and `[route.limits]` into admission
//! [`Policy`]s.
//!
//! Owns: the keys' syntax, ranges and defaults. Does not own: what the
//! limits do (`crate::admission`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::Validator;
use super::file::LimitsSection;
use crate::admission::{
    DEFAULT_MAX_BODY, DEFAULT_SHED_WRITES_AT, DecodeGuard, Key, Policy, Queue, Rate, Scope,
};
use crate::http::head::is_tchar;

/// Largest body cap a config may set (the decode guard holds a whole
/// body in memory, and a count past this is a typo).
const MAX_BODY_LIMIT: u64 = 1 << 40;

/// Where a `limits` table is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    Listener,
    Route,
}

impl Owner {
    fn key(self) -> &'static str {
        match self {
            Owner::Listener => "listener.limits",
            Owner::Route => "route.limits",
        }
    }
}

/// Parse `1048576`, `"512KiB"`, `"1MiB"`, `"2GiB"` (also `K`, `M`, `G`,
/// `KB`, `MB`, `GB`, all powers of 1024 as nginx reads `1m`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let unit = s[digits..].trim().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Parse `"100/s"`, `"600/m"`, `"3600/h"` into requests per second.
pub fn parse_rate(s: &str) -> Option<f64> {
    let (n, per) = s.trim().split_once('/')?;
    let n: u64 = n.trim().parse().ok()?;
    let seconds = match per.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    (n > 0).then(|| n as f64 / seconds)
}

impl Validator<'_> {
    fn size(&mut self, value: &Option<Spanned<toml::Value>>, key: &str) -> Option<u64> {
        let v = value.as_ref()?;
        let parsed = match v.get_ref() {
            toml::Value::Integer(n) => u64::try_from(*n).ok(),
            toml::Value::String(s) => parse_size(s),
            _ => None,
        };
        match parsed {
            Some(n) if (1..=MAX_BODY_LIMIT).contains(&n) => Some(n),
            _ => {
                self.problem(
                    v.span(),
                    key,
                    format!(
                        "{} is not a size from 1 byte to 1TiB; write e.g. 1048576 or \"1MiB\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn key_source(&mut self, value: &Spanned<String>, key: &str, tenant_allowed: bool) -> Key {
        let s = value.get_ref().trim();
        match s {
            "client_ip" => return Key::ClientIp,
            "all" => return Key::All,
            "tenant" if tenant_allowed => return Key::Tenant,
            _ => {}
        }
        if let Some(name) = s.strip_prefix("header:")
            && !name.is_empty()
            && name.bytes().all(is_tchar)
        {
            return Key::Header(name.to_ascii_lowercase().into_bytes());
        }
        let choices = if tenant_allowed {
            "client_ip, header:NAME, tenant or all"
        } else {
            "client_ip, header:NAME or all"
        };
        self.problem(
            value.span(),
            key,
            format!("{s:?} is not a key source; use {choices}"),
        );
        Key::All
    }

    /// `scope`: `local` (the default) or `fleet`, which needs `[fleet]`.
    fn scope(&mut self, value: &Option<Spanned<String>>, key: &str) -> Scope {
        match value.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "local")) => Scope::Local,
            Some((v, "fleet")) => {
                if !self.has_fleet {
                    self.problem(
                        v.span(),
                        key,
                        "\"fleet\" needs a [fleet] section naming the Redis the instances share",
                    );
                }
                Scope::Fleet
            }
            Some((v, other)) => {
                self.problem(
                    v.span(),
                    key,
                    format!("{other:?} is not one of \"local\", \"fleet\""),
                );
                Scope::Local
            }
        }
    }

    /// Compile a listener's or route's `limits` table. A listener always
    /// gets a policy (its body cap defaults to 1 MiB); a route only when it
    /// has a table.
    pub(super) fn policy(
        &mut self,
        section: Option<&Spanned<LimitsSection>>,
        owner: Owner,
    ) -> Option<Arc<Policy>> {
        let id = self.policies.len();
        let Some(section) = section else {
            if owner == Owner::Route {
                return None;
            }
            let p = Arc::new(Policy::body_only(id, Some(DEFAULT_MAX_BODY)));
            self.policies.push(p.clone());
            return Some(p);
        };
        let l = section.get_ref();
        let k = owner.key();
        let key = |name: &str| format!("{k}.{name}");

        let max_body = self.size(&l.max_body, &key("max_body"));
        let max_body = match owner {
            Owner::Listener => Some(max_body.unwrap_or(DEFAULT_MAX_BODY)),
            // A route without its own cap keeps its listener's.
            Owner::Route => max_body,
        };

        let rate = match &l.rate {
            Some(r) => match parse_rate(r.get_ref()) {
                Some(per_second) => {
                    let burst = self.int(&l.burst, &key("burst"), 1..=1_000_000_000, 0);
                    let principal = match &l.principal {
                        Some(p) => self.key_source(p, &key("principal"), true),
                        None => Key::ClientIp,
                    };
                    let scope = self.scope(&l.scope, &key("scope"));
                    Some(Rate {
                        scope,
                        per_second,
                        // A second's worth by default, at least one.
                        burst: if burst > 0 {
                            burst as f64
                        } else {
                            per_second.ceil().max(1.0)
                        },
                        principal,
                    })
                }
                None => {
                    self.problem(
                        r.span(),
                        key("rate"),
                        format!(
                            "{:?} is not a rate; write e.g. \"100/s\", \"600/m\" or \"3600/h\"",
                            r.get_ref()
                        ),
                    );
                    None
                }
            },
            None => {
                for (span, name) in [
                    (l.burst.as_ref().map(|v| v.span()), "burst"),
                    (l.principal.as_ref().map(|v| v.span()), "principal"),
                    (l.scope.as_ref().map(|v| v.span()), "scope"),
                ] {
                    if let Some(span) = span {
                        self.problem(span, key(name), "needs `rate`");
                    }
                }
                None
            }
        };

        let max_inflight = l
            .max_inflight
            .as_ref()
            .map(|_| self.int(&l.max_inflight, &key("max_inflight"), 1..=1_000_000, 1) as usize);
        let shed_at = match &l.shed_writes_at {
            Some(v) if (0.0..=1.0).contains(v.get_ref()) && *v.get_ref() > 0.0 => *v.get_ref(),
            Some(v) => {
                self.problem(
                    v.span(),
                    key("shed_writes_at"),
                    format!("{} must be above 0 and at most 1", v.get_ref()),
                );
                DEFAULT_SHED_WRITES_AT
            }
            None => DEFAULT_SHED_WRITES_AT,
        };
        let write_limit = match max_inflight {
            // At least one write can run; 1.0 sheds writes only at the cap.
            Some(m) => ((m as f64 * shed_at).ceil() as usize).clamp(1, m),
            None => usize::MAX,
        };

        let queued = l.queue_depth.is_some()
            || l.queue_timeout.is_some()
            || l.tenant.is_some()
            || l.tenant_weights.is_some()
            || l.quiet_reserve.is_some();
        let queue = if queued {
            if max_inflight.is_none() {
                self.problem(
                    section.span(),
                    key("queue_depth"),
                    "fair queuing needs `max_inflight` (requests queue when it is reached)",
                );
            }
            let depth = self.int(&l.queue_depth, &key("queue_depth"), 1..=100_000, 64) as usize;
            let timeout = self.duration(
                &l.queue_timeout,
                &key("queue_timeout"),
                Duration::from_secs(1),
            );
            let tenant = match &l.tenant {
                Some(t) => self.key_source(t, &key("tenant"), false),
                None => Key::ClientIp,
            };
            let mut weights = HashMap::new();
            if let Some(w) = &l.tenant_weights {
                for (name, weight) in w.get_ref() {
                    if !(1..=1000).contains(weight) {
                        self.problem(
                            w.span(),
                            key("tenant_weights"),
                            format!("weight of {name:?} is {weight}; use 1 to 1000"),
                        );
                    }
                    weights.insert(name.clone().into_bytes(), (*weight).clamp(1, 1000) as u32);
                }
            }
            Some(Queue {
                tenant,
                depth,
                timeout,
                weights,
            })
        } else {
            None
        };
        let quiet_reserve = match (max_inflight, &queue) {
            (Some(max), Some(_)) => {
                // One slot in 16 by default, at least one when there are two.
                let default = if max >= 2 { (max / 16).max(1) } else { 0 };
                self.int(
                    &l.quiet_reserve,
                    &key("quiet_reserve"),
                    0..=(max as i64 - 1),
                    default as i64,
                ) as usize
            }
            _ => 0,
        };
        if let Some(Rate {
            principal: Key::Tenant,
            ..
        }) = &rate
            && queue.is_none()
            && let Some(p) = &l.principal
        {
            self.problem(
                p.span(),
                key("principal"),
                "\"tenant\" needs a `tenant` key source in the same table",
            );
        }

        let decode_keys = [
            l.decode_guard.as_ref().map(|v| v.span()),
            l.decode_ratio.as_ref().map(|v| v.span()),
            l.decode_max.as_ref().map(|v| v.span()),
        ];
        let decode = if owner == Owner::Listener {
            if let Some(span) = decode_keys.into_iter().flatten().next() {
                self.problem(
                    span,
                    key("decode_guard"),
                    "the decode guard is set per route ([route.limits])",
                );
            }
            None
        } else if l.decode_guard.as_ref().is_some_and(|v| *v.get_ref()) {
            let ratio = self.int(&l.decode_ratio, &key("decode_ratio"), 1..=1_000_000, 10) as u64;
            let max = self
                .size(&l.decode_max, &key("decode_max"))
                .unwrap_or(8 * 1024 * 1024);
            Some(DecodeGuard { ratio, max })
        } else {
            if let Some(span) = decode_keys[1..].iter().flatten().next() {
                self.problem(
                    span.clone(),
                    key("decode_guard"),
                    "decode_ratio and decode_max need `decode_guard = true`",
                );
            }
            None
        };

        let p = Arc::new(Policy {
            id,
            max_body,
            rate,
            max_inflight,
            write_limit,
            quiet_reserve,
            queue,
            decode,
        });
        self.policies.push(p.clone());
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("8 MB"), Some(8 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1.5MiB"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("1PiB"), None);
    }

    const BASE: &str = "[[listener]]\nlisten = \"127.0.0.1:1\"\n[upstream.a]\nbackends = [\"tcp://127.0.0.1:2\"]\n";

    fn problems(extra: &str) -> String {
        match super::super::parse(&format!("{BASE}{extra}"), "l.toml") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn limits_compile_with_defaults() {
        let s = super::super::parse(
            &format!(
                "{BASE}[[route]]\nupstream = \"a\"\n[route.limits]\nrate = \"600/m\"\nmax_inflight = 10\n\
                 tenant = \"header:X-Tenant\"\ntenant_weights = {{ gold = 4 }}\ndecode_guard = true\n"
            ),
            "l.toml",
        )
        .expect("valid");
        let listener = &s.listeners[0].policy;
        assert_eq!(listener.max_body, Some(DEFAULT_MAX_BODY));
        assert!(!listener.limits_requests());
        let route = &s.policies[1];
        assert_eq!(
            route.max_body, None,
            "a route without a cap keeps its listener's"
        );
        let rate = route.rate.as_ref().expect("rate");
        assert_eq!((rate.per_second, rate.burst), (10.0, 10.0));
        assert_eq!(rate.principal, Key::ClientIp);
        assert_eq!(route.write_limit, 8);
        assert_eq!(route.quiet_reserve, 1);
        let q = route.queue.as_ref().expect("queue");
        assert_eq!((q.depth, q.timeout), (64, Duration::from_secs(1)));
        assert_eq!(q.tenant, Key::Header(b"x-tenant".to_vec()));
        assert_eq!(q.weights.get(&b"gold"[..]), Some(&4));
        let d = route.decode.expect("guard");
        assert_eq!((d.ratio, d.max), (10, 8 << 20));
    }

    #[test]
    fn limit_problems_name_line_and_key() {
        let e = problems("[[route]]\nupstream = \"a\"\n[route.limits]\nrate = \"fast\"\n");
        assert!(
            e.contains("l.toml:8: route.limits.rate: \"fast\" is not a rate"),
            "{e}"
        );
        let e = problems("[[route]]\nupstream = \"a\"\n[route.limits]\nmax_body = \"1.5MiB\"\n");
        assert!(e.contains("l.toml:8: route.limits.max_body:"), "{e}");
        let e = problems("[[route]]\nupstream = \"a\"\n[route.limits]\nqueue_depth = 4\n");
        assert!(e.contains("fair queuing needs `max_inflight`"), "{e}");
        let e = problems("[[route]]\nupstream = \"a\"\n[route.limits]\nburst = 4\n");
        assert!(e.contains("route.limits.burst: needs `rate`"), "{e}");
        let e = problems(
            "[[route]]\nupstream = \"a\"\n[route.limits]\nrate = \"1/s\"\nprincipal = \"cookie\"\n",
        );
        assert!(
            e.contains("route.limits.principal: \"cookie\" is not a key source"),
            "{e}"
        );
        let e = problems(
            "[[route]]\nupstream = \"a\"\n[route.limits]\nmax_inflight = 2\nshed_writes_at = 1.5\n",
        );
        assert!(e.contains("route.limits.shed_writes_at"), "{e}");
        let e = problems("[listener.limits]\ndecode_guard = true\n");
        assert!(
            e.contains("listener.limits.decode_guard: the decode guard is set per route"),
            "{e}"
        );
        let e = problems("[[rule]]\nlog = [\"status\"]\n[rule.limits]\nmax_inflight = 1\n");
        assert!(
            e.contains("rule.limits: admission limits belong to a [[route]]"),
            "{e}"
        );
        let e = problems("[listener.limits]\nmax_inflight = 0\n");
        assert!(
            e.contains("listener.limits.max_inflight: 0 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100/s"), Some(100.0));
        assert_eq!(parse_rate("600/m"), Some(10.0));
        assert_eq!(parse_rate(" 3600 / h "), Some(1.0));
        assert_eq!(parse_rate("0/s"), None);
        assert_eq!(parse_rate("100"), None);
        assert_eq!(parse_rate("100/d"), None);
    }
}
