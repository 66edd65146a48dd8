"""What the `admission` and `balance` figures share: a coregate started
from a config text on the proxy CPU (its port from its log, its refusal
counters from the lines its workers log when they drain), the origins and
loads a figure starts, Markdown tables, and running a list of figures.

coregate runs on CPU 1 (`taskset -c 1`); origins, load generators and this
process on CPU 0, so client work does not steal the proxy's core. Each
phase of a figure gets a fresh coregate: buckets start full, queues
empty, and the drain-time rejection counters belong to that phase alone.
"""
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import build
from .openloop import summarize_load
from .origins import builtin_command
from .procs import CLIENT_CPU, PROXY_CPU, Procs, free_port, helper, raise_nofile, wait_port
from .summary import fmt
from .tools import machine

WANT_NOFILE = 8192


def yes_no(ok):
    return "yes" if ok else "**no**"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def counts_text(counts):
    """`{"200": 5, "503": 2}` as `200=5 503=2`, or `none`."""
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


class Coregate:
    """One `coregate run` on the proxy CPU, from a config text.

    Its stdout and stderr are drained by threads for its whole life: a
    full pipe would block its workers' logging."""

    LISTENING = re.compile(r"coregate listening on http://127\.0\.0\.1:(\d+)")
    REJECTED = re.compile(r"coregate\[(\w+)\] info: worker (\d+) rejected: (.*)")

    def __init__(self, procs, binary, workdir, config, workers):
        self.procs = procs
        path = Path(workdir) / f"coregate-{time.monotonic_ns()}.toml"
        path.write_text(config)
        self.p = procs.start(
            [binary, "run", "--config", path, "--workers", workers],
            PROXY_CPU,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.p.pid  # taskset execs coregate: same pid
        self.port = None
        self.err = []
        self._ready = threading.Event()
        self._threads = [
            threading.Thread(target=self._drain_stdout, daemon=True),
            threading.Thread(target=self._drain_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()
        if not self._ready.wait(10) or self.port is None:
            self.procs.stop(self.p)
            raise RuntimeError("coregate did not start:\n" + "".join(self.err[-20:]))
        wait_port(self.port)

    def _drain_stdout(self):
        for line in self.p.stdout:
            m = self.LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # exited without listening: unblock the waiter

    def _drain_stderr(self):
        for line in self.p.stderr:
            self.err.append(line)

    def stop(self):
        """SIGTERM (coregate drains, then logs its counters); return the
        rejection counts summed over workers and per worker."""
        self.procs.stop(self.p, timeout=15.0)
        for t in self._threads:
            t.join(timeout=5)
        return rejections(self.err)

    def driver(self):
        for line in self.err:
            m = re.search(r"running (\w+)", line)
            if m:
                return m.group(1)
        return "?"


def rejections(lines):
    """The refusal counters coregate's workers log as they drain
    (`coregate[w0] info: worker 0 rejected: rate=3 queue=1`), summed over
    workers and per worker, from its stderr LINES."""
    total, per_worker = collections.Counter(), {}
    for line in lines:
        m = Coregate.REJECTED.search(line)
        if not m:
            continue
        pairs = dict(kv.split("=", 1) for kv in m.group(3).split())
        per_worker[int(m.group(2))] = {k: int(v) for k, v in pairs.items()}
        total.update(per_worker[int(m.group(2))])
    return {"total": dict(total), "per_worker": per_worker}


def coregate_config(backend_port, limits=None):
    """A one-listener, one-route config; `limits` becomes [route.limits]."""
    lines = [
        "[server]",
        'drain_timeout = "5s"',
        "",
        "[[listener]]",
        'listen = "127.0.0.1:0"',
        "",
        "[upstream.app]",
        f'backends = ["tcp://127.0.0.1:{backend_port}"]',
        "",
        "[[route]]",
        'upstream = "app"',
    ]
    if limits:
        lines += ["", "[route.limits]"]
        for key, value in limits.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, str):
                value = json.dumps(value)
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


class Bench:
    """What every figure needs: the binary, a temp dir, the process table."""

    def __init__(self, args, subcommand, procs, workdir):
        self.binary = args.binary
        self.subcommand = subcommand
        self.quick = args.quick
        self.slow_kind = args.slow_origin
        self.quiet_reserve = getattr(args, "quiet_reserve", None)
        self.procs = procs
        self.workdir = workdir

    def seconds(self, full):
        return full / 4 if self.quick else full

    def command(self, name):
        extra = (" --quick" if self.quick else "") + (" --slow-origin asyncio" if self.slow_kind == "asyncio" else "")
        if self.quiet_reserve is not None:
            extra += f" --quiet-reserve {self.quiet_reserve}"
        return f"scripts/bench {self.subcommand} {name}{extra}"

    def fast_origin(self):
        port = free_port()
        p = self.procs.start(
            builtin_command(self.binary, f"127.0.0.1:{port}", 128),
            CLIENT_CPU,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port)
        return p, port

    def slow_origin(self, ms):
        port = free_port()
        p = self.procs.start(
            helper("origins", port, ms, self.slow_kind),
            CLIENT_CPU,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port)
        return p, port

    def coregate(self, config, workers):
        return Coregate(self.procs, self.binary, self.workdir, config, workers)

    def loads(self, specs):
        """Run open-loop loads side by side, one generator process each,
        all starting at the same instant; return their results in order."""
        start_at = time.time() + 1.0  # time to open their pools first
        children = []
        for spec in specs:
            spec = dict(spec, start_at=start_at)
            children.append(
                self.procs.start(
                    helper("openloop", json.dumps(spec)),
                    CLIENT_CPU,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        longest = max(s["duration"] + s.get("grace", 10) for s in specs) + 30
        results = []
        for p in children:
            out, err = p.communicate(timeout=longest)
            self.procs.forget(p)
            if p.returncode != 0:
                raise RuntimeError(f"load generator failed ({p.returncode}):\n{err.decode()[-2000:]}")
            results.append(summarize_load(json.loads(out)))
        return results


def machine_facts(nproc, binary):
    """tools.machine, with the CPUs this process may use (NPROC) and the
    coregate BINARY's version and build time."""
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        version = "?"
    return {
        **machine(),
        "nproc": nproc,
        "coregate": version,
        "binary_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(binary))),
    }


def add_arguments(ap, figures):
    ap.add_argument("figure", nargs="?", default="all", choices=[*figures, "all"],
                    help="which figure to produce (default all: each in turn)")
    ap.add_argument("--quick", action="store_true", help="about 4x shorter runs, for smoke tests")
    ap.add_argument("--json", metavar="FILE", help="also write every number as JSON to FILE")
    ap.add_argument("--slow-origin", choices=["threads", "asyncio"], default="threads",
                    help="how the slow origins time their delay (default: %(default)s; "
                         "coregate_bench/origins.py says why it matters)")


def dry_run(args, subcommand, names, configs):
    """The plan and every coregate configuration of figures NAMES; CONFIGS
    maps a figure to a function giving its configurations' texts."""
    print(f"plan: figures {', '.join(names)}{' (quick: 4x shorter)' if args.quick else ''}; coregate "
          f"({args.binary}) on CPU {PROXY_CPU}; origins ({args.slow_origin} slow origins: "
          f"{' '.join(helper('origins', 'PORT', 'MS', args.slow_origin))}) and open-loop loads "
          f"({' '.join(helper('openloop', 'SPEC'))}) on CPU {CLIENT_CPU}")
    for cmd in build.build_commands(args, ["coregate"]):
        print(f"build: {' '.join(cmd)}")
    for name in names:
        for text in configs[name](args):
            print(f"--- {subcommand} {name}: coregate configuration (ORIGIN: the origin's port)")
            print(text)
    return 0


def run(args, subcommand, figures, configs):
    """Runs the chosen figures of FIGURES (name: function(bench) returning
    (key, data, Markdown lines)) and prints each figure's section."""
    names = list(figures) if args.figure == "all" else [args.figure]
    if args.dry_run:
        return dry_run(args, subcommand, names, configs)
    args.binary = build.ensure(args, ["coregate"])["coregate"]
    nproc = len(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # this process and its children: CPU 0
    nofile = raise_nofile(WANT_NOFILE)
    # SIGTERM should run the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    facts = machine_facts(nproc, args.binary)
    facts["nofile"] = nofile
    report = {"machine": facts, "quick": args.quick, "figures": {}}
    procs = Procs()
    workdir = tempfile.TemporaryDirectory(prefix=f"coregate-{subcommand}.")
    bench = Bench(args, subcommand, procs, workdir.name)
    try:
        for name in names:
            started = time.monotonic()
            key, result, lines = figures[name](bench)
            result["wall_s"] = round(time.monotonic() - started, 1)
            result["command"] = bench.command(name)
            report["figures"][key] = result
            lines += [
                "",
                f"Command: `{bench.command(name)}`  ",
                f"Machine: nproc {facts['nproc']}, kernel {facts['kernel']}, Python {facts['python']}, "
                f"{facts['coregate']} (binary built {facts['binary_mtime']}); coregate pinned to CPU {PROXY_CPU}, "
                f"origins and load generators to CPU {CLIENT_CPU}; run took {result['wall_s']:g} s.",
                "",
            ]
            print("\n".join(lines), flush=True)
    finally:
        procs.stop_all()
        workdir.cleanup()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0
