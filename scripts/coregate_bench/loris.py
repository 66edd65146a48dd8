"""The slow-loris herd of `admission loris`: connections that start a head,
add a header line about every second and never end it, each replaced as
soon as the proxy cuts it. The herd is a process of its own
(`python3 -m coregate_bench.loris SPEC`); start_loris and stop_loris drive
it from the figure."""
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from .procs import CLIENT_CPU, helper
from .summary import median


class LorisConn(asyncio.Protocol):
    """One loris: starts a head, adds a header line every `interval`, never
    ends it. When the proxy closes it, a replacement opens at once."""

    def __init__(self, herd):
        self.herd = herd
        self.transport = None
        self.timer = None
        self.answered_408 = False
        self.opened = herd.loop.time()

    def connection_made(self, transport):
        self.transport = transport
        self.opened = self.herd.loop.time()
        self.herd.live.add(self)
        transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
        self.schedule()

    def schedule(self):
        # Jitter keeps 2,000 timers from firing in lockstep.
        jitter = random.uniform(0.8, 1.2)
        self.timer = self.herd.loop.call_later(self.herd.interval * jitter, self.tick)

    def tick(self):
        if not self.transport.is_closing():
            self.transport.write(b"X-a: b\r\n")
            self.schedule()

    def data_received(self, data):
        if data.startswith(b"HTTP/1.1 408"):
            self.answered_408 = True

    def connection_lost(self, exc):
        self.herd.live.discard(self)
        if self.timer:
            self.timer.cancel()
        if not self.herd.stopping:
            self.herd.cut += 1
            self.herd.got_408 += self.answered_408
            self.herd.lifetimes.append(self.herd.loop.time() - self.opened)
            self.herd.loop.create_task(self.herd.open_one())


class Herd:
    def __init__(self, spec):
        self.loop = asyncio.get_running_loop()
        self.port = spec["port"]
        self.interval = spec["interval"]
        self.live = set()
        self.stopping = False
        self.cut = self.got_408 = self.connect_errors = 0
        self.lifetimes = []  # seconds from connect to the proxy's cut

    async def open_one(self):
        while not self.stopping:
            try:
                await self.loop.create_connection(lambda: LorisConn(self), "127.0.0.1", self.port)
                return
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(0.05)


async def run_loris(spec):
    herd = Herd(spec)
    stop = asyncio.Event()
    herd.loop.add_signal_handler(signal.SIGTERM, stop.set)
    n, ramp = spec["n"], spec["ramp"]
    t0 = herd.loop.time()
    for i in range(n):
        due = t0 + ramp * i / n
        if due > herd.loop.time():
            await asyncio.sleep(due - herd.loop.time())
        herd.loop.create_task(herd.open_one())
    # Ready when nearly all are open (some are being cut and replaced).
    deadline = herd.loop.time() + 10
    while len(herd.live) < 0.97 * n and herd.loop.time() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": len(herd.live)}), flush=True)
    samples, cut_at_ready, got_408_at_ready = [], herd.cut, herd.got_408
    while not stop.is_set():
        samples.append(len(herd.live))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass
    herd.stopping = True
    for conn in list(herd.live):
        conn.transport.abort()
    print(json.dumps({
        "avg_open": sum(samples) / len(samples) if samples else 0,
        "min_open": min(samples) if samples else 0,
        # Counted while normal traffic ran (from ready to stop) ...
        "cut": herd.cut - cut_at_ready,
        "got_408": herd.got_408 - got_408_at_ready,
        # ... and over the loris process's whole life.
        "cut_total": herd.cut,
        "got_408_total": herd.got_408,
        "connect_errors": herd.connect_errors,
        "lifetime_s": {"p50": median(herd.lifetimes), "max": max(herd.lifetimes, default=None)},
    }), flush=True)


def start_loris(bench, port, n, ramp):
    spec = {"port": port, "n": n, "ramp": ramp, "interval": 1.0}
    # stderr to a file: nobody reads it while the loris runs, and a full
    # pipe would stall it.
    errlog = open(Path(bench.workdir) / f"loris-{time.monotonic_ns()}.err", "w+")
    p = bench.procs.start(
        helper("loris", json.dumps(spec)),
        CLIENT_CPU,
        stdout=subprocess.PIPE,
        stderr=errlog,
        text=True,
    )
    p.errlog = errlog
    line = p.stdout.readline()  # {"ready": open_count} once the ramp is done
    if not line:
        errlog.seek(0)
        raise RuntimeError("loris generator died: " + errlog.read()[-2000:])
    return p, json.loads(line)["ready"]


def stop_loris(bench, p, ready):
    """SIGTERM the loris; it prints its counts and exits."""
    bench.procs.signal(p, signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    bench.procs.forget(p)
    p.errlog.seek(0)
    err = p.errlog.read()
    p.errlog.close()
    if not out.strip():
        raise RuntimeError("loris generator gave no result: " + err[-2000:])
    stats = json.loads(out.strip().splitlines()[-1])
    stats["ready"] = ready
    return stats


if __name__ == "__main__":
    asyncio.run(run_loris(json.loads(sys.argv[1])))
