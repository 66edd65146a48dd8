"""coregate against nginx, HAProxy and Envoy, side by side on one machine.

    scripts/bench [run] [--proxies nginx,haproxy,envoy,coregate] [--workloads LIST]
                  [--rounds 3] [--duration 5] [--conns 50] [--workers 1]
                  [--proxy-cpus 1] [--load-cpus 0] [--rate N | --rate-fraction 0.5]
                  [--baseline nginx] [--netns] [--idle-conns 10000]
                  [--out docs/bench] [--install] [--dry-run]
    scripts/bench --compare BASELINE.json [--results RUN.json] [--cpu-threshold 0.10] [--p99-threshold 0.50]

Every proxy runs as a reverse proxy in front of the same origin (coregate's
built-in origin), with the same worker count, pinned to the same CPUs
(--proxy-cpus); the origin and the load generators share the other CPUs
(--load-cpus). For each workload, all proxies are started; then, in each
round, every proxy is measured in turn (the order rotates per round):

  * wrk, closed loop, --conns connections: maximum req/s, and the proxy's
    CPU time per request (utime+stime of the proxy's process tree, /proc);
  * oha at a fixed rate with --latency-correction (free of coordinated
    omission): latency percentiles, and the proxy's CPU time per request
    at that rate, where batching cannot hide an event loop's fixed costs.
    The rate is --rate requests/s, or else --rate-fraction of the slowest
    proxy's median maximum in that workload, so no proxy is saturated.

Results: medians over rounds, and ratios against --baseline (nginx) that
are medians of per-round ratios. Written to OUT/bench-DATE.md (table,
machine, method, command), OUT/bench-DATE.json (raw rounds) and
OUT/bench-DATE.svg (latency percentile curves).

Besides nginx, haproxy, envoy and coregate, --proxies takes the variants
of proxies.py: coregate-epoll (the epoll driver), coregate-log (an access
log line per request), coregate-nostats (statistics compiled out) and the
uring_spike prototype's spike-sm and spike-task. What statistics and the
access log cost: --proxies coregate-nostats,coregate,coregate-log
--baseline coregate-nostats. Regex routes: the workloads get-128-1regex and
get-128-1000regex (the request matches the last route).

--netns puts wrk and oha in their own network namespace joined to the host
by a veth pair, the way a load generator on another machine reaches the
proxy through a NIC rather than loopback.

--compare is the regression gate (gate.py): coregate's CPU per request and
p99 against a baseline, each as a ratio to nginx measured in the same run,
exit status 1 when either regresses past its threshold. Without --results
it first runs the benchmark with the baseline's workloads.

--install installs what is missing (apt-get, pip, cargo); without it a
missing tool stops the run with the command that installs it.
"""
import datetime
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

from . import ROOT, build, gate, report
from .configs import Site, request_path
from .idle import http_holder, rss_growth
from .loads import Load, oha, wrk
from .options import names
from .origins import builtin_command
from .proctree import TICKS_PER_S, measure, us_per
from .procs import Procs, idle_count, log, raise_nofile, wait_http
from .proxies import PROXIES, Proxy, binary, tool
from .summary import median, summarize_workload
from .tools import TOOLS, ensure_tools, find_tool, machine, missing_lines, versions


@dataclass(frozen=True)
class Workload:
    size: int  # response bytes
    post: int  # request body bytes (0: GET)
    keepalive: bool
    routes: int
    regex: bool
    description: str


WORKLOADS = {
    "get-128": Workload(128, 0, True, 1, False, "GET, 128 B response, keep-alive"),
    "get-16k": Workload(16384, 0, True, 1, False, "GET, 16 KiB response, keep-alive"),
    "get-256k": Workload(262144, 0, True, 1, False, "GET, 256 KiB response, keep-alive"),
    "post-64k": Workload(128, 65536, True, 1, False, "POST 64 KiB body, 128 B response, keep-alive"),
    "get-128-close": Workload(128, 0, False, 1, False, "GET, 128 B response, new connection per request"),
    "get-128-1000routes": Workload(128, 0, True, 1000, False,
                                   "GET, 128 B response, keep-alive, 1,000 prefix routes, the last one matches"),
    "get-128-1regex": Workload(128, 0, True, 1, True, "GET, 128 B response, keep-alive, 1 regex route"),
    "get-128-1000regex": Workload(128, 0, True, 1000, True,
                                  "GET, 128 B response, keep-alive, 1,000 regex routes, the last one matches"),
}
# The default: every workload measured before regex routes were added.
DEFAULT_WORKLOADS = [w for w in WORKLOADS if "regex" not in w]
DEFAULT_PROXIES = "nginx,haproxy,envoy,coregate"
# The open-files limit a run asks for: every proxy inherits it, and HAProxy
# asks for two per connection.
NOFILE = 1 << 20


