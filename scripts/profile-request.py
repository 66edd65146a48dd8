#!/usr/bin/env python3
"""Where a proxied request's CPU time goes: coregate (io_uring, epoll) against nginx.

    scripts/profile-request.py [--requests 20000] [--body-size 128] [--post BYTES] [--no-callgrind]
                               [--no-dhat] [--spikes]

For each proxy (1 worker, pinned to CPU 1; origin and load on CPU 0), with
a fixed number of keep-alive requests from `oha -n` (50 connections):

  1. user and system CPU per request, from /proc/PID/stat;
  2. syscalls per request, from `strace -c -f` attached for the requests
     (strace slows the proxy: these runs count calls, they are not timed),
     with io_uring_enter's share in a column of its own;
  3. user-space instructions per request, from callgrind
     (`callgrind_control -z` after a warm-up, `-d` after the requests),
     coregate on both drivers: what the kernel does for the rings is not
     counted, as a syscall's work is not.
  4. heap allocations per request in steady state, coregate only, from
     DHAT (valgrind --tool=dhat): two runs, each warmed up with the same
     1,000 requests, then N and 3N more (N = --requests / 10); the
     difference of their totals over the 2N requests between them leaves
     out everything that happens once (start, warm-up, drain). Both
     drivers; valgrind's io_uring support counts the same allocations.

--spikes adds the two modes of the examples/uring_spike prototype,
spike-sm (state machine) and spike-task (async tasks), measured the same
three ways. They have no epoll driver, so callgrind runs them on io_uring
as they are (what the kernel does for the rings is not counted, as a
syscall's work is not); a spike that fails under valgrind leaves its cell
empty. Build it first: cargo build --release --examples.

The proxy and nginx configurations are the ones scripts/bench writes.
Everything it starts is stopped before it exits.
"""
import argparse
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
loader = importlib.machinery.SourceFileLoader("bench", os.path.join(HERE, "bench"))
spec = importlib.util.spec_from_loader("bench", loader)
bench = importlib.util.module_from_spec(spec)
loader.exec_module(bench)

ORIGIN_PORT = 19400
PORTS = {"nginx": 19401, "coregate": 19402, "coregate-epoll": 19403}
SPIKE = os.path.join(bench.ROOT, "target", "release", "examples", "uring_spike")
SPIKES = {"spike-sm": 19404, "spike-task": 19405}  # added to PORTS by --spikes
CALLGRIND = ["nginx", "coregate", "coregate-epoll"]  # and the spikes, with --spikes


def oha(tools, port, n, post_file):
    cmd = ["taskset", "-c", "0", tools["oha"], "--no-tui", "-n", str(n), "-c", "50"]
    if post_file:
        cmd += ["-m", "POST", "-D", post_file]
    subprocess.run(cmd + [f"http://127.0.0.1:{port}/"], check=True, capture_output=True, timeout=600)


def command(work, tools, name):
    """NAME's command line, 1 worker: scripts/bench's for nginx and coregate;
    a spike takes its mode from its name (spike-sm: --mode sm)."""
    if name in SPIKES:
        return [SPIKE, "--mode", name.split("-", 1)[1], "--listen", f"127.0.0.1:{PORTS[name]}",
                "--upstream", f"127.0.0.1:{ORIGIN_PORT}"]
    proxy = bench.Proxy(name, tools, argparse.Namespace(workers=1))
    return proxy.command(proxy.conf(work, "127.0.0.1", PORTS[name], ORIGIN_PORT, 1, 0))


def start(procs, work, args, tools, name, prefix=()):
    p = procs.start(list(prefix) + command(work, tools, name), "1", log=f"{work}/{name}.log")
    try:
        bench.wait_http("127.0.0.1", PORTS[name], "/", limit=60)
    except RuntimeError:
        procs.stop(p)
        raise
    return p


