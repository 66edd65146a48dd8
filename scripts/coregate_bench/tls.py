"""HTTPS through coregate and nginx (OpenSSL), side by side on one machine.

    scripts/bench tls [--proxies nginx,coregate] [--rounds 5] [--duration 5]
                      [--conns 50] [--rate 3000] [--idle-conns 10000]
                      [--proxy-cpus 1] [--load-cpus 0] [--out docs/bench] [--dry-run]

Both proxies run one worker pinned to the same CPU (--proxy-cpus) with the
same certificate (ECDSA P-256, made for the run with `openssl req`), TLS
1.3, in front of coregate's built-in origin (128-byte responses) on the
load CPUs (--load-cpus) with the load. In each round every proxy is
measured in turn (the order rotates):

  * keep-alive: wrk, --conns connections, at saturation: requests/s and
    the proxy's CPU per request (utime+stime of its process tree, /proc);
  * fixed rate: oha at --rate requests/s with --latency-correction: CPU
    per request and p99 where neither proxy is saturated;
  * full handshakes: wrk with `Connection: close` (a new connection and
    handshake per request): handshakes/s and CPU per handshake;
  * resumed handshakes: `openssl s_time -reuse` (TLS 1.2 session IDs;
    one client, so the rate is the client's): CPU per handshake.

Then each proxy alone holds --idle-conns idle keep-alive TLS connections
(capped by the open-files limit); RSS per connection is the growth over
the count. Medians over rounds; ratios to nginx are medians of per-round
ratios. Written to OUT/tls-bench-DATE.md and .json.
"""
import datetime
import os
import re
import subprocess
import tempfile

from . import build, sides
from .idle import http_holder, rss_growth
from .loads import Load, oha, wrk
from .origins import builtin_command
from .proctree import measure, us_per
from .procs import Procs, idle_count, log, raise_nofile, wait_port
from .run import rotated
from .summary import fmt, fmt_x, ratio
from .tools import ensure_tools, find_tool

KEYS = [("rps", "keep-alive requests/s"), ("cpu_ka", "CPU us/request, keep-alive, saturated"),
        ("cpu_rate", "CPU us/request at the fixed rate"), ("p99_ms", "p99 at the fixed rate, ms"),
        ("hs", "full handshakes/s"), ("cpu_hs", "CPU us/full handshake"),
        ("cpu_resumed", "CPU us/resumed handshake (TLS 1.2)")]


def add_arguments(ap):
    sides.add_arguments(ap, base_port=19500)
    ap.add_argument("--rate", type=int, default=3000)
    ap.add_argument("--idle-conns", type=int, default=10000)


def make_cert(work):
    cert, key = f"{work}/bench.pem", f"{work}/bench.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "3", "-subj", "/CN=bench.test",
                    "-addext", "subjectAltName=DNS:bench.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


def s_time(args, port):
    """Resumed TLS 1.2 handshakes `openssl s_time -reuse` made in --duration."""
    out = subprocess.run(
        ["taskset", "-c", args.load_cpus, "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse",
         "-tls1_2", "-time", str(args.duration)],
        capture_output=True, text=True, timeout=args.duration + 60).stdout
    m = re.findall(r"(\d+) connections in [\d.]+s", out)
    return int(m[-1]) if m else 0


def measure_round(args, tools, pid, port):
    def load(keepalive=True):
        return Load(f"https://127.0.0.1:{port}/", args.load_cpus, args.conns, args.duration, keepalive)

    got = {}
    (requests, _, _), ticks = measure(pid, lambda: wrk(tools["wrk"], load()))
    got["rps"], got["cpu_ka"] = requests / args.duration, us_per(ticks.total, requests)
    fixed, ticks = measure(pid, lambda: oha(tools["oha"], load(), rate=args.rate))
    got["cpu_rate"], got["p99_ms"] = us_per(ticks.total, fixed.ok), fixed.pct.get("p99")
    (handshakes, _, _), ticks = measure(pid, lambda: wrk(tools["wrk"], load(keepalive=False)))
    got["hs"], got["cpu_hs"] = handshakes / args.duration, us_per(ticks.total, handshakes)
    resumed, ticks = measure(pid, lambda: s_time(args, port))
    got["cpu_resumed"] = us_per(ticks.total, resumed)
    return got


