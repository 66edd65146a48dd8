#!/usr/bin/env python3
"""Figures for admission control: rate limit, fair queuing, decode guard, slow loris.

    python3 scripts/admission-figures.py {rate,fair,bomb,loris,all} [--quick] [--json FILE]

Each figure is a bounded run (well under two minutes; `--quick` is about 4x
shorter, for smoke tests) that starts what it needs on 127.0.0.1, stops it
all again, and prints a Markdown section: a table of numbers, coregate's own
rejection counters (from the `worker N rejected: reason=count ...` lines its
workers log when they drain) and the command that produced it.

rate   Exactness of the shared-nothing rate limit. Two workers each enforce
       half of `rate = "200/s"` for one API key. 600 req/s offered over 32
       keep-alive connections spread over both workers and should be
       admitted at 200/s +-10%. The same load over one connection lands on
       one worker and should get about half: the documented trade-off of
       not sharing a counter between cores.
fair   DRR fair queuing. One worker, `max_inflight = 16` in front of an
       origin that answers in 20 ms (capacity about 800 req/s). Tenant B
       sends 80 req/s alone, then beside tenant A sending 800 req/s (the two
       together exceed capacity). B's success ratio and p99 beside A should
       stay within 20% of B alone; A absorbs the refusals.
bomb   Decode-guard memory. A gzip body of about 100 KiB that inflates to
       about 12 MiB, sent 20 times one after another and 20 times over 8
       concurrent connections; each must get 413, and the proxy's peak RSS
       must rise by less than 16 MiB (it must not hold the decoded body).
       An honest gzip body (about 2x) must still get 200.
loris  Slow loris. Normal traffic (500 req/s over 8 connections) alone,
       then beside 2,000 connections that trickle a header line a second
       and never finish their head (reconnecting as soon as the proxy cuts
       them at the 5 s request deadline). Normal traffic's p99 with the
       loris should stay within 2x of its p99 alone.

How it measures, and why:
- Load is open-loop at a fixed rate: request i is due at start + i/rate,
  whatever happened to earlier ones, and its latency is counted from that
  due time, not from when it was actually written. A closed-loop client
  waits for slow responses before sending more and so hides them
  (coordinated omission). A due request takes a free connection, or opens
  a new one (up to a cap) rather than waiting for one to free up.
- coregate runs on CPU 1 (`taskset -c 1`); origins, load generators and
  this script on CPU 0, so client work does not steal the proxy's core.
  Client-side delay still shows: each load reports its own dispatch lag
  (write time minus due time), so a noisy client can be told apart from a
  slow proxy.
- Every load runs in its own generator process (this script with
  `--loadgen`), so that two loads side by side do not share an event loop
  and one's bursts do not delay the other's schedule.
- The 20 ms origin of figure fair sleeps in a thread per connection, not
  on asyncio timers: those wake at 1 ms granularity and merge responses,
  which bunches the slots of an always-full inflight cap and lengthens
  every wait for a slot (see the comment on the slow origin below;
  `--slow-origin asyncio` shows the difference).
- Each phase gets a fresh coregate: buckets start full, queues empty, and
  the drain-time rejection counters belong to that phase alone.
- Phases that are compared (fair, loris) run interleaved twice (A, B, A,
  B) and the medians are quoted, so a drift of the machine over time hits
  both sides.

Internal modes (used by the script itself): `--serve-slow PORT MS KIND`
(the 20 ms origin), `--loadgen SPEC` (one open-loop load), `--loris SPEC`.
"""
import argparse
import asyncio
import collections
import gzip
import json
import math
import os
import platform
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SELF = Path(__file__).resolve()
REPO = SELF.parent.parent
sys.path.insert(0, str(SELF.parent / "lib"))
from benchkit import Procs, proc_status_kib, raise_nofile, wait_port  # noqa: E402  (balance-figures.py uses them through af)
PROXY_CPU = "1"
CLIENT_CPU = "0"
WANT_NOFILE = 8192
KIB, MIB = 1024, 1024 * 1024


# ---------------------------------------------------------------------------
# Small helpers


