//! Rule evaluation cost against the number of rules: 10, 100, 1,000 and
//! 10,000 routes, half path prefixes (`/svc{i}/`) and half anchored regexes
//! (`^/api/v{i}/users/(\d+)$`), plus two stacking rules, compiled from TOML
//! text as `coregate run` would. Each iteration evaluates one request in
//! full (`RuleSet::evaluate`: stacking rules, first matching route, its
//! captures and header edits).
//!
//! `cargo bench --bench rules`
//!
//! Requests: the last prefix rule, the last regex rule (with a capture),
//! and a path no rule matches.

use std::hint::black_box;

use coregate::http::view::RequestView;
use coregate::rules::{Decision, Scratch};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn config(n: usize) -> String {
    let mut text = String::from(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[upstream.app]\nbackends = [\"tcp://127.0.0.1:9\"]\n\n\
         [[rule]]\nrequest_headers = { set = { \"X-Gateway\" = \"coregate\" } }\n\n\
         [[rule]]\npath_prefix = \"/internal/\"\nlog = [\"time\", \"path\", \"status\"]\n\n",
    );
    for i in 0..n {
        if i % 2 == 0 {
            text += &format!("[[route]]\npath_prefix = \"/svc{i}/\"\nupstream = \"app\"\n\n");
        } else {
            text += &format!(
                "[[route]]\npath_regex = '^/api/v{i}/users/(\\d+)$'\nupstream = \"app\"\nrewrite = \"/users/$1\"\n\n"
            );
        }
    }
    text
}

fn view(path: &[u8]) -> RequestView<'_> {
    RequestView {
        method: b"GET",
        host: Some(b"api.example.com"),
        authority: Some(b"api.example.com"),
        path,
        query: b"",
        buf: b"",
        headers: &[],
        client: "10.1.2.3".parse().expect("address"),
        tls: false,
    }
}

fn rules(c: &mut Criterion) {
    let mut group = c.benchmark_group("evaluate");
    for n in [10usize, 100, 1_000, 10_000] {
        let snapshot = coregate::config::parse(&config(n), "bench.toml").expect("valid config");
        let rules = snapshot.rules.clone();
        let last_prefix = format!("/svc{}/orders/17", (n - 1) & !1);
        let last_regex = format!("/api/v{}/users/4711", n - 1 - ((n - 1) % 2 == 0) as usize);
        let cases = [
            ("last_prefix", last_prefix),
            ("last_regex", last_regex),
            ("no_match", "/static/app.js".to_string()),
        ];
        let mut scratch = Scratch::default();
        let mut decision = Decision::default();
        for (name, path) in &cases {
            // Each case must hit (or miss) as intended, or the figure lies.
            rules.evaluate(&view(path.as_bytes()), &mut scratch, &mut decision);
            assert_eq!(
                decision.route.is_some(),
                *name != "no_match",
                "{name} {path}"
            );
            group.bench_with_input(BenchmarkId::new(*name, n), path, |b, path| {
                b.iter(|| {
                    rules.evaluate(
                        &view(black_box(path.as_bytes())),
                        &mut scratch,
                        &mut decision,
                    );
                    black_box(decision.route.is_some())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, rules);
criterion_main!(benches);