def cpu_split(procs, work, args, tools, post_file):
    hz = os.sysconf("SC_CLK_TCK")
    rows = {}
    for name in PORTS:
        p = start(procs, work, args, tools, name)
        oha(tools, PORTS[name], 2000, post_file)
        with open(f"/proc/{p.pid}/stat") as f:
            u0, s0 = (int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        oha(tools, PORTS[name], args.requests, post_file)
        with open(f"/proc/{p.pid}/stat") as f:
            u1, s1 = (int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        procs.stop(p)
        rows[name] = ((u1 - u0) * 1e6 / hz / args.requests, (s1 - s0) * 1e6 / hz / args.requests)
    return rows


def syscalls(procs, work, args, tools, post_file):
    rows = {}
    for name in PORTS:
        p = start(procs, work, args, tools, name)
        oha(tools, PORTS[name], 2000, post_file)
        out = f"{work}/{name}.strace"
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(p.pid)],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        oha(tools, PORTS[name], args.requests, post_file)
        tracer.terminate()
        tracer.wait(timeout=30)
        procs.stop(p)
        counts = {}
        with open(out) as f:
            for line in f:
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)$", line)
                if m and m.group(3) != "total":
                    counts[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
        rows[name] = counts
    return rows


def instructions(procs, work, args, tools, post_file):
    rows = {}
    for name in CALLGRIND:
        out = f"{work}/{name}.callgrind"
        n = max(1000, args.requests // 10)
        try:
            p = start(procs, work, args, tools, name,
                      prefix=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
            try:
                oha(tools, PORTS[name], 500, post_file)
                subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
                oha(tools, PORTS[name], n, post_file)
                subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
            finally:
                procs.stop(p)
        except (RuntimeError, subprocess.SubprocessError) as e:
            if name not in SPIKES:
                raise
            print(f"{name} under callgrind: {e} (see {work}/{name}.log)", file=sys.stderr)
            continue
        total = 0
        for path in os.listdir(work):
            if path.startswith(f"{name}.callgrind") and path != f"{name}.callgrind":
                with open(f"{work}/{path}") as f:
                    for line in f:
                        if line.startswith("summary:") or line.startswith("totals:"):
                            total = max(total, int(line.split()[1]))
        rows[name] = total / n
        top = subprocess.run(["callgrind_annotate", "--inclusive=no", max(
            (f"{work}/{x}" for x in os.listdir(work) if x.startswith(f"{name}.callgrind.")),
            key=os.path.getmtime)], capture_output=True, text=True).stdout
        with open(f"{work}/{name}.annotate.txt", "w") as f:
            f.write(top)
    return rows


def allocations(procs, work, args, tools, post_file):
    """Heap allocations per request (DHAT), from the difference of two runs."""
    rows = {}
    n = max(500, args.requests // 10)
    for name in ("coregate", "coregate-epoll"):
        totals = []
        for count in (n, 3 * n):
            log = f"{work}/{name}.dhat-{count}.log"
            p = procs.start(["valgrind", "--tool=dhat", f"--dhat-out-file={work}/{name}.dhat-{count}.json"]
                            + command(work, tools, name), "1", log=log)
            try:
                bench.wait_http("127.0.0.1", PORTS[name], "/", limit=60)
                oha(tools, PORTS[name], 1000, post_file)
                oha(tools, PORTS[name], count, post_file)
            finally:
                # SIGTERM: the proxy drains and exits, and DHAT writes its totals.
                procs.stop(p, timeout=60)
            with open(log) as f:
                found = re.findall(r"Total:\s+[\d,]+ bytes in ([\d,]+) blocks", f.read())
            if not found:
                print(f"{name} under DHAT: no totals (see {log})", file=sys.stderr)
                break
            totals.append(int(found[-1].replace(",", "")))
        if len(totals) == 2:
            rows[name] = (totals[1] - totals[0]) / (2 * n)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--body-size", type=int, default=128)
    ap.add_argument("--post", type=int, default=0, help="send POST bodies of this size")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--no-dhat", action="store_true")
    ap.add_argument("--spikes", action="store_true",
                    help="also measure target/release/examples/uring_spike --mode sm and --mode task")
    args = ap.parse_args()
    if args.spikes:
        if not os.access(SPIKE, os.X_OK):
            raise SystemExit(f"no spike binary at {SPIKE}; build it first (cargo build --release --examples)")
        PORTS.update(SPIKES)
        CALLGRIND.extend(SPIKES)
    tools = bench.ensure_tools(["oha", "nginx", "taskset"], install=False)
    for tool in ("strace", "valgrind", "callgrind_control"):
        if not bench.shutil.which(tool):
            raise SystemExit(f"missing {tool}: apt-get install {'strace' if tool == 'strace' else 'valgrind'}")
    work = tempfile.mkdtemp(prefix="coregate-profile.")
    post_file = None
    if args.post:
        post_file = f"{work}/body"
        with open(post_file, "wb") as f:
            f.write(b"x" * args.post)
    procs = bench.Procs()
    try:
        origin = procs.start([bench.COREGATE, "origin", "--listen", f"127.0.0.1:{ORIGIN_PORT}", "--workers", "1",
                              "--body-size", str(args.body_size)], "0", log=f"{work}/origin.log")
        bench.wait_http("127.0.0.1", ORIGIN_PORT, "/")
        split = cpu_split(procs, work, args, tools, post_file)
        calls = syscalls(procs, work, args, tools, post_file)
        instr = {} if args.no_callgrind else instructions(procs, work, args, tools, post_file)
        allocs = {} if args.no_dhat else allocations(procs, work, args, tools, post_file)
        procs.stop(origin)
    finally:
        procs.stop_all()
    what = f"POST {args.post} B" if args.post else "GET"
    print(f"{what}, {args.body_size} B responses, {args.requests} requests, 50 keep-alive connections "
          f"(oha -n), proxy alone on CPU 1")
    print()
    print("| proxy | user us/req | system us/req | system share | syscalls/req | io_uring_enter/req "
          "| instructions/req (callgrind) | heap allocations/req (DHAT) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in PORTS:
        u, s = split[name]
        n = sum(c for c, _ in calls[name].values()) / args.requests
        enter = calls[name].get("io_uring_enter", (0, 0))[0] / args.requests
        ins = instr.get(name)
        ins_text = f"{ins:,.0f}" if ins else ""
        alloc = f"{allocs[name]:.2f}" if name in allocs else ""
        print(f"| {name} | {u:.2f} | {s:.2f} | {s / (u + s):.0%} | {n:.2f} | {enter:.2f} | {ins_text} | {alloc} |")
    print()
    print("Syscalls per request (errors, mostly EAGAIN, in brackets):")
    print()
    names = sorted({k for c in calls.values() for k in c}, key=lambda k: -max(c.get(k, (0, 0))[0] for c in calls.values()))
    print("| syscall | " + " | ".join(PORTS) + " |")
    print("|---|" + "---|" * len(PORTS))
    for k in names:
        cells = []
        for name in PORTS:
            c, e = calls[name].get(k, (0, 0))
            cells.append(f"{c / args.requests:.2f}" + (f" ({e / args.requests:.2f})" if e else "") if c else "")
        if any(cells) and max(calls[n].get(k, (0, 0))[0] for n in PORTS) / args.requests >= 0.01:
            print(f"| {k} | " + " | ".join(cells) + " |")
    print()
    print(f"callgrind annotations: {work}/*.annotate.txt")


if __name__ == "__main__":
    main()