def add_arguments(ap):
    ap.add_argument("--proxies", type=names(PROXIES), default=DEFAULT_PROXIES.split(","),
                    help=f"comma list of {', '.join(PROXIES)} (default {DEFAULT_PROXIES})")
    ap.add_argument("--workloads", type=names(WORKLOADS), default=DEFAULT_WORKLOADS,
                    help=f"comma list of {', '.join(WORKLOADS)} (default: all but the regex ones)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--load-threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--workers", type=int, default=1, help="workers (threads, processes) of every proxy")
    ap.add_argument("--proxy-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--rate", type=int, default=0, help="fixed rate of the oha runs, requests/s (default: --rate-fraction)")
    ap.add_argument("--rate-fraction", type=float, default=0.5)
    ap.add_argument("--baseline", default="nginx", choices=PROXIES, metavar="PROXY",
                    help="the proxy ratios are against (default nginx)")
    ap.add_argument("--idle-conns", type=int, default=10000, help="0 skips the idle-memory measurement")
    ap.add_argument("--netns", action="store_true", help="load generator in its own network namespace (veth)")
    ap.add_argument("--base-port", type=int, default=19300)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    ap.add_argument("--name", default=None, help="file name stem (default bench-DATE)")
    ap.add_argument("--install", action="store_true", help="install missing tools")
    ap.add_argument("--compare", metavar="BASELINE.json", help="regression gate against a baseline")
    ap.add_argument("--results", metavar="RUN.json", help="with --compare: an existing run instead of a new one")
    ap.add_argument("--cpu-threshold", type=float, default=0.10)
    ap.add_argument("--p99-threshold", type=float, default=0.50)


# ------------------------------------------------------------------ network

