"""Where a proxied request's CPU time goes: coregate (io_uring, epoll) against nginx.

    scripts/bench profile [--requests 20000] [--body-size 128] [--post BYTES] [--no-callgrind]
                          [--no-dhat] [--spikes]

For each proxy (1 worker, pinned to CPU 1; origin and load on CPU 0), with
a fixed number of keep-alive requests from `oha -n` (50 connections):

  1. user and system CPU per request (proctree: the proxy's process tree);
  2. syscalls per request, from `strace -c -f` attached for the requests
     (strace slows the proxy: these runs count calls, they are not timed),
     with io_uring_enter's share in a column of its own;
  3. user-space instructions per request, from callgrind (callgrind.py),
     coregate on both drivers: what the kernel does for the rings is not
     counted, as a syscall's work is not;
  4. heap allocations per request in steady state, coregate-epoll only,
     from DHAT (valgrind --tool=dhat): two runs, each warmed up with the
     same 1,000 requests, then N and 3N more (N = --requests / 10); the
     difference of their totals over the 2N requests between them leaves
     out everything that happens once (start, warm-up, drain). DHAT prints
     its totals when the proxy exits; on io_uring, coregate under valgrind
     does not exit on SIGTERM (its worker waits in io_uring_enter, which
     valgrind does not interrupt), so only the epoll driver is counted;
     the allocation sites are the same on both.

--spikes adds the two modes of the examples/uring_spike prototype,
spike-sm (state machine) and spike-task (async tasks), measured the same
three ways. They have no epoll driver, so callgrind runs them on io_uring
as they are; a spike that fails under valgrind leaves its cell empty.

The configurations are `run`'s (configs.py). Everything it starts is
stopped before it exits.
"""
import re
import subprocess
import sys
import tempfile
import time

from . import build, callgrind
from .configs import Site
from .loads import Load, oha
from .origins import builtin_command
from .proctree import measure, us_per
from .procs import Procs, log, wait_http
from .proxies import Proxy
from .tools import ensure_tools, find_tool, missing_lines

ORIGIN_PORT = 19400
PORTS = {"nginx": 19401, "coregate": 19402, "coregate-epoll": 19403, "spike-sm": 19404, "spike-task": 19405}
# Only the epoll driver: under valgrind, coregate on io_uring never exits
# on SIGTERM, so DHAT never prints its totals (docs/benchmarking.md).
DHAT = ["coregate-epoll"]
TOOLS = ["oha", "nginx", "taskset", "strace", "valgrind", "callgrind_control"]


def add_arguments(ap):
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--body-size", type=int, default=128)
    ap.add_argument("--post", type=int, default=0, help="send POST bodies of this size")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--no-dhat", action="store_true")
    ap.add_argument("--spikes", action="store_true",
                    help="also measure target/release/examples/uring_spike --mode sm and --mode task")


class Lineup:
    """The proxies of one profile and how to start and load each."""

    def __init__(self, args, tools, bins, procs, work):
        self.args, self.tools, self.bins, self.procs, self.work = args, tools, bins, procs, work
        self.names = [n for n in PORTS if args.spikes or not n.startswith("spike")]
        self.body = None
        if args.post:
            self.body = f"{work}/body"
            with open(self.body, "wb") as f:
                f.write(b"x" * args.post)

    def site(self, name):
        return Site(self.work, "127.0.0.1", PORTS[name], ORIGIN_PORT)

    def command(self, name):
        """NAME's command line (its configuration written), to run under valgrind."""
        site = self.site(name)
        proxy = Proxy(name, self.tools, self.bins)
        return proxy.command(proxy.write(site), site)

    def start(self, name):
        p = Proxy(name, self.tools, self.bins).start(self.procs, self.site(name), "1", f"{self.work}/{name}.log")
        wait_http("127.0.0.1", PORTS[name], "/", limit=60)
        return p

    def load(self, name, n):
        got = oha(self.tools["oha"], Load(f"http://127.0.0.1:{PORTS[name]}/", "0", body=self.body), requests=n)
        return got.ok


def cpu_split(lineup):
    """(user, system) us per request of each proxy."""
    rows = {}
    for name in lineup.names:
        p = lineup.start(name)
        lineup.load(name, 2000)
        _, ticks = measure(p.pid, lambda: lineup.load(name, lineup.args.requests))
        lineup.procs.stop(p)
        rows[name] = (us_per(ticks.user, lineup.args.requests), us_per(ticks.system, lineup.args.requests))
    return rows


