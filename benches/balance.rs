//! Backend selection cost against the size of the group: 2, 64 and 1,024
//! backends, for each method. Each iteration picks a backend and records
//! an answer from it (inflight up, EWMA update, inflight down), as a
//! proxied request does. The goal is a flat line: no method scans the
//! group.
//!
//! `cargo bench --bench balance`

use std::hint::black_box;
use std::time::{Duration, Instant};

use coregate::balance::{GroupView, Outcome};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn group(n: usize, method: &str) -> coregate::config::UpstreamGroup {
    let backends: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "\"tcp://10.{}.{}.{}:80\"",
                i / 65536,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect();
    let extra = if method == "hash" {
        "hash_key = \"client_ip\"\n"
    } else {
        ""
    };
    let text = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[upstream.app]\nbackends = [{}]\nbalance = \"{method}\"\n{extra}",
        backends.join(",")
    );
    let mut s = coregate::config::parse(&text, "bench").expect("valid config");
    s.upstreams.remove(0)
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    let now = Instant::now();
    for method in [
        "p2c",
        "least_inflight",
        "round_robin",
        "weighted_round_robin",
        "hash",
    ] {
        for n in [2usize, 64, 1024] {
            let group = group(n, method);
            let view = GroupView::new(&group, 0);
            let b = &group.balance;
            let mut key = 0x1234_5678_9abc_def0u64;
            g.bench_with_input(BenchmarkId::new(method, n), &n, |bench, _| {
                bench.iter(|| {
                    key = key.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let i = view
                        .pick(&group, black_box(key), now, None)
                        .expect("healthy");
                    view.start(i);
                    view.record(b, i, Outcome::Answered(Duration::from_micros(500)), now);
                    view.finish(i);
                    i
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