def markdown(args, summary, idle, n, command):
    """The report: a row per figure, a column per proxy (its ratio to
    nginx in brackets), and the idle row when idle connections were held."""
    lines = [f"# HTTPS: coregate and nginx, {datetime.date.today()}", "",
             f"One worker per proxy pinned to CPU {args.proxy_cpus}; origin and load on CPU {args.load_cpus}; "
             f"ECDSA P-256, TLS 1.3 (resumption: TLS 1.2 session IDs); {args.rounds} rounds of {args.duration} s, "
             f"order rotating; fixed rate {args.rate} req/s; {args.conns} connections.", "",
             "| | " + " | ".join(args.proxies) + " |", "|---|" + "---|" * len(args.proxies)]
    for key, label in KEYS if args.rounds else []:
        cells = [fmt(summary[p][key]) + ("" if p == "nginx" or not fmt_x(summary[p][key + "_x"])
                                         else f" ({fmt_x(summary[p][key + '_x'])})")
                 for p in args.proxies]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if idle:
        cells = []
        for p in args.proxies:
            b = idle[p]["bytes_per_conn"]
            # Too few connections may not move nginx's RSS by a page at all.
            x = fmt_x(ratio(b, idle["nginx"]["bytes_per_conn"])) or "n/a"
            cells.append(f"{b:.0f} B" if p == "nginx" else f"{b:.0f} B ({x})")
        lines.append(f"| RSS per idle keep-alive TLS connection ({n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines + sides.footer(command))


def main(args):
    sides.check(args)
    raise_nofile(sides.NOFILE)
    n = idle_count(args.idle_conns, "idle TLS connections")
    if args.dry_run:
        print(f"plan: the origin on CPU {args.load_cpus}, {', '.join(args.proxies)} on CPU {args.proxy_cpus}; "
              f"{args.rounds} rounds of {args.duration} s; then {n} idle TLS connections each")
        tools = {t: find_tool(t) or t for t in ("nginx",)}
        sides.print_plan(args, tools, build.paths(args), tempfile.mkdtemp(prefix="coregate-tls-dry."), n,
                         tls=("CERT.pem", "KEY.pem"))
        return 0
    tools = ensure_tools(["wrk", "oha", "nginx", "openssl", "taskset"])
    bins = build.ensure(args, ["coregate"])
    work = f"/tmp/tls-bench-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    cert, key = make_cert(work)
    procs = Procs()
    try:
        procs.start(builtin_command(bins["coregate"], f"127.0.0.1:{args.base_port}"), args.load_cpus,
                    log=f"{work}/origin.log")
        wait_port(args.base_port)
        live = sides.start(args, tools, bins, procs, work, n, tls=(cert, key))
        rounds = []
        for r in range(args.rounds):
            result = {}
            for name in rotated(args.proxies, r):
                p, port = live[name]
                result[name] = measure_round(args, tools, p.pid, port)
                log(f"round {r + 1} {name:15} " + "  ".join(f"{k} {fmt(v)}" for k, v in result[name].items()))
            rounds.append(result)
        idle = {}
        for name in args.proxies if n else []:
            p, port = live[name]
            idle[name] = rss_growth(p.pid, http_holder("127.0.0.1", port, tls=True), n)
            log(f"idle {name:15} {idle[name]['rss_before_kib']} KiB -> {idle[name]['rss_after_kib']} KiB: "
                f"{idle[name]['bytes_per_conn']:.0f} B/connection")
    finally:
        procs.stop_all()
    summary = sides.summarize(rounds, [k for k, _ in KEYS], args.proxies)
    sides.write(args.out, "tls-bench", {"command": args.command, "idle_conns": n, "rounds": rounds, "idle": idle,
                                        "summary": summary}, markdown(args, summary, idle, n, args.command))
    return 0
