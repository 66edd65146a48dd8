//! The hot per-request components: head parsing, chunked decoding, header
//! filtering (writing the upstream head: hop-by-hop fields out, forwarding
//! fields in) and the buffer pool's get/put. ns per message and bytes per
//! second.
//! `cargo bench --bench parse`

use std::hint::black_box;

use coregate::http::chunked::ChunkedDecoder;
use coregate::http::edits::HeaderPlan;
use coregate::http::encode::{Forwarded, write_upstream_request};
use coregate::http::head::{
    HeadLimits, Method, RequestHead, ResponseHead, parse_request, parse_response,
};
use coregate::net::buffer::BufPool;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// What a desktop browser sends for a page (Firefox, trimmed cookies).
const BROWSER: &[u8] = b"GET /wp-content/uploads/2010/03/hello-kitty-darth-vader-pink.jpg HTTP/1.1\r\n\
Host: www.kittyhell.com\r\n\
User-Agent: Mozilla/5.0 (Macintosh; U; Intel Mac OS X 10.6; ja-JP-mac; rv:1.9.2.3) Gecko/20100401 Firefox/3.6.3 Pathtraq/0.9\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: ja,en-us;q=0.7,en;q=0.3\r\n\
Accept-Encoding: gzip,deflate\r\n\
Accept-Charset: Shift_JIS,utf-8;q=0.7,*;q=0.7\r\n\
Keep-Alive: 115\r\n\
Connection: keep-alive\r\n\
Cookie: wp_ozh_wsa_visits=2; wp_ozh_wsa_visit_lasttime=xxxxxxxxxx; __utma=xxxxxxxxx.xxxxxxxxxx.xxxxxxxxxx.xxxxxxxxxx.xxxxxxxxxx.x; __utmz=xxxxxxxxx.xxxxxxxxxx.x.x.utmccn=(referral)|utmcsr=reader.livedoor.com|utmcct=/reader/|utmcmd=referral\r\n\r\n";

/// A typical JSON API call from a service client.
const API: &[u8] = b"POST /v1/orders?dry_run=false HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: okhttp/4.12.0\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U\r\n\
Content-Type: application/json\r\n\
Accept: application/json\r\n\
X-Request-Id: 5f0c6c1e-8b1a-4c4e-9d57-3f5a2b8e9d10\r\n\
Content-Length: 512\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Date: Sun, 22 Nov 2026 12:00:00 GMT\r\n\
Content-Type: application/json\r\n\
Content-Length: 1234\r\n\
Cache-Control: no-store\r\n\
X-Request-Id: 5f0c6c1e-8b1a-4c4e-9d57-3f5a2b8e9d10\r\n\r\n";

fn heads(c: &mut Criterion) {
    let limits = HeadLimits::default();
    let mut g = c.benchmark_group("request_head");
    for (name, raw) in [("browser", BROWSER), ("api", API)] {
        g.throughput(Throughput::Bytes(raw.len() as u64));
        let mut head = RequestHead::default();
        g.bench_function(name, |b| {
            b.iter(|| parse_request(black_box(raw), &limits, &mut head).expect("valid"))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("response_head");
    g.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    let mut head = ResponseHead::default();
    g.bench_function("api", |b| {
        b.iter(|| {
            parse_response(black_box(RESPONSE), 32 * 1024, Method::Get, &mut head).expect("valid")
        })
    });
    g.finish();
}

fn chunked(c: &mut Criterion) {
    let mut body = Vec::new();
    for _ in 0..64 {
        body.extend_from_slice(b"400\r\n");
        body.extend(std::iter::repeat_n(b'x', 0x400));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut g = c.benchmark_group("chunked");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("64x1KiB", |b| {
        b.iter(|| {
            let mut d = ChunkedDecoder::new();
            let n = d.decode(black_box(&body), |_| {}).expect("valid");
            assert!(d.is_done());
            n
        })
    });
    g.finish();
}

fn filter(c: &mut Criterion) {
    let limits = HeadLimits::default();
    let fwd = Forwarded {
        client_ip: b"203.0.113.7",
        proto: b"http",
        default_host: b"10.0.0.1:8080",
    };
    let edits = HeaderPlan::default();
    let mut g = c.benchmark_group("upstream_head");
    for (name, raw) in [("browser", BROWSER), ("api", API)] {
        let mut head = RequestHead::default();
        parse_request(raw, &limits, &mut head).expect("valid");
        let mut out = Vec::with_capacity(4096);
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                write_upstream_request(&mut out, black_box(raw), &head, &fwd, None, &edits, false);
                out.len()
            })
        });
    }
    g.finish();
}

fn buffers(c: &mut Criterion) {
    let pool = BufPool::new();
    pool.put(pool.get());
    c.bench_function("bufpool/get_put", |b| {
        b.iter(|| {
            let v = pool.get();
            let cap = v.capacity();
            pool.put(black_box(v));
            cap
        })
    });
}

criterion_group!(benches, heads, chunked, filter, buffers);
criterion_main!(benches);
