"""The request path's cost of a fleet-scoped rate limit against a local one.

    scripts/bench fleet-cost [--requests 20000] [--rounds 2] [--dry-run]

In instructions per request (callgrind.py: deterministic where CPU time on
a shared machine is not). One coregate worker on the epoll driver (which
valgrind follows) in front of the built-in origin, a limit no request
reaches, a real redis-server (on a unix socket) for the fleet scope; after
a warm-up of 1,000 requests the counters are zeroed and --requests
requests measured. The fleet sync thread's own work is included. The
configurations are fleet-demo's hosts' (fleet.host_config), with no drain
grace (as the old scripts/fleet-cost had): nothing balances over these
proxies, and a grace would add its seconds to every stop under valgrind.
"""
import os
import tempfile

from . import build, callgrind
from .fleet import host_config
from .loads import Load, oha
from .origins import builtin_command
from .procs import Procs, free_port, wait_http, wait_until
from .tools import ensure_tools

LIMIT = 1_000_000_000  # req/s: a limit no request reaches
SCOPES = ["local", "fleet"]


def add_arguments(ap):
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)


def config(scope, port, origin, redis_socket):
    return host_config(f"127.0.0.1:{port}", LIMIT, scope, redis=f"redis+unix://{redis_socket}",
                       backend=f"127.0.0.1:{origin}", drain_grace="0s")


def measure(args, binary, oha_path, procs, work, scope, origin, sock):
    """Instructions per request of one coregate with a SCOPE limit."""
    port = free_port()
    path = f"{work}/{scope}.toml"
    with open(path, "w") as f:
        f.write(config(scope, port, origin, sock))

    def load(n):
        got = oha(oha_path, Load(f"http://127.0.0.1:{port}/", "0", conns=4, headers=["x-api-key: tenant-1"]),
                  requests=n)
        if got.ok != n:
            raise SystemExit(f"fleet-cost: {got.ok} of {n} requests got 2xx ({got.errors} failed)")
        return got.ok

    return callgrind.instructions(procs, [binary, "run", "--config", path, "--workers", "1", "--driver", "epoll"],
                                  f"{work}/cg.{scope}", "1", port, load, 1000, args.requests,
                                  log=f"{work}/{scope}.log")


def main(args):
    if args.dry_run:
        for scope in SCOPES:
            print(f"--- {scope}.toml\n" + config(scope, "PORT", "ORIGIN", "WORK/redis.sock"))
        return 0
    tools = ensure_tools(["valgrind", "callgrind_control", "redis-server", "oha", "taskset"])
    binary = build.ensure(args, ["coregate"])["coregate"]
    work = tempfile.mkdtemp(prefix="coregate-fleet-cost.")
    sock = f"{work}/redis.sock"
    procs = Procs()
    rows = []
    try:
        procs.start([tools["redis-server"], "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no",
                     "--dir", work], "0", log=f"{work}/redis.log")
        origin = free_port()
        procs.start(builtin_command(binary, f"127.0.0.1:{origin}"), "0", log=f"{work}/origin.log")
        wait_http("127.0.0.1", origin, "/")
        wait_until(lambda: os.path.exists(sock), 10, f"redis-server made no {sock}")
        for _ in range(args.rounds):
            rows.append([measure(args, binary, tools["oha"], procs, work, s, origin, sock) for s in SCOPES])
    finally:
        procs.stop_all()
    print("| round | local instr/request | fleet instr/request | fleet / local |")
    print("|---|---|---|---|")
    for r, (local, fleet) in enumerate(rows, 1):
        print(f"| {r} | {local:.0f} | {fleet:.0f} | {fleet / local:.3f}x |")
    return 0
