"""Memory per idle keep-alive connection, and nothing else: `run`'s idle
measurement on its own.

    scripts/bench idle-memory [--proxies nginx,coregate] [--conns 10000]

Each proxy in turn (one worker, alone on --proxy-cpus, in front of the
built-in origin) gets --conns connections, each after one request and its
whole response; the figure is its RSS growth (process tree) over the
count. The same as `scripts/bench run --workloads '' --idle-conns N`."""
import tempfile

from . import build, run
from .procs import Procs, raise_nofile
from .proxies import PROXIES
from .report import idle_table
from .tools import ensure_tools


def add_arguments(ap):
    ap.add_argument("--proxies", type=run.names(PROXIES), default=["nginx", "coregate"],
                    help="comma list (default nginx,coregate); coregate-epoll for the epoll driver")
    ap.add_argument("--conns", type=int, default=10000, help="idle connections per proxy")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--proxy-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--base-port", type=int, default=19400)


def main(args):
    args.idle_conns, args.workloads, args.netns = args.conns, [], False
    tool_names, bin_names = run.needs(args)
    tool_names = [t for t in tool_names if t not in ("wrk", "oha")]
    if args.dry_run:
        print(f"plan: {args.conns} idle keep-alive connections through each of {', '.join(args.proxies)}, "
              f"alone in turn on CPU {args.proxy_cpus}")
        return run.print_configs(args, tool_names, [(1, False)])
    raise_nofile(1 << 20)
    tools = ensure_tools(tool_names)
    bins = build.ensure(args, bin_names)
    procs = Procs()
    try:
        idle = run.run_idle(args, tools, bins, procs, tempfile.mkdtemp(prefix="coregate-idle."), "127.0.0.1")
    finally:
        procs.stop_all()
    print("\n".join(idle_table(idle)))
    return 0