def pct(sorted_values, p):
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def yes_no(ok):
    return "yes" if ok else "**no**"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def counts_text(counts):
    """`{"200": 5, "503": 2}` as `200=5 503=2`, or `none`."""
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def free_port():
    # Another process could take it before we bind; on a quiet 127.0.0.1
    # that race is not worth more machinery.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coregate:
    """One `coregate run` on the proxy CPU, from a config text.

    Its stdout and stderr are drained by threads for its whole life: a
    full pipe would block its workers' logging."""

    LISTENING = re.compile(r"coregate listening on http://127\.0\.0\.1:(\d+)")
    REJECTED = re.compile(r"coregate\[(\w+)\] info: worker (\d+) rejected: (.*)")

    def __init__(self, procs, binary, workdir, config, workers):
        self.procs = procs
        path = Path(workdir) / f"coregate-{time.monotonic_ns()}.toml"
        path.write_text(config)
        self.p = procs.start(
            [binary, "run", "--config", path, "--workers", workers],
            PROXY_CPU,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.p.pid  # taskset execs coregate: same pid
        self.port = None
        self.err = []
        self._ready = threading.Event()
        self._threads = [
            threading.Thread(target=self._drain_stdout, daemon=True),
            threading.Thread(target=self._drain_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()
        if not self._ready.wait(10) or self.port is None:
            self.procs.stop(self.p)
            raise RuntimeError("coregate did not start:\n" + "".join(self.err[-20:]))
        wait_port(self.port)

    def _drain_stdout(self):
        for line in self.p.stdout:
            m = self.LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # exited without listening: unblock the waiter

    def _drain_stderr(self):
        for line in self.p.stderr:
            self.err.append(line)

    def stop(self):
        """SIGTERM (coregate drains, then logs its counters); return the
        rejection counts summed over workers and per worker."""
        self.procs.stop(self.p, timeout=15.0)
        for t in self._threads:
            t.join(timeout=5)
        total, per_worker = collections.Counter(), {}
        for line in self.err:
            m = self.REJECTED.search(line)
            if not m:
                continue
            pairs = dict(kv.split("=", 1) for kv in m.group(3).split())
            per_worker[int(m.group(2))] = {k: int(v) for k, v in pairs.items()}
            total.update(per_worker[int(m.group(2))])
        return {"total": dict(total), "per_worker": per_worker}

    def driver(self):
        for line in self.err:
            m = re.search(r"running (\w+)", line)
            if m:
                return m.group(1)
        return "?"


def coregate_config(backend_port, limits=None):
    """A one-listener, one-route config; `limits` becomes [route.limits]."""
    lines = [
        "[server]",
        'drain_timeout = "5s"',
        "",
        "[[listener]]",
        'listen = "127.0.0.1:0"',
        "",
        "[upstream.app]",
        f'backends = ["tcp://127.0.0.1:{backend_port}"]',
        "",
        "[[route]]",
        'upstream = "app"',
    ]
    if limits:
        lines += ["", "[route.limits]"]
        for key, value in limits.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, str):
                value = json.dumps(value)
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


class Bench:
    """What every figure needs: the binary, a temp dir, the process table."""

    def __init__(self, args, procs, workdir):
        self.binary = args.binary
        self.quick = args.quick
        self.slow_kind = args.slow_origin
        self.quiet_reserve = args.quiet_reserve
        self.procs = procs
        self.workdir = workdir

    def seconds(self, full):
        return full / 4 if self.quick else full

    def command(self, name):
        extra = (" --quick" if self.quick else "") + (" --slow-origin asyncio" if self.slow_kind == "asyncio" else "")
        if self.quiet_reserve is not None:
            extra += f" --quiet-reserve {self.quiet_reserve}"
        return f"python3 scripts/admission-figures.py {name}{extra}"

    def fast_origin(self):
        port = free_port()
        p = self.procs.start(
            [self.binary, "origin", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--body-size", "128"],
            CLIENT_CPU,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port)
        return p, port

    def slow_origin(self, ms):
        port = free_port()
        p = self.procs.start(
            [sys.executable, SELF, "--serve-slow", port, ms, self.slow_kind],
            CLIENT_CPU,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port)
        return p, port

    def coregate(self, config, workers):
        return Coregate(self.procs, self.binary, self.workdir, config, workers)

    def loads(self, specs):
        """Run open-loop loads side by side, one generator process each,
        all starting at the same instant; return their results in order."""
        start_at = time.time() + 1.0  # time to open their pools first
        children = []
        for spec in specs:
            spec = dict(spec, start_at=start_at)
            children.append(
                self.procs.start(
                    [sys.executable, SELF, "--loadgen", json.dumps(spec)],
                    CLIENT_CPU,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        longest = max(s["duration"] + s.get("grace", 10) for s in specs) + 30
        results = []
        for p in children:
            out, err = p.communicate(timeout=longest)
            self.procs.forget(p)
            if p.returncode != 0:
                raise RuntimeError(f"load generator failed ({p.returncode}):\n{err.decode()[-2000:]}")
            results.append(summarize_load(json.loads(out)))
        return results


def summarize_load(raw):
    """Percentiles and ratios from one generator's raw result."""
    lat = sorted(raw.pop("lat_ms"))
    statuses = raw["statuses"]
    ok = statuses.get("200", 0)
    raw.update(
        ok=ok,
        success=ok / raw["sent"] if raw["sent"] else None,
        p50_ms=pct(lat, 50),
        p99_ms=pct(lat, 99),
        max_ms=lat[-1] if lat else None,
        offered_rps=raw["sent"] / raw["duration"],
    )
    return raw


def load_spec(port, rate, duration, conns, headers=(), cap=256, grace=10):
    return {
        "port": port,
        "rate": rate,
        "duration": duration,
        "conns": conns,
        "cap": cap,
        "headers": list(headers),
        "grace": grace,
    }


# ---------------------------------------------------------------------------
# Figure 1: rate


def figure_rate(bench):
    """Admitted rate of one API key over 32 connections and over one."""
    duration = bench.seconds(20)
    configured, offered = 200, 600
    limits = {"rate": f"{configured}/s", "burst": 20, "principal": "header:X-Api-Key"}
    origin, oport = bench.fast_origin()
    cases = []
    try:
        config = coregate_config(oport, limits)
        # 1 connection: all requests reach the worker that accepted it. Offered
        # at the same schedule; if the connection cannot keep up, due requests
        # wait for it (cap 1) and the achieved offered rate is reported.
        for name, conns in (("32 connections", 32), ("1 connection", 1)):
            cg = bench.coregate(config, 2)
            try:
                spec = load_spec(cg.port, offered, duration, conns, ["X-Api-Key: figure-key"], cap=conns)
                (res,) = bench.loads([spec])
            finally:
                rejected = cg.stop()
            admitted = res["ok"] / duration
            expect = configured if conns > 1 else configured / 2
            cases.append(
                {
                    "case": name,
                    "connections": conns,
                    "configured_rps": configured,
                    "offered_rps": offered,
                    "offered_achieved_rps": res["offered_rps"],
                    "admitted_rps": admitted,
                    "ratio": admitted / configured,
                    "expected_rps": expect,
                    "within_10pct": abs(admitted / expect - 1) <= 0.10,
                    "load": res,
                    "rejected": rejected,
                    "driver": cg.driver(),
                }
            )
    finally:
        bench.procs.stop(origin)
    rows = [
        [
            c["case"],
            f"{configured}/s",
            f"{c['offered_achieved_rps']:.1f}/s",
            f"{c['admitted_rps']:.1f}/s",
            f"{c['ratio']:.3f}",
            f"{c['expected_rps']:.0f}/s",
            yes_no(c["within_10pct"]),
            counts_text(c["load"]["statuses"]),
        ]
        for c in cases
    ]
    lines = [
        "## Figure 1 (rate): shared-nothing rate limit",
        "",
        f"2 workers (both on CPU 1), `rate = \"{configured}/s\"`, `burst = 20`, `principal = \"header:X-Api-Key\"`, "
        f"one API key, fast origin (128-byte bodies). Open-loop {offered} req/s for {duration:g} s; "
        "admitted rate = 200 responses / duration.",
        "",
        table(
            ["case", "configured", "offered (achieved)", "admitted", "admitted / configured", "expected",
             "within ±10% of expected", "statuses"],
            rows,
        ),
        "",
    ]
    for c in cases:
        per = ", ".join(
            f"w{w}: rate_limited={v.get('rate_limited', 0)}" for w, v in sorted(c["rejected"]["per_worker"].items())
        )
        lines.append(
            f"- {c['case']}: coregate logged rate_limited={c['rejected']['total'].get('rate_limited', 0)} "
            f"({per or 'no worker logged refusals'}); all refusals: {counts_text(c['rejected']['total'])}; "
            f"client errors: {counts_text(c['load']['errors'])}; generator lag p99 {fmt(c['load']['lag_ms']['p99'])} ms."
        )
    lines.append(
        "- Expected: the configured rate over many connections (they spread over both workers); "
        "half of it over one connection (one worker's share), the documented trade-off."
    )
    return "rate", {"duration_s": duration, "cases": cases}, lines


# ---------------------------------------------------------------------------
# Figure 2: fair


def figure_fair(bench):
    """Tenant B's service alone and beside a tenant A that floods the gate."""
    duration = bench.seconds(20)
    b_rate, a_rate, latency_ms = 80, 800, 20
    limits = {"max_inflight": 16, "queue_depth": 16, "queue_timeout": "500ms", "tenant": "header:X-Tenant"}
    # Default: one of the 16 slots is kept for tenants without a backlog.
    reserve = "1 (the default)"
    if bench.quiet_reserve is not None:
        limits["quiet_reserve"] = bench.quiet_reserve
        reserve = str(bench.quiet_reserve)
    origin, oport = bench.slow_origin(latency_ms)
    runs = []
    try:
        config = coregate_config(oport, limits)
        for rnd in (1, 2):
            for phase in ("B alone", "B beside A"):
                specs = [load_spec(0, b_rate, duration, 4, ["X-Tenant: B"])]
                if phase == "B beside A":
                    specs.append(load_spec(0, a_rate, duration, 32, ["X-Tenant: A"]))
                cg = bench.coregate(config, 1)
                try:
                    for s in specs:
                        s["port"] = cg.port
                    results = bench.loads(specs)
                finally:
                    rejected = cg.stop()
                runs.append({"round": rnd, "phase": phase, "B": results[0],
                             "A": results[1] if len(results) > 1 else None, "rejected": rejected})
    finally:
        bench.procs.stop(origin)

    def med(phase, tenant, key):
        return median(r[tenant][key] for r in runs if r["phase"] == phase)

    alone_s, beside_s = med("B alone", "B", "success"), med("B beside A", "B", "success")
    alone_p99, beside_p99 = med("B alone", "B", "p99_ms"), med("B beside A", "B", "p99_ms")
    succ_ratio = beside_s / alone_s if alone_s else None
    p99_ratio = beside_p99 / alone_p99 if alone_p99 else None
    summary = {
        "B_success_alone": alone_s,
        "B_success_beside": beside_s,
        "success_ratio": succ_ratio,
        "success_within_20pct": succ_ratio is not None and abs(succ_ratio - 1) <= 0.20,
        "B_p99_alone_ms": alone_p99,
        "B_p99_beside_ms": beside_p99,
        "p99_ratio": p99_ratio,
        "p99_within_20pct": p99_ratio is not None and abs(p99_ratio - 1) <= 0.20,
        "A_success_beside": med("B beside A", "A", "success"),
    }
    rows = []
    for r in runs:
        for tenant in ("B", "A"):
            res = r[tenant]
            if res is None:
                continue
            rows.append([r["round"], r["phase"], tenant, f"{res['offered_rps']:.1f}", res["sent"],
                         f"{res['success']:.4f}", res["p50_ms"], res["p99_ms"], counts_text(res["statuses"]),
                         fmt(res["lag_ms"]["p99"])])
    lines = [
        "## Figure 2 (fair): DRR fair queuing",
        "",
        f"1 worker, origin answers after {latency_ms} ms ({bench.slow_kind} origin, CPU 0), `max_inflight = 16`, `queue_depth = 16`, "
        f"`queue_timeout = \"500ms\"`, `tenant = \"header:X-Tenant\"`, `quiet_reserve` {reserve}: "
        "capacity about 16 / 0.020 s = 800 req/s. "
        f"B sends {b_rate} req/s; A sends {a_rate} req/s. {duration:g} s per phase, fresh coregate per phase, "
        "phases interleaved (alone, beside, alone, beside); medians are of the two rounds (the mean of two). "
        "A and B run as two separate generator processes, both on CPU 0. "
        "Gen lag: how late the generator itself wrote requests (client-side noise, included in latency).",
        "",
        table(["round", "phase", "tenant", "offered req/s", "sent", "success (200/sent)", "p50 ms", "p99 ms",
               "statuses", "gen lag p99 ms"], rows),
        "",
        table(
            ["B, median", "alone", "beside A", "beside / alone", "within 20%"],
            [
                ["success ratio", f"{alone_s:.4f}", f"{beside_s:.4f}", f"{succ_ratio:.3f}",
                 yes_no(summary["success_within_20pct"])],
                ["p99 latency (ms)", alone_p99, beside_p99, f"{p99_ratio:.3f}", yes_no(summary["p99_within_20pct"])],
            ],
        ),
        "",
        f"- A beside B: median success ratio {fmt(summary['A_success_beside'], 4)}; its refusals are what keeps B whole.",
        f"- B's added median latency beside A: {fmt(med('B beside A', 'B', 'p50_ms') - med('B alone', 'B', 'p50_ms'))} ms, "
        "its wait for a slot. B has no backlog, so it takes a reserved slot (`quiet_reserve`) at once, or is the "
        "next one served when a slot frees (new tenants go first, as in FQ-CoDel); `--quiet-reserve 0` shows "
        "what it is like without the reserve.",
    ]
    for r in runs:
        lines.append(f"- coregate refusals, round {r['round']} {r['phase']}: {counts_text(r['rejected']['total'])}")
    return "fair", {"duration_s": duration, "runs": runs, "summary": summary}, lines


# ---------------------------------------------------------------------------
# Figure 3: bomb


def build_bomb(decoded_size=12 * MIB, lo=90 * KIB, hi=110 * KIB):
    """Zeros with random bytes sprinkled in, compressed with gzip; the
    number of random bytes is tuned until the compressed size is in range.
    Deterministic: the same seed gives the same body on every run."""
    sprinkles = 30000
    for _ in range(12):
        rng = random.Random(1)
        data = bytearray(decoded_size)
        for _ in range(sprinkles):
            data[rng.randrange(decoded_size)] = rng.randrange(1, 256)
        body = gzip.compress(bytes(data), compresslevel=9, mtime=0)
        if lo <= len(body) <= hi:
            return body, decoded_size
        # Compressed size is close to linear in the sprinkles.
        sprinkles = int(sprinkles * ((lo + hi) / 2) / len(body))
    raise RuntimeError(f"could not tune the bomb into {lo}..{hi} bytes (last {len(body)})")


def build_honest(decoded_size=64 * KIB):
    """Hex text of random bytes: 4 bits of entropy per byte, so gzip gets
    about 2x, well under the guard's ratio of 10."""
    data = random.Random(2).randbytes(decoded_size // 2).hex().encode()
    return gzip.compress(data, compresslevel=6, mtime=0), len(data)


async def post_gzip(port, body):
    """POST one gzip body on a new connection; return the status, or the
    error's name when the proxy cut the connection without an answer."""
    head = (
        "POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # it may answer and close before reading it all; read the answer
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            return "closed"
        return str(int(line.split()[1]))
    except (ConnectionError, asyncio.TimeoutError) as e:
        return type(e).__name__
    finally:
        writer.close()


async def send_bombs(port, body, sequential, concurrent, width):
    seq = [await post_gzip(port, body) for _ in range(sequential)]
    gate = asyncio.Semaphore(width)

    async def one():
        async with gate:
            return await post_gzip(port, body)

    par = await asyncio.gather(*(one() for _ in range(concurrent)))
    return collections.Counter(seq), collections.Counter(par)


def figure_bomb(bench):
    """Peak RSS of the proxy while it refuses decompression bombs."""
    bomb, bomb_decoded = build_bomb()
    honest, honest_decoded = build_honest()
    origin, oport = bench.fast_origin()
    try:
        cg = bench.coregate(coregate_config(oport, {"decode_guard": True}), 1)
        try:
            # Warm up with one plain request, so first-request allocations
            # (buffer pools, the upstream connection) do not count as the
            # bomb's.
            warm = asyncio.run(plain_get(cg.port))
            time.sleep(0.3)
            rss_before = proc_status_kib(cg.pid, "VmRSS")
            hwm_before = proc_status_kib(cg.pid, "VmHWM")
            seq, par = asyncio.run(send_bombs(cg.port, bomb, 20, 20, 8))
            time.sleep(0.3)
            rss_after = proc_status_kib(cg.pid, "VmRSS")
            hwm_after = proc_status_kib(cg.pid, "VmHWM")
            honest_status = asyncio.run(post_gzip(cg.port, honest))
        finally:
            rejected = cg.stop()
    finally:
        bench.procs.stop(origin)
    rise_kib = hwm_after - rss_before
    res = {
        "bomb_compressed_bytes": len(bomb),
        "bomb_decoded_bytes": bomb_decoded,
        "sequential_statuses": dict(seq),
        "concurrent_statuses": dict(par),
        "all_413": seq == {"413": 20} and par == {"413": 20},
        "rss_before_kib": rss_before,
        "hwm_before_kib": hwm_before,
        "rss_after_kib": rss_after,
        "hwm_after_kib": hwm_after,
        "peak_rise_kib": rise_kib,
        "rise_under_16mib": rise_kib < 16 * KIB,
        "honest_compressed_bytes": len(honest),
        "honest_decoded_bytes": honest_decoded,
        "honest_status": honest_status,
        "warmup_status": warm,
        "rejected": rejected,
    }
    lines = [
        "## Figure 3 (bomb): decode-guard memory",
        "",
        "1 worker, route `[route.limits] decode_guard = true` (defaults: decode_ratio = 10, decode_max = 8 MiB), "
        f"fast origin. Bomb: {len(bomb)} bytes of gzip ({len(bomb) / KIB:.1f} KiB) that inflate to "
        f"{bomb_decoded} bytes ({bomb_decoded / MIB:.1f} MiB), ratio {bomb_decoded / len(bomb):.0f}x. "
        "Sent 20 times one after another (new connection each), then 20 times over 8 concurrent connections. "
        "RSS from /proc/PID/status after one warm-up GET.",
        "",
        table(
            ["measure", "value"],
            [
                ["statuses, sequential", counts_text(seq)],
                ["statuses, 8 concurrent", counts_text(par)],
                ["every bomb got 413", yes_no(res["all_413"])],
                ["VmRSS before", f"{rss_before} KiB"],
                ["VmRSS after", f"{rss_after} KiB"],
                ["VmHWM before / after", f"{hwm_before} / {hwm_after} KiB"],
                ["peak rise (VmHWM after - VmRSS before)", f"{rise_kib} KiB ({rise_kib / KIB:.2f} MiB)"],
                ["peak rise under 16 MiB", yes_no(res["rise_under_16mib"])],
                [f"honest gzip body ({len(honest)} -> {honest_decoded} bytes, "
                 f"{honest_decoded / len(honest):.1f}x)", f"status {honest_status}"],
            ],
        ),
        "",
        f"- coregate refusals: {counts_text(rejected['total'])}",
    ]
    return "bomb", res, lines


async def plain_get(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        line = await reader.readline()
        await reader.read()
        return line.split()[1].decode() if line else "closed"
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# Figure 4: loris


def figure_loris(bench):
    """Normal traffic's latency alone and beside 2,000 slow-loris connections."""
    duration = bench.seconds(20)
    # Opening the loris over one request_timeout spreads their deadlines,
    # so the proxy cuts a steady ~400/s rather than 2,000 at once.
    ramp = bench.seconds(5)
    n_loris, rate, conns = 2000, 500, 8
    origin, oport = bench.fast_origin()
    runs = []
    try:
        config = coregate_config(oport)
        for rnd in (1, 2):
            for phase in ("alone", "with loris"):
                cg = bench.coregate(config, 1)
                loris = None
                try:
                    if phase == "with loris":
                        loris, ready = start_loris(bench, cg.port, n_loris, ramp)
                    (res,) = bench.loads([load_spec(cg.port, rate, duration, conns)])
                    lstats = stop_loris(bench, loris, ready) if loris else None
                finally:
                    if loris:
                        bench.procs.stop(loris)
                    rejected = cg.stop()
                runs.append({"round": rnd, "phase": phase, "load": res, "loris": lstats, "rejected": rejected})
    finally:
        bench.procs.stop(origin)

    def med(phase, key):
        return median(r["load"][key] for r in runs if r["phase"] == phase)

    p99_alone, p99_with = med("alone", "p99_ms"), med("with loris", "p99_ms")
    ratio = p99_with / p99_alone if p99_alone else None
    summary = {
        "p50_alone_ms": med("alone", "p50_ms"),
        "p50_with_ms": med("with loris", "p50_ms"),
        "p99_alone_ms": p99_alone,
        "p99_with_ms": p99_with,
        "max_alone_ms": med("alone", "max_ms"),
        "max_with_ms": med("with loris", "max_ms"),
        "p99_ratio": ratio,
        "p99_within_2x": ratio is not None and ratio <= 2.0,
    }
    rows = []
    for r in runs:
        ld, ls, rj = r["load"], r["loris"], r["rejected"]["total"]
        rows.append([
            r["round"], r["phase"],
            f"{ls['avg_open']:.0f} / {ls['min_open']}" if ls else "-",
            f"{ls['cut']} ({ls['got_408']} with 408), after {fmt(ls['lifetime_s']['p50'])} s" if ls else "-",
            ld["sent"], f"{ld['success']:.4f}", ld["p50_ms"], ld["p99_ms"], ld["max_ms"],
            fmt(ld["lag_ms"]["p99"]),
            f"header_timeout={rj.get('header_timeout', 0)} request_timeout={rj.get('request_timeout', 0)}",
        ])
    lines = [
        "## Figure 4 (loris): slow-loris effect on normal traffic",
        "",
        f"1 worker, default timeouts (request_timeout 5 s, header_timeout 10 s), fast origin. Normal traffic: "
        f"open-loop {rate} req/s over {conns} keep-alive connections for {duration:g} s. Loris: {n_loris} connections "
        "from a separate process (CPU 0), each sends `GET / HTTP/1.1`, `Host: a`, then one `X-a: b` line about every "
        f"second, never ending the head, and reconnects as soon as the proxy cuts it; opened over {ramp:g} s and held "
        "for the whole load. Fresh coregate per phase; phases interleaved (alone, with, alone, with); medians of two "
        "rounds. Gen lag: how late the normal-traffic generator itself wrote requests (it shares CPU 0 with the "
        "loris process; included in latency).",
        "",
        table(["round", "phase", "loris open avg / min", "loris cut by proxy", "sent", "success", "p50 ms",
               "p99 ms", "max ms", "gen lag p99 ms", "proxy counters"], rows),
        "",
        table(
            ["normal traffic, median", "alone", "with loris", "with / alone"],
            [
                ["p50 ms", summary["p50_alone_ms"], summary["p50_with_ms"], None],
                ["p99 ms", p99_alone, p99_with, f"{ratio:.2f} (≤ 2x: {yes_no(summary['p99_within_2x'])})"],
                ["max ms", summary["max_alone_ms"], summary["max_with_ms"], None],
            ],
        ),
        "",
    ]
    for r in runs:
        lines.append(f"- coregate refusals, round {r['round']} {r['phase']}: {counts_text(r['rejected']['total'])}")
    return "loris", {"duration_s": duration, "n_loris": n_loris, "runs": runs, "summary": summary}, lines


def start_loris(bench, port, n, ramp):
    spec = {"port": port, "n": n, "ramp": ramp, "interval": 1.0}
    # stderr to a file: nobody reads it while the loris runs, and a full
    # pipe would stall it.
    errlog = open(Path(bench.workdir) / f"loris-{time.monotonic_ns()}.err", "w+")
    p = bench.procs.start(
        [sys.executable, SELF, "--loris", json.dumps(spec)],
        CLIENT_CPU,
        stdout=subprocess.PIPE,
        stderr=errlog,
        text=True,
    )
    p.errlog = errlog
    line = p.stdout.readline()  # {"ready": open_count} once the ramp is done
    if not line:
        errlog.seek(0)
        raise RuntimeError("loris generator died: " + errlog.read()[-2000:])
    return p, json.loads(line)["ready"]


def stop_loris(bench, p, ready):
    """SIGTERM the loris; it prints its counts and exits."""
    bench.procs.signal(p, signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    bench.procs.forget(p)
    p.errlog.seek(0)
    err = p.errlog.read()
    p.errlog.close()
    if not out.strip():
        raise RuntimeError("loris generator gave no result: " + err[-2000:])
    stats = json.loads(out.strip().splitlines()[-1])
    stats["ready"] = ready
    return stats


# ---------------------------------------------------------------------------
# Internal mode: the open-loop load generator (one process per load)


async def read_response(reader):
    """One response: (status, wants close). Content-Length bodies only."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, close, chunked = head_framing(head)
    if chunked:
        raise ValueError("chunked response")  # never sent by these origins
    if length:
        await reader.readexactly(length)
    return status, close


async def generate(spec):
    loop = asyncio.get_running_loop()
    port, rate, duration, cap = spec["port"], spec["rate"], spec["duration"], spec["cap"]
    request = ("GET / HTTP/1.1\r\nHost: bench\r\n" + "".join(h + "\r\n" for h in spec["headers"]) + "\r\n").encode()
    statuses, errors = collections.Counter(), collections.Counter()
    lat, lag = [], []
    idle, pending, tasks = collections.deque(), collections.deque(), set()
    state = {"open": 0, "opened": 0, "sent": 0}

    async def connect():
        conn = await asyncio.open_connection("127.0.0.1", port)
        state["opened"] += 1
        return conn

    for _ in range(spec["conns"]):
        idle.append(await connect())
    state["open"] = len(idle)
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    t0 = loop.time()
    end = t0 + duration

    async def worker(conn, due):
        # Serve `due`, then any request that queued for a connection meanwhile.
        while True:
            try:
                if conn is None:
                    conn = await connect()
                conn[1].write(request)
                state["sent"] += 1
                lag.append(loop.time() - due)
                status, close = await read_response(conn[0])
                statuses[status] += 1
                if status == 200:
                    lat.append(loop.time() - due)
                if close:
                    conn[1].close()
                    conn = None
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                errors[type(e).__name__] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
            if not pending or loop.time() >= end:
                break
            due = pending.popleft()
        if conn is not None:
            idle.append(conn)
        else:
            state["open"] -= 1

    def launch(conn, due):
        t = loop.create_task(worker(conn, due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    total = int(rate * duration)
    i = 0
    while i < total:
        due = t0 + i / rate
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        i += 1
        if idle:
            launch(idle.popleft(), due)  # FIFO: spreads requests over all connections
        elif state["open"] < cap:
            state["open"] += 1
            launch(None, due)
        else:
            pending.append(due)
    # Requests still in flight get `grace`; what is left then is cut off.
    wait_until = max(end, loop.time()) + spec["grace"]
    while tasks and loop.time() < wait_until:
        await asyncio.wait(set(tasks), timeout=wait_until - loop.time())
    cut_off = len(tasks)
    for t in list(tasks):
        t.cancel()
    lag.sort()
    return {
        "rate": rate,
        "duration": duration,
        "sent": state["sent"],
        "unsent": total - state["sent"],
        "cut_off": cut_off,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": dict(errors),
        "connections_opened": state["opened"],
        "lat_ms": [round(x * 1000, 3) for x in lat],
        "lag_ms": {"p50": ms(pct(lag, 50)), "p99": ms(pct(lag, 99)), "max": ms(lag[-1] if lag else None)},
    }


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


# ---------------------------------------------------------------------------
# Internal mode: the slow origin (fixed latency)
#
# Why two: behind an inflight cap that is always full (figure fair), every
# response frees a slot that is refilled at once, so two slots whose
# responses leave the origin together stay together from then on: over
# seconds the 16 slots bunch into a few groups, like buses on one line, and
# a request waiting for a slot waits for the next group rather than for the
# next slot. How strongly an origin merges responses therefore shows in
# the figure. asyncio's timers wake at epoll's 1 ms granularity and fire
# everything due by then together, so the asyncio origin merges responses
# up to 1 ms apart; a thread per connection ends its sleep within tens of
# microseconds and merges far less. The thread origin is the default; the
# asyncio one stays to show the difference (`--slow-origin asyncio`).


def head_framing(head):
    """(Content-Length, wants close, has Transfer-Encoding) of a head."""
    length, close, chunked = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            close = True
        elif name == b"transfer-encoding":
            chunked = True
    return length, close, chunked


def parse_request_head(head):
    """(Content-Length, wants close) of a request head."""
    length, close, chunked = head_framing(head)
    # Not expected here; do not guess at framing: close after it.
    return length, close or chunked


SLOW_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


async def serve_slow_asyncio(port, delay_ms):
    async def handle(reader, writer):
        try:
            while True:
                length, close = parse_request_head(await reader.readuntil(b"\r\n\r\n"))
                if length:
                    await reader.readexactly(length)  # read and discard the body
                await asyncio.sleep(delay_ms / 1000)
                writer.write(SLOW_RESPONSE)
                await writer.drain()
                if close:
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def serve_slow_threads(port, delay_ms):
    """One thread per connection; coregate keeps a few dozen upstream
    connections at most here, so threads are cheap enough."""

    class Handler(socketserver.StreamRequestHandler):
        disable_nagle_algorithm = True

        def handle(self):
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline(65536)
                    if not line:
                        return
                    head += line
                length, close = parse_request_head(head)
                if length:
                    self.rfile.read(length)  # read and discard the body
                time.sleep(delay_ms / 1000)
                self.wfile.write(SLOW_RESPONSE)
                if close:
                    return

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 4096

    with Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()  # until SIGTERM ends the process


# ---------------------------------------------------------------------------
# Internal mode: the slow-loris generator


class LorisConn(asyncio.Protocol):
    """One loris: starts a head, adds a header line every `interval`, never
    ends it. When the proxy closes it, a replacement opens at once."""

    def __init__(self, herd):
        self.herd = herd
        self.transport = None
        self.timer = None
        self.answered_408 = False
        self.opened = herd.loop.time()

    def connection_made(self, transport):
        self.transport = transport
        self.opened = self.herd.loop.time()
        self.herd.live.add(self)
        transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
        self.schedule()

    def schedule(self):
        # Jitter keeps 2,000 timers from firing in lockstep.
        jitter = random.uniform(0.8, 1.2)
        self.timer = self.herd.loop.call_later(self.herd.interval * jitter, self.tick)

    def tick(self):
        if not self.transport.is_closing():
            self.transport.write(b"X-a: b\r\n")
            self.schedule()

    def data_received(self, data):
        if data.startswith(b"HTTP/1.1 408"):
            self.answered_408 = True

    def connection_lost(self, exc):
        self.herd.live.discard(self)
        if self.timer:
            self.timer.cancel()
        if not self.herd.stopping:
            self.herd.cut += 1
            self.herd.got_408 += self.answered_408
            self.herd.lifetimes.append(self.herd.loop.time() - self.opened)
            self.herd.loop.create_task(self.herd.open_one())


class Herd:
    def __init__(self, spec):
        self.loop = asyncio.get_running_loop()
        self.port = spec["port"]
        self.interval = spec["interval"]
        self.live = set()
        self.stopping = False
        self.cut = self.got_408 = self.connect_errors = 0
        self.lifetimes = []  # seconds from connect to the proxy's cut

    async def open_one(self):
        while not self.stopping:
            try:
                await self.loop.create_connection(lambda: LorisConn(self), "127.0.0.1", self.port)
                return
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(0.05)


async def run_loris(spec):
    herd = Herd(spec)
    stop = asyncio.Event()
    herd.loop.add_signal_handler(signal.SIGTERM, stop.set)
    n, ramp = spec["n"], spec["ramp"]
    t0 = herd.loop.time()
    for i in range(n):
        due = t0 + ramp * i / n
        if due > herd.loop.time():
            await asyncio.sleep(due - herd.loop.time())
        herd.loop.create_task(herd.open_one())
    # Ready when nearly all are open (some are being cut and replaced).
    deadline = herd.loop.time() + 10
    while len(herd.live) < 0.97 * n and herd.loop.time() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": len(herd.live)}), flush=True)
    samples, cut_at_ready, got_408_at_ready = [], herd.cut, herd.got_408
    while not stop.is_set():
        samples.append(len(herd.live))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass
    herd.stopping = True
    for conn in list(herd.live):
        conn.transport.abort()
    print(json.dumps({
        "avg_open": sum(samples) / len(samples) if samples else 0,
        "min_open": min(samples) if samples else 0,
        # Counted while normal traffic ran (from ready to stop) ...
        "cut": herd.cut - cut_at_ready,
        "got_408": herd.got_408 - got_408_at_ready,
        # ... and over the loris process's whole life.
        "cut_total": herd.cut,
        "got_408_total": herd.got_408,
        "connect_errors": herd.connect_errors,
        "lifetime_s": {"p50": median(herd.lifetimes), "max": max(herd.lifetimes, default=None)},
    }), flush=True)


# ---------------------------------------------------------------------------
# Entry


FIGURES = {"rate": figure_rate, "fair": figure_fair, "bomb": figure_bomb, "loris": figure_loris}


def machine_facts(nproc, binary):
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        version = "?"
    return {
        "nproc": nproc,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "coregate": version,
        "binary_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(binary))),
    }


def internal_mode(argv):
    """The script's own helper processes; None when argv is not one."""
    if len(argv) >= 4 and argv[0] == "--serve-slow":
        port, delay_ms, kind = int(argv[1]), float(argv[2]), argv[3]
        if kind == "asyncio":
            asyncio.run(serve_slow_asyncio(port, delay_ms))
        else:
            serve_slow_threads(port, delay_ms)
        return 0
    if len(argv) >= 2 and argv[0] == "--loadgen":
        print(json.dumps(asyncio.run(generate(json.loads(argv[1])))))
        return 0
    if len(argv) >= 2 and argv[0] == "--loris":
        asyncio.run(run_loris(json.loads(argv[1])))
        return 0
    return None


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2].split("\n\nHow it measures")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("figure", choices=[*FIGURES, "all"], help="which figure to produce (all: the four in turn)")
    ap.add_argument("--quick", action="store_true", help="about 4x shorter runs, for smoke tests")
    ap.add_argument("--json", metavar="FILE", help="also write every number as JSON to FILE")
    ap.add_argument("--slow-origin", choices=["threads", "asyncio"], default="threads",
                    help="how the 20 ms origin of figure fair times its delay (default: %(default)s; "
                         "the comment on the slow origin in this script says why it matters)")
    ap.add_argument("--quiet-reserve", type=int, metavar="N",
                    help="figure fair: set `quiet_reserve` (default: coregate's own, 1 slot of 16)")
    ap.add_argument("--binary", default=str(REPO / "target/release/coregate"), help="coregate binary (default: %(default)s)")
    return ap.parse_args()


def main():
    code = internal_mode(sys.argv[1:])
    if code is not None:
        return code
    args = parse_args()
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"no coregate binary at {args.binary}; build it first (cargo build --release)")
    nproc = len(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this process and its children: CPU 0
    nofile = raise_nofile(WANT_NOFILE)
    # SIGTERM should run the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    facts = machine_facts(nproc, args.binary)
    facts["nofile"] = nofile
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    report = {"machine": facts, "quick": args.quick, "figures": {}}
    procs = Procs()
    workdir = tempfile.TemporaryDirectory(prefix="admission-figures.")
    bench = Bench(args, procs, workdir.name)
    try:
        for name in names:
            started = time.monotonic()
            key, result, lines = FIGURES[name](bench)
            result["wall_s"] = round(time.monotonic() - started, 1)
            result["command"] = bench.command(name)
            report["figures"][key] = result
            lines += [
                "",
                f"Command: `{bench.command(name)}`  ",
                f"Machine: nproc {facts['nproc']}, kernel {facts['kernel']}, Python {facts['python']}, "
                f"{facts['coregate']} (binary built {facts['binary_mtime']}); coregate pinned to CPU {PROXY_CPU}, "
                f"origin and load generators to CPU {CLIENT_CPU}; run took {result['wall_s']:g} s.",
                "",
            ]
            print("\n".join(lines), flush=True)
    finally:
        procs.stop_all()
        workdir.cleanup()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
