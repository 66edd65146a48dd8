#!/usr/bin/env python3
"""Figures for backend selection: a slow backend, and a backend killed under load.

    python3 scripts/balance-figures.py {slow,kill,all} [--quick] [--json FILE]

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
scripts/admission-figures.py, whose code this script uses (coregate on CPU
1; origins and the open-loop load generator on CPU 0).
"""
import argparse
import importlib.util
import json
import os
import signal
import statistics
import threading
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("admission_figures", HERE / "admission-figures.py")
af = importlib.util.module_from_spec(spec)
spec.loader.exec_module(af)


def config(ports, balance, socket):
    backends = ", ".join(f'"tcp://127.0.0.1:{p}"' for p in ports)
    return (
        f'[server]\ndrain_timeout = "5s"\nadmin_socket = "{socket}"\n\n'
        '[[listener]]\nlisten = "127.0.0.1:0"\n\n'
        f'[upstream.app]\nbackends = [{backends}]\nbalance = "{balance}"\n\n'
        '[[route]]\nupstream = "app"\n'
    )


def backend_counts(bench, socket):
    """Requests each backend got, from `coregate stats --json`."""
    out = subprocess.run(
        [bench.binary, "stats", "--json", "--socket", socket],
        capture_output=True, text=True, timeout=10, check=True,
    )
    ups = json.loads(out.stdout)["total"]["upstreams"]
    return {k.split("127.0.0.1:")[-1]: v["connects"] + v["reuses"] for k, v in ups.items()}


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
                    [load] = bench.loads([af.load_spec(cg.port, 200, duration, 32)])
                    counts = backend_counts(bench, str(socket))
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
        return statistics.median(vals)

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
        af.table(["round", "balance", "sent", "success", "slow backend's share", "p50 ms", "p99 ms"], rows),
        "",
        af.table(["median", "slow backend's share", "p50 ms", "p99 ms"],
                 [[b, f"{100 * s['slow_share']:.1f}%", s["p50_ms"], s["p99_ms"]] for b, s in summary.items()]),
        "",
        f"Command: `python3 scripts/balance-figures.py slow{' --quick' if bench.quick else ''}`",
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
        [load] = bench.loads([af.load_spec(cg.port, 1000, duration, 32)])
        t.join()
        counts = backend_counts(bench, str(socket))
        stats = json.loads(subprocess.run(
            [bench.binary, "stats", "--json", "--socket", str(socket)],
            capture_output=True, text=True, timeout=10, check=True).stdout)["total"]
    finally:
        cg.stop()
        for p, _ in origins:
            bench.procs.stop(p)
    failed = load["sent"] - load["ok"]
    failures = {k.split("127.0.0.1:")[-1]: v["failures"] for k, v in stats["upstreams"].items()}
    lines = [
        "## Figure 2 (kill): a backend killed under load",
        "",
        f"1 worker, p2c, 3 coregate origins; open-loop 1,000 req/s for {duration:g} s over up to 32 connections; "
        f"backend :{ports[0]} killed with SIGKILL {kill_after:g} s in.",
        "",
        af.table(["sent", "200", "failed (client saw)", "statuses", "client errors"],
                 [[load["sent"], load["ok"], failed, af.counts_text(load["statuses"]), af.counts_text(load["errors"])]]),
        "",
        af.table(["backend", "requests", "failures counted by coregate"],
                 [[f":{p}" + (" (killed)" if p == ports[0] else ""), counts.get(str(p), 0), failures.get(str(p), 0)]
                  for p in ports]),
        "",
        "Failures counted by coregate are exchanges that failed (then retried elsewhere when replayable); "
        "the client's count is what was not retried.",
        "",
        f"Command: `python3 scripts/balance-figures.py kill{' --quick' if bench.quick else ''}`",
    ]
    return "kill", {"load": load, "counts": counts, "failures": failures}, lines


FIGURES = {"slow": figure_slow, "kill": figure_kill}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("figure", choices=[*FIGURES, "all"])
    ap.add_argument("--quick", action="store_true", help="about 4x shorter runs, for smoke tests")
    ap.add_argument("--json", metavar="FILE", help="also write every number as JSON to FILE")
    ap.add_argument("--binary", default=str(af.REPO / "target/release/coregate"))
    args = ap.parse_args()
    if not Path(args.binary).is_file():
        raise SystemExit(f"no coregate binary at {args.binary}; build it first (cargo build --release)")
    os.sched_setaffinity(0, {int(af.CLIENT_CPU)})  # this process and its children: CPU 0
    af.raise_nofile(af.WANT_NOFILE)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    procs = af.Procs()
    report = {}
    opts = types.SimpleNamespace(binary=args.binary, quick=args.quick, slow_origin="threads", quiet_reserve=None)
    with tempfile.TemporaryDirectory(prefix="balance-figures.") as work:
        bench = af.Bench(opts, procs, work)
        try:
            for name in names:
                key, data, lines = FIGURES[name](bench)
                report[key] = data
                print("\n".join(lines) + "\n", flush=True)
        finally:
            procs.stop_all()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