def syscalls(lineup):
    """{syscall: (calls, errors)} of each proxy over --requests requests."""
    rows = {}
    for name in lineup.names:
        p = lineup.start(name)
        lineup.load(name, 2000)
        out = f"{lineup.work}/{name}.strace"
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(p.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        lineup.load(name, lineup.args.requests)
        tracer.terminate()
        tracer.wait(timeout=30)
        lineup.procs.stop(p)
        with open(out) as f:
            rows[name] = parse_strace(f.read())
    return rows


def parse_strace(text):
    """{syscall: (calls, errors)} from `strace -c`'s table."""
    counts = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)$", line)
        if m and m.group(3) != "total":
            counts[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
    return counts


def instructions(lineup):
    rows = {}
    n = max(1000, lineup.args.requests // 10)
    for name in lineup.names:
        out = f"{lineup.work}/{name}.callgrind"
        try:
            rows[name] = callgrind.instructions(lineup.procs, lineup.command(name), out, "1", PORTS[name],
                                                lambda k: lineup.load(name, k), 500, n,
                                                log=f"{lineup.work}/{name}.log")
        except (RuntimeError, subprocess.SubprocessError) as e:
            if not name.startswith("spike"):
                raise
            log(f"{name} under callgrind: {e} (see {lineup.work}/{name}.log)")
            continue
        with open(f"{lineup.work}/{name}.annotate.txt", "w") as f:
            f.write(callgrind.annotate(out))
    return rows


def allocations(lineup):
    """Heap allocations per request (DHAT), from the difference of two runs."""
    rows = {}
    n = max(500, lineup.args.requests // 10)
    for name in DHAT:
        totals = []
        for count in (n, 3 * n):
            out = f"{lineup.work}/{name}.dhat-{count}.log"
            p = lineup.procs.start(["valgrind", "--tool=dhat", f"--dhat-out-file={lineup.work}/{name}.dhat-{count}.json"]
                                  + lineup.command(name), "1", log=out)
            try:
                wait_http("127.0.0.1", PORTS[name], "/", limit=60)
                lineup.load(name, 1000)
                lineup.load(name, count)
            finally:
                # SIGTERM: the proxy drains and exits, and DHAT writes its totals.
                lineup.procs.stop(p, timeout=60)
            with open(out) as f:
                found = re.findall(r"Total:\s+[\d,]+ bytes in ([\d,]+) blocks", f.read())
            if not found:
                log(f"{name} under DHAT: no totals (see {out})")
                break
            totals.append(int(found[-1].replace(",", "")))
        if len(totals) == 2:
            rows[name] = (totals[1] - totals[0]) / (2 * n)
    return rows


def table(args, names, split, calls, instr, allocs):
    what = f"POST {args.post} B" if args.post else "GET"
    out = [f"{what}, {args.body_size} B responses, {args.requests} requests, 50 keep-alive connections "
           f"(oha -n), proxy alone on CPU 1", "",
           "| proxy | user us/req | system us/req | system share | syscalls/req | io_uring_enter/req "
           "| instructions/req (callgrind) | heap allocations/req (DHAT) |",
           "|---|---|---|---|---|---|---|---|"]
    for name in names:
        u, s = split[name]
        n = sum(c for c, _ in calls[name].values()) / args.requests
        enter = calls[name].get("io_uring_enter", (0, 0))[0] / args.requests
        ins = f"{instr[name]:,.0f}" if instr.get(name) else ""
        alloc = f"{allocs[name]:.2f}" if name in allocs else ""
        out.append(f"| {name} | {u:.2f} | {s:.2f} | {s / (u + s):.0%} | {n:.2f} | {enter:.2f} | {ins} | {alloc} |")
    out += ["", "Syscalls per request (errors, mostly EAGAIN, in brackets):", "",
            "| syscall | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    calls_by_name = sorted({k for c in calls.values() for k in c},
                           key=lambda k: -max(c.get(k, (0, 0))[0] for c in calls.values()))
    for k in calls_by_name:
        if max(calls[n].get(k, (0, 0))[0] for n in names) / args.requests < 0.01:
            continue
        cells = []
        for name in names:
            c, e = calls[name].get(k, (0, 0))
            cells.append(f"{c / args.requests:.2f}" + (f" ({e / args.requests:.2f})" if e else "") if c else "")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def origin_command(bins, args):
    return builtin_command(bins["coregate"], f"127.0.0.1:{ORIGIN_PORT}", args.body_size)


def main(args):
    bin_names = ["coregate"] + (["spike"] if args.spikes else [])
    if args.dry_run:
        bins = build.paths(args)
        tools = {n: find_tool(n) or n for n in TOOLS}
        lineup = Lineup(args, tools, bins, None, tempfile.mkdtemp(prefix="coregate-profile-dry."))
        for cmd in build.build_commands(args, bin_names):
            print(f"build: {' '.join(cmd)}")
        print(f"origin: taskset -c 0 {' '.join(origin_command(bins, args))}")
        for name in lineup.names:
            print(f"{name}: taskset -c 1 {' '.join(lineup.command(name))}")
        print(f"each: CPU split and strace -c over {args.requests} requests"
              + ("" if args.no_callgrind else "; callgrind") + ("" if args.no_dhat else f"; DHAT on {', '.join(DHAT)}"))
        print("\n".join(missing_lines(TOOLS)))
        return 0
    tools = ensure_tools(TOOLS)
    bins = build.ensure(args, bin_names)
    procs = Procs()
    lineup = Lineup(args, tools, bins, procs, tempfile.mkdtemp(prefix="coregate-profile."))
    try:
        procs.start(origin_command(bins, args), "0", log=f"{lineup.work}/origin.log")
        wait_http("127.0.0.1", ORIGIN_PORT, "/")
        split = cpu_split(lineup)
        calls = syscalls(lineup)
        instr = {} if args.no_callgrind else instructions(lineup)
        allocs = {} if args.no_dhat else allocations(lineup)
    finally:
        procs.stop_all()
    print(table(args, lineup.names, split, calls, instr, allocs))
    print(f"\ncallgrind annotations: {lineup.work}/*.annotate.txt", file=sys.stderr)
    return 0
