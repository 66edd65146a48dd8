"""WebSocket tunnels through coregate and nginx, side by side on one machine.

    scripts/bench ws [--proxies nginx,coregate] [--rounds 5] [--duration 5]
                     [--conns 50] [--size 1024] [--tunnels 10000]
                     [--proxy-cpus 1] [--load-cpus 0] [--out docs/bench] [--dry-run]

Both proxies run one worker pinned to the same CPU (--proxy-cpus), in front
of the same WebSocket echo server (scripts/ws-load, on tungstenite); the
server and the load share the other CPUs (--load-cpus). nginx is set up as
its documentation says for WebSocket: `proxy_http_version 1.1` and the
Upgrade and Connection lines, with its idle timeouts raised to coregate's
(an hour).

  * Messages: in each round every proxy in turn (the order rotates) carries
    --conns tunnels, each echoing a --size-byte binary message and waiting
    for it to come back, for --duration seconds. Messages per second, and
    the proxy's CPU time per message (utime+stime of its process tree,
    /proc), and the user-space part of it (utime).
  * Memory: each proxy in turn holds --tunnels idle open tunnels (capped
    by the open-files limit: a proxy needs two descriptors per tunnel);
    resident memory per tunnel is the RSS growth over the count.

Figures are medians over rounds; ratios to nginx are medians of the
per-round ratios. Written to OUT/ws-bench-DATE.md and .json.
"""
import datetime
import json
import os
import subprocess
import tempfile

from . import build, sides
from .idle import rss_growth
from .proctree import measure, us_per
from .procs import Procs, idle_count, log, raise_nofile, wait_port
from .run import rotated
from .summary import fmt, fmt_x, ratio
from .tools import ensure_tools, find_tool

KEYS = ["rate", "cpu_us_per_msg", "user_us_per_msg", "p99_us"]


def add_arguments(ap):
    sides.add_arguments(ap, base_port=19200)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tunnels", type=int, default=10000)


def echo_round(args, ws_load, port):
    out = subprocess.run(
        ["taskset", "-c", args.load_cpus, ws_load, "echo", "--url", f"ws://127.0.0.1:{port}/",
         "--conns", str(args.conns), "--size", str(args.size), "--duration", str(args.duration)],
        capture_output=True, text=True, timeout=args.duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"ws-load echo through :{port} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def tunnel_holder(procs, args, ws_load, port):
    """hold(n) for rss_growth: N idle open tunnels held by `ws-load hold`."""
    def hold(n):
        holder = procs.start([ws_load, "hold", "--url", f"ws://127.0.0.1:{port}/", "--conns", str(n)],
                             args.load_cpus, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = holder.stdout.readline().decode().strip()
        if line != f"held {n}":
            raise RuntimeError(f"ws-load hold: {line!r}")

        def release():
            holder.stdin.write(b"\n")
            holder.stdin.flush()
            holder.wait(timeout=60)
            procs.forget(holder)
        return release
    return hold


def markdown(args, summary, idle, n, command):
    """The report: a row per proxy, its ratios to nginx beside each figure."""
    lines = [
        f"# WebSocket tunnels: coregate and nginx, {datetime.date.today()}",
        "",
        f"{args.conns} tunnels echoing {args.size}-byte binary messages (closed loop) for "
        f"{args.duration} s per round, {args.rounds} rounds, order rotating; one worker per proxy "
        f"pinned to CPU {args.proxy_cpus}, the echo server and the load on CPU {args.load_cpus}. "
        f"Memory: {n} idle open tunnels through each proxy.",
        "",
        "| proxy | messages/s | vs nginx | CPU us/message | vs nginx | of it in user space | p99 | RSS per idle tunnel | vs nginx |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = idle.get("nginx", {}).get("bytes_per_conn")
    for name, s in summary.items():
        mem = idle[name]["bytes_per_conn"] if name in idle else None
        # Too few tunnels may not move nginx's RSS by a page at all.
        mem_x = fmt_x(ratio(mem, base)) or ("n/a" if mem is not None else "")
        lines.append(
            f"| {name} | {fmt(s['rate'], 0)} | {fmt_x(s['rate_x'])} | {fmt(s['cpu_us_per_msg'])} "
            f"| {fmt_x(s['cpu_us_per_msg_x'])} | {fmt(s['user_us_per_msg'])} | {fmt(s['p99_us'] / 1000)} ms "
            f"| {'' if mem is None else f'{mem:.0f} B'} | {mem_x} |")
    return "\n".join(lines + sides.footer(command))


def main(args):
    sides.check(args)
    raise_nofile(sides.NOFILE)
    n = idle_count(args.tunnels, "tunnels")
    if args.dry_run:
        for cmd in build.build_commands(args, ["coregate", "ws-load"]):
            print(f"build: {' '.join(cmd)}")
        print(f"plan: `ws-load serve` on CPU {args.load_cpus}, then {', '.join(args.proxies)} on CPU "
              f"{args.proxy_cpus}; {args.rounds} rounds of {args.duration} s with {args.conns} tunnels of "
              f"{args.size}-byte messages; then {n} idle tunnels each")
        tools = {"nginx": find_tool("nginx") or "nginx"}
        sides.print_plan(args, tools, build.paths(args), tempfile.mkdtemp(prefix="coregate-ws-dry."), n,
                         websocket=True)
        return 0
    tools = ensure_tools(["nginx", "taskset"])
    bins = build.ensure(args, ["coregate", "ws-load"])
    ws_load = bins["ws-load"]
    work = f"/tmp/ws-bench-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    procs = Procs()
    try:
        procs.start([ws_load, "serve", "--listen", f"127.0.0.1:{args.base_port}"], args.load_cpus,
                    log=f"{work}/ws-load-serve.log")
        wait_port(args.base_port)
        live = sides.start(args, tools, bins, procs, work, n, websocket=True)
        rounds = []
        for r in range(args.rounds):
            result = {}
            for name in rotated(args.proxies, r):
                p, port = live[name]
                got, ticks = measure(p.pid, lambda: echo_round(args, ws_load, port))
                got["cpu_us_per_msg"] = us_per(ticks.total, got["messages"])
                got["user_us_per_msg"] = us_per(ticks.user, got["messages"])
                result[name] = got
                log(f"round {r + 1} {name:15} {fmt(got['rate'], 0):>9} msg/s  {fmt(got['cpu_us_per_msg'])} us CPU/msg  "
                    f"p99 {fmt(got['p99_us'] / 1000)} ms")
            rounds.append(result)
        idle = {}
        for name in args.proxies if n else []:
            p, port = live[name]
            idle[name] = rss_growth(p.pid, tunnel_holder(procs, args, ws_load, port), n)
            log(f"idle {name:15} {idle[name]['rss_before_kib']} KiB -> {idle[name]['rss_after_kib']} KiB: "
                f"{idle[name]['bytes_per_conn']:.0f} B/tunnel")
    finally:
        procs.stop_all()
    summary = sides.summarize(rounds, KEYS, args.proxies)
    sides.write(args.out, "ws-bench", {"command": args.command, "tunnels": n, "rounds": rounds, "idle": idle,
                                       "summary": summary}, markdown(args, summary, idle, n, args.command))
    return 0