class Netns:
    """A network namespace for the load generator, joined to the host by a
    veth pair: HOST_ADDR on the host side, LOAD_ADDR inside."""
    NAME, HOST_IF, NS_IF = "cgbench", "cgbench-h", "cgbench-n"
    HOST_ADDR, LOAD_ADDR = "10.231.0.1", "10.231.0.2"

    def __enter__(self):
        self.teardown()
        for cmd in (["ip", "netns", "add", self.NAME],
                    ["ip", "link", "add", self.HOST_IF, "type", "veth", "peer", "name", self.NS_IF],
                    ["ip", "link", "set", self.NS_IF, "netns", self.NAME],
                    ["ip", "addr", "add", f"{self.HOST_ADDR}/30", "dev", self.HOST_IF],
                    ["ip", "link", "set", self.HOST_IF, "up"],
                    ["ip", "netns", "exec", self.NAME, "ip", "addr", "add", f"{self.LOAD_ADDR}/30", "dev", self.NS_IF],
                    ["ip", "netns", "exec", self.NAME, "ip", "link", "set", self.NS_IF, "up"],
                    ["ip", "netns", "exec", self.NAME, "ip", "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True)
        return self

    def teardown(self):
        subprocess.run(["ip", "link", "del", self.HOST_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.NAME], capture_output=True)

    def __exit__(self, *exc):
        self.teardown()


# -------------------------------------------------------------------- a run

# The idle-memory measurement's keep-alive timeout: far longer than it
# takes, so no proxy closes a connection while it is counted.
IDLE_KEEPALIVE = "300s"


def start_origin(procs, args, bins, work, size, tag=""):
    p = procs.start(builtin_command(bins["coregate"], f"127.0.0.1:{args.base_port}", size), args.load_cpus,
                    log=f"{work}/origin{tag}.log")
    wait_http("127.0.0.1", args.base_port, "/")
    return p


def workload_site(args, work, addr, i, w):
    """The Site of the I-th proxy of --proxies for Workload W."""
    return Site(work, addr, args.base_port + 1 + i, args.base_port, args.workers, w.routes, w.regex)


def idle_site(args, work, addr, i, n):
    """The Site of the I-th proxy of --proxies holding N idle connections."""
    return Site(work, addr, args.base_port + 1 + i, args.base_port, args.workers, conns=n,
                keepalive_timeout=IDLE_KEEPALIVE if n else None)


def rotated(order, rnd):
    """ORDER rotated by round RND, so no proxy is always measured first."""
    k = rnd % len(order)
    return order[k:] + order[:k]


def post_files(work, size):
    """The POST body as a file (oha) and as a wrk script."""
    body = f"{work}/body-{size}"
    with open(body, "wb") as f:
        f.write(b"x" * size)
    lua = f"{work}/post.lua"
    with open(lua, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = string.rep("x", {size})\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return body, lua


def run_workload(name, args, tools, bins, procs, work, addr, netns):
    w = WORKLOADS[name]
    log(f"== {name}: {w.description}")
    origin = start_origin(procs, args, bins, work, w.size)
    running = {}
    for i, pname in enumerate(args.proxies):
        site = workload_site(args, work, addr, i, w)
        proc = Proxy(pname, tools, bins).start(procs, site, args.proxy_cpus, f"{work}/{pname}.log")
        running[pname] = (proc, site.port)
    path = request_path(site)
    for pname, (proc, port) in running.items():
        try:
            got = wait_http(addr, port, path)
        except RuntimeError as e:
            raise SystemExit(f"{pname} did not start: {e}; its log: {work}/{pname}.log")
        if got != w.size:
            raise SystemExit(f"{pname} answered {got} bytes, expected {w.size}; its log: {work}/{pname}.log")
    body = lua = None
    if w.post:
        body, lua = post_files(work, w.post)
    result = {"description": w.description, "response_bytes": w.size, "request_body_bytes": w.post,
              "keepalive": w.keepalive, "routes": w.routes, "regex": w.regex, "path": path,
              "proxies": list(running), "throughput": [], "latency": []}

    def load(port):
        return Load(f"http://{addr}:{port}{path}", args.load_cpus, args.conns, args.duration, w.keepalive,
                    body, lua, netns=netns)

    for rnd in range(args.rounds):
        row = {}
        for pname in rotated(list(running), rnd):
            proc, port = running[pname]
            started = time.monotonic()
            (requests, rps, errors), ticks = measure(proc.pid, lambda: wrk(tools["wrk"], load(port), args.load_threads))
            wall = time.monotonic() - started
            row[pname] = {"rps": rps, "requests": requests, "errors": errors,
                          "cpu_us": us_per(ticks.total, requests), "busy": ticks.total / TICKS_PER_S / wall}
            log(f"  round {rnd + 1} wrk {pname:16} {rps:>10,.0f} req/s  "
                f"{row[pname]['cpu_us']:6.2f} us CPU/request  busy {row[pname]['busy']:.2f}  errors {errors}")
        result["throughput"].append(row)
    slowest = min(median([r[p]["rps"] for r in result["throughput"]]) for p in running)
    rate = args.rate or max(100, int(slowest * args.rate_fraction))
    result["rate"] = rate
    for rnd in range(args.rounds):
        row = {}
        for pname in rotated(list(running), rnd):
            proc, port = running[pname]
            got, ticks = measure(proc.pid, lambda: oha(tools["oha"], load(port), rate=rate))
            row[pname] = {"ok": got.ok, "errors": got.errors, "pct": got.pct, "cpu_us": us_per(ticks.total, got.ok)}
            log(f"  round {rnd + 1} oha {pname:16} at {rate}/s p50 {got.pct.get('p50', 0):.3f} ms "
                f"p99 {got.pct.get('p99', 0):.3f} ms  {row[pname]['cpu_us']:6.2f} us CPU/request  errors {got.errors}")
        result["latency"].append(row)
    for proc, _ in running.values():
        procs.stop(proc)
    procs.stop(origin)
    summarize_workload(result, args.baseline)
    return result


def run_idle(args, tools, bins, procs, work, addr):
    """RSS per idle keep-alive connection, each proxy alone in turn (the
    open-files limit already raised)."""
    n = idle_count(args.idle_conns, "idle connections")
    log(f"== idle: {n} idle keep-alive connections per proxy")
    origin = start_origin(procs, args, bins, work, 128, "-idle")
    result = {}
    for i, pname in enumerate(args.proxies):
        site = idle_site(args, work, addr, i, n)
        proc = Proxy(pname, tools, bins).start(procs, site, args.proxy_cpus, f"{work}/{pname}-idle.log")
        wait_http(addr, site.port, "/")
        result[pname] = rss_growth(proc.pid, http_holder(addr, site.port), n)
        procs.stop(proc)
        r = result[pname]
        log(f"  {pname:16} {r['rss_before_kib']} KiB -> {r['rss_after_kib']} KiB: "
            f"{r['bytes_per_conn']:.0f} B/connection")
    procs.stop(origin)
    return {"conns": n, "proxies": result}


# --------------------------------------------------------------- the plan

def needs(args):
    """The tools and the binaries this run needs."""
    tools = ["wrk", "oha", "taskset"] + sorted({tool(p) for p in args.proxies if tool(p)})
    if args.netns:
        tools.append("ip")
    bins = sorted({"coregate"} | {binary(p) for p in args.proxies if binary(p)})
    return tools, bins


def method_text(args):
    netns = (f"wrk and oha in the network namespace `{Netns.NAME}`, reaching the proxies over a veth pair "
             f"({Netns.LOAD_ADDR} -> {Netns.HOST_ADDR})" if args.netns else "everything on 127.0.0.1")
    return (f"Each proxy: {args.workers} worker(s), pinned with taskset to CPU {args.proxy_cpus}, access logs off, "
            f"keep-alive to the origin. Origin: `coregate origin` (1 worker) and the load generators on CPU "
            f"{args.load_cpus}; {netns}. Per workload all proxies run at once, each measured alone in turn; "
            f"{args.rounds} rounds, the order rotating each round. Throughput: `wrk -t{args.load_threads} "
            f"-c{args.conns} -d{args.duration}s`. Latency: `oha -z {args.duration}s -w -c {args.conns} -q RATE "
            f"--latency-correction`, RATE = {args.rate_fraction} x the slowest proxy's median maximum. "
            f"CPU time from /proc/PID/stat (utime+stime of the proxy's process tree). Ratios against "
            f"{args.baseline}. Proxy configurations: written by scripts/bench (coregate_bench/configs.py: "
            f"nginx: upstream keepalive, request and response streaming without temp files; "
            f"HAProxy: `http-reuse always`, a `map_beg` lookup for many routes; Envoy: the router filter, "
            f"circuit breakers raised; coregate: defaults).")


def dry_run(args):
    """Prints the plan, and writes and prints the configurations the run
    would write: each workload's route shape, and the idle measurement's."""
    raise_nofile(NOFILE)  # as the run does: the idle count depends on it
    n = idle_count(args.idle_conns, "idle connections") if args.idle_conns else 0
    print(f"plan: proxies {', '.join(args.proxies)}; workloads {', '.join(args.workloads) or 'none'}; "
          f"{args.rounds} rounds of {args.duration}s wrk and {args.duration}s oha each; "
          f"{n} idle connections per proxy; ratios against {args.baseline}")
    print(f"proxies on CPU {args.proxy_cpus} ({args.workers} worker(s)), origin and load on CPU {args.load_cpus}"
          + ("; load generator in network namespace " + Netns.NAME if args.netns else ""))
    tool_names, bin_names = needs(args)
    for cmd in build.build_commands(args, bin_names):
        print(f"  build: {' '.join(cmd)}")
    shapes = {}
    for wname in args.workloads:
        w = WORKLOADS[wname]
        label = f"{w.routes} route(s){' (regex)' if w.regex else ''}"
        shapes[label] = lambda work, i, w=w: workload_site(args, work, "127.0.0.1", i, w)
    if n:
        shapes[f"idle ({n} connections)"] = lambda work, i: idle_site(args, work, "127.0.0.1", i, n)
    return print_configs(args, tool_names, shapes)


def print_configs(args, tool_names, shapes):
    """Writes and prints every proxy's command for each of SHAPES (label:
    site(work, i), the Site of the I-th proxy), checking each
    configuration with its own proxy where that is installed; returns 1
    when a check failed."""
    top = tempfile.mkdtemp(prefix="coregate-bench-dry.")
    tools = {n: find_tool(n) or n for n in TOOLS}
    bins = build.paths(args)
    failed = 0
    for k, (label, site_of) in enumerate(shapes.items()):
        work = f"{top}/{k}"
        os.mkdir(work)
        for i, pname in enumerate(args.proxies):
            site = site_of(work, i)
            proxy = Proxy(pname, tools, bins)
            try:
                conf = proxy.write(site)
            except ValueError as e:
                print(f"  {label}: {pname}: {e}")
                continue
            print(f"  {label}: taskset -c {args.proxy_cpus} {' '.join(proxy.command(conf, site))}")
            check = conf and proxy.check_command(conf)
            if check:
                out = subprocess.run(check, capture_output=True, text=True, timeout=60)
                print(f"    {' '.join(check)}: {'valid' if out.returncode == 0 else 'INVALID'}")
                if out.returncode != 0:
                    print("    " + (out.stdout + out.stderr).strip().replace("\n", "\n    "))
                    failed += 1
    missing = missing_lines(tool_names)
    if missing:
        print("missing tools (--install installs them):")
        print("\n".join(missing))
    print(f"configurations written to {top}")
    return 1 if failed else 0


def in_repo(path):
    """PATH relative to the repository when it lies inside (results kept in
    docs/bench/ should not name this machine's directories), else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def save(results):
    """Writes the raw results so far: a run that stops half way keeps
    what it measured."""
    path = os.path.join(ROOT, results["meta"]["json"])
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def for_gate(args):
    """The run the gate needs: the baseline's workloads, nginx and coregate."""
    base = gate.load(args.compare)
    args.workloads = [w for w in base["workloads"] if w in WORKLOADS]
    args.proxies = [gate.BASE, "coregate"]
    args.baseline = gate.BASE
    args.idle_conns = 0


def main(args):
    if args.compare and args.results:
        return gate.gate(gate.load(args.results), args.compare, args.cpu_threshold, args.p99_threshold)
    if args.compare:
        for_gate(args)
    if args.baseline not in args.proxies and len(args.proxies) > 1:
        log(f"note: the baseline {args.baseline} is not among the proxies: no ratios")
    if args.dry_run:
        return dry_run(args)
    raise_nofile(NOFILE)
    if os.geteuid() != 0 and args.netns:
        raise SystemExit("--netns needs root (ip netns add)")
    tool_names, bin_names = needs(args)
    tools = ensure_tools(tool_names, args.install)
    bins = build.ensure(args, bin_names)
    date = datetime.date.today().isoformat()
    stem = args.name or f"bench-{date}"
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="coregate-bench.")
    procs = Procs()
    results = {"meta": {"date": date, "command": args.command, "machine": machine(),
                        "versions": versions(tools, bins["coregate"]), "method": method_text(args),
                        "baseline": args.baseline,
                        "json": in_repo(f"{args.out}/{stem}.json"), "svg": in_repo(f"{args.out}/{stem}.svg")},
               "workloads": {}}
    netns = Netns() if args.netns else None
    try:
        if netns:
            netns.__enter__()
        addr = Netns.HOST_ADDR if netns else "127.0.0.1"
        ns_name = Netns.NAME if netns else None
        for wname in args.workloads:
            results["workloads"][wname] = run_workload(wname, args, tools, bins, procs, work, addr, ns_name)
            save(results)
        if args.idle_conns:
            results["idle"] = run_idle(args, tools, bins, procs, work, addr)
    finally:
        procs.stop_all()
        if netns:
            netns.__exit__()
    save(results)
    text = report.write(results, ROOT, f"{args.out}/{stem}.md")
    print(text)
    log(f"written: {args.out}/{stem}.md, {results['meta']['json']}, {results['meta']['svg']}; logs in {work}")
    return gate.gate(results, args.compare, args.cpu_threshold, args.p99_threshold) if args.compare else 0
