"""Figures for backend selection: a slow backend, and a backend killed under load.

    scripts/bench balance [slow|kill|all] [--quick] [--json FILE]

slow   Three backends answer in 5, 5 and 50 ms (the third is 10x slower).
       One worker, 200 req/s open-loop for 15 s, once with `balance = "p2c"`
       (power of two choices on inflight x EWMA latency) and once with
       `round_robin`, interleaved twice. Reports the slow backend's share
       of requests (from coregate's own per-backend counters) and the
       client's p50/p99. Target: p2c sends the slow one under 10% and keeps
       p99 near the fast backends'.
kill   Three backends (coregate's origin), one worker, p2c, 1,000 req/s
       for 8 s; the first backend is killed (SIGKILL) 3 s in. Reports every
       failed request. Target: no more failures than requests in flight to
       it at that moment, and none after it is ejected. Connection-refused
       requests never reached it and are retried elsewhere; broken
       idempotent GETs are retried too, within the retry budget.

Process layout, load generator, origins and pinning are those of
`admission` (figures.py: coregate on CPU 1; origins and the open-loop load
generator on CPU 0).
"""
import json
import subprocess
import threading
import time
from pathlib import Path

from . import figures
from .figures import counts_text, table
from .openloop import load_spec
from .summary import median


def config(ports, balance, socket):
    backends = ", ".join(f'"tcp://127.0.0.1:{p}"' for p in ports)
    return (
        f'[server]\ndrain_timeout = "5s"\nadmin_socket = "{socket}"\n\n'
        '[[listener]]\nlisten = "127.0.0.1:0"\n\n'
        f'[upstream.app]\nbackends = [{backends}]\nbalance = "{balance}"\n\n'
        '[[route]]\nupstream = "app"\n'
    )


def upstream_stats(bench, socket):
    """Each backend's counters from `coregate stats --json`, by port (a string)."""
    out = subprocess.run(
        [bench.binary, "stats", "--json", "--socket", socket],
        capture_output=True, text=True, timeout=10, check=True,
    )
    ups = json.loads(out.stdout)["total"]["upstreams"]
    return {k.split("127.0.0.1:")[-1]: v for k, v in ups.items()}


def requests_by_backend(ups):
    """Requests each backend got (a new connection's or a reused one's)."""
    return {port: v["connects"] + v["reuses"] for port, v in ups.items()}


def figure_slow(bench):
    duration = bench.seconds(15)
    latencies = [5, 5, 50]
    origins = [bench.slow_origin(ms) for ms in latencies]
    ports = [port for _, port in origins]
    runs = []
    try:
        for rnd in (1, 2):
            for balance in ("p2c", "round_robin"):
                socket = Path(bench.workdir) / f"admin-{balance}-{rnd}.sock"
                cg = bench.coregate(config(ports, balance, socket), 1)
                try:
                    [load] = bench.loads([load_spec(cg.port, 200, duration, 32)])
                    counts = requests_by_backend(upstream_stats(bench, str(socket)))
                finally:
                    cg.stop()
                total = sum(counts.values())
                slow = counts.get(str(ports[2]), 0)
                runs.append({"round": rnd, "balance": balance, "load": load, "counts": counts,
                             "slow_share": slow / total if total else None})
    finally:
        for p, _ in origins:
            bench.procs.stop(p)

    def med(balance, key):
        vals = [r["slow_share"] if key == "share" else r["load"][key] for r in runs if r["balance"] == balance]
        return median(vals)

    rows = [[r["round"], r["balance"], r["load"]["sent"], f"{r['load']['success']:.4f}",
             f"{100 * r['slow_share']:.1f}%", r["load"]["p50_ms"], r["load"]["p99_ms"]] for r in runs]
    summary = {b: {"slow_share": med(b, "share"), "p50_ms": med(b, "p50_ms"), "p99_ms": med(b, "p99_ms")}
               for b in ("p2c", "round_robin")}
    lines = [
        "## Figure 1 (slow): one backend 10x slower",
        "",
        f"1 worker; backends answer in {latencies[0]}, {latencies[1]} and {latencies[2]} ms "
        f"(threaded origins on CPU 0); open-loop 200 req/s for {duration:g} s; rounds interleaved.",
        "",
        table(["round", "balance", "sent", "success", "slow backend's share", "p50 ms", "p99 ms"], rows),
        "",
        table(["median", "slow backend's share", "p50 ms", "p99 ms"],
                 [[b, f"{100 * s['slow_share']:.1f}%", s["p50_ms"], s["p99_ms"]] for b, s in summary.items()]),
    ]
    return "slow", {"runs": runs, "summary": summary}, lines


def figure_kill(bench):
    duration = bench.seconds(8)
    kill_after = duration * 3 / 8
    origins = [bench.fast_origin() for _ in range(3)]
    ports = [port for _, port in origins]
    socket = Path(bench.workdir) / "admin-kill.sock"
    cg = bench.coregate(config(ports, "p2c", socket), 1)
    try:
        victim = origins[0][0]
        killer_at = time.time() + 1.0 + kill_after  # loads start 1 s from now
        def kill():
            time.sleep(max(0.0, killer_at - time.time()))
            victim.kill()

        t = threading.Thread(target=kill)
        t.start()
        [load] = bench.loads([load_spec(cg.port, 1000, duration, 32)])
        t.join()
        ups = upstream_stats(bench, str(socket))
    finally:
        cg.stop()
        for p, _ in origins:
            bench.procs.stop(p)
    failed = load["sent"] - load["ok"]
    counts = requests_by_backend(ups)
    failures = {port: v["failures"] for port, v in ups.items()}
    lines = [
        "## Figure 2 (kill): a backend killed under load",
        "",
        f"1 worker, p2c, 3 coregate origins; open-loop 1,000 req/s for {duration:g} s over up to 32 connections; "
        f"backend :{ports[0]} killed with SIGKILL {kill_after:g} s in.",
        "",
        table(["sent", "200", "failed (client saw)", "statuses", "client errors"],
                 [[load["sent"], load["ok"], failed, counts_text(load["statuses"]), counts_text(load["errors"])]]),
        "",
        table(["backend", "requests", "failures counted by coregate"],
                 [[f":{p}" + (" (killed)" if p == ports[0] else ""), counts.get(str(p), 0), failures.get(str(p), 0)]
                  for p in ports]),
        "",
        "Failures counted by coregate are exchanges that failed (then retried elsewhere when replayable); "
        "the client's count is what was not retried.",
    ]
    return "kill", {"load": load, "counts": counts, "failures": failures}, lines


FIGURES = {"slow": figure_slow, "kill": figure_kill}
PORTS = ["ORIGIN1", "ORIGIN2", "ORIGIN3"]
CONFIGS = {
    "slow": lambda args: [config(PORTS, b, "ADMIN.sock") for b in ("p2c", "round_robin")],
    "kill": lambda args: [config(PORTS, "p2c", "ADMIN.sock")],
}


def add_arguments(ap):
    figures.add_arguments(ap, FIGURES)


def main(args):
    return figures.run(args, "balance", FIGURES, CONFIGS)
