"""Figures for admission control: rate limit, fair queuing, decode guard, slow loris.

    scripts/bench admission [rate|fair|bomb|loris|all] [--quick] [--json FILE]

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

How it measures: open-loop loads (openloop.py), one generator process
each; coregate alone on CPU 1, everything else on CPU 0 (figures.py); the
20 ms origin of figure fair sleeps in a thread per connection rather than
on asyncio timers (origins.py says why; `--slow-origin asyncio` shows the
difference). Phases that are compared (fair, loris) run interleaved twice
(A, B, A, B) and the medians are quoted, so a drift of the machine over
time hits both sides.
"""
import asyncio
import collections
import gzip
import random
import time

from . import figures
from .figures import coregate_config, counts_text, table, yes_no
from .loris import start_loris, stop_loris
from .openloop import load_spec
from .proctree import status_kib
from .summary import fmt, median, ratio

KIB, MIB = 1024, 1024 * 1024
RATE = 200  # figure rate: the configured rate, req/s
RATE_LIMITS = {"rate": f"{RATE}/s", "burst": 20, "principal": "header:X-Api-Key"}
BOMB_LIMITS = {"decode_guard": True}


def fair_limits(quiet_reserve):
    """Figure fair's limits; QUIET_RESERVE None keeps coregate's default."""
    limits = {"max_inflight": 16, "queue_depth": 16, "queue_timeout": "500ms", "tenant": "header:X-Tenant"}
    if quiet_reserve is not None:
        limits["quiet_reserve"] = quiet_reserve
    return limits


# ---------------------------------------------------------------------------
# Figure 1: rate


def figure_rate(bench):
    """Admitted rate of one API key over 32 connections and over one."""
    duration = bench.seconds(20)
    configured, offered = RATE, 3 * RATE
    origin, oport = bench.fast_origin()
    cases = []
    try:
        config = coregate_config(oport, RATE_LIMITS)
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
    # Default: one of the 16 slots is kept for tenants without a backlog.
    reserve = "1 (the default)" if bench.quiet_reserve is None else str(bench.quiet_reserve)
    origin, oport = bench.slow_origin(latency_ms)
    runs = []
    try:
        config = coregate_config(oport, fair_limits(bench.quiet_reserve))
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
    succ_ratio = ratio(beside_s, alone_s)
    p99_ratio = ratio(beside_p99, alone_p99)
    summary = {
        "B_success_alone": alone_s,
        "B_success_beside": beside_s,
        "success_ratio": succ_ratio,
        "success_within_20pct": abs(succ_ratio - 1) <= 0.20,
        "B_p99_alone_ms": alone_p99,
        "B_p99_beside_ms": beside_p99,
        "p99_ratio": p99_ratio,
        "p99_within_20pct": abs(p99_ratio - 1) <= 0.20,
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
        cg = bench.coregate(coregate_config(oport, BOMB_LIMITS), 1)
        try:
            # Warm up with one plain request, so first-request allocations
            # (buffer pools, the upstream connection) do not count as the
            # bomb's.
            warm = asyncio.run(plain_get(cg.port))
            time.sleep(0.3)
            rss_before = status_kib(cg.pid, "VmRSS")
            hwm_before = status_kib(cg.pid, "VmHWM")
            seq, par = asyncio.run(send_bombs(cg.port, bomb, 20, 20, 8))
            time.sleep(0.3)
            rss_after = status_kib(cg.pid, "VmRSS")
            hwm_after = status_kib(cg.pid, "VmHWM")
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
    p99_ratio = ratio(p99_with, p99_alone)
    summary = {
        "p50_alone_ms": med("alone", "p50_ms"),
        "p50_with_ms": med("with loris", "p50_ms"),
        "p99_alone_ms": p99_alone,
        "p99_with_ms": p99_with,
        "max_alone_ms": med("alone", "max_ms"),
        "max_with_ms": med("with loris", "max_ms"),
        "p99_ratio": p99_ratio,
        "p99_within_2x": p99_ratio <= 2.0,
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
                ["p99 ms", p99_alone, p99_with, f"{p99_ratio:.2f} (≤ 2x: {yes_no(summary['p99_within_2x'])})"],
                ["max ms", summary["max_alone_ms"], summary["max_with_ms"], None],
            ],
        ),
        "",
    ]
    for r in runs:
        lines.append(f"- coregate refusals, round {r['round']} {r['phase']}: {counts_text(r['rejected']['total'])}")
    return "loris", {"duration_s": duration, "n_loris": n_loris, "runs": runs, "summary": summary}, lines


FIGURES = {"rate": figure_rate, "fair": figure_fair, "bomb": figure_bomb, "loris": figure_loris}
CONFIGS = {
    "rate": lambda args: [coregate_config("ORIGIN", RATE_LIMITS)],
    "fair": lambda args: [coregate_config("ORIGIN", fair_limits(args.quiet_reserve))],
    "bomb": lambda args: [coregate_config("ORIGIN", BOMB_LIMITS)],
    "loris": lambda args: [coregate_config("ORIGIN")],
}


def add_arguments(ap):
    figures.add_arguments(ap, FIGURES)
    ap.add_argument("--quiet-reserve", type=int, metavar="N",
                    help="figure fair: set `quiet_reserve` (default: coregate's own, 1 slot of 16)")


def main(args):
    return figures.run(args, "admission", FIGURES, CONFIGS)
