"""Memory per idle keep-alive connection, coregate against nginx.

    scripts/bench idle-memory [--proxies nginx,coregate] [--conns 10000]

`run`'s idle measurement on its own, the same as `scripts/bench run
--workloads '' --idle-conns N`. Each proxy in turn (one worker, alone on
--proxy-cpus, in front of the built-in origin) gets --conns connections,
each after one request and its whole response; the figure is its RSS
growth (process tree) over the count, and the last line the ratio
coregate / nginx. Every proxy's keep-alive timeout is raised to 300 s so
that none closes a connection while it is counted.

What the old scripts/idle-memory.py also did and this does not: a row for
the built-in origin itself (it is not a proxy), and --driver (the epoll
driver is the proxy coregate-epoll: --proxies nginx,coregate,coregate-epoll)."""
import tempfile

from . import build, run
from .options import names
from .procs import Procs, idle_count, raise_nofile
from .proxies import PROXIES
from .report import idle_table
from .summary import fmt_x, ratio
from .tools import ensure_tools


def add_arguments(ap):
    ap.add_argument("--proxies", type=names(PROXIES), default=["nginx", "coregate"],
                    help="comma list (default nginx,coregate); coregate-epoll for the epoll driver")
    ap.add_argument("--conns", type=int, default=10000, help="idle connections per proxy")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--proxy-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--base-port", type=int, default=19400)


def ratio_line(idle):
    """`coregate / nginx: 0.42x`, from an idle result; None without both."""
    proxies = idle["proxies"]
    if "coregate" not in proxies or "nginx" not in proxies:
        return None
    x = ratio(proxies["coregate"]["bytes_per_conn"], proxies["nginx"]["bytes_per_conn"])
    return f"coregate / nginx: {fmt_x(x) or 'n/a (nginx grew by nothing)'}"


def main(args):
    args.idle_conns, args.workloads, args.netns = args.conns, [], False
    tool_names, bin_names = run.needs(args)
    tool_names = [t for t in tool_names if t not in ("wrk", "oha")]
    raise_nofile(run.NOFILE)
    if args.dry_run:
        n = idle_count(args.conns, "idle connections")
        print(f"plan: {n} idle keep-alive connections through each of {', '.join(args.proxies)}, "
              f"alone in turn on CPU {args.proxy_cpus}")
        return run.print_configs(args, tool_names, {
            f"idle ({n} connections)": lambda work, i: run.idle_site(args, work, "127.0.0.1", i, n)})
    tools = ensure_tools(tool_names)
    bins = build.ensure(args, bin_names)
    procs = Procs()
    try:
        idle = run.run_idle(args, tools, bins, procs, tempfile.mkdtemp(prefix="coregate-idle."), "127.0.0.1")
    finally:
        procs.stop_all()
    print("\n".join(idle_table(idle)))
    line = ratio_line(idle)
    if line:
        print(f"\n{line}")
    return 0
